//! Keep-alive HTTP/1.1 connections to the one upstream registry.
//!
//! The proxy talks to a single host over plain HTTP, so the pool is a stack of idle
//! connections behind a mutex: no per-request key hashing, no URI rewriting (requests
//! arrive in origin form), and a task to hand a connection back only for one still
//! busy when taken (an early answer to an upload). A connection goes back on the
//! stack when its response body has been read to the end; one whose response was
//! dropped half-read is closed (what is left of that body would have to be read
//! first).
//!
//! A pooled connection the upstream closed while it was idle is skipped when hyper has
//! seen the close, or found out before the request is written (hyper gives the request
//! back); either way the request goes on the next connection, as hyper-util's legacy
//! client does. A request that was written is never sent twice.

use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;

use crate::body::Body;

pub struct PoolConfig {
    /// `host:port`, resolved at each new connection (a name may move).
    pub authority: String,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_idle: usize,
    /// hyper's read buffer limit per connection.
    pub max_buf_size: usize,
}

/// Why a request got no response.
#[derive(Debug)]
pub enum SendError {
    /// No connection could be made (name lookup, refused, timed out).
    Connect(String),
    /// The connection failed while the request was written or the head awaited.
    Request(hyper::Error),
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SendError::Connect(e) => write!(f, "connect: {e}"),
            SendError::Request(e) => {
                // hyper's top-level message alone is vague ("connection error"): its
                // causes too, each once.
                let mut out = e.to_string();
                let mut source = std::error::Error::source(e);
                while let Some(s) = source {
                    let text = s.to_string();
                    if !out.contains(&text) {
                        out.push_str(": ");
                        out.push_str(&text);
                    }
                    source = s.source();
                }
                f.write_str(&out)
            }
        }
    }
}

impl SendError {
    pub fn is_connect(&self) -> bool {
        matches!(self, SendError::Connect(_))
    }
}

struct Idle {
    conn: SendRequest<Body>,
    since: Instant,
}

pub struct Pool {
    config: PoolConfig,
    /// Most recently used last: the next request takes the warmest connection.
    idle: Mutex<Vec<Idle>>,
}

