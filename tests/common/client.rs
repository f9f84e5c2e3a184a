//! An HTTPS client for the gate, as registry clients talk to it: hyper 1 over
//! tokio-rustls, HTTP/1.1 or HTTP/2 chosen by ALPN, trusting only the test CAs.
//!
//! Every request opens a fresh TLS connection with a full handshake (no session
//! resumption), so each one sees the certificate the gate serves at that moment.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http::header::{AUTHORIZATION, HOST};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body::Frame;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use super::hex;

/// How long a request may take before the test fails instead of hanging.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

pub type ReqBody = BoxBody<Bytes, Infallible>;

/// No body.
pub fn empty() -> ReqBody {
    Empty::new().boxed()
}

/// A body of known length (sent with `Content-Length`).
pub fn full(bytes: impl Into<Bytes>) -> ReqBody {
    Full::new(bytes.into()).boxed()
}

/// A body of unknown length, sent in these pieces: HTTP/1.1 sends it with
/// `Transfer-Encoding: chunked` and no `Content-Length`.
pub fn streamed(chunks: Vec<Bytes>) -> ReqBody {
    UnsizedBody {
        chunks: chunks.into(),
    }
    .boxed()
}

struct UnsizedBody {
    chunks: VecDeque<Bytes>,
}

impl http_body::Body for UnsizedBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(
            self.get_mut()
                .chunks
                .pop_front()
                .map(|c| Ok(Frame::data(c))),
        )
    }
    // size_hint stays "unknown" on purpose: no Content-Length.
}

/// `first`, then nothing for `pause`, then `rest`, with no Content-Length: a client
/// that goes quiet mid-request and comes back.
pub fn paused(first: Bytes, pause: Duration, rest: Bytes) -> ReqBody {
    PausedBody {
        first: Some(first),
        pause: Box::pin(tokio::time::sleep(pause)),
        rest: Some(rest),
    }
    .boxed()
}

struct PausedBody {
    first: Option<Bytes>,
    pause: Pin<Box<tokio::time::Sleep>>,
    rest: Option<Bytes>,
}

impl http_body::Body for PausedBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        if let Some(first) = this.first.take() {
            return Poll::Ready(Some(Ok(Frame::data(first))));
        }
        if this.pause.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        Poll::Ready(this.rest.take().map(|r| Ok(Frame::data(r))))
    }
}

/// `len` bytes of `PseudoRandom::new(seed)`, made as they are sent (never held
/// whole), with no Content-Length.
pub fn generated(len: u64, seed: u64) -> ReqBody {
    GeneratedBody {
        source: super::PseudoRandom::new(seed),
        left: len,
    }
    .boxed()
}

struct GeneratedBody {
    source: super::PseudoRandom,
    left: u64,
}

impl http_body::Body for GeneratedBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        if this.left == 0 {
            return Poll::Ready(None);
        }
        let n = this.left.min(256 * 1024) as usize;
        let mut chunk = vec![0u8; n];
        this.source.fill(&mut chunk);
        this.left -= n as u64;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(chunk)))))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
}

#[derive(Clone)]
pub struct Client {
    pub addr: SocketAddr,
    roots: Arc<RootCertStore>,
    protocol: Protocol,
    authorization: Option<String>,
}

/// A whole response.
#[derive(Debug)]
pub struct Resp {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub version: Version,
    /// The ALPN protocol the TLS handshake settled on.
    pub alpn: Option<Vec<u8>>,
}

