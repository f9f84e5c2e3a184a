//! The [`Backend`] for the registry built into this process ("all-in-one"): the OCI
//! Distribution Specification v1.1 over a [`storage::Storage`] (the local disk or an
//! S3-compatible object store), called directly by the gate (no HTTP hop), with the
//! gate's identity, policy, TLS and logging in front. Any number of gates may share
//! one object store: everything a request needs is in the store, not in a process.
//!
//! * `blobs`     GET/HEAD (with `Range`, or a redirect to the store) and DELETE of blobs
//! * `uploads`   POST/PATCH/PUT/GET/DELETE of upload sessions, cross-repository mount
//! * `manifests` GET/HEAD/PUT/DELETE of manifests, with validation
//! * `listing`   tags, catalog and referrers
//! * `store`     the data model (links, tags, revisions) over any storage
//! * `claims`    how writers and the garbage collector agree without locks
//! * `gc`        garbage collection beside pushes
//! * `digest`    hashing, resumable across gates
//! * `storage`   the interface and its two backends, `fs` and `s3`

pub(crate) mod blobs;
pub mod claims;
pub(crate) mod digest;
pub mod gc;
mod listing;
pub(crate) mod manifests;
pub mod storage;
pub mod store;
mod uploads;

use std::sync::Arc;
use std::time::Duration;

use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};

use crate::backend::{Backend, BoxFuture, RequestContext};
use crate::body::{self, Body};
use crate::config::StorageConfig;
use crate::error::{ErrorCode, OciError};
use crate::route::Route;
use storage::{Storage, StorageError};
use store::Store;

/// Why a registry request failed: an answer for the client, or a storage fault (logged
/// with its cause; the client sees a generic error).
#[derive(Debug)]
pub(crate) enum Failure {
    Client(OciError),
    Storage(StorageError),
}

impl From<OciError> for Failure {
    fn from(e: OciError) -> Self {
        Failure::Client(e)
    }
}

impl From<StorageError> for Failure {
    fn from(e: StorageError) -> Self {
        Failure::Storage(e)
    }
}

pub(crate) type Handled = Result<Response<Body>, Failure>;

/// Open the storage `[storage]` names: the local disk or the object store. Nothing is
/// sent to an object store yet ([`Storage::check`] does that).
pub fn open_storage(config: &StorageConfig) -> Result<Arc<dyn Storage>, String> {
    match (&config.root, &config.s3) {
        (Some(root), None) => Ok(Arc::new(
            storage::fs::FsStorage::open(root).map_err(|e| format!("storage.root: {e}"))?,
        )),
        (None, Some(s3)) => {
            let settings = storage::s3::S3Settings::resolve(s3)?;
            Ok(Arc::new(storage::s3::S3Storage::open(&settings)?))
        }
        _ => Err("[storage] needs root or [storage.s3], not both".into()),
    }
}

/// The built-in registry.
pub struct Registry {
    store: Store,
    delete_enabled: bool,
    uploads: uploads::Sessions,
    manifests: manifests::ManifestCache,
}

impl Registry {
    pub fn open(config: &StorageConfig) -> Result<Registry, String> {
        Ok(Registry::new(open_storage(config)?, config.delete))
    }

