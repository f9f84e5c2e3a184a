//! What `ls`, `rm` and `prune` work on, behind one interface: the local store of an
//! all-in-one configuration ([`LocalView`]), or any registry reached over the
//! distribution API ([`RemoteView`]: a gate, in either mode, or a registry itself).

use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;
use http::StatusCode;

use crate::registry::store::Store;
use crate::route::{Digest, RepoName};

pub type Result<T> = std::result::Result<T, String>;

/// A tag: what it points at, and when it was pushed when the registry says.
#[derive(Debug, Clone)]
pub struct Tagged {
    pub digest: Digest,
    pub pushed: Option<SystemTime>,
}

#[async_trait]
pub trait View: Send + Sync {
    /// One line: what this is (for messages).
    fn describe(&self) -> String;
    /// Every repository, sorted.
    async fn repositories(&self) -> Result<Vec<String>>;
    /// The tags of `repo`, sorted (empty when it has none or does not exist).
    async fn tags(&self, repo: &RepoName) -> Result<Vec<String>>;
    async fn tag(&self, repo: &RepoName, tag: &str) -> Result<Option<Tagged>>;
    /// A manifest's bytes.
    async fn manifest(&self, repo: &RepoName, d: &Digest) -> Result<Option<Bytes>>;
    /// Every manifest of `repo` with when it was stored; `None`: this view cannot
    /// list manifests that no tag names (the registry API has no such call).
    async fn revisions(&self, repo: &RepoName) -> Result<Option<Vec<(Digest, SystemTime)>>>;
    /// `Err` saying why deletes are refused here.
    async fn deletes_allowed(&self) -> Result<()>;
    /// Remove the tag only (a manifest other tags name keeps them).
    async fn delete_tag(&self, repo: &RepoName, tag: &str) -> Result<()>;
    /// Remove the manifest (and every tag on it).
    async fn delete_manifest(&self, repo: &RepoName, d: &Digest) -> Result<()>;
}

/// The store of the configuration given with `--config`.
pub struct LocalView {
    pub store: Store,
    pub deletes: bool,
    pub what: String,
}

fn storage_error(e: impl std::fmt::Display) -> String {
    format!("storage: {e}")
}

/// Parse a repository name given on the command line.
pub fn parse_repo(name: &str) -> Result<RepoName> {
    RepoName::parse(name).map_err(|e| format!("{name}: {e}"))
}

#[async_trait]
impl View for LocalView {
    fn describe(&self) -> String {
        self.what.clone()
    }

    async fn repositories(&self) -> Result<Vec<String>> {
        self.store.list_repositories().await.map_err(storage_error)
    }

    async fn tags(&self, repo: &RepoName) -> Result<Vec<String>> {
        Ok(self
            .store
            .list_tags(repo)
            .await
            .map_err(storage_error)?
            .unwrap_or_default())
    }

    async fn tag(&self, repo: &RepoName, tag: &str) -> Result<Option<Tagged>> {
        Ok(self
            .store
            .tag_pushed(repo, tag)
            .await
            .map_err(storage_error)?
            .map(|(digest, at)| Tagged {
                digest,
                pushed: Some(at),
            }))
    }

    async fn manifest(&self, repo: &RepoName, d: &Digest) -> Result<Option<Bytes>> {
        if !self
            .store
            .revision_exists(repo, d)
            .await
            .map_err(storage_error)?
        {
            return Ok(None);
        }
        self.store.manifest_content(d).await.map_err(storage_error)
    }

    async fn revisions(&self, repo: &RepoName) -> Result<Option<Vec<(Digest, SystemTime)>>> {
        Ok(Some(
            self.store
                .list_revisions(repo)
                .await
                .map_err(storage_error)?
                .into_iter()
                .map(|(d, meta)| (d, meta.modified))
                .collect(),
        ))
    }

    async fn deletes_allowed(&self) -> Result<()> {
        if self.deletes {
            Ok(())
        } else {
            Err(format!(
                "deletes are disabled in {} (set [storage] delete = true)",
                self.what
            ))
        }
    }

