//! Blob uploads (spec: "Pushing blobs"):
//!
//! ```text
//! POST   /v2/<name>/blobs/uploads/                    → 202 Location, Range: 0-0
//! POST   /v2/<name>/blobs/uploads/?digest=D  (body)   → 201 (monolithic, one request)
//! POST   /v2/<name>/blobs/uploads/?mount=D&from=R     → 201 if R has D, else 202
//! PATCH  /v2/<name>/blobs/uploads/<id>  Content-Range → 202 Range: 0-<last byte>
//! PUT    /v2/<name>/blobs/uploads/<id>?digest=D       → 201 Location /v2/<name>/blobs/D
//! GET    /v2/<name>/blobs/uploads/<id>                → 204 Range
//! DELETE /v2/<name>/blobs/uploads/<id>                → 204
//! ```
//!
//! The sha256 is computed while bytes arrive (kept in memory per session; recomputed
//! from the file after a restart); the blob becomes visible only when the digest the
//! client names matches, by a rename. A client that disconnects mid-PATCH leaves the
//! bytes received so far, so `GET` tells it where to resume.

use std::collections::HashMap;
use std::sync::Arc;

use http::header;
use http::{Request, StatusCode};

use super::digest::{self, AppendError, HashState};
use super::storage::FsStorage;
use super::{Failure, Handled, Registry, empty_response, header_value, query_param};
use crate::backend::RequestContext;
use crate::body::Body;
use crate::error::{ErrorCode, OciError};
use crate::route::{Digest, RepoName, UploadId};

type SessionKey = (String, String);

/// Running hashes of open uploads. One async mutex per session serialises its PATCHes.
#[derive(Default)]
pub struct Sessions {
    map: std::sync::Mutex<HashMap<SessionKey, Arc<tokio::sync::Mutex<Option<HashState>>>>>,
}

impl Sessions {
    fn entry(&self, repo: &RepoName, id: &UploadId) -> Arc<tokio::sync::Mutex<Option<HashState>>> {
        let mut map = match self.map.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        map.entry((repo.as_str().to_owned(), id.as_str().to_owned()))
            .or_default()
            .clone()
    }

    fn remove(&self, repo: &RepoName, id: &UploadId) {
        let mut map = match self.map.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        map.remove(&(repo.as_str().to_owned(), id.as_str().to_owned()));
    }

    /// Drop the state of sessions whose upload is gone (purged).
    pub async fn forget_missing(&self, storage: &FsStorage) {
        let keys: Vec<SessionKey> = match self.map.lock() {
            Ok(g) => g.keys().cloned().collect(),
            Err(p) => p.into_inner().keys().cloned().collect(),
        };
        for (repo, id) in keys {
            let (Ok(r), Ok(i)) = (RepoName::parse(&repo), UploadId::parse(&id)) else {
                continue;
            };
            let (r2, i2) = (r.clone(), i.clone());
            if let Ok(None) = storage.blocking(move |s| s.upload_size(&r2, &i2)).await {
                self.remove(&r, &i);
            }
        }
    }
}

fn upload_unknown() -> Failure {
    OciError::new(ErrorCode::BlobUploadUnknown, "no such upload in progress").into()
}

fn location_of(ctx: &RequestContext, repo: &RepoName, id: &UploadId) -> String {
    format!(
        "{}/v2/{repo}/blobs/uploads/{}",
        ctx.public_base,
        id.as_str()
    )
}

/// `Range: 0-<last byte>` as the spec writes it (`0-0` for nothing yet).
fn range_value(size: u64) -> String {
    format!("0-{}", size.saturating_sub(1))
}

fn session_response(
    status: StatusCode,
    ctx: &RequestContext,
    repo: &RepoName,
    id: &UploadId,
    size: u64,
) -> Handled {
    let mut resp = empty_response(status);
    let h = resp.headers_mut();
    h.insert(header::LOCATION, header_value(&location_of(ctx, repo, id))?);
    h.insert(header::RANGE, header_value(&range_value(size))?);
    h.insert("docker-upload-uuid", header_value(id.as_str())?);
    Ok(resp)
}

