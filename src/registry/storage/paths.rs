//! The disk layout, drawn once. It is the layout of CNCF distribution's filesystem
//! driver (`registry:2`), so an existing `/var/lib/registry` is served as it is and what
//! is written here is served by `registry:2`:
//!
//! ```text
//! <root>/docker/registry/v2/
//!   blobs/<alg>/<first 2 hex>/<hex>/data                 content, by digest
//!   repositories/<name>/
//!     _layers/<alg>/<hex>/link                           blob is part of <name>
//!     _manifests/revisions/<alg>/<hex>/link              manifest is part of <name>
//!     _manifests/tags/<tag>/current/link                 tag → manifest digest
//!     _manifests/tags/<tag>/index/<alg>/<hex>/link       every digest the tag had
//!     _uploads/<id>/data                                 upload in progress
//!     _uploads/<id>/startedat                            RFC 3339 start time
//! ```
//!
//! A link file holds a digest (`sha256:<hex>`), nothing else. Every path is built from
//! values the router has already validated (repository names, tags, digests with hex
//! only for sha256/sha512, upload ids), so no component can be `..` or contain `/`
//! except the separators of a repository name.

use std::path::{Path, PathBuf};

use crate::route::{Digest, RepoName, UploadId};

#[derive(Debug, Clone)]
pub struct Layout {
    /// `<root>/docker/registry/v2`
    base: PathBuf,
    root: PathBuf,
}

impl Layout {
    pub fn new(root: &Path) -> Self {
        Layout {
            base: root.join("docker/registry/v2"),
            root: root.to_owned(),
        }
    }

    /// The configured storage root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Lock file coordinating garbage collection with writers (not part of
    /// distribution's layout; `registry:2` ignores it).
    pub fn gc_lock(&self) -> PathBuf {
        self.base.join("gc.lock")
    }

    pub fn blobs(&self) -> PathBuf {
        self.base.join("blobs")
    }

    pub fn blob_dir(&self, d: &Digest) -> PathBuf {
        let hex = d.encoded();
        let prefix = hex.get(..2).unwrap_or(hex);
        self.base
            .join("blobs")
            .join(d.algorithm())
            .join(prefix)
            .join(hex)
    }

    pub fn blob_data(&self, d: &Digest) -> PathBuf {
        self.blob_dir(d).join("data")
    }

    pub fn repositories(&self) -> PathBuf {
        self.base.join("repositories")
    }

    pub fn repo(&self, name: &RepoName) -> PathBuf {
        self.base.join("repositories").join(name.as_str())
    }

    pub fn layer_link(&self, name: &RepoName, d: &Digest) -> PathBuf {
        self.repo(name)
            .join("_layers")
            .join(d.algorithm())
            .join(d.encoded())
            .join("link")
    }

    pub fn revisions(&self, name: &RepoName) -> PathBuf {
        self.repo(name).join("_manifests/revisions")
    }

    pub fn revision_dir(&self, name: &RepoName, d: &Digest) -> PathBuf {
        self.revisions(name).join(d.algorithm()).join(d.encoded())
    }

    pub fn revision_link(&self, name: &RepoName, d: &Digest) -> PathBuf {
        self.revision_dir(name, d).join("link")
    }

    pub fn tags(&self, name: &RepoName) -> PathBuf {
        self.repo(name).join("_manifests/tags")
    }

    pub fn tag_dir(&self, name: &RepoName, tag: &str) -> PathBuf {
        self.tags(name).join(tag)
    }

    pub fn tag_current(&self, name: &RepoName, tag: &str) -> PathBuf {
        self.tag_dir(name, tag).join("current/link")
    }

    pub fn tag_index_link(&self, name: &RepoName, tag: &str, d: &Digest) -> PathBuf {
        self.tag_dir(name, tag)
            .join("index")
            .join(d.algorithm())
            .join(d.encoded())
            .join("link")
    }

    pub fn uploads(&self, name: &RepoName) -> PathBuf {
        self.repo(name).join("_uploads")
    }

    pub fn upload_dir(&self, name: &RepoName, id: &UploadId) -> PathBuf {
        self.uploads(name).join(id.as_str())
    }

    pub fn upload_data(&self, name: &RepoName, id: &UploadId) -> PathBuf {
        self.upload_dir(name, id).join("data")
    }

    pub fn upload_started(&self, name: &RepoName, id: &UploadId) -> PathBuf {
        self.upload_dir(name, id).join("startedat")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_match_distribution() {
        let l = Layout::new(Path::new("/var/lib/registry"));
        let d = Digest::parse(
            "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        )
        .expect("digest");
        let n = RepoName::parse("library/app").expect("name");
        assert_eq!(
            l.blob_data(&d),
            Path::new(
                "/var/lib/registry/docker/registry/v2/blobs/sha256/01/0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef/data"
            )
        );
        assert_eq!(
            l.layer_link(&n, &d),
            Path::new(
                "/var/lib/registry/docker/registry/v2/repositories/library/app/_layers/sha256/0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef/link"
            )
        );
        assert_eq!(
            l.tag_current(&n, "v1"),
            Path::new(
                "/var/lib/registry/docker/registry/v2/repositories/library/app/_manifests/tags/v1/current/link"
            )
        );
    }
}
