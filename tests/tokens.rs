//! Registry tokens, challenges, per-repository rules and login throttling, over real
//! TLS against the gate fronting a real CNCF registry, at the HTTP level (the real
//! clients are driven in `clients.rs`).

mod common;

use base64::Engine as _;
use common::client::{Client, Resp, empty, full};
use common::image::{UploadMode, pull_and_verify, push_image};
use common::{PUSHER, Stack, StackOptions, VIEWER, eventually, pseudo_random_bytes, replace_file};
use registry_gate::auth::token::{Access, TokenKey, new_claims, now_secs};

/// A gate in front of a registry with extra `[auth]` lines and extra tables.
struct Setup {
    stack: Stack,
}

impl Setup {
    async fn start(extra_auth: &str, extra_tables: &str) -> Setup {
        let stack = Stack::start_with(StackOptions {
            extra_auth: extra_auth.to_owned(),
            extra_tables: extra_tables.to_owned(),
            ..StackOptions::default()
        })
        .await;
        Setup { stack }
    }

    /// A gate whose `[token] key_file` holds `fill` repeated 48 times; the directory
    /// lives as long as the returned guard.
    async fn with_key_file(fill: &str) -> (tempfile::TempDir, std::path::PathBuf, Setup) {
        let key_dir = tempfile::tempdir().expect("tempdir");
        let key_file = key_dir.path().join("token.key");
        std::fs::write(&key_file, fill.repeat(48)).expect("write key");
        let s = Setup::start("", &format!("[token]\nkey_file = {key_file:?}\n")).await;
        (key_dir, key_file, s)
    }

    /// POST an upload to `app` with a bearer token.
    fn post_upload(&self, token: String) -> impl std::future::Future<Output = Resp> + use<> {
        let client = self.bearer(&token);
        async move {
            client
                .request("POST", "/v2/app/blobs/uploads/", &[], empty())
                .await
        }
    }

    fn client(&self) -> Client {
        self.stack.client()
    }

    fn service(&self) -> String {
        self.stack.gate.authority()
    }

    /// GET /token with optional Basic credentials and scopes; the whole answer.
    async fn token_request(&self, creds: Option<(&str, &str)>, scopes: &[&str]) -> Resp {
        let mut query = format!(
            "service={}&account=x&client_id=test&offline_token=true",
            self.service()
        );
        for s in scopes {
            query.push_str(&format!("&scope={s}"));
        }
        let client = match creds {
            Some((u, p)) => self.client().with_basic(u, p),
            None => self.client(),
        };
        client.get(&format!("/token?{query}")).await
    }

    /// A token for these credentials and scopes (the request must succeed).
    async fn token(&self, creds: Option<(&str, &str)>, scopes: &[&str]) -> String {
        let resp = self.token_request(creds, scopes).await;
        assert_eq!(resp.status.as_u16(), 200, "token request: {}", resp.text());
        resp.json()["token"]
            .as_str()
            .expect("token string")
            .to_owned()
    }

    fn bearer(&self, token: &str) -> Client {
        self.client().with_authorization(&format!("Bearer {token}"))
    }
}

/// The claims inside one of our tokens (the payload is base64url JSON).
fn claims_of(token: &str) -> serde_json::Value {
    let payload = token.split('.').next().expect("payload");
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .expect("base64url payload");
    serde_json::from_slice(&json).expect("claims JSON")
}

/// The `access` of a token as (name, actions) pairs.
fn granted(token: &str) -> Vec<(String, Vec<String>)> {
    claims_of(token)["access"]
        .as_array()
        .expect("access array")
        .iter()
        .map(|a| {
            (
                a["name"].as_str().expect("name").to_owned(),
                a["actions"]
                    .as_array()
                    .expect("actions")
                    .iter()
                    .map(|x| x.as_str().expect("action").to_owned())
                    .collect(),
            )
        })
        .collect()
}

fn challenge(resp: &Resp) -> String {
    resp.header("www-authenticate")
        .unwrap_or_else(|| panic!("no WWW-Authenticate on {} {}", resp.status, resp.text()))
        .to_owned()
}

