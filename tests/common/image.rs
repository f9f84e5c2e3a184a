//! Whole images over the OCI distribution API: the one push helper every test uses,
//! the pull that checks every digest, and an OCI image layout on disk for skopeo.
//!
//! Push, as in the distribution spec ("Pushing blobs", "Pushing manifests"):
//! ```text
//! POST  /v2/<repo>/blobs/uploads/                       → 202, Location: <upload>
//! PUT   <upload>?digest=<d>   (whole blob)              → 201        monolithic
//! PATCH <upload>  Content-Range: a-b  (one chunk)       → 202, Location, Range   chunked
//! PATCH <upload>  (no length: Transfer-Encoding chunked)→ 202        streamed
//! PUT   <upload>?digest=<d>   (empty)                   → 201
//! PUT   /v2/<repo>/manifests/<tag>  (OCI image manifest)→ 201, Docker-Content-Digest
//! ```

use std::path::Path;

use bytes::Bytes;
use serde_json::json;

use super::client::{Client, Resp, empty, full, streamed};
use super::sha256_digest;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// How blob bytes travel to the registry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UploadMode {
    /// POST, then one PUT carrying the whole blob (Content-Length).
    Monolithic,
    /// POST, PATCHes of at most this many bytes with Content-Range and
    /// Content-Length, then an empty PUT.
    Chunked(usize),
    /// POST, one PATCH whose body has no Content-Length (HTTP/1.1 chunked
    /// transfer encoding), then an empty PUT.
    Streamed,
}

/// What was pushed, to check a pull against.
#[derive(Clone, Debug)]
pub struct PushedImage {
    pub repo: String,
    pub tag: String,
    pub manifest: Bytes,
    pub manifest_digest: String,
    pub config: Bytes,
    pub config_digest: String,
    pub layer_digests: Vec<String>,
    pub layer_sizes: Vec<u64>,
}

impl PushedImage {
    /// Config and layer digests.
    pub fn blob_digests(&self) -> Vec<String> {
        let mut all = vec![self.config_digest.clone()];
        all.extend(self.layer_digests.iter().cloned());
        all
    }
}

/// The image config and the OCI manifest for these layers (uncompressed tar, so
/// each diff_id is the layer's digest).
pub fn config_and_manifest(layers: &[Vec<u8>]) -> (Vec<u8>, Vec<u8>) {
    let diff_ids: Vec<String> = layers.iter().map(|l| sha256_digest(l)).collect();
    config_and_manifest_with(layers, &diff_ids, OCI_LAYER)
}

/// The image config and the OCI manifest for layer blobs of `media_type` whose
/// uncompressed digests are `diff_ids`.
pub fn config_and_manifest_with(
    blobs: &[Vec<u8>],
    diff_ids: &[String],
    media_type: &str,
) -> (Vec<u8>, Vec<u8>) {
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {},
        "rootfs": { "type": "layers", "diff_ids": diff_ids },
    }))
    .expect("config JSON");
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": OCI_CONFIG,
            "digest": sha256_digest(&config),
            "size": config.len(),
        },
        "layers": blobs.iter().map(|l| json!({
            "mediaType": media_type,
            "digest": sha256_digest(l),
            "size": l.len(),
        })).collect::<Vec<_>>(),
    }))
    .expect("manifest JSON");
    (config, manifest)
}

/// Push a whole image (config, layers, manifest tagged `tag`) with `client`'s
/// credentials. Fails the test, quoting the gate's answer, at the first surprise.
pub async fn push_image(
    client: &Client,
    repo: &str,
    tag: &str,
    layers: &[Vec<u8>],
    mode: UploadMode,
) -> PushedImage {
    let (config, manifest) = config_and_manifest(layers);
    let config_digest = upload_blob(client, repo, &config, mode).await;
    let mut layer_digests = Vec::new();
    for layer in layers {
        layer_digests.push(upload_blob(client, repo, layer, mode).await);
    }
    let manifest_digest = sha256_digest(&manifest);
    let resp = client
        .request(
            "PUT",
            &format!("/v2/{repo}/manifests/{tag}"),
            &[("content-type", OCI_MANIFEST)],
            full(manifest.clone()),
        )
        .await;
    expect_status(&resp, 201, "PUT manifest");
    assert_eq!(
        resp.header("docker-content-digest"),
        Some(manifest_digest.as_str()),
        "PUT manifest: Docker-Content-Digest"
    );
    PushedImage {
        repo: repo.to_owned(),
        tag: tag.to_owned(),
        manifest: manifest.into(),
        manifest_digest,
        config: config.into(),
        config_digest,
        layer_sizes: layers.iter().map(|l| l.len() as u64).collect(),
        layer_digests,
    }
}

fn expect_status(resp: &Resp, status: u16, what: &str) {
    assert_eq!(
        resp.status.as_u16(),
        status,
        "{what}: expected {status}, the gate answered {} {:?}: {}",
        resp.status,
        resp.headers,
        resp.text()
    );
}

