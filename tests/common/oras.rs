//! oras (the `oras` Python package from PyPI, "oras-py") pushing and pulling
//! single-file artifacts, driven through a small script run by `python3`.
//!
//! The script keeps oras-py inside the test: its Docker config (where `login`
//! writes credentials and where every push and pull reads them) is a file of the
//! test, `docker-py` is never used, and the sleep of oras-py's retry decorator is
//! patched out (after a refused request it would otherwise wait for minutes).
//! oras-py's `login()` only writes that file; the registry first sees the
//! credentials on the push.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::daemon::{Run, require, run};

const SCRIPT: &str = r#"
import hashlib, json, os, sys, types

try:
    import oras.client, oras.decorator, oras.utils
except ImportError as e:
    print(f"cannot import oras ({e}): pip install oras", file=sys.stderr)
    sys.exit(3)

args = json.loads(sys.argv[1])
config = args["config"]

# No minutes-long sleeps between retries of a refused request.
oras.decorator.time = types.SimpleNamespace(sleep=lambda seconds: None)
# Credentials only in the test's own file, never ~/.docker/config.json.
def private_config(exists=True):
    return config if (not exists or os.path.exists(config)) else None
oras.utils.find_docker_config = private_config
def no_docker_py(*a, **k):
    raise RuntimeError("docker-py is not used by the tests")
oras.utils.get_docker_client = no_docker_py

def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()

client = oras.client.OrasClient(
    hostname=args["host"], auth_backend="token", tls_verify=args["ca"]
)
try:
    if args["action"] == "login":
        print(json.dumps(client.login(
            username=args["user"], password=args["password"],
            hostname=args["host"], config_path=config,
        )))
    elif args["action"] == "push":
        response = client.push(
            target=args["ref"], files=[args["file"]], config_path=config,
            disable_path_validation=True,
        )
        print(json.dumps({
            "status": response.status_code,
            "digest": response.headers.get("Docker-Content-Digest"),
        }))
    elif args["action"] == "pull":
        files = client.pull(target=args["ref"], outdir=args["outdir"], config_path=config)
        repo, tag = args["ref"].split("/", 1)[1].rsplit(":", 1)
        manifest = client.do_request(
            f"https://{args['host']}/v2/{repo}/manifests/{tag}", "GET",
            headers={"Accept": "application/vnd.oci.image.manifest.v1+json"},
        )
        print(json.dumps({
            "files": {os.path.basename(f): sha256_file(f) for f in files},
            "manifest_status": manifest.status_code,
            "manifest_digest": "sha256:" + hashlib.sha256(manifest.content).hexdigest(),
            "manifest_header_digest": manifest.headers.get("Docker-Content-Digest"),
            "layers": [l["digest"] for l in manifest.json().get("layers", [])],
        }))
    else:
        sys.exit(f"unknown action {args['action']}")
except Exception as e:
    print(f"{type(e).__name__}: {e}", file=sys.stderr)
    sys.exit(1)
"#;

pub struct Oras {
    pub dir: PathBuf,
    python: PathBuf,
    script: PathBuf,
    ca: PathBuf,
    host: String,
}

impl Oras {
    /// Set up in `dir` (created) for the registry at `host` (`localhost:PORT`),
    /// trusting `ca_cert`.
    pub fn new(dir: &Path, host: &str, ca_cert: &Path) -> Oras {
        let python = require("python3", "apt-get install python3, then pip install oras");
        std::fs::create_dir_all(dir).expect("create oras directory");
        let script = dir.join("oras_client.py");
        std::fs::write(&script, SCRIPT).expect("write oras script");
        Oras {
            dir: dir.to_path_buf(),
            python,
            script,
            ca: ca_cert.to_path_buf(),
            host: host.to_owned(),
        }
    }

    /// A Docker config file of the test, for one "user" of oras; not created
    /// (an absent file means no stored credentials).
    pub fn config(&self, name: &str) -> PathBuf {
        self.dir.join(format!("docker-config-{name}.json"))
    }

    fn call(&self, mut args: serde_json::Value) -> Run {
        args["host"] = self.host.clone().into();
        args["ca"] = self.ca.to_str().expect("utf-8 path").into();
        let mut command = Command::new(&self.python);
        command.arg(&self.script).arg(args.to_string());
        run(&self.dir.join("runs"), command, None)
    }

    /// `OrasClient.login`: writes `user:password` into `config`.
    pub fn login(&self, config: &Path, user: &str, password: &str) -> Run {
        self.call(serde_json::json!({
            "action": "login", "config": config, "user": user, "password": password,
        }))
    }

    /// Push `file` as a one-layer artifact to `reference` (`localhost:PORT/repo:tag`)
    /// with the credentials in `config`. Prints `{"status","digest"}`.
    pub fn push(&self, config: &Path, reference: &str, file: &Path) -> Run {
        self.call(serde_json::json!({
            "action": "push", "config": config, "ref": reference, "file": file,
        }))
    }

    /// Pull `reference` into `outdir`. Prints the files' digests and the
    /// manifest's digest.
    pub fn pull(&self, config: &Path, reference: &str, outdir: &Path) -> Run {
        self.call(serde_json::json!({
            "action": "pull", "config": config, "ref": reference, "outdir": outdir,
        }))
    }
}
