//! SIGHUP makes the gate re-read its certificate and password files at once.
//!
//! A test binary of its own: the signal goes to the whole test process, and the
//! only gate in it is this test's (its handler is installed before it serves).

mod common;

use common::client::{Client, empty};
use common::gate::bcrypt_line;
use common::pki::{Ca, KeyAlg, KeyEncoding};
use common::{PUSHER, Stack, StackOptions, VIEWER, command, eventually, replace_file};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_certificate_and_password_files() {
    // File polling once an hour: only the signal can explain a reload.
    let stack = Stack::start_with(StackOptions {
        watch_interval_ms: 3_600_000,
        ..StackOptions::default()
    })
    .await;
    let new_ca = Ca::new(&stack.path("new-ca"), "new CA", KeyAlg::EcP256);
    let renewed = new_ca.issue("renewed", KeyAlg::EcP256, KeyEncoding::Traditional);
    let trusts_both = Client::new(stack.gate.addr, &[&stack.ca.cert, &new_ca.cert]);
    // The gate serves (so its SIGHUP handler is in place).
    assert_eq!(trusts_both.peer_certificate().await, stack.leaf.der);

    replace_file(&stack.gate.files.private_key, &renewed.key_pem());
    replace_file(&stack.gate.files.certificate, &renewed.chain_pem());
    stack.gate.write_htpasswd(&format!(
        "{}{}",
        bcrypt_line(PUSHER.0, PUSHER.1),
        bcrypt_line(VIEWER.0, "veras-new-password")
    ));
    assert_eq!(
        trusts_both.peer_certificate().await,
        stack.leaf.der,
        "without the signal (and with hourly polling) nothing is reloaded yet"
    );

    let status = command("kill", "procps")
        .args(["-HUP", &std::process::id().to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -HUP failed");

    eventually("the renewed certificate after SIGHUP", || async {
        (trusts_both.try_peer_certificate().await.ok()? == renewed.der).then_some(())
    })
    .await;
    let vera = trusts_both.with_basic(VIEWER.0, "veras-new-password");
    eventually("vera's new password after SIGHUP", || async {
        let resp = vera
            .request("POST", "/v2/sighup/app/blobs/uploads/", &[], empty())
            .await;
        (resp.status == 403).then_some(())
    })
    .await;
    stack.gate.stop().await;
}
