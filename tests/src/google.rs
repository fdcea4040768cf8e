//! Fakes of Google's side: the GKE metadata server (Workload Identity), the OAuth token endpoint
//! (service-account keys), the Security Token Service (Workload Identity Federation) and IAM
//! Credentials (`generateIdToken`). They share one signing key and remember every token they hand
//! out, so tests can check that none leaks into logs. A fake Kubernetes issuer signs the
//! projected ServiceAccount tokens that federation exchanges.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Query, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::jwt::{now, Signer, Verifier};

/// The fake service-account key of `tests/fixtures`, as the `key-file:` credential reads it.
pub const SERVICE_ACCOUNT_KEY: &str = include_str!("../fixtures/service-account-key.json");

/// The workload identity pool provider trusting the fake cluster's issuer.
pub const WIF_PROVIDER: &str = "projects/123456789012/locations/global/workloadIdentityPools/onprem/providers/cluster";
/// The fake cluster's ServiceAccount token issuer (its `--service-account-issuer`).
pub const CLUSTER_ISSUER: &str = "https://kubernetes.onprem.example.com";

/// The STS `audience` of the provider: what `create-cred-config` writes into the configuration.
pub fn wif_audience() -> String {
    format!("//iam.googleapis.com/{WIF_PROVIDER}")
}

/// The audience a projected ServiceAccount token must carry for the provider: Google's default
/// allowed audience of an OIDC provider is its resource name as an https URL.
pub fn wif_token_audience() -> String {
    format!("https://iam.googleapis.com/{WIF_PROVIDER}")
}

/// The federated principal of a Kubernetes ServiceAccount, as IAM bindings name it
/// (`google.subject` mapped from the token's `sub`).
pub fn wif_principal(namespace: &str, ksa: &str) -> String {
    principal_of(&format!("system:serviceaccount:{namespace}:{ksa}"))
}

/// The principal of a federated subject (`google.subject=assertion.sub`).
fn principal_of(subject: &str) -> String {
    let pool = WIF_PROVIDER.split("/providers/").next().unwrap_or_default();
    format!("principal://iam.googleapis.com/{pool}/subject/{subject}")
}

pub struct Google {
    signer: Signer,
    /// Signs the fake cluster's projected ServiceAccount tokens.
    cluster_issuer: Signer,
    key_file: Verifier,
    key_file_email: String,
    next_id: AtomicU64,
    /// Every token handed out, ID and access tokens alike.
    minted: Mutex<Vec<String>>,
    /// Access tokens handed out: token → (caller, expiry in epoch seconds).
    access_tokens: Mutex<HashMap<String, (String, u64)>>,
    /// ID tokens served by the metadata server's identity endpoint (all audiences).
    pub identity_fetches: AtomicUsize,
    /// Lifetime of the ID tokens minted from now on, in seconds.
    pub lifetime_secs: AtomicU64,
    /// Delay before the metadata server answers, in milliseconds.
    pub delay_ms: AtomicU64,
    /// When set, the metadata server answers every identity request with this status and text.
    pub failure: Mutex<Option<(u16, String)>>,
    /// The GSA the pod's KSA is bound to; `None` is an unbound KSA (404).
    pub bound: Mutex<Option<String>>,
    /// GSAs the bound GSA may impersonate through IAM Credentials.
    pub impersonable: Mutex<Vec<String>>,
    /// `roles/iam.workloadIdentityUser` bindings: (federated principal, GSA).
    pub federated_bindings: Mutex<Vec<(String, String)>>,
    /// Lifetime of the federated tokens STS hands out, in seconds.
    pub sts_lifetime_secs: AtomicU64,
    /// The `sub` and `jti` of every subject token STS accepted, in order.
    pub sts_subjects: Mutex<Vec<(String, String)>>,
}

impl Google {
    pub fn new(bound: &str) -> Arc<Self> {
        let key: Value = serde_json::from_str(SERVICE_ACCOUNT_KEY).expect("fixture key is JSON");
        let key_file = Signer::from_pem(key["private_key"].as_str().unwrap_or_default(), "sa")
            .expect("fixture key is RSA")
            .verifier();
        Arc::new(Self {
            signer: Signer::google(),
            cluster_issuer: Signer::from_pem(include_str!("../fixtures/cluster-issuer-key.pem"), "cluster-1")
                .expect("the fixture key is a valid RSA key"),
            key_file,
            key_file_email: key["client_email"].as_str().unwrap_or_default().to_owned(),
            next_id: AtomicU64::new(1),
            minted: Mutex::default(),
            access_tokens: Mutex::default(),
            identity_fetches: AtomicUsize::new(0),
            lifetime_secs: AtomicU64::new(3600),
            delay_ms: AtomicU64::new(0),
            failure: Mutex::default(),
            bound: Mutex::new(Some(bound.to_owned())),
            impersonable: Mutex::default(),
            federated_bindings: Mutex::default(),
            sts_lifetime_secs: AtomicU64::new(3600),
            sts_subjects: Mutex::default(),
        })
    }

