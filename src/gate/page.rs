//! `GET /`: a small HTML page for people — the repositories anonymous callers may pull,
//! their tags, and the `docker pull` command for each — so the "look in a browser" habit
//! gets a page instead of raw JSON. No JavaScript, no external assets, a strict
//! Content-Security-Policy (the one inline style is allowed by its hash).
//!
//! The page asks the backend for the catalog and tags as an anonymous caller would, so
//! it shows exactly what the pull policy lets anybody see, a page of repositories at a
//! time (`/?last=NAME` continues after NAME).

use std::net::SocketAddr;
use std::sync::OnceLock;

use base64::Engine;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use serde_json::Value;
use sha2::Digest as _;

use super::{Gate, Origin};
use crate::auth::Identity;
use crate::body::{self, Body};
use crate::route::{RepoName, Route};

/// Repositories per page.
const PER_PAGE: usize = 50;
/// Tags shown per repository.
const TAGS_SHOWN: usize = 100;
/// Largest catalog or tags answer read.
const MAX_JSON: usize = 4 * 1024 * 1024;

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:2rem auto;max-width:60rem;padding:0 1rem;color:#222}\
h1{font-size:1.4rem}h2{font-size:1.1rem;margin:1.5rem 0 .3rem}code{background:#f3f3f3;padding:.1rem .3rem;border-radius:3px}\
ul{margin:.2rem 0;padding-left:1.2rem}li{margin:.15rem 0}.none{color:#777}nav{margin-top:2rem}";

fn csp() -> &'static str {
    static CSP: OnceLock<String> = OnceLock::new();
    CSP.get_or_init(|| {
        let hash = base64::engine::general_purpose::STANDARD
            .encode(sha2::Sha256::digest(STYLE.as_bytes()));
        format!(
            "default-src 'none'; style-src 'sha256-{hash}'; img-src 'none'; base-uri 'none'; \
             form-action 'none'; frame-ancestors 'none'"
        )
    })
}

/// HTML-escape text for element content and attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Ask the backend for a JSON document at `path`, as an anonymous caller.
async fn fetch(
    gate: &Gate,
    path: &str,
    route: Route,
    peer: SocketAddr,
    origin: &Origin<'_>,
) -> Option<(Value, bool)> {
    let mut req = Request::new(body::empty());
    *req.method_mut() = Method::GET;
    *req.uri_mut() = path.parse().ok()?;
    req.headers_mut().insert(header::HOST, origin.host.clone());
    let ctx = origin.context(
        crate::backend::RequestId::random(),
        peer,
        Identity::Anonymous,
        route,
    );
    let resp = gate.backend.handle(req, ctx).await;
    if resp.status() != StatusCode::OK {
        return None;
    }
    let more = resp.headers().contains_key(header::LINK);
    let bytes = body::collect_limited(resp.into_body(), MAX_JSON)
        .await
        .ok()?;
    Some((serde_json::from_slice(&bytes).ok()?, more))
}

pub(super) async fn serve(
    gate: &Gate,
    req: &Request<()>,
    peer: SocketAddr,
    origin: &Origin<'_>,
) -> Response<Body> {
    let last = req.uri().query().and_then(|q| {
        form_urlencoded::parse(q.as_bytes())
            .find(|(k, _)| k == "last")
            .map(|(_, v)| v.into_owned())
    });
    let mut catalog_path = format!("/v2/_catalog?n={PER_PAGE}");
    if let Some(l) = &last {
        let encoded: String = form_urlencoded::byte_serialize(l.as_bytes()).collect();
        catalog_path.push_str(&format!("&last={encoded}"));
    }
    let host = origin.public_host().to_owned();
    let may_list = gate.allows(
        &Identity::Anonymous,
        crate::auth::policy::Action::Pull,
        &Route::Catalog,
    );
    let (repos, more) = match may_list {
        true => match fetch(gate, &catalog_path, Route::Catalog, peer, origin).await {
            Some((json, more)) => (
                json.get("repositories")
                    .and_then(Value::as_array)
                    .map(|a| {
                        a.iter()
                            .filter_map(Value::as_str)
                            .map(str::to_owned)
                            .collect::<Vec<_>>()
                    })
                    .unwrap_or_default(),
                more,
            ),
            None => (Vec::new(), false),
        },
        false => (Vec::new(), false),
    };

    let mut html = format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{h} — container registry</title><style>{STYLE}</style></head><body>\n\
         <h1>Container registry <code>{h}</code></h1>\n",
        h = escape(&host)
    );
    let mut shown = 0;
    let mut last_name = None;
    for name in &repos {
        let Ok(repo) = RepoName::parse(name) else {
            continue;
        };
        last_name = Some(name.clone());
        if !gate.may_pull_listed(&Identity::Anonymous, &repo) {
            continue;
        }
        shown += 1;
        let tags_path = format!("/v2/{repo}/tags/list?n={TAGS_SHOWN}");
        let tags: Vec<String> = fetch(gate, &tags_path, Route::Tags(repo.clone()), peer, origin)
            .await
            .and_then(|(j, _)| j.get("tags").and_then(Value::as_array).cloned())
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        html.push_str(&format!("<h2 id=\"{r}\">{r}</h2>\n", r = escape(name)));
        if tags.is_empty() {
            html.push_str("<p class=\"none\">no tags</p>\n");
            continue;
        }
        html.push_str("<ul>\n");
        for tag in &tags {
            html.push_str(&format!(
                "<li><code>docker pull {}/{}:{}</code></li>\n",
                escape(&host),
                escape(name),
                escape(tag)
            ));
        }
        html.push_str("</ul>\n");
    }
    if shown == 0 {
        html.push_str("<p class=\"none\">No repositories to show.</p>\n");
    }
    if let (true, Some(l)) = (more, last_name) {
        let encoded: String = form_urlencoded::byte_serialize(l.as_bytes()).collect();
        html.push_str(&format!(
            "<nav><a href=\"/?last={}\">Next page</a></nav>\n",
            escape(&encoded)
        ));
    }
    html.push_str("</body></html>\n");

    let len = html.len();
    let mut resp = Response::new(if req.method() == Method::HEAD {
        body::empty()
    } else {
        body::full(html)
    });
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    if let Ok(v) = HeaderValue::from_str(csp()) {
        h.insert(header::CONTENT_SECURITY_POLICY, v);
    }
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup() {
        assert_eq!(
            escape("<a href=\"x\">&'"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
    }

    #[test]
    fn csp_allows_only_the_inline_style() {
        let c = csp();
        assert!(
            c.starts_with("default-src 'none'; style-src 'sha256-"),
            "{c}"
        );
        assert!(!c.contains("unsafe"), "{c}");
    }
}
