//! A request body under the policy's body timeout, counted on its connection until it ends.

use std::error::Error as StdError;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::time::Sleep;

use super::activity::OpenBody;
use super::BoxError;

/// A request body under the policy's body timeout: each frame must come within it of the last
/// (or of the first read).
pub struct RequestBody {
    inner: Incoming,
    timeout: Duration,
    sleep: Option<Pin<Box<Sleep>>>,
    /// Counts the body as unread on its connection until it ends.
    _open: Option<OpenBody>,
}

/// The error a [`RequestBody`] ends with when the client stops sending it.
#[derive(Debug, thiserror::Error)]
#[error("the request body stalled: nothing received for {} s", .0.as_secs_f64())]
pub struct BodyTimeout(pub Duration);

impl BodyTimeout {
    /// Whether `error`, or one of its causes, is a body timeout.
    pub fn is_cause_of(error: &(dyn StdError + 'static)) -> bool {
        let mut source = Some(error);
        while let Some(cause) = source {
            if cause.is::<BodyTimeout>() {
                return true;
            }
            source = cause.source();
        }
        false
    }
}

impl RequestBody {
    pub fn new(inner: Incoming, timeout: Duration) -> Self {
        Self { inner, timeout, sleep: None, _open: None }
    }

    /// A body counted on its connection by `open` until it ends.
    pub(super) fn counted(inner: Incoming, timeout: Duration, open: Option<OpenBody>) -> Self {
        Self { inner, timeout, sleep: None, _open: open }
    }
}

impl Drop for RequestBody {
    fn drop(&mut self) {
        // A consumer may stop at `is_end_stream` without polling for the end.
        if let Some(open) = self._open.as_mut() {
            open.ended |= self.inner.is_end_stream();
        }
    }
}

impl Body for RequestBody {
    type Data = bytes::Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Self::Data>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                this.sleep = None;
                if frame.is_none() {
                    if let Some(open) = this._open.as_mut() {
                        open.ended = true;
                    }
                }
                if !matches!(frame, Some(Ok(_))) {
                    this._open = None;
                }
                Poll::Ready(frame.map(|f| f.map_err(BoxError::from)))
            }
            Poll::Pending => {
                let timeout = this.timeout;
                let sleep = this.sleep.get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                match sleep.as_mut().poll(cx) {
                    Poll::Ready(()) => {
                        this.sleep = None;
                        Poll::Ready(Some(Err(BodyTimeout(timeout).into())))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
