//! The gate under test: its files (config, certificate pair, htpasswd and group
//! files) in a directory of the test, and `serve` running on `127.0.0.1:0`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use registry_gate::config::Config;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::pki::{Leaf, openssl};
use super::{PUSHER, VIEWER, WATCH_INTERVAL_MS, replace_file};

/// What goes into the gate's configuration.
pub struct GateOptions {
    pub certificate_pem: Vec<u8>,
    pub private_key_pem: Vec<u8>,
    pub upstream_url: String,
    /// `public_url`; `{port}` in it becomes the gate's port.
    pub public_url: Option<String>,
    pub watch_interval_ms: u64,
    /// TOML inserted before the first table (top-level keys).
    pub extra_top_level: String,
    /// Lines added inside `[upstream]`.
    pub extra_upstream: String,
    /// Lines added inside `[auth]`.
    pub extra_auth: String,
    /// Whole tables appended at the end.
    pub extra_tables: String,
    pub handshake_timeout_secs: u64,
    /// Lines added inside `[server]`.
    pub extra_server: String,
    /// When set, a `[storage]` table with these lines (`root = …`, `delete = …`) is
    /// written instead of `[upstream]`: the built-in registry ("all-in-one").
    pub storage: Option<String>,
}

impl GateOptions {
    pub fn new(leaf: &Leaf) -> GateOptions {
        GateOptions {
            certificate_pem: leaf.chain_pem(),
            private_key_pem: leaf.key_pem(),
            upstream_url: String::new(),
            public_url: None,
            watch_interval_ms: WATCH_INTERVAL_MS,
            extra_top_level: String::new(),
            extra_upstream: String::new(),
            extra_auth: String::new(),
            extra_tables: String::new(),
            handshake_timeout_secs: 10,
            extra_server: String::new(),
            storage: None,
        }
    }
}

/// The files the gate reads and watches; tests overwrite them to drive reloads.
pub struct GateFiles {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub certificate: PathBuf,
    pub private_key: PathBuf,
    pub htpasswd: PathBuf,
    pub groups: PathBuf,
}

pub struct Gate {
    pub addr: SocketAddr,
    pub files: GateFiles,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<String>>,
}

/// An htpasswd line made by the `bcrypt` crate (`$2y$`, cost 4 to keep tests fast).
pub fn bcrypt_line(user: &str, password: &str) -> String {
    let hash = bcrypt::hash_with_result(password, 4)
        .expect("bcrypt hash")
        .format_for_version(bcrypt::Version::TwoY);
    format!("{user}:{hash}\n")
}

/// An htpasswd line made by `openssl passwd -apr1`, as `htpasswd -m` writes it.
pub fn apr1_line(user: &str, password: &str) -> String {
    let output = openssl(&["passwd", "-apr1", password]);
    let hash = String::from_utf8(output.stdout).expect("utf-8 hash");
    format!("{user}:{}\n", hash.trim())
}

