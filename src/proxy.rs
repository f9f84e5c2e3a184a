//! The [`Backend`] for an external registry (the insecure `registry:2` on a private
//! network): a pooled keep-alive HTTP client that streams bodies both ways.
//!
//! Like Apache's `ProxyPass` + `ProxyPassReverse` + `ProxyPreserveHost`, but stricter:
//! hop-by-hop headers and the client's `Authorization` never pass, `X-Forwarded-*` are
//! set by the gate (never taken from the client), and only the configured upstream is
//! ever contacted: the target is built from configuration, never from the request.

use std::time::Duration;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri};

use crate::backend::{Backend, BoxFuture, RequestContext};
use crate::body::{self, Body};
use crate::config::{UpstreamConfig, UpstreamUrl, parse_upstream_url};
use crate::error::{ErrorCode, OciError};
use crate::metrics::{Metrics, ReasonLabels};
use crate::pool::{Pool, PoolConfig};
use std::sync::Arc;

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1), plus the
/// ones a proxy must not pass on.
static HOP_BY_HOP: NameList = name_list![
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// Headers a client may not set on the upstream request: the gate sets them itself.
static CLIENT_SET_FORBIDDEN: NameList = name_list![
    "authorization",
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-forwarded-port",
    "x-real-ip",
    "expect",
];

/// Header names, at most 16, and the set of their lengths (all below 64): a message's
/// name is compared with the list only when some listed name has its length, so most
/// names cost a shift and a mask.
struct NameList {
    /// What `remove` is given (a `&str` would be parsed again on every call).
    names: &'static [HeaderName],
    /// The same names as strings, compared with `HeaderName::as_str`.
    strs: &'static [&'static str],
    lengths: u64,
}

macro_rules! name_list {
    ($($name:literal),* $(,)?) => {{
        const LIST: &[&str] = &[$($name),*];
        static NAMES: [HeaderName; LIST.len()] = [$(HeaderName::from_static($name)),*];
        NameList {
            names: &NAMES,
            strs: LIST,
            lengths: name_lengths(LIST),
        }
    }};
}
use name_list;

const fn name_lengths(names: &[&str]) -> u64 {
    assert!(names.len() <= 16, "a list of at most 16 names");
    let mut lengths = 0u64;
    let mut i = 0;
    while i < names.len() {
        assert!(
            names[i].len() < 64,
            "listed header names are shorter than 64"
        );
        lengths |= 1 << names[i].len();
        i += 1;
    }
    lengths
}

/// For a message that has only the hop-by-hop headers to lose.
static NO_NAMES: NameList = name_list![];

impl NameList {
    /// The index of `name` (a `HeaderName::as_str`) in the list.
    #[inline]
    fn find(&self, name: &str) -> Option<usize> {
        let len = name.len();
        if len >= 64 || self.lengths & (1 << len) == 0 {
            return None;
        }
        self.strs.iter().position(|n| *n == name)
    }
}

/// Remove hop-by-hop headers, including those the `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    strip(headers, &NO_NAMES);
}

/// [`strip_hop_by_hop`], and in the same pass the headers named in `also`. One pass
/// over the message's names (a handful) beats a hashed `remove` for each listed one,
/// and most messages have none of them; what is found is a bit per listed name.
fn strip(headers: &mut HeaderMap, also: &NameList) {
    let mut found = 0u32;
    for name in headers.keys() {
        let name = name.as_str();
        if let Some(i) = HOP_BY_HOP.find(name) {
            found |= 1 << i;
        } else if let Some(i) = also.find(name) {
            found |= 1 << (16 + i);
        }
    }
    if found == 0 {
        return;
    }
    // Index 0 of the hop-by-hop list is `Connection`: the names it lists go too.
    // `keep-alive`, the token nearly every one carries, is listed already (and `close`
    // names no header): nothing is parsed or allocated for them.
    let mut named = Vec::new();
    if found & 1 != 0 {
        for value in headers.get_all(header::CONNECTION) {
            let Ok(value) = value.to_str() else { continue };
            for token in value.split(',').map(str::trim) {
                if !token.eq_ignore_ascii_case("keep-alive")
                    && !token.eq_ignore_ascii_case("close")
                    && let Ok(name) = HeaderName::from_bytes(token.as_bytes())
                {
                    named.push(name);
                }
            }
        }
    }
    for (i, name) in HOP_BY_HOP.names.iter().enumerate() {
        if found & (1 << i) != 0 {
            headers.remove(name);
        }
    }
    for (i, name) in also.names.iter().enumerate() {
        if found & (1 << (16 + i)) != 0 {
            headers.remove(name);
        }
    }
    for name in named {
        headers.remove(name);
    }
}

