//! Apache `htpasswd` files: parsing, validation at load, and password verification.
//!
//! Owns the file format and the hash schemes. Knows nothing of HTTP, groups or policy;
//! `auth` decides when to load and who may call [`Htpasswd::verify`].
//!
//! A line is `user:hash` (Apache ignores anything after a second `:`, and so do we).
//! Blank lines and lines starting with `#` are skipped; CRLF and surrounding whitespace
//! are tolerated. Accepted schemes:
//!
//! | prefix                  | scheme                         | written by                 |
//! |-------------------------|--------------------------------|----------------------------|
//! | `$2y$` `$2a$` `$2b$`    | bcrypt                         | `htpasswd -B`, this crate  |
//! | `$apr1$`                | Apache MD5 (1000 MD5 rounds)   | `htpasswd -m` (the default)|
//! | `$1$`                   | MD5-crypt (same, other magic)  | `openssl passwd -1`        |
//! | `{SHA}`                 | base64(SHA-1(password)), unsalted | `htpasswd -s`           |
//! | `$5$` `$6$`             | SHA-256/512-crypt              | `htpasswd -2`/`-5`, glibc  |
//!
//! Everything else is refused at load with `file:line: reason`: DES crypt, plain text,
//! unknown `$id$` schemes, malformed hashes, empty user names, duplicate users. Error
//! messages name the scheme and what is wrong, never the hash itself.
//!
//! Verification never panics. Digest comparisons are constant time (`subtle` here; the
//! bcrypt and sha-crypt crates compare in constant time internally). An unknown user
//! costs the same work as the file's most common scheme and cost, so timing does not
//! reveal which users exist.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use md5::{Digest as _, Md5};
use sha_crypt::{PasswordVerifier as _, ShaCrypt};
use sha1::Sha1;
use subtle::ConstantTimeEq as _;

/// Why a password or group file could not be loaded. Shared with [`super::groups`].
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}: {reason}")]
    Line {
        path: PathBuf,
        line: usize,
        reason: String,
    },
}

/// The alphabet of crypt(3)-style base64 (MD5-crypt, SHA-crypt, DES).
const CRYPT_ALPHABET: &[u8; 64] =
    b"./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// Salt and hash of a bcrypt string whose password nobody knows: the unknown-user dummy.
const DUMMY_BCRYPT_TAIL: &str = "zbss/GG2vPTgd2AWv6huJO/GROGXzgkyIf2CKB9Lzg3IRo2Cr12CO";

/// A parsed htpasswd file: user name to validated hash.
#[derive(Clone)]
pub struct Htpasswd {
    entries: HashMap<String, Entry>,
    /// Verified (and the result thrown away) for unknown users; `None` when the file is empty.
    dummy: Option<Hash>,
}

#[derive(Clone)]
struct Entry {
    line: usize,
    hash: Hash,
}

/// The password schemes a loaded file may use; see the module table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scheme {
    Bcrypt,
    AprMd5,
    Md5Crypt,
    Sha1,
    Sha256Crypt,
    Sha512Crypt,
}

impl Scheme {
    /// Unsalted or cheap schemes that an operator should replace with bcrypt.
    pub fn is_weak(self) -> bool {
        matches!(self, Scheme::AprMd5 | Scheme::Md5Crypt | Scheme::Sha1)
    }
}

impl fmt::Display for Scheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Scheme::Bcrypt => "bcrypt",
            Scheme::AprMd5 => "Apache MD5 ($apr1$)",
            Scheme::Md5Crypt => "MD5-crypt ($1$)",
            Scheme::Sha1 => "{SHA}",
            Scheme::Sha256Crypt => "SHA-256-crypt ($5$)",
            Scheme::Sha512Crypt => "SHA-512-crypt ($6$)",
        })
    }
}

/// A hash validated at load: verifying it cannot fail for format reasons.
#[derive(Clone)]
enum Hash {
    /// The full `$2y$cc$…` string, 60 ASCII bytes, cost 4..=31.
    Bcrypt { mcf: String, cost: u32 },
    /// `$apr1$` or `$1$`: salt of at most 8 bytes, 22 crypt-alphabet characters.
    Md5Crypt {
        magic: &'static str,
        salt: Vec<u8>,
        encoded: [u8; 22],
    },
    /// `{SHA}`: the raw SHA-1 digest.
    Sha1([u8; 20]),
    /// The full `$5$`/`$6$` string, checked field by field.
    ShaCrypt {
        mcf: String,
        sha512: bool,
        rounds: u32,
    },
}

/// What an unknown-user check should cost: the scheme and its work factor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Work {
    Sha1,
    Md5Crypt,
    ShaCrypt { sha512: bool, rounds: u32 },
    Bcrypt(u32),
}

