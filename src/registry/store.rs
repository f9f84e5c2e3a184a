//! The registry's data model over any [`Storage`]: blobs by digest, links that make
//! blobs and manifests part of a repository, tags, and what lists them. Written once;
//! the disk and the object store are below it (`storage`).
//!
//! Every write is one whole object (a link, a manifest) and the order of writes is
//! what keeps readers safe: a manifest's content before its revision link, a tag's
//! index link before its `current` link. So a reader (on this gate or another) sees a
//! tag only once everything it points at is there, and a writer killed half-way
//! leaves nothing a reader would follow.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use super::storage::{Key, Layout, Meta, Result, Storage, StorageError};
use crate::route::{Digest, Reference, RepoName};

/// Largest manifest served or read (an existing store may hold larger ones than the
/// 4 MiB accepted on push).
pub const MAX_STORED_MANIFEST: u64 = 16 * 1024 * 1024;
/// Bytes of manifest content kept in memory (content never changes for a digest).
const CONTENT_CACHE_BYTES: usize = 16 * 1024 * 1024;

/// The registry's view of its storage.
#[derive(Clone)]
pub struct Store {
    storage: Arc<dyn Storage>,
    content: Arc<ContentCache>,
}

/// Manifest content by digest. A digest names its bytes forever, so an entry never
/// goes stale; whether a repository still has the manifest is asked of the store.
#[derive(Default)]
struct ContentCache {
    map: Mutex<(HashMap<Digest, Bytes>, usize)>,
}

impl ContentCache {
    fn get(&self, d: &Digest) -> Option<Bytes> {
        match self.map.lock() {
            Ok(m) => m.0.get(d).cloned(),
            Err(p) => p.into_inner().0.get(d).cloned(),
        }
    }

    fn put(&self, d: &Digest, bytes: &Bytes) {
        let mut m = match self.map.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        if m.1 + bytes.len() > CONTENT_CACHE_BYTES {
            m.0.clear();
            m.1 = 0;
        }
        if m.0.insert(d.clone(), bytes.clone()).is_none() {
            m.1 += bytes.len();
        }
    }
}

impl Store {
    pub fn new(storage: Arc<dyn Storage>) -> Store {
        Store {
            storage,
            content: Arc::new(ContentCache::default()),
        }
    }

    pub fn storage(&self) -> &dyn Storage {
        self.storage.as_ref()
    }

    /// The storage, shared (for tasks that outlive a borrow).
    pub fn shared(&self) -> Arc<dyn Storage> {
        self.storage.clone()
    }

    pub fn layout(&self) -> Layout {
        Layout
    }

    /// The digest a link holds, if the link exists and holds one.
    pub async fn read_link(&self, key: &Key) -> Result<Option<Digest>> {
        Ok(self.read_link_meta(key).await?.map(|(d, _)| d))
    }

    /// A link's digest and when it was written.
    async fn read_link_meta(&self, key: &Key) -> Result<Option<(Digest, Meta)>> {
        Ok(self.read_small(key, 1024).await?.and_then(|(bytes, meta)| {
            std::str::from_utf8(&bytes)
                .ok()
                .and_then(|s| Digest::parse(s.trim()).ok())
                .map(|d| (d, meta))
        }))
    }

    /// A small object of ours; one larger than `limit` is not ours: absent.
    async fn read_small(&self, key: &Key, limit: u64) -> Result<Option<(Bytes, Meta)>> {
        self.storage.read(key, limit).await.or_else(|e| match e {
            StorageError::TooLarge(_) => Ok(None),
            e => Err(e),
        })
    }

    async fn write_link(&self, key: &Key, d: &Digest) -> Result<()> {
        self.storage
            .put(key, Bytes::copy_from_slice(d.as_str().as_bytes()))
            .await
    }

    /// A blob's content metadata, if the content exists.
    pub async fn blob_meta(&self, d: &Digest) -> Result<Option<Meta>> {
        self.storage.head(&Layout.blob_data(d)).await
    }

    /// Write `bytes` as the content of `d` (verified by the caller).
    pub async fn write_blob(&self, d: &Digest, bytes: Bytes) -> Result<()> {
        self.storage.put(&Layout.blob_data(d), bytes).await
    }