/// `ip` as a header value. IPv4 (nearly every peer) is written by hand: `Display`
/// goes through the formatting machinery, about 1,300 instructions per request.
fn ip_value(ip: std::net::IpAddr) -> Option<HeaderValue> {
    let std::net::IpAddr::V4(v4) = ip else {
        return HeaderValue::try_from(ip.to_string()).ok();
    };
    let mut buf = [0u8; 15];
    let mut n = 0;
    for (i, octet) in v4.octets().into_iter().enumerate() {
        if i > 0 {
            buf[n] = b'.';
            n += 1;
        }
        if octet >= 100 {
            buf[n] = b'0' + octet / 100;
            n += 1;
        }
        if octet >= 10 {
            buf[n] = b'0' + octet / 10 % 10;
            n += 1;
        }
        buf[n] = b'0' + octet % 10;
        n += 1;
    }
    HeaderValue::from_bytes(&buf[..n]).ok()
}

pub struct Proxy {
    pool: Arc<Pool>,
    upstream: UpstreamUrl,
    /// `http://host:port` for messages and `Location` rewriting.
    origin: String,
    credentials: Option<HeaderValue>,
    response_timeout: Duration,
    /// For requests whose answer should come at once (not uploads or blob GETs).
    header_timeout: Duration,
    metrics: Arc<Metrics>,
}

impl Proxy {
    pub fn new(config: &UpstreamConfig, metrics: Arc<Metrics>) -> Result<Proxy, String> {
        let upstream = parse_upstream_url(&config.url)?;
        let pool = Pool::new(PoolConfig {
            authority: upstream.authority.clone(),
            connect_timeout: Duration::from_secs(config.connect_timeout_secs),
            idle_timeout: Duration::from_secs(config.pool_idle_secs),
            max_idle: config.pool_max_idle,
            // Upstream reads of up to 64 KiB: big enough for full TLS records towards
            // the client, small enough that 50 parallel downloads stay in a few MiB.
            max_buf_size: 64 * 1024,
        });
        let credentials = match (&config.username, &config.password) {
            (Some(u), Some(p)) => {
                use base64::Engine;
                let token = base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"));
                let mut v = HeaderValue::from_str(&format!("Basic {token}"))
                    .map_err(|e| format!("upstream credentials: {e}"))?;
                v.set_sensitive(true);
                Some(v)
            }
            _ => None,
        };
        let origin = format!("{}://{}", upstream.scheme, upstream.authority);
        Ok(Proxy {
            pool,
            upstream,
            origin,
            credentials,
            response_timeout: Duration::from_secs(config.response_timeout_secs),
            header_timeout: Duration::from_secs(config.header_timeout_secs),
            metrics,
        })
    }

