//! The webhook's watches and decisions against the fake Kubernetes API server
//! (`wiproxy_tests::apiserver`): the index fills from paged lists, survives a closed watch, a
//! watch gap (410) and an expired continue token, and the decisions see what changes in the
//! cluster. No timing is asserted: waits only bound how long a failure takes to show.

mod support;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use wiproxy_tests::apiserver::{ApiServer, Logged};
use wiproxy_tests::pki::TestCa;
use wiproxy_webhook::admission;
use wiproxy_webhook::cluster::{Cluster, ClusterState, KsaLookup, LiveCluster};
use wiproxy_webhook::inject::SidecarSettings;
use wiproxy_webhook::policy::PolicySet;
use wiproxy_webhook::policy_status::Policies;
use wiproxy_webhook::review::Endpoint;
use wiproxy_webhook::{yaml, Webhook};

const GSA: &str = "invoker@client-project.iam.gserviceaccount.com";
const OTHER_GSA: &str = "orders@client-project.iam.gserviceaccount.com";
/// Long enough for any of these waits on a loaded machine; only a failure ever waits this long.
const PATIENCE: Duration = Duration::from_secs(30);

async fn client(server: &ApiServer) -> kube::Client {
    let kubeconfig = kube::config::Kubeconfig::from_yaml(&server.kubeconfig()).expect("the fake's kubeconfig parses");
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &kube::config::KubeConfigOptions::default())
        .await
        .expect("a client configuration");
    kube::Client::try_from(config).expect("a client")
}

/// The webhook's watches over `server`, listed once and watching.
async fn synced(server: &ApiServer) -> Arc<LiveCluster> {
    let live = Arc::new(LiveCluster::watch(client(server).await));
    tokio::time::timeout(PATIENCE, live.synced()).await.expect("the watches list once");
    // A watcher sends its watch once the list is consumed, just after `synced`.
    eventually("the three watches are open", || async { server.cluster().open_watches() == 3 }).await;
    live
}

/// Waits until `check` holds.
async fn eventually<F: Future<Output = bool>>(what: &str, mut check: impl FnMut() -> F) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn lists_of(server: &ApiServer, path: &str) -> Vec<Logged> {
    server.requests().into_iter().filter(|r| r.path == path && r.method == "GET" && !r.is_watch()).collect()
}

fn watches_of(server: &ApiServer, path: &str) -> Vec<Logged> {
    server.requests().into_iter().filter(|r| r.path == path && r.is_watch()).collect()
}

fn expected_ksa(i: usize) -> KsaLookup {
    match i % 2 {
        0 => KsaLookup::Mapped(format!("app-{}@client-project.iam.gserviceaccount.com", i % 1000)),
        _ => KsaLookup::Unmapped,
    }
}

#[tokio::test]
async fn paged_lists_fill_the_index_with_every_object_once() {
    let server = ApiServer::start_tls(&TestCa::new()).await;
    {
        let mut cluster = server.cluster();
        cluster.populate(20, 1234, 3);
        cluster.compact();
    }
    let live = synced(&server).await;
    assert_eq!(live.index().counts(), (20, 1234, 3));
    for i in 0..1234 {
        let namespace = format!("ns-{:05}", i % 20);
        assert_eq!(live.service_account(&namespace, &format!("sa-{i:06}")), expected_ksa(i), "sa-{i:06}");
    }
    let labels = live.namespace_labels("ns-00007");
    assert_eq!(labels.get("team").map(String::as_str), Some("team-7"));
    assert_eq!(labels.get("kubernetes.io/metadata.name").map(String::as_str), Some("ns-00007"));
    assert_eq!(live.oldest_kubelet().map(|k| k.raw), Some("v1.33.2-gke.1000000".to_owned()));

    // Three pages of 500, metadata only, each continue token used once, then a watch from the
    // list's resourceVersion.
    let pages = lists_of(&server, "/api/v1/serviceaccounts");
    assert_eq!(pages.len(), 3, "{pages:?}");
    assert!(pages.iter().all(|p| p.param("limit") == Some("500") && p.status == 200));
    assert!(pages
        .iter()
        .all(|p| p.accept.as_deref() == Some("application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1")));
    assert_eq!(pages[0].param("continue"), None);
    assert!(pages[1].param("continue").is_some() && pages[1].param("continue") != pages[2].param("continue"));
    let watch = watches_of(&server, "/api/v1/serviceaccounts");
    let listed_at = server.cluster().revision().to_string();
    assert_eq!(watch.first().and_then(|w| w.param("resourceVersion")), Some(listed_at.as_str()));
    assert_eq!(watch.first().and_then(|w| w.param("allowWatchBookmarks")), Some("true"));
    assert_eq!(
        lists_of(&server, "/api/v1/nodes")[0].accept.as_deref(),
        None,
        "whole Nodes: their status holds the kubelet"
    );
}

