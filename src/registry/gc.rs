//! Garbage collection that runs while the registry serves pushes, on one gate or
//! across many sharing a store.
//!
//! Mark: every manifest of every repository (with `delete_untagged`, only tagged ones,
//! the children of kept indexes, and manifests whose `subject` is kept — signatures and
//! other artifacts stay with their image), their config and layer blobs, and the
//! children of kept indexes, recursively. Content written within the grace period
//! before the collection started is kept whatever the marks say (a push uploads its
//! blobs before its manifest).
//!
//! Sweep: what is left, in batches, each announced and checked against the claims of
//! writers (`claims`): content a push, mount or upload relied on meanwhile is never
//! deleted, and a writer that relied on content being deleted waits and then finds
//! it gone (its PUT fails cleanly with `MANIFEST_BLOB_UNKNOWN`, or the blob is stored
//! again).

use std::collections::{HashMap, HashSet};
use std::time::{Instant, SystemTime};

use futures_util::{StreamExt, TryStreamExt};
use serde_json::Value;

use super::claims::{self, Collector};
use super::storage::{Layout, Result};
use super::store::Store;
use crate::route::{Digest, RepoName};

/// Digests announced and deleted at a time.
const BATCH: usize = 500;

#[derive(Debug, Clone, Copy, Default)]
pub struct GcOptions {
    /// Report what would go, delete nothing.
    pub dry_run: bool,
    /// Also remove manifests no tag reaches (and then their blobs).
    pub delete_untagged: bool,
    /// Content written less than this long before the collection started is kept
    /// too: a push that uploaded its blobs just before and sends its manifest during
    /// the collection still finds them.
    pub grace: std::time::Duration,
}

/// The grace period used unless told otherwise.
pub const DEFAULT_GRACE: std::time::Duration = std::time::Duration::from_secs(3600);

/// What a collection did (or, dry, would do).
#[derive(Debug, Default)]
pub struct GcReport {
    pub repositories: usize,
    pub manifests_kept: usize,
    /// Untagged manifests unlinked (`repository@digest`).
    pub manifests_removed: Vec<String>,
    /// Blob content deleted: digest and size.
    pub blobs_removed: Vec<(String, u64)>,
    pub bytes_freed: u64,
    /// Unreferenced content kept because it is younger than the grace period (or a
    /// writer claimed it during the collection): count and bytes.
    pub blobs_young: usize,
    pub bytes_young: u64,
}

/// Add to `keep` what kept manifests keep, until nothing changes: the children of a
/// kept index, and manifests whose `subject` is kept (signatures, SBOMs and other
/// artifacts stay with their image).
pub fn close_over(manifests: &[(&Digest, &Value)], keep: &mut HashSet<Digest>) {
    loop {
        let before = keep.len();
        for (d, json) in manifests {
            let (_, children, subject) = references(json);
            if keep.contains(*d) {
                keep.extend(children);
            }
            if subject.is_some_and(|s| keep.contains(&s)) {
                keep.insert((*d).clone());
            }
        }
        if keep.len() == before {
            break;
        }
    }
}

/// The digests a manifest references: (blobs, child manifests, subject).
pub fn references(json: &Value) -> (Vec<Digest>, Vec<Digest>, Option<Digest>) {
    let digest_of = |v: &Value| {
        v.get("digest")
            .and_then(Value::as_str)
            .and_then(|d| Digest::parse(d).ok())
    };
    let mut blobs = Vec::new();
    if let Some(c) = json.get("config").and_then(digest_of) {
        blobs.push(c);
    }
    for l in json
        .get("layers")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if let Some(d) = digest_of(l) {
            blobs.push(d);
        }
    }
    let children = json
        .get("manifests")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(digest_of)
        .collect();
    let subject = json.get("subject").and_then(digest_of);
    (blobs, children, subject)
}

/// A manifest that may go: its repository, digest, and what it references.
struct Candidate {
    repo: RepoName,
    digest: Digest,
    blobs: Vec<Digest>,
    children: Vec<Digest>,
}