/// The ALPN protocol of the connection a streamed response came on.
#[derive(Clone, Debug)]
pub struct NegotiatedAlpn(pub Option<Vec<u8>>);

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn header_count(&self, name: &str) -> usize {
        self.headers.get_all(name).iter().count()
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "expected a JSON body ({e}); got {} {:?}: {}",
                self.status,
                self.headers,
                self.text()
            )
        })
    }

    /// Check that this is an OCI error response with `status`: a JSON body
    /// `{"errors":[{"code":…,"message":…}, …]}`. Returns the codes.
    pub fn assert_oci_error(&self, status: u16) -> Vec<String> {
        assert_eq!(
            self.status.as_u16(),
            status,
            "expected {status}, got {} with headers {:?} and body {}",
            self.status,
            self.headers,
            self.text()
        );
        let json = self.json();
        let errors = json["errors"]
            .as_array()
            .unwrap_or_else(|| panic!("no \"errors\" array in {json}"));
        assert!(!errors.is_empty(), "empty \"errors\" in {json}");
        errors
            .iter()
            .map(|e| {
                let code = e["code"]
                    .as_str()
                    .unwrap_or_else(|| panic!("error without a string code in {json}"));
                assert!(!code.is_empty(), "empty code in {json}");
                assert!(
                    e["message"].is_string(),
                    "error without a string message in {json}"
                );
                code.to_owned()
            })
            .collect()
    }

    /// `Docker-Distribution-Api-Version: registry/2.0`, exactly once.
    pub fn assert_api_version_once(&self, what: &str) {
        let values: Vec<_> = self
            .headers
            .get_all("docker-distribution-api-version")
            .iter()
            .collect();
        assert_eq!(
            values,
            [HeaderValue::from_static("registry/2.0")],
            "{what} ({}): Docker-Distribution-Api-Version must be there exactly once",
            self.status
        );
    }
}

impl Client {
    /// A client that trusts the CA certificates in these PEM files.
    pub fn new(addr: SocketAddr, ca_files: &[&Path]) -> Client {
        let mut roots = RootCertStore::empty();
        for file in ca_files {
            for cert in CertificateDer::pem_file_iter(file).expect("read CA file") {
                roots
                    .add(cert.expect("parse CA certificate"))
                    .expect("add CA certificate");
            }
        }
        Client {
            addr,
            roots: Arc::new(roots),
            protocol: Protocol::Http1,
            authorization: None,
        }
    }

    /// The same client speaking HTTP/2 (offering only `h2` in ALPN).
    pub fn http2(&self) -> Client {
        Client {
            protocol: Protocol::Http2,
            ..self.clone()
        }
    }

    pub fn protocol(&self) -> Protocol {
        self.protocol
    }

    /// The same client sending `Authorization: Basic base64(user:password)`.
    pub fn with_basic(&self, user: &str, password: &str) -> Client {
        let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        Client {
            authorization: Some(format!("Basic {token}")),
            ..self.clone()
        }
    }

    /// The same client sending this `Authorization` value (e.g. `Bearer TOKEN`).
    pub fn with_authorization(&self, value: &str) -> Client {
        Client {
            authorization: Some(value.to_owned()),
            ..self.clone()
        }
    }

    /// `https://localhost:PORT`
    pub fn base_url(&self) -> String {
        format!("https://localhost:{}", self.addr.port())
    }

    fn tls_config(&self, alpn: &[&[u8]]) -> rustls::ClientConfig {
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(self.roots.clone())
        .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        config.resumption = rustls::client::Resumption::disabled();
        config
    }

    /// A fresh TCP + TLS connection to `localhost`, offering `alpn`.
    pub async fn try_connect(&self, alpn: &[&[u8]]) -> Result<TlsStream<TcpStream>, String> {
        let connector = TlsConnector::from(Arc::new(self.tls_config(alpn)));
        let connect = async {
            let tcp = TcpStream::connect(self.addr)
                .await
                .map_err(|e| format!("connect to {}: {e}", self.addr))?;
            let name = ServerName::try_from("localhost").expect("server name");
            connector
                .connect(name, tcp)
                .await
                .map_err(|e| format!("TLS handshake with {}: {e}", self.addr))
        };
        tokio::time::timeout(REQUEST_TIMEOUT, connect)
            .await
            .unwrap_or_else(|_| Err(format!("TLS handshake with {} hung", self.addr)))
    }

