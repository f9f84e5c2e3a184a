//! The gate's TLS: protocol versions, the key encodings certbot and others write,
//! and certificates replaced on disk while the gate serves (renewal), including
//! replacements that are broken and must be refused.

mod common;

use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use common::client::{Client, empty, read_at_least, read_body_digest, read_rest};
use common::image::{UploadMode, upload_blob};
use common::pki::{Ca, KeyAlg, KeyEncoding, fingerprint};
use common::{
    Stack, StackOptions, WATCH_INTERVAL_MS, command, eventually, pseudo_random_bytes, replace_file,
};

/// An anonymous request that the gate forwards: the registry's own 404 for an
/// unknown repository comes back through the TLS connection.
async fn assert_registry_answers(client: &Client, what: &str) {
    let resp = client.get("/v2/probe-tls/tags/list").await;
    let codes = resp.assert_oci_error(404);
    assert_eq!(codes, ["NAME_UNKNOWN"], "{what}: the registry's answer");
    resp.assert_api_version_once(what);
}

/// `openssl s_client` forced to one protocol version; returns (success, output).
fn s_client(addr: std::net::SocketAddr, ca: &std::path::Path, version: &str) -> (bool, String) {
    let output = command("openssl", "openssl")
        .args([
            "s_client",
            "-connect",
            &addr.to_string(),
            "-servername",
            "localhost",
            "-CAfile",
            ca.to_str().expect("utf-8 path"),
            "-verify_return_error",
            // Let this client really offer TLS 1.0/1.1 (OpenSSL 3 refuses them at
            // its default security level before anything is sent).
            "-cipher",
            "DEFAULT:@SECLEVEL=0",
            version,
        ])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run openssl s_client");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_1_0_and_1_1_are_refused_and_1_2_and_1_3_accepted() {
    let stack = Stack::start().await;
    let addr = stack.gate.addr;
    let ca = stack.ca.cert.clone();
    let results = tokio::task::spawn_blocking(move || {
        ["-tls1", "-tls1_1", "-tls1_2", "-tls1_3"].map(|v| (v, s_client(addr, &ca, v)))
    })
    .await
    .expect("s_client");
    for (version, (ok, output)) in &results {
        match *version {
            "-tls1" | "-tls1_1" => {
                assert!(
                    output.contains("CONNECTED"),
                    "openssl {version} did not reach the gate:\n{output}"
                );
                assert!(
                    !output.contains("no protocols available"),
                    "this openssl cannot offer {version} at all, so it proves nothing:\n{output}"
                );
                assert!(
                    !ok && output.contains("Cipher is (NONE)"),
                    "the gate accepted {version}:\n{output}"
                );
            }
            _ => {
                let expected = if *version == "-tls1_2" {
                    "New, TLSv1.2, Cipher is"
                } else {
                    "New, TLSv1.3, Cipher is"
                };
                assert!(
                    *ok && output.contains(expected),
                    "the gate refused {version}:\n{output}"
                );
                assert!(
                    output.contains("Verify return code: 0 (ok)"),
                    "{version}: the chain should verify against the test CA:\n{output}"
                );
            }
        }
    }
    stack.gate.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rsa_and_ecdsa_keys_in_pkcs1_sec1_and_pkcs8_are_all_accepted() {
    for (key_alg, key_encoding) in [
        (KeyAlg::Rsa2048, KeyEncoding::Traditional),
        (KeyAlg::Rsa2048, KeyEncoding::Pkcs8),
        (KeyAlg::EcP256, KeyEncoding::Traditional),
        (KeyAlg::EcP256, KeyEncoding::Pkcs8),
    ] {
        let stack = Stack::start_with(StackOptions {
            key_alg,
            key_encoding,
            ..StackOptions::default()
        })
        .await;
        let client = stack.client();
        assert_eq!(
            client.peer_certificate().await,
            stack.leaf.der,
            "{key_alg:?} {key_encoding:?}: the configured certificate"
        );
        for c in [client.clone(), client.http2()] {
            assert_registry_answers(&c, &format!("{key_alg:?} {key_encoding:?}")).await;
        }
        stack.gate.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_swapped_during_a_large_download_leaves_the_download_whole() {
    let stack = Stack::start().await;
    let size = 64 * 1024 * 1024 + 12_345;
    let blob = pseudo_random_bytes(size, 42);
    let digest = upload_blob(&stack.pusher(), "big/blob", &blob, UploadMode::Monolithic).await;
    drop(blob);

    // A renewal from another CA, so that old and new are easy to tell apart.
    let new_ca = Ca::new(&stack.path("renewed-ca"), "renewed CA", KeyAlg::Rsa2048);
    let renewed = new_ca.issue("renewed", KeyAlg::Rsa2048, KeyEncoding::Traditional);
    let trusts_both = Client::new(stack.gate.addr, &[&stack.ca.cert, &new_ca.cert]);
    let trusts_new_only = Client::new(stack.gate.addr, &[&new_ca.cert]);
    assert_eq!(trusts_both.peer_certificate().await, stack.leaf.der);

    for downloader in [trusts_both.clone(), trusts_both.http2()] {
        let response = downloader
            .send("GET", &format!("/v2/big/blob/blobs/{digest}"), &[], empty())
            .await;
        assert_eq!(response.status(), 200);
        let mut body = response.into_body();
        // Read a little, then leave the transfer hanging while the certificate moves.
        let head = read_at_least(&mut body, 1024 * 1024).await;
        let current = trusts_both.peer_certificate().await;
        let (next_chain, next_key, next_der) = if current == stack.leaf.der {
            (renewed.chain_pem(), renewed.key_pem(), renewed.der.clone())
        } else {
            (
                stack.leaf.chain_pem(),
                stack.leaf.key_pem(),
                stack.leaf.der.clone(),
            )
        };
        // certbot-style: the key first, then the certificate.
        replace_file(&stack.gate.files.private_key, &next_key);
        replace_file(&stack.gate.files.certificate, &next_chain);
        eventually("new connections to get the new certificate", || async {
            let seen = trusts_both.try_peer_certificate().await.ok()?;
            (seen == next_der).then_some(())
        })
        .await;

        // Finish the download that started under the old certificate.
        let mut received = head;
        let before_swap = received.len();
        read_rest(&mut body, &mut received, "after the certificate swap").await;
        let protocol = downloader.protocol();
        assert!(
            received.len() > before_swap,
            "{protocol:?}: nothing came after the swap"
        );
        assert_eq!(
            received.len(),
            size,
            "{protocol:?}: the download must complete"
        );
        assert_eq!(
            common::sha256_digest(&received),
            digest,
            "{protocol:?}: the downloaded bytes"
        );
    }
    // After the two swaps the renewed certificate is back on the old one; swap a
    // last time to the renewed pair and use it with a client that trusts only it.
    replace_file(&stack.gate.files.private_key, &renewed.key_pem());
    replace_file(&stack.gate.files.certificate, &renewed.chain_pem());
    eventually("the renewed certificate", || async {
        (trusts_both.try_peer_certificate().await.ok()? == renewed.der).then_some(())
    })
    .await;
    let resp = trusts_new_only
        .get(&format!("/v2/big/blob/blobs/{digest}"))
        .await;
    assert_eq!(resp.status, 200);
    assert_eq!(common::sha256_digest(&resp.body), digest);
    let refused = stack.client().try_peer_certificate().await;
    assert!(
        refused.is_err(),
        "a client trusting only the old CA must now fail the handshake"
    );

    // A streamed digest check of a fresh download, too.
    let response = trusts_new_only
        .http2()
        .send("GET", &format!("/v2/big/blob/blobs/{digest}"), &[], empty())
        .await;
    let mut body = response.into_body();
    assert_eq!(read_body_digest(&mut body).await, (size as u64, digest));
    stack.gate.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_certificate_or_mismatched_key_is_refused_and_the_old_pair_keeps_serving() {
    let stack = Stack::start().await;
    let other_ca = Ca::new(&stack.path("other-ca"), "other CA", KeyAlg::EcP256);
    let other = other_ca.issue("other", KeyAlg::EcP256, KeyEncoding::Pkcs8);
    let trusts_both = Client::new(stack.gate.addr, &[&stack.ca.cert, &other_ca.cert]);
    let files = &stack.gate.files;
    let (good_chain, good_key) = (stack.leaf.chain_pem(), stack.leaf.key_pem());

    // The other leaf alone (without its CA), served with the old key.
    let leaf_only: Vec<u8> = {
        let pem = other.chain_pem();
        let marker = b"-----END CERTIFICATE-----\n";
        let end = pem
            .windows(marker.len())
            .position(|w| w == marker)
            .expect("end of the leaf")
            + marker.len();
        pem[..end].to_vec()
    };
    let cases: Vec<(&str, Vec<u8>, Vec<u8>)> = vec![
        (
            "a garbage certificate",
            b"this is not PEM\n".to_vec(),
            good_key.clone(),
        ),
        ("an empty certificate file", Vec::new(), good_key.clone()),
        (
            "a certificate cut in the middle",
            good_chain[..good_chain.len() / 3].to_vec(),
            good_key.clone(),
        ),
        (
            "a key that does not match the certificate",
            other.chain_pem(),
            good_key.clone(),
        ),
        ("another leaf with the old key", leaf_only, good_key.clone()),
        (
            "a garbage key",
            good_chain.clone(),
            b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n".to_vec(),
        ),
        ("an empty key file", good_chain.clone(), Vec::new()),
        (
            "a key of the wrong kind",
            good_chain.clone(),
            other.key_pem(),
        ),
    ];
    for (what, chain, key) in cases {
        replace_file(&files.certificate, &chain);
        replace_file(&files.private_key, &key);
        // Nothing to poll for: the gate must keep doing what it did. Give the
        // watcher many rounds to (wrongly) act.
        tokio::time::sleep(Duration::from_millis(WATCH_INTERVAL_MS * 15)).await;
        let seen = trusts_both
            .try_peer_certificate()
            .await
            .unwrap_or_else(|e| panic!("after {what} was written, new connections fail: {e}"));
        assert_eq!(
            fingerprint(&seen),
            stack.leaf.fingerprint(),
            "after {what} was written, new connections must still get the old certificate"
        );
        assert_registry_answers(&stack.client(), &format!("after {what}")).await;
    }
    // Deleted files are refused the same way.
    std::fs::remove_file(&files.certificate).expect("remove certificate");
    tokio::time::sleep(Duration::from_millis(WATCH_INTERVAL_MS * 15)).await;
    assert_eq!(
        trusts_both.peer_certificate().await,
        stack.leaf.der,
        "after the certificate file was deleted"
    );

    // The watcher was alive all along: a good pair is taken.
    replace_file(&files.private_key, &other.key_pem());
    replace_file(&files.certificate, &other.chain_pem());
    eventually("the good replacement pair to be served", || async {
        (trusts_both.try_peer_certificate().await.ok()? == other.der).then_some(())
    })
    .await;
    stack.gate.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_that_never_finishes_is_dropped() {
    let stack = Stack::start_with(StackOptions {
        handshake_timeout_secs: 1,
        ..StackOptions::default()
    })
    .await;
    // One client says nothing at all, the other stops inside its ClientHello.
    for opening in [&b""[..], &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01][..]] {
        let mut tcp = tokio::net::TcpStream::connect(stack.gate.addr)
            .await
            .expect("connect");
        tcp.write_all(opening).await.expect("write");
        let mut buf = [0u8; 1024];
        let closed = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                match tcp.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(
            closed.is_ok(),
            "a stalled TLS handshake ({} bytes sent) stayed open for 30 s with \
             handshake_timeout_secs = 1",
            opening.len()
        );
    }
    assert_registry_answers(&stack.client(), "after the stalled handshakes").await;
    stack.gate.stop().await;
}
