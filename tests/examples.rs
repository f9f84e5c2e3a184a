//! The shipped configurations and deploy files are valid: every `examples/*.toml` and
//! `deploy/container/*.toml` loads with `Config::load` and passes
//! `registry-gate check-config` (the object-store example against a real Garage
//! cluster, its endpoint and key put in); the container configurations have `[admin]`
//! and the image's `HEALTHCHECK` command, run against the real binary serving each of
//! them, says healthy (and unhealthy once the gate or its upstream is gone); the root
//! `.dockerignore` keeps `target/`, `registry-data/` and the local keys and password
//! files out of the build context of docker 20.10's classic builder (a real dockerd);
//! the systemd unit passes `systemd-analyze verify` alone (front mode: no
//! `StateDirectory=`, so `/var/lib/registry` is never chowned) and with the
//! all-in-one drop-in that has it; the certbot deploy hook is quiet and exits 0 when
//! the gate is not running.
//!
//! The example files point at `../certs-example/*.pem` and at password files beside
//! them, which are generated, never committed: each test copies what it needs into a
//! temporary directory, makes the certificates there with
//! `certs-example/make-certs.sh` and the password files with `registry-gate user add`,
//! so the work tree stays clean.

use std::ffi::OsStr;
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use registry_gate::config::Config;

mod common;

const BIN: &str = env!("CARGO_BIN_EXE_registry-gate");

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Copy the regular files of `from` (not recursively) into `to`, except the local
/// files git ignores in examples/ (password files a quick start left, secrets).
fn copy_files(from: &Path, to: &Path) {
    fs::create_dir_all(to).expect("create dir");
    for entry in fs::read_dir(from).expect("read dir") {
        let entry = entry.expect("dir entry");
        let name = entry.file_name().to_string_lossy().into_owned();
        let local = name.ends_with(".htpasswd")
            || name.ends_with(".groups")
            || name == "token.key"
            || name == "s3-secret";
        if entry.file_type().expect("file type").is_file() && !local {
            fs::copy(entry.path(), to.join(entry.file_name())).expect("copy");
        }
    }
}

