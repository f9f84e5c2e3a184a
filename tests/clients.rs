//! The real-client matrix of issue 3: docker, podman, skopeo, containerd `ctr`
//! and oras, each against the gate fronting a real CNCF registry, each with its
//! credentials in files of the test (never the user's own).
//!
//! For every client, in this order:
//! 1. a wrong password is rejected (login, or for ctr and oras a push);
//! 2. the right password is accepted;
//! 3. the pusher pushes an image with a layer over 50 MiB;
//! 4. a valid user outside the push group is denied, with a clear message;
//! 5. a push with no credentials is denied;
//! 6. an anonymous pull with no stored credentials works;
//! 7. the pulled digests equal the pushed ones (and the gate's own answer).
//!
//! Every step is tried and reported; a test fails with the whole table, so one
//! run shows everything that is wrong with one client. Steps that depend on a
//! failed one are reported as not run. A daemon (dockerd, containerd) that does
//! not start fails the test with its log.

mod common;

use std::path::Path;

use common::containerd::{Containerd, hosts_dir};
use common::daemon::Run;
use common::docker::{CertsD, Docker, DockerArchive};
use common::image::{tar_layer, write_oci_layout};
use common::oras::Oras;
use common::podman::Podman;
use common::skopeo::Skopeo;
use common::{PUSHER, Stack, VIEWER, pseudo_random_bytes, sha256_digest};

/// The big layer's payload: over 50 MiB, and not a round number.
const BIG: usize = 50 * 1024 * 1024 + 4321;
const WRONG_PASSWORD: &str = "not-marks-password";

/// What a refused login or push must say, in some form (lower-cased match).
const DENIAL_WORDS: &[&str] = &[
    "denied",
    "invalid username/password",
    // oras-py, when the token endpoint refuses its credentials
    "cannot respond to request for authentication",
    "unauthorized",
    "authentication required",
    "insufficient_scope",
];

const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, \
     application/vnd.docker.distribution.manifest.v2+json, \
     application/vnd.oci.image.index.v1+json, \
     application/vnd.docker.distribution.manifest.list.v2+json";

// ---------------------------------------------------------------------------
// The report

enum Outcome {
    Pass(String),
    Fail(String),
    NotRun(String),
}

struct Matrix {
    client: &'static str,
    steps: Vec<(String, Outcome)>,
}

impl Matrix {
    fn new(client: &'static str) -> Matrix {
        Matrix {
            client,
            steps: Vec::new(),
        }
    }

    /// Record a step; true when it passed.
    fn record(&mut self, step: &str, result: Result<String, String>) -> bool {
        let passed = result.is_ok();
        let outcome = match result {
            Ok(note) => Outcome::Pass(note),
            Err(why) => Outcome::Fail(why),
        };
        eprintln!(
            "[{}] {step}: {}",
            self.client,
            if passed { "ok" } else { "FAILED" }
        );
        self.steps.push((step.to_owned(), outcome));
        passed
    }

    fn not_run(&mut self, step: &str, why: &str) {
        self.steps
            .push((step.to_owned(), Outcome::NotRun(why.to_owned())));
    }

    /// Print the table; fail the test with it when anything failed or did not run.
    fn finish(self) {
        let mut table = format!("client matrix for {}:\n", self.client);
        let mut bad = 0;
        for (step, outcome) in &self.steps {
            let (mark, text) = match outcome {
                Outcome::Pass(note) => ("pass   ", note.as_str()),
                Outcome::Fail(why) => {
                    bad += 1;
                    ("FAIL   ", why.as_str())
                }
                Outcome::NotRun(why) => {
                    bad += 1;
                    ("NOT RUN", why.as_str())
                }
            };
            table.push_str(&format!("  {mark} {step}"));
            if !text.is_empty() {
                table.push_str(&format!(
                    "\n            {}",
                    text.replace('\n', "\n            ")
                ));
            }
            table.push('\n');
        }
        eprintln!("{table}");
        assert!(
            bad == 0,
            "{bad} step(s) of the {} matrix failed\n{table}",
            self.client
        );
    }
}

const S1: &str = "1. wrong password rejected";
const S2: &str = "2. right password accepted";
const S3: &str = "3. pusher pushes (layer > 50 MiB)";
const S4: &str = "4. valid non-pusher's push denied";
const S5: &str = "5. push without credentials denied";
const S6: &str = "6. anonymous pull, no stored credentials";
const S7: &str = "7. pulled digests equal pushed digests";

