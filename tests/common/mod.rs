//! The shared end-to-end harness: a real gate over real TLS on an ephemeral port,
//! fronting a real CNCF registry (`docker-registry`) that the test starts itself.
//!
//! * `pki`      — throw-away CAs and leaf certificates, made with the openssl CLI
//! * `upstream` — `docker-registry serve` on a free loopback port, with its access log
//! * `gate`     — the config file, the listener and the running `serve` task
//! * `client`   — an HTTPS client (hyper 1, HTTP/1.1 and HTTP/2) trusting the test CA
//! * `image`    — the one helper that pushes a whole OCI image, and the one that pulls it
//! * `skopeo`   — running the real skopeo against the gate
//! * `registry` — the gate with its built-in registry (all-in-one), in process or as
//!   the real binary, and what the registry tests need around it
//! * `wire`     — raw HTTP/1.1 over TLS: odd framing, pipelined requests, slow heads
//! * `garage`   — a real three-node Garage cluster (S3) on loopback
//! * `store`    — the built-in registry's store for a test (disk or S3) and a view of it
//! * `throttle` — a proxy in front of Garage that answers some requests `503 SlowDown`
//!
//! `Stack` puts them together: the usual arrangement of one test.
#![allow(dead_code)]

pub mod client;
pub mod containerd;
pub mod daemon;
pub mod docker;
pub mod garage;
pub mod gate;
pub mod image;
pub mod oras;
pub mod pki;
pub mod podman;
pub mod registry;
pub mod skopeo;
#[macro_use]
pub mod store;
pub mod throttle;
pub mod upstream;
pub mod wire;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use sha2::{Digest as _, Sha256};
use tempfile::TempDir;

use client::Client;
use gate::{Gate, GateOptions};
use pki::{Ca, KeyAlg, KeyEncoding, Leaf};
use upstream::{Upstream, UpstreamOptions};

/// A member of the push group.
pub const PUSHER: (&str, &str) = ("mark", "mark-pushes-images");
/// A valid user who is not in the push group.
pub const VIEWER: (&str, &str) = ("vera", "vera-only-looks");

/// How long a test waits for something that should happen "soon" (a reload, a
/// restart) before it fails. Generous: it only guards against hangs.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// How often the gate checks its certificate and password files in tests.
pub const WATCH_INTERVAL_MS: u64 = 200;

/// The usual arrangement: a test CA and leaf, a registry upstream and the gate
/// in front of it, all inside one temporary directory.
pub struct Stack {
    pub dir: TempDir,
    pub ca: Ca,
    pub leaf: Leaf,
    pub upstream: Upstream,
    pub gate: Gate,
}

/// Knobs for `Stack::start_with`.
pub struct StackOptions {
    pub key_alg: KeyAlg,
    pub key_encoding: KeyEncoding,
    pub upstream: UpstreamOptions,
    /// `public_url` in the gate's config; `None` leaves it out.
    pub public_url: Option<String>,
    /// TOML inserted before the first table of the gate's config.
    pub extra_top_level: String,
    /// How often the gate checks its files for changes.
    pub watch_interval_ms: u64,
    pub handshake_timeout_secs: u64,
    /// Lines added inside the gate's `[server]` table.
    pub extra_server: String,
    /// Lines added inside the gate's `[auth]` table.
    pub extra_auth: String,
    /// Whole tables appended to the gate's config (`[token]`, `[[rules]]`, `[admin]`).
    pub extra_tables: String,
}

impl Default for StackOptions {
    fn default() -> Self {
        StackOptions {
            key_alg: KeyAlg::EcP256,
            key_encoding: KeyEncoding::Pkcs8,
            upstream: UpstreamOptions::default(),
            public_url: None,
            extra_top_level: String::new(),
            watch_interval_ms: WATCH_INTERVAL_MS,
            handshake_timeout_secs: 10,
            extra_server: String::new(),
            extra_auth: String::new(),
            extra_tables: String::new(),
        }
    }
}

impl Stack {
    pub async fn start() -> Stack {
        Stack::start_with(StackOptions::default()).await
    }

    pub async fn start_with(options: StackOptions) -> Stack {
        init_tracing();
        let dir = tempfile::Builder::new()
            .prefix("registry-gate-test")
            .tempdir()
            .expect("create a temporary directory");
        let ca = Ca::new(
            &dir.path().join("ca"),
            "registry-gate test CA",
            options.key_alg,
        );
        let leaf = ca.issue("localhost", options.key_alg, options.key_encoding);
        let upstream = Upstream::start(&dir.path().join("upstream"), options.upstream);
        let gate = Gate::start(
            &dir.path().join("gate"),
            GateOptions {
                upstream_url: upstream.url(),
                public_url: options.public_url,
                extra_top_level: options.extra_top_level,
                watch_interval_ms: options.watch_interval_ms,
                handshake_timeout_secs: options.handshake_timeout_secs,
                extra_server: options.extra_server,
                extra_auth: options.extra_auth,
                extra_tables: options.extra_tables,
                ..GateOptions::new(&leaf)
            },
        )
        .await;
        Stack {
            dir,
            ca,
            leaf,
            upstream,
            gate,
        }
    }

