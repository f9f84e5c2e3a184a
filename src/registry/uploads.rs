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
//! Everything about a session lives in the store, so a session started on one gate
//! is continued and finished on another: `_uploads/<id>/gate-state` holds the parts
//! written to the multipart upload of `_uploads/<id>/data` (their tags), the bytes not
//! yet in a part (in `gate-tail`, for stores whose parts have a minimum size), and the
//! running sha256 over all of it. Bytes are cut into parts of the backend's size; each
//! part is hashed on the blocking pool while it is written, and the next is read from
//! the client meanwhile. The state is saved after every request, so a client that
//! disconnects mid-PATCH keeps what arrived, and `GET` tells it where to resume.
//!
//! The blob becomes visible only when the digest the client names matches the hash,
//! by a move (or, for a blob that fits one part, a single put) to its content key. A
//! session is changed by one request at a time in this process (an async lock);
//! between processes, a part overwritten by another writer is caught by its tag when
//! the parts are put together, and a tail by its hash.

use std::collections::HashMap;
use std::collections::VecDeque;
use std::sync::Arc;

use bytes::Bytes;
use http::header;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde::{Deserialize, Serialize};

use super::claims;
use super::digest::{self, HashState};
use super::storage::{Key, Layout, Storage, StorageError};
use super::store::Store;
use super::{Failure, Handled, Registry, empty_response, header_value, query_param};
use crate::backend::RequestContext;
use crate::body::{Body, BoxError};
use crate::error::{ErrorCode, OciError};
use crate::route::{Digest, RepoName, UploadId};

/// Parts written at once (each in memory) when the backend allows it.
const PARALLEL_PARTS: usize = 2;
/// Largest state object read.
const MAX_STATE: u64 = 4 * 1024 * 1024;

/// What is saved about a session, in `_uploads/<id>/gate-state`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct State {
    /// The multipart upload of `data`, once a part is written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    multipart: Option<String>,
    /// The tags of the parts written, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    parts: Vec<String>,
    /// Bytes in the parts.
    #[serde(default)]
    parts_size: u64,
    /// Bytes in `gate-tail`, after the parts.
    #[serde(default)]
    tail: u64,
    /// The tail's sha256, to know it is the one this state was saved with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tail_sha256: Option<String>,
    /// The running sha256 over parts and tail ([`HashState::save`]).
    hash: String,
}

impl State {
    fn size(&self) -> u64 {
        self.parts_size + self.tail
    }
}

type SessionKey = (String, String);

/// One async lock per session in this process: its requests take turns.
#[derive(Default)]
pub struct Sessions {
    map: std::sync::Mutex<HashMap<SessionKey, Arc<tokio::sync::Mutex<()>>>>,
}

impl Sessions {
    fn entry(&self, repo: &RepoName, id: &UploadId) -> Arc<tokio::sync::Mutex<()>> {
        let mut map = match self.map.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        map.entry((repo.as_str().to_owned(), id.as_str().to_owned()))
            .or_default()
            .clone()
    }

    async fn lock(&self, repo: &RepoName, id: &UploadId) -> tokio::sync::OwnedMutexGuard<()> {
        self.entry(repo, id).lock_owned().await
    }

    /// The session's lock when no request of this process holds it.
    fn try_lock(&self, repo: &RepoName, id: &UploadId) -> Option<tokio::sync::OwnedMutexGuard<()>> {
        self.entry(repo, id).try_lock_owned().ok()
    }

    /// Forget the locks nobody holds or waits for.
    pub fn forget_idle(&self) {
        let mut map = match self.map.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        map.retain(|_, lock| Arc::strong_count(lock) > 1);
    }
}

fn upload_unknown() -> Failure {
    OciError::new(ErrorCode::BlobUploadUnknown, "no such upload in progress").into()
}

fn location_of(ctx: &RequestContext, repo: &RepoName, id: &UploadId) -> String {
    format!(
        "{}/v2/{repo}/blobs/uploads/{}",
        ctx.public_base(),
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
        header_value(&format!("{}/v2/{repo}/blobs/{d}", ctx.public_base()))?,
    );
    h.insert("docker-content-digest", header_value(d.as_str())?);
    Ok(resp)
}