    pub fn new(storage: Arc<dyn Storage>, delete_enabled: bool) -> Registry {
        Registry {
            store: Store::new(storage),
            delete_enabled,
            uploads: uploads::Sessions::default(),
            manifests: manifests::ManifestCache::default(),
        }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Run `job` every `every` (the first time after `first`) for as long as the
    /// registry lives: the task holds it weakly and ends when it is dropped.
    fn spawn_every<F, Fut>(
        self: &Arc<Self>,
        first: Duration,
        every: Duration,
        job: F,
    ) -> tokio::task::JoinHandle<()>
    where
        F: Fn(Arc<Registry>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send,
    {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + first, every);
            loop {
                tick.tick().await;
                let Some(registry) = weak.upgrade() else {
                    return;
                };
                job(registry).await;
            }
        })
    }

    /// Remove abandoned uploads (and their multipart uploads in an object store) and
    /// old garbage-collection claims now and then.
    pub fn spawn_upload_purger(self: &Arc<Self>, age: Duration) -> tokio::task::JoinHandle<()> {
        let every = (age / 4).clamp(Duration::from_secs(1), Duration::from_secs(3600));
        self.spawn_every(Duration::ZERO, every, move |registry| async move {
            match uploads::purge(&registry.store, &registry.uploads, age).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(removed = n, "abandoned uploads removed"),
                Err(e) => tracing::error!("purging abandoned uploads: {e}"),
            }
            registry.uploads.forget_idle();
            let before = std::time::SystemTime::now()
                .checked_sub(claims::CLAIM_LIFETIME)
                .unwrap_or(std::time::UNIX_EPOCH);
            if let Err(e) = claims::remove_claims_before(&registry.store, before).await {
                tracing::warn!("removing old garbage-collection claims: {e}");
            }
        })
    }

    /// Sample the storage size and open uploads into the metrics now and then.
    pub fn spawn_sampler(
        self: &Arc<Self>,
        metrics: Arc<crate::metrics::Metrics>,
        every: Duration,
    ) -> tokio::task::JoinHandle<()> {
        self.spawn_every(Duration::ZERO, every, move |registry| {
            let metrics = metrics.clone();
            async move {
                match registry.store.usage().await {
                    Ok((bytes, uploads)) => {
                        metrics
                            .storage_bytes
                            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
                        metrics
                            .uploads_in_progress
                            .set(i64::try_from(uploads).unwrap_or(i64::MAX));
                    }
                    Err(e) => tracing::warn!("sampling storage usage: {e}"),
                }
            }
        })
    }

    /// Collect garbage every `every` (the first time after `every`).
    pub fn spawn_gc(
        self: &Arc<Self>,
        every: Duration,
        delete_untagged: bool,
        grace: Duration,
    ) -> tokio::task::JoinHandle<()> {
        let options = gc::GcOptions {
            dry_run: false,
            delete_untagged,
            grace,
        };
        self.spawn_every(every, every, move |registry| async move {
            match gc::collect(&registry.store, options).await {
                Ok(r) => tracing::info!(
                    blobs = r.blobs_removed.len(),
                    manifests = r.manifests_removed.len(),
                    bytes = r.bytes_freed,
                    "garbage collection done"
                ),
                Err(e) => tracing::error!("garbage collection failed: {e}"),
            }
        })
    }

    /// Apply the retention rules every `every` (the first time after `every`).
    pub fn spawn_prune(
        self: &Arc<Self>,
        every: Duration,
        life: Arc<crate::lifecycle::rules::Lifecycle>,
        grace: Duration,
        notifier: Option<Arc<crate::notify::Notifier>>,
    ) -> tokio::task::JoinHandle<()> {
        self.spawn_every(every, every, move |registry| {
            let life = life.clone();
            let notifier = notifier.clone();
            async move {
                crate::lifecycle::cli::scheduled(
                    registry.store.clone(),
                    registry.delete_enabled,
                    life,
                    grace,
                    notifier.as_deref(),
                )
                .await;
            }
        })
    }

    async fn dispatch(&self, req: Request<Body>, ctx: &RequestContext) -> Handled {
        let method = req.method().clone();
        match (&ctx.route, &method) {
            (Route::Base, &Method::GET | &Method::HEAD) => {
                Ok(json_response(StatusCode::OK, "{}".into()))
            }
            (Route::Catalog, &Method::GET | &Method::HEAD) => listing::catalog(self, &req).await,
            (Route::Tags(name), &Method::GET | &Method::HEAD) => {
                listing::tags(self, name, &req).await
            }
            (Route::Referrers(name, d), &Method::GET | &Method::HEAD) => {
                listing::referrers(self, name, d, &req).await
            }
            (Route::Manifest(name, r), &Method::GET | &Method::HEAD) => {
                manifests::get(self, name, r, method == Method::HEAD).await
            }
            (Route::Manifest(name, r), &Method::PUT) => {
                manifests::put(self, name, r, req, ctx).await
            }
            (Route::Manifest(name, r), &Method::DELETE) => manifests::delete(self, name, r).await,
            (Route::Blob(name, d), &Method::GET | &Method::HEAD) => {
                blobs::get(self, name, d, &req, method == Method::HEAD).await
            }
            (Route::Blob(name, d), &Method::DELETE) => blobs::delete(self, name, d).await,
            (Route::UploadStart(name), &Method::POST) => uploads::start(self, name, req, ctx).await,
            (Route::Upload(name, id), &Method::GET) => uploads::status(self, name, id, ctx).await,
            (Route::Upload(name, id), &Method::PATCH) => {
                uploads::patch(self, name, id, req, ctx).await
            }
            (Route::Upload(name, id), &Method::PUT) => {
                uploads::finish(self, name, id, req, ctx).await
            }
            (Route::Upload(name, id), &Method::DELETE) => uploads::cancel(self, name, id).await,
            _ => Err(OciError::new(
                ErrorCode::Unsupported,
                format!("{method} is not supported on this endpoint"),
            )
            .into()),
        }
    }

    fn deletes_enabled(&self) -> Result<(), Failure> {
        if self.delete_enabled {
            Ok(())
        } else {
            Err(OciError::new(
                ErrorCode::Unsupported,
                "deletes are disabled on this registry ([storage] delete = false)",
            )
            .into())
        }
    }
}

