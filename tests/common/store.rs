//! Where a test's built-in registry stores, and a view of it from outside the gate:
//! the local disk ([`Backend::Fs`]) or a real Garage cluster ([`Backend::S3`], a key
//! prefix of the test's own in the shared cluster). The registry tests run once per
//! backend; they look at what was stored (and plant things) through [`TestStore`],
//! keyed by the CNCF layout's paths under the root (`docker/registry/v2/…`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures_util::TryStreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

use super::garage::{Garage, S3Place};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Fs,
    S3,
}

/// One test's store.
#[derive(Clone)]
pub struct TestStore {
    pub backend: Backend,
    /// The storage root (`Fs`); for `S3`, where the secret file lives.
    pub root: PathBuf,
    pub s3: Option<S3Place>,
    client: Option<Arc<dyn ObjectStore>>,
}

pub const V2: &str = "docker/registry/v2";

fn split(digest: &str) -> (&str, &str) {
    digest.split_once(':').expect("algorithm:hex digest")
}

pub fn blob_key(digest: &str) -> String {
    let (alg, hex) = split(digest);
    format!("{V2}/blobs/{alg}/{}/{hex}/data", &hex[..2])
}

pub fn repo_key(repo: &str) -> String {
    format!("{V2}/repositories/{repo}")
}

pub fn layer_link_key(repo: &str, digest: &str) -> String {
    let (alg, hex) = split(digest);
    format!("{}/_layers/{alg}/{hex}/link", repo_key(repo))
}

pub fn revision_link_key(repo: &str, digest: &str) -> String {
    let (alg, hex) = split(digest);
    format!("{}/_manifests/revisions/{alg}/{hex}/link", repo_key(repo))
}

pub fn tag_current_key(repo: &str, tag: &str) -> String {
    format!("{}/_manifests/tags/{tag}/current/link", repo_key(repo))
}

pub fn tag_index_key(repo: &str, tag: &str, digest: &str) -> String {
    let (alg, hex) = split(digest);
    format!(
        "{}/_manifests/tags/{tag}/index/{alg}/{hex}/link",
        repo_key(repo)
    )
}

pub fn uploads_key(repo: &str) -> String {
    format!("{}/_uploads", repo_key(repo))
}

impl TestStore {
    /// A store for a test whose files live in `dir`: `dir/storage` on disk, or a fresh
    /// prefix in the shared Garage cluster.
    pub fn new(backend: Backend, dir: &Path) -> TestStore {
        match backend {
            Backend::Fs => TestStore::fs(&dir.join("storage")),
            Backend::S3 => TestStore::s3(S3Place::new(Garage::shared(), dir), dir),
        }
    }

    pub fn fs(root: &Path) -> TestStore {
        TestStore {
            backend: Backend::Fs,
            root: root.to_path_buf(),
            s3: None,
            client: None,
        }
    }

    pub fn s3(place: S3Place, dir: &Path) -> TestStore {
        let client = AmazonS3Builder::new()
            .with_endpoint(&place.endpoint)
            .with_allow_http(true)
            .with_region(&place.region)
            .with_bucket_name(&place.bucket)
            .with_access_key_id(&place.key_id)
            .with_secret_access_key(&place.secret)
            .build()
            .expect("an S3 client for the test");
        TestStore {
            backend: Backend::S3,
            root: dir.to_path_buf(),
            s3: Some(place),
            client: Some(Arc::new(client)),
        }
    }

    /// The `[storage]` lines of a gate on this store.
    pub fn gate_lines(&self, delete: bool, purge: Option<u64>) -> String {
        let mut lines = match &self.s3 {
            None => format!("root = {:?}\n", self.root),
            Some(place) => place.gate_line(),
        };
        lines.push_str(&format!("delete = {delete}\n"));
        if let Some(secs) = purge {
            lines.push_str(&format!("purge_uploads_after_secs = {secs}\n"));
        }
        lines
    }

    /// The `storage:` section of a `docker-registry` config on this store.
    pub fn registry_yaml(&self) -> String {
        match &self.s3 {
            None => format!(
                "storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n  \
                 maintenance:\n    uploadpurging:\n      enabled: false\n",
                self.root.display()
            ),
            Some(place) => place.registry_yaml(false),
        }
    }

    fn object(&self, key: &str) -> ObjectPath {
        let prefix = self.s3.as_ref().map(|p| p.prefix.as_str()).unwrap_or("");
        ObjectPath::from(format!("{prefix}/{key}"))
    }

    fn client(&self) -> &Arc<dyn ObjectStore> {
        self.client.as_ref().expect("an S3 store has a client")
    }

    pub fn path(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }

    pub async fn exists(&self, key: &str) -> bool {
        match self.backend {
            Backend::Fs => self.path(key).is_file(),
            Backend::S3 => match self.client().head(&self.object(key)).await {
                Ok(_) => true,
                Err(object_store::Error::NotFound { .. }) => false,
                Err(e) => panic!("HEAD {key}: {e}"),
            },
        }
    }

    pub async fn read(&self, key: &str) -> Option<Vec<u8>> {
        match self.backend {
            Backend::Fs => std::fs::read(self.path(key)).ok(),
            Backend::S3 => match self.client().get(&self.object(key)).await {
                Ok(r) => Some(r.bytes().await.expect("read the object").to_vec()),
                Err(object_store::Error::NotFound { .. }) => None,
                Err(e) => panic!("GET {key}: {e}"),
            },
        }
    }

    pub async fn write(&self, key: &str, bytes: &[u8]) {
        match self.backend {
            Backend::Fs => {
                let path = self.path(key);
                std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
                std::fs::write(path, bytes).expect("write");
            }
            Backend::S3 => {
                self.client()
                    .put(&self.object(key), PutPayload::from(bytes.to_vec()))
                    .await
                    .expect("PUT");
            }
        }
    }

    /// Every key below `prefix` (relative to the root), sorted.
    pub async fn keys(&self, prefix: &str) -> Vec<String> {
        let mut out: Vec<String> = match self.backend {
            Backend::Fs => super::registry::walk(&self.path(prefix))
                .into_iter()
                .filter_map(|p| {
                    p.strip_prefix(&self.root)
                        .ok()
                        .map(|r| r.to_string_lossy().into_owned())
                })
                .collect(),
            Backend::S3 => {
                let base = self.object("");
                let listed: Vec<_> = self
                    .client()
                    .list(Some(&self.object(prefix)))
                    .try_collect()
                    .await
                    .expect("LIST");
                listed
                    .into_iter()
                    .filter_map(|m| {
                        m.location
                            .as_ref()
                            .strip_prefix(base.as_ref())
                            .map(|k| k.trim_start_matches('/').to_owned())
                    })
                    .collect()
            }
        };
        out.sort();
        out
    }

    /// The names directly below `prefix`, sorted: on disk every entry of the directory
    /// (files, directories, even empty ones, and symlinks); in a bucket the next
    /// segment of every key below it.
    pub async fn names(&self, prefix: &str) -> Vec<String> {
        let mut names: Vec<String> = match self.backend {
            Backend::Fs => std::fs::read_dir(self.path(prefix))
                .map(|entries| {
                    entries
                        .flatten()
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default(),
            Backend::S3 => self
                .keys(prefix)
                .await
                .iter()
                .filter_map(|k| {
                    k.strip_prefix(&format!("{prefix}/"))
                        .and_then(|rest| rest.split('/').next())
                        .map(str::to_owned)
                })
                .collect(),
        };
        names.sort();
        names.dedup();
        names
    }

    /// The upload sessions of `repo` still stored (on disk, any entry of `_uploads`).
    pub async fn open_uploads(&self, repo: &str) -> Vec<String> {
        self.names(&uploads_key(repo)).await
    }

    /// Bytes an upload session holds in the store: its data file on disk; in a bucket,
    /// the parts its state records (parts in flight are not counted).
    pub async fn upload_bytes(&self, repo: &str, id: &str) -> u64 {
        let dir = format!("{}/{id}", uploads_key(repo));
        match self.backend {
            Backend::Fs => std::fs::metadata(self.path(&format!("{dir}/data")))
                .map(|m| m.len())
                .unwrap_or(0),
            Backend::S3 => self
                .read(&format!("{dir}/gate-state"))
                .await
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                .map(|state| {
                    state["parts_size"].as_u64().unwrap_or(0) + state["tail"].as_u64().unwrap_or(0)
                })
                .unwrap_or(0),
        }
    }

    /// Writes that never finished: temporary files on disk, multipart uploads in
    /// progress in the bucket.
    pub async fn unfinished_writes(&self) -> Vec<String> {
        match &self.s3 {
            None => super::registry::walk(&self.root)
                .into_iter()
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with(".tmp"))
                })
                .map(|p| p.display().to_string())
                .collect(),
            Some(place) => place.multipart_uploads(),
        }
    }
}

/// One `#[tokio::test]` per backend for each test named: `fs::<name>` runs it on the
/// local disk, `s3::<name>` on the shared Garage cluster. Each test is an `async fn
/// name(backend: Backend)` of the test file, which imports `Backend`.
#[allow(unused_macros)]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod fs {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name(super::Backend::Fs).await
                }
            )*
        }
        mod s3 {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name(super::Backend::S3).await
                }
            )*
        }
    };
}
