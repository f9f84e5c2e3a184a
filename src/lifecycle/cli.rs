//! The `ls`, `rm` and `prune` subcommands: where they work (the local store of
//! `--config`, or `--url` with credentials), and how they print.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use base64::Engine as _;

use super::ops::{self, Actor, PruneOptions};
use super::rules::Lifecycle;
use super::view::{LocalView, RemoteView, View, parse_repo};
use crate::config::Config;
use crate::route::Digest;

/// Where a command works.
#[derive(Debug, Clone)]
pub struct Target {
    pub config: PathBuf,
    /// Whether `--config` was given (a remote command reads it only then, or when the
    /// default file exists).
    pub config_given: bool,
    pub url: Option<String>,
    pub user: Option<String>,
    pub ca_cert: Option<PathBuf>,
}

/// The view and the rules of a target.
pub struct Opened {
    pub view: Box<dyn View>,
    pub life: Lifecycle,
    pub actor: Actor,
    /// The local configuration (for `prune --gc` and the grace period).
    pub config: Option<Config>,
}

fn os_user() -> String {
    std::env::var("SUDO_USER")
        .or_else(|_| std::env::var("USER"))
        .unwrap_or_else(|_| "unknown".into())
}

/// Rules from a configuration read only for them (a remote command): the files it
/// names need not exist on this machine.
fn rules_only(path: &Path) -> Result<Lifecycle, String> {
    let config = Config::load_unchecked(path).map_err(|e| e.to_string())?;
    for (i, r) in config.retention.iter().enumerate() {
        if let Some(p) = r.problem() {
            return Err(format!("{}: [[retention]] {}: {p}", path.display(), i + 1));
        }
    }
    for (i, r) in config.immutable.iter().enumerate() {
        if let Some(p) = r.problem() {
            return Err(format!("{}: [[immutable]] {}: {p}", path.display(), i + 1));
        }
    }
    Ok(config.lifecycle())
}

/// Credentials for `host` saved by `docker login` or `podman login`.
fn saved_credentials(host: &str) -> Option<(String, String)> {
    let home = std::env::var_os("HOME").map(PathBuf::from);
    let mut files: Vec<PathBuf> = Vec::new();
    if let Some(f) = std::env::var_os("REGISTRY_AUTH_FILE") {
        files.push(f.into());
    }
    if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR") {
        files.push(PathBuf::from(d).join("containers/auth.json"));
    }
    if let Some(h) = &home {
        files.push(h.join(".config/containers/auth.json"));
    }
    match std::env::var_os("DOCKER_CONFIG") {
        Some(d) => files.push(PathBuf::from(d).join("config.json")),
        None => {
            if let Some(h) = &home {
                files.push(h.join(".docker/config.json"));
            }
        }
    }
    for file in files {
        let Some(json) = std::fs::read(&file)
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        else {
            continue;
        };
        let Some(auths) = json.get("auths").and_then(|a| a.as_object()) else {
            continue;
        };
        let entry = auths.iter().find(|(k, _)| {
            let k = k
                .trim_start_matches("https://")
                .trim_start_matches("http://")
                .trim_end_matches('/');
            k == host
        });
        let Some(auth) = entry
            .and_then(|(_, v)| v.get("auth"))
            .and_then(|a| a.as_str())
        else {
            continue;
        };
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(auth.trim())
            .ok()
            .and_then(|b| String::from_utf8(b).ok());
        if let Some((user, password)) = decoded.as_deref().and_then(|s| s.split_once(':')) {
            tracing::debug!(file = %file.display(), "using saved credentials");
            return Some((user.to_owned(), password.to_owned()));
        }
    }
    None
}

