//! One admission review, decided. `ReviewRequest` is what the API server sent, parsed once with
//! the object left as raw JSON; `ReviewView` is what the decision reads of it (the object scanned
//! against the review limits first, then the pod typed straight from that JSON); `decide` is the
//! pure step that turns it into a `Decision`: the answer, the effects the cluster must apply (as
//! data), and the labels logs and metrics carry. No I/O here.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube_core::admission::Operation;
use kube_core::GroupVersionKind;
use serde::de::IgnoredAny;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;

use crate::cluster::{ClusterState, Effect, EffectFailed};
use crate::denial::Denial;
use crate::inject::{inject, service_account_name, Inputs, Outcome, ServiceAccountChange, SidecarSettings};
use crate::policy::PolicySet;
use crate::review_limits::{self, TooLarge};
use crate::workload::{pod_from, pod_value, TypeKey, WorkloadKind};

/// The `request` of an AdmissionReview v1: the fields a decision reads, typed, and the object as
/// the raw JSON it came in (borrowed from the body), so a pod is parsed once, straight into a
/// `Pod`. `resource` and `userInfo` are required by the API as by kube-core's `AdmissionRequest`,
/// so a review without them is malformed here too; their content is never read.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReviewRequest<'a> {
    pub uid: String,
    pub kind: GroupVersionKind,
    #[serde(rename = "resource")]
    _resource: IgnoredAny,
    #[serde(default)]
    pub sub_resource: Option<String>,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
    pub operation: Operation,
    #[serde(rename = "userInfo")]
    _user_info: IgnoredAny,
    #[serde(default, borrow)]
    pub object: Option<&'a RawValue>,
    #[serde(default, borrow)]
    pub old_object: Option<&'a RawValue>,
    #[serde(default)]
    pub dry_run: bool,
}

/// Just enough of an object to know its namespace.
#[derive(Deserialize)]
struct NamespaceOnly {
    #[serde(default)]
    metadata: MetadataNamespace,
}

#[derive(Default, Deserialize)]
struct MetadataNamespace {
    #[serde(default)]
    namespace: Option<String>,
}

/// Which webhook a review came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `POST /mutate`: pods, injected.
    Mutate,
    /// `POST /validate`: workloads, checked and never changed.
    Validate,
}

impl Endpoint {
    pub fn name(self) -> &'static str {
        match self {
            Self::Mutate => "mutate",
            Self::Validate => "validate",
        }
    }
}

/// Why a review is allowed without a look at its pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    NotAPod,
    NotACreate,
    NotAWorkload,
    NotLabelled,
    AlreadyInjected,
}

impl Skip {
    fn reason(self) -> &'static str {
        match self {
            Self::NotAPod => "not_a_pod",
            Self::NotACreate => "not_a_create",
            Self::NotAWorkload => "not_a_workload",
            Self::NotLabelled => "not_labelled",
            Self::AlreadyInjected => "already_injected",
        }
    }
}

/// What one review asks about, read from the request.
pub struct ReviewView {
    pub endpoint: Endpoint,
    pub uid: String,
    /// The namespace the pod runs in: the request's, else the object's, else `default`.
    pub namespace: String,
    /// The object's name (a pod's `generateName` when it has no name yet).
    pub name: String,
    pub dry_run: bool,
    subject: Subject,
}

/// What the decision is about.
enum Subject {
    /// Nothing for this endpoint.
    Skip(Skip),
    /// The object (or the workload's pod template) is not a Pod: why.
    Malformed(String),
    /// The object holds more than the webhook reads.
    TooLarge(TooLarge),
    /// An UPDATE of an injected pod changes these `wiproxy.io/` annotations.
    AnnotationsChanged(Vec<String>),
    /// The pod, or the pod a workload's template makes.
    Pod(Box<Pod>),
}

