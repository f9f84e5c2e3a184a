//! The filesystem backend: keys are paths below the storage root, in `registry:2`'s
//! layout. All file I/O runs on the blocking pool.
//!
//! Nothing is visible before it is whole: an object is written to a temporary name
//! (`.tmp-…`) in its directory and renamed into place; content (`…/data`) is synced
//! before the rename. A multipart upload is one file at its key that parts are
//! appended to in order, each under an exclusive `flock` and only at the length the
//! caller expects (a second writer gets `Conflict`); the file never shrinks but to
//! cut off a part whose write failed. So completing it costs nothing, and bytes a
//! killed process wrote but never recorded can be taken up again
//! (`resume_multipart`).
//! No path below the root may pass through a symbolic link.

use std::io::{self, Read, Seek, Write};
use std::ops::Range;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::SystemTime;

use bytes::Bytes;
use http_body::{Frame, SizeHint};

use super::{Key, Layout, Listing, Meta, Object, PartSizes, Result, Storage, StorageError};
use crate::body::{self, BoxError};

/// Bytes read from a file at a time when streaming it out.
const READ_SIZE: usize = 256 * 1024;

/// The filesystem storage.
#[derive(Debug, Clone)]
pub struct FsStorage {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    root: PathBuf,
    /// `<root>/docker/registry/v2/blobs` and `…/repositories`, and `<root>/registry-gate`:
    /// checked for symbolic links once, at open; below them every component is.
    tops: Vec<PathBuf>,
}

fn missing(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
    )
}

impl FsStorage {
    /// Use (and create if needed) the storage root.
    pub fn open(root: &Path) -> Result<Self> {
        let layout = Layout;
        let tops: Vec<PathBuf> = [layout.blobs(), layout.repositories(), layout.ours()]
            .iter()
            .map(|k| root.join(k.as_str()))
            .collect();
        for dir in &tops {
            std::fs::create_dir_all(dir)
                .map_err(|e| StorageError::io(format!("create {}", dir.display()), e))?;
            let Ok(rel) = dir.strip_prefix(root) else {
                return Err(StorageError::Unsafe(dir.display().to_string()));
            };
            let mut current = root.to_path_buf();
            for component in rel.components() {
                current.push(component);
                if std::fs::symlink_metadata(&current).is_ok_and(|m| m.file_type().is_symlink()) {
                    return Err(StorageError::Unsafe(current.display().to_string()));
                }
            }
        }
        Ok(FsStorage {
            inner: Arc::new(Inner {
                root: root.to_owned(),
                tops,
            }),
        })
    }

    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// Run file work on the blocking pool.
    async fn blocking<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Inner) -> Result<T> + Send + 'static,
    {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(|e| StorageError::Task(e.to_string()))?
    }
}

impl Inner {
    /// The path of `key`, refused when a component below the fixed top of the layout
    /// is a symbolic link (planted in the root by someone with access to it): no
    /// request may leave the root.
    fn path(&self, key: &Key) -> Result<PathBuf> {
        let path = self.root.join(key.as_str());
        let (base, rel) = match self
            .tops
            .iter()
            .find_map(|top| path.strip_prefix(top).ok().map(|r| (top.clone(), r)))
        {
            Some(found) => found,
            None => match path.strip_prefix(&self.root) {
                Ok(r) => (self.root.clone(), r),
                Err(_) => return Err(StorageError::Unsafe(path.display().to_string())),
            },
        };
        let mut current = base;
        for component in rel.components() {
            match component {
                Component::Normal(c) => current.push(c),
                _ => return Err(StorageError::Unsafe(path.display().to_string())),
            }
            match std::fs::symlink_metadata(&current) {
                Ok(m) if m.file_type().is_symlink() => {
                    return Err(StorageError::Unsafe(current.display().to_string()));
                }
                Ok(_) => {}
                Err(e) if missing(&e) => break,
                Err(e) => {
                    return Err(StorageError::io(
                        format!("inspect {}", current.display()),
                        e,
                    ));
                }
            }
        }
        Ok(path)
    }

