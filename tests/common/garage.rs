//! A real three-node Garage cluster (S3-compatible, replication factor 3) on loopback,
//! started by `tests/garage/cluster.sh` (the script the benchmark uses too).
//!
//! [`Garage::shared`] is one cluster per test binary, started on first use; the
//! script's watchdog stops it (and removes its directory) when the binary exits.
//! Tests that stop nodes start a [`Garage::private`] one, stopped when dropped.
//! [`S3Place`] is a bucket and a key prefix of its own for one test.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The Garage version `.ci/run` installs.
pub const GARAGE_VERSION: &str = "2.5.0";

pub struct Garage {
    pub dir: PathBuf,
    /// The S3 endpoints of nodes 1, 2 and 3.
    pub endpoints: [String; 3],
    pub region: String,
    pub bucket: String,
    pub key_id: String,
    pub secret: String,
    private: bool,
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/garage/cluster.sh")
}

fn require_garage() {
    let version = Command::new("garage").arg("--version").output();
    let ok = version
        .as_ref()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(GARAGE_VERSION));
    assert!(
        ok,
        "these tests need garage {GARAGE_VERSION} on PATH (an S3-compatible object store): \
         cargo install garage --locked --version {GARAGE_VERSION} (.ci/run does); found: {version:?}"
    );
}

impl Garage {
    /// The cluster this test binary shares (a bucket prefix per test keeps them apart).
    pub fn shared() -> &'static Garage {
        static SHARED: OnceLock<Garage> = OnceLock::new();
        SHARED.get_or_init(|| {
            let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
                .join(format!("garage-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            Garage::launch(&dir, false)
        })
    }

    /// A cluster of this test's own, in `dir`, stopped when dropped.
    pub fn private(dir: &Path) -> Garage {
        Garage::launch(dir, true)
    }

    fn launch(dir: &Path, private: bool) -> Garage {
        require_garage();
        let mut command = Command::new(script());
        command
            .arg("start")
            .arg(dir)
            .args(["--watch", &std::process::id().to_string()]);
        if !private {
            command.arg("--remove");
        }
        let output = command.output().expect("run tests/garage/cluster.sh");
        assert!(
            output.status.success(),
            "tests/garage/cluster.sh start failed: {}\n{}",
            String::from_utf8_lossy(&output.stderr),
            String::from_utf8_lossy(&output.stdout)
        );
        let text = String::from_utf8_lossy(&output.stdout);
        let var = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{name}=")))
                .map(|v| v.trim_matches('"').to_owned())
                .unwrap_or_else(|| panic!("cluster.sh printed no {name}: {text}"))
        };
        Garage {
            dir: PathBuf::from(var("GARAGE_DIR")),
            endpoints: [
                var("S3_ENDPOINT"),
                var("S3_ENDPOINT_2"),
                var("S3_ENDPOINT_3"),
            ],
            region: var("S3_REGION"),
            bucket: var("S3_BUCKET"),
            key_id: var("S3_ACCESS_KEY_ID"),
            secret: var("S3_SECRET_ACCESS_KEY"),
            private,
        }
    }