fn created(ctx: &RequestContext, repo: &RepoName, d: &Digest) -> Handled {
    let mut resp = empty_response(StatusCode::CREATED);
    let h = resp.headers_mut();
    h.insert(
        header::LOCATION,
        header_value(&format!("{}/v2/{repo}/blobs/{d}", ctx.public_base))?,
    );
    h.insert("docker-content-digest", header_value(d.as_str())?);
    Ok(resp)
}

pub async fn start(
    reg: &Registry,
    repo: &RepoName,
    req: Request<Body>,
    ctx: &RequestContext,
) -> Handled {
    // Cross-repository mount. The gate removed `mount`/`from` when the caller may not
    // pull the source; here it only matters whether the source has the blob.
    if let (Some(mount), Some(from)) = (query_param(&req, "mount"), query_param(&req, "from"))
        && let (Ok(d), Ok(from)) = (Digest::parse(&mount), RepoName::parse(&from))
    {
        let (r, d2) = (repo.clone(), d.clone());
        let mounted = reg
            .storage
            .blocking(move |s| {
                let _gc = s.gc_shared_lock()?;
                if s.layer_linked(&from, &d2)? {
                    s.link_layer(&r, &d2)?;
                    Ok(true)
                } else {
                    Ok(false)
                }
            })
            .await?;
        if mounted {
            return created(ctx, repo, &d);
        }
    }
    let digest = query_param(&req, "digest");
    let r = repo.clone();
    let id = reg.storage.blocking(move |s| s.create_upload(&r)).await?;
    match digest {
        None => session_response(StatusCode::ACCEPTED, ctx, repo, &id, 0),
        // Monolithic: POST with the whole blob and its digest.
        Some(d) => {
            let body = req.into_body();
            complete(reg, repo, &id, &d, body, ctx).await
        }
    }
}

pub async fn status(
    reg: &Registry,
    repo: &RepoName,
    id: &UploadId,
    ctx: &RequestContext,
) -> Handled {
    let (r, i) = (repo.clone(), id.clone());
    let size = reg
        .storage
        .blocking(move |s| s.upload_size(&r, &i))
        .await?
        .ok_or_else(upload_unknown)?;
    session_response(StatusCode::NO_CONTENT, ctx, repo, id, size)
}

pub async fn cancel(reg: &Registry, repo: &RepoName, id: &UploadId) -> Handled {
    let (r, i) = (repo.clone(), id.clone());
    let existed = reg
        .storage
        .blocking(move |s| s.cancel_upload(&r, &i))
        .await?;
    reg.uploads.remove(repo, id);
    if !existed {
        return Err(upload_unknown());
    }
    Ok(empty_response(StatusCode::NO_CONTENT))
}

/// `Content-Range: <start>-<end>` (the spec's form; a `bytes ` prefix is tolerated).
pub(super) fn content_range(req: &http::request::Parts) -> Result<Option<(u64, u64)>, Failure> {
    let Some(v) = req.headers.get(header::CONTENT_RANGE) else {
        return Ok(None);
    };
    let bad = || {
        Failure::from(OciError::new(
            ErrorCode::BlobUploadInvalid,
            "malformed Content-Range",
        ))
    };
    let s = v.to_str().map_err(|_| bad())?.trim();
    let s = s.strip_prefix("bytes ").unwrap_or(s);
    let s = s.split('/').next().unwrap_or(s);
    let (a, b) = s.split_once('-').ok_or_else(bad)?;
    let start: u64 = a.trim().parse().map_err(|_| bad())?;
    let end: u64 = b.trim().parse().map_err(|_| bad())?;
    if end < start {
        return Err(bad());
    }
    Ok(Some((start, end)))
}

