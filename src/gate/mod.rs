//! The per-request pipeline, top to bottom:
//!
//! 1. request target: origin-form only (no open proxy), method one of the six the
//!    registry API uses (case-sensitive); the token endpoint is answered here
//!    (`token_endpoint`), everything else must be a `/v2` route;
//! 2. identity from the `Authorization` header: Basic (a wrong password is refused on
//!    every request, reads included) or a token this gate issued;
//! 3. policy: `GET /v2/` needs an identity (that is what makes every client ask for a
//!    token and `login` honest); other reads follow the rules (anonymous by default);
//!    a refused request gets a Bearer challenge naming the scope it needs, or 403 for a
//!    Basic user without the right; a write is refused before one byte of its body is
//!    read;
//! 4. immutable tags (`[[immutable]]`): a push that would move one, or a delete that
//!    would remove one, is refused here, for either backend;
//! 5. the backend, with the body streaming through (the catalog is filtered when rules
//!    can hide repositories); what it accepted gets an audit line and webhook events
//!    (`events`);
//! 6. `Docker-Distribution-Api-Version` set exactly once, `X-Request-Id`, and the
//!    access log line when the response body has been sent.

mod access;
mod catalog;
mod events;
mod page;
mod token_endpoint;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode, Version};
use hyper::body::Incoming;

use crate::auth::policy::{Action, Caller, Policy};
use crate::auth::token::{self, TokenKeys};
use crate::auth::{
    Authenticator, CredentialError, Credentials, Identity, PasswordCheck, parse_authorization,
};
use crate::backend::{Backend, RequestContext};
use crate::body::{self, Body, Counted, SharedCount};
use crate::error::{ErrorCode, OciError};
use crate::lifecycle::immutable;
use crate::lifecycle::rules::Lifecycle;
use crate::metrics::{Metrics, ReasonLabels};
use crate::route::{self, RepoName, Route, RouteError};
use access::{AccessLog, bytes_read, finish, printable};
use std::borrow::Cow;

/// Methods the registry API uses; everything else is refused before routing.
const ALLOWED_METHODS: &str = "GET, HEAD, POST, PUT, PATCH, DELETE";

/// How tokens are issued and checked.
pub struct TokenSettings {
    /// Shared with the key file's reloader.
    pub key: Arc<TokenKeys>,
    /// Path of the token endpoint, e.g. `/token`.
    pub path: String,
    /// Configured service name; `None`: the host of the public URL or request.
    pub service: Option<String>,
    pub lifetime: Duration,
    /// Realm of the Basic challenge the token endpoint sends with a 401.
    pub basic_realm: String,
}

pub struct Gate {
    backend: Arc<dyn Backend>,
    auth: Option<Arc<Authenticator>>,
    policy: Policy,
    /// Shared with every request's context.
    public_url: Option<Arc<str>>,
    tokens: TokenSettings,
    metrics: Arc<Metrics>,
    /// `[[immutable]]` (and the retention rules, unused here).
    lifecycle: Arc<Lifecycle>,
    /// `[[notifications]]`, when configured.
    notifier: Option<Arc<crate::notify::Notifier>>,
}

/// What the gate knows of where the client thinks it is. Nothing is allocated for
/// it: the host is the request's own header value, the rest is configuration.
struct Origin<'g> {
    /// `Host` or the HTTP/2 authority, checked (see `request_host`).
    host: HeaderValue,
    /// The configured `public_url`.
    public_url: Option<&'g Arc<str>>,
    /// The configured token `service`; `None`: the public host (see `service()`).
    service: Option<&'g str>,
}

