//! Forwarding: one request in on loopback, the same request out over HTTPS with the upstream's
//! token. Fails closed: no token, no call.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Limited};
use hyper::body::{Body as _, Frame, SizeHint};
use hyper_util::rt::TokioIo;
use serde_json::json;
use tracing::{debug, info, warn};
use wiproxy_common::serve::{BodyTimeout, RequestBody};
use wiproxy_common::TokenHeader;

use crate::body::{empty, full, is_grpc, Body, BoxError, Failure, Tee};
use crate::cache::{Audience, TokenCache};
use crate::metrics::{Metrics, UpstreamLabels, UpstreamRequests};
use crate::retry_buffer::{Reserved, RetryBuffer};
use crate::routes::{Destination, Route, Routes, Via};
use crate::token::Token;
use crate::upstream::Clients;
use crate::upstream::ResponseBody;
use prometheus_client::metrics::counter::Counter;

/// Bodies up to this size are kept so the request can be sent again after an upstream 401,
/// while the shared [`RetryBuffer`] has room; larger ones stream through once.
const REPLAYABLE_BODY: u64 = 1024 * 1024;

static X_FORWARDED_AUTHORIZATION: HeaderName = HeaderName::from_static("x-forwarded-authorization");
static X_SERVERLESS_AUTHORIZATION: HeaderName = HeaderName::from_static("x-serverless-authorization");

pub struct Proxy {
    routes: Routes,
    /// Per route, in the routes' order: its token slot and its `requests` series, looked up
    /// once here rather than per request.
    served: Vec<Served>,
    /// The `requests` series of requests that reached no upstream.
    unrouted: UpstreamRequests,
    clients: Clients,
    /// How long a request waits for a token that is on its way.
    token_wait: Duration,
    /// Longest wait for the upstream's response headers.
    upstream_timeout: Option<Duration>,
    /// Memory for bodies kept for a retry.
    retry_buffer: Arc<RetryBuffer>,
}

struct Served {
    /// `None` only if the cache was started without the route's audience.
    audience: Option<Audience>,
    requests: UpstreamRequests,
    /// Requests the upstream never processed: sent again, or past the retry budget refused.
    retries: Counter,
    refusals: Counter,
}

/// Marks the answer to a request the upstream never processed and that could not be sent again
/// (its body went past the retry budget): an h2c client gets `RST_STREAM(REFUSED_STREAM)`
/// (crate::serve), which tells it the request may be sent again whatever its method (RFC 9113
/// §8.7); an HTTP/1.1 client gets the 502.
#[derive(Debug, Clone, Copy)]
pub struct RefuseStream;

impl Proxy {
    pub fn new(
        routes: Routes,
        cache: &TokenCache,
        clients: Clients,
        metrics: &Metrics,
        token_wait: Duration,
        upstream_timeout: Option<Duration>,
        retry_buffer: Arc<RetryBuffer>,
    ) -> Self {
        let served = routes
            .iter()
            .map(|route| {
                let labels = UpstreamLabels { upstream: route.name.clone() };
                Served {
                    audience: cache.audience(&route.audience),
                    requests: metrics.upstream_requests(&route.name),
                    retries: metrics.unprocessed_retries.get_or_create(&labels).clone(),
                    refusals: metrics.unprocessed_refusals.get_or_create(&labels).clone(),
                }
            })
            .collect();
        let unrouted = metrics.upstream_requests("-");
        Self { routes, served, unrouted, clients, token_wait, upstream_timeout, retry_buffer }
    }

    /// A token for route `index`, waiting at most `token_wait` for one on its way.
    async fn token_for(&self, index: usize) -> Result<Arc<Token>, Failure> {
        let route = self.routes.get(index);
        let token = match &self.served[index].audience {
            Some(audience) => audience.get(self.token_wait).await,
            None => Err(crate::cache::Unavailable(format!("no audience {:?}", route.audience))),
        };
        token.map_err(|e| no_token(route, &e.0))
    }
}

