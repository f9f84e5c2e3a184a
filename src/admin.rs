//! The admin listener: plain HTTP, meant for localhost or a private network, off
//! unless `[admin] listen` is set.
//!
//! ```text
//! GET /metrics   Prometheus/OpenMetrics text
//! GET /healthz   200 while the process runs
//! GET /readyz    200 when the certificate is valid and the backend can serve
//!                (upstream answers / storage writable), else 503 with the reason
//! ```

use std::convert::Infallible;
use std::sync::Arc;

use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

use crate::backend::Backend;
use crate::body::{self, Body};
use crate::metrics::Metrics;
use crate::tls::CertStore;

pub struct Admin {
    pub metrics: Arc<Metrics>,
    pub backend: Arc<dyn Backend>,
    pub certs: Arc<CertStore>,
}

fn text(status: StatusCode, content_type: &'static str, s: String) -> Response<Body> {
    let mut resp = Response::new(body::full(s));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

impl Admin {
    async fn answer(&self, req: Request<Incoming>) -> Response<Body> {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return text(
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain",
                "GET only\n".into(),
            );
        }
        match req.uri().path() {
            "/metrics" => text(
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                self.metrics.encode(),
            ),
            "/healthz" => text(StatusCode::OK, "text/plain", "ok\n".into()),
            "/readyz" => match self.readiness().await {
                Ok(()) => text(StatusCode::OK, "text/plain", "ready\n".into()),
                Err(why) => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    format!("not ready: {why}\n"),
                ),
            },
            _ => text(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
        }
    }

    async fn readiness(&self) -> Result<(), String> {
        let now = crate::auth::token::now_secs() as i64;
        match self.certs.not_after() {
            Some(t) if t <= now => return Err("the certificate has expired".into()),
            _ => {}
        }
        self.backend.ready().await
    }
}

/// Serve the admin endpoints on `listener` until the task is aborted.
pub async fn run(listener: TcpListener, admin: Arc<Admin>) {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "admin listener (metrics, healthz, readyz)");
    }
    let http = Arc::new(auto::Builder::new(TokioExecutor::new()));
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::error!("admin accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let (admin, http) = (admin.clone(), http.clone());
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let admin = admin.clone();
                async move { Ok::<_, Infallible>(admin.answer(req).await) }
            });
            if let Err(e) = http.serve_connection(TokioIo::new(tcp), service).await {
                tracing::debug!("admin {peer}: {e}");
            }
        });
    }
}