impl Target {
    pub fn open(&self) -> Result<Opened, String> {
        match &self.url {
            None => {
                let config = Config::load(&self.config).map_err(|e| e.to_string())?;
                let storage = match (&config.upstream, &config.storage) {
                    (None, Some(s)) => s.clone(),
                    _ => {
                        return Err(format!(
                            "{} fronts a registry ([upstream]): give --url https://host:port \
                             to work through the gate",
                            self.config.display()
                        ));
                    }
                };
                let store =
                    crate::registry::store::Store::new(crate::registry::open_storage(&storage)?);
                let what = format!("{} ({})", self.config.display(), store.storage().describe());
                Ok(Opened {
                    view: Box::new(LocalView {
                        store,
                        deletes: storage.delete,
                        what,
                    }),
                    life: config.lifecycle(),
                    actor: Actor {
                        name: os_user(),
                        from: "cli".into(),
                    },
                    config: Some(config),
                })
            }
            Some(url) => {
                let life = if self.config_given || self.config.exists() {
                    rules_only(&self.config)?
                } else {
                    Lifecycle::default()
                };
                let probe = RemoteView::new(url, None, self.ca_cert.as_deref())?;
                let credentials = match &self.user {
                    Some(user) => {
                        let password =
                            crate::users::read_password(false).map_err(|e| e.to_string())?;
                        Some((user.clone(), password))
                    }
                    None => saved_credentials(probe.host()),
                };
                let name = credentials
                    .as_ref()
                    .map_or_else(|| "-".to_owned(), |(u, _)| u.clone());
                let view = RemoteView::new(url, credentials, self.ca_cert.as_deref())?;
                Ok(Opened {
                    view: Box::new(view),
                    life,
                    actor: Actor {
                        name,
                        from: format!("cli via {url}"),
                    },
                    config: None,
                })
            }
        }
    }
}

/// Bytes for people.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

fn short_type(mt: &str) -> &str {
    match mt {
        crate::registry::manifests::OCI_MANIFEST => "oci image",
        crate::registry::manifests::OCI_INDEX => "oci index",
        crate::registry::manifests::DOCKER_MANIFEST => "docker image",
        crate::registry::manifests::DOCKER_LIST => "docker list",
        other => other,
    }
}

fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(i, cell)| format!("{cell:<w$}", w = widths[i]))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// `REPO`, `REPO:TAG` or `REPO@DIGEST`.
enum Subject {
    Repo(crate::route::RepoName),
    Tag(crate::route::RepoName, String),
    Manifest(crate::route::RepoName, Digest),
}

fn subject(s: &str) -> Result<Subject, String> {
    if let Some((repo, d)) = s.split_once('@') {
        let d = Digest::parse(d).map_err(|e| format!("{s}: {e}"))?;
        return Ok(Subject::Manifest(parse_repo(repo)?, d));
    }
    // A tag follows the last ':' after the last '/' (a host:port is not a repository).
    let slash = s.rfind('/').map_or(0, |i| i + 1);
    if let Some(i) = s[slash..].rfind(':') {
        let (repo, tag) = (&s[..slash + i], &s[slash + i + 1..]);
        crate::route::Reference::parse(tag).map_err(|e| format!("{s}: {e}"))?;
        return Ok(Subject::Tag(parse_repo(repo)?, tag.to_owned()));
    }
    Ok(Subject::Repo(parse_repo(s)?))
}

/// `registry-gate ls [REPO[:TAG]]`.
pub fn ls(target: &Target, what: Option<&str>, json: bool) -> Result<(), String> {
    let opened = target.open()?;
    let view = opened.view.as_ref();
    let rt = crate::runtime()?;
    match what.map(subject).transpose()? {
        None => {
            let repos = rt.block_on(ops::list_repositories(view))?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&repos).unwrap_or_default()
                );
            } else {
                let mut rows = vec![vec!["REPOSITORY".into(), "TAGS".into(), "SIZE".into()]];
                rows.extend(
                    repos
                        .iter()
                        .map(|r| vec![r.repository.clone(), r.tags.to_string(), human(r.size)]),
                );
                print!("{}", table(&rows));
            }
        }
        Some(Subject::Repo(repo)) => {
            let tags = rt.block_on(ops::list_tags(view, &repo))?;
            if tags.is_empty()
                && !rt
                    .block_on(view.repositories())?
                    .iter()
                    .any(|r| *r == repo.as_str())
            {
                return Err(format!("{repo}: no such repository in {}", view.describe()));
            }
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&tags).unwrap_or_default()
                );
            } else {
                let mut rows = vec![
                    ["TAG", "DIGEST", "TYPE", "PLATFORMS", "SIZE", "PUSHED"]
                        .map(String::from)
                        .to_vec(),
                ];
                rows.extend(tags.iter().map(|t| {
                    vec![
                        t.tag.clone(),
                        t.digest.chars().take(19).collect(),
                        short_type(&t.media_type).to_owned(),
                        if t.platforms.is_empty() {
                            "-".into()
                        } else {
                            t.platforms.join(",")
                        },
                        human(t.size),
                        t.pushed.clone().unwrap_or_else(|| "-".into()),
                    ]
                }));
                print!("{}", table(&rows));
            }
        }
        Some(Subject::Tag(repo, tag)) => {
            let (d, manifest) = rt.block_on(ops::show_tag(view, &repo, &tag))?;
            if json {
                let out = serde_json::json!({ "repository": repo.as_str(), "tag": tag,
                    "digest": d.as_str(), "manifest": manifest });
                println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
            } else {
                println!("# {repo}:{tag} {d}");
                println!(
                    "{}",
                    serde_json::to_string_pretty(&manifest).unwrap_or_default()
                );
            }
        }
        Some(Subject::Manifest(repo, d)) => {
            let bytes = rt
                .block_on(view.manifest(&repo, &d))?
                .ok_or_else(|| format!("{repo}@{d}: no such manifest"))?;
            println!("{}", String::from_utf8_lossy(&bytes));
        }
    }
    Ok(())
}

