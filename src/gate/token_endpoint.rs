//! The token endpoint (distribution `spec/auth/token.md`, `spec/auth/oauth.md`).
//!
//! ```text
//! GET  /token?service=S&scope=repository:NAME:pull,push[&scope=…][&account=…]
//!      Authorization: Basic …        (absent: an anonymous token)
//! POST /token   grant_type=password&username=…&password=…&service=S&scope=…
//! 200  {"token": T, "access_token": T, "expires_in": 300, "issued_at": "…Z"}
//! ```
//!
//! Wrong credentials are a 401 (this is what makes `docker login` honest); right ones
//! give the intersection of what was asked and what the caller may do, which may be
//! nothing: a partial grant is not an error. A password grant never yields an
//! anonymous token.

use std::net::SocketAddr;

use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use super::{Gate, Origin, locked_out};
use crate::auth::policy::{Action, Caller};
use crate::auth::token::{self, parse_scopes};
use crate::auth::{CredentialError, Credentials, PasswordCheck, parse_authorization};
use crate::body::{self, Body};
use crate::error::{ErrorCode, OciError};

/// Largest form body read from a POST.
const MAX_FORM_BYTES: usize = 64 * 1024;

/// Answer a token request; returns the response and the user for the access log.
pub(super) async fn serve(
    gate: &Gate,
    req: Request<Incoming>,
    peer: SocketAddr,
    origin: &Origin<'_>,
) -> (Response<Body>, String) {
    let params = match *req.method() {
        Method::GET | Method::HEAD => {
            let mut p = Params::from_query(req.uri().query().unwrap_or(""));
            p.header = Some(parse_authorization(req.headers()));
            p
        }
        Method::POST => match read_form(req).await {
            Ok(p) => p,
            Err(e) => return (e.into_response(), "-".into()),
        },
        _ => {
            let mut resp = OciError::new(
                ErrorCode::Unsupported,
                "the token endpoint answers GET and POST",
            )
            .into_response();
            resp.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD, POST"));
            return (resp, "-".into());
        }
    };
    match issue(gate, params, peer, origin).await {
        Ok((resp, user)) => (resp, user),
        Err((resp, user)) => (resp, user),
    }
}

/// Parameters of either form of request.
#[derive(Default)]
struct Params {
    service: Option<String>,
    scopes: Vec<String>,
    grant_type: Option<String>,
    username: Option<String>,
    password: Option<String>,
    /// From the `Authorization` header of a GET.
    header: Option<Result<Credentials, CredentialError>>,
}

impl Params {
    fn from_pairs(raw: &[u8]) -> Self {
        let mut p = Params::default();
        for (k, v) in form_urlencoded::parse(raw) {
            match k.as_ref() {
                "service" => p.service = Some(v.into_owned()),
                "scope" => p.scopes.push(v.into_owned()),
                "grant_type" => p.grant_type = Some(v.into_owned()),
                "username" => p.username = Some(v.into_owned()),
                "password" => p.password = Some(v.into_owned()),
                // account, client_id, offline_token, access_type: accepted, not needed.
                _ => {}
            }
        }
        p
    }

    fn from_query(query: &str) -> Self {
        Params::from_pairs(query.as_bytes())
    }
}

async fn read_form(req: Request<Incoming>) -> Result<Params, OciError> {
    let form = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| {
            ct.split(';').next().is_some_and(|t| {
                t.trim()
                    .eq_ignore_ascii_case("application/x-www-form-urlencoded")
            })
        });
    if !form {
        return Err(bad(
            "POST /token takes an application/x-www-form-urlencoded body",
        ));
    }
    let header = parse_authorization(req.headers());
    let body = body::collect_limited(body::boxed(req.into_body()), MAX_FORM_BYTES)
        .await
        .map_err(|e| bad(&format!("cannot read the form: {e}")))?;
    let mut params = Params::from_pairs(&body);
    params.header = Some(header);
    Ok(params)
}

