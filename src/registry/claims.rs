//! How writers and the garbage collector agree, on any storage and across any number
//! of gates and `registry-gate gc` processes, with plain puts, reads and lists (no
//! locks: an object store has none, and Garage ignores conditional writes).
//!
//! * A writer about to rely on content that may already exist (a manifest PUT on its
//!   blobs and child manifests, a mount, an upload whose blob is already stored)
//!   first writes a **claim**, `registry-gate/gc/refs/<millis>-<random>`, listing the
//!   digests, then reads the **sweep marker**, `registry-gate/gc/sweep`. Only then does
//!   it check that the content is there and write its links; after them it marks the
//!   claim done (rewrites it).
//! * The collector notes its start by the store's clock (an object it writes), marks,
//!   and deletes in batches. For each batch it writes the sweep marker (the digests
//!   it is about to delete, and until when the marker holds), then lists the claims,
//!   drops every digest a claim protects from the batch, deletes the rest and removes
//!   the marker.
//!
//! A claim protects its digests when it was written after the collection's cut-off
//! (start − grace: recent use keeps content, as a recent upload does), or when it is
//! not done yet and was written within [`CLAIM_MARGIN`] before the start (its writer
//! may still be at work; a writer gives up rather than write links more than
//! [`WRITE_LIMIT`] after its claim). A done claim from before the cut-off protects
//! nothing: what its writer wrote was there before the collection marked.
//!
//! Either the collector's list sees the writer's claim (and keeps the digests), or the
//! list came first; then the marker was written before the claim, so the writer's read
//! sees it. A writer that finds its digests in the marker waits until the marker is
//! gone (or has expired) and then checks existence as usual: it finds the content, or
//! answers `MANIFEST_BLOB_UNKNOWN` / stores the blob again. The order of the writes and
//! reads on each side is what makes this hold; the store must be strongly consistent
//! for reads and lists after writes (S3 and Garage are).
//!
//! A collection never waits on writers. Claims are small; they are removed once done
//! and older than a collection's cut-off, or older than [`CLAIM_LIFETIME`] (by the
//! upload purger).

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::storage::{Key, Layout, Result, StorageError};
use super::store::Store;
use crate::route::Digest;

/// How long a sweep marker holds after it is written; the collector stops deleting
/// from a batch well before (`SWEEP_DEADLINE`), so a clock skew between hosts of up to
/// a minute is harmless.
const SWEEP_TTL: Duration = Duration::from_secs(120);
pub const SWEEP_DEADLINE: Duration = Duration::from_secs(60);
/// How often a waiting writer looks at the marker again, and for how long at most.
const WAIT_STEP: Duration = Duration::from_millis(200);
const WAIT_MAX: Duration = Duration::from_secs(150);
/// A writer writes its links within this long after its claim, or fails.
pub const WRITE_LIMIT: Duration = Duration::from_secs(60);
/// Claims not done yet count when written this long before a collection started.
pub const CLAIM_MARGIN: Duration = Duration::from_secs(5 * 60);
/// Claims older than this are removed by the upload purger even when no collection
/// runs.
pub const CLAIM_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// Largest claim or marker read.
const MAX_OBJECT: u64 = 8 * 1024 * 1024;

const CLAIMED: &str = "claimed";
const DONE: &str = "done";

/// The sweep marker.
#[derive(Debug, Serialize, Deserialize)]
struct Sweep {
    run: String,
    /// Seconds since the epoch, by the collector's clock.
    expires: u64,
    digests: Vec<String>,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn claim_text(state: &str, digests: &[Digest]) -> Bytes {
    let mut text = format!("{state}\n");
    for d in digests {
        text.push_str(d.as_str());
        text.push('\n');
    }
    Bytes::from(text)
}

/// A claim a writer holds; mark it [`Claim::done`] once its links are written.
pub struct Claim {
    key: Option<Key>,
    digests: Vec<Digest>,
    at: Instant,
}

impl Claim {
    /// Fail rather than write links this long after the claim (the collector would
    /// no longer count it).
    pub fn check_fresh(&self, store: &Store) -> Result<()> {
        if self.key.is_some() && self.at.elapsed() > WRITE_LIMIT {
            return Err(StorageError::Unavailable {
                store: store.storage().describe(),
                detail: format!(
                    "a write took more than {} s after claiming its content; retry",
                    WRITE_LIMIT.as_secs()
                ),
            });
        }
        Ok(())
    }

