//! AdmissionReview v1 in, AdmissionReview v1 out: parse what the API server sends, decide
//! (pure, in `review`), let the cluster apply the decision's effects, respond. No sockets here,
//! so every case is testable directly.

use base64::Engine;
use kube_core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview};
use kube_core::DynamicObject;
use serde_json::{json, Value};

use crate::review::{decide, Answer, Decision, Endpoint, ReviewView};
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

/// Answers one review body sent to `endpoint`: the response AdmissionReview and the decision.
pub async fn answer(webhook: &Webhook, endpoint: Endpoint, body: &[u8]) -> Result<(Value, Decision), ReviewError> {
    let request = parse(body)?;
    let view = ReviewView::new(endpoint, &request);
    let span = tracing::Span::current();
    span.record("uid", view.uid.as_str()).record("ns", view.namespace.as_str()).record("object", view.name.as_str());
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
    Ok((respond(&request, &decision), decision))
}

/// `answer`, with the response AdmissionReview already serialised: what `/mutate` and
/// `/validate` send back.
pub async fn answer_bytes(
    webhook: &Webhook,
    endpoint: Endpoint,
    body: &[u8],
) -> Result<(Vec<u8>, Decision), ReviewError> {
    let (response, decision) = answer(webhook, endpoint, body).await?;
    Ok((serde_json::to_vec(&response).unwrap_or_default(), decision))
}

fn parse(body: &[u8]) -> Result<AdmissionRequest<DynamicObject>, ReviewError> {
    let value: Value = serde_json::from_slice(body).map_err(ReviewError::NotJson)?;
    let object = value.as_object().ok_or(ReviewError::NotObject(json_type(&value)))?;
    let api_version = object.get("apiVersion").and_then(Value::as_str).unwrap_or_default();
    let kind = object.get("kind").and_then(Value::as_str).unwrap_or_default();
    if api_version != REVIEW_API_VERSION || kind != REVIEW_KIND {
        return Err(ReviewError::WrongType { found: format!("{api_version}/{kind}") });
    }
    if object.get("request").is_none_or(Value::is_null) {
        return Err(ReviewError::NoRequest);
    }
    let review: AdmissionReview<DynamicObject> = serde_json::from_value(value).map_err(ReviewError::Malformed)?;
    review.try_into().map_err(|_| ReviewError::NoRequest)
}

/// The response AdmissionReview for `decision`, with `patch` as the base64 string the
/// Kubernetes API documents rather than kube-core's list of numbers.
fn respond(request: &AdmissionRequest<DynamicObject>, decision: &Decision) -> Value {
    let mut response = AdmissionResponse::from(request);
    let some = |warnings: &Vec<String>| (!warnings.is_empty()).then(|| warnings.clone());
    let mut patch = None;
    match &decision.answer {
        Answer::Skip(_) => {}
        Answer::Allow { warnings } => response.warnings = some(warnings),
        Answer::Inject { patch: bytes, warnings } => {
            patch = Some(base64::engine::general_purpose::STANDARD.encode(bytes));
            response.warnings = some(warnings);
        }
        Answer::Deny(denial) => response = deny(response, denial),
    }
    let mut review = serde_json::to_value(response.into_review()).unwrap_or_default();
    if let (Some(patch), Some(body)) = (patch, review.get_mut("response").and_then(Value::as_object_mut)) {
        body.insert("patchType".to_owned(), json!("JSONPatch"));
        body.insert("patch".to_owned(), Value::String(patch));
    }
    review
}

fn deny(response: AdmissionResponse, message: impl ToString) -> AdmissionResponse {
    let mut response = response.deny(message);
    response.result.code = 403;
    response.result.reason = "Forbidden".to_owned();
    response
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
