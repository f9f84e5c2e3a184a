//! The object-store backend: any S3-compatible service (AWS S3, Garage, MinIO, Ceph),
//! through `object_store`'s S3 client (SigV4, retries with back-off on 5xx and
//! `SlowDown`, multipart, presigned URLs). Keys are `<prefix>/<key>`, which with the
//! same prefix as distribution's `rootdirectory` is the layout its `s3-aws` driver
//! writes.
//!
//! Two things are added on top of the client:
//!
//! * a breaker: once the store is found unreachable, requests fail at once with
//!   `Unavailable` (a prompt 503 for clients, `/readyz` false) instead of each waiting
//!   through its retries, and one request a second is let through to find out
//!   whether it is back;
//! * error sorting: unreachable or 5xx (`Unavailable`), refused (wrong key, missing
//!   bucket, no permission: `Refused`, with the reason in plain words), a multipart
//!   part that is not the one recorded (`Conflict`).

use std::ops::Range;
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::stream::BoxStream;
use futures_util::{StreamExt, TryStreamExt};
use http_body::{Frame, SizeHint};
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path as ObjectPath;
use object_store::signer::Signer;
use object_store::{
    BackoffConfig, ClientOptions, GetOptions, GetRange, ObjectStore, ObjectStoreExt, PutPayload,
    RetryConfig,
};

use super::{Key, Layout, Listing, Meta, Object, PartSizes, Result, Storage, StorageError};
use crate::body::{self, BoxError};
use crate::config::S3Config;

/// Parts are cut at this size (S3's minimum is 5 MiB; 8 MiB parts allow blobs of up to
/// 80 GB within S3's 10,000 parts).
const PART_SIZE: usize = 8 * 1024 * 1024;
const MIN_PART: usize = 5 * 1024 * 1024;
/// How long a presigned blob URL is valid (distribution uses 20 minutes).
const PRESIGN_FOR: Duration = Duration::from_secs(20 * 60);
/// Keys per bulk delete request, and requests at a time.
const DELETE_CHUNK: usize = 100;
const DELETE_PARALLEL: usize = 8;
/// While the store is down, one request this often goes through to probe it.
const PROBE_EVERY: Duration = Duration::from_secs(1);

/// Everything needed to reach a bucket, resolved from `[storage.s3]` and the
/// environment.
#[derive(Clone)]
pub struct S3Settings {
    pub endpoint: Option<String>,
    pub region: String,
    pub bucket: String,
    pub prefix: String,
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: Option<String>,
    pub redirect: bool,
}

impl std::fmt::Debug for S3Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Settings")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .field("access_key_id", &self.access_key_id)
            .finish_non_exhaustive()
    }
}

impl S3Settings {
    /// From the configuration: the secret from `secret_access_key_file`, else
    /// `AWS_SECRET_ACCESS_KEY`; the key id from `access_key_id`, else
    /// `AWS_ACCESS_KEY_ID`; `AWS_SESSION_TOKEN` when set. Errors name the key.
    pub fn resolve(config: &S3Config) -> std::result::Result<S3Settings, String> {
        let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let access_key_id = match &config.access_key_id {
            Some(id) => id.clone(),
            None => env("AWS_ACCESS_KEY_ID").ok_or(
                "storage.s3.access_key_id: not set, and AWS_ACCESS_KEY_ID is not in the \
                 environment",
            )?,
        };
        let secret_access_key = match &config.secret_access_key_file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    format!("storage.s3.secret_access_key_file: {}: {e}", path.display())
                })?;
                let secret = text.trim().to_owned();
                if secret.is_empty() {
                    return Err(format!(
                        "storage.s3.secret_access_key_file: {} is empty",
                        path.display()
                    ));
                }
                secret
            }
            None => env("AWS_SECRET_ACCESS_KEY").ok_or(
                "storage.s3.secret_access_key_file: not set, and AWS_SECRET_ACCESS_KEY is \
                 not in the environment",
            )?,
        };
        Ok(S3Settings {
            endpoint: config.endpoint.clone(),
            region: config.region.clone(),
            bucket: config.bucket.clone(),
            prefix: config.prefix.trim_matches('/').to_owned(),
            access_key_id,
            secret_access_key,
            session_token: env("AWS_SESSION_TOKEN"),
            redirect: config.redirect,
        })
    }
}

