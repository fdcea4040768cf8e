//! The webhook against a mocked Kubernetes API (`tower-test`): the exact calls it makes at
//! admission, on a dry run, on a conflict, for policy status and for the version probe.

mod support;

use std::sync::Arc;

use http::{Method, StatusCode};
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kube::api::{Api, ObjectMeta, PartialObjectMeta};
use kube::runtime::watcher;
use serde_json::{json, Value};
use support::api::{body_json, next, no_more_calls, reply, ApiHandle};
use wiproxy_webhook::admission;
use wiproxy_webhook::cluster::live::{autopilot, supports_native_sidecars, AUTOPILOT_WEBHOOKS};
use wiproxy_webhook::cluster::{Cluster, LiveCluster};
use wiproxy_webhook::inject::{NativeSidecars, SidecarSettings};
use wiproxy_webhook::policy::{PolicySet, TokenProxyPolicy};
use wiproxy_webhook::policy_status::{write_status, Policies};
use wiproxy_webhook::review::Endpoint;
use wiproxy_webhook::settings::GkeAutopilot;
use wiproxy_webhook::{yaml, Webhook};

/// The review's answer as JSON, and the decision.
async fn answer(
    webhook: &Webhook,
    endpoint: Endpoint,
    body: &[u8],
) -> Result<(Value, wiproxy_webhook::review::Decision), admission::ReviewError> {
    let (bytes, decision) = admission::answer(webhook, endpoint, body).await?;
    Ok((serde_json::from_slice(&bytes).expect("the answer is JSON"), decision))
}

const SA_PATH: &str = "/api/v1/namespaces/payments/serviceaccounts/orders-client";
const GSA: &str = "invoker@client-project.iam.gserviceaccount.com";

fn meta<K>(name: &str, namespace: Option<&str>, labels: Value, annotations: Value) -> PartialObjectMeta<K> {
    let metadata: ObjectMeta = serde_json::from_value(json!({
        "name": name, "namespace": namespace, "labels": labels, "annotations": annotations,
    }))
    .expect("metadata");
    PartialObjectMeta { types: None, metadata, _phantom: std::marker::PhantomData }
}

/// A webhook in cluster mode over a mocked API. The namespace `payments` (team=payments) is in
/// its index; `service_account` is put in the index when given.
fn webhook(service_account: Option<PartialObjectMeta<ServiceAccount>>) -> (Webhook, ApiHandle) {
    let (client, handle) = support::api::client();
    let live = Arc::new(LiveCluster::new(client));
    live.index().apply_namespace(watcher::Event::Apply(meta::<Namespace>(
        "payments",
        None,
        json!({"team": "payments"}),
        json!({}),
    )));
    if let Some(sa) = service_account {
        live.index().apply_service_account(watcher::Event::Apply(sa));
    }
    let policies = yaml::load_policies(std::path::Path::new(support::POLICY_FILE)).expect("policy");
    let webhook = Webhook {
        sidecar: SidecarSettings::default(),
        policies: Arc::new(Policies::new(PolicySet::new(policies, true))),
        cluster: Cluster::Live(live),
    };
    (webhook, handle)
}

fn sa_metadata(annotations: Value) -> Value {
    json!({
        "apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
        "metadata": {"name": "orders-client", "namespace": "payments", "resourceVersion": "41", "annotations": annotations},
    })
}

