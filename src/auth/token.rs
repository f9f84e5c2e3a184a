//! Registry tokens (distribution `spec/auth/token.md`): what a token says, how it is
//! signed and checked, and how requested scopes become a grant.
//!
//! Clients treat tokens as opaque, so the format is ours: `base64url(claims JSON)` `.`
//! `base64url(HMAC-SHA256(key, first part))`. The key comes from a file (so several
//! gates behind one load balancer accept each other's tokens) or is random per start.
//! A token is accepted only with a valid signature, for the service it was issued for,
//! from this issuer, and between `nbf` and `exp` (with a small allowance for clock skew).
//! No HTTP here: the endpoint lives in `token_endpoint`.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{KeyInit, Mac};
use serde::{Deserialize, Serialize};

use crate::auth::policy::Action;
use crate::route::RepoName;

/// Clock skew tolerated on `nbf` and `exp`, in seconds.
pub const CLOCK_SKEW_SECS: u64 = 30;
/// Issuer name written into and required in every token.
const ISSUER: &str = "registry-gate";
/// Longest token looked at.
const MAX_TOKEN_LEN: usize = 16 * 1024;
/// Shortest accepted key file content, in bytes.
pub const MIN_KEY_LEN: usize = 32;

/// One entry of a token's grant: `repository` + name + actions, or
/// `registry` + `catalog` + `*`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Access {
    #[serde(rename = "type")]
    pub kind: String,
    pub name: String,
    pub actions: Vec<String>,
}

/// What a token says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub iss: String,
    /// The user name, or empty for an anonymous token.
    pub sub: String,
    /// The service the token is for.
    pub aud: String,
    pub iat: u64,
    pub nbf: u64,
    pub exp: u64,
    pub jti: String,
    pub access: Vec<Access>,
}

impl Claims {
    /// Whether the token grants `action` on `repo`.
    pub fn grants(&self, action: Action, repo: &RepoName) -> bool {
        self.access.iter().any(|a| {
            a.kind == "repository"
                && a.name == repo.as_str()
                && a.actions.iter().any(|x| x == action.as_str() || x == "*")
        })
    }

    /// Whether the token grants the catalog (`registry:catalog:*`).
    pub fn grants_catalog(&self) -> bool {
        self.access.iter().any(|a| {
            a.kind == "registry" && a.name == "catalog" && a.actions.iter().any(|x| x == "*")
        })
    }

    /// The subject for logs: the user, or `-` for an anonymous token.
    pub fn subject(&self) -> &str {
        if self.sub.is_empty() { "-" } else { &self.sub }
    }
}

/// Why a token was refused. Never carries the token itself.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("malformed token")]
    Malformed,
    #[error("bad token signature")]
    BadSignature,
    #[error("token issued for another service")]
    WrongService,
    #[error("token expired")]
    Expired,
    #[error("token not yet valid")]
    NotYetValid,
}

/// Why a key file was refused.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path}: a token key needs at least {MIN_KEY_LEN} bytes (e.g. `head -c 32 /dev/urandom | base64 > FILE`)"
    )]
    Short { path: std::path::PathBuf },
}

/// The HMAC key tokens are signed with.
pub struct TokenKey {
    key: Vec<u8>,
}

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TokenKey(<{} bytes>)", self.key.len())
    }
}

impl TokenKey {
    /// A fresh random key: tokens die with the process.
    pub fn random() -> Self {
        let key: [u8; 32] = rand::random();
        TokenKey { key: key.to_vec() }
    }

    #[cfg(test)]
    fn from_bytes(key: &[u8]) -> Self {
        TokenKey { key: key.to_vec() }
    }

    /// The whole content of a file (trailing whitespace ignored) is the key.
    pub fn from_file(path: &Path) -> Result<Self, KeyError> {
        let raw = std::fs::read(path).map_err(|source| KeyError::Io {
            path: path.to_owned(),
            source,
        })?;
        let trimmed = raw.trim_ascii_end();
        if trimmed.len() < MIN_KEY_LEN {
            return Err(KeyError::Short {
                path: path.to_owned(),
            });
        }
        Ok(TokenKey {
            key: trimmed.to_vec(),
        })
    }