    /// The writer is finished (its links are written, or it gave up).
    pub async fn done(self, store: &Store) -> Result<()> {
        match &self.key {
            Some(key) => {
                store
                    .storage()
                    .put(key, claim_text(DONE, &self.digests))
                    .await
            }
            None => Ok(()),
        }
    }
}

/// Claim `digests` before relying on them (see the module). Returns once no sweep
/// under way deletes any of them; the caller checks existence afterwards.
pub async fn claim(store: &Store, digests: &[Digest]) -> Result<Claim> {
    if digests.is_empty() {
        return Ok(Claim {
            key: None,
            digests: Vec::new(),
            at: Instant::now(),
        });
    }
    let millis = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    let random: u64 = rand::random();
    let key = Layout
        .gc_refs()
        .child(&format!("{millis:015}-{random:016x}"));
    store
        .storage()
        .put(&key, claim_text(CLAIMED, digests))
        .await?;
    let claim = Claim {
        key: Some(key),
        digests: digests.to_vec(),
        at: Instant::now(),
    };
    let wanted: HashSet<&str> = digests.iter().map(Digest::as_str).collect();
    let mut logged = false;
    loop {
        let Some(sweep) = read_sweep(store).await? else {
            return Ok(claim);
        };
        let blocking =
            sweep.expires > now_secs() && sweep.digests.iter().any(|d| wanted.contains(d.as_str()));
        if !blocking {
            return Ok(claim);
        }
        if !logged {
            tracing::info!(
                run = sweep.run,
                "waiting for a garbage collection batch that deletes content this write uses"
            );
            logged = true;
        }
        if claim.at.elapsed() > WAIT_MAX {
            return Err(StorageError::Unavailable {
                store: store.storage().describe(),
                detail: format!(
                    "garbage collection run {} has held content this write needs for {} s",
                    sweep.run,
                    WAIT_MAX.as_secs()
                ),
            });
        }
        tokio::time::sleep(WAIT_STEP).await;
    }
}

async fn read_sweep(store: &Store) -> Result<Option<Sweep>> {
    let Some((bytes, _)) = store.storage().read(&Layout.gc_sweep(), MAX_OBJECT).await? else {
        return Ok(None);
    };
    // A marker that cannot be read is treated as one that blocks nothing: it can only
    // come from a collector interrupted while writing, and holds no valid deadline.
    Ok(serde_json::from_slice(&bytes).ok())
}

/// The collector's side.
pub struct Collector {
    store: Store,
    run: String,
    run_key: Key,
    /// The collection's start and cut-off, by the store's clock.
    started: SystemTime,
    cutoff: SystemTime,
    grace: Duration,
    /// Claims read so far, by key and version (a claim is rewritten once, when done).
    read: HashMap<Key, (String, bool, Vec<String>)>,
}

impl Collector {
    /// Note the start of a collection by the store's clock (writes
    /// `registry-gate/gc/runs/<run>`); content written within `grace` before it is
    /// kept.
    pub async fn start(store: &Store, grace: Duration) -> Result<Collector> {
        let run = super::digest::hex(&rand::random::<[u8; 6]>());
        let run_key = Layout.ours().child("gc/runs").child(&run);
        let started_local = crate::auth::token::rfc3339(crate::auth::token::now_secs());
        store
            .storage()
            .put(&run_key, Bytes::from(started_local))
            .await?;
        // From a listing, as every time it is compared with: an object store's HEAD
        // gives whole seconds (`Last-Modified`), its listings milliseconds.
        let started = store
            .storage()
            .list(&Layout.ours().child("gc/runs"))
            .await?
            .into_iter()
            .find(|(k, _)| *k == run_key)
            .map(|(_, m)| m.modified)
            .unwrap_or_else(SystemTime::now);
        Ok(Collector {
            store: store.clone(),
            run,
            run_key,
            started,
            cutoff: started.checked_sub(grace).unwrap_or(UNIX_EPOCH),
            grace,
            read: HashMap::new(),
        })
    }

    /// Content written after this is kept whatever the marks say.
    pub fn cutoff(&self) -> SystemTime {
        self.cutoff
    }

    pub fn grace(&self) -> Duration {
        self.grace
    }

    /// The digests claims protect now (see the module).
    pub async fn protected(&mut self) -> Result<HashSet<String>> {
        let margin = self.started.checked_sub(CLAIM_MARGIN).unwrap_or(UNIX_EPOCH);
        let mut out = HashSet::new();
        for (key, meta) in self.store.storage().list(&Layout.gc_refs()).await? {
            if meta.modified < self.cutoff.min(margin) {
                continue;
            }
            let stale = self
                .read
                .get(&key)
                .is_none_or(|(version, _, _)| *version != meta.version);
            if stale {
                let entry = match self.store.storage().read(&key, MAX_OBJECT).await? {
                    Some((bytes, meta)) => {
                        let text = String::from_utf8_lossy(&bytes);
                        let mut lines = text.lines();
                        let done = lines.next() == Some(DONE);
                        (meta.version, done, lines.map(str::to_owned).collect())
                    }
                    // Removed meanwhile: it protected nothing any more.
                    None => (meta.version.clone(), true, Vec::new()),
                };
                self.read.insert(key.clone(), entry);
            }
            if let Some((_, done, digests)) = self.read.get(&key) {
                let counts = meta.modified >= self.cutoff || (!done && meta.modified >= margin);
                if counts {
                    out.extend(digests.iter().cloned());
                }
            }
        }
        Ok(out)
    }