#[tokio::test]
async fn admission_reads_a_new_service_account_then_annotates_it() {
    let (webhook, mut handle) = webhook(None);
    let body = support::review_fixture().to_string();
    let api = tokio::spawn(async move {
        let (request, send) = next(&mut handle).await;
        assert_eq!((request.method(), request.uri().path()), (&Method::GET, SA_PATH), "index miss: read it directly");
        reply(send, StatusCode::OK, sa_metadata(json!({})));
        let (request, send) = next(&mut handle).await;
        assert_eq!((request.method(), request.uri().path()), (&Method::PATCH, SA_PATH));
        assert_eq!(request.headers()["content-type"], "application/merge-patch+json");
        let patch = body_json(request).await;
        // The resourceVersion read is a precondition: a ServiceAccount changed meanwhile is not overwritten.
        assert_eq!(
            patch,
            json!({"metadata": {"resourceVersion": "41", "annotations": {"iam.gke.io/gcp-service-account": GSA}}})
        );
        reply(send, StatusCode::OK, sa_metadata(json!({"iam.gke.io/gcp-service-account": GSA})));
        no_more_calls(&mut handle).await;
    });
    let (response, decision) = answer(&webhook, Endpoint::Mutate, body.as_bytes()).await.expect("a review");
    assert_eq!(response["response"]["allowed"], true, "{response}");
    assert_eq!(decision.labels().result, "injected");
    api.await.expect("the API saw GET then PATCH");
}

#[tokio::test]
async fn a_service_account_changed_meanwhile_is_not_overwritten() {
    let (webhook, mut handle) = webhook(None);
    let body = support::review_fixture().to_string();
    let api = tokio::spawn(async move {
        let (request, send) = next(&mut handle).await;
        assert_eq!((request.method(), request.uri().path()), (&Method::GET, SA_PATH));
        reply(send, StatusCode::OK, sa_metadata(json!({})));
        let (request, send) = next(&mut handle).await;
        assert_eq!((request.method(), request.uri().path()), (&Method::PATCH, SA_PATH));
        // What the API server answers a precondition that no longer holds.
        reply(
            send,
            StatusCode::CONFLICT,
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Conflict", "code": 409,
                   "message": "Operation cannot be fulfilled on serviceaccounts \"orders-client\": the object has been modified; please apply your changes to the latest version and try again"}),
        );
    });
    let (response, decision) = answer(&webhook, Endpoint::Mutate, body.as_bytes()).await.expect("a review");
    api.await.expect("GET then PATCH");
    assert_eq!(response["response"]["allowed"], false, "{response}");
    assert_eq!(decision.labels().reason, "service_account_patch");
    let message = response["response"]["status"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("changed after the webhook read it"), "{message}");
}

#[tokio::test]
async fn a_dry_run_changes_nothing_in_the_cluster() {
    let (webhook, mut handle) = webhook(None);
    let mut fixture = support::review_fixture();
    fixture["request"]["dryRun"] = json!(true);
    let api = tokio::spawn(async move {
        let (request, send) = next(&mut handle).await;
        assert_eq!((request.method(), request.uri().path()), (&Method::GET, SA_PATH));
        reply(send, StatusCode::OK, sa_metadata(json!({})));
        no_more_calls(&mut handle).await;
    });
    let (response, _) = answer(&webhook, Endpoint::Mutate, fixture.to_string().as_bytes()).await.expect("a review");
    assert_eq!(response["response"]["allowed"], true);
    assert!(response["response"]["patch"].is_string(), "the pod is still injected");
    api.await.expect("no PATCH on a dry run");
}

#[tokio::test]
async fn a_service_account_in_the_index_needs_no_call() {
    let mapped = meta("orders-client", Some("payments"), json!({}), json!({"iam.gke.io/gcp-service-account": GSA}));
    let (webhook, mut handle) = webhook(Some(mapped));
    let (response, _) =
        answer(&webhook, Endpoint::Mutate, support::review_fixture().to_string().as_bytes()).await.expect("a review");
    assert_eq!(response["response"]["allowed"], true);
    no_more_calls(&mut handle).await;
}

