//! Hashing while bytes stream in, and writing them, off the async threads.
//!
//! An upload's bytes arrive as body frames; they are gathered into batches of up to
//! [`BATCH`] and each batch is written and hashed in one blocking task, so the async
//! threads never hash or touch the disk and no thread is held while a client is slow.
//! The file and the running hash always cover exactly the same bytes: a batch that
//! fails to write is cut off the file again.

use std::io::{self, Read, Seek, Write};
use std::path::{Path, PathBuf};

use bytes::BytesMut;
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
    let mut file = match opened {
        Ok(Ok(f)) => f,
        Ok(Err(e)) => return (state, Err(AppendError::Storage(e))),
        Err(e) => {
            return (
                state,
                Err(AppendError::Storage(io::Error::other(e.to_string()))),
            );
        }
    };
    let mut state = state;
    let mut batch = BytesMut::new();
    loop {
        let frame = body.frame().await;
        let (end, client_error) = match frame {
            None => (true, None),
            Some(Err(e)) => (true, Some(e)),
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    batch.extend_from_slice(&data);
                }
                (false, None)
            }
        };
        if batch.len() >= BATCH || (end && !batch.is_empty()) {
            let chunk = std::mem::take(&mut batch).freeze();
            let written = tokio::task::spawn_blocking(move || {
                let result = write_batch(&mut file, &mut state, &chunk);
                (file, state, result)
            })
            .await;
            match written {
                Ok((f, s, result)) => {
                    file = f;
                    state = s;
                    if let Err(e) = result {
                        return (state, Err(AppendError::Storage(e)));
                    }
                }
                Err(e) => {
                    // The task died: the file may hold a partial batch the hash does not
                    // cover; the caller re-hashes from the file.
                    return (
                        HashState::default(),
                        Err(AppendError::Storage(io::Error::other(e.to_string()))),
                    );
                }
            }
        }
        if let Some(e) = client_error {
            return (state, Err(AppendError::Client(e)));
        }
        if end {
            return (state, Ok(()));
        }
    }
}

/// Write and hash one batch; on failure cut the file back to where it was.
fn write_batch(file: &mut std::fs::File, state: &mut HashState, chunk: &[u8]) -> io::Result<()> {
    match file.write_all(chunk) {
        Ok(()) => {
            state.sha256.update(chunk);
            state.size += chunk.len() as u64;
            Ok(())
        }
        Err(e) => {
            let _ = file.set_len(state.size);
            let _ = file.seek(io::SeekFrom::End(0));
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn append_hashes_what_it_writes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("data");
        std::fs::write(&path, b"").expect("create");
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
