//! `[[immutable]]` at the gate, so it holds for the built-in registry and for an
//! upstream alike: a manifest PUT to an immutable tag that already points at another
//! digest, a DELETE of such a tag, and a DELETE of a manifest such a tag points at,
//! are refused with `DENIED` naming the rule. What a tag points at is asked of the
//! backend (a `HEAD`), the same way a client would.
//!
//! Two pushes of different digests to a new immutable tag at the same instant can
//! both pass (the check and the write are two steps); the later one wins, as it would
//! without the rule.

use std::time::Duration;

use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};

use super::rules::Lifecycle;
use crate::backend::{Backend, RequestContext};
use crate::body::{self, Body};
use crate::error::{ErrorCode, OciError};
use crate::registry::manifests::{
    DOCKER_LIST, DOCKER_MANIFEST, MAX_MANIFEST_BYTES, OCI_INDEX, OCI_MANIFEST,
};
use crate::route::{Digest, Reference, RepoName, Route};

/// What a manifest `HEAD` accepts: every manifest type.
pub const MANIFEST_ACCEPT: [&str; 4] = [OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST];

/// Most pages of a tag list read when looking for the tags on a digest.
const MAX_TAG_PAGES: usize = 100;

fn denied(ctx: &RequestContext, repo: &RepoName, message: String) -> Response<Body> {
    tracing::warn!(
        target: "registry_gate::audit",
        id = %ctx.id,
        user = ctx.identity.log_name(),
        peer = %ctx.peer,
        repository = %repo,
        "refused: {message}"
    );
    OciError::new(ErrorCode::Denied, message).into_response()
}

fn unavailable(message: String) -> Response<Body> {
    OciError::new(ErrorCode::Unavailable, message)
        .with_status(StatusCode::SERVICE_UNAVAILABLE)
        .into_response()
}

/// A request of the gate's own to the backend (a `HEAD` of a tag, a tag list page).
fn sub_request(
    method: Method,
    path: &str,
    route: Route,
    ctx: &RequestContext,
) -> (Request<Body>, RequestContext) {
    let mut req = Request::new(body::empty());
    *req.method_mut() = method;
    *req.uri_mut() = path.parse().unwrap_or_default();
    let accept = MANIFEST_ACCEPT.join(", ");
    if let Ok(v) = HeaderValue::from_str(&accept) {
        req.headers_mut().insert(header::ACCEPT, v);
    }
    let sub = RequestContext {
        route,
        ..ctx.clone()
    };
    (req, sub)
}

/// The digest `tag` points at now; `Ok(None)` when the backend has no such tag.
pub async fn tag_digest(
    backend: &dyn Backend,
    ctx: &RequestContext,
    repo: &RepoName,
    tag: &str,
) -> Result<Option<String>, Response<Body>> {
    let Ok(reference) = Reference::parse(tag) else {
        return Ok(None);
    };
    let (req, sub) = sub_request(
        Method::HEAD,
        &format!("/v2/{repo}/manifests/{tag}"),
        Route::Manifest(repo.clone(), reference),
        ctx,
    );
    let resp = backend.handle(req, sub).await;
    match resp.status() {
        StatusCode::OK => Ok(resp
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)),
        StatusCode::NOT_FOUND => Ok(None),
        other => Err(unavailable(format!(
            "cannot check the immutable tag {repo}:{tag}: the registry answered {other}"
        ))),
    }
}

/// The tags of `repo` (following `Link` pages); `Ok(empty)` when it has none.
async fn tags(
    backend: &dyn Backend,
    ctx: &RequestContext,
    repo: &RepoName,
) -> Result<Vec<String>, Response<Body>> {
    let mut out = Vec::new();
    let mut path = format!("/v2/{repo}/tags/list?n=1000");
    for _ in 0..MAX_TAG_PAGES {
        let (req, sub) = sub_request(Method::GET, &path, Route::Tags(repo.clone()), ctx);
        let resp = backend.handle(req, sub).await;
        if resp.status() == StatusCode::NOT_FOUND {
            return Ok(out);
        }
        if resp.status() != StatusCode::OK {
            return Err(unavailable(format!(
                "cannot list the tags of {repo} to check immutable tags: {}",
                resp.status()
            )));
        }
        let next = resp
            .headers()
            .get(header::LINK)
            .and_then(|v| v.to_str().ok())
            .and_then(next_link);
        let page = body::collect_limited(resp.into_body(), 16 * 1024 * 1024)
            .await
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .ok_or_else(|| unavailable(format!("unreadable tag list of {repo}")))?;
        out.extend(
            page["tags"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|t| t.as_str().map(str::to_owned)),
        );
        match next {
            // Only the path and query of the next page: it is asked of the backend.
            Some(n) => path = n,
            None => return Ok(out),
        }
    }
    Ok(out)
}

