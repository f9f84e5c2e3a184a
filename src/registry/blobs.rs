//! Blobs (spec: "Pulling blobs", "Deleting blobs"):
//!
//! ```text
//! GET|HEAD /v2/<name>/blobs/<digest>            → 200, Docker-Content-Digest
//! GET      … Range: bytes=<start>-<end>         → 206 Content-Range; unsatisfiable → 416
//! GET      … with `[storage.s3] redirect = true` → 307 to a presigned URL of the store
//! DELETE   /v2/<name>/blobs/<digest>            → 202 (when deletes are enabled)
//! ```
//!
//! Content streams from the storage with backpressure: memory does not grow with the
//! blob or with a slow reader.

use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};

use super::storage::{Layout, Meta};
use super::{Handled, Registry, empty_response, header_value};
use crate::body::Body;
use crate::error::{ErrorCode, OciError};
use crate::route::{Digest, RepoName};

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
    let store = &reg.store;
    let content = Layout.blob_data(d);
    let link = Layout.layer_link(repo, d);
    let range_header = req.headers().get(header::RANGE);
    // Whether the repository has the blob, asked beside the content itself: one round
    // trip to the store, not two. A whole GET opens the content at once; a HEAD, a
    // Range or a redirect needs the size first.
    let whole_get = !head && range_header.is_none();
    let (linked, object, meta) = if whole_get {
        let (linked, object) =
            tokio::join!(store.read_link(&link), store.storage().get(&content, None));
        let object = object?;
        let meta = object.as_ref().map(|o| o.meta.clone());
        (linked?, object, meta)
    } else {
        let (linked, meta) = tokio::join!(store.read_link(&link), store.storage().head(&content));
        (linked?, None, meta?)
    };
    let Some(meta) = meta.filter(|_| linked.as_ref() == Some(d)) else {
        return Err(blob_unknown(d));
    };
    let len = meta.size;
    let range = parse_range(range_header, len);
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
    if !head && let Some(url) = store.storage().redirect_url(&content).await? {
        // As distribution does with `redirect`: the client fetches the content from
        // the store directly (the URL is signed for this object only and expires).
        let mut resp = empty_response(StatusCode::TEMPORARY_REDIRECT);
        let h = resp.headers_mut();
        h.insert(header::LOCATION, header_value(&url)?);
        h.insert("docker-content-digest", header_value(d.as_str())?);
        return Ok(resp);
    }
    let mut resp = if head {
        empty_response(status)
    } else {
        let object = match object {
            Some(o) if status == StatusCode::OK => o,
            _ => {
                let wanted =
                    (status == StatusCode::PARTIAL_CONTENT).then_some(start..start + count);
                store
                    .storage()
                    .get(&content, wanted)
                    .await?
                    .ok_or_else(|| blob_unknown(d))?
            }
        };
        let mut resp = Response::new(object.body);
        *resp.status_mut() = status;
        resp
    };
    blob_headers(&mut resp, d, &meta, status, start, count)?;
    Ok(resp)
}

fn blob_headers(
    resp: &mut Response<Body>,
    d: &Digest,
    meta: &Meta,
    status: StatusCode,
    start: u64,
    count: u64,
) -> Result<(), super::Failure> {
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
            header_value(&format!(
                "bytes {start}-{}/{}",
                start + count - 1,
                meta.size
            ))?,
        );
    }
    Ok(())
}

pub async fn delete(reg: &Registry, repo: &RepoName, d: &Digest) -> Handled {
    reg.deletes_enabled()?;
    if !reg.store.unlink_layer(repo, d).await? {
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
