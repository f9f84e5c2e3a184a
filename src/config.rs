//! The configuration file: one TOML document, read once at start, validated fully.
//!
//! Unknown keys are errors (a typo must not silently change behaviour). Relative paths
//! are taken relative to the directory of the configuration file, and every path is
//! checked before the listener opens, with a message naming the key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::auth::policy::RuleConfig;

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: {key}: {message}")]
    Invalid {
        path: PathBuf,
        key: &'static str,
        message: String,
    },
}

/// The whole configuration.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Address of the TLS listener.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// The URL clients use, e.g. `https://registry.example.org:5043`. Used to rewrite
    /// upstream `Location` headers and in auth challenges; when absent, the request's
    /// `Host` is used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_url: Option<String>,
    /// How often certificate and password files are checked for changes.
    #[serde(default = "default_watch_interval_ms")]
    pub watch_interval_ms: u64,
    pub tls: TlsConfig,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<AuthConfig>,
    #[serde(default)]
    pub token: TokenConfig,
    /// Per-repository access rules, first match wins; after them the default
    /// (pull: anonymous; push, delete: the push group).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<RuleConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream: Option<UpstreamConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<StorageConfig>,
    #[serde(default)]
    pub server: ServerConfig,
    /// What `prune` removes (and, with `[storage] prune_interval_secs`, the server).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retention: Vec<crate::lifecycle::rules::RetentionRule>,
    /// Tags that no push may move and no delete may remove.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub immutable: Vec<crate::lifecycle::rules::ImmutableRule>,
    /// In front of a registry: keep what cannot change (content by digest).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<CacheConfig>,
    /// Webhooks: where push, delete (and pull) events are POSTed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notifications: Vec<crate::notify::NotificationConfig>,
    /// Metrics and health endpoints on a separate plain-HTTP listener.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin: Option<AdminConfig>,
    #[serde(default)]
    pub log: LogConfig,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain, leaf first (certbot's `fullchain.pem`).
    pub certificate: PathBuf,
    /// PEM private key: PKCS#8, PKCS#1 (RSA) or SEC1 (EC) (certbot's `privkey.pem`).
    pub private_key: PathBuf,
    /// A TLS handshake that takes longer is dropped.
    #[serde(default = "default_handshake_timeout")]
    pub handshake_timeout_secs: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Apache htpasswd file (bcrypt, apr1, {SHA}, SHA-crypt).
    pub htpasswd: PathBuf,
    /// Apache group file (`pusher: mark alice`).
    pub groups: PathBuf,
    /// Members of this group may push and delete.
    #[serde(default = "default_push_group")]
    pub push_group: String,
    /// Realm of the Basic challenge the token endpoint answers wrong credentials with.
    #[serde(default = "default_realm")]
    pub realm: String,
    /// How long a successful password check is remembered.
    #[serde(default = "default_cache_secs")]
    pub cache_secs: u64,
    /// Failed logins from one address or for one user before a lockout.
    #[serde(default = "default_max_failures")]
    pub max_failures: u32,
    /// How long a lockout lasts.
    #[serde(default = "default_lockout_secs")]
    pub lockout_secs: u64,
}

/// Registry tokens: the endpoint clients are sent to by the `Bearer` challenge.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// Path of the token endpoint on the gate's own port.
    #[serde(default = "default_token_path")]
    pub path: String,
    /// The `service` named in challenges and required in tokens. Default: the host
    /// (and port) of `public_url`, else of the request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// Token lifetime in seconds (at least 60).
    #[serde(default = "default_token_expiry")]
    pub expires_secs: u64,
    /// A file whose content (at least 32 bytes) is the signing key, shared by several
    /// gates behind one load balancer. Absent: a random key per start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
}

