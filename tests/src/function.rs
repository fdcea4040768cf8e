//! A fake Cloud Functions / Cloud Run front end: checks the ID token like Google does (signature,
//! audience, expiry, invoker list; 401 and 403 with Google's wording) and then echoes the request.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::ws::{Message, WebSocketUpgrade};
use axum::extract::{FromRequestParts, Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use axum::{Json, Router};
use serde_json::{json, Map, Value};

use crate::jwt::{now, Verifier};

pub struct Function {
    verifier: Verifier,
    /// Expected token audience per host name.
    audiences: HashMap<String, String>,
    /// Emails allowed to invoke (`roles/run.invoker` or `roles/cloudfunctions.invoker`).
    pub invokers: Mutex<Vec<String>>,
    /// Requests that reached the front end, valid or not.
    pub requests: AtomicUsize,
    /// Tokens refused with 401 as if revoked.
    revoked: Mutex<HashSet<String>>,
    seen: Mutex<Vec<String>>,
}

impl Function {
    pub fn new(verifier: Verifier, audiences: &[(&str, &str)], invokers: &[&str]) -> Arc<Self> {
        Arc::new(Self {
            verifier,
            audiences: audiences.iter().map(|(h, a)| (h.to_string(), a.to_string())).collect(),
            invokers: Mutex::new(invokers.iter().map(|s| s.to_string()).collect()),
            requests: AtomicUsize::new(0),
            revoked: Mutex::default(),
            seen: Mutex::default(),
        })
    }

    /// Refuses every token seen so far with 401, as after a key rotation or revocation.
    pub fn revoke_seen(&self) {
        let seen = self.seen.lock().expect("lock").clone();
        self.revoked.lock().expect("lock").extend(seen);
    }

    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

fn unauthorized(why: &str) -> Response {
    let body = format!(
        "<html><head><title>401 Unauthorized</title></head><body><h1>Error: Unauthorized</h1>\
         <h2>Your client does not have permission to the requested URL.</h2><!-- {why} --></body></html>"
    );
    // The front end's challenge as users report it (no comma between the parameters); not
    // documented by Google.
    let challenge = "Bearer error=\"invalid_token\" error_description=\"The access token could not be verified\"";
    (StatusCode::UNAUTHORIZED, [(header::WWW_AUTHENTICATE, challenge)], body).into_response()
}

fn forbidden(email: &str) -> Response {
    let body = format!(
        "<html><head><title>403 Forbidden</title></head><body><h1>Error: Forbidden</h1>\
         <h2>Your client does not have permission to get URL from this server.</h2><!-- {email} is not an invoker --></body></html>"
    );
    (StatusCode::FORBIDDEN, body).into_response()
}

/// The token and the header it came in: `X-Serverless-Authorization` wins, as on Cloud Run.
fn bearer(request: &Request) -> Option<(&'static str, String)> {
    for name in ["x-serverless-authorization", "authorization"] {
        if let Some(token) =
            request.headers().get(name).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "))
        {
            return Some((name, token.to_owned()));
        }
    }
    None
}

async fn handle(State(function): State<Arc<Function>>, request: Request) -> Response {
    function.requests.fetch_add(1, Ordering::SeqCst);
    let Some((token_header, token)) = bearer(&request) else {
        return unauthorized("no bearer token");
    };
    function.seen.lock().expect("lock").push(token.clone());
    if function.revoked.lock().expect("lock").contains(&token) {
        return unauthorized("token revoked");
    }
    let claims = match function.verifier.verify(&token) {
        Ok(claims) => claims,
        Err(why) => return unauthorized(&why),
    };
    let host = request
        .uri()
        .host()
        .map(str::to_owned)
        .or_else(|| {
            request
                .headers()
                .get(header::HOST)
                .and_then(|v| v.to_str().ok())
                .map(|h| h.split(':').next().unwrap_or(h).to_owned())
        })
        .unwrap_or_default();
    let Some(expected) = function.audiences.get(&host) else {
        return unauthorized(&format!("unknown host {host}"));
    };
    if claims["aud"] != expected.as_str() {
        return unauthorized(&format!("audience {} is not {expected}", claims["aud"]));
    }
    if claims["exp"].as_u64().is_none_or(|exp| exp <= now()) {
        return unauthorized("token expired");
    }
    let email = claims["email"].as_str().unwrap_or_default().to_owned();
    if !function.invokers.lock().expect("lock").contains(&email) {
        return forbidden(&email);
    }

    let path = request.uri().path().to_owned();
    if path.ends_with("/ws") {
        let (mut parts, _) = request.into_parts();
        return match WebSocketUpgrade::from_request_parts(&mut parts, &function).await {
            Ok(upgrade) => upgrade.on_upgrade(|mut socket| async move {
                while let Some(Ok(message)) = socket.recv().await {
                    let echo = match message {
                        Message::Text(text) => Message::Text(text),
                        Message::Binary(bytes) => Message::Binary(bytes),
                        Message::Close(_) => break,
                        _ => continue,
                    };
                    if socket.send(echo).await.is_err() {
                        break;
                    }
                }
            }),
            Err(rejection) => rejection.into_response(),
        };
    }
    if path.ends_with("/stream-echo") {
        return Response::new(Body::new(request.into_body()));
    }
    if let Some(code) = path.rsplit_once("/status/").and_then(|(_, code)| code.parse::<u16>().ok()) {
        return StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_REQUEST).into_response();
    }
    if let Some(seconds) = path.rsplit_once("/sleep/").and_then(|(_, s)| s.parse::<u64>().ok()) {
        tokio::time::sleep(std::time::Duration::from_secs(seconds)).await;
        return StatusCode::OK.into_response();
    }
    if path.ends_with("/app-401") {
        // The app's own refusal, behind a front end that accepted the token.
        return (StatusCode::UNAUTHORIZED, [(header::WWW_AUTHENTICATE, "Basic realm=\"orders\"")], "login required\n")
            .into_response();
    }
    if path.ends_with("/redirect-to") {
        // `?location=URL`: a redirect to wherever the test says.
        let location = url::form_urlencoded::parse(request.uri().query().unwrap_or_default().as_bytes())
            .find(|(key, _)| key == "location")
            .map(|(_, value)| value.into_owned())
            .unwrap_or_default();
        return (StatusCode::FOUND, [(header::LOCATION, location)]).into_response();
    }
    if path.ends_with("/redirect") {
        return (StatusCode::FOUND, [(header::LOCATION, "https://accounts.google.com/signin")]).into_response();
    }

    let mut headers = Map::new();
    for (name, value) in request.headers() {
        let value = if name.as_str() == token_header {
            "Bearer <verified token>".to_owned()
        } else {
            value.to_str().unwrap_or("<binary>").to_owned()
        };
        headers.insert(name.as_str().to_owned(), json!(value));
    }
    let method = request.method().to_string();
    let query = request.uri().query().unwrap_or_default().to_owned();
    let version = format!("{:?}", request.version());
    let body = axum::body::to_bytes(request.into_body(), 1024 * 1024).await.unwrap_or_default();
    Json(json!({
        "method": method,
        "host": host,
        "path": path,
        "query": query,
        "version": version,
        "headers": Value::Object(headers),
        "body": String::from_utf8_lossy(&body),
        "token_header": token_header,
        "email": email,
        "audience": claims["aud"],
    }))
    .into_response()
}

pub fn router(function: Arc<Function>) -> Router {
    Router::new().route("/", any(handle)).route("/{*path}", any(handle)).with_state(function)
}
