//! The [`Backend`] for the registry built into this process ("all-in-one"): the OCI
//! Distribution Specification v1.1 over [`storage::FsStorage`], called directly by the
//! gate (no HTTP hop), with the gate's identity, policy, TLS and logging in front.
//!
//! * `blobs`     GET/HEAD (with `Range`) and DELETE of blobs
//! * `uploads`   POST/PATCH/PUT/GET/DELETE of upload sessions, cross-repository mount
//! * `manifests` GET/HEAD/PUT/DELETE of manifests, with validation
//! * `listing`   tags, catalog and referrers
//! * `digest`    hashing while bytes stream, off the async threads
//! * `storage`   the disk, in the CNCF distribution layout

mod blobs;
mod digest;
pub mod gc;
mod listing;
mod manifests;
pub mod storage;
mod uploads;

use std::sync::Arc;
use std::time::Duration;

use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};

use crate::backend::{Backend, BoxFuture, RequestContext};
use crate::body::{self, Body};
use crate::error::{ErrorCode, OciError};
use crate::route::Route;
use storage::{FsStorage, StorageError};

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

/// The built-in registry.
pub struct Registry {
    storage: FsStorage,
    delete_enabled: bool,
    uploads: uploads::Sessions,
    manifests: manifests::ManifestCache,
}

impl Registry {
    pub fn open(config: &crate::config::StorageConfig) -> Result<Registry, StorageError> {
        Ok(Registry {
            storage: FsStorage::open(&config.root)?,
            delete_enabled: config.delete,
            uploads: uploads::Sessions::default(),
            manifests: manifests::ManifestCache::default(),
        })
    }

    pub fn storage(&self) -> &FsStorage {
        &self.storage
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

    /// Remove abandoned uploads now and then.
    pub fn spawn_upload_purger(self: &Arc<Self>, age: Duration) -> tokio::task::JoinHandle<()> {
        let every = (age / 4).clamp(Duration::from_secs(1), Duration::from_secs(3600));
        self.spawn_every(Duration::ZERO, every, move |registry| async move {
            match registry
                .storage
                .blocking(move |s| s.purge_uploads(age))
                .await
            {
                Ok(0) => {}
                Ok(n) => tracing::info!(removed = n, "abandoned uploads removed"),
                Err(e) => tracing::error!("purging abandoned uploads: {e}"),
            }
            registry.uploads.forget_missing(&registry.storage).await;
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
                match registry.storage.blocking(|s| s.usage()).await {
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
            match registry
                .storage
                .blocking(move |s| gc::collect(s, options))
                .await
            {
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
                Err(Failure::Storage(e)) => storage_error_response(&ctx.id, e),
            }
        })
    }

    fn ready(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            self.storage
                .blocking(|s| s.check_writable())
                .await
                .map_err(|e| format!("storage: {e}"))
        })
    }

    fn describe(&self) -> String {
        format!(
            "built-in registry on {} (deletes {})",
            self.storage.layout().root().display(),
            if self.delete_enabled {
                "enabled"
            } else {
                "disabled"
            }
        )
    }
}

/// A storage fault: logged once with its cause and the request id; the client gets a
/// generic error that names the request id.
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
