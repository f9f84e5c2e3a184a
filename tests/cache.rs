//! The front cache (`[cache]`), end to end over TLS in front of Debian's
//! `docker-registry`: what the upstream is asked is read from its own access log.
//! Hits and misses, a range from the cache, concurrent misses fetched once, a first
//! client that leaves a fill, eviction under the size cap, a corrupt cache file, a
//! manifest deleted upstream, a blob of repository A asked through repository B, a
//! restart, and `registry-gate cache`.

mod common;

use std::path::Path;
use std::time::Duration;

use common::client::{Client, empty, read_at_least, read_rest};
use common::gate::{Gate, GateOptions};
use common::image::{UploadMode, push_image, upload_blob};
use common::upstream::free_loopback_port;
use common::{
    Stack, StackOptions, eventually, metric, metrics, pseudo_random_bytes, sha256_digest,
};

fn cache_tables(dir: &Path, max: &str, confirm_secs: u64, admin: std::net::SocketAddr) -> String {
    format!(
        "[cache]\ndir = {:?}\nmax_size = \"{max}\"\nconfirm_secs = {confirm_secs}\n\n\
         [admin]\nlisten = \"{admin}\"\n",
        dir.display().to_string()
    )
}

struct Cached {
    stack: Stack,
    cache_dir: tempfile::TempDir,
    admin: std::net::SocketAddr,
}

async fn start(max: &str, confirm_secs: u64) -> Cached {
    let cache_dir = tempfile::tempdir().expect("cache dir");
    let admin = free_loopback_port();
    let stack = Stack::start_with(StackOptions {
        extra_tables: cache_tables(cache_dir.path(), max, confirm_secs, admin),
        ..StackOptions::default()
    })
    .await;
    Cached {
        stack,
        cache_dir,
        admin,
    }
}

/// How many times the upstream was sent `METHOD path`.
fn upstream_count(stack: &Stack, method: &str, path: &str) -> usize {
    stack
        .upstream
        .access_log()
        .matches(&format!("\"{method} {path} HTTP/1.1\""))
        .count()
}

