//! The real skopeo (Debian `skopeo`), kept inside the test's directory: a private
//! auth file, a private signature policy, and a certificate directory holding only
//! the test CA.

use std::path::{Path, PathBuf};
use std::process::Output;

use super::command;

pub struct Skopeo {
    auth_file: PathBuf,
    policy: PathBuf,
    /// Holds `ca.crt`: give it as `--cert-dir` / `--src-cert-dir` / `--dest-cert-dir`.
    pub cert_dir: PathBuf,
}

impl Skopeo {
    /// Set up in `dir` (created), trusting the CA certificate in `ca_cert`.
    pub fn new(dir: &Path, ca_cert: &Path) -> Skopeo {
        let cert_dir = dir.join("certs");
        std::fs::create_dir_all(&cert_dir).expect("create skopeo cert dir");
        std::fs::copy(ca_cert, cert_dir.join("ca.crt")).expect("copy CA certificate");
        let auth_file = dir.join("auth.json");
        std::fs::write(&auth_file, r#"{"auths":{}}"#).expect("write auth file");
        let policy = dir.join("policy.json");
        std::fs::write(
            &policy,
            r#"{"default":[{"type":"insecureAcceptAnything"}]}"#,
        )
        .expect("write policy");
        Skopeo {
            auth_file,
            policy,
            cert_dir,
        }
    }

    pub fn cert_dir(&self) -> &str {
        self.cert_dir.to_str().expect("utf-8 path")
    }

    /// `skopeo --policy … ARGS` with `REGISTRY_AUTH_FILE` pointing at the private
    /// file. Fails the test when skopeo is not installed.
    pub fn run(&self, args: &[&str]) -> Output {
        command("skopeo", "skopeo")
            .arg("--policy")
            .arg(&self.policy)
            .args(args)
            .env("REGISTRY_AUTH_FILE", &self.auth_file)
            .output()
            .expect("run skopeo")
    }

    /// Like `run`, failing the test with skopeo's output when it fails.
    pub fn run_ok(&self, args: &[&str]) -> Output {
        let output = self.run(args);
        assert!(
            output.status.success(),
            "skopeo {} failed ({}):\nstdout: {}\nstderr: {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        output
    }
}
