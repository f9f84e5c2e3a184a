//! The gate with the registry built into it ("all-in-one": no `[upstream]`, a
//! `[storage]` root in the test's directory), as an in-process server or as the real
//! binary (for `kill -9`), plus what the registry tests need around it: the disk
//! layout's paths, a small tmpfs to fill, manifests of every kind, a multi-arch OCI
//! image layout for `skopeo copy --all`, and a request body that stalls half-way.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::Frame;
use http_body_util::BodyExt as _;
use serde_json::json;
use tempfile::TempDir;

use super::client::{Client, ReqBody};
use super::garage::S3Place;
use super::gate::{Gate, GateOptions, apr1_line, bcrypt_line};
use super::image::{OCI_CONFIG, OCI_LAYER_GZIP, OCI_MANIFEST, gzip_stored};
use super::pki::{Ca, KeyAlg, KeyEncoding, Leaf};
use super::store::{Backend, TestStore};
use super::{PUSHER, PseudoRandom, VIEWER, init_tracing, sha256_digest};

pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
pub const DOCKER_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";

/// Knobs for `AllInOne::start_with`.
pub struct AllInOneOptions {
    /// Where the registry stores: the disk or a Garage cluster.
    pub backend: Backend,
    /// The storage root (`Fs`); `None`: `<test dir>/storage`.
    pub root: Option<PathBuf>,
    /// The S3 place (`S3`); `None`: a fresh prefix in the shared cluster.
    pub s3: Option<S3Place>,
    /// `[storage] delete`.
    pub delete: bool,
    /// `[storage] purge_uploads_after_secs`, when given.
    pub purge_uploads_after_secs: Option<u64>,
    /// Whole tables appended to the config (e.g. `[[rules]]`).
    pub extra_tables: String,
    /// More lines inside `[storage]` (e.g. `gc_interval_secs = 1`).
    pub extra_storage: String,
}

impl Default for AllInOneOptions {
    fn default() -> Self {
        AllInOneOptions {
            backend: Backend::Fs,
            root: None,
            s3: None,
            delete: false,
            purge_uploads_after_secs: None,
            extra_tables: String::new(),
            extra_storage: String::new(),
        }
    }
}

impl AllInOneOptions {
    pub fn on(backend: Backend) -> AllInOneOptions {
        AllInOneOptions {
            backend,
            ..AllInOneOptions::default()
        }
    }
}

/// A test CA, its leaf, and the in-process gate serving the built-in registry.
pub struct AllInOne {
    pub ca: Ca,
    pub leaf: Leaf,
    /// The storage root on disk (`Fs`).
    pub root: PathBuf,
    /// What the registry stores on, with a view of it.
    pub store: TestStore,
    pub gate: Gate,
    // Last: removed after everything that uses it.
    pub dir: TempDir,
}

/// The `[storage]` lines for `root`.
pub fn storage_lines(root: &Path, delete: bool, purge: Option<u64>) -> String {
    let mut lines = format!("root = {root:?}\ndelete = {delete}\n");
    if let Some(secs) = purge {
        lines.push_str(&format!("purge_uploads_after_secs = {secs}\n"));
    }
    lines
}

impl AllInOne {
    pub async fn start() -> AllInOne {
        AllInOne::start_with(AllInOneOptions::default()).await
    }

    pub async fn start_with(options: AllInOneOptions) -> AllInOne {
        init_tracing();
        let dir = tempfile::Builder::new()
            .prefix("registry-gate-aio")
            .tempdir()
            .expect("create a temporary directory");
        let ca = Ca::new(
            &dir.path().join("ca"),
            "registry-gate test CA",
            KeyAlg::EcP256,
        );
        let leaf = ca.issue("localhost", KeyAlg::EcP256, KeyEncoding::Pkcs8);
        let store = match (options.backend, options.root.clone(), options.s3.clone()) {
            (Backend::Fs, Some(root), _) => TestStore::fs(&root),
            (Backend::S3, _, Some(place)) => TestStore::s3(place, dir.path()),
            (backend, _, _) => TestStore::new(backend, dir.path()),
        };
        let root = store.root.clone();
        let gate = Gate::start(
            &dir.path().join("gate"),
            GateOptions {
                storage: Some(
                    store.gate_lines(options.delete, options.purge_uploads_after_secs)
                        + &options.extra_storage,
                ),
                extra_tables: options.extra_tables,
                ..GateOptions::new(&leaf)
            },
        )
        .await;
        AllInOne {
            ca,
            leaf,
            root,
            store,
            gate,
            dir,
        }
    }

