//! Hostile requests over raw TLS against the gate fronting a real CNCF registry:
//! methods the registry API does not use, in any letter case and with any
//! credentials; request-smuggling framings; abused `Authorization` headers; oversized
//! request lines, headers and announced bodies. Each gets a clean 4xx (OCI JSON when
//! the gate wrote it) or a closed connection, nothing of it reaches the upstream, and
//! the gate goes on serving everybody else.
//!
//! At the HTTP/2 frame level: a rapid-reset flood (CVE-2023-44487) is cut off.
//!
//! (`proxy.rs` covers path tricks, absolute-form targets, forwarding headers and a
//! first list of methods; `tokens.rs` forged and expired tokens.)

mod common;

use std::time::{Duration, Instant};

use base64::Engine as _;

use common::client::{Client, empty};
use common::image::{UploadMode, pull_and_verify, push_image};
use common::wire::{Exchange, exchange, host_header};
use common::{PUSHER, Stack, pseudo_random_bytes};

/// How long an exchange waits for more bytes before it calls the connection open.
const QUIET: Duration = Duration::from_secs(3);

/// The methods of the registry API, exactly as spelled.
const ALLOWED: [&str; 6] = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"];

fn basic(user: &[u8], password: &[u8]) -> String {
    let mut raw = user.to_vec();
    raw.push(b':');
    raw.extend_from_slice(password);
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(raw)
    )
}

/// A push token for `repo` from the gate's token endpoint.
async fn push_token(stack: &Stack, repo: &str) -> String {
    let resp = stack
        .pusher()
        .get(&format!(
            "/token?service={}&scope=repository:{repo}:pull,push",
            stack.gate.authority()
        ))
        .await;
    assert_eq!(resp.status, 200, "token request: {}", resp.text());
    resp.json()["token"].as_str().expect("token").to_owned()
}

/// The one response of an exchange the gate refused: a 4xx in OCI JSON with the
/// API-version header (also when hyper's parser refused the request) or no response
/// at all; with `must_close`, the connection is closed too. `Err` says what is wrong.
fn check_refused(what: &str, answer: &Exchange, must_close: bool) -> Result<Option<u16>, String> {
    let responses = answer.responses();
    if responses.len() > 1 {
        return Err(format!(
            "{what}: {} responses, so a second request was read out of the first one's \
             bytes:\n{}",
            responses.len(),
            answer.text()
        ));
    }
    if must_close && !answer.closed {
        return Err(format!(
            "{what}: the connection stayed open after a refusal of ambiguous framing \
             (the rest of the bytes could be read as a request):\n{}",
            answer.text()
        ));
    }
    let Some(response) = responses.into_iter().next() else {
        return Ok(None);
    };
    if !(400..500).contains(&response.status) {
        return Err(format!(
            "{what}: expected a 4xx or a closed connection, got {}:\n{}",
            response.status,
            answer.text()
        ));
    }
    // (An answer to HEAD announces a length but has no body.)
    let head_answer = response.body.is_empty()
        && response
            .header_values("content-length")
            .first()
            .is_some_and(|l| *l != "0");
    // Every refusal is the gate's OCI answer, including those to requests hyper could
    // not parse (io::OciParseErrors rewrites hyper's bare ones).
    if response
        .header_values("docker-distribution-api-version")
        .is_empty()
    {
        return Err(format!(
            "{what}: the refusal lacks Docker-Distribution-Api-Version:\n{}",
            answer.text()
        ));
    }
    if !head_answer {
        let json: Option<serde_json::Value> = serde_json::from_slice(&response.body).ok();
        if !json.is_some_and(|j| j["errors"][0]["code"].is_string()) {
            return Err(format!(
                "{what}: the refusal is not OCI error JSON:\n{}",
                answer.text()
            ));
        }
    }
    Ok(Some(response.status))
}

fn assert_refused(what: &str, answer: &Exchange, must_close: bool) -> Option<u16> {
    check_refused(what, answer, must_close).unwrap_or_else(|e| panic!("{e}"))
}

/// Run every exchange; fail listing every one that was not refused as it must be.
async fn assert_all_refused(client: &Client, cases: &[(String, Vec<u8>)], must_close: bool) {
    let mut outcomes = Vec::new();
    let mut failures = Vec::new();
    for (what, bytes) in cases {
        let answer = exchange(client, bytes, QUIET).await;
        match check_refused(what, &answer, must_close) {
            Ok(status) => outcomes.push(format!(
                "{what}: {}",
                status.map_or("closed without an answer".to_owned(), |s| s.to_string())
            )),
            Err(e) => failures.push(e),
        }
    }
    println!("{}", outcomes.join("\n"));
    assert!(
        failures.is_empty(),
        "{} of {} not refused cleanly:\n\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n\n")
    );
}

