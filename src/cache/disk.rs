//! Content by digest on local disk: `<dir>/sha256/<ab>/<hex>` with a small
//! `<hex>.meta` beside it (size, kind, media type), written whole or not at all (a
//! temporary file in `<dir>/tmp`, renamed once its digest is checked), least recently
//! used first out when `max_size` is passed.
//!
//! A file is checked against its digest before it is first served by this process,
//! and again whenever it changed on disk since (size, inode, modification time): a
//! corrupt or truncated file is removed and fetched again, never served.

use std::collections::HashMap;
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::metrics::counter::Counter;
use serde::{Deserialize, Serialize};

/// What a cached file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Manifest,
    Blob,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Meta {
    digest: String,
    size: u64,
    kind: Kind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    media_type: Option<String>,
}

/// Size, inode and modification time of a file checked against its digest.
type Stamp = (u64, u64, i64, i64);

#[derive(Debug, Clone)]
struct Entry {
    meta: Meta,
    used: u64,
    verified: Option<Stamp>,
}

#[derive(Default)]
struct Index {
    entries: HashMap<String, Entry>,
    total: u64,
}

/// A cached file found and checked, open for reading.
pub struct Found {
    pub file: std::fs::File,
    pub size: u64,
    pub kind: Kind,
    pub media_type: Option<String>,
}

pub struct DiskCache {
    dir: PathBuf,
    max: u64,
    index: Mutex<Index>,
    tick: AtomicU64,
    temp_seq: AtomicU64,
    /// Files removed to stay under `max` (also in `/metrics`).
    pub evictions: Counter,
    /// Files found corrupt or truncated (and removed).
    pub corrupt: Counter,
}

fn stamp(m: &std::fs::Metadata) -> Stamp {
    (m.len(), m.ino(), m.mtime(), m.mtime_nsec())
}

/// The hex of a sha256 digest this cache can hold.
fn hex_of(digest: &str) -> Option<&str> {
    let hex = digest.strip_prefix("sha256:")?;
    (hex.len() == 64
        && hex
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()))
    .then_some(hex)
}

/// The sha256 of a reader, as `sha256:<hex>`.
pub fn sha256_of(mut r: impl Read) -> io::Result<String> {
    use sha2::Digest as _;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!(
        "sha256:{}",
        crate::registry::digest::hex(&h.finalize())
    ))
}