    pub fn client(&self) -> Client {
        Client::new(self.gate.addr, &[&self.ca.cert])
    }

    pub fn pusher(&self) -> Client {
        self.client().with_basic(PUSHER.0, PUSHER.1)
    }

    pub fn viewer(&self) -> Client {
        self.client().with_basic(VIEWER.0, VIEWER.1)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn disk(&self) -> Disk {
        Disk::new(&self.root)
    }
}

/// Paths of the CNCF distribution layout under a storage root, to look at what the
/// registry wrote (or to plant things) from outside it.
#[derive(Clone, Debug)]
pub struct Disk {
    pub v2: PathBuf,
}

impl Disk {
    pub fn new(root: &Path) -> Disk {
        Disk {
            v2: root.join("docker/registry/v2"),
        }
    }

    fn split(digest: &str) -> (&str, &str) {
        digest.split_once(':').expect("algorithm:hex digest")
    }

    pub fn blob_data(&self, digest: &str) -> PathBuf {
        let (alg, hex) = Disk::split(digest);
        self.v2
            .join("blobs")
            .join(alg)
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }

    pub fn repo(&self, repo: &str) -> PathBuf {
        self.v2.join("repositories").join(repo)
    }

    pub fn layer_link(&self, repo: &str, digest: &str) -> PathBuf {
        let (alg, hex) = Disk::split(digest);
        self.repo(repo)
            .join("_layers")
            .join(alg)
            .join(hex)
            .join("link")
    }

    pub fn revision_link(&self, repo: &str, digest: &str) -> PathBuf {
        let (alg, hex) = Disk::split(digest);
        self.repo(repo)
            .join("_manifests/revisions")
            .join(alg)
            .join(hex)
            .join("link")
    }

    pub fn tag_current(&self, repo: &str, tag: &str) -> PathBuf {
        self.repo(repo)
            .join("_manifests/tags")
            .join(tag)
            .join("current/link")
    }

    pub fn tag_index_link(&self, repo: &str, tag: &str, digest: &str) -> PathBuf {
        let (alg, hex) = Disk::split(digest);
        self.repo(repo)
            .join("_manifests/tags")
            .join(tag)
            .join("index")
            .join(alg)
            .join(hex)
            .join("link")
    }

    pub fn uploads(&self, repo: &str) -> PathBuf {
        self.repo(repo).join("_uploads")
    }

    /// Every file under the root whose name starts with `.tmp` (a write that never
    /// finished).
    pub fn temporary_files(&self) -> Vec<PathBuf> {
        walk(&self.v2)
            .into_iter()
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(".tmp"))
            })
            .collect()
    }
}

/// Every regular file and symlink below `dir` (symlinks are not followed).
pub fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            match entry.file_type() {
                Ok(t) if t.is_dir() => stack.push(path),
                Ok(_) => out.push(path),
                Err(_) => {}
            }
        }
    }
    out.sort();
    out
}

/// A snapshot of a directory tree: every path (dirs included) with its file bytes.
pub fn snapshot(dir: &Path) -> Vec<(PathBuf, Option<Vec<u8>>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let meta = std::fs::symlink_metadata(&path).expect("stat");
            if meta.is_dir() {
                out.push((path.clone(), None));
                stack.push(path);
            } else {
                out.push((path.clone(), Some(std::fs::read(&path).unwrap_or_default())));
            }
        }
    }
    out.sort();
    out
}

// ---------------------------------------------------------------------------
// tmpfs

/// A tmpfs of a given size mounted on a directory; unmounted on drop.
pub struct Tmpfs {
    pub path: PathBuf,
}

