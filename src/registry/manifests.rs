//! Manifests (spec: "Pulling manifests", "Pushing manifests", "Deleting manifests"):
//!
//! ```text
//! GET|HEAD /v2/<name>/manifests/<reference>   → 200 Content-Type from the manifest,
//!                                               Docker-Content-Digest, Content-Length
//! PUT      /v2/<name>/manifests/<reference>   → 201 Location, Docker-Content-Digest
//!                                               (+ OCI-Subject when it has a subject)
//! DELETE   /v2/<name>/manifests/<digest|tag>  → 202
//! ```
//!
//! A PUT is read whole (at most 4 MiB, like distribution), parsed, and checked: its
//! media type, its descriptors, and that every blob it names (config, layers) and, for
//! an index, every child manifest is already in the repository.

use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use serde_json::Value;

use super::{Failure, Handled, Registry, empty_response, header_value};
use super::{claims, digest};
use crate::backend::RequestContext;
use crate::body::{self, Body};
use crate::error::{ErrorCode, OciError};
use crate::route::{Digest, Reference, RepoName};

/// Largest manifest accepted.
pub const MAX_MANIFEST_BYTES: usize = 4 * 1024 * 1024;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const DOCKER_SCHEMA1_SIGNED: &str = "application/vnd.docker.distribution.manifest.v1+prettyjws";

fn invalid(message: impl Into<String>) -> Failure {
    OciError::new(ErrorCode::ManifestInvalid, message).into()
}

fn unknown(repo: &RepoName, r: &Reference) -> Failure {
    OciError::new(
        ErrorCode::ManifestUnknown,
        format!("manifest {r} is not in {repo}"),
    )
    .with_detail(serde_json::json!({ "name": repo.as_str(), "reference": r.to_string() }))
    .into()
}

/// The media type a stored manifest is served with: its `mediaType`, or what its shape
/// says when it has none (OCI allows leaving it out).
pub fn media_type_of(json: &Value) -> &str {
    if let Some(mt) = json.get("mediaType").and_then(Value::as_str) {
        return mt;
    }
    if json.get("schemaVersion").and_then(Value::as_u64) == Some(1) {
        return DOCKER_SCHEMA1_SIGNED;
    }
    if json.get("manifests").is_some() {
        OCI_INDEX
    } else {
        OCI_MANIFEST
    }
}

/// A manifest served recently, valid while the link it was resolved through (tag
/// `current/link`, or the revision link for a digest) is the same version of it.
#[derive(Clone)]
struct Cached {
    link: String,
    /// For a tag: the version of its push record (`None`: there is none).
    pushed: Option<String>,
    /// For a tag: when it was pushed, as `Last-Modified`.
    last_modified: Option<HeaderValue>,
    digest: Digest,
    bytes: bytes::Bytes,
    media_type: HeaderValue,
}

/// Most manifests remembered; past that the cache starts over.
const CACHE_ENTRIES: usize = 4096;

/// Recently served manifests, so a pull of a hot tag costs one `HEAD` of its link
/// (a `stat` on disk) instead of several reads and a JSON parse. Writers need not tell
/// it anything, on this gate or another: every change rewrites or removes the link,
/// which gives it a new version.
#[derive(Default)]
pub struct ManifestCache {
    map: std::sync::Mutex<std::collections::HashMap<(String, String), Cached>>,
}

impl ManifestCache {
    fn get(&self, key: &(String, String)) -> Option<Cached> {
        match self.map.lock() {
            Ok(m) => m.get(key).cloned(),
            Err(p) => p.into_inner().get(key).cloned(),
        }
    }

    fn put(&self, key: (String, String), value: Cached) {
        let mut map = match self.map.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        if map.len() >= CACHE_ENTRIES {
            map.clear();
        }
        map.insert(key, value);
    }
}

/// Resolve a reference to a manifest of `repo`: the link's version, the digest and
/// the content.
async fn resolve(
    reg: &Registry,
    repo: &RepoName,
    r: &Reference,
) -> Result<Option<(String, Digest, bytes::Bytes)>, Failure> {
    let store = &reg.store;
    let link = store.reference_link(repo, r);
    let Some((text, meta)) = store.storage().read(&link, 1024).await? else {
        return Ok(None);
    };
    let Some(d) = std::str::from_utf8(&text)
        .ok()
        .and_then(|t| Digest::parse(t.trim()).ok())
    else {
        return Ok(None);
    };
    match r {
        Reference::Tag(_) if !store.revision_exists(repo, &d).await? => return Ok(None),
        Reference::Digest(want) if *want != d => return Ok(None),
        _ => {}
    }
    Ok(store
        .manifest_content(&d)
        .await?
        .map(|bytes| (meta.version, d, bytes)))
}

