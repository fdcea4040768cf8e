//! AdmissionReview v1 in, AdmissionReview v1 out: parses what the API server sends, runs the
//! injection core and wraps its answer. No sockets here, so every case is testable directly.

use base64::Engine;
use k8s_openapi::api::core::v1::Pod;
use kube_core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use kube_core::DynamicObject;
use serde_json::Value;

use crate::inject::{inject, Inputs, Outcome, ServiceAccountChange};
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

/// How a review ended, for logs and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// `injected`, `skipped` or `denied`.
    pub result: &'static str,
    /// Why: a denial reason, or why nothing was done.
    pub reason: &'static str,
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// The ServiceAccount annotation the pod needs, when it needs one and this is not a dry run.
    pub service_account: ServiceAccountChange,
}

/// Answers one `POST /mutate` body: the response AdmissionReview and what happened.
pub fn review(webhook: &Webhook, body: &[u8]) -> Result<(Value, Summary), ReviewError> {
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
    let request: AdmissionRequest<DynamicObject> = review.try_into().map_err(|_| ReviewError::NoRequest)?;

    let namespace = request.namespace.clone().unwrap_or_default();
    let mut summary = Summary {
        result: "skipped",
        reason: "",
        namespace: namespace.clone(),
        name: request.name.clone(),
        uid: request.uid.clone(),
        service_account: ServiceAccountChange::None,
    };
    let response = AdmissionResponse::from(&request);

    let is_pod = request.kind.group.is_empty() && request.kind.kind == "Pod";
    if !is_pod || request.sub_resource.is_some() {
        summary.reason = "not_a_pod";
        return Ok((into_json(response), summary));
    }
    if request.operation != Operation::Create {
        summary.reason = "not_a_create";
        return Ok((into_json(response), summary));
    }
    let pod = match request.object.as_ref().map(|o| serde_json::to_value(o).and_then(serde_json::from_value::<Pod>)) {
        Some(Ok(pod)) => pod,
        Some(Err(e)) => {
            summary.result = "denied";
            summary.reason = "malformed_pod";
            return Ok((into_json(deny(response, format!("request.object is not a valid Pod: {e}"))), summary));
        }
        None => {
            summary.result = "denied";
            summary.reason = "malformed_pod";
            return Ok((into_json(deny(response, "request.object is missing from a CREATE review")), summary));
        }
    };
    if summary.name.is_empty() {
        summary.name = pod.metadata.generate_name.clone().unwrap_or_default();
    }
    let namespace = if namespace.is_empty() {
        pod.metadata.namespace.clone().unwrap_or_else(|| "default".to_owned())
    } else {
        namespace
    };

    let inputs = Inputs {
        namespace: &namespace,
        sidecar: &webhook.sidecar,
        policies: &webhook.policies,
        cluster: webhook.cluster.as_ref(),
    };
    let response = match inject(&pod, &inputs) {
        Ok(Outcome::NotRequested) => {
            summary.reason = "not_labelled";
            response
        }
        Ok(Outcome::AlreadyInjected) => {
            summary.reason = "already_injected";
            response
        }
        Ok(Outcome::Injected(injection)) => {
            summary.result = "injected";
            if !request.dry_run {
                summary.service_account = injection.service_account;
            }
            let mut response = match response.with_patch(injection.patch) {
                Ok(response) => response,
                Err(e) => {
                    summary.result = "denied";
                    summary.reason = "internal";
                    return Ok((
                        into_json(deny(AdmissionResponse::from(&request), format!("cannot encode patch: {e}"))),
                        summary,
                    ));
                }
            };
            if !injection.warnings.is_empty() {
                response.warnings = Some(injection.warnings);
            }
            response
        }
        Err(denial) => {
            summary.result = "denied";
            summary.reason = denial.reason();
            deny(response, denial.to_string())
        }
    };
    Ok((into_json(response), summary))
}

fn deny(response: AdmissionResponse, message: impl ToString) -> AdmissionResponse {
    let mut response = response.deny(message);
    response.result.code = 403;
    response.result.reason = "Forbidden".to_owned();
    response
}

/// Serializes the response review, with `patch` as the base64 string the Kubernetes API
/// documents rather than kube-core's list of numbers.
fn into_json(response: AdmissionResponse) -> Value {
    let patch = response.patch.clone();
    let mut review = serde_json::to_value(response.into_review()).unwrap_or_default();
    if let (Some(patch), Some(slot)) = (patch, review.pointer_mut("/response/patch")) {
        *slot = Value::String(base64::engine::general_purpose::STANDARD.encode(patch));
    }
    review
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