/// The S3 storage.
#[derive(Debug)]
pub struct S3Storage {
    store: AmazonS3,
    prefix: String,
    name: String,
    redirect: bool,
    breaker: Breaker,
}

impl S3Storage {
    /// Delete objects in bulk: DeleteObjects requests of up to [`DELETE_CHUNK`] keys,
    /// [`DELETE_PARALLEL`] at a time (a store works through one request's keys one
    /// after another).
    async fn delete_paths(&self, keys: Vec<ObjectPath>, what: &str) -> Result<()> {
        if keys.is_empty() {
            return Ok(());
        }
        self.run(what, async {
            let chunks: Vec<Vec<ObjectPath>> =
                keys.chunks(DELETE_CHUNK).map(<[_]>::to_vec).collect();
            futures_util::stream::iter(chunks)
                .map(|chunk| async move {
                    let locations = futures_util::stream::iter(chunk.into_iter().map(Ok)).boxed();
                    let mut results = self.store.delete_stream(locations);
                    while let Some(r) = results.next().await {
                        match r {
                            Err(e) if !not_found(&e) => return Err(e),
                            _ => {}
                        }
                    }
                    Ok(())
                })
                .buffer_unordered(DELETE_PARALLEL)
                .try_collect::<Vec<()>>()
                .await
                .map(drop)
        })
        .await
    }

    /// Build the client (nothing is sent yet; [`Storage::check`] tries the bucket).
    pub fn open(settings: &S3Settings) -> std::result::Result<S3Storage, String> {
        let mut builder = AmazonS3Builder::new()
            .with_region(&settings.region)
            .with_bucket_name(&settings.bucket)
            .with_access_key_id(&settings.access_key_id)
            .with_secret_access_key(&settings.secret_access_key)
            .with_retry(RetryConfig {
                backoff: BackoffConfig {
                    init_backoff: Duration::from_millis(50),
                    max_backoff: Duration::from_secs(2),
                    base: 2.0,
                },
                max_retries: 5,
                retry_timeout: Duration::from_secs(15),
            })
            .with_client_options(
                ClientOptions::new()
                    .with_connect_timeout(Duration::from_secs(3))
                    // No limit on a whole request: a blob streams to a slow client for
                    // as long as it takes; a stalled read is what gives up.
                    .with_timeout_disabled()
                    .with_read_timeout(Duration::from_secs(30))
                    .with_pool_idle_timeout(Duration::from_secs(60))
                    .with_pool_max_idle_per_host(64),
            );
        if let Some(token) = &settings.session_token {
            builder = builder.with_token(token);
        }
        let name = match &settings.endpoint {
            Some(endpoint) => {
                builder = builder
                    .with_endpoint(endpoint)
                    .with_allow_http(endpoint.starts_with("http://"))
                    .with_virtual_hosted_style_request(false);
                format!("the S3 bucket {} at {endpoint}", settings.bucket)
            }
            None => {
                builder = builder.with_virtual_hosted_style_request(true);
                format!(
                    "the S3 bucket {} (AWS, {})",
                    settings.bucket, settings.region
                )
            }
        };
        let store = builder.build().map_err(|e| format!("storage.s3: {e}"))?;
        Ok(S3Storage {
            store,
            prefix: settings.prefix.clone(),
            name,
            redirect: settings.redirect,
            breaker: Breaker::default(),
        })
    }

    fn path(&self, key: &Key) -> ObjectPath {
        if self.prefix.is_empty() {
            ObjectPath::from(key.as_str())
        } else {
            ObjectPath::from(format!("{}/{}", self.prefix, key.as_str()))
        }
    }

