//! Webhooks (`[[notifications]]`), end to end: a real HTTP listener started by the
//! test receives the events of pushes (skopeo and plain API clients), pulls, tag and
//! manifest deletes, in distribution's envelope, from the built-in registry on both
//! storage backends and in front of Debian's `docker-registry`. A listener that is
//! down and comes back gets every queued event; one that hangs is retried after
//! `timeout_secs` while clients go on unhindered; a full queue drops and counts; a
//! graceful shutdown delivers what was queued.

#[macro_use]
mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::Value;

use common::client::Client;
use common::image::{OCI_MANIFEST, PushedImage, UploadMode, push_image};
use common::registry::{AllInOne, AllInOneOptions};
use common::skopeo::Skopeo;
use common::store::Backend;
use common::upstream::free_loopback_port;
use common::{PUSHER, Stack, StackOptions, eventually, metric, metrics, pseudo_random_bytes};

const EVENTS_MEDIA_TYPE: &str = "application/vnd.docker.distribution.events.v1+json";

/// One POST the listener took.
#[derive(Clone, Debug)]
struct Received {
    content_type: String,
    authorization: String,
    body: Value,
}

/// A loopback port for a webhook listener, held from the start: bound but not
/// listening, so the gate's attempts are refused as by a listener that is down, and
/// no other socket of the busy test run can take the port before the listener
/// starts (a port found free and bound again later once was, failing the bind).
struct HookPort {
    socket: tokio::net::TcpSocket,
    addr: SocketAddr,
}

impl HookPort {
    fn new() -> HookPort {
        let socket = tokio::net::TcpSocket::new_v4().expect("a socket for the webhook");
        socket
            .bind("127.0.0.1:0".parse().expect("addr"))
            .expect("bind a loopback port for the webhook");
        let addr = socket.local_addr().expect("local address");
        HookPort { socket, addr }
    }
}