async fn load_state(
    store: &Store,
    repo: &RepoName,
    id: &UploadId,
) -> Result<Option<State>, Failure> {
    let Some((bytes, _)) = store
        .storage()
        .read(&Layout.upload_state(repo, id), MAX_STATE)
        .await?
    else {
        return Ok(None);
    };
    match serde_json::from_slice::<State>(&bytes) {
        Ok(state) if HashState::restore(&state.hash).is_some() => Ok(Some(state)),
        _ => Err(StorageError::Io {
            what: format!("upload {}: unreadable state", id.as_str()),
            source: std::io::Error::other("not a state this gate wrote"),
        }
        .into()),
    }
}

fn state_bytes(state: &State) -> Result<Bytes, StorageError> {
    serde_json::to_vec(state)
        .map(Bytes::from)
        .map_err(|e| StorageError::Task(e.to_string()))
}

async fn save_state(
    store: &Store,
    repo: &RepoName,
    id: &UploadId,
    state: &State,
) -> Result<(), Failure> {
    store
        .storage()
        .put(&Layout.upload_state(repo, id), state_bytes(state)?)
        .await?;
    Ok(())
}

/// A session's state, with bytes a request wrote but did not live to record (a gate
/// killed mid-PATCH) taken up when the backend can tell (see
/// `Storage::resume_multipart`). Call with the session locked.
async fn current_state(
    store: &Store,
    repo: &RepoName,
    id: &UploadId,
) -> Result<Option<State>, Failure> {
    let Some(mut state) = load_state(store, repo, id).await? else {
        return Ok(None);
    };
    let Some((extra, tag)) = unrecorded(store, repo, id, &state).await? else {
        return Ok(Some(state));
    };
    let key = Layout.upload_data(repo, id);
    let range = state.parts_size..state.parts_size + extra;
    let object = store
        .storage()
        .get(&key, Some(range))
        .await?
        .ok_or_else(|| StorageError::Conflict(format!("upload {} lost its data", id.as_str())))?;
    let hash = HashState::restore(&state.hash)
        .ok_or_else(|| StorageError::Task("unreadable upload hash".into()))?;
    let hash = digest::feed(hash, object.body)
        .await
        .map_err(|e| StorageError::Task(format!("hash upload: {e}")))?;
    tracing::info!(
        upload = id.as_str(),
        bytes = extra,
        "upload: took up bytes written by a request that did not finish"
    );
    state.parts.push(tag);
    state.parts_size += extra;
    state.hash = hash.save();
    save_state(store, repo, id, &state).await?;
    Ok(Some(state))
}

/// A fresh upload id (a random UUID's shape, as distribution's).
fn new_upload_id() -> Result<UploadId, Failure> {
    let hex = digest::hex(&rand::random::<[u8; 16]>());
    UploadId::parse(&format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    ))
    .map_err(|e| Failure::Storage(StorageError::Task(e.to_string())))
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
        let claim = claims::claim(&reg.store, std::slice::from_ref(&d)).await?;
        let mounted = reg.store.layer_linked(&from, &d).await?;
        if mounted {
            claim.check_fresh(&reg.store)?;
            reg.store.link_layer(repo, &d).await?;
        }
        claim.done(&reg.store).await?;
        if mounted {
            return created(ctx, repo, &d);
        }
    }
    let id = new_upload_id()?;
    let started = crate::auth::token::rfc3339(crate::auth::token::now_secs());
    reg.store
        .storage()
        .put(&Layout.upload_started(repo, &id), Bytes::from(started))
        .await?;
    let state = State {
        hash: HashState::default().save(),
        ..State::default()
    };
    save_state(&reg.store, repo, &id, &state).await?;
    match query_param(&req, "digest") {
        None => session_response(StatusCode::ACCEPTED, ctx, repo, &id, 0),
        // Monolithic: POST with the whole blob and its digest.
        Some(d) => run_request(reg, repo, &id, req, ctx, Some(d)).await,
    }
}

pub async fn status(
    reg: &Registry,
    repo: &RepoName,
    id: &UploadId,
    ctx: &RequestContext,
) -> Handled {
    // A status never waits for a request that is writing (a stalled PATCH would hold
    // it as long as its client stalls): it then reports what is stored so far.
    let size = match reg.uploads.try_lock(repo, id) {
        Some(_session) => current_state(&reg.store, repo, id)
            .await?
            .ok_or_else(upload_unknown)?
            .size(),
        None => stored_size(&reg.store, repo, id)
            .await?
            .ok_or_else(upload_unknown)?,
    };
    session_response(StatusCode::NO_CONTENT, ctx, repo, id, size)
}

