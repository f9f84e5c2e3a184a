//! The registry built into the gate ("all-in-one": no `[upstream]`), end to end over
//! real TLS: the OCI Distribution Specification v1.1 (pull, push, mount, manifests,
//! referrers, listing, deletes), the disk (symlinks planted in the root, `kill -9`,
//! concurrent pushes, a full disk, a permission error, abandoned uploads), garbage
//! collection (the CLI, its dry run, while pushes go on, on a schedule), the CNCF
//! layout both ways with Debian's `docker-registry`, and the real skopeo and podman.
//!
//! Each test runs on both storage backends, `fs::<name>` on the local disk and
//! `s3::<name>` on a real Garage cluster (see `on_both_backends!`), except the three
//! about the disk itself (symlinks, a full disk, a permission error).

#[macro_use]
mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use futures_util::StreamExt as _;
use serde_json::json;

use common::client::{Client, Resp, empty, full, generated, paused, read_body_digest};
use common::gate::{Gate, GateOptions};
use common::image::{
    OCI_CONFIG, OCI_LAYER, OCI_MANIFEST, PushedImage, UploadMode, location_on_gate,
    pull_and_verify, push_image, tar_layer, upload_blob, write_oci_layout,
};
use common::pki::{Ca, KeyAlg, KeyEncoding};
use common::registry::{
    AllInOne, AllInOneOptions, DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX, Process, Tmpfs, descriptor,
    docker_manifest, gc_command, generated_digest, generated_part, index, oci_manifest, run_gc,
    sha512_digest, snapshot, stalling, walk, write_binary_config, write_multiarch_layout,
};
use common::skopeo::Skopeo;
use common::store::{
    Backend, TestStore, V2, blob_key, layer_link_key, repo_key, tag_current_key, tag_index_key,
};
use common::upstream::{Upstream, UpstreamOptions, free_loopback_port};
use common::{
    PUSHER, Stack, StackOptions, eventually, init_tracing, pseudo_random_bytes, sha256_digest,
};

const EMPTY_CONFIG: &str = "application/vnd.oci.empty.v1+json";

// ---------------------------------------------------------------------------
// helpers

fn expect(resp: &Resp, status: u16, what: &str) {
    assert_eq!(
        resp.status.as_u16(),
        status,
        "{what}: expected {status}, got {} {:?}: {}",
        resp.status,
        resp.headers,
        resp.text()
    );
}

/// An OCI error with `status` whose codes include `code`.
fn expect_error(resp: &Resp, status: u16, code: &str, what: &str) {
    let codes = resp.assert_oci_error(status);
    assert!(
        codes.iter().any(|c| c == code),
        "{what}: expected {code}, got {codes:?}: {}",
        resp.text()
    );
}

/// A refusal: any 4xx/5xx with an OCI error body.
fn expect_refused(resp: &Resp, what: &str) {
    assert!(
        resp.status.is_client_error() || resp.status.is_server_error(),
        "{what}: expected a refusal, got {} {:?}: {}",
        resp.status,
        resp.headers,
        resp.text()
    );
    resp.assert_oci_error(resp.status.as_u16());
}

fn header<'a>(resp: &'a Resp, name: &str) -> &'a str {
    resp.header(name)
        .unwrap_or_else(|| panic!("no {name} header in {} {:?}", resp.status, resp.headers))
}

fn with_digest(location: &str, digest: &str) -> String {
    let separator = if location.contains('?') { '&' } else { '?' };
    format!("{location}{separator}digest={digest}")
}

async fn put_manifest(
    client: &Client,
    repo: &str,
    reference: &str,
    media_type: &str,
    body: &[u8],
) -> Resp {
    client
        .request(
            "PUT",
            &format!("/v2/{repo}/manifests/{reference}"),
            &[("content-type", media_type)],
            full(body.to_vec()),
        )
        .await
}

async fn put_manifest_ok(
    client: &Client,
    repo: &str,
    reference: &str,
    media_type: &str,
    body: &[u8],
) -> Resp {
    let resp = put_manifest(client, repo, reference, media_type, body).await;
    expect(&resp, 201, &format!("PUT manifest {repo}:{reference}"));
    assert_eq!(
        resp.header("docker-content-digest"),
        Some(sha256_digest(body).as_str()),
        "PUT manifest: Docker-Content-Digest"
    );
    resp
}

/// `POST …/blobs/uploads/` → 202; the session's Location (on the gate).
async fn start_upload(client: &Client, repo: &str) -> String {
    let resp = client
        .request(
            "POST",
            &format!("/v2/{repo}/blobs/uploads/"),
            &[("content-length", "0")],
            empty(),
        )
        .await;
    expect(&resp, 202, "POST upload");
    assert_eq!(resp.header("range"), Some("0-0"), "POST upload: Range");
    location_on_gate(client, &resp, "POST upload")
}

async fn patch(client: &Client, location: &str, start: usize, chunk: &[u8]) -> Resp {
    client
        .request(
            "PATCH",
            location,
            &[
                ("content-type", "application/octet-stream"),
                (
                    "content-range",
                    &format!("{start}-{}", start + chunk.len() - 1),
                ),
            ],
            full(chunk.to_vec()),
        )
        .await
}

async fn head(client: &Client, path: &str) -> Resp {
    client.request("HEAD", path, &[], empty()).await
}

async fn get_accepting(client: &Client, path: &str) -> Resp {
    client
        .request(
            "GET",
            path,
            &[(
                "accept",
                "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, \
                 application/vnd.docker.distribution.manifest.v2+json, \
                 application/vnd.docker.distribution.manifest.list.v2+json",
            )],
            empty(),
        )
        .await
}

/// The path of a `Link: <…>; rel="next"` header, if there is one.
fn next_link(resp: &Resp, client: &Client) -> Option<String> {
    let link = resp.header("link")?;
    assert!(
        link.contains("rel=\"next\""),
        "Link without rel=\"next\": {link}"
    );
    let start = link.find('<').expect("Link <") + 1;
    let end = link.find('>').expect("Link >");
    let target = &link[start..end];
    let base = client.base_url();
    Some(
        target
            .strip_prefix(base.as_str())
            .unwrap_or(target)
            .to_owned(),
    )
}

/// Follow `Link` pages from `first`, each with at most `n` entries of `field`.
async fn all_pages(client: &Client, first: &str, field: &str, n: usize) -> Vec<String> {
    let mut out = Vec::new();
    let mut path = Some(first.to_owned());
    let mut pages = 0;
    while let Some(p) = path {
        pages += 1;
        assert!(pages < 100, "more than 100 pages: the Link never ends");
        let resp = client.get(&p).await;
        expect(&resp, 200, &format!("GET {p}"));
        let items: Vec<String> = serde_json::from_value(resp.json()[field].clone())
            .unwrap_or_else(|e| panic!("{field} in {}: {e}", resp.text()));
        assert!(items.len() <= n, "{p}: {} entries, n was {n}", items.len());
        out.extend(items);
        path = next_link(&resp, client);
    }
    out
}

fn three_layers(seed: u64) -> Vec<Vec<u8>> {
    vec![
        pseudo_random_bytes(3_000, seed),
        pseudo_random_bytes(70_000, seed + 1),
        pseudo_random_bytes(200_001, seed + 2),
    ]
}

/// Check that a tag (or digest) resolves to a complete manifest whose blobs exist.
async fn assert_complete(client: &Client, repo: &str, reference: &str) -> String {
    let resp = get_accepting(client, &format!("/v2/{repo}/manifests/{reference}")).await;
    expect(&resp, 200, &format!("GET manifest {repo}:{reference}"));
    let digest = header(&resp, "docker-content-digest").to_owned();
    assert_eq!(
        sha256_digest(&resp.body),
        digest,
        "{repo}:{reference}: the manifest's bytes hash to its Docker-Content-Digest"
    );
    let manifest = resp.json();
    let mut blobs = Vec::new();
    if let Some(config) = manifest.get("config") {
        blobs.push(config["digest"].as_str().expect("config digest").to_owned());
    }
    for layer in manifest["layers"].as_array().into_iter().flatten() {
        blobs.push(layer["digest"].as_str().expect("layer digest").to_owned());
    }
    for blob in blobs {
        let resp = client
            .send("GET", &format!("/v2/{repo}/blobs/{blob}"), &[], empty())
            .await;
        assert_eq!(
            resp.status(),
            200,
            "{repo}:{reference} names blob {blob}, which is not there"
        );
        let (_, got) = read_body_digest(&mut resp.into_body()).await;
        assert_eq!(got, blob, "blob {blob} holds other bytes");
    }
    digest
}

// ---------------------------------------------------------------------------
// the suite, on both backends

on_both_backends!(
    pull_by_tag_and_digest_with_headers,
    blob_ranges_give_206_and_416,
    monolithic_pushes_post_put_and_post_with_digest,
    chunked_push_with_status_and_out_of_order_chunks,
    cancelled_and_unknown_upload_sessions_are_blob_upload_unknown,
    a_digest_mismatch_is_digest_invalid_and_stores_nothing,
    sha512_blobs_and_manifests,
    cross_repository_mount_only_from_what_the_caller_may_pull,
    manifest_puts_are_validated,
    manifest_kinds_indexes_and_docker_types,
    subject_gives_oci_subject_and_referrers_list_and_filter,
    tags_list_pages_in_lexical_order,
    a_next_link_never_points_back_at_the_same_page,
    catalog_pages_in_lexical_order,
    deletes_are_unsupported_when_disabled,
    deletes_of_manifests_tags_and_blobs_when_enabled,
    kill_9_during_a_blob_upload_and_manifest_puts_leaves_nothing_partial,
    a_new_tag_cut_off_before_its_current_link_is_not_listed,
    concurrent_pushes_of_the_same_blob_manifest_and_tag_end_consistent,
    abandoned_uploads_are_purged,
    what_docker_registry_wrote_is_served_by_the_gate,
    what_the_gate_wrote_is_served_by_docker_registry,
    skopeo_pushes_and_pulls_an_image_and_a_multi_arch_index,
    podman_pushes_and_pulls,
    gc_dry_run_reports_and_gc_removes_only_unreferenced_content,
    gc_while_pushing_never_removes_what_was_pushed_or_linked_meanwhile,
    the_server_collects_garbage_on_its_schedule,
    a_served_manifest_follows_its_tag_when_it_moves_or_goes,
);

// ---------------------------------------------------------------------------
// pull

async fn pull_by_tag_and_digest_with_headers(backend: Backend) {
    let aio = AllInOne::start_with(AllInOneOptions::on(backend)).await;
    let anon = aio.client();
    let layers = three_layers(1);
    let image = push_image(
        &aio.pusher(),
        "pull/app",
        "v1",
        &layers,
        UploadMode::Monolithic,
    )
    .await;

    // /v2/ asks for credentials (the token challenge) and answers {} to a user.
    let resp = anon.get("/v2/").await;
    expect(&resp, 401, "anonymous GET /v2/");
    assert!(
        header(&resp, "www-authenticate").starts_with("Bearer "),
        "{:?}",
        resp.headers
    );
    let resp = aio.viewer().get("/v2/").await;
    expect(&resp, 200, "GET /v2/ with credentials");
    assert_eq!(resp.json(), json!({}));
    resp.assert_api_version_once("GET /v2/");

    pull_and_verify(&anon, "pull/app", "v1", &image).await;
    pull_and_verify(&anon, "pull/app", &image.manifest_digest, &image).await;
    for reference in ["v1", image.manifest_digest.as_str()] {
        let path = format!("/v2/pull/app/manifests/{reference}");
        for method in ["GET", "HEAD"] {
            let resp = anon
                .request(method, &path, &[("accept", OCI_MANIFEST)], empty())
                .await;
            let what = format!("{method} {path}");
            expect(&resp, 200, &what);
            assert_eq!(resp.header("content-type"), Some(OCI_MANIFEST), "{what}");
            assert_eq!(
                resp.header("docker-content-digest"),
                Some(image.manifest_digest.as_str()),
                "{what}"
            );
            assert_eq!(
                resp.header("content-length"),
                Some(image.manifest.len().to_string().as_str()),
                "{what}: Content-Length"
            );
            if method == "GET" {
                assert_eq!(resp.body, image.manifest, "{what}: bytes");
            } else {
                assert!(resp.body.is_empty(), "{what}: a HEAD has no body");
            }
        }
    }

    let mut blobs = vec![(image.config_digest.clone(), image.config.to_vec())];
    blobs.extend(
        image
            .layer_digests
            .iter()
            .cloned()
            .zip(layers.iter().cloned()),
    );
    for (digest, bytes) in &blobs {
        let path = format!("/v2/pull/app/blobs/{digest}");
        for method in ["GET", "HEAD"] {
            let resp = anon.request(method, &path, &[], empty()).await;
            let what = format!("{method} {path}");
            expect(&resp, 200, &what);
            assert_eq!(
                resp.header("docker-content-digest"),
                Some(digest.as_str()),
                "{what}"
            );
            assert_eq!(
                resp.header("content-length"),
                Some(bytes.len().to_string().as_str()),
                "{what}: Content-Length"
            );
            if method == "GET" {
                assert_eq!(&resp.body[..], &bytes[..], "{what}: bytes");
            } else {
                assert!(resp.body.is_empty(), "{what}: a HEAD has no body");
            }
        }
    }

    // Unknown things, and a blob that exists only in another repository.
    let resp = anon.get("/v2/pull/app/manifests/nope").await;
    expect_error(&resp, 404, "MANIFEST_UNKNOWN", "unknown tag");
    let resp = head(&anon, "/v2/pull/app/manifests/nope").await;
    expect(&resp, 404, "HEAD unknown tag");
    let absent = sha256_digest(b"never pushed");
    let resp = anon.get(&format!("/v2/pull/app/manifests/{absent}")).await;
    expect_error(&resp, 404, "MANIFEST_UNKNOWN", "unknown digest");
    let resp = anon.get(&format!("/v2/pull/app/blobs/{absent}")).await;
    expect_error(&resp, 404, "BLOB_UNKNOWN", "unknown blob");
    let resp = head(&anon, &format!("/v2/pull/app/blobs/{absent}")).await;
    expect(&resp, 404, "HEAD unknown blob");
    let elsewhere = upload_blob(
        &aio.pusher(),
        "pull/other",
        b"only in pull/other",
        UploadMode::Monolithic,
    )
    .await;
    let resp = anon.get(&format!("/v2/pull/app/blobs/{elsewhere}")).await;
    expect_error(&resp, 404, "BLOB_UNKNOWN", "a blob of another repository");
    let resp = anon
        .get(&format!(
            "/v2/pull/other/manifests/{}",
            image.manifest_digest
        ))
        .await;
    expect_error(
        &resp,
        404,
        "MANIFEST_UNKNOWN",
        "a manifest of another repository",
    );
    aio.gate.stop().await;
}

async fn blob_ranges_give_206_and_416(backend: Backend) {
    let aio = AllInOne::start_with(AllInOneOptions::on(backend)).await;
    let anon = aio.client();
    let blob = pseudo_random_bytes(100_000, 7);
    let digest = upload_blob(&aio.pusher(), "range/app", &blob, UploadMode::Monolithic).await;
    let path = format!("/v2/range/app/blobs/{digest}");
    for (range, start, end) in [
        ("bytes=0-9", 0usize, 9usize),
        ("bytes=50000-50000", 50_000, 50_000),
        ("bytes=99990-", 99_990, 99_999),
        ("bytes=-100", 99_900, 99_999),
        ("bytes=99999-200000", 99_999, 99_999),
    ] {
        let resp = anon
            .request("GET", &path, &[("range", range)], empty())
            .await;
        expect(&resp, 206, range);
        assert_eq!(
            resp.header("content-range"),
            Some(format!("bytes {start}-{end}/100000").as_str()),
            "{range}"
        );
        assert_eq!(
            resp.header("content-length"),
            Some((end - start + 1).to_string().as_str()),
            "{range}"
        );
        assert_eq!(&resp.body[..], &blob[start..=end], "{range}: bytes");
    }
    for range in ["bytes=100000-", "bytes=200000-300000"] {
        let resp = anon
            .request("GET", &path, &[("range", range)], empty())
            .await;
        expect(&resp, 416, range);
        assert_eq!(
            resp.header("content-range"),
            Some("bytes */100000"),
            "{range}"
        );
    }
    // Without Range, the whole blob.
    let resp = anon.get(&path).await;
    expect(&resp, 200, "GET without Range");
    assert_eq!(&resp.body[..], &blob[..]);
    aio.gate.stop().await;
}

