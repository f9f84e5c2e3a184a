//! Faults around the gate: an upstream that refuses connections, hangs, resets in
//! the middle of an answer or speaks something that is not HTTP — each gives the
//! client a prompt 502/504 OCI error (or a download that visibly fails, never one that
//! looks complete), and the gate serves again by itself once the upstream is healthy;
//! certificate and password files deleted or emptied while it serves.
//!
//! The misbehaving upstream is a tiny TCP server of the test's own on 127.0.0.1.
//! (`proxy.rs` stops and restarts the real registry; `tls.rs` and `password_files.rs`
//! write garbage over the files; `registry.rs` fills the disk.)

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::BodyExt as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

use common::client::{Client, Resp, empty};
use common::gate::{Gate, GateOptions, bcrypt_line};
use common::pki::{Ca, KeyAlg, KeyEncoding};
use common::upstream::free_loopback_port;
use common::{PUSHER, Stack, VIEWER, WATCH_INTERVAL_MS, eventually, init_tracing};

/// What the fake upstream does with the next connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Answers every request with a small JSON tag list, keep-alive.
    Healthy,
    /// Accepts, reads the request, never answers.
    Hang,
    /// Sends a 200 head announcing 1 MiB, 1000 bytes of it, then resets (RST).
    ResetMidBody,
    /// The same with a chunked body: one chunk, then a reset.
    ResetMidChunks,
    /// Sends half a status line, then resets.
    ResetMidHead,
    /// Answers with bytes that are not HTTP, then closes.
    Garbage,
    /// Closes right after reading the request, without a byte.
    CloseSilently,
    /// Answers like `Healthy`, then closes the connection once it has been idle for
    /// 100 ms (a keep-alive timeout, as Go's and nginx's servers have).
    CloseWhenIdle,
}

/// A loopback TCP server whose behaviour the test switches.
struct FakeUpstream {
    addr: SocketAddr,
    mode: Arc<Mutex<Mode>>,
    /// Connections accepted so far.
    accepted: Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

const HEALTHY_BODY: &[u8] = br#"{"name":"fault/app","tags":["v1"]}"#;

impl FakeUpstream {
    async fn start(mode: Mode) -> FakeUpstream {
        FakeUpstream::start_on(free_loopback_port(), mode).await
    }

    async fn start_on(addr: SocketAddr, mode: Mode) -> FakeUpstream {
        let listener = TcpListener::bind(addr)
            .await
            .expect("bind the fake upstream");
        let mode = Arc::new(Mutex::new(mode));
        let shared = mode.clone();
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = accepted.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let mode = shared.clone();
                tokio::spawn(async move { serve(stream, mode).await });
            }
        });
        FakeUpstream {
            addr,
            mode,
            accepted,
            task,
        }
    }

    fn set(&self, mode: Mode) {
        *self.mode.lock().expect("mode lock") = mode;
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn accepted(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Read one request head (the gate's requests here have no body).
async fn read_head(stream: &mut TcpStream) -> bool {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    true
}

fn reset(stream: TcpStream) {
    // SO_LINGER 0: close sends RST instead of FIN.
    let _ = stream.set_zero_linger();
    drop(stream);
}

async fn serve(mut stream: TcpStream, mode: Arc<Mutex<Mode>>) {
    let mut close_when_idle = false;
    loop {
        if close_when_idle {
            match tokio::time::timeout(Duration::from_millis(100), read_head(&mut stream)).await {
                Ok(true) => {}
                Ok(false) | Err(_) => return,
            }
        } else if !read_head(&mut stream).await {
            return;
        }
        let current = *mode.lock().expect("mode lock");
        close_when_idle = current == Mode::CloseWhenIdle;
        match current {
            Mode::Healthy | Mode::CloseWhenIdle => {
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                    HEALTHY_BODY.len()
                );
                if stream.write_all(head.as_bytes()).await.is_err()
                    || stream.write_all(HEALTHY_BODY).await.is_err()
                {
                    return;
                }
            }
            Mode::Hang => {
                // Hold the connection until the gate gives up on it.
                let mut buf = [0u8; 1024];
                while matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {}
                return;
            }
            Mode::ResetMidBody => {
                let _ = stream
                    .write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n\
                          Content-Length: 1048576\r\n\r\n",
                    )
                    .await;
                let _ = stream.write_all(&[7u8; 1000]).await;
                let _ = stream.flush().await;
                tokio::time::sleep(Duration::from_millis(100)).await;
                return reset(stream);
            }
            Mode::ResetMidChunks => {
                let _ = stream
                    .write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n\
                          Transfer-Encoding: chunked\r\n\r\n3e8\r\n",
                    )
                    .await;
                let _ = stream.write_all(&[7u8; 1000]).await;
                let _ = stream.write_all(b"\r\n").await;
                let _ = stream.flush().await;
                tokio::time::sleep(Duration::from_millis(100)).await;
                return reset(stream);
            }
            Mode::ResetMidHead => {
                let _ = stream.write_all(b"HTTP/1.1 20").await;
                let _ = stream.flush().await;
                return reset(stream);
            }
            Mode::Garbage => {
                let _ = stream
                    .write_all(b"SSH-2.0-OpenSSH_9.2\r\n\x00\x01\x02 not http at all\r\n\r\n")
                    .await;
                return;
            }
            Mode::CloseSilently => return,
        }
    }
}

