//! Where the built-in registry keeps content: the filesystem, in the CNCF
//! distribution layout (`paths`). All file I/O runs on the blocking pool.
//!
//! Nothing is visible before it is whole: content and link files are written to a
//! temporary name in the same directory and renamed into place; uploads live under
//! `_uploads/` until their digest is verified. Paths are built only from validated
//! names, and no path below the root may pass through a symbolic link.
//!
//! This is the only storage so far; the object-storage one DESIGN.md plans will turn
//! the public methods here into a trait.

pub mod paths;

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::route::{Digest, RepoName, UploadId};
use paths::Layout;

/// A storage failure. Carries the cause for the log; clients see a generic message.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("storage is full: {0}")]
    Full(io::Error),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("refusing a path through a symbolic link: {0}")]
    Unsafe(PathBuf),
    #[error("storage task failed: {0}")]
    Task(String),
}

pub type Result<T> = std::result::Result<T, StorageError>;

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> StorageError {
    let what = what.into();
    move |source| {
        if matches!(
            source.kind(),
            io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
        ) {
            StorageError::Full(source)
        } else {
            StorageError::Io { what, source }
        }
    }
}

/// Whether an error means "not there".
fn missing(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
    )
}

/// The filesystem storage.
#[derive(Debug, Clone)]
pub struct FsStorage {
    layout: Layout,
}

impl FsStorage {
    /// Use (and create if needed) the storage root.
    pub fn open(root: &Path) -> Result<Self> {
        let layout = Layout::new(root);
        for dir in [layout.blobs(), layout.repositories()] {
            std::fs::create_dir_all(&dir).map_err(io_err(format!("create {}", dir.display())))?;
        }
        let storage = FsStorage { layout };
        // The fixed top of the layout, once: no symbolic link on the way down to
        // `blobs/` and `repositories/` (later checks start below them).
        for top in [storage.layout.blobs(), storage.layout.repositories()] {
            let Ok(rel) = top.strip_prefix(root) else {
                return Err(StorageError::Unsafe(top));
            };
            let mut current = root.to_path_buf();
            for component in rel.components() {
                current.push(component);
                if std::fs::symlink_metadata(&current).is_ok_and(|m| m.file_type().is_symlink()) {
                    return Err(StorageError::Unsafe(current));
                }
            }
        }
        Ok(storage)
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Run file work on the blocking pool.
    pub async fn blocking<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&FsStorage) -> Result<T> + Send + 'static,
    {
        let this = self.clone();
        tokio::task::spawn_blocking(move || f(&this))
            .await
            .map_err(|e| StorageError::Task(e.to_string()))?
    }

    /// Refuse `path` when a component below the root is a symbolic link (planted in
    /// the root by someone with access to it): no request may leave the root.
    pub fn contained(&self, path: &Path) -> Result<()> {
        // The fixed top of the layout (`docker/registry/v2/blobs|repositories`) is
        // checked once, when the storage is opened; below it, every component.
        let (base, rel) = match [self.layout.blobs(), self.layout.repositories()]
            .into_iter()
            .find_map(|top| {
                path.strip_prefix(&top)
                    .ok()
                    .map(|r| (top.clone(), r.to_owned()))
            }) {
            Some(found) => found,
            None => {
                let root = self.layout.root();
                match path.strip_prefix(root) {
                    Ok(r) => (root.to_path_buf(), r.to_owned()),
                    Err(_) => return Err(StorageError::Unsafe(path.to_owned())),
                }
            }
        };
        let mut current = base;
        for component in rel.components() {
            match component {
                std::path::Component::Normal(c) => current.push(c),
                _ => return Err(StorageError::Unsafe(path.to_owned())),
            }
            match std::fs::symlink_metadata(&current) {
                Ok(m) if m.file_type().is_symlink() => {
                    return Err(StorageError::Unsafe(current));
                }
                Ok(_) => {}
                Err(e) if missing(&e) => return Ok(()),
                Err(e) => return Err(io_err(format!("inspect {}", current.display()))(e)),
            }
        }
        Ok(())
    }

