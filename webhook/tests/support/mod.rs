//! Shared helpers of the webhook's integration tests.
#![allow(dead_code)]

pub mod api;

use std::path::Path;

use serde_json::Value;
use wiproxy_webhook::cluster::StaticCluster;
use wiproxy_webhook::inject::SidecarSettings;
use wiproxy_webhook::policy::PolicySet;
use wiproxy_webhook::render::{render, RenderOptions};
use wiproxy_webhook::{yaml, Webhook};

pub const POLICY_FILE: &str = "../examples/policy.yaml";
pub const CLUSTER_FILE: &str = "tests/golden/cluster.yaml";

fn cluster_documents() -> Vec<Value> {
    yaml::parse_stream(&yaml::read_file(Path::new(CLUSTER_FILE)).expect("cluster file"), CLUSTER_FILE)
        .expect("cluster file parses")
}

/// The webhook as `serve --policy-file examples/policy.yaml --cluster-file tests/golden/cluster.yaml` builds it.
pub fn webhook() -> Webhook {
    let policies = yaml::load_policies(Path::new(POLICY_FILE)).expect("example policy loads");
    let mut cluster = StaticCluster::default();
    cluster.add_documents(&cluster_documents(), "default");
    Webhook::from_files(SidecarSettings::default(), PolicySet::new(policies, true), cluster)
}

/// The AdmissionReview an API server sends for a Deployment's pod.
pub fn review_fixture() -> Value {
    let text = std::fs::read_to_string("tests/fixtures/review-pod.json").expect("fixture");
    serde_json::from_str(&text).expect("fixture is JSON")
}

/// What `render` makes of the same pod object, under the same policy and cluster.
pub fn render_pod(pod: &Value) -> Value {
    let options = RenderOptions {
        namespace: "default".into(),
        sidecar: SidecarSettings::default(),
        policies: yaml::load_policies(Path::new(POLICY_FILE)).expect("example policy loads"),
        policy_required: true,
        cluster: cluster_documents(),
    };
    let input = serde_json::to_string(pod).expect("pod serializes");
    let rendered = render(&input, "pod.json", &options).expect("render injects the pod");
    let mut docs = yaml::parse_stream(&rendered.output, "rendered").expect("rendered YAML");
    docs.remove(0)
}

/// Applies the base64 JSON patch of a response review to `object`.
pub fn apply_response_patch(response: &Value, object: &Value) -> Value {
    use base64::Engine;
    let response = &response["response"];
    assert_eq!(response["patchType"], "JSONPatch");
    let encoded = response["patch"].as_str().expect("patch is a base64 string");
    let bytes = base64::engine::general_purpose::STANDARD.decode(encoded).expect("patch is base64");
    let patch: json_patch::Patch = serde_json::from_slice(&bytes).expect("patch is a JSON patch");
    let mut patched = object.clone();
    json_patch::patch(&mut patched, &patch).expect("patch applies to the request object");
    patched
}
