//! The listener: accept loop with a connection cap, TLS handshake with a timeout,
//! HTTP/1.1 and HTTP/2 (by ALPN) on one port, idle timeouts, SIGHUP → reload,
//! and graceful shutdown that lets in-flight transfers finish up to a deadline.
//!
//! `serve` takes an already-bound listener and a shutdown future, so tests drive the
//! real thing on `127.0.0.1:0`.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio_rustls::TlsAcceptor;

use crate::admin::Admin;
use crate::auth::Authenticator;
use crate::auth::policy::Policy;
use crate::auth::token::{TokenKey, TokenKeys};
use crate::backend::Backend;
use crate::config::Config;
use crate::gate::{Gate, TokenSettings};
use crate::io::{IdleTimeout, Lingering, OciParseErrors, linger};
use crate::metrics::Metrics;
use crate::proxy::Proxy;
use crate::registry::Registry;
use crate::tls::{self, CertStore};

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("password files: {0}")]
    Auth(#[from] crate::auth::htpasswd::LoadError),
    #[error("upstream: {0}")]
    Upstream(String),
    #[error("{0}")]
    Backend(String),
    #[error("signal handler: {0}")]
    Signal(std::io::Error),
}

/// Pending connections the kernel may queue for `accept`. tokio's `bind` asks for
/// 1024; a burst of new TLS clients (a CI fleet pulling at once, or the benchmark's
/// 1000 simultaneous handshakes) overflowed it, and every dropped SYN costs the
/// client a 1 s retransmit. The kernel caps it at `net.core.somaxconn`.
const LISTEN_BACKLOG: u32 = 4096;

/// Bind the gate's TCP listener: `SO_REUSEADDR` (a restart does not wait for old
/// connections in TIME_WAIT) and a deep accept queue.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Everything one connection needs, shared by all.
struct Shared {
    gate: Gate,
    acceptor: TlsAcceptor,
    http: auto::Builder<TokioExecutor>,
    handshake_timeout: Duration,
    idle_timeout: Duration,
}

/// Run the gate on `listener` until `shutdown` resolves, then drain. The admin
/// listener, when configured, is bound here.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let admin = match &config.admin {
        Some(a) => Some(TcpListener::bind(a.listen).await.map_err(|e| {
            ServeError::Backend(format!("cannot listen on admin {}: {e}", a.listen))
        })?),
        None => None,
    };
    serve_with(config, listener, admin, shutdown).await
}

