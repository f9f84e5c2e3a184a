//! Identity: who is calling. Credentials come from the `Authorization` header and are
//! checked against Apache's htpasswd and group files, which are reloaded when they
//! change.
//!
//! Password checks (bcrypt costs ~100 ms) run on the blocking pool, a few at a time,
//! and successes are remembered for a short while under a keyed hash of user and
//! password, so a 30-layer push costs one bcrypt check. Nothing here logs a password.

pub mod groups;
pub mod htpasswd;
pub mod policy;
pub mod throttle;
pub mod token;

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use base64::Engine;
use hmac::{KeyInit, Mac};
use http::HeaderMap;
use tokio::sync::Semaphore;

use crate::config::AuthConfig;
use groups::Groups;
use htpasswd::{Htpasswd, LoadError};

/// Who a request comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    Anonymous,
    /// A user whose password was verified (Basic).
    User(String),
    /// The holder of a token this gate issued.
    Token(token::Claims),
}

impl Identity {
    /// The name for logs: the user, or `-`.
    pub fn log_name(&self) -> &str {
        match self {
            Identity::Anonymous => "-",
            Identity::User(u) => u,
            Identity::Token(c) => c.subject(),
        }
    }

    /// [`Identity::log_name`] to keep: borrowed for anonymous requests (most of
    /// them), so nothing is allocated for those.
    pub fn log_name_owned(&self) -> std::borrow::Cow<'static, str> {
        match self {
            Identity::Anonymous => std::borrow::Cow::Borrowed("-"),
            named => std::borrow::Cow::Owned(named.log_name().to_owned()),
        }
    }
}

/// What the `Authorization` header carries.
#[derive(PartialEq, Eq)]
pub enum Credentials {
    /// No header, or `Basic Og==` (empty user and password, sent by podman and skopeo).
    None,
    Basic {
        user: String,
        password: Vec<u8>,
    },
    /// A token (checked by the gate against the token key).
    Bearer(String),
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credentials::None => write!(f, "None"),
            Credentials::Basic { user, .. } => write!(f, "Basic({user}, <password>)"),
            Credentials::Bearer(_) => write!(f, "Bearer(<token>)"),
        }
    }
}

/// Why an `Authorization` header was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CredentialError {
    #[error("more than one Authorization header")]
    Multiple,
    #[error("malformed Basic credentials: {0}")]
    Malformed(&'static str),
    #[error("unsupported authorization scheme")]
    UnsupportedScheme,
}

/// Longest `Authorization` value looked at; anything longer is malformed.
const MAX_AUTHORIZATION_LEN: usize = 4096;

/// Parse the `Authorization` header(s).
pub fn parse_authorization(headers: &HeaderMap) -> Result<Credentials, CredentialError> {
    let mut values = headers.get_all(http::header::AUTHORIZATION).iter();
    let Some(value) = values.next() else {
        return Ok(Credentials::None);
    };
    if values.next().is_some() {
        return Err(CredentialError::Multiple);
    }
    let raw = value.as_bytes();
    if raw.len() > MAX_AUTHORIZATION_LEN {
        return Err(CredentialError::Malformed("too long"));
    }
    let text = std::str::from_utf8(raw).map_err(|_| CredentialError::Malformed("not ASCII"))?;
    let (scheme, rest) = text.trim().split_once(' ').unwrap_or((text.trim(), ""));
    if scheme.eq_ignore_ascii_case("bearer") {
        let token = rest.trim();
        if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(CredentialError::Malformed("bad bearer token"));
        }
        return Ok(Credentials::Bearer(token.to_owned()));
    }
    if !scheme.eq_ignore_ascii_case("basic") {
        return Err(CredentialError::UnsupportedScheme);
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(rest.trim())
        .map_err(|_| CredentialError::Malformed("bad base64"))?;
    let colon = decoded
        .iter()
        .position(|&b| b == b':')
        .ok_or(CredentialError::Malformed(
            "no ':' between user and password",
        ))?;
    let (user, password) = (&decoded[..colon], &decoded[colon + 1..]);
    if user.is_empty() && password.is_empty() {
        return Ok(Credentials::None);
    }
    if user.is_empty() {
        return Err(CredentialError::Malformed("empty user name"));
    }
    if password.is_empty() {
        return Err(CredentialError::Malformed("empty password"));
    }
    let control = |b: &u8| *b < 0x20 || *b == 0x7f;
    if user.iter().any(control) || password.iter().any(control) {
        return Err(CredentialError::Malformed("control bytes"));
    }
    let user = String::from_utf8(user.to_vec())
        .map_err(|_| CredentialError::Malformed("user name is not UTF-8"))?;
    Ok(Credentials::Basic {
        user,
        password: password.to_vec(),
    })
}