// ---------------------------------------------------------------------------
// push

async fn monolithic_pushes_post_put_and_post_with_digest(backend: Backend) {
    let aio = AllInOne::start_with(AllInOneOptions::on(backend)).await;
    let pusher = aio.pusher();
    let store = &aio.store;

    // POST, then PUT with the whole blob.
    let blob = pseudo_random_bytes(123_457, 11);
    let digest = sha256_digest(&blob);
    let location = start_upload(&pusher, "push/mono").await;
    let resp = pusher
        .request(
            "PUT",
            &with_digest(&location, &digest),
            &[("content-type", "application/octet-stream")],
            full(blob.clone()),
        )
        .await;
    expect(&resp, 201, "PUT with the whole blob");
    assert_eq!(resp.header("docker-content-digest"), Some(digest.as_str()));
    assert!(
        location_on_gate(&pusher, &resp, "PUT blob")
            .ends_with(&format!("/v2/push/mono/blobs/{digest}")),
        "Location of the blob: {:?}",
        resp.header("location")
    );
    let resp = head(&aio.client(), &format!("/v2/push/mono/blobs/{digest}")).await;
    expect(&resp, 200, "HEAD pushed blob");
    assert_eq!(resp.header("content-length"), Some("123457"));

    // POST ?digest= with the blob: one request.
    let blob2 = pseudo_random_bytes(65_536, 12);
    let digest2 = sha256_digest(&blob2);
    let resp = pusher
        .request(
            "POST",
            &format!("/v2/push/mono/blobs/uploads/?digest={digest2}"),
            &[("content-type", "application/octet-stream")],
            full(blob2.clone()),
        )
        .await;
    expect(&resp, 201, "POST ?digest= with the blob");
    assert_eq!(resp.header("docker-content-digest"), Some(digest2.as_str()));
    assert!(
        location_on_gate(&pusher, &resp, "POST ?digest=")
            .ends_with(&format!("/v2/push/mono/blobs/{digest2}")),
        "{:?}",
        resp.header("location")
    );
    let resp = aio
        .client()
        .get(&format!("/v2/push/mono/blobs/{digest2}"))
        .await;
    expect(&resp, 200, "GET blob pushed by POST ?digest=");
    assert_eq!(&resp.body[..], &blob2[..]);

    // The empty blob.
    let none = sha256_digest(b"");
    let resp = pusher
        .request(
            "POST",
            &format!("/v2/push/mono/blobs/uploads/?digest={none}"),
            &[("content-length", "0")],
            empty(),
        )
        .await;
    expect(&resp, 201, "POST ?digest= of the empty blob");
    let resp = aio
        .client()
        .get(&format!("/v2/push/mono/blobs/{none}"))
        .await;
    expect(&resp, 200, "GET the empty blob");
    assert_eq!(resp.header("content-length"), Some("0"));
    assert!(resp.body.is_empty());

    // In the store: the CNCF layout, and no upload left behind.
    for (d, bytes) in [(&digest, &blob), (&digest2, &blob2)] {
        assert_eq!(&store.read(&blob_key(d)).await.expect("blob data"), bytes);
        assert_eq!(
            String::from_utf8(
                store
                    .read(&layer_link_key("push/mono", d))
                    .await
                    .expect("layer link")
            )
            .expect("a UTF-8 layer link"),
            *d
        );
    }
    assert_eq!(store.open_uploads("push/mono").await, Vec::<String>::new());
    aio.gate.stop().await;
}

async fn chunked_push_with_status_and_out_of_order_chunks(backend: Backend) {
    let aio = AllInOne::start_with(AllInOneOptions::on(backend)).await;
    let pusher = aio.pusher();
    let blob = pseudo_random_bytes(300_000, 21);
    let digest = sha256_digest(&blob);
    let location = start_upload(&pusher, "push/chunked").await;

    let resp = patch(&pusher, &location, 0, &blob[..100_000]).await;
    expect(&resp, 202, "PATCH 0-99999");
    assert_eq!(resp.header("range"), Some("0-99999"));
    let location = location_on_gate(&pusher, &resp, "PATCH");

    let resp = pusher.get(&location).await;
    expect(&resp, 204, "GET upload status");
    assert_eq!(resp.header("range"), Some("0-99999"), "GET upload: Range");
    location_on_gate(&pusher, &resp, "GET upload");

    // A gap, and overlaps: 416, and the session is unchanged. A refused chunk is read
    // and dropped before the answer, so even a client still sending a large one (8 MiB
    // here, over HTTP/1.1 and HTTP/2) reads the 416 instead of a reset connection.
    let big = pseudo_random_bytes(8 * 1024 * 1024, 22);
    for client in [pusher.clone(), pusher.http2()] {
        let resp = patch(&client, &location, 150_000, &big).await;
        resp.assert_oci_error(416);
    }
    let resp = patch(&pusher, &location, 150_000, &blob[150_000..151_000]).await;
    resp.assert_oci_error(416);
    let resp = patch(&pusher, &location, 99_000, &blob[99_000..100_500]).await;
    resp.assert_oci_error(416);
    let resp = patch(&pusher, &location, 0, &blob[..1_000]).await;
    resp.assert_oci_error(416);
    let resp = pusher.get(&location).await;
    expect(&resp, 204, "GET upload after refused chunks");
    assert_eq!(
        resp.header("range"),
        Some("0-99999"),
        "refused chunks were not kept"
    );

    let resp = patch(&pusher, &location, 100_000, &blob[100_000..200_000]).await;
    expect(&resp, 202, "PATCH 100000-199999");
    assert_eq!(resp.header("range"), Some("0-199999"));

    // The last chunk comes with the closing PUT.
    let resp = pusher
        .request(
            "PUT",
            &with_digest(&location, &digest),
            &[
                ("content-type", "application/octet-stream"),
                ("content-range", "200000-299999"),
            ],
            full(blob[200_000..].to_vec()),
        )
        .await;
    expect(&resp, 201, "PUT with the last chunk");
    assert_eq!(resp.header("docker-content-digest"), Some(digest.as_str()));
    let resp = aio
        .client()
        .get(&format!("/v2/push/chunked/blobs/{digest}"))
        .await;
    expect(&resp, 200, "GET chunked blob");
    assert_eq!(&resp.body[..], &blob[..]);

    // The finished session is gone.
    let resp = pusher.get(&location).await;
    expect_error(&resp, 404, "BLOB_UPLOAD_UNKNOWN", "GET finished upload");
    let resp = patch(&pusher, &location, 300_000, b"more").await;
    expect_error(&resp, 404, "BLOB_UPLOAD_UNKNOWN", "PATCH finished upload");
    let resp = pusher
        .request("PUT", &with_digest(&location, &digest), &[], empty())
        .await;
    expect_error(&resp, 404, "BLOB_UPLOAD_UNKNOWN", "PUT finished upload");

    // The harness's chunked and streamed pushes end in a pullable image.
    for (tag, mode) in [
        ("chunked", UploadMode::Chunked(30_000)),
        ("streamed", UploadMode::Streamed),
    ] {
        let image = push_image(&pusher, "push/chunked", tag, &three_layers(30), mode).await;
        pull_and_verify(&aio.client(), "push/chunked", tag, &image).await;
    }
    assert_eq!(
        aio.store.open_uploads("push/chunked").await,
        Vec::<String>::new()
    );
    aio.gate.stop().await;
}

async fn cancelled_and_unknown_upload_sessions_are_blob_upload_unknown(backend: Backend) {
    let aio = AllInOne::start_with(AllInOneOptions::on(backend)).await;
    let pusher = aio.pusher();
    let store = &aio.store;

    let location = start_upload(&pusher, "up/a").await;
    let resp = patch(&pusher, &location, 0, &pseudo_random_bytes(10_000, 31)).await;
    expect(&resp, 202, "PATCH");
    assert_eq!(
        store.open_uploads("up/a").await.len(),
        1,
        "the upload is in the store"
    );
    let resp = pusher.request("DELETE", &location, &[], empty()).await;
    expect(&resp, 204, "DELETE upload");
    assert_eq!(
        store.open_uploads("up/a").await,
        Vec::<String>::new(),
        "its data went"
    );
    let resp = pusher.get(&location).await;
    expect_error(&resp, 404, "BLOB_UPLOAD_UNKNOWN", "GET cancelled upload");
    let resp = patch(&pusher, &location, 10_000, b"more").await;
    expect_error(&resp, 404, "BLOB_UPLOAD_UNKNOWN", "PATCH cancelled upload");
    let resp = pusher
        .request(
            "PUT",
            &with_digest(&location, &sha256_digest(b"x")),
            &[],
            full(&b"x"[..]),
        )
        .await;
    expect_error(&resp, 404, "BLOB_UPLOAD_UNKNOWN", "PUT cancelled upload");
    let resp = pusher.request("DELETE", &location, &[], empty()).await;
    expect_error(&resp, 404, "BLOB_UPLOAD_UNKNOWN", "DELETE cancelled upload");

    // An id that never existed.
    let unknown = "/v2/up/a/blobs/uploads/00000000-0000-4000-8000-000000000000";
    expect_error(
        &pusher.get(unknown).await,
        404,
        "BLOB_UPLOAD_UNKNOWN",
        "GET unknown",
    );
    expect_error(
        &patch(&pusher, unknown, 0, b"abc").await,
        404,
        "BLOB_UPLOAD_UNKNOWN",
        "PATCH unknown",
    );
    expect_error(
        &pusher
            .request(
                "PUT",
                &with_digest(unknown, &sha256_digest(b"abc")),
                &[],
                full(&b"abc"[..]),
            )
            .await,
        404,
        "BLOB_UPLOAD_UNKNOWN",
        "PUT unknown",
    );
    expect_error(
        &pusher.request("DELETE", unknown, &[], empty()).await,
        404,
        "BLOB_UPLOAD_UNKNOWN",
        "DELETE unknown",
    );

    // A session belongs to its repository.
    let location = start_upload(&pusher, "up/a").await;
    let foreign = location.replacen("/v2/up/a/", "/v2/up/b/", 1);
    assert_ne!(foreign, location);
    expect_error(
        &pusher.get(&foreign).await,
        404,
        "BLOB_UPLOAD_UNKNOWN",
        "GET via another repository",
    );
    let resp = pusher.get(&location).await;
    expect(&resp, 204, "the session itself is still there");
    aio.gate.stop().await;
}

async fn a_digest_mismatch_is_digest_invalid_and_stores_nothing(backend: Backend) {
    let aio = AllInOne::start_with(AllInOneOptions::on(backend)).await;
    let pusher = aio.pusher();
    let store = &aio.store;
    let data = pseudo_random_bytes(50_000, 41);
    let real = sha256_digest(&data);
    let claimed = sha256_digest(b"something else entirely");

    let assert_nothing = async |what: &str| {
        for d in [&real, &claimed] {
            assert!(
                !store.exists(&blob_key(d)).await,
                "{what}: {d} was stored after a digest mismatch"
            );
        }
        assert_eq!(
            store.open_uploads("bad/digest").await,
            Vec::<String>::new(),
            "{what}"
        );
    };

    // POST + PUT with the body.
    let location = start_upload(&pusher, "bad/digest").await;
    let resp = pusher
        .request(
            "PUT",
            &with_digest(&location, &claimed),
            &[],
            full(data.clone()),
        )
        .await;
    expect_error(&resp, 400, "DIGEST_INVALID", "monolithic PUT, wrong digest");
    assert_nothing("monolithic PUT").await;
    expect_error(
        &pusher.get(&location).await,
        404,
        "BLOB_UPLOAD_UNKNOWN",
        "the failed session",
    );

    // Chunked, closed by an empty PUT.
    let location = start_upload(&pusher, "bad/digest").await;
    expect(&patch(&pusher, &location, 0, &data).await, 202, "PATCH");
    let resp = pusher
        .request(
            "PUT",
            &with_digest(&location, &claimed),
            &[("content-length", "0")],
            empty(),
        )
        .await;
    expect_error(&resp, 400, "DIGEST_INVALID", "chunked, wrong digest");
    assert_nothing("chunked").await;

    // One POST ?digest=.
    let resp = pusher
        .request(
            "POST",
            &format!("/v2/bad/digest/blobs/uploads/?digest={claimed}"),
            &[],
            full(data.clone()),
        )
        .await;
    expect_error(&resp, 400, "DIGEST_INVALID", "POST ?digest=, wrong digest");
    assert_nothing("POST ?digest=").await;

    // A wrong sha512, and digests that are not digests.
    let location = start_upload(&pusher, "bad/digest").await;
    let resp = pusher
        .request(
            "PUT",
            &with_digest(&location, &sha512_digest(b"other")),
            &[],
            full(data.clone()),
        )
        .await;
    expect_error(&resp, 400, "DIGEST_INVALID", "wrong sha512");
    assert_nothing("sha512").await;
    for bad in [
        "sha256:xyz",
        "sha256:",
        "md5:d41d8cd98f00b204e9800998ecf8427e",
        "nonsense",
    ] {
        let location = start_upload(&pusher, "bad/digest").await;
        let resp = pusher
            .request("PUT", &with_digest(&location, bad), &[], full(data.clone()))
            .await;
        expect_error(&resp, 400, "DIGEST_INVALID", &format!("digest {bad:?}"));
        let _ = pusher.request("DELETE", &location, &[], empty()).await;
    }
    assert_nothing("malformed digests").await;
    let resp = head(&aio.client(), &format!("/v2/bad/digest/blobs/{real}")).await;
    expect(&resp, 404, "HEAD of the real digest");
    aio.gate.stop().await;
}

