//! `[[notifications]]`: tell other systems about pushes, deletes (and pulls) with the
//! JSON events the CNCF registry's notifications send, so listeners written for
//! `registry:2` work unchanged.
//!
//! ```text
//! gate (accepted answer) ─ Notifier::publish ─┬─ endpoint 1: bounded queue ─ worker ─ POST
//!                                              └─ endpoint 2: bounded queue ─ worker ─ POST
//! ```
//!
//! Publishing never waits: an event goes into each interested endpoint's queue, or,
//! when that queue is full, is dropped, counted (`notifications_dropped_total`) and
//! logged. One worker per endpoint posts the events in order, one per envelope,
//! retrying each with back-off until the listener takes it (a listener that hangs
//! costs one `timeout_secs` per attempt). Delivery is at least once: an attempt that
//! timed out may have arrived, so listeners should use the event `id` to skip
//! repeats. At graceful shutdown the queues are drained, up to a deadline.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::metrics::{EndpointLabels, Metrics};

/// The envelope's media type, as `registry:2` (2.8) sends it.
pub const EVENTS_MEDIA_TYPE: &str = "application/vnd.docker.distribution.events.v1+json";

/// What an endpoint is told about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Push,
    Delete,
    Pull,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Push => "push",
            Action::Delete => "delete",
            Action::Pull => "pull",
        }
    }
}

/// One `[[notifications]]` table.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NotificationConfig {
    /// Where events are POSTed (`http://` or `https://`).
    pub url: String,
    /// The endpoint's name in logs and metrics; default: the URL's host and port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default = "default_events")]
    pub events: Vec<Action>,
    /// Sent with every POST (e.g. `Authorization`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// One delivery attempt may take this long.
    #[serde(default = "default_timeout")]
    pub timeout_secs: u64,
    /// Events waiting for this endpoint; more are dropped (and counted).
    #[serde(default = "default_queue_size")]
    pub queue_size: usize,
    /// Longest wait between two attempts (the wait doubles from 0.5 s up to this).
    #[serde(default = "default_backoff_max")]
    pub backoff_max_secs: u64,
    /// PEM CA certificates to trust for an `https://` listener (instead of the
    /// system's roots).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_certificate: Option<std::path::PathBuf>,
}

fn default_events() -> Vec<Action> {
    vec![Action::Push, Action::Delete]
}
fn default_timeout() -> u64 {
    5
}
fn default_queue_size() -> usize {
    1000
}
fn default_backoff_max() -> u64 {
    30
}

impl NotificationConfig {
    /// The first thing wrong with this table, if any.
    pub fn problem(&self) -> Option<String> {
        let url = match reqwest::Url::parse(&self.url) {
            Ok(u) => u,
            Err(e) => return Some(format!("url {:?}: {e}", self.url)),
        };
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            return Some(format!(
                "url {:?}: give http(s)://host[:port]/path",
                self.url
            ));
        }
        if self.events.is_empty() {
            return Some("events: name at least one of push, delete, pull".into());
        }
        for (name, value) in &self.headers {
            if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                return Some(format!("headers: {name:?} is not a header name"));
            }
            if http::HeaderValue::from_str(value).is_err() {
                return Some(format!(
                    "headers: the value of {name} is not a header value"
                ));
            }
        }
        if self.timeout_secs == 0 {
            return Some("timeout_secs: must be at least 1".into());
        }
        if self.queue_size == 0 {
            return Some("queue_size: must be at least 1".into());
        }
        if self.backoff_max_secs == 0 {
            return Some("backoff_max_secs: must be at least 1".into());
        }
        None
    }

    fn display_name(&self) -> String {
        if let Some(name) = &self.name {
            return name.clone();
        }
        match reqwest::Url::parse(&self.url) {
            Ok(u) => match (u.host_str(), u.port()) {
                (Some(h), Some(p)) => format!("{h}:{p}"),
                (Some(h), None) => h.to_owned(),
                _ => self.url.clone(),
            },
            Err(_) => self.url.clone(),
        }
    }
}

/// One event, in the fields and names of distribution's `notifications.Event`.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    pub id: String,
    pub timestamp: String,
    pub action: &'static str,
    pub target: Target,
    pub request: RequestRecord,
    pub actor: ActorRecord,
    pub source: SourceRecord,
}

