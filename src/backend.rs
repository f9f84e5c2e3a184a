//! What serves `/v2` once the gate has let a request through. The gate calls a
//! [`Backend`] without knowing whether it is the proxy to an external registry or (later)
//! the registry built into this process.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;

use http::{Request, Response};

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
    /// `https://host[:port]` as clients reach the gate (from `public_url` or `Host`).
    pub public_base: String,
    /// The host the client asked for (`Host`, or the HTTP/2 authority).
    pub host: String,
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
