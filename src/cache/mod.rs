//! Front mode as a cache of what cannot change: manifests fetched by digest and
//! blobs, on local disk (`disk`) and manifests also in memory, in front of the
//! [`Proxy`].
//!
//! * Authorization is never cached away: the gate decides every request first; and a
//!   digest is served for a repository only after the upstream confirmed that this
//!   repository has it (a 200 to a request for it there), remembered per repository
//!   and digest for `confirm_secs`. Otherwise a `HEAD` upstream asks first.
//! * Tags are mutable: a request by tag always asks the upstream (a `HEAD` for a
//!   `GET`, whose body may then come from the cache).
//! * A miss is cached as it streams to the first client: a copy of each chunk goes to
//!   a writer on the blocking pool, at most about 1 MiB ahead of it, so a disk slower
//!   than the network paces the first client; a writer that fails (disk full) is
//!   given up, never the client.
//!   Concurrent misses of one blob read the file being written instead of fetching it
//!   again. Nothing is kept before its digest and length are checked.
//! * Deletes through the gate end the confirmation at once; deletes done upstream
//!   directly stop being served within `confirm_secs`.

mod confirm;
pub mod disk;
mod lru;
mod pack;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body::Frame;
use tokio::sync::{mpsc, watch};

use crate::backend::{Backend, BoxFuture, RequestContext};
use crate::body::{self, Body, BoxError};
use crate::config::CacheConfig;
use crate::error::{ErrorCode, OciError};
use crate::metrics::{KindLabels, Metrics};
use crate::proxy::Proxy;
use crate::registry::blobs::{RangeRequest, parse_range};
use crate::route::{Digest, Reference, RepoName, Route};
use disk::{DiskCache, Kind};

/// Largest manifest cached (larger ones pass through).
const MAX_MANIFEST: u64 = 4 * 1024 * 1024;
/// Bytes read from a file being filled at a time.
const FOLLOW_READ: usize = 256 * 1024;

/// How a fill of one digest is going: bytes on disk so far, and the end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Progress {
    /// The blob's length, once the upstream answered with it.
    size: Option<u64>,
    written: u64,
    /// `Some(true)`: whole and checked; `Some(false)`: given up.
    done: Option<bool>,
}

/// A blob being written to the cache as it streams to its first client.
struct Fill {
    temp: PathBuf,
    progress: watch::Receiver<Progress>,
}

/// Below this many confirmations, stale ones are not swept.
const CONFIRM_SWEEP_FLOOR: usize = 10_000;

/// Manifests in memory (bytes and media type), least recently used out.
type Memory = lru::Lru<(Bytes, String)>;

/// Manifests waiting to be appended to the pack, beyond which more are kept in
/// memory only (they are served from there; a restart loses them).
const MANIFEST_QUEUE: usize = 4096;

/// Manifests on their way to disk, written by at most one task of the blocking pool
/// at a time: a miss adds to the queue and starts that task only when none runs, so
/// concurrent misses share one wake-up of a blocking thread instead of one each.
#[derive(Default)]
struct ManifestQueue {
    pending: Vec<(String, Bytes, String)>,
    writing: bool,
}