/// What a session holds, read without changing anything: the saved state, and the
/// bytes beyond it that the backend can see (a request writing now, or one that died).
async fn stored_size(
    store: &Store,
    repo: &RepoName,
    id: &UploadId,
) -> Result<Option<u64>, Failure> {
    let Some(state) = load_state(store, repo, id).await? else {
        return Ok(None);
    };
    let extra = unrecorded(store, repo, id, &state)
        .await?
        .map_or(0, |(extra, _)| extra);
    Ok(Some(state.size() + extra))
}

/// Bytes the session's data holds beyond its state, with a part tag covering them,
/// when the backend can tell (see `Storage::resume_multipart`); read-only.
async fn unrecorded(
    store: &Store,
    repo: &RepoName,
    id: &UploadId,
    state: &State,
) -> Result<Option<(u64, String)>, Failure> {
    let Some(multipart) = state.multipart.as_deref().filter(|_| state.tail == 0) else {
        return Ok(None);
    };
    Ok(store
        .storage()
        .resume_multipart(&Layout.upload_data(repo, id), multipart, state.parts_size)
        .await?)
}

pub async fn cancel(reg: &Registry, repo: &RepoName, id: &UploadId) -> Handled {
    let _session = reg.uploads.lock(repo, id).await;
    let state = load_state(&reg.store, repo, id)
        .await?
        .ok_or_else(upload_unknown)?;
    drop_upload(&reg.store, repo, id, &state).await?;
    Ok(empty_response(StatusCode::NO_CONTENT))
}

/// Remove a session: its multipart upload and every object of it.
async fn drop_upload(
    store: &Store,
    repo: &RepoName,
    id: &UploadId,
    state: &State,
) -> Result<(), StorageError> {
    if let Some(multipart) = &state.multipart {
        store
            .storage()
            .abort_multipart(&Layout.upload_data(repo, id), multipart)
            .await?;
    }
    store
        .storage()
        .delete_all(&Layout.upload_dir(repo, id))
        .await
}