/// The path and query of a `Location`, which must point at the gate itself
/// (relative, or absolute with the gate's address), never at the upstream.
pub fn location_on_gate(client: &Client, resp: &Resp, what: &str) -> String {
    let location = resp
        .header("location")
        .unwrap_or_else(|| panic!("{what}: no Location header in {:?}", resp.headers));
    if location.starts_with('/') {
        return location.to_owned();
    }
    let port = client.addr.port();
    for base in [
        format!("https://localhost:{port}"),
        format!("https://127.0.0.1:{port}"),
    ] {
        if let Some(rest) = location.strip_prefix(&base)
            && rest.starts_with('/')
        {
            return rest.to_owned();
        }
    }
    panic!("{what}: Location {location:?} does not point at the gate (port {port})");
}

fn with_digest(location: &str, digest: &str) -> String {
    let separator = if location.contains('?') { '&' } else { '?' };
    format!("{location}{separator}digest={digest}")
}

/// Upload one blob; returns its digest after checking the registry's answer.
pub async fn upload_blob(client: &Client, repo: &str, data: &[u8], mode: UploadMode) -> String {
    let digest = sha256_digest(data);
    let resp = client
        .request(
            "POST",
            &format!("/v2/{repo}/blobs/uploads/"),
            &[("content-length", "0")],
            empty(),
        )
        .await;
    expect_status(&resp, 202, "POST blob upload");
    let mut location = location_on_gate(client, &resp, "POST blob upload");

    let final_body = match mode {
        UploadMode::Monolithic => full(Bytes::copy_from_slice(data)),
        UploadMode::Chunked(chunk_size) => {
            let mut start = 0usize;
            for chunk in data.chunks(chunk_size.max(1)) {
                let end = start + chunk.len() - 1;
                let resp = client
                    .request(
                        "PATCH",
                        &location,
                        &[
                            ("content-type", "application/octet-stream"),
                            ("content-range", &format!("{start}-{end}")),
                        ],
                        full(Bytes::copy_from_slice(chunk)),
                    )
                    .await;
                expect_status(&resp, 202, "PATCH chunk");
                assert_eq!(
                    resp.header("range"),
                    Some(format!("0-{end}").as_str()),
                    "PATCH chunk: Range after bytes {start}-{end}"
                );
                location = location_on_gate(client, &resp, "PATCH chunk");
                start = end + 1;
            }
            empty()
        }
        UploadMode::Streamed => {
            let chunks = data.chunks(64 * 1024).map(Bytes::copy_from_slice).collect();
            let resp = client
                .request(
                    "PATCH",
                    &location,
                    &[("content-type", "application/octet-stream")],
                    streamed(chunks),
                )
                .await;
            expect_status(&resp, 202, "PATCH streamed (no Content-Length)");
            if !data.is_empty() {
                assert_eq!(
                    resp.header("range"),
                    Some(format!("0-{}", data.len() - 1).as_str()),
                    "PATCH streamed: Range"
                );
            }
            location = location_on_gate(client, &resp, "PATCH streamed");
            empty()
        }
    };
    let headers: &[(&str, &str)] = match mode {
        UploadMode::Monolithic => &[("content-type", "application/octet-stream")],
        _ => &[("content-length", "0")],
    };
    let resp = client
        .request("PUT", &with_digest(&location, &digest), headers, final_body)
        .await;
    expect_status(&resp, 201, "PUT blob (close upload)");
    assert_eq!(
        resp.header("docker-content-digest"),
        Some(digest.as_str()),
        "PUT blob: Docker-Content-Digest"
    );
    location_on_gate(client, &resp, "PUT blob");
    digest
}

/// `GET /v2/<repo>/manifests/<reference>` accepting OCI image manifests (the
/// registry answers 404 to a client that does not say it accepts them).
pub async fn get_manifest(client: &Client, repo: &str, reference: &str) -> Resp {
    client
        .request(
            "GET",
            &format!("/v2/{repo}/manifests/{reference}"),
            &[("accept", OCI_MANIFEST)],
            empty(),
        )
        .await
}

/// Pull the manifest by `reference` (tag or digest) and every blob it names,
/// checking bytes and digests against what was pushed.
pub async fn pull_and_verify(client: &Client, repo: &str, reference: &str, image: &PushedImage) {
    let resp = client
        .request(
            "GET",
            &format!("/v2/{repo}/manifests/{reference}"),
            &[("accept", OCI_MANIFEST)],
            empty(),
        )
        .await;
    expect_status(&resp, 200, "GET manifest");
    assert_eq!(
        sha256_digest(&resp.body),
        image.manifest_digest,
        "the manifest's bytes hash to the pushed digest"
    );
    assert_eq!(resp.body, image.manifest, "manifest bytes");
    assert_eq!(
        resp.header("docker-content-digest"),
        Some(image.manifest_digest.as_str()),
        "GET manifest: Docker-Content-Digest"
    );
    assert_eq!(resp.header("content-type"), Some(OCI_MANIFEST));

    let manifest = resp.json();
    let mut named: Vec<String> = vec![
        manifest["config"]["digest"]
            .as_str()
            .expect("config digest")
            .to_owned(),
    ];
    for layer in manifest["layers"].as_array().expect("layers") {
        named.push(layer["digest"].as_str().expect("layer digest").to_owned());
    }
    assert_eq!(named, image.blob_digests(), "blobs named by the manifest");

    for digest in image.blob_digests() {
        let resp = client
            .request("GET", &format!("/v2/{repo}/blobs/{digest}"), &[], empty())
            .await;
        expect_status(&resp, 200, &format!("GET blob {digest}"));
        assert_eq!(
            sha256_digest(&resp.body),
            digest,
            "blob bytes hash to their digest"
        );
    }
}

