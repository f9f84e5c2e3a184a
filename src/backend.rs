//! What serves `/v2` once the gate has let a request through. The gate calls a
//! [`Backend`] without knowing whether it is the proxy to an external registry or (later)
//! the registry built into this process.

use std::borrow::Cow;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use http::{HeaderValue, Request, Response};

use crate::auth::Identity;
use crate::body::Body;
use crate::route::Route;

/// A request's id: 16 random hex digits, kept inline (copied, never allocated).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct RequestId([u8; 16]);

impl RequestId {
    pub fn random() -> RequestId {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let bytes: [u8; 8] = rand::random();
        let mut id = [0u8; 16];
        for (i, b) in bytes.into_iter().enumerate() {
            id[2 * i] = HEX[usize::from(b >> 4)];
            id[2 * i + 1] = HEX[usize::from(b & 0xf)];
        }
        RequestId(id)
    }

    pub fn as_str(&self) -> &str {
        // Always hex digits: the fallback is never taken.
        std::str::from_utf8(&self.0).unwrap_or("0000000000000000")
    }
}

impl std::fmt::Display for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::fmt::Debug for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

/// What the gate learned about a request that a backend may need.
#[derive(Debug, Clone)]
pub struct RequestContext {
    /// The request id (also in the access log and the `X-Request-Id` header).
    pub id: RequestId,
    pub peer: SocketAddr,
    pub identity: Identity,
    pub route: Route,
    /// The host the client asked for (`Host`, or the HTTP/2 authority), checked to
    /// hold only host-name characters. A `HeaderValue`: taken from the request without
    /// a copy, and put on an upstream request the same way.
    pub host: HeaderValue,
    /// The configured `public_url` (shared, not copied per request).
    pub public_url: Option<Arc<str>>,
}

impl RequestContext {
    /// The host the client asked for.
    pub fn host_str(&self) -> &str {
        self.host.to_str().unwrap_or_default()
    }

    /// `https://host[:port]` as clients reach the gate: `public_url`, or the host the
    /// client asked for (built only when a response needs it).
    pub fn public_base(&self) -> Cow<'_, str> {
        public_base(self.public_url.as_deref(), self.host_str())
    }
}

/// `public_url`, or `https://` and the host the client asked for.
pub fn public_base<'a>(public_url: Option<&'a str>, host: &str) -> Cow<'a, str> {
    match public_url {
        Some(url) => Cow::Borrowed(url),
        None => Cow::Owned(format!("https://{host}")),
    }
}

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A registry behind the gate. Bodies stream both ways; errors come back as responses
/// (OCI error JSON) because only the backend knows what went wrong.
pub trait Backend: Send + Sync + 'static {
    fn handle(&self, req: Request<Body>, ctx: RequestContext) -> BoxFuture<'_, Response<Body>>;

    /// One line for logs: what this backend is.
    fn describe(&self) -> String;

    /// Whether the backend can serve now (`/readyz`): the upstream answers, or the
    /// storage is writable. `Err` says why not.
    fn ready(&self) -> BoxFuture<'_, Result<(), String>>;
}