/// Remove sessions idle for longer than `age` (by their state's last write); returns
/// how many went. Their multipart uploads are aborted, so the store drops the parts.
/// A session a request of this process is writing is never idle, however long its
/// parts take (the state is saved once per part): it is skipped, and the lock is held
/// while a session goes, so a request arriving meanwhile finds it gone, not half gone.
pub async fn purge(
    store: &Store,
    sessions: &Sessions,
    age: std::time::Duration,
) -> Result<usize, StorageError> {
    let now = std::time::SystemTime::now();
    let mut removed = 0;
    for name in store.repositories_with("_uploads").await? {
        let Ok(repo) = RepoName::parse(&name) else {
            continue;
        };
        for dir in store.storage().list_dir(&Layout.uploads(&repo)).await?.dirs {
            let Ok(id) = UploadId::parse(&dir) else {
                continue;
            };
            let objects = store.storage().list(&Layout.upload_dir(&repo, &id)).await?;
            let newest = objects.iter().map(|(_, m)| m.modified).max();
            // Written after this pass began (later than `now`): young, not unknown.
            let old = match newest {
                None => true,
                Some(t) => now.duration_since(t).is_ok_and(|a| a > age),
            };
            if !old {
                continue;
            }
            let Some(_session) = sessions.try_lock(&repo, &id) else {
                continue;
            };
            let state = match load_state(store, &repo, &id).await {
                Ok(s) => s.unwrap_or_default(),
                Err(Failure::Storage(e)) => return Err(e),
                // An unreadable state: nothing to abort that we know of.
                Err(Failure::Client(_)) => State::default(),
            };
            drop_upload(store, &repo, &id, &state).await?;
            removed += 1;
        }
    }
    Ok(removed)
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

pub async fn patch(
    reg: &Registry,
    repo: &RepoName,
    id: &UploadId,
    req: Request<Body>,
    ctx: &RequestContext,
) -> Handled {
    run_request(reg, repo, id, req, ctx, None).await
}

pub async fn finish(
    reg: &Registry,
    repo: &RepoName,
    id: &UploadId,
    req: Request<Body>,
    ctx: &RequestContext,
) -> Handled {
    let Some(d) = query_param(&req, "digest") else {
        discard(req.into_body()).await;
        return Err(OciError::new(
            ErrorCode::DigestInvalid,
            "PUT closing an upload needs ?digest=",
        )
        .into());
    };
    run_request(reg, repo, id, req, ctx, Some(d)).await
}

/// The digest a closing request names, checked.
fn closing_digest(d: &str) -> Result<Digest, Failure> {
    match Digest::parse(d) {
        Ok(d) if matches!(d.algorithm(), "sha256" | "sha512") => Ok(d),
        Ok(d) => Err(OciError::new(
            ErrorCode::DigestInvalid,
            format!("unsupported digest algorithm {}", d.algorithm()),
        )
        .into()),
        Err(e) => Err(OciError::new(ErrorCode::DigestInvalid, e.to_string()).into()),
    }
}

/// One PATCH, or the request that closes the session (`closing` digest: the PUT, or a
/// monolithic POST). Runs in a task of its own holding the session's lock: if the
/// request is dropped (its connection torn down), what it started still finishes
/// and its state is saved before another request may touch the session.
async fn run_request(
    reg: &Registry,
    repo: &RepoName,
    id: &UploadId,
    req: Request<Body>,
    ctx: &RequestContext,
    closing: Option<String>,
) -> Handled {
    let (parts, body) = req.into_parts();
    let prepared = async {
        let closing = closing.as_deref().map(closing_digest).transpose()?;
        let range = content_range(&parts)?;
        let length = declared_length(&parts);
        let guard = reg.uploads.lock(repo, id).await;
        let state = current_state(&reg.store, repo, id)
            .await?
            .ok_or_else(upload_unknown)?;
        if let Some((start, end)) = range {
            if start != state.size() {
                return Err(out_of_order(ctx, repo, id, state.size()));
            }
            if let Some(len) = length
                && len != end - start + 1
            {
                return Err(OciError::new(
                    ErrorCode::BlobUploadInvalid,
                    "Content-Range and Content-Length disagree",
                )
                .with_status(StatusCode::RANGE_NOT_SATISFIABLE)
                .into());
            }
        }
        Ok::<_, Failure>((guard, state, closing))
    }
    .await;
    let (guard, state, closing) = match prepared {
        Ok(p) => p,
        Err(e) => {
            discard(body).await;
            return Err(e);
        }
    };
    let job = Job {
        store: reg.store.clone(),
        repo: repo.clone(),
        id: id.clone(),
        request_id: ctx.id,
    };
    let outcome = tokio::spawn(async move {
        let _guard = guard;
        job.run(state, body, closing).await
    })
    .await
    .map_err(|e| Failure::Storage(StorageError::Task(format!("upload task failed: {e}"))))??;
    match outcome {
        Outcome::Appended(size) => session_response(StatusCode::ACCEPTED, ctx, repo, id, size),
        Outcome::Committed(d) => created(ctx, repo, &d),
    }
}

enum Outcome {
    Appended(u64),
    Committed(Digest),
}

/// The work of one request on one session, owned by its task.
struct Job {
    store: Store,
    repo: RepoName,
    id: UploadId,
    request_id: crate::backend::RequestId,
}

/// What the body of a request added.
struct Written {
    state: State,
    hash: HashState,
    /// For a closing request whose whole blob fit in memory and no part was written:
    /// the bytes, to store with one put.
    whole: Option<Vec<Bytes>>,
}

impl Job {
    fn data_key(&self) -> Key {
        Layout.upload_data(&self.repo, &self.id)
    }

    async fn run(
        &self,
        state: State,
        body: Body,
        closing: Option<Digest>,
    ) -> Result<Outcome, Failure> {
        let before = state.size();
        let (written, body_error) = self.write(state, body, closing.is_some()).await?;
        if let Some(e) = body_error {
            let after = written.state.size();
            tracing::info!(
                id = %self.request_id,
                upload = self.id.as_str(),
                received = after.saturating_sub(before),
                "upload body ended early: {e}"
            );
            return Err(OciError::new(
                ErrorCode::BlobUploadInvalid,
                format!("the request body ended early; the upload holds {after} bytes"),
            )
            .into());
        }
        match closing {
            None => Ok(Outcome::Appended(written.state.size())),
            Some(d) => self.commit(written, d).await.map(Outcome::Committed),
        }
    }

    /// Stream `body` into the session: parts of the backend's size, each hashed while
    /// it is written, the next read meanwhile. Saves the state at the end (unless the
    /// request closes the session, which goes on to commit). A client error is
    /// returned beside what was kept; a storage error fails the request and leaves the
    /// state as it was after the last part that was written.
    async fn write(
        &self,
        state: State,
        mut body: Body,
        closing: bool,
    ) -> Result<(Written, Option<BoxError>), Failure> {
        let storage = self.store.shared();
        let sizes = storage.part_sizes();
        let hash = HashState::restore(&state.hash)
            .ok_or_else(|| Failure::Storage(StorageError::Task("unreadable upload hash".into())))?;
        let mut pipe = Pipeline::new(storage, &self.repo, &self.id, state, hash);
        // Bytes of an earlier request not yet in a part come first (already hashed).
        if pipe.state.tail > 0 {
            let tail = self.read_tail(&pipe.state).await?;
            pipe.prefix(tail);
        }
        let mut body_error = None;
        loop {
            // While the client is slow (or stalls), parts that land are recorded.
            let next = if pipe.flights.is_empty() {
                body.frame().await
            } else {
                tokio::select! {
                    frame = body.frame() => frame,
                    () = tokio::time::sleep(std::time::Duration::from_millis(100)) => {
                        pipe.land_ready().await?;
                        continue;
                    }
                }
            };
            match next {
                None => break,
                Some(Err(e)) => {
                    body_error = Some(e);
                    break;
                }
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data()
                        && !data.is_empty()
                    {
                        pipe.push(data);
                        if pipe.buffered() >= sizes.preferred {
                            pipe.cut_part().await?;
                        }
                        pipe.land_ready().await?;
                    }
                }
            }
        }
        let leftover = pipe.take_buffer();
        // A closing request whose body failed keeps its bytes like a PATCH would.
        let last = closing && body_error.is_none();
        let whole = if last && !pipe.any_part() {
            // The whole blob is in memory: hash it here; it is stored with one put.
            pipe.hash_only(&leftover).await?;
            Some(leftover)
        } else {
            if !leftover.is_empty() {
                if last || len_of(&leftover) >= sizes.min {
                    pipe.start_part(leftover).await?;
                } else {
                    pipe.start_tail(leftover).await?;
                }
            }
            None
        };
        let (state, hash) = pipe.finish().await?;
        let mut saved = state.clone();
        saved.hash = hash.save();
        if whole.is_none() {
            save_state(&self.store, &self.repo, &self.id, &saved).await?;
        }
        Ok((
            Written {
                state: saved,
                hash,
                whole,
            },
            body_error,
        ))
    }

    async fn read_tail(&self, state: &State) -> Result<Vec<Bytes>, Failure> {
        let key = Layout.upload_tail(&self.repo, &self.id);
        let found = self.store.storage().read(&key, state.tail).await?;
        let conflict = || {
            Failure::Storage(StorageError::Conflict(format!(
                "upload {}: its pending bytes were rewritten by another request",
                self.id.as_str()
            )))
        };
        let Some((bytes, _)) = found else {
            return Err(conflict());
        };
        let chunks = vec![bytes];
        let check = chunks.clone();
        let sha = tokio::task::spawn_blocking(move || digest::of_chunks("sha256", &check))
            .await
            .map_err(|e| StorageError::Task(e.to_string()))?;
        if sha != state.tail_sha256 {
            return Err(conflict());
        }
        Ok(chunks)
    }

    /// Check the digest and make the blob visible.
    async fn commit(&self, written: Written, d: Digest) -> Result<Digest, Failure> {
        let Written {
            state, hash, whole, ..
        } = written;
        if d.algorithm() == "sha256" && hash.sha256() != d.as_str() {
            return self.refuse(&state, &hash.sha256(), &d).await;
        }
        // The content may exist already (this blob pushed before, by anyone): then
        // claim it, so that a collection under way does not take it away meanwhile.
        // Content written now is new to any collection under way.
        let claim = if self.store.blob_meta(&d).await?.is_some() {
            Some(claims::claim(&self.store, std::slice::from_ref(&d)).await?)
        } else {
            None
        };
        // Whether the parts became `data` (then there is no multipart upload to abort).
        let mut assembled = false;
        if self.store.blob_meta(&d).await?.is_none() {
            match whole {
                Some(chunks) => {
                    if d.algorithm() == "sha512" {
                        let check = chunks.clone();
                        let computed = tokio::task::spawn_blocking(move || {
                            digest::of_chunks("sha512", &check)
                        })
                        .await
                        .map_err(|e| StorageError::Task(e.to_string()))?
                        .unwrap_or_default();
                        if computed != d.as_str() {
                            return self.refuse(&state, &computed, &d).await;
                        }
                    }
                    self.store.write_blob(&d, concat(chunks)).await?;
                }
                None => {
                    self.assemble(&state).await?;
                    assembled = true;
                    if d.algorithm() == "sha512" {
                        let computed = self.sha512_of_data().await?;
                        if computed != d.as_str() {
                            return self.refuse(&state, &computed, &d).await;
                        }
                    }
                    self.store
                        .storage()
                        .rename(&self.data_key(), &Layout.blob_data(&d))
                        .await?;
                }
            }
        }
        if let Some(claim) = &claim {
            claim.check_fresh(&self.store)?;
        }
        self.store.link_layer(&self.repo, &d).await?;
        if let Some(claim) = claim {
            claim.done(&self.store).await?;
        }
        let left = State {
            multipart: state.multipart.clone().filter(|_| !assembled),
            ..state
        };
        drop_upload(&self.store, &self.repo, &self.id, &left).await?;
        Ok(d)
    }

    /// Put the parts together as `data`. Done before, by a request that died before
    /// moving it: `data` is there, as long as the parts.
    async fn assemble(&self, state: &State) -> Result<(), Failure> {
        let key = self.data_key();
        let storage = self.store.storage();
        let Some(multipart) = &state.multipart else {
            // No part at all: an empty blob.
            storage.put(&key, Bytes::new()).await?;
            return Ok(());
        };
        match storage
            .complete_multipart(&key, multipart, &state.parts)
            .await
        {
            Ok(()) => Ok(()),
            Err(StorageError::Conflict(why)) => match storage.head(&key).await? {
                Some(meta) if meta.size == state.parts_size && !is_fs_tag(&state.parts) => Ok(()),
                _ => Err(Failure::Storage(StorageError::Conflict(why))),
            },
            Err(e) => Err(e.into()),
        }
    }

    async fn sha512_of_data(&self) -> Result<String, Failure> {
        let object = self
            .store
            .storage()
            .get(&self.data_key(), None)
            .await?
            .ok_or_else(|| {
                StorageError::Conflict(format!("upload {} lost its data", self.id.as_str()))
            })?;
        digest::sha512_of_body(object.body)
            .await
            .map_err(|e| Failure::Storage(StorageError::Task(format!("hash upload: {e}"))))
    }

    /// The content is not what the client named: drop the session.
    async fn refuse(&self, state: &State, computed: &str, d: &Digest) -> Result<Digest, Failure> {
        drop_upload(&self.store, &self.repo, &self.id, state).await?;
        Err(OciError::new(
            ErrorCode::DigestInvalid,
            format!("the uploaded content is {computed}, not {d}"),
        )
        .into())
    }
}