/// Connection-level headers that are never forwarded (RFC 9110 §7.6.1), plus any the
/// `Connection` header names. `Trailer` is end-to-end (RFC 9110 §6.6.2) and kept: hyper writes to
/// an HTTP/1.1 client only the trailer fields it declares. Upgrade requests keep `Connection`/`Upgrade` (`keep_upgrade`).
/// `TE: trailers` is kept: gRPC servers refuse a call without it, and it is the one `TE` value
/// HTTP/2 allows.
fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // One look at the names first: most messages carry none of these but `Connection`, and
    // removing names that are not there costs a hash each.
    let (mut connection, mut te, mut others) = (false, false, false);
    for name in headers.keys() {
        match name.as_str() {
            "connection" => connection = true,
            "te" => te = true,
            "transfer-encoding"
            | "proxy-authorization"
            | "proxy-authenticate"
            | "keep-alive"
            | "proxy-connection"
            | "http2-settings"
            | "upgrade" => others = true,
            _ => {}
        }
    }
    if !(connection || te || others || keep_upgrade) {
        return;
    }
    let trailers = te
        && headers
            .get_all(header::TE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.split(';').next().unwrap_or_default().trim().eq_ignore_ascii_case("trailers"));
    if connection {
        // The `Connection` values come out whole first (shared bytes, no copy); the names they
        // list are removed as text, with no header name made for each.
        let values = match headers.entry(header::CONNECTION) {
            header::Entry::Occupied(entry) => entry.remove_entry_mult().1.collect::<Vec<_>>(),
            header::Entry::Vacant(_) => Vec::new(),
        };
        for name in values.iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(',')).map(str::trim) {
            if !(name.is_empty() || (keep_upgrade && name.eq_ignore_ascii_case("upgrade"))) {
                headers.remove(name);
            }
        }
    }
    if te {
        headers.remove(header::TE);
    }
    if others {
        for name in [header::TRANSFER_ENCODING, header::PROXY_AUTHORIZATION, header::PROXY_AUTHENTICATE] {
            headers.remove(name);
        }
        headers.remove("keep-alive");
        headers.remove("proxy-connection");
        headers.remove("http2-settings");
    }
    if trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    if keep_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else if others {
        headers.remove(header::UPGRADE);
    }
}

/// Whether a request asks to switch protocols. `Upgrade: h2c` is not passed on: the upstream
/// connection is TLS, where h2 comes by ALPN, and a tunnel would carry the app's next requests
/// to the upstream with no token; such a request is answered over HTTP/1.1 (RFC 9113 §3.1 lets a
/// server ignore it).
fn is_upgrade(request: &Request<RequestBody>) -> bool {
    let protocols = request.headers().get_all(header::UPGRADE).iter().filter_map(|v| v.to_str().ok());
    let wanted = protocols.flat_map(|v| v.split(',')).any(|p| {
        let p = p.trim();
        !p.is_empty() && !p.eq_ignore_ascii_case("h2c")
    });
    request.version() == Version::HTTP_11
        && wanted
        && request
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("upgrade")))
}

/// Puts the token in its header. In `authorization` mode the app's own `Authorization` moves to
/// `X-Forwarded-Authorization`; in `x-serverless-authorization` mode it passes through.
fn set_token(headers: &mut HeaderMap, mode: TokenHeader, token: &Token) -> Result<(), StatusCode> {
    let value = token.bearer().ok_or(StatusCode::SERVICE_UNAVAILABLE)?.clone();
    match mode {
        TokenHeader::Authorization => {
            if let Some(own) = headers.remove(header::AUTHORIZATION) {
                headers.insert(X_FORWARDED_AUTHORIZATION.clone(), own);
            }
            headers.insert(header::AUTHORIZATION, value);
        }
        TokenHeader::XServerlessAuthorization => {
            headers.insert(X_SERVERLESS_AUTHORIZATION.clone(), value);
        }
    }
    Ok(())
}

/// The outbound body: kept in memory (with its trailers) when small enough to send twice, else
/// streamed once.
enum OutBody {
    /// The body, its trailers, and its share of the retry buffer.
    Replayable(Bytes, Option<HeaderMap>, Option<Arc<Reserved>>),
    /// Streamed, with what has gone kept up to [`REPLAYABLE_BODY`] (crate::body::Tee).
    Teed(Tee<StallNoted>),
    Streaming(RequestBody),
}

/// The app's body, noting in `stalled` when it stopped arriving (WIPROXY_BODY_TIMEOUT): the
/// upstream's error may not carry the body's cause (an h2 stream is reset), so a stall is noted
/// here to answer 408 rather than 502.
struct StallNoted {
    body: RequestBody,
    stalled: Arc<std::sync::atomic::AtomicBool>,
}

