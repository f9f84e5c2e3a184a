//! Slow and many clients: 200 slowloris connections trickling their heads while
//! pulls go on, keep-alive connections left idle, the connection cap (the next
//! connection waits, and the log says so), and uploads cut off by the client.
//!
//! (`proxy.rs` cuts a head that stops arriving; `tls.rs` a handshake that never
//! finishes; `backpressure.rs` a client that stops reading.)

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use common::client::{Client, Resp, empty, full};
use common::image::{UploadMode, location_on_gate, pull_and_verify, push_image};
use common::registry::{AllInOne, stalling};
use common::wire::{host_header, read_until_closed_or_quiet};
use common::{
    DEADLINE, PUSHER, Stack, StackOptions, eventually, pseudo_random_bytes, sha256_digest,
};

// ---------------------------------------------------------------------------
// the gate's log, captured

/// Everything the in-process gates of this test binary logged, also passed on to the
/// test's captured output.
fn captured_logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let shared = buffer.clone();
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
        // Every test here calls this before it starts a gate, so this subscriber is
        // the one `init_tracing` finds already installed.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(false)
            .with_writer(move || Tee(shared.clone()))
            .try_init();
        buffer
    })
    .clone()
}

struct Tee(Arc<Mutex<Vec<u8>>>);

impl Write for Tee {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if let Ok(mut b) = self.0.lock() {
            b.extend_from_slice(data);
        }
        tracing_subscriber::fmt::TestWriter::new().write(data)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Every gate of this binary is started through these two, so the capturing
/// subscriber is installed before the first gate installs its own (the process has
/// one; whichever comes first wins, and a test that started a gate directly once left
/// the log-reading test blind in CI).
async fn start_stack(options: StackOptions) -> Stack {
    captured_logs();
    Stack::start_with(options).await
}

async fn start_all_in_one() -> AllInOne {
    captured_logs();
    AllInOne::start().await
}

fn log_lines_with(all: &[&str]) -> Vec<String> {
    let logs = captured_logs();
    let text = String::from_utf8_lossy(&logs.lock().expect("log lock")).into_owned();
    text.lines()
        .filter(|l| all.iter().all(|s| l.contains(s)))
        .map(str::to_owned)
        .collect()
}

// ---------------------------------------------------------------------------

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

/// One slowloris connection: a request head started, then a byte every `pace`,
/// until the gate closes the connection; returns how long it stayed open (`None`:
/// still open after `give_up`).
async fn slowloris(
    client: Client,
    i: usize,
    pace: Duration,
    give_up: Duration,
) -> Option<Duration> {
    let stream = client.try_connect(&[b"http/1.1"]).await.ok()?;
    let (mut reader, mut writer) = tokio::io::split(stream);
    let begun = Instant::now();
    let head = format!(
        "GET /v2/slow/app/tags/list HTTP/1.1\r\n{}X-Slow-{i}: ",
        host_header(&client)
    );
    if writer.write_all(head.as_bytes()).await.is_err() {
        return Some(begun.elapsed());
    }
    let mut buf = [0u8; 4096];
    loop {
        if begun.elapsed() > give_up {
            return None;
        }
        tokio::select! {
            read = reader.read(&mut buf) => match read {
                // A 408 may come first; the close is what counts.
                Ok(n) if n > 0 => continue,
                _ => return Some(begun.elapsed()),
            },
            _ = tokio::time::sleep(pace) => {
                if writer.write_all(b"a").await.is_err() || writer.flush().await.is_err() {
                    return Some(begun.elapsed());
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_connections_are_cut_and_pulls_go_on_meanwhile() {
    const SLOW: usize = 200;
    const HEADER_TIMEOUT: u64 = 5;
    let stack = start_stack(StackOptions {
        extra_server: format!("header_read_timeout_secs = {HEADER_TIMEOUT}\n"),
        ..StackOptions::default()
    })
    .await;
    let layers = vec![
        pseudo_random_bytes(200_000, 1),
        pseudo_random_bytes(50_000, 2),
    ];
    let image = push_image(
        &stack.pusher(),
        "slow/app",
        "v1",
        &layers,
        UploadMode::Monolithic,
    )
    .await;

    let started = Instant::now();
    let slow: Vec<_> = (0..SLOW)
        .map(|i| {
            tokio::spawn(slowloris(
                stack.client(),
                i,
                Duration::from_millis(300),
                Duration::from_secs(60),
            ))
        })
        .collect();
    // Pulls while the slow connections are being opened and are trickling.
    let mut latencies = Vec::new();
    while started.elapsed() < Duration::from_secs(HEADER_TIMEOUT) || latencies.len() < 5 {
        let t = Instant::now();
        pull_and_verify(&stack.client(), "slow/app", "v1", &image).await;
        latencies.push(t.elapsed());
    }
    let mut open_times = Vec::new();
    for task in slow {
        match task.await.expect("slowloris task") {
            Some(d) => open_times.push(d),
            None => panic!("a slowloris connection trickling its head stayed open for 60 s"),
        }
    }
    let worst_pull = latencies.iter().max().copied().unwrap_or_default();
    println!(
        "slowloris: {SLOW} connections held, each cut after {:?} (median) .. {:?} (max); \
         {} pulls meanwhile: median {:?}, max {worst_pull:?}",
        median(open_times.clone()),
        open_times.iter().max().copied().unwrap_or_default(),
        latencies.len(),
        median(latencies.clone()),
    );
    assert_eq!(open_times.len(), SLOW);
    let longest = open_times.iter().max().copied().unwrap_or_default();
    assert!(
        longest < Duration::from_secs(HEADER_TIMEOUT + 15),
        "trickling bytes kept a head open for {longest:?} (header_read_timeout_secs = \
         {HEADER_TIMEOUT})"
    );
    // Generous: the point is that pulls are served at all, not a benchmark.
    assert!(
        worst_pull < Duration::from_secs(10),
        "a pull took {worst_pull:?} under slowloris"
    );
    stack.gate.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_connections_are_closed_and_busy_ones_are_not() {
    let stack = start_stack(StackOptions {
        extra_server: "idle_timeout_secs = 2\n".into(),
        ..StackOptions::default()
    })
    .await;
    let client = stack.client();
    let request = format!(
        "GET /v2/idle/app/tags/list HTTP/1.1\r\n{}\r\n",
        host_header(&client)
    );

    // One request, then silence: answered, then closed after about 2 s.
    let mut stream = client.try_connect(&[b"http/1.1"]).await.expect("connect");
    stream.write_all(request.as_bytes()).await.expect("write");
    let sent = Instant::now();
    let answer = read_until_closed_or_quiet(&mut stream, Duration::from_secs(20)).await;
    let idle = sent.elapsed();
    assert_eq!(answer.statuses(), [404], "{}", answer.text());
    assert!(
        answer.closed,
        "an idle keep-alive connection stayed open for 20 s"
    );
    println!("idle keep-alive connection closed after {idle:?}");
    assert!(
        idle >= Duration::from_millis(1500) && idle < Duration::from_secs(10),
        "closed after {idle:?} with idle_timeout_secs = 2"
    );

    // Nothing at all after the handshake: closed too.
    let mut silent = client.try_connect(&[b"http/1.1"]).await.expect("connect");
    let t = Instant::now();
    let answer = read_until_closed_or_quiet(&mut silent, Duration::from_secs(20)).await;
    assert!(answer.closed, "a silent connection stayed open for 20 s");
    println!("silent connection closed after {:?}", t.elapsed());

    // A request every second keeps a connection alive well past 2 s.
    let mut busy = client.try_connect(&[b"http/1.1"]).await.expect("connect");
    let t = Instant::now();
    for i in 0..5 {
        busy.write_all(request.as_bytes())
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "request {i} on a busy connection after {:?}: {e}",
                    t.elapsed()
                )
            });
        let answer = read_until_closed_or_quiet(&mut busy, Duration::from_secs(1)).await;
        assert_eq!(
            answer.statuses(),
            [404],
            "request {i} on a connection used every second, after {:?}: {}",
            t.elapsed(),
            answer.text()
        );
        assert!(
            !answer.closed,
            "closed while in use, after {:?}",
            t.elapsed()
        );
    }
    stack.gate.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_connection_cap_the_next_connection_waits_and_the_log_says_so() {
    const CAP: usize = 4;
    let stack = start_stack(StackOptions {
        extra_server: format!("max_connections = {CAP}\n"),
        ..StackOptions::default()
    })
    .await;
    let client = stack.client();
    let mut held = Vec::new();
    for i in 0..CAP {
        held.push(
            client
                .try_connect(&[b"http/1.1"])
                .await
                .unwrap_or_else(|e| panic!("connection {i} of {CAP}: {e}")),
        );
    }
    // The next one: the kernel takes the TCP connection, the gate does not take it
    // up (no TLS answer) while CAP connections are open.
    let waiting = {
        let client = client.clone();
        tokio::spawn(async move { client.try_connect(&[b"http/1.1"]).await })
    };
    let line = eventually("the log line about the connection limit", || async {
        log_lines_with(&[
            "connection limit reached",
            &format!("max_connections={CAP}"),
        ])
        .into_iter()
        .next()
    })
    .await;
    println!("logged: {line}");
    // An observation window: it must still be waiting.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !waiting.is_finished(),
        "connection {} was taken up while {CAP} were open (max_connections = {CAP})",
        CAP + 1
    );
    // One closes: the waiting one is taken up and served.
    let closing = held.pop().expect("a held connection");
    drop(closing);
    let mut stream = tokio::time::timeout(DEADLINE, waiting)
        .await
        .expect("the waiting connection was not taken up after one closed")
        .expect("join")
        .expect("handshake of the waiting connection");
    let request = format!(
        "GET /v2/cap/app/tags/list HTTP/1.1\r\n{}Connection: close\r\n\r\n",
        host_header(&client)
    );
    stream.write_all(request.as_bytes()).await.expect("write");
    let answer = read_until_closed_or_quiet(&mut stream, Duration::from_secs(30)).await;
    assert_eq!(answer.statuses(), [404], "{}", answer.text());
    drop(held);
    stack.gate.stop().await;
}

/// `GET` an upload session: how many bytes it holds (`Range: 0-<last>`; `0-0` is read
/// as empty), or `None` when it is gone.
async fn upload_offset(client: &Client, location: &str) -> Option<u64> {
    let resp = client.get(location).await;
    if resp.status == 404 {
        assert_eq!(resp.json()["errors"][0]["code"], "BLOB_UPLOAD_UNKNOWN");
        return None;
    }
    assert_eq!(resp.status, 204, "GET upload: {}", resp.text());
    let range = resp.header("range").expect("Range on the upload status");
    let last: u64 = range
        .strip_prefix("0-")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("Range {range:?}"));
    Some(if last == 0 { 0 } else { last + 1 })
}

/// Resume the upload at `location` from what it holds and finish it; the blob must
/// then pull back as `data`. Returns the bytes the session had kept.
async fn resume_and_finish(client: &Client, repo: &str, location: &str, data: &[u8]) -> u64 {
    let digest = sha256_digest(data);
    // Poll: the cut request may still be finishing its last write.
    let (kept, resp): (u64, Resp) = eventually("a resume at the session's offset", || async {
        let offset = upload_offset(client, location).await?;
        let rest = &data[offset as usize..];
        let resp = client
            .request(
                "PATCH",
                location,
                &[
                    ("content-type", "application/octet-stream"),
                    (
                        "content-range",
                        &format!("{offset}-{}", data.len() as u64 - 1),
                    ),
                ],
                full(rest.to_vec()),
            )
            .await;
        match resp.status.as_u16() {
            202 => Some((offset, resp)),
            416 => None,
            other => panic!("resume PATCH from {offset}: {other} {}", resp.text()),
        }
    })
    .await;
    let location = location_on_gate(client, &resp, "resume PATCH");
    let separator = if location.contains('?') { '&' } else { '?' };
    let put = client
        .request(
            "PUT",
            &format!("{location}{separator}digest={digest}"),
            &[("content-length", "0")],
            empty(),
        )
        .await;
    assert_eq!(
        put.status,
        201,
        "closing the resumed upload: {}",
        put.text()
    );
    let blob = client.get(&format!("/v2/{repo}/blobs/{digest}")).await;
    assert_eq!(blob.status, 200);
    assert_eq!(
        sha256_digest(&blob.body),
        digest,
        "the resumed blob comes back whole"
    );
    kept
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_cut_off_by_the_client_can_be_resumed() {
    const TOTAL: usize = 6 * 1024 * 1024;
    const SENT: usize = 2 * 1024 * 1024;
    let aio = start_all_in_one().await;
    let pusher = aio.pusher();

    // HTTP/1.1: a PATCH announcing 6 MiB, 2 MiB sent, then the connection dropped.
    let data = pseudo_random_bytes(TOTAL, 41);
    let post = pusher
        .request("POST", "/v2/cut/app/blobs/uploads/", &[], empty())
        .await;
    assert_eq!(post.status, 202, "{}", post.text());
    let location = location_on_gate(&pusher, &post, "POST");
    {
        use base64::Engine as _;
        let auth =
            base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", PUSHER.0, PUSHER.1));
        let mut stream = pusher.try_connect(&[b"http/1.1"]).await.expect("connect");
        let head = format!(
            "PATCH {location} HTTP/1.1\r\n{}Authorization: Basic {auth}\r\n\
             Content-Type: application/octet-stream\r\nContent-Length: {TOTAL}\r\n\r\n",
            host_header(&pusher)
        );
        stream.write_all(head.as_bytes()).await.expect("head");
        stream.write_all(&data[..SENT]).await.expect("first part");
        stream.flush().await.expect("flush");
        // The TCP connection ends (FIN) after the bytes, without a TLS close_notify,
        // as when the client process dies.
        stream.get_mut().0.shutdown().await.expect("shutdown");
        // Everything sent is kept: the session holds all of it once the gate has read
        // to the end (after that the socket may go, unread TLS tickets and all).
        eventually("the cut PATCH to end with what was sent", || async {
            (upload_offset(&pusher, &location).await? == SENT as u64).then_some(())
        })
        .await;
    }
    let kept = resume_and_finish(&pusher, "cut/app", &location, &data).await;
    println!("HTTP/1.1 upload cut after {SENT} bytes: the session kept {kept}");
    assert_eq!(kept, SENT as u64, "the session keeps what arrived");

    // HTTP/2: a PATCH whose body stalls after 2 MiB, then the connection dropped.
    const SEED: u64 = 42;
    let h2 = pusher.http2();
    let post = h2
        .request("POST", "/v2/cut/app/blobs/uploads/", &[], empty())
        .await;
    let location = location_on_gate(&h2, &post, "POST");
    let sender = {
        let (h2, location) = (h2.clone(), location.clone());
        tokio::spawn(async move {
            h2.try_send(
                "PATCH",
                &location,
                &[("content-type", "application/octet-stream")],
                stalling(SENT as u64, SEED),
            )
            .await
        })
    };
    // The registry writes in batches: some bytes on disk show the PATCH is under way.
    eventually("the first part over HTTP/2", || async {
        (upload_offset(&pusher, &location).await? > 0).then_some(())
    })
    .await;
    sender.abort();
    let _ = sender.await;
    // The same generated stream, whole, to resume from and compare with.
    let whole = pseudo_random_bytes(TOTAL, SEED);
    let kept = resume_and_finish(&pusher, "cut/app", &location, &whole).await;
    println!("HTTP/2 upload cut after at most {SENT} bytes: the session kept {kept}");
    // What the client had flushed when it went away is not known exactly.
    assert!(
        kept > 0 && kept <= SENT as u64,
        "kept {kept} of at most {SENT}"
    );
    aio.gate.stop().await;
}

/// A client that writes its whole request before it reads an answer (as urllib3 and
/// many scripts do) gets the refusal the gate sent before reading the body — a
/// manifest over the 4 MiB limit (413), an anonymous push (401) — and not a reset:
/// after answering, the gate reads and drops the rest before it closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_sends_its_whole_body_before_reading_gets_the_refusal() {
    use base64::Engine as _;
    let aio = start_all_in_one().await;
    let client = aio.client();
    let body = vec![b' '; 16 * 1024 * 1024];
    let basic =
        base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", PUSHER.0, PUSHER.1));
    let host = host_header(&client);
    let len = body.len();
    let cases = [
        (
            "a 16 MiB manifest from a pusher",
            format!(
                "PUT /v2/linger/app/manifests/big HTTP/1.1\r\n{host}Authorization: Basic {basic}\r\n\
                 Content-Type: application/vnd.oci.image.manifest.v1+json\r\nContent-Length: {len}\r\n\r\n"
            ),
            413,
        ),
        (
            "an anonymous 16 MiB monolithic blob upload",
            format!(
                "POST /v2/linger/app/blobs/uploads/?digest={} HTTP/1.1\r\n{host}\
                 Content-Type: application/octet-stream\r\nContent-Length: {len}\r\n\r\n",
                sha256_digest(&body)
            ),
            401,
        ),
    ];
    for (what, head, want) in cases {
        let mut stream = client
            .try_connect(&[b"http/1.1"])
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let sent = tokio::time::timeout(DEADLINE, async {
            stream.write_all(head.as_bytes()).await?;
            stream.write_all(&body).await?;
            stream.flush().await
        })
        .await
        .unwrap_or_else(|_| panic!("{what}: the gate stopped reading the body"));
        if let Err(e) = sent {
            panic!(
                "{what}: the connection was reset while the client still sent ({e}): it cannot read the answer"
            );
        }
        let answer = read_until_closed_or_quiet(&mut stream, Duration::from_secs(10)).await;
        assert!(answer.closed, "{what}: the gate closes after a refusal");
        let resp = common::client::RawResponse::parse(&answer.bytes);
        assert_eq!(resp.status, want, "{what}");
        let json: serde_json::Value = serde_json::from_slice(&resp.body).expect("OCI error JSON");
        assert!(json["errors"][0]["code"].is_string(), "{what}: {json}");
    }
    aio.gate.stop().await;
}