    fn mac(&self, data: &[u8]) -> hmac::Hmac<sha2::Sha256> {
        let mut mac = match hmac::Hmac::<sha2::Sha256>::new_from_slice(&self.key) {
            Ok(m) => m,
            // HMAC accepts keys of every length.
            Err(_) => unreachable_key(),
        };
        mac.update(data);
        mac
    }

    /// Sign claims into a token.
    pub fn sign(&self, claims: &Claims) -> String {
        let json = serde_json::to_vec(claims).unwrap_or_default();
        let payload = URL_SAFE_NO_PAD.encode(json);
        let sig = self.mac(payload.as_bytes()).finalize().into_bytes();
        format!("{payload}.{}", URL_SAFE_NO_PAD.encode(sig))
    }

    /// Check a token for `service` at time `now` (seconds since the epoch).
    pub fn verify(&self, token: &str, service: &str, now: u64) -> Result<Claims, TokenError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::Malformed);
        }
        let (payload, sig) = token.split_once('.').ok_or(TokenError::Malformed)?;
        let sig = URL_SAFE_NO_PAD
            .decode(sig)
            .map_err(|_| TokenError::Malformed)?;
        // Constant-time comparison.
        self.mac(payload.as_bytes())
            .verify_slice(&sig)
            .map_err(|_| TokenError::BadSignature)?;
        let json = URL_SAFE_NO_PAD
            .decode(payload)
            .map_err(|_| TokenError::Malformed)?;
        let claims: Claims = serde_json::from_slice(&json).map_err(|_| TokenError::Malformed)?;
        if claims.iss != ISSUER {
            return Err(TokenError::BadSignature);
        }
        if claims.aud != service {
            return Err(TokenError::WrongService);
        }
        if claims.nbf > now.saturating_add(CLOCK_SKEW_SECS) {
            return Err(TokenError::NotYetValid);
        }
        if claims.exp.saturating_add(CLOCK_SKEW_SECS) <= now {
            return Err(TokenError::Expired);
        }
        Ok(claims)
    }
}

/// The key tokens are signed with and, for one token lifetime after the key file
/// changed, the key before it: tokens handed out just before a rotation keep working
/// until they expire, and a leaked old key stops working soon after.
pub struct TokenKeys {
    lifetime_secs: u64,
    ring: std::sync::RwLock<KeyRing>,
}

struct KeyRing {
    current: TokenKey,
    /// The key before the current one, and the last second it is accepted.
    previous: Option<(TokenKey, u64)>,
}

impl TokenKeys {
    pub fn new(key: TokenKey, lifetime_secs: u64) -> Self {
        TokenKeys {
            lifetime_secs,
            ring: std::sync::RwLock::new(KeyRing {
                current: key,
                previous: None,
            }),
        }
    }

    fn ring(&self) -> std::sync::RwLockReadGuard<'_, KeyRing> {
        // A panic while holding the lock cannot leave a half-written ring: the
        // writer only swaps whole values.
        self.ring.read().unwrap_or_else(|e| e.into_inner())
    }

    pub fn sign(&self, claims: &Claims) -> String {
        self.ring().current.sign(claims)
    }

    /// [`TokenKey::verify`] with the current key, then with the previous one while
    /// it is still accepted.
    pub fn verify(&self, token: &str, service: &str, now: u64) -> Result<Claims, TokenError> {
        let ring = self.ring();
        match ring.current.verify(token, service, now) {
            Err(TokenError::BadSignature) => match &ring.previous {
                Some((key, until)) if now <= *until => key.verify(token, service, now),
                _ => Err(TokenError::BadSignature),
            },
            other => other,
        }
    }

    /// Make `key` the signing key at time `now`, if it is a new one. Returns whether
    /// it changed.
    pub fn rotate(&self, key: TokenKey, now: u64) -> bool {
        let mut ring = self.ring.write().unwrap_or_else(|e| e.into_inner());
        if bool::from(subtle::ConstantTimeEq::ct_eq(
            key.key.as_slice(),
            ring.current.key.as_slice(),
        )) {
            return false;
        }
        let until = now
            .saturating_add(self.lifetime_secs)
            .saturating_add(CLOCK_SKEW_SECS);
        let old = std::mem::replace(&mut ring.current, key);
        ring.previous = Some((old, until));
        true
    }
}

