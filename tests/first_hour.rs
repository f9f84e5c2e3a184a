//! The README's quick start as a new user runs it. Its commands are taken from the
//! README itself and run, as written, in a throw-away copy of the repository's
//! tracked files (a git repository of its own, with `target/debug/registry-gate` the
//! binary under test, as `cargo build` leaves it); the gate then runs from the
//! example configuration on an ephemeral port, over real TLS:
//!
//! * `make-certs.sh` and `user add` leave `git status` clean: the password files
//!   they create are not tracked files of `examples/`;
//! * `certs-example/trust/` works as `--cert-dir` for skopeo and podman (and the
//!   script's own directory does not, which is why it exists);
//! * the all-in-one example lets a pusher delete, as its comment says;
//! * in front of `registry:2`, deletes pass only once its `storage.delete.enabled` is
//!   set, as deploy/MIGRATING.md says (before, its 405 `UNSUPPORTED` reaches the client).

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};

use tempfile::TempDir;

use common::client::{Client, empty};
use common::image::{UploadMode, get_manifest, push_image, tar_layer, write_oci_layout};
use common::podman::Podman;
use common::registry::Process;
use common::skopeo::Skopeo;
use common::upstream::free_loopback_port;

const BINARY: &str = env!("CARGO_BIN_EXE_registry-gate");
/// The password the test types at `user add`.
const PASSWORD: &str = "first-hour-password";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The shell lines of the README's "Quick start" section (every ```sh block in it,
/// lines ending in `\` joined with the next).
fn quick_start_lines() -> Vec<String> {
    let readme = std::fs::read_to_string(repo().join("README.md")).expect("read README.md");
    let start = readme
        .find("\n## Quick start")
        .expect("README.md has a \"## Quick start\" section");
    let section = &readme[start + 1..];
    let section = &section[..section[3..].find("\n## ").map_or(section.len(), |i| i + 3)];
    let mut lines = Vec::new();
    let mut in_block = false;
    let mut pending = String::new();
    for raw in section.lines() {
        let line = raw.trim();
        if line.starts_with("```") {
            in_block = line == "```sh";
            continue;
        }
        if !in_block || line.is_empty() {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(head) => {
                pending.push_str(head);
                pending.push(' ');
            }
            None => {
                pending.push_str(line);
                lines.push(std::mem::take(&mut pending));
            }
        }
    }
    lines
}

/// The one quick-start line that contains `needle`.
fn quick_start_line(needle: &str) -> String {
    let lines = quick_start_lines();
    let found: Vec<&String> = lines.iter().filter(|l| l.contains(needle)).collect();
    assert!(
        !found.is_empty(),
        "the README's quick start has no command with {needle:?}; its commands:\n{}",
        lines.join("\n")
    );
    found[0].clone()
}

/// A throw-away checkout: the work tree's tracked files in a new git repository with
/// one commit, and `target/debug/registry-gate` pointing at the binary under test.
struct Checkout {
    dir: TempDir,
}