impl Htpasswd {
    /// Parses htpasswd text; `path` is used only in error messages.
    pub fn parse(text: &str, path: &Path) -> Result<Htpasswd, LoadError> {
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let mut entries: HashMap<String, Entry> = HashMap::new();
        for (index, raw) in text.lines().enumerate() {
            let line = index + 1;
            let fail = |reason: String| LoadError::Line {
                path: path.to_owned(),
                line,
                reason,
            };
            let Some((user, rest)) = split_entry(raw) else {
                continue;
            };
            let Some(rest) = rest else {
                return Err(fail("no ':' between user name and password hash".into()));
            };
            if user.is_empty() {
                return Err(fail("empty user name".into()));
            }
            // Apache reads the hash up to the next ':' and ignores the rest.
            let hash_text = rest.split(':').next().unwrap_or(rest);
            let hash =
                Hash::parse(hash_text).map_err(|why| fail(format!("user {user:?}: {why}")))?;
            if let Some(first) = entries.get(user) {
                return Err(fail(format!(
                    "duplicate user {user:?} (first defined on line {})",
                    first.line
                )));
            }
            entries.insert(user.to_owned(), Entry { line, hash });
        }
        let dummy = dummy_for(entries.values().map(|e| &e.hash));
        Ok(Htpasswd { entries, dummy })
    }

    /// Reads and parses the file at `path`.
    pub fn load(path: &Path) -> Result<Htpasswd, LoadError> {
        Htpasswd::parse(&read_text(path)?, path)
    }

    /// True when `password` is `user`'s password.
    ///
    /// Blocking: bcrypt at cost 10 takes ~50-100 ms, so callers run this on
    /// `spawn_blocking`. Never panics. Passwords containing a NUL byte never verify
    /// (C implementations stop at the NUL, so such a password would mean different
    /// things to different tools).
    pub fn verify(&self, user: &str, password: &[u8]) -> bool {
        if password.contains(&0) {
            return false;
        }
        match self.entries.get(user) {
            Some(entry) => entry.hash.verify(password),
            None => {
                if let Some(dummy) = &self.dummy {
                    std::hint::black_box(dummy.verify(std::hint::black_box(password)));
                }
                false
            }
        }
    }

    pub fn contains(&self, user: &str) -> bool {
        self.entries.contains_key(user)
    }

    /// The scheme of `user`'s hash, e.g. for warning about weak ones.
    pub fn scheme(&self, user: &str) -> Option<Scheme> {
        self.entries.get(user).map(|e| e.hash.scheme())
    }

    /// All user names, sorted.
    pub fn users(&self) -> Vec<String> {
        let mut users: Vec<String> = self.entries.keys().cloned().collect();
        users.sort();
        users
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Lists users and schemes, never hashes.
impl fmt::Debug for Htpasswd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut users: Vec<(&String, Scheme)> = self
            .entries
            .iter()
            .map(|(u, e)| (u, e.hash.scheme()))
            .collect();
        users.sort();
        f.debug_struct("Htpasswd").field("users", &users).finish()
    }
}

/// Produces a bcrypt hash in the `$2y$` form that `htpasswd -B` writes.
///
/// Like every bcrypt, only the first 72 bytes of `password` count; callers that take
/// new passwords should refuse longer ones.
pub fn hash_bcrypt(password: &str, cost: u32) -> Result<String, bcrypt::BcryptError> {
    Ok(bcrypt::hash_with_result(password, cost)?.format_for_version(bcrypt::Version::TwoY))
}

/// Reads a password or group file as UTF-8, reporting the line of any invalid byte.
pub(crate) fn read_text(path: &Path) -> Result<String, LoadError> {
    let bytes = std::fs::read(path).map_err(|source| LoadError::Io {
        path: path.to_owned(),
        source,
    })?;
    String::from_utf8(bytes).map_err(|e| {
        let valid = &e.as_bytes()[..e.utf8_error().valid_up_to()];
        LoadError::Line {
            path: path.to_owned(),
            line: valid.iter().filter(|&&b| b == b'\n').count() + 1,
            reason: "not valid UTF-8".into(),
        }
    })
}

/// Splits one htpasswd line. `None`: blank or comment. `Some((user, None))`: no colon.
pub(crate) fn split_entry(raw: &str) -> Option<(&str, Option<&str>)> {
    let line = raw.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    Some(match line.split_once(':') {
        Some((user, rest)) => (user, Some(rest)),
        None => (line, None),
    })
}

