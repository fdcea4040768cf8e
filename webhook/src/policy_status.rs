//! Policies from the cluster: a watch of TokenProxyPolicies keeps the set in force current and
//! writes each policy's `Ready` condition (`Invalid` with the reason when it cannot be used).

use std::sync::{Arc, RwLock};

use futures_util::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::Client;
use serde_json::{json, Value};
use tracing::{info, warn};

use crate::policy::{Policy, PolicySet, TokenProxyPolicy};
use crate::settings::MANAGER;

/// The policies in force, replaced whole when they change.
pub struct Policies(RwLock<Arc<PolicySet>>);

impl Policies {
    pub fn new(set: PolicySet) -> Self {
        Self(RwLock::new(Arc::new(set)))
    }

    pub fn current(&self) -> Arc<PolicySet> {
        self.0.read().map(|set| set.clone()).unwrap_or_else(|poisoned| poisoned.into_inner().clone())
    }

    pub fn replace(&self, set: PolicySet) {
        match self.0.write() {
            Ok(mut current) => *current = Arc::new(set),
            Err(poisoned) => *poisoned.into_inner() = Arc::new(set),
        }
    }
}

/// Whether one policy object can be used: `Err` holds the problem, as its `Invalid` condition says it.
pub type Validity = Result<(), String>;

/// The usable policies among `objects`, and for each object (by name) whether it is usable.
pub fn usable_policies(objects: &[Arc<TokenProxyPolicy>], required: bool) -> (PolicySet, Vec<(String, Validity)>) {
    let mut usable = Vec::new();
    let mut validities = Vec::new();
    for object in objects {
        let name = object.metadata.name.clone().unwrap_or_default();
        match Policy::new(object) {
            Ok(policy) => {
                usable.push(policy);
                validities.push((name, Ok(())));
            }
            Err(e) => validities.push((name, Err(e.to_string()))),
        }
    }
    (PolicySet::new(usable, required), validities)
}

/// The status merge patch that brings the `Ready` condition in line with `validity`, or `None`
/// when it already says that.
pub fn status_patch(policy: &TokenProxyPolicy, validity: &Validity, now: Time) -> Option<Value> {
    let (status, reason, message) = match validity {
        Ok(()) => ("True", "Valid", "the policy is in force".to_owned()),
        Err(problem) => ("False", "Invalid", problem.clone()),
    };
    let generation = policy.metadata.generation;
    let current = policy.status.as_ref().and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"));
    if let Some(current) = current {
        if current.status == status
            && current.reason == reason
            && current.message == message
            && current.observed_generation == generation
        {
            return None;
        }
    }
    let since = match current {
        Some(current) if current.status == status => current.last_transition_time.clone(),
        _ => now,
    };
    Some(json!({"status": {"conditions": [{
        "type": "Ready",
        "status": status,
        "reason": reason,
        "message": message,
        "observedGeneration": generation,
        "lastTransitionTime": since,
    }]}}))
}

/// Writes the `Ready` condition when it changed; `Ok(true)` when a write happened.
pub async fn write_status(
    api: &Api<TokenProxyPolicy>,
    policy: &TokenProxyPolicy,
    validity: &Validity,
) -> Result<bool, kube::Error> {
    let Some(patch) = status_patch(policy, validity, Time(k8s_openapi::jiff::Timestamp::now())) else {
        return Ok(false);
    };
    let name = policy.metadata.name.clone().unwrap_or_default();
    api.patch_status(&name, &PatchParams::apply(MANAGER), &Patch::Merge(&patch)).await?;
    Ok(true)
}

/// Watches TokenProxyPolicies until the process ends: every change rebuilds the set in force and
/// updates the conditions that changed. Returns the store, whose readiness marks the first list.
pub fn watch(client: Client, policies: Arc<Policies>, required: bool) -> Store<TokenProxyPolicy> {
    let api: Api<TokenProxyPolicy> = Api::all(client);
    let (store, writer) = reflector::store();
    let reader = store.clone();
    let stream = reflector::reflector(writer, watcher(api.clone(), watcher::Config::default()).default_backoff());
    tokio::spawn(stream.touched_objects().for_each(move |touched| {
        let (api, reader, policies) = (api.clone(), reader.clone(), policies.clone());
        async move {
            let touched = match touched {
                Ok(touched) => touched,
                Err(e) => return warn!(error = %e, "TokenProxyPolicy watch failed; retrying"),
            };
            let (set, validities) = usable_policies(&reader.state(), required);
            policies.replace(set);
            let name = touched.metadata.name.clone().unwrap_or_default();
            if let Some((_, validity)) = validities.iter().find(|(n, _)| *n == name) {
                match write_status(&api, &touched, validity).await {
                    Ok(true) => info!(policy = %name, valid = validity.is_ok(), "policy status written"),
                    Ok(false) => {}
                    Err(e) => warn!(policy = %name, error = %e, "cannot write the policy status"),
                }
            }
        }
    }));
    store
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(name: &str, spec: Value, status: Value) -> Arc<TokenProxyPolicy> {
        Arc::new(
            serde_json::from_value(json!({
                "apiVersion": "wiproxy.io/v1alpha1", "kind": "TokenProxyPolicy",
                "metadata": {"name": name, "generation": 2}, "spec": spec, "status": status,
            }))
            .expect("policy"),
        )
    }

    fn time(text: &str) -> Time {
        serde_json::from_value(json!(text)).expect("time")
    }

    #[test]
    fn invalid_selectors_and_globs_are_reported_and_left_out() {
        let objects = [
            object(
                "good",
                json!({"namespaceSelector": {}, "serviceAccounts": ["*@p.iam.gserviceaccount.com"]}),
                json!({}),
            ),
            object(
                "bad-selector",
                json!({"namespaceSelector": {"matchExpressions": [{"key": "team", "operator": "Near"}]}}),
                json!({}),
            ),
            object("bad-glob", json!({"namespaceSelector": {}, "serviceAccounts": ["no-at-sign"]}), json!({})),
        ];
        let (set, validities) = usable_policies(&objects, true);
        assert_eq!(set.selecting(&Default::default()).len(), 1, "only the valid policy is in force");
        assert_eq!(validities[0].1, Ok(()));
        assert!(validities[1].1.as_ref().is_err_and(|e| e.contains("spec.namespaceSelector")), "{:?}", validities[1]);
        assert!(validities[2].1.as_ref().is_err_and(|e| e.contains("spec.serviceAccounts[0]")), "{:?}", validities[2]);
    }

    #[test]
    fn conditions_change_only_when_the_verdict_does() {
        let now = time("2026-11-29T10:00:00Z");
        let fresh = object("p", json!({"namespaceSelector": {}}), json!({}));
        let patch = status_patch(&fresh, &Ok(()), now.clone()).expect("a first condition");
        assert_eq!(patch["status"]["conditions"][0]["lastTransitionTime"], "2026-11-29T10:00:00Z");

        let ready = object("p", json!({"namespaceSelector": {}}), patch["status"].clone());
        assert_eq!(status_patch(&ready, &Ok(()), time("2026-11-29T11:00:00Z")), None, "same condition, no write");

        let broken = status_patch(&ready, &Err("spec.upstreams[0]: bad".into()), time("2026-11-29T12:00:00Z"))
            .expect("a new condition");
        let condition = &broken["status"]["conditions"][0];
        assert_eq!((condition["status"].as_str(), condition["reason"].as_str()), (Some("False"), Some("Invalid")));
        assert_eq!(condition["lastTransitionTime"], "2026-11-29T12:00:00Z");
    }
}
