//! Prometheus metrics (text exposition via `prometheus-client`), served on the admin
//! listener (`admin`). Label values come from small fixed sets (method, route family,
//! status) so hostile requests cannot grow the number of series.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicI64, AtomicU64};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub method: &'static str,
    pub route: &'static str,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DurationLabels {
    pub method: &'static str,
    pub route: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

/// A `[[notifications]]` endpoint, by its name (from the configuration, so a fixed set).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabels {
    pub endpoint: String,
}

/// Every metric the gate keeps.
pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub durations: Family<DurationLabels, Histogram>,
    pub bytes_in: Counter,
    pub bytes_out: Counter,
    pub upstream_errors: Family<ReasonLabels, Counter>,
    pub auth_failures: Family<ReasonLabels, Counter>,
    pub certificate_not_after: Gauge<i64, AtomicI64>,
    pub storage_bytes: Gauge<i64, AtomicI64>,
    pub uploads_in_progress: Gauge<i64, AtomicI64>,
    pub connections: Gauge<i64, AtomicI64>,
    pub cache_hits: Family<KindLabels, Counter>,
    pub cache_misses: Family<KindLabels, Counter>,
    pub cache_served_bytes: Counter,
    pub cache_evictions: Counter,
    pub cache_corrupt: Counter,
    pub cache_bytes: Gauge<i64, AtomicI64>,
    pub notifications_sent: Family<EndpointLabels, Counter>,
    pub notifications_failures: Family<EndpointLabels, Counter>,
    pub notifications_dropped: Family<EndpointLabels, Counter>,
    pub notifications_pending: Family<EndpointLabels, Gauge<i64, AtomicI64>>,
    /// The per-request series, looked up once each.
    series: Box<Series>,
}

/// Route families (`Route::family`, plus the gate's own) and the statuses a registry
/// answers with, as indices: `observe` finds a request's series in these tables
/// instead of in the `Family` maps, whose lookup hashes the labels with SipHash under
/// a lock (about 1,000 instructions per request). A status not listed takes the map.
const FAMILIES: [&str; 10] = [
    "base",
    "catalog",
    "tags",
    "manifests",
    "blobs",
    "uploads",
    "referrers",
    "token",
    "page",
    "other",
];
const STATUSES: [u16; 20] = [
    200, 201, 202, 204, 206, 301, 304, 307, 400, 401, 403, 404, 405, 413, 416, 429, 500, 502, 503,
    504,
];
/// The six methods the gate serves, then `other`: `method_index` indexes this.
const METHODS: [&str; 7] = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "other"];

/// Handles into `requests` and `durations` (a handle shares its series' counters).
struct Series {
    requests: [[[OnceLock<Counter>; STATUSES.len()]; FAMILIES.len()]; METHODS.len()],
    durations: [[OnceLock<Histogram>; FAMILIES.len()]; METHODS.len()],
}

impl Series {
    fn new() -> Box<Series> {
        Box::new(Series {
            requests: [const { [const { [const { OnceLock::new() }; STATUSES.len()] }; FAMILIES.len()] };
                METHODS.len()],
            durations: [const { [const { OnceLock::new() }; FAMILIES.len()] }; METHODS.len()],
        })
    }
}

