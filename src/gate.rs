//! The per-request pipeline, top to bottom:
//!
//! 1. request target: origin-form only (no open proxy), method one of the six the
//!    registry API uses (case-sensitive), path normalised and routed;
//! 2. identity from the `Authorization` header (a wrong password is refused on every
//!    request, reads included, so `docker login` cannot succeed with one);
//! 3. policy: anonymous → 401 with a challenge, a user without the right → 403; a write
//!    is refused before one byte of its body is read;
//! 4. the backend, with the body streaming through;
//! 5. `Docker-Distribution-Api-Version` set exactly once, `X-Request-Id`, and the
//!    access log line when the response body has been sent.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use http::header::{self, HeaderValue};
use http::{Method, Request, Response, Version};
use hyper::body::Incoming;

use crate::auth::policy::{Action, Policy};
use crate::auth::{Authenticator, CredentialError, Credentials, Identity, parse_authorization};
use crate::backend::{Backend, RequestContext};
use crate::body::{self, Body, Counted, OnEnd};
use crate::error::{ErrorCode, OciError};
use crate::route::{self, RouteError};

/// Methods the registry API uses; everything else is refused before routing.
const ALLOWED_METHODS: &str = "GET, HEAD, POST, PUT, PATCH, DELETE";

pub struct Gate {
    backend: Arc<dyn Backend>,
    auth: Option<Arc<Authenticator>>,
    policy: Policy,
    public_url: Option<String>,
    realm: String,
}

impl Gate {
    pub fn new(
        backend: Arc<dyn Backend>,
        auth: Option<Arc<Authenticator>>,
        policy: Policy,
        public_url: Option<String>,
        realm: String,
    ) -> Self {
        Gate {
            backend,
            auth,
            policy,
            public_url,
            realm,
        }
    }

    /// Serve one request. Never fails: every outcome is a response.
    pub async fn handle(&self, req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
        let started = Instant::now();
        let id = request_id();
        let bytes_in = Arc::new(AtomicU64::new(0));
        let log = AccessLog {
            id: id.clone(),
            peer,
            method: req.method().clone(),
            path: req.uri().path().to_owned(),
            version: req.version(),
            user: "-".into(),
            status: 0,
            bytes_in: bytes_in.clone(),
            bytes_out: Arc::new(AtomicU64::new(0)),
            started,
        };
        let (resp, user) = match self.admit(req, peer, &id).await {
            Ok((req, ctx)) => {
                let user = ctx.identity.log_name().to_owned();
                let req = req.map(|b| body::boxed(Counted::new(b, bytes_in.clone(), None)));
                (self.backend.handle(req, ctx).await, user)
            }
            Err(rejection) => (rejection.response, rejection.user),
        };
        finish(resp, AccessLog { user, ..log })
    }

    /// Steps 1–3: decide whether the request may reach the backend.
    async fn admit(
        &self,
        req: Request<Incoming>,
        peer: SocketAddr,
        id: &str,
    ) -> Result<(Request<Incoming>, RequestContext), Rejection> {
        let anon = |e: OciError| Rejection::new(e.into_response(), "-");
        // An absolute-form target (`GET http://other/ HTTP/1.1`) is a proxy request.
        if req.version() < Version::HTTP_2 && req.uri().authority().is_some() {
            return Err(anon(
                OciError::new(
                    ErrorCode::Unsupported,
                    "absolute-form request targets are not accepted: this is not a forward proxy",
                )
                .with_status(http::StatusCode::BAD_REQUEST),
            ));
        }
        let Some(action) = Action::for_method(req.method()) else {
            let mut resp = OciError::new(
                ErrorCode::Unsupported,
                format!(
                    "method {} is not allowed; allowed: {ALLOWED_METHODS}",
                    printable(req.method().as_str())
                ),
            )
            .into_response();
            resp.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static(ALLOWED_METHODS));
            return Err(Rejection::new(close_if_body(&req, resp), "-"));
        };
        let route = route::normalize(req.uri().path())
            .and_then(|p| route::parse(&p))
            .map_err(|e| anon(route_error(e)))?;
        let host = request_host(&req).map_err(anon)?;
        let public_base = match &self.public_url {
            Some(url) => url.clone(),
            None => format!("https://{host}"),
        };

