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

use crate::metrics::Metrics;

/// Why a certificate pair was refused. Carries no key material.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("the certificate (tls.certificate) {path}: {message}")]
    Certificate { path: PathBuf, message: String },
    #[error("the private key (tls.private_key) {path}: {message}")]
    Key { path: PathBuf, message: String },
    #[error(
        "the certificate (tls.certificate) {cert} and the private key (tls.private_key) \
         {key} do not belong together: {message}"
    )]
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
        message: match &e {
            rustls::pki_types::pem::Error::Io(io)
                if io.kind() == std::io::ErrorKind::PermissionDenied =>
            {
                format!("{io}; {}", who_may_read(key_path))
            }
            _ => pem_message(&e),
        },
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

/// For a key the gate may not read: who the gate runs as, and what would let it.
pub(crate) fn who_may_read(path: &Path) -> String {
    let uid = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|v| v.split_whitespace().nth(1).map(str::to_owned))
        });
    let name_of = |file: &str, id: &str| {
        std::fs::read_to_string(file).ok().and_then(|t| {
            t.lines().find_map(|l| {
                let mut f = l.split(':');
                let name = f.next()?;
                (f.nth(1)? == id).then(|| name.to_owned())
            })
        })
    };
    let user = match &uid {
        Some(id) => format!(
            "{} (uid {id})",
            name_of("/etc/passwd", id).unwrap_or_else(|| "?".into())
        ),
        None => "an unknown user".into(),
    };
    use std::os::unix::fs::MetadataExt as _;
    let group = std::fs::metadata(path)
        .ok()
        .map(|m| m.gid().to_string())
        .map(|gid| name_of("/etc/group", &gid).unwrap_or(gid));
    match group {
        Some(g) => format!(
            "the gate runs as {user}: put that user in group {g} and make the key \
             group-readable (chmod g+r), as certbot's ssl-cert setups do"
        ),
        None => format!(
            "the gate runs as {user}, which may not read it or a directory on its path \
             (certbot's archive/ and live/ are 0700 root by default)"
        ),
    }
}

/// The certificate currently served; replaceable at run time.
#[derive(Debug)]
pub struct CertStore {
    current: RwLock<Arc<CertifiedKey>>,
    metrics: Arc<Metrics>,
    /// Bumped by every replacement.
    generation: std::sync::atomic::AtomicU64,
}

impl CertStore {
    pub fn new(initial: CertifiedKey, metrics: Arc<Metrics>) -> Self {
        let store = CertStore {
            current: RwLock::new(Arc::new(initial)),
            metrics,
            generation: std::sync::atomic::AtomicU64::new(0),
        };
        store.record_expiry();
        store
    }

    fn record_expiry(&self) {
        let current = self.current();
        if let Some(t) = current.cert.first().and_then(|c| not_after(c.as_ref())) {
            self.metrics.certificate_not_after.set(t);
        }
    }

    /// The leaf's notAfter (Unix time), if it can be read.
    pub fn not_after(&self) -> Option<i64> {
        self.current()
            .cert
            .first()
            .and_then(|c| not_after(c.as_ref()))
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
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.record_expiry();
    }

    /// Load the pair from disk and serve it, or keep the old one and log why.
    ///
    /// certbot replaces `fullchain.pem` and `privkey.pem` one after the other, so a
    /// pair that does not match may be half a renewal: that is a warning, and the pair
    /// is tried again after `settle`; only a mismatch still there then is an error.
    pub fn reload(self: &Arc<Self>, cert: &Path, key: &Path, settle: Duration) -> bool {
        match load_pair(cert, key) {
            Ok(pair) => {
                log_leaf(&pair, "certificate reloaded");
                self.replace(pair);
                true
            }
            Err(e @ TlsError::Mismatch { .. }) if !settle.is_zero() => {
                tracing::warn!(
                    "{e}; still serving the previous pair and trying again in {:.1} s \
                     (a renewal replaces the files one by one)",
                    settle.as_secs_f64()
                );
                let (store, cert, key) = (self.clone(), cert.to_owned(), key.to_owned());
                let seen = self.generation();
                tokio::spawn(async move {
                    tokio::time::sleep(settle).await;
                    // A later change was taken meanwhile: nothing left to do.
                    if store.generation() != seen {
                        return;
                    }
                    store.reload(&cert, &key, Duration::ZERO);
                });
                false
            }
            Err(e) => {
                tracing::error!("certificate reload refused, still serving the previous one: {e}");
                false
            }
        }
    }

    fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

fn log_leaf(pair: &CertifiedKey, what: &str) {
    let chain_len = pair.cert.len();
    match pair.cert.first().and_then(|c| not_after(c.as_ref())) {
        Some(t) => {
            tracing::info!(chain_len, not_after = %crate::auth::token::rfc3339(u64::try_from(t).unwrap_or(0)), "{what}")
        }
        None => tracing::info!(chain_len, "{what}"),
    }
}

/// One DER element: (tag, contents, rest).
fn der_element(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

/// The fields of an X.509 certificate's TBSCertificate (DER) after the optional
/// `[0] version`: serialNumber first.
fn tbs_fields(cert: &[u8]) -> Option<&[u8]> {
    let (_, certificate, _) = der_element(cert)?;
    let (_, tbs, _) = der_element(certificate)?;
    let (tag, _, after) = der_element(tbs)?;
    Some(if tag == 0xa0 { after } else { tbs })
}

/// The notAfter of an X.509 certificate (DER), as Unix time.
pub fn not_after(cert: &[u8]) -> Option<i64> {
    // serialNumber, signature, issuer, then validity.
    let mut rest = tbs_fields(cert)?;
    for _ in 0..3 {
        let (_, _, after) = der_element(rest)?;
        rest = after;
    }
    let (_, validity, _) = der_element(rest)?;
    let (_, _, after_not_before) = der_element(validity)?;
    let (tag, time, _) = der_element(after_not_before)?;
    let text = std::str::from_utf8(time).ok()?;
    let full = match tag {
        // UTCTime YYMMDDHHMMSSZ: 50..99 are 19xx.
        0x17 => {
            let yy: i64 = text.get(0..2)?.parse().ok()?;
            format!("{}{}", if yy >= 50 { 19 } else { 20 }, text)
        }
        0x18 => text.to_owned(),
        _ => return None,
    };
    let num = |r: std::ops::Range<usize>| -> Option<i64> { full.get(r)?.parse().ok() };
    let (y, mo, d) = (num(0..4)?, num(4..6)?, num(6..8)?);
    let (h, mi, sec) = (num(8..10)?, num(10..12)?, num(12..14)?);
    // Days from the civil date (Howard Hinnant's algorithm).
    let y2 = if mo <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + h * 3600 + mi * 60 + sec)
}

/// What an operator wants to know of the served leaf.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LeafSummary {
    /// The subject's common name (empty when it has none).
    pub subject_cn: String,
    /// DNS names and IP addresses of subjectAltName.
    pub sans: Vec<String>,
    pub not_after: Option<i64>,
    /// The leaf names itself as issuer (self-signed, or a test CA of one).
    pub self_issued: bool,
    /// Certificates in the file, the leaf included.
    pub chain_len: usize,
}

/// Issuer, subject and extensions of a TBSCertificate, as DER contents.
type TbsParts<'a> = (&'a [u8], &'a [u8], Option<&'a [u8]>);

/// The pieces of TBSCertificate an operator summary needs.
fn tbs_parts(cert: &[u8]) -> Option<TbsParts<'_>> {
    let mut rest = tbs_fields(cert)?;
    // serialNumber, signature
    for _ in 0..2 {
        rest = der_element(rest)?.2;
    }
    let (_, issuer, after) = der_element(rest)?;
    let (_, _, after) = der_element(after)?; // validity
    let (_, subject, mut after) = der_element(after)?;
    after = der_element(after)?.2; // subjectPublicKeyInfo
    let mut extensions = None;
    while !after.is_empty() {
        let (tag, contents, next) = der_element(after)?;
        if tag == 0xa3 {
            extensions = Some(der_element(contents)?.1);
        }
        after = next;
    }
    Some((issuer, subject, extensions))
}