/// A minimal uncompressed tar (ustar) archive of regular files.
pub fn tar_layer(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, data) in files {
        assert!(name.len() < 100, "tar name too long");
        let mut header = [0u8; 512];
        header[..name.len()].copy_from_slice(name.as_bytes());
        let mut field = |at: usize, value: &str| {
            header[at..at + value.len()].copy_from_slice(value.as_bytes());
        };
        field(100, "0000644\0");
        field(108, "0000000\0");
        field(116, "0000000\0");
        field(124, &format!("{:011o}\0", data.len()));
        field(136, "00000000000\0");
        field(148, "        ");
        field(156, "0");
        field(257, "ustar\0");
        field(263, "00");
        let checksum: u32 = header.iter().map(|&b| u32::from(b)).sum();
        header[148..156].copy_from_slice(format!("{checksum:06o}\0 ").as_bytes());
        out.extend_from_slice(&header);
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }
    out.resize(out.len() + 1024, 0);
    out
}

/// `data` in the gzip format, in stored (uncompressed) deflate blocks: enough for
/// registry clients to see a compressed layer and pass it through unchanged.
pub fn gzip_stored(data: &[u8]) -> Vec<u8> {
    let mut out = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff];
    let mut blocks = data.chunks(65_535).peekable();
    if blocks.peek().is_none() {
        out.extend_from_slice(&[1, 0, 0, 0xff, 0xff]);
    }
    while let Some(block) = blocks.next() {
        let last = u8::from(blocks.peek().is_none());
        let len = block.len() as u16;
        out.push(last);
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&(!len).to_le_bytes());
        out.extend_from_slice(block);
    }
    out.extend_from_slice(&crc32(data).to_le_bytes());
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out
}

fn crc32(data: &[u8]) -> u32 {
    let table: Vec<u32> = (0..256u32)
        .map(|mut c| {
            for _ in 0..8 {
                c = if c & 1 == 1 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
            c
        })
        .collect();
    !data.iter().fold(!0u32, |crc, &b| {
        table[((crc ^ u32::from(b)) & 0xff) as usize] ^ (crc >> 8)
    })
}

/// What `write_oci_layout` wrote.
pub struct OciLayout {
    pub manifest_digest: String,
    pub config_digest: String,
    /// Digests of the gzip-compressed layer blobs.
    pub layer_digests: Vec<String>,
    /// The compressed layer blobs themselves.
    pub layer_blobs: Vec<Vec<u8>>,
}

/// An OCI image layout in `dir` holding one image tagged `tag`, as
/// `skopeo copy oci:DIR:TAG …` reads it. `layers` are uncompressed tar archives;
/// they are stored gzip-compressed (`tar+gzip`), as skopeo would otherwise
/// compress them on the way and the digests pushed would not be these.
pub fn write_oci_layout(dir: &Path, tag: &str, layers: &[Vec<u8>]) -> OciLayout {
    let blobs = dir.join("blobs").join("sha256");
    std::fs::create_dir_all(&blobs).expect("create blobs directory");
    let write_blob = |data: &[u8]| {
        let digest = sha256_digest(data);
        let hex = digest.strip_prefix("sha256:").expect("sha256");
        std::fs::write(blobs.join(hex), data).expect("write blob");
        digest
    };
    let diff_ids: Vec<String> = layers.iter().map(|l| sha256_digest(l)).collect();
    let layer_blobs: Vec<Vec<u8>> = layers.iter().map(|l| gzip_stored(l)).collect();
    let (config, manifest) = config_and_manifest_with(&layer_blobs, &diff_ids, OCI_LAYER_GZIP);
    let config_digest = write_blob(&config);
    let layer_digests = layer_blobs.iter().map(|l| write_blob(l)).collect();
    let manifest_digest = write_blob(&manifest);
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#)
        .expect("write oci-layout");
    let index = json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": OCI_MANIFEST,
            "digest": manifest_digest,
            "size": manifest.len(),
            "annotations": { "org.opencontainers.image.ref.name": tag },
        }],
    });
    std::fs::write(
        dir.join("index.json"),
        serde_json::to_vec(&index).expect("index JSON"),
    )
    .expect("write index.json");
    OciLayout {
        manifest_digest,
        config_digest,
        layer_digests,
        layer_blobs,
    }
}