impl Default for TokenConfig {
    fn default() -> Self {
        TokenConfig {
            path: default_token_path(),
            service: None,
            expires_secs: default_token_expiry(),
            key_file: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// `http://host:port` of the registry behind the gate.
    pub url: String,
    /// Credentials the gate sends upstream (the client's own are never forwarded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_secs: u64,
    /// How long to wait for the upstream's response headers to an upload (whose
    /// answer comes after the whole body) or a blob download.
    #[serde(default = "default_response_timeout")]
    pub response_timeout_secs: u64,
    /// The same for everything else (manifests, HEADs, tags, `/v2/`): an upstream
    /// that took the connection and hangs gets a 504 this soon.
    #[serde(default = "default_upstream_header_timeout")]
    pub header_timeout_secs: u64,
    /// Idle pooled connections are closed after this long.
    #[serde(default = "default_pool_idle")]
    pub pool_idle_secs: u64,
    #[serde(default = "default_pool_max_idle")]
    pub pool_max_idle: usize,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    /// Root of the built-in registry's files on the local disk (CNCF distribution
    /// layout). Exactly one of `root` and `[storage.s3]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root: Option<PathBuf>,
    /// Whether DELETE of manifests, tags and blobs is allowed.
    #[serde(default)]
    pub delete: bool,
    /// Uploads idle for longer than this are removed as abandoned.
    #[serde(default = "default_purge_uploads")]
    pub purge_uploads_after_secs: u64,
    /// Run garbage collection inside the server this often (0: never; use
    /// `registry-gate gc` from cron instead, or as well).
    #[serde(default)]
    pub gc_interval_secs: u64,
    /// Whether the scheduled collection also removes untagged manifests.
    #[serde(default)]
    pub gc_delete_untagged: bool,
    /// Content written this long before a collection started is kept as well.
    #[serde(default = "default_gc_grace")]
    pub gc_grace_secs: u64,
    /// Apply the `[[retention]]` rules inside the server this often (0: never; use
    /// `registry-gate prune` from cron instead, or as well).
    #[serde(default)]
    pub prune_interval_secs: u64,
    /// The built-in registry stores in an S3-compatible object store instead of
    /// `root`; several gates may share it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3: Option<S3Config>,
}

/// `[storage.s3]`: an S3-compatible bucket (AWS S3, Garage, MinIO, Ceph RGW).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct S3Config {
    /// `http(s)://host:port` of the service; absent: AWS S3 in `region`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    #[serde(default = "default_s3_region")]
    pub region: String,
    pub bucket: String,
    /// Key prefix of everything stored, like distribution's `rootdirectory`.
    #[serde(default)]
    pub prefix: String,
    /// Access key id; absent: `AWS_ACCESS_KEY_ID`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_key_id: Option<String>,
    /// A file holding the secret access key; absent: `AWS_SECRET_ACCESS_KEY`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_access_key_file: Option<PathBuf>,
    /// Blob GETs are answered with a 307 to a presigned URL of the store (as
    /// distribution's `redirect`): clients must be able to reach the store.
    #[serde(default)]
    pub redirect: bool,
}

/// `[cache]`: manifests by digest and blobs from the upstream, on local disk.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    pub dir: PathBuf,
    /// Most bytes on disk (`"20GiB"`, `"512MiB"`, or a number of bytes); least
    /// recently used content goes first.
    #[serde(default = "default_cache_size")]
    pub max_size: String,
    /// Manifests also kept in memory.
    #[serde(default = "default_memory_entries")]
    pub memory_entries: usize,
    /// How long the upstream's word that a repository has a digest is trusted.
    #[serde(default = "default_confirm_secs")]
    pub confirm_secs: u64,
}

impl CacheConfig {
    /// `max_size` in bytes.
    pub fn max_bytes(&self) -> Result<u64, String> {
        parse_size(&self.max_size)
    }
}

/// `20GiB`, `512 MiB`, `10GB`, `1048576`: bytes.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a size like \"20GiB\""))?;
    let factor: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1000,
        "kib" => 1 << 10,
        "m" | "mb" => 1_000_000,
        "mib" => 1 << 20,
        "g" | "gb" => 1_000_000_000,
        "gib" => 1 << 30,
        "t" | "tb" => 1_000_000_000_000,
        "tib" => 1 << 40,
        other => {
            return Err(format!(
                "{text:?}: unknown unit {other:?} (use KiB, MiB, GiB, TiB)"
            ));
        }
    };
    let bytes = number * factor as f64;
    if !bytes.is_finite() || bytes < 1.0 {
        return Err(format!("{text:?} is not a positive size"));
    }
    Ok(bytes as u64)
}