/// Run one collection.
pub async fn collect(store: &Store, options: GcOptions) -> Result<GcReport> {
    // The start, by the store's clock (what every modification time is in); the
    // cut-off: content written after it is in use, whatever the marks say.
    let mut collector = Collector::start(store, options.grace).await?;
    let cutoff = collector.cutoff();
    let mut report = GcReport::default();
    let mut marked: HashSet<Digest> = HashSet::new();
    let mut candidates: Vec<Candidate> = Vec::new();

    for name in store.list_repositories().await? {
        let Ok(repo) = RepoName::parse(&name) else {
            continue;
        };
        report.repositories += 1;
        let revisions = store.list_revisions(&repo).await?;
        let contents: Vec<_> =
            futures_util::stream::iter(revisions.into_iter().map(|(d, meta)| {
                let store = store.clone();
                async move {
                    let content = store.manifest_content(&d).await?;
                    Ok::<_, super::storage::StorageError>((d, meta.modified, content))
                }
            }))
            .buffered(16)
            .try_collect()
            .await?;
        let mut manifests: Vec<(Digest, SystemTime, Value)> = Vec::new();
        for (d, modified, bytes) in contents {
            match bytes.and_then(|b| serde_json::from_slice::<Value>(&b).ok()) {
                Some(json) => manifests.push((d, modified, json)),
                // Unreadable content: keep the digest, never guess.
                None => {
                    marked.insert(d);
                }
            }
        }
        // Which manifests stay in this repository.
        let mut keep: HashSet<Digest> = if options.delete_untagged {
            let tags = store.list_tags(&repo).await?.unwrap_or_default();
            let roots: Vec<Option<Digest>> =
                futures_util::stream::iter(tags.into_iter().map(|t| {
                    let (store, repo) = (store.clone(), repo.clone());
                    async move { store.resolve_tag(&repo, &t).await }
                }))
                .buffered(16)
                .try_collect()
                .await?;
            roots.into_iter().flatten().collect()
        } else {
            manifests.iter().map(|(d, _, _)| d.clone()).collect()
        };
        let parsed: Vec<(&Digest, &Value)> = manifests.iter().map(|(d, _, j)| (d, j)).collect();
        close_over(&parsed, &mut keep);
        for (d, modified, json) in &manifests {
            let (blobs, children, _) = references(json);
            if keep.contains(d) || *modified >= cutoff {
                report.manifests_kept += 1;
                marked.insert(d.clone());
                marked.extend(blobs);
                marked.extend(children);
            } else {
                candidates.push(Candidate {
                    repo: repo.clone(),
                    digest: d.clone(),
                    blobs,
                    children,
                });
            }
        }
    }

    // Untagged manifests first, so that one a writer claims meanwhile stays with
    // everything it references.
    let mut spared: HashSet<Digest> = HashSet::new();
    for chunk in candidates.chunks(BATCH) {
        let claimed = if options.dry_run {
            collector.protected().await?
        } else {
            let digests: Vec<Digest> = chunk.iter().map(|c| c.digest.clone()).collect();
            collector.begin_batch(&digests).await?
        };
        for c in chunk {
            if claimed.contains(c.digest.as_str()) {
                spared.insert(c.digest.clone());
            }
        }
        // What a spared index keeps (its children are usually claimed with it).
        loop {
            let before = spared.len();
            for c in &candidates {
                if spared.contains(&c.digest) {
                    spared.extend(c.children.iter().cloned());
                }
            }
            if spared.len() == before {
                break;
            }
        }
        for c in chunk {
            if spared.contains(&c.digest) {
                continue;
            }
            report
                .manifests_removed
                .push(format!("{}@{}", c.repo, c.digest));
            if !options.dry_run {
                store.delete_manifest(&c.repo, &c.digest).await?;
            }
        }
        if !options.dry_run {
            collector.end_batch().await?;
        }
    }
    for c in candidates.iter().filter(|c| spared.contains(&c.digest)) {
        report.manifests_kept += 1;
        marked.insert(c.digest.clone());
        marked.extend(c.blobs.iter().cloned());
        marked.extend(c.children.iter().cloned());
    }

    // Blob content nothing marked.
    let mut unmarked: Vec<(Digest, u64)> = Vec::new();
    for (key, meta) in store.storage().list(&Layout.blobs()).await? {
        let Some(d) = Layout.blob_digest(&key) else {
            continue;
        };
        if marked.contains(&d) {
            continue;
        }
        if meta.modified >= cutoff {
            report.blobs_young += 1;
            report.bytes_young += meta.size;
            continue;
        }
        unmarked.push((d, meta.size));
    }
    unmarked.sort();
    if options.dry_run {
        let protected = collector.protected().await?;
        for (d, size) in unmarked {
            if protected.contains(d.as_str()) {
                report.blobs_young += 1;
                report.bytes_young += size;
            } else {
                report.bytes_freed += size;
                report.blobs_removed.push((d.to_string(), size));
            }
        }
        collector.finish(true).await?;
        return Ok(report);
    }
    let sizes: HashMap<Digest, u64> = unmarked.iter().cloned().collect();
    let mut queue: &[(Digest, u64)] = &unmarked;
    while !queue.is_empty() {
        let chunk = &queue[..queue.len().min(BATCH)];
        let digests: Vec<Digest> = chunk.iter().map(|(d, _)| d.clone()).collect();
        let claimed = collector.begin_batch(&digests).await?;
        let announced = Instant::now();
        let mut doomed = Vec::new();
        for d in &digests {
            let size = sizes.get(d).copied().unwrap_or(0);
            if claimed.contains(d.as_str()) {
                report.blobs_young += 1;
                report.bytes_young += size;
            } else {
                doomed.push((d, size));
            }
        }
        let keys: Vec<_> = doomed.iter().map(|(d, _)| Layout.blob_data(d)).collect();
        // The marker holds for a while only: a batch that could not be announced and
        // checked in time is not deleted.
        let done = if announced.elapsed() > claims::SWEEP_DEADLINE {
            0
        } else {
            store.storage().delete_many(&keys).await?;
            for (d, size) in doomed {
                report.bytes_freed += size;
                report.blobs_removed.push((d.to_string(), size));
            }
            digests.len()
        };
        collector.end_batch().await?;
        if done == 0 {
            return Err(super::storage::StorageError::Unavailable {
                store: store.storage().describe(),
                detail: "announcing a garbage-collection batch took longer than the batch \
                         may last; nothing was deleted"
                    .into(),
            });
        }
        queue = &queue[done..];
    }
    let removed = collector.finish(false).await?;
    if removed > 0 {
        tracing::debug!(removed, "old garbage-collection claims removed");
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::digest::of_bytes;
    use crate::registry::storage::fs::FsStorage;
    use bytes::Bytes;
    use std::path::Path;
    use std::sync::Arc;
    use std::time::Duration;

    fn digest(bytes: &[u8]) -> Digest {
        Digest::parse(&of_bytes("sha256", bytes).expect("digest")).expect("parse")
    }

    /// Date a file (content or link) `by` before now (negative: after).
    fn date(root: &Path, key: &super::super::storage::Key, secs_ago: i64) {
        let t = if secs_ago >= 0 {
            SystemTime::now() - Duration::from_secs(secs_ago as u64)
        } else {
            SystemTime::now() + Duration::from_secs((-secs_ago) as u64)
        };
        std::fs::OpenOptions::new()
            .append(true)
            .open(root.join(key.as_str()))
            .expect("open")
            .set_modified(t)
            .expect("date");
    }

    /// Store a blob as a layer of `repo`, dated an hour ago (as if before the GC).
    async fn layer(s: &Store, root: &Path, repo: &RepoName, bytes: &[u8]) -> Digest {
        let d = digest(bytes);
        s.write_blob(&d, Bytes::copy_from_slice(bytes))
            .await
            .expect("blob");
        s.link_layer(repo, &d).await.expect("link");
        date(root, &Layout.blob_data(&d), 3600);
        d
    }

    async fn put_dated(
        s: &Store,
        root: &Path,
        repo: &RepoName,
        json: &str,
        tag: Option<&str>,
    ) -> Digest {
        let d = digest(json.as_bytes());
        s.put_manifest(repo, &d, Bytes::copy_from_slice(json.as_bytes()), tag)
            .await
            .expect("manifest");
        date(root, &Layout.blob_data(&d), 3600);
        date(root, &Layout.revision_link(repo, &d), 3600);
        d
    }

    async fn manifest(
        s: &Store,
        root: &Path,
        repo: &RepoName,
        config: &Digest,
        layers: &[&Digest],
        tag: Option<&str>,
    ) -> Digest {
        let json = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "c", "digest": config.as_str(), "size": 1},
            "layers": layers.iter().map(|l| serde_json::json!({"mediaType": "l", "digest": l.as_str(), "size": 1})).collect::<Vec<_>>(),
        })
        .to_string();
        put_dated(s, root, repo, &json, tag).await
    }

    fn open(dir: &Path) -> Store {
        Store::new(Arc::new(FsStorage::open(dir).expect("open")))
    }

    #[tokio::test]
    async fn keeps_referenced_and_recent_removes_the_rest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        let s = open(root);
        let repo = RepoName::parse("app").expect("name");
        let config = layer(&s, root, &repo, b"config").await;
        let kept = layer(&s, root, &repo, b"kept layer").await;
        let orphan = layer(&s, root, &repo, b"orphan layer").await;
        let old_config = layer(&s, root, &repo, b"old config").await;
        let old_layer = layer(&s, root, &repo, b"old layer").await;
        let tagged = manifest(&s, root, &repo, &config, &[&kept], Some("v1")).await;
        let untagged = manifest(&s, root, &repo, &old_config, &[&old_layer], None).await;
        // Written "during" the collection (a time after it started): unreferenced,
        // but in use by a push under way.
        let fresh = digest(b"fresh");
        s.write_blob(&fresh, Bytes::from_static(b"fresh"))
            .await
            .expect("blob");
        date(root, &Layout.blob_data(&fresh), -600);

        let dry = collect(
            &s,
            GcOptions {
                dry_run: true,
                delete_untagged: true,
                grace: Duration::ZERO,
            },
        )
        .await
        .expect("dry");
        assert_eq!(dry.blobs_removed.len(), 4, "{dry:?}");
        assert_eq!(
            dry.bytes_freed,
            dry.blobs_removed.iter().map(|b| b.1).sum::<u64>()
        );
        assert!(
            dry.blobs_removed
                .iter()
                .any(|(d, _)| d == untagged.as_str())
        );
        assert_eq!((dry.blobs_young, dry.bytes_young), (1, 5), "the fresh blob");
        assert!(
            s.blob_meta(&orphan).await.expect("stat").is_some(),
            "dry run deletes nothing"
        );

        // With the default hour of grace, content from an hour ago minus a bit stays.
        let graced = collect(
            &s,
            GcOptions {
                grace: DEFAULT_GRACE + Duration::from_secs(60),
                ..GcOptions::default()
            },
        )
        .await
        .expect("gc");
        assert!(graced.blobs_removed.is_empty(), "{graced:?}");
        let plain = collect(&s, GcOptions::default()).await.expect("gc");
        assert_eq!(plain.blobs_removed, vec![(orphan.to_string(), 12)]);
        assert!(
            s.blob_meta(&old_layer).await.expect("stat").is_some(),
            "untagged kept by default"
        );

        let report = collect(
            &s,
            GcOptions {
                dry_run: false,
                delete_untagged: true,
                grace: Duration::ZERO,
            },
        )
        .await
        .expect("gc");
        assert_eq!(report.manifests_removed, vec![format!("app@{untagged}")]);
        for gone in [&old_config, &old_layer, &untagged] {
            assert!(s.blob_meta(gone).await.expect("stat").is_none(), "{gone}");
        }
        for stays in [&config, &kept, &tagged, &fresh] {
            assert!(s.blob_meta(stays).await.expect("stat").is_some(), "{stays}");
        }
    }

    #[tokio::test]
    async fn index_children_and_referrers_stay_with_their_root() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        let s = open(root);
        let repo = RepoName::parse("multi").expect("name");
        let c = layer(&s, root, &repo, b"cfg").await;
        let l = layer(&s, root, &repo, b"layer").await;
        let child = manifest(&s, root, &repo, &c, &[&l], None).await;
        let index = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": child.as_str(), "size": 1}],
        })
        .to_string();
        let index_d = put_dated(&s, root, &repo, &index, Some("latest")).await;
        let sig_cfg = layer(&s, root, &repo, b"sig config").await;
        let signature = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "c", "digest": sig_cfg.as_str(), "size": 1},
            "layers": [],
            "subject": {"mediaType": "application/vnd.oci.image.index.v1+json", "digest": index_d.as_str(), "size": 1},
        })
        .to_string();
        put_dated(&s, root, &repo, &signature, None).await;
        let report = collect(
            &s,
            GcOptions {
                dry_run: false,
                delete_untagged: true,
                grace: Duration::ZERO,
            },
        )
        .await
        .expect("gc");
        assert!(report.manifests_removed.is_empty(), "{report:?}");
        assert!(report.blobs_removed.is_empty(), "{report:?}");
    }

    #[tokio::test]
    async fn content_a_writer_claims_during_the_sweep_stays() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        let s = open(root);
        let repo = RepoName::parse("claimed").expect("name");
        let orphan = layer(&s, root, &repo, b"orphan, about to be mounted").await;
        // A mount claims it (as after the collection's mark and before its sweep).
        claims::claim(&s, std::slice::from_ref(&orphan))
            .await
            .expect("claim");
        let report = collect(&s, GcOptions::default()).await.expect("gc");
        assert!(report.blobs_removed.is_empty(), "{report:?}");
        assert_eq!(report.blobs_young, 1);
        assert!(s.blob_meta(&orphan).await.expect("stat").is_some());
    }
}