/// `registry-gate rm REPO:TAG | REPO@DIGEST`.
pub fn rm(target: &Target, what: &str, dry_run: bool) -> Result<(), String> {
    let opened = target.open()?;
    let view = opened.view.as_ref();
    let rt = crate::runtime()?;
    let verb = if dry_run { "would remove" } else { "removed" };
    match subject(what)? {
        Subject::Repo(repo) => Err(format!(
            "{repo}: name a tag (REPO:TAG) or a manifest (REPO@DIGEST)"
        )),
        Subject::Tag(repo, tag) => {
            let (d, others) = rt.block_on(ops::remove_tag(
                view,
                &opened.life,
                &opened.actor,
                &repo,
                &tag,
                dry_run,
            ))?;
            if others.is_empty() {
                println!("{verb} tag {repo}:{tag} ({d}; the manifest is now untagged)");
            } else {
                println!(
                    "{verb} tag {repo}:{tag} ({d}; still tagged {})",
                    others.join(", ")
                );
            }
            Ok(())
        }
        Subject::Manifest(repo, d) => {
            let tags = rt.block_on(ops::remove_manifest(
                view,
                &opened.life,
                &opened.actor,
                &repo,
                &d,
                dry_run,
            ))?;
            if tags.is_empty() {
                println!("{verb} manifest {repo}@{d} (it had no tags)");
            } else {
                println!(
                    "{verb} manifest {repo}@{d} and its tags: {}",
                    tags.join(", ")
                );
            }
            Ok(())
        }
    }
}

/// `registry-gate prune [--dry-run] [--gc]`.
pub fn prune(target: &Target, dry_run: bool, then_gc: bool) -> Result<(), String> {
    let opened = target.open()?;
    if then_gc && opened.config.is_none() {
        return Err(
            "--gc frees space in the local store: run `registry-gate gc` on the host \
                    of the registry (or let its schedule do it)"
                .into(),
        );
    }
    let grace = opened
        .config
        .as_ref()
        .and_then(|c| c.storage.as_ref())
        .map_or(crate::registry::gc::DEFAULT_GRACE, |s| {
            Duration::from_secs(s.gc_grace_secs)
        });
    let rt = crate::runtime()?;
    let options = PruneOptions {
        dry_run,
        grace,
        now: SystemTime::now(),
    };
    let report = rt.block_on(ops::prune(
        opened.view.as_ref(),
        &opened.life,
        &opened.actor,
        options,
    ))?;
    print!("{}", describe_prune(&report, dry_run, options.now));
    if then_gc && !dry_run {
        let storage = opened
            .config
            .as_ref()
            .and_then(|c| c.storage.clone())
            .ok_or("no [storage]")?;
        let store = crate::registry::store::Store::new(crate::registry::open_storage(&storage)?);
        let gc = rt
            .block_on(crate::registry::gc::collect(
                &store,
                crate::registry::gc::GcOptions {
                    dry_run: false,
                    delete_untagged: false,
                    grace,
                },
            ))
            .map_err(|e| e.to_string())?;
        println!(
            "gc: removed {} blobs, {} freed",
            gc.blobs_removed.len(),
            human(gc.bytes_freed)
        );
    }
    if report.errors.is_empty() {
        Ok(())
    } else {
        Err(format!("{} removals failed", report.errors.len()))
    }
}