    /// Size of a blob's content, if it exists.
    pub fn blob_size(&self, d: &Digest) -> Result<Option<u64>> {
        let path = self.layout.blob_data(d);
        self.contained(&path)?;
        match std::fs::metadata(&path) {
            Ok(m) if m.is_file() => Ok(Some(m.len())),
            Ok(_) => Ok(None),
            Err(e) if missing(&e) => Ok(None),
            Err(e) => Err(io_err(format!("stat {}", path.display()))(e)),
        }
    }

    /// Open a blob for reading: the file and its length.
    pub fn open_blob(&self, d: &Digest) -> Result<Option<(std::fs::File, u64)>> {
        let path = self.layout.blob_data(d);
        self.contained(&path)?;
        match std::fs::File::open(&path) {
            Ok(f) => {
                let len = f
                    .metadata()
                    .map_err(io_err(format!("stat {}", path.display())))?
                    .len();
                Ok(Some((f, len)))
            }
            Err(e) if missing(&e) => Ok(None),
            Err(e) => Err(io_err(format!("open {}", path.display()))(e)),
        }
    }

    /// Read a small blob (a manifest) whole; `None` if absent, an error if larger than
    /// `limit`.
    pub fn read_blob(&self, d: &Digest, limit: u64) -> Result<Option<Vec<u8>>> {
        let Some((file, len)) = self.open_blob(d)? else {
            return Ok(None);
        };
        if len > limit {
            return Err(StorageError::Io {
                what: format!("blob {d} is {len} bytes, more than {limit}"),
                source: io::Error::new(io::ErrorKind::InvalidData, "too large"),
            });
        }
        let mut buf = Vec::with_capacity(len as usize);
        io::Read::read_to_end(&mut io::Read::take(file, limit), &mut buf)
            .map_err(io_err(format!("read blob {d}")))?;
        Ok(Some(buf))
    }

    /// Write `bytes` as the content of `d` (already verified by the caller), unless it
    /// is there already.
    pub fn write_blob(&self, d: &Digest, bytes: &[u8]) -> Result<()> {
        if self.blob_size(d)?.is_some() {
            return Ok(());
        }
        let path = self.layout.blob_data(d);
        write_atomic(self, &path, bytes, true)
    }

    /// Move a verified upload file into place as the content of `d`.
    pub fn adopt_blob(&self, d: &Digest, file: &Path) -> Result<()> {
        let path = self.layout.blob_data(d);
        self.contained(&path)?;
        if self.blob_size(d)?.is_some() {
            // Same digest, same content: keep the one that is there.
            return remove_file_if_exists(file);
        }
        let dir = self.layout.blob_dir(d);
        std::fs::create_dir_all(&dir).map_err(io_err(format!("create {}", dir.display())))?;
        std::fs::rename(file, &path).map_err(io_err(format!("move blob {d} into place")))
    }

    /// Read a link file: the digest it holds, if it exists and holds one.
    pub fn read_link(&self, path: &Path) -> Result<Option<Digest>> {
        self.contained(path)?;
        match std::fs::read_to_string(path) {
            Ok(s) => Ok(Digest::parse(s.trim()).ok()),
            Err(e) if missing(&e) => Ok(None),
            Err(e) => Err(io_err(format!("read {}", path.display()))(e)),
        }
    }

    fn write_link(&self, path: &Path, d: &Digest) -> Result<()> {
        write_atomic(self, path, d.as_str().as_bytes(), false)
    }

    /// Whether `d` is a layer (any blob) of `repo` whose content exists.
    pub fn layer_linked(&self, repo: &RepoName, d: &Digest) -> Result<bool> {
        let linked = self.read_link(&self.layout.layer_link(repo, d))?.as_ref() == Some(d);
        Ok(linked && self.blob_size(d)?.is_some())
    }

    /// Hold off garbage collection's deletions while content is being referenced:
    /// a shared lock on the GC lock file (the sweep takes it exclusively for each
    /// deletion), released when the returned file is dropped. Works across processes,
    /// so `registry-gate gc` can run beside the server.
    pub fn gc_shared_lock(&self) -> Result<std::fs::File> {
        let file = self.open_gc_lock()?;
        file.lock_shared()
            .map_err(io_err("lock the GC lock file"))?;
        Ok(file)
    }