/// A webhook listener: plain HTTP/1.1 on loopback, answering 200 and keeping what it
/// was sent; the first `hang` requests get no answer at all.
struct Listener {
    addr: SocketAddr,
    received: Arc<Mutex<Vec<Received>>>,
    /// Requests that arrived, answered or not.
    arrivals: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Listener {
    async fn start(port: HookPort, hang: usize) -> Listener {
        let tcp = port
            .socket
            .listen(1024)
            .expect("listen on the webhook port");
        let addr = tcp.local_addr().expect("local address");
        let received = Arc::new(Mutex::new(Vec::new()));
        let arrivals = Arc::new(AtomicUsize::new(0));
        let (r, a) = (received.clone(), arrivals.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = tcp.accept().await else {
                    return;
                };
                let (r, a) = (r.clone(), a.clone());
                tokio::spawn(async move {
                    let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let (r, a) = (r.clone(), a.clone());
                        async move {
                            let n = a.fetch_add(1, Ordering::SeqCst);
                            let header = |name: &str| {
                                req.headers()
                                    .get(name)
                                    .and_then(|v| v.to_str().ok())
                                    .unwrap_or("")
                                    .to_owned()
                            };
                            let (content_type, authorization) =
                                (header("content-type"), header("authorization"));
                            let body = req.into_body().collect().await.map(|b| b.to_bytes());
                            if n < hang {
                                std::future::pending::<()>().await;
                            }
                            let body = body.unwrap_or_default();
                            let body = serde_json::from_slice(&body).unwrap_or_else(|e| {
                                Value::String(format!(
                                    "not JSON ({e}): {}",
                                    String::from_utf8_lossy(&body)
                                ))
                            });
                            r.lock().expect("lock").push(Received {
                                content_type,
                                authorization,
                                body,
                            });
                            Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                                Bytes::new(),
                            )))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Listener {
            addr,
            received,
            arrivals,
            task,
        }
    }

    fn url(&self) -> String {
        format!("http://{}/hooks/registry", self.addr)
    }

    fn received(&self) -> Vec<Received> {
        self.received.lock().expect("lock").clone()
    }

    /// Every event received, in order.
    fn events(&self) -> Vec<Value> {
        self.received()
            .iter()
            .flat_map(|r| r.body["events"].as_array().cloned().unwrap_or_default())
            .collect()
    }

    /// Wait until `n` events have arrived; they are returned.
    async fn wait_events(&self, n: usize) -> Vec<Value> {
        eventually(&format!("{n} event(s) at the listener"), || async {
            let events = self.events();
            (events.len() >= n).then_some(events)
        })
        .await
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A `[[notifications]]` table for all three kinds of event, with `extra` lines.
fn hook_table(url: &str, extra: &str) -> String {
    let events = if extra.contains("events") {
        ""
    } else {
        "events = [\"push\", \"delete\", \"pull\"]\n"
    };
    format!(
        "[[notifications]]\nurl = {url:?}\n{events}\
         headers = {{ Authorization = \"Bearer hook-secret\" }}\n{extra}\n"
    )
}

async fn push(client: &Client, repo: &str, tag: &str, seed: u64) -> PushedImage {
    let layer = vec![pseudo_random_bytes(2000 + seed as usize, seed)];
    push_image(client, repo, tag, &layer, UploadMode::Monolithic).await
}

async fn delete(client: &Client, path: &str) {
    let resp = client
        .request("DELETE", path, &[], common::client::empty())
        .await;
    assert_eq!(resp.status.as_u16(), 202, "DELETE {path}: {}", resp.text());
}

/// The events whose action and repository are these.
fn of<'a>(events: &'a [Value], action: &str, repo: &str) -> Vec<&'a Value> {
    events
        .iter()
        .filter(|e| e["action"] == action && e["target"]["repository"] == repo)
        .collect()
}

// ---------------------------------------------------------------------------
// what is sent

on_both_backends!(events_of_pushes_pulls_and_deletes);

async fn events_of_pushes_pulls_and_deletes(backend: Backend) {
    let listener = Listener::start(HookPort::new(), 0).await;
    let aio = AllInOne::start_with(AllInOneOptions {
        delete: true,
        extra_tables: hook_table(&listener.url(), ""),
        ..AllInOneOptions::on(backend)
    })
    .await;
    let pusher = aio.pusher();
    let image = push(&pusher, "hooks/app", "v1", 1).await;
    let pushed = listener.wait_events(1).await;
    let e = &pushed[0];
    assert_eq!(e["action"], "push", "{e:#}");
    let t = &e["target"];
    assert_eq!(t["mediaType"], OCI_MANIFEST, "{e:#}");
    assert_eq!(t["digest"], image.manifest_digest.as_str(), "{e:#}");
    assert_eq!(t["size"], image.manifest.len() as u64, "{e:#}");
    assert_eq!(t["length"], image.manifest.len() as u64, "{e:#}");
    assert_eq!(t["repository"], "hooks/app");
    assert_eq!(t["tag"], "v1");
    assert_eq!(
        t["url"],
        format!(
            "{}/v2/hooks/app/manifests/{}",
            aio.gate.base_url(),
            image.manifest_digest
        )
    );
    assert_eq!(e["actor"]["name"], PUSHER.0);
    assert_eq!(e["request"]["method"], "PUT");
    assert_eq!(e["request"]["host"], aio.gate.authority());
    assert!(
        e["request"]["addr"]
            .as_str()
            .is_some_and(|a| a.starts_with("127.0.0.1:")),
        "{e:#}"
    );
    assert!(e["request"]["id"].as_str().is_some_and(|s| !s.is_empty()));
    let stamp = e["timestamp"].as_str().expect("timestamp");
    assert!(
        stamp.len() == 24 && stamp.ends_with('Z') && &stamp[10..11] == "T",
        "RFC 3339: {stamp}"
    );
    let instance = e["source"]["instanceID"].as_str().expect("instanceID");
    assert!(!instance.is_empty());
    let received = listener.received();
    assert_eq!(received[0].content_type, EVENTS_MEDIA_TYPE);
    assert_eq!(received[0].authorization, "Bearer hook-secret");

    // skopeo, a real client, copying v1 to v2: a push event naming it.
    let skopeo = Skopeo::new(&aio.path("skopeo"), &aio.ca.cert);
    let creds = format!("{}:{}", PUSHER.0, PUSHER.1);
    let gate = aio.gate.authority();
    skopeo.run_ok(&[
        "copy",
        "--src-cert-dir",
        skopeo.cert_dir(),
        "--dest-cert-dir",
        skopeo.cert_dir(),
        "--dest-creds",
        &creds,
        "--preserve-digests",
        &format!("docker://{gate}/hooks/app:v1"),
        &format!("docker://{gate}/hooks/app:v2"),
    ]);
    let events = eventually("skopeo's push event", || async {
        let events = listener.events();
        events
            .iter()
            .any(|e| e["action"] == "push" && e["target"]["tag"] == "v2")
            .then_some(events)
    })
    .await;
    let by_skopeo = events
        .iter()
        .find(|e| e["action"] == "push" && e["target"]["tag"] == "v2")
        .expect("v2 push");
    assert_eq!(
        by_skopeo["target"]["digest"],
        image.manifest_digest.as_str()
    );
    // skopeo's pull of v1 (anonymous) was told too.
    let pulls = of(&events, "pull", "hooks/app");
    assert!(
        pulls
            .iter()
            .any(|p| p["target"]["tag"] == "v1" && p["actor"].get("name").is_none()),
        "an anonymous pull of v1 among {pulls:#?}"
    );
    let agent = by_skopeo["request"]["useragent"].as_str().unwrap_or("");
    assert!(!agent.is_empty(), "skopeo's user agent: {by_skopeo:#}");

    // A tag delete, then a manifest delete.
    let before = listener.events().len();
    delete(&pusher, "/v2/hooks/app/manifests/v2").await;
    delete(
        &pusher,
        &format!("/v2/hooks/app/manifests/{}", image.manifest_digest),
    )
    .await;
    let events = listener.wait_events(before + 2).await;
    let deletes = of(&events[before..], "delete", "hooks/app");
    assert_eq!(deletes.len(), 2, "{deletes:#?}");
    assert_eq!(deletes[0]["target"]["tag"], "v2");
    assert_eq!(
        deletes[1]["target"]["digest"],
        image.manifest_digest.as_str()
    );
    assert!(
        deletes[1]["target"].get("tag").is_none(),
        "{:#}",
        deletes[1]
    );

    // Every event is its own, from one instance; none was sent twice.
    let events = listener.events();
    let mut ids: Vec<&str> = events.iter().filter_map(|e| e["id"].as_str()).collect();
    let n = ids.len();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), n, "event ids are unique");
    assert!(events.iter().all(|e| e["source"]["instanceID"] == instance));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn in_front_of_docker_registry_the_upstreams_answers_are_told() {
    let listener = Listener::start(HookPort::new(), 0).await;
    let stack = Stack::start_with(StackOptions {
        extra_tables: hook_table(&listener.url(), "events = [\"push\", \"delete\"]"),
        ..StackOptions::default()
    })
    .await;
    let pusher = stack.pusher();
    let image = push(&pusher, "front/hooked", "latest", 7).await;
    // A refused write tells nobody.
    let refused = stack
        .viewer()
        .request(
            "PUT",
            "/v2/front/hooked/manifests/nope",
            &[("content-type", OCI_MANIFEST)],
            common::client::full(image.manifest.clone()),
        )
        .await;
    assert_eq!(refused.status.as_u16(), 403, "{}", refused.text());
    // A pull is not asked for here.
    let pulled = stack
        .client()
        .request(
            "GET",
            "/v2/front/hooked/manifests/latest",
            &[("accept", OCI_MANIFEST)],
            common::client::empty(),
        )
        .await;
    assert_eq!(pulled.status.as_u16(), 200, "{}", pulled.text());
    delete(
        &pusher,
        &format!("/v2/front/hooked/manifests/{}", image.manifest_digest),
    )
    .await;
    let events = listener.wait_events(2).await;
    assert_eq!(events[0]["action"], "push", "{events:#?}");
    assert_eq!(
        events[0]["target"]["digest"],
        image.manifest_digest.as_str()
    );
    assert_eq!(events[0]["target"]["tag"], "latest");
    assert_eq!(events[1]["action"], "delete");
    assert_eq!(
        events[1]["target"]["digest"],
        image.manifest_digest.as_str()
    );
    // Nothing else arrives (the refused PUT and the pull): a control push is next.
    push(&pusher, "front/control", "c", 8).await;
    let events = listener.wait_events(3).await;
    assert_eq!(events.len(), 3, "{events:#?}");
    assert_eq!(events[2]["target"]["repository"], "front/control");
}

// ---------------------------------------------------------------------------
// delivery: a listener down, hanging, a full queue, shutdown

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_listener_that_is_down_gets_every_event_when_it_comes_back() {
    let hook_port = HookPort::new();
    let hook = hook_port.addr;
    let admin = free_loopback_port();
    let aio = AllInOne::start_with(AllInOneOptions {
        extra_tables: hook_table(&format!("http://{hook}/h"), "backoff_max_secs = 1")
            + &format!("[admin]\nlisten = \"{admin}\"\n"),
        ..AllInOneOptions::default()
    })
    .await;
    let pusher = aio.pusher();
    for i in 0..3 {
        // Each push is answered while nobody listens.
        push(&pusher, "down/app", &format!("t{i}"), 10 + i).await;
    }
    eventually("failed attempts counted", || async {
        let m = metrics(admin).await;
        (metric(
            &m,
            &format!("registry_gate_notifications_failures_total{{endpoint=\"{hook}\"}}"),
        ) >= 1)
            .then_some(())
    })
    .await;
    let listener = Listener::start(hook_port, 0).await;
    let events = listener.wait_events(3).await;
    let tags: Vec<&str> = events
        .iter()
        .filter_map(|e| e["target"]["tag"].as_str())
        .collect();
    assert_eq!(tags, ["t0", "t1", "t2"], "in order, each once");
    let m = metrics(admin).await;
    let series = |name: &str| format!("registry_gate_notifications_{name}{{endpoint=\"{hook}\"}}");
    assert_eq!(metric(&m, &series("sent_total")), 3, "{m}");
    assert_eq!(metric(&m, &series("dropped_total")), 0, "{m}");
    assert_eq!(metric(&m, &series("pending")), 0, "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hanging_listener_is_retried_and_never_holds_a_client() {
    // The first two POSTs get no answer: each attempt ends after timeout_secs.
    let listener = Listener::start(HookPort::new(), 2).await;
    let admin = free_loopback_port();
    let aio = AllInOne::start_with(AllInOneOptions {
        extra_tables: hook_table(&listener.url(), "timeout_secs = 1\nbackoff_max_secs = 1")
            + &format!("[admin]\nlisten = \"{admin}\"\n"),
        ..AllInOneOptions::default()
    })
    .await;
    let pusher = aio.pusher();
    push(&pusher, "hang/app", "a", 21).await;
    eventually("the first attempt hanging", || async {
        (listener.arrivals.load(Ordering::SeqCst) >= 1).then_some(())
    })
    .await;
    // While the listener holds the worker, pushes and pulls go on.
    push(&pusher, "hang/app", "b", 22).await;
    let pulled = aio.client().get("/v2/hang/app/manifests/b").await;
    assert_eq!(pulled.status.as_u16(), 200);
    let events = listener.wait_events(3).await;
    let tags: Vec<&str> = events
        .iter()
        .filter(|e| e["action"] == "push")
        .filter_map(|e| e["target"]["tag"].as_str())
        .collect();
    assert_eq!(tags, ["a", "b"], "{events:#?}");
    assert!(
        listener.arrivals.load(Ordering::SeqCst) >= 5,
        "two hung attempts, then three deliveries"
    );
    let m = metrics(admin).await;
    let hook = listener.addr;
    assert!(
        metric(
            &m,
            &format!("registry_gate_notifications_failures_total{{endpoint=\"{hook}\"}}")
        ) >= 2,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_queue_drops_and_counts_and_the_client_never_notices() {
    let hook_port = HookPort::new();
    let hook = hook_port.addr;
    let admin = free_loopback_port();
    let aio = AllInOne::start_with(AllInOneOptions {
        extra_tables: hook_table(
            &format!("http://{hook}/h"),
            "name = \"ci\"\nqueue_size = 2\nbackoff_max_secs = 1",
        ) + &format!("[admin]\nlisten = \"{admin}\"\n"),
        ..AllInOneOptions::default()
    })
    .await;
    let pusher = aio.pusher();
    const PUSHES: u64 = 6;
    for i in 0..PUSHES {
        push(&pusher, "full/app", &format!("t{i}"), 30 + i).await;
    }
    let m = metrics(admin).await;
    let dropped = metric(
        &m,
        "registry_gate_notifications_dropped_total{endpoint=\"ci\"}",
    );
    // At most one in the worker's hands and two queued.
    assert!(dropped >= PUSHES - 3, "dropped {dropped}:\n{m}");
    let listener = Listener::start(hook_port, 0).await;
    let delivered = PUSHES - dropped;
    let events = listener.wait_events(delivered as usize).await;
    let m = metrics(admin).await;
    assert_eq!(
        metric(
            &m,
            "registry_gate_notifications_sent_total{endpoint=\"ci\"}"
        ),
        delivered,
        "{m}"
    );
    assert_eq!(events.len() as u64, delivered);
    // The first pushes are the ones that got through.
    assert_eq!(events[0]["target"]["tag"], "t0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_graceful_shutdown_delivers_what_was_queued() {
    let hook_port = HookPort::new();
    let hook = hook_port.addr;
    let mut aio = AllInOne::start_with(AllInOneOptions {
        extra_tables: hook_table(&format!("http://{hook}/h"), "backoff_max_secs = 1"),
        ..AllInOneOptions::default()
    })
    .await;
    let pusher = aio.pusher();
    push(&pusher, "bye/app", "one", 41).await;
    push(&pusher, "bye/app", "two", 42).await;
    aio.gate.begin_shutdown();
    // The listener comes up only after the shutdown began.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let listener = Listener::start(hook_port, 0).await;
    aio.gate.stop().await;
    let tags: Vec<String> = listener
        .events()
        .iter()
        .filter_map(|e| e["target"]["tag"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(tags, ["one", "two"], "delivered before serve returned");
}
