//! Digests: the running sha256 of an upload, which can be saved into the upload's
//! state in the store and resumed by another gate (`HashState::save`/`restore`), and
//! one-shot sha256/sha512 of bytes or of a stored object. Hashing many bytes is done
//! on the blocking pool by the callers, never on the async threads.

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::BodyExt;
use sha2::digest::common::hazmat::SerializableState;
use sha2::{Digest as _, Sha256, Sha512};

use crate::body::{Body, BoxError};

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
    /// Add bytes. Blocking for large inputs: call on the blocking pool.
    pub fn update(&mut self, chunks: &[Bytes]) {
        for chunk in chunks {
            self.sha256.update(chunk);
            self.size += chunk.len() as u64;
        }
    }

    /// `sha256:<hex>` of everything so far.
    pub fn sha256(&self) -> String {
        format!("sha256:{}", hex(&self.sha256.clone().finalize()))
    }

    /// The state as text, for the upload's state object: `<size>:<base64>`.
    pub fn save(&self) -> String {
        let state = self.sha256.serialize();
        format!(
            "{}:{}",
            self.size,
            base64::engine::general_purpose::STANDARD.encode(state.as_slice())
        )
    }

    /// A state saved by [`HashState::save`]; `None` if the text is not one.
    pub fn restore(text: &str) -> Option<HashState> {
        let (size, b64) = text.split_once(':')?;
        let size = size.parse().ok()?;
        let bytes = base64::engine::general_purpose::STANDARD.decode(b64).ok()?;
        let state =
            sha2::digest::common::hazmat::SerializedState::<Sha256>::try_from(bytes.as_slice())
                .ok()?;
        let sha256 = Sha256::deserialize(&state).ok()?;
        Some(HashState { size, sha256 })
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

/// The digest of several buffers. Blocking for large inputs.
pub fn of_chunks(algorithm: &str, chunks: &[Bytes]) -> Option<String> {
    fn run<D: sha2::Digest>(chunks: &[Bytes]) -> String {
        let mut h = D::new();
        for c in chunks {
            h.update(c);
        }
        hex(&h.finalize())
    }
    match algorithm {
        "sha256" => Some(format!("sha256:{}", run::<Sha256>(chunks))),
        "sha512" => Some(format!("sha512:{}", run::<Sha512>(chunks))),
        _ => None,
    }
}

/// Add a streamed object to a running hash, on the blocking pool in batches.
pub async fn feed(state: HashState, body: Body) -> Result<HashState, BoxError> {
    fold_blocking(body, state, |s, chunks| s.update(chunks)).await
}

/// The sha512 digest of a streamed object, hashed on the blocking pool in batches.
pub async fn sha512_of_body(body: Body) -> Result<String, BoxError> {
    let hasher = fold_blocking(body, Sha512::new(), |h, chunks| {
        for c in chunks {
            h.update(c);
        }
    })
    .await?;
    Ok(format!("sha512:{}", hex(&hasher.finalize())))
}

/// Read `body` in batches of about 1 MiB and apply `step` to each on the blocking pool.
async fn fold_blocking<T: Send + 'static>(
    mut body: Body,
    mut acc: T,
    step: fn(&mut T, &[Bytes]),
) -> Result<T, BoxError> {
    let mut batch: Vec<Bytes> = Vec::new();
    let mut len = 0;
    loop {
        let frame = body.frame().await.transpose()?;
        let end = frame.is_none();
        if let Some(data) = frame.and_then(|f| f.into_data().ok()) {
            len += data.len();
            batch.push(data);
        }
        if len >= 1024 * 1024 || (end && len > 0) {
            len = 0;
            let chunks = std::mem::take(&mut batch);
            acc = tokio::task::spawn_blocking(move || {
                step(&mut acc, &chunks);
                acc
            })
            .await?;
        }
        if end {
            return Ok(acc);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_saved_state_resumes_where_it_stopped() {
        let all: Vec<u8> = (0..100_003u32).map(|i| (i * 31 % 251) as u8).collect();
        let mut first = HashState::default();
        first.update(&[Bytes::copy_from_slice(&all[..12_345])]);
        let text = first.save();
        let mut resumed = HashState::restore(&text).expect("restore");
        assert_eq!(resumed.size, 12_345);
        resumed.update(&[Bytes::copy_from_slice(&all[12_345..])]);
        assert_eq!(resumed.sha256(), of_bytes("sha256", &all).expect("digest"));
        assert!(HashState::restore("12:not base64").is_none());
        assert!(HashState::restore("x").is_none());
        assert!(
            HashState::restore("3:AAAA").is_none(),
            "too short for a state"
        );
    }

    #[tokio::test]
    async fn sha512_of_a_stream() {
        let data = vec![5u8; 3 * 1024 * 1024 + 7];
        let got = sha512_of_body(crate::body::full(data.clone()))
            .await
            .expect("hash");
        assert_eq!(got, of_bytes("sha512", &data).expect("digest"));
        assert_eq!(
            of_chunks("sha512", &[Bytes::from(data)]),
            Some(got),
            "chunks agree"
        );
    }
}