    /// The key of a listed path (`None` for anything outside the prefix or not a key
    /// this layout makes).
    fn key_of(&self, path: &ObjectPath) -> Option<Key> {
        let s = path.as_ref();
        let rest = if self.prefix.is_empty() {
            s
        } else {
            s.strip_prefix(self.prefix.as_str())?.strip_prefix('/')?
        };
        Key::from_listed(rest)
    }

    /// Run one operation through the breaker, sorting its error.
    async fn run<T, F>(&self, what: &str, op: F) -> Result<T>
    where
        F: std::future::Future<Output = object_store::Result<T>>,
    {
        self.breaker.admit(&self.name)?;
        match op.await {
            Ok(v) => {
                self.breaker.healthy();
                Ok(v)
            }
            Err(e) => {
                // Only a store that cannot be reached opens the breaker: one that answers
                // 5xx or SlowDown is there, and each request retries on its own.
                let unreachable = transport_failure(&e);
                let e = self.sort(what, e);
                match (&e, unreachable) {
                    (StorageError::Unavailable { detail, .. }, true) => self.breaker.down(detail),
                    _ => self.breaker.healthy(),
                }
                Err(e)
            }
        }
    }

    fn sort(&self, what: &str, e: object_store::Error) -> StorageError {
        sort_error(&self.name, what, e)
    }

    fn meta(m: &object_store::ObjectMeta) -> Meta {
        Meta {
            size: m.size,
            modified: std::time::SystemTime::from(m.last_modified),
            version: m
                .e_tag
                .clone()
                .unwrap_or_else(|| format!("{}-{}", m.size, m.last_modified.timestamp_micros())),
        }
    }
}

fn not_found(e: &object_store::Error) -> bool {
    matches!(e, object_store::Error::NotFound { .. })
}

/// The S3 error message in an error's text (`<Message>` of the body).
fn message_of(text: &str) -> Option<String> {
    text.split("<Message>")
        .nth(1)
        .and_then(|rest| rest.split("</Message>").next())
        .map(|m| m.trim().to_owned())
        .filter(|m| !m.is_empty())
}

/// The HTTP status in an error's text (`object_store` does not expose its retry
/// error's type), with the response body's S3 error code when there is one.
fn status_and_code(text: &str) -> (Option<u16>, Option<String>) {
    let status = text
        .split("status code: ")
        .nth(1)
        .and_then(|rest| rest.get(..3))
        .and_then(|s| s.parse().ok());
    let code = text
        .split("<Code>")
        .nth(1)
        .and_then(|rest| rest.split("</Code>").next())
        .map(str::to_owned);
    (status, code)
}

/// The transport error inside `e` when the request never got an answer (refused,
/// timed out, cut off).
fn transport_error(e: &object_store::Error) -> Option<&object_store::client::HttpError> {
    use object_store::client::HttpErrorKind as K;
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if let Some(http) = err.downcast_ref::<object_store::client::HttpError>()
            && matches!(
                http.kind(),
                K::Connect | K::Timeout | K::Interrupted | K::Request
            )
        {
            return Some(http);
        }
        source = err.source();
    }
    None
}

fn transport_failure(e: &object_store::Error) -> bool {
    transport_error(e).is_some()
}

