//! What a request did, told in words and to other systems: the audit line of an
//! accepted push or delete (target `registry_gate::audit`) and the webhook events
//! (`crate::notify`) of manifest pushes, deletes and pulls. Both come from the answer
//! the backend gave, so front mode reports what the upstream accepted.

use std::net::SocketAddr;

use http::{Method, Request, Response, StatusCode, header};

use crate::backend::RequestContext;
use crate::body::Body;
use crate::notify::{self, Action, ActorRecord, Notifier, Target};
use crate::route::{Reference, Route};

/// What the answer is matched against, taken from the request before the backend
/// consumes it.
pub(super) struct Pending {
    method: Method,
    route: Route,
    id: crate::backend::RequestId,
    peer: SocketAddr,
    user: String,
    host: String,
    public_base: String,
    user_agent: String,
    content_type: String,
    content_length: Option<u64>,
}

impl Pending {
    /// `None` when nothing could come of this request (most reads).
    pub(super) fn capture<B>(
        req: &Request<B>,
        ctx: &RequestContext,
        notifier: Option<&Notifier>,
    ) -> Option<Pending> {
        let interesting = match (req.method(), &ctx.route) {
            (&Method::PUT | &Method::DELETE, Route::Manifest(..) | Route::Blob(..)) => true,
            (&Method::GET, Route::Manifest(..)) => notifier.is_some_and(|n| n.wants(Action::Pull)),
            _ => false,
        };
        if !interesting {
            return None;
        }
        let text = |name: header::HeaderName| {
            req.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned()
        };
        Some(Pending {
            method: req.method().clone(),
            route: ctx.route.clone(),
            id: ctx.id,
            peer: ctx.peer,
            user: ctx.identity.log_name().to_owned(),
            host: ctx.host_str().to_owned(),
            public_base: ctx.public_base().into_owned(),
            user_agent: text(header::USER_AGENT),
            content_type: text(header::CONTENT_TYPE),
            content_length: crate::body::content_length(req.headers()),
        })
    }

    /// The backend answered: write the audit line and queue the events it calls for.
    pub(super) fn answered(
        self,
        resp: &Response<Body>,
        bytes_in: u64,
        notifier: Option<&Notifier>,
    ) {
        // The answer's digest; for a request by digest (a registry:2 delete answers
        // without the header), the one asked for.
        let digest = match &self.route {
            Route::Manifest(_, Reference::Digest(d)) | Route::Blob(_, d) => d.to_string(),
            _ => resp
                .headers()
                .get("docker-content-digest")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned(),
        };
        let status = resp.status();
        let (action, repo, reference, what) = match (&self.method, &self.route, status) {
            (&Method::PUT, Route::Manifest(repo, r), StatusCode::CREATED) => (
                Action::Push,
                repo,
                Some(r),
                format!("manifest {}", named(repo, r)),
            ),
            (&Method::DELETE, Route::Manifest(repo, r), StatusCode::ACCEPTED) => (
                Action::Delete,
                repo,
                Some(r),
                format!("manifest {}", named(repo, r)),
            ),
            (&Method::DELETE, Route::Blob(repo, d), StatusCode::ACCEPTED) => {
                self.audit(Action::Delete, &format!("blob {repo}@{d}"), &digest);
                return;
            }
            (&Method::GET, Route::Manifest(repo, r), StatusCode::OK) => {
                (Action::Pull, repo, Some(r), String::new())
            }
            _ => return,
        };
        if action != Action::Pull {
            self.audit(action, &what, &digest);
        }
        let Some(notifier) = notifier.filter(|n| n.wants(action)) else {
            return;
        };
        let tag = match reference {
            Some(Reference::Tag(t)) => t.clone(),
            _ => String::new(),
        };
        let (media_type, size) = match action {
            Action::Push => (
                self.content_type.clone(),
                self.content_length.unwrap_or(bytes_in),
            ),
            _ => (
                resp.headers()
                    .get(header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_owned(),
                crate::body::content_length(resp.headers()).unwrap_or(0),
            ),
        };
        let url = if digest.is_empty() || action == Action::Delete {
            String::new()
        } else {
            format!("{}/v2/{repo}/manifests/{digest}", self.public_base)
        };
        let target = Target {
            media_type,
            digest,
            size,
            length: size,
            repository: repo.to_string(),
            url,
            tag,
        };
        let request = notify::request_record(
            self.id.as_str(),
            self.peer,
            &self.host,
            &self.method,
            &self.user_agent,
        );
        let actor = ActorRecord {
            name: if self.user == "-" {
                String::new()
            } else {
                self.user.clone()
            },
        };
        notifier.publish(action, target, request, actor);
    }

    fn audit(&self, action: Action, what: &str, digest: &str) {
        let digest = if digest.is_empty() { "-" } else { digest };
        tracing::info!(
            target: "registry_gate::audit",
            id = %self.id,
            action = action.as_str(),
            user = %self.user,
            peer = %self.peer,
            digest,
            "{} {what}",
            action.as_str()
        );
    }
}

/// `repo:tag` or `repo@digest`.
fn named(repo: &crate::route::RepoName, r: &Reference) -> String {
    match r {
        Reference::Tag(t) => format!("{repo}:{t}"),
        Reference::Digest(d) => format!("{repo}@{d}"),
    }
}