/// Whether part tags are the filesystem's (`<offset>+<len>`), whose multipart upload
/// cannot have been completed before (it is the file itself).
fn is_fs_tag(parts: &[String]) -> bool {
    parts.first().is_some_and(|p| p.contains('+'))
}

fn concat(chunks: Vec<Bytes>) -> Bytes {
    if chunks.len() == 1 {
        return chunks.into_iter().next().unwrap_or_default();
    }
    let mut all = bytes::BytesMut::with_capacity(chunks.iter().map(Bytes::len).sum());
    for c in chunks {
        all.extend_from_slice(&c);
    }
    all.freeze()
}

/// Parts on their way to the store. Bytes are hashed in one chain (each batch after
/// the one before, on the blocking pool) while up to `parallel` batches are written at
/// once and the next is read from the client; batches are committed to the state in
/// order, each with the hash that covers exactly what is committed.
struct Pipeline {
    storage: Arc<dyn Storage>,
    key: Key,
    tail_key: Key,
    /// Saved once the multipart upload exists (so that the purge can abort it and the
    /// disk can take up what a killed request wrote), and after every part when the
    /// backend cannot tell what was written beyond the state (an object store), so a
    /// gate killed mid-request loses one part at most.
    state_key: Key,
    save_each_part: bool,
    parallel: usize,
    /// Committed so far.
    state: State,
    hash: HashState,
    /// Where the next batch's hash starts: the result of the last batch handed to the
    /// chain (`None`: from `hash`).
    chain: Option<tokio::sync::oneshot::Receiver<HashState>>,
    /// Batches written or being written, oldest first.
    flights: VecDeque<Flight>,
    /// Bytes not yet cut into a batch; the first `prehashed` of them are already
    /// hashed (a tail carried over from an earlier request).
    buffer: Vec<Bytes>,
    prehashed: usize,
    /// Whether a part was started by this request.
    cut_any: bool,
}