impl DiskCache {
    /// Open (creating) `dir`: what is there is indexed, oldest first out; temporary
    /// files of an earlier run are removed.
    /// `evictions` and `corrupt` count what their names say (shared with `/metrics`).
    pub fn open(
        dir: &Path,
        max: u64,
        evictions: Counter,
        corrupt: Counter,
    ) -> io::Result<DiskCache> {
        std::fs::create_dir_all(dir.join("sha256"))?;
        let tmp = dir.join("tmp");
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp)?;
        let cache = DiskCache {
            dir: dir.to_owned(),
            max,
            index: Mutex::new(Index::default()),
            tick: AtomicU64::new(1),
            temp_seq: AtomicU64::new(0),
            evictions,
            corrupt,
        };
        let mut found: Vec<(i64, Meta)> = Vec::new();
        for fan in std::fs::read_dir(dir.join("sha256"))? {
            let fan = fan?.path();
            let Ok(files) = std::fs::read_dir(&fan) else {
                continue;
            };
            for f in files.flatten() {
                let path = f.path();
                if path.extension().is_none_or(|e| e != "meta") {
                    continue;
                }
                let meta = std::fs::read(&path)
                    .ok()
                    .and_then(|b| serde_json::from_slice::<Meta>(&b).ok());
                let data = path.with_extension("");
                match (meta, std::fs::metadata(&data)) {
                    (Some(meta), Ok(m))
                        if m.len() == meta.size && hex_of(&meta.digest).is_some() =>
                    {
                        found.push((m.mtime(), meta));
                    }
                    _ => {
                        let _ = std::fs::remove_file(&path);
                        let _ = std::fs::remove_file(&data);
                    }
                }
            }
        }
        found.sort_by_key(|(t, _)| *t);
        {
            let mut index = cache.lock();
            for (_, meta) in found {
                index.total += meta.size;
                let used = cache.tick.fetch_add(1, Ordering::Relaxed);
                index.entries.insert(
                    meta.digest.clone(),
                    Entry {
                        meta,
                        used,
                        verified: None,
                    },
                );
            }
        }
        cache.evict();
        Ok(cache)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Index> {
        match self.index.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    fn data_path(&self, hex: &str) -> PathBuf {
        self.dir.join("sha256").join(&hex[..2]).join(hex)
    }

    /// Whether `digest` is cached (not checked yet).
    pub fn contains(&self, digest: &str) -> bool {
        self.lock().entries.contains_key(digest)
    }

    /// Size, kind and media type of a cached digest (not checked: for a `HEAD`).
    pub fn peek(&self, digest: &str) -> Option<(u64, Kind, Option<String>)> {
        self.lock()
            .entries
            .get(digest)
            .map(|e| (e.meta.size, e.meta.kind, e.meta.media_type.clone()))
    }

    /// Bytes and entries held now.
    pub fn usage(&self) -> (u64, usize) {
        let index = self.lock();
        (index.total, index.entries.len())
    }

    /// The cached file of `digest`, checked (see the module notes); blocking.
    pub fn open_checked(&self, digest: &str) -> Option<Found> {
        let hex = hex_of(digest)?;
        let (meta, verified) = {
            let mut index = self.lock();
            let used = self.tick.fetch_add(1, Ordering::Relaxed);
            let e = index.entries.get_mut(digest)?;
            e.used = used;
            (e.meta.clone(), e.verified)
        };
        let path = self.data_path(hex);
        let opened = std::fs::File::open(&path).and_then(|f| {
            let m = f.metadata()?;
            Ok((f, m))
        });
        let Ok((file, m)) = opened else {
            self.remove(digest);
            return None;
        };
        let now = stamp(&m);
        if verified != Some(now) {
            let good = m.len() == meta.size
                && std::fs::File::open(&path)
                    .and_then(sha256_of)
                    .is_ok_and(|d| d == digest);
            if !good {
                self.corrupt.inc();
                tracing::warn!(digest, path = %path.display(), "cache: corrupt or truncated file removed; fetching it again");
                self.remove(digest);
                return None;
            }
            if let Some(e) = self.lock().entries.get_mut(digest) {
                e.verified = Some(now);
            }
        }
        Some(Found {
            file,
            size: meta.size,
            kind: meta.kind,
            media_type: meta.media_type,
        })
    }

    /// A fresh temporary path inside the cache (same file system as the content).
    pub fn temp_path(&self) -> PathBuf {
        let n = self.temp_seq.fetch_add(1, Ordering::Relaxed);
        self.dir
            .join("tmp")
            .join(format!("{}-{n}", std::process::id()))
    }

    /// Make the checked temporary file `temp` the content of `digest`; blocking.
    pub fn commit(
        &self,
        temp: &Path,
        digest: &str,
        size: u64,
        kind: Kind,
        media_type: Option<String>,
    ) -> io::Result<()> {
        let Some(hex) = hex_of(digest) else {
            let _ = std::fs::remove_file(temp);
            return Ok(());
        };
        if size > self.max {
            let _ = std::fs::remove_file(temp);
            return Ok(());
        }
        let data = self.data_path(hex);
        if let Some(parent) = data.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let meta = Meta {
            digest: digest.to_owned(),
            size,
            kind,
            media_type,
        };
        let meta_tmp = self.temp_path();
        std::fs::write(
            &meta_tmp,
            serde_json::to_vec(&meta).map_err(io::Error::other)?,
        )?;
        std::fs::rename(&meta_tmp, data.with_extension("meta"))?;
        std::fs::rename(temp, &data)?;
        let verified = std::fs::metadata(&data).ok().map(|m| stamp(&m));
        {
            let mut index = self.lock();
            let used = self.tick.fetch_add(1, Ordering::Relaxed);
            let old = index.entries.insert(
                digest.to_owned(),
                Entry {
                    meta,
                    used,
                    verified,
                },
            );
            index.total += size;
            if let Some(old) = old {
                index.total -= old.meta.size;
            }
        }
        self.evict();
        Ok(())
    }

    /// Write small content (a manifest) whole; blocking.
    pub fn put_bytes(
        &self,
        digest: &str,
        bytes: &[u8],
        kind: Kind,
        media_type: Option<String>,
    ) -> io::Result<()> {
        let temp = self.temp_path();
        std::fs::write(&temp, bytes)?;
        self.commit(&temp, digest, bytes.len() as u64, kind, media_type)
    }

    /// Forget `digest` and remove its files.
    pub fn remove(&self, digest: &str) {
        let removed = {
            let mut index = self.lock();
            let e = index.entries.remove(digest);
            if let Some(e) = &e {
                index.total -= e.meta.size;
            }
            e
        };
        if removed.is_some()
            && let Some(hex) = hex_of(digest)
        {
            let data = self.data_path(hex);
            let _ = std::fs::remove_file(data.with_extension("meta"));
            let _ = std::fs::remove_file(data);
        }
    }

    /// Remove least recently used entries until under the cap. A file being read
    /// stays readable by whoever has it open.
    fn evict(&self) {
        loop {
            let victim = {
                let index = self.lock();
                if index.total <= self.max {
                    return;
                }
                index
                    .entries
                    .iter()
                    .min_by_key(|(_, e)| e.used)
                    .map(|(d, _)| d.clone())
            };
            let Some(d) = victim else {
                return;
            };
            self.remove(&d);
            self.evictions.inc();
        }
    }

    /// Remove everything.
    pub fn clear(&self) {
        let all: Vec<String> = self.lock().entries.keys().cloned().collect();
        for d in all {
            self.remove(&d);
        }
    }

    /// Entries by kind: (count, bytes) of manifests and of blobs.
    pub fn by_kind(&self) -> [(usize, u64); 2] {
        let index = self.lock();
        let mut out = [(0, 0); 2];
        for e in index.entries.values() {
            let i = usize::from(e.meta.kind == Kind::Blob);
            out[i].0 += 1;
            out[i].1 += e.meta.size;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(b: &[u8]) -> String {
        sha256_of(b).expect("hash")
    }

    #[test]
    fn put_check_evict_reopen_and_corruption() {
        let dir = tempfile::tempdir().expect("tempdir");
        let c =
            DiskCache::open(dir.path(), 100, Counter::default(), Counter::default()).expect("open");
        let (a, b) = (vec![1u8; 40], vec![2u8; 40]);
        c.put_bytes(&digest(&a), &a, Kind::Blob, None)
            .expect("put a");
        c.put_bytes(&digest(&b), &b, Kind::Manifest, Some("x/y".into()))
            .expect("put b");
        assert!(c.open_checked(&digest(&a)).is_some(), "a used last");
        let third = vec![3u8; 40];
        c.put_bytes(&digest(&third), &third, Kind::Blob, None)
            .expect("put c");
        assert!(!c.contains(&digest(&b)), "b was least recently used");
        assert_eq!(c.evictions.get(), 1);
        assert_eq!(c.usage(), (80, 2));
        drop(c);
        let c = DiskCache::open(dir.path(), 100, Counter::default(), Counter::default())
            .expect("reopen");
        assert_eq!(c.usage(), (80, 2), "survives a restart");
        // Flip a byte: detected, removed, not served.
        let hex = digest(&a);
        let path = c.data_path(hex_of(&hex).expect("hex"));
        let mut bytes = std::fs::read(&path).expect("read");
        bytes[3] ^= 1;
        std::fs::write(&path, bytes).expect("write");
        assert!(c.open_checked(&hex).is_none());
        assert!(!c.contains(&hex));
        assert_eq!(c.corrupt.get(), 1);
        assert!(c.open_checked(&digest(&third)).is_some());
    }
}
