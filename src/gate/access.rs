//! Step 5 of the pipeline: the headers every response carries, and the access log
//! line (plus metrics), written when the response body has been sent — so it reports
//! what really went over the wire.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use http::header::{HeaderName, HeaderValue};
use http::{Method, Response, Version};

use crate::backend::RequestId;
use crate::body::{self, Body, Counted, OnEnd};
use crate::metrics::Metrics;

/// A value safe to put in a log line: control characters escaped, length bounded.
pub(super) fn printable(s: &str) -> String {
    let mut out: String = s.chars().take(128).flat_map(char::escape_default).collect();
    if s.chars().count() > 128 {
        out.push('…');
    }
    out
}

/// Everything the access line reports; written when the response body ends.
pub(super) struct AccessLog {
    pub(super) id: RequestId,
    pub(super) peer: SocketAddr,
    pub(super) method: Method,
    pub(super) family: &'static str,
    pub(super) metrics: Arc<Metrics>,
    /// The request's target (shared with the request, not copied); its path is logged.
    pub(super) uri: http::Uri,
    pub(super) version: Version,
    /// `-` for anonymous requests (borrowed: nothing allocated for them).
    pub(super) user: Cow<'static, str>,
    pub(super) status: u16,
    /// Counted by the request body, when it has one.
    pub(super) bytes_in: Option<Arc<AtomicU64>>,
    /// Counted by the response body this log rides on.
    pub(super) bytes_out: u64,
    pub(super) started: Instant,
}

/// What a request body counted so far (nothing when it had none).
pub(super) fn bytes_read(count: &Option<Arc<AtomicU64>>) -> u64 {
    count.as_ref().map_or(0, |n| n.load(Ordering::Relaxed))
}

impl OnEnd for AccessLog {
    fn counted(&mut self, bytes: u64) {
        self.bytes_out += bytes;
    }

    fn ended(&mut self, complete: bool) {
        let (bytes_in, bytes_out) = (bytes_read(&self.bytes_in), self.bytes_out);
        self.metrics.observe(
            &self.method,
            self.family,
            self.status,
            bytes_in,
            bytes_out,
            self.started.elapsed(),
        );
        tracing::info!(
            target: "registry_gate::access",
            id = %self.id,
            peer = %self.peer,
            method = %printable(self.method.as_str()),
            path = %printable(self.uri.path()),
            version = ?self.version,
            status = self.status,
            user = %printable(&self.user),
            bytes_in,
            bytes_out,
            ms = self.started.elapsed().as_millis() as u64,
            complete,
        );
    }
}

/// Step 5: headers every response carries, and the access log on the body's end.
pub(super) fn finish(resp: Response<Body>, mut log: AccessLog) -> Response<Body> {
    let (mut parts, body) = resp.into_parts();
    // Names, not strings: a `&str` key is parsed on every insert.
    const API_VERSION: HeaderName = HeaderName::from_static(crate::API_VERSION_HEADER);
    const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
    parts
        .headers
        .insert(API_VERSION, HeaderValue::from_static(crate::API_VERSION));
    if let Ok(v) = HeaderValue::from_str(log.id.as_str()) {
        parts.headers.insert(REQUEST_ID, v);
    }
    log.status = parts.status.as_u16();
    let body = body::boxed(Counted::new(body, log));
    Response::from_parts(parts, body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printable_escapes() {
        assert_eq!(printable("a\nb"), "a\\nb");
        assert!(printable(&"x".repeat(500)).ends_with('…'));
    }
}