/// `registry-gate user add NAME --group GROUP ARGS…` (password on stdin), as the
/// examples' comments tell users to run it.
fn user_add(name: &str, group: &str, args: &[&OsStr]) {
    let mut child = Command::new(BIN)
        .args(["user", "add", name, "--group", group, "--cost", "4"])
        .args(args)
        .env_remove("RUST_LOG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run registry-gate user add");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"example-password\n")
        .expect("write password");
    let out = child.wait_with_output().expect("wait for user add");
    assert!(
        out.status.success(),
        "registry-gate user add {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The password files the examples name, made the way their comments say.
fn add_example_users(examples: &Path) {
    for (name, group, config) in [
        ("mark", "pusher", "all-in-one.toml"),
        ("alice", "team-a", "teams.toml"),
    ] {
        let config = examples.join(config);
        user_add(name, group, &[OsStr::new("--config"), config.as_os_str()]);
    }
}

/// A throw-away CA and localhost certificate in `dir`, made by the shipped script.
fn make_certs(dir: &Path) {
    let out = Command::new("bash")
        .arg(repo().join("certs-example/make-certs.sh"))
        .arg(dir)
        .output()
        .expect("run certs-example/make-certs.sh (needs bash and openssl)");
    assert!(
        out.status.success(),
        "make-certs.sh failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for f in ["fullchain.pem", "privkey.pem"] {
        assert!(dir.join(f).is_file(), "make-certs.sh wrote no {f}");
    }
}

fn check_config(file: &Path) -> Output {
    Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(file)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .output()
        .expect("run registry-gate check-config")
}

/// `Config::load` and `registry-gate check-config` both accept `file`.
fn assert_valid(file: &Path) {
    if let Err(e) = Config::load(file) {
        panic!("{}: Config::load refused it: {e}", file.display());
    }
    let out = check_config(file);
    assert!(
        out.status.success(),
        "registry-gate check-config --config {} exited {:?}:\n{}{}",
        file.display(),
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn tomls_in(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .expect("read dir")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    files
}

#[test]
fn every_example_loads_and_passes_check_config() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // The same shape as the repository: examples/ beside certs-example/.
    let examples = tmp.path().join("examples");
    copy_files(&repo().join("examples"), &examples);
    make_certs(&tmp.path().join("certs-example"));

    // The scale-out example stores in S3: point it at a real cluster, and give it the
    // files its comment tells users to make.
    let garage = common::garage::Garage::shared();
    let scale = examples.join("scale-out.toml");
    let text = fs::read_to_string(&scale).expect("read scale-out.toml");
    let text = text
        .replace("http://127.0.0.1:3900", &garage.endpoints[0])
        .replace("GK31c2f218a2e44f485b94239e", &garage.key_id);
    fs::write(&scale, text).expect("write scale-out.toml");
    fs::write(examples.join("s3-secret"), format!("{}\n", garage.secret)).expect("secret");
    fs::write(examples.join("token.key"), [7u8; 48]).expect("token key");
    add_example_users(&examples);

    let files = tomls_in(&examples);
    let names: Vec<String> = files
        .iter()
        .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .collect();
    for expected in [
        "all-in-one.toml",
        "front-local-registry.toml",
        "read-only-mirror.toml",
        "scale-out.toml",
        "teams.toml",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "examples/{expected} is missing (have {names:?})"
        );
    }
    for file in &files {
        assert_valid(file);
    }

    // What each example promises, as the gate reads it.
    let load = |name: &str| Config::load(&examples.join(name)).expect("load");
    let mirror = load("read-only-mirror.toml");
    assert!(mirror.auth.is_none(), "the read-only mirror has no users");
    assert!(mirror.upstream.is_some() || mirror.storage.is_some());
    let teams = load("teams.toml");
    assert!(teams.auth.is_some(), "teams needs password files");
    assert!(
        teams.rules.len() >= 2,
        "teams.toml shows per-repository [[rules]]"
    );
    assert!(load("all-in-one.toml").upstream.is_none());
    assert!(load("front-local-registry.toml").upstream.is_some());
    let scale = load("scale-out.toml");
    assert!(
        scale
            .storage
            .as_ref()
            .is_some_and(|s| s.s3.is_some() && s.root.is_none()),
        "scale-out.toml stores in S3"
    );
    assert!(
        scale.token.key_file.is_some() && scale.token.service.is_some(),
        "gates behind one load balancer share the token key and service"
    );
}

#[test]
fn a_broken_example_is_refused_by_check_config() {
    // The test above would be worthless if check-config accepted anything.
    let tmp = tempfile::tempdir().expect("tempdir");
    let examples = tmp.path().join("examples");
    copy_files(&repo().join("examples"), &examples);
    make_certs(&tmp.path().join("certs-example"));
    add_example_users(&examples);
    let file = examples.join("all-in-one.toml");
    let text = fs::read_to_string(&file).expect("read");
    fs::write(&file, text.replace("push_group", "push_grup")).expect("write");
    assert!(Config::load(&file).is_err());
    let out = check_config(&file);
    assert!(!out.status.success(), "a typo in a key must be an error");
    assert!(String::from_utf8_lossy(&out.stderr).contains("push_grup"));
}

#[test]
fn container_configs_pass_check_config_where_their_paths_exist() {
    // deploy/container/*.toml name absolute paths inside the container; put the
    // same files at temporary paths and check the rest as shipped.
    let tmp = tempfile::tempdir().expect("tempdir");
    let certs = tmp.path().join("letsencrypt/live/registry.example.org");
    make_certs(&certs);
    let etc = tmp.path().join("etc");
    fs::create_dir_all(&etc).expect("mkdir");
    user_add(
        "mark",
        "pusher",
        &[
            OsStr::new("--htpasswd"),
            etc.join("httpd.htpasswd").as_os_str(),
            OsStr::new("--groups"),
            etc.join("httpd.groups").as_os_str(),
        ],
    );
    let data = tmp.path().join("data");
    let files = tomls_in(&repo().join("deploy/container"));
    assert!(
        files.len() >= 2,
        "deploy/container has the two compose setups"
    );
    for file in files {
        let text = fs::read_to_string(&file).expect("read");
        assert!(text.contains("/etc/letsencrypt/live/registry.example.org/"));
        let text = text
            .replace(
                "/etc/letsencrypt/live/registry.example.org/",
                &format!("{}/", certs.display()),
            )
            .replace(
                "\"/var/lib/registry\"",
                &format!("{:?}", data.display().to_string()),
            );
        let name = file.file_name().expect("file name");
        let copy = etc.join(name);
        fs::write(&copy, text).expect("write");
        assert_valid(&copy);
    }
}

fn require_systemd_analyze() {
    let analyze = Command::new("systemd-analyze").arg("--version").output();
    assert!(
        analyze.is_ok_and(|o| o.status.success()),
        "systemd-analyze not found: apt-get install systemd"
    );
}

/// `systemd-analyze verify UNIT` (drop-ins beside it included): success, stderr.
fn verify_unit(path: &Path) -> (bool, String) {
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(path)
        .output()
        .expect("run systemd-analyze verify");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// No line of `systemd-analyze verify`'s output is about our unit.
fn assert_no_unit_warnings(stderr: &str) {
    let ours: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("registry-gate.service"))
        .collect();
    assert!(
        ours.is_empty(),
        "systemd-analyze verify warns:\n{}",
        ours.join("\n")
    );
}

#[test]
fn systemd_unit_passes_systemd_analyze_verify() {
    require_systemd_analyze();
    // verify checks that ExecStart= names an executable: point it at the test build.
    let unit = fs::read_to_string(repo().join("deploy/registry-gate.service")).expect("read");
    assert!(unit.contains("ExecStart=/usr/local/bin/registry-gate serve"));
    let tmp = tempfile::tempdir().expect("tempdir");
    let path = tmp.path().join("registry-gate.service");
    fs::write(&path, unit.replace("/usr/local/bin/registry-gate", BIN)).expect("write");
    let (ok, stderr) = verify_unit(&path);
    assert!(ok, "systemd-analyze verify failed:\n{stderr}");
    assert_no_unit_warnings(&stderr);
}

#[test]
fn certbot_deploy_hook_is_quiet_and_exits_0_when_the_gate_is_not_running() {
    let hook = repo().join("deploy/certbot-deploy-hook.sh");
    let tmp = tempfile::tempdir().expect("tempdir");
    let calls = tmp.path().join("calls");
    // A systemctl that records its arguments; `is-active` answers $ACTIVE.
    let fake = tmp.path().join("systemctl");
    fs::write(
        &fake,
        "#!/bin/sh\necho \"$*\" >> \"$CALLS\"\ncase \"$1\" in\n  is-active) exit \"$ACTIVE\" ;;\n  reload) exit \"$RELOAD\" ;;\nesac\nexit 0\n",
    )
    .expect("write");
    Command::new("chmod")
        .arg("755")
        .arg(&fake)
        .status()
        .expect("chmod");
    let path = format!(
        "{}:{}",
        tmp.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let run = |active: &str, reload: &str| {
        let _ = fs::remove_file(&calls);
        let out = Command::new("sh")
            .arg(&hook)
            .env("PATH", &path)
            .env("CALLS", &calls)
            .env("ACTIVE", active)
            .env("RELOAD", reload)
            .env_remove("REGISTRY_GATE_UNIT")
            .output()
            .expect("run the hook");
        let log = fs::read_to_string(&calls).unwrap_or_default();
        (out, log)
    };

    // Not running: no reload, no output, exit 0.
    let (out, log) = run("3", "0");
    assert!(out.status.success());
    assert!(out.stdout.is_empty() && out.stderr.is_empty());
    assert_eq!(log, "is-active --quiet registry-gate.service\n");

    // Running: one reload, silently; again: the same (idempotent).
    for _ in 0..2 {
        let (out, log) = run("0", "0");
        assert!(out.status.success());
        assert!(out.stdout.is_empty() && out.stderr.is_empty());
        assert_eq!(
            log,
            "is-active --quiet registry-gate.service\nreload registry-gate.service\n"
        );
    }

    // Running but the reload fails: certbot is told.
    let (out, _) = run("0", "1");
    assert!(!out.status.success());
    assert!(!out.stderr.is_empty());
}

/// The exec-form command of the Dockerfile's `HEALTHCHECK`, and its options.
fn dockerfile_healthcheck() -> (Vec<String>, String) {
    let text = fs::read_to_string(repo().join("deploy/Dockerfile")).expect("read Dockerfile");
    let joined = text.replace("\\\n", " ");
    let line = joined
        .lines()
        .find(|l| l.trim_start().starts_with("HEALTHCHECK"))
        .expect("deploy/Dockerfile has a HEALTHCHECK");
    let (options, command) = line.split_once("CMD").expect("HEALTHCHECK ... CMD [...]");
    let command: Vec<String> = serde_json::from_str(command.trim()).unwrap_or_else(|e| {
        panic!("HEALTHCHECK CMD is not exec form (no shell in the image): {e}")
    });
    (command, options.to_owned())
}

/// Run the Dockerfile's HEALTHCHECK command with the binary under test and `config`.
fn run_image_healthcheck(config: &Path) -> Output {
    let (command, _) = dockerfile_healthcheck();
    assert_eq!(command[0], "/usr/local/bin/registry-gate", "{command:?}");
    let args: Vec<String> = command[1..]
        .iter()
        .map(|a| {
            if a == "/etc/registry-gate/config.toml" {
                config.display().to_string()
            } else {
                a.clone()
            }
        })
        .collect();
    assert!(
        args.iter().any(|a| *a == config.display().to_string()),
        "the HEALTHCHECK names the image's config file: {command:?}"
    );
    tokio::task::block_in_place(|| {
        Command::new(BIN)
            .args(&args)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .output()
            .expect("run the HEALTHCHECK command")
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_image_healthcheck_asks_readyz_of_each_container_config() {
    let (_, options) = dockerfile_healthcheck();
    assert!(
        options.contains("--timeout=5s"),
        "docker's timeout leaves the command's own (3 s) room: {options}"
    );
    let tmp = tempfile::tempdir().expect("tempdir");
    let certs = tmp.path().join("letsencrypt/live/registry.example.org");
    make_certs(&certs);
    let mut upstream = common::upstream::Upstream::start(
        &tmp.path().join("upstream"),
        common::upstream::UpstreamOptions::default(),
    );
    for file in tomls_in(&repo().join("deploy/container")) {
        let name = file
            .file_name()
            .expect("name")
            .to_string_lossy()
            .into_owned();
        let text = fs::read_to_string(&file).expect("read");
        for expected in [
            "\n[admin]\n",
            "listen = \"127.0.0.1:9090\"",
            "listen = \"0.0.0.0:5043\"",
        ] {
            assert!(text.contains(expected), "{name} has no {expected:?}");
        }
        // The same file with this test's paths and ports.
        let etc = tmp.path().join(name.trim_end_matches(".toml"));
        fs::create_dir_all(&etc).expect("mkdir");
        user_add(
            "mark",
            "pusher",
            &[
                OsStr::new("--htpasswd"),
                etc.join("httpd.htpasswd").as_os_str(),
                OsStr::new("--groups"),
                etc.join("httpd.groups").as_os_str(),
            ],
        );
        let listen = common::upstream::free_loopback_port();
        let admin = common::upstream::free_loopback_port();
        let text = text
            .replace(
                "/etc/letsencrypt/live/registry.example.org/",
                &format!("{}/", certs.display()),
            )
            .replace(
                "\"/var/lib/registry\"",
                &format!("{:?}", etc.join("data").display().to_string()),
            )
            .replace("http://registry:5000", &upstream.url())
            .replace("127.0.0.1:9090", &admin.to_string())
            .replace("0.0.0.0:5043", &listen.to_string());
        let config = etc.join("config.toml");
        fs::write(&config, text).expect("write");
        let client = common::client::Client::new(listen, &[&certs.join("ca.crt")]);
        let mut gate = common::registry::Process::spawn(&config, listen, &etc.join("gate.log"));
        gate.wait_ready(&client).await;

        let out = common::eventually(&format!("{name}: HEALTHCHECK says healthy"), || async {
            let out = run_image_healthcheck(&config);
            out.status.success().then_some(out)
        })
        .await;
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.starts_with(&format!("healthy: /readyz on {admin}: ready")),
            "{name}: the HEALTHCHECK asked /readyz: {stdout}"
        );

        // And it says so when the gate cannot serve: the upstream gone (front), or
        // the gate itself.
        if name.starts_with("front") {
            upstream.stop();
            let out = run_image_healthcheck(&config);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(
                out.status.code(),
                Some(1),
                "{name}, upstream down: {stderr}"
            );
            assert!(stderr.contains("not ready"), "{name}: {stderr}");
            upstream.restart();
        }
        gate.kill9();
        let out = run_image_healthcheck(&config);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{name}, gate killed: {stderr}");
        assert!(stderr.contains("nothing answers"), "{name}: {stderr}");
    }
}

#[test]
fn the_root_dockerignore_keeps_the_classic_builders_context_to_the_sources() {
    // A copy of the repository's shape with what must never be sent, built by docker
    // 20.10's classic builder (DOCKER_BUILDKIT=0), which reads only ./.dockerignore.
    let tmp = tempfile::tempdir().expect("tempdir");
    let context = tmp.path().join("context");
    let files: &[(&str, &[u8])] = &[
        ("Cargo.toml", b"[package]\n"),
        ("Cargo.lock", b"# lock\n"),
        ("src/main.rs", b"fn main() {}\n"),
        ("src/registry/mod.rs", b"\n"),
        ("target/debug/registry-gate", &[0u8; 4096]),
        ("registry-data/docker/registry/v2/blobs/x", b"layer\n"),
        ("certs-example/ca.key", b"secret\n"),
        ("examples/httpd.htpasswd", b"mark:$2y$\n"),
        (".git/HEAD", b"ref: refs/heads/main\n"),
        ("deploy/Dockerfile", b"FROM scratch\nCOPY . /context/\n"),
    ];
    for (name, data) in files {
        let path = context.join(name);
        fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        fs::write(&path, data).expect("write");
    }
    for ignore in [".dockerignore", "deploy/Dockerfile.dockerignore"] {
        let from = repo().join(ignore);
        if from.is_file() {
            fs::copy(&from, context.join(ignore)).expect("copy dockerignore");
        }
    }

    let mut containerd = common::containerd::Containerd::start(&tmp.path().join("containerd"));
    let docker = common::docker::Docker::start(&tmp.path().join("docker"), &mut containerd);
    let cfg = tmp.path().join("docker-config");
    let context_arg = context.display().to_string();
    let dockerfile = context.join("deploy/Dockerfile").display().to_string();
    for (builder, buildkit) in [("classic builder", "0"), ("BuildKit", "1")] {
        let tag = format!("first-hour-context:buildkit{buildkit}");
        let built = docker.cli_with_env(
            &cfg,
            &[("DOCKER_BUILDKIT", buildkit)],
            &["build", "-f", &dockerfile, "-t", &tag, &context_arg],
            None,
        );
        assert!(
            built.success(),
            "docker build ({builder}): {}",
            built.describe()
        );
        let name = format!("context-{buildkit}");
        let created = docker.cli(&cfg, &["create", "--name", &name, &tag, "/none"], None);
        assert!(created.success(), "{}", created.describe());
        let tar = tmp.path().join(format!("{name}.tar"));
        let exported = docker.cli(
            &cfg,
            &["export", "-o", tar.to_str().expect("utf-8"), &name],
            None,
        );
        assert!(exported.success(), "{}", exported.describe());
        let listed = common::command("tar", "tar")
            .arg("-tf")
            .arg(&tar)
            .output()
            .expect("run tar");
        let listing = String::from_utf8_lossy(&listed.stdout);
        let sent: Vec<&str> = listing
            .lines()
            .filter_map(|l| l.strip_prefix("context/"))
            .filter(|l| !l.is_empty())
            .collect();
        for wanted in [
            "Cargo.toml",
            "Cargo.lock",
            "src/main.rs",
            "src/registry/mod.rs",
        ] {
            assert!(
                sent.contains(&wanted),
                "{builder}: the build needs {wanted}; the context had {sent:?}"
            );
        }
        for kept_out in [
            "target",
            "registry-data",
            "certs-example",
            "examples",
            ".git",
        ] {
            assert!(
                !sent.iter().any(|s| s.starts_with(kept_out)),
                "{builder}: {kept_out}/ was sent as build context: {sent:?}"
            );
        }
    }
}

#[test]
fn the_unit_has_no_state_directory_and_the_all_in_one_drop_in_does() {
    require_systemd_analyze();
    // Active settings of a unit file: key → values, comments left out.
    let settings = |text: &str, key: &str| -> Vec<String> {
        text.lines()
            .map(str::trim)
            .filter(|l| !l.starts_with('#') && !l.starts_with(';'))
            .filter_map(|l| l.split_once('='))
            .filter(|(k, _)| k.trim() == key)
            .map(|(_, v)| v.trim().to_owned())
            .collect()
    };
    let unit = fs::read_to_string(repo().join("deploy/registry-gate.service")).expect("read unit");
    assert_eq!(
        settings(&unit, "StateDirectory"),
        Vec::<String>::new(),
        "in front mode the unit must not create or chown /var/lib/registry"
    );
    let drop_in_path = repo().join("deploy/registry-gate.service.d/all-in-one.conf");
    let drop_in = fs::read_to_string(&drop_in_path).expect("read the all-in-one drop-in");
    assert_eq!(settings(&drop_in, "StateDirectory"), ["registry"]);
    assert_eq!(settings(&drop_in, "StateDirectoryMode"), ["0750"]);

    // systemd-analyze verify reads the drop-in beside a unit; a deliberately broken
    // copy proves that it does, then the shipped one passes without a warning.
    let tmp = tempfile::tempdir().expect("tempdir");
    let path = tmp.path().join("registry-gate.service");
    fs::write(&path, unit.replace("/usr/local/bin/registry-gate", BIN)).expect("write");
    let dir = tmp.path().join("registry-gate.service.d");
    fs::create_dir_all(&dir).expect("mkdir");
    let verify = || verify_unit(&path);
    fs::write(
        dir.join("all-in-one.conf"),
        format!("{drop_in}\nNoSuchSetting=1\n"),
    )
    .expect("write");
    let (_, stderr) = verify();
    assert!(
        stderr.contains("all-in-one.conf") && stderr.contains("NoSuchSetting"),
        "systemd-analyze verify did not read the drop-in:\n{stderr}"
    );
    fs::write(dir.join("all-in-one.conf"), &drop_in).expect("write");
    let (ok, stderr) = verify();
    assert!(
        ok,
        "systemd-analyze verify with the drop-in failed:\n{stderr}"
    );
    assert_no_unit_warnings(&stderr);
}
