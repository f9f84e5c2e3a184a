//! The `registry-gate` binary itself, as an operator runs it: `serve` on a port of
//! its configuration, a push and a pull through it, SIGTERM while a download is in
//! flight (the download finishes, the process exits 0), no secret in its output;
//! `check-config` on good and bad files; and `healthcheck` against a gate that serves
//! (exit 0), nothing listening, a port that never answers and a `/readyz` that says
//! no (exit 1, one line saying why).

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine as _;

use common::client::{Client, empty, read_at_least, read_rest};
use common::image::{UploadMode, pull_and_verify, push_image, upload_blob};
use common::upstream::free_loopback_port;
use common::{PUSHER, Stack, command, eventually, pseudo_random_bytes};

const BINARY: &str = env!("CARGO_BIN_EXE_registry-gate");

/// The stack's gate configuration, listening on `listen` instead of port 0, with
/// `extra_upstream` lines added to `[upstream]`.
fn config_for_binary(stack: &Stack, listen: std::net::SocketAddr, extra_upstream: &str) -> String {
    let config = std::fs::read_to_string(&stack.gate.files.config).expect("read config");
    assert!(config.contains("listen = \"127.0.0.1:0\""), "{config}");
    config
        .replace(
            "listen = \"127.0.0.1:0\"",
            &format!("listen = \"{listen}\""),
        )
        .replace("[upstream]\n", &format!("[upstream]\n{extra_upstream}"))
}

/// `registry-gate serve --config CONFIG`, its output (both streams) into `log`.
fn spawn_serve(config: &std::path::Path, log: &std::path::Path) -> Child {
    let log_file = std::fs::File::create(log).expect("create log");
    Command::new(BINARY)
        .args(["serve", "--config"])
        .arg(config)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().expect("clone log"))
        .stderr(log_file)
        .spawn()
        .expect("start registry-gate serve")
}