impl Origin<'_> {
    fn host_str(&self) -> &str {
        self.host.to_str().unwrap_or_default()
    }

    /// `https://host[:port]`: `public_url`, else the host the client asked for.
    fn public_base(&self) -> Cow<'_, str> {
        crate::backend::public_base(self.public_url.map(|u| &**u), self.host_str())
    }

    /// The host of the public base: `public_url`'s, else the one the client asked for.
    fn public_host(&self) -> &str {
        match self.public_url {
            Some(url) => url.strip_prefix("https://").unwrap_or(url),
            None => self.host_str(),
        }
    }

    /// The token `service`: configured, or the public host.
    fn service(&self) -> &str {
        self.service.unwrap_or_else(|| self.public_host())
    }

    /// The context a backend gets, for a request from this origin.
    fn context(
        &self,
        id: crate::backend::RequestId,
        peer: SocketAddr,
        identity: Identity,
        route: Route,
    ) -> RequestContext {
        RequestContext {
            id,
            peer,
            identity,
            route,
            host: self.host.clone(),
            public_url: self.public_url.cloned(),
        }
    }
}

impl Gate {
    pub fn new(
        backend: Arc<dyn Backend>,
        auth: Option<Arc<Authenticator>>,
        policy: Policy,
        public_url: Option<String>,
        tokens: TokenSettings,
        metrics: Arc<Metrics>,
    ) -> Self {
        Gate {
            backend,
            auth,
            policy,
            public_url: public_url.map(Arc::from),
            tokens,
            metrics,
            lifecycle: Arc::new(Lifecycle::default()),
            notifier: None,
        }
    }

    /// Send webhook events through this notifier.
    pub fn with_notifier(mut self, notifier: Option<Arc<crate::notify::Notifier>>) -> Self {
        self.notifier = notifier;
        self
    }

    /// Enforce these immutable tags.
    pub fn with_lifecycle(mut self, lifecycle: Arc<Lifecycle>) -> Self {
        self.lifecycle = lifecycle;
        self
    }

    /// Serve one request. Never fails: every outcome is a response.
    pub async fn handle(&self, req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
        let started = Instant::now();
        let id = crate::backend::RequestId::random();
        // The decision needs only the head; the body is kept apart, to be handed on
        // or, for a refusal, read and dropped (`drain_refused`). A request without a
        // body (every pull) has nothing to count.
        let (parts, req_body) = req.into_parts();
        let bytes_in =
            (!http_body::Body::is_end_stream(&req_body)).then(|| Arc::new(AtomicU64::new(0)));
        let log = AccessLog {
            id,
            peer,
            method: parts.method.clone(),
            family: "other",
            metrics: self.metrics.clone(),
            uri: parts.uri.clone(),
            version: parts.version,
            user: Cow::Borrowed("-"),
            status: 0,
            bytes_in: bytes_in.clone(),
            bytes_out: 0,
            started,
        };
        let head = Request::from_parts(parts, ());
        let small_h2_body = drainable(&head);
        let (resp, user, family) = match self.admit(head, peer, id).await {
            Ok(Admitted::Backend(req, ctx)) => {
                let req = req.map(|()| req_body);
                let user = ctx.identity.log_name_owned();
                let family = ctx.route.family();
                let filter = matches!(ctx.route, Route::Catalog) && self.policy.restricts_pull();
                let caller_identity = filter.then(|| ctx.identity.clone());
                let pending = events::Pending::capture(&req, &ctx, self.notifier.as_deref());
                let req = match &bytes_in {
                    Some(count) => {
                        req.map(|b| body::boxed(Counted::new(b, SharedCount(count.clone()))))
                    }
                    // Nothing to read: no box, no counter.
                    None => req.map(|_| body::empty()),
                };
                let checked = if self.lifecycle.immutable.is_empty() {
                    Ok(req)
                } else {
                    immutable::check(&self.lifecycle, self.backend.as_ref(), req, &ctx).await
                };
                let resp = match checked {
                    Ok(req) => self.backend.handle(req, *ctx).await,
                    Err(refused) => refused,
                };
                if let Some(pending) = pending {
                    pending.answered(&resp, bytes_read(&bytes_in), self.notifier.as_deref());
                }
                let resp = match caller_identity {
                    Some(identity) => match catalog::read(resp).await {
                        Ok(page) => {
                            catalog::filter(page, |repo| self.may_pull_listed(&identity, repo))
                        }
                        Err(resp) => resp,
                    },
                    None => resp,
                };
                (resp, user, family)
            }
            Ok(Admitted::Token(req, origin)) => {
                let req = req.map(|()| req_body);
                let (resp, user) = token_endpoint::serve(self, req, peer, &origin).await;
                (resp, Cow::Owned(user), "token")
            }
            Ok(Admitted::Page(req, origin)) => (
                page::serve(self, &req, peer, &origin).await,
                Cow::Borrowed("-"),
                "page",
            ),
            // Refusals are the rare path: route the path again for the metric.
            Err(rejection) => {
                if small_h2_body {
                    drain_refused(req_body).await;
                }
                (
                    rejection.response,
                    Cow::Owned(rejection.user),
                    self.family(log.uri.path()),
                )
            }
        };
        // A HEAD answer never has a body (an HTTP/2 client resets a stream that
        // carries one); its Content-Length stays what a GET would be sent.
        let resp = if log.method == http::Method::HEAD {
            let (parts, _) = resp.into_parts();
            Response::from_parts(parts, body::empty())
        } else {
            resp
        };
        finish(
            resp,
            AccessLog {
                user,
                family,
                ..log
            },
        )
    }