    /// Announce that `digests` are about to be deleted (the marker), then return those
    /// claims protect: they must not be deleted.
    pub async fn begin_batch(&mut self, digests: &[Digest]) -> Result<HashSet<String>> {
        let marker = Sweep {
            run: self.run.clone(),
            expires: now_secs() + SWEEP_TTL.as_secs(),
            digests: digests.iter().map(|d| d.to_string()).collect(),
        };
        let json = serde_json::to_vec(&marker).map_err(|e| StorageError::Task(e.to_string()))?;
        self.store
            .storage()
            .put(&Layout.gc_sweep(), Bytes::from(json))
            .await?;
        self.protected().await
    }

    /// The batch is done.
    pub async fn end_batch(&mut self) -> Result<()> {
        self.store.storage().delete(&Layout.gc_sweep()).await
    }

    /// The collection is over: remove its start note and (unless it was a dry run)
    /// the claims that can no longer protect anything (done, and older than the
    /// cut-off); returns how many.
    pub async fn finish(self, dry_run: bool) -> Result<usize> {
        self.store.storage().delete(&self.run_key).await?;
        let mut removed = 0;
        if dry_run {
            return Ok(0);
        }
        for (key, meta) in self.store.storage().list(&Layout.gc_refs()).await? {
            let done = self
                .read
                .get(&key)
                .is_some_and(|(v, done, _)| *done && *v == meta.version);
            if done && meta.modified < self.cutoff {
                self.store.storage().delete(&key).await?;
                removed += 1;
            }
        }
        Ok(removed)
    }
}

/// Remove claims written before `before`; returns how many went.
pub async fn remove_claims_before(store: &Store, before: SystemTime) -> Result<usize> {
    let mut removed = 0;
    for (key, meta) in store.storage().list(&Layout.gc_refs()).await? {
        if meta.modified < before {
            store.storage().delete(&key).await?;
            removed += 1;
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::storage::fs::FsStorage;
    use std::sync::Arc;

    fn digest(n: u8) -> Digest {
        Digest::parse(&format!("sha256:{}", format!("{n:02x}").repeat(32))).expect("digest")
    }

    #[tokio::test]
    async fn claims_protect_while_in_flight_and_a_late_one_waits_for_the_batch() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::new(Arc::new(FsStorage::open(dir.path()).expect("open")));
        let in_flight = claim(&store, &[digest(1)]).await.expect("claim");
        let finished = claim(&store, &[digest(4)]).await.expect("claim");
        finished.done(&store).await.expect("done");
        // File times are coarse (a clock tick): let the start come after.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut gc = Collector::start(&store, Duration::ZERO)
            .await
            .expect("start");
        let protected = gc
            .begin_batch(&[digest(1), digest(2), digest(4)])
            .await
            .expect("batch");
        assert!(protected.contains(digest(1).as_str()), "in flight");
        assert!(!protected.contains(digest(2).as_str()), "never claimed");
        assert!(
            !protected.contains(digest(4).as_str()),
            "done before the collection started"
        );

        // A writer claiming digest 2 now finds it in the marker and waits for the end.
        let waiting = {
            let store = store.clone();
            tokio::spawn(async move { claim(&store, &[digest(2)]).await.map(drop) })
        };
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(!waiting.is_finished(), "the writer waits for the batch");
        // A writer of other content does not wait.
        claim(&store, &[digest(3)]).await.expect("claim 3");
        gc.end_batch().await.expect("end");
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("the writer goes on once the batch is done")
            .expect("task")
            .expect("claim 2");
        // Claims written during the collection protect (they are after its cut-off).
        let protected = gc.protected().await.expect("protected");
        assert!(protected.contains(digest(2).as_str()));
        in_flight.done(&store).await.expect("done");
        assert_eq!(
            gc.finish(false).await.expect("finish"),
            1,
            "the one done before the start"
        );
        assert_eq!(
            remove_claims_before(&store, SystemTime::now() + Duration::from_secs(1))
                .await
                .expect("remove"),
            3
        );
    }
}