#[allow(clippy::panic)]
fn unreachable_key() -> ! {
    panic!("HMAC-SHA256 refused a key, which it never does")
}

/// Seconds since the epoch.
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// New claims for `subject` (empty: anonymous) valid for `lifetime` seconds.
pub fn new_claims(
    subject: &str,
    service: &str,
    access: Vec<Access>,
    now: u64,
    lifetime: u64,
) -> Claims {
    let jti: [u8; 12] = rand::random();
    Claims {
        iss: ISSUER.into(),
        sub: subject.into(),
        aud: service.into(),
        iat: now,
        nbf: now,
        exp: now.saturating_add(lifetime),
        jti: URL_SAFE_NO_PAD.encode(jti),
        access,
    }
}

/// A requested scope: `repository:NAME:pull,push` or `registry:catalog:*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    Repository {
        name: RepoName,
        actions: Vec<String>,
    },
    Catalog,
}

/// Parse every scope in the `scope` values of a request. A value may hold several
/// scopes separated by spaces (OAuth2 style). Unknown or malformed scopes are skipped:
/// a client gets what it may have, and asking for more is not an error.
pub fn parse_scopes<'a>(values: impl IntoIterator<Item = &'a str>) -> Vec<Scope> {
    let mut out = Vec::new();
    for value in values {
        for s in value.split(' ').filter(|s| !s.is_empty()) {
            // The name may contain ':' (host:port/name), the type and actions may not.
            let Some((kind, rest)) = s.split_once(':') else {
                continue;
            };
            let Some((name, actions)) = rest.rsplit_once(':') else {
                continue;
            };
            let actions: Vec<String> = actions
                .split(',')
                .filter(|a| !a.is_empty())
                .map(str::to_owned)
                .collect();
            match kind {
                "repository" => {
                    if let Ok(name) = RepoName::parse(name) {
                        out.push(Scope::Repository { name, actions });
                    }
                }
                "registry" if name == "catalog" && actions.iter().any(|a| a == "*") => {
                    out.push(Scope::Catalog);
                }
                _ => {}
            }
        }
    }
    out
}

/// The grant for `scopes`: for each repository, the requested actions (`*`: every action)
/// that `allowed` says yes to; the catalog when `catalog_allowed`.
pub fn grant(
    scopes: &[Scope],
    allowed: impl Fn(Action, &RepoName) -> bool,
    catalog_allowed: bool,
) -> Vec<Access> {
    let mut repos: BTreeMap<&RepoName, Vec<Action>> = BTreeMap::new();
    let mut catalog = false;
    for scope in scopes {
        match scope {
            Scope::Repository { name, actions } => {
                let wanted: Vec<Action> = if actions.iter().any(|a| a == "*") {
                    Action::ALL.to_vec()
                } else {
                    actions.iter().filter_map(|a| Action::parse(a)).collect()
                };
                let entry = repos.entry(name).or_default();
                for a in wanted {
                    if !entry.contains(&a) && allowed(a, name) {
                        entry.push(a);
                    }
                }
            }
            Scope::Catalog => catalog |= catalog_allowed,
        }
    }
    let mut access: Vec<Access> = repos
        .into_iter()
        .filter(|(_, actions)| !actions.is_empty())
        .map(|(name, mut actions)| {
            actions.sort();
            Access {
                kind: "repository".into(),
                name: name.as_str().to_owned(),
                actions: actions.iter().map(|a| a.as_str().to_owned()).collect(),
            }
        })
        .collect();
    if catalog {
        access.push(Access {
            kind: "registry".into(),
            name: "catalog".into(),
            actions: vec!["*".into()],
        });
    }
    access
}

/// RFC 3339 UTC (`2026-11-22T14:54:02Z`) for a time in seconds since the epoch.
pub fn rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

