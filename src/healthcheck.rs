//! `registry-gate healthcheck`: does the gate on this host serve? For a container's
//! `HEALTHCHECK` and for scripts; the answer is one line and the exit status.
//!
//! ```text
//! [admin] listen set   GET http://ADMIN/readyz   200 → healthy, anything else → not
//! no [admin]           TLS handshake with listen  completed, certificate not expired
//! ```
//!
//! An unspecified listen address (`0.0.0.0`, `[::]`) is dialled on the loopback
//! address of its family. The TLS probe does not check the certificate's chain or
//! names: it dials a loopback address the certificate does not name, and the CA may
//! be private. It does check the server's signature in the handshake (the server
//! holds the key of the certificate it shows) and the certificate's expiry, as
//! `/readyz` does. Only the configuration's addresses are read, never a key or a
//! password file, and no credentials are sent.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode, header};
use http_body_util::{BodyExt as _, Empty, Limited};
use hyper_util::rt::TokioIo;
use rustls::DigitallySignedStruct;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::net::TcpStream;

use crate::config::Config;

/// The most of a `/readyz` answer that is read (it is one short line).
const MAX_READYZ_BODY: usize = 4096;

/// `registry-gate healthcheck --config PATH`: read the configuration (only its
/// addresses are used: the files it names are the server's business) and probe.
/// `Err` is one line starting `unhealthy:`.
pub fn run(path: &Path, timeout: Duration) -> Result<String, String> {
    let unhealthy = |why: &str| format!("unhealthy: {}", one_line(why));
    let config = Config::load_unchecked(path).map_err(|e| unhealthy(&e.to_string()))?;
    crate::runtime()
        .map_err(|e| unhealthy(&e))?
        .block_on(check(&config, timeout))
        .map_err(|e| unhealthy(&e))
}

/// Probe the gate `config` describes. `Ok`: one line saying what answered;
/// `Err`: one line saying why it is not healthy.
pub async fn check(config: &Config, timeout: Duration) -> Result<String, String> {
    let (what, probe) = match &config.admin {
        Some(admin) => {
            let addr = dial_addr(admin.listen);
            (
                format!("/readyz on {addr}"),
                futures_util::future::Either::Left(readyz(addr)),
            )
        }
        None => {
            let addr = dial_addr(config.listen);
            (
                format!("the TLS port {addr}"),
                futures_util::future::Either::Right(tls_handshake(addr, server_name(config))),
            )
        }
    };
    match tokio::time::timeout(timeout, probe).await {
        Ok(result) => result,
        Err(_) => Err(format!(
            "no answer from {what} within {} s",
            timeout.as_secs_f64()
        )),
    }
}

/// Where to connect for a listener bound to `addr`.
fn dial_addr(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), addr.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), addr.port())
        }
        _ => addr,
    }
}

/// The name sent as SNI: `public_url`'s host, else `localhost`.
fn server_name(config: &Config) -> ServerName<'static> {
    let host = config
        .public_url
        .as_deref()
        .and_then(|url| url.parse::<http::Uri>().ok())
        .and_then(|uri| uri.host().map(|h| h.trim_matches(['[', ']']).to_owned()))
        .unwrap_or_else(|| "localhost".to_owned());
    ServerName::try_from(host)
        .unwrap_or_else(|_| ServerName::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST).into()))
}

async fn connect(addr: SocketAddr, what: &str) -> Result<TcpStream, String> {
    TcpStream::connect(addr)
        .await
        .map_err(|e| format!("nothing answers on {addr} ({what}): {e}"))
}

/// `GET /readyz` on the admin listener.
async fn readyz(addr: SocketAddr) -> Result<String, String> {
    let tcp = connect(addr, "[admin] listen").await?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| format!("{addr} ([admin] listen) does not speak HTTP: {e}"))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let request = Request::get("/readyz")
        .header(header::HOST, addr.to_string())
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("cannot build the request: {e}"))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("/readyz on {addr}: {e}"))?;
    let status = response.status();
    let body = Limited::new(response.into_body(), MAX_READYZ_BODY)
        .collect()
        .await
        .map(|b| String::from_utf8_lossy(&b.to_bytes()).trim().to_owned())
        .unwrap_or_default();
    if status == StatusCode::OK {
        Ok(format!("healthy: /readyz on {addr}: {body}"))
    } else {
        Err(format!("/readyz on {addr} answered {status}: {body}"))
    }
}

/// A TLS handshake with the gate's own port, and the served certificate's expiry.
async fn tls_handshake(addr: SocketAddr, name: ServerName<'static>) -> Result<String, String> {
    let provider = crate::tls::provider();
    let client = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
        .with_no_client_auth();
    let tcp = connect(addr, "listen").await?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    let mut tls = connector
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS handshake with {addr} failed: {e}"))?;
    let not_after = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .and_then(|leaf| crate::tls::not_after(leaf));
    let _ = tokio::io::AsyncWriteExt::shutdown(&mut tls).await;
    let now = crate::auth::token::now_secs() as i64;
    match not_after {
        None => Err(format!(
            "{addr} completed a TLS handshake but its certificate has no readable expiry"
        )),
        Some(t) if t <= now => Err(format!(
            "the certificate {addr} serves expired {} days ago",
            (now - t) / 86_400
        )),
        Some(t) => Ok(format!(
            "healthy: TLS handshake with {addr} completed; the certificate expires in {} days",
            (t - now) / 86_400
        )),
    }
}

/// Accepts any certificate chain and name, and checks the handshake's signatures
/// with the provider's algorithms (see the module's comment for why).
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Newlines out: the answer is one line.
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}
