//! The layout, drawn once. It is the layout of CNCF distribution (`registry:2`), on disk
//! (filesystem driver) and in a bucket (`s3-aws` driver, under its `rootdirectory`), so
//! an existing `/var/lib/registry` or bucket is served as it is and what is written here
//! is served by `registry:2`:
//!
//! ```text
//! docker/registry/v2/
//!   blobs/<alg>/<first 2 hex>/<hex>/data                 content, by digest
//!   repositories/<name>/
//!     _layers/<alg>/<hex>/link                           blob is part of <name>
//!     _manifests/revisions/<alg>/<hex>/link              manifest is part of <name>
//!     _manifests/tags/<tag>/current/link                 tag → manifest digest
//!     _manifests/tags/<tag>/index/<alg>/<hex>/link       every digest the tag had
//!     _uploads/<id>/data                                 upload in progress
//!     _uploads/<id>/startedat                            RFC 3339 start time
//!     _uploads/<id>/gate-state                           (ours) parts, size, running hash
//!     _uploads/<id>/gate-tail                            (ours) bytes not yet in a part
//! registry-gate/                                         (ours; registry:2 never looks)
//!   gc/refs/<millis>-<random>                            digests a writer is about to use
//!   gc/sweep                                             what a collection is deleting now
//! ```
//!
//! A link holds a digest (`sha256:<hex>`), nothing else. Keys are relative, `/`
//! separated; a backend puts them under its root directory or bucket prefix. Every key
//! is built here from values the router has already validated (repository names, tags,
//! digests with hex only for sha256/sha512, upload ids), so no component can be `..`
//! or empty, and none contains `/` except the separators of a repository name.

use std::fmt;

use crate::route::{Digest, RepoName, UploadId};

/// The key of an object (or, for listings, of a "directory": a key prefix).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key(String);

impl Key {
    /// A key from a relative path a backend listed. `None` when it is not one this
    /// layout could have built (empty, absolute, `.`/`..` components).
    pub fn from_listed(s: &str) -> Option<Key> {
        let ok = !s.is_empty()
            && s.split('/')
                .all(|c| !c.is_empty() && c != "." && c != ".." && !c.contains('\0'));
        ok.then(|| Key(s.to_owned()))
    }