impl Pool {
    /// Within a Tokio runtime, a task closes connections idle for longer than the
    /// idle timeout (it ends with the pool); without one, they are dropped when next
    /// taken.
    pub fn new(config: PoolConfig) -> Arc<Pool> {
        let pool = Arc::new(Pool {
            config,
            idle: Mutex::new(Vec::new()),
        });
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let every = (pool.config.idle_timeout / 2).max(Duration::from_millis(100));
            runtime.spawn(reap(Arc::downgrade(&pool), every));
        }
        pool
    }

    /// Sends `req` (origin-form URI, `Host` set by the caller) and returns the response
    /// head; the body streams from the connection and hands it back when read.
    pub async fn send(
        self: &Arc<Self>,
        mut req: Request<Body>,
    ) -> Result<Response<PooledBody>, SendError> {
        loop {
            let (mut conn, reused) = match self.take_idle().await {
                Some(conn) => (conn, true),
                None => (self.connect().await?, false),
            };
            match conn.try_send_request(req).await {
                Ok(resp) => {
                    let (parts, incoming) = resp.into_parts();
                    let body = PooledBody {
                        incoming,
                        conn: Some(conn),
                        pool: Arc::downgrade(self),
                    };
                    return Ok(Response::from_parts(parts, body));
                }
                Err(mut e) => match e.take_message() {
                    // Not written: a connection that looked alive was not. Another one.
                    Some(back) if reused => req = back,
                    _ => return Err(SendError::Request(e.into_error())),
                },
            }
        }
    }

    /// The most recently used idle connection that is still open and ready.
    async fn take_idle(self: &Arc<Self>) -> Option<SendRequest<Body>> {
        loop {
            let Idle { conn, since } = self.lock().pop()?;
            if since.elapsed() >= self.config.idle_timeout || conn.is_closed() {
                continue;
            }
            if conn.is_ready() {
                return Some(conn);
            }
            // Put back the moment its response ended, its connection task may not have
            // asked for the next request yet: a matter of microseconds, one yield.
            tokio::task::yield_now().await;
            if conn.is_ready() {
                return Some(conn);
            }
            // Still busy (its request body is still being sent after an early answer):
            // it comes back once ready, and this request does not wait for it.
            if !conn.is_closed() {
                self.put_when_ready(conn);
            }
        }
    }

    /// Called from `take_idle`, so always within the runtime.
    fn put_when_ready(self: &Arc<Self>, mut conn: SendRequest<Body>) {
        // The pool is not kept alive by the wait (an upload may go on for long).
        let pool = Arc::downgrade(self);
        tokio::spawn(async move {
            if conn.ready().await.is_ok()
                && let Some(pool) = pool.upgrade()
            {
                pool.put(conn);
            }
        });
    }

    async fn connect(&self) -> Result<SendRequest<Body>, SendError> {
        let tcp = connect_any(&self.config.authority, self.config.connect_timeout).await?;
        let (conn, connection) = http1::Builder::new()
            .max_buf_size(self.config.max_buf_size)
            .handshake(TokioIo::new(tcp))
            .await
            .map_err(SendError::Request)?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!("upstream connection ended: {e}");
            }
        });
        Ok(conn)
    }

    fn put(&self, conn: SendRequest<Body>) {
        let mut idle = self.lock();
        if idle.len() < self.config.max_idle {
            idle.push(Idle {
                conn,
                since: Instant::now(),
            });
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Idle>> {
        // The stack stays consistent whatever a panicking holder did (push and pop
        // only), so a poisoned lock is taken as it is.
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Idle connections now.
    #[cfg(test)]
    fn idle_count(&self) -> usize {
        self.lock().len()
    }
}

/// TCP to the first address of `authority` that accepts. `limit` covers the name
/// lookup and is shared among the addresses, so that one that drops packets (an AAAA
/// record of an IPv4-only host) leaves time for the next; every address's failure is
/// in the error.
async fn connect_any(authority: &str, limit: Duration) -> Result<tokio::net::TcpStream, SendError> {
    let started = Instant::now();
    let addrs: Vec<std::net::SocketAddr> =
        match tokio::time::timeout(limit, tokio::net::lookup_host(authority)).await {
            Ok(Ok(addrs)) => addrs.collect(),
            Ok(Err(e)) => {
                return Err(SendError::Connect(format!(
                    "cannot resolve {authority}: {e}"
                )));
            }
            Err(_) => {
                return Err(SendError::Connect(format!(
                    "cannot resolve {authority} within {} s",
                    limit.as_secs_f32()
                )));
            }
        };
    if addrs.is_empty() {
        return Err(SendError::Connect(format!(
            "{authority} resolves to no address"
        )));
    }
    let mut failures = Vec::new();
    for (i, addr) in addrs.iter().enumerate() {
        let left = limit.saturating_sub(started.elapsed());
        let share = left / (addrs.len() - i) as u32;
        match tokio::time::timeout(share, tokio::net::TcpStream::connect(addr)).await {
            Ok(Ok(tcp)) => {
                let _ = tcp.set_nodelay(true);
                let keepalive = socket2::TcpKeepalive::new().with_time(Duration::from_secs(60));
                let _ = socket2::SockRef::from(&tcp).set_tcp_keepalive(&keepalive);
                return Ok(tcp);
            }
            Ok(Err(e)) => failures.push(format!("{addr}: {e}")),
            Err(_) => failures.push(format!(
                "{addr}: no answer within {:.1} s",
                share.as_secs_f32()
            )),
        }
    }
    Err(SendError::Connect(failures.join("; ")))
}

async fn reap(pool: Weak<Pool>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(pool) = pool.upgrade() else { return };
        let limit = pool.config.idle_timeout;
        pool.lock()
            .retain(|i| i.since.elapsed() < limit && !i.conn.is_closed());
    }
}

/// A response body from the pool: hands its connection back once read to the end.
pub struct PooledBody {
    incoming: Incoming,
    conn: Option<SendRequest<Body>>,
    pool: Weak<Pool>,
}

impl std::fmt::Debug for PooledBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PooledBody")
            .field("incoming", &self.incoming)
            .field("pooled", &self.conn.is_some())
            .finish()
    }
}