/// [`serve`] with the admin listener already bound (tests bind `127.0.0.1:0`).
pub async fn serve_with(
    config: Config,
    listener: TcpListener,
    admin_listener: Option<TcpListener>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let metrics = Arc::new(Metrics::new());
    let pair = tls::load_pair(&config.tls.certificate, &config.tls.private_key)?;
    let summary = tls::summarize(&pair);
    tracing::info!("{}", summary.line());
    for warning in summary.warnings(config.public_url.as_deref()) {
        tracing::warn!("{warning}");
    }
    let certs = Arc::new(CertStore::new(pair, metrics.clone()));
    let tls_config = tls::server_config(certs.clone())?;

    let auth = match &config.auth {
        Some(a) => Some(Arc::new(Authenticator::load(a)?)),
        None => None,
    };
    let notifier = if config.notifications.is_empty() {
        None
    } else {
        let port = listener.local_addr().map_or(0, |a| a.port());
        Some(
            crate::notify::Notifier::start(&config.notifications, port, metrics.clone())
                .map_err(ServeError::Backend)?,
        )
    };
    let mut background = Vec::new();
    let backend: Arc<dyn Backend> = match (&config.upstream, &config.storage) {
        (Some(up), _) => {
            let proxy = Proxy::new(up, metrics.clone()).map_err(ServeError::Upstream)?;
            match &config.cache {
                Some(cache) => Arc::new(
                    crate::cache::CachingProxy::new(proxy, cache, metrics.clone())
                        .map_err(ServeError::Upstream)?,
                ),
                None => Arc::new(proxy),
            }
        }
        (None, Some(storage)) => {
            let registry = Arc::new(Registry::open(storage).map_err(ServeError::Backend)?);
            // A store that refuses us (wrong key, no such bucket) is a configuration
            // error; one that cannot be reached yet may come back: serve, not ready.
            match registry.store().storage().check().await {
                Ok(()) => {}
                Err(e @ crate::registry::storage::StorageError::Refused { .. }) => {
                    return Err(ServeError::Backend(format!("storage: {e}")));
                }
                Err(e) => tracing::error!("storage not usable yet (serving, not ready): {e}"),
            }
            background.push(
                registry.spawn_upload_purger(Duration::from_secs(storage.purge_uploads_after_secs)),
            );
            // Sampling walks every blob: rarely on an object store, where it is requests.
            let sample_every = if storage.s3.is_some() { 600 } else { 60 };
            background
                .push(registry.spawn_sampler(metrics.clone(), Duration::from_secs(sample_every)));
            if storage.gc_interval_secs > 0 {
                background.push(registry.spawn_gc(
                    Duration::from_secs(storage.gc_interval_secs),
                    storage.gc_delete_untagged,
                    Duration::from_secs(storage.gc_grace_secs),
                ));
            }
            if storage.prune_interval_secs > 0 {
                background.push(registry.spawn_prune(
                    Duration::from_secs(storage.prune_interval_secs),
                    Arc::new(config.lifecycle()),
                    Duration::from_secs(storage.gc_grace_secs),
                    notifier.clone(),
                ));
            }
            registry
        }
        (None, None) => {
            return Err(ServeError::Backend(
                "configure [upstream] url or [storage] root".into(),
            ));
        }
    };
    tracing::info!(backend = %backend.describe(), "serving /v2");
    if let Some(listener) = admin_listener {
        let admin = Arc::new(Admin {
            metrics: metrics.clone(),
            backend: backend.clone(),
            certs: certs.clone(),
        });
        background.push(tokio::spawn(crate::admin::run(listener, admin)));
    }

    // Reloads: file changes and SIGHUP.
    let (hup_tx, hup_rx) = watch::channel(0u64);
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .map_err(ServeError::Signal)?;
    let hup_task = tokio::spawn(async move {
        let mut n = 0u64;
        while hup.recv().await.is_some() {
            n += 1;
            tracing::info!("SIGHUP: reloading certificate and password files");
            if hup_tx.send(n).is_err() {
                return;
            }
        }
    });
    let interval = Duration::from_millis(config.watch_interval_ms);
    let mut reloaders = vec![tls::spawn_reloader(
        certs,
        config.tls.certificate.clone(),
        config.tls.private_key.clone(),
        interval,
        hup_rx.clone(),
    )];
    if let Some(auth) = &auth {
        let a = auth.clone();
        reloaders.push(crate::watch::spawn_reloader(
            "auth",
            auth.paths(),
            interval,
            hup_rx.clone(),
            move || {
                a.reload();
            },
        ));
    }

    let policy = Policy::new(
        config.auth.as_ref().map(|a| a.push_group.clone()),
        &config.rules,
    );
    let token_keys = Arc::new(TokenKeys::new(
        match &config.token.key_file {
            Some(path) => {
                TokenKey::from_file(path).map_err(|e| ServeError::Backend(e.to_string()))?
            }
            None => TokenKey::random(),
        },
        config.token.expires_secs,
    ));
    if let Some(path) = &config.token.key_file {
        let (keys, path) = (token_keys.clone(), path.clone());
        let lifetime = config.token.expires_secs;
        reloaders.push(crate::watch::spawn_reloader(
            "token key",
            vec![path.clone()],
            interval,
            hup_rx,
            move || match TokenKey::from_file(&path) {
                Ok(key) => {
                    if keys.rotate(key, crate::auth::token::now_secs()) {
                        tracing::info!(
                            "token key changed: new tokens are signed with it; tokens of the \
                             previous key are accepted for {lifetime} s more"
                        );
                    }
                }
                Err(e) => tracing::error!("{e}; keeping the current token key"),
            },
        ));
    }
    let tokens = TokenSettings {
        key: token_keys,
        path: config.token.path.clone(),
        service: config.token.service.clone(),
        lifetime: Duration::from_secs(config.token.expires_secs),
        basic_realm: config
            .auth
            .as_ref()
            .map_or_else(|| "registry-gate".to_owned(), |a| a.realm.clone()),
    };
    let public_url = config
        .public_url
        .as_deref()
        .map(|u| u.trim_end_matches('/').to_owned());
    let gate = Gate::new(backend, auth, policy, public_url, tokens, metrics.clone())
        .with_lifecycle(Arc::new(config.lifecycle()))
        .with_notifier(notifier.clone());

    let mut http = auto::Builder::new(TokioExecutor::new());
    http.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(config.server.header_read_timeout_secs))
        .max_headers(100)
        // Bounds the read buffer (a request head, or body bytes waiting for the
        // backend): memory per connection stays small with many connections.
        .max_buf_size(64 * 1024)
        .keep_alive(true);
    http.http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(256)
        // Rapid reset (CVE-2023-44487) and its server-side twin: a connection whose
        // peer resets more than 20 streams before they are served, or provokes more
        // than 1024 resets by the gate, ends with GOAWAY (hyper's defaults, stated
        // here because tests/hostile.rs relies on them).
        .max_pending_accept_reset_streams(20)
        .max_local_error_reset_streams(1024)
        .max_header_list_size(64 * 1024)
        .initial_stream_window_size(1024 * 1024)
        .initial_connection_window_size(4 * 1024 * 1024);

    let shared = Arc::new(Shared {
        gate,
        acceptor: TlsAcceptor::from(Arc::new(tls_config)),
        http,
        handshake_timeout: Duration::from_secs(config.tls.handshake_timeout_secs),
        idle_timeout: Duration::from_secs(config.server.idle_timeout_secs),
    });

    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "listening");
    }
    let graceful = GracefulShutdown::new();
    let limit = Arc::new(Semaphore::new(config.server.max_connections));
    let at_limit = AtomicBool::new(false);
    tokio::pin!(shutdown);
    loop {
        if limit.available_permits() == 0 && !at_limit.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                max_connections = config.server.max_connections,
                "connection limit reached; new connections wait"
            );
        }
        let permit = tokio::select! {
            _ = &mut shutdown => break,
            p = limit.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let accepted = tokio::select! {
            _ = &mut shutdown => break,
            a = listener.accept() => a,
        };
        let (tcp, peer) = match accepted {
            // IPv4 clients of a `[::]` listener appear as ::ffff:a.b.c.d: log and
            // throttle them by their IPv4 address.
            Ok((tcp, peer)) => (tcp, SocketAddr::new(peer.ip().to_canonical(), peer.port())),
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::error!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if limit.available_permits() > 0 {
            at_limit.store(false, Ordering::Relaxed);
        }
        let shared = shared.clone();
        let watcher = graceful.watcher();
        let open = metrics.connections.clone();
        open.inc();
        tokio::spawn(async move {
            serve_connection(shared, tcp, peer, watcher).await;
            open.dec();
            drop(permit);
        });
    }

    drop(listener);
    let grace = Duration::from_secs(config.server.shutdown_grace_secs);
    tracing::info!(
        open = graceful.count(),
        "shutting down; draining connections"
    );
    let draining = std::time::Instant::now();
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("shutdown deadline passed; closing remaining connections");
    }
    // What was queued for webhooks goes out before the process ends: the rest of the
    // grace period, and never less than 5 s.
    if let Some(notifier) = &notifier {
        let left = grace
            .saturating_sub(draining.elapsed())
            .max(Duration::from_secs(5));
        notifier.drain(left).await;
    }
    hup_task.abort();
    for r in reloaders.into_iter().chain(background) {
        r.abort();
    }
    Ok(())
}