fn default_cache_size() -> String {
    "20GiB".into()
}
fn default_memory_entries() -> usize {
    1000
}
fn default_confirm_secs() -> u64 {
    60
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// A client must send a whole request head within this time.
    #[serde(default = "default_header_timeout")]
    pub header_read_timeout_secs: u64,
    /// A connection on which nothing moves either way for this long is closed
    /// (keep-alive idle and stalled transfers alike).
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout_secs: u64,
    /// On SIGTERM/SIGINT, in-flight requests get this long to finish.
    #[serde(default = "default_grace")]
    pub shutdown_grace_secs: u64,
    /// Connections beyond this wait in the kernel's accept queue.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// e.g. `127.0.0.1:9090`: plain HTTP, for localhost or a private network.
    pub listen: SocketAddr,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    #[serde(default = "default_log_format")]
    pub format: LogFormat,
    /// A tracing filter (`info`, `registry_gate=debug`); `RUST_LOG` overrides it.
    #[serde(default = "default_log_level")]
    pub level: String,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 5043))
}
fn default_watch_interval_ms() -> u64 {
    2000
}
fn default_handshake_timeout() -> u64 {
    10
}
fn default_push_group() -> String {
    "pusher".into()
}
fn default_realm() -> String {
    "registry-gate".into()
}
fn default_cache_secs() -> u64 {
    300
}
fn default_gc_grace() -> u64 {
    3600
}
fn default_s3_region() -> String {
    "us-east-1".into()
}
fn default_purge_uploads() -> u64 {
    24 * 3600
}
fn default_max_failures() -> u32 {
    10
}
fn default_lockout_secs() -> u64 {
    300
}
fn default_token_path() -> String {
    "/token".into()
}
fn default_token_expiry() -> u64 {
    300
}
fn default_connect_timeout() -> u64 {
    5
}
fn default_upstream_header_timeout() -> u64 {
    30
}
fn default_response_timeout() -> u64 {
    300
}
fn default_pool_idle() -> u64 {
    60
}
fn default_pool_max_idle() -> usize {
    64
}
fn default_header_timeout() -> u64 {
    30
}
fn default_idle_timeout() -> u64 {
    300
}
fn default_grace() -> u64 {
    30
}
fn default_max_connections() -> usize {
    4096
}
fn default_log_format() -> LogFormat {
    LogFormat::Text
}
fn default_log_level() -> String {
    "info".into()
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            header_read_timeout_secs: default_header_timeout(),
            idle_timeout_secs: default_idle_timeout(),
            shutdown_grace_secs: default_grace(),
            max_connections: default_max_connections(),
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: default_log_format(),
            level: default_log_level(),
        }
    }
}

/// The parts of an upstream URL the proxy needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamUrl {
    /// `http`
    pub scheme: String,
    /// `host:port` as written (port defaulted to 80).
    pub authority: String,
}

/// Parse `http://host[:port][/]`. Only plain HTTP upstreams are supported: the
/// registry behind the gate is the insecure one on a private network.
pub fn parse_upstream_url(url: &str) -> Result<UpstreamUrl, String> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| format!("{url:?} is not a URL: {e}"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err(
                "https upstreams are not supported yet: use the registry's plain \
                        http address on the private network"
                    .into(),
            );
        }
        _ => return Err(format!("{url:?} must start with http://")),
    }
    let authority = uri
        .authority()
        .ok_or_else(|| format!("{url:?} has no host"))?;
    if authority.as_str().contains('@') {
        return Err("put upstream credentials in username/password, not in the URL".into());
    }
    let path = uri.path();
    if !(path.is_empty() || path == "/") || uri.query().is_some() {
        return Err(format!(
            "{url:?}: only scheme, host and port are allowed (the gate forwards /v2 as is)"
        ));
    }
    let authority = match authority.port_u16() {
        Some(_) => authority.as_str().to_owned(),
        None => format!("{}:80", authority.host()),
    };
    Ok(UpstreamUrl {
        scheme: "http".into(),
        authority,
    })
}