#[tokio::test]
async fn a_service_account_mapped_elsewhere_is_denied_and_the_deployment_hears_of_it() {
    let (webhook, mut handle) = webhook(None);
    let mut fixture = support::review_fixture();
    fixture["request"]["object"]["metadata"]["annotations"]["wiproxy.io/service-account"] = json!(GSA);
    let api = tokio::spawn(async move {
        let (request, send) = next(&mut handle).await;
        assert_eq!((request.method(), request.uri().path()), (&Method::GET, SA_PATH));
        reply(
            send,
            StatusCode::OK,
            sa_metadata(json!({"iam.gke.io/gcp-service-account": "other@client-project.iam.gserviceaccount.com"})),
        );
        // The denial is recorded on the Deployment above the pod's ReplicaSet.
        let (request, send) = next(&mut handle).await;
        assert_eq!(
            (request.method(), request.uri().path()),
            (&Method::GET, "/apis/apps/v1/namespaces/payments/replicasets/orders-client-6d9f7c7b5d")
        );
        reply(
            send,
            StatusCode::OK,
            json!({
                "apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
                "metadata": {"name": "orders-client-6d9f7c7b5d", "namespace": "payments", "ownerReferences": [{
                    "apiVersion": "apps/v1", "kind": "Deployment", "name": "orders-client",
                    "uid": "d1d2d3d4-0000-4000-8000-000000000002", "controller": true,
                }]},
            }),
        );
        let (request, send) = next(&mut handle).await;
        assert_eq!(
            (request.method(), request.uri().path()),
            (&Method::POST, "/apis/events.k8s.io/v1/namespaces/payments/events")
        );
        let event = body_json(request).await;
        assert_eq!(event["regarding"]["kind"], "Deployment");
        assert_eq!(event["regarding"]["name"], "orders-client");
        assert_eq!(event["type"], "Warning");
        assert!(event["note"].as_str().is_some_and(|n| n.contains("other@client-project")), "{event}");
        reply(send, StatusCode::CREATED, event);
        no_more_calls(&mut handle).await;
    });
    let (response, decision) =
        answer(&webhook, Endpoint::Mutate, fixture.to_string().as_bytes()).await.expect("a review");
    assert_eq!(response["response"]["allowed"], false);
    assert_eq!(decision.labels().reason, "ksa_conflict");
    let message = response["response"]["status"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("payments/orders-client is mapped to other@client-project"), "{message}");
    api.await.expect("GET, then the Event; never a PATCH");
}

#[tokio::test]
async fn a_failed_annotation_denies_with_the_reason() {
    let (webhook, mut handle) = webhook(None);
    let api = tokio::spawn(async move {
        let (_, send) = next(&mut handle).await;
        reply(send, StatusCode::OK, sa_metadata(json!({})));
        let (request, send) = next(&mut handle).await;
        assert_eq!(request.method(), Method::PATCH);
        reply(
            send,
            StatusCode::FORBIDDEN,
            json!({
                "kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Forbidden", "code": 403,
                "message": "serviceaccounts \"orders-client\" is forbidden: User cannot patch resource",
            }),
        );
        // The denial Event: the owner lookup and the Event itself.
        let (_, send) = next(&mut handle).await;
        reply(
            send,
            StatusCode::NOT_FOUND,
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"}),
        );
        let (request, send) = next(&mut handle).await;
        assert_eq!(request.method(), Method::POST, "the denial Event");
        reply(send, StatusCode::CREATED, json!({}));
    });
    let (response, _) =
        answer(&webhook, Endpoint::Mutate, support::review_fixture().to_string().as_bytes()).await.expect("a review");
    let message = response["response"]["status"]["message"].as_str().unwrap_or_default().to_owned();
    assert_eq!(response["response"]["allowed"], false);
    assert!(
        message.contains("cannot add iam.gke.io/gcp-service-account") && message.contains("forbidden"),
        "{message}"
    );
    api.await.expect("GET, PATCH, owner lookup, Event");
}

fn policy(name: &str, spec: Value, status: Value) -> TokenProxyPolicy {
    serde_json::from_value(json!({
        "apiVersion": "wiproxy.io/v1alpha1", "kind": "TokenProxyPolicy",
        "metadata": {"name": name, "generation": 3}, "spec": spec, "status": status,
    }))
    .expect("policy")
}

