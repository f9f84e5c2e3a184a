//! Bodies stream through the gate: a blob far larger than what the gate may hold
//! goes up (with no Content-Length) and comes back down, and the memory of the
//! process the gate runs in grows by much less than the blob.
//!
//! A test binary of its own, so no other test's memory is counted.

mod common;

use sha2::{Digest as _, Sha256};

use common::client::{empty, generated, read_body_digest};
use common::{PseudoRandom, Stack, hex};

const SIZE: u64 = 192 * 1024 * 1024;
const ALLOWED_GROWTH: u64 = 64 * 1024 * 1024;

/// Peak resident memory of this process so far (`VmHWM`), in bytes.
fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .expect("VmHWM in /proc/self/status");
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .expect("VmHWM value");
    kib * 1024
}

fn digest_of_generated(len: u64, seed: u64) -> String {
    let mut source = PseudoRandom::new(seed);
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1024 * 1024];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        source.fill(&mut buf[..n]);
        hasher.update(&buf[..n]);
        left -= n as u64;
    }
    format!("sha256:{}", hex(&hasher.finalize()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_larger_than_memory_allows_streams_up_and_down() {
    let stack = Stack::start().await;
    let digest = tokio::task::spawn_blocking(|| digest_of_generated(SIZE, 99))
        .await
        .expect("digest");
    let pusher = stack.pusher();
    let post = pusher
        .request("POST", "/v2/streaming/big/blobs/uploads/", &[], empty())
        .await;
    assert_eq!(post.status, 202, "{}", post.text());
    let location = common::image::location_on_gate(&pusher, &post, "POST");
    let separator = if location.contains('?') { '&' } else { '?' };

    let before = peak_rss();
    let put = pusher
        .request(
            "PUT",
            &format!("{location}{separator}digest={digest}"),
            &[("content-type", "application/octet-stream")],
            generated(SIZE, 99),
        )
        .await;
    assert_eq!(put.status, 201, "{}", put.text());
    assert_eq!(put.header("docker-content-digest"), Some(digest.as_str()));

    for client in [stack.client(), stack.client().http2()] {
        let response = client
            .send(
                "GET",
                &format!("/v2/streaming/big/blobs/{digest}"),
                &[],
                empty(),
            )
            .await;
        assert_eq!(response.status(), 200);
        let mut body = response.into_body();
        assert_eq!(
            read_body_digest(&mut body).await,
            (SIZE, digest.clone()),
            "{:?}: the blob comes back whole",
            client.protocol()
        );
    }
    let growth = peak_rss().saturating_sub(before);
    println!(
        "peak memory grew by {} KiB while moving the blob",
        growth >> 10
    );
    assert!(
        growth < ALLOWED_GROWTH,
        "moving a {} MiB blob up and down grew the gate's process by {} MiB: \
         bodies are being collected, not streamed",
        SIZE >> 20,
        growth >> 20
    );
    stack.gate.stop().await;
}