/// Check `[storage.s3]` as far as can be done without contacting the store (that is
/// `check-config`'s and the start's job); the secret file must be readable.
fn validate_s3(s3: &S3Config) -> Result<(), (&'static str, String)> {
    if let Some(endpoint) = &s3.endpoint {
        let uri: http::Uri = endpoint.parse().map_err(|e| {
            (
                "storage.s3.endpoint",
                format!("{endpoint:?} is not a URL: {e}"),
            )
        })?;
        if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.authority().is_none() {
            return Err((
                "storage.s3.endpoint",
                format!("{endpoint:?} must be http://host:port or https://host:port"),
            ));
        }
    }
    let bucket_ok = (3..=63).contains(&s3.bucket.len())
        && s3
            .bucket
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.');
    if !bucket_ok {
        return Err((
            "storage.s3.bucket",
            format!(
                "{:?} is not a bucket name (3 to 63 lowercase letters, digits, '-' and '.')",
                s3.bucket
            ),
        ));
    }
    if s3.region.is_empty() {
        return Err(("storage.s3.region", "must not be empty".into()));
    }
    let prefix = s3.prefix.trim_matches('/');
    let prefix_ok = prefix.is_empty()
        || prefix.split('/').all(|c| {
            !c.is_empty()
                && c != "."
                && c != ".."
                && c.chars()
                    .all(|ch| ch.is_ascii_alphanumeric() || "-_.".contains(ch))
        });
    if !prefix_ok {
        return Err((
            "storage.s3.prefix",
            format!(
                "{:?}: use path components of letters, digits, '-', '_' and '.'",
                s3.prefix
            ),
        ));
    }
    if let Some(file) = &s3.secret_access_key_file {
        std::fs::File::open(file).map(drop).map_err(|e| {
            (
                "storage.s3.secret_access_key_file",
                format!("{}: {e}", file.display()),
            )
        })?;
    }
    Ok(())
}

/// The public base URL without a trailing slash, validated.
pub fn parse_public_url(url: &str) -> Result<String, String> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| format!("{url:?} is not a URL: {e}"))?;
    if uri.scheme_str() != Some("https") {
        return Err(format!("{url:?} must be an https:// URL"));
    }
    if uri.authority().is_none() {
        return Err(format!("{url:?} has no host"));
    }
    if !(uri.path().is_empty() || uri.path() == "/") || uri.query().is_some() {
        return Err(format!("{url:?}: give only scheme, host and port"));
    }
    Ok(url.trim_end_matches('/').to_owned())
}

