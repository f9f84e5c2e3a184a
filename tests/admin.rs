//! The admin listener: /metrics in Prometheus text, /healthz, and /readyz following the
//! upstream — plain HTTP on its own loopback port, beside the gate fronting a real
//! CNCF registry.

mod common;

use std::net::SocketAddr;

use common::upstream::free_loopback_port;
use common::{Stack, StackOptions, eventually};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A plain HTTP/1.1 GET on a fresh connection: (status, body).
async fn get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n");
    tcp.write_all(request.as_bytes()).await.ok()?;
    let mut answer = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        tcp.read_to_end(&mut answer),
    )
    .await
    .ok()?
    .ok()?;
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text.split(' ').nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())?;
    Some((status, body))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_health_and_readiness() {
    let admin = free_loopback_port();
    let mut stack = Stack::start_with(StackOptions {
        extra_tables: format!("[admin]\nlisten = \"{admin}\"\n"),
        ..StackOptions::default()
    })
    .await;
    let (status, _) = eventually("the admin listener", || get(admin, "/healthz")).await;
    assert_eq!(status, 200);
    assert_eq!(get(admin, "/readyz").await.expect("readyz").0, 200);

    // Some traffic: a read, a wrong password, a refused method.
    let resp = stack.client().get("/v2/admin/app/tags/list").await;
    assert_eq!(resp.status.as_u16(), 404, "{}", resp.text());
    stack.client().with_basic("mark", "wrong").get("/v2/").await;
    stack
        .client()
        .request("OPTIONS", "/v2/", &[], common::client::empty())
        .await;

    let (status, metrics) = get(admin, "/metrics").await.expect("metrics");
    assert_eq!(status, 200);
    for series in [
        r#"registry_gate_requests_total{method="GET",route="tags",status="404"} 1"#,
        r#"registry_gate_requests_total{method="other",route="base",status="405"} 1"#,
        r#"registry_gate_auth_failures_total{reason="bad_credentials"} 1"#,
        "registry_gate_certificate_not_after_timestamp_seconds ",
        "registry_gate_request_duration_seconds_bucket",
        "registry_gate_sent_bytes_total",
    ] {
        assert!(
            metrics.contains(series),
            "{series} missing from:\n{metrics}"
        );
    }

    // The upstream goes away: not ready, with the reason; back: ready again.
    stack.upstream.stop();
    let (status, body) = eventually("readyz to fail", || async {
        get(admin, "/readyz").await.filter(|(s, _)| *s == 503)
    })
    .await;
    assert_eq!(status, 503);
    assert!(body.contains("upstream"), "{body}");
    assert_eq!(
        get(admin, "/healthz").await.expect("healthz").0,
        200,
        "alive all the same"
    );
    let resp = stack.client().get("/v2/admin/app/tags/list").await;
    assert_eq!(resp.status.as_u16(), 502);
    let (_, metrics) = get(admin, "/metrics").await.expect("metrics");
    assert!(
        metrics.contains(r#"registry_gate_upstream_errors_total{reason="connect"}"#),
        "{metrics}"
    );
    stack.upstream.restart();
    eventually("readyz to recover", || async {
        get(admin, "/readyz").await.filter(|(s, _)| *s == 200)
    })
    .await;
    stack.gate.stop().await;
}