/// The versions a cached answer depends on: the link, and for a tag its push record.
async fn versions(
    reg: &Registry,
    repo: &RepoName,
    r: &Reference,
) -> Result<(Option<String>, Option<String>), Failure> {
    let link = reg.store.reference_link(repo, r);
    let storage = reg.store.storage();
    Ok(match r {
        Reference::Tag(t) => {
            let pushed = reg.store.layout().tag_pushed(repo, t);
            let (link, pushed) = tokio::join!(storage.head(&link), storage.head(&pushed));
            (link?.map(|m| m.version), pushed?.map(|m| m.version))
        }
        Reference::Digest(_) => (storage.head(&link).await?.map(|m| m.version), None),
    })
}

pub async fn get(reg: &Registry, repo: &RepoName, r: &Reference, head: bool) -> Handled {
    let key = (repo.as_str().to_owned(), r.to_string());
    let cached = match reg.manifests.get(&key) {
        Some(c) => {
            let (link, pushed) = versions(reg, repo, r).await?;
            (link.as_ref() == Some(&c.link) && pushed == c.pushed).then_some(c)
        }
        None => None,
    };
    let cached = match cached {
        Some(c) => c,
        None => {
            let Some((link, d, bytes)) = resolve(reg, repo, r).await? else {
                return Err(unknown(repo, r));
            };
            let media_type = serde_json::from_slice::<Value>(&bytes)
                .map(|v| media_type_of(&v).to_owned())
                .unwrap_or_else(|_| OCI_MANIFEST.to_owned());
            let (pushed, last_modified) = match r {
                Reference::Tag(t) => {
                    let (_, pushed) = versions(reg, repo, r).await?;
                    let at = reg.store.tag_pushed(repo, t).await?.map(|(_, at)| at);
                    (
                        pushed,
                        at.map(|at| header_value(&httpdate::fmt_http_date(at)))
                            .transpose()?,
                    )
                }
                Reference::Digest(_) => (None, None),
            };
            let c = Cached {
                link,
                pushed,
                last_modified,
                digest: d,
                bytes,
                media_type: header_value(&media_type)?,
            };
            reg.manifests.put(key, c.clone());
            c
        }
    };
    let len = cached.bytes.len();
    let mut resp = if head {
        empty_response(StatusCode::OK)
    } else {
        Response::new(body::full(cached.bytes))
    };
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, cached.media_type);
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    h.insert(
        "docker-content-digest",
        header_value(cached.digest.as_str())?,
    );
    h.insert(
        header::ETAG,
        header_value(&format!("\"{}\"", cached.digest))?,
    );
    if let Some(at) = cached.last_modified {
        h.insert(header::LAST_MODIFIED, at);
    }
    Ok(resp)
}

/// A descriptor's digest, checked.
fn descriptor_digest(desc: &Value, what: &str) -> Result<Digest, Failure> {
    let d = desc
        .get("digest")
        .and_then(Value::as_str)
        .ok_or_else(|| invalid(format!("{what}: descriptor without a digest")))?;
    let d = Digest::parse(d).map_err(|e| invalid(format!("{what}: {e}")))?;
    if !matches!(d.algorithm(), "sha256" | "sha512") {
        return Err(invalid(format!(
            "{what}: unsupported digest algorithm {}",
            d.algorithm()
        )));
    }
    if desc.get("size").is_none_or(|s| s.as_u64().is_none()) {
        return Err(invalid(format!("{what}: descriptor without a valid size")));
    }
    if !desc.get("mediaType").is_none_or(Value::is_string) {
        return Err(invalid(format!("{what}: mediaType must be a string")));
    }
    Ok(d)
}

/// What a manifest needs to be present in its repository before it may be stored.
pub(super) struct References {
    blobs: Vec<Digest>,
    manifests: Vec<Digest>,
    subject: Option<Digest>,
}

