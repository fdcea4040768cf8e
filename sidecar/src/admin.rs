//! The admin server: `/healthz` (the process answers), `/readyz` (every upstream has a token
//! for the expected identity) and `/metrics`.

use std::sync::Arc;

use std::time::Duration;

use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use serde_json::{json, Map, Value};
use wiproxy_common::serve::{ConnectionPolicy, RequestBody};

use crate::body::{json_response, text_response, Body};
use crate::cache::TokenCache;
use crate::metrics::Metrics;
use crate::routes::Routes;

pub struct Admin {
    pub routes: Routes,
    pub cache: Arc<TokenCache>,
    pub metrics: Arc<Metrics>,
}

/// The admin port is reachable from every pod in the cluster: a small cap of its own, small heads
/// and short timeouts, so nothing sent to it can take memory or file descriptors the proxy needs.
/// The kubelet's probes (a new connection each, three kinds at most) and a Prometheus scrape
/// need a handful; 32 slots with a share of 8 per source address (a quarter) leave them room
/// when one pod holds its share, and silent connections leave first for them whatever the
/// number of pods sending them (see `wiproxy_common::serve`). A slot costs nothing until used,
/// and a silent one about 2 KiB.
pub const ADMIN_CONNECTIONS: usize = 32;
pub const ADMIN_HEADER_BYTES: usize = 8 * 1024;
pub const ADMIN_TIMEOUT: Duration = Duration::from_secs(5);
pub const ADMIN_IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// The admin port's connection policy.
pub fn policy() -> ConnectionPolicy {
    ConnectionPolicy::new("admin", ADMIN_CONNECTIONS)
        .header_timeout(ADMIN_TIMEOUT)
        .body_timeout(ADMIN_TIMEOUT)
        .idle_timeout(ADMIN_IDLE_TIMEOUT)
        .max_header_bytes(ADMIN_HEADER_BYTES)
        .max_headers(32)
        .max_streams(4)
}

impl Admin {
    pub async fn handle(self: Arc<Self>, request: Request<RequestBody>) -> Response<Body> {
        if request.method() != Method::GET && request.method() != Method::HEAD {
            let mut response =
                json_response(StatusCode::METHOD_NOT_ALLOWED, json!({"error": "the admin server answers GET only"}));
            response.headers_mut().insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
            response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
            return response;
        }
        match request.uri().path() {
            "/healthz" => text_response(StatusCode::OK, "ok\n", "text/plain"),
            "/readyz" => self.readyz(),
            "/metrics" => {
                self.cache.observe_ttl();
                text_response(
                    StatusCode::OK,
                    self.metrics.encode(),
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                )
            }
            _ => json_response(
                StatusCode::NOT_FOUND,
                json!({"error": "the admin server serves /healthz, /readyz and /metrics"}),
            ),
        }
    }

    /// Ready when every upstream's audience has a servable token; otherwise 503 with each reason.
    fn readyz(&self) -> Response<Body> {
        let status = self.cache.status();
        let mut upstreams = Map::new();
        let mut ready = true;
        for route in self.routes.iter() {
            let entry = match status.iter().find(|(audience, _)| *audience == route.audience) {
                Some((_, Ok(ttl))) => json!({"ready": true, "audience": route.audience, "expires_in": ttl}),
                Some((_, Err(reason))) => {
                    ready = false;
                    json!({"ready": false, "audience": route.audience, "reason": reason})
                }
                None => {
                    ready = false;
                    json!({"ready": false, "audience": route.audience, "reason": "no token slot"})
                }
            };
            upstreams.insert(route.name.clone(), entry);
        }
        let code = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
        json_response(code, json!({"ready": ready, "upstreams": Value::Object(upstreams)}))
    }
}