    /// Whether `d` is a layer (any blob) of `repo` whose content exists.
    pub async fn layer_linked(&self, repo: &RepoName, d: &Digest) -> Result<bool> {
        let link = Layout.layer_link(repo, d);
        let (link, content) = tokio::join!(self.read_link(&link), self.blob_meta(d));
        Ok(link?.as_ref() == Some(d) && content?.is_some())
    }

    /// Make blob `d` part of `repo`.
    pub async fn link_layer(&self, repo: &RepoName, d: &Digest) -> Result<()> {
        self.write_link(&Layout.layer_link(repo, d), d).await
    }

    /// Remove blob `d` from `repo` (the content stays until garbage collection).
    pub async fn unlink_layer(&self, repo: &RepoName, d: &Digest) -> Result<bool> {
        let link = Layout.layer_link(repo, d);
        if self.storage.head(&link).await?.is_none() {
            return Ok(false);
        }
        self.storage.delete_all(&Layout.layer_dir(repo, d)).await?;
        Ok(true)
    }

    /// Whether manifest `d` is part of `repo`.
    pub async fn revision_exists(&self, repo: &RepoName, d: &Digest) -> Result<bool> {
        Ok(self
            .read_link(&Layout.revision_link(repo, d))
            .await?
            .as_ref()
            == Some(d))
    }

    /// The manifest a tag points at.
    pub async fn resolve_tag(&self, repo: &RepoName, tag: &str) -> Result<Option<Digest>> {
        self.read_link(&Layout.tag_current(repo, tag)).await
    }

    /// The link a reference is resolved through (a tag's `current`, or the revision).
    pub fn reference_link(&self, repo: &RepoName, r: &Reference) -> Key {
        match r {
            Reference::Tag(t) => Layout.tag_current(repo, t),
            Reference::Digest(d) => Layout.revision_link(repo, d),
        }
    }

    /// A manifest's content (from memory when it was read before).
    pub async fn manifest_content(&self, d: &Digest) -> Result<Option<Bytes>> {
        if let Some(bytes) = self.content.get(d) {
            return Ok(Some(bytes));
        }
        let found = self
            .storage
            .read(&Layout.blob_data(d), MAX_STORED_MANIFEST)
            .await?;
        Ok(found.map(|(bytes, _)| {
            self.content.put(d, &bytes);
            bytes
        }))
    }

    /// Store a verified manifest: content, revision link, then the tag (if any).
    pub async fn put_manifest(
        &self,
        repo: &RepoName,
        d: &Digest,
        bytes: Bytes,
        tag: Option<&str>,
    ) -> Result<()> {
        if self.blob_meta(d).await?.is_none() {
            self.write_blob(d, bytes.clone()).await?;
        }
        self.content.put(d, &bytes);
        self.write_link(&Layout.revision_link(repo, d), d).await?;
        if let Some(tag) = tag {
            self.write_link(&Layout.tag_index_link(repo, tag, d), d)
                .await?;
            self.write_link(&Layout.tag_current(repo, tag), d).await?;
            self.record_push(repo, tag, d, SystemTime::now()).await?;
        }
        Ok(())
    }

    /// Record that `tag` was pushed as `d` at `at` (what retention ages tags by).
    pub async fn record_push(
        &self,
        repo: &RepoName,
        tag: &str,
        d: &Digest,
        at: SystemTime,
    ) -> Result<()> {
        let secs = at.duration_since(UNIX_EPOCH).map_or(0, |t| t.as_secs());
        let record = serde_json::json!({
            "digest": d.as_str(),
            "pushed": crate::auth::token::rfc3339(secs),
        });
        self.storage
            .put(
                &Layout.tag_pushed(repo, tag),
                Bytes::from(record.to_string()),
            )
            .await
    }

