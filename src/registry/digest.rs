//! Hashing while bytes stream in, and writing them, off the async threads.
//!
//! An upload's bytes arrive as body frames; they are gathered into batches of up to
//! [`BATCH`] and each batch is written and hashed in one blocking task while the next
//! is read, so the async threads never hash or touch the disk and no thread is held
//! while a client is slow.
//! The file and the running hash always cover exactly the same bytes: a batch that
//! fails to write is cut off the file again.

use std::io::{self, Read, Seek, Write};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use http_body_util::BodyExt;
use sha2::{Digest as _, Sha256, Sha512};

use crate::body::{Body, BoxError};

/// Bytes gathered before one blocking write.
const BATCH: usize = 1024 * 1024;

/// The running sha256 of an upload and how many bytes it covers.
#[derive(Clone)]
pub struct HashState {
    pub size: u64,
    sha256: Sha256,
}

impl Default for HashState {
    fn default() -> Self {
        HashState {
            size: 0,
            sha256: Sha256::new(),
        }
    }
}

impl HashState {
    /// Hash an existing file (an upload resumed after a restart). Blocking.
    pub fn of_file(path: &Path) -> io::Result<HashState> {
        let (size, sha256) = hash_file::<Sha256>(path)?;
        Ok(HashState { size, sha256 })
    }

    /// `sha256:<hex>` of everything so far.
    pub fn sha256(&self) -> String {
        format!("sha256:{}", hex(&self.sha256.clone().finalize()))
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The digest of `bytes` with `algorithm` (`sha256` or `sha512`).
pub fn of_bytes(algorithm: &str, bytes: &[u8]) -> Option<String> {
    match algorithm {
        "sha256" => Some(format!("sha256:{}", hex(&Sha256::digest(bytes)))),
        "sha512" => Some(format!("sha512:{}", hex(&Sha512::digest(bytes)))),
        _ => None,
    }
}

/// The sha512 digest of a file. Blocking.
pub fn sha512_of_file(path: &Path) -> io::Result<String> {
    let (_, hasher) = hash_file::<Sha512>(path)?;
    Ok(format!("sha512:{}", hex(&hasher.finalize())))
}

/// Read a whole file through a hasher: its length and the hasher. Blocking.
fn hash_file<D: sha2::Digest>(path: &Path) -> io::Result<(u64, D)> {
    let mut hasher = D::new();
    let mut size = 0u64;
    let mut file = std::fs::File::open(path)?;
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            return Ok((size, hasher));
        }
        hasher.update(&buf[..n]);
        size += n as u64;
    }
}

/// Why appending a body stopped.
#[derive(Debug)]
pub enum AppendError {
    /// The client's body failed (disconnect, bad framing); what arrived before is kept.
    Client(BoxError),
    /// Writing failed; the failed batch is not in the file.
    Storage(io::Error),
}

/// Append `body` to the file at `path`, which holds `state.size` bytes hashed into
/// `state`. Returns the state covering what is in the file afterwards, whatever
/// happened.
///
/// Two stages overlap: while one batch is written and hashed on the blocking pool,
/// the next is read from the client (TLS decryption on the async thread). Frames are
/// kept as they arrive (no copy into a batch buffer) and written with one vectored
/// write. At most two batches are in memory per upload.
pub async fn append_body(
    path: PathBuf,
    state: HashState,
    mut body: Body,
) -> (HashState, Result<(), AppendError>) {
    let opened = tokio::task::spawn_blocking({
        let path = path.clone();
        move || std::fs::OpenOptions::new().append(true).open(path)
    })
    .await;
    let file = match opened {
        Ok(Ok(f)) => f,
        Ok(Err(e)) => return (state, Err(AppendError::Storage(e))),
        Err(e) => {
            return (
                state,
                Err(AppendError::Storage(io::Error::other(e.to_string()))),
            );
        }
    };
    // The file and state, or the write that holds them.
    let mut writer = Writer::Idle(file, state);
    loop {
        let mut batch = Vec::new();
        let mut len = 0;
        let mut client_error = None;
        let mut end = false;
        while len < BATCH {
            match body.frame().await {
                None => {
                    end = true;
                    break;
                }
                Some(Err(e)) => {
                    client_error = Some(e);
                    end = true;
                    break;
                }
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data()
                        && !data.is_empty()
                    {
                        len += data.len();
                        batch.push(data);
                    }
                }
            }
        }
        let (file, state) = match writer.finish().await {
            Ok(idle) => idle,
            Err((state, e)) => return (state, Err(AppendError::Storage(e))),
        };
        writer = if batch.is_empty() {
            Writer::Idle(file, state)
        } else {
            Writer::start(file, state, batch)
        };
        if end {
            let state = match writer.finish().await {
                Ok((_, state)) => state,
                Err((state, e)) => return (state, Err(AppendError::Storage(e))),
            };
            return match client_error {
                Some(e) => (state, Err(AppendError::Client(e))),
                None => (state, Ok(())),
            };
        }
    }
}

/// The second stage of [`append_body`]: idle, or writing and hashing one batch.
/// (Writing and hashing side by side on two blocking threads was tried: no faster
/// with the client on the same two cores, and more CPU.)
enum Writer {
    Idle(std::fs::File, HashState),
    Writing(tokio::task::JoinHandle<(std::fs::File, HashState, io::Result<()>)>),
}