impl Tmpfs {
    /// `mount -t tmpfs -o size=SIZE tmpfs PATH` (PATH is created). Fails the test with
    /// a clear message when mounting is not permitted here.
    pub fn mount(path: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(path).expect("create the mount point");
        let output = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .output()
            .unwrap_or_else(|e| panic!("cannot run mount: {e}"));
        assert!(
            output.status.success(),
            "this test needs to mount a small tmpfs (as root, with CAP_SYS_ADMIN) to \
             fill a disk; `mount -t tmpfs -o size={size} tmpfs {}` failed: {}",
            path.display(),
            String::from_utf8_lossy(&output.stderr)
        );
        Tmpfs {
            path: path.to_path_buf(),
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let plain = Command::new("umount").arg(&self.path).output();
        if !plain.is_ok_and(|o| o.status.success()) {
            // Still busy (a file the aborted server held): detach it lazily.
            let _ = Command::new("umount").arg("-l").arg(&self.path).output();
        }
    }
}

// ---------------------------------------------------------------------------
// the real binary

pub const BINARY: &str = env!("CARGO_BIN_EXE_registry-gate");

/// `registry-gate gc --config CONFIG ARGS…`, not yet started.
pub fn gc_command(config: &Path, args: &[&str]) -> Command {
    let mut command = Command::new(BINARY);
    command
        .arg("gc")
        .arg("--config")
        .arg(config)
        // The tests make garbage and collect it at once: no grace period.
        .args(["--grace-secs", "0"])
        .args(args)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null());
    command
}