#[tokio::test]
async fn policy_status_is_written_when_it_changes() {
    let (client, mut handle) = support::api::client();
    let api: Api<TokenProxyPolicy> = Api::all(client);
    let invalid = policy("bad", json!({"namespaceSelector": {}, "upstreams": ["http://x/"]}), json!({}));
    let validity = wiproxy_webhook::policy_status::usable_policies(&[Arc::new(invalid.clone())], true).1.remove(0).1;
    assert!(validity.is_err());
    let calls = tokio::spawn(async move {
        let (request, send) = next(&mut handle).await;
        assert_eq!(
            (request.method(), request.uri().path()),
            (&Method::PATCH, "/apis/wiproxy.io/v1alpha1/tokenproxypolicies/bad/status")
        );
        let patch = body_json(request).await;
        let condition = &patch["status"]["conditions"][0];
        assert_eq!(condition["type"], "Ready");
        assert_eq!(condition["status"], "False");
        assert_eq!(condition["reason"], "Invalid");
        assert_eq!(condition["observedGeneration"], 3);
        assert!(condition["message"].as_str().is_some_and(|m| m.contains("spec.upstreams[0]")), "{patch}");
        reply(
            send,
            StatusCode::OK,
            json!({
                "apiVersion": "wiproxy.io/v1alpha1", "kind": "TokenProxyPolicy", "metadata": {"name": "bad"},
                "spec": {"namespaceSelector": {}}, "status": patch["status"],
            }),
        );
        no_more_calls(&mut handle).await;
    });
    assert!(write_status(&api, &invalid, &validity).await.expect("written"));

    // A policy whose condition already says the same is left alone.
    let current = policy(
        "good",
        json!({"namespaceSelector": {}}),
        json!({"conditions": [{
            "type": "Ready", "status": "True", "reason": "Valid", "message": "the policy is in force",
            "observedGeneration": 3, "lastTransitionTime": "2026-11-01T00:00:00Z",
        }]}),
    );
    assert!(!write_status(&api, &current, &Ok(())).await.expect("nothing to write"));
    calls.await.expect("one PATCH for the invalid policy only");
}

#[tokio::test]
async fn the_version_probe_decides_native_sidecars() {
    for (minor, native) in [("28", false), ("29", true), ("31+", true)] {
        let (client, mut handle) = support::api::client();
        let api = tokio::spawn(async move {
            let (request, send) = next(&mut handle).await;
            assert_eq!((request.method(), request.uri().path()), (&Method::GET, "/version"));
            reply(
                send,
                StatusCode::OK,
                json!({
                    "major": "1", "minor": minor, "gitVersion": format!("v1.{minor}.3-gke.100"), "gitCommit": "", "gitTreeState": "",
                    "buildDate": "2026-10-01T00:00:00Z", "goVersion": "go1.25", "compiler": "gc", "platform": "linux/amd64",
                }),
            );
        });
        assert_eq!(supports_native_sidecars(&client).await.expect("a version"), native, "1.{minor}");
        api.await.expect("GET /version");
    }
}

/// Answers the next call, a GET of `path`, with `status` and `body`.
async fn expect_get(handle: &mut ApiHandle, path: &str, status: StatusCode, body: Value) {
    let (request, send) = next(handle).await;
    assert_eq!((request.method(), request.uri().path()), (&Method::GET, path));
    reply(send, status, body);
}

fn api_groups(names: &[&str]) -> Value {
    let groups: Vec<Value> = names
        .iter()
        .map(|name| {
            let version = json!({"groupVersion": format!("{name}/v1"), "version": "v1"});
            json!({"name": name, "versions": [version.clone()], "preferredVersion": version})
        })
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

fn not_found(name: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404,
           "message": format!("mutatingwebhookconfigurations.admissionregistration.k8s.io \"{name}\" not found")})
}

const WEBHOOKS_PATH: &str = "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations";