    async fn connect(&self, alpn: &[&[u8]]) -> TlsStream<TcpStream> {
        self.try_connect(alpn)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// The leaf certificate (DER) the gate presents to a new connection.
    pub async fn peer_certificate(&self) -> Vec<u8> {
        self.try_peer_certificate()
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }

    pub async fn try_peer_certificate(&self) -> Result<Vec<u8>, String> {
        let stream = self.try_connect(&[b"http/1.1"]).await?;
        let certs = stream
            .get_ref()
            .1
            .peer_certificates()
            .ok_or("the gate presented no certificate")?;
        Ok(certs.first().ok_or("empty certificate chain")?.to_vec())
    }

    fn build(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: ReqBody,
    ) -> Request<ReqBody> {
        let method = Method::from_bytes(method.as_bytes()).expect("method");
        let uri = match self.protocol {
            Protocol::Http1 => path.to_owned(),
            Protocol::Http2 => format!("{}{path}", self.base_url()),
        };
        let mut request = Request::builder()
            .method(method)
            .uri(uri)
            .body(body)
            .expect("request");
        let map = request.headers_mut();
        for (name, value) in headers {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).expect("header name"),
                HeaderValue::from_bytes(value.as_bytes()).expect("header value"),
            );
        }
        if self.protocol == Protocol::Http1 && !map.contains_key(HOST) {
            map.insert(
                HOST,
                HeaderValue::from_str(&format!("localhost:{}", self.addr.port())).expect("host"),
            );
        }
        if let Some(authorization) = &self.authorization
            && !map.contains_key(AUTHORIZATION)
        {
            map.insert(
                AUTHORIZATION,
                HeaderValue::from_str(authorization).expect("authorization"),
            );
        }
        request
    }

    /// Send a request on a fresh connection; the response body is left to stream.
    pub async fn try_send(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: ReqBody,
    ) -> Result<Response<Incoming>, String> {
        let request = self.build(method, path, headers, body);
        let what = format!("{method} {path}");
        let exchange = async {
            match self.protocol {
                Protocol::Http1 => {
                    let stream = self.try_connect(&[b"http/1.1"]).await?;
                    let alpn = stream.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
                    let (mut sender, connection) =
                        hyper::client::conn::http1::handshake(TokioIo::new(stream))
                            .await
                            .map_err(|e| format!("{what}: HTTP/1.1 handshake: {e}"))?;
                    tokio::spawn(connection);
                    let mut response = sender
                        .send_request(request)
                        .await
                        .map_err(|e| format!("{what}: {e}"))?;
                    response.extensions_mut().insert(NegotiatedAlpn(alpn));
                    Ok(response)
                }
                Protocol::Http2 => {
                    let stream = self.try_connect(&[b"h2"]).await?;
                    let alpn = stream.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
                    let (mut sender, connection) = hyper::client::conn::http2::handshake(
                        TokioExecutor::new(),
                        TokioIo::new(stream),
                    )
                    .await
                    .map_err(|e| format!("{what}: HTTP/2 handshake: {e}"))?;
                    tokio::spawn(connection);
                    let mut response = sender
                        .send_request(request)
                        .await
                        .map_err(|e| format!("{what}: {e}"))?;
                    response.extensions_mut().insert(NegotiatedAlpn(alpn));
                    Ok(response)
                }
            }
        };
        tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .unwrap_or_else(|_| {
                Err(format!(
                    "{method} {path}: no response within {REQUEST_TIMEOUT:?}"
                ))
            })
    }

    pub async fn send(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: ReqBody,
    ) -> Response<Incoming> {
        self.try_send(method, path, headers, body)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Send a request and read the whole response.
    pub async fn try_request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: ReqBody,
    ) -> Result<Resp, String> {
        let response = self.try_send(method, path, headers, body).await?;
        let (parts, incoming) = response.into_parts();
        let body = tokio::time::timeout(REQUEST_TIMEOUT, incoming.collect())
            .await
            .map_err(|_| format!("{method} {path}: body not complete within {REQUEST_TIMEOUT:?}"))?
            .map_err(|e| format!("{method} {path}: reading the body: {e}"))?
            .to_bytes();
        Ok(Resp {
            status: parts.status,
            version: parts.version,
            alpn: parts
                .extensions
                .get::<NegotiatedAlpn>()
                .and_then(|a| a.0.clone()),
            headers: parts.headers,
            body,
        })
    }

    pub async fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: ReqBody,
    ) -> Resp {
        self.try_request(method, path, headers, body)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }

    pub async fn get(&self, path: &str) -> Resp {
        self.request("GET", path, &[], empty()).await
    }

    /// Write `bytes` as they are on a fresh TLS connection (ALPN `http/1.1`) and read
    /// what comes back until the gate closes, or nothing more comes for a while.
    /// For requests hyper would refuse to send: lower-case methods, odd framing.
    pub async fn raw(&self, bytes: &[u8]) -> Vec<u8> {
        let mut stream = self.connect(&[b"http/1.1"]).await;
        stream.write_all(bytes).await.expect("write raw request");
        stream.flush().await.expect("flush raw request");
        let mut out = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        let overall = tokio::time::Instant::now();
        while overall.elapsed() < REQUEST_TIMEOUT {
            match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
                Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            }
        }
        out
    }
}