/// Check a manifest's JSON against its media type; return what it references.
pub(super) fn validate(json: &Value, content_type: &str) -> Result<References, Failure> {
    if !json.is_object() {
        return Err(invalid("a manifest is a JSON object"));
    }
    if json.get("schemaVersion").and_then(Value::as_u64) != Some(2) {
        return Err(invalid("schemaVersion must be 2"));
    }
    if let Some(mt) = json.get("mediaType")
        && mt.as_str() != Some(content_type)
    {
        return Err(invalid(format!(
            "mediaType {mt} does not match Content-Type {content_type}"
        )));
    }
    let mut refs = References {
        blobs: Vec::new(),
        manifests: Vec::new(),
        subject: None,
    };
    match content_type {
        OCI_MANIFEST | DOCKER_MANIFEST => {
            let config = json
                .get("config")
                .ok_or_else(|| invalid("an image manifest needs a config descriptor"))?;
            refs.blobs.push(descriptor_digest(config, "config")?);
            let layers = json
                .get("layers")
                .and_then(Value::as_array)
                .ok_or_else(|| invalid("an image manifest needs a layers array"))?;
            for (i, layer) in layers.iter().enumerate() {
                let d = descriptor_digest(layer, &format!("layers[{i}]"))?;
                // Foreign (non-distributable) layers live elsewhere, at their `urls`.
                let foreign = layer
                    .get("urls")
                    .and_then(Value::as_array)
                    .is_some_and(|u| !u.is_empty());
                if !foreign {
                    refs.blobs.push(d);
                }
            }
        }
        OCI_INDEX | DOCKER_LIST => {
            let manifests = json
                .get("manifests")
                .and_then(Value::as_array)
                .ok_or_else(|| invalid("an index needs a manifests array"))?;
            for (i, m) in manifests.iter().enumerate() {
                refs.manifests
                    .push(descriptor_digest(m, &format!("manifests[{i}]"))?);
            }
        }
        other => {
            return Err(invalid(format!(
                "unsupported manifest media type {other:?}; use {OCI_MANIFEST}, {OCI_INDEX}, \
                 {DOCKER_MANIFEST} or {DOCKER_LIST}"
            )));
        }
    }
    if let Some(subject) = json.get("subject") {
        refs.subject = Some(descriptor_digest(subject, "subject")?);
    }
    if let Some(at) = json.get("artifactType")
        && !at.is_string()
    {
        return Err(invalid("artifactType must be a string"));
    }
    Ok(refs)
}

