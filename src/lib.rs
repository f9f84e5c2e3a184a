//! registry-gate: a TLS front door for a container registry. Anyone pulls; only the
//! push group pushes and deletes.
//!
//! ```text
//! main.rs (CLI only) ─ config ─ server::serve(config, listener, shutdown)
//!
//! server   accept loop, connection cap, TLS handshake (tls), HTTP/1.1 + HTTP/2,
//!          idle timeouts, lingering close and OCI answers to unparsable requests
//!          (io), graceful shutdown, SIGHUP → reload (watch)
//!   └ gate     one request, top to bottom: method → route → identity → policy
//!              → Backend → API-version header → access log
//!       ├ gate::token_endpoint  GET/POST /token: registry tokens for clients
//!       ├ gate::catalog         hides repositories the caller may not pull
//!       ├ route    the /v2 URL grammar: typed RepoName, Reference, Digest
//!       ├ auth     identity from the Authorization header (Basic or Bearer);
//!       │          htpasswd + group files (reloaded live), verification cache,
//!       │          throttle (brute force), token (format, signing, scopes → grant),
//!       │          policy (per-repository rules: who may pull, push, delete)
//!       ├ error    every error a client sees: OCI error JSON + status
//!       └ backend  the trait the gate calls without knowing what is behind it
//!            └ proxy    Backend for an external upstream registry (streaming)
//!              ├ pool   keep-alive HTTP/1.1 connections to the one upstream
//!              └ cache  [cache]: content by digest kept on disk (blobs as files,
//!                       manifests in one append-only pack; manifests also in memory),
//!                       served only for repositories the upstream confirmed
//!
//!            └ registry the built-in registry (all-in-one): OCI distribution API
//!                       (uploads, manifests, listing, gc) written once over
//!                       registry::storage, the interface with two backends: the
//!                       disk and an S3-compatible object store (several gates on
//!                       one bucket), both in the CNCF layout; claims: gc without locks
//!
//! lifecycle `ls`, `rm`, `prune` over the local store or a registry's API (one
//!          interface); `[[retention]]`; `[[immutable]]` checked by the gate
//! notify   `[[notifications]]`: push/delete/pull events POSTed to webhooks in
//!          distribution's envelope, one bounded queue and worker per endpoint
//! admin    plain-HTTP listener: /metrics (metrics), /healthz, /readyz
//! healthcheck `registry-gate healthcheck`: /readyz, or a TLS handshake with the port
//! body     the response/request body type and the byte counting used by the log
//! users    `registry-gate user add|del|list`: edits htpasswd and group files atomically
//! ```
//!
//! Nothing here collects a blob in memory: bodies stream from one side to the other.

pub mod admin;
pub mod auth;
pub mod backend;
pub mod body;
pub mod cache;
pub mod config;
pub mod error;
pub mod gate;
pub mod healthcheck;
pub mod io;
pub mod lifecycle;
pub mod logging;
pub mod metrics;
pub mod notify;
pub mod pool;
pub mod proxy;
pub mod registry;
pub mod route;
pub mod server;
pub mod tls;
pub mod users;
pub mod watch;

/// The multi-threaded runtime the commands run on.
pub fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))
}

/// The header every response carries exactly once.
pub const API_VERSION_HEADER: &str = "docker-distribution-api-version";
/// Its value.
pub const API_VERSION: &str = "registry/2.0";
