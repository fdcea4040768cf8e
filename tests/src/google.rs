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
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
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
    /// Identity requests being answered now, and the most there ever were at once.
    pub identity_in_flight: AtomicUsize,
    pub identity_max_in_flight: AtomicUsize,
    /// Lifetime of the ID tokens minted from now on, in seconds.
    pub lifetime_secs: AtomicU64,
    /// Delay before the metadata server answers, in milliseconds.
    pub delay_ms: AtomicU64,
    /// When set, the metadata server answers every identity request with this status and text.
    pub failure: Mutex<Option<(u16, String)>>,
    /// The pod's KSA and its GSA (see `KsaMapping`).
    ksa: Mutex<KsaMapping>,
    /// GSAs the bound GSA may impersonate through IAM Credentials.
    pub impersonable: Mutex<Vec<String>>,
    /// `roles/iam.workloadIdentityUser` bindings: (federated principal, GSA).
    pub federated_bindings: Mutex<Vec<(String, String)>>,
    /// Lifetime of the federated tokens STS hands out, in seconds.
    pub sts_lifetime_secs: AtomicU64,
    /// The `sub` and `jti` of every subject token STS accepted, in order.
    pub sts_subjects: Mutex<Vec<(String, String)>>,
    /// Every request that reached `/v1/token` (STS), accepted or not.
    pub sts_requests: AtomicUsize,
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
            identity_in_flight: AtomicUsize::new(0),
            identity_max_in_flight: AtomicUsize::new(0),
            lifetime_secs: AtomicU64::new(3600),
            delay_ms: AtomicU64::new(0),
            failure: Mutex::default(),
            ksa: Mutex::new(KsaMapping::Bound(bound.to_owned())),
            impersonable: Mutex::default(),
            federated_bindings: Mutex::default(),
            sts_lifetime_secs: AtomicU64::new(3600),
            sts_subjects: Mutex::default(),
            sts_requests: AtomicUsize::new(0),
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

/// The GKE cluster's project and its workload identity pool (`PROJECT_ID.svc.id.goog`).
pub const CLUSTER_PROJECT: &str = "client-project";
pub const WORKLOAD_POOL: &str = "client-project.svc.id.goog";
/// The pod's Kubernetes service account, as the metadata server's messages name it.
pub const POD_NAMESPACE: &str = "payments";
pub const POD_KSA: &str = "orders-client";

/// How the pod's KSA stands with Workload Identity: its `iam.gke.io/gcp-service-account`
/// annotation, and whether the GSA it names exists and grants the KSA's member
/// `serviceAccount:PROJECT_ID.svc.id.goog[NAMESPACE/KSA]` `roles/iam.workloadIdentityUser`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KsaMapping {
    /// Annotated with this GSA, and the binding exists: tokens are the GSA's.
    Bound(String),
    /// Annotated with this GSA, but the GSA lacks the `roles/iam.workloadIdentityUser` binding.
    NoBinding(String),
    /// Annotated with a GSA that does not exist.
    MissingGsa(String),
    /// No annotation: the KSA acts as itself, a member of the workload identity pool.
    Unannotated,
}

impl Google {
    pub fn set_ksa(&self, mapping: KsaMapping) {
        *self.ksa.lock().expect("lock") = mapping;
    }

    fn ksa(&self) -> KsaMapping {
        self.ksa.lock().expect("lock").clone()
    }
}

/// What the GKE metadata server says when the KSA→GSA exchange fails at IAM. The 403 text is
/// quoted by Config Connector's troubleshooting page
/// (https://cloud.google.com/config-connector/docs/troubleshooting, "403 Forbidden" with Workload
/// Identity) for `/token`; that `/identity` answers the same text is undocumented (modelled so).
/// The 404 for a GSA that does not exist is modelled on the same shape with IAM's 404 words
/// ("Requested entity was not found."); its exact GKE wording is undocumented.
const NO_BINDING: &str = "Unable to generate access token; IAM returned 403 Forbidden: The caller does not have permission\nThis error could be caused by a missing IAM policy binding on the target IAM service account.\nFor more information, refer to the Workload Identity documentation: https://cloud.google.com/kubernetes-engine/docs/how-to/workload-identity";
const MISSING_GSA: &str =
    "Unable to generate access token; IAM returned 404 Not Found: Requested entity was not found.";

