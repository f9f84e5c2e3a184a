//! The real skopeo through the gate: a push as a member of the push group, an
//! anonymous inspect and copy back, and a push with a wrong password that fails.

mod common;

use common::image::{get_manifest, tar_layer, write_oci_layout};
use common::skopeo::Skopeo;
use common::{PUSHER, Stack, sha256_digest};

fn three_layers() -> Vec<Vec<u8>> {
    vec![
        tar_layer(&[("etc/motd", b"pushed by skopeo through registry-gate\n")]),
        tar_layer(&[(
            "usr/share/data.bin",
            &common::pseudo_random_bytes(300_000, 77),
        )]),
        tar_layer(&[("app/one.txt", b"one\n"), ("app/two.txt", b"two\n")]),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_pushes_as_a_pusher_and_pulls_anonymously() {
    let stack = Stack::start().await;
    let skopeo = Skopeo::new(&stack.path("skopeo"), &stack.ca.cert);
    let layout_dir = stack.path("layout");
    let layers = three_layers();
    let layout = write_oci_layout(&layout_dir, "v1", &layers);
    let image = format!("docker://{}/skopeo/demo:v1", stack.gate.authority());
    let source = format!("oci:{}:v1", layout_dir.display());
    let creds = format!("{}:{}", PUSHER.0, PUSHER.1);

    let run = |args: Vec<String>| {
        let skopeo = &skopeo;
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            tokio::task::block_in_place(|| skopeo.run_ok(&args))
        }
    };
    run(vec![
        "copy".into(),
        "--dest-cert-dir".into(),
        skopeo.cert_dir().into(),
        "--dest-creds".into(),
        creds.clone(),
        source.clone(),
        image.clone(),
    ])
    .await;

    // Anonymous: the raw manifest is the one pushed, byte for byte.
    let raw = run(vec![
        "inspect".into(),
        "--raw".into(),
        "--cert-dir".into(),
        skopeo.cert_dir().into(),
        image.clone(),
    ])
    .await;
    assert_eq!(sha256_digest(&raw.stdout), layout.manifest_digest);
    let inspect = run(vec![
        "inspect".into(),
        "--cert-dir".into(),
        skopeo.cert_dir().into(),
        image.clone(),
    ])
    .await;
    let inspected: serde_json::Value =
        serde_json::from_slice(&inspect.stdout).expect("skopeo inspect JSON");
    assert_eq!(inspected["Digest"], layout.manifest_digest.as_str());
    assert_eq!(
        inspected["Layers"],
        serde_json::json!(layout.layer_digests),
        "layers seen by skopeo inspect"
    );

    // Anonymous copy back to a directory: every blob by its digest.
    let out = stack.path("pulled");
    run(vec![
        "copy".into(),
        "--src-cert-dir".into(),
        skopeo.cert_dir().into(),
        image.clone(),
        format!("dir:{}", out.display()),
    ])
    .await;
    let manifest = std::fs::read(out.join("manifest.json")).expect("pulled manifest");
    assert_eq!(sha256_digest(&manifest), layout.manifest_digest);
    let mut expected = vec![layout.config_digest.clone()];
    expected.extend(layout.layer_digests.iter().cloned());
    for (digest, original) in expected
        .iter()
        .zip(std::iter::once(None).chain(layout.layer_blobs.iter().map(Some)))
    {
        let hex = digest.strip_prefix("sha256:").expect("sha256");
        let blob = std::fs::read(out.join(hex))
            .unwrap_or_else(|e| panic!("blob {digest} not in the pulled directory: {e}"));
        assert_eq!(&sha256_digest(&blob), digest);
        if let Some(original) = original {
            assert_eq!(&blob, original, "layer bytes");
        }
    }

    // And the gate's own client sees the same manifest anonymously.
    let resp = get_manifest(&stack.client(), "skopeo/demo", "v1").await;
    assert_eq!(resp.status, 200);
    assert_eq!(sha256_digest(&resp.body), layout.manifest_digest);
    stack.gate.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_push_with_a_wrong_password_fails_and_stores_nothing() {
    let stack = Stack::start().await;
    let skopeo = Skopeo::new(&stack.path("skopeo"), &stack.ca.cert);
    let layout_dir = stack.path("layout");
    write_oci_layout(&layout_dir, "v1", &three_layers());
    let image = format!("docker://{}/skopeo-denied/demo:v1", stack.gate.authority());
    let creds = format!("{}:not-his-password", PUSHER.0);
    let source = format!("oci:{}:v1", layout_dir.display());
    let output = tokio::task::block_in_place(|| {
        skopeo.run(&[
            "copy",
            "--retry-times",
            "0",
            "--dest-cert-dir",
            skopeo.cert_dir(),
            "--dest-creds",
            &creds,
            &source,
            &image,
        ])
    });
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success(),
        "skopeo pushed with a wrong password:\n{stderr}"
    );
    assert!(
        stderr.to_lowercase().contains("unauthorized") || stderr.contains("401"),
        "skopeo should report that it was not authorized:\n{stderr}"
    );
    let resp = get_manifest(&stack.client(), "skopeo-denied/demo", "v1").await;
    assert_eq!(resp.status, 404, "nothing was stored: {}", resp.text());
    let log = stack.upstream.access_log();
    for method in ["POST", "PUT", "PATCH"] {
        assert!(
            !log.contains(&format!("\"{method} /v2/skopeo-denied/")),
            "a {method} with a wrong password reached the registry:\n{log}"
        );
    }
    stack.gate.stop().await;
}