/// Run `registry-gate gc`; fails the test with its output when it fails. Returns
/// its stdout.
pub fn run_gc(config: &Path, args: &[&str]) -> String {
    let output = gc_command(config, args)
        .output()
        .expect("run registry-gate gc");
    assert!(
        output.status.success(),
        "registry-gate gc {} failed ({}):\nstdout: {}\nstderr: {}",
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Write the files of an all-in-one gate into `dir` (certificate pair, htpasswd,
/// groups, config listening on `listen`); returns the config's path.
pub fn write_binary_config(dir: &Path, leaf: &Leaf, listen: SocketAddr, storage: &str) -> PathBuf {
    std::fs::create_dir_all(dir).expect("create binary directory");
    let cert = dir.join("fullchain.pem");
    let key = dir.join("privkey.pem");
    let htpasswd = dir.join("httpd.htpasswd");
    let groups = dir.join("httpd.groups");
    std::fs::write(&cert, leaf.chain_pem()).expect("write certificate");
    std::fs::write(&key, leaf.key_pem()).expect("write key");
    std::fs::write(
        &htpasswd,
        format!(
            "{}{}",
            bcrypt_line(PUSHER.0, PUSHER.1),
            apr1_line(VIEWER.0, VIEWER.1)
        ),
    )
    .expect("write htpasswd");
    std::fs::write(&groups, format!("pusher: {}\n", PUSHER.0)).expect("write groups");
    let config = dir.join("registry-gate.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"{listen}\"\n\n\
             [log]\nformat = \"text\"\nlevel = \"info\"\n\n\
             [tls]\ncertificate = {cert:?}\nprivate_key = {key:?}\n\n\
             [auth]\nhtpasswd = {htpasswd:?}\ngroups = {groups:?}\npush_group = \"pusher\"\n\n\
             [storage]\n{storage}\n"
        ),
    )
    .expect("write config");
    config
}

/// `registry-gate serve --config FILE` as a child process, its output in `log`.
pub struct Process {
    pub config: PathBuf,
    pub log: PathBuf,
    pub addr: SocketAddr,
    child: Option<Child>,
}

impl Process {
    pub fn spawn(config: &Path, addr: SocketAddr, log: &Path) -> Process {
        let mut process = Process {
            config: config.to_path_buf(),
            log: log.to_path_buf(),
            addr,
            child: None,
        };
        process.start();
        process
    }

    fn start(&mut self) {
        assert!(self.child.is_none(), "already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open log");
        let child = Command::new(BINARY)
            .args(["serve", "--config"])
            .arg(&self.config)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log"))
            .stderr(log)
            .spawn()
            .expect("start registry-gate serve");
        self.child = Some(child);
    }

    /// Wait until it accepts TLS connections (failing with its log if it exits).
    pub async fn wait_ready(&mut self, client: &Client) {
        let start = tokio::time::Instant::now();
        loop {
            if client.try_peer_certificate().await.is_ok() {
                return;
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "registry-gate exited with {status} while starting; its log:\n{}",
                    self.log_text()
                );
            }
            if start.elapsed() > super::DEADLINE {
                panic!(
                    "registry-gate did not accept connections within {:?}; its log:\n{}",
                    super::DEADLINE,
                    self.log_text()
                );
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL (`Child::kill` sends SIGKILL on Unix) and reap.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().expect("SIGKILL registry-gate");
            let status = child.wait().expect("reap registry-gate");
            assert!(!status.success(), "killed, yet it exited with {status}");
        }
    }

    pub async fn restart(&mut self, client: &Client) {
        self.kill9();
        self.start();
        self.wait_ready(client).await;
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

// ---------------------------------------------------------------------------
// bodies

/// `len` bytes of `PseudoRandom::new(seed)`, then a body that never ends (it stays
/// pending): an upload cut off half-way without the client closing it.
pub fn stalling(len: u64, seed: u64) -> ReqBody {
    GeneratedPart::new(0, len, seed, true).boxed()
}

/// Bytes `skip..skip + len` of `PseudoRandom::new(seed)` (any `skip`), made as they
/// are sent, with no Content-Length: the rest of a resumed upload.
pub fn generated_part(skip: u64, len: u64, seed: u64) -> ReqBody {
    GeneratedPart::new(skip, len, seed, false).boxed()
}

struct GeneratedPart {
    source: PseudoRandom,
    /// Bytes still to generate (those to drop included).
    left: u64,
    /// Bytes at the start of the next chunk that come before `skip` (the stream is
    /// made 8 bytes at a time, so a `skip` that is not a multiple of 8 generates the
    /// rest of its last word and drops it).
    drop: usize,
    stall: bool,
}

impl GeneratedPart {
    fn new(skip: u64, len: u64, seed: u64, stall: bool) -> GeneratedPart {
        let mut source = PseudoRandom::new(seed);
        let mut buf = vec![0u8; 256 * 1024];
        // Generate and drop the aligned prefix (in lengths that are multiples of 8,
        // so the stream goes on as if it had been sent).
        let aligned = skip - skip % 8;
        let mut skipped = 0;
        while skipped < aligned {
            let n = (aligned - skipped).min(buf.len() as u64) as usize;
            source.fill(&mut buf[..n]);
            skipped += n as u64;
        }
        let drop = if len == 0 { 0 } else { (skip % 8) as usize };
        GeneratedPart {
            source,
            left: len + drop as u64,
            drop,
            stall,
        }
    }
}

impl http_body::Body for GeneratedPart {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        if this.left == 0 {
            return if this.stall {
                Poll::Pending
            } else {
                Poll::Ready(None)
            };
        }
        // Every chunk but the last is a multiple of 8 long: the stream stays in step.
        let n = this.left.min(256 * 1024) as usize;
        let mut chunk = vec![0u8; n];
        this.source.fill(&mut chunk);
        this.left -= n as u64;
        let chunk = Bytes::from(chunk).slice(std::mem::take(&mut this.drop)..);
        Poll::Ready(Some(Ok(Frame::data(chunk))))
    }
}

/// The sha256 digest of `len` bytes of `PseudoRandom::new(seed)`, without holding them.
pub fn generated_digest(len: u64, seed: u64) -> String {
    use sha2::Digest as _;
    let mut source = PseudoRandom::new(seed);
    let mut hasher = sha2::Sha256::new();
    let mut left = len;
    let mut buf = vec![0u8; 256 * 1024];
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        source.fill(&mut buf[..n]);
        hasher.update(&buf[..n]);
        left -= n as u64;
    }
    format!("sha256:{}", super::hex(&hasher.finalize()))
}

pub fn sha512_digest(data: &[u8]) -> String {
    use sha2::Digest as _;
    format!("sha512:{}", super::hex(&sha2::Sha512::digest(data)))
}

// ---------------------------------------------------------------------------
// manifests

/// A descriptor of `data`.
pub fn descriptor(media_type: &str, data: &[u8]) -> serde_json::Value {
    json!({ "mediaType": media_type, "digest": sha256_digest(data), "size": data.len() })
}

/// An OCI image manifest naming these config and layer blobs (bytes not needed to
/// be present: for MANIFEST_BLOB_UNKNOWN tests), with optional extra fields.
pub fn oci_manifest(config: &[u8], layers: &[&[u8]], extra: serde_json::Value) -> Vec<u8> {
    let mut m = json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": descriptor(OCI_CONFIG, config),
        "layers": layers.iter().map(|l| descriptor(OCI_LAYER_GZIP, l)).collect::<Vec<_>>(),
    });
    merge(&mut m, extra);
    serde_json::to_vec(&m).expect("manifest JSON")
}

