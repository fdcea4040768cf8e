//! AdmissionReview v1 in, AdmissionReview v1 out: parses what the API server sends, runs the
//! injection core and wraps its answer. No sockets here, so every case is testable directly.

use base64::Engine;
use k8s_openapi::api::core::v1::Pod;
use kube_core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use kube_core::DynamicObject;
use serde_json::{json, Value};

use std::sync::Arc;

use crate::denial::Denial;
use crate::inject::{inject, service_account_name, Inputs, Outcome, ServiceAccountChange};
use crate::live::LiveCluster;
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

fn summary(request: &AdmissionRequest<DynamicObject>) -> Summary {
    Summary {
        result: "skipped",
        reason: "",
        namespace: request.namespace.clone().unwrap_or_default(),
        name: request.name.clone(),
        uid: request.uid.clone(),
        service_account: ServiceAccountChange::None,
    }
}

/// The pod (or pod template) of a request as a typed Pod, or the denial message saying why not.
fn pod_from(object: Option<&Value>, what: &str) -> Result<Pod, String> {
    let object = object.ok_or_else(|| format!("{what} is missing from the review"))?;
    serde_json::from_value(object.clone()).map_err(|e| format!("{what} is not a valid Pod: {e}"))
}

/// Answers one `POST /mutate` body: the response AdmissionReview and what happened.
pub async fn review(webhook: &Webhook, body: &[u8]) -> Result<(Value, Summary), ReviewError> {
    let request = parse(body)?;
    let mut summary = summary(&request);
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
    let object = request.object.as_ref().map(serde_json::to_value).transpose().unwrap_or_default();
    let pod = match pod_from(object.as_ref().filter(|o| !o.is_null()), "request.object") {
        Ok(pod) => pod,
        Err(message) => {
            summary.result = "denied";
            summary.reason = "malformed_pod";
            return Ok((into_json(deny(response, message)), summary));
        }
    };
    if summary.name.is_empty() {
        summary.name = pod.metadata.generate_name.clone().unwrap_or_default();
    }
    let namespace = namespace_of(&request, &pod);

    let response = match decide(webhook, &namespace, &pod).await {
        Ok(Outcome::NotRequested) => {
            summary.reason = "not_labelled";
            response
        }
        Ok(Outcome::AlreadyInjected) => {
            summary.reason = "already_injected";
            response
        }
        Ok(Outcome::Injected(injection)) => {
            if let (ServiceAccountChange::Annotate { name, gsa }, false) = (&injection.service_account, request.dry_run)
            {
                if let Some(live) = &webhook.live {
                    if let Err(e) = live.annotate_service_account(&namespace, name, gsa).await {
                        summary.result = "denied";
                        summary.reason = "service_account_patch";
                        let message = format!(
                            "cannot add {}: {gsa} to ServiceAccount {namespace}/{name}: {e}: create the ServiceAccount first, or annotate it yourself",
                            wiproxy_common::GKE_SERVICE_ACCOUNT_ANNOTATION
                        );
                        record_denial(live, &namespace, &pod, &message);
                        return Ok((into_json(deny(response, message)), summary));
                    }
                }
            }
            summary.result = "injected";
            if !request.dry_run {
                summary.service_account = injection.service_account;
            }
            let mut response = match response.with_patch(injection.patch) {
                Ok(response) => response,
                Err(e) => {
                    summary.result = "denied";
                    summary.reason = "internal";
                    let response = deny(AdmissionResponse::from(&request), format!("cannot encode patch: {e}"));
                    return Ok((into_json(response), summary));
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
            let message = denial.to_string();
            if let (Some(live), false) = (&webhook.live, request.dry_run) {
                record_denial(live, &namespace, &pod, &message);
            }
            deny(response, message)
        }
    };
    Ok((into_json(response), summary))
}

/// Where the pod template sits in a workload, by group/version/kind; `""` for a Pod itself.
pub fn template_pointer(api_version: &str, kind: &str) -> Option<&'static str> {
    match (api_version, kind) {
        ("v1", "Pod") => Some(""),
        ("apps/v1", "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet") | ("batch/v1", "Job") => {
            Some("/spec/template")
        }
        ("batch/v1", "CronJob") => Some("/spec/jobTemplate/spec/template"),
        _ => None,
    }
}

/// Answers one `POST /validate` body: a workload whose pod template carries the label gets the
/// same checks as its pods will, so a mistake fails `kubectl apply` itself. Nothing is changed.
pub async fn validate(webhook: &Webhook, body: &[u8]) -> Result<(Value, Summary), ReviewError> {
    let request = parse(body)?;
    let mut summary = summary(&request);
    let response = AdmissionResponse::from(&request);
    let api_version = if request.kind.group.is_empty() {
        request.kind.version.clone()
    } else {
        format!("{}/{}", request.kind.group, request.kind.version)
    };
    let pointer = template_pointer(&api_version, &request.kind.kind).filter(|p| !p.is_empty());
    let (Some(pointer), Operation::Create | Operation::Update) = (pointer, &request.operation) else {
        summary.reason = "not_a_workload";
        return Ok((into_json(response), summary));
    };
    let object = request.object.as_ref().map(serde_json::to_value).transpose().unwrap_or_default();
    let template =
        object.as_ref().and_then(|o| o.pointer(pointer)).map(|t| json!({"metadata": t["metadata"], "spec": t["spec"]}));
    let pod = match pod_from(template.as_ref(), &format!("the pod template at {pointer}")) {
        Ok(pod) => pod,
        Err(message) => {
            summary.result = "denied";
            summary.reason = "malformed_pod";
            return Ok((into_json(deny(response, message)), summary));
        }
    };
    let namespace = request
        .namespace
        .clone()
        .or_else(|| object.as_ref().and_then(|o| o["metadata"]["namespace"].as_str().map(str::to_owned)))
        .unwrap_or_else(|| "default".to_owned());
    let response = match decide(webhook, &namespace, &pod).await {
        Ok(Outcome::Injected(injection)) => {
            summary.result = "allowed";
            let mut response = response;
            if !injection.warnings.is_empty() {
                response.warnings = Some(injection.warnings);
            }
            response
        }
        Ok(Outcome::AlreadyInjected) => {
            summary.reason = "already_injected";
            response
        }
        Ok(Outcome::NotRequested) => {
            summary.reason = "not_labelled";
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

/// Records the denial as an Event on the pod's owner, in the background: the answer to the API
/// server does not wait for it.
fn record_denial(live: &Arc<LiveCluster>, namespace: &str, pod: &Pod, message: &str) {
    let (live, namespace, pod, message) = (live.clone(), namespace.to_owned(), pod.clone(), message.to_owned());
    tokio::spawn(async move { live.record_denial(&namespace, &pod, &message).await });
}

/// Runs the injection core for `pod` in `namespace`, after making sure (in a cluster) that its
/// ServiceAccount is known.
async fn decide(webhook: &Webhook, namespace: &str, pod: &Pod) -> Result<Outcome, Denial> {
    if let (Some(live), true) = (&webhook.live, is_labelled(pod)) {
        if let Some(spec) = &pod.spec {
            live.ensure_service_account(namespace, &service_account_name(spec)).await;
        }
    }
    let policies = webhook.policies.current();
    let inputs =
        Inputs { namespace, sidecar: &webhook.sidecar, policies: &policies, cluster: webhook.cluster.as_ref() };
    inject(pod, &inputs)
}

fn namespace_of(request: &AdmissionRequest<DynamicObject>, pod: &Pod) -> String {
    request
        .namespace
        .clone()
        .filter(|n| !n.is_empty())
        .or_else(|| pod.metadata.namespace.clone())
        .unwrap_or_else(|| "default".to_owned())
}

fn is_labelled(pod: &Pod) -> bool {
    pod.metadata.labels.as_ref().and_then(|l| l.get(wiproxy_common::INJECT_LABEL)).is_some_and(|v| v == "true")
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
