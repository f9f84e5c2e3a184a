//! The body type that flows through the gate, and a wrapper that counts bytes and
//! notices when a body is finished or dropped (the access log is written then, so it
//! reports what really went over the wire).

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt;
use http_body_util::combinators::BoxBody;

/// Errors inside a streaming body.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Every request and response body in the gate: streamed, boxed once.
pub type Body = BoxBody<Bytes, BoxError>;

/// A body with the whole content at hand (error JSON, small answers).
pub fn full(data: impl Into<Bytes>) -> Body {
    http_body_util::Full::new(data.into())
        .map_err(|never| match never {})
        .boxed()
}

/// A JSON answer with its status, content type and length.
pub fn json_response(status: http::StatusCode, json: String) -> http::Response<Body> {
    let len = json.len();
    let mut resp = http::Response::new(full(json));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    h.insert(http::header::CONTENT_LENGTH, http::HeaderValue::from(len));
    resp
}

/// An empty body.
pub fn empty() -> Body {
    http_body_util::Empty::new()
        .map_err(|never| match never {})
        .boxed()
}

/// Box any body whose error converts into [`BoxError`].
pub fn boxed<B>(body: B) -> Body
where
    B: HttpBody<Data = Bytes> + Send + Sync + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed()
}

/// Read a whole body that must be small (a catalog page, a form), refusing one
/// longer than `limit` bytes without reading further.
pub async fn collect_limited(mut body: Body, limit: usize) -> Result<Bytes, BoxError> {
    let mut buf = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            if buf.len() + data.len() > limit {
                return Err(format!("longer than {limit} bytes").into());
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok(buf.freeze())
}

/// What a [`Counted`] body reports: the length of every data frame as it passes, then
/// its end, once: `true` when it reached its end, `false` when it failed or was
/// dropped before.
pub trait OnEnd: Send + Sync + 'static {
    fn counted(&mut self, _bytes: u64) {}
    fn ended(&mut self, complete: bool);
}

/// Counts into a counter shared with whoever reads it while the body still flows (a
/// request body's length, read when the backend has answered).
pub struct SharedCount(pub Arc<AtomicU64>);

impl OnEnd for SharedCount {
    fn counted(&mut self, bytes: u64) {
        self.0.fetch_add(bytes, Ordering::Relaxed);
    }

    fn ended(&mut self, _complete: bool) {}
}

/// A body that reports its data frames and its end to `E`, kept inline (nothing is
/// allocated for it).
pub struct Counted<B: HttpBody, E: OnEnd> {
    inner: B,
    on_end: Option<E>,
}

impl<B: HttpBody, E: OnEnd> Counted<B, E> {
    pub fn new(inner: B, on_end: E) -> Self {
        Counted {
            inner,
            on_end: Some(on_end),
        }
    }

    fn finish(&mut self, complete: bool) {
        if let Some(mut on_end) = self.on_end.take() {
            on_end.ended(complete);
        }
    }
}

impl<B, E> HttpBody for Counted<B, E>
where
    B: HttpBody<Data = Bytes> + Unpin,
    E: OnEnd + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(data), Some(on_end)) = (frame.data_ref(), this.on_end.as_mut()) {
                    on_end.counted(data.len() as u64);
                }
                if this.inner.is_end_stream() {
                    this.finish(true);
                }
            }
            Poll::Ready(Some(Err(_))) => this.finish(false),
            Poll::Ready(None) => this.finish(true),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B: HttpBody, E: OnEnd> Drop for Counted<B, E> {
    fn drop(&mut self) {
        // An empty body (HEAD, 202 without content) is complete without being polled.
        let complete = self.inner.is_end_stream();
        self.finish(complete);
    }
}

/// The body length a message announces (`Content-Length`), if it is a number.
pub fn content_length(h: &http::HeaderMap) -> Option<u64> {
    h.get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    struct Record(Arc<Mutex<Vec<(u64, bool)>>>, u64);
    impl OnEnd for Record {
        fn counted(&mut self, bytes: u64) {
            self.1 += bytes;
        }
        fn ended(&mut self, complete: bool) {
            self.0.lock().expect("lock").push((self.1, complete));
        }
    }

    #[tokio::test]
    async fn counts_and_reports_once() {
        let ends = Arc::new(Mutex::new(Vec::new()));
        let counter = Arc::new(AtomicU64::new(0));
        let body = Counted::new(full("hello world"), SharedCount(counter.clone()));
        let bytes = body.collect().await.expect("collect").to_bytes();
        assert_eq!(bytes.len(), 11);
        assert_eq!(counter.load(Ordering::Relaxed), 11);
        let body = Counted::new(full("hello world"), Record(ends.clone(), 0));
        let bytes = body.collect().await.expect("collect").to_bytes();
        assert_eq!(bytes.len(), 11);
        assert_eq!(*ends.lock().expect("lock"), vec![(11, true)]);
    }

    #[tokio::test]
    async fn dropped_early_reports_incomplete() {
        let ends = Arc::new(Mutex::new(Vec::new()));
        let body = Counted::new(full("x"), Record(ends.clone(), 0));
        drop(body);
        assert_eq!(*ends.lock().expect("lock"), vec![(0, false)]);
    }
}