    async fn delete_tag(&self, repo: &RepoName, tag: &str) -> Result<()> {
        if self
            .store
            .delete_tag(repo, tag)
            .await
            .map_err(storage_error)?
        {
            Ok(())
        } else {
            Err(format!("{repo}:{tag}: no such tag"))
        }
    }

    async fn delete_manifest(&self, repo: &RepoName, d: &Digest) -> Result<()> {
        match self
            .store
            .delete_manifest(repo, d)
            .await
            .map_err(storage_error)?
        {
            Some(_) => Ok(()),
            None => Err(format!("{repo}@{d}: no such manifest")),
        }
    }
}

/// A registry over its HTTP API.
pub struct RemoteView {
    client: reqwest::Client,
    base: String,
    credentials: Option<(String, String)>,
}

/// Every manifest type, for `Accept`.
fn accept() -> String {
    crate::lifecycle::immutable::MANIFEST_ACCEPT.join(", ")
}

/// `CODE: message` of an OCI error body, or the status.
fn error_text(status: StatusCode, body: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| {
            let e = v["errors"].get(0)?.clone();
            Some(format!(
                "{} {}: {}",
                status.as_u16(),
                e["code"].as_str()?,
                e["message"].as_str().unwrap_or("")
            ))
        })
        .unwrap_or_else(|| status.to_string())
}