/// Sort an `object_store` error into what the registry and the operator need to know.
pub fn sort_error(store: &str, what: &str, e: object_store::Error) -> StorageError {
    if let Some(http) = transport_error(&e) {
        return StorageError::Unavailable {
            store: store.to_owned(),
            detail: format!("{what}: cannot reach it ({http})"),
        };
    }
    let text = e.to_string();
    let (status, code) = status_and_code(&text);
    let code = code.unwrap_or_default();
    let refused = |detail: String| StorageError::Refused {
        store: store.to_owned(),
        detail,
    };
    match (&e, status, code.as_str()) {
        (_, _, "NoSuchBucket") => refused(format!("{what}: the bucket does not exist")),
        (_, _, "InvalidAccessKeyId") => refused(format!(
            "{what}: the store does not know this access key id (storage.s3.access_key_id)"
        )),
        (_, _, "SignatureDoesNotMatch") => refused(format!(
            "{what}: the secret access key is wrong (storage.s3.secret_access_key_file)"
        )),
        (_, _, "InvalidPart" | "NoSuchUpload" | "InvalidPartOrder") => StorageError::Conflict(
            format!("{what}: the store does not have the parts recorded ({code})"),
        ),
        (object_store::Error::PermissionDenied { .. }, _, _)
        | (object_store::Error::Unauthenticated { .. }, _, _)
        | (_, Some(401 | 403), _) => refused(format!(
            "{what}: access denied{} (check storage.s3.access_key_id, the secret and the \
             key's permissions on the bucket)",
            match message_of(&text) {
                Some(m) => format!(": {m}"),
                None if !code.is_empty() => format!(" ({code})"),
                None => String::new(),
            }
        )),
        (_, Some(s), _) if s >= 500 || s == 429 => StorageError::Unavailable {
            store: store.to_owned(),
            detail: format!(
                "{what}: it keeps answering {s}{}",
                if code.is_empty() {
                    String::new()
                } else {
                    format!(" {code}")
                }
            ),
        },
        _ => StorageError::Io {
            what: format!("{what} on {store}"),
            source: std::io::Error::other(text),
        },
    }
}

/// Whether the store was last found unreachable, and when it was last tried.
#[derive(Debug, Default)]
struct Breaker {
    state: Mutex<Option<Down>>,
}

#[derive(Debug)]
struct Down {
    reason: String,
    last_try: Instant,
}

impl Breaker {
    /// Let a request through, or refuse it at once while the store is down (one
    /// request a second still goes through, as the probe).
    fn admit(&self, store: &str) -> Result<()> {
        let mut state = match self.state.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        };
        match state.as_mut() {
            None => Ok(()),
            Some(down) if down.last_try.elapsed() >= PROBE_EVERY => {
                down.last_try = Instant::now();
                Ok(())
            }
            Some(down) => Err(StorageError::Unavailable {
                store: store.to_owned(),
                detail: down.reason.clone(),
            }),
        }
    }

    fn down(&self, reason: &str) {
        let mut state = match self.state.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        };
        if state.is_none() {
            tracing::error!("object store unavailable: {reason}");
        }
        *state = Some(Down {
            reason: reason.to_owned(),
            last_try: Instant::now(),
        });
    }

    fn healthy(&self) {
        let mut state = match self.state.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        };
        if state.take().is_some() {
            tracing::info!("object store reachable again");
        }
    }
}

/// A response body streaming an object from the store, with its exact length.
struct StreamBody {
    // Polled through `get_mut`, never locked: the mutex only makes the body `Sync`.
    stream: Mutex<BoxStream<'static, object_store::Result<Bytes>>>,
    remaining: u64,
}

