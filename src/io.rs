//! Connection wrappers.
//!
//! [`IdleTimeout`] closes connections on which nothing moves. The timer restarts
//! whenever a read or a write makes progress, so a slow but moving 5 GiB transfer is
//! never cut, while an idle keep-alive connection or a transfer that stalled in either
//! direction is closed after `idle`.
//!
//! [`OciParseErrors`] turns the answer hyper writes by itself to an HTTP/1 request it
//! cannot parse (a bare 400, 414 or 431 with no body, before any service sees the
//! request) into OCI error JSON with the API-version header, like every other error
//! the gate sends.
//!
//! [`Lingering`] hands a connection the gate has closed, while the client may still
//! be sending, to [`linger`]: the rest of what the client sends is read and thrown
//! away for a while before the socket is closed, so the client reads the answer
//! instead of being reset (a refusal answered before the body was read).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

pub struct IdleTimeout<T> {
    inner: T,
    idle: Duration,
    /// Armed for `idle` after some progress, not necessarily the last one: moving
    /// the timer on every read and write (a timer-wheel removal and insertion each)
    /// cost more than the rest of the wrapper; it is moved on when it fires instead.
    timer: Pin<Box<Sleep>>,
    last_progress: Instant,
}

impl<T> IdleTimeout<T> {
    pub fn new(inner: T, idle: Duration) -> Self {
        IdleTimeout {
            inner,
            idle,
            timer: Box::pin(tokio::time::sleep(idle)),
            last_progress: Instant::now(),
        }
    }

    pub fn get_ref(&self) -> &T {
        &self.inner
    }

    fn progress(&mut self) {
        self.last_progress = Instant::now();
    }