/// The `/identity` refusal for a KSA without the annotation. Undocumented for real GKE: the only
/// source is the open-source emulator matheuscscp/gke-metadata-server
/// (`internal/server/gke_apis.go`), which answers 404 saying the KSA is not annotated with a
/// target GSA; our wording is our own.
fn unannotated_identity() -> String {
    format!(
        "The Kubernetes service account {POD_NAMESPACE}/{POD_KSA} is not annotated with a target Google service account (iam.gke.io/gcp-service-account), which identity tokens require under Workload Identity.\nRefer to https://cloud.google.com/kubernetes-engine/docs/how-to/workload-identity"
    )
}

/// An error as the GKE metadata server (a Go server) writes it: Go's `http.Error`, so
/// `text/plain; charset=utf-8`, `X-Content-Type-Options: nosniff` and a trailing newline (the
/// headers and the 94-byte length of the 403 in the curl -v of googleapis/google-cloud-ruby#3750).
fn text(status: u16, message: &str) -> Response {
    (
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8"), (header::X_CONTENT_TYPE_OPTIONS, "nosniff")],
        format!("{message}\n"),
    )
        .into_response()
}

/// The metadata server's answer headers past the guard: `Metadata-Flavor: Google` and
/// `Server: GKE Metadata Server` (googleapis/google-cloud-ruby#3750, a 200 from GKE). Whether its
/// IAM refusals carry them too is undocumented; they do here.
async fn metadata_headers(request: Request, next: Next) -> Response {
    if let Some(refusal) = metadata_guard(request.headers()) {
        return refusal;
    }
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    headers.insert("metadata-flavor", HeaderValue::from_static("Google"));
    headers.insert(header::SERVER, HeaderValue::from_static("GKE Metadata Server"));
    response
}