impl RemoteView {
    /// `url`: `https://host[:port]`; `ca`: PEM roots to trust instead of the system's.
    pub fn new(
        url: &str,
        credentials: Option<(String, String)>,
        ca: Option<&std::path::Path>,
    ) -> Result<RemoteView> {
        let base = url.trim_end_matches('/').to_owned();
        if !(base.starts_with("https://") || base.starts_with("http://")) {
            return Err(format!("--url {url}: give https://host[:port]"));
        }
        let mut builder = reqwest::Client::builder()
            .connect_timeout(std::time::Duration::from_secs(10))
            .timeout(std::time::Duration::from_secs(120))
            .redirect(reqwest::redirect::Policy::none());
        if let Some(path) = ca {
            let pem =
                std::fs::read(path).map_err(|e| format!("--ca-cert {}: {e}", path.display()))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| format!("--ca-cert {}: {e}", path.display()))?;
            builder = builder.tls_certs_only(certs);
        }
        let client = builder
            .build()
            .map_err(|e| format!("cannot make an HTTP client: {e}"))?;
        Ok(RemoteView {
            client,
            base,
            credentials,
        })
    }

    /// The `host[:port]` credential files key their entries by.
    pub fn host(&self) -> &str {
        self.base
            .split_once("://")
            .map_or(self.base.as_str(), |(_, h)| h)
    }

    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        prepare: impl FnOnce(reqwest::RequestBuilder) -> reqwest::RequestBuilder,
    ) -> Result<(StatusCode, http::HeaderMap, Bytes)> {
        let url = format!("{}{path}", self.base);
        let mut req = self.client.request(method.clone(), &url);
        if let Some((user, password)) = &self.credentials {
            req = req.basic_auth(user, Some(password));
        }
        let resp = prepare(req)
            .send()
            .await
            .map_err(|e| format!("{method} {url}: {e}"))?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp
            .bytes()
            .await
            .map_err(|e| format!("{method} {url}: {e}"))?;
        if status == StatusCode::UNAUTHORIZED {
            return Err(format!(
                "{method} {url}: {} (give --user, or log in with docker/podman first)",
                error_text(status, &body)
            ));
        }
        Ok((status, headers, body))
    }

    /// Every entry of a paginated list (`_catalog`'s repositories, a tag list's tags).
    async fn paged(&self, first: &str, field: &str) -> Result<Vec<String>> {
        let mut out = Vec::new();
        let mut path = first.to_owned();
        loop {
            let (status, headers, body) = self.send(reqwest::Method::GET, &path, |r| r).await?;
            if status == StatusCode::NOT_FOUND && field == "tags" {
                return Ok(out);
            }
            if status != StatusCode::OK {
                return Err(format!("GET {path}: {}", error_text(status, &body)));
            }
            let page: serde_json::Value = serde_json::from_slice(&body)
                .map_err(|e| format!("GET {path}: not a list: {e}"))?;
            let before = out.len();
            out.extend(
                page[field]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|v| v.as_str().map(str::to_owned)),
            );
            let next = headers
                .get(http::header::LINK)
                .and_then(|v| v.to_str().ok())
                .and_then(crate::lifecycle::immutable::next_link);
            match next {
                Some(n) if out.len() > before && n != path => path = n,
                _ => break,
            }
        }
        out.sort();
        out.dedup();
        Ok(out)
    }

    /// Upload `bytes` as a blob of `repo` (monolithic).
    async fn push_blob(&self, repo: &RepoName, bytes: &'static [u8]) -> Result<Digest> {
        let d = crate::registry::digest::of_bytes("sha256", bytes).unwrap_or_default();
        let path = format!("/v2/{repo}/blobs/uploads/?digest={d}");
        let (status, headers, body) = self
            .send(reqwest::Method::POST, &path, |r| {
                r.header("content-type", "application/octet-stream")
                    .body(bytes)
            })
            .await?;
        match status {
            StatusCode::CREATED => {}
            // A registry without monolithic POST (distribution 2.x) opens a session.
            StatusCode::ACCEPTED => {
                let location = headers
                    .get(http::header::LOCATION)
                    .and_then(|v| v.to_str().ok())
                    .ok_or_else(|| format!("POST {path}: 202 without a Location"))?;
                let location = match location.find("/v2/") {
                    Some(i) if !location.starts_with('/') => location[i..].to_owned(),
                    _ => location.to_owned(),
                };
                let separator = if location.contains('?') { '&' } else { '?' };
                let put = format!("{location}{separator}digest={d}");
                let (status, _, body) = self
                    .send(reqwest::Method::PUT, &put, |r| {
                        r.header("content-type", "application/octet-stream")
                            .body(bytes)
                    })
                    .await?;
                if status != StatusCode::CREATED {
                    return Err(format!("PUT {put}: {}", error_text(status, &body)));
                }
            }
            _ => return Err(format!("POST {path}: {}", error_text(status, &body))),
        }
        Digest::parse(&d).map_err(|e| e.to_string())
    }

    /// Point `tag` at a throw-away manifest of its own and delete that by digest: how
    /// a tag goes on a registry that deletes only by digest (distribution 2.x),
    /// leaving the manifest and its other tags alone.
    async fn delete_tag_by_placeholder(&self, repo: &RepoName, tag: &str) -> Result<()> {
        let config = self.push_blob(repo, b"{}").await?;
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": crate::registry::manifests::OCI_MANIFEST,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": config.as_str(),
                "size": 2,
            },
            "layers": [],
            "annotations": {
                "org.opencontainers.image.description":
                    format!("registry-gate rm placeholder for {repo}:{tag}"),
                "registry-gate.placeholder": format!(
                    "{}",
                    SystemTime::now()
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .map_or(0, |d| d.as_nanos())
                ),
            },
        })
        .to_string();
        let d =
            crate::registry::digest::of_bytes("sha256", manifest.as_bytes()).unwrap_or_default();
        let path = format!("/v2/{repo}/manifests/{tag}");
        let (status, _, body) = self
            .send(reqwest::Method::PUT, &path, |r| {
                r.header("content-type", crate::registry::manifests::OCI_MANIFEST)
                    .body(manifest)
            })
            .await?;
        if status != StatusCode::CREATED {
            return Err(format!("PUT {path}: {}", error_text(status, &body)));
        }
        let d = Digest::parse(&d).map_err(|e| e.to_string())?;
        self.delete_manifest(repo, &d).await
    }
}

#[async_trait]
impl View for RemoteView {
    fn describe(&self) -> String {
        self.base.clone()
    }

    async fn repositories(&self) -> Result<Vec<String>> {
        self.paged("/v2/_catalog?n=1000", "repositories").await
    }

