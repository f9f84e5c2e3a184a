//! Day 2, end to end: `registry-gate ls`, `rm` and `prune` on the local store and
//! through the gate (`--url`, over real TLS), all-in-one on both storage backends and
//! in front of Debian's `docker-registry` with deletes enabled; retention with
//! pinned, kept-last and aged tags (ages faked through the recorded push times);
//! untagged cleanup that keeps index children and referrers; immutable tags refusing
//! a move and a delete from skopeo with the rule named; the scheduled prune.

#[macro_use]
mod common;

use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use serde_json::{Value, json};

use common::client::{Client, full};
use common::gate::Gate;
use common::image::{OCI_MANIFEST, PushedImage, UploadMode, push_image, upload_blob};
use common::registry::{AllInOne, AllInOneOptions, BINARY, OCI_INDEX, index, oci_manifest};
use common::skopeo::Skopeo;
use common::store::{Backend, TestStore, tag_current_key};
use common::{PUSHER, Stack, eventually, pseudo_random_bytes, sha256_digest};

// ---------------------------------------------------------------------------
// helpers

/// Run the CLI; `stdin` is written to it (a password).
fn cli(args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(BINARY)
        .args(args)
        .env_remove("RUST_LOG")
        .env("HOME", "/nonexistent")
        .env_remove("DOCKER_CONFIG")
        .env_remove("REGISTRY_AUTH_FILE")
        .env_remove("XDG_RUNTIME_DIR")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run registry-gate");
    if let Some(text) = stdin {
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(text.as_bytes())
            .expect("write stdin");
    }
    drop(child.stdin.take());
    child.wait_with_output().expect("wait for registry-gate")
}

