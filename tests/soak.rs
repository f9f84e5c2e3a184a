//! A bounded soak: anonymous pullers and authenticated pushers (Basic and token) at
//! the same time, through one gate fronting the real CNCF registry and one serving
//! its built-in registry. Every request must succeed, every pushed image must pull
//! back byte for byte (checked as the soak goes and once more at the end), and the
//! resident memory of the process (the gates run in it) must stay flat after warm-up.
//!
//! `SOAK_SECS` sets the duration (default 60; CI keeps it under two minutes), e.g.
//! `SOAK_SECS=1800 cargo test --release --test soak -- --nocapture`.
//! A test binary of its own, so no other test's memory is counted.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::client::Client;
use common::image::{PushedImage, UploadMode, pull_and_verify, push_image};
use common::registry::AllInOne;
use common::{PUSHER, PseudoRandom, Stack};

/// Memory the process may gain between the end of warm-up and any later sample.
const ALLOWED_GROWTH: u64 = 96 * 1024 * 1024;

fn soak_duration() -> Duration {
    let secs = std::env::var("SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    Duration::from_secs(secs)
}

/// Resident memory of this process now (`VmRSS`), in bytes.
fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse::<u64>().ok())
        .expect("VmRSS in /proc/self/status")
        * 1024
}

/// One gate under soak, with what was pushed through it.
#[derive(Clone)]
struct Target {
    name: &'static str,
    client: Client,
    authority: String,
    pushed: Arc<Mutex<Vec<PushedImage>>>,
    requests: Arc<AtomicU64>,
}

impl Target {
    fn new(name: &'static str, client: Client, authority: String) -> Target {
        Target {
            name,
            client,
            authority,
            pushed: Arc::new(Mutex::new(Vec::new())),
            requests: Arc::new(AtomicU64::new(0)),
        }
    }

    fn count(&self, n: u64) {
        self.requests.fetch_add(n, Ordering::Relaxed);
    }

    /// A push token for `repo` from the gate's token endpoint.
    async fn bearer(&self, repo: &str) -> Client {
        let resp = self
            .client
            .with_basic(PUSHER.0, PUSHER.1)
            .get(&format!(
                "/token?service={}&scope=repository:{repo}:pull,push",
                self.authority
            ))
            .await;
        self.count(1);
        assert_eq!(resp.status, 200, "{}: token: {}", self.name, resp.text());
        let token = resp.json()["token"].as_str().expect("token").to_owned();
        self.client.with_authorization(&format!("Bearer {token}"))
    }
}

/// Requests one `push_image` makes: POST + PUT (or PATCH + PUT) per blob, one manifest.
fn push_requests(layers: usize, mode: UploadMode) -> u64 {
    let per_blob = match mode {
        UploadMode::Monolithic => 2,
        UploadMode::Streamed => 3,
        UploadMode::Chunked(_) => 4, // with the sizes below: at most 2 chunks
    };
    (layers as u64 + 1) * per_blob + 1
}

/// Push images until `until`: Basic or token credentials, every upload mode.
async fn pusher(target: Target, worker: u64, token: bool, until: Instant) -> u64 {
    let repo = format!("soak/{}/w{worker}", target.name);
    let mut random = PseudoRandom::new(worker + 1);
    let mut n = 0u64;
    let mut client = if token {
        target.bearer(&repo).await
    } else {
        target.client.with_basic(PUSHER.0, PUSHER.1)
    };
    let mut token_age = Instant::now();
    while Instant::now() < until {
        if token && token_age.elapsed() > Duration::from_secs(60) {
            client = target.bearer(&repo).await;
            token_age = Instant::now();
        }
        let mut sizes = [0u8; 8];
        random.fill(&mut sizes);
        let layers: Vec<Vec<u8>> = (0..2)
            .map(|i| {
                let len = 1 + (u32::from(sizes[i]) * 2048) as usize; // up to 512 KiB
                common::pseudo_random_bytes(len, worker * 1_000_000 + n * 10 + i as u64)
            })
            .collect();
        let mode = match n % 3 {
            0 => UploadMode::Monolithic,
            1 => UploadMode::Chunked(384 * 1024),
            _ => UploadMode::Streamed,
        };
        let image = push_image(&client, &repo, &format!("t{n}"), &layers, mode).await;
        target.count(push_requests(layers.len(), mode));
        target.pushed.lock().expect("pushed").push(image);
        n += 1;
    }
    n
}