/// The common name in a Name (DER contents of its SEQUENCE).
fn common_name(mut name: &[u8]) -> Option<String> {
    const CN: &[u8] = &[0x55, 0x04, 0x03];
    while !name.is_empty() {
        let (_, set, next) = der_element(name)?;
        let (_, attr, _) = der_element(set)?;
        let (_, oid, value) = der_element(attr)?;
        if oid == CN {
            let (_, text, _) = der_element(value)?;
            return Some(String::from_utf8_lossy(text).into_owned());
        }
        name = next;
    }
    None
}

fn subject_alt_names(mut extensions: &[u8]) -> Vec<String> {
    const SAN: &[u8] = &[0x55, 0x1d, 0x11];
    let mut out = Vec::new();
    while let Some((_, ext, next)) = der_element(extensions) {
        extensions = next;
        let Some((_, oid, mut rest)) = der_element(ext) else {
            continue;
        };
        if oid != SAN {
            continue;
        }
        // [critical BOOLEAN] then OCTET STRING holding GeneralNames.
        while let Some((tag, contents, next)) = der_element(rest) {
            rest = next;
            if tag != 0x04 {
                continue;
            }
            let Some((_, mut names, _)) = der_element(contents) else {
                continue;
            };
            while let Some((tag, value, next)) = der_element(names) {
                names = next;
                match (tag, value.len()) {
                    (0x82, _) => out.push(String::from_utf8_lossy(value).into_owned()),
                    (0x87, 4) => out.push(
                        std::net::Ipv4Addr::new(value[0], value[1], value[2], value[3]).to_string(),
                    ),
                    (0x87, 16) => {
                        let mut b = [0u8; 16];
                        b.copy_from_slice(value);
                        out.push(std::net::Ipv6Addr::from(b).to_string());
                    }
                    _ => {}
                }
            }
        }
    }
    out
}

/// Subject, SANs, expiry and chain length of a loaded pair.
pub fn summarize(pair: &CertifiedKey) -> LeafSummary {
    let Some(leaf) = pair.cert.first() else {
        return LeafSummary::default();
    };
    let (subject_cn, sans, self_issued) = match tbs_parts(leaf.as_ref()) {
        Some((issuer, subject, ext)) => (
            common_name(subject).unwrap_or_default(),
            ext.map(subject_alt_names).unwrap_or_default(),
            issuer == subject,
        ),
        None => (String::new(), Vec::new(), false),
    };
    LeafSummary {
        subject_cn,
        sans,
        not_after: not_after(leaf.as_ref()),
        self_issued,
        chain_len: pair.cert.len(),
    }
}

impl LeafSummary {
    /// One line for the log and `check-config`.
    pub fn line(&self) -> String {
        let expiry = match self.not_after {
            Some(t) => {
                let now = crate::auth::token::now_secs() as i64;
                format!(
                    "expires {} ({} days)",
                    crate::auth::token::rfc3339(u64::try_from(t).unwrap_or(0)),
                    (t - now).div_euclid(86_400)
                )
            }
            None => "expiry unreadable".into(),
        };
        format!(
            "certificate CN={} SANs={} {expiry}, {} certificate(s) in the file",
            if self.subject_cn.is_empty() {
                "-"
            } else {
                &self.subject_cn
            },
            if self.sans.is_empty() {
                "-".to_owned()
            } else {
                self.sans.join(",")
            },
            self.chain_len
        )
    }