#[tokio::test]
async fn an_expired_continue_token_starts_the_list_again() {
    let server = ApiServer::start().await;
    {
        let mut cluster = server.cluster();
        cluster.populate(3, 1100, 0);
        cluster.compact();
    }
    // Between the first and second page, the cluster changes and its history is compacted.
    server.before_next_continue(|cluster| {
        cluster.add_service_account("ns-00000", "created-meanwhile", Some(GSA));
        cluster.compact();
    });
    let live = synced(&server).await;
    assert_eq!(live.index().counts().1, 1101);
    assert_eq!(live.service_account("ns-00000", "created-meanwhile"), KsaLookup::Mapped(GSA.to_owned()));
    let pages = lists_of(&server, "/api/v1/serviceaccounts");
    let statuses: Vec<(u16, bool)> = pages.iter().map(|p| (p.status, p.param("continue").is_some())).collect();
    assert_eq!(
        statuses,
        [(200, false), (410, true), (200, false), (200, true), (200, true)],
        "a fresh list after the 410"
    );
}

#[tokio::test]
async fn a_closed_watch_resumes_where_it_was() {
    let server = ApiServer::start().await;
    {
        let mut cluster = server.cluster();
        cluster.populate(2, 10, 1);
        cluster.compact();
    }
    let live = synced(&server).await;
    let listed_at = server.cluster().revision();
    {
        let mut cluster = server.cluster();
        cluster.close_watches();
        cluster.set_namespace_labels("ns-00001", &[("team", "payments")]);
        cluster.annotate_service_account("ns-00001", "sa-000001", Some(GSA));
        cluster.set_kubelet("gke-cluster-pool-0-0000", "v1.28.15-gke.1");
    }
    eventually("the relabel, the annotation and the kubelet are seen", || async {
        live.namespace_labels("ns-00001").get("team").map(String::as_str) == Some("payments")
            && live.service_account("ns-00001", "sa-000001") == KsaLookup::Mapped(GSA.to_owned())
            && live.oldest_kubelet().map(|k| k.version) == Some((1, 28))
    })
    .await;
    for path in ["/api/v1/namespaces", "/api/v1/serviceaccounts", "/api/v1/nodes"] {
        assert_eq!(lists_of(&server, path).len(), 1, "{path}: resumed, not listed again");
        let watches = watches_of(&server, path);
        assert!(watches.len() >= 2, "{path}: watched again after the close");
        let resumed_from: u64 =
            watches[1].param("resourceVersion").and_then(|rv| rv.parse().ok()).expect("a resourceVersion");
        assert!(resumed_from >= listed_at, "{path}: resumed from {resumed_from}, before the list at {listed_at}");
    }
}

#[tokio::test]
async fn a_watch_gap_lists_again_and_forgets_what_was_deleted() {
    let server = ApiServer::start().await;
    {
        let mut cluster = server.cluster();
        cluster.populate(2, 10, 2);
        cluster.compact();
    }
    let live = synced(&server).await;
    assert_eq!(live.service_account("ns-00000", "sa-000000"), expected_ksa(0));
    // An outage: the watches drop, the cluster changes, and its history is compacted before any
    // watch is back, so each resumes from a resourceVersion that is gone.
    {
        let mut cluster = server.cluster();
        cluster.close_watches();
        cluster.delete_service_account("ns-00000", "sa-000000");
        cluster.annotate_service_account("ns-00001", "sa-000001", Some(GSA));
        cluster.delete_namespace("ns-00000");
        cluster.delete_node("gke-cluster-pool-0-0000");
        cluster.compact();
    }
    eventually("the deletions and the annotation are seen", || async {
        live.index().service_account("ns-00000", "sa-000000").is_none()
            && live.index().namespace_labels("ns-00000").is_none()
            && live.index().counts() == (1, 9, 1)
            && live.service_account("ns-00001", "sa-000001") == KsaLookup::Mapped(GSA.to_owned())
    })
    .await;
    for path in ["/api/v1/namespaces", "/api/v1/serviceaccounts", "/api/v1/nodes"] {
        let gone = watches_of(&server, path).into_iter().filter(|w| {
            w.param("resourceVersion")
                .and_then(|rv| rv.parse::<u64>().ok())
                .is_some_and(|rv| rv < server.cluster().revision())
        });
        assert!(gone.count() >= 2, "{path}: the watch resumed from the gone revision");
        assert_eq!(lists_of(&server, path).len(), 2, "{path}: listed again after the 410");
    }
}