async fn serve_connection(
    shared: Arc<Shared>,
    tcp: TcpStream,
    peer: SocketAddr,
    watcher: hyper_util::server::graceful::Watcher,
) {
    let _ = tcp.set_nodelay(true);
    let tls =
        match tokio::time::timeout(shared.handshake_timeout, shared.acceptor.accept(tcp)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                tracing::debug!("{peer}: TLS handshake failed: {e}");
                return;
            }
            Err(_) => {
                tracing::debug!("{peer}: TLS handshake timed out");
                return;
            }
        };
    let (tls, closed) = Lingering::new(tls);
    let io = TokioIo::new(OciParseErrors::new(IdleTimeout::new(
        tls,
        shared.idle_timeout,
    )));
    let svc_shared = shared.clone();
    let service = service_fn(move |req| {
        let shared = svc_shared.clone();
        async move { Ok::<_, Infallible>(shared.gate.handle(req, peer).await) }
    });
    let conn = shared.http.serve_connection(io, service).into_owned();
    if let Err(e) = watcher.watch(conn).await {
        tracing::debug!("{peer}: connection ended: {e}");
    }
    // Closed by the gate while the client may still be sending: read what comes
    // (below TLS: the gate's close_notify is sent) so the client is not reset
    // before it reads the answer. The connection still counts against the cap.
    if let Ok(tls) = closed.await {
        linger(tls.into_inner().0).await;
    }
}