struct Running {
    child: Option<Child>,
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The listener's accept queue is deep enough for a burst of a thousand new
/// clients: with tokio's default (1024) such a burst overflowed it and dropped SYNs
/// cost clients a 1 s retransmit each (the benchmark's full-handshake runs).
fn assert_listen_backlog(listen: std::net::SocketAddr) {
    let somaxconn: u32 = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .expect("read net.core.somaxconn")
        .trim()
        .parse()
        .expect("somaxconn is a number");
    let out = command("ss", "iproute2")
        .args(["-Hltn", &format!("sport = :{}", listen.port())])
        .output()
        .expect("run ss");
    let text = String::from_utf8_lossy(&out.stdout);
    // State Recv-Q Send-Q Local Peer; for a listener Send-Q is the backlog.
    let backlog: u32 = text
        .split_whitespace()
        .nth(2)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no listener on {listen} in `ss -ltn`: {text}"));
    assert_eq!(backlog, somaxconn.min(4096), "listen backlog: {text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_serves_and_exits_0_on_sigterm_after_draining() {
    let stack = Stack::start().await;
    let listen = free_loopback_port();
    let config = stack.path("binary.toml");
    std::fs::write(&config, config_for_binary(&stack, listen, "")).expect("write config");
    let log = stack.path("binary.log");
    let child = spawn_serve(&config, &log);
    let mut running = Running { child: Some(child) };
    let pid = running.child.as_ref().expect("child").id();

    let client = Client::new(listen, &[&stack.ca.cert]);
    eventually("the binary to accept TLS connections", || async {
        client.try_peer_certificate().await.ok()
    })
    .await;
    assert_listen_backlog(listen);
    // A client that names the server by IP address in SNI (wrk, openssl s_client,
    // some scripts; RFC 6066 forbids it): served, and no warning per connection.
    let sni = command("openssl", "openssl")
        .args(["s_client", "-connect", &listen.to_string()])
        .args(["-servername", "127.0.0.1", "-CAfile"])
        .arg(&stack.ca.cert)
        .stdin(Stdio::null())
        .output()
        .expect("run openssl s_client");
    let sni_out = String::from_utf8_lossy(&sni.stdout);
    assert!(
        sni_out.contains("Verify return code: 0 (ok)"),
        "openssl s_client with an IP address as SNI:\n{sni_out}{}",
        String::from_utf8_lossy(&sni.stderr)
    );
    let pusher = client.with_basic(PUSHER.0, PUSHER.1);
    let image = push_image(
        &pusher,
        "binary/app",
        "v1",
        &[
            pseudo_random_bytes(10_000, 1),
            pseudo_random_bytes(20_000, 2),
        ],
        UploadMode::Chunked(4096),
    )
    .await;
    pull_and_verify(&client, "binary/app", "v1", &image).await;
    let deleted = pusher
        .request(
            "DELETE",
            &format!("/v2/binary/app/manifests/{}", image.manifest_digest),
            &[],
            empty(),
        )
        .await;
    assert_eq!(deleted.status.as_u16(), 202, "{}", deleted.text());
    let missing = format!("/v2/binary/app/blobs/sha256:{}", "0".repeat(64));
    let head = client.request("HEAD", &missing, &[], empty()).await;
    assert_eq!(head.status.as_u16(), 404);

    // A download in flight when SIGTERM arrives.
    let blob = pseudo_random_bytes(8 * 1024 * 1024 + 1, 3);
    let digest = upload_blob(&pusher, "binary/app", &blob, UploadMode::Monolithic).await;
    let response = client
        .send(
            "GET",
            &format!("/v2/binary/app/blobs/{digest}"),
            &[],
            empty(),
        )
        .await;
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let mut received = read_at_least(&mut body, 256 * 1024).await;
    let status = command("kill", "procps")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success());
    read_rest(&mut body, &mut received, "after SIGTERM").await;
    assert_eq!(received.len(), blob.len());
    assert_eq!(common::sha256_digest(&received), digest);

    let mut child = running.child.take().expect("child");
    let exit = tokio::task::spawn_blocking(move || {
        let start = std::time::Instant::now();
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return Some(status);
            }
            if start.elapsed() > Duration::from_secs(60) {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    })
    .await
    .expect("wait task");
    let output = std::fs::read_to_string(&log).expect("read log");
    let status = exit.unwrap_or_else(|| panic!("no exit within 60 s of SIGTERM:\n{output}"));
    assert!(
        status.success(),
        "exit status after SIGTERM: {status}\n{output}"
    );
    assert!(
        output.contains("binary/app"),
        "the binary should log its requests:\n{output}"
    );
    assert!(
        !output.contains("Illegal SNI"),
        "rustls's warning about a client's SNI is in the log:\n{output}"
    );
    // A HEAD that was answered is complete (HTTP/1.1 too).
    assert!(
        output.lines().any(|l| l.contains("method=HEAD")
            && l.contains("status=404")
            && l.contains("complete=true")),
        "the HEAD's access line:\n{output}"
    );
    // At start: the certificate, who is there and who may push; a warning for the
    // MD5 entry.
    assert!(
        output.contains("certificate CN=localhost SANs=localhost"),
        "the certificate summary:\n{output}"
    );
    assert!(
        output.contains("2 user(s) loaded; 1 may push (pusher: mark)"),
        "the start-up summary:\n{output}"
    );
    assert!(
        output.lines().any(|l| l.contains("WARN")
            && l.contains("vera's password is stored as Apache MD5 ($apr1$)")
            && l.contains("registry-gate user passwd vera")),
        "a warning for the MD5 entry:\n{output}"
    );
    // The audit lines: who did what to which digest, from where.
    let audit = |words: &str| {
        output.lines().any(|l| {
            l.contains("registry_gate::audit")
                && l.contains(words)
                && l.contains(&format!("user={}", PUSHER.0))
                && l.contains(&image.manifest_digest)
                && l.contains("peer=127.0.0.1:")
        })
    };
    assert!(
        audit("push manifest binary/app:v1"),
        "an audit line for the push:\n{output}"
    );
    assert!(
        audit(&format!(
            "delete manifest binary/app@{}",
            image.manifest_digest
        )),
        "an audit line for the delete:\n{output}"
    );
    let encoded =
        base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", PUSHER.0, PUSHER.1));
    for secret in [PUSHER.1, encoded.as_str()] {
        assert!(
            !output.contains(secret),
            "a secret ({secret}) is in the gate's output:\n{output}"
        );
    }
    assert!(
        !output.to_lowercase().contains("authorization: basic"),
        "an Authorization header is in the gate's output:\n{output}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_prints_the_effective_configuration_and_refuses_typos() {
    let stack = Stack::start().await;
    let listen = free_loopback_port();
    let good = stack.path("check.toml");
    std::fs::write(
        &good,
        config_for_binary(
            &stack,
            listen,
            "username = \"gate-service\"\npassword = \"upstream-secret-xyz\"\n",
        ),
    )
    .expect("write config");
    let output = Command::new(BINARY)
        .args(["check-config", "--config"])
        .arg(&good)
        .output()
        .expect("run check-config");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}{stderr}");
    // After the effective config: the certificate and the accounts in one line each.
    assert!(
        stderr.contains("certificate CN=localhost SANs=localhost")
            && stderr.contains("2 user(s) loaded; 1 may push (pusher: mark)")
            && stderr.contains("warning: user vera's password is stored as Apache MD5"),
        "check-config's summary:\n{stderr}"
    );
    assert!(
        stdout.contains(&stack.upstream.url()),
        "the effective configuration names the upstream:\n{stdout}"
    );
    assert!(stdout.contains(&listen.to_string()), "{stdout}");
    assert!(
        !stdout.contains("upstream-secret-xyz") && !stderr.contains("upstream-secret-xyz"),
        "check-config printed the upstream password:\n{stdout}{stderr}"
    );

    for (what, text, key) in [
        (
            "a misspelt key",
            std::fs::read_to_string(&good)
                .expect("read")
                .replace("push_group", "push_gruop"),
            "push_gruop",
        ),
        (
            "a missing htpasswd file",
            std::fs::read_to_string(&good)
                .expect("read")
                .replace("httpd.htpasswd", "missing.htpasswd"),
            "auth.htpasswd",
        ),
    ] {
        let bad = stack.path("bad.toml");
        std::fs::write(&bad, text).expect("write bad config");
        let output = Command::new(BINARY)
            .args(["check-config", "--config"])
            .arg(&bad)
            .output()
            .expect("run check-config");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{what} was accepted");
        assert!(
            stderr.contains(key),
            "{what}: the message names {key}: {stderr}"
        );
        // And `serve` refuses it before listening (and does not keep running).
        let mut child = Command::new(BINARY)
            .args(["serve", "--config"])
            .arg(&bad)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("run serve");
        let start = std::time::Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait") {
                break Some(status);
            }
            if start.elapsed() > Duration::from_secs(30) {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(
            matches!(status, Some(s) if !s.success()),
            "serve with {what}: {status:?} (None: still running after 30 s)"
        );
    }
    stack.gate.stop().await;
}

/// A renewal that writes the certificate, then the key, is a warning that resolves;
/// a mismatch that stays is an error naming both configuration keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_done_renewal_warns_and_a_lasting_mismatch_is_an_error() {
    use common::pki::{Ca, KeyAlg, KeyEncoding};
    let stack = Stack::start().await;
    let listen = free_loopback_port();
    let config = stack.path("renewal.toml");
    std::fs::write(&config, config_for_binary(&stack, listen, "")).expect("write config");
    let log = stack.path("renewal.log");
    let child = spawn_serve(&config, &log);
    let _running = Running { child: Some(child) };
    let renewed = stack
        .ca
        .issue("localhost", KeyAlg::EcP256, KeyEncoding::Pkcs8);
    let client = Client::new(listen, &[&stack.ca.cert]);
    eventually("the binary to accept TLS connections", || async {
        client.try_peer_certificate().await.ok()
    })
    .await;
    let files = &stack.gate.files;
    // certbot's order: the chain first; the key 0.3 s later (the watcher looks every
    // 0.2 s and gives a mismatch 0.6 s to settle).
    common::replace_file(&files.certificate, &renewed.chain_pem());
    tokio::time::sleep(Duration::from_millis(300)).await;
    common::replace_file(&files.private_key, &renewed.key_pem());
    eventually("the renewed certificate to be served", || async {
        (client.try_peer_certificate().await.ok()? == renewed.der).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let output = std::fs::read_to_string(&log).expect("read log");
    assert!(
        output.lines().any(|l| l.contains("WARN")
            && l.contains("tls.certificate")
            && l.contains("tls.private_key")
            && l.contains("trying again")),
        "a warning for the half-done renewal:\n{output}"
    );
    assert!(
        !output.contains("ERROR"),
        "no error for a renewal that completed:\n{output}"
    );

    // A certificate whose key never comes: an error once the settle time is over.
    let other_ca = Ca::new(&stack.path("other-ca"), "other CA", KeyAlg::EcP256);
    let stray = other_ca.issue("localhost", KeyAlg::EcP256, KeyEncoding::Pkcs8);
    common::replace_file(&files.certificate, &stray.chain_pem());
    eventually("an error for the lasting mismatch", || async {
        let output = std::fs::read_to_string(&log).ok()?;
        output
            .lines()
            .any(|l| {
                l.contains("ERROR")
                    && l.contains("certificate reload refused")
                    && l.contains("do not belong together")
            })
            .then_some(())
    })
    .await;
    assert_eq!(
        client.peer_certificate().await,
        renewed.der,
        "the last good pair keeps serving"
    );
}

/// `registry-gate healthcheck --config CONFIG ARGS…`: exit code, stdout, stderr and
/// how long it took.
fn healthcheck(config: &std::path::Path, args: &[&str]) -> (Option<i32>, String, String, Duration) {
    let start = std::time::Instant::now();
    let out = tokio::task::block_in_place(|| {
        Command::new(BINARY)
            .args(["healthcheck", "--config"])
            .arg(config)
            .args(args)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .output()
            .expect("run registry-gate healthcheck")
    });
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        start.elapsed(),
    )
}

/// Exactly one line, starting with `prefix`.
fn assert_one_line(text: &str, prefix: &str, what: &str) {
    assert!(
        text.starts_with(prefix) && text.trim_end().lines().count() == 1,
        "{what}: expected one line starting {prefix:?}, got {text:?}"
    );
}

/// The stack's gate configuration with `listen` set to `listen` (the in-process gate
/// itself was bound to port 0; `healthcheck` only reads the addresses).
fn config_listening_on(
    stack: &Stack,
    listen: std::net::SocketAddr,
    name: &str,
) -> std::path::PathBuf {
    let path = stack.path(name);
    std::fs::write(&path, config_for_binary(stack, listen, "")).expect("write config");
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthcheck_without_admin_completes_a_tls_handshake_and_fails_with_a_reason() {
    let stack = Stack::start().await;

    // The gate serves: a TLS handshake with its port.
    let config = config_listening_on(&stack, stack.gate.addr, "serving.toml");
    let (code, stdout, stderr, _) = healthcheck(&config, &[]);
    assert_eq!(
        code,
        Some(0),
        "healthcheck against a serving gate: {stdout}{stderr}"
    );
    assert_one_line(
        &stdout,
        &format!("healthy: TLS handshake with {} completed", stack.gate.addr),
        "stdout",
    );

    // Nothing listens there.
    let nothing = free_loopback_port();
    let config = config_listening_on(&stack, nothing, "nothing.toml");
    let (code, stdout, stderr, _) = healthcheck(&config, &[]);
    assert_eq!(
        code,
        Some(1),
        "healthcheck with nothing listening: {stdout}{stderr}"
    );
    assert!(stdout.is_empty(), "{stdout}");
    assert_one_line(
        &stderr,
        &format!("registry-gate: unhealthy: nothing answers on {nothing} (listen)"),
        "stderr",
    );

    // A port that accepts connections (the kernel does, from the backlog) and never
    // says anything: the timeout gives up.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let silent_addr = silent.local_addr().expect("addr");
    let config = config_listening_on(&stack, silent_addr, "silent.toml");
    let (code, stdout, stderr, took) = healthcheck(&config, &["--timeout-secs", "1"]);
    assert_eq!(
        code,
        Some(1),
        "healthcheck against a silent port: {stdout}{stderr}"
    );
    assert_one_line(
        &stderr,
        &format!("registry-gate: unhealthy: no answer from the TLS port {silent_addr} within 1 s"),
        "stderr",
    );
    assert!(
        took < Duration::from_secs(10),
        "took {took:?} with a 1 s timeout"
    );
    drop(silent);

    // A configuration that cannot be read.
    let (code, _, stderr, _) = healthcheck(&stack.path("missing.toml"), &[]);
    assert_eq!(code, Some(1));
    assert_one_line(&stderr, "registry-gate: unhealthy: ", "stderr");
    stack.gate.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthcheck_with_admin_asks_readyz() {
    let admin = free_loopback_port();
    let mut stack = Stack::start_with(common::StackOptions {
        extra_tables: format!("[admin]\nlisten = \"{admin}\"\n"),
        ..common::StackOptions::default()
    })
    .await;
    let config = config_listening_on(&stack, stack.gate.addr, "admin.toml");
    let (code, stdout, stderr, _) = eventually("the admin listener to answer /readyz", || async {
        let result = healthcheck(&config, &[]);
        (result.0 == Some(0)).then_some(result)
    })
    .await;
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert_one_line(
        &stdout,
        &format!("healthy: /readyz on {admin}: ready"),
        "stdout",
    );

    // The upstream stops: /readyz says no, and so does the healthcheck, with the reason.
    stack.upstream.stop();
    let (code, stdout, stderr, _) = healthcheck(&config, &[]);
    assert_eq!(
        code,
        Some(1),
        "healthcheck with the upstream down: {stdout}{stderr}"
    );
    assert_one_line(
        &stderr,
        &format!(
            "registry-gate: unhealthy: /readyz on {admin} answered 503 Service Unavailable: not ready: "
        ),
        "stderr",
    );

    // The admin listener gone (the gate stopped): nothing answers there.
    stack.gate.stop().await;
    let (code, _, stderr, _) = healthcheck(&config, &[]);
    assert_eq!(code, Some(1));
    assert_one_line(
        &stderr,
        &format!("registry-gate: unhealthy: nothing answers on {admin} ([admin] listen)"),
        "stderr",
    );
}

/// A key the gate's user may not read: the message says who the gate runs as and
/// which group needs read access. (The tests run as root, so `check-config` runs as
/// `nobody` here, with `setpriv` from util-linux.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_key_names_the_user_and_the_group() {
    use std::os::unix::fs::PermissionsExt as _;
    let stack = Stack::start().await;
    let dir = stack.path("perm");
    std::fs::create_dir_all(&dir).expect("dir");
    let files = &stack.gate.files;
    for (from, name, mode) in [
        (&files.certificate, "fullchain.pem", 0o644),
        (&files.private_key, "privkey.pem", 0o600),
    ] {
        let to = dir.join(name);
        std::fs::copy(from, &to).expect("copy");
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(mode)).expect("chmod");
    }
    let config = dir.join("gate.toml");
    std::fs::write(
        &config,
        format!(
            "[tls]\ncertificate = {:?}\nprivate_key = {:?}\n[upstream]\nurl = \"http://127.0.0.1:5000\"\n",
            dir.join("fullchain.pem"),
            dir.join("privkey.pem")
        ),
    )
    .expect("config");
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    // Every directory on the way must be open to `nobody`.
    let mut p = dir.clone();
    loop {
        let _ = std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755));
        if p == stack.dir.path() || !p.pop() {
            break;
        }
    }
    let out = command("setpriv", "util-linux")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", BINARY])
        .args(["check-config", "--config"])
        .arg(&config)
        .output()
        .expect("run setpriv");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("tls.private_key")
            && stderr.contains("Permission denied")
            && stderr.contains("uid 65534")
            && stderr.contains("put that user in group root"),
        "the message names the key, the user and the group: {stderr}"
    );
}
