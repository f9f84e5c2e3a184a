//! The gate in front of a real CNCF registry, driven over real TLS as registry
//! clients drive it: pulls, pushes, who may do what, which requests never reach the
//! upstream, the headers every response carries, and an upstream that goes away.

mod common;

use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use common::client::{Client, RawResponse, empty, full, read_at_least, read_rest};
use common::gate::{Gate, GateOptions, bcrypt_line};
use common::image::{
    OCI_MANIFEST, PushedImage, UploadMode, get_manifest, location_on_gate, pull_and_verify,
    push_image, upload_blob,
};
use common::upstream::UpstreamOptions;
use common::{PUSHER, Stack, StackOptions, VIEWER, eventually, pseudo_random_bytes};

fn layers(sizes: &[usize], seed: u64) -> Vec<Vec<u8>> {
    sizes
        .iter()
        .enumerate()
        .map(|(i, &size)| pseudo_random_bytes(size, seed * 100 + i as u64))
        .collect()
}

fn basic(user: &str, password: &str) -> String {
    use base64::Engine as _;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

fn raw_request(client: &Client, method: &str, path: &str, extra_headers: &str) -> String {
    format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost:{}\r\n{extra_headers}Connection: close\r\n\r\n",
        client.addr.port()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_pull_of_manifest_and_blobs_matches_their_digests() {
    let stack = Stack::start().await;
    let image = push_image(
        &stack.pusher(),
        "library/hello",
        "v1",
        &layers(&[1, 70_000, 300_001], 1),
        UploadMode::Monolithic,
    )
    .await;

    let anonymous = stack.client();
    pull_and_verify(&anonymous, "library/hello", "v1", &image).await;
    pull_and_verify(&anonymous, "library/hello", &image.manifest_digest, &image).await;

    let head = anonymous
        .request(
            "HEAD",
            "/v2/library/hello/manifests/v1",
            &[("accept", OCI_MANIFEST)],
            empty(),
        )
        .await;
    assert_eq!(head.status, 200, "HEAD manifest: {:?}", head.headers);
    assert_eq!(
        head.header("docker-content-digest"),
        Some(image.manifest_digest.as_str())
    );
    assert_eq!(
        head.header("content-length"),
        Some(image.manifest.len().to_string().as_str()),
        "HEAD manifest: Content-Length of the manifest"
    );
    assert!(head.body.is_empty(), "HEAD has no body");

    let layer = &image.layer_digests[2];
    let head = anonymous
        .request(
            "HEAD",
            &format!("/v2/library/hello/blobs/{layer}"),
            &[],
            empty(),
        )
        .await;
    assert_eq!(head.status, 200);
    assert_eq!(head.header("content-length"), Some("300001"));

    let tags = anonymous.get("/v2/library/hello/tags/list").await;
    assert_eq!(tags.status, 200, "{}", tags.text());
    assert_eq!(tags.json()["tags"], serde_json::json!(["v1"]));
    stack.gate.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pusher_pushes_a_multi_layer_image_monolithically() {
    let stack = Stack::start().await;
    let image = push_image(
        &stack.pusher(),
        "team/app",
        "1.0",
        &layers(&[0, 1, 65_536, 1_048_579], 2),
        UploadMode::Monolithic,
    )
    .await;
    pull_and_verify(&stack.client(), "team/app", "1.0", &image).await;
    stack.gate.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pusher_pushes_a_multi_layer_image_in_chunks() {
    let stack = Stack::start().await;
    let image = push_image(
        &stack.pusher(),
        "team/chunked",
        "1.0",
        &layers(&[1, 100_000, 1_048_579], 3),
        UploadMode::Chunked(256 * 1024),
    )
    .await;
    pull_and_verify(&stack.client(), "team/chunked", "1.0", &image).await;
    stack.gate.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_patch_without_content_length_works_over_http1_and_http2() {
    let stack = Stack::start().await;
    let http1 = push_image(
        &stack.pusher(),
        "team/streamed",
        "h1",
        &layers(&[10, 2_000_003], 4),
        UploadMode::Streamed,
    )
    .await;
    let http2 = push_image(
        &stack.pusher().http2(),
        "team/streamed",
        "h2",
        &layers(&[11, 1_500_007], 5),
        UploadMode::Streamed,
    )
    .await;
    pull_and_verify(&stack.client(), "team/streamed", "h1", &http1).await;
    pull_and_verify(&stack.client(), "team/streamed", "h2", &http2).await;
    stack.gate.stop().await;
}

fn assert_challenge(resp: &common::client::Resp, what: &str) {
    let codes = resp.assert_oci_error(401);
    assert!(
        codes.iter().any(|c| c == "UNAUTHORIZED"),
        "{what}: codes {codes:?}"
    );
    let challenge = resp
        .header("www-authenticate")
        .unwrap_or_else(|| panic!("{what}: 401 without WWW-Authenticate: {:?}", resp.headers));
    let scheme = challenge.split_whitespace().next().unwrap_or_default();
    assert!(
        scheme.eq_ignore_ascii_case("basic") || scheme.eq_ignore_ascii_case("bearer"),
        "{what}: challenge {challenge:?}"
    );
    assert!(
        challenge.contains("realm="),
        "{what}: challenge without a realm: {challenge:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_without_credentials_get_401_with_a_challenge() {
    let stack = Stack::start().await;
    let anonymous = stack.client();
    let repo = "probe-anonymous-write/app";
    let post = anonymous
        .request(
            "POST",
            &format!("/v2/{repo}/blobs/uploads/"),
            &[("content-length", "0")],
            empty(),
        )
        .await;
    assert_challenge(&post, "anonymous POST upload");
    let put = anonymous
        .request(
            "PUT",
            &format!("/v2/{repo}/manifests/v1"),
            &[("content-type", OCI_MANIFEST)],
            full(&b"{}"[..]),
        )
        .await;
    assert_challenge(&put, "anonymous PUT manifest");
    let patch = anonymous
        .request(
            "PATCH",
            &format!("/v2/{repo}/blobs/uploads/some-upload"),
            &[],
            full(&b"data"[..]),
        )
        .await;
    assert_challenge(&patch, "anonymous PATCH");
    let delete = anonymous
        .request("DELETE", &format!("/v2/{repo}/manifests/v1"), &[], empty())
        .await;
    assert_challenge(&delete, "anonymous DELETE");
    // The same over HTTP/2.
    let post = anonymous
        .http2()
        .request("POST", &format!("/v2/{repo}/blobs/uploads/"), &[], empty())
        .await;
    assert_challenge(&post, "anonymous POST over HTTP/2");
    stack
        .assert_never_reached_upstream("probe-anonymous-write")
        .await;
    stack.gate.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_anonymous_write_is_refused_before_its_body_is_read() {
    let stack = Stack::start().await;
    let client = stack.client();
    // Announce a gigabyte, send one kilobyte, and wait: the answer must come
    // without the gate waiting for the rest.
    let mut request = raw_request(
        &client,
        "PUT",
        "/v2/probe-early/blobs/uploads/x?digest=sha256:0000000000000000000000000000000000000000000000000000000000000000",
        "Content-Type: application/octet-stream\r\nContent-Length: 1073741824\r\n",
    )
    .into_bytes();
    request.extend_from_slice(&[7u8; 1024]);
    let answer = client.raw(&request).await;
    assert!(
        !answer.is_empty(),
        "no answer to an anonymous PUT while its body was still outstanding"
    );
    let response = RawResponse::parse(&answer);
    assert_eq!(
        response.status,
        401,
        "{:?}",
        String::from_utf8_lossy(&answer)
    );
    assert_eq!(response.header_values("www-authenticate").len(), 1);
    stack.assert_never_reached_upstream("probe-early").await;
    stack.gate.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_or_unknown_user_gets_401() {
    let stack = Stack::start().await;
    for (user, password) in [
        (PUSHER.0, "not-marks-password"),
        (PUSHER.0, ""),
        ("nobody", "whatever"),
    ] {
        let client = stack.client().with_basic(user, password);
        let post = client
            .request(
                "POST",
                "/v2/probe-wrong-password/blobs/uploads/",
                &[],
                empty(),
            )
            .await;
        assert_challenge(&post, &format!("POST as {user}:{password}"));
    }
    stack
        .assert_never_reached_upstream("probe-wrong-password")
        .await;
    stack.gate.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_valid_user_outside_the_push_group_gets_403_denied() {
    let stack = Stack::start().await;
    let image = push_image(
        &stack.pusher(),
        "probe-viewer/app",
        "v1",
        &layers(&[1000], 6),
        UploadMode::Monolithic,
    )
    .await;
    let viewer = stack.viewer();
    // Reading is fine for her.
    pull_and_verify(&viewer, "probe-viewer/app", "v1", &image).await;

    let attempts = [
        (
            "POST",
            "/v2/probe-viewer-denied/app/blobs/uploads/".to_owned(),
        ),
        ("PUT", "/v2/probe-viewer-denied/app/manifests/v2".to_owned()),
        (
            "PATCH",
            "/v2/probe-viewer-denied/app/blobs/uploads/x".to_owned(),
        ),
        (
            "DELETE",
            format!("/v2/probe-viewer/app/manifests/{}", image.manifest_digest),
        ),
    ];
    for (method, path) in &attempts {
        let resp = viewer
            .request(
                method,
                path,
                &[("content-type", OCI_MANIFEST)],
                full(&b"{}"[..]),
            )
            .await;
        let codes = resp.assert_oci_error(403);
        assert!(
            codes.iter().any(|c| c == "DENIED"),
            "{method} {path} as {}: codes {codes:?}",
            VIEWER.0
        );
        resp.assert_api_version_once(&format!("403 for {method}"));
    }
    // The manifest is still there: the DELETE never happened.
    pull_and_verify(&stack.client(), "probe-viewer/app", "v1", &image).await;
    stack
        .assert_never_reached_upstream("probe-viewer-denied")
        .await;
    let log = stack.upstream.access_log();
    assert!(
        !log.contains("\"DELETE "),
        "a refused DELETE reached the registry:\n{log}"
    );
    stack.gate.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unlisted_and_lower_case_methods_get_405_and_never_reach_the_upstream() {
    let stack = Stack::start().await;
    let client = stack.client();
    let pusher_auth = format!("Authorization: {}\r\n", basic(PUSHER.0, PUSHER.1));
    let methods = [
        "OPTIONS", "TRACE", "PROPFIND", "MKCOL", "PURGE", "get", "head", "delete", "Delete",
        "pOST", "put", "patch", "CONNECT",
    ];
    for method in methods {
        for auth in ["", pusher_auth.as_str()] {
            let path = format!(
                "/v2/probe-method-{}/manifests/latest",
                method.to_lowercase()
            );
            let answer = client
                .raw(raw_request(&client, method, &path, auth).as_bytes())
                .await;
            let text = String::from_utf8_lossy(&answer).into_owned();
            assert!(!answer.is_empty(), "{method} {path}: no answer");
            let response = RawResponse::parse(&answer);
            assert_eq!(
                response.status,
                405,
                "{method} {path} (authenticated: {}) must be refused with 405:\n{text}",
                !auth.is_empty()
            );
            let json = response.json();
            assert_eq!(
                json["errors"][0]["code"], "UNSUPPORTED",
                "{method}: the OCI code for an unsupported operation:\n{text}"
            );
            assert_eq!(
                response.header_values("docker-distribution-api-version"),
                ["registry/2.0"],
                "{method}: the API version header once:\n{text}"
            );
        }
    }
    // CONNECT in authority form, aimed at the upstream itself.
    let connect = format!(
        "CONNECT {0} HTTP/1.1\r\nHost: {0}\r\n{pusher_auth}\r\n",
        stack.upstream.addr
    );
    let answer = client.raw(connect.as_bytes()).await;
    let response = RawResponse::parse(&answer);
    assert!(
        response.status == 405 || response.status == 400,
        "CONNECT to the upstream's address must be refused: {}",
        String::from_utf8_lossy(&answer)
    );
    // Through hyper over HTTP/2 too.
    for method in ["OPTIONS", "PROPFIND", "get"] {
        let resp = stack
            .pusher()
            .http2()
            .request(method, "/v2/probe-method-h2/manifests/latest", &[], empty())
            .await;
        let codes = resp.assert_oci_error(405);
        assert_eq!(codes[0], "UNSUPPORTED", "{method} over HTTP/2");
        resp.assert_api_version_once(&format!("{method} over HTTP/2"));
    }
    stack.assert_never_reached_upstream("probe-method").await;
    let log = stack.upstream.access_log();
    assert!(
        !log.contains("CONNECT"),
        "a CONNECT reached the registry:\n{log}"
    );
    stack.gate.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn location_headers_from_the_upstream_are_rewritten_to_the_gate() {
    // (the registry names itself in Location, public_url)
    let cases = [
        (true, None),
        (true, Some("https://127.0.0.1:{port}".to_owned())),
        // The registry builds Location from Host and X-Forwarded-Proto.
        (false, None),
    ];
    for (advertise_own_url, public_url) in cases {
        let stack = Stack::start_with(StackOptions {
            upstream: UpstreamOptions {
                advertise_own_url,
                ..UpstreamOptions::default()
            },
            public_url: public_url.clone(),
            ..StackOptions::default()
        })
        .await;
        let direct = stack.upstream.direct(
            "POST /v2/direct/blobs/uploads/ HTTP/1.1\r\nHost: localhost\r\n\
             Content-Length: 0\r\nConnection: close\r\n\r\n",
        );
        let upstream_base = if advertise_own_url {
            // The registry itself names its own address: the gate has something
            // to rewrite.
            format!("http://{}/v2/", stack.upstream.addr)
        } else {
            // Without X-Forwarded-Proto it would say http://.
            "http://localhost/v2/".to_owned()
        };
        assert!(
            direct.contains(&format!("Location: {upstream_base}")),
            "the registry's own Location should start with {upstream_base}: {direct}"
        );

        let pusher = stack.pusher();
        let expected_base = match &public_url {
            Some(_) => format!("https://127.0.0.1:{}/v2/", stack.gate.addr.port()),
            None => format!("https://localhost:{}/v2/", stack.gate.addr.port()),
        };
        let check = |resp: &common::client::Resp, what: &str| {
            let location = resp.header("location").unwrap_or_default().to_owned();
            assert!(
                !location.contains(&stack.upstream.addr.to_string()),
                "{what}: Location names the upstream: {location}"
            );
            assert!(
                location.starts_with(&expected_base),
                "{what}: Location {location:?} should start with {expected_base:?} \
                 (public_url {public_url:?})"
            );
        };
        let post = pusher
            .request("POST", "/v2/located/blobs/uploads/", &[], empty())
            .await;
        assert_eq!(post.status, 202, "{}", post.text());
        check(&post, "POST upload");
        let data = pseudo_random_bytes(5000, 7);
        let patch = pusher
            .request(
                "PATCH",
                &location_on_gate(&pusher, &post, "POST"),
                &[
                    ("content-type", "application/octet-stream"),
                    ("content-range", "0-4999"),
                ],
                full(data.clone()),
            )
            .await;
        assert_eq!(patch.status, 202, "{}", patch.text());
        check(&patch, "PATCH");
        let digest = common::sha256_digest(&data);
        let put_path = format!(
            "{}{}digest={digest}",
            location_on_gate(&pusher, &patch, "PATCH"),
            if patch.header("location").unwrap_or_default().contains('?') {
                "&"
            } else {
                "?"
            }
        );
        let put = pusher.request("PUT", &put_path, &[], empty()).await;
        assert_eq!(put.status, 201, "{}", put.text());
        check(&put, "PUT");
        // And the one push helper follows these Locations to the end.
        let image = push_image(
            &pusher,
            "located",
            "v1",
            &layers(&[3000, 4000], 8),
            UploadMode::Chunked(1500),
        )
        .await;
        pull_and_verify(&stack.client(), "located", "v1", &image).await;
        stack.gate.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_response_carries_the_api_version_header_exactly_once() {
    let stack = Stack::start().await;
    for client in [stack.client(), stack.client().http2()] {
        let pusher = client.with_basic(PUSHER.0, PUSHER.1);
        let viewer = client.with_basic(VIEWER.0, VIEWER.1);
        let image = push_image(
            &pusher,
            "headers/app",
            "v1",
            &layers(&[100], 9),
            UploadMode::Monolithic,
        )
        .await;
        let blob = format!("/v2/headers/app/blobs/{}", image.layer_digests[0]);
        let responses = [
            ("GET /v2/", client.get("/v2/").await),
            ("GET /v2/ as pusher", pusher.get("/v2/").await),
            (
                "GET manifest (upstream 200)",
                get_manifest(&client, "headers/app", "v1").await,
            ),
            (
                "HEAD manifest",
                client
                    .request(
                        "HEAD",
                        "/v2/headers/app/manifests/v1",
                        &[("accept", OCI_MANIFEST)],
                        empty(),
                    )
                    .await,
            ),
            ("GET blob", client.get(&blob).await),
            (
                "GET unknown manifest (upstream 404)",
                client.get("/v2/headers/app/manifests/nope").await,
            ),
            (
                "POST upload (upstream 202)",
                pusher
                    .request("POST", "/v2/headers/app/blobs/uploads/", &[], empty())
                    .await,
            ),
            (
                "anonymous POST (401)",
                client
                    .request("POST", "/v2/headers/app/blobs/uploads/", &[], empty())
                    .await,
            ),
            (
                "wrong password (401)",
                client
                    .with_basic(PUSHER.0, "wrong")
                    .request("POST", "/v2/headers/app/blobs/uploads/", &[], empty())
                    .await,
            ),
            (
                "viewer POST (403)",
                viewer
                    .request("POST", "/v2/headers/app/blobs/uploads/", &[], empty())
                    .await,
            ),
            (
                "OPTIONS (405)",
                client
                    .request("OPTIONS", "/v2/headers/app/manifests/v1", &[], empty())
                    .await,
            ),
            ("outside /v2 (404)", client.get("/not-the-api").await),
        ];
        for (what, resp) in &responses {
            resp.assert_api_version_once(what);
        }
        assert_eq!(responses[7].1.status, 401);
        assert_eq!(responses[9].1.status, 403);
        assert_eq!(responses[10].1.status, 405);
        assert_eq!(responses[11].1.status, 404);
    }
    // Raw HTTP/1.1 answers to a lower-case method.
    let client = stack.client();
    let answer = client
        .raw(raw_request(&client, "get", "/v2/", "").as_bytes())
        .await;
    assert_eq!(
        RawResponse::parse(&answer).header_values("docker-distribution-api-version"),
        ["registry/2.0"]
    );
    // And the gate's own 502.
    let mut stack = stack;
    stack.upstream.stop();
    for client in [stack.client(), stack.client().http2()] {
        let resp = client.get("/v2/headers/app/manifests/v1").await;
        resp.assert_oci_error(502);
        resp.assert_api_version_once("502 with the upstream down");
    }
    stack.gate.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_outside_v2_get_404_json_and_are_not_forwarded() {
    let stack = Stack::start().await;
    let client = stack.client();
    // (`/` is the HTML page for people: tests/page.rs.)
    for path in [
        "/probe-outside",
        "/v1/probe-outside/",
        "/v2probe-outside",
        "/probe-outside/v2/",
        "/v3/probe-outside/tags/list",
    ] {
        for c in [client.clone(), stack.pusher().http2()] {
            let resp = c.get(path).await;
            resp.assert_oci_error(404);
            resp.assert_api_version_once(path);
        }
    }
    // Dot segments that climb out of /v2, written raw (clients would clean them).
    for path in [
        "/v2/../probe-outside",
        "/v2/./../probe-outside/x",
        "/v2/%2e%2e/probe-outside",
    ] {
        let answer = client
            .raw(raw_request(&client, "GET", path, "").as_bytes())
            .await;
        let response = RawResponse::parse(&answer);
        assert!(
            response.status == 404 || response.status == 400,
            "GET {path} must not be served: {}",
            String::from_utf8_lossy(&answer)
        );
        response.json();
    }
    stack.assert_never_reached_upstream("probe-outside").await;
    stack.gate.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_with_empty_user_and_password_is_anonymous() {
    let stack = Stack::start().await;
    let image = push_image(
        &stack.pusher(),
        "empty-basic/app",
        "v1",
        &layers(&[500], 10),
        UploadMode::Monolithic,
    )
    .await;
    let og = [("authorization", "Basic Og=="), ("accept", OCI_MANIFEST)];
    let get = stack
        .client()
        .request("GET", "/v2/empty-basic/app/manifests/v1", &og, empty())
        .await;
    assert_eq!(
        get.status,
        200,
        "a pull with `Basic Og==` is an anonymous pull: {}",
        get.text()
    );
    assert_eq!(
        get.header("docker-content-digest"),
        Some(image.manifest_digest.as_str())
    );
    // On the base endpoint too, `Basic Og==` is answered as no Authorization is.
    let anonymous_ping = stack.client().get("/v2/").await;
    let og_ping = stack.client().request("GET", "/v2/", &og, empty()).await;
    assert_eq!(
        (og_ping.status, og_ping.header("www-authenticate")),
        (
            anonymous_ping.status,
            anonymous_ping.header("www-authenticate")
        ),
        "GET /v2/ with Basic Og== versus without Authorization: {}",
        og_ping.text()
    );
    let post = stack
        .client()
        .request("POST", "/v2/empty-basic/app/blobs/uploads/", &og, empty())
        .await;
    assert_challenge(&post, "POST with Basic Og==");
    stack.gate.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_authorization_headers_or_control_bytes_are_refused_and_not_forwarded() {
    let stack = Stack::start().await;
    let good = basic(PUSHER.0, PUSHER.1);
    let client = stack.client();
    for method in ["GET", "POST"] {
        for (first, second) in [
            (good.as_str(), "Basic Og=="),
            ("Basic Og==", good.as_str()),
            (good.as_str(), good.as_str()),
        ] {
            let resp = client
                .request(
                    method,
                    "/v2/probe-two-auth/blobs/uploads/",
                    &[("authorization", first), ("authorization", second)],
                    empty(),
                )
                .await;
            assert!(
                resp.status == 400 || resp.status == 401,
                "{method} with two Authorization headers: {} {}",
                resp.status,
                resp.text()
            );
            resp.assert_oci_error(resp.status.as_u16());
            resp.assert_api_version_once("two Authorization headers");
        }
    }
    for (user, password) in [
        ("mark\0", PUSHER.1),
        (PUSHER.0, "mark-pushes-images\0"),
        ("mark\r\nx", PUSHER.1),
        (PUSHER.0, "mark-pushes-images\u{7}"),
    ] {
        let resp = client
            .request(
                "POST",
                "/v2/probe-two-auth/blobs/uploads/",
                &[("authorization", &basic(user, password))],
                empty(),
            )
            .await;
        assert!(
            resp.status == 400 || resp.status == 401,
            "credentials with control bytes {user:?}:{password:?}: {} {}",
            resp.status,
            resp.text()
        );
        resp.assert_oci_error(resp.status.as_u16());
    }
    // Malformed Authorization values.
    for value in [
        "Basic",
        "Basic !!!!",
        "Basic bWFyaw==",
        "Digest username=\"mark\"",
    ] {
        let resp = client
            .request(
                "POST",
                "/v2/probe-two-auth/blobs/uploads/",
                &[("authorization", value)],
                empty(),
            )
            .await;
        assert!(
            resp.status == 400 || resp.status == 401,
            "Authorization {value:?}: {} {}",
            resp.status,
            resp.text()
        );
        resp.assert_oci_error(resp.status.as_u16());
    }
    stack.assert_never_reached_upstream("probe-two-auth").await;
    stack.gate.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_and_http1_are_both_served_by_alpn() {
    let stack = Stack::start().await;
    let h2 = stack.pusher().http2();
    let ping = h2.get("/v2/").await;
    assert_eq!(
        ping.alpn.as_deref(),
        Some(&b"h2"[..]),
        "ALPN must select h2"
    );
    assert_eq!(ping.version, http::Version::HTTP_2);
    let image = push_image(
        &h2,
        "protocols/app",
        "h2",
        &layers(&[1, 200_000], 11),
        UploadMode::Chunked(64 * 1024),
    )
    .await;
    pull_and_verify(&stack.client().http2(), "protocols/app", "h2", &image).await;

    let h1 = stack.client();
    let ping = h1.get("/v2/").await;
    assert_eq!(ping.alpn.as_deref(), Some(&b"http/1.1"[..]));
    assert_eq!(ping.version, http::Version::HTTP_11);
    pull_and_verify(&h1, "protocols/app", "h2", &image).await;
    stack.gate.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_forwarding_headers_are_replaced_and_host_is_kept() {
    let stack = Stack::start().await;
    let image = push_image(
        &stack.pusher(),
        "probe-forwarded/app",
        "v1",
        &layers(&[10], 12),
        UploadMode::Monolithic,
    )
    .await;
    let resp = stack
        .client()
        .request(
            "GET",
            "/v2/probe-forwarded/app/manifests/v1",
            &[
                ("accept", OCI_MANIFEST),
                ("x-forwarded-for", "198.51.100.77"),
                ("x-real-ip", "198.51.100.78"),
                ("x-forwarded-host", "evil.example"),
                ("x-forwarded-proto", "http"),
            ],
            empty(),
        )
        .await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(
        resp.header("docker-content-digest"),
        Some(image.manifest_digest.as_str())
    );
    let log = eventually(
        "the manifest GET in the registry's application log",
        || async {
            let log = stack.upstream.access_log();
            log.lines()
                .any(|l| {
                    l.contains("response completed")
                        && l.contains("http.request.method=GET")
                        && l.contains("/v2/probe-forwarded/app/manifests/v1")
                })
                .then_some(log)
        },
    )
    .await;
    let line = log
        .lines()
        .find(|l| {
            l.contains("response completed")
                && l.contains("http.request.method=GET")
                && l.contains("/v2/probe-forwarded/app/manifests/v1")
        })
        .expect("log line");
    assert!(
        !log.contains("198.51.100.77") && !log.contains("198.51.100.78"),
        "the client's X-Forwarded-For / X-Real-IP reached the registry:\n{line}"
    );
    assert!(
        line.contains("http.request.remoteaddr=127.0.0.1")
            || line.contains("http.request.remoteaddr=\"127.0.0.1"),
        "the registry should see the real client address: {line}"
    );
    assert!(
        line.contains(&format!("localhost:{}", stack.gate.addr.port())),
        "Host should be the one the client sent: {line}"
    );
    assert!(
        !log.contains("evil.example"),
        "the client's X-Forwarded-Host reached the registry"
    );
    stack.gate.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_credentials_are_not_forwarded_and_configured_ones_are() {
    // A registry that itself wants Basic auth, and knows mark with his own password.
    let mut stack = Stack::start_with(StackOptions {
        upstream: UpstreamOptions {
            htpasswd: Some(format!(
                "{}{}",
                bcrypt_line(PUSHER.0, PUSHER.1),
                bcrypt_line("gate-service", "upstream-secret")
            )),
            ..UpstreamOptions::default()
        },
        ..StackOptions::default()
    })
    .await;
    // Without configured upstream credentials, mark's own header must not travel:
    // the registry, which knows his password, never sees him.
    let resp = stack.pusher().get("/v2/probe-credentials/tags/list").await;
    assert!(
        !resp.status.is_success() && resp.status != 404,
        "the registry should have refused a request without credentials: {} {}",
        resp.status,
        resp.text()
    );
    let log = eventually("the refused request in the registry's log", || async {
        let log = stack.upstream.access_log();
        log.contains("/v2/probe-credentials/tags/list")
            .then_some(log)
    })
    .await;
    assert!(
        !log.contains("auth.user.name=mark"),
        "mark's Authorization header reached the registry:\n{log}"
    );

    let ca = stack.ca.cert.clone();
    let gate = Gate::start(
        &stack.path("gate-with-credentials"),
        GateOptions {
            upstream_url: stack.upstream.url(),
            extra_upstream: "username = \"gate-service\"\npassword = \"upstream-secret\"\n".into(),
            ..GateOptions::new(&stack.leaf)
        },
    )
    .await;
    let anonymous = Client::new(gate.addr, &[&ca]);
    let pusher = anonymous.with_basic(PUSHER.0, PUSHER.1);
    let ping = anonymous.get("/v2/probe-credentials/tags/list").await;
    assert_eq!(
        ping.assert_oci_error(404),
        ["NAME_UNKNOWN"],
        "with configured credentials, the registry answers anonymous reads"
    );
    let image = push_image(
        &pusher,
        "with-credentials/app",
        "v1",
        &layers(&[1234, 5678], 13),
        UploadMode::Streamed,
    )
    .await;
    pull_and_verify(&anonymous, "with-credentials/app", "v1", &image).await;
    let log = stack.upstream.access_log();
    assert!(
        log.contains("auth.user.name=gate-service"),
        "the configured upstream credentials should be what the registry sees:\n{log}"
    );
    assert!(
        !log.contains("auth.user.name=mark"),
        "mark's own Authorization reached the registry:\n{log}"
    );
    gate.stop().await;
    stack.upstream.stop();
    stack.gate.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_down_gives_502_json_and_service_resumes_when_it_is_back() {
    let mut stack = Stack::start().await;
    let pushed: PushedImage = push_image(
        &stack.pusher(),
        "outage/app",
        "v1",
        &layers(&[1000, 2000], 14),
        UploadMode::Monolithic,
    )
    .await;
    // Warm the gate's pool so that stale pooled connections are part of the test.
    pull_and_verify(&stack.client(), "outage/app", "v1", &pushed).await;

    stack.upstream.stop();
    let upstream_addr = stack.upstream.addr.to_string();
    for (client, method, path) in [
        (stack.client(), "GET", "/v2/outage/app/manifests/v1"),
        (stack.client().http2(), "GET", "/v2/outage/app/tags/list"),
        (stack.pusher(), "POST", "/v2/outage/app/blobs/uploads/"),
    ] {
        let resp = client.request(method, path, &[], empty()).await;
        resp.assert_oci_error(502);
        resp.assert_api_version_once("502");
        assert!(
            resp.text().contains(&upstream_addr),
            "{method} {path}: the 502 should name the upstream {upstream_addr}: {}",
            resp.text()
        );
    }
    let head = stack
        .client()
        .request("HEAD", "/v2/outage/app/manifests/v1", &[], empty())
        .await;
    assert_eq!(head.status, 502);

    stack.upstream.restart();
    let client = stack.client();
    eventually(
        "the gate to serve again after the registry restarted",
        || async {
            let resp = get_manifest(&client, "outage/app", "v1").await;
            (resp.status == 200).then_some(())
        },
    )
    .await;
    // Once back, it stays back: no stale pooled connection is handed out.
    for _ in 0..5 {
        pull_and_verify(&client, "outage/app", "v1", &pushed).await;
    }
    let again = push_image(
        &stack.pusher(),
        "outage/app",
        "v2",
        &layers(&[3000], 15),
        UploadMode::Chunked(1000),
    )
    .await;
    pull_and_verify(&client, "outage/app", "v2", &again).await;
    stack.gate.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_shutdown_the_gate_stops_accepting_and_lets_a_transfer_finish() {
    let mut stack = Stack::start().await;
    let blob = pseudo_random_bytes(8 * 1024 * 1024 + 5, 16);
    let digest = upload_blob(
        &stack.pusher(),
        "shutdown/app",
        &blob,
        UploadMode::Monolithic,
    )
    .await;
    let client = stack.client();
    let response = client
        .send(
            "GET",
            &format!("/v2/shutdown/app/blobs/{digest}"),
            &[],
            empty(),
        )
        .await;
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let mut received = read_at_least(&mut body, 512 * 1024).await;

    stack.gate.begin_shutdown();
    eventually("the gate to stop taking new connections", || async {
        let probe = tokio::time::timeout(Duration::from_secs(5), client.try_connect(&[b"h2"]));
        match probe.await {
            Ok(Ok(_)) => None,
            Ok(Err(_)) | Err(_) => Some(()),
        }
    })
    .await;

    read_rest(&mut body, &mut received, "during shutdown").await;
    assert_eq!(
        received.len(),
        blob.len(),
        "the in-flight download completes"
    );
    assert_eq!(common::sha256_digest(&received), digest);
    stack.gate.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_head_that_never_ends_is_cut_off() {
    let stack = Stack::start_with(StackOptions {
        extra_server: "header_read_timeout_secs = 1\n".into(),
        ..StackOptions::default()
    })
    .await;
    let client = stack.client();
    let mut stream = client.try_connect(&[b"http/1.1"]).await.expect("connect");
    stream
        .write_all(b"GET /v2/slow/tags/list HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")
        .await
        .expect("write a partial head");
    stream.flush().await.expect("flush");
    // The gate must give up on this connection (perhaps with a 408); a generous
    // deadline only keeps a gate without the timeout from hanging the test.
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    let closed = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "a connection stuck in its request head stayed open for 30 s \
         (header_read_timeout_secs = 1); it sent {:?}",
        String::from_utf8_lossy(&answer)
    );
    if !answer.is_empty() {
        let response = RawResponse::parse(&answer);
        assert!(
            response.status == 408 || response.status == 400,
            "{:?}",
            String::from_utf8_lossy(&answer)
        );
    }
    // Everyone else is still served.
    let resp = client.get("/v2/slow/tags/list").await;
    assert_eq!(resp.assert_oci_error(404), ["NAME_UNKNOWN"]);
    stack.gate.stop().await;
}