async fn sha512_blobs_and_manifests(backend: Backend) {
    let aio = AllInOne::start_with(AllInOneOptions::on(backend)).await;
    let pusher = aio.pusher();
    let anon = aio.client();

    // POST + PUT.
    let layer = pseudo_random_bytes(80_000, 51);
    let d512 = sha512_digest(&layer);
    let location = start_upload(&pusher, "sha/512").await;
    let resp = pusher
        .request(
            "PUT",
            &with_digest(&location, &d512),
            &[],
            full(layer.clone()),
        )
        .await;
    expect(&resp, 201, "PUT sha512 blob");
    assert_eq!(resp.header("docker-content-digest"), Some(d512.as_str()));
    let resp = anon.get(&format!("/v2/sha/512/blobs/{d512}")).await;
    expect(&resp, 200, "GET sha512 blob");
    assert_eq!(&resp.body[..], &layer[..]);
    assert_eq!(resp.header("docker-content-digest"), Some(d512.as_str()));
    let resp = anon
        .request(
            "GET",
            &format!("/v2/sha/512/blobs/{d512}"),
            &[("range", "bytes=10-19")],
            empty(),
        )
        .await;
    expect(&resp, 206, "Range on a sha512 blob");
    assert_eq!(&resp.body[..], &layer[10..20]);
    assert!(
        aio.store.exists(&blob_key(&d512)).await,
        "blobs/sha512/… in the CNCF layout"
    );

    // Chunked.
    let chunked = pseudo_random_bytes(40_000, 52);
    let c512 = sha512_digest(&chunked);
    let location = start_upload(&pusher, "sha/512").await;
    expect(
        &patch(&pusher, &location, 0, &chunked[..25_000]).await,
        202,
        "PATCH 1",
    );
    expect(
        &patch(&pusher, &location, 25_000, &chunked[25_000..]).await,
        202,
        "PATCH 2",
    );
    let resp = pusher
        .request(
            "PUT",
            &with_digest(&location, &c512),
            &[("content-length", "0")],
            empty(),
        )
        .await;
    expect(&resp, 201, "close chunked sha512 upload");
    expect(
        &head(&anon, &format!("/v2/sha/512/blobs/{c512}")).await,
        200,
        "HEAD chunked sha512",
    );

    // POST ?digest=.
    let mono = pseudo_random_bytes(1_000, 53);
    let m512 = sha512_digest(&mono);
    let resp = pusher
        .request(
            "POST",
            &format!("/v2/sha/512/blobs/uploads/?digest={m512}"),
            &[],
            full(mono.clone()),
        )
        .await;
    expect(&resp, 201, "POST ?digest=sha512");

    // A manifest naming a sha512 layer, itself pushed by its sha512 digest.
    let config =
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    upload_blob(&pusher, "sha/512", config, UploadMode::Monolithic).await;
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": descriptor(OCI_CONFIG, config),
        "layers": [{ "mediaType": OCI_LAYER, "digest": d512, "size": layer.len() }],
    }))
    .expect("manifest");
    let manifest512 = sha512_digest(&manifest);
    let resp = put_manifest(&pusher, "sha/512", &manifest512, OCI_MANIFEST, &manifest).await;
    expect(&resp, 201, "PUT manifest by sha512 digest");
    assert_eq!(
        resp.header("docker-content-digest"),
        Some(manifest512.as_str())
    );
    let resp = get_accepting(&anon, &format!("/v2/sha/512/manifests/{manifest512}")).await;
    expect(&resp, 200, "GET manifest by sha512");
    assert_eq!(&resp.body[..], &manifest[..]);
    assert_eq!(
        resp.header("docker-content-digest"),
        Some(manifest512.as_str())
    );
    aio.gate.stop().await;
}

// ---------------------------------------------------------------------------
// cross-repository mount

async fn cross_repository_mount_only_from_what_the_caller_may_pull(backend: Backend) {
    // mark may push to private/… but only the readers (vera) may pull from it.
    let aio = AllInOne::start_with(AllInOneOptions {
        extra_tables: "[[rules]]\nrepositories = [\"private/**\"]\npull = [\"readers\"]\n\
                       push = [\"pusher\"]\n"
            .into(),
        ..AllInOneOptions::on(backend)
    })
    .await;
    let pusher = aio.pusher();
    let anon = aio.client();
    let store = &aio.store;

    // Present and allowed: 201, and the blob is now in the target.
    let blob = pseudo_random_bytes(30_000, 61);
    let digest = upload_blob(&pusher, "mount/src", &blob, UploadMode::Monolithic).await;
    let resp = pusher
        .request(
            "POST",
            &format!("/v2/mount/dst/blobs/uploads/?mount={digest}&from=mount/src"),
            &[("content-length", "0")],
            empty(),
        )
        .await;
    expect(&resp, 201, "mount of a present blob");
    assert_eq!(resp.header("docker-content-digest"), Some(digest.as_str()));
    assert!(
        location_on_gate(&pusher, &resp, "mount")
            .ends_with(&format!("/v2/mount/dst/blobs/{digest}")),
        "{:?}",
        resp.header("location")
    );
    let resp = anon.get(&format!("/v2/mount/dst/blobs/{digest}")).await;
    expect(&resp, 200, "GET the mounted blob");
    assert_eq!(&resp.body[..], &blob[..]);
    assert_eq!(
        store.open_uploads("mount/dst").await,
        Vec::<String>::new(),
        "a mount opens no upload"
    );

    // Absent from the source: a normal upload session, which works.
    let data = b"not in any repository yet".to_vec();
    let absent = sha256_digest(&data);
    let resp = pusher
        .request(
            "POST",
            &format!("/v2/mount/dst/blobs/uploads/?mount={absent}&from=mount/src"),
            &[("content-length", "0")],
            empty(),
        )
        .await;
    expect(&resp, 202, "mount of an absent blob");
    let location = location_on_gate(&pusher, &resp, "mount fallback");
    let resp = pusher
        .request("PUT", &with_digest(&location, &absent), &[], full(data))
        .await;
    expect(&resp, 201, "the fallback session completes");

    // In the registry, but not in `from`: no mount.
    let other = upload_blob(
        &pusher,
        "mount/elsewhere",
        b"elsewhere",
        UploadMode::Monolithic,
    )
    .await;
    let resp = pusher
        .request(
            "POST",
            &format!("/v2/mount/dst2/blobs/uploads/?mount={other}&from=mount/src"),
            &[("content-length", "0")],
            empty(),
        )
        .await;
    expect(&resp, 202, "mount of a blob the source does not have");
    expect(
        &head(&anon, &format!("/v2/mount/dst2/blobs/{other}")).await,
        404,
        "not mounted",
    );

    // A source the caller may not pull: never mounted, even though it is there.
    let secret = pseudo_random_bytes(20_000, 62);
    let secret_digest = upload_blob(&pusher, "private/src", &secret, UploadMode::Monolithic).await;
    let resp = aio
        .viewer()
        .get(&format!("/v2/private/src/blobs/{secret_digest}"))
        .await;
    expect(
        &resp,
        200,
        "a reader pulls the private blob (so it is there)",
    );
    let resp = pusher
        .get(&format!("/v2/private/src/blobs/{secret_digest}"))
        .await;
    assert!(
        resp.status == 401 || resp.status == 403,
        "mark may not pull private/src: {} {}",
        resp.status,
        resp.text()
    );
    let resp = pusher
        .request(
            "POST",
            &format!("/v2/mount/stolen/blobs/uploads/?mount={secret_digest}&from=private/src"),
            &[("content-length", "0")],
            empty(),
        )
        .await;
    expect(
        &resp,
        202,
        "mount from a repository the caller may not pull",
    );
    location_on_gate(&pusher, &resp, "refused mount");
    expect(
        &head(&anon, &format!("/v2/mount/stolen/blobs/{secret_digest}")).await,
        404,
        "the private blob was not mounted",
    );
    assert!(
        !store
            .exists(&layer_link_key("mount/stolen", &secret_digest))
            .await
    );
    aio.gate.stop().await;
}

// ---------------------------------------------------------------------------
// manifests

/// Push a config and layers into `repo` (blobs only); returns them.
async fn push_blobs(client: &Client, repo: &str, seed: u64) -> (Vec<u8>, Vec<u8>) {
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []},
        "seed": seed,
    }))
    .expect("config");
    let layer = pseudo_random_bytes(10_000, seed);
    upload_blob(client, repo, &config, UploadMode::Monolithic).await;
    upload_blob(client, repo, &layer, UploadMode::Monolithic).await;
    (config, layer)
}

async fn manifest_puts_are_validated(backend: Backend) {
    let aio = AllInOne::start_with(AllInOneOptions::on(backend)).await;
    let pusher = aio.pusher();
    let repo = "man/valid";
    let (config, layer) = push_blobs(&pusher, repo, 71).await;
    let good = oci_manifest(&config, &[&layer], json!({}));

    let resp = put_manifest(&pusher, repo, "bad", OCI_MANIFEST, b"{not json").await;
    expect_error(&resp, 400, "MANIFEST_INVALID", "not JSON");
    let resp = put_manifest(
        &pusher,
        repo,
        "bad",
        "application/vnd.example.thing+json",
        &good,
    )
    .await;
    expect_error(&resp, 400, "MANIFEST_INVALID", "unsupported media type");
    let resp = put_manifest(&pusher, repo, "bad", DOCKER_MANIFEST, &good).await;
    expect_error(
        &resp,
        400,
        "MANIFEST_INVALID",
        "mediaType differs from Content-Type",
    );
    let resp = put_manifest(&pusher, repo, "bad", OCI_MANIFEST, br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","layers":[]}"#).await;
    expect_error(&resp, 400, "MANIFEST_INVALID", "no config");
    let resp = put_manifest(&pusher, repo, "bad", OCI_MANIFEST, b"[]").await;
    expect_error(&resp, 400, "MANIFEST_INVALID", "not an object");

    // Blobs that are not in this repository.
    let absent_layer = oci_manifest(&config, &[&layer, b"no such layer"], json!({}));
    let resp = put_manifest(&pusher, repo, "bad", OCI_MANIFEST, &absent_layer).await;
    expect_error(&resp, 400, "MANIFEST_BLOB_UNKNOWN", "missing layer");
    let absent_config = oci_manifest(b"no such config", &[&layer], json!({}));
    let resp = put_manifest(&pusher, repo, "bad", OCI_MANIFEST, &absent_config).await;
    expect_error(&resp, 400, "MANIFEST_BLOB_UNKNOWN", "missing config");
    let (other_config, other_layer) = push_blobs(&pusher, "man/other", 72).await;
    let foreign = oci_manifest(&other_config, &[&other_layer], json!({}));
    let resp = put_manifest(&pusher, repo, "bad", OCI_MANIFEST, &foreign).await;
    expect_error(
        &resp,
        400,
        "MANIFEST_BLOB_UNKNOWN",
        "blobs of another repository",
    );

    // A digest reference must match the bytes.
    let resp = put_manifest(
        &pusher,
        repo,
        &sha256_digest(b"other bytes"),
        OCI_MANIFEST,
        &good,
    )
    .await;
    expect_error(&resp, 400, "DIGEST_INVALID", "PUT by a wrong digest");

    // Nothing refused was stored.
    let resp = aio.client().get(&format!("/v2/{repo}/manifests/bad")).await;
    expect_error(
        &resp,
        404,
        "MANIFEST_UNKNOWN",
        "no refused manifest under the tag",
    );
    for body in [&good, &absent_layer, &absent_config, &foreign] {
        let d = sha256_digest(body);
        let resp = aio.client().get(&format!("/v2/{repo}/manifests/{d}")).await;
        expect(&resp, 404, "no refused manifest by digest");
    }

    // Over 4 MiB: 413. Just under it: accepted.
    let padding = |len: usize| json!({ "annotations": { "pad": "x".repeat(len) } });
    let base_len = oci_manifest(&config, &[&layer], padding(0)).len();
    let limit = 4 * 1024 * 1024;
    let too_big = oci_manifest(&config, &[&layer], padding(limit + 1 - base_len));
    assert_eq!(too_big.len(), limit + 1);
    let resp = put_manifest(&pusher, repo, "big", OCI_MANIFEST, &too_big).await;
    let codes = resp.assert_oci_error(413);
    assert!(!codes.is_empty());
    let just_fits = oci_manifest(&config, &[&layer], padding(limit - base_len));
    assert_eq!(just_fits.len(), limit);
    put_manifest_ok(&pusher, repo, "big", OCI_MANIFEST, &just_fits).await;

    // The good one, by digest: stored, no tag.
    let digest = sha256_digest(&good);
    put_manifest_ok(&pusher, repo, &digest, OCI_MANIFEST, &good).await;
    let resp = aio.client().get(&format!("/v2/{repo}/tags/list")).await;
    expect(&resp, 200, "tags");
    assert_eq!(resp.json()["tags"], json!(["big"]));
    aio.gate.stop().await;
}

async fn manifest_kinds_indexes_and_docker_types(backend: Backend) {
    let aio = AllInOne::start_with(AllInOneOptions::on(backend)).await;
    let pusher = aio.pusher();
    let anon = aio.client();
    let repo = "man/kinds";
    let (config_a, layer_a) = push_blobs(&pusher, repo, 81).await;
    let (config_b, layer_b) = push_blobs(&pusher, repo, 82).await;
    let amd64 = oci_manifest(&config_a, &[&layer_a], json!({}));
    let arm64 = oci_manifest(&config_b, &[&layer_b], json!({}));
    put_manifest_ok(&pusher, repo, &sha256_digest(&amd64), OCI_MANIFEST, &amd64).await;

    // An index whose child is missing, or is a blob and not a manifest.
    let missing = index(
        OCI_INDEX,
        &[
            (OCI_MANIFEST, &amd64, "amd64"),
            (OCI_MANIFEST, &arm64, "arm64"),
        ],
    );
    let resp = put_manifest(&pusher, repo, "multi", OCI_INDEX, &missing).await;
    expect_error(
        &resp,
        400,
        "MANIFEST_BLOB_UNKNOWN",
        "index with a missing child",
    );
    let blob_child = index(OCI_INDEX, &[(OCI_MANIFEST, &layer_a, "amd64")]);
    let resp = put_manifest(&pusher, repo, "multi", OCI_INDEX, &blob_child).await;
    expect_error(
        &resp,
        400,
        "MANIFEST_BLOB_UNKNOWN",
        "index whose child is a layer",
    );

    put_manifest_ok(&pusher, repo, &sha256_digest(&arm64), OCI_MANIFEST, &arm64).await;
    put_manifest_ok(&pusher, repo, "multi", OCI_INDEX, &missing).await;
    for method in ["GET", "HEAD"] {
        let resp = anon
            .request(
                method,
                &format!("/v2/{repo}/manifests/multi"),
                &[("accept", OCI_INDEX)],
                empty(),
            )
            .await;
        expect(&resp, 200, "GET index");
        assert_eq!(resp.header("content-type"), Some(OCI_INDEX));
        assert_eq!(
            resp.header("docker-content-digest"),
            Some(sha256_digest(&missing).as_str())
        );
        assert_eq!(
            resp.header("content-length"),
            Some(missing.len().to_string().as_str())
        );
    }

    // Docker schema 2 and its manifest list.
    let docker = docker_manifest(&config_a, &[&layer_a]);
    put_manifest_ok(&pusher, repo, "docker", DOCKER_MANIFEST, &docker).await;
    let list = index(DOCKER_LIST, &[(DOCKER_MANIFEST, &docker, "amd64")]);
    put_manifest_ok(&pusher, repo, "docker-list", DOCKER_LIST, &list).await;
    for (tag, media_type, bytes) in [
        ("docker", DOCKER_MANIFEST, &docker),
        ("docker-list", DOCKER_LIST, &list),
    ] {
        let resp = get_accepting(&anon, &format!("/v2/{repo}/manifests/{tag}")).await;
        expect(&resp, 200, tag);
        assert_eq!(resp.header("content-type"), Some(media_type), "{tag}");
        assert_eq!(&resp.body[..], &bytes[..], "{tag}");
    }

    // An OCI manifest without mediaType is served as one.
    let bare = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "config": descriptor(OCI_CONFIG, &config_a),
        "layers": [descriptor(OCI_LAYER, &layer_a)],
    }))
    .expect("bare manifest");
    put_manifest_ok(&pusher, repo, "bare", OCI_MANIFEST, &bare).await;
    let resp = get_accepting(&anon, &format!("/v2/{repo}/manifests/bare")).await;
    expect(&resp, 200, "bare");
    assert_eq!(resp.header("content-type"), Some(OCI_MANIFEST));

    // An artifact: artifactType, the empty config.
    upload_blob(&pusher, repo, b"{}", UploadMode::Monolithic).await;
    let artifact = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": "application/vnd.example.thing.v1",
        "config": descriptor(EMPTY_CONFIG, b"{}"),
        "layers": [descriptor("application/vnd.example.thing.layer", &layer_b)],
    }))
    .expect("artifact");
    put_manifest_ok(&pusher, repo, "artifact", OCI_MANIFEST, &artifact).await;
    assert_complete(&anon, repo, "artifact").await;
    aio.gate.stop().await;
}