        let identity = match parse_authorization(req.headers()) {
            Ok(Credentials::None) => Identity::Anonymous,
            Ok(Credentials::Basic { user, password }) => match &self.auth {
                Some(auth) if auth.verify(&user, &password).await => Identity::User(user),
                _ => {
                    log_auth_failure(peer, &user, "wrong user name or password");
                    let resp = self.challenge(&req, "invalid user name or password");
                    return Err(Rejection::new(resp, "-"));
                }
            },
            Err(e) => {
                log_auth_failure(peer, "-", &e.to_string());
                let message = match e {
                    CredentialError::UnsupportedScheme => {
                        "unsupported authorization scheme; use Basic"
                    }
                    CredentialError::Multiple => "more than one Authorization header",
                    CredentialError::Malformed(_) => "malformed credentials",
                };
                return Err(Rejection::new(self.challenge(&req, message), "-"));
            }
        };

        let repo = route.repository();
        let is_member = |u: &str, g: &str| self.auth.as_ref().is_some_and(|a| a.is_member(u, g));
        if !self.policy.allows(&identity, action, repo, is_member) {
            let resp = match &identity {
                Identity::Anonymous => self.challenge(&req, "authentication required"),
                Identity::User(user) => close_if_body(
                    &req,
                    OciError::new(
                        ErrorCode::Denied,
                        format!(
                            "requested access to the resource is denied: {user} may not {}{}",
                            action.as_str(),
                            repo.map(|r| format!(" {r}")).unwrap_or_default()
                        ),
                    )
                    .into_response(),
                ),
            };
            return Err(Rejection::new(resp, identity.log_name()));
        }
        let ctx = RequestContext {
            id: id.to_owned(),
            peer,
            identity,
            route,
            public_base,
            host,
        };
        Ok((req, ctx))
    }

    /// 401 with a Basic challenge.
    fn challenge(&self, req: &Request<Incoming>, message: &str) -> Response<Body> {
        let mut resp = OciError::new(ErrorCode::Unauthorized, message).into_response();
        if let Ok(v) = HeaderValue::from_str(&format!("Basic realm=\"{}\"", self.realm)) {
            resp.headers_mut().insert(header::WWW_AUTHENTICATE, v);
        }
        close_if_body(req, resp)
    }
}

struct Rejection {
    response: Response<Body>,
    user: String,
}

impl Rejection {
    fn new(response: Response<Body>, user: &str) -> Self {
        Rejection {
            response,
            user: user.to_owned(),
        }
    }
}

fn route_error(e: RouteError) -> OciError {
    let message = e.to_string();
    match e {
        RouteError::NotRegistry | RouteError::UnknownEndpoint => {
            OciError::new(ErrorCode::NotFound, message)
        }
        RouteError::BadPath(_) | RouteError::NameInvalid(_) => {
            OciError::new(ErrorCode::NameInvalid, message)
        }
        RouteError::ReferenceInvalid(_) => OciError::new(ErrorCode::TagInvalid, message),
        RouteError::DigestInvalid(_) => OciError::new(ErrorCode::DigestInvalid, message),
    }
}

/// The host the client asked for: `Host` for HTTP/1.1, the authority for HTTP/2.
/// It ends up in URLs the gate builds, so only host-name characters are accepted.
fn request_host<B>(req: &Request<B>) -> Result<String, OciError> {
    let host = match req.uri().authority() {
        Some(a) => a.as_str().to_owned(),
        None => {
            let mut hosts = req.headers().get_all(header::HOST).iter();
            let first = hosts.next();
            if hosts.next().is_some() {
                return Err(bad_request("more than one Host header"));
            }
            match first.and_then(|v| v.to_str().ok()) {
                Some(h) => h.to_owned(),
                None => return Err(bad_request("missing Host header")),
            }
        }
    };
    let ok = !host.is_empty()
        && host.len() <= 255
        && host.bytes().all(|c| {
            c.is_ascii_alphanumeric() || matches!(c, b'.' | b'-' | b':' | b'[' | b']' | b'_')
        });
    if !ok {
        return Err(bad_request("malformed Host header"));
    }
    Ok(host)
}