fn pull_push() -> Vec<String> {
    vec!["pull".into(), "push".into()]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn version_check_challenges_and_tokens_open_it() {
    let s = Setup::start("", "").await;
    let resp = s.client().get("/v2/").await;
    resp.assert_oci_error(401);
    resp.assert_api_version_once("401 on /v2/");
    assert_eq!(
        challenge(&resp),
        format!(
            "Bearer realm=\"https://{0}/token\",service=\"{0}\"",
            s.service()
        )
    );
    // `Basic Og==` (podman, skopeo) is no identity either.
    let resp = s
        .client()
        .with_authorization("Basic Og==")
        .get("/v2/")
        .await;
    resp.assert_oci_error(401);

    let anon = s.token(None, &[]).await;
    assert_eq!(s.bearer(&anon).get("/v2/").await.status.as_u16(), 200);
    let resp = s.client().with_basic(PUSHER.0, PUSHER.1).get("/v2/").await;
    assert_eq!(
        resp.status.as_u16(),
        200,
        "Basic still works: {}",
        resp.text()
    );
    let resp = s.client().with_basic(PUSHER.0, "wrong").get("/v2/").await;
    resp.assert_oci_error(401);
    assert!(challenge(&resp).starts_with("Bearer "));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_endpoint_grants_what_the_policy_allows() {
    let s = Setup::start("", "").await;
    // Anonymous: pull only, whatever was asked.
    let resp = s.token_request(None, &["repository:app:pull,push"]).await;
    assert_eq!(resp.status.as_u16(), 200, "{}", resp.text());
    resp.assert_api_version_once("token");
    let json = resp.json();
    assert_eq!(json["token"], json["access_token"]);
    assert_eq!(json["expires_in"], 300);
    let issued = json["issued_at"].as_str().expect("issued_at");
    assert!(
        issued.len() == 20 && issued.ends_with('Z') && issued.as_bytes()[10] == b'T',
        "issued_at is RFC 3339 UTC: {issued}"
    );
    let anon = json["token"].as_str().expect("token");
    assert_eq!(
        granted(anon),
        vec![("app".to_owned(), vec!["pull".to_owned()])]
    );
    assert_eq!(claims_of(anon)["sub"], "");

    // A pusher: both; `*` means everything the pusher may do, delete included.
    let t = s
        .token(
            Some(PUSHER),
            &["repository:app:pull,push", "repository:other:*"],
        )
        .await;
    assert_eq!(
        granted(&t),
        vec![
            ("app".to_owned(), pull_push()),
            (
                "other".to_owned(),
                vec!["pull".into(), "push".into(), "delete".into()]
            ),
        ]
    );
    assert_eq!(claims_of(&t)["sub"], PUSHER.0);

    // A valid user outside the push group: a partial grant, not an error.
    let t = s.token(Some(VIEWER), &["repository:app:pull,push"]).await;
    assert_eq!(
        granted(&t),
        vec![("app".to_owned(), vec!["pull".to_owned()])]
    );

    // Wrong password, unknown user: 401, which is what makes `login` honest.
    for creds in [(PUSHER.0, "nope"), ("nobody", "nope")] {
        let resp = s.token_request(Some(creds), &["repository:app:pull"]).await;
        assert_eq!(resp.assert_oci_error(401), vec!["UNAUTHORIZED"]);
        resp.assert_api_version_once("token 401");
    }

    // Another service: refused.
    let resp = s
        .client()
        .get("/token?service=elsewhere.example&scope=repository:app:pull")
        .await;
    resp.assert_oci_error(400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oauth2_password_grant() {
    let s = Setup::start("", "").await;
    let form = |body: String| async {
        s.client()
            .request(
                "POST",
                "/token",
                &[("content-type", "application/x-www-form-urlencoded")],
                full(body),
            )
            .await
    };
    let service = s.service();
    let resp = form(format!(
        "grant_type=password&username={}&password={}&service={service}&scope=repository%3Aapp%3Apull%2Cpush&client_id=containerd",
        PUSHER.0, PUSHER.1
    ))
    .await;
    assert_eq!(resp.status.as_u16(), 200, "{}", resp.text());
    let token = resp.json()["access_token"]
        .as_str()
        .expect("token")
        .to_owned();
    assert_eq!(granted(&token), vec![("app".to_owned(), pull_push())]);

    let resp = form(format!(
        "grant_type=password&username={}&password=wrong&service={service}&scope=repository%3Aapp%3Apull",
        PUSHER.0
    ))
    .await;
    resp.assert_oci_error(401);
    // A password grant never yields an anonymous token.
    let resp = form(format!(
        "grant_type=password&service={service}&scope=repository%3Aapp%3Apull"
    ))
    .await;
    resp.assert_oci_error(400);
    // No refresh tokens: containerd falls back to GET on 400.
    let resp = form(format!(
        "grant_type=refresh_token&refresh_token=x&service={service}"
    ))
    .await;
    resp.assert_oci_error(400);
    // Not a form.
    let resp = s
        .client()
        .request(
            "POST",
            "/token",
            &[("content-type", "application/json")],
            full("{}"),
        )
        .await;
    resp.assert_oci_error(400);
    // Other methods.
    let resp = s.client().request("PUT", "/token", &[], empty()).await;
    resp.assert_oci_error(405);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_need_a_token_with_the_action() {
    let s = Setup::start("", "").await;
    let layers = vec![
        pseudo_random_bytes(300_000, 7),
        pseudo_random_bytes(1000, 8),
    ];

    // A pusher's token pushes a whole image, chunked.
    let t = s
        .token(Some(PUSHER), &["repository:team/app:pull,push"])
        .await;
    let image = push_image(
        &s.bearer(&t),
        "team/app",
        "v1",
        &layers,
        UploadMode::Chunked(100_000),
    )
    .await;
    // Anonymous reads need no token at all.
    pull_and_verify(&s.client(), "team/app", "v1", &image).await;
    let tags = s.client().get("/v2/team/app/tags/list").await;
    assert_eq!(tags.status.as_u16(), 200, "{}", tags.text());

    // No credentials: a challenge naming the scope the request needs.
    let resp = s
        .client()
        .request("POST", "/v2/team/app/blobs/uploads/", &[], empty())
        .await;
    assert_eq!(resp.assert_oci_error(401), vec!["UNAUTHORIZED"]);
    let c = challenge(&resp);
    assert!(c.contains("scope=\"repository:team/app:pull,push\""), "{c}");
    assert!(
        c.contains(&format!("realm=\"https://{}/token\"", s.service())),
        "{c}"
    );
    let resp = s
        .client()
        .request(
            "DELETE",
            &format!("/v2/team/app/manifests/{}", image.manifest_digest),
            &[],
            empty(),
        )
        .await;
    resp.assert_oci_error(401);
    assert!(
        challenge(&resp).contains("scope=\"repository:team/app:delete\""),
        "{}",
        challenge(&resp)
    );

    // A token without push (the viewer's, or an anonymous one): insufficient_scope,
    // DENIED, so docker prints "denied: requested access to the resource is denied".
    for token in [
        s.token(Some(VIEWER), &["repository:team/app:pull,push"])
            .await,
        s.token(None, &["repository:team/app:pull,push"]).await,
    ] {
        let resp = s
            .bearer(&token)
            .request("POST", "/v2/team/app/blobs/uploads/", &[], empty())
            .await;
        assert_eq!(resp.assert_oci_error(401), vec!["DENIED"]);
        let c = challenge(&resp);
        assert!(c.contains("error=\"insufficient_scope\""), "{c}");
        assert!(c.contains("scope=\"repository:team/app:pull,push\""), "{c}");
    }
    // A token for one repository does not push to another.
    let resp = s
        .bearer(&t)
        .request("POST", "/v2/team/other/blobs/uploads/", &[], empty())
        .await;
    assert_eq!(resp.assert_oci_error(401), vec!["DENIED"]);
    // Basic of a pusher still pushes (scripts written for the recipe).
    let resp = s
        .client()
        .with_basic(PUSHER.0, PUSHER.1)
        .request("POST", "/v2/team/other/blobs/uploads/", &[], empty())
        .await;
    assert_eq!(resp.status.as_u16(), 202, "{}", resp.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_expired_and_foreign_tokens_are_refused() {
    let (_key_dir, key_file, s) = Setup::with_key_file("k").await;
    let key = TokenKey::from_file(&key_file).expect("key");
    let push = push_app();
    let now = now_secs();
    let post = |token: String| s.post_upload(token);
    // Signed with the shared key, for this service, valid now: accepted (the key file
    // is what lets several gates accept each other's tokens).
    let good = key.sign(&new_claims(PUSHER.0, &s.service(), push.clone(), now, 300));
    assert_eq!(post(good.clone()).await.status.as_u16(), 202);
    let cases = [
        (
            "expired",
            key.sign(&new_claims(
                PUSHER.0,
                &s.service(),
                push.clone(),
                now - 1000,
                300,
            )),
        ),
        (
            "not yet valid",
            key.sign(&new_claims(
                PUSHER.0,
                &s.service(),
                push.clone(),
                now + 1000,
                300,
            )),
        ),
        (
            "another service",
            key.sign(&new_claims(
                PUSHER.0,
                "other.example",
                push.clone(),
                now,
                300,
            )),
        ),
        (
            "another key",
            TokenKey::random().sign(&new_claims(PUSHER.0, &s.service(), push.clone(), now, 300)),
        ),
        ("garbage", "not-a-token".to_owned()),
        ("tampered", format!("{}x", good)),
    ];
    for (what, token) in cases {
        let resp = post(token).await;
        assert_eq!(resp.assert_oci_error(401), vec!["UNAUTHORIZED"], "{what}");
        assert!(
            challenge(&resp).contains("error=\"invalid_token\""),
            "{what}: {}",
            challenge(&resp)
        );
        resp.assert_api_version_once(what);
    }
}

/// Pull and push on `app`, as a token grants them.
fn push_app() -> Vec<Access> {
    vec![Access {
        kind: "repository".into(),
        name: "app".into(),
        actions: vec!["pull".into(), "push".into()],
    }]
}

/// The shared token key is rotated by replacing its file (as a secret manager or
/// `install` does): the gate signs with the new key without a restart, tokens it
/// handed out before keep working for their lifetime, a key of neither is refused,
/// and a broken file keeps the key in use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_key_file_takes_over_without_a_restart() {
    let (key_dir, key_file, s) = Setup::with_key_file("a").await;
    let scope = ["repository:app:pull,push"];
    let old_token = s.token(Some(PUSHER), &scope).await;
    let post = |token: String| {
        let upload = s.post_upload(token);
        async move { upload.await.status.as_u16() }
    };
    assert_eq!(post(old_token.clone()).await, 202);

    replace_file(&key_file, "b".repeat(48).as_bytes());
    let new_key = TokenKey::from_file(&key_file).expect("key");
    // The endpoint's tokens are signed with the new key once the file is seen.
    let new_token = eventually("tokens signed with the new key", || async {
        let t = s.token(Some(PUSHER), &scope).await;
        new_key
            .verify(&t, &s.service(), now_secs())
            .is_ok()
            .then_some(t)
    })
    .await;
    assert_eq!(post(new_token.clone()).await, 202);
    assert_eq!(post(old_token).await, 202, "a token of the previous key");
    let third = TokenKey::from_file(&{
        let p = key_dir.path().join("third.key");
        std::fs::write(&p, "c".repeat(48)).expect("write key");
        p
    })
    .expect("key");
    let foreign = third.sign(&new_claims(
        PUSHER.0,
        &s.service(),
        push_app(),
        now_secs(),
        300,
    ));
    assert_eq!(post(foreign).await, 401, "a key the gate never had");

    // A key file that became too short is refused; the new key stays in use.
    replace_file(&key_file, b"short\n");
    // Give the watcher several polls to see (and refuse) it.
    tokio::time::sleep(std::time::Duration::from_millis(
        5 * common::WATCH_INTERVAL_MS,
    ))
    .await;
    let still = s.token(Some(PUSHER), &scope).await;
    assert!(
        new_key.verify(&still, &s.service(), now_secs()).is_ok(),
        "after a broken key file the gate must keep signing with the key it had"
    );
    assert_eq!(post(new_token).await, 202);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_decide_per_repository_and_hide_from_the_catalog() {
    let rules = r#"
[[rules]]
repositories = ["team-a/**"]
pull = ["authenticated"]
push = ["readers"]
delete = ["readers"]
"#;
    let s = Setup::start("", rules).await;
    // In the harness's group file, the viewer is in `readers`; here that makes the
    // viewer team A's pusher, and the push group member nothing special in team-a/.
    let layers = vec![pseudo_random_bytes(2000, 3)];
    let viewer = s.client().with_basic(VIEWER.0, VIEWER.1);
    let pusher = s.client().with_basic(PUSHER.0, PUSHER.1);
    push_image(&viewer, "team-a/app", "v1", &layers, UploadMode::Monolithic).await;
    push_image(&pusher, "public/app", "v1", &layers, UploadMode::Monolithic).await;
    let resp = pusher
        .request("POST", "/v2/team-a/app/blobs/uploads/", &[], empty())
        .await;
    assert_eq!(resp.assert_oci_error(403), vec!["DENIED"]);

    // team-a/ is not anonymous: a challenge, and an anonymous token grants nothing.
    let resp = s.client().get("/v2/team-a/app/tags/list").await;
    resp.assert_oci_error(401);
    assert!(challenge(&resp).contains("scope=\"repository:team-a/app:pull\""));
    let anon = s.token(None, &["repository:team-a/app:pull"]).await;
    assert!(granted(&anon).is_empty(), "{:?}", granted(&anon));
    let t = s
        .token(Some(PUSHER), &["repository:team-a/app:pull,push"])
        .await;
    assert_eq!(
        granted(&t),
        vec![("team-a/app".to_owned(), vec!["pull".to_owned()])]
    );
    assert_eq!(
        s.bearer(&t)
            .get("/v2/team-a/app/tags/list")
            .await
            .status
            .as_u16(),
        200
    );

    // The catalog never lists what the caller may not pull.
    let repos = |resp: Resp| -> Vec<String> {
        assert_eq!(resp.status.as_u16(), 200, "{}", resp.text());
        resp.json()["repositories"]
            .as_array()
            .expect("repositories")
            .iter()
            .map(|r| r.as_str().expect("name").to_owned())
            .collect()
    };
    assert_eq!(
        repos(s.client().get("/v2/_catalog").await),
        vec!["public/app"]
    );
    assert_eq!(
        repos(viewer.get("/v2/_catalog").await),
        vec!["public/app", "team-a/app"]
    );
    let t = s.token(Some(VIEWER), &["registry:catalog:*"]).await;
    assert_eq!(
        repos(s.bearer(&t).get("/v2/_catalog").await),
        vec!["public/app", "team-a/app"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_logins_are_throttled_but_anonymous_pulls_are_not() {
    let s = Setup::start("max_failures = 3\nlockout_secs = 120\n", "").await;
    let layers = vec![pseudo_random_bytes(1000, 5)];
    let image = push_image(
        &s.client().with_basic(PUSHER.0, PUSHER.1),
        "app",
        "v1",
        &layers,
        UploadMode::Monolithic,
    )
    .await;
    for _ in 0..3 {
        let resp = s.token_request(Some((PUSHER.0, "guess")), &[]).await;
        resp.assert_oci_error(401);
    }
    // The address is locked out: another user's right password, never verified
    // before, is refused without being checked.
    let resp = s.token_request(Some(VIEWER), &[]).await;
    assert_eq!(resp.assert_oci_error(429), vec!["TOOMANYREQUESTS"]);
    assert!(
        resp.header("retry-after").is_some(),
        "Retry-After on a lockout"
    );
    let resp = s
        .client()
        .with_basic(VIEWER.0, VIEWER.1)
        .get("/v2/app/tags/list")
        .await;
    resp.assert_oci_error(429);
    // The pusher's password, verified before the lockout, keeps working: an attacker
    // guessing cannot stop a real pusher.
    let resp = s
        .token_request(Some(PUSHER), &["repository:app:push"])
        .await;
    assert_eq!(resp.status.as_u16(), 200, "{}", resp.text());
    // Anonymous pulls are never locked out.
    pull_and_verify(&s.client(), "app", "v1", &image).await;
    let anon = s.token(None, &["repository:app:pull"]).await;
    assert_eq!(s.bearer(&anon).get("/v2/").await.status.as_u16(), 200);
}