    fn upstream_request(&self, req: Request<Body>, ctx: &RequestContext) -> Request<Body> {
        let (mut parts, body) = req.into_parts();
        // Origin form, as an HTTP/1.1 request line wants it: the client's path and query
        // (the connection goes to the configured upstream whatever the request says).
        let path = std::mem::take(&mut parts.uri)
            .into_parts()
            .path_and_query
            .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
        parts.uri = Uri::from(path);
        parts.version = http::Version::HTTP_11;
        let headers = &mut parts.headers;
        strip(headers, &CLIENT_SET_FORBIDDEN);
        // ProxyPreserveHost: the upstream sees the host the client asked for. An
        // HTTP/1.1 request has it as its one `Host` already (the gate checked); an
        // HTTP/2 request has it as its authority.
        if !headers.contains_key(header::HOST) {
            headers.insert(header::HOST, ctx.host.clone());
        }
        headers.insert(X_FORWARDED_HOST, ctx.host.clone());
        headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("https"));
        if let Some(ip) = ip_value(ctx.peer.ip()) {
            headers.insert(X_FORWARDED_FOR, ip);
        }
        if let Some(creds) = &self.credentials {
            headers.insert(header::AUTHORIZATION, creds.clone());
        }
        Request::from_parts(parts, body)
    }

    /// `ProxyPassReverse`: a `Location` that points at the upstream points at the gate.
    fn rewrite_location(&self, headers: &mut HeaderMap, public_base: &str) {
        let Some(loc) = headers.get(header::LOCATION).and_then(|v| v.to_str().ok()) else {
            return;
        };
        let mut prefixes = vec![self.origin.clone()];
        if let Some(host) = self.upstream.authority.strip_suffix(":80") {
            prefixes.push(format!("http://{host}"));
        }
        for prefix in prefixes {
            if let Some(rest) = loc.strip_prefix(&prefix)
                && (rest.is_empty() || rest.starts_with('/') || rest.starts_with('?'))
            {
                if let Ok(v) = HeaderValue::from_str(&format!("{public_base}{rest}")) {
                    headers.insert(header::LOCATION, v);
                }
                return;
            }
        }
    }

    async fn forward(&self, req: Request<Body>, ctx: RequestContext) -> Response<Body> {
        let upstream_req = self.upstream_request(req, &ctx);
        // An upload is answered after its whole body; a blob may take the upstream a
        // while to start sending. Everything else should be answered at once.
        let (limit, key) = match ctx.route {
            crate::route::Route::UploadStart(_)
            | crate::route::Route::Upload(..)
            | crate::route::Route::Blob(..) => {
                (self.response_timeout, "upstream.response_timeout_secs")
            }
            _ => (self.header_timeout, "upstream.header_timeout_secs"),
        };
        let sent = tokio::time::timeout(limit, self.pool.send(upstream_req)).await;
        let resp = match sent {
            Ok(Ok(resp)) => resp,
            Ok(Err(e)) => {
                let reason = if e.is_connect() { "connect" } else { "request" };
                self.metrics
                    .upstream_errors
                    .get_or_create(&ReasonLabels { reason })
                    .inc();
                let cause = e.to_string();
                tracing::warn!(id = %ctx.id, upstream = %self.origin, "upstream request failed: {cause}");
                let what = if e.is_connect() {
                    "unreachable"
                } else {
                    "failed"
                };
                return OciError::new(
                    ErrorCode::Unavailable,
                    format!("upstream registry {} {what}: {cause}", self.origin),
                )
                .into_response();
            }
            Err(_) => {
                self.metrics
                    .upstream_errors
                    .get_or_create(&ReasonLabels { reason: "timeout" })
                    .inc();
                tracing::warn!(id = %ctx.id, upstream = %self.origin, "upstream response timed out");
                return OciError::new(
                    ErrorCode::Unavailable,
                    format!(
                        "upstream registry {} did not answer within {} s ({key})",
                        self.origin,
                        limit.as_secs()
                    ),
                )
                .with_status(StatusCode::GATEWAY_TIMEOUT)
                .into_response();
            }
        };
        let (mut parts, incoming) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        if parts.headers.contains_key(header::LOCATION) {
            self.rewrite_location(&mut parts.headers, &ctx.public_base());
        }
        Response::from_parts(parts, body::boxed(incoming))
    }
}