fn text(output: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Run the CLI, failing the test when it fails; its stdout.
fn cli_ok(args: &[&str], stdin: Option<&str>) -> String {
    let output = cli(args, stdin);
    assert!(
        output.status.success(),
        "registry-gate {}: {}",
        args.join(" "),
        text(&output)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Run the CLI expecting it to fail; its stderr.
fn cli_fails(args: &[&str], stdin: Option<&str>) -> String {
    let output = cli(args, stdin);
    assert!(
        !output.status.success(),
        "registry-gate {} should fail: {}",
        args.join(" "),
        text(&output)
    );
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Arguments that make a command work through `gate` as the pusher.
fn through(gate: &Gate, ca: &Path) -> Vec<String> {
    vec![
        "--url".into(),
        gate.base_url(),
        "--ca-cert".into(),
        ca.display().to_string(),
        "--user".into(),
        PUSHER.0.into(),
    ]
}

fn password() -> Option<&'static str> {
    Some("mark-pushes-images\n")
}

fn args<'a>(fixed: &[&'a str], more: &'a [String]) -> Vec<&'a str> {
    fixed
        .iter()
        .copied()
        .chain(more.iter().map(String::as_str))
        .collect()
}

fn layer(seed: u64) -> Vec<Vec<u8>> {
    vec![pseudo_random_bytes(3000 + seed as usize, seed)]
}

/// Push a one-layer image made from `seed` as `repo:tag`.
async fn push(client: &Client, repo: &str, tag: &str, seed: u64) -> PushedImage {
    push_image(client, repo, tag, &layer(seed), UploadMode::Monolithic).await
}

/// A request without headers or body.
async fn bare(client: &Client, method: &str, path: &str) -> common::client::Resp {
    client
        .request(method, path, &[], common::client::empty())
        .await
}

async fn tag(client: &Client, repo: &str, tag: &str, manifest: &[u8], media_type: &str) {
    let resp = client
        .request(
            "PUT",
            &format!("/v2/{repo}/manifests/{tag}"),
            &[("content-type", media_type)],
            full(manifest.to_vec()),
        )
        .await;
    assert_eq!(resp.status, 201, "PUT {repo}:{tag}: {}", resp.text());
}

/// Pretend `tag` was pushed `days` ago: rewrite its push record.
async fn age(store: &TestStore, repo: &str, tag: &str, digest: &str, days: u64) {
    let key = tag_current_key(repo, tag).replace("current/link", "pushedat");
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
        - days * 86_400;
    let record = json!({ "digest": digest, "pushed": rfc3339(secs) });
    store.write(&key, record.to_string().as_bytes()).await;
}

/// RFC 3339 UTC of seconds since the epoch (test-side, independent of the gate's).
fn rfc3339(secs: u64) -> String {
    let out = Command::new("date")
        .args(["-u", "-d", &format!("@{secs}"), "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .expect("date");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn tags_of(json: &str) -> Vec<String> {
    let v: Value = serde_json::from_str(json).expect("ls --json output");
    let mut tags: Vec<String> = v
        .as_array()
        .expect("array")
        .iter()
        .map(|t| t["tag"].as_str().expect("tag").to_owned())
        .collect();
    tags.sort();
    tags
}

async fn tag_list(client: &Client, repo: &str) -> Vec<String> {
    let resp = client.get(&format!("/v2/{repo}/tags/list")).await;
    if resp.status == 404 {
        return Vec::new();
    }
    assert_eq!(resp.status, 200, "{}", resp.text());
    let mut tags: Vec<String> = resp.json()["tags"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|t| t.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    tags.sort();
    tags
}

async fn manifest_status(client: &Client, repo: &str, reference: &str) -> u16 {
    client
        .request(
            "HEAD",
            &format!("/v2/{repo}/manifests/{reference}"),
            &[("accept", &format!("{OCI_MANIFEST}, {OCI_INDEX}"))],
            common::client::empty(),
        )
        .await
        .status
        .as_u16()
}

on_both_backends!(
    ls_and_rm_on_the_store_and_through_the_gate,
    retention_keeps_pinned_newest_and_young_tags_and_cleans_untagged,
    immutable_tags_refuse_a_move_and_a_delete,
);

// ---------------------------------------------------------------------------
// ls and rm

async fn ls_and_rm_on_the_store_and_through_the_gate(backend: Backend) {
    let aio = AllInOne::start_with(AllInOneOptions {
        delete: true,
        ..AllInOneOptions::on(backend)
    })
    .await;
    let pusher = aio.pusher();
    let config = aio.gate.files.config.display().to_string();
    let remote = through(&aio.gate, &aio.ca.cert);
    let v1 = push(&pusher, "team/app", "v1", 1).await;
    let v2 = push(&pusher, "team/app", "v2", 2).await;
    tag(&pusher, "team/app", "latest", &v2.manifest, OCI_MANIFEST).await;
    let other = push(&pusher, "other", "x", 3).await;
    // A two-platform index.
    let arm = push(&pusher, "team/multi", "arm", 4).await;
    let amd = push(&pusher, "team/multi", "amd", 5).await;
    let idx = index(
        OCI_INDEX,
        &[
            (OCI_MANIFEST, &arm.manifest, "arm64"),
            (OCI_MANIFEST, &amd.manifest, "amd64"),
        ],
    );
    tag(&pusher, "team/multi", "both", &idx, OCI_INDEX).await;

    let size = |i: &PushedImage| i.config.len() as u64 + i.layer_sizes.iter().sum::<u64>();
    // Repositories: tag counts and sizes (each blob once), locally and remotely alike.
    let local = cli_ok(&["ls", "--config", &config, "--json"], None);
    let through_gate = cli_ok(&args(&["ls", "--json"], &remote), password());
    let repos: Value = serde_json::from_str(&local).expect("json");
    assert_eq!(
        repos,
        serde_json::from_str::<Value>(&through_gate).expect("json"),
        "local and remote ls agree"
    );
    let by_name = |n: &str| {
        repos
            .as_array()
            .expect("array")
            .iter()
            .find(|r| r["repository"] == n)
            .cloned()
            .unwrap_or_else(|| panic!("{n} in {repos}"))
    };
    assert_eq!(by_name("team/app")["tags"], 3);
    assert_eq!(by_name("team/app")["size"], size(&v1) + size(&v2));
    assert_eq!(by_name("other")["size"], size(&other));
    assert_eq!(by_name("team/multi")["tags"], 3);
    let table = cli_ok(&["ls", "--config", &config], None);
    assert!(table.starts_with("REPOSITORY"), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("team/app") && l.contains(" 3 ")),
        "{table}"
    );

    // A repository's tags: digest, type, platforms, size, push time.
    let local = cli_ok(&["ls", "team/multi", "--config", &config, "--json"], None);
    let remote_tags = cli_ok(&args(&["ls", "team/multi", "--json"], &remote), password());
    assert_eq!(
        serde_json::from_str::<Value>(&local).expect("json"),
        serde_json::from_str::<Value>(&remote_tags).expect("json"),
        "the push time comes through the gate as Last-Modified"
    );
    let tags: Value = serde_json::from_str(&local).expect("json");
    let both = tags
        .as_array()
        .expect("array")
        .iter()
        .find(|t| t["tag"] == "both")
        .expect("both");
    assert_eq!(both["digest"], sha256_digest(&idx));
    assert_eq!(both["mediaType"], OCI_INDEX);
    assert_eq!(both["platforms"], json!(["linux/arm64", "linux/amd64"]));
    assert_eq!(both["size"], size(&arm) + size(&amd));
    assert!(
        both["pushed"].as_str().is_some_and(|p| p.ends_with('Z')),
        "{both}"
    );
    let table = cli_ok(&["ls", "team/multi", "--config", &config], None);
    assert!(
        table.contains("linux/arm64,linux/amd64") && table.contains("oci index"),
        "{table}"
    );
    // One tag: its manifest.
    let shown = cli_ok(&args(&["ls", "team/app:v1", "--json"], &remote), password());
    let shown: Value = serde_json::from_str(&shown).expect("json");
    assert_eq!(shown["digest"], v1.manifest_digest.as_str());
    assert_eq!(
        shown["manifest"],
        serde_json::from_slice::<Value>(&v1.manifest).expect("json")
    );
    let err = cli_fails(&["ls", "team/app:nope", "--config", &config], None);
    assert!(err.contains("no such tag"), "{err}");

    // rm REPO:TAG takes that tag only; the manifest keeps its other tags.
    let dry = cli_ok(
        &["rm", "team/app:latest", "--config", &config, "--dry-run"],
        None,
    );
    assert!(
        dry.contains("would remove tag team/app:latest") && dry.contains("still tagged v2"),
        "{dry}"
    );
    assert_eq!(
        tag_list(&pusher, "team/app").await,
        ["latest", "v1", "v2"],
        "a dry run removes nothing"
    );
    let out = cli_ok(&args(&["rm", "team/app:latest"], &remote), password());
    assert!(out.contains("removed tag team/app:latest"), "{out}");
    assert_eq!(tag_list(&pusher, "team/app").await, ["v1", "v2"]);
    assert_eq!(
        manifest_status(&pusher, "team/app", &v2.manifest_digest).await,
        200
    );
    // rm REPO@DIGEST takes the manifest and says which tags went with it.
    tag(&pusher, "team/app", "also-v1", &v1.manifest, OCI_MANIFEST).await;
    let out = cli_ok(
        &[
            "rm",
            &format!("team/app@{}", v1.manifest_digest),
            "--config",
            &config,
        ],
        None,
    );
    assert!(out.contains("and its tags: also-v1, v1"), "{out}");
    assert_eq!(tag_list(&pusher, "team/app").await, ["v2"]);
    assert_eq!(
        manifest_status(&pusher, "team/app", &v1.manifest_digest).await,
        404
    );
    aio.gate.stop().await;
}

// ---------------------------------------------------------------------------
// retention

async fn retention_keeps_pinned_newest_and_young_tags_and_cleans_untagged(backend: Backend) {
    let rules = "[[retention]]\nrepositories = [\"keep/**\"]\nkeep_last = 2\n\
                 keep_tags = [\"latest\", \"v*\"]\nolder_than_days = 30\nuntagged = true\n\n\
                 [[immutable]]\nrepositories = [\"**\"]\ntags = [\"release-*\"]\n";
    let aio = AllInOne::start_with(AllInOneOptions {
        delete: true,
        extra_tables: rules.into(),
        // Untagged manifests of any age may go in this test.
        extra_storage: "gc_grace_secs = 0\n".into(),
        ..AllInOneOptions::on(backend)
    })
    .await;
    let pusher = aio.pusher();
    let config = aio.gate.files.config.display().to_string();
    let repo = "keep/app";
    // Tag → (seed, days ago).
    let plan: [(&str, u64, u64); 8] = [
        ("new-1", 11, 1),
        ("new-2", 12, 2),
        ("old-1", 13, 40),
        ("old-2", 14, 50),
        ("mid", 15, 10),
        ("latest", 16, 90),
        ("v1.0", 17, 90),
        ("release-1", 18, 90),
    ];
    let mut images = std::collections::HashMap::new();
    for (t, seed, days) in plan {
        let image = push(&pusher, repo, t, seed).await;
        age(&aio.store, repo, t, &image.manifest_digest, days).await;
        images.insert(t, image);
    }
    // old-3 is old but carries the content of new-1: the tag goes, the manifest stays.
    tag(
        &pusher,
        repo,
        "old-3",
        &images["new-1"].manifest,
        OCI_MANIFEST,
    )
    .await;
    age(
        &aio.store,
        repo,
        "old-3",
        &images["new-1"].manifest_digest,
        45,
    )
    .await;
    // An untagged manifest, an untagged index child of a kept index, and a referrer
    // (signature) of a kept manifest.
    let orphan = push(&pusher, repo, "orphan", 21).await;
    let child = push(&pusher, repo, "child", 22).await;
    let idx = index(OCI_INDEX, &[(OCI_MANIFEST, &child.manifest, "arm64")]);
    tag(&pusher, repo, "new-index", &idx, OCI_INDEX).await;
    for t in ["orphan", "child"] {
        let resp = bare(&pusher, "DELETE", &format!("/v2/{repo}/manifests/{t}")).await;
        assert_eq!(resp.status, 202, "untag {t}: {}", resp.text());
    }
    let sig_config = b"{}".to_vec();
    upload_blob(&pusher, repo, &sig_config, UploadMode::Monolithic).await;
    let subject = &images["v1.0"];
    let signature = oci_manifest(
        &sig_config,
        &[],
        json!({ "subject": { "mediaType": OCI_MANIFEST, "digest": subject.manifest_digest, "size": subject.manifest.len() } }),
    );
    let sig_digest = sha256_digest(&signature);
    tag(&pusher, repo, &sig_digest, &signature, OCI_MANIFEST).await;
    // Another repository with no retention rule is left alone.
    push(&pusher, "free/app", "old", 31).await;
    age(
        &aio.store,
        "free/app",
        "old",
        &sha256_digest(&common::image::config_and_manifest(&layer(31)).1),
        400,
    )
    .await;

    // new-index (pushed now) and new-1 are the newest two; new-2 and mid are younger
    // than 30 days; latest and v1.0 are pinned, release-1 immutable.
    let dry = cli_ok(&["prune", "--config", &config, "--dry-run"], None);
    for gone in ["old-1", "old-2"] {
        assert!(
            dry.contains(&format!("would remove tag {repo}:{gone} ")),
            "{gone}: {dry}"
        );
    }
    assert!(
        dry.contains(&format!("would remove tag {repo}:old-3 ")),
        "{dry}"
    );
    assert!(
        dry.contains(&format!(
            "would remove manifest {repo}@{}",
            orphan.manifest_digest
        )),
        "{dry}"
    );
    for d in [
        &images["old-1"].manifest_digest,
        &images["old-2"].manifest_digest,
    ] {
        assert!(
            dry.contains(&format!("would remove manifest {repo}@{d}")),
            "{d}: {dry}"
        );
    }
    assert!(
        !dry.contains(&child.manifest_digest),
        "an index child stays: {dry}"
    );
    assert!(
        !dry.contains(&sig_digest),
        "a referrer of a kept manifest stays: {dry}"
    );
    assert!(
        !dry.contains(&format!(
            "manifest {repo}@{}",
            images["new-1"].manifest_digest
        )),
        "still tagged new-1: {dry}"
    );
    assert!(!dry.contains("free/app"), "{dry}");
    assert!(dry.contains("1 immutable"), "{dry}");
    // Three manifests with their blobs: old-1, old-2 and orphan (each a config and a
    // layer).
    let freed: u64 = [&images["old-1"], &images["old-2"], &orphan]
        .iter()
        .map(|i| {
            i.manifest.len() as u64 + i.config.len() as u64 + i.layer_sizes.iter().sum::<u64>()
        })
        .sum();
    let freed_text = format!("{:.1} KiB", freed as f64 / 1024.0);
    assert!(
        dry.contains(&format!("frees {freed_text} once gc runs")),
        "{freed_text}: {dry}"
    );
    let tags_before = tag_list(&pusher, repo).await;
    assert_eq!(tags_before.len(), 10, "{tags_before:?}");

    let out = cli_ok(&["prune", "--config", &config, "--gc"], None);
    assert!(out.contains("removed tag keep/app:old-1"), "{out}");
    assert!(out.contains("gc: removed 9 blobs"), "{out}");
    let mut expected = vec![
        "latest",
        "mid",
        "new-1",
        "new-2",
        "new-index",
        "release-1",
        "v1.0",
        &sig_digest,
    ];
    expected.retain(|t| !t.starts_with("sha256"));
    let mut expected: Vec<String> = expected.into_iter().map(str::to_owned).collect();
    expected.sort();
    assert_eq!(tag_list(&pusher, repo).await, expected);
    for (d, status) in [
        (&orphan.manifest_digest, 404),
        (&images["old-1"].manifest_digest, 404),
        (&child.manifest_digest, 200),
        (&sig_digest, 200),
        (&images["new-1"].manifest_digest, 200),
    ] {
        assert_eq!(manifest_status(&pusher, repo, d).await, status, "{d}");
    }
    for blob in images["old-1"].blob_digests() {
        let resp = bare(&pusher, "HEAD", &format!("/v2/{repo}/blobs/{blob}")).await;
        assert_eq!(
            resp.status, 404,
            "blob {blob} of a pruned image is gone after --gc"
        );
    }
    assert_eq!(tag_list(&pusher, "free/app").await, ["old"]);
    // Run again: nothing more to do.
    let again = cli_ok(&["prune", "--config", &config, "--dry-run"], None);
    assert!(
        again.contains("would remove 0 tags and 0 manifests"),
        "{again}"
    );
    aio.gate.stop().await;
}

// ---------------------------------------------------------------------------
// immutable tags

async fn immutable_tags_refuse_a_move_and_a_delete(backend: Backend) {
    let aio = AllInOne::start_with(AllInOneOptions {
        delete: true,
        extra_tables: "[[immutable]]\nrepositories = [\"**\"]\ntags = [\"v*\", \"release-*\"]\n"
            .into(),
        ..AllInOneOptions::on(backend)
    })
    .await;
    let pusher = aio.pusher();
    let skopeo = Skopeo::new(&aio.path("skopeo"), &aio.ca.cert);
    let creds = format!("{}:{}", PUSHER.0, PUSHER.1);
    let first = push(&pusher, "imm/app", "v1", 41).await;
    let second = push(&pusher, "imm/app", "dev", 42).await;
    let gate = aio.gate.authority();
    // The same digest again is fine.
    tag(&pusher, "imm/app", "v1", &first.manifest, OCI_MANIFEST).await;
    // skopeo moving v1 to another image: DENIED, with the rule in its error.
    let out = skopeo.run(&[
        "copy",
        "--src-cert-dir",
        skopeo.cert_dir(),
        "--dest-cert-dir",
        skopeo.cert_dir(),
        "--src-creds",
        &creds,
        "--dest-creds",
        &creds,
        "--preserve-digests",
        &format!("docker://{gate}/imm/app:dev"),
        &format!("docker://{gate}/imm/app:v1"),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "moving an immutable tag must fail: {err}"
    );
    assert!(
        err.contains("[[immutable]] rule 1"),
        "skopeo shows the rule: {err}"
    );
    let resp = pusher.get("/v2/imm/app/manifests/v1").await;
    assert_eq!(
        resp.header("docker-content-digest"),
        Some(first.manifest_digest.as_str())
    );
    // skopeo delete (by digest, after resolving the tag): DENIED.
    let out = skopeo.run(&[
        "delete",
        "--cert-dir",
        skopeo.cert_dir(),
        "--creds",
        &creds,
        &format!("docker://{gate}/imm/app:v1"),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "deleting an immutable tag's manifest must fail: {err}"
    );
    assert!(err.contains("immutable by [[immutable]] rule 1"), "{err}");
    // The tag itself by name, through the API and the CLI.
    let resp = bare(&pusher, "DELETE", "/v2/imm/app/manifests/v1").await;
    let codes = resp.assert_oci_error(403);
    assert_eq!(codes, ["DENIED"], "{}", resp.text());
    let err = cli_fails(
        &[
            "rm",
            "imm/app:v1",
            "--config",
            &aio.gate.files.config.display().to_string(),
        ],
        None,
    );
    assert!(err.contains("immutable ([[immutable]] rule 1)"), "{err}");
    // A mutable tag moves and goes as usual.
    tag(&pusher, "imm/app", "dev", &first.manifest, OCI_MANIFEST).await;
    let out = skopeo.run(&[
        "delete",
        "--cert-dir",
        skopeo.cert_dir(),
        "--creds",
        &creds,
        &format!("docker://{gate}/imm/app:{}", "dev"),
    ]);
    // dev now points at v1's manifest: deleting that manifest would remove v1.
    assert!(
        !out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let resp = bare(
        &pusher,
        "DELETE",
        &format!("/v2/imm/app/manifests/{}", second.manifest_digest),
    )
    .await;
    assert_eq!(
        resp.status,
        202,
        "an image no immutable tag names is deleted: {}",
        resp.text()
    );
    aio.gate.stop().await;
}

// ---------------------------------------------------------------------------
// in front of docker-registry, and deletes disabled

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn in_front_of_docker_registry_through_the_gate() {
    let stack = Stack::start_with(common::StackOptions {
        extra_tables: "[[immutable]]\nrepositories = [\"**\"]\ntags = [\"release-*\"]\n".into(),
        ..common::StackOptions::default()
    })
    .await;
    let pusher = stack.pusher();
    let remote = through(&stack.gate, &stack.ca.cert);
    let a = push(&pusher, "front/app", "a", 51).await;
    tag(&pusher, "front/app", "a2", &a.manifest, OCI_MANIFEST).await;
    let b = push(&pusher, "front/app", "b", 52).await;
    let c = push(&pusher, "front/app", "release-1", 53).await;
    let listed = cli_ok(&args(&["ls", "front/app", "--json"], &remote), password());
    assert_eq!(tags_of(&listed), ["a", "a2", "b", "release-1"]);
    let v: Value = serde_json::from_str(&listed).expect("json");
    assert!(
        v[0].get("pushed").is_none(),
        "docker-registry does not say when: {v}"
    );
    // rm of a tag on a registry that deletes by digest only: just that tag goes.
    let out = cli_ok(&args(&["rm", "front/app:a2"], &remote), password());
    assert!(out.contains("still tagged a"), "{out}");
    assert_eq!(
        tag_list(&pusher, "front/app").await,
        ["a", "b", "release-1"]
    );
    assert_eq!(
        manifest_status(&pusher, "front/app", &a.manifest_digest).await,
        200
    );
    // rm of a manifest, and an immutable one refused by the gate.
    let out = cli_ok(
        &args(
            &["rm", &format!("front/app@{}", b.manifest_digest)],
            &remote,
        ),
        password(),
    );
    assert!(out.contains("and its tags: b"), "{out}");
    let out = cli(
        &args(
            &["rm", &format!("front/app@{}", c.manifest_digest)],
            &remote,
        ),
        password(),
    );
    assert!(
        !out.status.success() && text(&out).contains("[[immutable]] rule 1"),
        "{}",
        text(&out)
    );
    // Prune through the gate: push times unknown, so keep_last and age cannot pick;
    // a rule without older_than_days removes all but the newest (by name here).
    let rules = stack.dir.path().join("rules.toml");
    std::fs::write(&rules, "[tls]\ncertificate = \"x\"\nprivate_key = \"y\"\n[upstream]\nurl = \"http://127.0.0.1:1\"\n\
        [[retention]]\nrepositories = [\"front/**\"]\nolder_than_days = 1\n").expect("write rules");
    let dry = cli_ok(
        &args(
            &[
                "prune",
                "--dry-run",
                "--config",
                &rules.display().to_string(),
            ],
            &remote,
        ),
        password(),
    );
    assert!(
        dry.contains("would remove 0 tags") && dry.contains("2 without a push time"),
        "{dry}"
    );
    std::fs::write(&rules, "[tls]\ncertificate = \"x\"\nprivate_key = \"y\"\n[upstream]\nurl = \"http://127.0.0.1:1\"\n\
        [[retention]]\nrepositories = [\"front/**\"]\nkeep_tags = [\"keep\"]\nkeep_last = 0\nuntagged = true\n\
        [[immutable]]\ntags = [\"release-*\"]\n").expect("write rules");
    let out = cli_ok(
        &args(
            &["prune", "--config", &rules.display().to_string()],
            &remote,
        ),
        password(),
    );
    assert!(out.contains("removed tag front/app:a "), "{out}");
    assert!(
        out.contains(&format!("removed manifest front/app@{}", a.manifest_digest)),
        "{out}"
    );
    assert!(out.contains("note:"), "says what the API cannot do: {out}");
    assert_eq!(tag_list(&pusher, "front/app").await, ["release-1"]);
    assert_eq!(
        manifest_status(&pusher, "front/app", &a.manifest_digest).await,
        404
    );
    stack.gate.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deletes_disabled_are_said_plainly() {
    let aio = AllInOne::start().await;
    let pusher = aio.pusher();
    push(&pusher, "off/app", "v1", 61).await;
    let config = aio.gate.files.config.display().to_string();
    let err = cli_fails(&["rm", "off/app:v1", "--config", &config], None);
    assert!(
        err.contains("deletes are disabled") && err.contains("[storage] delete = true"),
        "{err}"
    );
    let remote = through(&aio.gate, &aio.ca.cert);
    let err = cli_fails(&args(&["rm", "off/app:v1"], &remote), password());
    assert!(err.contains("deletes are disabled on"), "{err}");
    assert_eq!(tag_list(&pusher, "off/app").await, ["v1"]);
    aio.gate.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_server_prunes_on_a_schedule() {
    let aio = AllInOne::start_with(AllInOneOptions {
        delete: true,
        extra_tables: "[[retention]]\nrepositories = [\"**\"]\nkeep_last = 1\n".into(),
        extra_storage: "prune_interval_secs = 1\n".into(),
        ..AllInOneOptions::default()
    })
    .await;
    let pusher = aio.pusher();
    let old = push(&pusher, "sched/app", "old", 71).await;
    age(&aio.store, "sched/app", "old", &old.manifest_digest, 5).await;
    push(&pusher, "sched/app", "new", 72).await;
    eventually("the scheduled prune to remove the older tag", || async {
        (tag_list(&pusher, "sched/app").await == ["new"]).then_some(())
    })
    .await;
    aio.gate.stop().await;
}
