//! Blobs (spec: "Pulling blobs", "Deleting blobs"):
//!
//! ```text
//! GET|HEAD /v2/<name>/blobs/<digest>            → 200, Docker-Content-Digest
//! GET      … Range: bytes=<start>-<end>         → 206 Content-Range; unsatisfiable → 416
//! DELETE   /v2/<name>/blobs/<digest>            → 202 (when deletes are enabled)
//! ```
//!
//! Content streams from the file in fixed-size reads with backpressure: memory does not
//! grow with the blob or with a slow reader.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body::{Frame, SizeHint};
use tokio::io::AsyncSeekExt;

use super::{Handled, Registry, empty_response, header_value};
use crate::body::{self, Body, BoxError};
use crate::error::{ErrorCode, OciError};
use crate::route::{Digest, RepoName};

/// Bytes read from the file at a time.
const READ_SIZE: usize = 256 * 1024;

/// A response body that reads a file from its current position, `remaining` bytes.
pub struct FileBody {
    file: tokio::fs::File,
    remaining: u64,
    buf: BytesMut,
}

impl FileBody {
    pub fn new(file: tokio::fs::File, remaining: u64) -> Self {
        FileBody {
            file,
            remaining,
            buf: BytesMut::new(),
        }
    }
}

impl http_body::Body for FileBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.remaining == 0 {
            return Poll::Ready(None);
        }
        let want = READ_SIZE.min(usize::try_from(this.remaining).unwrap_or(READ_SIZE));
        if this.buf.capacity() < want {
            this.buf.reserve(want);
        }
        let mut limited = (&mut this.buf).limit(want);
        match tokio_util::io::poll_read_buf(Pin::new(&mut this.file), cx, &mut limited) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Err(e)) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(Ok(0)) => {
                Poll::Ready(Some(Err("blob file ended before its length".into())))
            }
            Poll::Ready(Ok(n)) => {
                this.remaining -= n as u64;
                Poll::Ready(Some(Ok(Frame::data(this.buf.split().freeze()))))
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

use bytes::BufMut as _;

/// A single byte range from a `Range` header, resolved against `len`.
#[derive(Debug, PartialEq, Eq)]
pub enum RangeRequest {
    /// No usable `Range`: the whole content (invalid or multi-range headers are
    /// ignored, as RFC 9110 allows).
    Whole,
    Part {
        start: u64,
        end: u64,
    },
    Unsatisfiable,
}

pub fn parse_range(value: Option<&HeaderValue>, len: u64) -> RangeRequest {
    let Some(s) = value.and_then(|v| v.to_str().ok()) else {
        return RangeRequest::Whole;
    };
    let Some(spec) = s.trim().strip_prefix("bytes=") else {
        return RangeRequest::Whole;
    };
    if spec.contains(',') {
        return RangeRequest::Whole;
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return RangeRequest::Whole;
    };
    let (a, b) = (a.trim(), b.trim());
    let parsed = match (a.is_empty(), b.is_empty()) {
        // bytes=-N: the last N bytes.
        (true, false) => match b.parse::<u64>() {
            Ok(0) => return RangeRequest::Unsatisfiable,
            Ok(n) if len == 0 => {
                let _ = n;
                return RangeRequest::Unsatisfiable;
            }
            Ok(n) => Some((len.saturating_sub(n), len - 1)),
            Err(_) => None,
        },
        // bytes=N-: from N to the end.
        (false, true) => a
            .parse::<u64>()
            .ok()
            .map(|start| (start, len.saturating_sub(1))),
        (false, false) => match (a.parse::<u64>(), b.parse::<u64>()) {
            (Ok(start), Ok(end)) if end >= start => Some((start, end.min(len.saturating_sub(1)))),
            _ => None,
        },
        (true, true) => None,
    };
    match parsed {
        None => RangeRequest::Whole,
        Some((start, _)) if start >= len => RangeRequest::Unsatisfiable,
        Some((start, end)) => RangeRequest::Part { start, end },
    }
}

fn blob_unknown(d: &Digest) -> super::Failure {
    OciError::new(
        ErrorCode::BlobUnknown,
        format!("blob {d} is not in this repository"),
    )
    .with_detail(serde_json::json!({ "digest": d.as_str() }))
    .into()
}

pub async fn get(
    reg: &Registry,
    repo: &RepoName,
    d: &Digest,
    req: &Request<Body>,
    head: bool,
) -> Handled {
    let (r, d2) = (repo.clone(), d.clone());
    let opened = reg
        .storage
        .blocking(move |s| {
            if !s.layer_linked(&r, &d2)? {
                return Ok(None);
            }
            s.open_blob(&d2)
        })
        .await?;
    let Some((file, len)) = opened else {
        return Err(blob_unknown(d));
    };
    let range = parse_range(req.headers().get(header::RANGE), len);
    let (status, start, count) = match range {
        RangeRequest::Whole => (StatusCode::OK, 0, len),
        RangeRequest::Part { start, end } => (StatusCode::PARTIAL_CONTENT, start, end - start + 1),
        RangeRequest::Unsatisfiable => {
            let mut resp = OciError::new(ErrorCode::BlobUnknown, "requested range not satisfiable")
                .with_status(StatusCode::RANGE_NOT_SATISFIABLE)
                .into_response();
            resp.headers_mut().insert(
                header::CONTENT_RANGE,
                header_value(&format!("bytes */{len}"))?,
            );
            return Ok(resp);
        }
    };
    let mut resp = if head {
        empty_response(status)
    } else {
        let mut file = tokio::fs::File::from_std(file);
        if start > 0 {
            file.seek(std::io::SeekFrom::Start(start))
                .await
                .map_err(|e| super::storage::StorageError::Io {
                    what: format!("seek in blob {d}"),
                    source: e,
                })?;
        }
        let mut resp = Response::new(body::boxed(FileBody::new(file, count)));
        *resp.status_mut() = status;
        resp
    };
    let h = resp.headers_mut();
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(count));
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert("docker-content-digest", header_value(d.as_str())?);
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(header::ETAG, header_value(&format!("\"{d}\""))?);
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("max-age=31536000"),
    );
    if status == StatusCode::PARTIAL_CONTENT {
        h.insert(
            header::CONTENT_RANGE,
            header_value(&format!("bytes {start}-{}/{len}", start + count - 1))?,
        );
    }
    Ok(resp)
}