pub struct CachingProxy {
    proxy: Proxy,
    disk: Arc<DiskCache>,
    memory: Mutex<Memory>,
    memory_entries: usize,
    confirmed: Mutex<confirm::Confirmations>,
    fills: Arc<Mutex<HashMap<String, Arc<Fill>>>>,
    to_disk: Arc<Mutex<ManifestQueue>>,
    metrics: Arc<Metrics>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

fn cacheable(d: &Digest) -> bool {
    d.algorithm() == "sha256"
}

fn kind_label(kind: Kind) -> KindLabels {
    KindLabels {
        kind: match kind {
            Kind::Manifest => "manifest",
            Kind::Blob => "blob",
        },
    }
}

fn value(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

impl CachingProxy {
    pub fn new(proxy: Proxy, config: &CacheConfig, metrics: Arc<Metrics>) -> Result<Self, String> {
        let max = config.max_bytes()?;
        let disk = DiskCache::open(
            &config.dir,
            max,
            metrics.cache_evictions.clone(),
            metrics.cache_corrupt.clone(),
        )
        .map_err(|e| format!("cache.dir {}: {e}", config.dir.display()))?;
        let (bytes, entries) = disk.usage();
        tracing::info!(
            dir = %config.dir.display(),
            entries,
            bytes,
            max,
            "cache opened"
        );
        metrics
            .cache_bytes
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
        Ok(CachingProxy {
            proxy,
            disk: Arc::new(disk),
            memory: Mutex::new(Memory::default()),
            memory_entries: config.memory_entries,
            confirmed: Mutex::new(confirm::Confirmations::new(
                Duration::from_secs(config.confirm_secs),
                CONFIRM_SWEEP_FLOOR,
            )),
            fills: Arc::new(Mutex::new(HashMap::new())),
            to_disk: Arc::default(),
            metrics,
        })
    }

    fn hit(&self, kind: Kind, bytes: u64) {
        self.metrics
            .cache_hits
            .get_or_create(&kind_label(kind))
            .inc();
        self.metrics.cache_served_bytes.inc_by(bytes);
    }

    fn miss(&self, kind: Kind) {
        self.metrics
            .cache_misses
            .get_or_create(&kind_label(kind))
            .inc();
    }

    fn is_confirmed(&self, repo: &RepoName, d: &Digest) -> bool {
        lock(&self.confirmed).is_fresh(repo.as_str(), d.as_str())
    }

    fn confirm(&self, repo: &RepoName, d: &str) {
        lock(&self.confirmed).confirm(repo.as_str(), d);
    }

    fn unconfirm(&self, repo: &RepoName, d: &str) {
        lock(&self.confirmed).forget(repo.as_str(), d);
    }

    fn memory_get(&self, d: &str) -> Option<(Bytes, String)> {
        lock(&self.memory)
            .touch(d)
            .map(|(b, t)| (b.clone(), t.clone()))
    }

    fn memory_put(&self, d: &str, bytes: Bytes, media_type: String) {
        if self.memory_entries == 0 {
            return;
        }
        lock(&self.memory).insert_within(d.to_owned(), (bytes, media_type), self.memory_entries);
    }

    /// The upstream's answer to a `HEAD` like `req` (same path and `Accept`).
    async fn head_upstream(&self, req: &Request<Body>, ctx: &RequestContext) -> Response<Body> {
        let mut head = Request::new(body::empty());
        *head.method_mut() = Method::HEAD;
        *head.uri_mut() = req.uri().clone();
        for name in [header::ACCEPT, header::USER_AGENT] {
            for v in req.headers().get_all(&name) {
                head.headers_mut().append(name.clone(), v.clone());
            }
        }
        self.proxy.handle(head, ctx.clone()).await
    }

    /// Whether `repo` has `d` upstream now (asked when the confirmation is stale).
    async fn confirmed_now(
        &self,
        req: &Request<Body>,
        ctx: &RequestContext,
        repo: &RepoName,
        d: &Digest,
    ) -> bool {
        if self.is_confirmed(repo, d) {
            return true;
        }
        let resp = self.head_upstream(req, ctx).await;
        let ok = resp.status() == StatusCode::OK;
        if ok {
            self.confirm(repo, d.as_str());
        } else {
            self.unconfirm(repo, d.as_str());
        }
        ok
    }

    async fn serve(&self, req: Request<Body>, ctx: RequestContext) -> Response<Body> {
        let method = req.method().clone();
        let route = ctx.route.clone();
        match (&route, &method) {
            (Route::Blob(repo, d), &Method::GET | &Method::HEAD) if cacheable(d) => {
                self.blob(req, ctx, repo, d, method == Method::HEAD).await
            }
            (Route::Manifest(repo, Reference::Digest(d)), &Method::GET | &Method::HEAD)
                if cacheable(d) =>
            {
                self.manifest_by_digest(req, ctx, repo, d, method == Method::HEAD)
                    .await
            }
            (Route::Manifest(repo, Reference::Tag(_)), &Method::GET) => {
                self.manifest_by_tag(req, ctx, repo).await
            }
            (Route::Manifest(repo, Reference::Tag(_)), &Method::HEAD) => {
                let resp = self.proxy.handle(req, ctx).await;
                if resp.status() == StatusCode::OK
                    && let Some(d) = digest_header(resp.headers())
                {
                    self.confirm(repo, &d);
                }
                resp
            }
            (
                Route::Manifest(repo, Reference::Digest(d)) | Route::Blob(repo, d),
                &Method::DELETE,
            ) => {
                // Not served for this repository from now on, whatever the answer.
                self.unconfirm(repo, d.as_str());
                self.proxy.handle(req, ctx).await
            }
            _ => self.proxy.handle(req, ctx).await,
        }
    }

    async fn manifest_by_digest(
        &self,
        req: Request<Body>,
        ctx: RequestContext,
        repo: &RepoName,
        d: &Digest,
        head: bool,
    ) -> Response<Body> {
        let cached = self.cached_manifest(d.as_str()).await;
        if let Some((bytes, media_type)) = cached
            && self.confirmed_now(&req, &ctx, repo, d).await
        {
            let len = bytes.len() as u64;
            self.hit(Kind::Manifest, if head { 0 } else { len });
            return manifest_response(d.as_str(), &media_type, bytes, head);
        }
        self.miss(Kind::Manifest);
        let resp = self.proxy.handle(req, ctx).await;
        self.keep_manifest(repo, Some(d.as_str()), resp, head).await
    }

    /// A manifest's bytes and media type, from memory or else the disk.
    async fn cached_manifest(&self, d: &str) -> Option<(Bytes, String)> {
        if let Some(found) = self.memory_get(d) {
            return Some(found);
        }
        // The index knows every file (loaded at start, then kept by each commit): a
        // miss costs no trip to the blocking pool.
        if !matches!(self.disk.peek(d), Some((size, Kind::Manifest, _)) if size <= MAX_MANIFEST) {
            return None;
        }
        let disk = self.disk.clone();
        let digest = d.to_owned();
        let found = tokio::task::spawn_blocking(move || {
            let (bytes, media_type) = disk.read_manifest(&digest, MAX_MANIFEST)?;
            Some((bytes, media_type.unwrap_or_default()))
        })
        .await
        .ok()
        .flatten()?;
        self.memory_put(d, found.0.clone(), found.1.clone());
        Some(found)
    }

    /// A manifest answer from upstream: passed on, and kept when it is a whole 200
    /// whose bytes match its digest (`expected`, or the `Docker-Content-Digest`).
    async fn keep_manifest(
        &self,
        repo: &RepoName,
        expected: Option<&str>,
        resp: Response<Body>,
        head: bool,
    ) -> Response<Body> {
        if resp.status() != StatusCode::OK {
            return resp;
        }
        let named = digest_header(resp.headers());
        let Some(d) = expected.map(str::to_owned).or(named) else {
            return resp;
        };
        self.confirm(repo, &d);
        let small = crate::body::content_length(resp.headers()).is_some_and(|n| n <= MAX_MANIFEST);
        if head || !small || !d.starts_with("sha256:") {
            return resp;
        }
        let (parts, incoming) = resp.into_parts();
        let bytes = match body::collect_limited(incoming, MAX_MANIFEST as usize).await {
            Ok(b) => b,
            Err(e) => {
                return OciError::new(
                    ErrorCode::Unavailable,
                    format!("reading the manifest from the upstream failed: {e}"),
                )
                .into_response();
            }
        };
        let actual = crate::registry::digest::of_bytes("sha256", &bytes).unwrap_or_default();
        if actual == d {
            let media_type = parts
                .headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned();
            self.memory_put(&d, bytes.clone(), media_type.clone());
            // Written after the answer goes out: the memory serves it meanwhile.
            self.manifest_to_disk(d.clone(), bytes.clone(), media_type);
        } else {
            tracing::warn!(
                expected = d,
                actual,
                "cache: the upstream's manifest does not match its digest; not kept"
            );
        }
        Response::from_parts(parts, body::full(bytes))
    }

    /// Queue a checked manifest for the pack (see [`ManifestQueue`]).
    fn manifest_to_disk(&self, digest: String, bytes: Bytes, media_type: String) {
        {
            let mut queue = lock(&self.to_disk);
            if queue.pending.len() >= MANIFEST_QUEUE {
                return;
            }
            queue.pending.push((digest, bytes, media_type));
            if std::mem::replace(&mut queue.writing, true) {
                return;
            }
        }
        let (queue, disk, metrics) = (
            self.to_disk.clone(),
            self.disk.clone(),
            self.metrics.clone(),
        );
        tokio::task::spawn_blocking(move || {
            loop {
                let batch = {
                    let mut q = lock(&queue);
                    if q.pending.is_empty() {
                        q.writing = false;
                        break;
                    }
                    std::mem::take(&mut q.pending)
                };
                for (digest, data, media_type) in batch {
                    if let Err(e) = disk.put_bytes(&digest, &data, Kind::Manifest, Some(media_type))
                    {
                        tracing::warn!(digest, "cache: cannot store a manifest: {e}");
                    }
                }
            }
            sample_usage(&disk, &metrics);
        });
    }

    async fn manifest_by_tag(
        &self,
        req: Request<Body>,
        ctx: RequestContext,
        repo: &RepoName,
    ) -> Response<Body> {
        // The tag's digest now, from the upstream; the body may then be cached.
        let head = self.head_upstream(&req, &ctx).await;
        if head.status() == StatusCode::OK
            && let Some(d) = digest_header(head.headers())
        {
            self.confirm(repo, &d);
            let cached = self.cached_manifest(&d).await;
            if let Some((bytes, media_type)) = cached {
                self.hit(Kind::Manifest, bytes.len() as u64);
                let mut resp = manifest_response(&d, &media_type, bytes, false);
                if let Some(lm) = head.headers().get(header::LAST_MODIFIED) {
                    resp.headers_mut().insert(header::LAST_MODIFIED, lm.clone());
                }
                return resp;
            }
        }
        self.miss(Kind::Manifest);
        let resp = self.proxy.handle(req, ctx).await;
        self.keep_manifest(repo, None, resp, false).await
    }

    async fn blob(
        &self,
        req: Request<Body>,
        ctx: RequestContext,
        repo: &RepoName,
        d: &Digest,
        head: bool,
    ) -> Response<Body> {
        if let Some((size, Kind::Blob, _)) = self.disk.peek(d.as_str())
            && self.confirmed_now(&req, &ctx, repo, d).await
        {
            if head {
                self.hit(Kind::Blob, 0);
                return blob_response(d.as_str(), size, StatusCode::OK, 0, size, body::empty());
            }
            if let Some(resp) = self.blob_from_disk(&req, d).await {
                return resp;
            }
        }
        let whole_get = !head && req.headers().get(header::RANGE).is_none();
        if !whole_get {
            self.miss(Kind::Blob);
            let resp = self.proxy.handle(req, ctx).await;
            if resp.status() == StatusCode::OK || resp.status() == StatusCode::PARTIAL_CONTENT {
                self.confirm(repo, d.as_str());
            }
            return resp;
        }
        // One fill per digest: the first miss fetches; the others read along once
        // this repository is confirmed to have the blob.
        let (fill, progress) = {
            let mut fills = lock(&self.fills);
            match fills.get(d.as_str()) {
                Some(f) => (f.clone(), None),
                None => {
                    let (tx, rx) = watch::channel(Progress::default());
                    let f = Arc::new(Fill {
                        temp: self.disk.temp_path(),
                        progress: rx,
                    });
                    fills.insert(d.as_str().to_owned(), f.clone());
                    (f, Some(tx))
                }
            }
        };
        let Some(progress) = progress else {
            if self.confirmed_now(&req, &ctx, repo, d).await {
                if let Some(resp) = follow(&fill, d.as_str()).await {
                    self.hit(
                        Kind::Blob,
                        crate::body::content_length(resp.headers()).unwrap_or(0),
                    );
                    return resp;
                }
                // The fill ended between the look-up and the open (its file renamed
                // into the cache): the cache has the blob now.
                if let Some(resp) = self.blob_from_disk(&req, d).await {
                    return resp;
                }
            }
            self.miss(Kind::Blob);
            return self.proxy.handle(req, ctx).await;
        };
        self.miss(Kind::Blob);
        let resp = self.proxy.handle(req, ctx).await;
        if resp.status() == StatusCode::OK {
            self.confirm(repo, d.as_str());
        }
        self.fill(d.as_str(), &fill, progress, resp)
    }

    async fn blob_from_disk(&self, req: &Request<Body>, d: &Digest) -> Option<Response<Body>> {
        let disk = self.disk.clone();
        let digest = d.as_str().to_owned();
        let found = tokio::task::spawn_blocking(move || disk.open_checked(&digest))
            .await
            .ok()
            .flatten()?;
        let size = found.size;
        let (status, start, count) = match parse_range(req.headers().get(header::RANGE), size) {
            RangeRequest::Whole => (StatusCode::OK, 0, size),
            RangeRequest::Part { start, end } => {
                (StatusCode::PARTIAL_CONTENT, start, end - start + 1)
            }
            RangeRequest::Unsatisfiable => {
                let mut resp =
                    OciError::new(ErrorCode::BlobUnknown, "requested range not satisfiable")
                        .with_status(StatusCode::RANGE_NOT_SATISFIABLE)
                        .into_response();
                resp.headers_mut()
                    .insert(header::CONTENT_RANGE, value(&format!("bytes */{size}")));
                return Some(resp);
            }
        };
        let mut file = found.file;
        if start > 0 {
            use std::io::Seek as _;
            // A seek is a change of the file offset: no disk access, no blocking.
            file.seek(std::io::SeekFrom::Start(start)).ok()?;
        }
        self.hit(Kind::Blob, count);
        let body = body::boxed(crate::registry::storage::fs::FileBody::new(file, count));
        Some(blob_response(d.as_str(), size, status, start, count, body))
    }

    /// Pass `resp` (for blob `d`) on, writing a copy of a whole 200 into the cache
    /// under the fill claimed for it; anything else ends the fill.
    fn fill(
        &self,
        d: &str,
        fill: &Fill,
        progress: watch::Sender<Progress>,
        resp: Response<Body>,
    ) -> Response<Body> {
        let size = crate::body::content_length(resp.headers());
        let Some(size) = size.filter(|_| resp.status() == StatusCode::OK) else {
            progress.send_modify(|p| p.done = Some(false));
            lock(&self.fills).remove(d);
            return resp;
        };
        // Bounded: a disk slower than the network slows the first client down to the
        // disk's pace instead of holding the blob in memory.
        let (tx, rx) = mpsc::channel::<Vec<Bytes>>(TEE_QUEUE);
        let writer = Writer {
            disk: self.disk.clone(),
            fills: self.fills.clone(),
            metrics: self.metrics.clone(),
            digest: d.to_owned(),
            temp: fill.temp.clone(),
            size,
            progress,
        };
        // On a thread of the blocking pool: plain writes, hashed as they go.
        tokio::task::spawn_blocking(move || writer.run(rx));
        let (parts, incoming) = resp.into_parts();
        Response::from_parts(
            parts,
            body::boxed(Tee {
                inner: incoming,
                tx: Some(tokio_util::sync::PollSender::new(tx)),
                batch: Vec::new(),
                batched: 0,
                left: size,
                orphan: false,
            }),
        )
    }
}

/// The cache's size into `/metrics`.
fn sample_usage(disk: &DiskCache, metrics: &Metrics) {
    let (bytes, _) = disk.usage();
    metrics
        .cache_bytes
        .set(i64::try_from(bytes).unwrap_or(i64::MAX));
}

fn digest_header(h: &HeaderMap) -> Option<String> {
    h.get("docker-content-digest")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

fn manifest_response(d: &str, media_type: &str, bytes: Bytes, head: bool) -> Response<Body> {
    let len = bytes.len();
    let mut resp = Response::new(if head {
        body::empty()
    } else {
        body::full(bytes)
    });
    let h = resp.headers_mut();
    if !media_type.is_empty() {
        h.insert(header::CONTENT_TYPE, value(media_type));
    }
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    h.insert("docker-content-digest", value(d));
    h.insert(header::ETAG, value(&format!("\"{d}\"")));
    resp
}

fn blob_response(
    d: &str,
    size: u64,
    status: StatusCode,
    start: u64,
    count: u64,
    body: Body,
) -> Response<Body> {
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(count));
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert("docker-content-digest", value(d));
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(header::ETAG, value(&format!("\"{d}\"")));
    if status == StatusCode::PARTIAL_CONTENT {
        h.insert(
            header::CONTENT_RANGE,
            value(&format!("bytes {start}-{}/{size}", start + count - 1)),
        );
    }
    resp
}

/// A response for a blob being filled by another request: its file, read as it grows.
async fn follow(fill: &Fill, d: &str) -> Option<Response<Body>> {
    let mut rx = fill.progress.clone();
    let size = loop {
        let p = *rx.borrow_and_update();
        if p.done == Some(false) {
            return None;
        }
        if let Some(size) = p.size {
            break size;
        }
        rx.changed().await.ok()?;
    };
    let file = tokio::fs::File::open(&fill.temp)
        .await
        .ok()?
        .into_std()
        .await;
    let state = (Some(file), rx, 0u64);
    let stream = futures_util::stream::unfold(state, move |(file, mut rx, pos)| async move {
        // No file: the stream ended with an error.
        let file = file?;
        if pos >= size {
            return None;
        }
        loop {
            let p = *rx.borrow_and_update();
            if p.written > pos {
                let want = usize::try_from((p.written - pos).min(FOLLOW_READ as u64))
                    .unwrap_or(FOLLOW_READ);
                return match crate::registry::storage::fs::read_blocking(file, want).await {
                    Err(e) => Some((
                        Err::<Frame<Bytes>, BoxError>(
                            format!("reading the cache file: {e}").into(),
                        ),
                        (None, rx, size),
                    )),
                    Ok((file, Ok(buf))) if !buf.is_empty() => {
                        let n = buf.len() as u64;
                        Some((Ok(Frame::data(Bytes::from(buf))), (Some(file), rx, pos + n)))
                    }
                    Ok(_) => Some((Err("cache file ended early".into()), (None, rx, size))),
                };
            }
            if p.done == Some(false) {
                return Some((Err("the upstream transfer failed".into()), (None, rx, size)));
            }
            if rx.changed().await.is_err() {
                // The writer is gone: whatever it wrote is all there will be.
                let p = *rx.borrow();
                if p.written <= pos {
                    return Some((Err("the upstream transfer ended".into()), (None, rx, size)));
                }
            }
        }
    });
    let body = body::boxed(http_body_util::StreamBody::new(stream));
    Some(blob_response(d, size, StatusCode::OK, 0, size, body))
}

/// Batches of chunks on their way from a first client's response to the cache file:
/// at most about 1 MiB in flight per fill (four batches and the one being made).
/// Chunks are handed over a batch at a time, so the writer thread is woken once per
/// 256 KiB, not once per read from the upstream (which may be a few KiB).
const TEE_QUEUE: usize = 4;
const TEE_BATCH: usize = 256 * 1024;

/// A response body that hands a copy of its chunks to a fill's writer. It reads on
/// only once the writer has room for one more batch (a permit is reserved first), so
/// a full batch, or the last one, is handed over at once with the frame that makes it:
/// hyper stops polling a body once its length is sent.
///
/// A first client that goes away does not end the fill: the rest is read from the
/// upstream into the cache by a task of its own (see `Drop`), so that the clients
/// reading along get the whole blob and the next pull is a hit.
struct Tee {
    inner: Body,
    tx: Option<tokio_util::sync::PollSender<Vec<Bytes>>>,
    batch: Vec<Bytes>,
    batched: usize,
    /// Bytes of the blob not yet read.
    left: u64,
    /// Read by the task that finishes a fill its client left (dropped quietly).
    orphan: bool,
}

impl Drop for Tee {
    fn drop(&mut self) {
        if self.orphan || self.tx.is_none() || self.left == 0 {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let rest = Tee {
            inner: std::mem::replace(&mut self.inner, body::empty()),
            tx: self.tx.take(),
            batch: std::mem::take(&mut self.batch),
            batched: self.batched,
            left: self.left,
            orphan: true,
        };
        tracing::debug!(
            left = rest.left,
            "cache: the client left a fill; finishing it"
        );
        runtime.spawn(async move {
            let mut rest = std::pin::pin!(rest);
            // At the writer's pace (the tee waits for room as it does for a client);
            // an upstream error ends it, and the writer then drops the partial file.
            while let Some(Ok(_)) =
                std::future::poll_fn(|cx| http_body::Body::poll_frame(rest.as_mut(), cx)).await
            {
            }
        });
    }
}

impl Tee {
    /// Send the batch on the reserved permit.
    fn send(&mut self) {
        let batch = std::mem::take(&mut self.batch);
        self.batched = 0;
        if let Some(tx) = &mut self.tx
            && !batch.is_empty()
            && tx.send_item(batch).is_err()
        {
            self.tx = None;
        }
    }

    fn give_up(&mut self) {
        self.tx = None;
        self.batch.clear();
        self.batched = 0;
    }
}

impl http_body::Body for Tee {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        use std::task::Poll;
        let this = &mut *self;
        // Room for a batch first: the writer sets the pace.
        if let Some(tx) = &mut this.tx {
            match tx.poll_reserve(cx) {
                Poll::Pending => return Poll::Pending,
                // The writer failed: the client goes on, the copy is given up.
                Poll::Ready(Err(_)) => this.give_up(),
                Poll::Ready(Ok(())) => {}
            }
        }
        let polled = std::pin::Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if this.tx.is_some()
                    && let Some(data) = frame.data_ref()
                {
                    this.batched += data.len();
                    this.left = this.left.saturating_sub(data.len() as u64);
                    this.batch.push(data.clone());
                    if this.batched >= TEE_BATCH || this.left == 0 {
                        this.send();
                    }
                }
            }
            Poll::Ready(None) => this.send(),
            Poll::Ready(Some(Err(_))) => this.give_up(),
            // Nothing is handed over while the upstream is pending: a partial batch
            // each time would undo the batching (followers see a batch at a time).
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Writes one fill to a temporary file, checks it, and commits it.
struct Writer {
    disk: Arc<DiskCache>,
    fills: Arc<Mutex<HashMap<String, Arc<Fill>>>>,
    metrics: Arc<Metrics>,
    digest: String,
    temp: PathBuf,
    size: u64,
    progress: watch::Sender<Progress>,
}

impl Writer {
    /// Blocking: one plain `write` per chunk (no hop to the blocking pool and back for
    /// each, as `tokio::fs` would make).
    fn run(self, mut rx: mpsc::Receiver<Vec<Bytes>>) {
        // The file exists before anyone learns the size (followers open it then).
        let ok = match std::fs::File::create(&self.temp) {
            Ok(file) => {
                self.progress.send_modify(|p| p.size = Some(self.size));
                self.write(file, &mut rx)
            }
            Err(e) => {
                tracing::warn!(
                    digest = self.digest,
                    "cache: cannot create {}: {e}",
                    self.temp.display()
                );
                false
            }
        };
        self.progress.send_modify(|p| p.done = Some(ok));
        lock(&self.fills).remove(&self.digest);
        if !ok {
            let _ = std::fs::remove_file(&self.temp);
        }
        sample_usage(&self.disk, &self.metrics);
    }

    fn write(&self, mut file: std::fs::File, rx: &mut mpsc::Receiver<Vec<Bytes>>) -> bool {
        use sha2::Digest as _;
        use std::io::Write as _;
        let mut hash = sha2::Sha256::new();
        let mut written = 0u64;
        while let Some(batch) = rx.blocking_recv() {
            for chunk in batch {
                // A plain write is in the page cache when it returns: a follower
                // reading up to `written` finds the bytes.
                if file.write_all(&chunk).is_err() {
                    tracing::warn!(
                        digest = self.digest,
                        "cache: cannot write (disk full?); not kept"
                    );
                    return false;
                }
                hash.update(&chunk);
                written += chunk.len() as u64;
            }
            self.progress.send_modify(|p| p.written = written);
        }
        drop(file);
        if written != self.size {
            return false;
        }
        let actual = format!("sha256:{}", crate::registry::digest::hex(&hash.finalize()));
        if actual != self.digest {
            tracing::warn!(
                expected = self.digest,
                actual,
                "cache: the upstream's blob does not match its digest; not kept"
            );
            return false;
        }
        match self
            .disk
            .commit(&self.temp, &self.digest, self.size, Kind::Blob, None)
        {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(digest = self.digest, "cache: cannot keep a blob: {e}");
                false
            }
        }
    }
}

impl Backend for CachingProxy {
    fn handle(&self, req: Request<Body>, ctx: RequestContext) -> BoxFuture<'_, Response<Body>> {
        Box::pin(self.serve(req, ctx))
    }

    fn describe(&self) -> String {
        format!("{} with a cache", self.proxy.describe())
    }

    fn ready(&self) -> BoxFuture<'_, Result<(), String>> {
        self.proxy.ready()
    }
}

/// `registry-gate cache stats|clear`: what the cache directory holds (the server may
/// be running: `clear` removes the files, and the server then finds them gone).
pub fn command(config: &CacheConfig, clear: bool) -> Result<String, String> {
    let max = config.max_bytes()?;
    let disk = DiskCache::open(&config.dir, max, Default::default(), Default::default())
        .map_err(|e| format!("cache.dir {}: {e}", config.dir.display()))?;
    let [manifests, blobs] = disk.by_kind();
    let stats = format!(
        "{}: {} manifests ({} bytes), {} blobs ({} bytes), {} of {} bytes used",
        config.dir.display(),
        manifests.0,
        manifests.1,
        blobs.0,
        blobs.1,
        manifests.1 + blobs.1,
        max
    );
    if clear {
        disk.clear();
        return Ok(format!("{stats}; cleared"));
    }
    Ok(stats)
}