/// A webhook deciding with the example policy against `live`.
fn webhook(live: Arc<LiveCluster>) -> Webhook {
    let policies = yaml::load_policies(std::path::Path::new(support::POLICY_FILE)).expect("policy");
    Webhook {
        sidecar: SidecarSettings::default(),
        policies: Arc::new(Policies::new(PolicySet::new(policies, true))),
        cluster: Cluster::Live(live),
    }
}

/// The review fixture's answer with the pod's KSA set to `ksa`: allowed, and the GSA the sidecar
/// expects (`None` when denied).
async fn decide(webhook: &Webhook, ksa: &str) -> (bool, Option<String>) {
    let mut review = support::review_fixture();
    review["request"]["object"]["spec"]["serviceAccountName"] = json!(ksa);
    let (body, _) =
        admission::answer(webhook, Endpoint::Mutate, review.to_string().as_bytes()).await.expect("a review");
    let response: Value = serde_json::from_slice(&body).expect("JSON");
    if response["response"]["allowed"] != true {
        return (false, None);
    }
    let patched = support::apply_response_patch(&response, &review["request"]["object"]);
    let sidecar = patched["spec"]["initContainers"]
        .as_array()
        .into_iter()
        .chain(patched["spec"]["containers"].as_array())
        .flatten()
        .find(|c| c["name"] == "wiproxy")
        .cloned()
        .expect("the sidecar");
    let expected =
        sidecar["env"].as_array().into_iter().flatten().find(|e| e["name"] == "WIPROXY_EXPECTED_SERVICE_ACCOUNT");
    (true, expected.and_then(|e| e["value"].as_str()).map(str::to_owned))
}

#[tokio::test]
async fn decisions_see_a_relabelled_namespace_and_a_re_annotated_ksa() {
    let server = ApiServer::start().await;
    {
        let mut cluster = server.cluster();
        cluster.add_namespace("payments", &[("team", "payments")]);
        cluster.add_service_account("payments", "orders-client", Some(GSA));
        cluster.add_service_account("payments", "new-client", None);
        cluster.populate(5, 50, 1);
        cluster.compact();
    }
    let live = synced(&server).await;
    let webhook = webhook(live.clone());
    assert_eq!(decide(&webhook, "orders-client").await, (true, Some(GSA.to_owned())));

    server.cluster().annotate_service_account("payments", "orders-client", Some(OTHER_GSA));
    eventually("the new GSA in the decision", || async {
        decide(&webhook, "orders-client").await == (true, Some(OTHER_GSA.to_owned()))
    })
    .await;

    // An unmapped KSA: the webhook maps it to the policy's default GSA with a patch conditioned
    // on the resourceVersion it read, and the fake's watch brings the mapping back.
    assert_eq!(decide(&webhook, "new-client").await, (true, Some(GSA.to_owned())));
    let patches: Vec<Logged> = server.requests().into_iter().filter(|r| r.method == "PATCH").collect();
    assert_eq!(patches.len(), 1);
    assert_eq!(patches[0].status, 200, "the precondition held");
    eventually("the patched KSA comes back through the watch", || async {
        live.index().service_account("payments", "new-client") == Some(KsaLookup::Mapped(GSA.to_owned()))
    })
    .await;

    server.cluster().set_namespace_labels("payments", &[("team", "billing")]);
    eventually("no policy selects the namespace any more", || async { !decide(&webhook, "orders-client").await.0 })
        .await;
    server.cluster().set_namespace_labels("payments", &[("team", "payments")]);
    eventually("selected again", || async { decide(&webhook, "orders-client").await.0 }).await;
}
