//! `ls`, `rm` and `prune`, written once over a [`View`].
//!
//! `prune` walks one repository at a time and holds only that repository's tags and
//! manifests, plus the set of blob digests kept anywhere (to say how many bytes the
//! removal frees): memory grows with the number of distinct blobs, not with tags.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, SystemTime};

use futures_util::{StreamExt, TryStreamExt};
use serde::Serialize;
use serde_json::Value;

use super::rules::{Lifecycle, TagAge, Verdict};
use super::view::{Result, Tagged, View};
use crate::registry::gc::{close_over, references};
use crate::route::{Digest, RepoName};

/// Requests in flight at once against a view.
const PARALLEL: usize = 16;

/// Who runs a command, for the audit lines.
#[derive(Debug, Clone)]
pub struct Actor {
    pub name: String,
    pub from: String,
}

fn audit(actor: &Actor, action: &str, repo: &RepoName, what: &str, detail: &str) {
    tracing::info!(
        target: "registry_gate::audit",
        action,
        user = %actor.name,
        from = %actor.from,
        repository = %repo,
        "{action} {what}{detail}"
    );
}

/// One tag, for `ls REPO`.
#[derive(Debug, Clone, Serialize)]
pub struct TagSummary {
    pub tag: String,
    pub digest: String,
    #[serde(rename = "mediaType")]
    pub media_type: String,
    /// `os/arch[/variant]` of an index's children.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub platforms: Vec<String>,
    /// Bytes of the blobs the manifest references (an index: its children's, each
    /// blob once).
    pub size: u64,
    /// RFC 3339; absent when the registry does not say.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pushed: Option<String>,
}

/// One repository, for `ls`.
#[derive(Debug, Clone, Serialize)]
pub struct RepoSummary {
    pub repository: String,
    pub tags: usize,
    /// Bytes of the distinct blobs its tags reference.
    pub size: u64,
}

fn rfc3339(t: SystemTime) -> String {
    crate::auth::token::rfc3339(
        t.duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    )
}

fn media_type(json: &Value) -> String {
    crate::registry::manifests::media_type_of(json).to_owned()
}

fn parse(bytes: &[u8]) -> Option<Value> {
    serde_json::from_slice(bytes).ok()
}

/// The blobs (digest → size) a manifest references, and its children (an index).
fn blob_sizes(json: &Value) -> (HashMap<Digest, u64>, Vec<Digest>) {
    let mut blobs = HashMap::new();
    let sized = |v: &Value| -> Option<(Digest, u64)> {
        Some((
            Digest::parse(v.get("digest")?.as_str()?).ok()?,
            v.get("size")?.as_u64()?,
        ))
    };
    if let Some((d, s)) = json.get("config").and_then(sized) {
        blobs.insert(d, s);
    }
    for l in json
        .get("layers")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if let Some((d, s)) = sized(l) {
            blobs.insert(d, s);
        }
    }
    let (_, children, _) = references(json);
    (blobs, children)
}

/// The blobs a manifest reaches, through an index's children (read from the view).
async fn reach(view: &dyn View, repo: &RepoName, json: &Value) -> Result<HashMap<Digest, u64>> {
    let (mut blobs, children) = blob_sizes(json);
    let mut seen: HashSet<Digest> = HashSet::new();
    let mut queue = children;
    while let Some(child) = queue.pop() {
        if !seen.insert(child.clone()) || seen.len() > 1000 {
            continue;
        }
        if let Some(json) = view
            .manifest(repo, &child)
            .await?
            .as_deref()
            .and_then(parse)
        {
            let (b, c) = blob_sizes(&json);
            blobs.extend(b);
            queue.extend(c);
        }
    }
    Ok(blobs)
}

fn platforms(json: &Value) -> Vec<String> {
    json.get("manifests")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|m| {
            let p = m.get("platform")?;
            let mut s = format!(
                "{}/{}",
                p.get("os")?.as_str()?,
                p.get("architecture")?.as_str()?
            );
            if let Some(v) = p.get("variant").and_then(Value::as_str) {
                s = format!("{s}/{v}");
            }
            Some(s)
        })
        .collect()
}