impl Hash {
    /// Validates one hash field. The error says what is wrong without quoting the value.
    fn parse(text: &str) -> Result<Hash, String> {
        if text.is_empty() {
            return Err("empty password hash".into());
        }
        if let Some(b64) = text.strip_prefix("{SHA}") {
            let digest = base64::engine::general_purpose::STANDARD
                .decode(b64)
                .ok()
                .and_then(|bytes| <[u8; 20]>::try_from(bytes).ok())
                .ok_or("{SHA} hash is not the base64 of a 20-byte SHA-1 digest")?;
            return Ok(Hash::Sha1(digest));
        }
        if let Some(rest) = text.strip_prefix('$') {
            let id = rest.split('$').next().unwrap_or(rest);
            return match id {
                "2y" | "2a" | "2b" => parse_bcrypt(text),
                "2x" => Err(
                    "bcrypt $2x$ (the buggy crypt_blowfish variant) is not supported; \
                     set a new password"
                        .into(),
                ),
                "apr1" => parse_md5_crypt(text, "$apr1$"),
                "1" => parse_md5_crypt(text, "$1$"),
                "5" => parse_sha_crypt(text, false),
                "6" => parse_sha_crypt(text, true),
                _ if id.len() <= 8 && id.bytes().all(|b| b.is_ascii_alphanumeric()) => {
                    Err(format!("unknown password hash scheme ${id}$"))
                }
                _ => Err("unknown password hash scheme".into()),
            };
        }
        if text.len() == 13 && text.bytes().all(|b| CRYPT_ALPHABET.contains(&b)) {
            return Err(
                "DES crypt hashes are not supported (they use only the first 8 \
                 characters of a password); set a new password with bcrypt"
                    .into(),
            );
        }
        Err("not a recognised password hash (plain-text passwords are not accepted)".into())
    }

    fn verify(&self, password: &[u8]) -> bool {
        match self {
            Hash::Bcrypt { mcf, .. } => bcrypt::verify(password, mcf).unwrap_or(false),
            Hash::Md5Crypt {
                magic,
                salt,
                encoded,
            } => md5_crypt(password, magic.as_bytes(), salt)
                .ct_eq(encoded)
                .into(),
            Hash::Sha1(digest) => {
                let computed: [u8; 20] = Sha1::digest(password).into();
                computed.ct_eq(digest).into()
            }
            Hash::ShaCrypt { mcf, .. } => ShaCrypt::default()
                .verify_password(password, mcf.as_str())
                .is_ok(),
        }
    }

    fn scheme(&self) -> Scheme {
        match self {
            Hash::Bcrypt { .. } => Scheme::Bcrypt,
            Hash::Md5Crypt { magic, .. } if *magic == "$1$" => Scheme::Md5Crypt,
            Hash::Md5Crypt { .. } => Scheme::AprMd5,
            Hash::Sha1(_) => Scheme::Sha1,
            Hash::ShaCrypt { sha512: false, .. } => Scheme::Sha256Crypt,
            Hash::ShaCrypt { sha512: true, .. } => Scheme::Sha512Crypt,
        }
    }

    fn work(&self) -> Work {
        match self {
            Hash::Bcrypt { cost, .. } => Work::Bcrypt(*cost),
            Hash::Md5Crypt { .. } => Work::Md5Crypt,
            Hash::Sha1(_) => Work::Sha1,
            Hash::ShaCrypt { sha512, rounds, .. } => Work::ShaCrypt {
                sha512: *sha512,
                rounds: *rounds,
            },
        }
    }
}

/// A hash nobody's password matches, costing what the file's most common hash costs
/// (ties go to the more expensive one).
fn dummy_for<'a>(hashes: impl Iterator<Item = &'a Hash>) -> Option<Hash> {
    let mut counts: HashMap<Work, usize> = HashMap::new();
    for hash in hashes {
        *counts.entry(hash.work()).or_default() += 1;
    }
    let (work, _) = counts
        .into_iter()
        .max_by_key(|&(work, count)| (count, work))?;
    Some(match work {
        Work::Bcrypt(cost) => Hash::Bcrypt {
            mcf: format!("$2y${cost:02}${DUMMY_BCRYPT_TAIL}"),
            cost,
        },
        Work::Md5Crypt => Hash::Md5Crypt {
            magic: "$apr1$",
            salt: b"dummysal".to_vec(),
            encoded: [b'.'; 22],
        },
        Work::Sha1 => Hash::Sha1([0; 20]),
        Work::ShaCrypt { sha512, rounds } => {
            let (id, len) = if sha512 { ('6', 86) } else { ('5', 43) };
            Hash::ShaCrypt {
                mcf: format!("${id}$rounds={rounds}$dummysaltdummysa${}", ".".repeat(len)),
                sha512,
                rounds,
            }
        }
    })
}

fn parse_bcrypt(text: &str) -> Result<Hash, String> {
    let parts: bcrypt::HashParts = text
        .parse()
        .map_err(|_| "malformed bcrypt hash (expected $2y$, two-digit cost, 53 characters)")?;
    let cost = parts.get_cost();
    let digits = text
        .get(4..6)
        .is_some_and(|c| c.bytes().all(|b| b.is_ascii_digit()));
    if !(4..=31).contains(&cost) || !digits {
        return Err("bcrypt cost is not a number from 04 to 31".into());
    }
    Ok(Hash::Bcrypt {
        mcf: text.to_owned(),
        cost,
    })
}