/// The gate in front of `upstream_url`, with a short response timeout.
struct Setup {
    _dir: tempfile::TempDir,
    ca: Ca,
    gate: Gate,
}

impl Setup {
    async fn start(upstream_url: String) -> Setup {
        Setup::start_with(
            upstream_url,
            "connect_timeout_secs = 2\nresponse_timeout_secs = 2\nheader_timeout_secs = 2\n",
        )
        .await
    }

    /// With these lines in `[upstream]`.
    async fn start_with(upstream_url: String, extra_upstream: &str) -> Setup {
        init_tracing();
        let dir = tempfile::Builder::new()
            .prefix("registry-gate-faults")
            .tempdir()
            .expect("tempdir");
        let ca = Ca::new(&dir.path().join("ca"), "faults CA", KeyAlg::EcP256);
        let leaf = ca.issue("localhost", KeyAlg::EcP256, KeyEncoding::Pkcs8);
        let gate = Gate::start(
            &dir.path().join("gate"),
            GateOptions {
                upstream_url,
                extra_upstream: extra_upstream.into(),
                ..GateOptions::new(&leaf)
            },
        )
        .await;
        Setup {
            _dir: dir,
            ca,
            gate,
        }
    }

    fn client(&self) -> Client {
        Client::new(self.gate.addr, &[&self.ca.cert])
    }
}

/// A fault answered as an OCI error with `status`, within `within`.
async fn assert_prompt_error(client: &Client, status: u16, within: Duration, what: &str) -> Resp {
    let started = Instant::now();
    let resp = client.get("/v2/fault/app/tags/list").await;
    let elapsed = started.elapsed();
    let codes = resp.assert_oci_error(status);
    assert_eq!(codes, ["UNAVAILABLE"], "{what}: {}", resp.text());
    resp.assert_api_version_once(what);
    println!("{what}: {status} in {elapsed:?}");
    assert!(
        elapsed < within,
        "{what}: the {status} took {elapsed:?}, more than {within:?}"
    );
    resp
}