fn bad_request(message: &str) -> OciError {
    OciError::new(ErrorCode::Unsupported, message).with_status(http::StatusCode::BAD_REQUEST)
}

/// A refused request whose body was never read: ask HTTP/1 clients to close, so the
/// unread body is not taken for the next request.
fn close_if_body<B>(req: &Request<B>, mut resp: Response<Body>) -> Response<Body> {
    let has_body = req.headers().contains_key(header::TRANSFER_ENCODING)
        || req
            .headers()
            .get(header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() != b"0");
    if has_body && req.version() < Version::HTTP_2 {
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

/// One line per failed login, in a fixed shape for fail2ban:
/// `auth failure: peer=1.2.3.4 user=mark reason=...`.
fn log_auth_failure(peer: SocketAddr, user: &str, reason: &str) {
    tracing::warn!(target: "registry_gate::auth_failure", "auth failure: peer={} user={} reason={}", peer.ip(), printable(user), reason);
}

/// A value safe to put in a log line: control characters escaped, length bounded.
fn printable(s: &str) -> String {
    let mut out: String = s.chars().take(128).flat_map(char::escape_default).collect();
    if s.chars().count() > 128 {
        out.push('…');
    }
    out
}

fn request_id() -> String {
    let bytes: [u8; 8] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Everything the access line reports; written when the response body ends.
struct AccessLog {
    id: String,
    peer: SocketAddr,
    method: Method,
    path: String,
    version: Version,
    user: String,
    status: u16,
    bytes_in: Arc<AtomicU64>,
    bytes_out: Arc<AtomicU64>,
    started: Instant,
}

impl OnEnd for AccessLog {
    fn ended(&mut self, complete: bool) {
        tracing::info!(
            target: "registry_gate::access",
            id = %self.id,
            peer = %self.peer,
            method = %printable(self.method.as_str()),
            path = %printable(&self.path),
            version = ?self.version,
            status = self.status,
            user = %printable(&self.user),
            bytes_in = self.bytes_in.load(Ordering::Relaxed),
            bytes_out = self.bytes_out.load(Ordering::Relaxed),
            ms = self.started.elapsed().as_millis() as u64,
            complete,
        );
    }
}

/// Step 5: headers every response carries, and the access log on the body's end.
fn finish(resp: Response<Body>, mut log: AccessLog) -> Response<Body> {
    let (mut parts, body) = resp.into_parts();
    parts.headers.insert(
        crate::API_VERSION_HEADER,
        HeaderValue::from_static(crate::API_VERSION),
    );
    if let Ok(v) = HeaderValue::from_str(&log.id) {
        parts.headers.insert("x-request-id", v);
    }
    log.status = parts.status.as_u16();
    let counter = log.bytes_out.clone();
    let body = body::boxed(Counted::new(body, counter, Some(Box::new(log))));
    Response::from_parts(parts, body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_validation() {
        let req = |h: &str| {
            Request::builder()
                .uri("/v2/")
                .header("host", h)
                .body(())
                .expect("req")
        };
        assert_eq!(
            request_host(&req("reg.example:5043")).expect("ok"),
            "reg.example:5043"
        );
        assert_eq!(request_host(&req("[::1]:5043")).expect("ok"), "[::1]:5043");
        assert!(request_host(&req("evil.com/x")).is_err());
        assert!(request_host(&req("a b")).is_err());
        let none = Request::builder().uri("/v2/").body(()).expect("req");
        assert!(request_host(&none).is_err());
    }

    #[test]
    fn printable_escapes() {
        assert_eq!(printable("a\nb"), "a\\nb");
        assert!(printable(&"x".repeat(500)).ends_with('…'));
    }
}