fn declared_length(req: &http::request::Parts) -> Option<u64> {
    req.headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

/// 416 with the session's current range, so the client knows where it stands.
fn out_of_order(ctx: &RequestContext, repo: &RepoName, id: &UploadId, size: u64) -> Failure {
    let mut e = OciError::new(
        ErrorCode::BlobUploadInvalid,
        format!("chunk out of order: the upload holds {size} bytes; the next chunk starts there"),
    )
    .with_status(StatusCode::RANGE_NOT_SATISFIABLE);
    e.detail = Some(
        serde_json::json!({ "range": range_value(size), "location": location_of(ctx, repo, id) }),
    );
    Failure::Client(e)
}

/// Longest refused request body read (and dropped) before answering, so that a client
/// still sending it sees the answer instead of a reset connection.
const DISCARD_LIMIT: u64 = 64 * 1024 * 1024;

/// Read and drop what is left of a refused request's body (up to a limit and a time).
async fn discard(mut body: Body) {
    use http_body_util::BodyExt;
    let drain = async {
        let mut seen = 0u64;
        while let Some(Ok(frame)) = body.frame().await {
            if let Ok(data) = frame.into_data() {
                seen += data.len() as u64;
                if seen > DISCARD_LIMIT {
                    break;
                }
            }
        }
    };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(30), drain).await;
}

/// A session locked for appending, with the hash covering exactly its file.
struct Locked {
    guard: tokio::sync::OwnedMutexGuard<Option<HashState>>,
    state: HashState,
    path: std::path::PathBuf,
}

/// Append a request body to a session, checking `Content-Range` against what the
/// session holds. Returns the session's size afterwards. A request refused before its
/// body is written has the body read and dropped first.
async fn append(
    reg: &Registry,
    repo: &RepoName,
    id: &UploadId,
    req: Request<Body>,
    ctx: &RequestContext,
) -> Result<u64, Failure> {
    let (parts, body) = req.into_parts();
    let locked = match lock_for_append(reg, repo, id, &parts, ctx).await {
        Ok(l) => l,
        Err(e) => {
            discard(body).await;
            return Err(e);
        }
    };
    let Locked {
        mut guard,
        state,
        path,
    } = locked;
    let before = state.size;
    // In a task of its own, holding the session's lock: if this request is dropped
    // (its connection torn down), the write under way still finishes and its hash is
    // stored before another request may touch the session.
    let appended = tokio::spawn(async move {
        let (state, result) = digest::append_body(path, state, body).await;
        let after = state.size;
        *guard = Some(state);
        (after, result)
    })
    .await;
    let (after, result) = match appended {
        Ok(done) => done,
        Err(e) => (
            before,
            Err(AppendError::Storage(std::io::Error::other(format!(
                "append task failed: {e}"
            )))),
        ),
    };
    match result {
        Ok(()) => {}
        Err(AppendError::Client(e)) => {
            tracing::info!(id = %ctx.id, upload = id.as_str(), received = after - before, "upload body ended early: {e}");
            return Err(OciError::new(
                ErrorCode::BlobUploadInvalid,
                format!("the request body ended early; the upload holds {after} bytes"),
            )
            .into());
        }
        Err(AppendError::Storage(e)) => {
            let what = format!("append to upload {}", id.as_str());
            return Err(Failure::Storage(
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
                ) {
                    super::storage::StorageError::Full(e)
                } else {
                    super::storage::StorageError::Io { what, source: e }
                },
            ));
        }
    }
    Ok(after)
}

/// Lock a session and check a chunk's `Content-Range` against it.
async fn lock_for_append(
    reg: &Registry,
    repo: &RepoName,
    id: &UploadId,
    parts: &http::request::Parts,
    ctx: &RequestContext,
) -> Result<Locked, Failure> {
    let range = content_range(parts)?;
    let length = declared_length(parts);
    let (r, i) = (repo.clone(), id.clone());
    let path = reg
        .storage
        .blocking(move |s| s.upload_data_path(&r, &i))
        .await?;
    let session = reg.uploads.entry(repo, id);
    let mut guard = session.lock_owned().await;
    let (r, i) = (repo.clone(), id.clone());
    let Some(size) = reg.storage.blocking(move |s| s.upload_size(&r, &i)).await? else {
        drop(guard);
        reg.uploads.remove(repo, id);
        return Err(upload_unknown());
    };
    // The in-memory hash must cover exactly the file; after a restart (or a failure)
    // it is rebuilt from the file.
    let state = match guard.take() {
        Some(s) if s.size == size => s,
        _ => {
            let p = path.clone();
            reg.storage
                .blocking(move |_| {
                    HashState::of_file(&p).map_err(|e| super::storage::StorageError::Io {
                        what: "re-hash upload".into(),
                        source: e,
                    })
                })
                .await?
        }
    };
    if let Some((start, end)) = range {
        if start != state.size {
            *guard = Some(state.clone());
            return Err(out_of_order(ctx, repo, id, state.size));
        }
        if let Some(len) = length
            && len != end - start + 1
        {
            *guard = Some(state);
            return Err(OciError::new(
                ErrorCode::BlobUploadInvalid,
                "Content-Range and Content-Length disagree",
            )
            .with_status(StatusCode::RANGE_NOT_SATISFIABLE)
            .into());
        }
    }
    Ok(Locked { guard, state, path })
}