impl http_body::Body for StreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<std::result::Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let stream = match this.stream.get_mut() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        };
        match stream.poll_next_unpin(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) if this.remaining > 0 => {
                Poll::Ready(Some(Err("the object ended before its length".into())))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(Box::new(e)))),
            Poll::Ready(Some(Ok(bytes))) => {
                this.remaining = this.remaining.saturating_sub(bytes.len() as u64);
                Poll::Ready(Some(Ok(Frame::data(bytes))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

#[async_trait::async_trait]
impl Storage for S3Storage {
    fn describe(&self) -> String {
        self.name.clone()
    }

    async fn head(&self, key: &Key) -> Result<Option<Meta>> {
        let path = self.path(key);
        match self
            .run(&format!("HEAD {key}"), async {
                match self.store.head(&path).await {
                    Ok(m) => Ok(Some(m)),
                    Err(e) if not_found(&e) => Ok(None),
                    Err(e) => Err(e),
                }
            })
            .await?
        {
            Some(m) => Ok(Some(S3Storage::meta(&m))),
            None => Ok(None),
        }
    }

    async fn get(&self, key: &Key, range: Option<Range<u64>>) -> Result<Option<Object>> {
        let path = self.path(key);
        let options = GetOptions {
            range: range.clone().map(GetRange::Bounded),
            ..GetOptions::default()
        };
        let Some(result) = self
            .run(&format!("GET {key}"), async {
                match self.store.get_opts(&path, options).await {
                    Ok(r) => Ok(Some(r)),
                    Err(e) if not_found(&e) => Ok(None),
                    Err(e) => Err(e),
                }
            })
            .await?
        else {
            return Ok(None);
        };
        let meta = S3Storage::meta(&result.meta);
        let range = result.range.clone();
        let remaining = range.end.saturating_sub(range.start);
        let body = body::boxed(StreamBody {
            stream: Mutex::new(result.into_stream()),
            remaining,
        });
        Ok(Some(Object { meta, range, body }))
    }

    async fn read(&self, key: &Key, limit: u64) -> Result<Option<(Bytes, Meta)>> {
        let path = self.path(key);
        let what = format!("GET {key}");
        self.run(&what, async {
            let result = match self.store.get(&path).await {
                Ok(r) => r,
                Err(e) if not_found(&e) => return Ok(None),
                Err(e) => return Err(e),
            };
            let meta = S3Storage::meta(&result.meta);
            if meta.size > limit {
                return Ok(Some(Err(meta.size)));
            }
            let bytes = result.bytes().await?;
            Ok(Some(Ok((bytes, meta))))
        })
        .await?
        .map(|r| {
            r.map_err(|size| StorageError::TooLarge(format!("{key} ({size} bytes, limit {limit})")))
        })
        .transpose()
    }

    async fn put(&self, key: &Key, bytes: Bytes) -> Result<()> {
        let path = self.path(key);
        self.run(&format!("PUT {key}"), async {
            self.store
                .put(&path, PutPayload::from(bytes))
                .await
                .map(drop)
        })
        .await
    }

    async fn delete(&self, key: &Key) -> Result<()> {
        let path = self.path(key);
        self.run(&format!("DELETE {key}"), async {
            match self.store.delete(&path).await {
                Err(e) if !not_found(&e) => Err(e),
                _ => Ok(()),
            }
        })
        .await
    }

    async fn delete_many(&self, keys: &[Key]) -> Result<()> {
        self.delete_paths(keys.iter().map(|k| self.path(k)).collect(), "DELETE (bulk)")
            .await
    }

    async fn delete_all(&self, prefix: &Key) -> Result<()> {
        let keys: Vec<ObjectPath> = self
            .list(prefix)
            .await?
            .into_iter()
            .map(|(k, _)| self.path(&k))
            .collect();
        self.delete_paths(keys, &format!("DELETE {prefix}/…")).await
    }

    async fn list(&self, prefix: &Key) -> Result<Vec<(Key, Meta)>> {
        let path = self.path(prefix);
        let listed: Vec<object_store::ObjectMeta> = self
            .run(&format!("LIST {prefix}/"), async {
                self.store.list(Some(&path)).try_collect().await
            })
            .await?;
        Ok(listed
            .iter()
            .filter_map(|m| Some((self.key_of(&m.location)?, S3Storage::meta(m))))
            .collect())
    }

    async fn list_dir(&self, prefix: &Key) -> Result<Listing> {
        let path = self.path(prefix);
        let listed = self
            .run(&format!("LIST {prefix}/"), async {
                self.store.list_with_delimiter(Some(&path)).await
            })
            .await?;
        Ok(Listing {
            objects: listed
                .objects
                .iter()
                .filter_map(|m| Some((self.key_of(&m.location)?, S3Storage::meta(m))))
                .collect(),
            dirs: listed
                .common_prefixes
                .iter()
                .filter_map(|p| p.filename().map(str::to_owned))
                .collect(),
        })
    }

    async fn rename(&self, from: &Key, to: &Key) -> Result<()> {
        let (src, dst) = (self.path(from), self.path(to));
        self.run(&format!("COPY {from} to {to}"), async {
            self.store.copy(&src, &dst).await
        })
        .await?;
        self.delete(from).await
    }

    fn part_sizes(&self) -> PartSizes {
        PartSizes {
            min: MIN_PART,
            preferred: PART_SIZE,
        }
    }

    async fn create_multipart(&self, key: &Key) -> Result<String> {
        let path = self.path(key);
        self.run(&format!("CreateMultipartUpload {key}"), async {
            self.store.create_multipart(&path).await
        })
        .await
    }

    async fn put_part(
        &self,
        key: &Key,
        upload: &str,
        index: usize,
        _offset: u64,
        data: Vec<Bytes>,
    ) -> Result<String> {
        let path = self.path(key);
        let upload = upload.to_owned();
        self.run(&format!("UploadPart {key} #{}", index + 1), async {
            self.store
                .put_part(&path, &upload, index, PutPayload::from_iter(data))
                .await
                .map(|p| p.content_id)
        })
        .await
    }

    async fn complete_multipart(&self, key: &Key, upload: &str, parts: &[String]) -> Result<()> {
        let path = self.path(key);
        let upload = upload.to_owned();
        let parts: Vec<PartId> = parts
            .iter()
            .map(|p| PartId {
                content_id: p.clone(),
            })
            .collect();
        self.run(&format!("CompleteMultipartUpload {key}"), async {
            self.store
                .complete_multipart(&path, &upload, parts)
                .await
                .map(drop)
        })
        .await
    }

    async fn abort_multipart(&self, key: &Key, upload: &str) -> Result<()> {
        let path = self.path(key);
        let upload = upload.to_owned();
        self.run(&format!("AbortMultipartUpload {key}"), async {
            match self.store.abort_multipart(&path, &upload).await {
                Err(e) if !not_found(&e) => Err(e),
                _ => Ok(()),
            }
        })
        .await
        .or_else(|e| match e {
            // Already completed or aborted elsewhere: nothing left to drop.
            StorageError::Conflict(_) => Ok(()),
            e => Err(e),
        })
    }

    async fn redirect_url(&self, key: &Key) -> Result<Option<String>> {
        if !self.redirect {
            return Ok(None);
        }
        let path = self.path(key);
        self.store
            .signed_url(http::Method::GET, &path, PRESIGN_FOR)
            .await
            .map(|u| Some(u.to_string()))
            .map_err(|e| self.sort(&format!("presign {key}"), e))
    }

    async fn check(&self) -> Result<()> {
        let path = self.path(&Layout.ours());
        self.run("list the bucket", async {
            self.store.list_with_delimiter(Some(&path)).await.map(drop)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_and_code_are_read_from_the_error_text() {
        let text = "Generic S3 error: Error performing GET http://x/b in 2ms - Server \
                    returned non-2xx status code: 404 Not Found: <?xml version=\"1.0\"?>\
                    <Error><Code>NoSuchBucket</Code><Message>x</Message></Error>";
        assert_eq!(
            status_and_code(text),
            (Some(404), Some("NoSuchBucket".to_owned()))
        );
        assert_eq!(status_and_code("nothing"), (None, None));
    }

    #[test]
    fn the_breaker_fails_fast_and_probes() {
        let b = Breaker::default();
        b.admit("s").expect("up");
        b.down("gone");
        assert!(matches!(
            b.admit("s"),
            Err(StorageError::Unavailable { .. })
        ));
        if let Ok(mut s) = b.state.lock()
            && let Some(d) = s.as_mut()
        {
            d.last_try = Instant::now() - PROBE_EVERY;
        }
        b.admit("s").expect("one probe goes through");
        assert!(b.admit("s").is_err(), "and only one");
        b.healthy();
        b.admit("s").expect("up again");
    }
}