// ---------------------------------------------------------------------------
// Checks shared by all clients

/// The command must have failed, saying why in words a user understands.
fn expect_denied(run: Run, extra: &str) -> Result<String, String> {
    if run.success() {
        return Err(format!(
            "it succeeded, but must be refused\n{}{extra}",
            run.describe()
        ));
    }
    let output = run.output();
    let lower = output.to_lowercase();
    match DENIAL_WORDS.iter().find(|w| lower.contains(*w)) {
        Some(word) => Ok(format!(
            "refused; message: {}",
            message_line(&output, word).unwrap_or_default()
        )),
        None => Err(format!(
            "it failed, but its message does not say it was refused\n{}{extra}",
            run.describe()
        )),
    }
}

/// The first output line mentioning `word` (case-insensitive), trimmed.
fn message_line(output: &str, word: &str) -> Option<String> {
    output
        .lines()
        .find(|l| l.to_lowercase().contains(word))
        .map(|l| l.trim().chars().take(300).collect())
}

/// The command must have succeeded.
fn expect_ok(run: Run, extra: &str) -> Result<String, String> {
    if run.success() {
        Ok(run.stdout)
    } else {
        Err(format!("{}{extra}", run.describe()))
    }
}

/// The digest of the manifest the gate serves, anonymously, for `repo:tag`;
/// `Ok(None)` when it answers 404.
async fn gate_manifest(stack: &Stack, repo: &str, tag: &str) -> Result<Option<String>, String> {
    let resp = stack
        .client()
        .try_request(
            "GET",
            &format!("/v2/{repo}/manifests/{tag}"),
            &[("accept", MANIFEST_ACCEPT)],
            common::client::empty(),
        )
        .await?;
    match resp.status.as_u16() {
        200 => {
            let digest = sha256_digest(&resp.body);
            if let Some(header) = resp.header("docker-content-digest")
                && header != digest
            {
                return Err(format!(
                    "the gate's Docker-Content-Digest {header} is not the manifest's digest {digest}"
                ));
            }
            Ok(Some(digest))
        }
        404 => Ok(None),
        other => Err(format!(
            "anonymous GET /v2/{repo}/manifests/{tag}: {other} {}",
            resp.text()
        )),
    }
}

/// After a refused push: the tag must not exist on the registry.
async fn assert_not_pushed(stack: &Stack, repo: &str, tag: &str) -> Result<(), String> {
    match gate_manifest(stack, repo, tag).await? {
        None => Ok(()),
        Some(digest) => Err(format!(
            "the client reported a refusal, but {repo}:{tag} is on the registry ({digest})"
        )),
    }
}

/// Combine a denial check with the check that nothing was stored.
async fn denied_and_absent(
    stack: &Stack,
    denial: Result<String, String>,
    repo: &str,
    tag: &str,
) -> Result<String, String> {
    let note = denial?;
    assert_not_pushed(stack, repo, tag).await?;
    Ok(note)
}

/// Compare the digest the client pushed, the one it pulled, and the gate's.
async fn same_digests(
    stack: &Stack,
    repo: &str,
    tag: &str,
    pushed: &str,
    pulled: &str,
) -> Result<String, String> {
    let on_gate = gate_manifest(stack, repo, tag)
        .await?
        .ok_or_else(|| format!("{repo}:{tag} is not on the registry"))?;
    if pushed == pulled && pulled == on_gate {
        Ok(format!("manifest {pushed}"))
    } else {
        Err(format!(
            "pushed {pushed:?}, pulled {pulled:?}, the gate serves {on_gate:?}"
        ))
    }
}

/// A `sha256:…` digest following `marker` in `text`.
fn digest_after(text: &str, marker: &str) -> Option<String> {
    let at = text.find(marker)? + marker.len();
    let rest = text[at..].trim_start();
    let digest: String = rest
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == ':')
        .collect();
    (digest.starts_with("sha256:") && digest.len() == 71).then_some(digest)
}

fn payloads(seed: u64) -> Vec<Vec<u8>> {
    vec![
        pseudo_random_bytes(BIG, seed),
        pseudo_random_bytes(3000, seed + 1),
    ]
}