    /// The GC lock, exclusively (held by the sweep for each deletion).
    pub fn gc_exclusive_lock(&self) -> Result<std::fs::File> {
        let file = self.open_gc_lock()?;
        file.lock().map_err(io_err("lock the GC lock file"))?;
        Ok(file)
    }

    fn open_gc_lock(&self) -> Result<std::fs::File> {
        let path = self.layout.gc_lock();
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_err(format!("open {}", path.display())))
    }

    /// Mark content as in use now: garbage collection keeps content touched after it
    /// started. Call with the shared GC lock held.
    pub fn touch_blob(&self, d: &Digest) {
        touch(&self.layout.blob_data(d));
    }

    /// Make blob `d` part of `repo`. Touches the content so a concurrent garbage
    /// collection sees it as new; call with the shared GC lock held.
    pub fn link_layer(&self, repo: &RepoName, d: &Digest) -> Result<()> {
        touch(&self.layout.blob_data(d));
        self.write_link(&self.layout.layer_link(repo, d), d)
    }

    /// Remove blob `d` from `repo` (the content stays until garbage collection).
    pub fn unlink_layer(&self, repo: &RepoName, d: &Digest) -> Result<bool> {
        let link = self.layout.layer_link(repo, d);
        self.contained(&link)?;
        match link.parent() {
            Some(dir) if dir.exists() => {
                remove_dir_all(dir)?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// Whether manifest `d` is part of `repo`.
    pub fn revision_exists(&self, repo: &RepoName, d: &Digest) -> Result<bool> {
        Ok(self
            .read_link(&self.layout.revision_link(repo, d))?
            .as_ref()
            == Some(d))
    }

    /// The manifest a tag points at.
    pub fn resolve_tag(&self, repo: &RepoName, tag: &str) -> Result<Option<Digest>> {
        self.read_link(&self.layout.tag_current(repo, tag))
    }

    /// Store a verified manifest: content, revision link, then the tag (if any).
    pub fn put_manifest(
        &self,
        repo: &RepoName,
        d: &Digest,
        bytes: &[u8],
        tag: Option<&str>,
    ) -> Result<()> {
        self.write_blob(d, bytes)?;
        touch(&self.layout.blob_data(d));
        self.write_link(&self.layout.revision_link(repo, d), d)?;
        if let Some(tag) = tag {
            self.write_link(&self.layout.tag_index_link(repo, tag, d), d)?;
            self.write_link(&self.layout.tag_current(repo, tag), d)?;
        }
        Ok(())
    }

    /// Remove manifest `d` from `repo`, with every tag pointing at it.
    pub fn delete_manifest(&self, repo: &RepoName, d: &Digest) -> Result<bool> {
        if !self.revision_exists(repo, d)? {
            return Ok(false);
        }
        for tag in self.list_tags(repo)?.unwrap_or_default() {
            if self.resolve_tag(repo, &tag)?.as_ref() == Some(d) {
                self.delete_tag(repo, &tag)?;
            }
        }
        remove_dir_all(&self.layout.revision_dir(repo, d))?;
        Ok(true)
    }

    /// Remove a tag (the manifest stays).
    pub fn delete_tag(&self, repo: &RepoName, tag: &str) -> Result<bool> {
        let dir = self.layout.tag_dir(repo, tag);
        self.contained(&dir)?;
        if !dir.is_dir() {
            return Ok(false);
        }
        remove_dir_all(&dir)?;
        Ok(true)
    }

    /// Whether `repo` exists (has manifests or layers).
    pub fn repo_exists(&self, repo: &RepoName) -> Result<bool> {
        let dir = self.layout.repo(repo);
        self.contained(&dir)?;
        Ok(dir.join("_manifests").is_dir() || dir.join("_layers").is_dir())
    }

    /// The tags of `repo`, sorted; `None` if the repository does not exist.
    pub fn list_tags(&self, repo: &RepoName) -> Result<Option<Vec<String>>> {
        if !self.repo_exists(repo)? {
            return Ok(None);
        }
        let dir = self.layout.tags(repo);
        let mut tags = Vec::new();
        for t in list_dirs(self, &dir)? {
            // A tag is listed only once its `current` link is whole: a push killed
            // between the tag's index link and its current link leaves no tag.
            if crate::route::Reference::parse(&t).is_ok()
                && !t.contains(':')
                && self.resolve_tag(repo, &t)?.is_some()
            {
                tags.push(t);
            }
        }
        tags.sort();
        Ok(Some(tags))
    }

    /// Every manifest digest of `repo`.
    pub fn list_revisions(&self, repo: &RepoName) -> Result<Vec<Digest>> {
        let base = self.layout.revisions(repo);
        let mut out = Vec::new();
        for alg in list_dirs(self, &base)? {
            for hex in list_dirs(self, &base.join(&alg))? {
                if let Ok(d) = Digest::parse(&format!("{alg}:{hex}"))
                    && self.revision_exists(repo, &d)?
                {
                    out.push(d);
                }
            }
        }
        out.sort();
        Ok(out)
    }

    /// Every repository name, sorted. A repository is a directory with `_manifests`.
    pub fn list_repositories(&self) -> Result<Vec<String>> {
        let mut out = self.repositories_with("_manifests")?;
        out.sort();
        Ok(out)
    }

    /// Names (valid repository names) of the directories under `repositories/` that
    /// hold a `marker` sub-directory; directories starting with `_` are not entered.
    fn repositories_with(&self, marker: &str) -> Result<Vec<String>> {
        let mut out = Vec::new();
        let mut stack = vec![(self.layout.repositories(), String::new())];
        while let Some((dir, name)) = stack.pop() {
            for child in list_dirs(self, &dir)? {
                if child.starts_with('_') {
                    continue;
                }
                let full = if name.is_empty() {
                    child.clone()
                } else {
                    format!("{name}/{child}")
                };
                let path = dir.join(&child);
                if path.join(marker).is_dir() && RepoName::parse(&full).is_ok() {
                    out.push(full.clone());
                }
                stack.push((path, full));
            }
        }
        Ok(out)
    }

    /// Start an upload: a fresh id and its directory.
    pub fn create_upload(&self, repo: &RepoName) -> Result<UploadId> {
        let bytes: [u8; 16] = rand::random();
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        let id = UploadId::parse(&format!(
            "{}-{}-{}-{}-{}",
            &hex[0..8],
            &hex[8..12],
            &hex[12..16],
            &hex[16..20],
            &hex[20..32]
        ))
        .map_err(|e| StorageError::Task(e.to_string()))?;
        let dir = self.layout.upload_dir(repo, &id);
        self.contained(&dir)?;
        std::fs::create_dir_all(&dir).map_err(io_err(format!("create {}", dir.display())))?;
        let data = self.layout.upload_data(repo, &id);
        std::fs::File::create(&data).map_err(io_err(format!("create {}", data.display())))?;
        let started = crate::auth::token::rfc3339(crate::auth::token::now_secs());
        std::fs::write(self.layout.upload_started(repo, &id), started)
            .map_err(io_err("write startedat"))?;
        Ok(id)
    }

    /// The bytes received so far by an upload; `None` if there is no such upload.
    pub fn upload_size(&self, repo: &RepoName, id: &UploadId) -> Result<Option<u64>> {
        let data = self.layout.upload_data(repo, id);
        self.contained(&data)?;
        match std::fs::metadata(&data) {
            Ok(m) if m.is_file() => Ok(Some(m.len())),
            Ok(_) => Ok(None),
            Err(e) if missing(&e) => Ok(None),
            Err(e) => Err(io_err(format!("stat {}", data.display()))(e)),
        }
    }

    /// Finish an upload whose content was verified to be `d`.
    pub fn commit_upload(&self, repo: &RepoName, id: &UploadId, d: &Digest) -> Result<()> {
        let _gc = self.gc_shared_lock()?;
        let data = self.layout.upload_data(repo, id);
        self.contained(&data)?;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&data)
            .map_err(io_err(format!("open {}", data.display())))?;
        file.sync_all().map_err(io_err("sync upload"))?;
        drop(file);
        self.adopt_blob(d, &data)?;
        self.link_layer(repo, d)?;
        self.cancel_upload(repo, id)?;
        Ok(())
    }

    /// Drop an upload and its data.
    pub fn cancel_upload(&self, repo: &RepoName, id: &UploadId) -> Result<bool> {
        let dir = self.layout.upload_dir(repo, id);
        self.contained(&dir)?;
        if !dir.is_dir() {
            return Ok(false);
        }
        remove_dir_all(&dir)?;
        Ok(true)
    }

    /// Remove uploads started longer than `age` ago; returns how many went.
    pub fn purge_uploads(&self, age: Duration) -> Result<usize> {
        let now = SystemTime::now();
        let mut removed = 0;
        for name in self.repositories_with("_uploads")? {
            let Ok(repo) = RepoName::parse(&name) else {
                continue;
            };
            let dir = self.layout.uploads(&repo);
            for id in list_dirs(self, &dir)? {
                let path = dir.join(&id);
                let modified = std::fs::metadata(path.join("data"))
                    .and_then(|m| m.modified())
                    .or_else(|_| std::fs::metadata(&path).and_then(|m| m.modified()));
                let old = modified
                    .ok()
                    .and_then(|t| now.duration_since(t).ok())
                    .is_some_and(|a| a > age);
                if old {
                    remove_dir_all(&path)?;
                    removed += 1;
                }
            }
        }
        Ok(removed)
    }

    /// Whether files can be created in the storage (for `/readyz`).
    pub fn check_writable(&self) -> Result<()> {
        let probe = self.layout.repositories().join(".ready-probe");
        write_atomic(self, &probe, b"ok", false)?;
        remove_file_if_exists(&probe)
    }

    /// Bytes of blob content and number of open uploads (walks the disk).
    pub fn usage(&self) -> Result<(u64, usize)> {
        let mut bytes = 0;
        let blobs = self.layout.blobs();
        for alg in list_dirs(self, &blobs)? {
            for prefix in list_dirs(self, &blobs.join(&alg))? {
                for hex in list_dirs(self, &blobs.join(&alg).join(&prefix))? {
                    let data = blobs.join(&alg).join(&prefix).join(hex).join("data");
                    bytes += std::fs::metadata(&data).map(|m| m.len()).unwrap_or(0);
                }
            }
        }
        let mut uploads = 0;
        for name in self.repositories_with("_uploads")? {
            if let Ok(repo) = RepoName::parse(&name) {
                uploads += list_dirs(self, &self.layout.uploads(&repo))?.len();
            }
        }
        Ok((bytes, uploads))
    }

    /// Where an upload's bytes go (for the streaming writer in `uploads`).
    pub fn upload_data_path(&self, repo: &RepoName, id: &UploadId) -> Result<PathBuf> {
        let data = self.layout.upload_data(repo, id);
        self.contained(&data)?;
        Ok(data)
    }
}

/// Names of the sub-directories of `dir` (none if it does not exist). Symbolic links
/// are not followed and not listed.
fn list_dirs(storage: &FsStorage, dir: &Path) -> Result<Vec<String>> {
    storage.contained(dir)?;
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if missing(&e) => return Ok(Vec::new()),
        Err(e) => return Err(io_err(format!("list {}", dir.display()))(e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io_err(format!("list {}", dir.display())))?;
        let is_dir = entry.file_type().map(|t| t.is_dir()).unwrap_or(false);
        if let (true, Some(name)) = (is_dir, entry.file_name().to_str()) {
            out.push(name.to_owned());
        }
    }
    Ok(out)
}

/// Write a file through a temporary name in the same directory and a rename.
fn write_atomic(storage: &FsStorage, path: &Path, bytes: &[u8], sync: bool) -> Result<()> {
    storage.contained(path)?;
    let dir = path
        .parent()
        .ok_or_else(|| StorageError::Unsafe(path.to_owned()))?;
    std::fs::create_dir_all(dir).map_err(io_err(format!("create {}", dir.display())))?;
    let tmp_name: [u8; 8] = rand::random();
    let tmp = dir.join(format!(
        ".tmp-{}",
        tmp_name
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    ));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        f.write_all(bytes)?;
        if sync {
            f.sync_all()?;
        }
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(io_err(format!("write {}", path.display()))(e));
    }
    Ok(())
}

