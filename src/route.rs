//! The `/v2` URL grammar of the OCI distribution spec, checked once at the edge.
//!
//! The router yields typed values (`RepoName`, `Reference`, `Digest`, `UploadId`) so
//! nothing deeper handles a raw path. It also refuses the path tricks a front door must
//! never pass on: dot segments, empty segments, percent-encoded separators, `;`
//! parameters, backslashes and control bytes.

use std::borrow::Cow;
use std::fmt;

/// Longest repository name accepted (distribution's limit).
pub const MAX_NAME_LEN: usize = 255;
/// Longest tag (spec: up to 128 characters).
pub const MAX_TAG_LEN: usize = 128;

/// One recognised registry endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `/v2/` (and `/v2`): the API version check.
    Base,
    /// `/v2/_catalog`
    Catalog,
    /// `/v2/<name>/tags/list`
    Tags(RepoName),
    /// `/v2/<name>/manifests/<reference>`
    Manifest(RepoName, Reference),
    /// `/v2/<name>/blobs/<digest>`
    Blob(RepoName, Digest),
    /// `/v2/<name>/blobs/uploads/`
    UploadStart(RepoName),
    /// `/v2/<name>/blobs/uploads/<id>`
    Upload(RepoName, UploadId),
    /// `/v2/<name>/referrers/<digest>`
    Referrers(RepoName, Digest),
}

impl Route {
    /// The repository the request is about, if any.
    pub fn repository(&self) -> Option<&RepoName> {
        match self {
            Route::Base | Route::Catalog => None,
            Route::Tags(n)
            | Route::Manifest(n, _)
            | Route::Blob(n, _)
            | Route::UploadStart(n)
            | Route::Upload(n, _)
            | Route::Referrers(n, _) => Some(n),
        }
    }

    /// A short name of the endpoint family, for logs and metrics.
    pub fn family(&self) -> &'static str {
        match self {
            Route::Base => "base",
            Route::Catalog => "catalog",
            Route::Tags(_) => "tags",
            Route::Manifest(..) => "manifests",
            Route::Blob(..) => "blobs",
            Route::UploadStart(_) | Route::Upload(..) => "uploads",
            Route::Referrers(..) => "referrers",
        }
    }
}

/// Why a path was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteError {
    /// Not under `/v2`: no registry endpoint at all.
    NotRegistry,
    /// A path shape that is unsafe or malformed (dot segments, encoded separators…).
    BadPath(&'static str),
    /// Under `/v2` but no endpoint of the spec.
    UnknownEndpoint,
    /// A repository name outside the spec's grammar.
    NameInvalid(String),
    /// A tag or digest outside the spec's grammar.
    ReferenceInvalid(String),
    /// A digest outside the spec's grammar.
    DigestInvalid(String),
}

impl fmt::Display for RouteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RouteError::NotRegistry => write!(f, "not a registry endpoint"),
            RouteError::BadPath(why) => write!(f, "malformed path: {why}"),
            RouteError::UnknownEndpoint => write!(f, "no such registry endpoint"),
            RouteError::NameInvalid(why) => write!(f, "invalid repository name: {why}"),
            RouteError::ReferenceInvalid(why) => write!(f, "invalid reference: {why}"),
            RouteError::DigestInvalid(why) => write!(f, "invalid digest: {why}"),
        }
    }
}