    fn run(&self, args: &[&str]) {
        let output = Command::new(script())
            .arg(args[0])
            .arg(&self.dir)
            .args(&args[1..])
            .output()
            .expect("run tests/garage/cluster.sh");
        assert!(
            output.status.success(),
            "cluster.sh {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// `kill -9` node `n` (1..=3).
    pub fn kill_node(&self, n: usize) {
        self.run(&["kill-node", &n.to_string()]);
    }

    /// Start node `n` again, with its data.
    pub fn start_node(&self, n: usize) {
        self.run(&["start-node", &n.to_string()]);
    }

    /// Stop every node (the store is gone until [`Garage::start_all`]).
    pub fn stop_all(&self) {
        for n in 1..=3 {
            self.kill_node(n);
        }
    }

    pub fn start_all(&self) {
        for n in 1..=3 {
            self.start_node(n);
        }
    }

    /// Create another bucket the key may use.
    pub fn create_bucket(&self, name: &str) {
        self.run(&["bucket", name]);
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        if self.private {
            let _ = Command::new(script()).arg("stop").arg(&self.dir).output();
        }
    }
}

/// A place of one test's own in a cluster: the bucket under a fresh key prefix, and a
/// secret-key file for the gate's config.
#[derive(Clone)]
pub struct S3Place {
    pub endpoint: String,
    pub region: String,
    pub bucket: String,
    pub prefix: String,
    pub key_id: String,
    pub secret: String,
    pub secret_file: PathBuf,
}

impl S3Place {
    /// A fresh prefix in `garage`'s bucket; the secret file is written into `dir`.
    pub fn new(garage: &Garage, dir: &Path) -> S3Place {
        std::fs::create_dir_all(dir).expect("create the test directory");
        let secret_file = dir.join("s3-secret");
        std::fs::write(&secret_file, format!("{}\n", garage.secret)).expect("write the secret");
        S3Place {
            endpoint: garage.endpoints[0].clone(),
            region: garage.region.clone(),
            bucket: garage.bucket.clone(),
            prefix: format!("t-{:016x}", rand::random::<u64>()),
            key_id: garage.key_id.clone(),
            secret: garage.secret.clone(),
            secret_file,
        }
    }

    /// The same place through another node's endpoint.
    pub fn via(&self, endpoint: &str) -> S3Place {
        S3Place {
            endpoint: endpoint.to_owned(),
            ..self.clone()
        }
    }

    /// `s3 = { … }`, a line inside the gate's `[storage]` table.
    pub fn gate_line(&self) -> String {
        format!(
            "s3 = {{ endpoint = {:?}, region = {:?}, bucket = {:?}, prefix = {:?}, \
             access_key_id = {:?}, secret_access_key_file = {:?} }}\n",
            self.endpoint, self.region, self.bucket, self.prefix, self.key_id, self.secret_file
        )
    }

    /// The keys of multipart uploads in progress under this prefix (S3
    /// ListMultipartUploads, signed by curl).
    pub fn multipart_uploads(&self) -> Vec<String> {
        // curl signs the query as given: sorted, encoded, `uploads` with its `=`.
        let url = format!(
            "{}/{}?prefix={}%2F&uploads=",
            self.endpoint, self.bucket, self.prefix
        );
        let output = super::command("curl", "curl")
            .args(["-sS", "--fail-with-body", "--aws-sigv4"])
            .arg(format!("aws:amz:{}:s3", self.region))
            .arg("--user")
            .arg(format!("{}:{}", self.key_id, self.secret))
            .args(["-H", "x-amz-content-sha256: UNSIGNED-PAYLOAD"])
            .arg(&url)
            .output()
            .expect("run curl");
        let body = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(output.status.success(), "ListMultipartUploads: {body}");
        body.split("<Key>")
            .skip(1)
            .filter_map(|rest| rest.split("</Key>").next())
            .map(str::to_owned)
            .collect()
    }

    /// The `storage:` section of a `docker-registry` config using the same place (its
    /// `s3-aws` driver).
    pub fn registry_yaml(&self, redirect: bool) -> String {
        format!(
            "storage:\n  s3:\n    accesskey: {}\n    secretkey: {}\n    region: {}\n    \
             regionendpoint: {}\n    bucket: {}\n    rootdirectory: /{}\n    \
             forcepathstyle: true\n    secure: false\n    v4auth: true\n  delete:\n    \
             enabled: true\n  redirect:\n    disable: {}\n  maintenance:\n    uploadpurging:\n      \
             enabled: false\n",
            self.key_id,
            self.secret,
            self.region,
            self.endpoint,
            self.bucket,
            self.prefix,
            !redirect
        )
    }
}