    fn new(s: impl Into<String>) -> Key {
        Key(s.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `self/name`.
    pub fn child(&self, name: &str) -> Key {
        Key(format!("{}/{name}", self.0))
    }

    /// The last component.
    pub fn name(&self) -> &str {
        self.0.rsplit('/').next().unwrap_or(&self.0)
    }

    /// What follows `prefix/` in this key, if it is below `prefix`.
    pub fn strip<'a>(&'a self, prefix: &Key) -> Option<&'a str> {
        self.0
            .strip_prefix(prefix.as_str())
            .and_then(|rest| rest.strip_prefix('/'))
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

const BASE: &str = "docker/registry/v2";
const OURS: &str = "registry-gate";

/// Where everything is. Has no state: the root (directory or bucket prefix) is the
/// backend's.
#[derive(Debug, Clone, Copy, Default)]
pub struct Layout;

impl Layout {
    pub fn blobs(&self) -> Key {
        Key::new(format!("{BASE}/blobs"))
    }

    pub fn blob_dir(&self, d: &Digest) -> Key {
        let hex = d.encoded();
        let prefix = hex.get(..2).unwrap_or(hex);
        Key::new(format!("{BASE}/blobs/{}/{prefix}/{hex}", d.algorithm()))
    }

    pub fn blob_data(&self, d: &Digest) -> Key {
        self.blob_dir(d).child("data")
    }

    /// The digest whose content `key` (a `blobs/…/data` key) is.
    pub fn blob_digest(&self, key: &Key) -> Option<Digest> {
        let rest = key.strip(&self.blobs())?;
        let mut parts = rest.split('/');
        let (alg, prefix, hex, data) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        if data != "data" || parts.next().is_some() || !hex.starts_with(prefix) {
            return None;
        }
        Digest::parse(&format!("{alg}:{hex}")).ok()
    }

    pub fn repositories(&self) -> Key {
        Key::new(format!("{BASE}/repositories"))
    }

    pub fn repo(&self, name: &RepoName) -> Key {
        self.repositories().child(name.as_str())
    }

    pub fn layers(&self, name: &RepoName) -> Key {
        self.repo(name).child("_layers")
    }

    pub fn layer_dir(&self, name: &RepoName, d: &Digest) -> Key {
        self.layers(name).child(d.algorithm()).child(d.encoded())
    }

    pub fn layer_link(&self, name: &RepoName, d: &Digest) -> Key {
        self.layer_dir(name, d).child("link")
    }

    pub fn manifests(&self, name: &RepoName) -> Key {
        self.repo(name).child("_manifests")
    }

    pub fn revisions(&self, name: &RepoName) -> Key {
        self.manifests(name).child("revisions")
    }

    pub fn revision_dir(&self, name: &RepoName, d: &Digest) -> Key {
        self.revisions(name).child(d.algorithm()).child(d.encoded())
    }

    pub fn revision_link(&self, name: &RepoName, d: &Digest) -> Key {
        self.revision_dir(name, d).child("link")
    }

    pub fn tags(&self, name: &RepoName) -> Key {
        self.manifests(name).child("tags")
    }

    pub fn tag_dir(&self, name: &RepoName, tag: &str) -> Key {
        self.tags(name).child(tag)
    }

    pub fn tag_current(&self, name: &RepoName, tag: &str) -> Key {
        self.tag_dir(name, tag).child("current/link")
    }

    /// When the tag was last pushed, and to which digest (registry-gate's own object
    /// beside distribution's links; `registry:2` ignores it and removes it with the tag).
    pub fn tag_pushed(&self, name: &RepoName, tag: &str) -> Key {
        self.tag_dir(name, tag).child("pushedat")
    }

    pub fn tag_index_link(&self, name: &RepoName, tag: &str, d: &Digest) -> Key {
        self.tag_dir(name, tag)
            .child("index")
            .child(d.algorithm())
            .child(d.encoded())
            .child("link")
    }

    pub fn uploads(&self, name: &RepoName) -> Key {
        self.repo(name).child("_uploads")
    }

    pub fn upload_dir(&self, name: &RepoName, id: &UploadId) -> Key {
        self.uploads(name).child(id.as_str())
    }

    pub fn upload_data(&self, name: &RepoName, id: &UploadId) -> Key {
        self.upload_dir(name, id).child("data")
    }

    pub fn upload_started(&self, name: &RepoName, id: &UploadId) -> Key {
        self.upload_dir(name, id).child("startedat")
    }

    pub fn upload_state(&self, name: &RepoName, id: &UploadId) -> Key {
        self.upload_dir(name, id).child("gate-state")
    }

    pub fn upload_tail(&self, name: &RepoName, id: &UploadId) -> Key {
        self.upload_dir(name, id).child("gate-tail")
    }

    /// Our own objects, outside distribution's tree.
    pub fn ours(&self) -> Key {
        Key::new(OURS)
    }

    pub fn gc_refs(&self) -> Key {
        Key::new(format!("{OURS}/gc/refs"))
    }

    pub fn gc_sweep(&self) -> Key {
        Key::new(format!("{OURS}/gc/sweep"))
    }

    /// A probe object `/readyz` writes and removes.
    pub fn ready_probe(&self) -> Key {
        Key::new(format!("{OURS}/ready-probe"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_match_distribution() {
        let l = Layout;
        let d = Digest::parse(
            "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        )
        .expect("digest");
        let n = RepoName::parse("library/app").expect("name");
        assert_eq!(
            l.blob_data(&d).as_str(),
            "docker/registry/v2/blobs/sha256/01/0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef/data"
        );
        assert_eq!(l.blob_digest(&l.blob_data(&d)), Some(d.clone()));
        assert_eq!(
            l.layer_link(&n, &d).as_str(),
            "docker/registry/v2/repositories/library/app/_layers/sha256/0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef/link"
        );
        assert_eq!(
            l.tag_current(&n, "v1").as_str(),
            "docker/registry/v2/repositories/library/app/_manifests/tags/v1/current/link"
        );
    }

    #[test]
    fn listed_keys_are_checked() {
        assert!(Key::from_listed("a/b/c").is_some());
        for bad in ["", "/a", "a//b", "a/../b", "./a", "a/"] {
            assert!(Key::from_listed(bad).is_none(), "{bad:?}");
        }
        let k = Key::from_listed("a/b/c").expect("key");
        assert_eq!(k.name(), "c");
        assert_eq!(k.strip(&Key::from_listed("a").expect("key")), Some("b/c"));
        assert_eq!(k.strip(&Key::from_listed("a/b/c").expect("key")), None);
    }
}
