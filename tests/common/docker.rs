//! A private Docker engine (Debian `docker.io`): dockerd with its own data-root,
//! exec-root, pidfile, socket and daemon.json under the test's directory, running
//! on a private containerd, with no iptables or bridge. Driven by the Debian
//! docker CLI (the `docker` next to `dockerd`, not whatever else is on PATH) with
//! a private `DOCKER_CONFIG`.
//!
//! The daemon reads registry CAs only from `/etc/docker/certs.d/HOST:PORT/`;
//! `CertsD` puts the test CA there and removes it on drop. dockerd treats
//! 127.0.0.0/8 (and so `localhost`) as an insecure registry: it skips TLS
//! verification there and falls back to plain http after an https failure, so
//! the CLI may show the http error; the daemon's log has the real one.
//!
//! Also here: `DockerArchive`, a `docker save` tar written by the test, which
//! `docker load`, `podman load` and `ctr images import` all read.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::json;

use super::containerd::Containerd;
use super::daemon::{Daemon, Run, require, run};
use super::image::tar_layer;
use super::sha256_digest;

pub struct Docker {
    pub dir: PathBuf,
    pub socket: PathBuf,
    cli: PathBuf,
    daemon: Daemon,
}

impl Docker {
    /// Start dockerd in `dir` (created) on `containerd`, and wait until
    /// `docker version` reaches it. Fails the test with the reason when it cannot
    /// start: overlay2 is tried first, then vfs.
    pub fn start(dir: &Path, containerd: &mut Containerd) -> Docker {
        let dockerd = require("dockerd", "apt-get install docker.io");
        // The CLI from the same package: another `docker` earlier on PATH may be a
        // different version.
        let cli = dockerd
            .canonicalize()
            .ok()
            .and_then(|p| {
                p.parent()
                    .and_then(Path::parent)
                    .map(|usr| usr.join("bin/docker"))
            })
            .filter(|p| p.is_file())
            .unwrap_or_else(|| require("docker", "apt-get install docker.io"));
        std::fs::create_dir_all(dir).expect("create docker directory");
        let mut failures = Vec::new();
        for driver in ["overlay2", "vfs"] {
            let root = dir.join(format!("root-{driver}"));
            let exec = dir.join(format!("exec-{driver}"));
            let socket = dir.join(format!("d-{driver}.sock"));
            let config = dir.join("daemon.json");
            std::fs::write(&config, "{}").expect("write daemon.json");
            let mut command = Command::new(&dockerd);
            command
                .arg("--config-file")
                .arg(&config)
                .arg("--data-root")
                .arg(&root)
                .arg("--exec-root")
                .arg(&exec)
                .arg("--pidfile")
                .arg(dir.join(format!("dockerd-{driver}.pid")))
                .arg("-H")
                .arg(format!("unix://{}", socket.display()))
                .arg("--containerd")
                .arg(&containerd.socket)
                .args([
                    "--iptables=false",
                    "--ip-masq=false",
                    "--bridge=none",
                    "--debug",
                    "--storage-driver",
                    driver,
                ]);
            let log = dir.join(format!("dockerd-{driver}.log"));
            let mut daemon = Daemon::spawn("dockerd", command, &log);
            let mut ready = false;
            let start = std::time::Instant::now();
            while start.elapsed() < Duration::from_secs(60) {
                if daemon.exited().is_some() {
                    break;
                }
                if socket.exists() {
                    let mut c = Command::new(&cli);
                    c.arg("-H")
                        .arg(format!("unix://{}", socket.display()))
                        .args(["version", "--format", "{{.Server.Version}}"]);
                    if run(&dir.join("probe"), c, None).success() {
                        ready = true;
                        break;
                    }
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            if ready {
                return Docker {
                    dir: dir.to_path_buf(),
                    socket,
                    cli,
                    daemon,
                };
            }
            let status = daemon.exited();
            daemon.stop();
            failures.push(format!(
                "with --storage-driver {driver}: {}; the last lines of its log ({}):\n{}",
                match status {
                    Some(s) => format!("dockerd exited with {s}"),
                    None => "dockerd did not answer within 60 s".to_owned(),
                },
                log.display(),
                daemon.log_tail(25)
            ));
            if let Err(e) = containerd.check_alive() {
                failures.push(e);
                break;
            }
        }
        panic!("dockerd could not start:\n{}", failures.join("\n\n"));
    }

    /// `docker -H unix://SOCKET ARGS` with `DOCKER_CONFIG=config_dir`.
    pub fn cli(&self, config_dir: &Path, args: &[&str], stdin: Option<&str>) -> Run {
        self.cli_with_env(config_dir, &[], args, stdin)
    }

    /// `cli` with these environment variables too (e.g. `DOCKER_BUILDKIT=0`).
    pub fn cli_with_env(
        &self,
        config_dir: &Path,
        env: &[(&str, &str)],
        args: &[&str],
        stdin: Option<&str>,
    ) -> Run {
        std::fs::create_dir_all(config_dir).expect("create DOCKER_CONFIG");
        let mut command = Command::new(&self.cli);
        command
            .envs(env.iter().copied())
            .env("DOCKER_CONFIG", config_dir)
            .arg("-H")
            .arg(format!("unix://{}", self.socket.display()))
            .args(args);
        run(&self.dir.join("runs"), command, stdin)
    }

    /// The daemon's log since `from` bytes (see `log_len`).
    pub fn log_since(&self, from: usize) -> String {
        let text = self.daemon.log_text();
        text.get(from..).unwrap_or(&text).to_owned()
    }

    pub fn log_len(&self) -> usize {
        self.daemon.log_text().len()
    }

    /// Lines of the daemon's log since `from` that carry an error or a registry
    /// exchange: what explains a failed CLI command.
    pub fn log_errors_since(&self, from: usize) -> String {
        self.log_since(from)
            .lines()
            .filter(|l| {
                l.contains("level=error")
                    || l.contains("level=warn")
                    || l.contains("unauthorized")
                    || l.contains("denied")
                    || l.contains("Error")
            })
            .map(|l| l.chars().take(600).collect::<String>())
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// The test CA in `/etc/docker/certs.d/AUTHORITY/ca.crt`, removed on drop.
pub struct CertsD {
    dir: PathBuf,
}

impl CertsD {
    pub fn install(authority: &str, ca_cert: &Path) -> CertsD {
        let dir = Path::new("/etc/docker/certs.d").join(authority);
        std::fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("create {} (the test runs as root): {e}", dir.display()));
        std::fs::copy(ca_cert, dir.join("ca.crt")).expect("copy CA into certs.d");
        CertsD { dir }
    }
}

impl Drop for CertsD {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The platform of this machine in OCI terms.
pub fn oci_architecture() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "arm" => "arm",
        "powerpc64" => "ppc64le",
        "s390x" => "s390x",
        "riscv64" => "riscv64",
        other => panic!("no OCI architecture name known for {other}"),
    }
}

/// A `docker save`-format tar of one image, written by the test.
pub struct DockerArchive {
    pub path: PathBuf,
    /// `sha256:` of each uncompressed layer tar: the image's `RootFS.Layers`.
    pub diff_ids: Vec<String>,
    /// The sizes of the regular files inside the layers, for messages.
    pub payload_sizes: Vec<usize>,
    pub config_digest: String,
}

impl DockerArchive {
    /// Write `path`: an image tagged `reference` whose layers each hold one file
    /// `layer-N.bin` with these bytes.
    pub fn write(path: &Path, reference: &str, payloads: &[Vec<u8>]) -> DockerArchive {
        let layers: Vec<Vec<u8>> = payloads
            .iter()
            .enumerate()
            .map(|(i, data)| tar_layer(&[(&format!("layer-{i}.bin"), data.as_slice())]))
            .collect();
        let diff_ids: Vec<String> = layers.iter().map(|l| sha256_digest(l)).collect();
        let config = serde_json::to_vec(&json!({
            "architecture": oci_architecture(),
            "os": "linux",
            "created": "2024-01-01T00:00:00Z",
            "config": { "Cmd": ["/layer-0.bin"] },
            "rootfs": { "type": "layers", "diff_ids": diff_ids },
            "history": layers.iter().map(|_| json!({
                "created": "2024-01-01T00:00:00Z",
                "created_by": "registry-gate client test",
            })).collect::<Vec<_>>(),
        }))
        .expect("config JSON");
        let config_digest = sha256_digest(&config);
        let config_name = format!("{}.json", hex_of(&config_digest));
        let layer_names: Vec<String> = diff_ids
            .iter()
            .map(|d| format!("{}/layer.tar", hex_of(d)))
            .collect();
        let manifest = serde_json::to_vec(&json!([{
            "Config": config_name,
            "RepoTags": [reference],
            "Layers": layer_names,
        }]))
        .expect("manifest.json");
        let mut files: Vec<(&str, &[u8])> = vec![
            ("manifest.json", &manifest),
            (config_name.as_str(), &config),
        ];
        for (name, layer) in layer_names.iter().zip(&layers) {
            files.push((name.as_str(), layer.as_slice()));
        }
        std::fs::write(path, tar_layer(&files)).expect("write docker archive");
        DockerArchive {
            path: path.to_path_buf(),
            diff_ids,
            payload_sizes: payloads.iter().map(Vec::len).collect(),
            config_digest,
        }
    }
}

fn hex_of(digest: &str) -> &str {
    digest.strip_prefix("sha256:").expect("sha256 digest")
}