/// Every tag of `repo` with what it points at, in name order.
async fn resolve_tags(view: &dyn View, repo: &RepoName) -> Result<Vec<(String, Tagged)>> {
    let tags = view.tags(repo).await?;
    let resolved: Vec<Option<(String, Tagged)>> = futures_util::stream::iter(
        tags.into_iter()
            .map(|t| async move { Ok::<_, String>(view.tag(repo, &t).await?.map(|x| (t, x))) }),
    )
    .buffered(PARALLEL)
    .try_collect()
    .await?;
    Ok(resolved.into_iter().flatten().collect())
}

/// `ls REPO`.
pub async fn list_tags(view: &dyn View, repo: &RepoName) -> Result<Vec<TagSummary>> {
    let tagged = resolve_tags(view, repo).await?;
    futures_util::stream::iter(tagged.into_iter().map(|(tag, t)| async move {
        let json = view
            .manifest(repo, &t.digest)
            .await?
            .as_deref()
            .and_then(parse)
            .unwrap_or(Value::Null);
        let size = reach(view, repo, &json).await?.values().sum();
        Ok::<_, String>(TagSummary {
            tag,
            digest: t.digest.to_string(),
            media_type: media_type(&json),
            platforms: platforms(&json),
            size,
            pushed: t.pushed.map(rfc3339),
        })
    }))
    .buffered(PARALLEL)
    .try_collect()
    .await
}

/// `ls`.
pub async fn list_repositories(view: &dyn View) -> Result<Vec<RepoSummary>> {
    let mut out = Vec::new();
    for name in view.repositories().await? {
        let Ok(repo) = RepoName::parse(&name) else {
            continue;
        };
        let tagged = resolve_tags(view, &repo).await?;
        let digests: HashSet<Digest> = tagged.iter().map(|(_, t)| t.digest.clone()).collect();
        let mut blobs: HashMap<Digest, u64> = HashMap::new();
        for d in digests {
            if let Some(json) = view.manifest(&repo, &d).await?.as_deref().and_then(parse) {
                blobs.extend(reach(view, &repo, &json).await?);
            }
        }
        out.push(RepoSummary {
            repository: name,
            tags: tagged.len(),
            size: blobs.values().sum(),
        });
    }
    Ok(out)
}

/// `ls REPO:TAG`: the manifest and its digest.
pub async fn show_tag(view: &dyn View, repo: &RepoName, tag: &str) -> Result<(Digest, Value)> {
    let t = view
        .tag(repo, tag)
        .await?
        .ok_or_else(|| format!("{repo}:{tag}: no such tag in {}", view.describe()))?;
    let bytes = view
        .manifest(repo, &t.digest)
        .await?
        .ok_or_else(|| format!("{repo}@{}: the tag's manifest is missing", t.digest))?;
    let json = parse(&bytes).ok_or_else(|| format!("{repo}@{}: not JSON", t.digest))?;
    Ok((t.digest, json))
}

fn immutable_refusal(life: &Lifecycle, repo: &RepoName, tag: &str) -> Option<String> {
    life.immutable_rule(repo.as_str(), tag).map(|n| {
        format!("{repo}:{tag} is immutable ([[immutable]] rule {n}): it cannot be deleted")
    })
}

/// `rm REPO:TAG`: the digest the tag pointed at, and the other tags still on it.
pub async fn remove_tag(
    view: &dyn View,
    life: &Lifecycle,
    actor: &Actor,
    repo: &RepoName,
    tag: &str,
    dry_run: bool,
) -> Result<(Digest, Vec<String>)> {
    if let Some(refusal) = immutable_refusal(life, repo, tag) {
        return Err(refusal);
    }
    view.deletes_allowed().await?;
    let t = view
        .tag(repo, tag)
        .await?
        .ok_or_else(|| format!("{repo}:{tag}: no such tag in {}", view.describe()))?;
    let others: Vec<String> = resolve_tags(view, repo)
        .await?
        .into_iter()
        .filter(|(name, x)| name != tag && x.digest == t.digest)
        .map(|(name, _)| name)
        .collect();
    if !dry_run {
        view.delete_tag(repo, tag).await?;
        audit(
            actor,
            "delete",
            repo,
            &format!("tag {repo}:{tag}"),
            &format!(" ({})", t.digest),
        );
    }
    Ok((t.digest, others))
}