    /// What looks wrong: a leaf without its intermediate, a public host it does not
    /// name, an expired certificate.
    pub fn warnings(&self, public_url: Option<&str>) -> Vec<String> {
        let mut out = Vec::new();
        if self.chain_len == 1 && !self.self_issued {
            out.push(
                "tls.certificate holds the leaf only, no intermediate: clients that do not \
                 have the intermediate fail; use certbot's fullchain.pem, not cert.pem"
                    .to_owned(),
            );
        }
        if let Some(host) = public_url.and_then(url_host) {
            let named = self.sans.iter().any(|san| name_matches(san, &host));
            if !named {
                out.push(format!(
                    "public_url's host {host} is not among the certificate's names ({}): \
                     clients will refuse it",
                    if self.sans.is_empty() {
                        "-".to_owned()
                    } else {
                        self.sans.join(", ")
                    }
                ));
            }
        }
        if self
            .not_after
            .is_some_and(|t| t < crate::auth::token::now_secs() as i64)
        {
            out.push("the certificate has expired".to_owned());
        }
        out
    }
}

/// The host of `https://host[:port]/…`, lower-cased, without brackets.
fn url_host(url: &str) -> Option<String> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split('/').next()?;
    let host = if let Some(v6) = authority.strip_prefix('[') {
        v6.split(']').next()?.to_owned()
    } else {
        authority
            .rsplit_once(':')
            .map_or(authority, |(h, _)| h)
            .to_owned()
    };
    (!host.is_empty()).then(|| host.to_ascii_lowercase())
}

/// A SAN (possibly `*.example.org`) naming `host`.
fn name_matches(san: &str, host: &str) -> bool {
    let san = san.to_ascii_lowercase();
    match san.strip_prefix("*.") {
        Some(suffix) => host
            .split_once('.')
            .is_some_and(|(first, rest)| !first.is_empty() && rest == suffix),
        None => san == host,
    }
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
            store.reload(&cert, &key, interval * 3);
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A self-signed P-256 pair made by openssl in `dir`, with these extra
    /// `openssl req` arguments (subject, days, extensions).
    fn self_signed(dir: &Path, args: &[&str]) -> CertifiedKey {
        let (key, cert) = (dir.join("k.pem"), dir.join("c.pem"));
        let status = std::process::Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
            ])
            .arg("-nodes")
            .args(args)
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .status()
            .expect("openssl (apt-get install openssl)");
        assert!(status.success());
        load_pair(&cert, &key).expect("pair")
    }

    #[test]
    fn reads_not_after() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pair = self_signed(dir.path(), &["-subj", "/CN=t", "-days", "10"]);
        let t = not_after(pair.cert[0].as_ref()).expect("notAfter");
        let now = crate::auth::token::now_secs() as i64;
        assert!((t - now - 10 * 86_400).abs() < 120, "{t} vs {now}");
        assert_eq!(not_after(b"junk"), None);
        assert_eq!(not_after(&[]), None);
    }

    #[test]
    fn summary_names_sans_and_warns() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pair = self_signed(
            dir.path(),
            &[
                "-subj",
                "/CN=reg.example.org",
                "-days",
                "30",
                "-addext",
                "subjectAltName=DNS:reg.example.org,DNS:*.apps.example.org,IP:127.0.0.1",
            ],
        );
        let summary = summarize(&pair);
        assert_eq!(summary.subject_cn, "reg.example.org");
        assert_eq!(
            summary.sans,
            ["reg.example.org", "*.apps.example.org", "127.0.0.1"]
        );
        assert!(summary.self_issued);
        assert!(
            summary
                .line()
                .contains("SANs=reg.example.org,*.apps.example.org,127.0.0.1")
        );
        assert!(
            summary
                .warnings(Some("https://reg.example.org:5043"))
                .is_empty()
        );
        assert!(
            summary
                .warnings(Some("https://x.apps.example.org"))
                .is_empty()
        );
        let w = summary.warnings(Some("https://other.example.org:5043"));
        assert!(w[0].contains("other.example.org is not among"), "{w:?}");
        let leaf_only = LeafSummary {
            self_issued: false,
            ..summary
        };
        assert!(leaf_only.warnings(None)[0].contains("fullchain.pem"));
    }

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