async fn subject_gives_oci_subject_and_referrers_list_and_filter(backend: Backend) {
    let aio = AllInOne::start_with(AllInOneOptions::on(backend)).await;
    let pusher = aio.pusher();
    let anon = aio.client();
    let repo = "ref/app";
    let image = push_image(
        &pusher,
        repo,
        "v1",
        &three_layers(91),
        UploadMode::Monolithic,
    )
    .await;
    upload_blob(&pusher, repo, b"{}", UploadMode::Monolithic).await;
    let payload = pseudo_random_bytes(500, 92);
    upload_blob(&pusher, repo, &payload, UploadMode::Monolithic).await;
    let subject = json!({
        "mediaType": OCI_MANIFEST,
        "digest": image.manifest_digest,
        "size": image.manifest.len(),
    });
    let referrer = |artifact_type: &str, note: &str, subject: &serde_json::Value| {
        serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": artifact_type,
            "config": descriptor(EMPTY_CONFIG, b"{}"),
            "layers": [descriptor("application/octet-stream", &payload)],
            "subject": subject,
            "annotations": { "org.example.note": note },
        }))
        .expect("referrer")
    };
    let sbom = referrer("application/vnd.example.sbom.v1", "sbom", &subject);
    let sig = referrer("application/vnd.example.signature.v1", "sig", &subject);
    for m in [&sbom, &sig] {
        let resp = put_manifest_ok(&pusher, repo, &sha256_digest(m), OCI_MANIFEST, m).await;
        assert_eq!(
            resp.header("oci-subject"),
            Some(image.manifest_digest.as_str()),
            "PUT of a manifest with a subject: OCI-Subject"
        );
    }
    // A referrer without artifactType: its config's media type stands in.
    let config_typed = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": descriptor("application/vnd.example.config.v1+json", b"{}"),
        "layers": [descriptor("application/octet-stream", &payload)],
        "subject": subject,
    }))
    .expect("config-typed referrer");
    put_manifest_ok(
        &pusher,
        repo,
        &sha256_digest(&config_typed),
        OCI_MANIFEST,
        &config_typed,
    )
    .await;
    // No subject, no header.
    let plain = oci_manifest(&image.config, &[], json!({}));
    let resp = put_manifest_ok(&pusher, repo, "plain", OCI_MANIFEST, &plain).await;
    assert_eq!(
        resp.header("oci-subject"),
        None,
        "no subject, no OCI-Subject"
    );

    let path = format!("/v2/{repo}/referrers/{}", image.manifest_digest);
    let resp = anon.get(&path).await;
    expect(&resp, 200, "referrers");
    assert_eq!(resp.header("content-type"), Some(OCI_INDEX));
    assert_eq!(
        resp.header("oci-filters-applied"),
        None,
        "no filter asked, none applied"
    );
    let listed = resp.json();
    assert_eq!(listed["schemaVersion"], 2);
    assert_eq!(listed["mediaType"], OCI_INDEX);
    let mut found: Vec<(String, String, u64)> = listed["manifests"]
        .as_array()
        .expect("manifests")
        .iter()
        .map(|d| {
            assert_eq!(d["mediaType"], OCI_MANIFEST, "{d}");
            (
                d["digest"].as_str().expect("digest").to_owned(),
                d["artifactType"].as_str().expect("artifactType").to_owned(),
                d["size"].as_u64().expect("size"),
            )
        })
        .collect();
    found.sort();
    let mut expected = vec![
        (
            sha256_digest(&sbom),
            "application/vnd.example.sbom.v1".to_owned(),
            sbom.len() as u64,
        ),
        (
            sha256_digest(&sig),
            "application/vnd.example.signature.v1".to_owned(),
            sig.len() as u64,
        ),
        (
            sha256_digest(&config_typed),
            "application/vnd.example.config.v1+json".to_owned(),
            config_typed.len() as u64,
        ),
    ];
    expected.sort();
    assert_eq!(found, expected, "referrers of the image");
    let sbom_entry = listed["manifests"]
        .as_array()
        .expect("manifests")
        .iter()
        .find(|d| d["digest"] == sha256_digest(&sbom).as_str())
        .expect("sbom listed");
    assert_eq!(
        sbom_entry["annotations"]["org.example.note"], "sbom",
        "annotations carried"
    );

    let resp = anon
        .get(&format!(
            "{path}?artifactType=application/vnd.example.sbom.v1"
        ))
        .await;
    expect(&resp, 200, "filtered referrers");
    assert_eq!(resp.header("oci-filters-applied"), Some("artifactType"));
    let digests: Vec<String> = resp.json()["manifests"]
        .as_array()
        .expect("manifests")
        .iter()
        .map(|d| d["digest"].as_str().expect("digest").to_owned())
        .collect();
    assert_eq!(
        digests,
        [sha256_digest(&sbom)],
        "only the sbom has that artifactType"
    );

    // Unknown subject: an empty index, 200.
    for unknown in [
        sha256_digest(b"nobody refers to this"),
        sha256_digest(&plain),
    ] {
        let resp = anon.get(&format!("/v2/{repo}/referrers/{unknown}")).await;
        expect(&resp, 200, "referrers of an unknown digest");
        assert_eq!(resp.header("content-type"), Some(OCI_INDEX));
        assert_eq!(resp.json()["manifests"], json!([]));
    }

    // A subject that does not exist (yet) is accepted, and listed.
    let ghost = json!({
        "mediaType": OCI_MANIFEST,
        "digest": sha256_digest(b"pushed later"),
        "size": 12,
    });
    let early = referrer("application/vnd.example.sbom.v1", "early", &ghost);
    let resp = put_manifest_ok(&pusher, repo, &sha256_digest(&early), OCI_MANIFEST, &early).await;
    assert_eq!(
        resp.header("oci-subject"),
        Some(sha256_digest(b"pushed later").as_str())
    );
    let resp = anon
        .get(&format!(
            "/v2/{repo}/referrers/{}",
            sha256_digest(b"pushed later")
        ))
        .await;
    expect(&resp, 200, "referrers of a missing subject");
    assert_eq!(
        resp.json()["manifests"][0]["digest"],
        sha256_digest(&early).as_str()
    );
    aio.gate.stop().await;
}

// ---------------------------------------------------------------------------
// listing

async fn tags_list_pages_in_lexical_order(backend: Backend) {
    let aio = AllInOne::start_with(AllInOneOptions::on(backend)).await;
    let pusher = aio.pusher();
    let anon = aio.client();
    let repo = "list/tags";
    let (config, layer) = push_blobs(&pusher, repo, 101).await;
    let manifest = oci_manifest(&config, &[&layer], json!({}));
    let tags = [
        "v2", "latest", "v10", "a", "B", "v1.0", "v1", "_under", "1.0", "v1-rc", "Z9", "v1.0.1",
    ];
    for tag in tags {
        put_manifest_ok(&pusher, repo, tag, OCI_MANIFEST, &manifest).await;
    }
    let mut expected: Vec<String> = tags.iter().map(|t| t.to_string()).collect();
    expected.sort();

    let resp = anon.get(&format!("/v2/{repo}/tags/list")).await;
    expect(&resp, 200, "tags/list");
    assert_eq!(resp.header("link"), None, "everything fits: no Link");
    assert_eq!(resp.json(), json!({ "name": repo, "tags": expected }));

    for n in [1, 3, 5, 12, 13] {
        let first = format!("/v2/{repo}/tags/list?n={n}");
        let resp = anon.get(&first).await;
        expect(&resp, 200, &first);
        let page: Vec<String> = serde_json::from_value(resp.json()["tags"].clone()).expect("tags");
        assert_eq!(page, expected[..n.min(expected.len())], "{first}");
        if n < expected.len() {
            let link = next_link(&resp, &anon).unwrap_or_else(|| panic!("{first}: no Link"));
            assert!(
                link.contains(&format!("n={n}")) && link.contains(&format!("last={}", page[n - 1])),
                "{first}: Link {link}"
            );
        } else {
            assert_eq!(resp.header("link"), None, "{first}: last page, no Link");
        }
        assert_eq!(
            all_pages(&anon, &first, "tags", n).await,
            expected,
            "pages of {n}"
        );
    }
    let resp = anon.get(&format!("/v2/{repo}/tags/list?last=v1")).await;
    expect(&resp, 200, "last=v1");
    let after: Vec<String> = expected
        .iter()
        .filter(|t| t.as_str() > "v1")
        .cloned()
        .collect();
    assert_eq!(resp.json()["tags"], json!(after));
    let resp = anon
        .get(&format!("/v2/{repo}/tags/list?n=2&last=latest"))
        .await;
    let after: Vec<String> = expected
        .iter()
        .filter(|t| t.as_str() > "latest")
        .take(2)
        .cloned()
        .collect();
    assert_eq!(resp.json()["tags"], json!(after));

    let resp = anon.get("/v2/list/unknown/tags/list").await;
    expect_error(&resp, 404, "NAME_UNKNOWN", "tags of an unknown repository");
    aio.gate.stop().await;
}

/// `n=0` asks for an empty page; a `Link` from it must lead somewhere else, or a
/// client following `rel="next"` requests the same page forever.
async fn a_next_link_never_points_back_at_the_same_page(backend: Backend) {
    let aio = AllInOne::start_with(AllInOneOptions::on(backend)).await;
    let pusher = aio.pusher();
    let anon = aio.client();
    let (config, layer) = push_blobs(&pusher, "list/zero", 105).await;
    let manifest = oci_manifest(&config, &[&layer], json!({}));
    put_manifest_ok(&pusher, "list/zero", "v1", OCI_MANIFEST, &manifest).await;
    for (path, field) in [
        ("/v2/list/zero/tags/list?n=0", "tags"),
        ("/v2/_catalog?n=0", "repositories"),
    ] {
        let resp = anon.get(path).await;
        expect(&resp, 200, path);
        assert_eq!(
            resp.json()[field],
            json!([]),
            "{path}: n=0 gives an empty list"
        );
        if let Some(next) = next_link(&resp, &anon) {
            assert_ne!(
                next,
                path,
                "{path} answers Link: {:?}, the same page again: a client following it loops \
                 forever",
                resp.header("link")
            );
        }
    }
    aio.gate.stop().await;
}

async fn catalog_pages_in_lexical_order(backend: Backend) {
    let aio = AllInOne::start_with(AllInOneOptions::on(backend)).await;
    let pusher = aio.pusher();
    let anon = aio.client();
    let repos = [
        "cat/b",
        "alpha",
        "cat/a/deep",
        "cat-z",
        "zeta/x",
        "cat/a",
        "beta.io/x_y",
    ];
    for (i, repo) in repos.iter().enumerate() {
        let (config, layer) = push_blobs(&pusher, repo, 110 + i as u64).await;
        let manifest = oci_manifest(&config, &[&layer], json!({}));
        put_manifest_ok(&pusher, repo, "v1", OCI_MANIFEST, &manifest).await;
    }
    // Blobs alone do not make a repository appear.
    upload_blob(
        &pusher,
        "only/blobs",
        b"just a blob",
        UploadMode::Monolithic,
    )
    .await;
    let mut expected: Vec<String> = repos.iter().map(|r| r.to_string()).collect();
    expected.sort();

    let resp = anon.get("/v2/_catalog").await;
    expect(&resp, 200, "catalog");
    assert_eq!(resp.json(), json!({ "repositories": expected }));
    for n in [1, 2, 4, 7] {
        let first = format!("/v2/_catalog?n={n}");
        assert_eq!(
            all_pages(&anon, &first, "repositories", n).await,
            expected,
            "pages of {n}"
        );
    }
    let resp = anon.get("/v2/_catalog?n=2&last=cat-z").await;
    let after: Vec<String> = expected
        .iter()
        .filter(|r| r.as_str() > "cat-z")
        .take(2)
        .cloned()
        .collect();
    assert_eq!(resp.json()["repositories"], json!(after));
    assert!(next_link(&resp, &anon).is_some(), "more follow: Link");
    aio.gate.stop().await;
}

// ---------------------------------------------------------------------------
// deletes

async fn deletes_are_unsupported_when_disabled(backend: Backend) {
    let aio = AllInOne::start_with(AllInOneOptions::on(backend)).await;
    let pusher = aio.pusher();
    let image = push_image(
        &pusher,
        "del/off",
        "v1",
        &three_layers(121),
        UploadMode::Monolithic,
    )
    .await;
    for path in [
        format!("/v2/del/off/manifests/{}", image.manifest_digest),
        "/v2/del/off/manifests/v1".to_owned(),
        format!("/v2/del/off/blobs/{}", image.layer_digests[0]),
    ] {
        let resp = pusher.request("DELETE", &path, &[], empty()).await;
        expect_error(&resp, 405, "UNSUPPORTED", &format!("DELETE {path}"));
    }
    pull_and_verify(&aio.client(), "del/off", "v1", &image).await;
    aio.gate.stop().await;
}

async fn deletes_of_manifests_tags_and_blobs_when_enabled(backend: Backend) {
    let aio = AllInOne::start_with(AllInOneOptions {
        delete: true,
        ..AllInOneOptions::on(backend)
    })
    .await;
    let pusher = aio.pusher();
    let anon = aio.client();
    let repo = "del/on";
    let image = push_image(
        &pusher,
        repo,
        "v1",
        &three_layers(131),
        UploadMode::Monolithic,
    )
    .await;
    put_manifest_ok(&pusher, repo, "v2", OCI_MANIFEST, &image.manifest).await;
    put_manifest_ok(&pusher, repo, "keep", OCI_MANIFEST, &image.manifest).await;
    let other = push_image(
        &pusher,
        repo,
        "other",
        &three_layers(132),
        UploadMode::Monolithic,
    )
    .await;

    // A non-pusher may not delete.
    let resp = aio
        .viewer()
        .request("DELETE", &format!("/v2/{repo}/manifests/v2"), &[], empty())
        .await;
    assert_eq!(resp.status, 403, "a viewer's DELETE: {}", resp.text());

    // A tag: gone; the manifest and the other tags stay.
    let resp = pusher
        .request("DELETE", &format!("/v2/{repo}/manifests/v2"), &[], empty())
        .await;
    expect(&resp, 202, "DELETE tag");
    expect_error(
        &anon.get(&format!("/v2/{repo}/manifests/v2")).await,
        404,
        "MANIFEST_UNKNOWN",
        "deleted tag",
    );
    assert_complete(&anon, repo, "v1").await;
    assert_complete(&anon, repo, &image.manifest_digest).await;
    let resp = anon.get(&format!("/v2/{repo}/tags/list")).await;
    assert_eq!(resp.json()["tags"], json!(["keep", "other", "v1"]));
    let resp = pusher
        .request("DELETE", &format!("/v2/{repo}/manifests/v2"), &[], empty())
        .await;
    expect_error(&resp, 404, "MANIFEST_UNKNOWN", "DELETE the tag again");

    // A manifest by digest: gone, with the tags pointing at it.
    let path = format!("/v2/{repo}/manifests/{}", image.manifest_digest);
    let resp = pusher.request("DELETE", &path, &[], empty()).await;
    expect(&resp, 202, "DELETE manifest by digest");
    expect_error(
        &anon.get(&path).await,
        404,
        "MANIFEST_UNKNOWN",
        "deleted manifest",
    );
    expect(&head(&anon, &path).await, 404, "HEAD deleted manifest");
    for tag in ["v1", "keep"] {
        expect_error(
            &anon.get(&format!("/v2/{repo}/manifests/{tag}")).await,
            404,
            "MANIFEST_UNKNOWN",
            &format!("tag {tag} of the deleted manifest"),
        );
    }
    let resp = anon.get(&format!("/v2/{repo}/tags/list")).await;
    assert_eq!(resp.json()["tags"], json!(["other"]));
    let resp = pusher.request("DELETE", &path, &[], empty()).await;
    expect_error(&resp, 404, "MANIFEST_UNKNOWN", "DELETE the manifest again");
    pull_and_verify(&anon, repo, "other", &other).await;

    // A blob: 202, then 404.
    let blob = format!("/v2/{repo}/blobs/{}", image.layer_digests[1]);
    expect(&head(&anon, &blob).await, 200, "HEAD blob before");
    let resp = pusher.request("DELETE", &blob, &[], empty()).await;
    expect(&resp, 202, "DELETE blob");
    expect(&head(&anon, &blob).await, 404, "HEAD deleted blob");
    expect_error(
        &anon.get(&blob).await,
        404,
        "BLOB_UNKNOWN",
        "GET deleted blob",
    );
    let resp = pusher.request("DELETE", &blob, &[], empty()).await;
    expect_error(&resp, 404, "BLOB_UNKNOWN", "DELETE the blob again");

    // The last manifest gone: the repository leaves the catalog (its layer links and,
    // on disk, empty directories stay behind until gc).
    let resp = anon.get("/v2/_catalog").await;
    assert_eq!(resp.json()["repositories"], json!([repo]), "still listed");
    let path = format!("/v2/{repo}/manifests/{}", other.manifest_digest);
    expect(
        &pusher.request("DELETE", &path, &[], empty()).await,
        202,
        "DELETE the last manifest",
    );
    let resp = anon.get("/v2/_catalog").await;
    assert_eq!(
        resp.json()["repositories"],
        json!([]),
        "a repository without manifests is not listed"
    );
    aio.gate.stop().await;
}