/// `rm REPO@DIGEST`: the tags that went with the manifest.
pub async fn remove_manifest(
    view: &dyn View,
    life: &Lifecycle,
    actor: &Actor,
    repo: &RepoName,
    d: &Digest,
    dry_run: bool,
) -> Result<Vec<String>> {
    view.deletes_allowed().await?;
    if view.manifest(repo, d).await?.is_none() {
        return Err(format!(
            "{repo}@{d}: no such manifest in {}",
            view.describe()
        ));
    }
    let tags: Vec<String> = resolve_tags(view, repo)
        .await?
        .into_iter()
        .filter(|(_, x)| x.digest == *d)
        .map(|(name, _)| name)
        .collect();
    if let Some(refusal) = tags.iter().find_map(|t| immutable_refusal(life, repo, t)) {
        return Err(format!("{refusal}, so neither can {d}"));
    }
    if !dry_run {
        view.delete_manifest(repo, d).await?;
        audit(
            actor,
            "delete",
            repo,
            &format!("manifest {repo}@{d}"),
            &if tags.is_empty() {
                String::new()
            } else {
                format!(" with tags {}", tags.join(", "))
            },
        );
    }
    Ok(tags)
}

/// What `prune` did (or, dry, would do).
#[derive(Debug, Default)]
pub struct PruneReport {
    pub repositories: usize,
    /// `(repository, tag, digest, pushed)`.
    pub tags_removed: Vec<(String, String, Digest, Option<SystemTime>)>,
    /// `(repository, digest)`.
    pub manifests_removed: Vec<(String, Digest)>,
    /// Tags kept, by reason.
    pub kept_last: usize,
    pub kept_pinned: usize,
    pub kept_immutable: usize,
    pub kept_young: usize,
    pub kept_no_time: usize,
    /// Manifests left without a tag (their space comes back with `gc
    /// --delete-untagged`, or a rule with `untagged = true`).
    pub left_untagged: usize,
    /// Bytes of blobs only removed manifests referenced (freed by the next `gc`).
    pub bytes_freed: u64,
    /// What this view could not do (untagged manifests over the API, …).
    pub notes: Vec<String>,
    /// Failures on single items (the rest went on).
    pub errors: Vec<String>,
}

/// The options of one prune.
#[derive(Debug, Clone, Copy)]
pub struct PruneOptions {
    pub dry_run: bool,
    /// Untagged manifests stored more recently than this stay (a multi-platform push
    /// stores its children before the index that tags them).
    pub grace: Duration,
    pub now: SystemTime,
}

