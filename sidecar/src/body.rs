//! The body type both servers and the upstream client speak, and the small responses the sidecar
//! makes itself (JSON refusals, admin text), so every file builds them the same way.

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = BoxBody<Bytes, BoxError>;

/// A body of `bytes`, whole.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).map_err(|never| -> BoxError { match never {} }).boxed()
}

pub fn empty() -> Body {
    Empty::new().map_err(|never| -> BoxError { match never {} }).boxed()
}

/// A response with a JSON body.
pub fn json_response(status: StatusCode, body: serde_json::Value) -> Response<Body> {
    text_response(status, body.to_string(), "application/json")
}

/// A response with `body` as `content_type`.
pub fn text_response(status: StatusCode, body: impl Into<Bytes>, content_type: &'static str) -> Response<Body> {
    let mut response = Response::new(full(body));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// An answer the sidecar gives in place of the upstream's (a refusal, no token, an unreachable
/// upstream). HTTP clients get it as JSON; gRPC clients (`content-type: application/grpc*`) as a
/// trailers-only response, since they read `grpc-status`, never the HTTP status or the body.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    pub status: StatusCode,
    /// `{"error": …, "upstream": …, "reason": …}`; only `error` is always there.
    pub body: serde_json::Value,
}

impl Failure {
    pub fn new(status: StatusCode, body: serde_json::Value) -> Self {
        Self { status, body }
    }

    pub fn into_response(self, grpc: bool) -> Response<Body> {
        if !grpc {
            return json_response(self.status, self.body);
        }
        let field = |name: &str| self.body.get(name).and_then(|v| v.as_str()).filter(|v| !v.is_empty());
        let mut message = format!("wiproxy: {}", field("error").unwrap_or("refused"));
        if let Some(reason) = field("reason") {
            message.push_str(&format!(": {reason}"));
        }
        if let Some(upstream) = field("upstream") {
            message.push_str(&format!(" (upstream {upstream})"));
        }
        let mut response = Response::new(empty());
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        headers.insert("grpc-status", HeaderValue::from(grpc_status(self.status)));
        if let Ok(value) = HeaderValue::from_str(&grpc_message(&message)) {
            headers.insert("grpc-message", value);
        }
        response
    }
}

/// Whether a request is gRPC (`application/grpc`, `application/grpc+proto`, …; gRPC-Web, which
/// carries its status in the body, is not).
pub fn is_grpc(headers: &http::HeaderMap) -> bool {
    const GRPC: &[u8] = b"application/grpc";
    headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|v| {
        let v = v.trim().as_bytes();
        v.get(..GRPC.len()).is_some_and(|start| start.eq_ignore_ascii_case(GRPC))
            && matches!(v.get(GRPC.len()), None | Some(b'+' | b';'))
    })
}

/// gRPC's mapping of HTTP statuses to its codes (grpc/doc/http-grpc-status-mapping.md).
fn grpc_status(status: StatusCode) -> u16 {
    match status.as_u16() {
        400 => 13,             // INTERNAL
        401 => 16,             // UNAUTHENTICATED
        403 => 7,              // PERMISSION_DENIED
        404 => 12,             // UNIMPLEMENTED
        429 | 502..=504 => 14, // UNAVAILABLE
        _ => 2,                // UNKNOWN
    }
}