#[tokio::test]
async fn autopilot_is_detected_from_the_api_group_or_gke_webhooks() {
    let warden = AUTOPILOT_WEBHOOKS[0];
    let older = AUTOPILOT_WEBHOOKS[1];
    // The API group alone.
    let (client, mut handle) = support::api::client();
    let api = tokio::spawn(async move {
        expect_get(&mut handle, "/apis", StatusCode::OK, api_groups(&["apps", "auto.gke.io", "wiproxy.io"])).await;
        no_more_calls(&mut handle).await;
    });
    assert!(autopilot(GkeAutopilot::Auto, &client).await.expect("detected"));
    api.await.expect("one discovery call");

    // GKE's Autopilot webhook, found by name (the older name, after the newer one is not found).
    let (client, mut handle) = support::api::client();
    let api = tokio::spawn(async move {
        expect_get(&mut handle, "/apis", StatusCode::OK, api_groups(&["apps"])).await;
        let path = format!("{WEBHOOKS_PATH}/{warden}");
        expect_get(&mut handle, &path, StatusCode::NOT_FOUND, not_found(warden)).await;
        let path = format!("{WEBHOOKS_PATH}/{older}");
        let found =
            json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata", "metadata": {"name": older}});
        expect_get(&mut handle, &path, StatusCode::OK, found).await;
    });
    assert!(autopilot(GkeAutopilot::Auto, &client).await.expect("detected"));
    api.await.expect("discovery, then the webhooks");

    // GKE Standard: neither signal.
    let (client, mut handle) = support::api::client();
    let api = tokio::spawn(async move {
        expect_get(&mut handle, "/apis", StatusCode::OK, api_groups(&["apps", "networking.gke.io"])).await;
        for name in AUTOPILOT_WEBHOOKS {
            let path = format!("{WEBHOOKS_PATH}/{name}");
            expect_get(&mut handle, &path, StatusCode::NOT_FOUND, not_found(name)).await;
        }
        no_more_calls(&mut handle).await;
    });
    assert!(!autopilot(GkeAutopilot::Auto, &client).await.expect("detected"));
    api.await.expect("discovery and both webhooks");

    // Overridden: no call at all.
    for (setting, expected) in [(GkeAutopilot::True, true), (GkeAutopilot::False, false)] {
        let (client, mut handle) = support::api::client();
        assert_eq!(autopilot(setting, &client).await.expect("as given"), expected);
        no_more_calls(&mut handle).await;
    }
}

#[tokio::test]
async fn autopilot_detection_failing_stops_the_start() {
    let (client, mut handle) = support::api::client();
    let api = tokio::spawn(async move {
        let status = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 500, "message": "etcdserver: request timed out", "reason": "InternalError"});
        expect_get(&mut handle, "/apis", StatusCode::INTERNAL_SERVER_ERROR, status).await;
    });
    assert!(autopilot(GkeAutopilot::Auto, &client).await.is_err());
    api.await.expect("one discovery call");
}

fn node(name: &str, kubelet: &str) -> Value {
    json!({
        "metadata": {"name": name, "resourceVersion": "7", "labels": {"kubernetes.io/os": "linux"}},
        "status": {
            "nodeInfo": {"kubeletVersion": kubelet, "kernelVersion": "6.1", "osImage": "Container-Optimized OS",
                         "containerRuntimeVersion": "containerd://1.7", "architecture": "amd64", "bootID": "b",
                         "kubeProxyVersion": kubelet, "machineID": "m", "operatingSystem": "linux", "systemUUID": "u"},
            "images": [{"names": ["gcr.io/big/image:1"], "sizeBytes": 123456789}],
        },
    })
}