impl ReviewView {
    pub fn new(endpoint: Endpoint, request: &ReviewRequest<'_>) -> Self {
        let kind = &request.kind;
        let kind = WorkloadKind::of(&TypeKey::new(&kind.group, &kind.version, &kind.kind));
        let object = request.object.filter(|o| o.get() != "null");
        let old_object = request.old_object.filter(|o| o.get() != "null");
        // Every object is scanned against the limits before anything is built from it.
        let bounded = |raw: Option<&RawValue>, what, pod_root| {
            raw.map_or(Ok(()), |raw| review_limits::check(raw.get(), what, pod_root)).map_err(Subject::TooLarge)
        };
        let subject = match (endpoint, kind, &request.operation) {
            (Endpoint::Mutate, Some(WorkloadKind::Pod), _) if request.sub_resource.is_some() => {
                Subject::Skip(Skip::NotAPod)
            }
            (Endpoint::Mutate, Some(WorkloadKind::Pod), Operation::Create) => {
                match (object, bounded(object, "request.object", "")) {
                    (_, Err(too_large)) => too_large,
                    (None, _) => Subject::Malformed("request.object is missing from the review".to_owned()),
                    (Some(raw), Ok(())) => match serde_json::from_str::<Pod>(raw.get()) {
                        Ok(pod) => Subject::Pod(Box::new(pod)),
                        Err(e) => Subject::Malformed(format!("request.object is not a valid Pod: {e}")),
                    },
                }
            }
            (Endpoint::Mutate, Some(WorkloadKind::Pod), Operation::Update) => {
                match bounded(object, "request.object", "").and(bounded(old_object, "request.oldObject", "")) {
                    Err(too_large) => too_large,
                    Ok(()) => annotation_update(object, old_object),
                }
            }
            (Endpoint::Mutate, Some(WorkloadKind::Pod), _) => Subject::Skip(Skip::NotACreate),
            (Endpoint::Mutate, _, _) => Subject::Skip(Skip::NotAPod),
            (Endpoint::Validate, Some(kind), Operation::Create | Operation::Update) if kind != WorkloadKind::Pod => {
                let pointer = kind.template_pointer();
                match bounded(object, "request.object", pointer) {
                    Err(too_large) => too_large,
                    Ok(()) => {
                        // Not the hot path, and bounded by the scan: a workload is read as a Value
                        // to find its template.
                        let value = object.and_then(|o| serde_json::from_str::<Value>(o.get()).ok());
                        let template = value.as_ref().and_then(|o| o.pointer(pointer)).map(pod_value);
                        match pod_from(template.as_ref(), &format!("the pod template at {pointer}")) {
                            Ok(pod) => Subject::Pod(Box::new(pod)),
                            Err(message) => Subject::Malformed(message),
                        }
                    }
                }
            }
            (Endpoint::Validate, _, _) => Subject::Skip(Skip::NotAWorkload),
        };
        let namespace = match (request.namespace.as_deref().filter(|n| !n.is_empty()), &subject) {
            (Some(namespace), _) => Some(namespace.to_owned()),
            (None, Subject::Pod(pod)) if endpoint == Endpoint::Mutate => pod.metadata.namespace.clone(),
            (None, _) => object
                .and_then(|o| serde_json::from_str::<NamespaceOnly>(o.get()).ok())
                .and_then(|o| o.metadata.namespace),
        };
        let mut name = request.name.clone();
        if let (true, Subject::Pod(pod)) = (name.is_empty(), &subject) {
            name = pod.metadata.generate_name.clone().unwrap_or_default();
        }
        Self {
            endpoint,
            uid: request.uid.clone(),
            namespace: namespace.unwrap_or_else(|| "default".to_owned()),
            name,
            dry_run: request.dry_run,
            subject,
        }
    }

    fn pod(&self) -> Option<&Pod> {
        match &self.subject {
            Subject::Pod(pod) => Some(pod),
            Subject::Skip(_) | Subject::Malformed(_) | Subject::TooLarge(_) | Subject::AnnotationsChanged(_) => None,
        }
    }

    /// The ServiceAccount the decision will read, when the pod asks for injection.
    pub fn service_account(&self) -> Option<String> {
        let pod = self.pod()?;
        let labels = pod.metadata.labels.as_ref()?;
        let requested = labels.get(wiproxy_common::INJECT_LABEL).is_some_and(|v| v == "true");
        requested.then(|| pod.spec.as_ref().map(service_account_name)).flatten()
    }

