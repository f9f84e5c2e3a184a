//! podman (Debian `podman`) as root without touching the host: storage (vfs),
//! run root, tmpdir, containers.conf, registries.conf, signature policy and the
//! auth file all live in the test's directory. Each `Podman` has its own image
//! store; the auth file is chosen per command, so one store can act as several
//! users (`fresh_auth_file`).

use std::path::{Path, PathBuf};
use std::process::Command;

use super::daemon::{Run, require, run};

pub struct Podman {
    pub dir: PathBuf,
    program: PathBuf,
    /// Holds `ca.crt`, for `--cert-dir`.
    pub cert_dir: PathBuf,
    policy: PathBuf,
}

impl Podman {
    /// Set up in `dir` (created), trusting the CA certificate in `ca_cert`.
    pub fn new(dir: &Path, ca_cert: &Path) -> Podman {
        let program = require("podman", "apt-get install podman");
        std::fs::create_dir_all(dir).expect("create podman directory");
        let cert_dir = dir.join("certs");
        std::fs::create_dir_all(&cert_dir).expect("create podman cert dir");
        std::fs::copy(ca_cert, cert_dir.join("ca.crt")).expect("copy CA certificate");
        let policy = dir.join("policy.json");
        std::fs::write(
            &policy,
            r#"{"default":[{"type":"insecureAcceptAnything"}]}"#,
        )
        .expect("write policy");
        std::fs::write(
            dir.join("registries.conf"),
            "unqualified-search-registries = []\nshort-name-mode = \"disabled\"\n",
        )
        .expect("write registries.conf");
        std::fs::write(
            dir.join("storage.conf"),
            format!(
                "[storage]\ndriver = \"vfs\"\ngraphroot = {:?}\nrunroot = {:?}\n",
                dir.join("root"),
                dir.join("runroot")
            ),
        )
        .expect("write storage.conf");
        std::fs::write(
            dir.join("containers.conf"),
            "[engine]\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\n",
        )
        .expect("write containers.conf");
        Podman {
            dir: dir.to_path_buf(),
            program,
            cert_dir,
            policy,
        }
    }

    /// A new, empty auth file (`{"auths":{}}`: podman refuses a missing one).
    pub fn fresh_auth_file(&self, name: &str) -> PathBuf {
        let path = self.dir.join(format!("auth-{name}.json"));
        std::fs::write(&path, r#"{"auths":{}}"#).expect("write auth file");
        path
    }

    pub fn cert_dir(&self) -> &str {
        self.cert_dir.to_str().expect("utf-8 path")
    }

    pub fn policy(&self) -> &str {
        self.policy.to_str().expect("utf-8 path")
    }

    /// `podman --root … ARGS` with `REGISTRY_AUTH_FILE=auth_file`.
    pub fn run(&self, auth_file: &Path, args: &[&str], stdin: Option<&str>) -> Run {
        let d = &self.dir;
        let mut command = Command::new(&self.program);
        command
            .env("REGISTRY_AUTH_FILE", auth_file)
            .env("CONTAINERS_CONF", d.join("containers.conf"))
            .env("CONTAINERS_REGISTRIES_CONF", d.join("registries.conf"))
            .env("CONTAINERS_STORAGE_CONF", d.join("storage.conf"))
            .env("TMPDIR", d.join("tmp"))
            .arg("--root")
            .arg(d.join("root"))
            .arg("--runroot")
            .arg(d.join("runroot"))
            .arg("--tmpdir")
            .arg(d.join("tmp"))
            .args([
                "--storage-driver",
                "vfs",
                "--cgroup-manager",
                "cgroupfs",
                "--events-backend",
                "file",
            ])
            .args(args);
        std::fs::create_dir_all(d.join("tmp")).expect("create podman tmpdir");
        run(&d.join("runs"), command, stdin)
    }
}