type Task<T> = tokio::task::JoinHandle<Result<T, StorageError>>;

struct Flight {
    write: Task<Landed>,
    /// The hash after this batch.
    hash: Task<HashState>,
    len: u64,
}

/// What one batch became.
enum Landed {
    Part(String),
    /// The tail object, with its sha256.
    Tail(String),
}

fn task_failed(e: tokio::task::JoinError) -> StorageError {
    StorageError::Task(format!("upload task failed: {e}"))
}

fn len_of(chunks: &[Bytes]) -> usize {
    chunks.iter().map(Bytes::len).sum()
}

impl Pipeline {
    fn new(
        storage: Arc<dyn Storage>,
        repo: &RepoName,
        id: &UploadId,
        state: State,
        hash: HashState,
    ) -> Pipeline {
        // The disk appends parts to one file: one at a time.
        let disk = storage.part_sizes().min == 0;
        Pipeline {
            storage,
            key: Layout.upload_data(repo, id),
            tail_key: Layout.upload_tail(repo, id),
            state_key: Layout.upload_state(repo, id),
            save_each_part: !disk,
            parallel: if disk { 1 } else { PARALLEL_PARTS },
            state,
            hash,
            chain: None,
            flights: VecDeque::new(),
            buffer: Vec::new(),
            prehashed: 0,
            cut_any: false,
        }
    }

