//! Content by digest on local disk, least recently used first out when `max_size`
//! is passed:
//! * blobs in `<dir>/sha256/<ab>/<hex>` with a small `<hex>.meta` beside it (size,
//!   kind, media type), written whole or not at all (a temporary file in `<dir>/tmp`,
//!   renamed once its digest is checked);
//! * manifests appended to one file, `<dir>/manifests.pack` (see [`super::pack`]):
//!   a few KiB each, they would cost more in inodes than in bytes.
//!
//! A blob file is checked against its digest before it is first served by this
//! process, and again whenever it changed on disk since (size, inode, modification
//! time); a manifest each time it is read from disk. What is corrupt or truncated is
//! dropped and fetched again, never served.

use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use prometheus_client::metrics::counter::Counter;
use serde::{Deserialize, Serialize};

use super::lru::Lru;
use super::pack::{self, Held, Live, Pack, Place};

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
    verified: Option<Stamp>,
    /// In the manifest pack (else a file of its own).
    place: Option<Place>,
}

#[derive(Default)]
struct Index {
    /// By digest, in the order of use: eviction takes the oldest.
    entries: Lru<Entry>,
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
    /// Lock order: the pack's lock before the index's.
    pack: Pack,
    temp_seq: AtomicU64,
    /// Files removed to stay under `max` (also in `/metrics`).
    pub evictions: Counter,
    /// Files found corrupt or truncated (and removed).
    pub corrupt: Counter,
}

fn stamp(m: &std::fs::Metadata) -> Stamp {
    (m.len(), m.ino(), m.mtime(), m.mtime_nsec())
}

