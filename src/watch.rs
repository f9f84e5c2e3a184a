//! Live reload of files the gate reads at start (certificates, password files).
//!
//! Polling, not inotify: certbot replaces files through symlinks (`live/` → `archive/`),
//! editors replace them by rename, and some deployments mount them from elsewhere; a
//! comparison of (device, inode, size, mtime) of the followed path catches all of these.
//! A reload also happens on SIGHUP. A reload that fails keeps the old state; the caller
//! logs why.

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::Duration;

use tokio::sync::watch;

/// What identifies one version of a file.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Fingerprint {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: i64,
    mtime_nsec: i64,
}

fn fingerprint(path: &PathBuf) -> Option<Fingerprint> {
    let m = std::fs::metadata(path).ok()?;
    Some(Fingerprint {
        dev: m.dev(),
        ino: m.ino(),
        len: m.len(),
        mtime: m.mtime(),
        mtime_nsec: m.mtime_nsec(),
    })
}

/// A set of files and the versions last seen.
pub struct FileSet {
    paths: Vec<PathBuf>,
    seen: Vec<Option<Fingerprint>>,
}

impl FileSet {
    /// Remember the files as they are now.
    pub fn new(paths: Vec<PathBuf>) -> Self {
        let seen = paths.iter().map(fingerprint).collect();
        FileSet { paths, seen }
    }

    /// Whether any file differs from when it was last seen (and remember the new state).
    pub fn changed(&mut self) -> bool {
        let now: Vec<_> = self.paths.iter().map(fingerprint).collect();
        let changed = now != self.seen;
        self.seen = now;
        changed
    }
}

/// A counter bumped on every SIGHUP; reloaders watch it.
pub type Hangups = watch::Receiver<u64>;

/// Run `reload` whenever one of `paths` changes (checked every `interval`) or a SIGHUP
/// arrives, until the hangup sender is dropped. `reload` runs on the blocking pool:
/// it reads files and may parse large ones.
pub fn spawn_reloader<F>(
    what: &'static str,
    paths: Vec<PathBuf>,
    interval: Duration,
    mut hangups: Hangups,
    reload: F,
) -> tokio::task::JoinHandle<()>
where
    F: Fn() + Send + Sync + 'static,
{
    let reload = std::sync::Arc::new(reload);
    tokio::spawn(async move {
        let mut files = FileSet::new(paths);
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let forced = tokio::select! {
                _ = tick.tick() => false,
                changed = hangups.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    true
                }
            };
            // Always refresh the fingerprints, so a forced reload does not cause a second.
            let changed = files.changed();
            if !(forced || changed) {
                continue;
            }
            tracing::debug!(what, forced, "reloading");
            let reload = reload.clone();
            if let Err(e) = tokio::task::spawn_blocking(move || reload()).await {
                tracing::error!(what, "reload task failed: {e}");
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notices_rewrite_and_replace() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("f");
        std::fs::write(&p, "one").expect("write");
        let mut set = FileSet::new(vec![p.clone()]);
        assert!(!set.changed());
        std::fs::write(&p, "three").expect("write");
        assert!(set.changed());
        assert!(!set.changed());
        let q = dir.path().join("g");
        std::fs::write(&q, "other").expect("write");
        std::fs::rename(&q, &p).expect("rename");
        assert!(set.changed());
        std::fs::remove_file(&p).expect("rm");
        assert!(set.changed());
    }
}
