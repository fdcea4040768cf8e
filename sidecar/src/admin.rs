//! The admin server: `/healthz` (the process answers), `/readyz` (every upstream has a token
//! for the expected identity) and `/metrics`.

use std::sync::Arc;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::{json, Map, Value};

use crate::body::{json_response, text_response, Body};
use crate::cache::TokenCache;
use crate::metrics::Metrics;
use crate::routes::Routes;

pub struct Admin {
    pub routes: Routes,
    pub cache: Arc<TokenCache>,
    pub metrics: Arc<Metrics>,
}

impl Admin {
    pub async fn handle(self: Arc<Self>, request: Request<Incoming>) -> Response<Body> {
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
