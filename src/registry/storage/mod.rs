//! Where the built-in registry keeps content, behind one interface shaped on what an
//! object store can do: get (whole or a range), head, put of a whole object, delete,
//! list by prefix (all below it, or one level), move, and multipart upload. The
//! registry logic (`store`, `uploads`, `gc`) is written once above it; two backends
//! live below it:
//!
//! * `fs` — the local disk, in `registry:2`'s layout (`paths`); writes go through a
//!   temporary name and a rename; all file I/O runs on the blocking pool;
//! * `s3` — any S3-compatible object store (AWS, Garage, MinIO, Ceph), in the layout
//!   distribution's `s3-aws` driver writes, through `object_store`.
//!
//! Neither backend offers conditional writes (Garage ignores `If-None-Match`), so
//! nothing above relies on them: content is addressed by digest (two writers of one
//! key write the same bytes), and where writers and the garbage collector must agree,
//! `claims` does it with plain puts, reads and lists.
//!
//! Errors carry no HTTP types: `registry::storage_error_response` turns them into an
//! OCI error for the client and one log line with the cause.

pub mod fs;
pub mod paths;
pub mod s3;

use std::io;
use std::ops::Range;
use std::time::SystemTime;

use bytes::Bytes;

use crate::body::Body;
pub use paths::{Key, Layout};

/// A storage failure. Carries the cause for the log; clients see a generic message
/// (or, for `Unavailable`, which store is down).
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("storage is full: {0}")]
    Full(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("refusing a path through a symbolic link: {0}")]
    Unsafe(String),
    #[error("storage task failed: {0}")]
    Task(String),
    /// The store cannot be reached (or keeps answering 5xx): retry later.
    #[error("{store} is unavailable: {detail}")]
    Unavailable { store: String, detail: String },
    /// The store refused the request (credentials, bucket, permissions).
    #[error("{store}: {detail}")]
    Refused { store: String, detail: String },
    /// Another writer changed what this one was building on (an upload PATCHed from
    /// two places at once).
    #[error("conflicting writes: {0}")]
    Conflict(String),
    #[error("{0} is larger than allowed")]
    TooLarge(String),
}

pub type Result<T> = std::result::Result<T, StorageError>;

impl StorageError {
    /// `Io`, or `Full` when the disk or quota is full.
    pub fn io(what: impl Into<String>, source: io::Error) -> StorageError {
        if matches!(
            source.kind(),
            io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
        ) {
            StorageError::Full(format!("{}: {source}", what.into()))
        } else {
            StorageError::Io {
                what: what.into(),
                source,
            }
        }
    }
}

/// What a backend knows about one object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    pub size: u64,
    /// When it was last written (the store's clock for object stores).
    pub modified: SystemTime,
    /// Changes whenever the object is rewritten (an ETag; on disk, inode and mtime).
    pub version: String,
}

/// An object being read: its metadata (the whole object's size), the byte range
/// the body carries, and the body, streaming.
pub struct Object {
    pub meta: Meta,
    pub range: Range<u64>,
    pub body: Body,
}

/// One level of a listing: the objects directly below a prefix and the names of the
/// "directories" (key prefixes) below it.
#[derive(Debug, Default)]
pub struct Listing {
    pub objects: Vec<(Key, Meta)>,
    pub dirs: Vec<String>,
}

/// Part sizes a backend wants for multipart uploads.
#[derive(Debug, Clone, Copy)]
pub struct PartSizes {
    /// Every part but the last must be at least this long (S3: 5 MiB).
    pub min: usize,
    /// Parts are cut at this size.
    pub preferred: usize,
}

/// The interface the registry logic talks to. Keys come from [`Layout`] only.
#[async_trait::async_trait]
pub trait Storage: Send + Sync + 'static {
    /// One line for logs and errors: which store this is.
    fn describe(&self) -> String;

    /// An object's metadata; `None` if there is no such object.
    async fn head(&self, key: &Key) -> Result<Option<Meta>>;

    /// Read an object, or `range` of it (already resolved against its size).
    async fn get(&self, key: &Key, range: Option<Range<u64>>) -> Result<Option<Object>>;

    /// Read a small object whole; `TooLarge` if it is longer than `limit`.
    async fn read(&self, key: &Key, limit: u64) -> Result<Option<(Bytes, Meta)>>;

    /// Write a whole object, replacing any object of that key. Readers see the old
    /// object or the new one, never a part.
    async fn put(&self, key: &Key, bytes: Bytes) -> Result<()>;

    /// Remove an object; an absent one is not an error.
    async fn delete(&self, key: &Key) -> Result<()>;

    /// Remove several objects (absent ones are not an error), in as few requests as
    /// the backend allows.
    async fn delete_many(&self, keys: &[Key]) -> Result<()> {
        for key in keys {
            self.delete(key).await?;
        }
        Ok(())
    }

    /// Remove every object below `prefix` (a "directory").
    async fn delete_all(&self, prefix: &Key) -> Result<()>;

    /// Every object below `prefix`, at any depth, in no particular order.
    async fn list(&self, prefix: &Key) -> Result<Vec<(Key, Meta)>>;

    /// The objects and "directories" directly below `prefix`.
    async fn list_dir(&self, prefix: &Key) -> Result<Listing>;

    /// Move an object to another key (replacing what is there).
    async fn rename(&self, from: &Key, to: &Key) -> Result<()>;

    fn part_sizes(&self) -> PartSizes;

    /// Start a multipart upload that will become the object `key`; returns its id.
    async fn create_multipart(&self, key: &Key) -> Result<String>;

    /// Write part `index` (0-based) of an upload, which starts at byte `offset` of the
    /// object. Parts are written in order. Returns the part's tag for `complete`.
    async fn put_part(
        &self,
        key: &Key,
        upload: &str,
        index: usize,
        offset: u64,
        data: Vec<Bytes>,
    ) -> Result<String>;

    /// Make the object `key` from the parts (their tags, in order). A part that is
    /// not the one tagged (overwritten by another writer) fails with `Conflict`.
    async fn complete_multipart(&self, key: &Key, upload: &str, parts: &[String]) -> Result<()>;

    /// Bytes a multipart upload holds after the first `known` (written by a request
    /// that died before recording them), with a part tag covering them, when the
    /// backend can tell and keep them (the disk: its upload is one file). `None`:
    /// nothing to add, or a backend that cannot know (an object store).
    async fn resume_multipart(
        &self,
        _key: &Key,
        _upload: &str,
        _known: u64,
    ) -> Result<Option<(u64, String)>> {
        Ok(None)
    }

    /// Drop an unfinished multipart upload and its parts.
    async fn abort_multipart(&self, key: &Key, upload: &str) -> Result<()>;

    /// A URL the client may GET the object from directly (answered as a redirect),
    /// when the backend was configured to hand those out.
    async fn redirect_url(&self, _key: &Key) -> Result<Option<String>> {
        Ok(None)
    }

    /// Whether the store can be written now (for `/readyz`).
    async fn check(&self) -> Result<()>;
}