// ---------------------------------------------------------------------------
// path safety

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create copy");
    for entry in std::fs::read_dir(from).expect("read dir").flatten() {
        let target = to.join(entry.file_name());
        if entry.file_type().expect("type").is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy file");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn symlinks_planted_in_the_root_are_never_followed() {
    let aio = AllInOne::start().await;
    let pusher = aio.pusher();
    let anon = aio.client();
    let disk = aio.disk();
    let image = push_image(
        &pusher,
        "legit/x",
        "v1",
        &three_layers(141),
        UploadMode::Monolithic,
    )
    .await;

    // Outside the root: an empty directory (for writes) and a complete copy of a
    // repository (for reads), each reached by a symlink planted in the root.
    let empty_outside = aio.path("outside-empty");
    std::fs::create_dir_all(&empty_outside).expect("create outside dir");
    let full_outside = aio.path("outside-full");
    copy_tree(&disk.repo("legit/x"), &full_outside.join("x"));
    let repositories = disk.v2.join("repositories");
    std::os::unix::fs::symlink(&empty_outside, repositories.join("evil")).expect("plant evil");
    std::os::unix::fs::symlink(&full_outside, repositories.join("leak")).expect("plant leak");
    let full_before = snapshot(&full_outside);

    // Writes through the symlink.
    let resp = pusher
        .request(
            "POST",
            "/v2/evil/x/blobs/uploads/",
            &[("content-length", "0")],
            empty(),
        )
        .await;
    expect_refused(&resp, "POST upload under a symlink");
    let resp = pusher
        .request(
            "POST",
            &format!(
                "/v2/evil/x/blobs/uploads/?digest={}",
                image.layer_digests[0]
            ),
            &[],
            full(three_layers(141).remove(0)),
        )
        .await;
    expect_refused(&resp, "POST ?digest= under a symlink");
    let resp = pusher
        .request(
            "POST",
            &format!(
                "/v2/evil/x/blobs/uploads/?mount={}&from=legit/x",
                image.layer_digests[0]
            ),
            &[("content-length", "0")],
            empty(),
        )
        .await;
    expect_refused(&resp, "mount into a symlinked repository");
    let resp = put_manifest(&pusher, "evil/x", "v1", OCI_MANIFEST, &image.manifest).await;
    expect_refused(&resp, "PUT manifest under a symlink");

    // Reads through the symlink.
    for path in [
        "/v2/leak/x/manifests/v1".to_owned(),
        format!("/v2/leak/x/manifests/{}", image.manifest_digest),
        format!("/v2/leak/x/blobs/{}", image.layer_digests[0]),
        "/v2/leak/x/tags/list".to_owned(),
    ] {
        let resp = anon.get(&path).await;
        expect_refused(&resp, &format!("GET {path}"));
    }
    let resp = anon
        .get(&format!("/v2/leak/x/referrers/{}", image.manifest_digest))
        .await;
    assert!(
        resp.status != 200 || resp.json()["manifests"] == json!([]),
        "referrers through a symlink: {}",
        resp.text()
    );
    let resp = anon.get("/v2/_catalog").await;
    expect(&resp, 200, "catalog");
    assert_eq!(
        resp.json()["repositories"],
        json!(["legit/x"]),
        "symlinked repositories are not listed"
    );

    // Symlinks deeper down: a blob directory, a blob's data file, a tag, _uploads.
    // Contents whose 2-hex blob directories are not in use (nor each other's).
    let free_prefix = |label: &str, taken: &[String]| {
        (0u32..)
            .map(|i| format!("outside the storage root: {label} {i}").into_bytes())
            .find(|b| {
                let d = sha256_digest(b);
                let prefix = &d["sha256:".len().."sha256:".len() + 2];
                !disk.v2.join("blobs/sha256").join(prefix).exists()
                    && !taken.iter().any(|t| t.starts_with(&d[..9]))
            })
            .expect("a free prefix")
    };
    let secret = free_prefix("one", &[]);
    let secret_digest = sha256_digest(&secret);
    let blob_outside = aio.path("outside-blob");
    let hex = &secret_digest["sha256:".len()..];
    std::fs::create_dir_all(blob_outside.join(hex)).expect("outside blob dir");
    std::fs::write(blob_outside.join(hex).join("data"), &secret).expect("outside blob");
    std::os::unix::fs::symlink(&blob_outside, disk.v2.join("blobs/sha256").join(&hex[..2]))
        .expect("plant blob prefix");
    let secret2 = free_prefix("two", std::slice::from_ref(&secret_digest));
    let secret2_digest = sha256_digest(&secret2);
    let file_outside = aio.path("outside-file");
    std::fs::write(&file_outside, &secret2).expect("outside file");
    let data2 = disk.blob_data(&secret2_digest);
    std::fs::create_dir_all(data2.parent().expect("parent")).expect("blob dir");
    std::os::unix::fs::symlink(&file_outside, &data2).expect("plant data symlink");
    for d in [&secret_digest, &secret2_digest] {
        let link = disk.layer_link("legit/x", d);
        std::fs::create_dir_all(link.parent().expect("parent")).expect("link dir");
        std::fs::write(&link, d.as_bytes()).expect("plant layer link");
        let resp = anon.get(&format!("/v2/legit/x/blobs/{d}")).await;
        expect_refused(&resp, "GET a blob through a symlink");
        assert!(
            !resp.text().contains("outside"),
            "outside bytes were served: {}",
            resp.text()
        );
    }
    let tag_outside = aio.path("outside-tag");
    copy_tree(
        &disk.repo("legit/x").join("_manifests/tags/v1"),
        &tag_outside,
    );
    std::os::unix::fs::symlink(
        &tag_outside,
        disk.repo("legit/x").join("_manifests/tags/sneaky"),
    )
    .expect("plant tag");
    let resp = anon.get("/v2/legit/x/manifests/sneaky").await;
    expect_refused(&resp, "GET a tag through a symlink");
    let uploads_outside = aio.path("outside-uploads");
    std::fs::create_dir_all(&uploads_outside).expect("outside uploads");
    let uploads = disk.uploads("legit/x");
    let _ = std::fs::remove_dir_all(&uploads);
    std::os::unix::fs::symlink(&uploads_outside, &uploads).expect("plant _uploads");
    let resp = pusher
        .request(
            "POST",
            "/v2/legit/x/blobs/uploads/",
            &[("content-length", "0")],
            empty(),
        )
        .await;
    expect_refused(&resp, "POST upload into a symlinked _uploads");
    let resp = pusher
        .request(
            "POST",
            &format!(
                "/v2/legit/x/blobs/uploads/?digest={}",
                sha256_digest(b"new")
            ),
            &[],
            full(&b"new"[..]),
        )
        .await;
    expect_refused(&resp, "POST ?digest= into a symlinked _uploads");

    // Encoded separators and dot segments never reach the disk either.
    for path in [
        "/v2/legit/../evil/x/tags/list",
        "/v2/legit%2F..%2Fevil/x/tags/list",
        "/v2/evil%2Fx/tags/list",
        "/v2/legit/x/manifests/..%2F..%2Fevil",
    ] {
        let resp = anon.get(path).await;
        assert!(
            resp.status.is_client_error(),
            "{path}: {} {}",
            resp.status,
            resp.text()
        );
    }

    // Outside: untouched.
    assert_eq!(
        walk(&empty_outside),
        Vec::<std::path::PathBuf>::new(),
        "nothing written outside"
    );
    assert_eq!(
        std::fs::read_dir(&empty_outside).expect("dir").count(),
        0,
        "not even a directory"
    );
    assert_eq!(
        std::fs::read_dir(&uploads_outside).expect("dir").count(),
        0,
        "no upload outside"
    );
    assert_eq!(
        snapshot(&full_outside),
        full_before,
        "the outside copy is unchanged"
    );
    assert_eq!(std::fs::read(&file_outside).expect("outside file"), secret2);

    // And the registry still serves what is really in it.
    pull_and_verify(&anon, "legit/x", "v1", &image).await;
    aio.gate.stop().await;
}

// ---------------------------------------------------------------------------
// kill -9, concurrency, full disk, abandoned uploads

/// The last path segment of an upload Location: its id.
fn upload_id(location: &str) -> String {
    location
        .split('?')
        .next()
        .and_then(|p| p.rsplit('/').next())
        .expect("upload id")
        .to_owned()
}

async fn kill_9_during_a_blob_upload_and_manifest_puts_leaves_nothing_partial(backend: Backend) {
    init_tracing();
    let dir = tempfile::Builder::new()
        .prefix("registry-gate-kill9")
        .tempdir()
        .expect("tempdir");
    let ca = Ca::new(
        &dir.path().join("ca"),
        "registry-gate test CA",
        KeyAlg::EcP256,
    );
    let leaf = ca.issue("localhost", KeyAlg::EcP256, KeyEncoding::Pkcs8);
    let store = TestStore::new(backend, dir.path());
    let listen = free_loopback_port();
    let config = write_binary_config(
        &dir.path().join("bin"),
        &leaf,
        listen,
        &store.gate_lines(true, None),
    );
    let mut process = Process::spawn(&config, listen, &dir.path().join("registry-gate.log"));
    let client = Client::new(listen, &[&ca.cert]);
    process.wait_ready(&client).await;
    let pusher = client.with_basic(PUSHER.0, PUSHER.1);
    let base = push_image(
        &pusher,
        "crash/base",
        "v1",
        &three_layers(151),
        UploadMode::Chunked(50_000),
    )
    .await;

    // 1. A big blob: the closing PUT has sent half of it when the process dies.
    const BIG: u64 = 48 * 1024 * 1024;
    const SENT: u64 = 24 * 1024 * 1024;
    const SEED: u64 = 152;
    let big_digest = tokio::task::spawn_blocking(|| generated_digest(BIG, SEED))
        .await
        .expect("hash");
    let location = start_upload(&pusher, "crash/big").await;
    let id = upload_id(&location);
    let put = {
        let pusher = pusher.clone();
        let path = with_digest(&location, &big_digest);
        tokio::spawn(async move {
            pusher
                .try_request(
                    "PUT",
                    &path,
                    &[("content-type", "application/octet-stream")],
                    stalling(SENT, SEED),
                )
                .await
        })
    };
    // On disk: the data file holds all that was sent. In a bucket the upload's state
    // records its progress per 8 MiB part: two of them.
    let (reached, what) = match backend {
        Backend::Fs => (SENT, "half of the big blob to reach the disk"),
        Backend::S3 => (
            16 * 1024 * 1024,
            "two parts of the big blob to be recorded in the bucket",
        ),
    };
    eventually(what, || {
        let (store, id) = (store.clone(), id.clone());
        async move { (store.upload_bytes("crash/big", &id).await >= reached).then_some(()) }
    })
    .await;
    process.kill9();
    let outcome = put.await.expect("PUT task");
    assert!(
        !matches!(&outcome, Ok(resp) if resp.status.is_success()),
        "the cut-off PUT succeeded: {outcome:?}"
    );

    // 2. Manifest PUTs from four clients, tags rewritten over and over.
    process.restart(&client).await;
    let (config_bytes, layer) = push_blobs(&pusher, "crash/loop", 153).await;
    let done = Arc::new(AtomicUsize::new(0));
    let mut loops = Vec::new();
    for task in 0..4 {
        let pusher = pusher.clone();
        let done = done.clone();
        let (config_bytes, layer) = (config_bytes.clone(), layer.clone());
        loops.push(tokio::spawn(async move {
            for i in 0.. {
                let manifest = oci_manifest(
                    &config_bytes,
                    &[&layer],
                    json!({ "annotations": { "n": format!("{task}-{i}") } }),
                );
                let tag = format!("t{}", i % 5);
                match pusher
                    .try_request(
                        "PUT",
                        &format!("/v2/crash/loop/manifests/{tag}"),
                        &[("content-type", OCI_MANIFEST)],
                        full(manifest),
                    )
                    .await
                {
                    Ok(resp) if resp.status == 201 => {
                        done.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(resp) => {
                        return Err(format!(
                            "PUT {tag} answered {} {}",
                            resp.status,
                            resp.text()
                        ));
                    }
                    Err(_) => return Ok(()),
                }
            }
            Ok(())
        }));
    }
    eventually("60 manifest PUTs", || {
        let done = done.clone();
        async move { (done.load(Ordering::SeqCst) >= 60).then_some(()) }
    })
    .await;
    process.kill9();
    for l in loops {
        if let Err(e) = l.await.expect("PUT loop") {
            // A response cut by the kill is an error of the transport, never a status.
            panic!("{e}");
        }
    }

    // After the restart: nothing partial is visible.
    process.restart(&client).await;
    let anon = client.clone();
    expect(
        &head(&anon, &format!("/v2/crash/big/blobs/{big_digest}")).await,
        404,
        "the unfinished blob",
    );
    assert!(
        !store.exists(&blob_key(&big_digest)).await,
        "no blob data for the unfinished upload"
    );
    let resp = anon.get("/v2/crash/loop/tags/list").await;
    expect(&resp, 200, "tags after the kill");
    let tags: Vec<String> = serde_json::from_value(resp.json()["tags"].clone()).expect("tags");
    assert_eq!(tags, ["t0", "t1", "t2", "t3", "t4"]);
    for tag in &tags {
        assert_complete(&anon, "crash/loop", tag).await;
    }
    let revisions = store
        .keys(&format!("{}/_manifests/revisions", repo_key("crash/loop")))
        .await;
    assert!(revisions.len() >= 5, "{revisions:?}");
    for link in revisions.iter().filter(|k| k.ends_with("/link")) {
        let digest = String::from_utf8(store.read(link).await.expect("revision link"))
            .expect("a UTF-8 revision link");
        assert_complete(&anon, "crash/loop", &digest).await;
    }
    pull_and_verify(&anon, "crash/base", "v1", &base).await;

    // Pushing the same content again succeeds: the big blob afresh, the cut-off
    // upload resumed, the manifests and the base image.
    let fresh = start_upload(&pusher, "crash/big").await;
    let resp = pusher
        .request(
            "PUT",
            &with_digest(&fresh, &big_digest),
            &[],
            generated(BIG, SEED),
        )
        .await;
    expect(&resp, 201, "the big blob pushed again");
    let resp = anon
        .send(
            "GET",
            &format!("/v2/crash/big/blobs/{big_digest}"),
            &[],
            empty(),
        )
        .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        read_body_digest(&mut resp.into_body()).await,
        (BIG, big_digest.clone())
    );
    let resp = pusher.get(&location).await;
    expect(&resp, 204, "the cut-off upload after the restart");
    let range = header(&resp, "range").to_owned();
    let held: u64 = range
        .strip_prefix("0-")
        .and_then(|e| e.parse::<u64>().ok())
        .map(|e| e + 1)
        .unwrap_or_else(|| panic!("Range {range}"));
    // On disk it holds what reached the data file; in a bucket, whole parts (whose
    // sizes need not be multiples of 8).
    assert!(
        held <= SENT && (backend == Backend::S3 || held.is_multiple_of(8)),
        "the cut-off upload holds {held} bytes"
    );
    let resp = pusher
        .request(
            "PUT",
            &with_digest(&location, &big_digest),
            &[("content-range", &format!("{held}-{}", BIG - 1))],
            generated_part(held, BIG - held, SEED),
        )
        .await;
    expect(&resp, 201, "the cut-off upload resumed and finished");
    for i in 0..5 {
        let manifest = oci_manifest(
            &config_bytes,
            &[&layer],
            json!({ "annotations": { "n": format!("0-{i}") } }),
        );
        put_manifest_ok(
            &pusher,
            "crash/loop",
            &format!("t{i}"),
            OCI_MANIFEST,
            &manifest,
        )
        .await;
    }
    let again = push_image(
        &pusher,
        "crash/base",
        "v1",
        &three_layers(151),
        UploadMode::Monolithic,
    )
    .await;
    assert_eq!(again.manifest_digest, base.manifest_digest);
    pull_and_verify(&anon, "crash/base", "v1", &again).await;
    assert_eq!(store.open_uploads("crash/big").await, Vec::<String>::new());
}

