//! Throw-away certificate authorities and leaf certificates, made with the openssl
//! command line tool (the same tool an operator would use), written to files.

use std::path::{Path, PathBuf};
use std::process::Output;

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

use super::{command, hex};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyAlg {
    EcP256,
    Rsa2048,
}

/// How the leaf's private key is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyEncoding {
    /// `BEGIN PRIVATE KEY` (what certbot writes).
    Pkcs8,
    /// `BEGIN RSA PRIVATE KEY` (PKCS#1) or `BEGIN EC PRIVATE KEY` (SEC1).
    Traditional,
}

/// A certificate authority: its certificate file and the key that signs leaves.
pub struct Ca {
    pub dir: PathBuf,
    pub cert: PathBuf,
    key: PathBuf,
}

/// A server certificate: the chain file (leaf then CA) and the key file, as certbot's
/// `fullchain.pem` and `privkey.pem`.
pub struct Leaf {
    pub chain: PathBuf,
    pub key: PathBuf,
    /// The DER of the leaf certificate, to compare with what a client receives.
    pub der: Vec<u8>,
}

impl Leaf {
    pub fn chain_pem(&self) -> Vec<u8> {
        std::fs::read(&self.chain).expect("read chain")
    }

    pub fn key_pem(&self) -> Vec<u8> {
        std::fs::read(&self.key).expect("read key")
    }

    /// Short SHA-256 fingerprint, for messages.
    pub fn fingerprint(&self) -> String {
        fingerprint(&self.der)
    }
}

pub fn fingerprint(der: &[u8]) -> String {
    hex(&sha2::Sha256::digest(der)[..8])
}

use sha2::Digest as _;

/// Run openssl; fail the test with its stderr when it fails.
pub fn openssl(args: &[&str]) -> Output {
    let output = command("openssl", "openssl")
        .args(args)
        .output()
        .expect("run openssl");
    assert!(
        output.status.success(),
        "openssl {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn new_key(path: &Path, alg: KeyAlg) {
    let path = path.to_str().expect("utf-8 path");
    match alg {
        KeyAlg::EcP256 => openssl(&[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            path,
        ]),
        KeyAlg::Rsa2048 => openssl(&[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
            path,
        ]),
    };
}

impl Ca {
    /// A self-signed CA in `dir` (created).
    pub fn new(dir: &Path, common_name: &str, alg: KeyAlg) -> Ca {
        std::fs::create_dir_all(dir).expect("create CA directory");
        let key = dir.join("ca.key");
        let cert = dir.join("ca.crt");
        new_key(&key, alg);
        openssl(&[
            "req",
            "-x509",
            "-new",
            "-key",
            key.to_str().expect("utf-8 path"),
            "-sha256",
            "-days",
            "30",
            "-subj",
            &format!("/CN={common_name}"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
            "-out",
            cert.to_str().expect("utf-8 path"),
        ]);
        Ca {
            dir: dir.to_path_buf(),
            cert,
            key,
        }
    }

    /// A leaf for `localhost`, `127.0.0.1` and `::1`, signed by this CA, written as
    /// `<name>.fullchain.pem` and `<name>.privkey.pem` in the CA's directory.
    pub fn issue(&self, name: &str, alg: KeyAlg, encoding: KeyEncoding) -> Leaf {
        let file = |suffix: &str| self.dir.join(format!("{name}.{suffix}"));
        let (key, pkcs8_key, csr, ext, cert, chain) = (
            file("privkey.pem"),
            file("pkcs8.pem"),
            file("csr"),
            file("ext"),
            file("crt"),
            file("fullchain.pem"),
        );
        let s = |p: &Path| p.to_str().expect("utf-8 path").to_owned();
        new_key(&pkcs8_key, alg);
        openssl(&[
            "req",
            "-new",
            "-key",
            &s(&pkcs8_key),
            "-subj",
            "/CN=localhost",
            "-out",
            &s(&csr),
        ]);
        std::fs::write(
            &ext,
            "basicConstraints = critical, CA:FALSE\n\
             keyUsage = critical, digitalSignature, keyEncipherment\n\
             extendedKeyUsage = serverAuth\n\
             subjectAltName = DNS:localhost, IP:127.0.0.1, IP:::1\n",
        )
        .expect("write extensions");
        openssl(&[
            "x509",
            "-req",
            "-in",
            &s(&csr),
            "-CA",
            &s(&self.cert),
            "-CAkey",
            &s(&self.key),
            "-CAcreateserial",
            "-days",
            "30",
            "-sha256",
            "-extfile",
            &s(&ext),
            "-out",
            &s(&cert),
        ]);
        let mut chain_pem = std::fs::read(&cert).expect("read leaf");
        chain_pem.extend(std::fs::read(&self.cert).expect("read CA"));
        std::fs::write(&chain, &chain_pem).expect("write chain");

        match encoding {
            KeyEncoding::Pkcs8 => std::fs::rename(&pkcs8_key, &key).expect("rename key"),
            KeyEncoding::Traditional => {
                openssl(&[
                    "pkey",
                    "-in",
                    &s(&pkcs8_key),
                    "-traditional",
                    "-out",
                    &s(&key),
                ]);
            }
        }
        let key_pem = String::from_utf8(std::fs::read(&key).expect("read key")).expect("PEM");
        let expected_label = match (alg, encoding) {
            (_, KeyEncoding::Pkcs8) => "-----BEGIN PRIVATE KEY-----",
            (KeyAlg::Rsa2048, KeyEncoding::Traditional) => "-----BEGIN RSA PRIVATE KEY-----",
            (KeyAlg::EcP256, KeyEncoding::Traditional) => "-----BEGIN EC PRIVATE KEY-----",
        };
        assert!(
            key_pem.starts_with(expected_label),
            "openssl wrote a {alg:?} key as {:?}, expected {expected_label}",
            key_pem.lines().next()
        );

        let der = CertificateDer::from_pem_file(&cert)
            .expect("parse leaf certificate")
            .to_vec();
        Leaf { chain, key, der }
    }
}
