//! TLS: load a PEM certificate chain and private key (the files certbot writes), serve
//! them through a resolver whose pair can be replaced while connections are open, and
//! reload it when the files change or on SIGHUP.
//!
//! A pair that fails to parse, or whose key does not match the leaf certificate, is
//! refused; the pair already loaded keeps serving. Open connections are never touched:
//! a handshake takes the pair current at that moment.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

/// Why a certificate pair was refused. Carries no key material.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("certificate {path}: {message}")]
    Certificate { path: PathBuf, message: String },
    #[error("private key {path}: {message}")]
    Key { path: PathBuf, message: String },
    #[error("certificate {cert} and key {key} do not belong together: {message}")]
    Mismatch {
        cert: PathBuf,
        key: PathBuf,
        message: String,
    },
    #[error("TLS setup: {0}")]
    Setup(String),
}

/// The crypto provider used throughout (ring).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Load and check a certificate chain and its private key.
pub fn load_pair(cert_path: &Path, key_path: &Path) -> Result<CertifiedKey, TlsError> {
    let cert_err = |message: String| TlsError::Certificate {
        path: cert_path.to_owned(),
        message,
    };
    let chain = CertificateDer::pem_file_iter(cert_path)
        .map_err(|e| cert_err(pem_message(&e)))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| cert_err(pem_message(&e)))?;
    if chain.is_empty() {
        return Err(cert_err("no PEM CERTIFICATE block found".into()));
    }
    let key = PrivateKeyDer::from_pem_file(key_path).map_err(|e| TlsError::Key {
        path: key_path.to_owned(),
        message: pem_message(&e),
    })?;
    let provider = provider();
    let signing_key = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| TlsError::Key {
            path: key_path.to_owned(),
            message: format!("unusable key: {e}"),
        })?;
    let certified = CertifiedKey::new(chain, signing_key);
    match certified.keys_match() {
        Ok(()) => Ok(certified),
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {
            tracing::warn!(
                cert = %cert_path.display(),
                "cannot check that the key matches the certificate"
            );
            Ok(certified)
        }
        Err(e) => Err(TlsError::Mismatch {
            cert: cert_path.to_owned(),
            key: key_path.to_owned(),
            message: e.to_string(),
        }),
    }
}

fn pem_message(e: &rustls::pki_types::pem::Error) -> String {
    use rustls::pki_types::pem::Error;
    match e {
        Error::NoItemsFound => "no PEM block of the expected kind found".into(),
        Error::Io(io) => io.to_string(),
        other => format!("malformed PEM: {other:?}"),
    }
}

/// The certificate currently served; replaceable at run time.
#[derive(Debug)]
pub struct CertStore {
    current: RwLock<Arc<CertifiedKey>>,
}

impl CertStore {
    pub fn new(initial: CertifiedKey) -> Self {
        CertStore {
            current: RwLock::new(Arc::new(initial)),
        }
    }

    pub fn current(&self) -> Arc<CertifiedKey> {
        match self.current.read() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    pub fn replace(&self, pair: CertifiedKey) {
        let pair = Arc::new(pair);
        match self.current.write() {
            Ok(mut g) => *g = pair,
            Err(poisoned) => *poisoned.into_inner() = pair,
        }
    }

    /// Load the pair from disk and serve it, or keep the old one and log why.
    pub fn reload(&self, cert: &Path, key: &Path) -> bool {
        match load_pair(cert, key) {
            Ok(pair) => {
                log_leaf(&pair, "certificate reloaded");
                self.replace(pair);
                true
            }
            Err(e) => {
                tracing::error!("certificate reload refused, still serving the previous one: {e}");
                false
            }
        }
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

fn log_leaf(pair: &CertifiedKey, what: &str) {
    let chain_len = pair.cert.len();
    tracing::info!(chain_len, "{what}");
}

/// The server-side TLS configuration: TLS 1.3 and 1.2, h2 and http/1.1 by ALPN,
/// session resumption by tickets and by cache.
pub fn server_config(store: Arc<CertStore>) -> Result<rustls::ServerConfig, TlsError> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Setup(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(store);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    config.ticketer =
        rustls::crypto::ring::Ticketer::new().map_err(|e| TlsError::Setup(e.to_string()))?;
    config.session_storage = rustls::server::ServerSessionMemoryCache::new(4096);
    Ok(config)
}

/// Keep `store` in step with the files (and SIGHUP).
pub fn spawn_reloader(
    store: Arc<CertStore>,
    cert: PathBuf,
    key: PathBuf,
    interval: Duration,
    hangups: crate::watch::Hangups,
) -> tokio::task::JoinHandle<()> {
    crate::watch::spawn_reloader(
        "tls",
        vec![cert.clone(), key.clone()],
        interval,
        hangups,
        move || {
            store.reload(&cert, &key);
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_garbage_and_empty() {
        let dir = tempfile::tempdir().expect("tempdir");
        let c = dir.path().join("c.pem");
        let k = dir.path().join("k.pem");
        std::fs::write(&c, "garbage").expect("write");
        std::fs::write(&k, "garbage").expect("write");
        let err = load_pair(&c, &k).expect_err("garbage");
        assert!(err.to_string().contains("c.pem"), "{err}");
        std::fs::write(&c, "").expect("write");
        assert!(load_pair(&c, &k).is_err());
        let err = load_pair(&dir.path().join("missing"), &k).expect_err("missing");
        assert!(err.to_string().contains("missing"), "{err}");
    }
}