impl hyper::body::Body for StallNoted {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        if let Poll::Ready(Some(Err(e))) = &polled {
            if BodyTimeout::is_cause_of(e.as_ref()) {
                self.stalled.store(true, std::sync::atomic::Ordering::Release);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// How many times a request the upstream never processed (streams above a GOAWAY's
/// last-stream-id, `REFUSED_STREAM`) is sent again on a new connection.
const UNPROCESSED_RETRIES: u32 = 3;

impl Proxy {
    /// A request on the proxy port.
    pub async fn handle(self: Arc<Self>, request: Request<RequestBody>) -> Response<Body> {
        let destination = self.routes.resolve(request.method(), request.version(), request.uri());
        self.answer(destination, request).await
    }

    /// A request on upstream `index`'s own port (`listen=PORT`).
    pub async fn handle_port(self: Arc<Self>, index: usize, request: Request<RequestBody>) -> Response<Body> {
        let destination = self.routes.dedicated(index, request.method(), request.uri());
        self.answer(destination, request).await
    }

    async fn answer(
        &self,
        destination: Result<Destination, crate::routes::Refusal>,
        request: Request<RequestBody>,
    ) -> Response<Body> {
        let started = tracing::enabled!(tracing::Level::DEBUG).then(|| (Instant::now(), request.method().clone()));
        let grpc = is_grpc(request.headers());
        let refused = |refusal: crate::routes::Refusal, request: &Request<RequestBody>| {
            let (method, path) = (request.method(), request.uri().path());
            info!(%method, path, status = refusal.status.as_u16(), reason = %refusal.message, "refused");
            Err(Failure::new(refusal.status, json!({"error": refusal.message})))
        };
        let (index, answered) = match destination {
            Err(refusal) => (None, refused(refusal, &request)),
            Ok(Destination::Token { index }) => {
                let answered = match crate::routes::token_request_refusal(request.headers()) {
                    Some(refusal) => refused(refusal, &request),
                    None => self.token(index).await,
                };
                (Some(index), answered)
            }
            Ok(Destination::Upstream { index, uri: target, via }) => {
                let answered = self.forward(index, target, request).await.map(|mut response| {
                    if response.headers().contains_key(header::LOCATION) {
                        self.rewrite_location(&mut response, index, via);
                    }
                    response
                });
                (Some(index), answered)
            }
        };
        let response = answered.unwrap_or_else(|failure| failure.into_response(grpc));
        let status = response.status().as_u16();
        match index {
            Some(index) => self.served[index].requests.count(status),
            None => self.unrouted.count(status),
        }
        if let Some((started, method)) = started {
            let upstream = index.map_or("-", |index| self.routes.get(index).name.as_str());
            debug!(%method, upstream, status, ms = started.elapsed().as_millis() as u64, "proxied");
        }
        response
    }

    fn rewrite_location(&self, response: &mut Response<Body>, index: usize, via: Via) {
        let Some(location) = response.headers().get(header::LOCATION).and_then(|v| v.to_str().ok()) else {
            return;
        };
        if let Some(rewritten) = self.routes.rewrite_location(location, index, via) {
            if let Ok(value) = HeaderValue::from_str(&rewritten) {
                response.headers_mut().insert(header::LOCATION, value);
            }
        }
    }

    async fn token(&self, index: usize) -> Result<Response<Body>, Failure> {
        let token = self.token_for(index).await?;
        let mut response = Response::new(full(token.secret().to_owned()));
        response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        Ok(response)
    }

    async fn forward(
        &self,
        index: usize,
        target: http::Uri,
        mut request: Request<RequestBody>,
    ) -> Result<Response<Body>, Failure> {
        let route = self.routes.get(index);
        let audience = self.served[index].audience.as_ref();
        let upgrade = is_upgrade(&request);
        let inbound_h2 = request.version() == Version::HTTP_2;
        let inbound_upgrade = upgrade.then(|| hyper::upgrade::on(&mut request));
        let mut token = self.token_for(index).await?;
        let (mut parts, body) = request.into_parts();
        strip_hop_by_hop(&mut parts.headers, upgrade);
        parts.headers.remove(header::HOST);
        parts.uri = target;
        parts.version = Version::HTTP_11;

        // No body at all (most GETs) is replayable as it is, with nothing to read or reserve.
        // Another is kept for a retry when small, declared, and the shared buffer has room.
        let body_stalled = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reserved = || {
            body.size_hint()
                .upper()
                .filter(|upper| *upper <= REPLAYABLE_BODY)
                .and_then(|upper| self.retry_buffer.reserve(upper as usize))
        };
        let mut body = if body.is_end_stream() {
            OutBody::Replayable(Bytes::new(), None, None)
        } else if let Some(reserved) = reserved() {
            match Limited::new(body, REPLAYABLE_BODY as usize).collect().await {
                Ok(collected) => {
                    let trailers = collected.trailers().cloned();
                    OutBody::Replayable(collected.to_bytes(), trailers, Some(Arc::new(reserved)))
                }
                Err(e) if BodyTimeout::is_cause_of(e.as_ref()) => return Err(body_timeout(route, e.as_ref())),
                Err(e) => {
                    return Err(Failure::new(
                        StatusCode::BAD_REQUEST,
                        json!({"error": format!("cannot read the request body: {e}"), "upstream": route.name}),
                    ))
                }
            }
        } else if let Some(reserved) = self.retry_buffer.reserve(0) {
            let noted = StallNoted { body, stalled: body_stalled.clone() };
            OutBody::Teed(Tee::new(noted, reserved, REPLAYABLE_BODY as usize))
        } else {
            OutBody::Streaming(body)
        };

        let client = if upgrade { &self.clients.http1 } else { &self.clients.any };
        let mut refused_once = false;
        let mut unprocessed = 0;
        loop {
            let mut headers = parts.headers.clone();
            if let Err(status) = set_token(&mut headers, route.header, &token) {
                return Err(Failure::new(
                    status,
                    json!({"error": "the token is not a valid header value", "upstream": route.name}),
                ));
            }
            let (out_body, replay) = match std::mem::replace(&mut body, OutBody::Replayable(Bytes::new(), None, None)) {
                OutBody::Replayable(bytes, trailers, reserved) => {
                    body = OutBody::Replayable(bytes.clone(), trailers.clone(), reserved);
                    let out = match trailers {
                        Some(trailers) => full(bytes).with_trailers(async move { Some(Ok(trailers)) }).boxed(),
                        None => full(bytes),
                    };
                    (out, true)
                }
                OutBody::Teed(tee) => {
                    let out = tee.attempt().boxed();
                    body = OutBody::Teed(tee);
                    (out, false)
                }
                OutBody::Streaming(incoming) => {
                    // The upstream's error may not carry the body's cause (an h2 stream is
                    // reset), so a stall is noted here to answer 408 rather than 502.
                    let stalled = body_stalled.clone();
                    let body = incoming.map_err(move |e| {
                        if BodyTimeout::is_cause_of(e.as_ref()) {
                            stalled.store(true, std::sync::atomic::Ordering::Release);
                        }
                        e
                    });
                    (body.boxed(), false)
                }
            };
            let mut outbound = Request::new(out_body);
            *outbound.method_mut() = parts.method.clone();
            *outbound.uri_mut() = parts.uri.clone();
            *outbound.version_mut() = parts.version;
            *outbound.headers_mut() = headers;

            let sent = client.request(outbound);
            let answered = match self.upstream_timeout {
                Some(limit) => match tokio::time::timeout(limit, sent).await {
                    Ok(answered) => answered,
                    Err(_) => return Err(upstream_timeout(route, limit)),
                },
                None => sent.await,
            };
            let response = match answered {
                Ok(response) => response,
                Err(e)
                    if unprocessed < UNPROCESSED_RETRIES
                        && e.never_processed()
                        && match &body {
                            OutBody::Replayable(..) => true,
                            OutBody::Teed(tee) => tee.replayable(),
                            OutBody::Streaming(_) => false,
                        } =>
                {
                    unprocessed += 1;
                    self.served[index].retries.inc();
                    debug!(upstream = %route.name, error = %wiproxy_common::error_chain(&e), "the upstream did not process the request; sending it again");
                    continue;
                }
                Err(e) if BodyTimeout::is_cause_of(&e) || body_stalled.load(std::sync::atomic::Ordering::Acquire) => {
                    return Err(body_timeout(route, &e))
                }
                Err(e) if e.never_processed() => {
                    self.served[index].refusals.inc();
                    let mut response = upstream_error(route, &e).into_response(is_grpc(&parts.headers));
                    if inbound_h2 {
                        response.extensions_mut().insert(RefuseStream);
                    }
                    return Ok(response);
                }
                Err(e) => return Err(upstream_error(route, &e)),
            };
            if response.status() == StatusCode::UNAUTHORIZED && is_token_refusal(response.headers()) {
                let refetching = audience.is_some_and(|audience| audience.reject(&token));
                if refetching && replay && !refused_once && !upgrade {
                    refused_once = true;
                    debug!(upstream = %route.name, "the front end refused the token; retrying with a new one");
                    match self.token_for(index).await {
                        Ok(fresh) => {
                            token = fresh;
                            continue;
                        }
                        Err(_) => return Ok(respond(response)),
                    }
                }
                info!(upstream = %route.name, "the front end refused the token; answered as is");
            } else if let Some(audience) = audience {
                audience.accepted();
            }
            if response.status() == StatusCode::SWITCHING_PROTOCOLS {
                if let Some(inbound) = inbound_upgrade {
                    return Ok(switch_protocols(route, response, inbound));
                }
            }
            return Ok(respond(response));
        }
    }
}

/// Whether a 401 is Google's front end refusing the ID token, rather than the app's own 401.
/// Cloud Run and Cloud Functions answer a token they cannot verify (bad signature, wrong audience,
/// expired) with `WWW-Authenticate: Bearer error="invalid_token" error_description="The access
/// token could not be verified"`. This is seen in user reports (google/ground-platform,
/// `data-import.service.ts`; google/adk-python#3814 for the body), not documented by Google: so
/// only the `Bearer` scheme with `error="invalid_token"` is required. An app's `Basic` challenge,
/// or a 401 with no challenge, is the app's and is returned as is, never replayed.
fn is_token_refusal(headers: &HeaderMap) -> bool {
    headers.get_all(header::WWW_AUTHENTICATE).iter().filter_map(|v| v.to_str().ok()).any(|challenge| {
        let challenge = challenge.trim_start().to_ascii_lowercase();
        challenge.starts_with("bearer") && challenge.contains("error=\"invalid_token\"")
    })
}

fn respond(response: Response<ResponseBody>) -> Response<Body> {
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers, false);
    Response::from_parts(parts, ReadToEnd(Some(body)).boxed())
}

/// The most a dropped response body is read on to reach its end, and for how long.
const DRAIN_BYTES: usize = 64 * 1024;
const DRAIN_TIME: Duration = Duration::from_secs(5);

/// An upstream's response body, read to its end even when the app's side stops early. The app's
/// HTTP/1.1 connection stops at `Content-Length`, but an HTTP/2 upstream may send END_STREAM in a
/// later, empty DATA frame (hypercorn and the h2 library do); dropping the stream before it comes
/// makes the h2 client reset it with CANCEL, and enough resets close the whole connection
/// ("locally-reset streams reached limit"). A body dropped before its end is read on in the
/// background, within `DRAIN_BYTES` and `DRAIN_TIME`; past those the reset is the right answer.
struct ReadToEnd(Option<ResponseBody>);

impl hyper::body::Body for ReadToEnd {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let Some(inner) = self.0.as_mut() else { return Poll::Ready(None) };
        let polled = Pin::new(inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) {
            self.0 = None;
        }
        polled.map_err(BoxError::from)
    }