    fn meta(m: &std::fs::Metadata) -> Meta {
        Meta {
            size: m.len(),
            modified: m.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            version: format!(
                "{}-{}-{}-{}.{}",
                m.dev(),
                m.ino(),
                m.len(),
                m.mtime(),
                m.mtime_nsec()
            ),
        }
    }

    fn head(&self, key: &Key) -> Result<Option<Meta>> {
        let path = self.path(key)?;
        match std::fs::metadata(&path) {
            Ok(m) if m.is_file() => Ok(Some(Inner::meta(&m))),
            Ok(_) => Ok(None),
            Err(e) if missing(&e) => Ok(None),
            Err(e) => Err(StorageError::io(format!("stat {}", path.display()), e)),
        }
    }

    fn open(&self, key: &Key) -> Result<Option<(std::fs::File, Meta)>> {
        let path = self.path(key)?;
        match std::fs::File::open(&path) {
            Ok(f) => {
                let m = f
                    .metadata()
                    .map_err(|e| StorageError::io(format!("stat {}", path.display()), e))?;
                if !m.is_file() {
                    return Ok(None);
                }
                Ok(Some((f, Inner::meta(&m))))
            }
            Err(e) if missing(&e) => Ok(None),
            Err(e) => Err(StorageError::io(format!("open {}", path.display()), e)),
        }
    }

    /// Write a file through a temporary name in the same directory and a rename.
    fn write_atomic(&self, key: &Key, bytes: &[u8]) -> Result<()> {
        let path = self.path(key)?;
        let dir = path
            .parent()
            .ok_or_else(|| StorageError::Unsafe(path.display().to_string()))?;
        std::fs::create_dir_all(dir)
            .map_err(|e| StorageError::io(format!("create {}", dir.display()), e))?;
        let tmp = dir.join(format!(".tmp-{}", random_hex(8)));
        // Content is synced before it becomes visible; links are small and are not
        // (as in `registry:2`).
        let sync = key.name() == "data";
        let result = (|| {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&tmp)?;
            f.write_all(bytes)?;
            if sync {
                f.sync_all()?;
            }
            std::fs::rename(&tmp, &path)
        })();
        if let Err(e) = result {
            let _ = std::fs::remove_file(&tmp);
            return Err(StorageError::io(format!("write {}", path.display()), e));
        }
        Ok(())
    }

    fn remove_file(&self, key: &Key) -> Result<()> {
        let path = self.path(key)?;
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if missing(&e) => Ok(()),
            Err(e) => Err(StorageError::io(format!("remove {}", path.display()), e)),
        }
    }

    fn remove_dir(&self, key: &Key) -> Result<()> {
        let path = self.path(key)?;
        match std::fs::remove_dir_all(&path) {
            Ok(()) => Ok(()),
            Err(e) if missing(&e) => Ok(()),
            Err(e) => Err(StorageError::io(format!("remove {}", path.display()), e)),
        }
    }

    /// The entries of `dir`: files (with metadata) and sub-directories. Symbolic links
    /// and temporary files are left out.
    fn read_dir(&self, dir: &Key) -> Result<Listing> {
        let path = self.path(dir)?;
        let entries = match std::fs::read_dir(&path) {
            Ok(e) => e,
            Err(e) if missing(&e) => return Ok(Listing::default()),
            Err(e) => return Err(StorageError::io(format!("list {}", path.display()), e)),
        };
        let mut out = Listing::default();
        for entry in entries {
            let entry =
                entry.map_err(|e| StorageError::io(format!("list {}", path.display()), e))?;
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            if name.starts_with(".tmp-") {
                continue;
            }
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            if kind.is_dir() {
                out.dirs.push(name);
            } else if kind.is_file() {
                let Some(key) = Key::from_listed(&format!("{dir}/{name}")) else {
                    continue;
                };
                match entry.metadata() {
                    Ok(m) => out.objects.push((key, Inner::meta(&m))),
                    Err(e) if missing(&e) => {}
                    Err(e) => {
                        return Err(StorageError::io(format!("stat {}", path.display()), e));
                    }
                }
            }
        }
        Ok(out)
    }

    fn walk(&self, prefix: &Key) -> Result<Vec<(Key, Meta)>> {
        let mut out = Vec::new();
        let mut stack = vec![prefix.clone()];
        while let Some(dir) = stack.pop() {
            let listing = self.read_dir(&dir)?;
            out.extend(listing.objects);
            stack.extend(listing.dirs.iter().map(|d| dir.child(d)));
        }
        Ok(out)
    }
}