fn parse_md5_crypt(text: &str, magic: &'static str) -> Result<Hash, String> {
    let name = if magic == "$1$" {
        "MD5-crypt ($1$)"
    } else {
        "Apache MD5 ($apr1$)"
    };
    let rest = text.strip_prefix(magic).unwrap_or(text);
    let (salt, encoded) = rest
        .split_once('$')
        .ok_or_else(|| format!("{name} hash has no '$' after the salt"))?;
    if salt.len() > 8 {
        return Err(format!("{name} salt is longer than 8 characters"));
    }
    let encoded: [u8; 22] = encoded
        .as_bytes()
        .try_into()
        .ok()
        .filter(|e: &[u8; 22]| e.iter().all(|b| CRYPT_ALPHABET.contains(b)))
        .ok_or_else(|| format!("{name} hash is not 22 characters of the crypt alphabet"))?;
    Ok(Hash::Md5Crypt {
        magic,
        salt: salt.as_bytes().to_vec(),
        encoded,
    })
}

fn parse_sha_crypt(text: &str, sha512: bool) -> Result<Hash, String> {
    let (name, prefix, len, last_max) = if sha512 {
        ("SHA-512-crypt ($6$)", "$6$", 86, 4)
    } else {
        ("SHA-256-crypt ($5$)", "$5$", 43, 16)
    };
    let mut rest = text.strip_prefix(prefix).unwrap_or(text);
    let mut rounds = 5000;
    if let Some(after) = rest.strip_prefix("rounds=") {
        let (number, tail) = after
            .split_once('$')
            .ok_or_else(|| format!("{name} hash has no '$' after rounds="))?;
        rounds = number
            .parse::<u32>()
            .ok()
            .filter(|r| {
                number.bytes().all(|b| b.is_ascii_digit()) && (1000..=999_999_999).contains(r)
            })
            .ok_or_else(|| format!("{name} rounds is not a number from 1000 to 999999999"))?;
        rest = tail;
    }
    let (salt, hash) = rest
        .split_once('$')
        .ok_or_else(|| format!("{name} hash has no '$' after the salt"))?;
    if salt.is_empty() || salt.len() > 16 || salt.starts_with("rounds=") {
        return Err(format!("{name} salt is not 1 to 16 characters"));
    }
    if !salt.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!(
            "{name} salt has characters outside printable ASCII"
        ));
    }
    // crypt's base64 fills the last character from its low bits: the high ones must be 0.
    let canonical = hash.len() == len
        && hash.bytes().all(|b| CRYPT_ALPHABET.contains(&b))
        && hash
            .bytes()
            .last()
            .and_then(|b| CRYPT_ALPHABET.iter().position(|&a| a == b))
            .is_some_and(|v| v < last_max);
    if !canonical {
        return Err(format!(
            "{name} hash is not {len} characters of the crypt alphabet"
        ));
    }
    if sha_crypt::PasswordHashRef::new(text).is_err() {
        return Err(format!("{name} hash is malformed"));
    }
    Ok(Hash::ShaCrypt {
        mcf: text.to_owned(),
        sha512,
        rounds,
    })
}

