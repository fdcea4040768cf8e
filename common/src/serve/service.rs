//! The per-connection service: request bodies under the body timeout, requests counted in flight
//! on their connection and, when the policy bounds them, across its listeners.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::header::{self, HeaderValue};
use hyper::service::Service;
use hyper::{Request, Response, StatusCode, Version};

use super::activity::{Activity, InFlight, OpenBody};
use super::body::RequestBody;
use super::BoxError;

/// Requests in flight across the listeners of one policy, and the most there may be. Past it,
/// an HTTP/2 stream is reset with `REFUSED_STREAM` (RFC 9113 §8.7: the client knows the request
/// was not processed and sends it again), and an HTTP/1.1 request gets 503 with `Retry-After`.
#[derive(Debug)]
pub struct Requests {
    max: usize,
    in_flight: AtomicUsize,
}

impl Requests {
    pub(super) fn new(max: usize) -> Self {
        Self { max: max.max(1), in_flight: AtomicUsize::new(0) }
    }

    /// The most requests in flight at once.
    pub fn max(&self) -> usize {
        self.max
    }

    /// Requests in flight now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// A place for one more request, if there is one.
    fn try_start(self: &Arc<Self>) -> Option<Admitted> {
        self.in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < self.max).then_some(n + 1))
            .ok()
            .map(|_| Admitted(self.clone()))
    }
}

/// One request under a [`Requests`] limit, until its response body ends or is dropped.
struct Admitted(Arc<Requests>);

impl Drop for Admitted {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body that keeps its request in flight until it is done: the service's body, or
/// the short answer to a request past the [`Requests`] limit.
pub(super) struct Answer<B> {
    body: Either<B>,
    _in_flight: InFlight,
    _admitted: Option<Admitted>,
}

enum Either<B> {
    Served(B),
    Refused(Option<Bytes>),
}

impl<B> Body for Answer<B>
where
    B: Body + Unpin,
    B::Data: From<Bytes>,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        match &mut self.body {
            Either::Served(body) => Pin::new(body).poll_frame(cx),
            Either::Refused(text) => Poll::Ready(text.take().map(|text| Ok(Frame::data(text.into())))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.body {
            Either::Served(body) => body.is_end_stream(),
            Either::Refused(text) => text.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.body {
            Either::Served(body) => body.size_hint(),
            Either::Refused(text) => SizeHint::with_exact(text.as_ref().map_or(0, |t| t.len() as u64)),
        }
    }
}

/// The per-connection service: bodies under the body timeout, requests counted in flight.
pub(super) struct Policed<S> {
    pub(super) inner: S,
    pub(super) activity: Arc<Activity>,
    pub(super) body_timeout: Duration,
    pub(super) requests: Option<Arc<Requests>>,
    /// The listener's name, in the answer past the request limit.
    pub(super) name: &'static str,
}

impl<S, B> Service<Request<Incoming>> for Policed<S>
where
    S: Service<Request<RequestBody>, Response = Response<B>>,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + Unpin + 'static,
{
    type Response = Response<Answer<B>>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        let in_flight = InFlight::start(&self.activity);
        let open = (!request.body().is_end_stream()).then(|| OpenBody::start(&self.activity));
        let admitted = match &self.requests {
            None => None,
            Some(requests) => match requests.try_start() {
                Some(admitted) => Some(admitted),
                None => {
                    // Its body is left unread: hyper closes an HTTP/1.1 connection after the answer.
                    drop(open);
                    let refused = refuse(request.version(), self.name, requests.max);
                    return Box::pin(std::future::ready(refused.map(|response| {
                        response.map(|text| Answer {
                            body: Either::Refused(Some(text)),
                            _in_flight: in_flight,
                            _admitted: None,
                        })
                    })));
                }
            },
        };
        let request = request.map(|body| RequestBody::counted(body, self.body_timeout, open));
        let answering = self.inner.call(request);
        Box::pin(async move {
            let response = answering.await.map_err(Into::into)?;
            Ok(response.map(|body| Answer { body: Either::Served(body), _in_flight: in_flight, _admitted: admitted }))
        })
    }
}

/// The answer to a request past the limit of `max` in flight, which never reached the service:
/// `REFUSED_STREAM` on HTTP/2 (hyper resets the stream with the reason it finds among the
/// error's causes), 503 on HTTP/1.1.
fn refuse(version: Version, name: &str, max: usize) -> Result<Response<Bytes>, BoxError> {
    if version == Version::HTTP_2 {
        return Err(Box::new(h2::Error::from(h2::Reason::REFUSED_STREAM)));
    }
    let text = format!(
        "{{\"error\":\"{name}: {max} requests in flight, the most it serves at once; send the request again\"}}"
    );
    let mut response = Response::new(Bytes::from(text));
    *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    Ok(response)
}