impl Config {
    /// Read, parse and validate a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Config::from_str_at(&text, path, base)
    }

    /// Parse and validate TOML text; relative paths are resolved against `base`.
    pub fn from_str_at(text: &str, path: &Path, base: &Path) -> Result<Config, ConfigError> {
        let config = Config::parse_at(text, path, base)?;
        config.validate(path)?;
        Ok(config)
    }

    /// Read and parse a configuration without checking the files it names (for
    /// `registry-gate user add`, which creates the password files).
    pub fn load_unchecked(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse_at(&text, path, path.parent().unwrap_or(Path::new(".")))
    }

    fn parse_at(text: &str, path: &Path, base: &Path) -> Result<Config, ConfigError> {
        let mut config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        config.resolve_paths(base);
        Ok(config)
    }

    fn resolve_paths(&mut self, base: &Path) {
        let abs = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        abs(&mut self.tls.certificate);
        abs(&mut self.tls.private_key);
        if let Some(auth) = &mut self.auth {
            abs(&mut auth.htpasswd);
            abs(&mut auth.groups);
        }
        if let Some(storage) = &mut self.storage {
            if let Some(root) = &mut storage.root {
                abs(root);
            }
            if let Some(secret) = storage
                .s3
                .as_mut()
                .and_then(|s| s.secret_access_key_file.as_mut())
            {
                abs(secret);
            }
        }
        if let Some(key) = &mut self.token.key_file {
            abs(key);
        }
        if let Some(cache) = &mut self.cache {
            abs(&mut cache.dir);
        }
        for n in &mut self.notifications {
            if let Some(ca) = &mut n.ca_certificate {
                abs(ca);
            }
        }
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |key: &'static str, message: String| ConfigError::Invalid {
            path: path.to_owned(),
            key,
            message,
        };
        let readable = |key: &'static str, p: &Path| -> Result<(), ConfigError> {
            std::fs::File::open(p).map(drop).map_err(|e| {
                let hint = match e.kind() {
                    std::io::ErrorKind::PermissionDenied => {
                        format!("; {}", crate::tls::who_may_read(p))
                    }
                    _ => String::new(),
                };
                invalid(key, format!("{}: {e}{hint}", p.display()))
            })
        };
        readable("tls.certificate", &self.tls.certificate)?;
        readable("tls.private_key", &self.tls.private_key)?;
        if let Some(auth) = &self.auth {
            readable("auth.htpasswd", &auth.htpasswd)?;
            readable("auth.groups", &auth.groups)?;
            if auth.push_group.trim().is_empty() || auth.push_group.contains(char::is_whitespace) {
                return Err(invalid(
                    "auth.push_group",
                    "must be one group name without spaces".into(),
                ));
            }
            if auth.realm.contains(['"', '\\']) || auth.realm.chars().any(char::is_control) {
                return Err(invalid(
                    "auth.realm",
                    "may not contain quotes, backslashes or control characters".into(),
                ));
            }
        }
        let t = &self.token;
        let path_ok = t.path.starts_with('/')
            && t.path.len() > 1
            && !t.path.starts_with("/v2")
            && crate::route::normalize(&t.path).is_ok_and(|p| p == t.path);
        if !path_ok {
            return Err(invalid(
                "token.path",
                "must be a plain absolute path outside /v2, like /token".into(),
            ));
        }
        if t.expires_secs < 60 {
            return Err(invalid("token.expires_secs", "must be at least 60".into()));
        }
        if let Some(service) = &t.service
            && (service.is_empty()
                || service.contains(['"', '\\'])
                || service.chars().any(char::is_control))
        {
            return Err(invalid(
                "token.service",
                "must be non-empty, without quotes, backslashes or control characters".into(),
            ));
        }
        if let Some(key) = &t.key_file {
            crate::auth::token::TokenKey::from_file(key)
                .map_err(|e| invalid("token.key_file", e.to_string()))?;
        }
        for (i, rule) in self.rules.iter().enumerate() {
            if let Some(problem) = rule.problem() {
                return Err(invalid("rules", format!("rule {}: {problem}", i + 1)));
            }
        }
        for (i, rule) in self.retention.iter().enumerate() {
            if let Some(problem) = rule.problem() {
                return Err(invalid(
                    "retention",
                    format!("[[retention]] {}: {problem}", i + 1),
                ));
            }
        }
        for (i, rule) in self.immutable.iter().enumerate() {
            if let Some(problem) = rule.problem() {
                return Err(invalid(
                    "immutable",
                    format!("[[immutable]] {}: {problem}", i + 1),
                ));
            }
        }
        for (i, n) in self.notifications.iter().enumerate() {
            if let Some(problem) = n.problem() {
                return Err(invalid(
                    "notifications",
                    format!("[[notifications]] {}: {problem}", i + 1),
                ));
            }
            if let Some(ca) = &n.ca_certificate {
                readable("notifications.ca_certificate", ca)?;
            }
        }
        if self
            .storage
            .as_ref()
            .is_some_and(|s| s.prune_interval_secs > 0)
        {
            if self.retention.is_empty() {
                return Err(invalid(
                    "storage.prune_interval_secs",
                    "needs at least one [[retention]] rule".into(),
                ));
            }
            if self.storage.as_ref().is_some_and(|s| !s.delete) {
                return Err(invalid(
                    "storage.prune_interval_secs",
                    "pruning deletes tags: set [storage] delete = true".into(),
                ));
            }
            if self.upstream.is_some() {
                return Err(invalid(
                    "storage.prune_interval_secs",
                    "scheduled pruning is for the built-in registry; in front of a \
                     registry run `registry-gate prune --url` from cron"
                        .into(),
                ));
            }
        }
        if let Some(url) = &self.public_url {
            parse_public_url(url).map_err(|m| invalid("public_url", m))?;
        }
        if let Some(upstream) = &self.upstream {
            parse_upstream_url(&upstream.url).map_err(|m| invalid("upstream.url", m))?;
            if upstream.username.is_some() != upstream.password.is_some() {
                return Err(invalid(
                    "upstream.username",
                    "username and password go together".into(),
                ));
            }
            if let Some(user) = &upstream.username
                && (user.contains(':') || user.chars().any(char::is_control))
            {
                return Err(invalid(
                    "upstream.username",
                    "may not contain ':' or control characters".into(),
                ));
            }
            if upstream.connect_timeout_secs == 0
                || upstream.response_timeout_secs == 0
                || upstream.header_timeout_secs == 0
            {
                return Err(invalid(
                    "upstream",
                    "timeouts must be at least 1 second".into(),
                ));
            }
        }
        if self.upstream.is_none() && self.storage.is_none() {
            return Err(invalid(
                "storage",
                "configure [upstream] url (front an existing registry), [storage] root \
                 (the built-in registry on the local disk) or [storage.s3] (the built-in \
                 registry on an object store)"
                    .into(),
            ));
        }
        if let Some(storage) = &self.storage {
            match (&storage.root, &storage.s3) {
                (Some(_), Some(_)) => {
                    return Err(invalid(
                        "storage.root",
                        "give either [storage] root (the local disk) or [storage.s3], not \
                         both"
                            .into(),
                    ));
                }
                (None, None) => {
                    return Err(invalid(
                        "storage.root",
                        "[storage] needs root (a directory) or a [storage.s3] table".into(),
                    ));
                }
                (Some(root), None) if root.exists() && !root.is_dir() => {
                    return Err(invalid(
                        "storage.root",
                        format!("{} is not a directory", root.display()),
                    ));
                }
                (Some(_), None) => {}
                (None, Some(s3)) => validate_s3(s3).map_err(|(key, m)| invalid(key, m))?,
            }
        }
        if let Some(cache) = &self.cache {
            if self.upstream.is_none() {
                return Err(invalid(
                    "cache",
                    "[cache] is for front mode (with [upstream]); the built-in registry \
                     serves from its own store"
                        .into(),
                ));
            }
            let max = cache
                .max_bytes()
                .map_err(|m| invalid("cache.max_size", m))?;
            if max < 1 << 20 {
                return Err(invalid("cache.max_size", "must be at least 1MiB".into()));
            }
            if cache.dir.exists() && !cache.dir.is_dir() {
                return Err(invalid(
                    "cache.dir",
                    format!("{} is not a directory", cache.dir.display()),
                ));
            }
            if cache.confirm_secs == 0 {
                return Err(invalid("cache.confirm_secs", "must be at least 1".into()));
            }
        }
        if self.watch_interval_ms < 50 {
            return Err(invalid("watch_interval_ms", "must be at least 50".into()));
        }
        if self.tls.handshake_timeout_secs == 0 {
            return Err(invalid(
                "tls.handshake_timeout_secs",
                "must be at least 1".into(),
            ));
        }
        let s = &self.server;
        if s.header_read_timeout_secs == 0 || s.idle_timeout_secs == 0 {
            return Err(invalid(
                "server",
                "timeouts must be at least 1 second".into(),
            ));
        }
        if s.max_connections == 0 {
            return Err(invalid(
                "server.max_connections",
                "must be at least 1".into(),
            ));
        }
        tracing_subscriber::EnvFilter::try_new(&self.log.level)
            .map_err(|e| invalid("log.level", e.to_string()))?;
        Ok(())
    }

    /// The retention rules and immutable tags.
    pub fn lifecycle(&self) -> crate::lifecycle::rules::Lifecycle {
        crate::lifecycle::rules::Lifecycle {
            retention: self.retention.clone(),
            immutable: self.immutable.clone(),
        }
    }

    /// The effective configuration as TOML, with secrets masked.
    pub fn to_toml_masked(&self) -> String {
        let mut shown = self.clone();
        if let Some(up) = &mut shown.upstream
            && up.password.is_some()
        {
            up.password = Some("********".into());
        }
        for n in &mut shown.notifications {
            for value in n.headers.values_mut() {
                *value = "********".into();
            }
        }
        toml::to_string_pretty(&shown).unwrap_or_else(|e| format!("# cannot print: {e}\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files() -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        for f in ["cert.pem", "key.pem", "htpasswd", "groups"] {
            std::fs::write(dir.path().join(f), "").expect("write");
        }
        dir
    }

    const BASE: &str = r#"
[tls]
certificate = "cert.pem"
private_key = "key.pem"
[storage]
root = "data"
"#;

    fn load(dir: &Path, extra: &str) -> Result<Config, ConfigError> {
        let text = format!("{BASE}{extra}");
        Config::from_str_at(&text, &dir.join("config.toml"), dir)
    }

    #[test]
    fn defaults_and_relative_paths() {
        let dir = files();
        let c = load(dir.path(), "").expect("valid");
        assert_eq!(c.listen, "0.0.0.0:5043".parse().expect("addr"));
        assert_eq!(c.tls.certificate, dir.path().join("cert.pem"));
        assert!(c.upstream.is_none());
        assert_eq!(c.server.shutdown_grace_secs, 30);
    }

    #[test]
    fn a_backend_is_required() {
        let dir = files();
        let text = "[tls]\ncertificate = \"cert.pem\"\nprivate_key = \"key.pem\"\n";
        let err = Config::from_str_at(text, &dir.path().join("c.toml"), dir.path())
            .expect_err("no backend");
        assert!(err.to_string().contains("[upstream]"), "{err}");
    }

    #[test]
    fn unknown_keys_are_errors() {
        let dir = files();
        let err = load(dir.path(), "[auth]\nhtpaswd = \"htpasswd\"\n").expect_err("typo");
        assert!(err.to_string().contains("htpaswd"), "{err}");
        let err = load(dir.path(), "lissten = \"1.2.3.4:1\"\n").expect_err("typo");
        assert!(err.to_string().contains("lissten"), "{err}");
    }

    #[test]
    fn missing_files_name_the_key() {
        let dir = files();
        let err = load(
            dir.path(),
            "[auth]\nhtpasswd = \"nope\"\ngroups = \"groups\"\n",
        )
        .expect_err("missing");
        assert!(err.to_string().contains("auth.htpasswd"), "{err}");
    }

    #[test]
    fn upstream_urls() {
        assert_eq!(
            parse_upstream_url("http://docker-local:5000")
                .expect("ok")
                .authority,
            "docker-local:5000"
        );
        assert_eq!(
            parse_upstream_url("http://docker-local/")
                .expect("ok")
                .authority,
            "docker-local:80"
        );
        assert!(parse_upstream_url("https://x").is_err());
        assert!(parse_upstream_url("http://u:p@x").is_err());
        assert!(parse_upstream_url("http://x/v2").is_err());
        assert!(parse_upstream_url("ftp://x").is_err());
    }

    #[test]
    fn storage_is_the_disk_or_an_object_store_not_both() {
        let dir = files();
        std::fs::write(dir.path().join("secret"), "s3cr3t\n").expect("write");
        let tls = "[tls]\ncertificate = \"cert.pem\"\nprivate_key = \"key.pem\"\n";
        let load = |storage: &str| {
            let text = format!("{tls}[storage]\n{storage}");
            Config::from_str_at(&text, &dir.path().join("c.toml"), dir.path())
        };
        let s3 = "[storage.s3]\nendpoint = \"http://127.0.0.1:3900\"\nregion = \"garage\"\n\
                  bucket = \"registry\"\nprefix = \"team/a\"\naccess_key_id = \"GK1\"\n\
                  secret_access_key_file = \"secret\"\n";
        let c = load(&format!("delete = true\n{s3}")).expect("an S3 store");
        let storage = c.storage.expect("storage");
        assert!(storage.root.is_none() && storage.delete);
        let cfg = storage.s3.expect("s3");
        assert_eq!(cfg.secret_access_key_file, Some(dir.path().join("secret")));
        assert!(!cfg.redirect);
        let both = load(&format!("root = \"data\"\n{s3}")).expect_err("both");
        assert!(both.to_string().contains("not both"), "{both}");
        let neither = load("delete = true\n").expect_err("neither");
        assert!(neither.to_string().contains("storage.root"), "{neither}");
        for (bad, key) in [
            (s3.replace("registry", "Bad_Bucket"), "storage.s3.bucket"),
            (s3.replace("team/a", "../up"), "storage.s3.prefix"),
            (
                s3.replace("http://127.0.0.1:3900", "ftp://x"),
                "storage.s3.endpoint",
            ),
            (
                s3.replace("\"secret\"", "\"missing\""),
                "storage.s3.secret_access_key_file",
            ),
            (format!("{s3}bucket_typo = 1\n"), "bucket_typo"),
        ] {
            let err = load(&bad).expect_err(key);
            assert!(err.to_string().contains(key), "{key}: {err}");
        }
    }

    #[test]
    fn password_is_masked() {
        let dir = files();
        let c = load(
            dir.path(),
            "[upstream]\nurl = \"http://x:5000\"\nusername = \"u\"\npassword = \"s3cret\"\n",
        )
        .expect("valid");
        let shown = c.to_toml_masked();
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("********"));
    }
}
