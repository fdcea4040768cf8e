//! AdmissionReview v1 in, AdmissionReview v1 out: parse what the API server sends, decide
//! (pure, in `review`), let the cluster apply the decision's effects, respond. No sockets here,
//! so every case is testable directly.
//!
//! A review is read once: the envelope and the request typed, the object kept as raw JSON until
//! the decision reads it as a Pod; the answer is written straight from typed structs, with the
//! patch (serialised once by `decide`) as the base64 string the Kubernetes API documents rather
//! than kube-core's list of numbers.

use base64::Engine;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::review::{decide, Answer, Decision, Endpoint, ReviewRequest, ReviewView};
use crate::Webhook;

const REVIEW_API_VERSION: &str = "admission.k8s.io/v1";
const REVIEW_KIND: &str = "AdmissionReview";

/// A body that is not an AdmissionReview v1 with a request: answered with HTTP 400.
#[derive(Debug, thiserror::Error)]
pub enum ReviewError {
    #[error("body is not JSON: {0}")]
    NotJson(serde_json::Error),
    #[error("body is a JSON {0}, not an AdmissionReview object")]
    NotObject(&'static str),
    #[error("apiVersion/kind is {found:?}: send apiVersion {REVIEW_API_VERSION}, kind {REVIEW_KIND} (list only v1 in admissionReviewVersions)")]
    WrongType { found: String },
    #[error("AdmissionReview has no request")]
    NoRequest,
    #[error("AdmissionReview request is malformed: {0}")]
    Malformed(serde_json::Error),
}

impl ReviewError {
    /// A short, fixed label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NotJson(_) | Self::NotObject(_) => "not_json",
            Self::WrongType { .. } => "wrong_type",
            Self::NoRequest => "no_request",
            Self::Malformed(_) => "malformed",
        }
    }
}

/// Answers one review body sent to `endpoint`: the response AdmissionReview, serialised, and the
/// decision.
pub async fn answer(webhook: &Webhook, endpoint: Endpoint, body: &[u8]) -> Result<(Vec<u8>, Decision), ReviewError> {
    let request = parse(body)?;
    let view = ReviewView::new(endpoint, &request);
    let span = tracing::Span::current();
    if !span.is_disabled() {
        span.record("uid", view.uid.as_str())
            .record("ns", view.namespace.as_str())
            .record("object", view.name.as_str());
    }
    if let Some(ksa) = view.service_account() {
        webhook.cluster.load(&view.namespace, &ksa).await;
    }
    let policies = webhook.policies.current();
    let mut decision = decide(&view, &webhook.sidecar, &policies, &webhook.cluster);
    if let Err(failed) = webhook.cluster.apply(&decision.effects).await {
        decision = Decision::after_failure(&view, failed);
        // A denial's effects only record it, which cannot fail.
        let _ = webhook.cluster.apply(&decision.effects).await;
    }
    Ok((respond(&request.uid, &decision), decision))
}

/// A review as it comes: its type and the request, read in one pass over the body (the object
/// inside is only delimited, as raw JSON).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Envelope<'a> {
    #[serde(default)]
    api_version: Option<String>,
    #[serde(default)]
    kind: Option<String>,
    #[serde(default, borrow)]
    request: Option<ReviewRequest<'a>>,
}

fn parse(body: &[u8]) -> Result<ReviewRequest<'_>, ReviewError> {
    let envelope: Envelope = match serde_json::from_slice(body) {
        Ok(envelope) => envelope,
        Err(e) => return Err(classify(body, e)),
    };
    let api_version = envelope.api_version.unwrap_or_default();
    let kind = envelope.kind.unwrap_or_default();
    if api_version != REVIEW_API_VERSION || kind != REVIEW_KIND {
        return Err(ReviewError::WrongType { found: format!("{api_version}/{kind}") });
    }
    envelope.request.ok_or(ReviewError::NoRequest)
}

/// Why a body is not a review, read again as a `Value` (only bodies that fail get here), in the
/// order a reader would check: JSON, an object, the type, a request, the request's fields.
fn classify(body: &[u8], error: serde_json::Error) -> ReviewError {
    let value: Value = match serde_json::from_slice(body) {
        Ok(value) => value,
        Err(e) => return ReviewError::NotJson(e),
    };
    let Some(object) = value.as_object() else { return ReviewError::NotObject(json_type(&value)) };
    let text = |key: &str| object.get(key).and_then(Value::as_str).unwrap_or_default().to_owned();
    let (api_version, kind) = (text("apiVersion"), text("kind"));
    if api_version != REVIEW_API_VERSION || kind != REVIEW_KIND {
        return ReviewError::WrongType { found: format!("{api_version}/{kind}") };
    }
    if object.get("request").is_none_or(Value::is_null) {
        return ReviewError::NoRequest;
    }
    ReviewError::Malformed(error)
}

/// The AdmissionReview v1 sent back.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ReviewResponse<'a> {
    api_version: &'static str,
    kind: &'static str,
    response: Response<'a>,
}

/// Field for field what kube-core's `AdmissionResponse` writes, with `patch` as base64.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Response<'a> {
    uid: &'a str,
    allowed: bool,
    status: Status,
    #[serde(skip_serializing_if = "Option::is_none")]
    warnings: Option<&'a [String]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    patch_type: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    patch: Option<String>,
}

/// The `metav1.Status` of a denial (empty when allowed).
#[derive(Default, Serialize)]
struct Status {
    #[serde(skip_serializing_if = "Option::is_none")]
    code: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'static str>,
}

/// The response AdmissionReview for `decision`, serialised.
fn respond(uid: &str, decision: &Decision) -> Vec<u8> {
    fn some(warnings: &[String]) -> Option<&[String]> {
        (!warnings.is_empty()).then_some(warnings)
    }
    let mut response =
        Response { uid, allowed: true, status: Status::default(), warnings: None, patch_type: None, patch: None };
    match &decision.answer {
        Answer::Skip(_) => {}
        Answer::Allow { warnings } => response.warnings = some(warnings),
        Answer::Inject { patch, warnings } => {
            response.warnings = some(warnings);
            response.patch_type = Some("JSONPatch");
            response.patch = Some(base64::engine::general_purpose::STANDARD.encode(patch));
        }
        Answer::Deny(denial) => {
            response.allowed = false;
            response.status = Status { code: Some(403), message: Some(denial.to_string()), reason: Some("Forbidden") };
        }
    }
    let review = ReviewResponse { api_version: REVIEW_API_VERSION, kind: REVIEW_KIND, response };
    // Strings, numbers and booleans only: serialising cannot fail.
    serde_json::to_vec(&review).unwrap_or_default()
}

fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}