    /// Bytes of an earlier request not yet in a part: they come first, already hashed.
    fn prefix(&mut self, tail: Vec<Bytes>) {
        self.prehashed = len_of(&tail);
        self.buffer = tail;
    }

    fn push(&mut self, data: Bytes) {
        self.buffer.push(data);
    }

    fn buffered(&self) -> usize {
        len_of(&self.buffer)
    }

    fn take_buffer(&mut self) -> Vec<Bytes> {
        std::mem::take(&mut self.buffer)
    }

    fn any_part(&self) -> bool {
        self.state.multipart.is_some() || self.cut_any
    }

    /// Hand a batch to the hash chain: a task that waits for the batch before it and
    /// yields the hash after this one.
    fn chain_hash(&mut self, batch: &[Bytes]) -> Task<HashState> {
        let mut skip = std::mem::take(&mut self.prehashed);
        let mut fresh = Vec::with_capacity(batch.len());
        for chunk in batch {
            if skip >= chunk.len() {
                skip -= chunk.len();
                continue;
            }
            fresh.push(chunk.slice(skip..));
            skip = 0;
        }
        let previous = self.chain.take();
        let start = self.hash.clone();
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.chain = Some(rx);
        tokio::spawn(async move {
            let before = match previous {
                None => start,
                Some(rx) => rx
                    .await
                    .map_err(|_| StorageError::Task("the hash chain broke".into()))?,
            };
            let after = tokio::task::spawn_blocking(move || {
                let mut h = before;
                h.update(&fresh);
                h
            })
            .await
            .map_err(task_failed)?;
            let _ = tx.send(after.clone());
            Ok(after)
        })
    }

    async fn make_room(&mut self) -> Result<(), Failure> {
        while self.flights.len() >= self.parallel {
            self.land_oldest().await?;
        }
        Ok(())
    }