/// The report `prune` prints.
pub fn describe_prune(report: &ops::PruneReport, dry_run: bool, now: SystemTime) -> String {
    use std::fmt::Write as _;
    let verb = if dry_run { "would remove" } else { "removed" };
    let mut out = String::new();
    for (repo, tag, d, pushed) in &report.tags_removed {
        let age = pushed
            .map(|p| {
                let days = now.duration_since(p).unwrap_or_default().as_secs() / 86_400;
                format!(", pushed {days} days ago")
            })
            .unwrap_or_default();
        let _ = writeln!(out, "{verb} tag {repo}:{tag} ({d}{age})");
    }
    for (repo, d) in &report.manifests_removed {
        let _ = writeln!(out, "{verb} manifest {repo}@{d} (untagged)");
    }
    for e in &report.errors {
        let _ = writeln!(out, "failed: {e}");
    }
    for n in &report.notes {
        let _ = writeln!(out, "note: {n}");
    }
    let _ = writeln!(
        out,
        "kept: {} newest (keep_last), {} pinned (keep_tags), {} immutable, {} younger than \
         older_than_days, {} without a push time",
        report.kept_last,
        report.kept_pinned,
        report.kept_immutable,
        report.kept_young,
        report.kept_no_time
    );
    let _ = writeln!(
        out,
        "prune: {verb} {} tags and {} manifests in {} repositories; frees {} once gc runs{}",
        report.tags_removed.len(),
        report.manifests_removed.len(),
        report.repositories,
        human(report.bytes_freed),
        if report.left_untagged > 0 {
            format!(
                " ({} manifests stay untagged: `gc --delete-untagged` or untagged = true \
                 frees them)",
                report.left_untagged
            )
        } else {
            String::new()
        }
    );
    out
}

/// A scheduled prune inside the server (`[storage] prune_interval_secs`).
pub async fn scheduled(
    store: crate::registry::store::Store,
    deletes: bool,
    life: Arc<Lifecycle>,
    grace: Duration,
    notifier: Option<&crate::notify::Notifier>,
) {
    let view = LocalView {
        what: store.storage().describe(),
        store,
        deletes,
    };
    let actor = Actor {
        name: "schedule".into(),
        from: "server".into(),
    };
    let options = PruneOptions {
        dry_run: false,
        grace,
        now: SystemTime::now(),
    };
    match ops::prune(&view, &life, &actor, options).await {
        Ok(r) => {
            if let Some(n) = notifier {
                prune_events(n, &r);
            }
            tracing::info!(
                tags = r.tags_removed.len(),
                manifests = r.manifests_removed.len(),
                errors = r.errors.len(),
                "scheduled prune: {}",
                describe_prune(&r, false, options.now)
                    .lines()
                    .last()
                    .unwrap_or("")
            )
        }
        Err(e) => tracing::error!("scheduled prune failed: {e}"),
    }
}

/// The delete events of a scheduled prune: one per tag and per manifest it removed.
fn prune_events(notifier: &crate::notify::Notifier, r: &ops::PruneReport) {
    use crate::notify::{Action, ActorRecord, Target, internal_request};
    if !notifier.wants(Action::Delete) {
        return;
    }
    let tags = r
        .tags_removed
        .iter()
        .map(|(repo, tag, digest, _)| (repo, tag.as_str(), digest));
    let manifests = r.manifests_removed.iter().map(|(repo, d)| (repo, "", d));
    for (repo, tag, digest) in tags.chain(manifests) {
        let target = Target {
            digest: digest.to_string(),
            repository: repo.clone(),
            tag: tag.to_owned(),
            ..Target::default()
        };
        let actor = ActorRecord {
            name: "prune".into(),
        };
        notifier.publish(
            Action::Delete,
            target,
            internal_request("registry-gate prune"),
            actor,
        );
    }
}