impl Writer {
    fn start(mut file: std::fs::File, mut state: HashState, batch: Vec<Bytes>) -> Writer {
        Writer::Writing(tokio::task::spawn_blocking(move || {
            let result = write_batch(&mut file, &mut state, &batch);
            (file, state, result)
        }))
    }

    /// Wait for the write under way. On failure, the state covering the file.
    async fn finish(self) -> Result<(std::fs::File, HashState), (HashState, io::Error)> {
        match self {
            Writer::Idle(file, state) => Ok((file, state)),
            Writer::Writing(task) => match task.await {
                Ok((file, state, Ok(()))) => Ok((file, state)),
                Ok((_, state, Err(e))) => Err((state, e)),
                // The task died: the file may hold a partial batch the hash does not
                // cover; the caller re-hashes from the file.
                Err(e) => Err((HashState::default(), io::Error::other(e.to_string()))),
            },
        }
    }
}

/// Write and hash one batch; on failure cut the file back to where it was.
fn write_batch(
    file: &mut std::fs::File,
    state: &mut HashState,
    chunks: &[Bytes],
) -> io::Result<()> {
    match write_all_vectored(file, chunks) {
        Ok(()) => {
            for chunk in chunks {
                state.sha256.update(chunk);
                state.size += chunk.len() as u64;
            }
            Ok(())
        }
        Err(e) => {
            let _ = file.set_len(state.size);
            let _ = file.seek(io::SeekFrom::End(0));
            Err(e)
        }
    }
}

/// `write_all` for several buffers, a few syscalls for a whole batch.
fn write_all_vectored(file: &mut std::fs::File, chunks: &[Bytes]) -> io::Result<()> {
    let mut slices: Vec<io::IoSlice<'_>> = chunks.iter().map(|c| io::IoSlice::new(c)).collect();
    let mut rest = &mut slices[..];
    while !rest.is_empty() {
        match file.write_vectored(rest) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => io::IoSlice::advance_slices(&mut rest, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A body of many frames of uneven sizes, optionally failing after them.
    struct Frames {
        chunks: std::collections::VecDeque<Bytes>,
        fail_at_end: bool,
    }

    impl http_body::Body for Frames {
        type Data = Bytes;
        type Error = BoxError;
        fn poll_frame(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
            std::task::Poll::Ready(match self.chunks.pop_front() {
                Some(c) => Some(Ok(http_body::Frame::data(c))),
                None if self.fail_at_end => {
                    self.fail_at_end = false;
                    Some(Err("client went away".into()))
                }
                None => None,
            })
        }
    }

    /// An empty upload data file in a directory that lives as long as the guard.
    fn empty_upload_file() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("data");
        std::fs::write(&path, b"").expect("create");
        (dir, path)
    }

    fn frames(total: usize, fail_at_end: bool) -> (Vec<u8>, Body) {
        let all: Vec<u8> = (0..total).map(|i| (i * 31 % 251) as u8).collect();
        let mut chunks = std::collections::VecDeque::new();
        let mut at = 0;
        let mut size = 1;
        while at < all.len() {
            let n = size.min(all.len() - at);
            chunks.push_back(Bytes::copy_from_slice(&all[at..at + n]));
            at += n;
            size = size * 7 % 70_001 + 1;
        }
        let body = Frames {
            chunks,
            fail_at_end,
        };
        (all, crate::body::boxed(body))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_frames_across_batches_are_written_and_hashed_in_order() {
        let (_dir, path) = empty_upload_file();
        let (all, body) = frames(5 * BATCH + 12_345, false);
        let (state, result) = append_body(path.clone(), HashState::default(), body).await;
        result.expect("append");
        assert_eq!(std::fs::read(&path).expect("read"), all);
        assert_eq!(state.size, all.len() as u64);
        assert_eq!(state.sha256(), of_bytes("sha256", &all).expect("digest"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_body_that_fails_keeps_what_arrived_with_a_matching_hash() {
        let (_dir, path) = empty_upload_file();
        let (all, body) = frames(3 * BATCH + 7, true);
        let (state, result) = append_body(path.clone(), HashState::default(), body).await;
        assert!(matches!(result, Err(AppendError::Client(_))), "{result:?}");
        let on_disk = std::fs::read(&path).expect("read");
        assert_eq!(on_disk, all);
        assert_eq!(state.size, on_disk.len() as u64);
        assert_eq!(
            HashState::of_file(&path).expect("rehash").sha256(),
            state.sha256()
        );
    }

    #[tokio::test]
    async fn append_hashes_what_it_writes() {
        let (_dir, path) = empty_upload_file();
        let big = vec![7u8; 3 * BATCH + 5];
        let (state, result) = append_body(
            path.clone(),
            HashState::default(),
            crate::body::full(big.clone()),
        )
        .await;
        result.expect("append");
        assert_eq!(state.size, big.len() as u64);
        let (state, result) =
            append_body(path.clone(), state, crate::body::full(&b"tail"[..])).await;
        result.expect("append");
        let mut all = big;
        all.extend_from_slice(b"tail");
        assert_eq!(state.sha256(), of_bytes("sha256", &all).expect("digest"));
        assert_eq!(
            HashState::of_file(&path).expect("rehash").sha256(),
            state.sha256()
        );
        assert_eq!(
            sha512_of_file(&path).expect("sha512"),
            of_bytes("sha512", &all).expect("digest")
        );
    }
}
