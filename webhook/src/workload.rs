//! The kinds the webhook works on, keyed on their typed group/version/kind, and where each keeps
//! the pod it makes: `/mutate`, `/validate` and `render` all read pods through this one table.

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, ReplicaSet, StatefulSet};
use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::api::core::v1::{Pod, ReplicationController};
use k8s_openapi::Resource;
use serde_json::{json, Value};

/// An object's group, version and kind, as a review names them or as `apiVersion`/`kind` spell them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TypeKey {
    pub group: String,
    pub version: String,
    pub kind: String,
}

impl TypeKey {
    pub fn new(group: &str, version: &str, kind: &str) -> Self {
        Self { group: group.to_owned(), version: version.to_owned(), kind: kind.to_owned() }
    }

    /// The type of a document, from its `apiVersion` (`GROUP/VERSION`, or `VERSION` for the core
    /// group) and `kind`; empty parts where they are missing.
    pub fn of(document: &Value) -> Self {
        let api_version = document["apiVersion"].as_str().unwrap_or_default();
        let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
        Self::new(group, version, document["kind"].as_str().unwrap_or_default())
    }

    /// Whether this is a `v1` `List`, as `kubectl get -o yaml` prints several objects.
    pub fn is_list(&self) -> bool {
        self.group.is_empty() && self.version == "v1" && self.kind == "List"
    }

    /// Whether this is the type `K` of the Kubernetes API.
    pub fn is<K: Resource>(&self) -> bool {
        self.group == K::GROUP && self.version == K::VERSION && self.kind == K::KIND
    }
}

/// A kind that holds a pod: a Pod itself, or a workload with a pod template.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkloadKind {
    Pod,
    Deployment,
    StatefulSet,
    DaemonSet,
    ReplicaSet,
    Job,
    CronJob,
    ReplicationController,
}

impl WorkloadKind {
    pub fn of(key: &TypeKey) -> Option<Self> {
        let kinds = [
            (key.is::<Pod>(), Self::Pod),
            (key.is::<Deployment>(), Self::Deployment),
            (key.is::<StatefulSet>(), Self::StatefulSet),
            (key.is::<DaemonSet>(), Self::DaemonSet),
            (key.is::<ReplicaSet>(), Self::ReplicaSet),
            (key.is::<Job>(), Self::Job),
            (key.is::<CronJob>(), Self::CronJob),
            (key.is::<ReplicationController>(), Self::ReplicationController),
        ];
        kinds.into_iter().find_map(|(matches, kind)| matches.then_some(kind))
    }

    /// JSON pointer to the pod template in an object of this kind; `""` for a Pod itself.
    pub fn template_pointer(self) -> &'static str {
        match self {
            Self::Pod => "",
            Self::Deployment
            | Self::StatefulSet
            | Self::DaemonSet
            | Self::ReplicaSet
            | Self::Job
            | Self::ReplicationController => "/spec/template",
            Self::CronJob => "/spec/jobTemplate/spec/template",
        }
    }
}

/// A pod template (or a Pod) as a Pod value: its `metadata` and `spec`.
pub fn pod_value(template: &Value) -> Value {
    json!({"metadata": template["metadata"], "spec": template["spec"]})
}

/// `value` read as a Pod, or a message naming `what` and why it is not one.
pub fn pod_from(value: Option<&Value>, what: &str) -> Result<Pod, String> {
    let value = value.ok_or_else(|| format!("{what} is missing from the review"))?;
    serde_json::from_value(value.clone()).map_err(|e| format!("{what} is not a valid Pod: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_are_matched_on_group_version_and_kind() {
        let cases = [
            ("v1", "Pod", Some(WorkloadKind::Pod)),
            ("apps/v1", "Deployment", Some(WorkloadKind::Deployment)),
            ("apps/v1", "StatefulSet", Some(WorkloadKind::StatefulSet)),
            ("apps/v1", "DaemonSet", Some(WorkloadKind::DaemonSet)),
            ("apps/v1", "ReplicaSet", Some(WorkloadKind::ReplicaSet)),
            ("batch/v1", "Job", Some(WorkloadKind::Job)),
            ("batch/v1", "CronJob", Some(WorkloadKind::CronJob)),
            ("v1", "ReplicationController", Some(WorkloadKind::ReplicationController)),
            ("apps/v1beta1", "Deployment", None),
            ("extensions/v1", "Deployment", None),
            ("v1", "Deployment", None),
            ("v1", "ConfigMap", None),
            ("", "", None),
        ];
        for (api_version, kind, expected) in cases {
            let key = TypeKey::of(&json!({"apiVersion": api_version, "kind": kind}));
            assert_eq!(WorkloadKind::of(&key), expected, "{api_version} {kind}");
        }
        let cron = TypeKey::new("batch", "v1", "CronJob");
        assert_eq!(
            WorkloadKind::of(&cron).map(WorkloadKind::template_pointer),
            Some("/spec/jobTemplate/spec/template")
        );
    }
}