/// The gate answers through the healthy upstream again, by itself.
async fn assert_recovers(client: &Client, what: &str) {
    eventually(&format!("the gate to serve again after {what}"), || async {
        let resp = client
            .try_request("GET", "/v2/fault/app/tags/list", &[], empty())
            .await;
        resp.ok()
            .filter(|r| r.status == 200 && r.body.as_ref() == HEALTHY_BODY)
            .map(|_| ())
    })
    .await;
    // And stays so: no stale pooled connection is handed out.
    for client in [client.clone(), client.http2()] {
        for _ in 0..3 {
            let resp = client.get("/v2/fault/app/tags/list").await;
            assert_eq!(resp.status, 200, "after {what}: {}", resp.text());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_connections_are_reused_and_one_the_upstream_closed_is_not() {
    let upstream = FakeUpstream::start(Mode::Healthy).await;
    let setup = Setup::start(upstream.url()).await;
    let client = setup.client();
    for _ in 0..20 {
        let resp = client.get("/v2/fault/app/tags/list").await;
        assert_eq!(resp.status, 200, "{}", resp.text());
        assert_eq!(resp.body.as_ref(), HEALTHY_BODY);
    }
    // The gate's own readiness probe may have opened one more.
    assert!(
        upstream.accepted() <= 2,
        "20 requests one after the other took {} upstream connections",
        upstream.accepted()
    );
    // Now the upstream closes every connection after 100 ms idle: each request
    // finds its pooled connection closed and must not fail for it.
    upstream.set(Mode::CloseWhenIdle);
    let _ = client.get("/v2/fault/app/tags/list").await;
    let before = upstream.accepted();
    for c in [client.clone(), client.http2()] {
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let resp = c.get("/v2/fault/app/tags/list").await;
            assert_eq!(
                resp.status,
                200,
                "a request after the upstream closed the idle connection: {}",
                resp.text()
            );
            assert_eq!(resp.body.as_ref(), HEALTHY_BODY);
        }
    }
    assert!(
        upstream.accepted() >= before + 10,
        "each request after an idle close needs a new connection: {} then {}",
        before,
        upstream.accepted()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_refuses_connections_gives_502_then_service_resumes() {
    // Nothing listens on the configured port yet.
    let port = free_loopback_port();
    let setup = Setup::start(format!("http://{port}")).await;
    let client = setup.client();
    for c in [client.clone(), client.http2()] {
        let resp = assert_prompt_error(&c, 502, Duration::from_secs(5), "connection refused").await;
        assert!(
            resp.text().contains(&port.to_string()),
            "the 502 names the upstream: {}",
            resp.text()
        );
    }
    let upstream = FakeUpstream::start_on(port, Mode::Healthy).await;
    assert_recovers(&client, "the upstream started listening").await;
    drop(upstream);
    setup.gate.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_hangs_gives_504_after_the_response_timeout() {
    let upstream = FakeUpstream::start(Mode::Hang).await;
    let setup = Setup::start(upstream.url()).await;
    let client = setup.client();
    // header_timeout_secs = 2: the 504 comes after about that, not never.
    for c in [client.clone(), client.http2()] {
        let started = Instant::now();
        assert_prompt_error(&c, 504, Duration::from_secs(10), "hanging upstream").await;
        assert!(
            started.elapsed() >= Duration::from_millis(1500),
            "a 504 before the response timeout ran out"
        );
    }
    // Several at once: each waits its own timeout, none blocks the others.
    let started = Instant::now();
    let waits: Vec<_> = (0..8)
        .map(|_| {
            let c = client.clone();
            tokio::spawn(async move { c.get("/v2/fault/app/tags/list").await.status })
        })
        .collect();
    for w in waits {
        assert_eq!(w.await.expect("join"), 504);
    }
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "8 concurrent requests to a hanging upstream took {:?}",
        started.elapsed()
    );
    upstream.set(Mode::Healthy);
    assert_recovers(&client, "the upstream hung").await;
    setup.gate.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_upstream_answers_small_requests_after_the_header_timeout() {
    // Uploads may wait two minutes for their answer; a tags list, a manifest or the
    // version check gets its 504 after header_timeout_secs (1 s here).
    let upstream = FakeUpstream::start(Mode::Hang).await;
    let setup = Setup::start_with(
        upstream.url(),
        "response_timeout_secs = 120\nheader_timeout_secs = 1\n",
    )
    .await;
    let client = setup.client();
    for c in [client.clone(), client.http2()] {
        let resp = assert_prompt_error(&c, 504, Duration::from_secs(20), "hanging upstream").await;
        assert!(
            resp.text()
                .contains("within 1 s (upstream.header_timeout_secs)"),
            "the 504 names the setting: {}",
            resp.text()
        );
    }
    upstream.set(Mode::Healthy);
    assert_recovers(&client, "the upstream hung").await;
    setup.gate.stop().await;
}

/// Download `/v2/fault/app/blobs/…`: `Ok(bytes)` when the body ended cleanly,
/// `Err(bytes received)` when it failed.
async fn download(client: &Client) -> Result<usize, usize> {
    let resp = client
        .send(
            "GET",
            "/v2/fault/app/blobs/sha256:0000000000000000000000000000000000000000000000000000000000000000",
            &[],
            empty(),
        )
        .await;
    assert_eq!(resp.status(), 200, "the upstream's head is passed on");
    let mut body = resp.into_body();
    let mut received = 0;
    loop {
        match tokio::time::timeout(Duration::from_secs(30), body.frame()).await {
            Err(_) => panic!("the download neither ended nor failed within 30 s"),
            Ok(None) => return Ok(received),
            Ok(Some(Err(_))) => return Err(received),
            Ok(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    received += data.len();
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_reset_mid_body_fails_the_download_visibly() {
    let upstream = FakeUpstream::start(Mode::ResetMidBody).await;
    let setup = Setup::start(upstream.url()).await;
    let client = setup.client();
    for mode in [Mode::ResetMidBody, Mode::ResetMidChunks] {
        upstream.set(mode);
        for c in [client.clone(), client.http2()] {
            let started = Instant::now();
            let outcome = download(&c).await;
            println!(
                "{mode:?} over {:?}: {outcome:?} in {:?}",
                c.protocol(),
                started.elapsed()
            );
            // The client must see the failure: a body that ends cleanly after 1000
            // bytes would pass for a whole (short) blob.
            assert!(
                outcome.is_err(),
                "{mode:?} over {:?}: the download ended cleanly after {:?} bytes",
                c.protocol(),
                outcome
            );
        }
    }
    // Reset before the head is complete: nothing to pass on, so a 502.
    upstream.set(Mode::ResetMidHead);
    for c in [client.clone(), client.http2()] {
        assert_prompt_error(&c, 502, Duration::from_secs(5), "reset mid-head").await;
    }
    upstream.set(Mode::Healthy);
    assert_recovers(&client, "resets").await;
    setup.gate.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_speaking_garbage_gives_502_promptly() {
    let upstream = FakeUpstream::start(Mode::Garbage).await;
    let setup = Setup::start(upstream.url()).await;
    let client = setup.client();
    for mode in [Mode::Garbage, Mode::CloseSilently] {
        upstream.set(mode);
        for c in [client.clone(), client.http2()] {
            assert_prompt_error(&c, 502, Duration::from_secs(5), &format!("{mode:?}")).await;
        }
    }
    upstream.set(Mode::Healthy);
    assert_recovers(&client, "garbage").await;
    // And back to garbage: a pooled connection that was healthy is not trusted blindly.
    upstream.set(Mode::Garbage);
    assert_prompt_error(&client, 502, Duration::from_secs(5), "garbage again").await;
    setup.gate.stop().await;
}

// ---------------------------------------------------------------------------
// files deleted or emptied while the gate serves

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_certificate_and_key_files_keep_the_old_pair_serving() {
    let stack = Stack::start().await;
    let files = &stack.gate.files;
    let client = stack.client();
    for (what, paths) in [
        ("the key file", vec![&files.private_key]),
        ("both files", vec![&files.certificate, &files.private_key]),
    ] {
        for p in &paths {
            std::fs::remove_file(p).expect("remove");
        }
        // Nothing to poll for: the gate must go on as it was. Give the watcher
        // many rounds to (wrongly) act.
        tokio::time::sleep(Duration::from_millis(WATCH_INTERVAL_MS * 10)).await;
        assert_eq!(
            client.peer_certificate().await,
            stack.leaf.der,
            "after {what} were deleted, new connections get the old certificate"
        );
        let resp = client.get("/v2/deleted/app/tags/list").await;
        assert_eq!(resp.status, 404, "after deleting {what}: {}", resp.text());
        std::fs::write(&files.certificate, stack.leaf.chain_pem()).expect("restore");
        std::fs::write(&files.private_key, stack.leaf.key_pem()).expect("restore");
    }
    // The watcher is alive: a new pair is taken.
    let other = stack
        .ca
        .issue("localhost", KeyAlg::EcP256, KeyEncoding::Pkcs8);
    common::replace_file(&files.private_key, &other.key_pem());
    common::replace_file(&files.certificate, &other.chain_pem());
    eventually("the new pair to be served", || async {
        (client.try_peer_certificate().await.ok()? == other.der).then_some(())
    })
    .await;
    stack.gate.stop().await;
}

async fn start_upload(client: &Client) -> u16 {
    client
        .request("POST", "/v2/deleted/app/blobs/uploads/", &[], empty())
        .await
        .status
        .as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_password_and_group_files_keep_the_old_users_serving() {
    let stack = Stack::start().await;
    let gate = &stack.gate;
    let files = &gate.files;
    // Users checked for the first time only after the deletion, so no cached
    // check stands in for the file.
    let users: Vec<(String, String)> = (0..4)
        .map(|i| (format!("late{i}"), format!("late-password-{i}")))
        .collect();
    let mut htpasswd = bcrypt_line(PUSHER.0, PUSHER.1) + &bcrypt_line(VIEWER.0, VIEWER.1);
    for (u, p) in &users {
        htpasswd.push_str(&bcrypt_line(u, p));
    }
    let names: Vec<&str> = users.iter().map(|(u, _)| u.as_str()).collect();
    gate.write_groups(&format!("pusher: {} {}\n", PUSHER.0, names.join(" ")));
    gate.write_htpasswd(&htpasswd);
    let probe = stack.client().with_basic(&users[0].0, &users[0].1);
    eventually("the extended files to be loaded", || async {
        (start_upload(&probe).await == 202).then_some(())
    })
    .await;

    let cases = [
        ("the htpasswd file", vec![&files.htpasswd]),
        ("the group file", vec![&files.groups]),
        ("both files", vec![&files.htpasswd, &files.groups]),
    ];
    for (i, (what, paths)) in cases.iter().enumerate() {
        for p in paths {
            std::fs::remove_file(p).expect("remove");
        }
        tokio::time::sleep(Duration::from_millis(WATCH_INTERVAL_MS * 10)).await;
        let (u, p) = &users[i + 1];
        let fresh = stack.client().with_basic(u, p);
        assert_eq!(
            start_upload(&fresh).await,
            202,
            "after {what} was deleted, {u} (never checked before) still pushes"
        );
        assert_eq!(start_upload(&stack.viewer()).await, 403, "after {what}");
        let wrong = stack.client().with_basic(PUSHER.0, "wrong");
        assert_eq!(start_upload(&wrong).await, 401, "after {what}");
        gate.write_htpasswd(&htpasswd);
        gate.write_groups(&format!("pusher: {} {}\n", PUSHER.0, names.join(" ")));
    }
    // The watcher is alive: a changed file is taken.
    gate.write_groups(&format!("pusher: {}\n", PUSHER.0));
    eventually("a group change after the deletions", || async {
        (start_upload(&probe).await == 403).then_some(())
    })
    .await;
    stack.gate.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_emptied_password_file_keeps_the_old_users_but_a_deliberate_one_removes_them() {
    // An emptied htpasswd is a broken write (a truncation, a half-done deploy): the
    // users there were keep working, as for garbage. Removing everybody on purpose
    // leaves a comment line, as `registry-gate user del` does for the last user.
    let stack = Stack::start().await;
    let gate = &stack.gate;
    assert_eq!(start_upload(&stack.pusher()).await, 202);
    for emptied in ["", "\n  \n"] {
        gate.write_htpasswd(emptied);
        // Nothing to poll for: give the watcher many rounds to (wrongly) act, then
        // check with a password not yet in the cache (a new password line would change
        // the file again, so check the old user with a fresh connection instead).
        tokio::time::sleep(Duration::from_millis(WATCH_INTERVAL_MS * 10)).await;
        assert_eq!(
            start_upload(&stack.pusher()).await,
            202,
            "after the password file was emptied ({emptied:?}), the pusher still pushes"
        );
    }
    gate.write_htpasswd(&format!("{}\n", registry_gate::users::NO_USERS_COMMENT));
    eventually("a password file with no users to be taken", || async {
        (start_upload(&stack.pusher()).await == 401).then_some(())
    })
    .await;
    let resp = stack.client().get("/v2/deleted/app/tags/list").await;
    assert_eq!(resp.status, 404, "anonymous reads go on: {}", resp.text());
    gate.write_htpasswd(&bcrypt_line(PUSHER.0, PUSHER.1));
    eventually("the restored password file to be taken", || async {
        (start_upload(&stack.pusher()).await == 202).then_some(())
    })
    .await;
    stack.gate.stop().await;
}
