//! Forwarding: one request in on loopback, the same request out over HTTPS with the upstream's
//! token. Fails closed: no token, no call.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Limited};
use hyper::body::{Body as _, Incoming};
use hyper_util::rt::TokioIo;
use serde_json::json;
use tracing::{debug, info, warn};
use wiproxy_common::TokenHeader;

use crate::body::{empty, full, json_response, Body, BoxError};
use crate::cache::TokenCache;
use crate::http::Clients;
use crate::metrics::Metrics;
use crate::routes::{Destination, Route, Routes};
use crate::token::Token;

/// Bodies up to this size are kept so the request can be sent again after an upstream 401;
/// larger ones stream through once.
const REPLAYABLE_BODY: u64 = 1024 * 1024;

static X_FORWARDED_AUTHORIZATION: HeaderName = HeaderName::from_static("x-forwarded-authorization");
static X_SERVERLESS_AUTHORIZATION: HeaderName = HeaderName::from_static("x-serverless-authorization");

pub struct Proxy {
    pub routes: Routes,
    pub cache: Arc<TokenCache>,
    pub clients: Clients,
    pub metrics: Arc<Metrics>,
    /// How long a request waits for a token that is on its way.
    pub token_wait: Duration,
    /// Longest wait for the upstream's response headers.
    pub upstream_timeout: Option<Duration>,
}

/// Connection-level headers that are never forwarded (RFC 9110 §7.6.1), plus any the
/// `Connection` header names. Upgrade requests keep `Connection`/`Upgrade` (`keep_upgrade`).
fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .filter(|name| !(keep_upgrade && name == header::UPGRADE))
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::PROXY_AUTHORIZATION,
        header::PROXY_AUTHENTICATE,
    ] {
        headers.remove(name);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
    if keep_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::CONNECTION);
        headers.remove(header::UPGRADE);
    }
}