    async fn tags(&self, repo: &RepoName) -> Result<Vec<String>> {
        self.paged(&format!("/v2/{repo}/tags/list?n=1000"), "tags")
            .await
    }

    async fn tag(&self, repo: &RepoName, tag: &str) -> Result<Option<Tagged>> {
        let path = format!("/v2/{repo}/manifests/{tag}");
        let (status, headers, body) = self
            .send(reqwest::Method::HEAD, &path, |r| {
                r.header("accept", accept())
            })
            .await?;
        if status == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if status != StatusCode::OK {
            return Err(format!("HEAD {path}: {}", error_text(status, &body)));
        }
        let digest = headers
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| Digest::parse(v).ok())
            .ok_or_else(|| format!("HEAD {path}: no Docker-Content-Digest in the answer"))?;
        let pushed = headers
            .get(http::header::LAST_MODIFIED)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| httpdate::parse_http_date(v).ok());
        Ok(Some(Tagged { digest, pushed }))
    }

    async fn manifest(&self, repo: &RepoName, d: &Digest) -> Result<Option<Bytes>> {
        let path = format!("/v2/{repo}/manifests/{d}");
        let (status, _, body) = self
            .send(reqwest::Method::GET, &path, |r| {
                r.header("accept", accept())
            })
            .await?;
        match status {
            StatusCode::OK => Ok(Some(body)),
            StatusCode::NOT_FOUND => Ok(None),
            _ => Err(format!("GET {path}: {}", error_text(status, &body))),
        }
    }

    async fn revisions(&self, _repo: &RepoName) -> Result<Option<Vec<(Digest, SystemTime)>>> {
        Ok(None)
    }

    async fn deletes_allowed(&self) -> Result<()> {
        // A manifest nobody has: 404 where deletes are enabled, 405 where they are off.
        let path = format!(
            "/v2/registry-gate/probe/manifests/sha256:{}",
            "0".repeat(64)
        );
        let (status, _, body) = self.send(reqwest::Method::DELETE, &path, |r| r).await?;
        match status {
            StatusCode::NOT_FOUND | StatusCode::ACCEPTED => Ok(()),
            StatusCode::METHOD_NOT_ALLOWED => Err(format!(
                "deletes are disabled on {} ({}); a registry:2 upstream needs \
                 storage.delete.enabled: true, the built-in registry [storage] delete = true",
                self.base,
                error_text(status, &body)
            )),
            StatusCode::FORBIDDEN => Err(format!(
                "{} refuses deletes for this user ({})",
                self.base,
                error_text(status, &body)
            )),
            _ => Err(format!(
                "cannot tell whether {} allows deletes: {}",
                self.base,
                error_text(status, &body)
            )),
        }
    }

    async fn delete_tag(&self, repo: &RepoName, tag: &str) -> Result<()> {
        let path = format!("/v2/{repo}/manifests/{tag}");
        let (status, _, body) = self.send(reqwest::Method::DELETE, &path, |r| r).await?;
        match status {
            StatusCode::ACCEPTED | StatusCode::OK => Ok(()),
            StatusCode::NOT_FOUND | StatusCode::FORBIDDEN => {
                Err(format!("{repo}:{tag}: {}", error_text(status, &body)))
            }
            // A registry that deletes by digest only answers the tag's DELETE with
            // DIGEST_INVALID (400) or UNSUPPORTED (405).
            StatusCode::BAD_REQUEST | StatusCode::METHOD_NOT_ALLOWED => {
                self.delete_tag_by_placeholder(repo, tag).await
            }
            _ => Err(format!("DELETE {path}: {}", error_text(status, &body))),
        }
    }

    async fn delete_manifest(&self, repo: &RepoName, d: &Digest) -> Result<()> {
        let path = format!("/v2/{repo}/manifests/{d}");
        let (status, _, body) = self.send(reqwest::Method::DELETE, &path, |r| r).await?;
        match status {
            StatusCode::ACCEPTED | StatusCode::OK => Ok(()),
            _ => Err(format!("{repo}@{d}: {}", error_text(status, &body))),
        }
    }
}
