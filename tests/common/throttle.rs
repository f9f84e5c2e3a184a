//! A throttling object store: an HTTP proxy on loopback in front of a real Garage node
//! that answers some requests with S3's `503 SlowDown` (as AWS does under load) and
//! forwards the rest unchanged, bodies streaming both ways. The gate under test talks
//! to it as to any S3 endpoint.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};

type ProxyBody = BoxBody<Bytes, hyper::Error>;

/// The proxy; it runs until dropped.
pub struct Throttle {
    pub addr: SocketAddr,
    /// Requests answered `503 SlowDown` so far.
    pub throttled: Arc<AtomicUsize>,
    /// Requests forwarded to the store so far.
    pub forwarded: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

const SLOW_DOWN: &str = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\
    <Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>";

impl Throttle {
    /// Answer every `every`-th request with `503 SlowDown`, forward the others to
    /// `upstream` (`http://127.0.0.1:PORT`).
    pub async fn start(upstream: &str, every: usize) -> Throttle {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the throttling proxy");
        let addr = listener.local_addr().expect("address");
        let upstream: http::Uri = upstream.parse().expect("upstream URL");
        let client: Client<HttpConnector, Incoming> =
            Client::builder(TokioExecutor::new()).build_http();
        let throttled = Arc::new(AtomicUsize::new(0));
        let forwarded = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(AtomicUsize::new(0));
        let (t, f) = (throttled.clone(), forwarded.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (client, upstream) = (client.clone(), upstream.clone());
                let (t, f, seen) = (t.clone(), f.clone(), seen.clone());
                tokio::spawn(async move {
                    let service = service_fn(move |req: Request<Incoming>| {
                        let (client, upstream) = (client.clone(), upstream.clone());
                        let (t, f, seen) = (t.clone(), f.clone(), seen.clone());
                        async move {
                            let n = seen.fetch_add(1, Ordering::SeqCst) + 1;
                            if n.is_multiple_of(every) {
                                t.fetch_add(1, Ordering::SeqCst);
                                return Ok::<_, Infallible>(slow_down());
                            }
                            f.fetch_add(1, Ordering::SeqCst);
                            Ok(forward(&client, &upstream, req).await)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Throttle {
            addr,
            throttled,
            forwarded,
            task,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for Throttle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn slow_down() -> Response<ProxyBody> {
    let mut resp = Response::new(
        Full::new(Bytes::from_static(SLOW_DOWN.as_bytes()))
            .map_err(|never| match never {})
            .boxed(),
    );
    *resp.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
    let h = resp.headers_mut();
    h.insert(
        "content-type",
        http::HeaderValue::from_static("application/xml"),
    );
    // The request body was not read: this connection cannot carry another request.
    h.insert("connection", http::HeaderValue::from_static("close"));
    resp
}

async fn forward(
    client: &Client<HttpConnector, Incoming>,
    upstream: &http::Uri,
    req: Request<Incoming>,
) -> Response<ProxyBody> {
    let (mut parts, body) = req.into_parts();
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "/".into());
    parts.uri = format!(
        "http://{}{path}",
        upstream.authority().expect("upstream authority")
    )
    .parse()
    .expect("forwarded URI");
    match client.request(Request::from_parts(parts, body)).await {
        Ok(resp) => resp.map(|b| b.boxed()),
        Err(e) => {
            let mut resp = Response::new(
                Full::new(Bytes::from(format!("proxy: {e}")))
                    .map_err(|never| match never {})
                    .boxed(),
            );
            *resp.status_mut() = http::StatusCode::BAD_GATEWAY;
            resp
        }
    }
}