/// One consistent snapshot of the password and group files.
pub struct Accounts {
    pub htpasswd: Htpasswd,
    pub groups: Groups,
}

impl Accounts {
    /// One line on the users and who may push, and warnings for an empty push group
    /// and for weak password hashes.
    pub fn summary(&self, push_group: &str) -> (String, Vec<String>) {
        let users = self.htpasswd.users();
        let pushers: Vec<String> = self
            .groups
            .members(push_group)
            .into_iter()
            .filter(|u| self.htpasswd.contains(u))
            .collect();
        let line = format!(
            "{} user(s) loaded; {} may push ({push_group}: {})",
            users.len(),
            pushers.len(),
            if pushers.is_empty() {
                "-".to_owned()
            } else {
                pushers.join(" ")
            }
        );
        let mut warnings = Vec::new();
        if pushers.is_empty() {
            warnings.push(format!(
                "nobody can push: no user of the password file is in group {push_group:?} \
                 (add one with `registry-gate user groups NAME --add {push_group}`)"
            ));
        }
        for user in users {
            if let Some(scheme) = self.htpasswd.scheme(&user).filter(|s| s.is_weak()) {
                warnings.push(format!(
                    "user {user}'s password is stored as {scheme}, which is {}; set it \
                     again as bcrypt with `registry-gate user passwd {user}`",
                    if scheme == htpasswd::Scheme::Sha1 {
                        "unsalted"
                    } else {
                        "cheap to guess (MD5)"
                    }
                ));
            }
        }
        (line, warnings)
    }

    /// The summary, logged.
    fn describe(&self, push_group: &str) {
        let (line, warnings) = self.summary(push_group);
        tracing::info!("{line}");
        for w in warnings {
            tracing::warn!("{w}");
        }
    }

    fn load(htpasswd: &std::path::Path, groups: &std::path::Path) -> Result<Self, LoadError> {
        Ok(Accounts {
            htpasswd: Htpasswd::load(htpasswd)?,
            groups: Groups::load(groups)?,
        })
    }
}

struct CacheEntry {
    user: String,
    generation: u64,
    expires: Instant,
}

/// Most remembered successful checks; when full, expired entries go, then all.
const CACHE_CAPACITY: usize = 10_000;

/// Checks credentials against the current password files.
pub struct Authenticator {
    htpasswd_path: PathBuf,
    groups_path: PathBuf,
    accounts: RwLock<Arc<Accounts>>,
    /// Bumped on every reload; cache entries of older generations are void.
    generation: AtomicU64,
    cache: Mutex<HashMap<[u8; 32], CacheEntry>>,
    cache_key: [u8; 32],
    ttl: Duration,
    /// Bounds concurrent password hashing so a flood of logins cannot take every
    /// blocking thread.
    hashing: Semaphore,
    throttle: throttle::Throttle,
}

/// The outcome of a password check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PasswordCheck {
    Valid,
    Invalid,
    /// Too many failures from this address or for this user: try again after this.
    LockedOut(Duration),
}

impl Authenticator {
    /// Load both files; an error names the file and line.
    pub fn load(config: &AuthConfig) -> Result<Self, LoadError> {
        let accounts = Accounts::load(&config.htpasswd, &config.groups)?;
        accounts.describe(&config.push_group);
        let slots = std::thread::available_parallelism().map_or(2, |n| n.get() * 2);
        Ok(Authenticator {
            htpasswd_path: config.htpasswd.clone(),
            groups_path: config.groups.clone(),
            accounts: RwLock::new(Arc::new(accounts)),
            generation: AtomicU64::new(0),
            cache: Mutex::new(HashMap::new()),
            cache_key: rand::random(),
            ttl: Duration::from_secs(config.cache_secs),
            hashing: Semaphore::new(slots),
            throttle: throttle::Throttle::new(
                config.max_failures,
                Duration::from_secs(config.lockout_secs),
            ),
        })
    }

    /// The files this authenticator reads.
    pub fn paths(&self) -> Vec<PathBuf> {
        vec![self.htpasswd_path.clone(), self.groups_path.clone()]
    }