impl Backend for Registry {
    fn handle(&self, req: Request<Body>, ctx: RequestContext) -> BoxFuture<'_, Response<Body>> {
        Box::pin(async move {
            match self.dispatch(req, &ctx).await {
                Ok(resp) => resp,
                Err(Failure::Client(e)) => e.into_response(),
                Err(Failure::Storage(e)) => storage_error_response(ctx.id.as_str(), e),
            }
        })
    }

    fn ready(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            self.store
                .storage()
                .check()
                .await
                .map_err(|e| format!("storage: {e}"))
        })
    }

    fn describe(&self) -> String {
        format!(
            "built-in registry on {} (deletes {})",
            self.store.storage().describe(),
            if self.delete_enabled {
                "enabled"
            } else {
                "disabled"
            }
        )
    }
}

/// A storage fault: logged once with its cause and the request id; the client gets a
/// generic error that names the request id (and, when the store is down, the store).
fn storage_error_response(id: &str, e: StorageError) -> Response<Body> {
    tracing::error!(id, "storage: {e}");
    match e {
        StorageError::Full(_) => OciError::new(
            ErrorCode::Unavailable,
            format!("the registry's storage is full (request {id})"),
        )
        .with_status(StatusCode::INSUFFICIENT_STORAGE)
        .into_response(),
        StorageError::Unsafe(_) => OciError::new(
            ErrorCode::NameInvalid,
            format!("this repository cannot be served (request {id})"),
        )
        .into_response(),
        StorageError::Unavailable { store, .. } | StorageError::Refused { store, .. } => {
            let mut resp = OciError::new(
                ErrorCode::Unavailable,
                format!("the registry's storage ({store}) is unavailable; try again later (request {id})"),
            )
            .with_status(StatusCode::SERVICE_UNAVAILABLE)
            .into_response();
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
            resp
        }
        StorageError::Conflict(_) => OciError::new(
            ErrorCode::BlobUploadInvalid,
            format!(
                "the upload was changed by another request at the same time; start it again \
                 (request {id})"
            ),
        )
        .with_status(StatusCode::CONFLICT)
        .into_response(),
        _ => OciError::new(ErrorCode::Unknown, format!("storage error (request {id})"))
            .into_response(),
    }
}

use crate::body::json_response;

/// An empty answer with the given status.
fn empty_response(status: StatusCode) -> Response<Body> {
    let mut resp = Response::new(body::empty());
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from(0));
    resp
}

/// The value of a query parameter (percent-decoded), first occurrence.
fn query_param(req: &Request<Body>, name: &str) -> Option<String> {
    let q = req.uri().query()?;
    form_urlencoded::parse(q.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

fn header_value(value: &str) -> Result<HeaderValue, Failure> {
    HeaderValue::from_str(value)
        .map_err(|_| OciError::new(ErrorCode::Unknown, "cannot build a header").into())
}

/// The registry's parsers of untrusted bytes that are otherwise private, for the fuzz
/// targets in `fuzz/`. Not an API: nothing in the gate calls them.
#[doc(hidden)]
pub mod fuzzing {
    pub use super::blobs::{RangeRequest, parse_range};

    /// An upload chunk's `Content-Range` as `(start, end)`; `None` when malformed.
    pub fn content_range(value: &[u8]) -> Option<(u64, u64)> {
        let value = http::HeaderValue::from_bytes(value).ok()?;
        let mut req = http::Request::new(());
        req.headers_mut().insert(http::header::CONTENT_RANGE, value);
        let (parts, ()) = req.into_parts();
        super::uploads::content_range(&parts).ok().flatten()
    }

    /// Whether a manifest PUT with this body and `Content-Type` passes validation (the
    /// JSON parse and the shape check, before anything touches storage).
    pub fn validate_manifest(body: &[u8], content_type: &str) -> bool {
        serde_json::from_slice(body)
            .ok()
            .is_some_and(|json| super::manifests::validate(&json, content_type).is_ok())
    }
}