impl PooledBody {
    /// The response is read: the connection goes back on the stack. hyper's connection
    /// task asks for the next request as soon as it has passed on the last bytes, so it
    /// is nearly always ready by the time it is taken; one that is not is set aside
    /// then (see `take_idle`), so that a pooled connection never keeps a request
    /// waiting. (`is_ready` is true only once the last exchange is over both ways:
    /// hyper >= 1.12 withdraws the ask when it takes a request; Cargo.toml requires it.)
    fn release(&mut self) {
        if let (Some(conn), Some(pool)) = (self.conn.take(), self.pool.upgrade())
            && !conn.is_closed()
        {
            pool.put(conn);
        }
    }
}

impl HttpBody for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.incoming).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => this.release(),
            Poll::Ready(Some(Ok(_))) if this.incoming.is_end_stream() => this.release(),
            // A failed body means a failed connection: dropped, not pooled.
            Poll::Ready(Some(Err(_))) => this.conn = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.incoming.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.incoming.size_hint()
    }
}

impl Drop for PooledBody {
    fn drop(&mut self) {
        // A body with nothing left (an empty 201, a HEAD's answer) is complete without
        // ever being polled.
        if self.incoming.is_end_stream() {
            self.release();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A plain HTTP/1.1 upstream answering every request with `body`, counting
    /// connections.
    async fn upstream(body: &'static [u8]) -> (String, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let mut have = Vec::new();
                    let mut skip = 0usize;
                    loop {
                        match tcp.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => have.extend_from_slice(&buf[..n]),
                        }
                        // Answer each head at once, then skip its body (a fixed
                        // length only): an early answer, before the body is read.
                        loop {
                            if skip > 0 {
                                let n = skip.min(have.len());
                                have.drain(..n);
                                skip -= n;
                                if skip > 0 {
                                    break;
                                }
                            }
                            let Some(end) = have.windows(4).position(|w| w == b"\r\n\r\n") else {
                                break;
                            };
                            let head = String::from_utf8_lossy(&have[..end]).to_lowercase();
                            have.drain(..end + 4);
                            skip = head
                                .lines()
                                .find_map(|l| l.strip_prefix("content-length:"))
                                .and_then(|v| v.trim().parse().ok())
                                .unwrap_or(0);
                            let len = if head.starts_with("head ") {
                                0
                            } else {
                                body.len()
                            };
                            let reply = format!(
                                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n",
                                body.len()
                            );
                            if tcp.write_all(reply.as_bytes()).await.is_err()
                                || tcp.write_all(&body[..len]).await.is_err()
                            {
                                return;
                            }
                        }
                    }
                });
            }
        });
        (addr.to_string(), accepted)
    }

    fn pool(authority: String) -> Arc<Pool> {
        Pool::new(PoolConfig {
            authority,
            connect_timeout: Duration::from_secs(2),
            idle_timeout: Duration::from_secs(30),
            max_idle: 4,
            max_buf_size: 64 * 1024,
        })
    }

    fn get(method: &str) -> Request<Body> {
        Request::builder()
            .method(method)
            .uri("/v2/")
            .header(http::header::HOST, "upstream")
            .body(crate::body::empty())
            .expect("request")
    }

    #[tokio::test]
    async fn a_connection_is_reused_once_its_body_is_read_and_not_when_it_is_dropped_half_read() {
        static BIG: [u8; 300_000] = [7u8; 300_000];
        let (addr, accepted) = upstream(&BIG).await;
        let pool = pool(addr);
        for _ in 0..5 {
            let resp = pool.send(get("GET")).await.expect("response");
            let body = resp.into_body().collect().await.expect("body").to_bytes();
            assert_eq!(body.len(), BIG.len());
        }
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            1,
            "one connection for 5 reads"
        );
        // A HEAD's empty answer hands the connection back without being polled.
        drop(pool.send(get("HEAD")).await.expect("HEAD"));
        idle_soon(&pool, 1).await;
        // Half read: that connection is closed, the next request gets a new one.
        let mut resp = pool.send(get("GET")).await.expect("response");
        let first = resp
            .body_mut()
            .frame()
            .await
            .expect("a frame")
            .expect("data");
        assert!(first.is_data());
        drop(resp);
        assert_eq!(pool.idle_count(), 0);
        let resp = pool.send(get("GET")).await.expect("response");
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        assert_eq!(body.len(), BIG.len());
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn the_pool_keeps_at_most_max_idle_and_refused_connects_say_so() {
        let (addr, accepted) = upstream(b"{}").await;
        let pool = pool(addr);
        let sent = futures_util::future::join_all((0..8).map(|_| pool.send(get("GET")))).await;
        let bodies: Vec<_> = sent.into_iter().map(|r| r.expect("response")).collect();
        assert_eq!(accepted.load(Ordering::SeqCst), 8);
        for resp in bodies {
            resp.into_body().collect().await.expect("body");
        }
        idle_soon(&pool, 4).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(pool.idle_count(), 4, "max_idle");

        let closed = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = closed.local_addr().expect("addr").to_string();
        drop(closed);
        let err = pool_to(&addr).send(get("GET")).await.expect_err("refused");
        assert!(err.is_connect(), "{err}");
        assert!(err.to_string().contains(&addr), "{err}");
    }

    /// The pool holds `n` idle connections within a second (one still sending its
    /// request body is put back by a task of its own once done).
    async fn idle_soon(pool: &Pool, n: usize) {
        for _ in 0..100 {
            if pool.idle_count() == n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(pool.idle_count(), n, "idle connections");
    }

    /// A request body fed by the test.
    struct Fed(tokio::sync::mpsc::Receiver<Bytes>);

    impl HttpBody for Fed {
        type Data = Bytes;
        type Error = crate::body::BoxError;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            self.0.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b))))
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_answer_before_the_request_body_is_sent_does_not_make_the_next_request_wait() {
        let (addr, accepted) = upstream(b"{}").await;
        let pool = pool(addr);
        let (feed, rx) = tokio::sync::mpsc::channel(1);
        let upload = Request::builder()
            .method("PATCH")
            .uri("/v2/a/blobs/uploads/1")
            .header(http::header::HOST, "upstream")
            .header(http::header::CONTENT_LENGTH, "10")
            .body(crate::body::boxed(Fed(rx)))
            .expect("request");
        feed.send(Bytes::from_static(b"01234")).await.expect("feed");
        let resp = tokio::time::timeout(Duration::from_secs(5), pool.send(upload))
            .await
            .expect("the early answer")
            .expect("response");
        resp.into_body().collect().await.expect("body");
        // The first connection still sends its request body: the next request must
        // not be given it (it would wait for the upload), but a new one.
        let resp = tokio::time::timeout(Duration::from_secs(5), pool.send(get("GET")))
            .await
            .expect("a request while the upload goes on is not kept waiting")
            .expect("response");
        resp.into_body().collect().await.expect("body");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        // Once the upload's body is sent, its connection is pooled again.
        feed.send(Bytes::from_static(b"56789")).await.expect("feed");
        drop(feed);
        idle_soon(&pool, 2).await;
        for _ in 0..4 {
            let resp = pool.send(get("GET")).await.expect("response");
            resp.into_body().collect().await.expect("body");
        }
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            2,
            "both connections reused"
        );
    }

    fn pool_to(addr: &str) -> Arc<Pool> {
        pool(addr.to_owned())
    }
}