fn parse_json_list(text: &str) -> Result<Vec<String>, String> {
    serde_json::from_str::<Vec<String>>(text.trim())
        .map_err(|e| format!("not a JSON list of strings ({e}): {text}"))
}

// ---------------------------------------------------------------------------
// docker

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn docker_matrix() {
    let stack = Stack::start().await;
    let host = stack.gate.authority();
    let dir = stack.path("docker");
    let mut containerd = Containerd::start(&dir.join("containerd"));
    let docker = Docker::start(&dir.join("engine"), &mut containerd);
    let _certs = CertsD::install(&host, &stack.ca.cert);
    let mut m = Matrix::new("docker");

    let image = format!("{host}/matrix/docker:v1");
    let archive = DockerArchive::write(&dir.join("image.tar"), &image, &payloads(11));
    let cfg = |name: &str| dir.join(format!("config-{name}"));
    let load = docker.cli(&cfg("load"), &["load", "-i", path(&archive.path)], None);
    assert!(
        load.success(),
        "docker load of the test image failed: {}",
        load.describe()
    );

    // The daemon's log explains what the CLI cannot (see common::docker).
    let log_since = |from: usize| {
        let errors = docker.log_errors_since(from);
        if errors.is_empty() {
            String::new()
        } else {
            format!("\n  dockerd log:\n    {}", errors.replace('\n', "\n    "))
        }
    };

    let mark = docker.log_len();
    let wrong = docker.cli(
        &cfg("wrong"),
        &["login", &host, "-u", PUSHER.0, "--password-stdin"],
        Some(WRONG_PASSWORD),
    );
    m.record(S1, expect_denied(wrong, &log_since(mark)));

    let mark = docker.log_len();
    let login = docker.cli(
        &cfg("mark"),
        &["login", &host, "-u", PUSHER.0, "--password-stdin"],
        Some(PUSHER.1),
    );
    let logged_in = m.record(
        S2,
        expect_ok(login, &log_since(mark)).and_then(|out| {
            if out.contains("Login Succeeded") {
                Ok(out.trim().to_owned())
            } else {
                Err(format!("no \"Login Succeeded\": {out}"))
            }
        }),
    );

    let mut pushed = None;
    if logged_in {
        let mark = docker.log_len();
        let push = docker.cli(&cfg("mark"), &["push", &image], None);
        let result = expect_ok(push, &log_since(mark)).and_then(|out| {
            digest_after(&out, "digest:")
                .ok_or_else(|| format!("no digest in docker push's output: {out}"))
        });
        if m.record(S3, result.clone()) {
            pushed = result.ok();
        }
    } else {
        m.not_run(S3, "needs step 2");
    }

    // 4: vera logs in (she is a valid user) and tries to push.
    let mark = docker.log_len();
    let vera_login = docker.cli(
        &cfg("vera"),
        &["login", &host, "-u", VIEWER.0, "--password-stdin"],
        Some(VIEWER.1),
    );
    if vera_login.success() {
        let target = format!("{host}/matrix/docker-vera:v1");
        docker.cli(&cfg("vera"), &["tag", &image, &target], None);
        let mark = docker.log_len();
        let push = docker.cli(&cfg("vera"), &["push", &target], None);
        let denial = expect_denied(push, &log_since(mark));
        m.record(
            S4,
            denied_and_absent(&stack, denial, "matrix/docker-vera", "v1").await,
        );
    } else {
        m.record(
            S4,
            Err(format!(
                "a valid non-pusher could not even log in\n{}{}",
                vera_login.describe(),
                log_since(mark)
            )),
        );
    }

    let target = format!("{host}/matrix/docker-anon:v1");
    docker.cli(&cfg("anon"), &["tag", &image, &target], None);
    let mark = docker.log_len();
    let push = docker.cli(&cfg("anon"), &["push", &target], None);
    let denial = expect_denied(push, &log_since(mark));
    m.record(
        S5,
        denied_and_absent(&stack, denial, "matrix/docker-anon", "v1").await,
    );

    if let Some(pushed) = pushed {
        // Forget the image entirely, then pull it with an empty DOCKER_CONFIG.
        for tag in [
            image.clone(),
            format!("{host}/matrix/docker-vera:v1"),
            format!("{host}/matrix/docker-anon:v1"),
        ] {
            docker.cli(&cfg("anon"), &["rmi", "-f", &tag], None);
        }
        let gone = docker.cli(&cfg("anon"), &["image", "inspect", &image], None);
        assert!(!gone.success(), "docker rmi left the image behind");
        let mark = docker.log_len();
        let pull = docker.cli(&cfg("pull"), &["pull", &image], None);
        let result = expect_ok(pull, &log_since(mark)).and_then(|out| {
            digest_after(&out, "Digest:")
                .ok_or_else(|| format!("no digest in docker pull's output: {out}"))
        });
        if m.record(S6, result.clone()) {
            let pulled = result.unwrap_or_default();
            let layers = docker
                .cli(
                    &cfg("pull"),
                    &[
                        "image",
                        "inspect",
                        "--format",
                        "{{json .RootFS.Layers}}",
                        &image,
                    ],
                    None,
                )
                .ok()
                .and_then(|out| parse_json_list(&out));
            let check = match layers {
                Ok(layers) if layers == archive.diff_ids => {
                    same_digests(&stack, "matrix/docker", "v1", &pushed, &pulled).await
                }
                Ok(layers) => Err(format!(
                    "pulled layers {layers:?}, loaded {:?}",
                    archive.diff_ids
                )),
                Err(e) => Err(e),
            };
            m.record(S7, check);
        } else {
            m.not_run(S7, "needs step 6");
        }
    } else {
        m.not_run(S6, "needs step 3");
        m.not_run(S7, "needs step 3");
    }
    m.finish();
}