    fn owners(&self) -> Vec<OwnerReference> {
        self.pod().and_then(|p| p.metadata.owner_references.clone()).unwrap_or_default()
    }
}

/// What goes back to the API server.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// Allowed, unchanged.
    Skip(Skip),
    /// Allowed with the injection, a JSON patch already serialised (`/mutate`).
    Inject {
        patch: Vec<u8>,
        warnings: Vec<String>,
    },
    /// Allowed, unchanged, with what a person should know (`/validate`).
    Allow {
        warnings: Vec<String>,
    },
    Deny(Denial),
}

/// A review, decided.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub endpoint: Endpoint,
    pub answer: Answer,
    pub effects: Vec<Effect>,
    /// The Google service account the pod acts as and the policy that allowed it, when allowed.
    pub gsa: Option<String>,
    pub policy: Option<String>,
}

/// What logs and metrics say of a decision (the review's uid, namespace and object are on its
/// span already).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Labels<'a> {
    pub webhook: &'static str,
    /// `injected`, `allowed`, `skipped` or `denied`.
    pub result: &'static str,
    /// Why: a denial reason, or why nothing was done; empty when injected or allowed.
    pub reason: &'static str,
    pub gsa: Option<&'a str>,
    pub policy: Option<&'a str>,
}

impl Decision {
    fn new(view: &ReviewView, answer: Answer) -> Self {
        Self { endpoint: view.endpoint, answer, effects: Vec::new(), gsa: None, policy: None }
    }

    pub fn labels(&self) -> Labels<'_> {
        let (result, reason) = match &self.answer {
            Answer::Skip(skip) => ("skipped", skip.reason()),
            Answer::Inject { .. } => ("injected", ""),
            Answer::Allow { .. } => ("allowed", ""),
            Answer::Deny(denial) => ("denied", denial.reason()),
        };
        Labels {
            webhook: self.endpoint.name(),
            result,
            reason,
            gsa: self.gsa.as_deref(),
            policy: self.policy.as_deref(),
        }
    }

    /// The decision once an effect could not be applied: the pod is denied with the failure
    /// (a ServiceAccount left unmapped would never get it a token), and the denial recorded.
    pub fn after_failure(view: &ReviewView, failed: EffectFailed) -> Self {
        deny(view, failed.0)
    }
}

fn deny(view: &ReviewView, denial: Denial) -> Decision {
    let mut decision = Decision::new(view, Answer::Deny(denial.clone()));
    if view.endpoint == Endpoint::Mutate && !view.dry_run {
        let message = denial.to_string();
        decision.effects.push(Effect::RecordDenial {
            namespace: view.namespace.clone(),
            owners: view.owners(),
            message,
        });
    }
    decision
}

/// Decides one review: the pod's injection (or, for a workload, its check) under `policies`,
/// with the cluster state as `cluster` reads it.
pub fn decide(
    view: &ReviewView,
    sidecar: &SidecarSettings,
    policies: &PolicySet,
    cluster: &dyn ClusterState,
) -> Decision {
    let pod = match &view.subject {
        Subject::Pod(pod) => pod,
        Subject::Skip(skip) => return Decision::new(view, Answer::Skip(*skip)),
        // The object never reached the injection core: nothing to record on an owner.
        Subject::Malformed(message) => return Decision::new(view, Answer::Deny(Denial::Malformed(message.clone()))),
        Subject::TooLarge(too_large) => return Decision::new(view, Answer::Deny(Denial::TooLarge(too_large.clone()))),
        // Whoever edits the pod reads the answer: no Event.
        Subject::AnnotationsChanged(annotations) => {
            let denial = Denial::InjectedAnnotationsChanged { annotations: annotations.clone() };
            return Decision::new(view, Answer::Deny(denial));
        }
    };
    let inputs = Inputs { namespace: &view.namespace, sidecar, policies, cluster };
    let injection = match inject(pod, &inputs) {
        Ok(Outcome::NotRequested) => return Decision::new(view, Answer::Skip(Skip::NotLabelled)),
        Ok(Outcome::AlreadyInjected) => return Decision::new(view, Answer::Skip(Skip::AlreadyInjected)),
        Ok(Outcome::Injected(injection)) => injection,
        Err(denial) => return deny(view, denial),
    };
    let answer = match view.endpoint {
        Endpoint::Validate => Answer::Allow { warnings: injection.warnings },
        Endpoint::Mutate => match serde_json::to_vec(&injection.patch) {
            Ok(patch) => Answer::Inject { patch, warnings: injection.warnings },
            Err(e) => return Decision::new(view, Answer::Deny(Denial::PatchEncoding(e.to_string()))),
        },
    };
    let mut decision = Decision::new(view, answer);
    if let (Endpoint::Mutate, false, ServiceAccountChange::Annotate { name, gsa }) =
        (view.endpoint, view.dry_run, injection.service_account)
    {
        decision.effects.push(Effect::AnnotateServiceAccount { namespace: view.namespace.clone(), name, gsa });
    }
    decision.gsa = Some(injection.gsa);
    decision.policy = injection.policy;
    decision
}

