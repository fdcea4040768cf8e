//! A fake Cloud Functions / Cloud Run front end: routes each request to a service by its URL,
//! checks the ID token like Google does (signature, audience among the service's, expiry,
//! invoker list), refuses with Google's 401 and 403 shapes, and then echoes the request.

use std::collections::HashSet;
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

/// One Cloud Run service or Cloud Function, with every URL it answers on and every audience its
/// tokens may carry.
#[derive(Clone, Debug)]
pub struct Service {
    /// `(host, path prefix)`: a cloudfunctions.net URL is `https://REGION-PROJECT.cloudfunctions.net/FUNCTION`,
    /// so its prefix is `/FUNCTION`; a run.app or custom-domain URL has the empty prefix.
    pub urls: Vec<(String, String)>,
    /// Accepted token audiences (`aud`, compared exactly).
    pub audiences: Vec<String>,
}

impl Service {
    /// A Cloud Run service: its `*.run.app` URLs (the deterministic
    /// `https://SERVICE-PROJECT_NUMBER.REGION.run.app` and the older
    /// `https://SERVICE-HASH-REGION.a.run.app`), each an accepted audience as an origin, plus
    /// its custom audiences (https://cloud.google.com/run/docs/configuring/custom-audiences: the
    /// service's URLs are accepted by default, and custom audiences are accepted as well;
    /// https://cloud.google.com/run/docs/authenticating/service-to-service).
    pub fn cloud_run(run_hosts: &[&str], custom_audiences: &[&str]) -> Self {
        Self {
            urls: run_hosts.iter().map(|h| (h.to_string(), String::new())).collect(),
            audiences: run_hosts
                .iter()
                .map(|h| format!("https://{h}"))
                .chain(custom_audiences.iter().map(|a| a.to_string()))
                .collect(),
        }
    }

    /// A function at `https://HOST/NAME`: gen1 accepts exactly that URL as audience
    /// (https://cloud.google.com/functions/docs/securing/authenticating: the audience is the URL of
    /// the function); a gen2 function is also a Cloud Run service, so pass its run.app
    /// hosts too and it accepts either URL (https://cloud.google.com/functions/docs/concepts/version-comparison).
    pub fn function(host: &str, name: &str, run_hosts: &[&str]) -> Self {
        let mut service = Self::cloud_run(run_hosts, &[]);
        service.urls.push((host.to_owned(), format!("/{name}")));
        service.audiences.push(format!("https://{host}/{name}"));
        service
    }

    /// An extra host name (a custom domain mapped to the service) that serves it as is.
    pub fn with_domain(mut self, host: &str) -> Self {
        self.urls.push((host.to_owned(), String::new()));
        self
    }

    fn serves(&self, host: &str, path: &str) -> bool {
        self.urls.iter().any(|(h, prefix)| {
            h == host
                && (prefix.is_empty()
                    || path == prefix
                    || path.strip_prefix(prefix.as_str()).is_some_and(|rest| rest.starts_with('/')))
        })
    }
}

pub struct Function {
    verifier: Verifier,
    services: Vec<Service>,
    /// Emails allowed to invoke (`roles/run.invoker` or `roles/cloudfunctions.invoker`).
    pub invokers: Mutex<Vec<String>>,
    /// Requests that reached the front end, valid or not.
    pub requests: AtomicUsize,
    /// The host each of them was for, in order.
    hosts_seen: Mutex<Vec<String>>,
    /// Tokens refused with 401 as if revoked.
    revoked: Mutex<HashSet<String>>,
    /// Why each refusal was made, in order (Google's answers never say; tests read this).
    refusals: Mutex<Vec<String>>,
    seen: Mutex<Vec<String>>,
}

impl Function {
    pub fn new(verifier: Verifier, services: Vec<Service>, invokers: &[&str]) -> Arc<Self> {
        Arc::new(Self {
            verifier,
            services,
            invokers: Mutex::new(invokers.iter().map(|s| s.to_string()).collect()),
            requests: AtomicUsize::new(0),
            hosts_seen: Mutex::default(),
            revoked: Mutex::default(),
            refusals: Mutex::default(),
            seen: Mutex::default(),
        })
    }

    /// Every host name any service answers on (for the test certificate and `WIPROXY_RESOLVE`).
    pub fn hosts(&self) -> Vec<String> {
        let mut hosts: Vec<String> = self.services.iter().flat_map(|s| s.urls.iter().map(|(h, _)| h.clone())).collect();
        hosts.sort();
        hosts.dedup();
        hosts
    }

    /// How many requests reached the front end for `host`, valid or not.
    pub fn requests_to(&self, host: &str) -> usize {
        self.hosts_seen.lock().expect("lock").iter().filter(|seen| seen.eq_ignore_ascii_case(host)).count()
    }

    /// Refuses every token seen so far with 401, as after a key rotation or revocation.
    pub fn revoke_seen(&self) {
        let seen = self.seen.lock().expect("lock").clone();
        self.revoked.lock().expect("lock").extend(seen);
    }

    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    /// The reasons of the refusals so far, oldest first.
    pub fn refusals(&self) -> Vec<String> {
        self.refusals.lock().expect("lock").clone()
    }