    /// An anonymous HTTP/1.1 client that trusts the test CA.
    pub fn client(&self) -> Client {
        Client::new(self.gate.addr, &[&self.ca.cert])
    }

    /// A client sending the push group member's credentials.
    pub fn pusher(&self) -> Client {
        self.client().with_basic(PUSHER.0, PUSHER.1)
    }

    /// A client sending valid credentials of a user outside the push group.
    pub fn viewer(&self) -> Client {
        self.client().with_basic(VIEWER.0, VIEWER.1)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Proves that nothing carrying `marker` in its path reached the upstream: first a
    /// control request (which must reach it) is sent through the gate and awaited in
    /// the registry's log, so everything sent before it has been logged too.
    pub async fn assert_never_reached_upstream(&self, marker: &str) {
        let control = format!("control-{marker}");
        let resp = self.client().get(&format!("/v2/{control}/tags/list")).await;
        assert_eq!(
            resp.status.as_u16(),
            404,
            "the control request should reach the registry and get its NAME_UNKNOWN: {}",
            resp.text()
        );
        eventually("the control request in the registry's log", || async {
            self.upstream.access_log().contains(&control).then_some(())
        })
        .await;
        let log = self.upstream.access_log();
        let leaked: Vec<&str> = log
            .lines()
            .filter(|line| line.contains(marker) && !line.contains(&control))
            .collect();
        assert!(
            leaked.is_empty(),
            "requests that must stop at the gate reached the registry:\n{}",
            leaked.join("\n")
        );
    }
}

/// Route the gate's tracing output into the test's captured output, so a failing
/// test shows what the gate logged. `RUST_LOG` overrides the default level.
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .with_ansi(false)
        .try_init();
}

/// `sha256:<hex>` of some bytes.
pub fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{}", hex(&Sha256::digest(data)))
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Deterministic pseudo-random bytes (xorshift), cheap enough for 64 MiB in a
/// debug build; `seed` makes different layers differ.
pub fn pseudo_random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut out = vec![0u8; len];
    PseudoRandom::new(seed).fill(&mut out);
    out
}

/// The stream behind `pseudo_random_bytes`, for data too large to hold: filling
/// consecutive buffers whose lengths are multiples of 8 gives the same bytes.
pub struct PseudoRandom {
    state: u64,
}

impl PseudoRandom {
    pub fn new(seed: u64) -> PseudoRandom {
        PseudoRandom {
            state: seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
        }
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.state ^= self.state << 13;
            self.state ^= self.state >> 7;
            self.state ^= self.state << 17;
            chunk.copy_from_slice(&self.state.to_le_bytes()[..chunk.len()]);
        }
    }
}

/// Poll `probe` until it yields `Some`, failing the test with `what` after `DEADLINE`.
pub async fn eventually<T, F, Fut>(what: &str, probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    eventually_within(what, DEADLINE, probe).await
}

/// `eventually` with its own deadline, for waits on slow real components (a Garage
/// cluster under the load of the whole suite).
pub async fn eventually_within<T, F, Fut>(what: &str, deadline: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = tokio::time::Instant::now();
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        if start.elapsed() > deadline {
            panic!("gave up after {deadline:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Run an external tool, failing the test with the Debian package to install when
/// it is missing.
pub fn command(program: &str, package: &str) -> Command {
    let found = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
        .unwrap_or(false);
    if !found {
        panic!("{program} not found on PATH: apt-get install {package}");
    }
    Command::new(program)
}

/// Write a file through a temporary name and a rename, as certbot and editors do,
/// so a watcher never sees it half-written.
pub fn replace_file(path: &Path, contents: &[u8]) {
    let tmp = path.with_extension("tmp-replace");
    std::fs::write(&tmp, contents).expect("write replacement file");
    std::fs::rename(&tmp, path).expect("rename replacement file into place");
}

/// The admin listener's `/metrics` text (a plain HTTP/1.1 request).
pub async fn metrics(admin: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(admin).await.expect("admin");
    tcp.write_all(b"GET /metrics HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut out = Vec::new();
    tcp.read_to_end(&mut out).await.expect("read");
    String::from_utf8_lossy(&out).into_owned()
}

/// The value of one series (`name{labels}`) in a metrics text; 0 when absent.
pub fn metric(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0)
}