/// What a `kill -9` between the first two writes of a new tag leaves on disk (the
/// manifest and its revision in place, the tag's directory made, its `current/link`
/// not yet written) must not be visible as a tag.
async fn a_new_tag_cut_off_before_its_current_link_is_not_listed(backend: Backend) {
    let aio = AllInOne::start_with(AllInOneOptions::on(backend)).await;
    let pusher = aio.pusher();
    let anon = aio.client();
    let store = &aio.store;
    let image = push_image(
        &pusher,
        "cut/tag",
        "v1",
        &three_layers(161),
        UploadMode::Monolithic,
    )
    .await;
    // `put_manifest` writes the tag's index link, then its current link; and on disk
    // the current link through a temporary file in `current/`.
    store
        .write(
            &tag_index_key("cut/tag", "v2", &image.manifest_digest),
            image.manifest_digest.as_bytes(),
        )
        .await;
    let current_link = tag_current_key("cut/tag", "v3");
    let current_dir = current_link.strip_suffix("/link").expect("…/current/link");
    store
        .write(
            &format!("{current_dir}/.tmp-0123456789abcdef"),
            &image.manifest_digest.as_bytes()[..10],
        )
        .await;

    for tag in ["v2", "v3"] {
        let resp = anon.get(&format!("/v2/cut/tag/manifests/{tag}")).await;
        expect_error(&resp, 404, "MANIFEST_UNKNOWN", tag);
    }
    let resp = anon.get("/v2/cut/tag/tags/list").await;
    expect(&resp, 200, "tags/list");
    assert_eq!(
        resp.json()["tags"],
        json!(["v1"]),
        "tags/list shows tags whose current/link was never written (GET of them is 404)"
    );
    aio.gate.stop().await;
}

async fn concurrent_pushes_of_the_same_blob_manifest_and_tag_end_consistent(backend: Backend) {
    let aio = AllInOne::start_with(AllInOneOptions::on(backend)).await;
    let pusher = aio.pusher();
    let anon = aio.client();
    let store = &aio.store;
    let repo = "race/app";
    let layers = three_layers(171);
    let (config, manifest) = common::image::config_and_manifest(&layers);
    let big = pseudo_random_bytes(3 * 1024 * 1024 + 5, 172);
    let big_digest = sha256_digest(&big);

    let mut tasks = Vec::new();
    for task in 0..8u64 {
        let pusher = pusher.clone();
        let (layers, config, manifest, big) = (
            layers.clone(),
            config.clone(),
            manifest.clone(),
            big.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mode = match task % 3 {
                0 => UploadMode::Monolithic,
                1 => UploadMode::Chunked(256 * 1024),
                _ => UploadMode::Streamed,
            };
            upload_blob(&pusher, repo, &big, mode).await;
            upload_blob(&pusher, repo, &config, mode).await;
            for layer in &layers {
                upload_blob(&pusher, repo, layer, mode).await;
            }
            put_manifest_ok(&pusher, repo, "same", OCI_MANIFEST, &manifest).await;
            let own = oci_manifest(
                &config,
                &[],
                json!({ "annotations": { "task": task.to_string() } }),
            );
            put_manifest_ok(&pusher, repo, "race", OCI_MANIFEST, &own).await;
            sha256_digest(&own)
        }));
    }
    let mut own_digests = BTreeSet::new();
    for t in tasks {
        own_digests.insert(t.await.expect("push task"));
    }

    let resp = anon
        .send(
            "GET",
            &format!("/v2/{repo}/blobs/{big_digest}"),
            &[],
            empty(),
        )
        .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        read_body_digest(&mut resp.into_body()).await,
        (big.len() as u64, big_digest.clone())
    );
    assert_eq!(
        assert_complete(&anon, repo, "same").await,
        sha256_digest(&manifest)
    );
    let race = assert_complete(&anon, repo, "race").await;
    assert!(
        own_digests.contains(&race),
        "race resolves to one of the pushed manifests"
    );
    for d in &own_digests {
        assert_complete(&anon, repo, d).await;
    }
    let resp = anon.get(&format!("/v2/{repo}/tags/list")).await;
    assert_eq!(resp.json()["tags"], json!(["race", "same"]));
    assert_eq!(
        store.unfinished_writes().await,
        Vec::<String>::new(),
        "no temporary file (or multipart upload) left"
    );
    assert_eq!(
        store.open_uploads(repo).await,
        Vec::<String>::new(),
        "no upload left"
    );
    let data = blob_key(&big_digest);
    let blob_dir = data.strip_suffix("/data").expect("…/data");
    assert_eq!(
        store.names(blob_dir).await,
        ["data"],
        "one data file per blob"
    );
    aio.gate.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_fails_cleanly_and_reads_go_on() {
    let mount_dir = tempfile::Builder::new()
        .prefix("registry-gate-tmpfs")
        .tempdir()
        .expect("tempdir");
    let tmpfs = Tmpfs::mount(&mount_dir.path().join("fs"), "8m");
    let aio = AllInOne::start_with(AllInOneOptions {
        root: Some(tmpfs.path.clone()),
        ..AllInOneOptions::default()
    })
    .await;
    let pusher = aio.pusher();
    let anon = aio.client();
    let disk = aio.disk();
    let small = push_image(
        &pusher,
        "disk/small",
        "v1",
        &three_layers(181),
        UploadMode::Monolithic,
    )
    .await;

    // 12 MiB in 1 MiB chunks into 8 MiB.
    let big = pseudo_random_bytes(12 * 1024 * 1024, 182);
    let big_digest = sha256_digest(&big);
    let location = start_upload(&pusher, "disk/big").await;
    let mut failure = None;
    for (i, chunk) in big.chunks(1024 * 1024).enumerate() {
        let start = i * 1024 * 1024;
        let resp = pusher
            .try_request(
                "PATCH",
                &location,
                &[(
                    "content-range",
                    &format!("{start}-{}", start + chunk.len() - 1),
                )],
                full(chunk.to_vec()),
            )
            .await
            .unwrap_or_else(|e| panic!("PATCH at {start} on a full disk: no response: {e}"));
        if resp.status != 202 {
            failure = Some(resp);
            break;
        }
    }
    let failure = failure.expect("12 MiB fitted into an 8 MiB disk");
    assert!(
        failure.status.is_server_error(),
        "a full disk is a server error: {} {}",
        failure.status,
        failure.text()
    );
    failure.assert_oci_error(failure.status.as_u16());
    expect(
        &head(&anon, &format!("/v2/disk/big/blobs/{big_digest}")).await,
        404,
        "no partial blob",
    );
    assert!(!disk.blob_data(&big_digest).exists());

    // Reads go on.
    pull_and_verify(&anon, "disk/small", "v1", &small).await;
    expect(
        &anon.get("/v2/_catalog").await,
        200,
        "catalog on a full disk",
    );

    // A manifest PUT on a disk that is full to the last byte.
    let filler = tmpfs.path.join("filler");
    {
        use std::io::Write as _;
        let mut f = std::fs::File::create(&filler).expect("filler");
        let block = vec![0u8; 64 * 1024];
        loop {
            match f.write(&block) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) => {
                    assert_eq!(e.raw_os_error(), Some(28), "ENOSPC expected: {e}");
                    break;
                }
            }
        }
    }
    let manifest = oci_manifest(
        &small.config,
        &[],
        json!({ "annotations": { "full": "yes" } }),
    );
    let resp = put_manifest(&pusher, "disk/small", "v2", OCI_MANIFEST, &manifest).await;
    assert!(
        resp.status.is_server_error(),
        "manifest PUT on a full disk: {} {}",
        resp.status,
        resp.text()
    );
    resp.assert_oci_error(resp.status.as_u16());
    expect(
        &anon.get("/v2/disk/small/manifests/v2").await,
        404,
        "no tag from the failed PUT",
    );
    assert_eq!(
        disk.temporary_files(),
        Vec::<std::path::PathBuf>::new(),
        "no temporary file left"
    );
    pull_and_verify(&anon, "disk/small", "v1", &small).await;
    std::fs::remove_file(&filler).expect("remove filler");

    // Cancel the failed upload; a small push works again.
    let resp = pusher.request("DELETE", &location, &[], empty()).await;
    expect(&resp, 204, "DELETE the failed upload");
    let after = push_image(
        &pusher,
        "disk/after",
        "v1",
        &three_layers(183),
        UploadMode::Chunked(64 * 1024),
    )
    .await;
    pull_and_verify(&anon, "disk/after", "v1", &after).await;
    aio.gate.stop().await;
    drop(tmpfs);
}

/// `chattr +i` on a directory (even root may not create entries in it); undone on drop.
struct Immutable(std::path::PathBuf);