    /// A projected ServiceAccount token of the fake cluster, as the kubelet writes it, valid
    /// for `lifetime` seconds (negative: already expired).
    pub fn cluster_token(&self, namespace: &str, ksa: &str, audience: &str, lifetime: i64) -> String {
        let iat = now();
        let claims = json!({
            "iss": CLUSTER_ISSUER,
            "aud": [audience],
            "sub": format!("system:serviceaccount:{namespace}:{ksa}"),
            "iat": iat,
            "nbf": iat,
            "exp": iat.saturating_add_signed(lifetime),
            "jti": format!("kube-{}", self.next_id.fetch_add(1, Ordering::SeqCst)),
            "kubernetes.io": {"namespace": namespace, "serviceaccount": {"name": ksa, "uid": "0d4a5c4e-0000-4000-8000-000000000001"}},
        });
        let token = self.cluster_issuer.sign(&claims);
        self.minted.lock().expect("lock").push(token.clone());
        token
    }

    pub fn verifier(&self) -> Verifier {
        self.signer.verifier()
    }

    pub fn minted(&self) -> Vec<String> {
        self.minted.lock().expect("lock").clone()
    }

    pub fn set_failure(&self, failure: Option<(u16, &str)>) {
        *self.failure.lock().expect("lock") = failure.map(|(status, text)| (status, text.to_owned()));
    }

    /// A Google-style ID token: RS256 with iss, aud, azp, sub, email, email_verified, iat, exp.
    pub fn mint(&self, audience: &str, email: &str, with_email: bool) -> String {
        let id = self.next_id.fetch_add(1, Ordering::SeqCst);
        let iat = now();
        let mut claims = json!({
            "iss": "https://accounts.google.com",
            "aud": audience,
            "azp": "104857600000000000001",
            "sub": "104857600000000000001",
            "iat": iat,
            "exp": iat + self.lifetime_secs.load(Ordering::SeqCst),
            "jti": format!("fake-{id}"),
        });
        if with_email {
            claims["email"] = json!(email);
            claims["email_verified"] = json!(true);
        }
        let token = self.signer.sign(&claims);
        self.minted.lock().expect("lock").push(token.clone());
        token
    }

    /// Revokes every access token handed out so far: IAM answers 401 to them from now on.
    pub fn revoke_access_tokens(&self) {
        self.access_tokens.lock().expect("lock").clear();
    }

    fn access_token(&self, caller: &str, lifetime: u64) -> String {
        let token = format!("ya29.fake-access-{}-{}", self.next_id.fetch_add(1, Ordering::SeqCst), now());
        self.access_tokens.lock().expect("lock").insert(token.clone(), (caller.to_owned(), now() + lifetime));
        self.minted.lock().expect("lock").push(token.clone());
        token
    }
}

fn text(status: u16, message: &str) -> Response {
    (StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR), format!("{message}\n")).into_response()
}

/// Checks the metadata server applies to every request: `Metadata-Flavor: Google` and no
/// `X-Forwarded-For` (it refuses proxied requests).
fn metadata_guard(headers: &HeaderMap) -> Option<Response> {
    if headers.get("metadata-flavor").and_then(|v| v.to_str().ok()) != Some("Google") {
        return Some(text(403, "Missing required header \"Metadata-Flavor\": \"Google\""));
    }
    if headers.contains_key("x-forwarded-for") {
        return Some(text(403, "Request denied: the metadata server does not accept requests with X-Forwarded-For"));
    }
    None
}

#[derive(Deserialize)]
struct IdentityQuery {
    audience: Option<String>,
    format: Option<String>,
}

async fn identity(
    State(google): State<Arc<Google>>,
    headers: HeaderMap,
    Query(query): Query<IdentityQuery>,
) -> Response {
    if let Some(refusal) = metadata_guard(&headers) {
        return refusal;
    }
    let Some(audience) = query.audience.filter(|a| !a.is_empty()) else {
        return text(400, "non-empty audience parameter required");
    };
    let delay = google.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    google.identity_fetches.fetch_add(1, Ordering::SeqCst);
    if let Some((status, message)) = google.failure.lock().expect("lock").clone() {
        return text(status, &message);
    }
    let Some(email) = google.bound.lock().expect("lock").clone() else {
        return text(
            404,
            "The Kubernetes service account is not bound to a Google service account: add the roles/iam.workloadIdentityUser binding and the iam.gke.io/gcp-service-account annotation",
        );
    };
    let full = query.format.as_deref() == Some("full");
    google.mint(&audience, &email, full).into_response()
}