    /// The current snapshot.
    pub fn accounts(&self) -> Arc<Accounts> {
        match self.accounts.read() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Re-read both files. On error the old snapshot stays and the reason is logged.
    pub fn reload(&self) -> bool {
        // An emptied password file is far more often a truncated or half-done write
        // than a decision to remove every user (`user del` leaves a comment line when
        // it removes the last one): keep the users there were.
        let emptied = std::fs::read(&self.htpasswd_path)
            .is_ok_and(|bytes| bytes.iter().all(u8::is_ascii_whitespace));
        if emptied && !self.accounts().htpasswd.is_empty() {
            tracing::error!(
                file = %self.htpasswd_path.display(),
                "password file reload refused, keeping the previous users: the file is \
                 empty (write a comment line to remove every user on purpose)"
            );
            return false;
        }
        match Accounts::load(&self.htpasswd_path, &self.groups_path) {
            Ok(accounts) => {
                let users = accounts.htpasswd.len();
                let accounts = Arc::new(accounts);
                match self.accounts.write() {
                    Ok(mut g) => *g = accounts,
                    Err(poisoned) => *poisoned.into_inner() = accounts,
                }
                self.generation.fetch_add(1, Ordering::SeqCst);
                self.lock_cache().clear();
                tracing::info!(users, "password and group files reloaded");
                true
            }
            Err(e) => {
                tracing::error!("password files reload refused, keeping the previous ones: {e}");
                false
            }
        }
    }

    fn lock_cache(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], CacheEntry>> {
        match self.cache.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    fn cache_key(&self, user: &str, password: &[u8]) -> [u8; 32] {
        let mut mac = match hmac::Hmac::<sha2::Sha256>::new_from_slice(&self.cache_key) {
            Ok(m) => m,
            // HMAC takes keys of any length; this branch cannot be reached.
            Err(_) => return [0; 32],
        };
        mac.update(&(user.len() as u64).to_be_bytes());
        mac.update(user.as_bytes());
        mac.update(password);
        mac.finalize().into_bytes().into()
    }

    /// Check `user`'s password for a client at `ip`, with brute-force throttling: a
    /// failure is answered after a growing delay, and too many lock the address and the
    /// user name out for a while. A failure is logged in one line for fail2ban.
    pub async fn check_password(&self, ip: IpAddr, user: &str, password: &[u8]) -> PasswordCheck {
        if self.cached(user, password) {
            return PasswordCheck::Valid;
        }
        if let Err(retry) = self.throttle.check(ip, user) {
            log_auth_failure(ip, user, "locked out after repeated failures");
            return PasswordCheck::LockedOut(retry);
        }
        if self.verify(user, password).await {
            self.throttle.succeeded(ip, user);
            PasswordCheck::Valid
        } else {
            let reason = if self.accounts().htpasswd.contains(user) {
                "wrong password"
            } else {
                "unknown user"
            };
            log_auth_failure(ip, user, reason);
            let delay = self.throttle.failed(ip, user);
            tokio::time::sleep(delay).await;
            PasswordCheck::Invalid
        }
    }

    fn cached(&self, user: &str, password: &[u8]) -> bool {
        let key = self.cache_key(user, password);
        let generation = self.generation.load(Ordering::SeqCst);
        let cache = self.lock_cache();
        cache.get(&key).is_some_and(|hit| {
            hit.generation == generation && hit.expires > Instant::now() && hit.user == user
        })
    }

    /// Whether `password` is `user`'s, without throttling. Runs the hash on the
    /// blocking pool.
    pub async fn verify(&self, user: &str, password: &[u8]) -> bool {
        if self.cached(user, password) {
            return true;
        }
        let key = self.cache_key(user, password);
        let generation = self.generation.load(Ordering::SeqCst);
        let Ok(_permit) = self.hashing.acquire().await else {
            return false;
        };
        let accounts = self.accounts();
        let (u, p) = (user.to_owned(), password.to_vec());
        let ok = tokio::task::spawn_blocking(move || accounts.htpasswd.verify(&u, &p))
            .await
            .unwrap_or(false);
        if ok && self.generation.load(Ordering::SeqCst) == generation {
            let mut cache = self.lock_cache();
            if cache.len() >= CACHE_CAPACITY {
                let now = Instant::now();
                cache.retain(|_, e| e.expires > now);
                if cache.len() >= CACHE_CAPACITY {
                    cache.clear();
                }
            }
            cache.insert(
                key,
                CacheEntry {
                    user: user.to_owned(),
                    generation,
                    expires: Instant::now() + self.ttl,
                },
            );
        }
        ok
    }

    /// Log a failed credential check that never reached a password (malformed header).
    pub fn log_malformed(ip: IpAddr, reason: &str) {
        log_auth_failure(ip, "-", reason);
    }

    /// Whether `user` is in `group` in the current group file.
    pub fn is_member(&self, user: &str, group: &str) -> bool {
        self.accounts().groups.is_member(user, group)
    }
}

/// One line per failed login, in a fixed shape for fail2ban:
/// `auth failure: peer=1.2.3.4 user=mark reason=wrong password`.
pub fn log_auth_failure(ip: IpAddr, user: &str, reason: &str) {
    let ip = ip.to_canonical();
    let user = log_safe_user(user);
    tracing::warn!(
        target: "registry_gate::auth_failure",
        "auth failure: peer={ip} user={user} reason={reason}"
    );
}

/// A user name as it may appear in a log line a regex reads: characters outside
/// `[A-Za-z0-9._@+-]` (spaces, `=`, quotes, control bytes) are written as `\u{..}`, so
/// a name cannot forge another field; at most 128 characters.
fn log_safe_user(user: &str) -> String {
    let mut out = String::new();
    for c in user.chars().take(128) {
        if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '@' | '+' | '-') {
            out.push(c);
        } else {
            out.push_str(&format!("\\u{{{:x}}}", u32::from(c)));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn user_names_cannot_forge_log_fields() {
        assert_eq!(log_safe_user("mark"), "mark");
        assert_eq!(
            log_safe_user("a peer=1.2.3.4"),
            "a\\u{20}peer\\u{3d}1.2.3.4"
        );
        assert_eq!(log_safe_user("x\ny"), "x\\u{a}y");
    }

    fn headers(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(
                http::header::AUTHORIZATION,
                HeaderValue::from_bytes(v.as_bytes()).expect("value"),
            );
        }
        h
    }

    fn basic(raw: &[u8]) -> String {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(raw)
        )
    }

    #[test]
    fn parses_bearer() {
        assert_eq!(
            parse_authorization(&headers(&["Bearer abc.def"])),
            Ok(Credentials::Bearer("abc.def".into()))
        );
    }

    #[test]
    fn parses_basic() {
        assert_eq!(parse_authorization(&headers(&[])), Ok(Credentials::None));
        assert_eq!(
            parse_authorization(&headers(&["Basic Og=="])),
            Ok(Credentials::None)
        );
        assert_eq!(
            parse_authorization(&headers(&[&basic(b"mark:pa:ss")])),
            Ok(Credentials::Basic {
                user: "mark".into(),
                password: b"pa:ss".to_vec()
            })
        );
        assert_eq!(
            parse_authorization(&headers(&[&basic(b"mark:x").replace("Basic", "basic")])),
            Ok(Credentials::Basic {
                user: "mark".into(),
                password: b"x".to_vec()
            })
        );
    }

    #[test]
    fn refuses_malformed() {
        let cases: Vec<(Vec<String>, CredentialError)> = vec![
            (
                vec![basic(b"a:b"), basic(b"a:b")],
                CredentialError::Multiple,
            ),
            (
                vec!["Basic !!!".into()],
                CredentialError::Malformed("bad base64"),
            ),
            (
                vec![basic(b"nocolon")],
                CredentialError::Malformed("no ':' between user and password"),
            ),
            (
                vec![basic(b":pw")],
                CredentialError::Malformed("empty user name"),
            ),
            (
                vec![basic(b"u:")],
                CredentialError::Malformed("empty password"),
            ),
            (
                vec![basic(b"u:secret\0junk")],
                CredentialError::Malformed("control bytes"),
            ),
            (
                vec![basic(b"u\x01:p")],
                CredentialError::Malformed("control bytes"),
            ),
            (vec!["Digest x".into()], CredentialError::UnsupportedScheme),
            (
                vec!["Bearer ".into()],
                CredentialError::Malformed("bad bearer token"),
            ),
            (
                vec!["Bearer a b".into()],
                CredentialError::Malformed("bad bearer token"),
            ),
            (
                vec![format!("Basic {}", "A".repeat(5000))],
                CredentialError::Malformed("too long"),
            ),
        ];
        for (values, want) in cases {
            let refs: Vec<&str> = values.iter().map(String::as_str).collect();
            assert_eq!(
                parse_authorization(&headers(&refs)),
                Err(want),
                "{values:?}"
            );
        }
    }
}