    fn is_end_stream(&self) -> bool {
        self.0.as_ref().is_none_or(|inner| inner.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.0.as_ref().map(|inner| inner.size_hint()).unwrap_or_else(|| SizeHint::with_exact(0))
    }
}

impl Drop for ReadToEnd {
    fn drop(&mut self) {
        let Some(mut inner) = self.0.take().filter(|inner| !inner.is_end_stream()) else { return };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        runtime.spawn(async move {
            let drained = async {
                let mut read = 0;
                while let Some(Ok(frame)) = inner.frame().await {
                    read += frame.data_ref().map_or(0, Bytes::len);
                    if read > DRAIN_BYTES {
                        return;
                    }
                }
            };
            let _ = tokio::time::timeout(DRAIN_TIME, drained).await;
        });
    }
}

/// Joins the app's connection and the upstream's once both have switched protocols.
fn switch_protocols(
    route: &Route,
    mut response: Response<ResponseBody>,
    inbound: hyper::upgrade::OnUpgrade,
) -> Response<Body> {
    let outbound = hyper::upgrade::on(&mut response);
    let name = route.name.clone();
    tokio::spawn(async move {
        match tokio::try_join!(inbound, outbound) {
            Ok((inbound, outbound)) => {
                let (mut app, mut upstream) = (TokioIo::new(inbound), TokioIo::new(outbound));
                if let Err(e) = tokio::io::copy_bidirectional(&mut app, &mut upstream).await {
                    debug!(upstream = %name, error = %e, "upgraded connection ended");
                }
            }
            Err(e) => warn!(upstream = %name, error = %e, "protocol upgrade failed"),
        }
    });
    let (mut parts, _) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers, true);
    Response::from_parts(parts, empty())
}

fn no_token(route: &Route, reason: &str) -> Failure {
    info!(upstream = %route.name, reason, "refused: no token");
    Failure::new(
        StatusCode::SERVICE_UNAVAILABLE,
        json!({"error": "no token for this upstream; the request was not sent", "upstream": route.name, "reason": reason}),
    )
}

fn body_timeout(route: &Route, error: &(dyn std::error::Error + 'static)) -> Failure {
    let reason = wiproxy_common::error_chain(error);
    info!(upstream = %route.name, error = %reason, "request body stalled");
    Failure::new(
        StatusCode::REQUEST_TIMEOUT,
        json!({"error": "the request body stopped arriving (WIPROXY_BODY_TIMEOUT)", "upstream": route.name, "reason": reason}),
    )
}

fn upstream_timeout(route: &Route, limit: Duration) -> Failure {
    warn!(upstream = %route.name, seconds = limit.as_secs(), "upstream timed out");
    Failure::new(
        StatusCode::GATEWAY_TIMEOUT,
        json!({"error": "the upstream did not answer in time", "upstream": route.name, "reason": format!("no response within {} s (WIPROXY_UPSTREAM_TIMEOUT)", limit.as_secs())}),
    )
}

fn upstream_error(route: &Route, error: &crate::upstream::Error) -> Failure {
    let status = if error.timed_out() { StatusCode::GATEWAY_TIMEOUT } else { StatusCode::BAD_GATEWAY };
    let reason = wiproxy_common::error_chain(error);
    warn!(upstream = %route.name, status = status.as_u16(), error = %reason, "upstream unreachable");
    Failure::new(
        status,
        json!({"error": "the upstream could not be reached", "upstream": route.name, "reason": reason}),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_dropped() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, x-private"));
        headers.insert("x-private", HeaderValue::from_static("1"));
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        headers.insert(header::PROXY_AUTHORIZATION, HeaderValue::from_static("Basic x"));
        headers.insert("x-kept", HeaderValue::from_static("yes"));
        strip_hop_by_hop(&mut headers, false);
        let names: Vec<_> = headers.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["x-kept"]);
    }

    #[test]
    fn trailer_is_end_to_end() {
        let mut headers = HeaderMap::new();
        headers.insert(header::TRAILER, HeaderValue::from_static("x-checksum"));
        headers.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        strip_hop_by_hop(&mut headers, false);
        assert_eq!(headers.len(), 1, "{headers:?}");
        assert_eq!(headers[header::TRAILER], "x-checksum");
    }

    #[test]
    fn an_upgrade_keeps_its_upgrade_headers() {
        let mut headers = HeaderMap::new();
        headers.append(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        headers.append(header::CONNECTION, HeaderValue::from_static("x-private"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        headers.insert("x-private", HeaderValue::from_static("1"));
        headers.insert("sec-websocket-key", HeaderValue::from_static("dGhlIHNhbXBsZSBub25jZQ=="));
        strip_hop_by_hop(&mut headers, true);
        assert_eq!(headers[header::CONNECTION], "upgrade");
        assert_eq!(headers[header::UPGRADE], "websocket");
        assert!(!headers.contains_key("x-private"));
        assert_eq!(headers.len(), 3, "{headers:?}");
    }

    #[test]
    fn te_trailers_is_kept_for_grpc() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONNECTION, HeaderValue::from_static("TE, HTTP2-Settings, Upgrade"));
        headers.insert(header::TE, HeaderValue::from_static("trailers, deflate;q=0.5"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("h2c"));
        headers.insert("http2-settings", HeaderValue::from_static("AAMAAABkAARAAAAAAAIAAAAA"));
        strip_hop_by_hop(&mut headers, false);
        assert_eq!(headers.len(), 1, "{headers:?}");
        assert_eq!(headers[header::TE], "trailers");
        let mut gzip_only = HeaderMap::new();
        gzip_only.insert(header::TE, HeaderValue::from_static("gzip"));
        strip_hop_by_hop(&mut gzip_only, false);
        assert!(gzip_only.is_empty());
    }
}