// ---------------------------------------------------------------------------
// podman

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn podman_matrix() {
    let stack = Stack::start().await;
    let host = stack.gate.authority();
    let dir = stack.path("podman");
    let podman = Podman::new(&dir, &stack.ca.cert);
    let mut m = Matrix::new("podman");

    let image = format!("{host}/matrix/podman:v1");
    let archive = DockerArchive::write(&dir.join("image.tar"), &image, &payloads(21));
    let setup = podman.fresh_auth_file("setup");
    let load = podman.run(
        &setup,
        &[
            "load",
            "--signature-policy",
            podman.policy(),
            "-i",
            path(&archive.path),
        ],
        None,
    );
    assert!(
        load.success(),
        "podman load of the test image failed: {}",
        load.describe()
    );
    let registry_args = |verb: &'static str| -> Vec<String> {
        let mut args = vec![
            verb.to_owned(),
            "--cert-dir".into(),
            podman.cert_dir().into(),
        ];
        if verb != "login" {
            args.extend(["--signature-policy".into(), podman.policy().into()]);
        }
        args
    };
    let with = |mut base: Vec<String>, rest: &[&str]| -> Vec<String> {
        base.extend(rest.iter().map(|s| s.to_string()));
        base
    };
    let run = |auth: &Path, args: Vec<String>, stdin: Option<&str>| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        podman.run(auth, &args, stdin)
    };

    let wrong = podman.fresh_auth_file("wrong");
    let out = run(
        &wrong,
        with(
            registry_args("login"),
            &["-u", PUSHER.0, "--password-stdin", &host],
        ),
        Some(WRONG_PASSWORD),
    );
    m.record(S1, expect_denied(out, ""));

    let mark = podman.fresh_auth_file("mark");
    let out = run(
        &mark,
        with(
            registry_args("login"),
            &["-u", PUSHER.0, "--password-stdin", &host],
        ),
        Some(PUSHER.1),
    );
    let logged_in = m.record(
        S2,
        expect_ok(out, "").and_then(|out| {
            if out.contains("Login Succeeded") {
                Ok(out.trim().to_owned())
            } else {
                Err(format!("no \"Login Succeeded\": {out}"))
            }
        }),
    );

    let mut pushed = None;
    if logged_in {
        let digest_file = dir.join("pushed.digest");
        let out = run(
            &mark,
            with(
                registry_args("push"),
                &["--digestfile", path(&digest_file), &image],
            ),
            None,
        );
        let result = expect_ok(out, "").and_then(|_| {
            std::fs::read_to_string(&digest_file)
                .map(|d| d.trim().to_owned())
                .map_err(|e| format!("no --digestfile written: {e}"))
        });
        if m.record(S3, result.clone()) {
            pushed = result.ok();
        }
    } else {
        m.not_run(S3, "needs step 2");
    }

    let vera = podman.fresh_auth_file("vera");
    let out = run(
        &vera,
        with(
            registry_args("login"),
            &["-u", VIEWER.0, "--password-stdin", &host],
        ),
        Some(VIEWER.1),
    );
    if out.success() {
        let target = format!("{host}/matrix/podman-vera:v1");
        podman.run(&vera, &["tag", &image, &target], None);
        let out = run(&vera, with(registry_args("push"), &[&target]), None);
        m.record(
            S4,
            denied_and_absent(&stack, expect_denied(out, ""), "matrix/podman-vera", "v1").await,
        );
    } else {
        m.record(
            S4,
            Err(format!(
                "a valid non-pusher could not even log in\n{}",
                out.describe()
            )),
        );
    }

    let anon = podman.fresh_auth_file("anon");
    let target = format!("{host}/matrix/podman-anon:v1");
    podman.run(&anon, &["tag", &image, &target], None);
    let out = run(&anon, with(registry_args("push"), &[&target]), None);
    m.record(
        S5,
        denied_and_absent(&stack, expect_denied(out, ""), "matrix/podman-anon", "v1").await,
    );

    if let Some(pushed) = pushed {
        let anon_pull = podman.fresh_auth_file("pull");
        podman.run(&anon_pull, &["rmi", "-f", "-a"], None);
        let gone = podman.run(&anon_pull, &["image", "exists", &image], None);
        assert!(!gone.success(), "podman rmi left the image behind");
        let out = run(&anon_pull, with(registry_args("pull"), &[&image]), None);
        if m.record(S6, expect_ok(out, "").map(|_| String::new())) {
            let inspect = |format: &str| {
                podman
                    .run(
                        &anon_pull,
                        &["image", "inspect", "--format", format, &image],
                        None,
                    )
                    .ok()
            };
            let check = async {
                let pulled = inspect("{{.Digest}}")?.trim().to_owned();
                let layers = parse_json_list(&inspect("{{json .RootFS.Layers}}")?)?;
                if layers != archive.diff_ids {
                    return Err(format!(
                        "pulled layers {layers:?}, loaded {:?}",
                        archive.diff_ids
                    ));
                }
                same_digests(&stack, "matrix/podman", "v1", &pushed, &pulled).await
            };
            m.record(S7, check.await);
        } else {
            m.not_run(S7, "needs step 6");
        }
    } else {
        m.not_run(S6, "needs step 3");
        m.not_run(S7, "needs step 3");
    }
    m.finish();
}

