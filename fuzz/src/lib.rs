//! The invariants the fuzz targets check, kept apart from the targets so each reads as input →
//! call → check.

use std::path::Path;
use std::sync::OnceLock;

use base64::Engine;
use serde_json::Value;
use wiproxy_sidecar::routes::{Destination, Routes};
use wiproxy_webhook::cluster::StaticCluster;
use wiproxy_webhook::inject::SidecarSettings;
use wiproxy_webhook::policy::PolicySet;
use wiproxy_webhook::render::RenderOptions;
use wiproxy_webhook::review::Endpoint;
use wiproxy_webhook::{yaml, Webhook};

const POLICY_FILE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/policy.yaml");
const CLUSTER_FILE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../webhook/tests/golden/cluster.yaml");
const REVIEW_FILE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../webhook/tests/fixtures/review-pod.json");

/// The upstreams the routing target routes to: a prefix, a root, a nested prefix, a query and
/// a dedicated port.
pub const UPSTREAMS: &str = "orders=https://fn.example.com/orders,root=https://run.example.com,\
    deep=https://fn.example.com/orders/v2,q=https://q.example.com/api?key=1,\
    grpc=https://grpc.example.com;listen=15081,fnport=https://fn.example.com/orders/v3;listen=15082";

pub fn routes() -> &'static Routes {
    static ROUTES: OnceLock<Routes> = OnceLock::new();
    ROUTES.get_or_init(|| {
        let upstreams = wiproxy_common::parse_upstreams(UPSTREAMS).expect("the fixed upstreams parse");
        Routes::new(&upstreams, wiproxy_common::TokenHeader::Authorization, "127.0.0.1:15080".parse().expect("address"))
    })
}

/// Whether a routed destination lies inside its route's URL: same origin, the path under the
/// route's path on a segment boundary, and no reading of the rest climbing out.
pub fn inside(routes: &Routes, destination: &Destination) -> Result<(), String> {
    let Destination::Upstream { index, uri, .. } = destination else { return Ok(()) };
    let route = routes.get(*index);
    let upstream = wiproxy_common::parse_upstreams(UPSTREAMS).expect("parse");
    let url = &upstream[*index].parsed;
    if uri.scheme_str() != Some("https") || uri.host() != url.host_str() || uri.port_u16() != url.port() {
        return Err(format!("{uri} left the origin of {}", route.name));
    }
    let base = url.path().trim_end_matches('/');
    let Some(rest) = uri.path().strip_prefix(base) else {
        return Err(format!("{uri} is not under {base}"));
    };
    if !(rest.is_empty() || rest.starts_with('/')) {
        return Err(format!("{uri} is under {base} but not on a segment boundary"));
    }
    if wiproxy_sidecar::routes::climbs_out(rest) {
        return Err(format!("{uri} climbs out of {base}"));
    }
    Ok(())
}

fn cluster_documents() -> Vec<Value> {
    let text = yaml::read_file(Path::new(CLUSTER_FILE)).expect("cluster file");
    yaml::parse_stream(&text, CLUSTER_FILE).expect("cluster file parses")
}

/// The webhook as `serve --policy-file examples/policy.yaml --cluster-file
/// webhook/tests/golden/cluster.yaml` builds it.
pub fn webhook() -> &'static Webhook {
    static WEBHOOK: OnceLock<Webhook> = OnceLock::new();
    WEBHOOK.get_or_init(|| {
        let policies = yaml::load_policies(Path::new(POLICY_FILE)).expect("example policy loads");
        let mut cluster = StaticCluster::default();
        cluster.add_documents(&cluster_documents(), "default");
        Webhook::from_files(SidecarSettings::default(), PolicySet::new(policies, true), cluster)
    })
}

pub fn render_options() -> RenderOptions {
    RenderOptions {
        namespace: "default".into(),
        sidecar: SidecarSettings::default(),
        policies: yaml::load_policies(Path::new(POLICY_FILE)).expect("example policy loads"),
        policy_required: true,
        cluster: cluster_documents(),
    }
}

/// The AdmissionReview an API server sends for a Deployment's pod.
pub fn review_fixture() -> Value {
    serde_json::from_str(&std::fs::read_to_string(REVIEW_FILE).expect("fixture")).expect("fixture is JSON")
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| tokio::runtime::Builder::new_current_thread().build().expect("runtime"))
}

/// Answers `body` on `/mutate` and checks: a denied pod carries no patch; an injected pod,
/// patched and reviewed again, comes back without a patch (injection is idempotent). Returns
/// the patched object when there was one.
pub fn review_checked(body: &[u8]) -> Result<Option<Value>, String> {
    let Ok((response, _)) = runtime().block_on(wiproxy_webhook::admission::answer(webhook(), Endpoint::Mutate, body))
    else {
        return Ok(None);
    };
    let response: Value = serde_json::from_slice(&response).map_err(|e| format!("the answer is not JSON: {e}"))?;
    let answer = &response["response"];
    let patch = answer.get("patch").and_then(Value::as_str);
    if answer["allowed"] == Value::Bool(false) {
        return match patch {
            Some(_) => Err("a denied pod carries a patch".into()),
            None => Ok(None),
        };
    }
    let Some(patch) = patch else { return Ok(None) };
    let review: Value = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    let bytes = base64::engine::general_purpose::STANDARD.decode(patch).map_err(|e| e.to_string())?;
    let patch: json_patch::Patch = serde_json::from_slice(&bytes).map_err(|e| e.to_string())?;
    let mut patched = review["request"]["object"].clone();
    json_patch::patch(&mut patched, &patch).map_err(|e| format!("the patch does not apply: {e}"))?;
    let mut again = review.clone();
    again["request"]["object"] = patched.clone();
    let body = serde_json::to_vec(&again).map_err(|e| e.to_string())?;
    let (response, _) = runtime()
        .block_on(wiproxy_webhook::admission::answer(webhook(), Endpoint::Mutate, &body))
        .map_err(|e| format!("the injected pod is not a review any more: {e}"))?;
    let response: Value = serde_json::from_slice(&response).map_err(|e| format!("the answer is not JSON: {e}"))?;
    if response["response"].get("patch").and_then(Value::as_str).is_some() {
        return Err("injecting the injected pod changed it again".into());
    }
    Ok(Some(patched))
}