/// A repository name per the spec:
/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(\/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RepoName(String);

impl RepoName {
    pub fn parse(s: &str) -> Result<RepoName, RouteError> {
        if s.is_empty() {
            return Err(RouteError::NameInvalid("empty".into()));
        }
        if s.len() > MAX_NAME_LEN {
            return Err(RouteError::NameInvalid(format!(
                "longer than {MAX_NAME_LEN} characters"
            )));
        }
        for component in s.split('/') {
            if !valid_component(component) {
                return Err(RouteError::NameInvalid(format!(
                    "component {component:?} does not match [a-z0-9]+((.|_|__|-+)[a-z0-9]+)*"
                )));
            }
        }
        Ok(RepoName(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RepoName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn valid_component(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        // A separator run: ".", "_", "__" or one or more "-".
        let start = i;
        match b[i] {
            b'.' => i += 1,
            b'_' => {
                i += 1;
                if i < b.len() && b[i] == b'_' {
                    i += 1;
                }
            }
            b'-' => {
                while i < b.len() && b[i] == b'-' {
                    i += 1;
                }
            }
            _ => return false,
        }
        if i == start || i >= b.len() || !alnum(b[i]) {
            return false;
        }
    }
    true
}

/// A content digest `algorithm:encoded`. sha256 and sha512 are checked for length and
/// lower-case hex; other algorithms only against the spec's general grammar.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(String);

impl Digest {
    pub fn parse(s: &str) -> Result<Digest, RouteError> {
        let Some((alg, enc)) = s.split_once(':') else {
            return Err(RouteError::DigestInvalid("missing ':'".into()));
        };
        let alg_ok = !alg.is_empty()
            && alg.split(['+', '.', '_', '-']).all(|p| {
                !p.is_empty()
                    && p.bytes()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
            });
        if !alg_ok {
            return Err(RouteError::DigestInvalid("malformed algorithm".into()));
        }
        let enc_ok = !enc.is_empty()
            && enc
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'=' | b'_' | b'-'));
        if !enc_ok {
            return Err(RouteError::DigestInvalid("malformed encoded part".into()));
        }
        let hex_len = match alg {
            "sha256" => Some(64),
            "sha512" => Some(128),
            _ => None,
        };
        if let Some(n) = hex_len {
            let hex = enc.len() == n
                && enc
                    .bytes()
                    .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c));
            if !hex {
                return Err(RouteError::DigestInvalid(format!(
                    "{alg} needs {n} lower-case hex characters"
                )));
            }
        }
        Ok(Digest(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn algorithm(&self) -> &str {
        self.0.split_once(':').map_or("", |(a, _)| a)
    }

    pub fn encoded(&self) -> &str {
        self.0.split_once(':').map_or("", |(_, e)| e)
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A manifest reference: a tag or a digest.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Reference {
    Tag(String),
    Digest(Digest),
}

impl Reference {
    pub fn parse(s: &str) -> Result<Reference, RouteError> {
        if s.contains(':') {
            return Digest::parse(s).map(Reference::Digest);
        }
        let b = s.as_bytes();
        let ok = !b.is_empty()
            && b.len() <= MAX_TAG_LEN
            && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
            && b.iter()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'));
        if !ok {
            return Err(RouteError::ReferenceInvalid(
                "a tag is [a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}".into(),
            ));
        }
        Ok(Reference::Tag(s.to_owned()))
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reference::Tag(t) => f.write_str(t),
            Reference::Digest(d) => d.fmt(f),
        }
    }
}

/// An upload session id: opaque to clients, restricted to a safe alphabet here.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct UploadId(String);

impl UploadId {
    pub fn parse(s: &str) -> Result<UploadId, RouteError> {
        let ok = !s.is_empty()
            && s.len() <= 128
            && s.bytes()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.' | b'='))
            && s != "."
            && s != "..";
        if !ok {
            return Err(RouteError::BadPath("malformed upload id"));
        }
        Ok(UploadId(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Check a raw request path (as received, still percent-encoded) and return it decoded
/// for routing. Only `%3A` (an encoded `:` in a digest) is decoded; every other escape
/// is refused, because no valid registry path needs one.
pub fn normalize(raw: &str) -> Result<Cow<'_, str>, RouteError> {
    if !raw.starts_with('/') {
        return Err(RouteError::BadPath("not an absolute path"));
    }
    let bytes = raw.as_bytes();
    // One pass over the bytes: refuse what no registry path has, note escapes, and
    // check the segments (none empty except a trailing slash, none "." or "..").
    // `%3A` decodes to ':', which cannot make a segment empty or a dot segment.
    let mut escaped = false;
    let mut seg_start = 1;
    for (i, &c) in bytes.iter().enumerate().skip(1) {
        match c {
            b'%' => {
                let esc = bytes.get(i + 1..i + 3);
                if !esc.is_some_and(|e| e.eq_ignore_ascii_case(b"3a")) {
                    return Err(RouteError::BadPath("percent-encoded characters"));
                }
                escaped = true;
            }
            b';' => return Err(RouteError::BadPath("';' parameters")),
            b'\\' => return Err(RouteError::BadPath("backslash")),
            b'/' => {
                check_segment(&bytes[seg_start..i])?;
                seg_start = i + 1;
            }
            c if c <= 0x20 || c >= 0x7f => {
                return Err(RouteError::BadPath("control, space or non-ASCII byte"));
            }
            _ => {}
        }
    }
    // The last segment may be empty: a trailing slash.
    let last = &bytes[seg_start..];
    if !last.is_empty() {
        check_segment(last)?;
    }
    if !escaped {
        return Ok(Cow::Borrowed(raw));
    }
    let mut out = String::with_capacity(raw.len());
    let mut rest = raw;
    while let Some(at) = rest.find('%') {
        out.push_str(&rest[..at]);
        out.push(':');
        rest = &rest[at + 3..];
    }
    out.push_str(rest);
    Ok(Cow::Owned(out))
}

/// One path segment between two slashes: not empty, not "." or "..".
fn check_segment(seg: &[u8]) -> Result<(), RouteError> {
    match seg {
        b"" => Err(RouteError::BadPath("empty path segment")),
        b"." | b".." => Err(RouteError::BadPath("dot segment")),
        _ => Ok(()),
    }
}

/// `s` split at its last '/' (a plain loop over a short path: `rsplit_once` sets up
/// a general searcher on every call).
fn split_last(s: &str) -> Option<(&str, &str)> {
    let at = s.bytes().rposition(|b| b == b'/')?;
    Some((&s[..at], &s[at + 1..]))
}

/// Route a normalized path (from [`normalize`]).
pub fn parse(path: &str) -> Result<Route, RouteError> {
    let rest = match path {
        "/v2" | "/v2/" => return Ok(Route::Base),
        p => p.strip_prefix("/v2/").ok_or(RouteError::NotRegistry)?,
    };
    if rest == "_catalog" {
        return Ok(Route::Catalog);
    }
    // Upload start keeps its trailing slash: `<name>/blobs/uploads/`.
    if let Some(name) = rest
        .strip_suffix("/blobs/uploads/")
        .or_else(|| rest.strip_suffix("/blobs/uploads"))
    {
        return Ok(Route::UploadStart(RepoName::parse(name)?));
    }
    // `<name>/<kind>/<last>`: the name is everything before the last two segments
    // (a repository name has slashes of its own), or the last three for an upload.
    let Some((head, last)) = split_last(rest) else {
        return Err(RouteError::UnknownEndpoint);
    };
    let Some((name, kind)) = split_last(head) else {
        return Err(RouteError::UnknownEndpoint);
    };
    match kind {
        "tags" if last == "list" => Ok(Route::Tags(RepoName::parse(name)?)),
        "manifests" => {
            let name = RepoName::parse(name)?;
            Ok(Route::Manifest(name, Reference::parse(last)?))
        }
        "blobs" if last.contains(':') => {
            let name = RepoName::parse(name)?;
            Ok(Route::Blob(name, Digest::parse(last)?))
        }
        "uploads" => match split_last(name) {
            Some((name, "blobs")) => {
                let name = RepoName::parse(name)?;
                Ok(Route::Upload(name, UploadId::parse(last)?))
            }
            _ => Err(RouteError::UnknownEndpoint),
        },
        "referrers" => {
            let name = RepoName::parse(name)?;
            Ok(Route::Referrers(name, Digest::parse(last)?))
        }
        _ => Err(RouteError::UnknownEndpoint),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn route(p: &str) -> Result<Route, RouteError> {
        parse(&normalize(p)?)
    }

    #[test]
    fn routes() {
        assert_eq!(route("/v2/"), Ok(Route::Base));
        assert_eq!(route("/v2"), Ok(Route::Base));
        assert_eq!(route("/v2/_catalog"), Ok(Route::Catalog));
        let name = RepoName::parse("a/b-c/d.e").expect("name");
        assert_eq!(
            route("/v2/a/b-c/d.e/tags/list"),
            Ok(Route::Tags(name.clone()))
        );
        assert!(matches!(
            route("/v2/a/b-c/d.e/manifests/latest"),
            Ok(Route::Manifest(n, Reference::Tag(t))) if n == name && t == "latest"
        ));
        assert!(matches!(
            route(&format!("/v2/x/manifests/{D}")),
            Ok(Route::Manifest(_, Reference::Digest(_)))
        ));
        assert!(matches!(
            route(&format!("/v2/x/blobs/{D}")),
            Ok(Route::Blob(..))
        ));
        assert!(matches!(
            route(&format!("/v2/x/blobs/{}", D.replace(':', "%3A"))),
            Ok(Route::Blob(..))
        ));
        assert!(matches!(
            route("/v2/x/blobs/uploads/"),
            Ok(Route::UploadStart(_))
        ));
        assert!(matches!(
            route("/v2/x/blobs/uploads/0f3c-aa_1"),
            Ok(Route::Upload(..))
        ));
        assert!(matches!(
            route(&format!("/v2/x/referrers/{D}")),
            Ok(Route::Referrers(..))
        ));
        // A repository whose name contains endpoint words still routes by its tail.
        assert!(matches!(
            route(&format!("/v2/blobs/uploads/blobs/{D}")),
            Ok(Route::Blob(n, _)) if n.as_str() == "blobs/uploads"
        ));
    }

    #[test]
    fn normalize_decodes_only_3a_and_borrows_otherwise() {
        assert!(matches!(
            normalize("/v2/a/b/manifests/latest"),
            Ok(Cow::Borrowed("/v2/a/b/manifests/latest"))
        ));
        assert_eq!(
            normalize("/v2/x/blobs/sha256%3Aab%3acd").expect("decoded"),
            "/v2/x/blobs/sha256:ab:cd"
        );
        assert_eq!(normalize("/v2/x/").expect("trailing slash"), "/v2/x/");
        assert_eq!(normalize("/").expect("root"), "/");
        for p in ["/v2/x%3", "/v2/x%", "/v2/x//", "/v2/.", "/v2/x/..", "//"] {
            assert!(
                matches!(normalize(p), Err(RouteError::BadPath(_))),
                "{p:?} should be refused"
            );
        }
        // Routing by the tail segments, names with slashes of their own.
        assert!(matches!(
            route("/v2/a/b/c/blobs/uploads/u-1"),
            Ok(Route::Upload(n, u)) if n.as_str() == "a/b/c" && u.as_str() == "u-1"
        ));
        assert!(matches!(
            route("/v2/a/b/tags/list"),
            Ok(Route::Tags(n)) if n.as_str() == "a/b"
        ));
        for p in [
            "/v2/a/tags/other",
            "/v2/a/blobs/nodigest",
            "/v2/blobs/uploads/x",
            "/v2/a/uploads/x",
            "/v2/manifests/x",
            "/v2/a",
        ] {
            assert_eq!(route(p), Err(RouteError::UnknownEndpoint), "{p}");
        }
    }

    #[test]
    fn refuses_tricks() {
        for p in [
            "/v2/../etc/passwd",
            "/v2/a/./b/tags/list",
            "/v2//a/tags/list",
            "/v2/a%2fb/tags/list",
            "/v2/a%2Fb/tags/list",
            "/v2/%2e%2e/x",
            "/v2/a;x=1/tags/list",
            "/v2/a\\b/tags/list",
            "/v2/a\u{0}/tags/list",
            "v2/",
            "/v2/a/b/../../c/tags/list",
        ] {
            assert!(
                matches!(normalize(p), Err(RouteError::BadPath(_))),
                "{p:?} should be refused"
            );
        }
        assert_eq!(route("/V2/"), Err(RouteError::NotRegistry));
        assert_eq!(route("/"), Err(RouteError::NotRegistry));
        assert_eq!(route("/v2x"), Err(RouteError::NotRegistry));
        assert_eq!(route("/v2/x/nothing"), Err(RouteError::UnknownEndpoint));
        assert!(matches!(
            route("/v2/A/tags/list"),
            Err(RouteError::NameInvalid(_))
        ));
        assert!(matches!(
            route("/v2/a/manifests/-bad"),
            Err(RouteError::ReferenceInvalid(_))
        ));
        assert!(matches!(
            route("/v2/a/blobs/sha256:abc"),
            Err(RouteError::DigestInvalid(_))
        ));
    }

    #[test]
    fn names() {
        for ok in [
            "a",
            "a0",
            "a.b",
            "a_b",
            "a__b",
            "a---b",
            "a/b/c",
            "library/ubuntu",
        ] {
            assert!(RepoName::parse(ok).is_ok(), "{ok}");
        }
        for bad in [
            "", "A", "a.", ".a", "a..b", "a___b", "a/", "/a", "a//b", "a-", "a._b",
        ] {
            assert!(RepoName::parse(bad).is_err(), "{bad}");
        }
        assert!(RepoName::parse(&"a".repeat(256)).is_err());
    }

    #[test]
    fn tags_and_digests() {
        assert!(Reference::parse("_x.Y-1").is_ok());
        assert!(Reference::parse(&"a".repeat(128)).is_ok());
        assert!(Reference::parse(&"a".repeat(129)).is_err());
        assert!(Reference::parse(".x").is_err());
        assert!(Digest::parse(D).is_ok());
        assert!(Digest::parse(&D.to_uppercase()).is_err());
        assert!(Digest::parse("sha256:").is_err());
        assert!(Digest::parse(":abc").is_err());
        assert!(
            Digest::parse("multihash+base58:QmRZxt2b1FVZPNqd8hsiykDL3TdBDeTSPX9Kv46HmX4Gx8")
                .is_ok()
        );
        let d = Digest::parse(D).expect("digest");
        assert_eq!(d.algorithm(), "sha256");
        assert_eq!(d.encoded().len(), 64);
    }
}
