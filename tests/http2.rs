//! Answers every client can read, over HTTP/2 and HTTP/1.1, checked with curl (the
//! Debian 12 one is strict about HTTP/2 framing): a HEAD answer never carries a body
//! (gate errors, registry errors, proxied answers), with `Content-Length` as a GET
//! would send it.

mod common;

use std::path::{Path, PathBuf};

use common::registry::AllInOne;
use common::{Stack, command};

/// Run a blocking check (curl, nghttp) against the gate at `base`, trusting `ca`.
async fn blocking(base: String, ca: PathBuf, check: impl FnOnce(&str, &Path) + Send + 'static) {
    tokio::task::spawn_blocking(move || check(&base, &ca))
        .await
        .expect("join");
}

/// `curl -sSI` over `version`; (exit code, headers).
fn curl_head(version: &str, ca: &Path, url: &str) -> (i32, String) {
    let out: std::process::Output = command("curl", "curl")
        .args(["-sS", "-I", version, "--cacert"])
        .arg(ca)
        .arg(url)
        .output()
        .expect("run curl");
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn check_heads(base: &str, ca: &Path) {
    let missing_blob = format!("{base}/v2/h2/app/blobs/sha256:{}", "0".repeat(64));
    for path in [
        missing_blob.as_str(),
        &format!("{base}/v2/h2/app/manifests/nope"),
        &format!("{base}/v2/"),
        &format!("{base}/v2/no/such/endpoint/x"),
    ] {
        for version in ["--http2", "--http1.1"] {
            let (code, text) = curl_head(version, ca, path);
            assert_eq!(code, 0, "curl -I {version} {path}: {text}");
            assert!(
                text.to_ascii_lowercase().contains("content-length:"),
                "{text}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn head_answers_have_no_body_built_in() {
    let aio = AllInOne::start().await;
    blocking(aio.gate.base_url(), aio.ca.cert.clone(), check_heads).await;
    aio.gate.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn head_answers_have_no_body_in_front() {
    let stack = Stack::start().await;
    blocking(stack.gate.base_url(), stack.ca.cert.clone(), check_heads).await;
    stack.gate.stop().await;
}

/// `curl -X METHOD` with a 1 KiB body over `version`; (exit code, status, output).
fn curl_write(
    version: &str,
    ca: &Path,
    method: &str,
    url: &str,
    user: Option<&str>,
) -> (i32, String, String) {
    let body = std::env::temp_dir().join(format!("rg-h2-body-{}", std::process::id()));
    std::fs::write(&body, vec![b'{'; 1024]).expect("write body");
    curl_send(version, ca, method, url, user, &body)
}

/// `curl -X METHOD` with the file `body` over `version`; (exit code, status, output).
fn curl_send(
    version: &str,
    ca: &Path,
    method: &str,
    url: &str,
    user: Option<&str>,
    body: &Path,
) -> (i32, String, String) {
    let mut cmd = command("curl", "curl");
    cmd.args([
        "-sS",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        version,
        "-X",
        method,
    ])
    .args([
        "-H",
        "Content-Type: application/vnd.oci.image.manifest.v1+json",
    ])
    .arg("--data-binary")
    .arg(format!("@{}", body.display()))
    .arg("--cacert")
    .arg(ca);
    if let Some(user) = user {
        cmd.args(["-u", user]);
    }
    let out = cmd.arg(url).output().expect("run curl");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `nghttp -v` (HTTP/2 only) with `method`, and `body` as data when given: (exit
/// code, output).
fn nghttp(method: &str, url: &str, body: Option<&Path>, user: Option<&str>) -> (i32, String) {
    use base64::Engine as _;
    let mut cmd = command("nghttp", "nghttp2-client");
    cmd.args(["-v", "-t", "20", "-H"])
        .arg(format!(":method: {method}"));
    if let Some(body) = body {
        cmd.arg("-d").arg(body).args([
            "-H",
            "content-type: application/vnd.oci.image.manifest.v1+json",
        ]);
    }
    if let Some(user) = user {
        let token = base64::engine::general_purpose::STANDARD.encode(user);
        cmd.arg("-H").arg(format!("authorization: Basic {token}"));
    }
    let out = cmd.arg(url).output().expect("run nghttp");
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// The same answers seen by nghttp: the status arrives, and the stream ends without
/// an error code.
fn check_with_nghttp(base: &str) {
    let body = std::env::temp_dir().join(format!("rg-nghttp-body-{}", std::process::id()));
    std::fs::write(&body, vec![b'{'; 1024]).expect("write body");
    let viewer = format!("{}:{}", common::VIEWER.0, common::VIEWER.1);
    let missing = format!("{base}/v2/h2/app/blobs/sha256:{}", "0".repeat(64));
    type Case<'a> = (&'a str, String, Option<&'a Path>, Option<&'a str>, &'a str);
    let cases: Vec<Case> = vec![
        ("HEAD", missing.clone(), None, None, "404"),
        ("HEAD", format!("{base}/v2/"), None, None, "401"),
        (
            "PUT",
            format!("{base}/v2/h2/app/manifests/t"),
            Some(&body),
            None,
            "401",
        ),
        (
            "PUT",
            format!("{base}/v2/h2/app/manifests/t"),
            Some(&body),
            Some(viewer.as_str()),
            "403",
        ),
        (
            "PUT",
            format!("{base}/v2/no/such/endpoint/x"),
            Some(&body),
            None,
            "404",
        ),
        ("OPTIONS", format!("{base}/v2/"), Some(&body), None, "405"),
    ];
    for (method, url, data, user, want) in cases {
        let (code, text) = nghttp(method, &url, data, user);
        assert_eq!(code, 0, "nghttp {method} {url}: {text}");
        assert!(
            text.contains(&format!(":status: {want}")),
            "nghttp {method} {url}: status {want} expected:\n{text}"
        );
        let bad: Vec<&str> = text
            .split("error_code=")
            .skip(1)
            .filter(|rest| !rest.starts_with("NO_ERROR"))
            .collect();
        assert!(
            bad.is_empty(),
            "nghttp {method} {url}: a frame carried an error code:\n{text}"
        );
    }
}

/// Refused writes that carry a small body get their answer over both protocols.
fn check_refused_writes(base: &str, ca: &Path) {
    let viewer = format!("{}:{}", common::VIEWER.0, common::VIEWER.1);
    let cases = [
        ("PUT", format!("{base}/v2/h2/app/manifests/t"), None, "401"),
        (
            "PUT",
            format!("{base}/v2/h2/app/manifests/t"),
            Some(viewer.as_str()),
            "403",
        ),
        ("PUT", format!("{base}/v2/no/such/endpoint/x"), None, "404"),
        ("PUT", format!("{base}/v2/"), None, "401"),
        (
            "OPTIONS",
            format!("{base}/v2/h2/app/manifests/t"),
            None,
            "405",
        ),
    ];
    for (method, url, user, want) in &cases {
        for version in ["--http2", "--http1.1"] {
            let (code, status, err) = curl_write(version, ca, method, url, *user);
            assert_eq!(
                (code, status.as_str()),
                (0, *want),
                "curl {version} -X {method} {url} (user {user:?}): {err}"
            );
        }
    }
}

/// A manifest over the 4 MiB limit, from a pusher: 413. Over HTTP/1.1 only: over
/// HTTP/2 the registry answers after 4 MiB and the stream is reset while curl still
/// sends the rest, and curl 7.88 then shows no status in some runs (an open item).
fn check_too_large(base: &str, ca: &Path) {
    let body = std::env::temp_dir().join(format!("rg-h2-large-{}", std::process::id()));
    std::fs::write(&body, vec![b' '; 5 * 1024 * 1024]).expect("write body");
    let pusher = format!("{}:{}", common::PUSHER.0, common::PUSHER.1);
    let url = format!("{base}/v2/h2/app/manifests/big");
    let (code, status, err) = curl_send("--http1.1", ca, "PUT", &url, Some(&pusher), &body);
    assert_eq!(
        (code, status),
        (0, "413".to_owned()),
        "curl --http1.1 PUT of a 5 MiB manifest: {err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_too_large_manifest_is_answered_413_built_in() {
    let aio = AllInOne::start().await;
    blocking(aio.gate.base_url(), aio.ca.cert.clone(), check_too_large).await;
    aio.gate.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refused_writes_with_a_body_are_answered_built_in() {
    let aio = AllInOne::start().await;
    blocking(aio.gate.base_url(), aio.ca.cert.clone(), |base, ca| {
        check_with_nghttp(base);
        check_refused_writes(base, ca);
    })
    .await;
    aio.gate.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refused_writes_with_a_body_are_answered_in_front() {
    let stack = Stack::start().await;
    blocking(stack.gate.base_url(), stack.ca.cert.clone(), |base, ca| {
        check_with_nghttp(base);
        check_refused_writes(base, ca);
    })
    .await;
    stack.gate.stop().await;
}

/// skopeo (Go's HTTP client) shown the gate's refusals: each failure carries the
/// gate's own message, so the answer arrived.
async fn check_with_skopeo(
    gate: &common::gate::Gate,
    ca: &Path,
    dir: &Path,
    deletes_disabled: bool,
) {
    use common::skopeo::Skopeo;
    let pusher = common::client::Client::new(gate.addr, &[ca])
        .with_basic(common::PUSHER.0, common::PUSHER.1);
    common::image::push_image(
        &pusher,
        "h2/src",
        "v1",
        &[common::pseudo_random_bytes(3000, 9)],
        common::image::UploadMode::Monolithic,
    )
    .await;
    let skopeo = Skopeo::new(&dir.join("skopeo"), ca);
    let host = gate.authority();
    let src = format!("docker://{host}/h2/src:v1");
    let dest = format!("docker://{host}/h2/app:t");
    let viewer = format!("{}:{}", common::VIEWER.0, common::VIEWER.1);
    let wrong = format!("{}:wrong-password", common::PUSHER.0);
    let pusher_creds = format!("{}:{}", common::PUSHER.0, common::PUSHER.1);
    let cert_dir = skopeo.cert_dir().to_owned();
    let copy = |creds: &str| {
        vec![
            "copy".to_owned(),
            "--src-cert-dir".into(),
            cert_dir.clone(),
            "--dest-cert-dir".into(),
            cert_dir.clone(),
            "--dest-creds".into(),
            creds.to_owned(),
            src.clone(),
            dest.clone(),
        ]
    };
    let mut cases: Vec<(&str, Vec<String>, &str)> = vec![
        (
            "404",
            vec![
                "inspect".into(),
                "--cert-dir".into(),
                cert_dir.clone(),
                format!("docker://{host}/h2/none:latest"),
            ],
            "manifest unknown",
        ),
        ("401", copy(&wrong), "invalid user name or password"),
        (
            "403",
            copy(&viewer),
            "requested access to the resource is denied",
        ),
    ];
    if deletes_disabled {
        // The built-in registry with [storage] delete = false.
        cases.push((
            "405",
            vec![
                "delete".into(),
                "--cert-dir".into(),
                cert_dir.clone(),
                "--creds".into(),
                pusher_creds.clone(),
                src.clone(),
            ],
            "deletes are disabled on this registry",
        ));
    }
    for (status, args, message) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = tokio::task::block_in_place(|| skopeo.run(&args));
        let err = String::from_utf8_lossy(&out.stderr).to_lowercase();
        assert!(
            !out.status.success(),
            "skopeo {status} case succeeded: {err}"
        );
        assert!(
            err.contains(&message.to_lowercase()),
            "skopeo {status}: the gate's message {message:?} in: {err}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_go_client_sees_the_refusals_built_in() {
    let aio = AllInOne::start().await;
    check_with_skopeo(&aio.gate, &aio.ca.cert, aio.dir.path(), true).await;
    aio.gate.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_go_client_sees_the_refusals_in_front() {
    let stack = Stack::start().await;
    check_with_skopeo(&stack.gate, &stack.ca.cert, stack.dir.path(), false).await;
    stack.gate.stop().await;
}

/// An `[[immutable]]` refusal (the check reads the manifest first) is answered over
/// HTTP/2 too.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_immutable_tag_refusal_is_answered_over_http2() {
    let aio = AllInOne::start_with(common::registry::AllInOneOptions {
        extra_tables: "[[immutable]]\nrepositories = [\"**\"]\ntags = [\"v*\"]\n".into(),
        ..common::registry::AllInOneOptions::default()
    })
    .await;
    common::image::push_image(
        &aio.pusher(),
        "h2/app",
        "v1",
        &[common::pseudo_random_bytes(2000, 5)],
        common::image::UploadMode::Monolithic,
    )
    .await;
    let base = aio.gate.base_url();
    let ca = aio.ca.cert.clone();
    let pusher = format!("{}:{}", common::PUSHER.0, common::PUSHER.1);
    let (code, status, err) = tokio::task::spawn_blocking(move || {
        curl_write(
            "--http2",
            &ca,
            "PUT",
            &format!("{base}/v2/h2/app/manifests/v1"),
            Some(&pusher),
        )
    })
    .await
    .expect("join");
    assert_eq!((code, status.as_str()), (0, "403"), "{err}");
    aio.gate.stop().await;
}