#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Target {
    #[serde(skip_serializing_if = "String::is_empty")]
    pub media_type: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub digest: String,
    #[serde(skip_serializing_if = "is_zero")]
    pub size: u64,
    /// The same as `size`, kept by distribution for old listeners.
    #[serde(skip_serializing_if = "is_zero")]
    pub length: u64,
    pub repository: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub url: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub tag: String,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct RequestRecord {
    pub id: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub addr: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub host: String,
    pub method: String,
    pub useragent: String,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ActorRecord {
    #[serde(skip_serializing_if = "String::is_empty")]
    pub name: String,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct SourceRecord {
    #[serde(skip_serializing_if = "String::is_empty")]
    pub addr: String,
    #[serde(rename = "instanceID")]
    pub instance_id: String,
}

#[derive(Serialize)]
struct Envelope<'a> {
    events: [&'a Event; 1],
}

/// Random hex, `n` bytes of it.
fn random_hex(n: usize) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(n * 2);
    for _ in 0..n {
        let b: u8 = rand::random();
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// A random UUID (version 4) in its usual text form.
fn uuid4() -> String {
    let mut b: [u8; 16] = rand::random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// RFC 3339 with milliseconds, UTC.
fn timestamp(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let whole = crate::auth::token::rfc3339(d.as_secs());
    format!("{}.{:03}Z", whole.trim_end_matches('Z'), d.subsec_millis())
}

struct Endpoint {
    name: String,
    actions: Vec<Action>,
    queue: mpsc::Sender<Event>,
    /// When the last "queue full" line was written (seconds since start).
    last_drop_log: AtomicU64,
}

/// The endpoints and their workers.
pub struct Notifier {
    endpoints: Vec<Endpoint>,
    source: SourceRecord,
    metrics: Arc<Metrics>,
    started: Instant,
    closing: watch::Sender<bool>,
    workers: std::sync::Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for Notifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Notifier")
            .field("endpoints", &self.endpoints.len())
            .finish()
    }
}

impl Notifier {
    /// Start one worker per endpoint. `port` is the gate's, for `source.addr`.
    pub fn start(
        configs: &[NotificationConfig],
        port: u16,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Notifier>, String> {
        let (closing, _) = watch::channel(false);
        let mut endpoints = Vec::new();
        let mut workers = Vec::new();
        for config in configs {
            let name = config.display_name();
            let client = http_client(config).map_err(|e| format!("notifications {name}: {e}"))?;
            let (tx, rx) = mpsc::channel(config.queue_size);
            let worker = Worker {
                name: name.clone(),
                url: config.url.clone(),
                headers: config.headers.clone(),
                client,
                backoff_max: Duration::from_secs(config.backoff_max_secs),
                metrics: metrics.clone(),
                queue: rx,
                closing: closing.subscribe(),
            };
            workers.push(tokio::spawn(worker.run()));
            endpoints.push(Endpoint {
                name,
                actions: config.events.clone(),
                queue: tx,
                last_drop_log: AtomicU64::new(0),
            });
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "registry-gate".to_owned());
        Ok(Arc::new(Notifier {
            endpoints,
            source: SourceRecord {
                addr: format!("{host}:{port}"),
                instance_id: uuid4(),
            },
            metrics,
            started: Instant::now(),
            closing,
            workers: std::sync::Mutex::new(workers),
        }))
    }

    /// Whether any endpoint wants events of this kind (so callers build none in vain).
    pub fn wants(&self, action: Action) -> bool {
        self.endpoints.iter().any(|e| e.actions.contains(&action))
    }

    /// Fill in the id, time and source of an event and queue it for every endpoint
    /// that wants it. Never waits.
    pub fn publish(
        &self,
        action: Action,
        target: Target,
        request: RequestRecord,
        actor: ActorRecord,
    ) {
        let event = Event {
            id: uuid4(),
            timestamp: timestamp(SystemTime::now()),
            action: action.as_str(),
            target,
            request,
            actor,
            source: self.source.clone(),
        };
        for endpoint in self
            .endpoints
            .iter()
            .filter(|e| e.actions.contains(&action))
        {
            let labels = EndpointLabels {
                endpoint: endpoint.name.clone(),
            };
            match endpoint.queue.try_send(event.clone()) {
                Ok(()) => {
                    self.metrics
                        .notifications_pending
                        .get_or_create(&labels)
                        .inc();
                }
                Err(_) => {
                    self.metrics
                        .notifications_dropped
                        .get_or_create(&labels)
                        .inc();
                    // One line per endpoint and 10 s at most: a dead listener must
                    // not flood the log.
                    let now = self.started.elapsed().as_secs() + 1;
                    let last = endpoint.last_drop_log.load(Ordering::Relaxed);
                    if now >= last + 10
                        && endpoint
                            .last_drop_log
                            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                            .is_ok()
                    {
                        tracing::warn!(
                            endpoint = %endpoint.name,
                            action = action.as_str(),
                            repository = %event.target.repository,
                            "notification queue full: event dropped (see \
                             registry_gate_notifications_dropped_total)"
                        );
                    }
                }
            }
        }
    }

    /// Deliver what is queued, then stop the workers; whatever is still undelivered at
    /// `deadline` is given up (and logged).
    pub async fn drain(&self, deadline: Duration) {
        let _ = self.closing.send(true);
        let workers: Vec<JoinHandle<()>> = match self.workers.lock() {
            Ok(mut w) => std::mem::take(&mut *w),
            Err(_) => return,
        };
        if workers.is_empty() {
            return;
        }
        let aborts: Vec<_> = workers.iter().map(JoinHandle::abort_handle).collect();
        let all = futures_util::future::join_all(workers);
        if tokio::time::timeout(deadline, all).await.is_err() {
            for a in aborts {
                a.abort();
            }
            for endpoint in &self.endpoints {
                let left = self
                    .metrics
                    .notifications_pending
                    .get_or_create(&EndpointLabels {
                        endpoint: endpoint.name.clone(),
                    })
                    .get();
                if left > 0 {
                    tracing::error!(
                        endpoint = %endpoint.name,
                        "shutting down: {left} notification(s) not delivered within {} s",
                        deadline.as_secs()
                    );
                }
            }
        }
    }
}

fn http_client(config: &NotificationConfig) -> Result<reqwest::Client, String> {
    let mut builder = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(config.timeout_secs))
        .timeout(Duration::from_secs(config.timeout_secs))
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("registry-gate/", env!("CARGO_PKG_VERSION")));
    if let Some(path) = &config.ca_certificate {
        let pem = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        builder = builder.tls_certs_only(certs);
    }
    builder
        .build()
        .map_err(|e| format!("cannot make an HTTP client: {e}"))
}

struct Worker {
    name: String,
    url: String,
    headers: BTreeMap<String, String>,
    client: reqwest::Client,
    backoff_max: Duration,
    metrics: Arc<Metrics>,
    queue: mpsc::Receiver<Event>,
    closing: watch::Receiver<bool>,
}

impl Worker {
    async fn run(mut self) {
        let labels = EndpointLabels {
            endpoint: self.name.clone(),
        };
        loop {
            let event = tokio::select! {
                biased;
                e = self.queue.recv() => match e {
                    Some(e) => e,
                    None => return,
                },
                // Closing and nothing queued: done.
                _ = self.closing.wait_for(|c| *c) => return,
            };
            self.deliver(&event, &labels).await;
            self.metrics
                .notifications_pending
                .get_or_create(&labels)
                .dec();
        }
    }

    /// Post one event until the listener takes it.
    async fn deliver(&self, event: &Event, labels: &EndpointLabels) {
        // Encoded once; each attempt shares the bytes.
        let body = match serde_json::to_vec(&Envelope { events: [event] }) {
            Ok(b) => bytes::Bytes::from(b),
            Err(e) => {
                tracing::error!(endpoint = %self.name, "cannot encode an event: {e}");
                return;
            }
        };
        let mut wait = Duration::from_millis(500);
        let mut failures = 0u64;
        let mut last_log: Option<Instant> = None;
        loop {
            let mut request = self
                .client
                .post(&self.url)
                .header(http::header::CONTENT_TYPE, EVENTS_MEDIA_TYPE)
                .body(body.clone());
            for (name, value) in &self.headers {
                request = request.header(name.as_str(), value.as_str());
            }
            let outcome = match request.send().await {
                // As distribution: 2xx and 3xx are taken.
                Ok(resp) if resp.status().as_u16() < 400 => Ok(()),
                Ok(resp) => Err(format!("the listener answered {}", resp.status())),
                Err(e) if e.is_timeout() => Err("no answer within timeout_secs".to_owned()),
                Err(e) => Err(error_chain(&e)),
            };
            match outcome {
                Ok(()) => {
                    self.metrics.notifications_sent.get_or_create(labels).inc();
                    if failures > 0 {
                        tracing::info!(
                            endpoint = %self.name,
                            failures,
                            "notification delivered after {failures} failed attempt(s)"
                        );
                    }
                    return;
                }
                Err(why) => {
                    failures += 1;
                    self.metrics
                        .notifications_failures
                        .get_or_create(labels)
                        .inc();
                    if last_log.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
                        last_log = Some(Instant::now());
                        tracing::warn!(
                            endpoint = %self.name,
                            event = %event.id,
                            action = event.action,
                            "notification not delivered ({why}); retrying in {:.1} s",
                            wait.as_secs_f64()
                        );
                    }
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(self.backoff_max);
                }
            }
        }
    }
}

/// An error and its causes on one line (reqwest's own message is often just
/// "error sending request").
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// The request fields of an event from the request the gate answered.
pub fn request_record(
    id: &str,
    peer: std::net::SocketAddr,
    host: &str,
    method: &http::Method,
    user_agent: &str,
) -> RequestRecord {
    RequestRecord {
        id: id.to_owned(),
        addr: peer.to_string(),
        host: host.to_owned(),
        method: method.as_str().to_owned(),
        useragent: user_agent.to_owned(),
    }
}

/// A record for events the gate makes by itself (the scheduled prune).
pub fn internal_request(what: &str) -> RequestRecord {
    RequestRecord {
        id: random_hex(8),
        method: "DELETE".into(),
        useragent: what.to_owned(),
        ..RequestRecord::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_has_distributions_field_names() {
        let event = Event {
            id: "e1".into(),
            timestamp: timestamp(UNIX_EPOCH + Duration::from_millis(1_500)),
            action: "push",
            target: Target {
                media_type: "application/vnd.oci.image.manifest.v1+json".into(),
                digest: "sha256:ab".into(),
                size: 7,
                length: 7,
                repository: "team/app".into(),
                url: "https://r/v2/team/app/manifests/sha256:ab".into(),
                tag: "v1".into(),
            },
            request: RequestRecord {
                id: "r1".into(),
                addr: "127.0.0.1:5".into(),
                host: "r".into(),
                method: "PUT".into(),
                useragent: "skopeo".into(),
            },
            actor: ActorRecord {
                name: "alice".into(),
            },
            source: SourceRecord {
                addr: "h:5043".into(),
                instance_id: "i".into(),
            },
        };
        let v: serde_json::Value =
            serde_json::to_value(Envelope { events: [&event] }).expect("json");
        let e = &v["events"][0];
        assert_eq!(e["timestamp"], "1970-01-01T00:00:01.500Z");
        assert_eq!(
            e["target"]["mediaType"],
            "application/vnd.oci.image.manifest.v1+json"
        );
        assert_eq!(e["target"]["length"], 7);
        assert_eq!(e["request"]["useragent"], "skopeo");
        assert_eq!(e["source"]["instanceID"], "i");
        assert_eq!(e["actor"]["name"], "alice");
    }

    #[test]
    fn uuid_shape() {
        let u = uuid4();
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "4");
    }

    #[test]
    fn config_problems() {
        let ok: NotificationConfig =
            toml::from_str("url = \"http://127.0.0.1:1/hook\"").expect("parse");
        assert_eq!(ok.problem(), None);
        assert_eq!(ok.events, vec![Action::Push, Action::Delete]);
        for bad in [
            "url = \"ftp://x/\"",
            "url = \"http://x/\"\nevents = []",
            "url = \"http://x/\"\ntimeout_secs = 0",
            "url = \"http://x/\"\nheaders = { \"bad name\" = \"v\" }",
        ] {
            let c: NotificationConfig = toml::from_str(bad).expect("parse");
            assert!(c.problem().is_some(), "{bad}");
        }
    }
}