    fn refuse(&self, answer: Response, why: impl Into<String>) -> Response {
        self.refusals.lock().expect("lock").push(why.into());
        answer
    }
}

fn html_escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// Google's front-end page around an error, as it serves them for Cloud Run and Cloud Functions.
fn google_page(title: &str, h1: &str, h2: &str) -> String {
    format!(
        "<html><head>\n<meta http-equiv=\"content-type\" content=\"text/html;charset=utf-8\">\n<title>{title}</title>\n</head>\n\
         <body text=#000000 bgcolor=#ffffff>\n<h1>{h1}</h1>\n<h2>{h2}</h2>\n<h2></h2>\n</body></html>\n"
    )
}

/// A token the front end cannot accept: a bad signature, an audience the service does not take,
/// an expired or revoked token. Cloud Run's troubleshooting page
/// (https://cloud.google.com/run/docs/troubleshooting, its 401 and 403 entries: 401 for a token
/// that is not valid for the service, 403 for a missing token or a missing invoker role) gives
/// the statuses. The page is Google's front-end error page as users paste it, and the challenge
/// (no comma between the parameters) as users report it (google/ground-platform
/// `data-import.service.ts`, google/adk-python#3814): neither is documented by Google. The status for an *expired* token is undocumented; 401 here, as for any
/// token the front end cannot verify.
fn unauthorized(path: &str) -> Response {
    let body = google_page(
        "401 Unauthorized",
        "Error: Unauthorized",
        &format!("Your client does not have permission to the requested URL <code>{}</code>.", html_escape(path)),
    );
    let challenge = "Bearer error=\"invalid_token\" error_description=\"The access token could not be verified\"";
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, challenge), (header::CONTENT_TYPE, "text/html; charset=UTF-8")],
        body,
    )
        .into_response()
}

/// No token at all, or a valid token of a caller without the invoker role: 403 with Google's
/// "Your client does not have permission to get URL … from this server." page and no
/// `WWW-Authenticate` (https://cloud.google.com/run/docs/troubleshooting, its 403 entry).
fn forbidden(path: &str) -> Response {
    let body = google_page(
        "403 Forbidden",
        "Error: Forbidden",
        &format!(
            "Your client does not have permission to get URL <code>{}</code> from this server.",
            html_escape(path)
        ),
    );
    (StatusCode::FORBIDDEN, [(header::CONTENT_TYPE, "text/html; charset=UTF-8")], body).into_response()
}

/// The token and the header it came in. `X-Serverless-Authorization` is honoured, and wins, on
/// Cloud Run hosts only (run.app, and a service's mapped domains, which is undocumented:
/// https://cloud.google.com/run/docs/authenticating/service-to-service: the token may come in
/// `X-Serverless-Authorization`, and then the app's own `Authorization` passes through);
/// a cloudfunctions.net URL reads `Authorization` only (gen1 documents only it; gen2's
/// cloudfunctions.net URL is modelled the same, undocumented).
fn bearer(request: &Request, cloud_functions_host: bool) -> Option<(&'static str, String)> {
    let names: &[&'static str] =
        if cloud_functions_host { &["authorization"] } else { &["x-serverless-authorization", "authorization"] };
    for name in names {
        if let Some(token) =
            request.headers().get(*name).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "))
        {
            return Some((name, token.to_owned()));
        }
    }
    None
}

async fn handle(State(function): State<Arc<Function>>, request: Request) -> Response {
    function.requests.fetch_add(1, Ordering::SeqCst);
    let path = request.uri().path().to_owned();
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
    function.hosts_seen.lock().expect("lock").push(host.clone());
    let Some(service) = function.services.iter().find(|s| s.serves(&host, &path)) else {
        // Google's answer for a URL no service owns is undocumented; a plain 404 stands in.
        return (StatusCode::NOT_FOUND, format!("no service at https://{host}{path}\n")).into_response();
    };
    let Some((token_header, token)) = bearer(&request, host.ends_with(".cloudfunctions.net")) else {
        return function.refuse(forbidden(&path), "no bearer token");
    };
    function.seen.lock().expect("lock").push(token.clone());
    if function.revoked.lock().expect("lock").contains(&token) {
        return function.refuse(unauthorized(&path), "token revoked");
    }
    let claims = match function.verifier.verify(&token) {
        Ok(claims) => claims,
        Err(why) => return function.refuse(unauthorized(&path), why),
    };
    if !claims["aud"].as_str().is_some_and(|aud| service.audiences.iter().any(|a| a == aud)) {
        return function
            .refuse(unauthorized(&path), format!("audience {} is not one of {:?}", claims["aud"], service.audiences));
    }
    if claims["exp"].as_u64().is_none_or(|exp| exp <= now()) {
        return function.refuse(unauthorized(&path), "token expired");
    }
    let email = claims["email"].as_str().unwrap_or_default().to_owned();
    if !function.invokers.lock().expect("lock").contains(&email) {
        return function.refuse(forbidden(&path), format!("{email} is not an invoker"));
    }

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
