//! Garbage collection that runs while the registry serves pushes.
//!
//! Mark: every manifest of every repository (with `delete_untagged`, only tagged ones,
//! the children of kept indexes, and manifests whose `subject` is kept — signatures and
//! other artifacts stay with their image), their config and layer blobs, and the
//! children of kept indexes, recursively. Sweep: blob content that nothing marked and
//! that was not touched since the collection started.
//!
//! Writers touch the content they reference (blob commit, mount, manifest PUT) while
//! holding the GC lock shared; the sweep takes it exclusively for each deletion and
//! checks the modification time again under it. So a blob uploaded or linked while GC
//! runs is never deleted, and a manifest PUT either sees its blobs present and keeps
//! them, or finds them gone and fails cleanly with `MANIFEST_BLOB_UNKNOWN`.

use std::collections::HashSet;
use std::path::Path;
use std::time::SystemTime;

use serde_json::Value;

use super::storage::{FsStorage, Result, StorageError};
use crate::route::{Digest, RepoName};

/// Largest manifest read while marking.
const MAX_MANIFEST: u64 = 16 * 1024 * 1024;

#[derive(Debug, Clone, Copy, Default)]
pub struct GcOptions {
    /// Report what would go, delete nothing.
    pub dry_run: bool,
    /// Also remove manifests no tag reaches (and then their blobs).
    pub delete_untagged: bool,
    /// Content touched less than this long before the collection started is kept too:
    /// a push that uploaded its blobs just before and sends its manifest during the
    /// collection still finds them.
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
}