fn bad(message: &str) -> OciError {
    OciError::new(ErrorCode::Unsupported, message).with_status(StatusCode::BAD_REQUEST)
}

type Outcome = Result<(Response<Body>, String), (Response<Body>, String)>;

async fn issue(gate: &Gate, mut params: Params, peer: SocketAddr, origin: &Origin<'_>) -> Outcome {
    let fail = |e: OciError| (e.into_response(), "-".to_owned());
    if let Some(service) = &params.service
        && service != origin.service()
    {
        return Err(fail(bad(&format!(
            "unknown service {:?}; this gate is {:?}",
            service.chars().take(100).collect::<String>(),
            origin.service()
        ))));
    }
    // Who asks: a password grant, Basic credentials, or nobody.
    let credentials = match params.grant_type.as_deref() {
        Some("password") => match (params.username.take(), params.password.take()) {
            (Some(u), Some(p)) if !u.is_empty() && !p.is_empty() => Some((u, p.into_bytes())),
            _ => return Err(fail(bad("grant_type=password needs username and password"))),
        },
        Some("refresh_token") => {
            return Err(fail(bad(
                "refresh tokens are not issued here; use grant_type=password or GET with Basic",
            )));
        }
        Some(other) => {
            return Err(fail(bad(&format!(
                "unsupported grant_type {:?}",
                other.chars().take(50).collect::<String>()
            ))));
        }
        None => match params.header.take() {
            Some(Ok(Credentials::Basic { user, password })) => Some((user, password)),
            Some(Ok(Credentials::None)) | None => None,
            Some(Ok(Credentials::Bearer(_))) => {
                return Err(fail(bad(
                    "send Basic credentials (or none) to the token endpoint",
                )));
            }
            Some(Err(e)) => {
                gate.auth_failed("malformed");
                crate::auth::Authenticator::log_malformed(peer.ip(), &e.to_string());
                return Err(unauthorized(gate, "malformed credentials"));
            }
        },
    };
    let user = match credentials {
        Some((user, password)) => match gate.check_password(peer, &user, &password).await {
            PasswordCheck::Valid => Some(user),
            PasswordCheck::Invalid => {
                return Err(unauthorized(gate, "invalid user name or password"));
            }
            PasswordCheck::LockedOut(retry) => return Err((locked_out(retry), "-".into())),
        },
        None => None,
    };
    let caller = match &user {
        Some(u) => Caller::User(u),
        None => Caller::Anonymous,
    };
    let is_member = |u: &str, g: &str| gate.is_member(u, g);
    let scopes = parse_scopes(params.scopes.iter().map(String::as_str));
    let access = token::grant(
        &scopes,
        |action, repo| gate.policy.allows(caller, action, Some(repo), is_member),
        gate.policy.allows(caller, Action::Pull, None, is_member),
    );
    let now = token::now_secs();
    let lifetime = gate.tokens.lifetime.as_secs();
    let subject = user.clone().unwrap_or_default();
    let claims = token::new_claims(&subject, origin.service(), access, now, lifetime);
    tracing::debug!(
        subject = %claims.subject(),
        access = ?claims.access,
        "token issued"
    );
    let token = gate.tokens.key.sign(&claims);
    let json = serde_json::json!({
        "token": token,
        "access_token": token,
        "expires_in": lifetime,
        "issued_at": token::rfc3339(now),
    })
    .to_string();
    let mut resp = body::json_response(StatusCode::OK, json);
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok((resp, user.unwrap_or_else(|| "-".into())))
}

/// 401 from the token endpoint: a Basic challenge, since Basic is what it takes.
fn unauthorized(gate: &Gate, message: &str) -> (Response<Body>, String) {
    let mut resp = OciError::new(ErrorCode::Unauthorized, message).into_response();
    if let Ok(v) = HeaderValue::from_str(&format!("Basic realm=\"{}\"", gate.tokens.basic_realm)) {
        resp.headers_mut().insert(header::WWW_AUTHENTICATE, v);
    }
    (resp, "-".into())
}