/// The first response in raw bytes read from a connection.
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    /// Parse the first response head in `bytes`; the body is whatever follows it
    /// (up to `Content-Length` when there is one).
    pub fn parse(bytes: &[u8]) -> RawResponse {
        let text = String::from_utf8_lossy(bytes);
        let end = text
            .find("\r\n\r\n")
            .unwrap_or_else(|| panic!("no complete response head in {text:?}"));
        let mut lines = text[..end].split("\r\n");
        let status_line = lines.next().expect("status line");
        let status = status_line
            .strip_prefix("HTTP/1.1 ")
            .and_then(|rest| rest.get(..3))
            .and_then(|code| code.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
        let headers: Vec<(String, String)> = lines
            .map(|line| {
                let (name, value) = line.split_once(':').expect("header line");
                (name.trim().to_ascii_lowercase(), value.trim().to_owned())
            })
            .collect();
        let mut body = bytes[end + 4..].to_vec();
        let length = headers
            .iter()
            .find(|(n, _)| n == "content-length")
            .and_then(|(_, v)| v.parse::<usize>().ok());
        if let Some(length) = length {
            body.truncate(length);
        }
        RawResponse {
            status,
            headers,
            body,
        }
    }

    pub fn header_values(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "expected a JSON body ({e}) in {} {:?}: {:?}",
                self.status,
                self.headers,
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

/// Read a streamed body to its end, hashing it: `(length, "sha256:…")`.
pub async fn read_body_digest(body: &mut Incoming) -> (u64, String) {
    let mut hasher = Sha256::new();
    let mut length = 0u64;
    loop {
        let frame = tokio::time::timeout(REQUEST_TIMEOUT, body.frame())
            .await
            .expect("body stalled");
        match frame {
            None => break,
            Some(frame) => {
                let frame = frame.expect("read body frame");
                if let Some(data) = frame.data_ref() {
                    hasher.update(data);
                    length += data.len() as u64;
                }
            }
        }
    }
    (length, format!("sha256:{}", hex(&hasher.finalize())))
}

/// Read a streaming body until at least `n` bytes have come (a transfer left in flight
/// while the test does something else). Fails the test when it stalls or ends first.
pub async fn read_at_least(body: &mut Incoming, n: usize) -> Vec<u8> {
    let mut received = Vec::new();
    while received.len() < n {
        let frame = tokio::time::timeout(std::time::Duration::from_secs(120), body.frame())
            .await
            .expect("download stalled")
            .expect("download ended early")
            .expect("download failed");
        if let Ok(data) = frame.into_data() {
            received.extend_from_slice(&data);
        }
    }
    received
}

/// Read the rest of a streaming body into `received`; `what` says, in a failure, what
/// happened to the transfer meanwhile (e.g. "after SIGTERM").
pub async fn read_rest(body: &mut Incoming, received: &mut Vec<u8>, what: &str) {
    while let Some(frame) = tokio::time::timeout(std::time::Duration::from_secs(120), body.frame())
        .await
        .unwrap_or_else(|_| panic!("the download stalled {what}"))
    {
        let frame = frame.unwrap_or_else(|e| panic!("the download broke {what}: {e}"));
        if let Ok(data) = frame.into_data() {
            received.extend_from_slice(&data);
        }
    }
}