/// The gate still answers a plain request: nothing above wedged it.
async fn assert_still_serving(stack: &Stack, what: &str) {
    let resp = stack.client().get("/v2/still-serving/tags/list").await;
    assert_eq!(
        resp.status,
        404,
        "after {what}, a plain request must still reach the registry: {}",
        resp.text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_other_method_in_any_case_and_with_any_credentials_is_a_405() {
    let stack = Stack::start().await;
    let client = stack.client();
    let token = push_token(&stack, "probe-verb/app").await;
    let auths = [
        ("anonymous", String::new()),
        (
            "pusher Basic",
            format!(
                "Authorization: {}\r\n",
                basic(PUSHER.0.as_bytes(), PUSHER.1.as_bytes())
            ),
        ),
        ("pusher token", format!("Authorization: Bearer {token}\r\n")),
    ];
    // WebDAV, proxying, caching, debugging, made up, and the six in other cases.
    let methods = [
        "OPTIONS",
        "TRACE",
        "TRACK",
        "CONNECT",
        "PROPFIND",
        "PROPPATCH",
        "MKCOL",
        "COPY",
        "MOVE",
        "LOCK",
        "UNLOCK",
        "PURGE",
        "BAN",
        "LINK",
        "UNLINK",
        "SEARCH",
        "REPORT",
        "MERGE",
        "CHECKOUT",
        "MKACTIVITY",
        "M-SEARCH",
        "NOTIFY",
        "SUBSCRIBE",
        "QUERY",
        "DEBUG",
        "BREW",
        "X-HTTP-METHOD-OVERRIDE",
        "GETS",
        "POSTX",
        "get",
        "head",
        "post",
        "put",
        "patch",
        "delete",
    ];
    let mut sent = 0;
    for method in methods {
        let lower = method.to_ascii_lowercase();
        let title = format!("{}{}", &method[..1].to_ascii_uppercase(), &lower[1..]);
        let alternating: String = method
            .chars()
            .enumerate()
            .map(|(i, c)| {
                if i % 2 == 0 {
                    c.to_ascii_uppercase()
                } else {
                    c.to_ascii_lowercase()
                }
            })
            .collect();
        // Upper, lower, title and alternating case, except the six spelled right.
        let mut cases = vec![
            method.to_ascii_uppercase(),
            lower.clone(),
            title,
            alternating,
        ];
        cases.retain(|c| !ALLOWED.contains(&c.as_str()));
        cases.sort();
        cases.dedup();
        for case in cases {
            for (who, auth) in &auths {
                for with_body in [false, true] {
                    // Without a body the client asks to close (so the exchange need not
                    // wait); with one, closing is the gate's job.
                    let (body, close) = if with_body {
                        ("{\"x\":1}", "")
                    } else {
                        ("", "Connection: close\r\n")
                    };
                    let request = format!(
                        "{case} /v2/probe-verb/app/manifests/latest HTTP/1.1\r\n{}{auth}\
                         {close}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                        host_header(&client),
                        body.len()
                    );
                    let what = format!("{case} as {who} (body: {with_body})");
                    let answer = exchange(&client, request.as_bytes(), QUIET).await;
                    sent += 1;
                    let responses = answer.responses();
                    assert_eq!(responses.len(), 1, "{what}:\n{}", answer.text());
                    let response = &responses[0];
                    assert_eq!(response.status, 405, "{what}:\n{}", answer.text());
                    assert_eq!(
                        response.json()["errors"][0]["code"],
                        "UNSUPPORTED",
                        "{what}"
                    );
                    assert_eq!(
                        response.header_values("allow"),
                        ["GET, HEAD, POST, PUT, PATCH, DELETE"],
                        "{what}"
                    );
                    assert_eq!(
                        response.header_values("docker-distribution-api-version"),
                        ["registry/2.0"],
                        "{what}"
                    );
                    if with_body {
                        assert!(
                            answer.closed,
                            "{what}: a refusal whose body was not read must close the \
                             connection:\n{}",
                            answer.text()
                        );
                    }
                }
            }
        }
    }
    println!("{sent} requests with other methods, all 405");
    stack.assert_never_reached_upstream("probe-verb").await;
    let log = stack.upstream.access_log();
    for method in methods {
        assert!(
            !log.contains(&format!("\"{method} ")),
            "a {method} request reached the registry:\n{log}"
        );
    }
    stack.gate.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smuggling_framings_are_refused_and_never_reach_the_upstream() {
    let stack = Stack::start().await;
    let client = stack.client();
    let host = host_header(&client);
    // The request each framing tries to hide: an anonymous write, which the gate must
    // never let through to the registry (which has no authentication of its own).
    let hidden = |i: usize| {
        format!(
            "PUT /v2/probe-smuggle-{i}-hidden/manifests/latest HTTP/1.1\r\n{host}\
             Content-Type: application/vnd.oci.image.manifest.v1+json\r\nContent-Length: 2\r\n\r\n{{}}"
        )
    };
    // The visible request: an anonymous read, which the gate would forward.
    let front = |i: usize, headers: &str, body: &str| {
        format!("GET /v2/probe-smuggle-{i}/tags/list HTTP/1.1\r\n{host}{headers}\r\n{body}")
            .into_bytes()
    };
    let mut shapes: Vec<(String, Vec<u8>)> = Vec::new();
    let mut i = 0;
    let mut next = || {
        i += 1;
        i
    };
    let n = next();
    let h = hidden(n);
    shapes.push((
        "Content-Length and Transfer-Encoding".to_owned(),
        front(
            n,
            &format!(
                "Content-Length: {}\r\nTransfer-Encoding: chunked\r\n",
                h.len() + 5
            ),
            &format!("0\r\n\r\n{h}"),
        ),
    ));
    let n = next();
    let h = hidden(n);
    shapes.push((
        "Transfer-Encoding then Content-Length".to_owned(),
        front(
            n,
            &format!(
                "Transfer-Encoding: chunked\r\nContent-Length: {}\r\n",
                h.len() + 5
            ),
            &format!("0\r\n\r\n{h}"),
        ),
    ));
    let n = next();
    let h = hidden(n);
    shapes.push((
        "two different Content-Lengths".to_owned(),
        front(
            n,
            &format!("Content-Length: 0\r\nContent-Length: {}\r\n", h.len()),
            &h,
        ),
    ));
    let n = next();
    let h = hidden(n);
    shapes.push((
        "two equal Content-Lengths".to_owned(),
        front(
            n,
            &format!("Content-Length: {0}\r\nContent-Length: {0}\r\n", h.len()),
            &h,
        ),
    ));
    let n = next();
    let h = hidden(n);
    shapes.push((
        "a comma-listed Content-Length".to_owned(),
        front(n, &format!("Content-Length: {0}, {0}\r\n", h.len()), &h),
    ));
    let n = next();
    let h = hidden(n);
    shapes.push((
        "a comma-listed Content-Length with different values".to_owned(),
        front(n, &format!("Content-Length: 0, {}\r\n", h.len()), &h),
    ));
    let n = next();
    let h = hidden(n);
    shapes.push((
        "a signed Content-Length".to_owned(),
        front(n, &format!("Content-Length: +{}\r\n", h.len()), &h),
    ));
    for (what, te) in [
        (
            "Transfer-Encoding: xchunked",
            "Transfer-Encoding: xchunked\r\n",
        ),
        (
            "Transfer-Encoding:  chunked",
            "Transfer-Encoding:  chunked\r\n",
        ),
        (
            "Transfer-Encoding:<tab>chunked",
            "Transfer-Encoding:\tchunked\r\n",
        ),
        (
            "Transfer-Encoding : chunked",
            "Transfer-Encoding : chunked\r\n",
        ),
        (
            "Transfer-Encoding: chunked, identity",
            "Transfer-Encoding: chunked, identity\r\n",
        ),
        (
            "Transfer-Encoding: identity",
            "Transfer-Encoding: identity\r\n",
        ),
        (
            "two Transfer-Encodings",
            "Transfer-Encoding: chunked\r\nTransfer-Encoding: x\r\n",
        ),
        (
            "Transfer-Encoding: CHUNKED",
            "Transfer-Encoding: CHUNKED\r\n",
        ),
        (
            " Transfer-Encoding (folded)",
            "X-A: b\r\n Transfer-Encoding: chunked\r\n",
        ),
    ] {
        // With a Content-Length that covers the hidden request: whichever header a
        // parser believes, one of them hides it.
        let n = next();
        let h = hidden(n);
        shapes.push((
            what.to_owned(),
            front(
                n,
                &format!("{te}Content-Length: {}\r\n", h.len() + 5),
                &format!("0\r\n\r\n{h}"),
            ),
        ));
        // And alone, with a chunked body that carries it.
        let n = next();
        let h = hidden(n);
        shapes.push((
            what.to_owned(),
            front(n, te, &format!("{:x}\r\n{h}\r\n0\r\n\r\n", h.len())),
        ));
    }
    for (what, size) in [
        ("a chunk size that is not hex", "zz".to_owned()),
        ("a negative chunk size", "-5".to_owned()),
        ("a chunk size with 0x", "0x5".to_owned()),
        ("an overflowing chunk size", "1ffffffffffffffff1".to_owned()),
        ("a chunk size with spaces inside", "1 0".to_owned()),
        ("an empty chunk size", String::new()),
    ] {
        let n = next();
        let h = hidden(n);
        shapes.push((
            what.to_owned(),
            front(
                n,
                "Transfer-Encoding: chunked\r\n",
                &format!("{size}\r\n{h}\r\n0\r\n\r\n"),
            ),
        ));
    }
    // Bare LF line endings, in the head and in the chunked framing.
    let n = next();
    let h = hidden(n);
    shapes.push((
        "bare LF line endings with a Content-Length body".to_owned(),
        format!(
            "GET /v2/probe-smuggle-{n}/tags/list HTTP/1.1\nHost: localhost:{}\nContent-Length: {}\n\n{h}",
            client.addr.port(),
            h.len()
        )
        .into_bytes(),
    ));
    let n = next();
    let h = hidden(n);
    shapes.push((
        "bare LF in the chunked framing".to_owned(),
        front(n, "Transfer-Encoding: chunked\r\n", &format!("0\n\n{h}")),
    ));
    let n = next();
    let h = hidden(n);
    shapes.push((
        "a bare CR in a header".to_owned(),
        front(n, &format!("X-A: b\rContent-Length: {}\r\n", h.len()), &h),
    ));
    // The plain one: a write hidden in an anonymous read's declared body.
    let n = next();
    let h = hidden(n);
    shapes.push((
        "a PUT hidden in an anonymous GET's body".to_owned(),
        front(n, &format!("Content-Length: {}\r\n", h.len()), &h),
    ));
    let n = next();
    let h = hidden(n);
    shapes.push((
        "a PUT hidden in an anonymous HEAD's body".to_owned(),
        format!(
            "HEAD /v2/probe-smuggle-{n}/tags/list HTTP/1.1\r\n{host}Content-Length: {}\r\n\r\n{h}",
            h.len()
        )
        .into_bytes(),
    ));
    // A write refused before its body is read, whose body is a second request.
    let n = next();
    let h = hidden(n);
    shapes.push((
        "a PUT hidden in a refused anonymous PATCH's body".to_owned(),
        format!(
            "PATCH /v2/probe-smuggle-{n}/blobs/uploads/x HTTP/1.1\r\n{host}Content-Length: {}\r\n\r\n{h}",
            h.len()
        )
        .into_bytes(),
    ));
    let n = next();
    let h = hidden(n);
    shapes.push((
        "a PUT hidden in the body of a request with a bad path".to_owned(),
        format!(
            "PUT /v2/probe-smuggle-{n}/../x/manifests/latest HTTP/1.1\r\n{host}Content-Length: {}\r\n\r\n{h}",
            h.len()
        )
        .into_bytes(),
    ));

    assert_all_refused(&client, &shapes, true).await;
    stack.assert_never_reached_upstream("probe-smuggle").await;
    assert_still_serving(&stack, "the smuggling attempts").await;
    stack.gate.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abused_authorization_headers_never_authenticate() {
    let stack = Stack::start().await;
    let client = stack.client();
    let host = host_header(&client);
    let (user, password) = (PUSHER.0.as_bytes(), PUSHER.1.as_bytes());
    let with = |suffix: &[u8]| {
        let mut p = password.to_vec();
        p.extend_from_slice(suffix);
        p
    };
    let token = push_token(&stack, "probe-auth/app").await;
    // Values sent through hyper (valid header bytes).
    let mut values: Vec<(String, String)> = vec![
        (
            "NUL and junk after the password".into(),
            basic(user, &with(b"\0junk")),
        ),
        ("NUL after the password".into(), basic(user, &with(b"\0"))),
        (
            "CR LF after the password".into(),
            basic(user, &with(b"\r\nX-Y: z")),
        ),
        ("a tab after the password".into(), basic(user, &with(b"\t"))),
        ("DEL after the password".into(), basic(user, &with(b"\x7f"))),
        ("NUL in the user name".into(), basic(b"mark\0", password)),
        (
            "NUL before the user name".into(),
            basic(b"\0mark", password),
        ),
        ("ESC in the user name".into(), basic(b"ma\x1brk", password)),
        ("non-UTF-8 user name".into(), basic(b"mark\xff", password)),
        ("empty user".into(), basic(b"", password)),
        ("empty password".into(), basic(user, b"")),
        ("the password as the user".into(), basic(password, b"x")),
        (
            "no colon".into(),
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode([user, password].concat())
            ),
        ),
        (
            "the password truncated".into(),
            basic(user, &password[..password.len() - 1]),
        ),
        (
            "a prefix of the password with a NUL".into(),
            basic(user, &[&password[..5], b"\0"].concat()),
        ),
        ("malformed base64".into(), "Basic bWFyazpt!!!".into()),
        (
            "base64 without padding".into(),
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD_NO_PAD.encode(b"mark:x")
            ),
        ),
        (
            "base64url alphabet".into(),
            format!(
                "Basic {}",
                base64::engine::general_purpose::URL_SAFE
                    .encode([user, b":" as &[u8], &with(b"\xfb\xff")].concat())
            ),
        ),
        (
            "two base64 values".into(),
            format!("{} {}", basic(user, password), "Zm9v"),
        ),
        ("Basic with nothing".into(), "Basic".into()),
        ("Basic with spaces".into(), "Basic    ".into()),
        (
            "an unknown scheme".into(),
            "Negotiate YIIBhgYGKwYBBQUCoIIBejCCAXag".into(),
        ),
        (
            "NTLM".into(),
            "NTLM TlRMTVNTUAABAAAAB4IIogAAAAAAAAAAAAAAAAAAAAAGAbEdAAAADw==".into(),
        ),
        (
            "Digest".into(),
            "Digest username=\"mark\", realm=\"x\", response=\"0\"".into(),
        ),
        (
            "AWS".into(),
            "AWS4-HMAC-SHA256 Credential=mark/x, Signature=00".into(),
        ),
        (
            "a scheme glued to the credentials".into(),
            format!("Basic{}", &basic(user, password)[6..]),
        ),
        (
            "the scheme only in lower case with a tab".into(),
            format!("basic\t{}", &basic(user, password)[6..]),
        ),
        (
            "a forged bearer".into(),
            "Bearer eyJpc3MiOiJyZWdpc3RyeS1nYXRlIn0.AAAA".into(),
        ),
        (
            "a bearer token with junk after it".into(),
            format!("Bearer {token} junk"),
        ),
        (
            "a bearer token with a NUL-free suffix".into(),
            format!("Bearer {token}A"),
        ),
        (
            "a bearer token cut short".into(),
            format!("Bearer {}", &token[..token.len() - 2]),
        ),
        (
            "a 64 KiB Basic value".into(),
            format!("Basic {}", "A".repeat(64 * 1024)),
        ),
        (
            "a 64 KiB unknown scheme".into(),
            format!("X{}", "y".repeat(64 * 1024)),
        ),
    ];
    // Several Authorization headers, each alone valid.
    values.sort_by(|a, b| a.0.cmp(&b.0));
    let good = basic(user, password);
    let mut outcomes = Vec::new();
    for (what, value) in &values {
        // A write (202 if it authenticated) and the version check (200 if it did).
        for (method, path) in [
            ("POST", "/v2/probe-auth/app/blobs/uploads/"),
            ("GET", "/v2/"),
        ] {
            let resp = client
                .try_request(method, path, &[("authorization", value)], empty())
                .await;
            let resp = match resp {
                Ok(r) => r,
                // hyper itself refused to send (it never does for valid values).
                Err(e) => panic!("{what}: {method} {path}: {e}"),
            };
            // (A value past the head's size limit is a 431 from the parser.)
            assert!(
                resp.status == 400 || resp.status == 401 || resp.status == 431,
                "{what}: {method} {path} got {} {}",
                resp.status,
                resp.text()
            );
            resp.assert_oci_error(resp.status.as_u16());
            outcomes.push(format!("{what}: {method} {}", resp.status));
        }
    }
    // Raw bytes hyper would not send: NUL, CR and 8-bit bytes in the header itself,
    // and several Authorization headers of which each alone is valid.
    let raw: Vec<(&str, Vec<u8>)> = vec![
        (
            "a raw NUL after the value",
            [good.as_bytes(), b"\0junk"].concat(),
        ),
        ("a raw NUL inside the base64", {
            let mut v = good.clone().into_bytes();
            v.insert(10, 0);
            v
        }),
        (
            "a raw bare CR inside the value",
            [good.as_bytes(), b"\rjunk"].concat(),
        ),
        (
            "8-bit bytes after the value",
            [good.as_bytes(), b"\xff\xfe"].concat(),
        ),
    ];
    let mut raw_requests: Vec<(String, Vec<u8>)> = raw
        .into_iter()
        .map(|(what, value)| {
            let mut request = format!(
                "POST /v2/probe-auth/app/blobs/uploads/ HTTP/1.1\r\n{host}Connection: close\r\nContent-Length: 0\r\nAuthorization: "
            )
            .into_bytes();
            request.extend_from_slice(&value);
            request.extend_from_slice(b"\r\n\r\n");
            (what.to_owned(), request)
        })
        .collect();
    for (what, headers) in [
        (
            "two good Authorization headers",
            format!("Authorization: {good}\r\nAuthorization: {good}\r\n"),
        ),
        (
            "a good one and Bearer",
            format!("Authorization: {good}\r\nAuthorization: Bearer {token}\r\n"),
        ),
        (
            "Bearer and a good one",
            format!("Authorization: Bearer {token}\r\nAuthorization: {good}\r\n"),
        ),
        (
            "a good one and an empty one",
            format!("Authorization: {good}\r\nAuthorization: \r\n"),
        ),
        (
            "an empty one and a good one",
            format!("Authorization:\r\nAuthorization: {good}\r\n"),
        ),
        (
            "a good one with a differently cased twin",
            format!("Authorization: {good}\r\nauthorization: Basic Og==\r\n"),
        ),
        (
            "Proxy-Authorization instead",
            format!("Proxy-Authorization: {good}\r\n"),
        ),
    ] {
        raw_requests.push((
            what.to_owned(),
            format!(
                "POST /v2/probe-auth/app/blobs/uploads/ HTTP/1.1\r\n{host}Connection: close\r\nContent-Length: 0\r\n{headers}\r\n"
            )
            .into_bytes(),
        ));
    }
    for (what, request) in &raw_requests {
        let answer = exchange(&client, request, QUIET).await;
        let status = assert_refused(what, &answer, false);
        outcomes.push(format!(
            "{what}: raw POST {}",
            status.map_or("closed".to_owned(), |s| s.to_string())
        ));
    }
    println!("{}", outcomes.join("\n"));
    // The real credentials still work: nothing above locked the pusher out.
    let post = stack
        .pusher()
        .request("POST", "/v2/probe-auth-ok/app/blobs/uploads/", &[], empty())
        .await;
    assert_eq!(post.status, 202, "{}", post.text());
    stack.assert_never_reached_upstream("probe-auth/app").await;
    stack.gate.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_request_lines_and_headers_are_refused() {
    let stack = Stack::start().await;
    let client = stack.client();
    let host = host_header(&client);
    let cases: Vec<(&str, Vec<u8>, &[u16])> = vec![
        (
            "a 100 KiB request target",
            format!(
                "GET /v2/probe-size/{}/tags/list HTTP/1.1\r\n{host}\r\n",
                "a".repeat(100 * 1024)
            )
            .into_bytes(),
            &[414, 431, 400],
        ),
        (
            "a 1 MiB request target",
            format!(
                "GET /v2/probe-size/{}/tags/list HTTP/1.1\r\n{host}\r\n",
                "a".repeat(1024 * 1024)
            )
            .into_bytes(),
            &[414, 431, 400],
        ),
        (
            "a 64 KiB query",
            format!(
                "GET /v2/probe-size/tags/list?n={} HTTP/1.1\r\n{host}\r\n",
                "9".repeat(64 * 1024)
            )
            .into_bytes(),
            &[414, 431, 400],
        ),
        (
            "200 headers",
            format!(
                "GET /v2/probe-size/tags/list HTTP/1.1\r\n{host}{}\r\n",
                (0..200)
                    .map(|i| format!("X-H{i}: v\r\n"))
                    .collect::<String>()
            )
            .into_bytes(),
            &[431, 400],
        ),
        (
            "a 1 MiB header",
            format!(
                "GET /v2/probe-size/tags/list HTTP/1.1\r\n{host}X-Big: {}\r\n\r\n",
                "b".repeat(1024 * 1024)
            )
            .into_bytes(),
            &[431, 400],
        ),
        (
            "4000 small headers of 100 bytes",
            format!(
                "GET /v2/probe-size/tags/list HTTP/1.1\r\n{host}{}\r\n",
                (0..4000)
                    .map(|i| format!("X-{i:04}: {}\r\n", "c".repeat(90)))
                    .collect::<String>()
            )
            .into_bytes(),
            &[431, 400],
        ),
        (
            "a 1 MiB method",
            format!(
                "{} /v2/probe-size/tags/list HTTP/1.1\r\n{host}\r\n",
                "G".repeat(1024 * 1024)
            )
            .into_bytes(),
            &[405, 431, 400, 414],
        ),
    ];
    for (what, request, allowed) in &cases {
        let started = Instant::now();
        let answer = exchange(&client, request, QUIET).await;
        let status = assert_refused(what, &answer, true);
        if let Some(status) = status {
            assert!(
                allowed.contains(&status),
                "{what}: {status}, expected one of {allowed:?}"
            );
        }
        println!(
            "{what}: {} in {:?}",
            status.map_or("closed".to_owned(), |s| s.to_string()),
            started.elapsed()
        );
    }
    stack.assert_never_reached_upstream("probe-size").await;
    assert_still_serving(&stack, "the oversized requests").await;
    stack.gate.stop().await;
}

/// Write only a request head announcing a 1 GiB body, never a body byte, and time the
/// answer and the close.
async fn announce_a_gigabyte(client: &Client, head: &str) -> (Exchange, Duration) {
    use tokio::io::AsyncWriteExt as _;
    let mut stream = client.try_connect(&[b"http/1.1"]).await.expect("connect");
    stream.write_all(head.as_bytes()).await.expect("write head");
    stream.flush().await.expect("flush");
    let started = Instant::now();
    // Generous: the point is that it comes at all without a body.
    let answer =
        common::wire::read_until_closed_or_quiet(&mut stream, Duration::from_secs(10)).await;
    (answer, started.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_write_announcing_a_gigabyte_is_answered_and_closed_without_its_body() {
    let stack = Stack::start().await;
    let client = stack.client();
    let host = host_header(&client);
    let gib = "Content-Length: 1073741824\r\nContent-Type: application/octet-stream\r\n";
    let viewer = basic(common::VIEWER.0.as_bytes(), common::VIEWER.1.as_bytes());
    let wrong = basic(PUSHER.0.as_bytes(), b"not-the-password");
    let digest = "sha256:0000000000000000000000000000000000000000000000000000000000000000";
    let cases = [
        (
            "an anonymous PUT",
            format!(
                "PUT /v2/probe-gib/blobs/uploads/x?digest={digest} HTTP/1.1\r\n{host}{gib}\r\n"
            ),
            401,
        ),
        (
            "an anonymous PATCH",
            format!("PATCH /v2/probe-gib/blobs/uploads/x HTTP/1.1\r\n{host}{gib}\r\n"),
            401,
        ),
        (
            "an anonymous POST",
            format!("POST /v2/probe-gib/blobs/uploads/ HTTP/1.1\r\n{host}{gib}\r\n"),
            401,
        ),
        (
            "a PUT with Expect: 100-continue",
            format!(
                "PUT /v2/probe-gib/blobs/uploads/x?digest={digest} HTTP/1.1\r\n{host}{gib}Expect: 100-continue\r\n\r\n"
            ),
            401,
        ),
        (
            "a viewer's PUT",
            format!(
                "PUT /v2/probe-gib/blobs/uploads/x?digest={digest} HTTP/1.1\r\n{host}{gib}Authorization: {viewer}\r\n\r\n"
            ),
            403,
        ),
        (
            "a PUT with a wrong password",
            format!(
                "PUT /v2/probe-gib/blobs/uploads/x?digest={digest} HTTP/1.1\r\n{host}{gib}Authorization: {wrong}\r\n\r\n"
            ),
            401,
        ),
        (
            "a PROPFIND",
            format!("PROPFIND /v2/probe-gib/manifests/x HTTP/1.1\r\n{host}{gib}\r\n"),
            405,
        ),
        (
            "a PUT to a bad path",
            format!("PUT /v2/probe-gib/%2e%2e/x/manifests/y HTTP/1.1\r\n{host}{gib}\r\n"),
            400,
        ),
        (
            "a PUT outside /v2",
            format!("PUT /probe-gib/upload HTTP/1.1\r\n{host}{gib}\r\n"),
            404,
        ),
        (
            "a PUT in absolute form",
            format!("PUT http://evil.example/v2/probe-gib/manifests/x HTTP/1.1\r\n{host}{gib}\r\n"),
            400,
        ),
        (
            "a chunked anonymous PUT",
            format!(
                "PUT /v2/probe-gib/manifests/x HTTP/1.1\r\n{host}Transfer-Encoding: chunked\r\nContent-Type: application/json\r\n\r\n"
            ),
            401,
        ),
    ];
    for (what, head, expected) in cases {
        let (answer, elapsed) = announce_a_gigabyte(&client, &head).await;
        let responses = answer.responses();
        assert_eq!(
            responses.len(),
            1,
            "{what}: the gate must answer without waiting for the body:\n{}",
            answer.text()
        );
        let response = &responses[0];
        // A bad path may be refused as not found or as invalid.
        let ok = response.status == expected
            || (expected == 400 && response.status == 404)
            || (expected == 404 && response.status == 400);
        assert!(
            ok,
            "{what}: {} instead of {expected}:\n{}",
            response.status,
            answer.text()
        );
        assert!(
            response.json()["errors"][0]["code"].is_string(),
            "{what}: OCI JSON"
        );
        assert!(
            answer.closed,
            "{what}: the connection stayed open after the refusal, waiting for a \
             gigabyte the gate will never read:\n{}",
            answer.text()
        );
        println!("{what}: {} and closed in {elapsed:?}", response.status);
        assert!(
            elapsed < Duration::from_secs(8),
            "{what}: answered and closed only after {elapsed:?}"
        );
    }
    stack.assert_never_reached_upstream("probe-gib").await;
    assert_still_serving(&stack, "the gigabyte announcements").await;
    stack.gate.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_all_that_a_push_and_pull_still_work() {
    // The hostile requests above each ran against their own gate; here they run
    // against one gate between a push and a pull, to show it keeps no state from them.
    let stack = Stack::start().await;
    let client = stack.client();
    let host = host_header(&client);
    let layers = vec![pseudo_random_bytes(3000, 71)];
    let before = push_image(
        &stack.pusher(),
        "hostile/app",
        "v1",
        &layers,
        UploadMode::Monolithic,
    )
    .await;
    let hostile: Vec<Vec<u8>> = vec![
        format!("get /v2/hostile/app/manifests/v1 HTTP/1.1\r\n{host}\r\n").into_bytes(),
        format!(
            "GET /v2/probe-after/tags/list HTTP/1.1\r\n{host}Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        )
        .into_bytes(),
        format!("GET /v2/probe-after/{} HTTP/1.1\r\n{host}\r\n", "x".repeat(200_000)).into_bytes(),
        format!("PUT /v2/hostile/app/manifests/v1 HTTP/1.1\r\n{host}Content-Length: 1073741824\r\n\r\n").into_bytes(),
        b"\x16\x03\x01garbage that is not HTTP\r\n\r\n".to_vec(),
        vec![0u8; 4096],
        b"GET\r\n\r\n".to_vec(),
        format!("GET /v2/ HTTP/9.9\r\n{host}\r\n").into_bytes(),
        format!("GET /v2/ HTTP/1.1\r\n{host}Authorization: {}\r\n\r\n", "A".repeat(70_000)).into_bytes(),
    ];
    for request in &hostile {
        let what = format!(
            "{:?}",
            String::from_utf8_lossy(&request[..request.len().min(60)])
        );
        let answer = exchange(&client, request, QUIET).await;
        // An HTTP version the gate does not speak may be a 505.
        if answer.statuses() != [505] {
            assert_refused(&what, &answer, false);
        }
    }
    pull_and_verify(&stack.client(), "hostile/app", "v1", &before).await;
    let after = push_image(
        &stack.pusher(),
        "hostile/app",
        "v2",
        &layers,
        UploadMode::Chunked(1000),
    )
    .await;
    pull_and_verify(&stack.client().http2(), "hostile/app", "v2", &after).await;
    stack.assert_never_reached_upstream("probe-after").await;
    stack.gate.stop().await;
}

/// HTTP/2 rapid reset (CVE-2023-44487): a client opens stream after stream and
/// cancels each at once, so no concurrency limit ever applies while every stream
/// costs the server a request. The gate (hyper's h2 limit on streams reset before
/// they were accepted) ends such a connection with GOAWAY ENHANCE_YOUR_CALM long
/// before the flood is over, few of the requests reach the upstream, and everyone
/// else is still served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_rapid_reset_flood_is_cut_off() {
    const STREAMS: usize = 20_000;
    let stack = Stack::start().await;
    let tls = stack
        .client()
        .try_connect(&[b"h2"])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut send, connection) = h2::client::handshake(tls).await.expect("h2 handshake");
    let connection = tokio::spawn(connection);
    let authority = stack.gate.authority();
    let mut sent = 0;
    for i in 0..STREAMS {
        send = match send.ready().await {
            Ok(s) => s,
            Err(_) => break,
        };
        let request = http::Request::get(format!(
            "https://{authority}/v2/rapid-reset/app/manifests/t{i}"
        ))
        .body(())
        .expect("request");
        match send.send_request(request, true) {
            // Dropping the response cancels the stream: RST_STREAM(CANCEL).
            Ok((response, _)) => drop(response),
            Err(_) => break,
        }
        sent += 1;
    }
    let ended = tokio::time::timeout(Duration::from_secs(30), connection)
        .await
        .expect("the gate must end a rapid-reset connection")
        .expect("connection task");
    let error = ended.expect_err("the connection must end with GOAWAY, not cleanly");
    // The GOAWAY itself, or the closed socket under a client still writing.
    assert!(
        error.reason() == Some(h2::Reason::ENHANCE_YOUR_CALM) || error.is_io(),
        "after {sent} streams: {error}"
    );
    assert!(
        sent < STREAMS,
        "all {STREAMS} streams were taken before the gate reacted"
    );
    let reached = stack
        .upstream
        .access_log()
        .matches("/v2/rapid-reset/")
        .count();
    assert!(
        reached < 1000,
        "{reached} of {sent} cancelled requests reached the upstream"
    );
    eprintln!("rapid reset: {sent} streams sent, {reached} reached the upstream");
    // Everybody else is still served, over HTTP/2 too.
    let resp = stack.pusher().http2().get("/v2/").await;
    assert_eq!(resp.status.as_u16(), 200, "{}", resp.text());
}