/// A webhook whose index fills from the mocked API's lists (then its watches stay open), with
/// native sidecars where the kubelets allow them; the review's answer.
async fn review_with_nodes(nodes: Vec<Value>) -> (Value, Vec<Value>) {
    let (client, mut handle) = support::api::client();
    let api = tokio::spawn(async move {
        let mut open_watches = Vec::new();
        let mut seen_nodes = Vec::new();
        while let Ok(Some((request, send))) =
            tokio::time::timeout(std::time::Duration::from_secs(2), handle.next_request()).await
        {
            let (path, query) = (request.uri().path().to_owned(), request.uri().query().unwrap_or_default().to_owned());
            if query.contains("watch=true") {
                open_watches.push(send);
                continue;
            }
            let items = match path.as_str() {
                "/api/v1/namespaces" => vec![
                    json!({"metadata": {"name": "payments", "labels": {"team": "payments"}, "resourceVersion": "1"}}),
                ],
                "/api/v1/serviceaccounts" => {
                    vec![json!({"metadata": {"name": "orders-client", "namespace": "payments", "resourceVersion": "2",
                    "annotations": {"iam.gke.io/gcp-service-account": GSA}}})]
                }
                "/api/v1/nodes" => nodes.clone(),
                other => panic!("unexpected call {other}?{query}"),
            };
            if path == "/api/v1/nodes" {
                seen_nodes.push(json!(query));
            }
            let list =
                json!({"kind": "List", "apiVersion": "v1", "metadata": {"resourceVersion": "10"}, "items": items});
            reply(send, StatusCode::OK, list);
        }
        drop(open_watches);
        seen_nodes
    });
    let live = Arc::new(LiveCluster::watch(client));
    tokio::time::timeout(std::time::Duration::from_secs(5), live.synced()).await.expect("the watches list once");
    let policies = yaml::load_policies(std::path::Path::new(support::POLICY_FILE)).expect("policy");
    let webhook = Webhook {
        sidecar: SidecarSettings { native: NativeSidecars::WhereKubeletsAllow, ..SidecarSettings::default() },
        policies: Arc::new(Policies::new(PolicySet::new(policies, true))),
        cluster: Cluster::Live(live),
    };
    let (response, _) =
        answer(&webhook, Endpoint::Mutate, support::review_fixture().to_string().as_bytes()).await.expect("a review");
    let seen = api.await.expect("the API served the lists");
    (response, seen)
}

fn sidecar_is_native(response: &Value) -> bool {
    use base64::Engine as _;
    let patch = base64::engine::general_purpose::STANDARD
        .decode(response["response"]["patch"].as_str().expect("a patch"))
        .expect("base64");
    let patch: Value = serde_json::from_slice(&patch).expect("JSON patch");
    let sidecar = patch
        .as_array()
        .expect("operations")
        .iter()
        .find(|op| op["value"]["name"] == "wiproxy" || op["value"][0]["name"] == "wiproxy")
        .expect("the sidecar is added");
    sidecar["path"].as_str().expect("a path").starts_with("/spec/initContainers")
}

#[tokio::test]
async fn a_mixed_node_pool_gets_a_regular_sidecar_and_a_warning() {
    let (response, lists) =
        review_with_nodes(vec![node("pool-a-1", "v1.30.5-gke.1014001"), node("pool-b-1", "v1.28.15-gke.1020000")])
            .await;
    assert_eq!(lists.len(), 1, "the nodes are listed once, then watched");
    assert_eq!(response["response"]["allowed"], true, "{response}");
    assert!(!sidecar_is_native(&response), "a kubelet older than 1.29: a regular sidecar");
    let warnings = response["response"]["warnings"].to_string();
    assert!(warnings.contains("node pool-b-1 runs kubelet v1.28.15-gke.1020000, older than 1.29"), "{warnings}");
}

#[tokio::test]
async fn nodes_all_at_1_29_or_newer_get_a_native_sidecar() {
    let (response, _) =
        review_with_nodes(vec![node("pool-a-1", "v1.30.5-gke.1014001"), node("pool-b-1", "v1.29.0-gke.1")]).await;
    assert_eq!(response["response"]["allowed"], true, "{response}");
    assert!(sidecar_is_native(&response));
    assert!(!response["response"]["warnings"].to_string().contains("kubelet"), "{response}");
}