pub async fn patch(
    reg: &Registry,
    repo: &RepoName,
    id: &UploadId,
    req: Request<Body>,
    ctx: &RequestContext,
) -> Handled {
    let size = append(reg, repo, id, req, ctx).await?;
    session_response(StatusCode::ACCEPTED, ctx, repo, id, size)
}

pub async fn finish(
    reg: &Registry,
    repo: &RepoName,
    id: &UploadId,
    req: Request<Body>,
    ctx: &RequestContext,
) -> Handled {
    let Some(d) = query_param(&req, "digest") else {
        return Err(OciError::new(
            ErrorCode::DigestInvalid,
            "PUT closing an upload needs ?digest=",
        )
        .into());
    };
    complete(reg, repo, id, &d, req.into_body(), ctx).await
}

/// Append the last bytes (if any), check the digest, and make the blob visible.
async fn complete(
    reg: &Registry,
    repo: &RepoName,
    id: &UploadId,
    d: &str,
    body: Body,
    ctx: &RequestContext,
) -> Handled {
    let d = match Digest::parse(d) {
        Ok(d) if matches!(d.algorithm(), "sha256" | "sha512") => d,
        Ok(d) => {
            return Err(OciError::new(
                ErrorCode::DigestInvalid,
                format!("unsupported digest algorithm {}", d.algorithm()),
            )
            .into());
        }
        Err(e) => return Err(OciError::new(ErrorCode::DigestInvalid, e.to_string()).into()),
    };
    let req = Request::new(body);
    append(reg, repo, id, req, ctx).await?;
    let session = reg.uploads.entry(repo, id);
    // Held until the blob is committed or refused: no PATCH may add bytes between
    // the check and the commit.
    let guard = session.lock().await;
    let (r, i) = (repo.clone(), id.clone());
    let on_disk = reg.storage.blocking(move |s| s.upload_size(&r, &i)).await?;
    let computed = match (d.algorithm(), guard.as_ref()) {
        // The running hash, when it covers exactly the file.
        ("sha256", Some(state)) if on_disk == Some(state.size) => state.sha256(),
        _ => {
            let (r, i) = (repo.clone(), id.clone());
            let alg = d.algorithm().to_owned();
            reg.storage
                .blocking(move |s| {
                    let path = s.upload_data_path(&r, &i)?;
                    let io = |e| super::storage::StorageError::Io {
                        what: "hash upload".into(),
                        source: e,
                    };
                    if alg == "sha512" {
                        digest::sha512_of_file(&path).map_err(io)
                    } else {
                        HashState::of_file(&path).map(|s| s.sha256()).map_err(io)
                    }
                })
                .await?
        }
    };
    let (r, i) = (repo.clone(), id.clone());
    if computed != d.as_str() {
        reg.storage
            .blocking(move |s| s.cancel_upload(&r, &i))
            .await?;
        drop(guard);
        reg.uploads.remove(repo, id);
        return Err(OciError::new(
            ErrorCode::DigestInvalid,
            format!("the uploaded content is {computed}, not {d}"),
        )
        .into());
    }
    let d2 = d.clone();
    reg.storage
        .blocking(move |s| s.commit_upload(&r, &i, &d2))
        .await?;
    drop(guard);
    reg.uploads.remove(repo, id);
    created(ctx, repo, &d)
}
