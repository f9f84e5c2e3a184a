//! Discovery (spec: "Listing tags", "Listing referrers"; distribution's catalog):
//!
//! ```text
//! GET /v2/<name>/tags/list?n=N&last=L          → {"name","tags"}, Link rel="next"
//! GET /v2/_catalog?n=N&last=L                  → {"repositories"}, Link rel="next"
//! GET /v2/<name>/referrers/<digest>?artifactType=T → OCI index of manifests whose
//!                                                 subject is <digest>
//! ```
//!
//! Lists are in lexical order; `n` pages them, with a `Link` to the next page.

use http::header::{self, HeaderValue};
use http::{Request, StatusCode};
use serde_json::Value;

use super::manifests::{MAX_MANIFEST_BYTES, OCI_INDEX, media_type_of};
use super::{Failure, Handled, Registry, header_value, json_response, query_param};
use crate::body::Body;
use crate::error::{ErrorCode, OciError};
use crate::route::{Digest, RepoName};

/// Page size when the client gives none (and the largest it may ask for).
const MAX_PAGE: usize = 10_000;

/// Apply `last` and `n` to a sorted list; returns the page and whether more follow.
fn page(
    items: Vec<String>,
    req: &Request<Body>,
) -> Result<(Vec<String>, Option<usize>, bool), Failure> {
    let n = match query_param(req, "n") {
        None => None,
        Some(v) => Some(
            v.parse::<usize>()
                .map_err(|_| {
                    Failure::from(
                        OciError::new(ErrorCode::Unsupported, "n must be a number")
                            .with_status(StatusCode::BAD_REQUEST),
                    )
                })?
                .min(MAX_PAGE),
        ),
    };
    let last = query_param(req, "last");
    let mut rest: Vec<String> = match &last {
        Some(l) => items
            .into_iter()
            .filter(|i| i.as_str() > l.as_str())
            .collect(),
        None => items,
    };
    let limit = n.unwrap_or(MAX_PAGE);
    // `n=0` asks for an empty page; a next link would point at the same page again.
    let more = limit > 0 && rest.len() > limit;
    rest.truncate(limit);
    Ok((rest, n, more))
}

fn link_next(path: &str, n: Option<usize>, last: Option<&String>) -> Result<HeaderValue, Failure> {
    let mut q = form_urlencoded::Serializer::new(String::new());
    if let Some(n) = n {
        q.append_pair("n", &n.to_string());
    }
    if let Some(l) = last {
        q.append_pair("last", l);
    }
    header_value(&format!("<{path}?{}>; rel=\"next\"", q.finish()))
}

pub async fn tags(reg: &Registry, repo: &RepoName, req: &Request<Body>) -> Handled {
    let Some(all) = reg.store.list_tags(repo).await? else {
        return Err(OciError::new(
            ErrorCode::NameUnknown,
            format!("repository {repo} is not known"),
        )
        .with_detail(serde_json::json!({ "name": repo.as_str() }))
        .into());
    };
    let (tags, n, more) = page(all, req)?;
    let json = serde_json::json!({ "name": repo.as_str(), "tags": tags }).to_string();
    let mut resp = json_response(StatusCode::OK, json);
    if more {
        let link = link_next(&format!("/v2/{repo}/tags/list"), n, tags.last())?;
        resp.headers_mut().insert(header::LINK, link);
    }
    Ok(resp)
}

pub async fn catalog(reg: &Registry, req: &Request<Body>) -> Handled {
    let all = reg.store.listed_repositories().await?;
    let (repos, n, more) = page(all, req)?;
    let json = serde_json::json!({ "repositories": repos }).to_string();
    let mut resp = json_response(StatusCode::OK, json);
    if more {
        let link = link_next("/v2/_catalog", n, repos.last())?;
        resp.headers_mut().insert(header::LINK, link);
    }
    Ok(resp)
}

pub async fn referrers(
    reg: &Registry,
    repo: &RepoName,
    subject: &Digest,
    req: &Request<Body>,
) -> Handled {
    let filter = query_param(req, "artifactType");
    use futures_util::{StreamExt, TryStreamExt};
    let store = &reg.store;
    let revisions = store.list_revisions(repo).await?;
    // Manifest content comes from memory once read; a cold listing reads several at
    // a time.
    let contents: Vec<(Digest, Option<bytes::Bytes>)> =
        futures_util::stream::iter(revisions.into_iter().map(|(d, _)| {
            let store = store.clone();
            async move {
                let bytes = store.manifest_content(&d).await?;
                Ok::<_, Failure>((d, bytes))
            }
        }))
        .buffered(16)
        .try_collect()
        .await?;
    let mut found = Vec::new();
    for (d, bytes) in contents {
        let Some(bytes) = bytes.filter(|b| b.len() <= MAX_MANIFEST_BYTES) else {
            continue;
        };
        let Ok(json) = serde_json::from_slice::<Value>(&bytes) else {
            continue;
        };
        let points_here = json
            .get("subject")
            .and_then(|s| s.get("digest"))
            .and_then(Value::as_str)
            == Some(subject.as_str());
        if !points_here {
            continue;
        }
        // artifactType, else (image manifests) the config's media type.
        let artifact_type = json
            .get("artifactType")
            .and_then(Value::as_str)
            .or_else(|| {
                json.get("config")
                    .and_then(|c| c.get("mediaType"))
                    .and_then(Value::as_str)
            })
            .map(str::to_owned);
        let mut desc = serde_json::json!({
            "mediaType": media_type_of(&json),
            "digest": d.as_str(),
            "size": bytes.len(),
        });
        if let (Some(at), Some(map)) = (&artifact_type, desc.as_object_mut()) {
            map.insert("artifactType".into(), Value::String(at.clone()));
        }
        if let (Some(ann), Some(map)) = (json.get("annotations"), desc.as_object_mut()) {
            map.insert("annotations".into(), ann.clone());
        }
        found.push((artifact_type, desc));
    }
    let manifests: Vec<Value> = found
        .into_iter()
        .filter(|(at, _)| {
            filter
                .as_ref()
                .is_none_or(|f| at.as_deref() == Some(f.as_str()))
        })
        .map(|(_, d)| d)
        .collect();
    let json = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": manifests,
    })
    .to_string();
    let mut resp = json_response(StatusCode::OK, json);
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(OCI_INDEX));
    if filter.is_some() {
        h.insert(
            "oci-filters-applied",
            HeaderValue::from_static("artifactType"),
        );
    }
    Ok(resp)
}