// ---------------------------------------------------------------------------
// skopeo

fn skopeo_run(skopeo: &Skopeo, args: &[&str]) -> Run {
    let output = skopeo.run(args);
    Run {
        what: format!("skopeo {}", args.join(" ")),
        status: Some(output.status),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn skopeo_matrix() {
    let stack = Stack::start().await;
    let host = stack.gate.authority();
    let dir = stack.path("skopeo");
    let as_user = |name: &str| Skopeo::new(&dir.join(name), &stack.ca.cert);
    let mut m = Matrix::new("skopeo");

    let layout = dir.join("layout");
    let p = payloads(31);
    let layers = vec![
        tar_layer(&[("big.bin", &p[0])]),
        tar_layer(&[("small.bin", &p[1])]),
    ];
    let written = write_oci_layout(&layout, "v1", &layers);
    let source = format!("oci:{}:v1", layout.display());
    let image = format!("docker://{host}/matrix/skopeo:v1");

    let wrong = as_user("wrong");
    let out = skopeo_run(
        &wrong,
        &[
            "login",
            "--cert-dir",
            wrong.cert_dir(),
            "-u",
            PUSHER.0,
            "-p",
            WRONG_PASSWORD,
            &host,
        ],
    );
    m.record(S1, expect_denied(out, ""));

    let mark = as_user("mark");
    let out = skopeo_run(
        &mark,
        &[
            "login",
            "--cert-dir",
            mark.cert_dir(),
            "-u",
            PUSHER.0,
            "-p",
            PUSHER.1,
            &host,
        ],
    );
    let logged_in = m.record(
        S2,
        expect_ok(out, "").and_then(|out| {
            if out.contains("Login Succeeded") {
                Ok(out.trim().to_owned())
            } else {
                Err(format!("no \"Login Succeeded\": {out}"))
            }
        }),
    );

    let mut pushed = None;
    if logged_in {
        let digest_file = dir.join("pushed.digest");
        let out = skopeo_run(
            &mark,
            &[
                "copy",
                "--dest-cert-dir",
                mark.cert_dir(),
                "--digestfile",
                path(&digest_file),
                &source,
                &image,
            ],
        );
        let result = expect_ok(out, "").and_then(|_| {
            std::fs::read_to_string(&digest_file)
                .map(|d| d.trim().to_owned())
                .map_err(|e| format!("no --digestfile written: {e}"))
        });
        if m.record(S3, result.clone()) {
            pushed = result.ok();
        }
    } else {
        m.not_run(S3, "needs step 2");
    }

    let vera = as_user("vera");
    let out = skopeo_run(
        &vera,
        &[
            "login",
            "--cert-dir",
            vera.cert_dir(),
            "-u",
            VIEWER.0,
            "-p",
            VIEWER.1,
            &host,
        ],
    );
    if out.success() {
        let target = format!("docker://{host}/matrix/skopeo-vera:v1");
        let out = skopeo_run(
            &vera,
            &["copy", "--dest-cert-dir", vera.cert_dir(), &source, &target],
        );
        m.record(
            S4,
            denied_and_absent(&stack, expect_denied(out, ""), "matrix/skopeo-vera", "v1").await,
        );
    } else {
        m.record(
            S4,
            Err(format!(
                "a valid non-pusher could not even log in\n{}",
                out.describe()
            )),
        );
    }

    let anon = as_user("anon");
    let target = format!("docker://{host}/matrix/skopeo-anon:v1");
    let out = skopeo_run(
        &anon,
        &["copy", "--dest-cert-dir", anon.cert_dir(), &source, &target],
    );
    m.record(
        S5,
        denied_and_absent(&stack, expect_denied(out, ""), "matrix/skopeo-anon", "v1").await,
    );

    if let Some(pushed) = pushed {
        let puller = as_user("pull");
        let out_dir = dir.join("pulled");
        let out = skopeo_run(
            &puller,
            &[
                "copy",
                "--src-cert-dir",
                puller.cert_dir(),
                &image,
                &format!("oci:{}:v1", out_dir.display()),
            ],
        );
        if m.record(S6, expect_ok(out, "").map(|_| String::new())) {
            let check = async {
                let index: serde_json::Value = serde_json::from_slice(
                    &std::fs::read(out_dir.join("index.json"))
                        .map_err(|e| format!("read the pulled index.json: {e}"))?,
                )
                .map_err(|e| format!("pulled index.json: {e}"))?;
                let pulled = index["manifests"][0]["digest"]
                    .as_str()
                    .ok_or_else(|| format!("no manifest digest in {index}"))?
                    .to_owned();
                // Every pulled blob hashes to its name, and the config is the one
                // written (its diff_ids name the uncompressed layers).
                let blobs = out_dir.join("blobs/sha256");
                for entry in std::fs::read_dir(&blobs).map_err(|e| e.to_string())? {
                    let entry = entry.map_err(|e| e.to_string())?;
                    let data = std::fs::read(entry.path()).map_err(|e| e.to_string())?;
                    let name = format!("sha256:{}", entry.file_name().to_string_lossy());
                    if sha256_digest(&data) != name {
                        return Err(format!("pulled blob {name} has other content"));
                    }
                }
                let config = written.config_digest.trim_start_matches("sha256:");
                if !blobs.join(config).is_file() {
                    return Err(format!(
                        "the pulled image lacks the pushed config {}",
                        written.config_digest
                    ));
                }
                same_digests(&stack, "matrix/skopeo", "v1", &pushed, &pulled).await
            };
            m.record(S7, check.await);
        } else {
            m.not_run(S7, "needs step 6");
        }
    } else {
        m.not_run(S6, "needs step 3");
        m.not_run(S7, "needs step 3");
    }
    m.finish();
}

// ---------------------------------------------------------------------------
// containerd (ctr)

/// The digest `ctr images ls` shows for `reference` in its namespace.
fn ctr_image_digest(
    containerd: &Containerd,
    namespace: &str,
    reference: &str,
) -> Result<String, String> {
    let out = containerd.ctr(namespace, &["images", "ls"]).ok()?;
    out.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let name = fields.next()?;
            let _kind = fields.next()?;
            let digest = fields.next()?;
            (name == reference).then(|| digest.to_owned())
        })
        .next()
        .ok_or_else(|| format!("{reference} is not in `ctr -n {namespace} images ls`:\n{out}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn containerd_ctr_matrix() {
    let stack = Stack::start().await;
    let host = stack.gate.authority();
    let dir = stack.path("ctr");
    let containerd = Containerd::start(&dir.join("containerd"));
    let hosts = hosts_dir(&dir.join("hosts"), &host, &stack.ca.cert);
    let hosts = path(&hosts);
    let mut m = Matrix::new("containerd ctr");

    let image = format!("{host}/matrix/ctr:v1");
    let archive = DockerArchive::write(&dir.join("image.tar"), &image, &payloads(41));
    let ns = "pusher";
    let import = containerd.ctr(
        ns,
        &["images", "import", "--no-unpack", path(&archive.path)],
    );
    assert!(
        import.success(),
        "ctr images import failed: {}",
        import.describe()
    );
    let local = ctr_image_digest(&containerd, ns, &image)
        .unwrap_or_else(|e| panic!("after ctr images import: {e}"));
    let push = |reference: &str, user: Option<String>| {
        let mut args = vec!["images", "push", "--hosts-dir", hosts];
        if let Some(user) = &user {
            args.extend(["-u", user.as_str()]);
        }
        args.push(reference);
        containerd.ctr(ns, &args)
    };
    let tag = |target: &str| containerd.ctr(ns, &["images", "tag", &image, target]);

    // 1: ctr has no login; a push with the wrong password must fail.
    let target = format!("{host}/matrix/ctr-wrong:v1");
    tag(&target);
    let out = push(&target, Some(format!("{}:{WRONG_PASSWORD}", PUSHER.0)));
    m.record(
        S1,
        denied_and_absent(&stack, expect_denied(out, ""), "matrix/ctr-wrong", "v1").await,
    );

    let out = push(&image, Some(format!("{}:{}", PUSHER.0, PUSHER.1)));
    let pushed = expect_ok(out, "").map(|_| local.clone());
    let pushed_ok = pushed.is_ok();
    m.record(
        S2,
        if pushed_ok {
            Ok("ctr has no login: the push of step 3 used them".into())
        } else {
            Err("ctr has no login: the push of step 3 used them, and failed".into())
        },
    );
    m.record(S3, pushed.clone().map(|d| format!("local manifest {d}")));

    let target = format!("{host}/matrix/ctr-vera:v1");
    tag(&target);
    let out = push(&target, Some(format!("{}:{}", VIEWER.0, VIEWER.1)));
    m.record(
        S4,
        denied_and_absent(&stack, expect_denied(out, ""), "matrix/ctr-vera", "v1").await,
    );

    let target = format!("{host}/matrix/ctr-anon:v1");
    tag(&target);
    let out = push(&target, None);
    m.record(
        S5,
        denied_and_absent(&stack, expect_denied(out, ""), "matrix/ctr-anon", "v1").await,
    );

    if let Ok(pushed) = pushed {
        // A fresh namespace shares no content (content_sharing_policy = isolated).
        let fresh = "anonymous";
        let out = containerd.ctr(
            fresh,
            &[
                "images",
                "pull",
                "--hosts-dir",
                hosts,
                "--print-chainid",
                &image,
            ],
        );
        if m.record(S6, expect_ok(out, "").map(|_| String::new())) {
            let check = async {
                let pulled = ctr_image_digest(&containerd, fresh, &image)?;
                let config = containerd
                    .ctr(fresh, &["content", "get", &archive.config_digest])
                    .ok()?;
                if sha256_digest(config.as_bytes()) != archive.config_digest {
                    return Err("the pulled config differs from the imported one".into());
                }
                same_digests(&stack, "matrix/ctr", "v1", &pushed, &pulled).await
            };
            m.record(S7, check.await);
        } else {
            m.not_run(S7, "needs step 6");
        }
    } else {
        m.not_run(S6, "needs step 3");
        m.not_run(S7, "needs step 3");
    }
    m.finish();
}

// ---------------------------------------------------------------------------
// oras (oras-py)

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn oras_matrix() {
    let stack = Stack::start().await;
    let host = stack.gate.authority();
    let dir = stack.path("oras");
    let oras = Oras::new(&dir, &host, &stack.ca.cert);
    let mut m = Matrix::new("oras");

    let files = dir.join("files");
    std::fs::create_dir_all(&files).expect("create files directory");
    let artifact = files.join("artifact.bin");
    let big = pseudo_random_bytes(BIG, 51);
    std::fs::write(&artifact, &big).expect("write artifact");
    let small = |name: &str, seed: u64| {
        let file = files.join(name);
        std::fs::write(&file, pseudo_random_bytes(5000, seed)).expect("write small artifact");
        file
    };
    let reference = |repo: &str| format!("{host}/matrix/{repo}:v1");

    // 1: oras-py's login only writes the file; the push is where it is checked.
    let wrong = oras.config("wrong");
    let login = oras.login(&wrong, PUSHER.0, WRONG_PASSWORD);
    assert!(
        login.success(),
        "oras login (local) failed: {}",
        login.describe()
    );
    let out = oras.push(&wrong, &reference("oras-wrong"), &small("wrong.bin", 52));
    m.record(
        S1,
        denied_and_absent(&stack, expect_denied(out, ""), "matrix/oras-wrong", "v1").await,
    );

    let mark = oras.config("mark");
    let out = oras.login(&mark, PUSHER.0, PUSHER.1);
    let logged_in = m.record(
        S2,
        expect_ok(out, "").map(|out| {
            format!(
                "{} (oras-py only writes the file; the push of step 3 proves the password)",
                out.trim()
            )
        }),
    );

    let mut pushed = None;
    if logged_in {
        let out = oras.push(&mark, &reference("oras"), &artifact);
        let result = expect_ok(out, "").and_then(|out| {
            let json: serde_json::Value = serde_json::from_str(out.trim())
                .map_err(|e| format!("oras push printed no JSON ({e}): {out}"))?;
            match (json["status"].as_u64(), json["digest"].as_str()) {
                (Some(201), Some(digest)) => Ok(digest.to_owned()),
                _ => Err(format!("manifest PUT answered {json}")),
            }
        });
        if m.record(S3, result.clone()) {
            pushed = result.ok();
        }
    } else {
        m.not_run(S3, "needs step 2");
    }

    let vera = oras.config("vera");
    let login = oras.login(&vera, VIEWER.0, VIEWER.1);
    assert!(
        login.success(),
        "oras login (local) failed: {}",
        login.describe()
    );
    let out = oras.push(&vera, &reference("oras-vera"), &small("vera.bin", 53));
    m.record(
        S4,
        denied_and_absent(&stack, expect_denied(out, ""), "matrix/oras-vera", "v1").await,
    );

    let anon = oras.config("anon");
    let out = oras.push(&anon, &reference("oras-anon"), &small("anon.bin", 54));
    m.record(
        S5,
        denied_and_absent(&stack, expect_denied(out, ""), "matrix/oras-anon", "v1").await,
    );

    if let Some(pushed) = pushed {
        let out_dir = dir.join("pulled");
        let out = oras.pull(&oras.config("pull"), &reference("oras"), &out_dir);
        let result = expect_ok(out, "").and_then(|out| {
            serde_json::from_str::<serde_json::Value>(out.trim())
                .map_err(|e| format!("oras pull printed no JSON ({e}): {out}"))
        });
        if m.record(S6, result.clone().map(|_| String::new())) {
            let json = result.unwrap_or_default();
            let check = async {
                let want = sha256_digest(&big);
                if json["files"]["artifact.bin"].as_str() != Some(want.as_str()) {
                    return Err(format!(
                        "pulled files {} (want artifact.bin = {want})",
                        json["files"]
                    ));
                }
                if json["layers"] != serde_json::json!([want]) {
                    return Err(format!(
                        "manifest layers {} (want [{want}])",
                        json["layers"]
                    ));
                }
                let pulled = json["manifest_digest"].as_str().unwrap_or_default();
                same_digests(&stack, "matrix/oras", "v1", &pushed, pulled).await
            };
            m.record(S7, check.await);
        } else {
            m.not_run(S7, "needs step 6");
        }
    } else {
        m.not_run(S6, "needs step 3");
        m.not_run(S7, "needs step 3");
    }
    m.finish();
}

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}