    fn check(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        loop {
            match self.timer.as_mut().poll(cx) {
                Poll::Pending => return Ok(()),
                Poll::Ready(()) => {
                    let deadline = self.last_progress + self.idle;
                    if deadline <= Instant::now() {
                        return Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "connection idle for too long",
                        ));
                    }
                    // Something moved since it was armed: idle only from then on.
                    self.timer.as_mut().reset(deadline);
                }
            }
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for IdleTimeout<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(r) => {
                this.progress();
                Poll::Ready(r)
            }
            Poll::Pending => {
                this.check(cx)?;
                Poll::Pending
            }
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for IdleTimeout<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_write(cx, buf) {
            Poll::Ready(r) => {
                this.progress();
                Poll::Ready(r)
            }
            Poll::Pending => {
                this.check(cx)?;
                Poll::Pending
            }
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_write_vectored(cx, bufs) {
            Poll::Ready(r) => {
                this.progress();
                Poll::Ready(r)
            }
            Poll::Pending => {
                this.check(cx)?;
                Poll::Pending
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_flush(cx) {
            Poll::Ready(r) => Poll::Ready(r),
            Poll::Pending => {
                this.check(cx)?;
                Poll::Pending
            }
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

pub struct OciParseErrors<T> {
    inner: T,
    /// A replacement answer accepted from hyper and not yet fully written.
    pending: Option<(Vec<u8>, usize)>,
}

impl<T> OciParseErrors<T> {
    pub fn new(inner: T) -> Self {
        OciParseErrors {
            inner,
            pending: None,
        }
    }
}

/// The status of hyper's automatic answer to an unparsable request, if `head` is
/// one: a whole response head with status 400, 414 or 431 and `content-length: 0`,
/// lacking the API-version header the gate puts on every response it writes itself
/// (so a response of the gate or of the upstream is never taken for one).
fn hyper_parse_error(head: &[u8]) -> Option<(u16, &'static str)> {
    let rest = head.strip_prefix(b"HTTP/1.1 ")?;
    let status = match rest.get(..4)? {
        b"400 " => (400, "Bad Request"),
        b"414 " => (414, "URI Too Long"),
        b"431 " => (431, "Request Header Fields Too Large"),
        _ => return None,
    };
    let lower = head.to_ascii_lowercase();
    let has = |needle: &[u8]| lower.windows(needle.len()).any(|w| w == needle);
    (head.ends_with(b"\r\n\r\n")
        && has(b"\r\ncontent-length: 0\r\n")
        && !has(b"\r\ndocker-distribution-api-version:"))
    .then_some(status)
}

/// The OCI error answer that replaces hyper's; the connection closes after it, as
/// it does after hyper's.
fn oci_parse_error(status: u16, reason: &str) -> Vec<u8> {
    let message = match status {
        414 => "the request target is too long",
        431 => "the request head (request line and headers) is too large",
        _ => "the request could not be parsed as HTTP/1.1 (request line or a header is malformed)",
    };
    let body = crate::error::OciError::new(crate::error::ErrorCode::Unknown, message).body_json();
    format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json; charset=utf-8\r\n\
         docker-distribution-api-version: registry/2.0\r\ncontent-length: {}\r\n\
         connection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

impl<T: AsyncWrite + Unpin> OciParseErrors<T> {
    /// Write what is left of a replacement answer.
    fn poll_pending(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some((bytes, written)) = &mut self.pending {
            if *written == bytes.len() {
                self.pending = None;
                break;
            }
            match Pin::new(&mut self.inner).poll_write(cx, &bytes[*written..]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => *written += n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Take `buf` as written if it is hyper's answer to an unparsable request, queueing
    /// the OCI answer in its place.
    fn replace(&mut self, buf: &[u8]) -> bool {
        match hyper_parse_error(buf) {
            Some((status, reason)) => {
                self.pending = Some((oci_parse_error(status, reason), 0));
                true
            }
            None => false,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for OciParseErrors<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for OciParseErrors<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        std::task::ready!(this.poll_pending(cx))?;
        if this.replace(buf) {
            return Poll::Ready(Ok(buf.len()));
        }
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        std::task::ready!(this.poll_pending(cx))?;
        // hyper's answer is a head alone: one non-empty buffer.
        let mut non_empty = bufs.iter().filter(|b| !b.is_empty());
        if let (Some(only), None) = (non_empty.next(), non_empty.next())
            && this.replace(only)
        {
            return Poll::Ready(Ok(only.len()));
        }
        Pin::new(&mut this.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        std::task::ready!(this.poll_pending(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        std::task::ready!(this.poll_pending(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

/// How long [`linger`] waits for more from the client before it closes.
const LINGER_QUIET: Duration = Duration::from_secs(2);
/// How long [`linger`] reads at most.
const LINGER_MAX: Duration = Duration::from_secs(30);

/// A connection that, dropped after the gate shut down its writing side and before
/// the client ended its own, goes to `handoff` instead of being closed: closing a
/// socket with unread data sends a reset, and a client still writing its request
/// (a 5 MiB manifest refused with 413 after 4 MiB, a push refused with 401 before
/// its body is read) then loses the answer it has not read yet ("broken pipe").
/// HTTP/1 has no other way to refuse a body but to answer and close.
pub struct Lingering<T> {
    inner: Option<T>,
    /// The gate's side is shut (`poll_shutdown` completed).
    shut: bool,
    /// The client's side ended (a read returned nothing).
    ended: bool,
    handoff: Option<tokio::sync::oneshot::Sender<T>>,
}

impl<T> Lingering<T> {
    pub fn new(inner: T) -> (Self, tokio::sync::oneshot::Receiver<T>) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let this = Lingering {
            inner: Some(inner),
            shut: false,
            ended: false,
            handoff: Some(tx),
        };
        (this, rx)
    }

    fn inner(&mut self) -> io::Result<Pin<&mut T>>
    where
        T: Unpin,
    {
        match self.inner.as_mut() {
            Some(inner) => Ok(Pin::new(inner)),
            None => Err(io::Error::other("connection already handed off")),
        }
    }
}

impl<T> Drop for Lingering<T> {
    fn drop(&mut self) {
        if self.shut
            && !self.ended
            && let (Some(inner), Some(tx)) = (self.inner.take(), self.handoff.take())
        {
            let _ = tx.send(inner);
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Lingering<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = std::task::ready!(self.inner()?.poll_read(cx, buf));
        if r.is_err() || buf.filled().len() == before {
            self.ended = true;
        }
        Poll::Ready(r)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Lingering<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.inner()?.poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.inner()?.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.as_ref().is_some_and(|i| i.is_write_vectored())
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.inner()?.poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = std::task::ready!(self.inner()?.poll_shutdown(cx));
        if r.is_ok() {
            self.shut = true;
        }
        Poll::Ready(r)
    }
}

/// Read and drop what the client still sends on a connection whose writing side the
/// gate has shut, until the client closes its side, is quiet for [`LINGER_QUIET`],
/// or [`LINGER_MAX`] has passed (what nginx calls a lingering close). Then the
/// socket is closed.
pub async fn linger<T: AsyncRead + Unpin>(mut stream: T) {
    use tokio::io::AsyncReadExt as _;
    let started = Instant::now();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let left = LINGER_MAX.saturating_sub(started.elapsed());
        if left.is_zero() {
            break;
        }
        match tokio::time::timeout(LINGER_QUIET.min(left), stream.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => break,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn only_hyper_own_parse_error_answers_are_replaced() {
        let hyper_400 = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\ndate: Sun, 22 Nov 2026 18:00:00 GMT\r\n\r\n";
        assert_eq!(hyper_parse_error(hyper_400), Some((400, "Bad Request")));
        let hyper_431 =
            b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\n\r\n";
        assert_eq!(hyper_parse_error(hyper_431).map(|s| s.0), Some(431));
        // The gate's own answers (and the upstream's, passed on) carry the header.
        let ours = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\ndocker-distribution-api-version: registry/2.0\r\n\r\n";
        assert_eq!(hyper_parse_error(ours), None);
        // A head followed by body bytes, another status, a partial head: untouched.
        assert_eq!(
            hyper_parse_error(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 2\r\n\r\n{}"),
            None
        );
        assert_eq!(
            hyper_parse_error(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n"),
            None
        );
        assert_eq!(
            hyper_parse_error(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n"),
            None
        );
    }

    #[tokio::test]
    async fn the_replacement_is_written_whole_through_a_narrow_pipe() {
        let (a, mut b) = tokio::io::duplex(7);
        let mut a = OciParseErrors::new(a);
        let reader = tokio::spawn(async move {
            let mut all = Vec::new();
            b.read_to_end(&mut all).await.expect("read");
            all
        });
        let head = b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\n\r\n";
        a.write_all(head).await.expect("write");
        a.flush().await.expect("flush");
        a.shutdown().await.expect("shutdown");
        drop(a);
        let all = String::from_utf8(reader.await.expect("reader")).expect("utf-8");
        let (head, body) = all.split_once("\r\n\r\n").expect("head and body");
        assert!(head.starts_with("HTTP/1.1 431 "), "{all}");
        assert!(
            head.contains("docker-distribution-api-version: registry/2.0"),
            "{all}"
        );
        assert!(
            head.contains(&format!("content-length: {}", body.len())),
            "{all}"
        );
        let json: serde_json::Value = serde_json::from_str(body).expect("json");
        assert_eq!(json["errors"][0]["code"], "UNKNOWN");
    }

    #[tokio::test]
    async fn only_a_connection_shut_by_us_and_not_by_the_peer_is_handed_off() {
        // Shut by us, the peer still sending: handed off.
        let (a, _b) = tokio::io::duplex(64);
        let (mut a, rx) = Lingering::new(a);
        a.shutdown().await.expect("shutdown");
        drop(a);
        assert!(rx.await.is_ok());
        // The peer ended first: closed at once.
        let (a, b) = tokio::io::duplex(64);
        let (mut a, rx) = Lingering::new(a);
        drop(b);
        let mut buf = [0u8; 4];
        assert_eq!(a.read(&mut buf).await.expect("eof"), 0);
        a.shutdown().await.expect("shutdown");
        drop(a);
        assert!(rx.await.is_err());
        // Never shut by us (an error, a timeout): closed at once.
        let (a, _b) = tokio::io::duplex(64);
        let (a, rx) = Lingering::new(a);
        drop(a);
        assert!(rx.await.is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn linger_reads_until_the_peer_is_quiet() {
        let (a, mut b) = tokio::io::duplex(64);
        let writer = tokio::spawn(async move {
            for _ in 0..10 {
                b.write_all(&[0u8; 1000]).await.expect("write");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            // Then quiet, the connection still open.
            tokio::time::sleep(Duration::from_secs(3600)).await;
        });
        let started = Instant::now();
        linger(a).await;
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(4500) && took < Duration::from_secs(8),
            "{took:?}"
        );
        writer.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn idle_read_times_out_and_progress_resets() {
        let (a, mut b) = tokio::io::duplex(64);
        let mut a = IdleTimeout::new(a, Duration::from_secs(10));
        let mut buf = [0u8; 4];
        let started = Instant::now();
        let writer = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(8)).await;
            b.write_all(b"ping").await.expect("write");
            tokio::time::sleep(Duration::from_secs(60)).await;
            drop(b);
        });
        // 8 s of silence is under the limit.
        a.read_exact(&mut buf).await.expect("first read");
        // Then silence longer than the limit.
        let err = a.read(&mut buf).await.expect_err("times out");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        // Idle from the read at 8 s: not at 10 s, when the first arming fired.
        let at = started.elapsed();
        assert!(
            at >= Duration::from_secs(18) && at < Duration::from_secs(19),
            "timed out at {at:?}"
        );
        writer.abort();
    }
}