fn is_upgrade(request: &Request<Incoming>) -> bool {
    request.version() == Version::HTTP_11
        && request.headers().contains_key(header::UPGRADE)
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
    let mut value =
        HeaderValue::from_str(&format!("Bearer {}", token.secret())).map_err(|_| StatusCode::SERVICE_UNAVAILABLE)?;
    value.set_sensitive(true);
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

/// The outbound body: kept in memory when small enough to send twice, else streamed once.
enum OutBody {
    Replayable(Bytes),
    Streaming(Incoming),
}

impl Proxy {
    pub async fn handle(self: Arc<Self>, request: Request<Incoming>) -> Response<Body> {
        let started = Instant::now();
        let (method, uri) = (request.method().clone(), request.uri().clone());
        let (name, response) = match self.routes.resolve(&method, request.version(), &uri) {
            Err(refusal) => {
                debug!(%method, path = uri.path(), status = refusal.status.as_u16(), "refused");
                (None, json_response(refusal.status, json!({"error": refusal.message})))
            }
            Ok(Destination::Token { index }) => {
                let route = self.routes.get(index);
                (Some(route.name.clone()), self.token(route).await)
            }
            Ok(Destination::Upstream { index, uri: target }) => {
                let route = self.routes.get(index).clone();
                let response = self.forward(&route, target, request).await;
                (Some(route.name), response)
            }
        };
        let status = response.status().as_u16();
        let upstream = name.as_deref().unwrap_or("-");
        self.metrics.request(upstream, status);
        debug!(%method, upstream, status, ms = started.elapsed().as_millis() as u64, "proxied");
        response
    }

    async fn token(&self, route: &Route) -> Response<Body> {
        match self.cache.get(&route.audience, self.token_wait).await {
            Ok(token) => {
                let mut response = Response::new(full(token.secret().to_owned()));
                response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
                response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
                response
            }
            Err(e) => no_token(route, &e.0),
        }
    }

    async fn forward(&self, route: &Route, target: http::Uri, mut request: Request<Incoming>) -> Response<Body> {
        let upgrade = is_upgrade(&request);
        let inbound_upgrade = upgrade.then(|| hyper::upgrade::on(&mut request));
        let token = match self.cache.get(&route.audience, self.token_wait).await {
            Ok(token) => token,
            Err(e) => return no_token(route, &e.0),
        };
        let (mut parts, body) = request.into_parts();
        strip_hop_by_hop(&mut parts.headers, upgrade);
        parts.headers.remove(header::HOST);
        parts.uri = target;
        parts.version = Version::HTTP_11;

        let mut body = if upgrade {
            OutBody::Replayable(Bytes::new())
        } else if body.size_hint().upper().is_some_and(|upper| upper <= REPLAYABLE_BODY) {
            match Limited::new(body, REPLAYABLE_BODY as usize).collect().await {
                Ok(collected) => OutBody::Replayable(collected.to_bytes()),
                Err(e) => {
                    return json_response(
                        StatusCode::BAD_REQUEST,
                        json!({"error": format!("cannot read the request body: {e}"), "upstream": route.name}),
                    )
                }
            }
        } else {
            OutBody::Streaming(body)
        };

        let client = if upgrade { &self.clients.http1 } else { &self.clients.any };
        let mut token = token;
        let mut retried = false;
        loop {
            let mut headers = parts.headers.clone();
            if let Err(status) = set_token(&mut headers, route.header, &token) {
                return json_response(
                    status,
                    json!({"error": "the token is not a valid header value", "upstream": route.name}),
                );
            }
            let (out_body, replay) = match std::mem::replace(&mut body, OutBody::Replayable(Bytes::new())) {
                OutBody::Replayable(bytes) => {
                    body = OutBody::Replayable(bytes.clone());
                    (if upgrade { empty() } else { full(bytes) }, true)
                }
                OutBody::Streaming(incoming) => (incoming.map_err(BoxError::from).boxed(), false),
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
                    Err(_) => return upstream_timeout(route, limit),
                },
                None => sent.await,
            };
            let response = match answered {
                Ok(response) => response,
                Err(e) => return upstream_error(route, &e),
            };
            if response.status() == StatusCode::UNAUTHORIZED && is_token_refusal(response.headers()) {
                let refetching = self.cache.reject(&route.audience, &token);
                if refetching && replay && !retried && !upgrade {
                    retried = true;
                    debug!(upstream = %route.name, "the front end refused the token; retrying with a new one");
                    match self.cache.get(&route.audience, self.token_wait).await {
                        Ok(fresh) => {
                            token = fresh;
                            continue;
                        }
                        Err(_) => return respond(response),
                    }
                }
                info!(upstream = %route.name, "the front end refused the token; answered as is");
            } else {
                self.cache.accepted(&route.audience);
            }
            if response.status() == StatusCode::SWITCHING_PROTOCOLS {
                if let Some(inbound) = inbound_upgrade {
                    return switch_protocols(route, response, inbound);
                }
            }
            return respond(response);
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

fn respond(response: Response<Incoming>) -> Response<Body> {
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers, false);
    Response::from_parts(parts, body.map_err(BoxError::from).boxed())
}

/// Joins the app's connection and the upstream's once both have switched protocols.
fn switch_protocols(
    route: &Route,
    mut response: Response<Incoming>,
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

fn no_token(route: &Route, reason: &str) -> Response<Body> {
    json_response(
        StatusCode::SERVICE_UNAVAILABLE,
        json!({"error": "no token for this upstream; the request was not sent", "upstream": route.name, "reason": reason}),
    )
}

fn upstream_timeout(route: &Route, limit: Duration) -> Response<Body> {
    warn!(upstream = %route.name, seconds = limit.as_secs(), "upstream timed out");
    json_response(
        StatusCode::GATEWAY_TIMEOUT,
        json!({"error": "the upstream did not answer in time", "upstream": route.name, "reason": format!("no response within {} s (WIPROXY_UPSTREAM_TIMEOUT)", limit.as_secs())}),
    )
}

fn upstream_error(route: &Route, error: &hyper_util::client::legacy::Error) -> Response<Body> {
    let timed_out = {
        let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(error);
        let mut found = false;
        while let Some(cause) = source {
            if cause.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut) {
                found = true;
            }
            source = cause.source();
        }
        found
    };
    let status = if timed_out { StatusCode::GATEWAY_TIMEOUT } else { StatusCode::BAD_GATEWAY };
    let reason = wiproxy_common::error_chain(error);
    warn!(upstream = %route.name, status = status.as_u16(), error = %reason, "upstream unreachable");
    json_response(
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
}
