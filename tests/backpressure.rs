//! Clients that stop reading in the middle of a download: the gate stops reading from
//! the upstream too (backpressure), so its memory does not grow with what it cannot
//! deliver, and the idle timeout closes the stalled connections.
//!
//! A test binary of its own, so no other test's memory is counted in the process's
//! resident set.

mod common;

use std::time::{Duration, Instant};

use http_body_util::BodyExt as _;
use hyper::body::Incoming;

use common::client::{Client, empty, generated};
use common::registry::generated_digest;
use common::{Stack, StackOptions};

const SIZE: u64 = 64 * 1024 * 1024;
const STALLED: usize = 8;
const ALLOWED_GROWTH: u64 = 64 * 1024 * 1024;
const IDLE_SECS: u64 = 3;

/// Resident memory of this process now (`VmRSS`), in bytes.
fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .expect("VmRSS in /proc/self/status");
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .expect("VmRSS value");
    kib * 1024
}

/// Read `n` bytes of a body (at least), then leave it.
async fn read_some(body: &mut Incoming, n: usize) -> usize {
    let mut got = 0;
    while got < n {
        let frame = tokio::time::timeout(Duration::from_secs(60), body.frame())
            .await
            .expect("download stalled before the client stopped reading")
            .expect("download ended early")
            .expect("download failed");
        if let Some(data) = frame.data_ref() {
            got += data.len();
        }
    }
    got
}

/// Read a body to its end: `Ok(total)`, or `Err(total)` when it fails.
async fn read_rest(body: &mut Incoming, mut got: u64) -> Result<u64, u64> {
    loop {
        match tokio::time::timeout(Duration::from_secs(60), body.frame()).await {
            Err(_) => panic!("a resumed download neither ended nor failed within 60 s"),
            Ok(None) => return Ok(got),
            Ok(Some(Err(_))) => return Err(got),
            Ok(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    got += data.len() as u64;
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_stop_reading_do_not_grow_the_gate_and_are_closed_when_idle() {
    let stack = Stack::start_with(StackOptions {
        extra_server: format!("idle_timeout_secs = {IDLE_SECS}\n"),
        ..StackOptions::default()
    })
    .await;
    let digest = tokio::task::spawn_blocking(|| generated_digest(SIZE, 5))
        .await
        .expect("digest");
    let pusher = stack.pusher();
    let post = pusher
        .request("POST", "/v2/stall/big/blobs/uploads/", &[], empty())
        .await;
    assert_eq!(post.status, 202, "{}", post.text());
    let location = common::image::location_on_gate(&pusher, &post, "POST");
    let separator = if location.contains('?') { '&' } else { '?' };
    let put = pusher
        .request(
            "PUT",
            &format!("{location}{separator}digest={digest}"),
            &[("content-type", "application/octet-stream")],
            generated(SIZE, 5),
        )
        .await;
    assert_eq!(put.status, 201, "{}", put.text());

    // A complete download first, so pools and buffers are warm in the baseline.
    let path = format!("/v2/stall/big/blobs/{digest}");
    let resp = stack.client().send("GET", &path, &[], empty()).await;
    let mut body = resp.into_body();
    assert_eq!(read_rest(&mut body, 0).await, Ok(SIZE));

    let before = rss();
    let mut stalled = Vec::new();
    for i in 0..STALLED {
        let client: Client = if i % 2 == 0 {
            stack.client()
        } else {
            stack.client().http2()
        };
        let resp = client.send("GET", &path, &[], empty()).await;
        assert_eq!(resp.status(), 200);
        let mut body = resp.into_body();
        let got = read_some(&mut body, 1024 * 1024).await;
        stalled.push((client.protocol(), body, got as u64));
    }
    // Watch the memory while nobody reads: without backpressure the gate would pull
    // each blob from the upstream into memory ({STALLED} × 64 MiB) within a second.
    let started = Instant::now();
    let mut peak = rss();
    while started.elapsed() < Duration::from_secs(IDLE_SECS * 2) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        peak = peak.max(rss());
    }
    let growth = peak.saturating_sub(before);
    println!(
        "{STALLED} stalled downloads of {} MiB: resident memory grew by {} KiB \
         (before {} MiB, peak {} MiB)",
        SIZE >> 20,
        growth >> 10,
        before >> 20,
        peak >> 20
    );
    assert!(
        growth < ALLOWED_GROWTH,
        "{STALLED} clients that stopped reading grew the process by {} MiB: the gate \
         reads from the upstream what it cannot deliver",
        growth >> 20
    );

    // Stalled for twice the idle timeout: the gate has closed them. Reading again
    // gets what was in flight, then an error, never the whole blob.
    for (protocol, mut body, got) in stalled {
        let outcome = read_rest(&mut body, got).await;
        println!("{protocol:?}: after the stall, {outcome:?}");
        assert!(
            matches!(outcome, Err(n) if n < SIZE),
            "{protocol:?}: a download stalled for {}s past idle_timeout_secs = {IDLE_SECS} \
             was not closed: {outcome:?}",
            IDLE_SECS * 2
        );
    }
    // And the gate serves on.
    let resp = stack.client().send("GET", &path, &[], empty()).await;
    let mut body = resp.into_body();
    assert_eq!(read_rest(&mut body, 0).await, Ok(SIZE));
    stack.gate.stop().await;
}