/// Checks the metadata server applies to every request, whatever the path (`/email` included):
/// `Metadata-Flavor: Google`, refused with 403 and no `Metadata-Flavor` in the answer
/// (googleapis/google-cloud-ruby#3750, curl -v against GKE 1.13), and no `X-Forwarded-For` (it
/// refuses proxied requests, https://cloud.google.com/compute/docs/metadata/querying-metadata;
/// GKE's wording for that refusal is undocumented).
fn metadata_guard(headers: &HeaderMap) -> Option<Response> {
    if headers.get("metadata-flavor").and_then(|v| v.to_str().ok()) != Some("Google") {
        return Some(text(
            403,
            "GKE Metadata Server encountered an error: Missing required header \"Metadata-Flavor\": \"Google\"",
        ));
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

/// Counts an identity request in flight for as long as it lives.
struct InFlight<'a>(&'a Google);

impl<'a> InFlight<'a> {
    fn enter(google: &'a Google) -> Self {
        let now = google.identity_in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        google.identity_max_in_flight.fetch_max(now, Ordering::SeqCst);
        Self(google)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.identity_in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn identity(State(google): State<Arc<Google>>, Query(query): Query<IdentityQuery>) -> Response {
    let _in_flight = InFlight::enter(&google);
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
    let email = match google.ksa() {
        KsaMapping::Bound(email) => email,
        KsaMapping::NoBinding(_) => return text(403, NO_BINDING),
        KsaMapping::MissingGsa(_) => return text(404, MISSING_GSA),
        KsaMapping::Unannotated => return text(404, &unannotated_identity()),
    };
    let full = query.format.as_deref() == Some("full");
    let mut response = google.mint(&audience, &email, full).into_response();
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/text"));
    response
}

/// `/token`. An unannotated KSA still gets an access token: a federated token of the workload
/// identity pool, usable on APIs that grant the KSA's principal directly (GKE "Authenticate to
/// Google Cloud APIs from GKE workloads", and DESIGN's facts); only the GSA exchange can fail.
async fn metadata_access_token(State(google): State<Arc<Google>>) -> Response {
    let caller = match google.ksa() {
        KsaMapping::Bound(email) => email,
        KsaMapping::NoBinding(_) => return text(403, NO_BINDING),
        KsaMapping::MissingGsa(_) => return text(404, MISSING_GSA),
        KsaMapping::Unannotated => format!("serviceAccount:{WORKLOAD_POOL}[{POD_NAMESPACE}/{POD_KSA}]"),
    };
    Json(json!({"access_token": google.access_token(&caller, 3599), "expires_in": 3599, "token_type": "Bearer"}))
        .into_response()
}

/// `/email`: the annotated GSA; for an unannotated KSA the pool's name `PROJECT_ID.svc.id.goog`
/// (user report argoproj/argo-cd#20368; GKE does not document it). That the GSA is returned
/// without IAM being asked, binding or not, is undocumented (so in the emulator above). Text
/// answers are `application/text`, as GKE's 200 in googleapis/google-cloud-ruby#3750.
async fn metadata_email(State(google): State<Arc<Google>>) -> Response {
    let email = match google.ksa() {
        KsaMapping::Bound(email) | KsaMapping::NoBinding(email) | KsaMapping::MissingGsa(email) => email,
        KsaMapping::Unannotated => WORKLOAD_POOL.to_owned(),
    };
    ([(header::CONTENT_TYPE, "application/text")], email).into_response()
}

/// The GKE metadata server, served over plain HTTP as in a pod. Every path, unknown ones
/// included, passes the `Metadata-Flavor` guard first.
pub fn metadata_router(google: Arc<Google>) -> Router {
    Router::new()
        .route("/computeMetadata/v1/instance/service-accounts/default/identity", get(identity))
        .route("/computeMetadata/v1/instance/service-accounts/default/token", get(metadata_access_token))
        .route("/computeMetadata/v1/instance/service-accounts/default/email", get(metadata_email))
        // Not GKE's: what the fake saw, for benchmarks (`make bench` reads the fetch concurrency).
        .route("/fake/stats", get(stats))
        // GKE's answer to other paths is not modelled; a plain 404 stands in (undocumented).
        .fallback(|| async { text(404, "Not Found") })
        .layer(axum::middleware::from_fn(metadata_headers))
        .with_state(google)
}

async fn stats(State(google): State<Arc<Google>>) -> Response {
    Json(json!({
        "identity_fetches": google.identity_fetches.load(Ordering::SeqCst),
        "max_in_flight": google.identity_max_in_flight.load(Ordering::SeqCst),
    }))
    .into_response()
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

/// The token endpoint's own URI: what a key file's `token_uri` says, and the only `aud` it takes.
pub const OAUTH_TOKEN_URI: &str = "https://oauth2.googleapis.com/token";
/// Longest assertion Google takes: "exp … a maximum of 1 hour after the issued time"
/// (https://developers.google.com/identity/protocols/oauth2/service-account#authorizingrequests).
const MAX_ASSERTION_LIFETIME: u64 = 3600;
/// Clock skew allowed on `iat`. Google documents none; a minute here.
const ASSERTION_SKEW: u64 = 60;

/// `oauth2.googleapis.com/token`: a signed JWT assertion from a service-account key in, an ID
/// token for its `target_audience` out (RFC 7523 JWT bearer grant). Checked as Google documents
/// for the assertion (https://developers.google.com/identity/protocols/oauth2/service-account):
/// the signature by the key, `iss` the key's email, `aud` "always
/// https://oauth2.googleapis.com/token", `exp` at most one hour after `iat` and not past.
/// Refusals are 400 `{"error":"invalid_grant","error_description":"Invalid JWT: …"}`; the
/// descriptions are Google's as users report them: "Invalid JWT: Failed audience check."
/// (googleapis/google-cloud-python#15228, with "The right audience is …" in
/// requests/requests-oauthlib#247) and "Invalid JWT: Token must be a short-lived token (60
/// minutes) and in a reasonable timeframe. Check your iat and exp values in the JWT claim."
/// (a-marenkov/gsheets#96). The signature and issuer texts are undocumented.
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
    if claims["aud"] != OAUTH_TOKEN_URI {
        return oauth_error(
            400,
            "invalid_grant",
            &format!("Invalid JWT: Failed audience check. The right audience is {OAUTH_TOKEN_URI}"),
        );
    }
    let now = now();
    let timely = match (claims["iat"].as_u64(), claims["exp"].as_u64()) {
        (Some(iat), Some(exp)) => {
            iat <= now + ASSERTION_SKEW && exp > now && exp > iat && exp - iat <= MAX_ASSERTION_LIFETIME
        }
        _ => false,
    };
    if !timely {
        return oauth_error(
            400,
            "invalid_grant",
            "Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable timeframe. Check your iat and exp values in the JWT claim.",
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
    google.sts_requests.fetch_add(1, Ordering::SeqCst);
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