pub async fn put(
    reg: &Registry,
    repo: &RepoName,
    r: &Reference,
    req: Request<Body>,
    ctx: &RequestContext,
) -> Handled {
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.split(';').next().unwrap_or(v).trim().to_owned())
        .ok_or_else(|| invalid("a manifest PUT needs a Content-Type"))?;
    let bytes = match body::collect_limited(req.into_body(), MAX_MANIFEST_BYTES).await {
        Ok(b) => b,
        Err(e) => {
            let too_big = e.to_string().contains("longer than");
            let err = OciError::new(
                ErrorCode::ManifestInvalid,
                if too_big {
                    format!("manifests are limited to {MAX_MANIFEST_BYTES} bytes")
                } else {
                    format!("cannot read the manifest: {e}")
                },
            );
            return Err(if too_big {
                err.with_status(StatusCode::PAYLOAD_TOO_LARGE).into()
            } else {
                err.into()
            });
        }
    };
    let json: Value =
        serde_json::from_slice(&bytes).map_err(|e| invalid(format!("not JSON: {e}")))?;
    let refs = validate(&json, &content_type)?;
    let algorithm = match r {
        Reference::Digest(d) => d.algorithm().to_owned(),
        Reference::Tag(_) => "sha256".to_owned(),
    };
    let computed = digest::of_bytes(&algorithm, &bytes).ok_or_else(|| {
        Failure::from(OciError::new(
            ErrorCode::DigestInvalid,
            format!("unsupported digest algorithm {algorithm}"),
        ))
    })?;
    if let Reference::Digest(d) = r
        && d.as_str() != computed
    {
        return Err(OciError::new(
            ErrorCode::DigestInvalid,
            format!("the manifest is {computed}, not {d}"),
        )
        .into());
    }
    let d = Digest::parse(&computed)
        .map_err(|e| Failure::from(OciError::new(ErrorCode::DigestInvalid, e.to_string())))?;
    let tag = match r {
        Reference::Tag(t) => Some(t.clone()),
        Reference::Digest(_) => None,
    };
    // Claim what the manifest references before checking that it is there, so a
    // garbage collection under way either keeps it or has deleted it already (and
    // the PUT fails cleanly); see `claims`.
    let mut claimed: Vec<Digest> = vec![d.clone()];
    claimed.extend(refs.blobs.iter().cloned());
    claimed.extend(refs.manifests.iter().cloned());
    let claim = claims::claim(&reg.store, &claimed).await?;
    let store = &reg.store;
    let blobs = futures_util::future::try_join_all(
        refs.blobs
            .iter()
            .map(|b| async move { Ok::<_, Failure>((b, store.layer_linked(repo, b).await?)) }),
    );
    let children = futures_util::future::try_join_all(
        refs.manifests
            .iter()
            .map(|m| async move { Ok::<_, Failure>((m, store.revision_exists(repo, m).await?)) }),
    );
    let (blobs, children) = tokio::try_join!(blobs, children)?;
    let missing = blobs
        .into_iter()
        .chain(children)
        .find(|(_, there)| !there)
        .map(|(m, _)| m.clone());
    if missing.is_none() {
        claim.check_fresh(store)?;
        store.put_manifest(repo, &d, bytes, tag.as_deref()).await?;
    }
    claim.done(store).await?;
    if let Some(m) = missing {
        return Err(OciError::new(
            ErrorCode::ManifestBlobUnknown,
            format!("{m} is referenced by the manifest but not in {repo}"),
        )
        .with_detail(serde_json::json!({ "digest": m.as_str() }))
        .into());
    }
    let mut resp = empty_response(StatusCode::CREATED);
    let h = resp.headers_mut();
    h.insert(
        header::LOCATION,
        header_value(&format!("{}/v2/{repo}/manifests/{d}", ctx.public_base()))?,
    );
    h.insert("docker-content-digest", header_value(d.as_str())?);
    if let Some(subject) = &refs.subject {
        h.insert("oci-subject", header_value(subject.as_str())?);
    }
    Ok(resp)
}

pub async fn delete(reg: &Registry, repo: &RepoName, r: &Reference) -> Handled {
    reg.deletes_enabled()?;
    let deleted = match r {
        Reference::Digest(d) => reg.store.delete_manifest(repo, d).await?.is_some(),
        Reference::Tag(t) => reg.store.delete_tag(repo, t).await?,
    };
    if !deleted {
        return Err(unknown(repo, r));
    }
    Ok(empty_response(StatusCode::ACCEPTED))
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn desc(mt: &str) -> Value {
        serde_json::json!({"mediaType": mt, "digest": D, "size": 3})
    }

    #[test]
    fn validation() {
        let image = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": desc("application/vnd.oci.image.config.v1+json"),
            "layers": [desc("application/vnd.oci.image.layer.v1.tar"),
                       {"mediaType": "x", "digest": D, "size": 1, "urls": ["https://x"]}],
            "subject": desc(OCI_MANIFEST),
        });
        let refs = validate(&image, OCI_MANIFEST).expect("valid");
        assert_eq!(refs.blobs.len(), 2, "config + one distributable layer");
        assert!(refs.subject.is_some());
        assert!(
            validate(&image, DOCKER_MANIFEST).is_err(),
            "mediaType mismatch"
        );
        let index = serde_json::json!({"schemaVersion": 2, "manifests": [desc(OCI_MANIFEST)]});
        assert_eq!(
            validate(&index, OCI_INDEX).expect("valid").manifests.len(),
            1
        );
        for bad in [
            serde_json::json!({"schemaVersion": 1}),
            serde_json::json!({"schemaVersion": 2, "layers": []}),
            serde_json::json!({"schemaVersion": 2, "config": {"digest": "nope", "size": 1}, "layers": []}),
            serde_json::json!({"schemaVersion": 2, "config": {"digest": D}, "layers": []}),
            serde_json::json!([]),
        ] {
            assert!(validate(&bad, OCI_MANIFEST).is_err(), "{bad}");
        }
        assert!(validate(&index, "application/json").is_err());
        assert_eq!(media_type_of(&index), OCI_INDEX);
    }
}