    /// The route family of a path, for metrics.
    fn family(&self, path: &str) -> &'static str {
        if path == self.tokens.path {
            return "token";
        }
        if path == "/" {
            return "page";
        }
        route::normalize(path)
            .and_then(|p| route::parse(&p))
            .map_or("other", |r| r.family())
    }

    fn auth_failed(&self, reason: &'static str) {
        self.metrics
            .auth_failures
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    /// Steps 1–3: decide whether the request may reach the backend.
    async fn admit(
        &self,
        req: Request<()>,
        peer: SocketAddr,
        id: crate::backend::RequestId,
    ) -> Result<Admitted<'_>, Rejection> {
        // A refusal leaves the body unread: HTTP/1 closes, so it is not read as a request.
        let unread_body = has_body(&req) && req.version() < Version::HTTP_2;
        let anon = |e: OciError| Rejection::new(close_if(unread_body, e.into_response()), "-");
        // Reads carry no body: a request hidden in one never reaches the upstream.
        if matches!(*req.method(), http::Method::GET | http::Method::HEAD) && has_body(&req) {
            return Err(anon(bad_request(
                "a GET or HEAD request must not have a body",
            )));
        }
        // An absolute-form target (`GET http://other/ HTTP/1.1`) is a proxy request.
        if req.version() < Version::HTTP_2 && req.uri().authority().is_some() {
            return Err(anon(bad_request(
                "absolute-form request targets are not accepted: this is not a forward proxy",
            )));
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
        let origin = self.origin(&req).map_err(anon)?;
        if req.uri().path() == self.tokens.path {
            return Ok(Admitted::Token(req, origin));
        }
        if req.uri().path() == "/" && action == Action::Pull {
            return Ok(Admitted::Page(req, origin));
        }
        let route = route::normalize(req.uri().path())
            .and_then(|p| route::parse(&p))
            .map_err(|e| anon(route_error(e)))?;

        let identity = self
            .identify(&req, peer, &origin, route.repository(), action)
            .await?;
        let repo = route.repository();
        if !self.allows(&identity, action, &route) {
            let resp = match &identity {
                Identity::Anonymous => {
                    let message = if route == Route::Base {
                        "authentication required"
                    } else {
                        "authentication required to do this"
                    };
                    self.challenge(&req, &origin, repo, action, None, message)
                }
                Identity::Token(_) => self.challenge(
                    &req,
                    &origin,
                    repo,
                    action,
                    Some("insufficient_scope"),
                    "requested access to the resource is denied",
                ),
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
        let req = self.check_mount(req, &identity, &route);
        let ctx = origin.context(id, peer, identity, route);
        Ok(Admitted::Backend(req, Box::new(ctx)))
    }

    /// Step 2: who is calling. Wrong credentials of any kind end the request here.
    async fn identify(
        &self,
        req: &Request<()>,
        peer: SocketAddr,
        origin: &Origin<'_>,
        repo: Option<&RepoName>,
        action: Action,
    ) -> Result<Identity, Rejection> {
        match parse_authorization(req.headers()) {
            Ok(Credentials::None) => Ok(Identity::Anonymous),
            // Without password files there are no accounts: saved credentials of a
            // client mean nothing here, and must not stop it pulling.
            Ok(Credentials::Basic { .. }) if self.auth.is_none() => Ok(Identity::Anonymous),
            Ok(Credentials::Basic { user, password }) => {
                match self.check_password(peer, &user, &password).await {
                    PasswordCheck::Valid => Ok(Identity::User(user)),
                    PasswordCheck::Invalid => Err(Rejection::new(
                        self.challenge(
                            req,
                            origin,
                            repo,
                            action,
                            None,
                            "invalid user name or password",
                        ),
                        "-",
                    )),
                    PasswordCheck::LockedOut(retry) => {
                        Err(Rejection::new(close_if_body(req, locked_out(retry)), "-"))
                    }
                }
            }
            Ok(Credentials::Bearer(t)) => {
                match self
                    .tokens
                    .key
                    .verify(&t, origin.service(), token::now_secs())
                {
                    Ok(claims) => Ok(Identity::Token(claims)),
                    Err(e) => {
                        self.auth_failed("invalid_token");
                        tracing::debug!(peer = %peer, "token refused: {e}");
                        let resp = self.challenge(
                            req,
                            origin,
                            repo,
                            action,
                            Some("invalid_token"),
                            &e.to_string(),
                        );
                        Err(Rejection::new(resp, "-"))
                    }
                }
            }
            Err(e) => {
                self.auth_failed("malformed");
                Authenticator::log_malformed(peer.ip(), &e.to_string());
                let message = match e {
                    CredentialError::UnsupportedScheme => {
                        "unsupported authorization scheme; use Basic or Bearer"
                    }
                    CredentialError::Multiple => "more than one Authorization header",
                    CredentialError::Malformed(_) => "malformed credentials",
                };
                Err(Rejection::new(
                    self.challenge(req, origin, repo, action, None, message),
                    "-",
                ))
            }
        }
    }

    /// Check a password, or say no when there are no password files.
    async fn check_password(&self, peer: SocketAddr, user: &str, password: &[u8]) -> PasswordCheck {
        let check = match &self.auth {
            Some(auth) => auth.check_password(peer.ip(), user, password).await,
            // No accounts at all: not a guessed password, so no failure line for
            // fail2ban (a client with saved credentials would get itself banned).
            None => {
                tracing::debug!(peer = %peer, "credentials sent to a gate without [auth]");
                return PasswordCheck::Invalid;
            }
        };
        match check {
            PasswordCheck::Valid => {}
            PasswordCheck::Invalid => self.auth_failed("bad_credentials"),
            PasswordCheck::LockedOut(_) => self.auth_failed("locked_out"),
        }
        check
    }

    fn is_member(&self, user: &str, group: &str) -> bool {
        self.auth.as_ref().is_some_and(|a| a.is_member(user, group))
    }

    /// Step 3: the policy, for every kind of identity.
    fn allows(&self, identity: &Identity, action: Action, route: &Route) -> bool {
        let repo = route.repository();
        let anonymous_may = |a: Action| {
            self.policy
                .allows(Caller::Anonymous, a, repo, |u, g| self.is_member(u, g))
        };
        match identity {
            // The version check is what makes clients authenticate: never anonymous.
            Identity::Anonymous => *route != Route::Base && anonymous_may(action),
            Identity::User(user) => {
                *route == Route::Base
                    || self
                        .policy
                        .allows(Caller::User(user), action, repo, |u, g| {
                            self.is_member(u, g)
                        })
            }
            Identity::Token(claims) => {
                let granted = match (route, repo) {
                    (Route::Base, _) => true,
                    (Route::Catalog, _) => claims.grants_catalog(),
                    (_, Some(r)) => claims.grants(action, r),
                    (_, None) => false,
                };
                granted || (*route != Route::Base && anonymous_may(action))
            }
        }
    }

    /// A cross-repository mount (`POST …/uploads/?mount=D&from=R`) reads from `R`: when
    /// the caller may not pull `R`, the mount parameters are dropped and the request
    /// becomes a plain upload, as the spec allows.
    fn check_mount<B>(&self, req: Request<B>, identity: &Identity, route: &Route) -> Request<B> {
        if !matches!(route, Route::UploadStart(_)) {
            return req;
        }
        let Some(query) = req.uri().query() else {
            return req;
        };
        let pairs: Vec<(String, String)> = form_urlencoded::parse(query.as_bytes())
            .into_owned()
            .collect();
        let Some(from) = pairs
            .iter()
            .find(|(k, _)| k == "from")
            .map(|(_, v)| v.clone())
        else {
            return req;
        };
        let allowed = RepoName::parse(&from)
            .is_ok_and(|r| self.allows(identity, Action::Pull, &Route::Tags(r)));
        if allowed {
            return req;
        }
        let kept: String = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(pairs.iter().filter(|(k, _)| k != "mount" && k != "from"))
            .finish();
        let (mut parts, body) = req.into_parts();
        let path = parts.uri.path().to_owned();
        let pq = if kept.is_empty() {
            path
        } else {
            format!("{path}?{kept}")
        };
        let mut uri = http::uri::Parts::from(parts.uri.clone());
        match pq.parse() {
            Ok(pq) => uri.path_and_query = Some(pq),
            Err(_) => return Request::from_parts(parts, body),
        }
        if let Ok(u) = http::Uri::from_parts(uri) {
            parts.uri = u;
        }
        Request::from_parts(parts, body)
    }

    /// Whether a repository may appear in the catalog for this caller.
    fn may_pull_listed(&self, identity: &Identity, repo: &RepoName) -> bool {
        let caller = match identity {
            Identity::Anonymous => Caller::Anonymous,
            Identity::User(u) => Caller::User(u),
            Identity::Token(c) if c.sub.is_empty() => Caller::Anonymous,
            Identity::Token(c) => Caller::User(&c.sub),
        };
        self.policy
            .allows(caller, Action::Pull, Some(repo), |u, g| {
                self.is_member(u, g)
            })
    }

    fn origin<B>(&self, req: &Request<B>) -> Result<Origin<'_>, OciError> {
        Ok(Origin {
            host: request_host(req)?,
            public_url: self.public_url.as_ref(),
            service: self.tokens.service.as_deref(),
        })
    }

    /// 401 with a Bearer challenge naming the realm (our token endpoint), the service
    /// and, on repository requests, the scope the request needs.
    fn challenge<B>(
        &self,
        req: &Request<B>,
        origin: &Origin<'_>,
        repo: Option<&RepoName>,
        action: Action,
        error: Option<&str>,
        message: &str,
    ) -> Response<Body> {
        let code = if error == Some("insufficient_scope") {
            ErrorCode::Denied
        } else {
            ErrorCode::Unauthorized
        };
        let mut resp = OciError::new(code, message)
            .with_status(StatusCode::UNAUTHORIZED)
            .into_response();
        let mut value = format!(
            "Bearer realm=\"{}{}\",service=\"{}\"",
            origin.public_base(),
            self.tokens.path,
            origin.service()
        );
        if let Some(repo) = repo {
            let actions = match action {
                Action::Pull => "pull",
                // A push reads too (blob existence checks), as distribution asks.
                Action::Push => "pull,push",
                Action::Delete => "delete",
            };
            value.push_str(&format!(",scope=\"repository:{repo}:{actions}\""));
        }
        if let Some(error) = error {
            value.push_str(&format!(",error=\"{error}\""));
        }
        if let Ok(v) = HeaderValue::from_str(&value) {
            resp.headers_mut().insert(header::WWW_AUTHENTICATE, v);
        }
        close_if_body(req, resp)
    }
}

enum Admitted<'g> {
    Backend(Request<()>, Box<RequestContext>),
    Token(Request<()>, Origin<'g>),
    Page(Request<()>, Origin<'g>),
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

/// 429 for a locked-out address or user, with `Retry-After`.
fn locked_out(retry: Duration) -> Response<Body> {
    let secs = retry.as_secs().max(1);
    let mut resp = OciError::new(
        ErrorCode::TooManyRequests,
        format!("too many failed logins; try again in {secs} s"),
    )
    .into_response();
    resp.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    resp
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
/// HTTP/1.1's is the request's own header value (shared, not copied).
fn request_host<B>(req: &Request<B>) -> Result<HeaderValue, OciError> {
    let host = match req.uri().authority() {
        Some(a) => {
            HeaderValue::from_str(a.as_str()).map_err(|_| bad_request("malformed Host header"))?
        }
        None => {
            let mut hosts = req.headers().get_all(header::HOST).iter();
            let first = hosts.next();
            if hosts.next().is_some() {
                return Err(bad_request("more than one Host header"));
            }
            match first {
                Some(h) => h.clone(),
                None => return Err(bad_request("missing Host header")),
            }
        }
    };
    let bytes = host.as_bytes();
    let ok = !bytes.is_empty()
        && bytes.len() <= 255
        && bytes.iter().all(|&c| {
            c.is_ascii_alphanumeric() || matches!(c, b'.' | b'-' | b':' | b'[' | b']' | b'_')
        });
    if !ok {
        return Err(bad_request("malformed Host header"));
    }
    Ok(host)
}

fn bad_request(message: &str) -> OciError {
    OciError::new(ErrorCode::Unsupported, message).with_status(StatusCode::BAD_REQUEST)
}

/// A refused request whose body was never read: ask HTTP/1 clients to close, so the
/// unread body is not taken for the next request.
fn close_if_body<B>(req: &Request<B>, resp: Response<Body>) -> Response<Body> {
    close_if(has_body(req) && req.version() < Version::HTTP_2, resp)
}

fn close_if(close: bool, mut resp: Response<Body>) -> Response<Body> {
    if close {
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

/// Bodies up to this size (a manifest's limit) are read and dropped when their
/// request is refused over HTTP/2; larger ones are refused at once.
const DRAIN_LIMIT: u64 = crate::registry::manifests::MAX_MANIFEST_BYTES as u64;
/// How long reading a refused body may take.
const DRAIN_TIME: Duration = Duration::from_secs(5);

/// An HTTP/2 request announcing a small body: if it is refused, the body is read
/// first. Answering and resetting the stream while the client still sends makes curl
/// (7.88) drop the answer ("Stream error in the HTTP/2 framing layer").
fn drainable<B>(req: &Request<B>) -> bool {
    req.version() >= Version::HTTP_2
        && has_body(req)
        && crate::body::content_length(req.headers()).is_some_and(|n| n <= DRAIN_LIMIT)
}

/// Read and drop a refused request's body, bounded in bytes and time.
async fn drain_refused(mut body: Incoming) {
    use http_body_util::BodyExt as _;
    let read = async {
        let mut total = 0u64;
        while let Some(Ok(frame)) = body.frame().await {
            if let Some(data) = frame.data_ref() {
                total += data.len() as u64;
                if total > DRAIN_LIMIT {
                    return;
                }
            }
        }
    };
    let _ = tokio::time::timeout(DRAIN_TIME, read).await;
}

/// Whether the request announces a body (chunked, or a non-zero Content-Length).
fn has_body<B>(req: &Request<B>) -> bool {
    req.headers().contains_key(header::TRANSFER_ENCODING)
        || req
            .headers()
            .get(header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() != b"0")
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
}