pub async fn delete(reg: &Registry, repo: &RepoName, d: &Digest) -> Handled {
    reg.deletes_enabled()?;
    let (r, d2) = (repo.clone(), d.clone());
    if !reg
        .storage
        .blocking(move |s| s.unlink_layer(&r, &d2))
        .await?
    {
        return Err(blob_unknown(d));
    }
    Ok(empty_response(StatusCode::ACCEPTED))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(v: &str, len: u64) -> RangeRequest {
        parse_range(Some(&HeaderValue::from_str(v).expect("value")), len)
    }

    #[test]
    fn ranges() {
        assert_eq!(parse_range(None, 10), RangeRequest::Whole);
        assert_eq!(
            range("bytes=0-4", 10),
            RangeRequest::Part { start: 0, end: 4 }
        );
        assert_eq!(
            range("bytes=5-", 10),
            RangeRequest::Part { start: 5, end: 9 }
        );
        assert_eq!(
            range("bytes=-3", 10),
            RangeRequest::Part { start: 7, end: 9 }
        );
        assert_eq!(
            range("bytes=-30", 10),
            RangeRequest::Part { start: 0, end: 9 }
        );
        assert_eq!(
            range("bytes=8-100", 10),
            RangeRequest::Part { start: 8, end: 9 }
        );
        assert_eq!(range("bytes=10-", 10), RangeRequest::Unsatisfiable);
        assert_eq!(range("bytes=10-20", 10), RangeRequest::Unsatisfiable);
        assert_eq!(range("bytes=-0", 10), RangeRequest::Unsatisfiable);
        assert_eq!(range("bytes=5-2", 10), RangeRequest::Whole);
        assert_eq!(range("bytes=0-1,3-4", 10), RangeRequest::Whole);
        assert_eq!(range("items=0-1", 10), RangeRequest::Whole);
        assert_eq!(range("bytes=x-1", 10), RangeRequest::Whole);
        assert_eq!(range("bytes=0-", 0), RangeRequest::Unsatisfiable);
    }
}