fn remove_dir_all(dir: &Path) -> Result<()> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if missing(&e) => Ok(()),
        Err(e) => Err(io_err(format!("remove {}", dir.display()))(e)),
    }
}

fn remove_file_if_exists(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if missing(&e) => Ok(()),
        Err(e) => Err(io_err(format!("remove {}", path.display()))(e)),
    }
}

/// Set a file's modification time to now (best effort): garbage collection keeps
/// content touched after it started.
fn touch(path: &Path) {
    if let Ok(f) = std::fs::OpenOptions::new().append(true).open(path) {
        let _ = f.set_modified(SystemTime::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(s: &str) -> Digest {
        use sha2::Digest as _;
        let hex: String = sha2::Sha256::digest(s.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        Digest::parse(&format!("sha256:{hex}")).expect("digest")
    }

    #[test]
    fn manifests_tags_and_listing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = FsStorage::open(dir.path()).expect("open");
        let repo = RepoName::parse("a/b").expect("name");
        let d = digest("{}");
        s.put_manifest(&repo, &d, b"{}", Some("v1")).expect("put");
        assert_eq!(s.resolve_tag(&repo, "v1").expect("tag"), Some(d.clone()));
        assert!(s.revision_exists(&repo, &d).expect("rev"));
        assert_eq!(
            s.list_tags(&repo).expect("tags"),
            Some(vec!["v1".to_owned()])
        );
        assert_eq!(
            s.list_repositories().expect("repos"),
            vec!["a/b".to_owned()]
        );
        assert_eq!(s.list_revisions(&repo).expect("revs"), vec![d.clone()]);
        assert!(s.delete_manifest(&repo, &d).expect("delete"));
        assert_eq!(s.resolve_tag(&repo, "v1").expect("tag"), None);
        let unknown = RepoName::parse("nope").expect("name");
        assert_eq!(s.list_tags(&unknown).expect("tags"), None);
    }

    #[test]
    fn uploads_commit_and_cancel() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = FsStorage::open(dir.path()).expect("open");
        let repo = RepoName::parse("x").expect("name");
        let id = s.create_upload(&repo).expect("create");
        assert_eq!(s.upload_size(&repo, &id).expect("size"), Some(0));
        std::fs::write(s.upload_data_path(&repo, &id).expect("path"), b"hello").expect("write");
        let d = digest("hello");
        s.commit_upload(&repo, &id, &d).expect("commit");
        assert!(s.layer_linked(&repo, &d).expect("linked"));
        assert_eq!(s.upload_size(&repo, &id).expect("size"), None);
        let id2 = s.create_upload(&repo).expect("create");
        assert!(s.cancel_upload(&repo, &id2).expect("cancel"));
        assert_eq!(s.purge_uploads(Duration::ZERO).expect("purge"), 0);
        let _id3 = s.create_upload(&repo).expect("create");
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(s.purge_uploads(Duration::from_millis(1)).expect("purge"), 1);
    }

    #[test]
    fn planted_symlinks_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let outside = tempfile::tempdir().expect("tempdir");
        let s = FsStorage::open(dir.path()).expect("open");
        std::os::unix::fs::symlink(outside.path(), s.layout().repositories().join("evil"))
            .expect("symlink");
        let repo = RepoName::parse("evil/x").expect("name");
        assert!(matches!(
            s.put_manifest(&repo, &digest("{}"), b"{}", Some("v1")),
            Err(StorageError::Unsafe(_))
        ));
        assert!(
            std::fs::read_dir(outside.path())
                .expect("dir")
                .next()
                .is_none()
        );
        assert!(matches!(s.list_tags(&repo), Err(StorageError::Unsafe(_))));
    }
}