fn random_hex(bytes: usize) -> String {
    (0..bytes)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect()
}

/// A multipart part's tag on disk: where it starts and how long it is.
fn part_tag(offset: u64, len: u64) -> String {
    format!("{offset}+{len}")
}

fn parse_part_tag(tag: &str) -> Option<(u64, u64)> {
    let (a, b) = tag.split_once('+')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

#[async_trait::async_trait]
impl Storage for FsStorage {
    fn describe(&self) -> String {
        format!("the filesystem at {}", self.inner.root.display())
    }

    async fn head(&self, key: &Key) -> Result<Option<Meta>> {
        let key = key.clone();
        self.blocking(move |s| s.head(&key)).await
    }

    async fn get(&self, key: &Key, range: Option<Range<u64>>) -> Result<Option<Object>> {
        let key = key.clone();
        self.blocking(move |s| {
            let Some((mut file, meta)) = s.open(&key)? else {
                return Ok(None);
            };
            let range = range.unwrap_or(0..meta.size);
            if range.start > 0 {
                file.seek(io::SeekFrom::Start(range.start))
                    .map_err(|e| StorageError::io(format!("seek in {key}"), e))?;
            }
            let body = body::boxed(FileBody::new(file, range.end.saturating_sub(range.start)));
            Ok(Some(Object { meta, range, body }))
        })
        .await
    }

    async fn read(&self, key: &Key, limit: u64) -> Result<Option<(Bytes, Meta)>> {
        let key = key.clone();
        self.blocking(move |s| {
            let Some((file, meta)) = s.open(&key)? else {
                return Ok(None);
            };
            if meta.size > limit {
                return Err(StorageError::TooLarge(format!(
                    "{key} ({} bytes, limit {limit})",
                    meta.size
                )));
            }
            let mut buf = Vec::with_capacity(meta.size as usize);
            file.take(limit)
                .read_to_end(&mut buf)
                .map_err(|e| StorageError::io(format!("read {key}"), e))?;
            Ok(Some((Bytes::from(buf), meta)))
        })
        .await
    }

    async fn put(&self, key: &Key, bytes: Bytes) -> Result<()> {
        let key = key.clone();
        self.blocking(move |s| s.write_atomic(&key, &bytes)).await
    }

    async fn delete(&self, key: &Key) -> Result<()> {
        let key = key.clone();
        self.blocking(move |s| s.remove_file(&key)).await
    }

    async fn delete_many(&self, keys: &[Key]) -> Result<()> {
        let keys = keys.to_vec();
        self.blocking(move |s| {
            for key in &keys {
                s.remove_file(key)?;
                // A blob's directory holds only its content: remove it once empty.
                if let Ok(path) = s.path(key)
                    && let Some(dir) = path.parent()
                {
                    let _ = std::fs::remove_dir(dir);
                }
            }
            Ok(())
        })
        .await
    }

    async fn delete_all(&self, prefix: &Key) -> Result<()> {
        let key = prefix.clone();
        self.blocking(move |s| s.remove_dir(&key)).await
    }

    async fn list(&self, prefix: &Key) -> Result<Vec<(Key, Meta)>> {
        let key = prefix.clone();
        self.blocking(move |s| s.walk(&key)).await
    }

    async fn list_dir(&self, prefix: &Key) -> Result<Listing> {
        let key = prefix.clone();
        self.blocking(move |s| s.read_dir(&key)).await
    }

    async fn rename(&self, from: &Key, to: &Key) -> Result<()> {
        let (from, to) = (from.clone(), to.clone());
        self.blocking(move |s| {
            let (src, dst) = (s.path(&from)?, s.path(&to)?);
            if let Some(dir) = dst.parent() {
                std::fs::create_dir_all(dir)
                    .map_err(|e| StorageError::io(format!("create {}", dir.display()), e))?;
            }
            std::fs::rename(&src, &dst)
                .map_err(|e| StorageError::io(format!("move {from} to {to}"), e))
        })
        .await
    }

    fn part_sizes(&self) -> PartSizes {
        PartSizes {
            min: 0,
            preferred: 1024 * 1024,
        }
    }

    async fn create_multipart(&self, key: &Key) -> Result<String> {
        let key = key.clone();
        self.blocking(move |s| {
            let path = s.path(&key)?;
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)
                    .map_err(|e| StorageError::io(format!("create {}", dir.display()), e))?;
            }
            std::fs::File::create(&path)
                .map_err(|e| StorageError::io(format!("create {}", path.display()), e))?;
            Ok("file".to_owned())
        })
        .await
    }

    async fn put_part(
        &self,
        key: &Key,
        _upload: &str,
        _index: usize,
        offset: u64,
        data: Vec<Bytes>,
    ) -> Result<String> {
        let key = key.clone();
        self.blocking(move |s| {
            let path = s.path(&key)?;
            let mut file = std::fs::OpenOptions::new()
                .append(true)
                .open(&path)
                .map_err(|e| StorageError::io(format!("open {}", path.display()), e))?;
            file.lock()
                .map_err(|e| StorageError::io(format!("lock {}", path.display()), e))?;
            let len = file
                .metadata()
                .map_err(|e| StorageError::io(format!("stat {}", path.display()), e))?
                .len();
            if len != offset {
                return Err(StorageError::Conflict(format!(
                    "{key} holds {len} bytes, the part starts at {offset}"
                )));
            }
            let total: u64 = data.iter().map(|b| b.len() as u64).sum();
            if let Err(e) = write_all_vectored(&mut file, &data) {
                // Cut a partly written part off again: the file holds whole parts.
                let _ = file.set_len(offset);
                return Err(StorageError::io(format!("write {}", path.display()), e));
            }
            Ok(part_tag(offset, total))
        })
        .await
    }

    async fn complete_multipart(&self, key: &Key, _upload: &str, parts: &[String]) -> Result<()> {
        let key = key.clone();
        let parts = parts.to_vec();
        self.blocking(move |s| {
            let Some((file, meta)) = s.open(&key)? else {
                return Err(StorageError::Conflict(format!("{key} is gone")));
            };
            let mut end = 0;
            for tag in &parts {
                match parse_part_tag(tag) {
                    Some((offset, len)) if offset == end => end += len,
                    _ => {
                        return Err(StorageError::Conflict(format!(
                            "{key}: part {tag} does not follow byte {end}"
                        )));
                    }
                }
            }
            if end != meta.size {
                return Err(StorageError::Conflict(format!(
                    "{key} holds {} bytes, its parts {end}",
                    meta.size
                )));
            }
            file.sync_all()
                .map_err(|e| StorageError::io(format!("sync {key}"), e))
        })
        .await
    }

    async fn resume_multipart(
        &self,
        key: &Key,
        _upload: &str,
        known: u64,
    ) -> Result<Option<(u64, String)>> {
        // The file only grows, under its lock and at the length its writer expected:
        // whatever is beyond `known` was written there by a request of this upload.
        Ok(self
            .head(key)
            .await?
            .filter(|m| m.size > known)
            .map(|m| (m.size - known, part_tag(known, m.size - known))))
    }

    async fn abort_multipart(&self, key: &Key, _upload: &str) -> Result<()> {
        self.delete(key).await
    }

    async fn check(&self) -> Result<()> {
        let probe = Layout.ready_probe();
        self.blocking(move |s| {
            s.write_atomic(&probe, b"ok")?;
            s.remove_file(&probe)
        })
        .await
    }
}