    /// What `tag` points at and when it was pushed: the time recorded at tag time when
    /// it is for the digest the tag holds now, else (a tag written by `registry:2`, or
    /// moved by it since) when its `current` link was written. `None`: no such tag.
    pub async fn tag_pushed(
        &self,
        repo: &RepoName,
        tag: &str,
    ) -> Result<Option<(Digest, SystemTime)>> {
        let current = Layout.tag_current(repo, tag);
        let pushed = Layout.tag_pushed(repo, tag);
        let (link, record) = tokio::join!(
            self.read_link_meta(&current),
            self.read_small(&pushed, 4096),
        );
        let Some((d, meta)) = link? else {
            return Ok(None);
        };
        let recorded = record?
            .and_then(|(bytes, _)| serde_json::from_slice::<serde_json::Value>(&bytes).ok())
            .filter(|v| v["digest"].as_str() == Some(d.as_str()))
            .and_then(|v| {
                v["pushed"]
                    .as_str()
                    .and_then(crate::auth::token::parse_rfc3339)
            })
            .map(|secs| UNIX_EPOCH + std::time::Duration::from_secs(secs));
        Ok(Some((d, recorded.unwrap_or(meta.modified))))
    }

    /// Remove manifest `d` from `repo`, with every tag pointing at it; returns those
    /// tags (`None` when the repository did not have the manifest).
    pub async fn delete_manifest(
        &self,
        repo: &RepoName,
        d: &Digest,
    ) -> Result<Option<Vec<String>>> {
        if !self.revision_exists(repo, d).await? {
            return Ok(None);
        }
        let mut gone = Vec::new();
        for tag in self.list_tags(repo).await?.unwrap_or_default() {
            if self.resolve_tag(repo, &tag).await?.as_ref() == Some(d) {
                self.delete_tag(repo, &tag).await?;
                gone.push(tag);
            }
        }
        self.storage
            .delete_all(&Layout.revision_dir(repo, d))
            .await?;
        Ok(Some(gone))
    }

    /// Remove a tag (the manifest stays).
    pub async fn delete_tag(&self, repo: &RepoName, tag: &str) -> Result<bool> {
        let dir = Layout.tag_dir(repo, tag);
        if self.storage.list(&dir).await?.is_empty() {
            return Ok(false);
        }
        self.storage.delete_all(&dir).await?;
        Ok(true)
    }

    /// Whether `repo` exists (has manifests or layers).
    pub async fn repo_exists(&self, repo: &RepoName) -> Result<bool> {
        let listing = self.storage.list_dir(&Layout.repo(repo)).await?;
        Ok(listing
            .dirs
            .iter()
            .any(|d| d == "_manifests" || d == "_layers"))
    }

    /// The tags of `repo`, sorted; `None` if the repository does not exist. A tag is
    /// listed only once its `current` link is whole: a push killed between the tag's
    /// index link and its current link leaves no tag.
    pub async fn list_tags(&self, repo: &RepoName) -> Result<Option<Vec<String>>> {
        let prefix = Layout.tags(repo);
        let (listed, exists) = tokio::join!(self.storage.list(&prefix), self.repo_exists(repo));
        if !exists? {
            return Ok(None);
        }
        let mut tags: Vec<String> = listed?
            .iter()
            .filter_map(|(k, _)| k.strip(&prefix)?.strip_suffix("/current/link"))
            .filter(|t| !t.contains('/') && crate::route::Reference::parse(t).is_ok())
            .filter(|t| !t.contains(':'))
            .map(str::to_owned)
            .collect();
        tags.sort();
        tags.dedup();
        Ok(Some(tags))
    }