fn git(dir: &Path, args: &[&str]) -> Output {
    let out = common::command("git", "git")
        .arg("-C")
        .arg(dir)
        .args([
            "-c",
            "user.name=first-hour",
            "-c",
            "user.email=first-hour@localhost",
        ])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run git");
    assert!(
        out.status.success(),
        "git {} in {}: {}",
        args.join(" "),
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

impl Checkout {
    fn new() -> Checkout {
        let dir = tempfile::Builder::new()
            .prefix("registry-gate-first-hour")
            .tempdir()
            .expect("tempdir");
        let listed = git(&repo(), &["ls-files", "-z"]);
        for name in listed.stdout.split(|b| *b == 0).filter(|n| !n.is_empty()) {
            let name = String::from_utf8_lossy(name).into_owned();
            let from = repo().join(&name);
            // Listed but removed in the work tree (a change not yet committed).
            if !from.is_file() {
                continue;
            }
            let to = dir.path().join(&name);
            std::fs::create_dir_all(to.parent().expect("parent")).expect("mkdir");
            std::fs::copy(&from, &to).expect("copy tracked file");
        }
        git(dir.path(), &["init", "-q"]);
        git(dir.path(), &["add", "-A"]);
        git(dir.path(), &["commit", "-q", "-m", "as cloned"]);
        let bin = dir.path().join("target/debug");
        std::fs::create_dir_all(&bin).expect("mkdir target/debug");
        std::os::unix::fs::symlink(BINARY, bin.join("registry-gate")).expect("symlink binary");
        Checkout { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Run one line with bash in the checkout's top directory, `stdin` fed in.
    fn sh(&self, line: &str, stdin: &str) -> Output {
        let stdin_file = self.path(".stdin-of-test");
        std::fs::write(&stdin_file, stdin).expect("write stdin");
        let out = common::command("bash", "bash")
            .args(["-c", line])
            .current_dir(self.dir.path())
            .env_remove("RUST_LOG")
            .stdin(std::fs::File::open(&stdin_file).expect("open stdin"))
            .output()
            .expect("run bash");
        std::fs::remove_file(&stdin_file).expect("remove stdin file");
        out
    }

    fn sh_ok(&self, line: &str, stdin: &str) -> Output {
        let out = self.sh(line, stdin);
        assert!(
            out.status.success(),
            "`{line}` failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// `git status --porcelain`, untracked files listed one by one.
    fn status(&self) -> String {
        let out = git(
            self.dir.path(),
            &["status", "--porcelain", "--untracked-files=all"],
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Steps 2 and 3 of the quick start, as written: the certificates and a pusher.
    fn make_certs_and_pusher(&self) {
        self.sh_ok(&quick_start_line("make-certs.sh"), "");
        self.sh_ok(&quick_start_line(" user add "), &format!("{PASSWORD}\n"));
    }

    /// Step 4 on an ephemeral port: the example configuration with only `listen`
    /// changed, beside the original so that its relative paths resolve the same.
    async fn serve(&self) -> Served {
        let serve = quick_start_line(" serve ");
        let config_arg = serve
            .split_whitespace()
            .skip_while(|w| *w != "--config")
            .nth(1)
            .expect("the serve line names --config");
        let example = self.path(config_arg);
        let text = std::fs::read_to_string(&example).expect("read the example config");
        let listen = "listen = \"0.0.0.0:5043\"";
        assert!(text.contains(listen), "{config_arg} listens on 5043");
        let addr = free_loopback_port();
        let config = example.with_file_name("first-hour-test.toml");
        std::fs::write(
            &config,
            text.replace(listen, &format!("listen = \"{addr}\"")),
        )
        .expect("write config");
        let ca = self.path("certs-example/ca.crt");
        let client = Client::new(addr, &[&ca]);
        let mut process = Process::spawn(&config, addr, &self.path("gate.log"));
        process.wait_ready(&client).await;
        Served {
            addr,
            client,
            process,
        }
    }
}

struct Served {
    addr: SocketAddr,
    client: Client,
    process: Process,
}

impl Served {
    fn authority(&self) -> String {
        format!("localhost:{}", self.addr.port())
    }
}

#[test]
fn the_quick_start_user_add_leaves_git_status_clean() {
    let checkout = Checkout::new();
    assert_eq!(checkout.status(), "", "a fresh checkout is clean");
    checkout.make_certs_and_pusher();
    // It did create what the gate needs: a bcrypt entry and the group line.
    let htpasswd = std::fs::read_to_string(checkout.path("examples/httpd.htpasswd"))
        .expect("user add created examples/httpd.htpasswd");
    assert!(htpasswd.contains("mark:$2"), "{htpasswd}");
    let groups = std::fs::read_to_string(checkout.path("examples/httpd.groups"))
        .expect("user add created examples/httpd.groups");
    assert!(
        groups.contains("pusher:") && groups.contains("mark"),
        "{groups}"
    );
    assert!(checkout.path("certs-example/trust/ca.crt").is_file());
    assert_eq!(
        checkout.status(),
        "",
        "the quick start's make-certs.sh and user add changed files git tracks or sees"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_trust_directory_works_as_cert_dir_for_skopeo_and_podman() {
    let checkout = Checkout::new();
    checkout.make_certs_and_pusher();
    let trust = checkout.path("certs-example/trust");
    let entries: Vec<String> = std::fs::read_dir(&trust)
        .expect("make-certs.sh wrote certs-example/trust")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(entries, ["ca.crt"], "trust/ holds only the CA certificate");
    let served = checkout.serve().await;
    let trust = trust.to_str().expect("utf-8 path");
    let script_dir = checkout.path("certs-example");
    let script_dir = script_dir.to_str().expect("utf-8 path");

    // Skopeo's own files (policy, auth) in the test; its cert dir is not used.
    let skopeo = Skopeo::new(
        &checkout.path("skopeo"),
        &checkout.path("certs-example/ca.crt"),
    );
    let layout_dir = checkout.path("layout");
    let layout = write_oci_layout(
        &layout_dir,
        "v1",
        &[tar_layer(&[("hello.txt", b"hello from the first hour\n")])],
    );
    let image = format!("docker://{}/first-hour/hello:v1", served.authority());
    let creds = format!("mark:{PASSWORD}");
    let source = format!("oci:{}:v1", layout_dir.display());
    let run = |args: &[&str]| tokio::task::block_in_place(|| skopeo.run(args));

    // Controls: skopeo checks the certificate (no CA: refused), and the script's
    // directory, which also holds ca.key, is not a certificate directory.
    let out = run(&["inspect", "--retry-times", "0", &image]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "skopeo trusted an unknown CA: {stderr}"
    );
    assert!(
        stderr.contains("x509") || stderr.contains("certificate"),
        "skopeo without the CA should fail on the certificate: {stderr}"
    );
    let out = run(&[
        "inspect",
        "--retry-times",
        "0",
        "--cert-dir",
        script_dir,
        &image,
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("missing client certificate"),
        "skopeo --cert-dir certs-example: {stderr}"
    );

    // With trust/: push as the pusher, inspect anonymously.
    skopeo_ok(
        run(&[
            "copy",
            "--retry-times",
            "0",
            "--dest-cert-dir",
            trust,
            "--dest-creds",
            &creds,
            &source,
            &image,
        ]),
        "copy to the gate",
    );
    let out = skopeo_ok(
        run(&["inspect", "--raw", "--cert-dir", trust, &image]),
        "inspect",
    );
    assert_eq!(common::sha256_digest(&out.stdout), layout.manifest_digest);

    // podman pulls it with the same directory.
    let podman = Podman::new(
        &checkout.path("podman"),
        &checkout.path("certs-example/ca.crt"),
    );
    let auth = podman.fresh_auth_file("anonymous");
    let reference = format!("{}/first-hour/hello:v1", served.authority());
    let pulled = tokio::task::block_in_place(|| {
        podman.run(
            &auth,
            &[
                "pull",
                "--signature-policy",
                podman.policy(),
                "--cert-dir",
                trust,
                &reference,
            ],
            None,
        )
    });
    assert!(
        pulled.success(),
        "podman pull --cert-dir trust: {}",
        pulled.describe()
    );
    drop(served.process);
}

fn skopeo_ok(out: Output, what: &str) -> Output {
    assert!(
        out.status.success(),
        "skopeo {what} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_all_in_one_example_lets_a_pusher_delete() {
    let checkout = Checkout::new();
    let serve = quick_start_line(" serve ");
    assert!(
        serve.contains("examples/all-in-one.toml"),
        "the quick start serves the all-in-one example: {serve}"
    );
    checkout.make_certs_and_pusher();
    let served = checkout.serve().await;
    let pusher = served.client.with_basic("mark", PASSWORD);
    let image = push_image(
        &pusher,
        "first-hour/app",
        "v1",
        &[common::pseudo_random_bytes(4096, 14)],
        UploadMode::Monolithic,
    )
    .await;
    let path = format!("/v2/first-hour/app/manifests/{}", image.manifest_digest);

    // Anonymous: asked to log in, nothing deleted.
    let resp = served.client.request("DELETE", &path, &[], empty()).await;
    resp.assert_oci_error(401);
    let manifest = get_manifest(&served.client, "first-hour/app", &image.manifest_digest).await;
    assert_eq!(manifest.status, 200, "refused, so still there");

    // The pusher: deleted.
    let resp = pusher.request("DELETE", &path, &[], empty()).await;
    assert_eq!(
        resp.status,
        202,
        "a pusher's DELETE on the all-in-one example: {}",
        resp.text()
    );
    get_manifest(&served.client, "first-hour/app", &image.manifest_digest)
        .await
        .assert_oci_error(404);
    drop(served.process);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_2_upstream_takes_deletes_only_with_storage_delete_enabled() {
    // What deploy/MIGRATING.md tells people who front registry:2.
    let migrating =
        std::fs::read_to_string(repo().join("deploy/MIGRATING.md")).expect("read MIGRATING.md");
    for needle in [
        "storage.delete.enabled",
        "REGISTRY_STORAGE_DELETE_ENABLED=true",
    ] {
        assert!(
            migrating.contains(needle),
            "deploy/MIGRATING.md does not say {needle}"
        );
    }
    let storage = tempfile::tempdir().expect("tempdir");
    for (enabled, expected) in [(false, 405), (true, 202)] {
        let delete = if enabled {
            "  delete:\n    enabled: true\n"
        } else {
            ""
        };
        let root = storage.path().join(format!("delete-{enabled}"));
        std::fs::create_dir_all(&root).expect("mkdir");
        let stack = common::Stack::start_with(common::StackOptions {
            upstream: common::upstream::UpstreamOptions {
                storage_yaml: Some(format!(
                    "storage:\n  filesystem:\n    rootdirectory: {}\n{delete}",
                    root.display()
                )),
                ..Default::default()
            },
            ..Default::default()
        })
        .await;
        let image = push_image(
            &stack.pusher(),
            "first-hour/front",
            "v1",
            &[common::pseudo_random_bytes(2048, 15)],
            UploadMode::Monolithic,
        )
        .await;
        let path = format!("/v2/first-hour/front/manifests/{}", image.manifest_digest);
        let resp = stack.pusher().request("DELETE", &path, &[], empty()).await;
        if expected == 405 {
            let codes = resp.assert_oci_error(405);
            assert!(codes.contains(&"UNSUPPORTED".to_owned()), "{codes:?}");
            let still =
                get_manifest(&stack.client(), "first-hour/front", &image.manifest_digest).await;
            assert_eq!(still.status, 200, "refused, so still there");
        } else {
            assert_eq!(resp.status, 202, "{}", resp.text());
            get_manifest(&stack.client(), "first-hour/front", &image.manifest_digest)
                .await
                .assert_oci_error(404);
        }
        stack.gate.stop().await;
    }
}