/// `write_all` for several buffers, a few syscalls for a whole batch.
fn write_all_vectored(file: &mut std::fs::File, chunks: &[Bytes]) -> io::Result<()> {
    let mut slices: Vec<io::IoSlice<'_>> = chunks.iter().map(|c| io::IoSlice::new(c)).collect();
    let mut rest = &mut slices[..];
    while !rest.is_empty() {
        match file.write_vectored(rest) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => io::IoSlice::advance_slices(&mut rest, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// A read of a file on the blocking pool, which gives the file back with what it read.
pub type BlockingRead = tokio::task::JoinHandle<(std::fs::File, io::Result<Vec<u8>>)>;

/// Read up to `want` bytes from `file`'s position on the blocking pool: fewer only at
/// its end (or at what has been written so far of a file that grows). One `read` in
/// the usual case, straight into the buffer that is then sent: `tokio::fs::File`
/// would read into a buffer of its own and copy, twice the memory per download and
/// one more copy of every byte. The buffer is allocated here, on the caller's
/// (runtime) thread: glibc gives each thread that allocates an arena of its own, and
/// a buffer allocated by each blocking thread stayed in that thread's arena after the
/// free, so the gate's RSS grew with the number of blocking threads that ever read.
pub fn read_blocking(file: std::fs::File, want: usize) -> BlockingRead {
    let mut buf = Vec::with_capacity(want);
    tokio::task::spawn_blocking(move || {
        let mut file = file;
        // Within the capacity reserved above: no allocation on this thread.
        buf.resize(want, 0);
        let mut filled = 0;
        while filled < want {
            match file.read(&mut buf[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return (file, Err(e)),
            }
        }
        buf.truncate(filled);
        (file, Ok(buf))
    })
}

/// A response body that reads a file from its current position, `remaining` bytes,
/// in fixed-size reads ([`read_blocking`]) with backpressure: memory does not grow
/// with the file or with a slow reader.
pub struct FileBody {
    state: ReadState,
    remaining: u64,
}

enum ReadState {
    Idle(std::fs::File),
    Reading(BlockingRead),
    /// The blocking task failed and took the file with it.
    Lost,
}

impl FileBody {
    pub fn new(file: std::fs::File, remaining: u64) -> Self {
        FileBody {
            state: ReadState::Idle(file),
            remaining,
        }
    }
}

impl http_body::Body for FileBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<std::result::Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.remaining == 0 {
            return Poll::Ready(None);
        }
        loop {
            match std::mem::replace(&mut this.state, ReadState::Lost) {
                ReadState::Lost => {
                    return Poll::Ready(Some(Err("the file was lost by a failed read".into())));
                }
                ReadState::Idle(file) => {
                    let want = READ_SIZE.min(usize::try_from(this.remaining).unwrap_or(READ_SIZE));
                    this.state = ReadState::Reading(read_blocking(file, want));
                }
                ReadState::Reading(mut reading) => {
                    let (file, read) = match Pin::new(&mut reading).poll(cx) {
                        Poll::Pending => {
                            this.state = ReadState::Reading(reading);
                            return Poll::Pending;
                        }
                        Poll::Ready(Ok(done)) => done,
                        Poll::Ready(Err(e)) => {
                            return Poll::Ready(Some(Err(format!("reading the file: {e}").into())));
                        }
                    };
                    this.state = ReadState::Idle(file);
                    return Poll::Ready(Some(match read {
                        Err(e) => Err(e.into()),
                        Ok(buf) if buf.is_empty() => Err("file ended before its length".into()),
                        Ok(buf) => {
                            this.remaining -= buf.len() as u64;
                            Ok(Frame::data(Bytes::from(buf)))
                        }
                    }));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::RepoName;

    fn key(s: &str) -> Key {
        Key::from_listed(s).expect("key")
    }

    #[tokio::test]
    async fn objects_listing_and_moves() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = FsStorage::open(dir.path()).expect("open");
        let a = key("docker/registry/v2/repositories/x/_layers/a/link");
        s.put(&a, Bytes::from_static(b"one")).await.expect("put");
        assert_eq!(s.head(&a).await.expect("head").map(|m| m.size), Some(3));
        let (bytes, _) = s.read(&a, 10).await.expect("read").expect("there");
        assert_eq!(&bytes[..], b"one");
        assert!(matches!(
            s.read(&a, 2).await,
            Err(StorageError::TooLarge(_))
        ));
        let listed = s
            .list(&key("docker/registry/v2/repositories"))
            .await
            .expect("list");
        assert_eq!(
            listed.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>(),
            vec![a.clone()]
        );
        let level = s
            .list_dir(&key("docker/registry/v2/repositories/x"))
            .await
            .expect("list_dir");
        assert_eq!(level.dirs, vec!["_layers".to_owned()]);
        let b = key("docker/registry/v2/repositories/x/_layers/b/link");
        s.rename(&a, &b).await.expect("rename");
        assert!(s.head(&a).await.expect("head").is_none());
        s.delete_all(&key("docker/registry/v2/repositories/x"))
            .await
            .expect("delete_all");
        assert!(s.head(&b).await.expect("head").is_none());
        s.delete(&b).await.expect("deleting what is gone is fine");
    }

    #[tokio::test]
    async fn multipart_parts_append_in_order_and_a_second_writer_conflicts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = FsStorage::open(dir.path()).expect("open");
        let k = key("docker/registry/v2/repositories/x/_uploads/u/data");
        let id = s.create_multipart(&k).await.expect("create");
        let p0 = s
            .put_part(
                &k,
                &id,
                0,
                0,
                vec![Bytes::from_static(b"he"), Bytes::from_static(b"llo")],
            )
            .await
            .expect("part 0");
        assert!(matches!(
            s.put_part(&k, &id, 1, 0, vec![Bytes::from_static(b"x")])
                .await,
            Err(StorageError::Conflict(_))
        ));
        let p1 = s
            .put_part(&k, &id, 1, 5, vec![Bytes::from_static(b" world")])
            .await
            .expect("part 1");
        assert!(matches!(
            s.complete_multipart(&k, &id, std::slice::from_ref(&p1))
                .await,
            Err(StorageError::Conflict(_))
        ));
        s.complete_multipart(&k, &id, &[p0, p1])
            .await
            .expect("complete");
        let (bytes, _) = s.read(&k, 100).await.expect("read").expect("there");
        assert_eq!(&bytes[..], b"hello world");
    }

    #[tokio::test]
    async fn planted_symlinks_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let outside = tempfile::tempdir().expect("tempdir");
        let s = FsStorage::open(dir.path()).expect("open");
        std::os::unix::fs::symlink(
            outside.path(),
            dir.path().join("docker/registry/v2/repositories/evil"),
        )
        .expect("symlink");
        let repo = RepoName::parse("evil/x").expect("name");
        let link = Layout.tag_current(&repo, "v1");
        assert!(matches!(
            s.put(&link, Bytes::from_static(b"x")).await,
            Err(StorageError::Unsafe(_))
        ));
        assert!(
            std::fs::read_dir(outside.path())
                .expect("dir")
                .next()
                .is_none()
        );
        assert!(matches!(
            s.list(&Layout.tags(&repo)).await,
            Err(StorageError::Unsafe(_))
        ));
    }
}