impl Gate {
    /// Write the files into `dir` (created), load the config the way the binary
    /// does, bind `127.0.0.1:0` and spawn `serve`.
    pub async fn start(dir: &Path, options: GateOptions) -> Gate {
        std::fs::create_dir_all(dir).expect("create gate directory");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local address");
        let files = GateFiles {
            dir: dir.to_path_buf(),
            config: dir.join("registry-gate.toml"),
            certificate: dir.join("fullchain.pem"),
            private_key: dir.join("privkey.pem"),
            htpasswd: dir.join("httpd.htpasswd"),
            groups: dir.join("httpd.groups"),
        };
        std::fs::write(&files.certificate, &options.certificate_pem).expect("write certificate");
        std::fs::write(&files.private_key, &options.private_key_pem).expect("write key");
        std::fs::write(
            &files.htpasswd,
            format!(
                "{}{}",
                bcrypt_line(PUSHER.0, PUSHER.1),
                apr1_line(VIEWER.0, VIEWER.1)
            ),
        )
        .expect("write htpasswd");
        std::fs::write(
            &files.groups,
            format!("pusher: {}\nreaders: {}\n", PUSHER.0, VIEWER.0),
        )
        .expect("write groups");

        let public_url = match &options.public_url {
            Some(url) => format!(
                "public_url = {:?}\n",
                url.replace("{port}", &addr.port().to_string())
            ),
            None => String::new(),
        };
        let backend = match &options.storage {
            Some(lines) => format!("[storage]\n{lines}\n"),
            None => format!(
                "[upstream]\nurl = {:?}\n{}\n",
                options.upstream_url, options.extra_upstream
            ),
        };
        let toml = format!(
            "listen = \"127.0.0.1:0\"\n\
             {public_url}\
             watch_interval_ms = {watch}\n\
             {extra_top}\n\
             [log]\nformat = \"text\"\nlevel = \"info\"\n\n\
             [tls]\ncertificate = {cert:?}\nprivate_key = {key:?}\nhandshake_timeout_secs = {handshake}\n\n\
             [auth]\nhtpasswd = {htpasswd:?}\ngroups = {groups:?}\npush_group = \"pusher\"\n{extra_auth}\n\
             {backend}\
             [server]\nshutdown_grace_secs = 5\n{extra_server}\n\
             {extra_tables}",
            watch = options.watch_interval_ms,
            extra_top = options.extra_top_level,
            cert = files.certificate,
            key = files.private_key,
            htpasswd = files.htpasswd,
            groups = files.groups,
            extra_auth = options.extra_auth,
            extra_tables = options.extra_tables,
            handshake = options.handshake_timeout_secs,
            extra_server = options.extra_server,
        );
        std::fs::write(&files.config, toml).expect("write config");
        let config = Config::load(&files.config).unwrap_or_else(|e| panic!("config refused: {e}"));

        let (shutdown, shutdown_rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let stopped = async move {
                let _ = shutdown_rx.await;
            };
            match registry_gate::server::serve(config, listener, stopped).await {
                Ok(()) => String::new(),
                Err(e) => format!("serve returned an error: {e}"),
            }
        });
        let gate = Gate {
            addr,
            files,
            shutdown: Some(shutdown),
            task: Some(task),
        };
        gate.wait_ready(&options.certificate_pem).await;
        gate
    }

    /// Return only once `serve` has loaded its files and completes TLS handshakes, so a
    /// test that changes the files next never races the start-up.
    async fn wait_ready(&self, chain_pem: &[u8]) {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(chain_pem).flatten() {
            let _ = roots.add(cert);
        }
        let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(task) = &self.task
                && task.is_finished()
            {
                panic!("the gate stopped while starting (see its log above)");
            }
            let attempt = async {
                let tcp = tokio::net::TcpStream::connect(self.addr).await.ok()?;
                let name = rustls::pki_types::ServerName::try_from("localhost").ok()?;
                connector.connect(name, tcp).await.ok()
            };
            if tokio::time::timeout(Duration::from_secs(2), attempt)
                .await
                .ok()
                .flatten()
                .is_some()
            {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the gate did not complete a TLS handshake within 30 s of starting"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `https://localhost:PORT`: what clients type, and what the certificate names.
    pub fn base_url(&self) -> String {
        format!("https://localhost:{}", self.addr.port())
    }

    /// `localhost:PORT`, as in image references.
    pub fn authority(&self) -> String {
        format!("localhost:{}", self.addr.port())
    }

    /// Resolve the shutdown future without waiting for `serve` to return.
    pub fn begin_shutdown(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
    }

    /// Resolve the shutdown future and wait for `serve` to return; fails the test
    /// when it returned an error, panicked, or did not stop.
    pub async fn stop(mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        let task = self.task.take().expect("gate task");
        match tokio::time::timeout(Duration::from_secs(30), task).await {
            Ok(Ok(error)) => assert!(error.is_empty(), "{error}"),
            Ok(Err(join)) => panic!("the gate's serve task failed: {join}"),
            Err(_) => panic!("the gate did not stop within 30 s of its shutdown signal"),
        }
    }

    /// Overwrite the htpasswd file (atomically) with these lines.
    pub fn write_htpasswd(&self, contents: &str) {
        replace_file(&self.files.htpasswd, contents.as_bytes());
    }

    pub fn write_groups(&self, contents: &str) {
        replace_file(&self.files.groups, contents.as_bytes());
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}