impl Immutable {
    fn set(dir: &Path) -> Immutable {
        let out = std::process::Command::new("chattr")
            .arg("+i")
            .arg(dir)
            .output()
            .unwrap_or_else(|e| panic!("this test needs chattr (e2fsprogs): {e}"));
        assert!(
            out.status.success(),
            "chattr +i {} failed (the filesystem must support it): {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Immutable(dir.to_path_buf())
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = std::process::Command::new("chattr")
            .arg("-i")
            .arg(&self.0)
            .output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permission_error_is_a_5xx_and_reads_go_on() {
    let aio = AllInOne::start().await;
    let pusher = aio.pusher();
    let anon = aio.client();
    let disk = aio.disk();
    let repo = "perm/app";
    let image = push_image(
        &pusher,
        repo,
        "v1",
        &three_layers(191),
        UploadMode::Monolithic,
    )
    .await;
    let manifest = oci_manifest(
        &image.config,
        &[],
        json!({ "annotations": { "perm": "x" } }),
    );
    {
        let _tags = Immutable::set(&disk.repo(repo).join("_manifests/tags"));
        let _uploads = Immutable::set(&disk.uploads(repo));
        let resp = put_manifest(&pusher, repo, "v2", OCI_MANIFEST, &manifest).await;
        assert!(
            resp.status.is_server_error(),
            "a tag that cannot be written: {} {}",
            resp.status,
            resp.text()
        );
        resp.assert_oci_error(resp.status.as_u16());
        let resp = pusher
            .request(
                "POST",
                &format!("/v2/{repo}/blobs/uploads/"),
                &[("content-length", "0")],
                empty(),
            )
            .await;
        assert!(
            resp.status.is_server_error(),
            "an upload that cannot be created: {} {}",
            resp.status,
            resp.text()
        );
        resp.assert_oci_error(resp.status.as_u16());
        expect(
            &anon.get(&format!("/v2/{repo}/manifests/v2")).await,
            404,
            "no v2",
        );
        pull_and_verify(&anon, repo, "v1", &image).await;
    }
    put_manifest_ok(&pusher, repo, "v2", OCI_MANIFEST, &manifest).await;
    aio.gate.stop().await;
}

async fn abandoned_uploads_are_purged(backend: Backend) {
    let aio = AllInOne::start_with(AllInOneOptions {
        purge_uploads_after_secs: Some(1),
        ..AllInOneOptions::on(backend)
    })
    .await;
    let pusher = aio.pusher();
    let store = &aio.store;
    let location = start_upload(&pusher, "purge/app").await;
    expect(
        &patch(&pusher, &location, 0, b"abandoned").await,
        202,
        "PATCH",
    );
    // One with data in it: 6 MiB in one request is a part of a multipart upload in a
    // bucket (at least 5 MiB), which the purge must abort.
    let big = start_upload(&pusher, "purge/app").await;
    let resp = patch(&pusher, &big, 0, &pseudo_random_bytes(6 * 1024 * 1024, 195)).await;
    expect(&resp, 202, "PATCH 6 MiB");
    let unfinished = store.unfinished_writes().await;
    if backend == Backend::S3 && pusher.get(&big).await.status == 204 {
        // Not purged yet after the listing, so it was there during it.
        assert!(
            !unfinished.is_empty(),
            "a 6 MiB PATCH left no multipart upload in progress"
        );
    }
    // A request that goes quiet for longer than the purge age is still open: its
    // session is not idle, and the upload finishes once the client comes back.
    let data = pseudo_random_bytes(12 * 1024 * 1024, 196);
    let digest = sha256_digest(&data);
    let slow = start_upload(&pusher, "purge/app").await;
    let sep = if slow.contains('?') { '&' } else { '?' };
    let resp = pusher
        .request(
            "PUT",
            &format!("{slow}{sep}digest={digest}"),
            &[("content-type", "application/octet-stream")],
            paused(
                Bytes::copy_from_slice(&data[..9 * 1024 * 1024]),
                std::time::Duration::from_secs(4),
                Bytes::copy_from_slice(&data[9 * 1024 * 1024..]),
            ),
        )
        .await;
    expect(
        &resp,
        201,
        "a closing PUT that paused for 4 s (purge age 1 s)",
    );
    let resp = pusher
        .send(
            "GET",
            &format!("/v2/purge/app/blobs/{digest}"),
            &[],
            empty(),
        )
        .await;
    assert_eq!(
        read_body_digest(&mut resp.into_body()).await,
        (data.len() as u64, digest.clone())
    );
    let kept = upload_blob(&pusher, "purge/app", b"finished", UploadMode::Monolithic).await;
    for location in [&location, &big] {
        eventually("the abandoned upload to be purged", || {
            let (pusher, location) = (pusher.clone(), location.clone());
            async move { (pusher.get(&location).await.status == 404).then_some(()) }
        })
        .await;
        expect_error(
            &pusher.get(location).await,
            404,
            "BLOB_UPLOAD_UNKNOWN",
            "purged upload",
        );
    }
    assert_eq!(store.open_uploads("purge/app").await, Vec::<String>::new());
    assert_eq!(
        store.unfinished_writes().await,
        Vec::<String>::new(),
        "the purge left temporary files (or multipart uploads) behind"
    );
    expect(
        &head(&aio.client(), &format!("/v2/purge/app/blobs/{kept}")).await,
        200,
        "finished blob kept",
    );
    aio.gate.stop().await;
}

// ---------------------------------------------------------------------------
// the CNCF layout, both ways, with Debian's docker-registry

async fn what_docker_registry_wrote_is_served_by_the_gate(backend: Backend) {
    // docker-registry behind a proxying gate writes the store (on S3 through its
    // s3-aws driver)…
    let shared = tempfile::Builder::new()
        .prefix("registry-gate-shared")
        .tempdir()
        .expect("tempdir");
    let store = TestStore::new(backend, shared.path());
    let stack = Stack::start_with(StackOptions {
        upstream: UpstreamOptions {
            storage_yaml: Some(store.registry_yaml()),
            ..UpstreamOptions::default()
        },
        ..StackOptions::default()
    })
    .await;
    let pusher = stack.pusher();
    let repo = "compat/from-distribution";
    let image = push_image(
        &pusher,
        repo,
        "v1",
        &three_layers(191),
        UploadMode::Chunked(100_000),
    )
    .await;
    put_manifest_ok(&pusher, repo, "v2", OCI_MANIFEST, &image.manifest).await;
    let multi = index(OCI_INDEX, &[(OCI_MANIFEST, &image.manifest, "amd64")]);
    put_manifest_ok(&pusher, repo, "multi", OCI_INDEX, &multi).await;
    let other = push_image(
        &pusher,
        "compat/other",
        "latest",
        &three_layers(192),
        UploadMode::Streamed,
    )
    .await;
    let resp = pusher
        .request(
            "POST",
            &format!(
                "/v2/compat/mounted/blobs/uploads/?mount={}&from={repo}",
                image.layer_digests[2]
            ),
            &[("content-length", "0")],
            empty(),
        )
        .await;
    expect(&resp, 201, "docker-registry mounts");

    // …and the built-in registry serves it as it is.
    let mut stack = stack;
    stack.upstream.stop();
    let gate = Gate::start(
        &stack.path("all-in-one"),
        GateOptions {
            storage: Some(store.gate_lines(true, None)),
            ..GateOptions::new(&stack.leaf)
        },
    )
    .await;
    let client = Client::new(gate.addr, &[&stack.ca.cert]);
    for reference in ["v1", "v2", image.manifest_digest.as_str()] {
        pull_and_verify(&client, repo, reference, &image).await;
    }
    pull_and_verify(&client, "compat/other", "latest", &other).await;
    let resp = client
        .request(
            "GET",
            &format!("/v2/{repo}/manifests/multi"),
            &[("accept", OCI_INDEX)],
            empty(),
        )
        .await;
    expect(&resp, 200, "the index docker-registry stored");
    assert_eq!(resp.header("content-type"), Some(OCI_INDEX));
    assert_eq!(&resp.body[..], &multi[..]);
    let resp = client.get(&format!("/v2/{repo}/tags/list")).await;
    assert_eq!(resp.json()["tags"], json!(["multi", "v1", "v2"]));
    let resp = client.get("/v2/_catalog").await;
    let repos = resp.json()["repositories"].clone();
    for r in [repo, "compat/other"] {
        assert!(
            repos.as_array().expect("list").contains(&json!(r)),
            "{r} in {repos}"
        );
    }
    let resp = head(
        &client,
        &format!("/v2/compat/mounted/blobs/{}", image.layer_digests[2]),
    )
    .await;
    expect(&resp, 200, "the blob docker-registry mounted");

    // It keeps working on that store: a push, a delete.
    let gate_pusher = client.with_basic(PUSHER.0, PUSHER.1);
    let more = push_image(
        &gate_pusher,
        repo,
        "v3",
        &three_layers(193),
        UploadMode::Monolithic,
    )
    .await;
    pull_and_verify(&client, repo, "v3", &more).await;
    let resp = gate_pusher
        .request("DELETE", &format!("/v2/{repo}/manifests/v2"), &[], empty())
        .await;
    expect(&resp, 202, "delete a tag docker-registry wrote");
    gate.stop().await;
}

async fn what_the_gate_wrote_is_served_by_docker_registry(backend: Backend) {
    let shared = tempfile::Builder::new()
        .prefix("registry-gate-shared")
        .tempdir()
        .expect("tempdir");
    let store = TestStore::new(backend, shared.path());
    let aio = AllInOne::start_with(AllInOneOptions {
        root: Some(store.root.clone()),
        s3: store.s3.clone(),
        delete: true,
        ..AllInOneOptions::on(backend)
    })
    .await;
    let pusher = aio.pusher();
    let repo = "compat/from-gate";
    let image = push_image(
        &pusher,
        repo,
        "v1",
        &three_layers(201),
        UploadMode::Chunked(64 * 1024),
    )
    .await;
    put_manifest_ok(&pusher, repo, "v2", OCI_MANIFEST, &image.manifest).await;
    let multi = index(OCI_INDEX, &[(OCI_MANIFEST, &image.manifest, "amd64")]);
    put_manifest_ok(&pusher, repo, "multi", OCI_INDEX, &multi).await;
    let (config, layer) = push_blobs(&pusher, repo, 202).await;
    let docker = docker_manifest(&config, &[&layer]);
    put_manifest_ok(&pusher, repo, "docker", DOCKER_MANIFEST, &docker).await;
    let resp = pusher
        .request("DELETE", &format!("/v2/{repo}/manifests/v2"), &[], empty())
        .await;
    expect(&resp, 202, "delete a tag");
    // A repository made of mounted blobs.
    for d in image.blob_digests() {
        let resp = pusher
            .request(
                "POST",
                &format!("/v2/compat/mounted/blobs/uploads/?mount={d}&from={repo}"),
                &[("content-length", "0")],
                empty(),
            )
            .await;
        expect(&resp, 201, "mount");
    }
    put_manifest_ok(
        &pusher,
        "compat/mounted",
        "v1",
        OCI_MANIFEST,
        &image.manifest,
    )
    .await;
    let AllInOne {
        gate,
        ca,
        leaf,
        dir,
        ..
    } = aio;
    gate.stop().await;

    // docker-registry on the same store (on S3 through its s3-aws driver).
    let upstream = Upstream::start(
        shared.path(),
        UpstreamOptions {
            storage_yaml: Some(store.registry_yaml()),
            ..UpstreamOptions::default()
        },
    );
    let proxy = Gate::start(
        &dir.path().join("proxy"),
        GateOptions {
            upstream_url: upstream.url(),
            ..GateOptions::new(&leaf)
        },
    )
    .await;
    let client = Client::new(proxy.addr, &[&ca.cert]);
    for reference in ["v1", image.manifest_digest.as_str()] {
        pull_and_verify(&client, repo, reference, &image).await;
    }
    pull_and_verify(&client, "compat/mounted", "v1", &image).await;
    let resp = client
        .request(
            "GET",
            &format!("/v2/{repo}/manifests/multi"),
            &[("accept", OCI_INDEX)],
            empty(),
        )
        .await;
    expect(&resp, 200, "docker-registry serves the gate's index");
    assert_eq!(resp.header("content-type"), Some(OCI_INDEX));
    assert_eq!(&resp.body[..], &multi[..]);
    let resp = client
        .request(
            "GET",
            &format!("/v2/{repo}/manifests/docker"),
            &[("accept", DOCKER_MANIFEST)],
            empty(),
        )
        .await;
    expect(
        &resp,
        200,
        "docker-registry serves the gate's docker manifest",
    );
    assert_eq!(resp.header("content-type"), Some(DOCKER_MANIFEST));
    assert_eq!(&resp.body[..], &docker[..]);
    let resp = client.get(&format!("/v2/{repo}/tags/list")).await;
    expect(&resp, 200, "tags from docker-registry");
    // docker-registry 2.8 lists tags in directory order.
    let tags: BTreeSet<String> = serde_json::from_value(resp.json()["tags"].clone()).expect("tags");
    assert_eq!(
        tags,
        BTreeSet::from(["docker".into(), "multi".into(), "v1".into()])
    );
    let resp = client.get("/v2/_catalog").await;
    expect(&resp, 200, "catalog from docker-registry");
    assert_eq!(
        resp.json()["repositories"],
        json!(["compat/from-gate", "compat/mounted"])
    );
    // docker-registry also writes on top of it.
    let more = push_image(
        &client.with_basic(PUSHER.0, PUSHER.1),
        repo,
        "v3",
        &three_layers(203),
        UploadMode::Monolithic,
    )
    .await;
    pull_and_verify(&client, repo, "v3", &more).await;
    proxy.stop().await;
    drop(upstream);
}

// ---------------------------------------------------------------------------
// real clients

fn skopeo_ok(skopeo: &Skopeo, args: &[&str]) -> std::process::Output {
    tokio::task::block_in_place(|| skopeo.run_ok(args))
}

fn layout_index_digest(dir: &Path) -> String {
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("index.json")).expect("index.json"))
            .expect("index JSON");
    index["manifests"][0]["digest"]
        .as_str()
        .expect("digest")
        .to_owned()
}

fn layout_has_blob(dir: &Path, digest: &str) -> bool {
    let hex = digest.strip_prefix("sha256:").expect("sha256");
    std::fs::read(dir.join("blobs/sha256").join(hex)).is_ok_and(|b| sha256_digest(&b) == digest)
}

async fn skopeo_pushes_and_pulls_an_image_and_a_multi_arch_index(backend: Backend) {
    let aio = AllInOne::start_with(AllInOneOptions::on(backend)).await;
    let anon = aio.client();
    let skopeo = Skopeo::new(&aio.path("skopeo"), &aio.ca.cert);
    let host = aio.gate.authority();
    let creds = format!("{}:{}", PUSHER.0, PUSHER.1);
    let cert_dir = skopeo.cert_dir().to_owned();

    // One image, three layers.
    let layout_dir = aio.path("layout");
    let layers = vec![
        tar_layer(&[("etc/motd", b"pushed by skopeo to the all-in-one gate\n")]),
        tar_layer(&[("data.bin", &pseudo_random_bytes(300_000, 211))]),
        tar_layer(&[("a.txt", b"a\n"), ("b.txt", b"b\n")]),
    ];
    let layout = write_oci_layout(&layout_dir, "v1", &layers);
    let target = format!("docker://{host}/skopeo/aio:v1");
    skopeo_ok(
        &skopeo,
        &[
            "copy",
            "--dest-cert-dir",
            &cert_dir,
            "--dest-creds",
            &creds,
            &format!("oci:{}:v1", layout_dir.display()),
            &target,
        ],
    );
    let digest = assert_complete(&anon, "skopeo/aio", "v1").await;
    assert_eq!(
        digest, layout.manifest_digest,
        "skopeo pushed the layout's manifest unchanged"
    );
    for d in &layout.layer_digests {
        expect(
            &head(&anon, &format!("/v2/skopeo/aio/blobs/{d}")).await,
            200,
            "layer",
        );
    }
    let out = aio.path("pulled");
    skopeo_ok(
        &skopeo,
        &[
            "copy",
            "--src-cert-dir",
            &cert_dir,
            &target,
            &format!("oci:{}:v1", out.display()),
        ],
    );
    assert_eq!(layout_index_digest(&out), layout.manifest_digest);
    for d in layout.layer_digests.iter().chain([&layout.config_digest]) {
        assert!(layout_has_blob(&out, d), "pulled blob {d}");
    }

    // A multi-arch index: `copy --all` both ways.
    let multi_dir = aio.path("multi");
    let multi = write_multiarch_layout(&multi_dir, "v1", &["amd64", "arm64"]);
    let target = format!("docker://{host}/skopeo/multi:v1");
    skopeo_ok(
        &skopeo,
        &[
            "copy",
            "--all",
            "--dest-cert-dir",
            &cert_dir,
            "--dest-creds",
            &creds,
            &format!("oci:{}:v1", multi_dir.display()),
            &target,
        ],
    );
    let resp = anon
        .request(
            "GET",
            "/v2/skopeo/multi/manifests/v1",
            &[("accept", OCI_INDEX)],
            empty(),
        )
        .await;
    expect(&resp, 200, "the pushed index");
    assert_eq!(resp.header("content-type"), Some(OCI_INDEX));
    assert_eq!(
        resp.header("docker-content-digest"),
        Some(multi.index_digest.as_str())
    );
    for (arch, d) in &multi.manifests {
        assert_eq!(
            &assert_complete(&anon, "skopeo/multi", d).await,
            d,
            "{arch}"
        );
    }
    let out = aio.path("pulled-multi");
    skopeo_ok(
        &skopeo,
        &[
            "copy",
            "--all",
            "--src-cert-dir",
            &cert_dir,
            &target,
            &format!("oci:{}:v1", out.display()),
        ],
    );
    assert_eq!(layout_index_digest(&out), multi.index_digest);
    for d in multi
        .blobs
        .iter()
        .chain(multi.manifests.iter().map(|(_, d)| d))
    {
        assert!(layout_has_blob(&out, d), "pulled {d}");
    }
    aio.gate.stop().await;
}

async fn podman_pushes_and_pulls(backend: Backend) {
    use common::docker::DockerArchive;
    use common::podman::Podman;
    let aio = AllInOne::start_with(AllInOneOptions::on(backend)).await;
    let anon = aio.client();
    let host = aio.gate.authority();
    let dir = aio.path("podman");
    let podman = Podman::new(&dir, &aio.ca.cert);
    let image = format!("{host}/podman/aio:v1");
    let archive = DockerArchive::write(
        &dir.join("image.tar"),
        &image,
        &[
            pseudo_random_bytes(200_000, 221),
            pseudo_random_bytes(5_000, 222),
        ],
    );
    let setup = podman.fresh_auth_file("setup");
    let run = |auth: &Path, args: &[&str]| {
        let run = tokio::task::block_in_place(|| podman.run(auth, args, None));
        assert!(run.success(), "{}", run.describe());
        run
    };
    run(
        &setup,
        &[
            "load",
            "--signature-policy",
            podman.policy(),
            "-i",
            dir.join("image.tar").to_str().expect("path"),
        ],
    );
    let digest_file = dir.join("pushed.digest");
    let creds = format!("{}:{}", PUSHER.0, PUSHER.1);
    run(
        &setup,
        &[
            "push",
            "--cert-dir",
            podman.cert_dir(),
            "--signature-policy",
            podman.policy(),
            "--creds",
            &creds,
            "--digestfile",
            digest_file.to_str().expect("path"),
            &image,
        ],
    );
    let pushed = std::fs::read_to_string(&digest_file)
        .expect("digest file")
        .trim()
        .to_owned();
    assert_eq!(assert_complete(&anon, "podman/aio", "v1").await, pushed);

    let pull = podman.fresh_auth_file("anonymous");
    run(&pull, &["rmi", "-f", "-a"]);
    run(
        &pull,
        &[
            "pull",
            "--cert-dir",
            podman.cert_dir(),
            "--signature-policy",
            podman.policy(),
            &image,
        ],
    );
    let inspect =
        |format: &str| run(&pull, &["image", "inspect", "--format", format, &image]).stdout;
    assert_eq!(inspect("{{.Digest}}").trim(), pushed);
    let layers: Vec<String> =
        serde_json::from_str(inspect("{{json .RootFS.Layers}}").trim()).expect("layers JSON");
    assert_eq!(layers, archive.diff_ids);
    aio.gate.stop().await;
}

// ---------------------------------------------------------------------------
// garbage collection

/// The manifests of a two-platform index in `repo` (children untagged), the index
/// tagged `tag`. Returns (index digest, child digests).
async fn push_index(client: &Client, repo: &str, tag: &str, seed: u64) -> (String, Vec<String>) {
    let mut children = Vec::new();
    for (i, arch) in ["amd64", "arm64"].iter().enumerate() {
        let (config, layer) = push_blobs(client, repo, seed + i as u64).await;
        let m = oci_manifest(&config, &[&layer], json!({}));
        put_manifest_ok(client, repo, &sha256_digest(&m), OCI_MANIFEST, &m).await;
        children.push((m, *arch));
    }
    let entries: Vec<(&str, &[u8], &str)> = children
        .iter()
        .map(|(m, a)| (OCI_MANIFEST, m.as_slice(), *a))
        .collect();
    let idx = index(OCI_INDEX, &entries);
    put_manifest_ok(client, repo, tag, OCI_INDEX, &idx).await;
    (
        sha256_digest(&idx),
        children.iter().map(|(m, _)| sha256_digest(m)).collect(),
    )
}

/// A referrer of `subject` (untagged), with its own payload blob. Returns its digest.
async fn push_referrer(client: &Client, repo: &str, subject: &PushedImage) -> String {
    upload_blob(client, repo, b"{}", UploadMode::Monolithic).await;
    let payload = pseudo_random_bytes(700, 231);
    upload_blob(client, repo, &payload, UploadMode::Monolithic).await;
    let m = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": "application/vnd.example.sbom.v1",
        "config": descriptor(EMPTY_CONFIG, b"{}"),
        "layers": [descriptor("application/octet-stream", &payload)],
        "subject": { "mediaType": OCI_MANIFEST, "digest": subject.manifest_digest, "size": subject.manifest.len() },
    }))
    .expect("referrer");
    put_manifest_ok(client, repo, &sha256_digest(&m), OCI_MANIFEST, &m).await;
    sha256_digest(&m)
}