    /// Cut what is buffered into the next part.
    async fn cut_part(&mut self) -> Result<(), Failure> {
        let batch = self.take_buffer();
        self.start_part(batch).await
    }

    /// Write `batch` as the next part.
    async fn start_part(&mut self, batch: Vec<Bytes>) -> Result<(), Failure> {
        self.make_room().await?;
        let upload = match &self.state.multipart {
            Some(id) => id.clone(),
            None => {
                let id = self.storage.create_multipart(&self.key).await?;
                self.state.multipart = Some(id.clone());
                self.save().await?;
                id
            }
        };
        let index = self.state.parts.len() + self.flights.len();
        let offset = self.state.parts_size + self.flights.iter().map(|f| f.len).sum::<u64>();
        let len = len_of(&batch) as u64;
        let hash = self.chain_hash(&batch);
        let (storage, key) = (self.storage.clone(), self.key.clone());
        let write = tokio::spawn(async move {
            storage
                .put_part(&key, &upload, index, offset, batch)
                .await
                .map(Landed::Part)
        });
        self.cut_any = true;
        self.flights.push_back(Flight { write, hash, len });
        Ok(())
    }

    /// Keep `batch` (shorter than a part may be) in the tail object.
    async fn start_tail(&mut self, batch: Vec<Bytes>) -> Result<(), Failure> {
        self.make_room().await?;
        let len = len_of(&batch) as u64;
        let hash = self.chain_hash(&batch);
        let (storage, key) = (self.storage.clone(), self.tail_key.clone());
        let write = tokio::spawn(async move {
            let check = batch.clone();
            let sha = tokio::task::spawn_blocking(move || digest::of_chunks("sha256", &check))
                .await
                .map_err(task_failed)?
                .unwrap_or_default();
            storage.put(&key, concat(batch)).await?;
            Ok(Landed::Tail(sha))
        });
        self.flights.push_back(Flight { write, hash, len });
        Ok(())
    }

    /// Hash a whole blob kept in memory (nothing is written).
    async fn hash_only(&mut self, batch: &[Bytes]) -> Result<(), Failure> {
        self.hash = self.chain_hash(batch).await.map_err(task_failed)??;
        Ok(())
    }

    /// Commit the batches that have landed already, oldest first (so that a stalled
    /// or killed request has recorded all it could).
    async fn land_ready(&mut self) -> Result<(), Failure> {
        while self
            .flights
            .front()
            .is_some_and(|f| f.write.is_finished() && f.hash.is_finished())
        {
            self.land_oldest().await?;
        }
        Ok(())
    }

    /// Wait for the oldest batch and commit it.
    async fn land_oldest(&mut self) -> Result<(), Failure> {
        let Some(flight) = self.flights.pop_front() else {
            return Ok(());
        };
        let written = flight.write.await.map_err(task_failed)?;
        let hash = flight.hash.await.map_err(task_failed)?;
        match (written, hash) {
            (Ok(Landed::Part(tag)), Ok(hash)) => {
                // A part after a tail includes the tail: it is in the part now.
                self.state.parts.push(tag);
                self.state.parts_size += flight.len;
                self.state.tail = 0;
                self.state.tail_sha256 = None;
                self.hash = hash;
                if self.save_each_part {
                    self.save().await?;
                }
                Ok(())
            }
            (Ok(Landed::Tail(sha)), Ok(hash)) => {
                self.state.tail = flight.len;
                self.state.tail_sha256 = Some(sha);
                self.hash = hash;
                Ok(())
            }
            (Err(e), _) | (_, Err(e)) => {
                // Later batches build on this one: they are not committed.
                for f in self.flights.drain(..) {
                    let _ = f.write.await;
                }
                Err(e.into())
            }
        }
    }

    /// Save what is committed.
    async fn save(&self) -> Result<(), Failure> {
        let mut saved = self.state.clone();
        saved.hash = self.hash.save();
        self.storage
            .put(&self.state_key, state_bytes(&saved)?)
            .await?;
        Ok(())
    }

    /// Wait for every batch; the committed state and its hash.
    async fn finish(mut self) -> Result<(State, HashState), Failure> {
        while !self.flights.is_empty() {
            self.land_oldest().await?;
        }
        Ok((self.state, self.hash))
    }
}