/// `registry-gate cache ACTION --config CONFIG`, which must succeed; its stdout.
fn cache_command(action: &str, config: &Path) -> String {
    let out = std::process::Command::new(common::registry::BINARY)
        .args(["cache", action, "--config"])
        .arg(config)
        .output()
        .expect("run registry-gate cache");
    assert!(
        out.status.success(),
        "cache {action}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

async fn get_blob(client: &Client, repo: &str, digest: &str) -> (u16, Vec<u8>) {
    let resp = client.get(&format!("/v2/{repo}/blobs/{digest}")).await;
    (resp.status.as_u16(), resp.body.to_vec())
}

/// The upstream's access log is written as it answers: wait until it shows `n`.
async fn upstream_saw(stack: &Stack, method: &str, path: &str, n: usize) {
    eventually(&format!("{n} × {method} {path} upstream"), || async {
        (upstream_count(stack, method, path) >= n).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(upstream_count(stack, method, path), n, "{method} {path}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hits_misses_ranges_and_tags() {
    let c = start("1GiB", 300).await;
    let (stack, pusher, anon) = (&c.stack, c.stack.pusher(), c.stack.client());
    let layer = pseudo_random_bytes(3 << 20, 1);
    let image = push_image(
        &pusher,
        "cache/app",
        "v1",
        std::slice::from_ref(&layer),
        UploadMode::Monolithic,
    )
    .await;
    let ld = &image.layer_digests[0];
    let blob_path = format!("/v2/cache/app/blobs/{ld}");
    // Miss, then hits: one GET upstream in all.
    for _ in 0..3 {
        let (status, body) = get_blob(&anon, "cache/app", ld).await;
        assert_eq!(status, 200);
        assert_eq!(sha256_digest(&body), *ld);
    }
    upstream_saw(stack, "GET", &blob_path, 1).await;
    // HEAD and a range come from the cache too.
    let resp = anon.request("HEAD", &blob_path, &[], empty()).await;
    assert_eq!(resp.status, 200);
    assert_eq!(
        resp.header("content-length"),
        Some(layer.len().to_string().as_str())
    );
    let resp = anon
        .request("GET", &blob_path, &[("range", "bytes=100-199")], empty())
        .await;
    assert_eq!(resp.status, 206);
    assert_eq!(
        resp.header("content-range"),
        Some(format!("bytes 100-199/{}", layer.len()).as_str())
    );
    assert_eq!(&resp.body[..], &layer[100..200]);
    let resp = anon
        .request(
            "GET",
            &blob_path,
            &[("range", format!("bytes={}-", layer.len()).as_str())],
            empty(),
        )
        .await;
    assert_eq!(resp.status, 416);
    assert_eq!(
        upstream_count(stack, "GET", &blob_path),
        1,
        "range and HEAD from the cache"
    );
    assert_eq!(upstream_count(stack, "HEAD", &blob_path), 0);

    // A manifest by digest: once upstream.
    let mpath = format!("/v2/cache/app/manifests/{}", image.manifest_digest);
    let accept = [("accept", "application/vnd.oci.image.manifest.v1+json")];
    for _ in 0..3 {
        let resp = anon.request("GET", &mpath, &accept, empty()).await;
        assert_eq!(resp.status, 200);
        assert_eq!(&resp.body[..], &image.manifest[..]);
        assert_eq!(
            resp.header("content-type"),
            Some("application/vnd.oci.image.manifest.v1+json")
        );
    }
    upstream_saw(stack, "GET", &mpath, 1).await;
    // By tag: always asked upstream (a HEAD), the body from the cache.
    let tpath = "/v2/cache/app/manifests/v1";
    for _ in 0..2 {
        let resp = anon.request("GET", tpath, &accept, empty()).await;
        assert_eq!(resp.status, 200);
        assert_eq!(&resp.body[..], &image.manifest[..]);
        assert_eq!(
            resp.header("docker-content-digest"),
            Some(image.manifest_digest.as_str())
        );
    }
    upstream_saw(stack, "HEAD", tpath, 2).await;
    assert_eq!(
        upstream_count(stack, "GET", tpath),
        0,
        "the body came from the cache"
    );
    // A tag moved upstream is seen at once.
    let other = push_image(
        &pusher,
        "cache/app",
        "v1",
        &[pseudo_random_bytes(1000, 2)],
        UploadMode::Monolithic,
    )
    .await;
    let resp = anon.request("GET", tpath, &accept, empty()).await;
    assert_eq!(
        resp.header("docker-content-digest"),
        Some(other.manifest_digest.as_str())
    );
    assert_eq!(&resp.body[..], &other.manifest[..]);

    let m = metrics(c.admin).await;
    assert!(
        metric(&m, "registry_gate_cache_hits_total{kind=\"blob\"}") >= 4,
        "{m}"
    );
    assert!(
        metric(&m, "registry_gate_cache_misses_total{kind=\"blob\"}") >= 1,
        "{m}"
    );
    assert!(
        metric(&m, "registry_gate_cache_hits_total{kind=\"manifest\"}") >= 4,
        "{m}"
    );
    assert!(
        metric(&m, "registry_gate_cache_served_bytes_total") >= 2 * layer.len() as u64,
        "{m}"
    );
    assert!(
        metric(&m, "registry_gate_cache_size_bytes") >= layer.len() as u64,
        "{m}"
    );
    let _keep = &c.cache_dir;
    c.stack.gate.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_misses_fetch_once() {
    let c = start("1GiB", 300).await;
    let stack = &c.stack;
    let pusher = stack.pusher();
    let data = pseudo_random_bytes(16 << 20, 3);
    let d = upload_blob(&pusher, "cache/many", &data, UploadMode::Monolithic).await;
    let clients: Vec<_> = (0..8)
        .map(|_| {
            let (anon, d) = (stack.client(), d.clone());
            tokio::spawn(async move { get_blob(&anon, "cache/many", &d).await })
        })
        .collect();
    for c in clients {
        let (status, body) = c.await.expect("join");
        assert_eq!(status, 200);
        assert_eq!(sha256_digest(&body), d, "every client gets the whole blob");
    }
    upstream_saw(stack, "GET", &format!("/v2/cache/many/blobs/{d}"), 1).await;
    c.stack.gate.stop().await;
}

/// The first client of a miss reads a little and goes away while another reads
/// along: the fill goes on without it, the other gets the whole blob, and the blob is
/// kept (fetched from the upstream once in all).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_first_client_that_leaves_does_not_end_the_fill() {
    let c = start("1GiB", 300).await;
    let stack = &c.stack;
    let data = pseudo_random_bytes(64 << 20, 4);
    let d = upload_blob(&stack.pusher(), "cache/left", &data, UploadMode::Monolithic).await;
    let path = format!("/v2/cache/left/blobs/{d}");
    let first = stack.client().send("GET", &path, &[], empty()).await;
    assert_eq!(first.status(), 200);
    let mut first = first.into_body();
    // It stops reading: the fill waits for it (far less than 64 MiB is buffered).
    read_at_least(&mut first, 256 << 10).await;
    let follower = stack.client().send("GET", &path, &[], empty()).await;
    assert_eq!(follower.status(), 200);
    let mut follower = follower.into_body();
    let mut received = read_at_least(&mut follower, 64 << 10).await;
    drop(first);
    read_rest(&mut follower, &mut received, "after the first client left").await;
    assert_eq!(received.len(), data.len());
    assert_eq!(
        sha256_digest(&received),
        d,
        "the follower gets the whole blob"
    );
    let hex = d.trim_start_matches("sha256:");
    let kept = c.cache_dir.path().join("sha256").join(&hex[..2]).join(hex);
    eventually("the blob in the cache", || async {
        kept.exists().then_some(())
    })
    .await;
    let (status, body) = get_blob(&stack.client(), "cache/left", &d).await;
    assert_eq!((status, sha256_digest(&body)), (200, d.clone()));
    upstream_saw(stack, "GET", &path, 1).await;
    c.stack.gate.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn eviction_corruption_and_restart() {
    let c = start("1MiB", 300).await;
    let stack = &c.stack;
    let (pusher, anon) = (stack.pusher(), stack.client());
    let blobs: Vec<(Vec<u8>, String)> = (0..3)
        .map(|i| pseudo_random_bytes(400 << 10, 10 + i))
        .map(|b| {
            let d = sha256_digest(&b);
            (b, d)
        })
        .collect();
    for (b, _) in &blobs {
        upload_blob(&pusher, "cache/evict", b, UploadMode::Monolithic).await;
    }
    for (b, d) in &blobs {
        let (status, body) = get_blob(&anon, "cache/evict", d).await;
        assert_eq!((status, body.len()), (200, b.len()));
        // Kept (its writer finished) before the next one: the order of use is the
        // order of these GETs.
        let hex = d.trim_start_matches("sha256:");
        let kept = c.cache_dir.path().join("sha256").join(&hex[..2]).join(hex);
        eventually("the blob in the cache", || async {
            kept.exists().then_some(())
        })
        .await;
    }
    // 1.2 MiB fetched under a 1 MiB cap: the least recently used went.
    let path = |d: &str| format!("/v2/cache/evict/blobs/{d}");
    eventually("an eviction", || async {
        (metric(
            &metrics(c.admin).await,
            "registry_gate_cache_evictions_total",
        ) >= 1)
            .then_some(())
    })
    .await;
    let (status, _) = get_blob(&anon, "cache/evict", &blobs[0].1).await;
    assert_eq!(status, 200);
    upstream_saw(stack, "GET", &path(&blobs[0].1), 2).await;
    // The most recent one is a hit.
    get_blob(&anon, "cache/evict", &blobs[2].1).await;
    upstream_saw(stack, "GET", &path(&blobs[2].1), 1).await;

    // A corrupt file is noticed, not served, and fetched again.
    let hex = blobs[2].1.trim_start_matches("sha256:");
    let file = c.cache_dir.path().join("sha256").join(&hex[..2]).join(hex);
    let mut bytes = std::fs::read(&file).expect("cached file");
    bytes[1000] ^= 0xff;
    std::fs::write(&file, &bytes).expect("corrupt it");
    let (status, body) = get_blob(&anon, "cache/evict", &blobs[2].1).await;
    assert_eq!(status, 200);
    assert_eq!(
        sha256_digest(&body),
        blobs[2].1,
        "the good bytes, from upstream"
    );
    upstream_saw(stack, "GET", &path(&blobs[2].1), 2).await;
    assert!(metric(&metrics(c.admin).await, "registry_gate_cache_corrupt_total") >= 1);
    // A truncated one too.
    let (status, _) = get_blob(&anon, "cache/evict", &blobs[2].1).await;
    assert_eq!(status, 200);
    std::fs::write(&file, &bytes[..1000]).expect("truncate it");
    let (_, body) = get_blob(&anon, "cache/evict", &blobs[2].1).await;
    assert_eq!(sha256_digest(&body), blobs[2].1);
    upstream_saw(stack, "GET", &path(&blobs[2].1), 3).await;

    // A manifest by digest, kept in the manifest pack.
    let small = pseudo_random_bytes(1000, 30);
    let image = push_image(
        &pusher,
        "cache/evict",
        "m1",
        std::slice::from_ref(&small),
        UploadMode::Monolithic,
    )
    .await;
    let mpath = format!("/v2/cache/evict/manifests/{}", image.manifest_digest);
    let accept = [("accept", "application/vnd.oci.image.manifest.v1+json")];
    let resp = anon.request("GET", &mpath, &accept, empty()).await;
    assert_eq!(resp.status, 200);
    assert_eq!(&resp.body[..], &image.manifest[..]);
    upstream_saw(stack, "GET", &mpath, 1).await;
    assert!(
        c.cache_dir.path().join("manifests.pack").exists(),
        "manifests are kept in the pack"
    );

    // A restart keeps what is cached: a HEAD confirms, the body comes from disk.
    let config = std::fs::read_to_string(&stack.gate.files.config).expect("config");
    let Cached {
        stack,
        cache_dir,
        admin: _,
    } = c;
    let Stack {
        dir,
        ca,
        leaf,
        upstream,
        gate,
    } = stack;
    gate.stop().await;
    let admin = free_loopback_port();
    let restarted = Gate::start(
        &dir.path().join("gate2"),
        GateOptions {
            upstream_url: upstream.url(),
            extra_tables: cache_tables(cache_dir.path(), "1MiB", 300, admin),
            ..GateOptions::new(&leaf)
        },
    )
    .await;
    assert!(config.contains("[cache]"));
    let client = Client::new(restarted.addr, &[&ca.cert]);
    let (status, body) = get_blob(&client, "cache/evict", &blobs[2].1).await;
    assert_eq!(status, 200);
    assert_eq!(sha256_digest(&body), blobs[2].1);
    let log = upstream.access_log();
    assert_eq!(
        log.matches(&format!("\"GET {} HTTP/1.1\"", path(&blobs[2].1)))
            .count(),
        3,
        "served from the cache after the restart"
    );
    let resp = client.request("GET", &mpath, &accept, empty()).await;
    assert_eq!(resp.status, 200);
    assert_eq!(&resp.body[..], &image.manifest[..]);
    assert_eq!(
        resp.header("content-type"),
        Some("application/vnd.oci.image.manifest.v1+json")
    );
    assert_eq!(
        upstream
            .access_log()
            .matches(&format!("\"GET {mpath} HTTP/1.1\""))
            .count(),
        1,
        "the manifest served from the pack after the restart"
    );
    // `registry-gate cache stats` and `clear`.
    let stats = cache_command("stats", &restarted.files.config);
    assert!(stats.contains("blobs"), "{stats}");
    let restarted_config = restarted.files.config.clone();
    restarted.stop().await;
    cache_command("clear", &restarted_config);
    assert!(!file.exists(), "cleared");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn confirmation_per_repository_and_deletes_upstream() {
    let c = start("1GiB", 1).await;
    let stack = &c.stack;
    let (pusher, anon) = (stack.pusher(), stack.client());
    let data = pseudo_random_bytes(100_000, 20);
    let d = upload_blob(&pusher, "team-a/app", &data, UploadMode::Monolithic).await;
    assert_eq!(get_blob(&anon, "team-a/app", &d).await.0, 200);
    // Cached from A, but B does not have it: never served for B.
    for _ in 0..2 {
        let (status, _) = get_blob(&anon, "team-b/app", &d).await;
        assert_eq!(status, 404, "a blob of team-a is not served for team-b");
    }
    // Once B has it upstream (a mount), it is served for B from the cache.
    let resp = pusher
        .request(
            "POST",
            &format!("/v2/team-b/app/blobs/uploads/?mount={d}&from=team-a/app"),
            &[],
            empty(),
        )
        .await;
    assert_eq!(resp.status, 201, "{}", resp.text());
    let (status, body) = get_blob(&anon, "team-b/app", &d).await;
    assert_eq!((status, sha256_digest(&body)), (200, d.clone()));
    assert_eq!(
        upstream_count(stack, "GET", &format!("/v2/team-b/app/blobs/{d}")),
        2,
        "only the two refused tries went upstream as GETs"
    );

    // A manifest deleted upstream directly stops being served within confirm_secs.
    let image = push_image(
        &pusher,
        "team-a/img",
        "v1",
        &[pseudo_random_bytes(5000, 21)],
        UploadMode::Monolithic,
    )
    .await;
    let mpath = format!("/v2/team-a/img/manifests/{}", image.manifest_digest);
    let accept = [("accept", "application/vnd.oci.image.manifest.v1+json")];
    assert_eq!(
        anon.request("GET", &mpath, &accept, empty()).await.status,
        200
    );
    let out = std::process::Command::new("curl")
        .args([
            "-sf",
            "-X",
            "DELETE",
            &format!("{}{mpath}", stack.upstream.url()),
        ])
        .output()
        .expect("curl");
    assert!(
        out.status.success(),
        "delete upstream: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    eventually("the deleted manifest to stop being served", || async {
        (anon.request("GET", &mpath, &accept, empty()).await.status == 404).then_some(())
    })
    .await;
    // A delete through the gate ends it at once.
    let image = push_image(
        &pusher,
        "team-a/img",
        "v2",
        &[pseudo_random_bytes(5000, 22)],
        UploadMode::Monolithic,
    )
    .await;
    let mpath = format!("/v2/team-a/img/manifests/{}", image.manifest_digest);
    assert_eq!(
        anon.request("GET", &mpath, &accept, empty()).await.status,
        200
    );
    let resp = pusher.request("DELETE", &mpath, &[], empty()).await;
    assert_eq!(resp.status, 202, "{}", resp.text());
    assert_eq!(
        anon.request("GET", &mpath, &accept, empty()).await.status,
        404
    );
    c.stack.gate.stop().await;
}