    /// Every manifest digest of `repo`, sorted, with when its revision link was
    /// written.
    pub async fn list_revisions(&self, repo: &RepoName) -> Result<Vec<(Digest, Meta)>> {
        let prefix = Layout.revisions(repo);
        let mut out: Vec<(Digest, Meta)> = self
            .storage
            .list(&prefix)
            .await?
            .into_iter()
            .filter_map(|(k, meta)| {
                let rest = k.strip(&prefix)?.strip_suffix("/link")?;
                let (alg, hex) = rest.split_once('/')?;
                Some((Digest::parse(&format!("{alg}:{hex}")).ok()?, meta))
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// Every repository name, sorted. A repository is a directory with `_manifests`.
    pub async fn list_repositories(&self) -> Result<Vec<String>> {
        let mut out = self.repositories_with("_manifests").await?;
        out.sort();
        Ok(out)
    }

    /// The repositories a client should see: those with a manifest or an upload in
    /// progress. A repository whose last manifest was deleted leaves directories (on
    /// disk) or layer links behind; it is not listed.
    pub async fn listed_repositories(&self) -> Result<Vec<String>> {
        use futures_util::{StreamExt, TryStreamExt};
        let candidates = self.list_repositories().await?;
        let kept: Vec<Option<String>> =
            futures_util::stream::iter(candidates.into_iter().map(|name| async move {
                let Ok(repo) = RepoName::parse(&name) else {
                    return Ok(None);
                };
                if !self.list_revisions(&repo).await?.is_empty() {
                    return Ok(Some(name));
                }
                let uploads = self.storage.list_dir(&Layout.uploads(&repo)).await?;
                Ok((!uploads.dirs.is_empty() || !uploads.objects.is_empty()).then_some(name))
            }))
            .buffered(16)
            .try_collect()
            .await?;
        Ok(kept.into_iter().flatten().collect())
    }

    /// Names (valid repository names) of the directories under `repositories/` that
    /// hold a `marker` sub-directory; directories starting with `_` are not entered.
    pub async fn repositories_with(&self, marker: &str) -> Result<Vec<String>> {
        let mut out = Vec::new();
        let mut stack = vec![String::new()];
        while let Some(name) = stack.pop() {
            let dir = if name.is_empty() {
                Layout.repositories()
            } else {
                Layout.repositories().child(&name)
            };
            let listing = self.storage.list_dir(&dir).await?;
            if !name.is_empty()
                && listing.dirs.iter().any(|d| d == marker)
                && RepoName::parse(&name).is_ok()
            {
                out.push(name.clone());
            }
            for child in listing.dirs {
                if child.starts_with('_') {
                    continue;
                }
                stack.push(if name.is_empty() {
                    child
                } else {
                    format!("{name}/{child}")
                });
            }
        }
        Ok(out)
    }

    /// Bytes of blob content and number of open uploads.
    pub async fn usage(&self) -> Result<(u64, usize)> {
        let bytes = self
            .storage
            .list(&Layout.blobs())
            .await?
            .iter()
            .filter(|(k, _)| k.name() == "data")
            .map(|(_, m)| m.size)
            .sum();
        let mut uploads = 0;
        for name in self.repositories_with("_uploads").await? {
            if let Ok(repo) = RepoName::parse(&name) {
                uploads += self
                    .storage
                    .list_dir(&Layout.uploads(&repo))
                    .await?
                    .dirs
                    .len();
            }
        }
        Ok((bytes, uploads))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::storage::fs::FsStorage;

    fn digest(s: &str) -> Digest {
        Digest::parse(&crate::registry::digest::of_bytes("sha256", s.as_bytes()).expect("d"))
            .expect("digest")
    }

    #[tokio::test]
    async fn manifests_tags_and_listing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = Store::new(Arc::new(FsStorage::open(dir.path()).expect("open")));
        let repo = RepoName::parse("a/b").expect("name");
        let d = digest("{}");
        s.put_manifest(&repo, &d, Bytes::from_static(b"{}"), Some("v1"))
            .await
            .expect("put");
        assert_eq!(
            s.resolve_tag(&repo, "v1").await.expect("tag"),
            Some(d.clone())
        );
        assert!(s.revision_exists(&repo, &d).await.expect("rev"));
        assert_eq!(
            s.list_tags(&repo).await.expect("tags"),
            Some(vec!["v1".to_owned()])
        );
        assert_eq!(
            s.list_repositories().await.expect("repos"),
            vec!["a/b".to_owned()]
        );
        let revisions = s.list_revisions(&repo).await.expect("revs");
        assert_eq!(revisions.len(), 1);
        assert_eq!(revisions[0].0, d);
        assert_eq!(
            s.delete_manifest(&repo, &d).await.expect("delete"),
            Some(vec!["v1".to_owned()])
        );
        assert_eq!(s.resolve_tag(&repo, "v1").await.expect("tag"), None);
        let unknown = RepoName::parse("nope").expect("name");
        assert_eq!(s.list_tags(&unknown).await.expect("tags"), None);
    }
}