/// `grpc-message` is percent-encoded over UTF-8, leaving printable ASCII other than `%` as is
/// (gRPC's PROTOCOL-HTTP2.md); no crate we use has this exact set.
fn grpc_message(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    for byte in message.bytes() {
        if (0x20..=0x7e).contains(&byte) && byte != b'%' {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// A request body streamed to the upstream while what has gone is kept, up to a budget taken
/// from the shared retry buffer, so that a request the upstream refused unprocessed (above a
/// GOAWAY's last-stream-id, `REFUSED_STREAM`) can be sent again whatever its framing: chunked
/// uploads, streamed bodies, gRPC calls. Each [`Tee::attempt`] gives a body that replays the
/// kept frames, then reads on from the app's body; past the budget nothing more is kept and the
/// request can no longer be sent again.
pub struct Tee<B> {
    shared: std::sync::Arc<std::sync::Mutex<Teed<B>>>,
    declared: Option<u64>,
}

struct Teed<B> {
    source: B,
    kept: Vec<Bytes>,
    trailers: Option<http::HeaderMap>,
    ended: bool,
    /// Past the budget: what was kept is let go and the body only streams.
    overflowed: bool,
    /// The memory kept, within the budget.
    reserved: crate::retry_buffer::Reserved,
    budget: usize,
    /// Only the latest attempt reads on from the app's body.
    attempt: u64,
}

/// One attempt's body of a [`Tee`].
pub struct TeeBody<B> {
    shared: std::sync::Arc<std::sync::Mutex<Teed<B>>>,
    attempt: u64,
    /// The next kept frame to replay, the bytes given, whether the trailers went.
    next: usize,
    given: u64,
    trailers_sent: bool,
    declared: Option<u64>,
}

fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl<B> Tee<B>
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    /// Keeps up to `budget` bytes of `source`, reserved from `reserved` as they come.
    pub fn new(source: B, reserved: crate::retry_buffer::Reserved, budget: usize) -> Self {
        let declared = source.size_hint().exact();
        let teed = Teed {
            source,
            kept: Vec::new(),
            trailers: None,
            ended: false,
            overflowed: false,
            reserved,
            budget,
            attempt: 0,
        };
        Self { shared: std::sync::Arc::new(std::sync::Mutex::new(teed)), declared }
    }

    /// Whether the whole body sent so far is kept, so the request can be sent again.
    pub fn replayable(&self) -> bool {
        !lock(&self.shared).overflowed
    }

    /// A body for the next attempt; the previous attempt's body stops.
    pub fn attempt(&self) -> TeeBody<B> {
        let mut teed = lock(&self.shared);
        teed.attempt += 1;
        TeeBody {
            shared: self.shared.clone(),
            attempt: teed.attempt,
            next: 0,
            given: 0,
            trailers_sent: false,
            declared: self.declared,
        }
    }
}

impl<B> hyper::body::Body for TeeBody<B>
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, BoxError>>> {
        use std::task::Poll;
        let this = &mut *self;
        let mut teed = lock(&this.shared);
        if teed.attempt != this.attempt {
            return Poll::Ready(Some(Err("the request is being sent again on another connection".into())));
        }
        if !teed.overflowed {
            if let Some(bytes) = teed.kept.get(this.next).cloned() {
                this.next += 1;
                this.given += bytes.len() as u64;
                return Poll::Ready(Some(Ok(hyper::body::Frame::data(bytes))));
            }
        }
        if teed.ended {
            return match teed.trailers.clone().filter(|_| !this.trailers_sent) {
                Some(trailers) => {
                    this.trailers_sent = true;
                    Poll::Ready(Some(Ok(hyper::body::Frame::trailers(trailers))))
                }
                None => Poll::Ready(None),
            };
        }
        let teed = &mut *teed;
        match std::pin::Pin::new(&mut teed.source).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                teed.ended = true;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(Some(Ok(frame))) => {
                let frame = match frame.into_data() {
                    Ok(bytes) => {
                        this.given += bytes.len() as u64;
                        if !teed.overflowed {
                            let kept: usize = teed.kept.iter().map(Bytes::len).sum();
                            if kept + bytes.len() <= teed.budget && teed.reserved.grow(bytes.len()) {
                                teed.kept.push(bytes.clone());
                                this.next += 1;
                            } else {
                                teed.overflowed = true;
                                teed.kept = Vec::new();
                                teed.reserved.shrink_to_zero();
                            }
                        }
                        return Poll::Ready(Some(Ok(hyper::body::Frame::data(bytes))));
                    }
                    Err(frame) => frame,
                };
                if let Some(trailers) = frame.trailers_ref() {
                    teed.trailers = Some(trailers.clone());
                    teed.ended = true;
                    this.trailers_sent = true;
                }
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        let teed = lock(&self.shared);
        teed.attempt == self.attempt
            && teed.ended
            && (teed.overflowed || self.next >= teed.kept.len())
            && (self.trailers_sent || teed.trailers.is_none())
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        match self.declared {
            Some(declared) => hyper::body::SizeHint::with_exact(declared.saturating_sub(self.given)),
            None => hyper::body::SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_clients_get_trailers_only_answers() {
        let failure = Failure::new(
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({"error": "no token", "upstream": "grpc", "reason": "metadata server: 100% down"}),
        );
        let response = failure.clone().into_response(true);
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["grpc-status"], "14");
        assert_eq!(
            response.headers()["grpc-message"],
            "wiproxy: no token: metadata server: 100%25 down (upstream grpc)"
        );
        assert_eq!(response.headers()[header::CONTENT_TYPE], "application/grpc");
        let json = failure.into_response(false);
        assert_eq!(json.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(json.headers()[header::CONTENT_TYPE], "application/json");
    }

    /// The app's body: `chunks`, then trailers.
    struct Chunks(std::collections::VecDeque<hyper::body::Frame<Bytes>>);

    impl hyper::body::Body for Chunks {
        type Data = Bytes;
        type Error = BoxError;

        fn poll_frame(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, BoxError>>> {
            std::task::Poll::Ready(self.0.pop_front().map(Ok))
        }
    }

    fn chunks(parts: &[&'static [u8]]) -> Chunks {
        let mut frames: std::collections::VecDeque<_> =
            parts.iter().map(|part| hyper::body::Frame::data(Bytes::from_static(part))).collect();
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        frames.push_back(hyper::body::Frame::trailers(trailers));
        Chunks(frames)
    }

    async fn read(body: impl hyper::body::Body<Data = Bytes, Error = BoxError>) -> (Vec<u8>, Option<http::HeaderMap>) {
        let collected = body.collect().await.expect("body");
        let trailers = collected.trailers().cloned();
        (collected.to_bytes().to_vec(), trailers)
    }

    #[tokio::test]
    async fn a_teed_body_is_sent_again_whole_from_wherever_the_first_try_stopped() {
        let buffer = crate::retry_buffer::RetryBuffer::new(1024);
        let tee = Tee::new(chunks(&[b"abc", b"def", b"gh"]), buffer.reserve(0).expect("room"), 100);
        // The first try reads two chunks, then its connection goes away.
        let mut first = tee.attempt();
        for _ in 0..2 {
            first.frame().await.expect("frame").expect("data");
        }
        assert_eq!(buffer.available(), 1024 - 6, "what went is kept, within the shared buffer");
        assert!(tee.replayable());
        let (bytes, trailers) = read(tee.attempt()).await;
        assert_eq!(bytes, b"abcdefgh");
        assert_eq!(trailers.expect("trailers")["grpc-status"], "0");
        assert!(first.frame().await.expect("an answer").is_err(), "a superseded try reads no more");
        // A third try after the whole body went replays it all, trailers included.
        let (bytes, trailers) = read(tee.attempt()).await;
        assert_eq!(bytes, b"abcdefgh");
        assert!(trailers.is_some());
        drop((tee, first));
        assert_eq!(buffer.available(), 1024, "given back once no try holds it");
    }

    #[tokio::test]
    async fn past_the_budget_a_teed_body_streams_on_and_cannot_be_sent_again() {
        let buffer = crate::retry_buffer::RetryBuffer::new(1024);
        let tee = Tee::new(chunks(&[b"abc", b"def", b"gh"]), buffer.reserve(0).expect("room"), 5);
        let (bytes, _) = read(tee.attempt()).await;
        assert_eq!(bytes, b"abcdefgh", "the one try gets the whole body");
        assert!(!tee.replayable());
        assert_eq!(buffer.available(), 1024, "nothing held once past the budget");
        // The shared buffer bounds it too.
        let small = crate::retry_buffer::RetryBuffer::new(4);
        let tee = Tee::new(chunks(&[b"abc", b"def"]), small.reserve(0).expect("room"), 100);
        let _ = read(tee.attempt()).await;
        assert!(!tee.replayable());
    }

    #[test]
    fn grpc_content_types() {
        let with = |value: &'static str| {
            let mut headers = http::HeaderMap::new();
            headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(value));
            is_grpc(&headers)
        };
        assert!(with("application/grpc"));
        assert!(with("Application/GRPC+proto"));
        assert!(with("application/grpc; charset=utf-8"));
        assert!(!with("application/grpc-web"));
        assert!(!with("application/grp"));
        assert!(!with("application/json"));
    }
}