impl Backend for Proxy {
    fn handle(&self, req: Request<Body>, ctx: RequestContext) -> BoxFuture<'_, Response<Body>> {
        Box::pin(self.forward(req, ctx))
    }

    fn describe(&self) -> String {
        format!("proxy to {}", self.origin)
    }

    fn ready(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            // Any HTTP answer to the version check means the upstream is there.
            let mut req = Request::new(body::empty());
            *req.uri_mut() = Uri::from_static("/v2/");
            if let Ok(host) = HeaderValue::from_str(&self.upstream.authority) {
                req.headers_mut().insert(header::HOST, host);
            }
            let probe = async {
                let resp = self.pool.send(req).await?;
                // Read to the end (a few bytes of JSON): the connection is then kept for
                // the next request instead of closed.
                let body = http_body_util::Limited::new(resp.into_body(), 64 * 1024);
                let _ = http_body_util::BodyExt::collect(body).await;
                Ok::<_, crate::pool::SendError>(())
            };
            match tokio::time::timeout(Duration::from_secs(2), probe).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(format!("upstream {}: {e}", self.origin)),
                Err(_) => Err(format!(
                    "upstream {} did not answer within 2 s",
                    self.origin
                )),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_hop_by_hop_and_named() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("close, x-secret"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("content-type", HeaderValue::from_static("a/b"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("content-type"));
    }

    #[test]
    fn strips_hop_by_hop_and_the_extra_list_in_one_pass() {
        let mut h = HeaderMap::new();
        h.append("connection", HeaderValue::from_static("Keep-Alive"));
        h.append("connection", HeaderValue::from_static(" x-two ,"));
        h.insert("x-two", HeaderValue::from_static("2"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-real-ip", HeaderValue::from_static("9.9.9.9"));
        h.insert("authorization", HeaderValue::from_static("Basic Og=="));
        h.insert("user-agent", HeaderValue::from_static("docker/27"));
        h.insert("te", HeaderValue::from_static("trailers"));
        strip(&mut h, &CLIENT_SET_FORBIDDEN);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("user-agent"));
    }

    #[test]
    fn removes_every_value_of_a_listed_header_and_keeps_the_rest() {
        let mut h = HeaderMap::new();
        h.append("x-forwarded-for", HeaderValue::from_static("1.2.3.4"));
        h.append("x-forwarded-for", HeaderValue::from_static("5.6.7.8"));
        h.insert("authorization", HeaderValue::from_static("Basic Og=="));
        h.insert("accept", HeaderValue::from_static("*/*"));
        h.insert("x-real-ip", HeaderValue::from_static("9.9.9.9"));
        strip(&mut h, &CLIENT_SET_FORBIDDEN);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("accept"));
    }

    #[test]
    fn every_listed_header_and_every_connection_token_is_removed() {
        let mut h = HeaderMap::new();
        for name in CLIENT_SET_FORBIDDEN.names.iter().chain(HOP_BY_HOP.names) {
            h.insert(name.clone(), HeaderValue::from_static("1"));
        }
        h.insert("connection", HeaderValue::from_static("x-a, x-b,close"));
        h.insert("x-a", HeaderValue::from_static("1"));
        h.insert("x-b", HeaderValue::from_static("1"));
        h.insert("accept", HeaderValue::from_static("*/*"));
        strip(&mut h, &CLIENT_SET_FORBIDDEN);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("accept"));
    }

    #[test]
    fn writes_peer_addresses_as_display_does() {
        for ip in [
            "0.0.0.0",
            "1.2.3.4",
            "9.10.99.100",
            "127.0.0.1",
            "255.255.255.255",
            "10.0.200.9",
            "::1",
            "2001:db8::8a2e:370:7334",
            "::ffff:10.1.2.3",
        ] {
            let addr: std::net::IpAddr = ip.parse().expect("test address");
            let v = ip_value(addr).expect("a header value");
            assert_eq!(v.to_str().expect("ascii"), addr.to_string(), "{ip}");
        }
    }

    #[test]
    fn rewrites_upstream_locations_only() {
        let cfg = UpstreamConfig {
            url: "http://docker-local:5000".into(),
            username: None,
            password: None,
            connect_timeout_secs: 1,
            response_timeout_secs: 1,
            header_timeout_secs: 1,
            pool_idle_secs: 1,
            pool_max_idle: 1,
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("rt");
        let _guard = rt.enter();
        let p = Proxy::new(&cfg, Arc::new(Metrics::new())).expect("proxy");
        let mut h = HeaderMap::new();
        h.insert(
            "location",
            HeaderValue::from_static("http://docker-local:5000/v2/a/blobs/uploads/x?y=1"),
        );
        p.rewrite_location(&mut h, "https://reg.example:5043");
        assert_eq!(
            h["location"],
            "https://reg.example:5043/v2/a/blobs/uploads/x?y=1"
        );
        let mut h = HeaderMap::new();
        h.insert(
            "location",
            HeaderValue::from_static("http://docker-local:50001/v2/"),
        );
        p.rewrite_location(&mut h, "https://reg.example:5043");
        assert_eq!(h["location"], "http://docker-local:50001/v2/");
        let mut h = HeaderMap::new();
        h.insert(
            "location",
            HeaderValue::from_static("/v2/a/blobs/uploads/x"),
        );
        p.rewrite_location(&mut h, "https://reg.example:5043");
        assert_eq!(h["location"], "/v2/a/blobs/uploads/x");
    }
}