/// Seconds since the epoch of an RFC 3339 time (`2026-11-22T14:54:02Z`, fractions and
/// `+hh:mm` offsets allowed); `None` for anything else or before 1970.
pub fn parse_rfc3339(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    if b[13] != b':' || b[16] != b':' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let part = s.get(r)?;
        part.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| part.parse().ok())?
    };
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 {
        return None;
    }
    if second > 60 {
        return None;
    }
    let mut rest = &s[19..];
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        rest = &frac[digits..];
    }
    let offset = match rest {
        "Z" | "z" => 0,
        _ => {
            let (sign, hm) = match rest.as_bytes().first()? {
                b'+' => (1, &rest[1..]),
                b'-' => (-1, &rest[1..]),
                _ => return None,
            };
            let (h, m) = hm.split_once(':')?;
            if h.len() != 2 || m.len() != 2 {
                return None;
            }
            let (h, m): (i64, i64) = (h.parse().ok()?, m.parse().ok()?);
            sign * (h * 3600 + m * 60)
        }
    };
    // Days since 1970-01-01 from a civil date (the inverse of `rfc3339`).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hour * 3600 + minute * 60 + second - offset;
    u64::try_from(secs).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_round_trip() {
        for secs in [0, 951_782_400, 1_795_359_242, 4_102_444_800] {
            assert_eq!(parse_rfc3339(&rfc3339(secs)), Some(secs));
        }
        assert_eq!(
            parse_rfc3339("2026-11-22T15:54:02.123456789+01:00"),
            Some(1_795_359_242)
        );
        for bad in [
            "",
            "2026-11-22",
            "2026-13-01T00:00:00Z",
            "2026-11-22T14:54:02",
            "x026-11-22T14:54:02Z",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
    }

    fn repo(s: &str) -> RepoName {
        RepoName::parse(s).expect("name")
    }

    fn claims(now: u64) -> Claims {
        new_claims(
            "mark",
            "svc",
            vec![Access {
                kind: "repository".into(),
                name: "a/b".into(),
                actions: vec!["pull".into(), "push".into()],
            }],
            now,
            300,
        )
    }

    #[test]
    fn round_trip_and_grants() {
        let key = TokenKey::random();
        let now = 1_800_000_000;
        let token = key.sign(&claims(now));
        let c = key.verify(&token, "svc", now + 10).expect("valid");
        assert!(c.grants(Action::Push, &repo("a/b")));
        assert!(!c.grants(Action::Delete, &repo("a/b")));
        assert!(!c.grants(Action::Pull, &repo("a/c")));
        assert!(!c.grants_catalog());
    }

    #[test]
    fn refusals() {
        let key = TokenKey::random();
        let now = 1_800_000_000;
        let token = key.sign(&claims(now));
        assert_eq!(
            key.verify(&token, "other", now),
            Err(TokenError::WrongService)
        );
        assert_eq!(
            key.verify(&token, "svc", now + 300 + CLOCK_SKEW_SECS),
            Err(TokenError::Expired)
        );
        assert!(
            key.verify(&token, "svc", now + 300 + CLOCK_SKEW_SECS - 1)
                .is_ok()
        );
        assert_eq!(
            key.verify(&token, "svc", now - CLOCK_SKEW_SECS - 1),
            Err(TokenError::NotYetValid)
        );
        // Another key (another gate, or a forger).
        assert_eq!(
            TokenKey::random().verify(&token, "svc", now),
            Err(TokenError::BadSignature)
        );
        // A payload changed after signing.
        let (payload, sig) = token.split_once('.').expect("two parts");
        let mut forged: Claims =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).expect("b64")).expect("json");
        forged.access[0].actions.push("delete".into());
        let forged_payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&forged).expect("json"));
        assert_eq!(
            key.verify(&format!("{forged_payload}.{sig}"), "svc", now),
            Err(TokenError::BadSignature)
        );
        for junk in ["", ".", "abc", "a.b", "a.b.c", &"x".repeat(20_000), "é.é"] {
            assert!(key.verify(junk, "svc", now).is_err(), "{junk:?}");
        }
    }

    /// Found by `fuzz/token`: a signed token whose `exp` is near `u64::MAX` overflowed
    /// the expiry check (a panic in debug builds, a wrap to "expired" in release), and
    /// a huge `[token] expires_secs` overflowed `new_claims`.
    #[test]
    fn extreme_times_never_overflow() {
        let key = TokenKey::random();
        let now = 1_800_000_000;
        let mut c = claims(now);
        c.exp = u64::MAX;
        assert_eq!(
            key.verify(&key.sign(&c), "svc", now).map(|v| v.exp),
            Ok(u64::MAX)
        );
        c.nbf = u64::MAX;
        assert_eq!(
            key.verify(&key.sign(&c), "svc", now),
            Err(TokenError::NotYetValid)
        );
        assert!(key.verify(&key.sign(&c), "svc", u64::MAX).is_err());
        assert_eq!(
            new_claims("m", "svc", vec![], u64::MAX - 5, 300).exp,
            u64::MAX
        );
    }

    #[test]
    fn key_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let short = dir.path().join("short");
        std::fs::write(&short, "tiny\n").expect("write");
        assert!(matches!(
            TokenKey::from_file(&short),
            Err(KeyError::Short { .. })
        ));
        let good = dir.path().join("good");
        std::fs::write(&good, format!("{}\n", "k".repeat(40))).expect("write");
        let a = TokenKey::from_file(&good).expect("key");
        let b = TokenKey::from_file(&good).expect("key");
        let token = a.sign(&claims(100));
        assert!(b.verify(&token, "svc", 100).is_ok(), "same file, same key");
        assert!(!format!("{a:?}").contains("kkkk"));
    }

    #[test]
    fn a_rotated_key_accepts_old_tokens_for_one_lifetime_only() {
        let now = 1_800_000_000;
        let old = TokenKey::from_bytes(&[1; 32]);
        let keys = TokenKeys::new(TokenKey::from_bytes(&[1; 32]), 300);
        let before = keys.sign(&claims(now));
        assert!(
            !keys.rotate(TokenKey::from_bytes(&[1; 32]), now),
            "same key"
        );
        assert!(keys.rotate(TokenKey::from_bytes(&[2; 32]), now));
        let after = keys.sign(&claims(now));
        assert!(
            TokenKey::from_bytes(&[2; 32])
                .verify(&after, "svc", now)
                .is_ok()
        );
        assert!(
            old.verify(&after, "svc", now).is_err(),
            "signed with the new key"
        );
        // A token of the old key: accepted during one lifetime (and the clock skew).
        let mut long = claims(now);
        long.exp = now + 10_000;
        let long = old.sign(&long);
        assert!(keys.verify(&before, "svc", now + 10).is_ok());
        assert!(
            keys.verify(&long, "svc", now + 300 + CLOCK_SKEW_SECS)
                .is_ok()
        );
        assert_eq!(
            keys.verify(&long, "svc", now + 301 + CLOCK_SKEW_SECS),
            Err(TokenError::BadSignature)
        );
        // Another rotation forgets the first key at once.
        assert!(keys.rotate(TokenKey::from_bytes(&[3; 32]), now + 20));
        assert_eq!(
            keys.verify(&long, "svc", now + 20),
            Err(TokenError::BadSignature)
        );
        assert!(keys.verify(&after, "svc", now + 20).is_ok());
        // Failures other than the signature are not retried with the old key.
        assert_eq!(
            keys.verify(&after, "other", now + 20),
            Err(TokenError::WrongService)
        );
    }

    #[test]
    fn scopes_and_grants() {
        let scopes = parse_scopes([
            "repository:a/b:pull,push",
            "repository:c:*",
            "repository:localhost:5000/x:pull",
            "registry:catalog:*",
            "repository:BAD:pull",
            "nonsense",
            "repository:d:pull repository:e:push",
        ]);
        assert_eq!(scopes.len(), 5, "{scopes:?}");
        let mark_may = |a: Action, r: &RepoName| a == Action::Pull || r.as_str() == "c";
        let access = grant(&scopes, mark_may, true);
        let names: Vec<(String, Vec<String>)> = access
            .iter()
            .map(|a| (a.name.clone(), a.actions.clone()))
            .collect();
        assert_eq!(
            names,
            vec![
                ("a/b".into(), vec!["pull".into()]),
                (
                    "c".into(),
                    vec!["pull".into(), "push".into(), "delete".into()]
                ),
                ("d".into(), vec!["pull".into()]),
                ("catalog".into(), vec!["*".into()]),
            ]
        );
        // Nothing allowed: an empty grant, not an error.
        assert!(grant(&scopes, |_, _| false, false).is_empty());
    }

    #[test]
    fn dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_795_359_242), "2026-11-22T14:54:02Z");
    }
}