/// A method as an index into `METHODS`: one of the six the gate serves, or `other`.
fn method_index(m: &http::Method) -> usize {
    match *m {
        http::Method::GET => 0,
        http::Method::HEAD => 1,
        http::Method::POST => 2,
        http::Method::PUT => 3,
        http::Method::PATCH => 4,
        http::Method::DELETE => 5,
        _ => 6,
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("registry_gate");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests answered, by method, route family and status",
            requests.clone(),
        );
        let durations = Family::<DurationLabels, Histogram>::new_with_constructor(|| {
            Histogram::new([
                0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, 120.0, 600.0,
            ])
        });
        registry.register(
            "request_duration_seconds",
            "Time from request head to the end of the response body",
            durations.clone(),
        );
        let bytes_in = Counter::<u64, AtomicU64>::default();
        registry.register(
            "received_bytes",
            "Request body bytes received",
            bytes_in.clone(),
        );
        let bytes_out = Counter::<u64, AtomicU64>::default();
        registry.register("sent_bytes", "Response body bytes sent", bytes_out.clone());
        let upstream_errors = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "upstream_errors",
            "Failed requests to the upstream registry",
            upstream_errors.clone(),
        );
        let auth_failures = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "auth_failures",
            "Refused credentials, by reason",
            auth_failures.clone(),
        );
        let certificate_not_after = Gauge::<i64, AtomicI64>::default();
        registry.register(
            "certificate_not_after_timestamp_seconds",
            "Expiry (notAfter, Unix time) of the certificate being served",
            certificate_not_after.clone(),
        );
        let storage_bytes = Gauge::<i64, AtomicI64>::default();
        registry.register(
            "storage_bytes",
            "Bytes of blob content in the built-in registry (sampled)",
            storage_bytes.clone(),
        );
        let uploads_in_progress = Gauge::<i64, AtomicI64>::default();
        registry.register(
            "uploads_in_progress",
            "Upload sessions open in the built-in registry (sampled)",
            uploads_in_progress.clone(),
        );
        let connections = Gauge::<i64, AtomicI64>::default();
        registry.register(
            "open_connections",
            "Client connections open now",
            connections.clone(),
        );
        let cache_hits = Family::<KindLabels, Counter>::default();
        registry.register(
            "cache_hits",
            "Front cache: requests answered from the cache, by kind (manifest, blob)",
            cache_hits.clone(),
        );
        let cache_misses = Family::<KindLabels, Counter>::default();
        registry.register(
            "cache_misses",
            "Front cache: cacheable requests fetched from the upstream, by kind",
            cache_misses.clone(),
        );
        let cache_served_bytes = Counter::<u64, AtomicU64>::default();
        registry.register(
            "cache_served_bytes",
            "Front cache: body bytes served from the cache",
            cache_served_bytes.clone(),
        );
        let cache_evictions = Counter::<u64, AtomicU64>::default();
        registry.register(
            "cache_evictions",
            "Front cache: files removed to stay under max_size",
            cache_evictions.clone(),
        );
        let cache_corrupt = Counter::<u64, AtomicU64>::default();
        registry.register(
            "cache_corrupt",
            "Front cache: files found corrupt or truncated (removed, fetched again)",
            cache_corrupt.clone(),
        );
        let cache_bytes = Gauge::<i64, AtomicI64>::default();
        registry.register(
            "cache_size_bytes",
            "Front cache: bytes on disk",
            cache_bytes.clone(),
        );
        let notifications_sent = Family::<EndpointLabels, Counter>::default();
        registry.register(
            "notifications_sent",
            "Webhook events delivered (the listener answered 2xx or 3xx)",
            notifications_sent.clone(),
        );
        let notifications_failures = Family::<EndpointLabels, Counter>::default();
        registry.register(
            "notifications_failures",
            "Webhook delivery attempts that failed (retried with back-off)",
            notifications_failures.clone(),
        );
        let notifications_dropped = Family::<EndpointLabels, Counter>::default();
        registry.register(
            "notifications_dropped",
            "Webhook events dropped because the endpoint's queue was full",
            notifications_dropped.clone(),
        );
        let notifications_pending = Family::<EndpointLabels, Gauge<i64, AtomicI64>>::default();
        registry.register(
            "notifications_pending",
            "Webhook events queued or being delivered",
            notifications_pending.clone(),
        );
        Metrics {
            notifications_sent,
            notifications_failures,
            notifications_dropped,
            notifications_pending,
            cache_hits,
            cache_misses,
            cache_served_bytes,
            cache_evictions,
            cache_corrupt,
            cache_bytes,
            registry,
            requests,
            durations,
            bytes_in,
            bytes_out,
            upstream_errors,
            auth_failures,
            certificate_not_after,
            storage_bytes,
            uploads_in_progress,
            connections,
            series: Series::new(),
        }
    }

    /// Record one finished request.
    pub fn observe(
        &self,
        method: &http::Method,
        route: &'static str,
        status: u16,
        bytes_in: u64,
        bytes_out: u64,
        elapsed: Duration,
    ) {
        let m = method_index(method);
        let method = METHODS[m];
        let requests = RequestLabels {
            method,
            route,
            status,
        };
        let durations = DurationLabels { method, route };
        let family = FAMILIES.iter().position(|f| *f == route);
        let status_at = STATUSES.iter().position(|s| *s == status);
        match (family, status_at) {
            (Some(f), Some(s)) => self.series.requests[m][f][s]
                .get_or_init(|| self.requests.get_or_create_owned(&requests))
                .inc(),
            _ => self.requests.get_or_create(&requests).inc(),
        };
        let seconds = elapsed.as_secs_f64();
        match family {
            Some(f) => self.series.durations[m][f]
                .get_or_init(|| self.durations.get_or_create_owned(&durations))
                .observe(seconds),
            None => self.durations.get_or_create(&durations).observe(seconds),
        }
        self.bytes_in.inc_by(bytes_in);
        self.bytes_out.inc_by(bytes_out);
    }

    /// The text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_the_series() {
        let m = Metrics::new();
        m.observe(
            &http::Method::GET,
            "manifests",
            200,
            0,
            512,
            Duration::from_millis(3),
        );
        m.observe(
            &http::Method::from_bytes(b"PROPFIND").expect("method"),
            "other",
            405,
            0,
            10,
            Duration::ZERO,
        );
        // The same series again (through the table), and a status the table lacks.
        m.observe(&http::Method::GET, "manifests", 200, 0, 0, Duration::ZERO);
        m.observe(&http::Method::GET, "manifests", 418, 0, 0, Duration::ZERO);
        m.auth_failures
            .get_or_create(&ReasonLabels {
                reason: "wrong_password",
            })
            .inc();
        let text = m.encode();
        assert!(
            text.contains(
                r#"registry_gate_requests_total{method="GET",route="manifests",status="200"} 2"#
            ),
            "{text}"
        );
        assert!(
            text.contains(
                r#"registry_gate_requests_total{method="GET",route="manifests",status="418"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains(
                r#"registry_gate_request_duration_seconds_count{method="GET",route="manifests"} 3"#
            ),
            "{text}"
        );
        assert!(text.contains(r#"method="other""#), "{text}");
        assert!(
            text.contains("registry_gate_sent_bytes_total 522"),
            "{text}"
        );
        assert!(
            text.contains(r#"registry_gate_auth_failures_total{reason="wrong_password"} 1"#),
            "{text}"
        );
        assert!(
            text.contains("registry_gate_request_duration_seconds_bucket"),
            "{text}"
        );
    }
}
