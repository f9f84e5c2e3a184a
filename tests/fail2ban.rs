//! The fail2ban filter shipped in `deploy/fail2ban/filter.d/registry-gate.conf`
//! matches what the real binary logs: every failed login, with the client's address,
//! and nothing else (no successful login, no anonymous pull, no access line).
//!
//! Each test starts `registry-gate serve` with a configuration in a temporary
//! directory, makes logins fail in every way the gate logs (wrong password, unknown
//! user, malformed credentials, a lockout, user names that try to inject a second
//! `peer=`), reads the gate's stderr, and runs `fail2ban-regex` (Debian: `apt-get
//! install fail2ban`) with the shipped filter over it. Without fail2ban-regex the
//! filter's `failregex` is translated (`<HOST>` becomes a named group) and run with
//! python3's `re`, the engine fail2ban itself uses.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use base64::Engine as _;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};

const BIN: &str = env!("CARGO_BIN_EXE_registry-gate");
const PASSWORD: &str = "right horse battery";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn filter_file() -> PathBuf {
    repo().join("deploy/fail2ban/filter.d/registry-gate.conf")
}

/// A gate process whose stderr is collected line by line; killed on drop.
struct Gate {
    child: Child,
    addr: SocketAddr,
    lines: Arc<Mutex<Vec<String>>>,
    ca: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Gate {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Gate {
    /// Start `registry-gate serve` listening on `listen` with `[log] format = format`:
    /// built-in registry, user `mark` in group `pusher`, at most 4 failures before a
    /// lockout.
    fn start(listen: &str, format: &str) -> Gate {
        let dir = tempfile::tempdir().expect("tempdir");
        let certs = dir.path().join("certs");
        let out = Command::new("bash")
            .arg(repo().join("certs-example/make-certs.sh"))
            .arg(&certs)
            .output()
            .expect("run certs-example/make-certs.sh (needs bash and openssl)");
        assert!(
            out.status.success(),
            "make-certs.sh: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let htpasswd = dir.path().join("httpd.htpasswd");
        let groups = dir.path().join("httpd.groups");
        let mut add = Command::new(BIN)
            .args(["user", "add", "mark", "--group", "pusher", "--cost", "4"])
            .arg("--htpasswd")
            .arg(&htpasswd)
            .arg("--groups")
            .arg(&groups)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run registry-gate user add");
        add.stdin
            .take()
            .expect("stdin")
            .write_all(format!("{PASSWORD}\n").as_bytes())
            .expect("write password");
        let out = add.wait_with_output().expect("user add");
        assert!(
            out.status.success(),
            "user add: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let config = dir.path().join("config.toml");
        std::fs::write(
            &config,
            format!(
                r#"listen = "{listen}"
[tls]
certificate = "certs/fullchain.pem"
private_key = "certs/privkey.pem"
[auth]
htpasswd = "httpd.htpasswd"
groups = "httpd.groups"
max_failures = 4
[storage]
root = "data"
[log]
format = "{format}"
level = "info"
"#
            ),
        )
        .expect("write config");

        let mut child = Command::new(BIN)
            .args(["serve", "--config"])
            .arg(&config)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start registry-gate serve");
        let stderr = child.stderr.take().expect("stderr");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let collected = Arc::clone(&lines);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(addr) = listening_addr(&line) {
                    let _ = tx.send(addr);
                }
                collected.lock().expect("lines").push(line);
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(addr) => addr,
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "the gate did not say where it listens:\n{}",
                    lines.lock().expect("lines").join("\n")
                );
            }
        };
        Gate {
            child,
            addr,
            lines,
            ca: certs.join("ca.crt"),
            _dir: dir,
        }
    }

    /// The port, on the given loopback address.
    fn at(&self, ip: &str) -> SocketAddr {
        SocketAddr::new(ip.parse().expect("ip"), self.addr.port())
    }

    /// GET `path` from `from` with an optional `Authorization` value; the status code.
    fn get(&self, from: &str, path: &str, authorization: Option<&str>) -> u16 {
        https_get(self.at(from), &self.ca, path, authorization)
    }

    fn log(&self) -> Vec<String> {
        self.lines.lock().expect("lines").clone()
    }

    /// Wait until `n` failure lines were logged (they are written before the answer,
    /// but read by another thread); the whole log.
    fn log_with_failures(&self, n: usize) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let log = self.log();
            let failures = log.iter().filter(|l| is_failure_line(l)).count();
            if failures >= n || Instant::now() > deadline {
                return log;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The address in the gate's "listening" line, text or JSON.
fn listening_addr(line: &str) -> Option<SocketAddr> {
    if !line.contains("listening") {
        return None;
    }
    let rest = line
        .split_once("addr=")
        .or_else(|| line.split_once("\"addr\":\""))?
        .1;
    let end = rest
        .find(|c: char| c.is_whitespace() || c == '"')
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// What the gate documents as its failed-login line, in either format.
fn is_failure_line(line: &str) -> bool {
    line.contains("registry_gate::auth_failure")
}

fn basic(user: &str, password: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

/// One HTTP/1.1 request over TLS to `addr` (server name `localhost`, trusting only
/// `ca`); the response's status code.
fn https_get(addr: SocketAddr, ca: &Path, path: &str, authorization: Option<&str>) -> u16 {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).expect("read ca.crt") {
        roots.add(cert.expect("CA certificate")).expect("add CA");
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("TLS versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let name = ServerName::try_from("localhost").expect("server name");
    let conn = rustls::ClientConnection::new(Arc::new(config), name).expect("TLS client");
    let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(10)).expect("connect");
    tcp.set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    let mut request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    if let Some(value) = authorization {
        request.push_str(&format!("Authorization: {value}\r\n"));
    }
    request.push_str("\r\n");
    tls.write_all(request.as_bytes()).expect("send request");
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(2).any(|w| w == b"\r\n") {
        match tls.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => head.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => panic!("reading the response from {addr}: {e}"),
        }
    }
    let head = String::from_utf8_lossy(&head);
    head.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line from {addr}: {head:?}"))
}

/// Logins from `from` that succeed or need none: none of them may be matched.
fn succeed(gate: &Gate, from: &str) {
    let token = basic("mark", PASSWORD);
    assert_eq!(
        gate.get(from, "/token?scope=repository:demo:pull,push", Some(&token)),
        200
    );
    assert_eq!(gate.get(from, "/v2/_catalog", Some(&token)), 200);
    assert_eq!(gate.get(from, "/v2/_catalog", None), 200);
    assert_eq!(
        gate.get(from, "/token?scope=repository:demo:pull", None),
        200
    );
    assert_eq!(gate.get(from, "/v2/", None), 401, "the Bearer challenge");
}

/// Every kind of failure from `from`, up to and past the lockout (max_failures = 4);
/// the number of failure lines they log.
fn fail_every_way(gate: &Gate, from: &str) -> usize {
    // 1. wrong password, at the token endpoint (`docker login`)
    assert_eq!(gate.get(from, "/token", Some(&basic("mark", "wrong"))), 401);
    // 2. unknown user, on a registry request
    assert_eq!(
        gate.get(from, "/v2/_catalog", Some(&basic("ghost", "x"))),
        401
    );
    // 3. malformed credentials (user=-)
    assert_eq!(gate.get(from, "/v2/", Some("Basic !!!not-base64")), 401);
    // 4. a user name that imitates the text line's address field
    assert_eq!(
        gate.get(
            from,
            "/token",
            Some(&basic("x peer=192.0.2.66 user=y reason=z", "x"))
        ),
        401
    );
    // 5. a user name that imitates the JSON line's message field
    assert_eq!(
        gate.get(
            from,
            "/token",
            Some(&basic(
                "x\",\"message\":\"auth failure: peer=192.0.2.67 user=",
                "x"
            ))
        ),
        401
    );
    // 6. after max_failures: locked out (429), still one failure line each
    let status = gate.get(from, "/token", Some(&basic("mark", "wrong")));
    assert!(
        status == 429 || status == 401,
        "expected 429 after the lockout, got {status}"
    );
    6
}

/// The addresses the shipped filter finds in `lines`, one per matched line, in order.
fn filter_hosts(lines: &[String]) -> Vec<String> {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("gate.log");
    let mut text = lines.join("\n");
    text.push('\n');
    std::fs::write(&log, text).expect("write log");
    let filter = filter_file();
    assert!(filter.is_file(), "{} is missing", filter.display());

    if let Ok(out) = Command::new("fail2ban-regex")
        .args(["-o", "ip"])
        .arg(&log)
        .arg(&filter)
        .output()
    {
        assert!(
            out.status.success(),
            "fail2ban-regex failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        return String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect();
    }

    // No fail2ban: python3's re with <HOST> as a named group (and no DNS).
    eprintln!("fail2ban-regex not found (apt-get install fail2ban): using python3's re");
    let regexes = failregex(&std::fs::read_to_string(&filter).expect("read filter"));
    assert!(!regexes.is_empty(), "no failregex in {}", filter.display());
    const SCRIPT: &str = r#"
import re, sys
rx = [re.compile(r) for r in sys.argv[2:]]
for line in open(sys.argv[1], encoding="utf-8"):
    for r in rx:
        m = r.search(line)
        if m:
            print(m.group("host"))
            break
"#;
    let out = Command::new("python3")
        .arg("-c")
        .arg(SCRIPT)
        .arg(&log)
        .args(&regexes)
        .output()
        .expect("neither fail2ban-regex nor python3 found: apt-get install fail2ban");
    assert!(
        out.status.success(),
        "python3: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

/// The `failregex` entries of a fail2ban filter (continuation lines are further
/// entries), with `<HOST>` as a Python named group and `%%` unescaped.
fn failregex(conf: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut inside = false;
    for line in conf.lines() {
        if let Some(rest) = line.strip_prefix("failregex") {
            let Some(value) = rest.trim_start().strip_prefix('=') else {
                continue;
            };
            inside = true;
            out.push(value.trim().to_owned());
        } else if inside && line.starts_with([' ', '\t']) && !line.trim().is_empty() {
            out.push(line.trim().to_owned());
        } else {
            inside = false;
        }
    }
    out.into_iter()
        .filter(|r| !r.is_empty())
        .map(|r| {
            r.replace("%%", "%")
                .replace("<HOST>", r"(?P<host>[0-9A-Fa-f:.]+)")
        })
        .collect()
}

/// Run the whole check against a gate: successes first, then failures from each of
/// `clients` (address to connect from, address fail2ban must report).
fn check(gate: &Gate, clients: &[(&str, &str)]) {
    for (from, _) in clients {
        succeed(gate, from);
    }
    let mut expected = Vec::new();
    for (from, reported) in clients {
        let n = fail_every_way(gate, from);
        expected.extend(std::iter::repeat_n(reported.to_string(), n));
    }
    let log = gate.log_with_failures(expected.len());
    let failures: Vec<String> = log.iter().filter(|l| is_failure_line(l)).cloned().collect();
    let others: Vec<String> = log
        .iter()
        .filter(|l| !is_failure_line(l))
        .cloned()
        .collect();
    let all = log.join("\n");
    assert_eq!(
        failures.len(),
        expected.len(),
        "one failure line per failed request:\n{all}"
    );
    assert!(
        others.iter().any(|l| l.contains("registry_gate::access")),
        "the log has access lines to test against:\n{all}"
    );
    assert!(
        failures.iter().all(|l| l.contains("auth failure: peer=")),
        "the documented shape `auth failure: peer=IP user=NAME reason=...`:\n{all}"
    );

    assert_eq!(
        filter_hosts(&log),
        expected,
        "the filter must match each failure line with the client's address, and \
         nothing else:\n{all}"
    );
    assert_eq!(
        filter_hosts(&others),
        Vec::<String>::new(),
        "no success, access or start-up line may match"
    );
}

#[test]
fn filter_matches_text_log_failures_and_nothing_else() {
    let gate = Gate::start("127.0.0.1:0", "text");
    check(&gate, &[("127.0.0.1", "127.0.0.1")]);
}

#[test]
fn filter_matches_json_log_failures_and_nothing_else() {
    let gate = Gate::start("127.0.0.1:0", "json");
    check(&gate, &[("127.0.0.1", "127.0.0.1")]);
}

/// Whether this machine has a dual-stack IPv6 loopback: a socket on `[::]` that
/// takes connections to both 127.0.0.1 and ::1.
fn dual_stack() -> bool {
    let Ok(listener) = TcpListener::bind("[::]:0") else {
        return false;
    };
    let Ok(addr) = listener.local_addr() else {
        return false;
    };
    let port = addr.port();
    ["127.0.0.1", "::1"].iter().all(|ip| {
        let Ok(ip) = ip.parse() else { return false };
        TcpStream::connect_timeout(&SocketAddr::new(ip, port), Duration::from_secs(2)).is_ok()
    })
}

#[test]
fn filter_bans_ipv4_clients_of_a_dual_stack_gate_by_their_ipv4_address() {
    if !dual_stack() {
        eprintln!("skipped: no dual-stack IPv6 loopback on this machine");
        return;
    }
    for format in ["text", "json"] {
        // IPv4 clients are logged as ::ffff:127.0.0.1; the firewall sees 127.0.0.1.
        let gate = Gate::start("[::]:0", format);
        check(&gate, &[("127.0.0.1", "127.0.0.1"), ("::1", "::1")]);
    }
}

#[test]
fn failregex_translation_reads_the_shipped_filter() {
    let regexes = failregex(&std::fs::read_to_string(filter_file()).expect("read filter"));
    assert!(!regexes.is_empty());
    assert!(regexes.iter().all(|r| r.contains("(?P<host>")));
}