/// What an UPDATE of a pod is judged on: the `wiproxy.io/` annotations, and whether the pod
/// was injected. Nothing else of the pod is read.
#[derive(Default, Deserialize)]
#[serde(default)]
struct PodMarks {
    metadata: MetadataMarks,
    spec: SpecMarks,
}

#[derive(Default, Deserialize)]
#[serde(default)]
struct MetadataMarks {
    annotations: Option<BTreeMap<String, String>>,
}

#[derive(Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct SpecMarks {
    containers: Option<Vec<NameOnly>>,
    init_containers: Option<Vec<NameOnly>>,
}

#[derive(Deserialize)]
struct NameOnly {
    #[serde(default)]
    name: String,
}

impl PodMarks {
    fn annotation(&self, key: &str) -> Option<&str> {
        self.metadata.annotations.as_ref()?.get(key).map(String::as_str)
    }

    fn wiproxy_annotations(&self) -> impl Iterator<Item = &str> {
        let keys = self.metadata.annotations.iter().flat_map(|a| a.keys());
        keys.map(String::as_str).filter(|key| key.starts_with(ANNOTATION_PREFIX))
    }

    /// Injected as `inject` tells: the sidecar and the status that describes it.
    fn injected(&self) -> bool {
        let containers = self.spec.containers.iter().chain(&self.spec.init_containers).flatten();
        let has_sidecar = containers.into_iter().any(|c| c.name == wiproxy_common::SIDECAR_CONTAINER);
        has_sidecar && self.annotation(wiproxy_common::STATUS_ANNOTATION).is_some()
    }
}

/// The prefix of every annotation the injection reads or writes.
const ANNOTATION_PREFIX: &str = "wiproxy.io/";

/// A pod UPDATE: refused when it changes, adds or removes a `wiproxy.io/` annotation of an
/// injected pod (the sidecar was set up from them once, at creation); any other allowed as is.
fn annotation_update(object: Option<&RawValue>, old_object: Option<&RawValue>) -> Subject {
    let read = |raw: Option<&RawValue>, what: &str| match raw {
        None => Err(format!("{what} is missing from the pod UPDATE review")),
        Some(raw) => serde_json::from_str::<PodMarks>(raw.get()).map_err(|e| format!("{what} is not a valid Pod: {e}")),
    };
    let (new, old) = match (read(object, "request.object"), read(old_object, "request.oldObject")) {
        (Ok(new), Ok(old)) => (new, old),
        (Err(message), _) | (_, Err(message)) => return Subject::Malformed(message),
    };
    if !old.injected() {
        return Subject::Skip(Skip::NotACreate);
    }
    let mut changed: Vec<String> = old
        .wiproxy_annotations()
        .chain(new.wiproxy_annotations())
        .filter(|key| old.annotation(key) != new.annotation(key))
        .map(str::to_owned)
        .collect();
    changed.sort();
    changed.dedup();
    if changed.is_empty() {
        Subject::Skip(Skip::NotACreate)
    } else {
        Subject::AnnotationsChanged(changed)
    }
}