/// Mark an entry that is gone dead in the pack, if it is there.
fn kill(held: &mut Held<'_>, e: &Entry) {
    if let Some(place) = &e.place {
        held.kill(place, e.meta.size);
    }
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
        let (pack, records) = Pack::open(&dir.join("manifests.pack"))?;
        let cache = DiskCache {
            dir: dir.to_owned(),
            max,
            index: Mutex::new(Index::default()),
            pack,
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
            let mut held = cache.pack.hold();
            let mut index = cache.lock();
            for (_, meta) in found {
                index.total += meta.size;
                index.entries.insert(
                    meta.digest.clone(),
                    Entry {
                        meta,
                        verified: None,
                        place: None,
                    },
                );
            }
            // The pack's records, oldest first; a later copy of a digest wins.
            for r in records {
                let place = held.place(&r);
                let meta = Meta {
                    digest: r.digest,
                    size: r.len,
                    kind: Kind::Manifest,
                    media_type: r.media_type,
                };
                if hex_of(&meta.digest).is_none() {
                    held.kill(&place, meta.size);
                    continue;
                }
                index.total += meta.size;
                let entry = Entry {
                    place: Some(place),
                    meta,
                    verified: None,
                };
                if let Some(old) = index.entries.insert(entry.meta.digest.clone(), entry) {
                    index.total -= old.meta.size;
                    kill(&mut held, &old);
                }
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
        self.lock().entries.contains(digest)
    }

    /// Size, kind and media type of a cached digest (not checked: for a `HEAD`).
    pub fn peek(&self, digest: &str) -> Option<(u64, Kind, Option<String>)> {
        self.lock()
            .entries
            .peek(digest)
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
            if index.entries.peek(digest)?.place.is_some() {
                return None;
            }
            let e = index.entries.touch(digest)?;
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
            if let Some(e) = self.lock().entries.peek_mut(digest) {
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
            let mut held = self.pack.hold();
            let mut index = self.lock();
            let old = index.entries.insert(
                digest.to_owned(),
                Entry {
                    meta,
                    verified,
                    place: None,
                },
            );
            index.total += size;
            if let Some(old) = old {
                index.total -= old.meta.size;
                kill(&mut held, &old);
            }
        }
        self.evict();
        Ok(())
    }

    /// Append a manifest to the pack and index it; blocking.
    fn put_manifest(
        &self,
        digest: &str,
        bytes: &[u8],
        media_type: Option<String>,
    ) -> io::Result<()> {
        let size = bytes.len() as u64;
        if hex_of(digest).is_none() || size > self.max {
            return Ok(());
        }
        let old = self.pack.append(
            digest,
            media_type.clone().as_deref(),
            bytes,
            |place, held| {
                let mut index = self.lock();
                let meta = Meta {
                    digest: digest.to_owned(),
                    size,
                    kind: Kind::Manifest,
                    media_type,
                };
                let entry = Entry {
                    meta,
                    verified: None,
                    place: Some(place),
                };
                let old = index.entries.insert(digest.to_owned(), entry);
                index.total += size;
                if let Some(old) = &old {
                    index.total -= old.meta.size;
                    kill(held, old);
                }
                old
            },
        )?;
        // It replaces a manifest in a file of its own (an earlier version's).
        if old.is_some_and(|o| o.place.is_none()) {
            self.remove_files(digest);
        }
        self.evict();
        Ok(())
    }

    /// A cached manifest's bytes and media type, checked against its digest;
    /// blocking. Something corrupt is dropped (and counted), not returned.
    pub fn read_manifest(&self, digest: &str, max: u64) -> Option<(Bytes, Option<String>)> {
        let (place, meta) = {
            let mut index = self.lock();
            let e = index.entries.peek(digest)?;
            if e.meta.kind != Kind::Manifest || e.meta.size > max {
                return None;
            }
            let e = index.entries.touch(digest)?;
            (e.place.clone(), e.meta.clone())
        };
        let bytes = match place {
            Some(place) => {
                let body = pack::read(&place, meta.size).ok();
                let good = body
                    .as_deref()
                    .is_some_and(|b| sha256_of(b).is_ok_and(|d| d == digest));
                if !good {
                    self.corrupt.inc();
                    tracing::warn!(
                        digest,
                        "cache: a corrupt manifest in the pack; fetching it again"
                    );
                    self.remove(digest);
                    return None;
                }
                body?
            }
            // A manifest in a file of its own (written by an earlier version).
            None => {
                let found = self.open_checked(digest)?;
                let mut buf = Vec::with_capacity(found.size as usize);
                (&found.file).read_to_end(&mut buf).ok()?;
                buf
            }
        };
        Some((Bytes::from(bytes), meta.media_type))
    }

    /// Rewrite the pack when much of it is garbage; blocking.
    fn maybe_rewrite(&self) {
        if !self.pack.wants_rewrite() {
            return;
        }
        // Least recently used first, as a restart reads them. Every change of an
        // entry's place holds the pack, so none comes between the two closures.
        let gather = || {
            let index = self.lock();
            index
                .entries
                .by_use()
                .filter_map(|(_, e)| {
                    Some(Live {
                        digest: e.meta.digest.clone(),
                        place: e.place.clone()?,
                        len: e.meta.size,
                    })
                })
                .collect()
        };
        let then = |live: &[Live], places: Vec<Place>| {
            let mut index = self.lock();
            for (l, place) in live.iter().zip(places) {
                if let Some(e) = index.entries.peek_mut(&l.digest) {
                    e.place = Some(place);
                }
            }
        };
        if let Err(e) = self.pack.rewrite(gather, then) {
            tracing::warn!("cache: cannot rewrite the manifest pack: {e}");
        }
    }

    /// Write small content (a manifest) whole; blocking.
    pub fn put_bytes(
        &self,
        digest: &str,
        bytes: &[u8],
        kind: Kind,
        media_type: Option<String>,
    ) -> io::Result<()> {
        if kind == Kind::Manifest {
            return self.put_manifest(digest, bytes, media_type);
        }
        let temp = self.temp_path();
        std::fs::write(&temp, bytes)?;
        self.commit(&temp, digest, bytes.len() as u64, kind, media_type)
    }

    /// Forget `digest` and remove its files.
    pub fn remove(&self, digest: &str) {
        let mut held = self.pack.hold();
        let removed = {
            let mut index = self.lock();
            let e = index.entries.remove(digest);
            if let Some(e) = &e {
                index.total -= e.meta.size;
            }
            e
        };
        match removed {
            Some(e) if e.place.is_some() => kill(&mut held, &e),
            Some(_) => {
                drop(held);
                self.remove_files(digest);
            }
            None => {}
        }
    }

    /// The content and `.meta` files of `digest`.
    fn remove_files(&self, digest: &str) {
        if let Some(hex) = hex_of(digest) {
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
                    break;
                }
                index.entries.oldest().map(str::to_owned)
            };
            let Some(d) = victim else {
                break;
            };
            self.remove(&d);
            self.evictions.inc();
        }
        self.maybe_rewrite();
    }

    /// Remove everything.
    pub fn clear(&self) {
        let all: Vec<String> = self.lock().entries.keys().cloned().collect();
        for d in all {
            self.remove(&d);
        }
        if let Err(e) = self.pack.clear() {
            tracing::warn!("cache: cannot empty the manifest pack: {e}");
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
    use std::io::Write as _;

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

    fn manifest(n: u8, len: usize) -> Vec<u8> {
        let mut m = format!("{{\"schemaVersion\":2,\"n\":{n},\"pad\":\"").into_bytes();
        m.resize(len - 2, b'a' + n % 26);
        m.extend_from_slice(b"\"}");
        m
    }

    #[test]
    fn manifests_survive_a_restart_in_the_pack_and_a_cut_or_corrupt_record_is_dropped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let open = || {
            DiskCache::open(dir.path(), 1 << 20, Counter::default(), Counter::default())
                .expect("open")
        };
        let c = open();
        let ms: Vec<Vec<u8>> = (0..3).map(|n| manifest(n, 2000)).collect();
        for m in &ms {
            c.put_bytes(&digest(m), m, Kind::Manifest, Some("application/x".into()))
                .expect("put");
        }
        for m in &ms {
            let (bytes, media_type) = c.read_manifest(&digest(m), 1 << 20).expect("read");
            assert_eq!(
                (bytes.as_ref(), media_type.as_deref()),
                (&m[..], Some("application/x"))
            );
        }
        // One file for all of them, none of their own.
        assert!(!c.data_path(hex_of(&digest(&ms[0])).expect("hex")).exists());
        drop(c);
        let pack = dir.path().join("manifests.pack");
        let whole = std::fs::metadata(&pack).expect("pack").len();
        // A record cut short by a crash: dropped at the next start, the rest kept.
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&pack)
            .expect("pack");
        f.write_all(b"RGM1\x20\x00\x00\x00\x00\x10\x00\x00\x00\x00\x00\x00{\"dig")
            .expect("append");
        drop(f);
        let c = open();
        assert_eq!(c.usage(), (6000, 3), "the whole records survive a restart");
        assert_eq!(
            std::fs::metadata(&pack).expect("pack").len(),
            whole,
            "the cut record is gone"
        );
        // A flipped byte in a body: not served, dropped, counted.
        let mut bytes = std::fs::read(&pack).expect("read pack");
        let at = bytes
            .windows(ms[1].len())
            .position(|w| w == &ms[1][..])
            .expect("the body in the pack");
        bytes[at + 100] ^= 1;
        std::fs::write(&pack, &bytes).expect("corrupt it");
        assert!(c.read_manifest(&digest(&ms[1]), 1 << 20).is_none());
        assert!(!c.contains(&digest(&ms[1])));
        assert_eq!(c.corrupt.get(), 1);
        assert!(c.read_manifest(&digest(&ms[0]), 1 << 20).is_some());
        assert!(c.read_manifest(&digest(&ms[2]), 1 << 20).is_some());
    }

    #[test]
    fn the_pack_is_rewritten_when_evictions_leave_it_mostly_garbage() {
        let dir = tempfile::tempdir().expect("tempdir");
        let max = 4 << 20;
        let c =
            DiskCache::open(dir.path(), max, Counter::default(), Counter::default()).expect("open");
        let ms: Vec<Vec<u8>> = (0..20).map(|n| manifest(n, 1 << 20)).collect();
        for m in &ms {
            c.put_bytes(&digest(m), m, Kind::Manifest, None)
                .expect("put");
        }
        let pack = dir.path().join("manifests.pack");
        let len = std::fs::metadata(&pack).expect("pack").len();
        assert!(c.usage().0 <= max);
        assert!(
            len <= 12 << 20,
            "20 MiB appended, at most 4 MiB live: the pack was rewritten ({len} bytes)"
        );
        let live: Vec<&Vec<u8>> = ms.iter().filter(|m| c.contains(&digest(m))).collect();
        assert!(!live.is_empty());
        for m in &live {
            let (bytes, _) = c
                .read_manifest(&digest(m), max)
                .expect("live after the rewrite");
            assert_eq!(bytes.as_ref(), &m[..]);
        }
        let n = live.len();
        drop(c);
        let c = DiskCache::open(dir.path(), max, Counter::default(), Counter::default())
            .expect("reopen");
        assert_eq!(
            c.usage().1,
            n,
            "the rewritten pack reopens with the same entries"
        );
        for m in &live {
            assert!(c.read_manifest(&digest(m), max).is_some());
        }
    }
}