async fn gc_dry_run_reports_and_gc_removes_only_unreferenced_content(backend: Backend) {
    let aio = AllInOne::start_with(AllInOneOptions {
        delete: true,
        ..AllInOneOptions::on(backend)
    })
    .await;
    let pusher = aio.pusher();
    let anon = aio.client();
    let config = aio.gate.files.config.clone();
    let repo = "gc/app";
    let image = push_image(
        &pusher,
        repo,
        "v1",
        &three_layers(241),
        UploadMode::Monolithic,
    )
    .await;
    let (index_digest, children) = push_index(&pusher, repo, "multi", 242).await;
    let sbom = push_referrer(&pusher, repo, &image).await;
    let orphan = pseudo_random_bytes(12_345, 243);
    let orphan_digest = upload_blob(&pusher, repo, &orphan, UploadMode::Monolithic).await;
    let old = push_image(
        &pusher,
        repo,
        "old",
        &three_layers(244),
        UploadMode::Monolithic,
    )
    .await;
    let resp = pusher
        .request("DELETE", &format!("/v2/{repo}/manifests/old"), &[], empty())
        .await;
    expect(&resp, 202, "untag the old image");
    let old_blobs: Vec<(String, u64)> =
        std::iter::once((old.manifest_digest.clone(), old.manifest.len() as u64))
            .chain(std::iter::once((
                old.config_digest.clone(),
                old.config.len() as u64,
            )))
            .chain(
                old.layer_digests
                    .iter()
                    .cloned()
                    .zip(old.layer_sizes.iter().copied()),
            )
            .collect();

    let everything_is_there = || async {
        assert_complete(&anon, repo, "v1").await;
        assert_eq!(assert_complete(&anon, repo, "multi").await, index_digest);
        for c in &children {
            assert_complete(&anon, repo, c).await;
        }
        assert_complete(&anon, repo, &sbom).await;
        let resp = anon
            .get(&format!("/v2/{repo}/referrers/{}", image.manifest_digest))
            .await;
        assert_eq!(
            resp.json()["manifests"][0]["digest"],
            sbom.as_str(),
            "the referrer is listed"
        );
    };

    // Dry runs: the report, and nothing removed.
    let dry = tokio::task::block_in_place(|| run_gc(&config, &["--dry-run"]));
    assert!(
        dry.contains(&format!(
            "would remove blob {orphan_digest} ({} bytes)",
            orphan.len()
        )),
        "{dry}"
    );
    assert!(
        dry.contains(&format!(
            "would remove 0 manifests and 1 blobs, {} bytes",
            orphan.len()
        )),
        "{dry}"
    );
    // With the default grace period the fresh orphan stays, and the report says why.
    let graced = tokio::task::block_in_place(|| {
        std::process::Command::new(common::registry::BINARY)
            .args(["gc", "--dry-run", "--config"])
            .arg(&config)
            .env_remove("RUST_LOG")
            .output()
            .expect("run registry-gate gc")
    });
    let graced = String::from_utf8_lossy(&graced.stdout);
    assert!(
        graced.contains(&format!(
            "1 blobs ({:.1} MiB) unreferenced but younger than the grace period (3600 s), kept",
            orphan.len() as f64 / (1024.0 * 1024.0)
        )),
        "{graced}"
    );
    assert!(
        graced.contains("would remove 0 manifests and 0 blobs"),
        "{graced}"
    );
    let dry_all =
        tokio::task::block_in_place(|| run_gc(&config, &["--dry-run", "--delete-untagged"]));
    assert!(
        dry_all.contains(&format!(
            "would remove manifest {repo}@{}",
            old.manifest_digest
        )),
        "{dry_all}"
    );
    let freed: u64 = orphan.len() as u64 + old_blobs.iter().map(|b| b.1).sum::<u64>();
    assert!(
        dry_all.contains(&format!(
            "would remove 1 manifests and {} blobs, {freed} bytes",
            old_blobs.len() + 1
        )),
        "{dry_all}"
    );
    for (d, size) in &old_blobs {
        assert!(
            dry_all.contains(&format!("would remove blob {d} ({size} bytes)")),
            "{d} in {dry_all}"
        );
    }
    expect(
        &head(&anon, &format!("/v2/{repo}/blobs/{orphan_digest}")).await,
        200,
        "a dry run removes nothing",
    );
    assert_complete(&anon, repo, &old.manifest_digest).await;
    everything_is_there().await;

    // gc: the unreferenced blob goes; untagged manifests stay.
    let out = tokio::task::block_in_place(|| run_gc(&config, &[]));
    assert!(
        out.contains(&format!(
            "removed blob {orphan_digest} ({} bytes)",
            orphan.len()
        )),
        "{out}"
    );
    expect(
        &head(&anon, &format!("/v2/{repo}/blobs/{orphan_digest}")).await,
        404,
        "collected blob",
    );
    assert!(!aio.store.exists(&blob_key(&orphan_digest)).await);
    assert_complete(&anon, repo, &old.manifest_digest).await;
    everything_is_there().await;

    // gc --delete-untagged: the untagged image goes, with its blobs; the index's
    // children and the referrer stay with what keeps them.
    let out = tokio::task::block_in_place(|| run_gc(&config, &["--delete-untagged"]));
    assert!(
        out.contains(&format!("removed manifest {repo}@{}", old.manifest_digest)),
        "{out}"
    );
    expect_error(
        &anon
            .get(&format!("/v2/{repo}/manifests/{}", old.manifest_digest))
            .await,
        404,
        "MANIFEST_UNKNOWN",
        "the untagged manifest",
    );
    for (d, _) in &old_blobs[1..] {
        expect(
            &head(&anon, &format!("/v2/{repo}/blobs/{d}")).await,
            404,
            "a blob of the untagged image",
        );
        assert!(!aio.store.exists(&blob_key(d)).await, "{d} in the store");
    }
    everything_is_there().await;

    // And the collected image can be pushed again.
    let again = push_image(
        &pusher,
        repo,
        "old",
        &three_layers(244),
        UploadMode::Monolithic,
    )
    .await;
    pull_and_verify(&anon, repo, "old", &again).await;
    aio.gate.stop().await;
}

async fn gc_while_pushing_never_removes_what_was_pushed_or_linked_meanwhile(backend: Backend) {
    let aio = AllInOne::start_with(AllInOneOptions {
        delete: true,
        ..AllInOneOptions::on(backend)
    })
    .await;
    let pusher = aio.pusher();
    let anon = aio.client();
    let store = &aio.store;
    let base = push_image(
        &pusher,
        "gc/base",
        "v1",
        &three_layers(251),
        UploadMode::Monolithic,
    )
    .await;
    let (index_digest, _) = push_index(&pusher, "gc/base", "multi", 252).await;

    // Old garbage, so that the collection takes a while: blobs nothing references.
    let garbage: Vec<(String, Vec<u8>)> = (0..6000u32)
        .map(|i| {
            let bytes = format!("garbage {i}").into_bytes();
            (sha256_digest(&bytes), bytes)
        })
        .collect();
    futures_util::stream::iter(&garbage)
        .for_each_concurrent(32, |(d, bytes)| async move {
            store.write(&blob_key(d), bytes).await;
        })
        .await;
    let mut by_digest = garbage.clone();
    by_digest.sort();
    let first_swept = blob_key(&by_digest[0].0);
    // Garbage the sweep reaches last, which a client pushes again while it runs.
    let revived: Vec<(String, Vec<u8>)> = by_digest[by_digest.len() - 20..].to_vec();

    // Its output goes to a file: a pipe nobody reads would stop it when full.
    let gc_log = aio.path("gc.log");
    let log_file = std::fs::File::create(&gc_log).expect("gc log");
    let mut gc = gc_command(&aio.gate.files.config, &[])
        .stdout(log_file.try_clone().expect("clone"))
        .stderr(log_file)
        .spawn()
        .expect("start registry-gate gc");
    eventually("the sweep to start", || {
        let first_swept = first_swept.clone();
        async move { (!store.exists(&first_swept).await).then_some(()) }
    })
    .await;

    // While it sweeps: new images, pushes of old garbage, mounts, tag updates.
    let mut pushed: Vec<(String, String)> = Vec::new();
    let mut revived_ok = Vec::new();
    let mut rounds = 0;
    let mut running = true;
    while running {
        let repo = format!("gc/new{rounds}");
        let image = push_image(
            &pusher,
            &repo,
            "v1",
            &three_layers(300 + rounds),
            UploadMode::Monolithic,
        )
        .await;
        pushed.push((repo.clone(), image.manifest_digest.clone()));
        if let Some((d, bytes)) = revived.get(rounds as usize) {
            assert_eq!(
                &upload_blob(&pusher, "gc/revived", bytes, UploadMode::Monolithic).await,
                d
            );
            revived_ok.push(d.clone());
        }
        for d in base.blob_digests() {
            let resp = pusher
                .request(
                    "POST",
                    &format!("/v2/gc/mounted{rounds}/blobs/uploads/?mount={d}&from=gc/base"),
                    &[("content-length", "0")],
                    empty(),
                )
                .await;
            expect(&resp, 201, "mount while gc runs");
        }
        put_manifest_ok(
            &pusher,
            &format!("gc/mounted{rounds}"),
            "v1",
            OCI_MANIFEST,
            &base.manifest,
        )
        .await;
        pushed.push((format!("gc/mounted{rounds}"), base.manifest_digest.clone()));
        rounds += 1;
        running = gc.try_wait().expect("poll gc").is_none();
    }
    let status = gc.wait().expect("gc status");
    let report = std::fs::read_to_string(&gc_log).unwrap_or_default();
    assert!(status.success(), "gc failed ({status}): {report}");
    assert!(
        rounds >= 3,
        "only {rounds} rounds of pushes overlapped the collection; make it longer"
    );

    for (repo, digest) in &pushed {
        assert_complete(&anon, repo, digest).await;
        assert_complete(&anon, repo, "v1").await;
    }
    for d in &revived_ok {
        expect(
            &head(&anon, &format!("/v2/gc/revived/blobs/{d}")).await,
            200,
            &format!("revived {d}"),
        );
    }
    assert_complete(&anon, "gc/base", "v1").await;
    assert_eq!(
        assert_complete(&anon, "gc/base", "multi").await,
        index_digest
    );
    // The rest of the garbage went.
    let stored: BTreeSet<String> = store
        .keys(&format!("{V2}/blobs"))
        .await
        .into_iter()
        .collect();
    let left = garbage
        .iter()
        .filter(|(d, _)| stored.contains(&blob_key(d)) && !revived_ok.contains(d))
        .count();
    assert_eq!(left, 0, "garbage left behind; gc said:\n{report}");
    aio.gate.stop().await;
}

async fn the_server_collects_garbage_on_its_schedule(backend: Backend) {
    // Content written first, by a gate without a schedule…
    let aio = AllInOne::start_with(AllInOneOptions::on(backend)).await;
    let pusher = aio.pusher();
    let image = push_image(
        &pusher,
        "sched/app",
        "v1",
        &three_layers(261),
        UploadMode::Monolithic,
    )
    .await;
    let orphan = upload_blob(
        &pusher,
        "sched/app",
        b"nobody needs me",
        UploadMode::Monolithic,
    )
    .await;
    let AllInOne {
        gate,
        ca,
        leaf,
        store,
        dir,
        ..
    } = aio;
    gate.stop().await;
    // …then served by one that collects every second.
    let gate = Gate::start(
        &dir.path().join("scheduled"),
        GateOptions {
            storage: Some(
                store.gate_lines(false, None) + "gc_interval_secs = 1\ngc_grace_secs = 0\n",
            ),
            ..GateOptions::new(&leaf)
        },
    )
    .await;
    let anon = Client::new(gate.addr, &[&ca.cert]);
    let path = format!("/v2/sched/app/blobs/{orphan}");
    eventually("the scheduled collection to remove the orphan", || {
        let (anon, path) = (anon.clone(), path.clone());
        async move { (head(&anon, &path).await.status == 404).then_some(()) }
    })
    .await;
    pull_and_verify(&anon, "sched/app", "v1", &image).await;
    gate.stop().await;
}

async fn a_served_manifest_follows_its_tag_when_it_moves_or_goes(backend: Backend) {
    // The registry remembers manifests it served; a moved or deleted tag must show
    // at once, whoever changed it.
    let aio = AllInOne::start_with(AllInOneOptions {
        delete: true,
        ..AllInOneOptions::on(backend)
    })
    .await;
    let pusher = aio.pusher();
    let first = push_image(
        &pusher,
        "cache/app",
        "v1",
        &three_layers(71),
        UploadMode::Monolithic,
    )
    .await;
    for _ in 0..2 {
        assert_eq!(
            assert_complete(&pusher, "cache/app", "v1").await,
            first.manifest_digest
        );
    }
    let second = push_image(
        &pusher,
        "cache/app",
        "v1",
        &three_layers(72),
        UploadMode::Monolithic,
    )
    .await;
    assert_ne!(first.manifest_digest, second.manifest_digest);
    assert_eq!(
        assert_complete(&pusher, "cache/app", "v1").await,
        second.manifest_digest
    );
    // By digest too, and gone after a delete.
    let by_digest = format!("/v2/cache/app/manifests/{}", second.manifest_digest);
    assert_eq!(
        get_accepting(&pusher, &by_digest).await.status.as_u16(),
        200
    );
    let resp = pusher.request("DELETE", &by_digest, &[], empty()).await;
    expect(&resp, 202, "DELETE manifest");
    assert_eq!(
        get_accepting(&pusher, &by_digest).await.status.as_u16(),
        404
    );
    let resp = get_accepting(&pusher, "/v2/cache/app/manifests/v1").await;
    expect_error(&resp, 404, "MANIFEST_UNKNOWN", "the deleted manifest's tag");
    aio.gate.stop().await;
}