/// A Docker v2 schema 2 manifest.
pub fn docker_manifest(config: &[u8], layers: &[&[u8]]) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST,
        "config": descriptor(DOCKER_CONFIG, config),
        "layers": layers.iter().map(|l| descriptor(DOCKER_LAYER, l)).collect::<Vec<_>>(),
    }))
    .expect("manifest JSON")
}

/// An index (`media_type`: OCI index or Docker manifest list) of these manifests,
/// each given as (media type, bytes, architecture).
pub fn index(media_type: &str, children: &[(&str, &[u8], &str)]) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": media_type,
        "manifests": children.iter().map(|(mt, bytes, arch)| {
            let mut d = descriptor(mt, bytes);
            d["platform"] = json!({ "architecture": arch, "os": "linux" });
            d
        }).collect::<Vec<_>>(),
    }))
    .expect("index JSON")
}

fn merge(target: &mut serde_json::Value, extra: serde_json::Value) {
    if let (Some(t), serde_json::Value::Object(e)) = (target.as_object_mut(), extra) {
        for (k, v) in e {
            t.insert(k, v);
        }
    }
}

// ---------------------------------------------------------------------------
// a multi-arch OCI image layout

/// What `write_multiarch_layout` wrote.
pub struct MultiArchLayout {
    pub index_digest: String,
    /// (architecture, manifest digest)
    pub manifests: Vec<(String, String)>,
    /// Every config and layer blob digest.
    pub blobs: Vec<String>,
}

/// An OCI image layout in `dir` whose `tag` is an OCI image index of one image per
/// architecture, each with its own config and one gzip layer.
pub fn write_multiarch_layout(dir: &Path, tag: &str, architectures: &[&str]) -> MultiArchLayout {
    let blob_dir = dir.join("blobs").join("sha256");
    std::fs::create_dir_all(&blob_dir).expect("create blobs directory");
    let write_blob = |data: &[u8]| {
        let digest = sha256_digest(data);
        std::fs::write(blob_dir.join(&digest["sha256:".len()..]), data).expect("write blob");
        digest
    };
    let mut manifests = Vec::new();
    let mut children = Vec::new();
    let mut blobs = Vec::new();
    for (i, arch) in architectures.iter().enumerate() {
        let tar = super::image::tar_layer(&[(
            &format!("arch-{arch}.txt"),
            &super::pseudo_random_bytes(20_000 + i * 1000, 900 + i as u64),
        )]);
        let layer = gzip_stored(&tar);
        let config = serde_json::to_vec(&json!({
            "architecture": arch,
            "os": "linux",
            "config": {},
            "rootfs": { "type": "layers", "diff_ids": [sha256_digest(&tar)] },
        }))
        .expect("config JSON");
        blobs.push(write_blob(&config));
        blobs.push(write_blob(&layer));
        let manifest = oci_manifest(&config, &[&layer], json!({}));
        manifests.push((arch.to_string(), write_blob(&manifest)));
        children.push(manifest);
    }
    let entries: Vec<(&str, &[u8], &str)> = children
        .iter()
        .zip(architectures)
        .map(|(m, a)| (OCI_MANIFEST, m.as_slice(), *a))
        .collect();
    let index_bytes = index(OCI_INDEX, &entries);
    let index_digest = write_blob(&index_bytes);
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#)
        .expect("write oci-layout");
    let top = json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": OCI_INDEX,
            "digest": index_digest,
            "size": index_bytes.len(),
            "annotations": { "org.opencontainers.image.ref.name": tag },
        }],
    });
    std::fs::write(
        dir.join("index.json"),
        serde_json::to_vec(&top).expect("index JSON"),
    )
    .expect("write index.json");
    MultiArchLayout {
        index_digest,
        manifests,
        blobs,
    }
}