/// The path and query of a `Link: <...>; rel="next"` header.
pub fn next_link(link: &str) -> Option<String> {
    link.split(',').find_map(|part| {
        let (target, params) = part.split_once(';')?;
        if !params.contains("rel=\"next\"") && !params.contains("rel=next") {
            return None;
        }
        let target = target.trim().strip_prefix('<')?.strip_suffix('>')?;
        let path = match target.find("/v2/") {
            Some(i) => &target[i..],
            None => return None,
        };
        Some(path.to_owned())
    })
}

fn rule_text(life: &Lifecycle, n: usize) -> String {
    let rule = &life.immutable[n - 1];
    format!(
        "[[immutable]] rule {n} (repositories {}, tags {})",
        rule.repositories.join(", "),
        rule.tags.join(", ")
    )
}

/// Let `req` through, or refuse it for an immutable tag. A manifest PUT to an
/// immutable tag is read here (it is small) to learn its digest.
pub async fn check(
    life: &Lifecycle,
    backend: &dyn Backend,
    req: Request<Body>,
    ctx: &RequestContext,
) -> Result<Request<Body>, Response<Body>> {
    let Route::Manifest(repo, reference) = &ctx.route else {
        return Ok(req);
    };
    match (req.method().clone(), reference) {
        (Method::PUT, Reference::Tag(tag)) => {
            let Some(n) = life.immutable_rule(repo.as_str(), tag) else {
                return Ok(req);
            };
            let (parts, body) = req.into_parts();
            let bytes = match tokio::time::timeout(
                Duration::from_secs(60),
                body::collect_limited(body, MAX_MANIFEST_BYTES),
            )
            .await
            {
                Ok(Ok(b)) => b,
                Ok(Err(e)) => {
                    return Err(OciError::new(
                        ErrorCode::ManifestInvalid,
                        format!("cannot read the manifest: {e}"),
                    )
                    .into_response());
                }
                Err(_) => {
                    return Err(OciError::new(
                        ErrorCode::ManifestInvalid,
                        "the manifest did not arrive within 60 s",
                    )
                    .into_response());
                }
            };
            let pushed = crate::registry::digest::of_bytes("sha256", &bytes).unwrap_or_default();
            if let Some(now) = tag_digest(backend, ctx, repo, tag).await?
                && now != pushed
            {
                return Err(denied(
                    ctx,
                    repo,
                    format!(
                        "tag {repo}:{tag} is immutable by {}: it is {now}, a push of {pushed} \
                         may not move it",
                        rule_text(life, n)
                    ),
                ));
            }
            Ok(Request::from_parts(parts, body::full(bytes)))
        }
        (Method::DELETE, Reference::Tag(tag)) => match life.immutable_rule(repo.as_str(), tag) {
            Some(n) => Err(denied(
                ctx,
                repo,
                format!(
                    "tag {repo}:{tag} is immutable by {}: it cannot be deleted",
                    rule_text(life, n)
                ),
            )),
            None => Ok(req),
        },
        (Method::DELETE, Reference::Digest(d)) if life.has_immutable(repo.as_str()) => {
            match immutable_tag_on(life, backend, ctx, repo, d).await? {
                Some((tag, n)) => Err(denied(
                    ctx,
                    repo,
                    format!(
                        "manifest {d} is tagged {repo}:{tag}, immutable by {}: it cannot be \
                         deleted",
                        rule_text(life, n)
                    ),
                )),
                None => Ok(req),
            }
        }
        _ => Ok(req),
    }
}

/// An immutable tag of `repo` pointing at `d`, with its rule.
async fn immutable_tag_on(
    life: &Lifecycle,
    backend: &dyn Backend,
    ctx: &RequestContext,
    repo: &RepoName,
    d: &Digest,
) -> Result<Option<(String, usize)>, Response<Body>> {
    for tag in tags(backend, ctx, repo).await? {
        let Some(n) = life.immutable_rule(repo.as_str(), &tag) else {
            continue;
        };
        if tag_digest(backend, ctx, repo, &tag).await?.as_deref() == Some(d.as_str()) {
            return Ok(Some((tag, n)));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_links() {
        assert_eq!(
            next_link("</v2/a/tags/list?last=x&n=2>; rel=\"next\"").as_deref(),
            Some("/v2/a/tags/list?last=x&n=2")
        );
        assert_eq!(
            next_link("<https://h:1/v2/_catalog?last=b&n=1>; rel=\"next\"").as_deref(),
            Some("/v2/_catalog?last=b&n=1")
        );
        assert_eq!(next_link("</v2/a>; rel=\"prev\""), None);
    }
}