/// Pull random pushed images (by tag or digest, HTTP/1.1 or HTTP/2) until `until`.
async fn puller(target: Target, worker: u64, until: Instant) -> u64 {
    let mut random = PseudoRandom::new(1000 + worker);
    let mut n = 0u64;
    while Instant::now() < until {
        let picked = {
            let pushed = target.pushed.lock().expect("pushed");
            let mut r = [0u8; 8];
            random.fill(&mut r);
            let i = u64::from_le_bytes(r);
            (!pushed.is_empty()).then(|| pushed[(i % pushed.len() as u64) as usize].clone())
        };
        let Some(image) = picked else {
            // Nothing pushed yet: the catalog meanwhile.
            let resp = target.client.get("/v2/_catalog").await;
            target.count(1);
            assert_eq!(
                resp.status,
                200,
                "{}: catalog: {}",
                target.name,
                resp.text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let client = if n.is_multiple_of(2) {
            target.client.clone()
        } else {
            target.client.http2()
        };
        let reference = if n.is_multiple_of(3) {
            image.manifest_digest.clone()
        } else {
            image.tag.clone()
        };
        pull_and_verify(&client, &image.repo, &reference, &image).await;
        target.count(2 + image.layer_digests.len() as u64);
        n += 1;
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_mixed_pulls_and_pushes_lose_nothing_and_memory_stays_flat() {
    let duration = soak_duration();
    let stack = Stack::start().await;
    let aio = AllInOne::start().await;
    let targets = [
        Target::new("proxy", stack.client(), stack.gate.authority()),
        Target::new("builtin", aio.client(), aio.gate.authority()),
    ];
    let started = Instant::now();
    let until = started + duration;
    let warm_up = started + duration / 5;

    let mut pushers = Vec::new();
    let mut pullers = Vec::new();
    for (t, target) in targets.iter().enumerate() {
        for w in 0..2u64 {
            let worker = t as u64 * 10 + w;
            pushers.push(tokio::spawn(pusher(target.clone(), worker, w == 1, until)));
        }
        for w in 0..3u64 {
            pullers.push(tokio::spawn(puller(
                target.clone(),
                t as u64 * 10 + w,
                until,
            )));
        }
    }

    // Memory: the first sample after warm-up is the baseline.
    let mut baseline = None;
    let mut peak_growth = 0u64;
    let mut samples = Vec::new();
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if Instant::now() < warm_up {
            continue;
        }
        let now = rss();
        samples.push(now);
        let base = *baseline.get_or_insert(now);
        peak_growth = peak_growth.max(now.saturating_sub(base));
    }
    let mut pushes = 0;
    for p in pushers {
        pushes += p
            .await
            .unwrap_or_else(|e| panic!("a pusher failed (see its panic above): {e}"));
    }
    let mut pulls = 0;
    for p in pullers {
        pulls += p
            .await
            .unwrap_or_else(|e| panic!("a puller failed (see its panic above): {e}"));
    }

    // Everything pushed pulls back identical, once more, from a fresh client.
    for target in &targets {
        let pushed = target.pushed.lock().expect("pushed").clone();
        assert!(!pushed.is_empty(), "{}: nothing was pushed", target.name);
        for image in &pushed {
            pull_and_verify(&target.client, &image.repo, &image.tag, image).await;
            target.count(2 + image.layer_digests.len() as u64);
        }
        let resp = target.client.get("/v2/_catalog?n=1000").await;
        assert_eq!(resp.status, 200);
        println!(
            "{}: {} images pushed, about {} requests, none failed",
            target.name,
            pushed.len(),
            target.requests.load(Ordering::Relaxed)
        );
    }
    let base = baseline.unwrap_or(0);
    let last = samples.last().copied().unwrap_or(0);
    println!(
        "soak {duration:?}: {pushes} pushes, {pulls} pulls; resident memory after warm-up \
         {} MiB, at the end {} MiB, largest growth {} MiB ({} samples)",
        base >> 20,
        last >> 20,
        peak_growth >> 20,
        samples.len()
    );
    assert!(pushes > 0 && pulls > 0, "the soak did nothing");
    assert!(
        peak_growth < ALLOWED_GROWTH,
        "resident memory grew by {} MiB after warm-up (allowed {} MiB)",
        peak_growth >> 20,
        ALLOWED_GROWTH >> 20
    );
    aio.gate.stop().await;
    stack.gate.stop().await;
}