/// The MD5-crypt algorithm (Poul-Henning Kamp's `$1$`; Apache's `$apr1$` differs only
/// in `magic`). Returns the 22-character encoded hash.
fn md5_crypt(password: &[u8], magic: &[u8], salt: &[u8]) -> [u8; 22] {
    let alternate: [u8; 16] = Md5::new()
        .chain_update(password)
        .chain_update(salt)
        .chain_update(password)
        .finalize()
        .into();
    let mut ctx = Md5::new()
        .chain_update(password)
        .chain_update(magic)
        .chain_update(salt);
    let mut remaining = password.len();
    while remaining > 0 {
        let n = remaining.min(16);
        ctx.update(&alternate[..n]);
        remaining -= n;
    }
    let mut bits = password.len();
    while bits != 0 {
        // A quirk of the original C: a zero byte for 1-bits, the first password byte for 0-bits.
        let byte = if bits & 1 == 1 {
            0
        } else {
            password.first().copied().unwrap_or(0)
        };
        ctx.update([byte]);
        bits >>= 1;
    }
    let mut digest: [u8; 16] = ctx.finalize().into();
    for i in 0..1000 {
        let mut round = Md5::new();
        if i & 1 == 1 {
            round.update(password);
        } else {
            round.update(digest);
        }
        if i % 3 != 0 {
            round.update(salt);
        }
        if i % 7 != 0 {
            round.update(password);
        }
        if i & 1 == 1 {
            round.update(digest);
        } else {
            round.update(password);
        }
        digest = round.finalize().into();
    }

    let mut out = [0u8; 22];
    let mut chars = out.iter_mut();
    let mut put = |mut value: u32, count: usize| {
        for slot in chars.by_ref().take(count) {
            *slot = CRYPT_ALPHABET[(value & 0x3f) as usize];
            value >>= 6;
        }
    };
    let d = digest.map(u32::from);
    put((d[0] << 16) | (d[6] << 8) | d[12], 4);
    put((d[1] << 16) | (d[7] << 8) | d[13], 4);
    put((d[2] << 16) | (d[8] << 8) | d[14], 4);
    put((d[3] << 16) | (d[9] << 8) | d[15], 4);
    put((d[4] << 16) | (d[10] << 8) | d[5], 4);
    put(d[11], 2);
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    // Vectors made by real tools (apache2-utils 2.4 `htpasswd -n`, OpenSSL 3 `passwd`);
    // the password is in the comment.
    /// `htpasswd -nbB -C 5 alice 'correct horse'`
    const BCRYPT_2Y: &str = "$2y$05$cxh6xfEbcXg3XtP5cW2xrOOd9Y.QrNRO4nfPeNvbV9svlKkwlxrhO";
    /// "U*U", the classic OpenBSD/John the Ripper bcrypt test vector.
    const BCRYPT_2A: &str = "$2a$05$CCCCCCCCCCCCCCCCCCCCC.E5YPO9kmyuRGyh0XouQYb4YMJKvyOeW";
    /// `htpasswd -nbB -C 4 long <80 × 'a'>`
    const BCRYPT_LONG: &str = "$2y$04$XgLkZoj6ToAHlM82iJ2y5.ngylkyCX6aSVE9lg6pyLLxIpflqzMnm";
    /// `htpasswd -nbm bob hunter2`
    const APR1: &str = "$apr1$vTqeZwmb$1td8BuP18R92uwtMW3Ls.0";
    /// `openssl passwd -apr1 -salt abcdefgh 'apr pw'`
    const APR1_OPENSSL: &str = "$apr1$abcdefgh$pC56iS31oyrT2nVnOV3DH1";
    /// `openssl passwd -apr1 -salt ab ''`
    const APR1_EMPTY: &str = "$apr1$ab$S8K6Sgp3W8c9Jb6LxgywZ.";
    /// `openssl passwd -1 -salt abcdefgh 'md5 pw'`
    const MD5_CRYPT: &str = "$1$abcdefgh$MPnmOmVs0m8ksFY0IL3jM0";
    /// `htpasswd -nbs carol 'p@ss:word'`
    const SHA1: &str = "{SHA}XVo4QKYxOH2OeKuETjdaW6SkHls=";
    /// `htpasswd -nb2 dave 'sha256 pw'`
    const SHA256_HTPASSWD: &str = "$5$/n5IDPkivVbpkEuU$q02u6r0FNyQGCj/b8YfLxraWS5vdMHlaxTMJrJ645nB";
    /// `htpasswd -nb5 erin 'sha512 pw'`
    const SHA512_HTPASSWD: &str = "$6$riJWFwiZUe656GKo$ClkWZz5.CTDF5ckKFm2vw5W1hfLIEKe.dJhkVOn1tXbbZ2jHOK09mlBGsPemAdtbkK8uhvUZncr2rdRMg9Ifc0";
    /// `openssl passwd -5 -salt saltsalt 'five pw'`
    const SHA256: &str = "$5$saltsalt$zHzEnWJVuBtBXcud5Ox4FxIzjt90Bnp7TsDbjEWUR43";
    /// `openssl passwd -6 -salt saltsaltsaltsalt 'six pw'`
    const SHA512: &str = "$6$saltsaltsaltsalt$qfdlzw70dJ1MkONrVW8r0pVqWKH4gRVkac6kkUeIqBKTjl8H.CcyLI6BWzgsfrEsmocbJ1QOWf8v56RMZ067p1";
    /// `openssl passwd -5 -salt 'rounds=10000$abcdefgh' 'rounds pw'`
    const SHA256_ROUNDS: &str =
        "$5$rounds=10000$abcdefgh$.F2EqV8n4GkVlwTC7RpQuLm3N0.pA0bz0WIxVu.zZ34";
    /// `openssl passwd -6 -salt 'rounds=1000$xyz' 'six rounds'`
    const SHA512_ROUNDS: &str = "$6$rounds=1000$xyz$1tMYw2GsC0FoGMIQd/DFMJOpNNfBIbMC6CsLOKbTMGzTDHc.x3OmXgNK4SudPjivUxElm2OgJ6EcV8kUexVwv0";

    fn path() -> &'static Path {
        Path::new("/etc/registry-gate/httpd.htpasswd")
    }

    fn one(hash: &str) -> Htpasswd {
        Htpasswd::parse(&format!("u:{hash}\n"), path()).unwrap()
    }

    fn line_error(text: &str) -> (usize, String) {
        match Htpasswd::parse(text, path()) {
            Err(LoadError::Line {
                line,
                reason,
                path: p,
            }) => {
                assert_eq!(p, super::tests::path());
                (line, reason)
            }
            other => panic!("expected a line error, got {other:?}"),
        }
    }

    #[test]
    fn every_scheme_verifies_right_and_refuses_wrong() {
        let cases: &[(&str, &[u8], Scheme)] = &[
            (BCRYPT_2Y, b"correct horse", Scheme::Bcrypt),
            (BCRYPT_2A, b"U*U", Scheme::Bcrypt),
            (
                &BCRYPT_2Y.replacen("$2y$", "$2b$", 1),
                b"correct horse",
                Scheme::Bcrypt,
            ),
            (APR1, b"hunter2", Scheme::AprMd5),
            (APR1_OPENSSL, b"apr pw", Scheme::AprMd5),
            (APR1_EMPTY, b"", Scheme::AprMd5),
            (MD5_CRYPT, b"md5 pw", Scheme::Md5Crypt),
            (SHA1, b"p@ss:word", Scheme::Sha1),
            (SHA256_HTPASSWD, b"sha256 pw", Scheme::Sha256Crypt),
            (SHA512_HTPASSWD, b"sha512 pw", Scheme::Sha512Crypt),
            (SHA256, b"five pw", Scheme::Sha256Crypt),
            (SHA512, b"six pw", Scheme::Sha512Crypt),
            (SHA256_ROUNDS, b"rounds pw", Scheme::Sha256Crypt),
            (SHA512_ROUNDS, b"six rounds", Scheme::Sha512Crypt),
        ];
        for (hash, password, scheme) in cases {
            let file = one(hash);
            assert_eq!(file.scheme("u"), Some(*scheme), "{hash}");
            assert!(
                file.verify("u", password),
                "right password refused for {hash}"
            );
            let mut wrong = password.to_vec();
            wrong.push(b'x');
            assert!(
                !file.verify("u", &wrong),
                "wrong password accepted for {hash}"
            );
            assert!(
                !file.verify("u", b"wrong"),
                "wrong password accepted for {hash}"
            );
            assert!(
                !file.verify("v", password),
                "unknown user accepted for {hash}"
            );
        }
    }

    #[test]
    fn bcrypt_truncates_at_72_bytes_like_apache() {
        let file = one(BCRYPT_LONG);
        assert!(file.verify("u", &[b'a'; 80]));
        assert!(file.verify("u", &[b'a'; 72]));
        assert!(!file.verify("u", &[b'a'; 71]));
    }

    #[test]
    fn nul_in_password_never_verifies() {
        let hash = hash_bcrypt("secret", 4).unwrap();
        let file = one(&hash);
        assert!(file.verify("u", b"secret"));
        assert!(!file.verify("u", b"secret\0junk"));
        assert!(!file.verify("u", b"secret\0"));
        // The bcrypt crate alone would accept a NUL password against its own hash of it.
        let with_nul = bcrypt::hash(b"secret\0junk", 4).unwrap();
        assert!(bcrypt::verify(b"secret\0junk", &with_nul).unwrap());
        assert!(!one(&with_nul).verify("u", b"secret\0junk"));
        let file = one(SHA1);
        assert!(!file.verify("u", b"p@ss:word\0"));
    }

    #[test]
    fn hash_bcrypt_writes_2y_that_verifies() {
        let hash = hash_bcrypt("pässword with spaces", 4).unwrap();
        assert!(hash.starts_with("$2y$04$"), "{hash}");
        assert_eq!(hash.len(), 60);
        let file = one(&hash);
        assert!(file.verify("u", "pässword with spaces".as_bytes()));
        assert!(!file.verify("u", b"password with spaces"));
        assert!(hash_bcrypt("x", 3).is_err());
    }

    #[test]
    fn parses_a_realistic_file() {
        let text = format!(
            "\u{feff}# registry users\r\n\r\nalice:{BCRYPT_2Y}\r\n  bob:{APR1}   \r\n\
             carol:{SHA1}:extra field ignored\n\t\n# erin:{SHA512}\ndave:{SHA256_HTPASSWD}"
        );
        let file = Htpasswd::parse(&text, path()).unwrap();
        assert_eq!(file.users(), ["alice", "bob", "carol", "dave"]);
        assert_eq!(file.len(), 4);
        assert!(!file.is_empty());
        assert!(file.contains("bob") && !file.contains("erin"));
        assert!(file.verify("bob", b"hunter2"));
        assert!(file.verify("carol", b"p@ss:word"));
        assert!(file.verify("dave", b"sha256 pw"));
        let debug = format!("{file:?}");
        assert!(debug.contains("alice") && !debug.contains("$2y$") && !debug.contains("XVo4"));
    }

    #[test]
    fn empty_file_is_empty() {
        let file = Htpasswd::parse("# nobody\n\n", path()).unwrap();
        assert!(file.is_empty());
        assert!(!file.verify("alice", b"x"));
    }

    #[test]
    fn refusals_name_the_line_and_reason_without_the_hash() {
        let cases: &[(&str, &str)] = &[
            ("frank:oP4biXIOWzYuA", "DES crypt"),
            ("gina:plainpw", "plain-text"),
            ("nocolon", "no ':'"),
            (":{SHA}XVo4QKYxOH2OeKuETjdaW6SkHls=", "empty user name"),
            ("u:", "empty password hash"),
            ("u:$3$abc$def", "unknown password hash scheme $3$"),
            (
                "u:$argon2id$v=19$m=65536,t=3,p=4$c2FsdA$aGFzaA",
                "unknown password hash scheme",
            ),
            (
                "u:$2x$05$CCCCCCCCCCCCCCCCCCCCC.E5YPO9kmyuRGyh0XouQYb4YMJKvyOeW",
                "$2x$",
            ),
            ("u:$2y$05$cxh6xfEbcXg3XtP5cW2xrOOd9Y", "malformed bcrypt"),
            (
                "u:$2y$05$!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!",
                "malformed bcrypt",
            ),
            (
                "u:$2y$99$cxh6xfEbcXg3XtP5cW2xrOOd9Y.QrNRO4nfPeNvbV9svlKkwlxrhO",
                "cost",
            ),
            (
                "u:$2y$03$cxh6xfEbcXg3XtP5cW2xrOOd9Y.QrNRO4nfPeNvbV9svlKkwlxrhO",
                "cost",
            ),
            (
                "u:$2y$+5$cxh6xfEbcXg3XtP5cW2xrOOd9Y.QrNRO4nfPeNvbV9svlKkwlxrhO",
                "cost",
            ),
            ("u:$apr1$", "no '$' after the salt"),
            ("u:$apr1$vTqeZwmb", "no '$' after the salt"),
            ("u:$apr1$vTqeZwmb$1td8BuP18R92", "22 characters"),
            ("u:$apr1$vTqeZwmb$1td8BuP18R92uwtMW3Ls!0", "22 characters"),
            ("u:$apr1$123456789$1td8BuP18R92uwtMW3Ls.0", "longer than 8"),
            ("u:{SHA}not base64!", "{SHA}"),
            ("u:{SHA}c2hvcnQ=", "20-byte"),
            ("u:{SHA}", "{SHA}"),
            ("u:$5$junk", "no '$' after the salt"),
            ("u:$5$saltsalt$tooshort", "43 characters"),
            (
                "u:$5$saltsalt$zHzEnWJVuBtBXcud5Ox4FxIzjt90Bnp7TsDbjEWUR4z",
                "43 characters",
            ),
            (
                "u:$6$saltsaltsaltsalt$qfdlzw70dJ1MkONrVW8r0pVqWKH4gRVkac6kkUeIqBKTjl8H.CcyLI6BWzgsfrEsmocbJ1QOWf8v56RMZ067p2",
                "86 characters",
            ),
            (
                "u:$5$rounds=10$abc$UxKib5kobt2BZp/yfOEWbjik.BPMiS9MzbXyO6zXMC0",
                "rounds",
            ),
            (
                "u:$5$rounds=abc$abc$UxKib5kobt2BZp/yfOEWbjik.BPMiS9MzbXyO6zXMC0",
                "rounds",
            ),
            ("u:$5$rounds=5000", "rounds"),
            ("u:$5$$zHzEnWJVuBtBXcud5Ox4FxIzjt90Bnp7TsDbjEWUR43", "salt"),
            (
                "u:$5$abcdefghijklmnopq$zHzEnWJVuBtBXcud5Ox4FxIzjt90Bnp7TsDbjEWUR43",
                "salt",
            ),
        ];
        for (bad, why) in cases {
            let text = format!("# header\n\nok:{APR1}\n{bad}\nlater:{SHA1}\n");
            let (line, reason) = line_error(&text);
            assert_eq!(line, 4, "{bad}");
            assert!(reason.contains(why), "{bad}: {reason:?} lacks {why:?}");
            if let Some((_, hash)) = bad.split_once(':') {
                let hash = hash.trim_start_matches("{SHA}");
                let secret = hash.rsplit('$').next().unwrap_or(hash);
                if secret.len() > 4 {
                    assert!(!reason.contains(secret), "{reason:?} quotes the hash");
                }
            }
        }
    }

    #[test]
    fn duplicate_users_are_refused_with_both_lines() {
        let text = format!("alice:{APR1}\nbob:{SHA1}\r\n\r\nalice:{SHA1}\n");
        let (line, reason) = line_error(&text);
        assert_eq!(line, 4);
        assert!(
            reason.contains("duplicate user \"alice\"") && reason.contains("line 1"),
            "{reason}"
        );
    }

    #[test]
    fn load_reports_io_errors_and_bad_utf8_with_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing");
        let err = Htpasswd::load(&missing).unwrap_err();
        assert!(matches!(err, LoadError::Io { .. }));
        assert!(err.to_string().starts_with(&missing.display().to_string()));

        let bad = dir.path().join("bad");
        std::fs::write(&bad, b"a:{SHA}XVo4QKYxOH2OeKuETjdaW6SkHls=\nb\xff:x\n").unwrap();
        let err = Htpasswd::load(&bad).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("{}:2: not valid UTF-8", bad.display())
        );

        let good = dir.path().join("good");
        std::fs::write(&good, format!("a:{SHA1}\n")).unwrap();
        assert!(Htpasswd::load(&good).unwrap().verify("a", b"p@ss:word"));
    }

    #[test]
    fn dummy_matches_the_most_common_work_and_is_valid() {
        let text = format!("a:{BCRYPT_2Y}\nb:{APR1}\nc:{BCRYPT_2A}\nd:{SHA256_ROUNDS}\n");
        let file = Htpasswd::parse(&text, path()).unwrap();
        let Some(Hash::Bcrypt { mcf, cost }) = &file.dummy else {
            panic!("dummy should be bcrypt");
        };
        assert_eq!(*cost, 5);
        assert!(Hash::parse(mcf).is_ok());
        for hash in [SHA256_ROUNDS, SHA512, APR1, SHA1, MD5_CRYPT] {
            let dummy = one(hash).dummy.unwrap();
            assert_eq!(dummy.work(), Hash::parse(hash).unwrap().work(), "{hash}");
            if let Hash::ShaCrypt { mcf, .. } = &dummy {
                assert!(Hash::parse(mcf).is_ok(), "{mcf}");
            }
            assert!(!dummy.verify(b""));
        }
    }

    #[test]
    fn unknown_user_costs_about_as_much_as_a_known_one() {
        let hash = hash_bcrypt("pw", 8).unwrap();
        let file = one(&hash);
        let time = |user: &str| {
            let start = std::time::Instant::now();
            for _ in 0..3 {
                assert!(!file.verify(user, b"wrong"));
            }
            start.elapsed()
        };
        let (known, unknown) = (time("u"), time("nobody"));
        assert!(unknown * 3 > known, "known {known:?}, unknown {unknown:?}");
    }

    /// A tiny deterministic generator, so the property test needs no extra crate.
    struct XorShift(u64);
    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    #[test]
    fn garbage_never_panics() {
        let seeds = [
            BCRYPT_2Y,
            BCRYPT_2A,
            APR1,
            MD5_CRYPT,
            SHA1,
            SHA256,
            SHA512,
            SHA256_ROUNDS,
            SHA512_ROUNDS,
            "$2y$",
            "$apr1$",
            "$5$rounds=",
            "$6$",
            "{SHA}",
            "$1$",
        ];
        let junk: Vec<char> = "$:{}#=./aZ09+\r\n\t \0é€\u{feff}".chars().collect();
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        let (mut parsed, mut verified) = (0, 0);
        for _ in 0..20_000 {
            let mut hash: Vec<char> = seeds[rng.below(seeds.len())].chars().collect();
            for _ in 0..1 + rng.below(4) {
                let at = rng.below(hash.len() + 1);
                match rng.below(4) {
                    0 => hash.truncate(at),
                    1 => hash.insert(at, junk[rng.below(junk.len())]),
                    2 if at < hash.len() => {
                        hash[at] = CRYPT_ALPHABET[rng.below(64)] as char;
                    }
                    _ if at < hash.len() => {
                        hash.remove(at);
                    }
                    _ => {}
                }
            }
            let hash: String = hash.into_iter().collect();
            let Ok(file) = Htpasswd::parse(&format!("u:{hash}\n"), path()) else {
                continue;
            };
            parsed += 1;
            // Skip hashes mutated into hours of work (cost 25, rounds=99999999).
            let expensive = match file.entries.get("u").map(|e| e.hash.work()) {
                Some(Work::Bcrypt(cost)) => cost > 6,
                Some(Work::ShaCrypt { rounds, .. }) => rounds > 20_000,
                _ => false,
            };
            if expensive || rng.below(10) != 0 {
                continue;
            }
            let len = rng.below(100);
            let password: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            let _ = file.verify("u", &password);
            let _ = file.verify("other", &password);
            verified += 1;
        }
        assert!(
            parsed > 1000 && verified > 100,
            "{parsed} parsed, {verified} verified"
        );
        for _ in 0..5_000 {
            let len = rng.below(120);
            let line: String = (0..len).map(|_| junk[rng.below(junk.len())]).collect();
            let _ = Htpasswd::parse(&line, path());
        }
    }
}
