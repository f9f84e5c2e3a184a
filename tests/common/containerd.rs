//! A private containerd (Debian `containerd`): its own root, state and sockets
//! under the test's directory, the CRI plugin off, and content kept per namespace
//! (`content_sharing_policy = "isolated"`) so that a pull into a fresh namespace
//! really downloads. Driven with `ctr -a SOCKET`. Also the daemon dockerd runs on.
//!
//! containerd 1.6 speaks plain HTTP to `localhost` unless a hosts directory says
//! otherwise, so `hosts_dir` writes `HOST:PORT/hosts.toml` naming the https
//! server and the test CA, for `ctr … --hosts-dir`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::daemon::{Daemon, Run, require, run};

pub struct Containerd {
    pub dir: PathBuf,
    pub socket: PathBuf,
    ctr: PathBuf,
    daemon: Daemon,
}

impl Containerd {
    /// Start containerd in `dir` (created) and wait until `ctr version` reaches
    /// it. Fails the test, quoting its log, when it does not start.
    pub fn start(dir: &Path) -> Containerd {
        let containerd = require("containerd", "apt-get install containerd");
        let ctr = require("ctr", "apt-get install containerd");
        std::fs::create_dir_all(dir).expect("create containerd directory");
        // Unix socket paths are limited to 108 bytes; temporary dirs are short.
        let socket = dir.join("c.sock");
        let config = dir.join("config.toml");
        std::fs::write(
            &config,
            format!(
                "version = 2\n\
                 root = {root:?}\n\
                 state = {state:?}\n\
                 disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
                 [grpc]\n  address = {socket:?}\n\
                 [ttrpc]\n  address = {ttrpc:?}\n\
                 [debug]\n  address = \"\"\n\
                 [metrics]\n  address = \"\"\n\
                 [plugins.\"io.containerd.metadata.v1.bolt\"]\n  content_sharing_policy = \"isolated\"\n",
                root = dir.join("root"),
                state = dir.join("state"),
                socket = socket,
                ttrpc = dir.join("c.sock.ttrpc"),
            ),
        )
        .expect("write containerd config");
        let mut command = Command::new(containerd);
        command.arg("--config").arg(&config);
        let mut daemon = Daemon::spawn("containerd", command, &dir.join("containerd.log"));
        let probe_dir = dir.join("probe");
        let probe_socket = socket.clone();
        let probe_ctr = ctr.clone();
        daemon.wait_until("answering `ctr version`", Duration::from_secs(30), || {
            probe_socket.exists() && {
                let mut c = Command::new(&probe_ctr);
                c.arg("-a").arg(&probe_socket).arg("version");
                run(&probe_dir, c, None).success()
            }
        });
        Containerd {
            dir: dir.to_path_buf(),
            socket,
            ctr,
            daemon,
        }
    }

    /// `ctr -a SOCKET -n NAMESPACE ARGS`.
    pub fn ctr(&self, namespace: &str, args: &[&str]) -> Run {
        let mut command = Command::new(&self.ctr);
        command
            .arg("-a")
            .arg(&self.socket)
            .arg("-n")
            .arg(namespace)
            .args(args);
        run(&self.dir.join("runs"), command, None)
    }

    /// The daemon's log, for messages.
    pub fn log_tail(&self, n: usize) -> String {
        self.daemon.log_tail(n)
    }

    /// Has the daemon died? (dockerd needs it.)
    pub fn check_alive(&mut self) -> Result<(), String> {
        match self.daemon.exited() {
            None => Ok(()),
            Some(status) => Err(format!(
                "containerd exited with {status}; its log:\n{}",
                self.daemon.log_tail(30)
            )),
        }
    }
}

/// A hosts directory in `dir` telling containerd to use https for `authority`
/// (`localhost:PORT`) and to trust `ca_cert` there. Returns the directory, for
/// `--hosts-dir`.
pub fn hosts_dir(dir: &Path, authority: &str, ca_cert: &Path) -> PathBuf {
    let host = dir.join(authority);
    std::fs::create_dir_all(&host).expect("create hosts.d entry");
    std::fs::write(
        host.join("hosts.toml"),
        format!(
            "server = \"https://{authority}\"\n\n\
             [host.\"https://{authority}\"]\n  capabilities = [\"pull\", \"resolve\", \"push\"]\n  ca = {ca:?}\n",
            ca = ca_cert,
        ),
    )
    .expect("write hosts.toml");
    dir.to_path_buf()
}