/// Apply the retention rules to every repository of `view`.
pub async fn prune(
    view: &dyn View,
    life: &Lifecycle,
    actor: &Actor,
    options: PruneOptions,
) -> Result<PruneReport> {
    let mut report = PruneReport::default();
    if life.retention.is_empty() {
        return Err("no [[retention]] rules in the configuration: nothing to apply".into());
    }
    if !options.dry_run {
        view.deletes_allowed().await?;
    }
    // Blobs of kept manifests anywhere, and of removed ones (digest → size).
    let mut kept_blobs: HashSet<Digest> = HashSet::new();
    let mut removed_blobs: HashMap<Digest, u64> = HashMap::new();
    let mut untagged_note = false;
    for name in view.repositories().await? {
        let Ok(repo) = RepoName::parse(&name) else {
            continue;
        };
        report.repositories += 1;
        let rule = life.retention_for(&name).cloned();
        let tagged = resolve_tags(view, &repo).await?;
        let ages: Vec<TagAge> = tagged
            .iter()
            .map(|(t, x)| TagAge {
                tag: t.clone(),
                pushed: x.pushed,
            })
            .collect();
        let verdicts: HashMap<String, Verdict> =
            life.judge(&name, &ages, options.now).into_iter().collect();
        let mut remaining: HashSet<Digest> = HashSet::new();
        let mut dropped: Vec<(String, Digest, Option<SystemTime>)> = Vec::new();
        for (tag, t) in &tagged {
            match verdicts.get(tag) {
                Some(Verdict::Go) => dropped.push((tag.clone(), t.digest.clone(), t.pushed)),
                other => {
                    match other {
                        Some(Verdict::KeepLast) => report.kept_last += 1,
                        Some(Verdict::KeepTag) => report.kept_pinned += 1,
                        Some(Verdict::Immutable(_)) => report.kept_immutable += 1,
                        Some(Verdict::Young) => report.kept_young += 1,
                        Some(Verdict::NoPushTime) => report.kept_no_time += 1,
                        _ => {}
                    }
                    remaining.insert(t.digest.clone());
                }
            }
        }
        // The manifests of this repository and which stay.
        let listed = view.revisions(&repo).await?;
        let untagged = rule.as_ref().is_some_and(|r| r.untagged);
        if untagged && listed.is_none() && !untagged_note {
            untagged_note = true;
            report.notes.push(format!(
                "{} cannot list manifests no tag names (the registry API has no such call): \
                 `untagged` removed only the manifests whose last tag this prune removed",
                view.describe()
            ));
        }
        let candidates: Vec<(Digest, SystemTime)> = match &listed {
            Some(all) => all.clone(),
            // Over the API: the tagged manifests, with the dropped ones as candidates.
            None => {
                let mut c: Vec<(Digest, SystemTime)> = remaining
                    .iter()
                    .chain(dropped.iter().map(|(_, d, _)| d))
                    .map(|d| (d.clone(), SystemTime::UNIX_EPOCH))
                    .collect();
                c.sort();
                c.dedup();
                c
            }
        };
        let contents: Vec<(Digest, SystemTime, Option<Value>, u64)> =
            futures_util::stream::iter(candidates.into_iter().map(|(d, at)| {
                let repo = &repo;
                async move {
                    let bytes = view.manifest(repo, &d).await?;
                    let len = bytes.as_ref().map_or(0, |b| b.len() as u64);
                    let json = bytes.as_deref().and_then(parse);
                    Ok::<_, String>((d, at, json, len))
                }
            }))
            .buffered(PARALLEL)
            .try_collect()
            .await?;
        let parsed: Vec<(&Digest, &Value)> = contents
            .iter()
            .filter_map(|(d, _, j, _)| j.as_ref().map(|j| (d, j)))
            .collect();
        let mut keep = remaining.clone();
        close_over(&parsed, &mut keep);
        let mut go_manifests: Vec<Digest> = Vec::new();
        for (d, at, json, len) in &contents {
            let was_dropped = dropped.iter().any(|(_, x, _)| x == d);
            // Unreadable content is never removed: nothing is known of what it keeps.
            let removable = untagged
                && json.is_some()
                && !keep.contains(d)
                && (listed.is_none() && was_dropped
                    || listed.is_some()
                        && options.now.duration_since(*at).unwrap_or_default() > options.grace);
            // A manifest's own bytes are a blob too.
            let mut blobs = match json {
                Some(j) => blob_sizes(j).0,
                None => HashMap::new(),
            };
            blobs.insert(d.clone(), *len);
            if removable {
                go_manifests.push(d.clone());
                removed_blobs.extend(blobs);
            } else {
                if !keep.contains(d) && (was_dropped || listed.is_some()) {
                    report.left_untagged += 1;
                }
                kept_blobs.extend(blobs.into_keys());
            }
        }
        // Tags first (a manifest DELETE would take them anyway), then manifests.
        for (tag, d, pushed) in dropped {
            if !options.dry_run {
                if let Err(e) = view.delete_tag(&repo, &tag).await {
                    report.errors.push(format!("{repo}:{tag}: {e}"));
                    continue;
                }
                audit(
                    actor,
                    "prune",
                    &repo,
                    &format!("tag {repo}:{tag}"),
                    &format!(" ({d})"),
                );
            }
            report.tags_removed.push((name.clone(), tag, d, pushed));
        }
        for d in go_manifests {
            if !options.dry_run {
                if let Err(e) = view.delete_manifest(&repo, &d).await {
                    report.errors.push(format!("{repo}@{d}: {e}"));
                    continue;
                }
                audit(
                    actor,
                    "prune",
                    &repo,
                    &format!("manifest {repo}@{d}"),
                    " (untagged)",
                );
            }
            report.manifests_removed.push((name.clone(), d));
        }
    }
    report.bytes_freed = removed_blobs
        .iter()
        .filter(|(d, _)| !kept_blobs.contains(*d))
        .map(|(_, s)| s)
        .sum();
    Ok(report)
}