async fn metadata_access_token(State(google): State<Arc<Google>>, headers: HeaderMap) -> Response {
    if let Some(refusal) = metadata_guard(&headers) {
        return refusal;
    }
    let Some(email) = google.bound.lock().expect("lock").clone() else {
        return text(404, "The Kubernetes service account is not bound to a Google service account");
    };
    Json(json!({"access_token": google.access_token(&email, 3599), "expires_in": 3599, "token_type": "Bearer"}))
        .into_response()
}

/// The GKE metadata server, served over plain HTTP as in a pod.
pub fn metadata_router(google: Arc<Google>) -> Router {
    Router::new()
        .route("/computeMetadata/v1/instance/service-accounts/default/identity", get(identity))
        .route("/computeMetadata/v1/instance/service-accounts/default/token", get(metadata_access_token))
        .route(
            "/computeMetadata/v1/instance/service-accounts/default/email",
            get(|State(google): State<Arc<Google>>| async move {
                google.bound.lock().expect("lock").clone().unwrap_or_default()
            }),
        )
        .with_state(google)
}

fn oauth_error(status: u16, error: &str, description: &str) -> Response {
    (
        StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST),
        Json(json!({"error": error, "error_description": description})),
    )
        .into_response()
}

fn iam_error(status: u16, message: &str) -> Response {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST);
    (code, Json(json!({"error": {"code": status, "message": message, "status": code.canonical_reason()}})))
        .into_response()
}

/// `oauth2.googleapis.com/token`: a signed JWT assertion from a service-account key in, an ID
/// token for its `target_audience` out.
async fn oauth_token(State(google): State<Arc<Google>>, body: String) -> Response {
    let form: HashMap<String, String> = url::form_urlencoded::parse(body.as_bytes()).into_owned().collect();
    if form.get("grant_type").map(String::as_str) != Some("urn:ietf:params:oauth:grant-type:jwt-bearer") {
        return oauth_error(400, "unsupported_grant_type", "Invalid grant_type");
    }
    let Some(assertion) = form.get("assertion") else {
        return oauth_error(400, "invalid_request", "Missing required parameter: assertion");
    };
    let claims = match google.key_file.verify(assertion) {
        Ok(claims) => claims,
        Err(why) => return oauth_error(400, "invalid_grant", &format!("Invalid JWT Signature ({why})")),
    };
    if claims["iss"] != google.key_file_email.as_str() {
        return oauth_error(400, "invalid_grant", "Invalid JWT: unknown issuer");
    }
    if claims["exp"].as_u64().is_none_or(|exp| exp <= now()) {
        return oauth_error(
            400,
            "invalid_grant",
            "Invalid JWT: Token must be a short-lived token and in a reasonable timeframe",
        );
    }
    let Some(audience) = claims["target_audience"].as_str() else {
        return oauth_error(400, "invalid_request", "target_audience is required for an ID token");
    };
    Json(json!({"id_token": google.mint(audience, &google.key_file_email, true)})).into_response()
}