/// The digests a manifest references: (blobs, child manifests, subject).
fn references(json: &Value) -> (Vec<Digest>, Vec<Digest>, Option<Digest>) {
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

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// Run one collection. Blocking: call from the blocking pool or the CLI.
pub fn collect(storage: &FsStorage, options: GcOptions) -> Result<GcReport> {
    // The cut-off: content touched after it is in use, whatever the marks say.
    let started = SystemTime::now()
        .checked_sub(options.grace)
        .unwrap_or(SystemTime::UNIX_EPOCH);
    let mut report = GcReport::default();
    let mut marked: HashSet<Digest> = HashSet::new();
    let layout = storage.layout().clone();

    for name in storage.list_repositories()? {
        let Ok(repo) = RepoName::parse(&name) else {
            continue;
        };
        report.repositories += 1;
        let revisions = storage.list_revisions(&repo)?;
        let mut manifests: Vec<(Digest, Value)> = Vec::new();
        for d in &revisions {
            if let Some(bytes) = storage.read_blob(d, MAX_MANIFEST)?
                && let Ok(json) = serde_json::from_slice::<Value>(&bytes)
            {
                manifests.push((d.clone(), json));
            } else {
                // Unreadable content: keep the digest, never guess.
                marked.insert(d.clone());
            }
        }
        // Which manifests stay in this repository.
        let mut keep: HashSet<Digest> = if options.delete_untagged {
            let mut roots = HashSet::new();
            for tag in storage.list_tags(&repo)?.unwrap_or_default() {
                if let Some(d) = storage.resolve_tag(&repo, &tag)? {
                    roots.insert(d);
                }
            }
            roots
        } else {
            revisions.iter().cloned().collect()
        };
        // Children of kept indexes, and artifacts whose subject is kept, until stable.
        loop {
            let before = keep.len();
            for (d, json) in &manifests {
                let (_, children, subject) = references(json);
                if keep.contains(d) {
                    keep.extend(children);
                }
                if subject.is_some_and(|s| keep.contains(&s)) {
                    keep.insert(d.clone());
                }
            }
            if keep.len() == before {
                break;
            }
        }
        for (d, json) in &manifests {
            let link = layout.revision_link(&repo, d);
            let recent = modified(&link).is_some_and(|t| t >= started);
            if keep.contains(d) || recent {
                report.manifests_kept += 1;
                marked.insert(d.clone());
                let (blobs, children, _) = references(json);
                marked.extend(blobs);
                marked.extend(children);
            } else {
                report.manifests_removed.push(format!("{repo}@{d}"));
                if !options.dry_run {
                    storage.delete_manifest(&repo, d)?;
                }
            }
        }
    }

    // Sweep blob content.
    let blobs = layout.blobs();
    for alg in list(&blobs)? {
        for prefix in list(&blobs.join(&alg))? {
            for hex in list(&blobs.join(&alg).join(&prefix))? {
                let Ok(d) = Digest::parse(&format!("{alg}:{hex}")) else {
                    continue;
                };
                if marked.contains(&d) {
                    continue;
                }
                let data = layout.blob_data(&d);
                let Some(size) = storage.blob_size(&d)? else {
                    continue;
                };
                if options.dry_run {
                    if modified(&data).is_some_and(|t| t < started) {
                        report.bytes_freed += size;
                        report.blobs_removed.push((d.to_string(), size));
                    }
                    continue;
                }
                let _gc = storage.gc_exclusive_lock()?;
                // Touched since the collection started: somebody is using it.
                if modified(&data).is_none_or(|t| t >= started) {
                    continue;
                }
                let dir = layout.blob_dir(&d);
                std::fs::remove_dir_all(&dir).map_err(|source| StorageError::Io {
                    what: format!("remove {}", dir.display()),
                    source,
                })?;
                report.bytes_freed += size;
                report.blobs_removed.push((d.to_string(), size));
            }
        }
    }
    Ok(report)
}

fn list(dir: &Path) -> Result<Vec<String>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(StorageError::Io {
                what: format!("list {}", dir.display()),
                source,
            });
        }
    };
    let mut out = Vec::new();
    for entry in entries.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir())
            && let Some(name) = entry.file_name().to_str()
        {
            out.push(name.to_owned());
        }
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::digest::of_bytes;
    use std::time::Duration;

    fn digest(bytes: &[u8]) -> Digest {
        Digest::parse(&of_bytes("sha256", bytes).expect("digest")).expect("parse")
    }

    /// Store a blob as a layer of `repo`, dated in the past (as if before the GC).
    fn layer(s: &FsStorage, repo: &RepoName, bytes: &[u8]) -> Digest {
        let d = digest(bytes);
        s.write_blob(&d, bytes).expect("blob");
        s.link_layer(repo, &d).expect("link");
        backdate(s, &d);
        d
    }

    fn backdate(s: &FsStorage, d: &Digest) {
        let f = std::fs::OpenOptions::new()
            .append(true)
            .open(s.layout().blob_data(d))
            .expect("open");
        f.set_modified(SystemTime::now() - std::time::Duration::from_secs(3600))
            .expect("backdate");
    }

    fn manifest(
        s: &FsStorage,
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
        let d = digest(json.as_bytes());
        s.put_manifest(repo, &d, json.as_bytes(), tag)
            .expect("manifest");
        backdate(s, &d);
        d
    }

    #[test]
    fn keeps_referenced_and_recent_removes_the_rest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = FsStorage::open(dir.path()).expect("open");
        let repo = RepoName::parse("app").expect("name");
        let config = layer(&s, &repo, b"config");
        let kept = layer(&s, &repo, b"kept layer");
        let orphan = layer(&s, &repo, b"orphan layer");
        let old_config = layer(&s, &repo, b"old config");
        let old_layer = layer(&s, &repo, b"old layer");
        let tagged = manifest(&s, &repo, &config, &[&kept], Some("v1"));
        let untagged = manifest(&s, &repo, &old_config, &[&old_layer], None);
        // Touched "during" the collection (a time after it started): unreferenced,
        // but in use by a push under way.
        let fresh = digest(b"fresh");
        s.write_blob(&fresh, b"fresh").expect("blob");
        std::fs::OpenOptions::new()
            .append(true)
            .open(s.layout().blob_data(&fresh))
            .expect("open")
            .set_modified(SystemTime::now() + std::time::Duration::from_secs(600))
            .expect("date");

        let dry = collect(
            &s,
            GcOptions {
                dry_run: true,
                delete_untagged: true,
                grace: Duration::ZERO,
            },
        )
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
        assert!(
            s.blob_size(&orphan).expect("stat").is_some(),
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
        .expect("gc");
        assert!(graced.blobs_removed.is_empty(), "{graced:?}");
        let plain = collect(&s, GcOptions::default()).expect("gc");
        assert_eq!(plain.blobs_removed, vec![(orphan.to_string(), 12)]);
        assert!(
            s.blob_size(&old_layer).expect("stat").is_some(),
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
        .expect("gc");
        assert_eq!(report.manifests_removed, vec![format!("app@{untagged}")]);
        for gone in [&old_config, &old_layer, &untagged] {
            assert!(s.blob_size(gone).expect("stat").is_none(), "{gone}");
        }
        for stays in [&config, &kept, &tagged, &fresh] {
            assert!(s.blob_size(stays).expect("stat").is_some(), "{stays}");
        }
    }

    #[test]
    fn index_children_and_referrers_stay_with_their_root() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = FsStorage::open(dir.path()).expect("open");
        let repo = RepoName::parse("multi").expect("name");
        let c = layer(&s, &repo, b"cfg");
        let l = layer(&s, &repo, b"layer");
        let child = manifest(&s, &repo, &c, &[&l], None);
        let index = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": child.as_str(), "size": 1}],
        })
        .to_string();
        let index_d = digest(index.as_bytes());
        s.put_manifest(&repo, &index_d, index.as_bytes(), Some("latest"))
            .expect("index");
        let sig_cfg = layer(&s, &repo, b"sig config");
        let signature = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "c", "digest": sig_cfg.as_str(), "size": 1},
            "layers": [],
            "subject": {"mediaType": "application/vnd.oci.image.index.v1+json", "digest": index_d.as_str(), "size": 1},
        })
        .to_string();
        let sig_d = digest(signature.as_bytes());
        s.put_manifest(&repo, &sig_d, signature.as_bytes(), None)
            .expect("sig");
        backdate(&s, &sig_d);
        let report = collect(
            &s,
            GcOptions {
                dry_run: false,
                delete_untagged: true,
                grace: Duration::ZERO,
            },
        )
        .expect("gc");
        assert!(report.manifests_removed.is_empty(), "{report:?}");
        assert!(report.blobs_removed.is_empty(), "{report:?}");
    }
}
