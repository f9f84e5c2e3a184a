//! The CNCF distribution registry (Debian `docker-registry`) as the gate's upstream:
//! started with a config of its own on a free loopback port, never the system
//! service. Its stdout and stderr (access log and application log) go to one file.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use super::{DEADLINE, command};

#[derive(Clone, Debug, Default)]
pub struct UpstreamOptions {
    /// Set `http.host` to the registry's own URL, so that it writes absolute
    /// `Location` headers naming itself (which the gate must rewrite).
    pub advertise_own_url: bool,
    /// Require Basic credentials from this htpasswd text (bcrypt lines only, as
    /// distribution demands).
    pub htpasswd: Option<String>,
    /// The `storage:` section instead of a filesystem in the upstream's directory
    /// (e.g. an S3 bucket, from `TestStore::registry_yaml`).
    pub storage_yaml: Option<String>,
}

pub struct Upstream {
    pub addr: SocketAddr,
    pub dir: PathBuf,
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Upstream {
    /// Start the registry in `dir` (created) and wait until `GET /v2/` answers.
    pub fn start(dir: &Path, options: UpstreamOptions) -> Upstream {
        std::fs::create_dir_all(dir.join("storage")).expect("create registry storage");
        let addr = free_loopback_port();
        let config = dir.join("config.yml");
        let host = if options.advertise_own_url {
            format!("  host: http://{addr}\n")
        } else {
            String::new()
        };
        let storage = options.storage_yaml.clone().unwrap_or_else(|| {
            format!(
                "storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
                 \x20 maintenance:\n    uploadpurging:\n      enabled: false\n",
                dir.join("storage").display()
            )
        });
        std::fs::write(
            &config,
            format!(
                "version: 0.1\n\
                 log:\n  level: info\n  formatter: text\n  accesslog:\n    disabled: false\n\
                 {storage}\
                 http:\n  addr: {addr}\n{host}  secret: registry-gate-test-secret\n",
            ),
        )
        .expect("write registry config");
        let auth = match &options.htpasswd {
            Some(lines) => {
                let file = dir.join("htpasswd");
                std::fs::write(&file, lines).expect("write upstream htpasswd");
                format!(
                    "auth:\n  htpasswd:\n    realm: upstream-realm\n    path: {}\n",
                    file.display()
                )
            }
            None => String::new(),
        };
        std::fs::OpenOptions::new()
            .append(true)
            .open(&config)
            .and_then(|mut f| f.write_all(auth.as_bytes()))
            .expect("append auth to registry config");
        let mut upstream = Upstream {
            addr,
            dir: dir.to_path_buf(),
            config,
            log: dir.join("registry.log"),
            child: None,
        };
        upstream.spawn();
        upstream
    }

    /// `http://127.0.0.1:PORT`, for the gate's `[upstream] url`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "the registry is already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open registry log");
        let child = command("docker-registry", "docker-registry")
            // Its s3-aws driver panics at start when this is set (seen with 2.8.2).
            .env_remove("AWS_CA_BUNDLE")
            .arg("serve")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log handle"))
            .stderr(log)
            .spawn()
            .expect("start docker-registry");
        self.child = Some(child);
        self.wait_until_ready();
    }

    fn wait_until_ready(&mut self) {
        let start = Instant::now();
        loop {
            let exited = self
                .child
                .as_mut()
                .and_then(|child| child.try_wait().ok().flatten());
            if let Some(status) = exited {
                panic!(
                    "docker-registry exited with {status} while starting; its log:\n{}",
                    self.access_log()
                );
            }
            if let Some(status) = self.probe_v2() {
                assert!(
                    status == 200 || (status == 401 && options_require_auth(&self.config)),
                    "docker-registry answered GET /v2/ with {status}; its log:\n{}",
                    self.access_log()
                );
                return;
            }
            if start.elapsed() > DEADLINE {
                panic!(
                    "docker-registry did not answer on {} within {DEADLINE:?}; its log:\n{}",
                    self.addr,
                    self.access_log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Send raw bytes straight to the registry (not through the gate) and return
    /// its whole answer; include `Connection: close`.
    pub fn direct(&self, request: &str) -> String {
        let mut stream = TcpStream::connect(self.addr).expect("connect to the registry");
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .expect("read timeout");
        stream.write_all(request.as_bytes()).expect("write request");
        let mut response = Vec::new();
        let _ = stream.read_to_end(&mut response);
        String::from_utf8_lossy(&response).into_owned()
    }

    /// The status of a direct `GET /v2/` (not through the gate), or `None` when
    /// nothing answers.
    pub fn probe_v2(&self) -> Option<u16> {
        let mut stream = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        stream
            .write_all(b"GET /v2/ HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .ok()?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).ok()?;
        let text = String::from_utf8_lossy(&response);
        text.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
    }

    /// Kill the registry and wait for it to exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Start it again on the same port with the same storage.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// Everything the registry printed so far: its access log and application log.
    pub fn access_log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A loopback port that was free a moment ago.
pub fn free_loopback_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a free loopback port");
    listener.local_addr().expect("local address")
}

fn options_require_auth(config: &Path) -> bool {
    std::fs::read_to_string(config)
        .map(|c| c.contains("htpasswd:"))
        .unwrap_or(false)
}