/// `sts.googleapis.com/v1/token`: RFC 8693 token exchange of a projected ServiceAccount token
/// for a federated access token (https://cloud.google.com/iam/docs/reference/sts/rest/v1/TopLevel/token).
/// Checked as Google documents for an OIDC provider: the audience names an existing provider, the
/// subject token's signature verifies against the issuer's JWKS, its `iss` is the provider's
/// issuer, its `aud` holds one of the allowed audiences, and it has not expired. Errors are OAuth
/// errors (`error`, `error_description`) with status 400, as the STS reference shows; the exact
/// description texts are not documented and are modelled on what Google's STS prints.
async fn sts_token(State(google): State<Arc<Google>>, headers: HeaderMap, body: String) -> Response {
    // The reference: "do not send the Authorization HTTP header in the request … using the
    // header can cause the request to fail". Undocumented how; refused here.
    if headers.contains_key("authorization") {
        return oauth_error(400, "invalid_request", "The Authorization header must not be sent to the token endpoint.");
    }
    let form: HashMap<String, String> = url::form_urlencoded::parse(body.as_bytes()).into_owned().collect();
    let field = |name: &str| form.get(name).map(String::as_str).unwrap_or_default();
    if field("grant_type") != "urn:ietf:params:oauth:grant-type:token-exchange" {
        return oauth_error(400, "unsupported_grant_type", "The grant_type is not supported.");
    }
    // "Required when exchanging an external credential for a Google access token."
    if !field("scope").split(' ').any(|s| s == "https://www.googleapis.com/auth/cloud-platform") {
        return oauth_error(
            400,
            "invalid_scope",
            "The scope parameter must include https://www.googleapis.com/auth/cloud-platform.",
        );
    }
    if field("requested_token_type") != "urn:ietf:params:oauth:token-type:access_token" {
        return oauth_error(400, "invalid_request", "Invalid value for \"requested_token_type\".");
    }
    if field("subject_token_type") != "urn:ietf:params:oauth:token-type:jwt" {
        return oauth_error(400, "invalid_request", "Invalid value for \"subject_token_type\".");
    }
    if field("audience") != wif_audience() {
        return oauth_error(
            400,
            "invalid_target",
            "The target service indicated by the \"audience\" parameters is invalid. This might either be because the pool or provider is disabled or deleted or because it doesn't exist.",
        );
    }
    let claims = match google.cluster_issuer.verifier().verify(field("subject_token")) {
        Ok(claims) => claims,
        Err(why) => return oauth_error(400, "invalid_grant", &format!("Invalid ID Token: {why}.")),
    };
    if claims["iss"] != CLUSTER_ISSUER {
        return oauth_error(
            400,
            "invalid_grant",
            &format!("The issuer in ID Token {} does not match the expected ones: {CLUSTER_ISSUER}.", claims["iss"]),
        );
    }
    let expected = wif_token_audience();
    let audiences: Vec<&str> = match &claims["aud"] {
        Value::String(one) => vec![one.as_str()],
        Value::Array(many) => many.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    };
    if !audiences.contains(&expected.as_str()) {
        return oauth_error(
            400,
            "invalid_grant",
            &format!("The audience in ID Token {audiences:?} does not match the expected audience {expected}."),
        );
    }
    if claims["exp"].as_u64().is_none_or(|exp| exp <= now()) {
        return oauth_error(400, "invalid_grant", "ID Token has expired.");
    }
    let subject = claims["sub"].as_str().unwrap_or_default().to_owned();
    let jti = claims["jti"].as_str().unwrap_or_default().to_owned();
    google.sts_subjects.lock().expect("lock").push((subject.clone(), jti));
    let principal = principal_of(&subject);
    let lifetime = google.sts_lifetime_secs.load(Ordering::SeqCst);
    Json(json!({
        "access_token": google.access_token(&principal, lifetime),
        "issued_token_type": "urn:ietf:params:oauth:token-type:access_token",
        "token_type": "Bearer",
        "expires_in": lifetime,
    }))
    .into_response()
}

/// `iamcredentials.googleapis.com/v1/projects/-/serviceAccounts/GSA:generateIdToken`.
async fn generate_id_token(State(google): State<Arc<Google>>, request: Request) -> Response {
    let path = request.uri().path().to_owned();
    let Some(target) = path
        .strip_prefix("/v1/projects/-/serviceAccounts/")
        .and_then(|rest| rest.strip_suffix(":generateIdToken"))
        .map(str::to_owned)
    else {
        return iam_error(404, "Not found");
    };
    let caller = request
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .and_then(|token| google.access_tokens.lock().expect("lock").get(token).cloned())
        .filter(|(_, expiry)| *expiry > now())
        .map(|(caller, _)| caller);
    let Some(caller) = caller else {
        return iam_error(401, "Request had invalid authentication credentials. Expected OAuth 2 access token.");
    };
    // A federated principal needs roles/iam.workloadIdentityUser on the GSA; a GSA caller needs
    // roles/iam.serviceAccountTokenCreator (here: the impersonable list).
    let allowed = if caller.starts_with("principal://") {
        google.federated_bindings.lock().expect("lock").iter().any(|(p, gsa)| *p == caller && *gsa == target)
    } else {
        google.impersonable.lock().expect("lock").contains(&target)
    };
    if !allowed {
        return iam_error(
            403,
            &format!("Permission 'iam.serviceAccounts.getOpenIdToken' denied on resource (or it may not exist): {caller} cannot act as {target}"),
        );
    }
    let body = match axum::body::to_bytes(request.into_body(), 64 * 1024).await {
        Ok(body) => body,
        Err(_) => return iam_error(400, "Invalid request body"),
    };
    let body: Value = serde_json::from_slice(&body).unwrap_or_default();
    let Some(audience) = body["audience"].as_str().filter(|a| !a.is_empty()) else {
        return iam_error(400, "Invalid value for audience: must not be empty");
    };
    let include_email = body["includeEmail"].as_bool().unwrap_or(false);
    Json(json!({"token": google.mint(audience, &target, include_email)})).into_response()
}

/// `oauth2.googleapis.com`, `sts.googleapis.com` and `iamcredentials.googleapis.com`, served over
/// HTTPS; also the JWKS at `/oauth2/v3/certs`.
pub fn googleapis_router(google: Arc<Google>) -> Router {
    Router::new()
        .route("/token", axum::routing::post(oauth_token))
        .route("/v1/token", axum::routing::post(sts_token))
        .route(
            "/oauth2/v3/certs",
            get(|State(google): State<Arc<Google>>| async move { Json(google.verifier().jwks()) }),
        )
        .fallback(generate_id_token)
        .with_state(google)
}
