//! The webhook in a cluster: the compact index of Namespaces, ServiceAccounts (metadata only)
//! and Nodes that the watches feed, the ServiceAccount annotation Workload Identity needs, Events
//! on the owner of a denied pod, and the probes behind `--native-sidecars auto` and
//! `--gke-autopilot auto`.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{Stream, StreamExt};
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Namespace, Node, ObjectReference, ServiceAccount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, PartialObjectMeta, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::{watcher, WatchStreamExt};
use kube::Client;
use serde_json::json;
use tracing::{debug, info, warn};
use wiproxy_common::GKE_SERVICE_ACCOUNT_ANNOTATION;

use super::index::{ClusterIndex, IndexedMeta};
use super::{ClusterState, KsaLookup, NodeKubelet, NAMESPACE_NAME_LABEL};
use crate::settings::{GkeAutopilot, MANAGER};

pub struct LiveCluster {
    client: Client,
    /// What decisions read, fed by the watches (or, in tests, by hand).
    index: Arc<ClusterIndex>,
    /// ServiceAccounts read directly because the index had not seen them yet (created in the same
    /// apply), or annotated by this webhook before its watch caught up.
    recent: Mutex<HashMap<(String, String), Recent>>,
    recorder: Recorder,
}

/// How long a ServiceAccount read or annotated directly stands in for the index: by then the
/// watch has seen it, and the index, which follows every later change, is the truth again.
pub const RECENT_TTL: Duration = Duration::from_secs(60);

/// A ServiceAccount read or annotated directly, and when.
#[derive(Debug, Clone)]
struct Recent {
    lookup: KsaLookup,
    resource_version: Option<String>,
    at: Instant,
}

fn lookup(meta: &PartialObjectMeta<ServiceAccount>) -> KsaLookup {
    match meta.metadata.annotations.as_ref().and_then(|a| a.get(GKE_SERVICE_ACCOUNT_ANNOTATION)) {
        Some(gsa) => KsaLookup::Mapped(gsa.clone()),
        None => KsaLookup::Unmapped,
    }
}

/// Feeds `apply` with a watch's events, retrying (with the watcher's backoff) on errors.
fn spawn_watch<K: Send + 'static>(
    events: impl Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
    index: Arc<ClusterIndex>,
    apply: fn(&ClusterIndex, watcher::Event<K>),
    what: &'static str,
) {
    tokio::spawn(events.for_each(move |event| {
        match event {
            Ok(event) => apply(&index, event),
            Err(e) => warn!(error = %e, watch = what, "watch failed; retrying"),
        }
        std::future::ready(())
    }));
}

impl LiveCluster {
    /// A cluster over `client` whose index starts empty and is fed by the caller.
    pub fn new(client: Client) -> Self {
        let instance = std::env::var("HOSTNAME").ok();
        let recorder = Recorder::new(client.clone(), Reporter { controller: MANAGER.to_owned(), instance });
        Self { client, index: Arc::default(), recent: Mutex::default(), recorder }
    }

    /// Starts the watches; the index fills in the background.
    ///
    /// Each watch lists in pages of 500 (kube's default, client-go's) at the most recent
    /// resourceVersion, then watches from the list's resourceVersion with bookmarks. A page
    /// holds one transient body of ~0.5 MB of metadata; larger pages would only save loopback
    /// round trips, which are not where a sync's time goes. `any_semantic()` (the "Any" list,
    /// `resourceVersion=0`, served from the API server's cache) would not change a paged list:
    /// kube-core's `ListParams` leaves `resourceVersion=0` out when a `limit` is set, so the
    /// first page would be the same request.
    pub fn watch(client: Client) -> Self {
        let live = Self::new(client.clone());
        let config = watcher::Config::default();
        let namespaces = Api::<IndexedMeta<Namespace>>::all(client.clone());
        spawn_watch(
            watcher(namespaces, config.clone()).default_backoff(),
            live.index.clone(),
            ClusterIndex::apply_namespace,
            "namespaces",
        );
        let service_accounts = Api::<IndexedMeta<ServiceAccount>>::all(client.clone());
        spawn_watch(
            watcher(service_accounts, config.clone()).default_backoff(),
            live.index.clone(),
            ClusterIndex::apply_service_account,
            "serviceaccounts",
        );
        // Whole Nodes: the kubelet version is in their status, which metadata leaves out.
        let nodes = Api::<Node>::all(client);
        spawn_watch(watcher(nodes, config).default_backoff(), live.index.clone(), ClusterIndex::apply_node, "nodes");
        live
    }

    /// The index decisions read; tests feed it watcher events directly.
    pub fn index(&self) -> &ClusterIndex {
        &self.index
    }

    /// Waits until every watch has listed once.
    pub async fn synced(&self) {
        self.index.synced().await;
    }

    /// The directly read or annotated ServiceAccount, while it is recent.
    fn recent(&self, namespace: &str, name: &str) -> Option<Recent> {
        let recent = self.recent.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        recent.get(&(namespace.to_owned(), name.to_owned())).filter(|r| r.at.elapsed() < RECENT_TTL).cloned()
    }

    fn remember(&self, namespace: &str, name: &str, lookup: KsaLookup, resource_version: Option<String>) {
        let mut recent = self.recent.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        recent.retain(|_, r| r.at.elapsed() < RECENT_TTL);
        recent.insert((namespace.to_owned(), name.to_owned()), Recent { lookup, resource_version, at: Instant::now() });
    }

    /// Makes sure `namespace/name` is known before deciding: an index miss is read from the API.
    pub async fn ensure_service_account(&self, namespace: &str, name: &str) {
        if self.index.service_account(namespace, name).is_some() || self.recent(namespace, name).is_some() {
            return;
        }
        let api: Api<ServiceAccount> = Api::namespaced(self.client.clone(), namespace);
        let (found, resource_version) = match api.get_metadata_opt(name).await {
            Ok(Some(meta)) => (lookup(&meta), meta.metadata.resource_version.clone()),
            Ok(None) => (KsaLookup::Missing, None),
            Err(e) => {
                warn!(%namespace, ksa = name, error = %e, "cannot read ServiceAccount");
                return;
            }
        };
        debug!(%namespace, ksa = name, ?found, "ServiceAccount read directly");
        self.remember(namespace, name, found, resource_version);
    }

    /// Adds `iam.gke.io/gcp-service-account: gsa` to the ServiceAccount with a merge patch that
    /// carries the resourceVersion the decision read: if the ServiceAccount changed since (another
    /// replica mapped it elsewhere, say), the API server refuses it with 409 instead of
    /// overwriting a mapping nobody decided on.
    pub async fn annotate_service_account(&self, namespace: &str, name: &str, gsa: &str) -> Result<(), kube::Error> {
        let api: Api<ServiceAccount> = Api::namespaced(self.client.clone(), namespace);
        let read = self
            .index
            .service_account_version(namespace, name)
            .or_else(|| self.recent(namespace, name).and_then(|r| r.resource_version));
        let mut patch = json!({"metadata": {"annotations": {GKE_SERVICE_ACCOUNT_ANNOTATION: gsa}}});
        if let Some(resource_version) = read {
            patch["metadata"]["resourceVersion"] = json!(resource_version);
        }
        let patched = api.patch_metadata(name, &PatchParams::apply(MANAGER), &Patch::Merge(&patch)).await?;
        info!(%namespace, ksa = name, %gsa, "ServiceAccount mapped to its Google service account");
        self.remember(namespace, name, KsaLookup::Mapped(gsa.to_owned()), patched.metadata.resource_version);
        Ok(())
    }

    /// Records a Warning Event on the workload that owns the denied pod (`owners` are the pod's
    /// owner references), so `kubectl describe` on it shows the reason: the pod's controller, or
    /// the Deployment or CronJob above it.
    pub async fn record_denial(&self, namespace: &str, owners: &[OwnerReference], message: &str) {
        let Some(owner) = controller_of(Some(owners)) else { return };
        let reference = self.top_owner(namespace, owner).await;
        let event = Event {
            type_: EventType::Warning,
            reason: "WiproxyDenied".to_owned(),
            note: Some(message.chars().take(1000).collect()),
            action: "InjectTokenProxy".to_owned(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, &reference).await {
            warn!(%namespace, owner = ?reference.name, error = %e, "cannot record the denial as an Event");
        }
    }

    async fn top_owner(&self, namespace: &str, owner: &OwnerReference) -> ObjectReference {
        let parent = match owner.kind.as_str() {
            "ReplicaSet" => Api::<ReplicaSet>::namespaced(self.client.clone(), namespace)
                .get_metadata_opt(&owner.name)
                .await
                .ok()
                .flatten()
                .and_then(|rs| controller_of(rs.metadata.owner_references.as_deref()).cloned()),
            "Job" => Api::<Job>::namespaced(self.client.clone(), namespace)
                .get_metadata_opt(&owner.name)
                .await
                .ok()
                .flatten()
                .and_then(|job| controller_of(job.metadata.owner_references.as_deref()).cloned()),
            _ => None,
        };
        let owner = parent.as_ref().unwrap_or(owner);
        ObjectReference {
            api_version: Some(owner.api_version.clone()),
            kind: Some(owner.kind.clone()),
            name: Some(owner.name.clone()),
            namespace: Some(namespace.to_owned()),
            uid: Some(owner.uid.clone()),
            ..ObjectReference::default()
        }
    }
}

fn controller_of(owners: Option<&[OwnerReference]>) -> Option<&OwnerReference> {
    owners?.iter().find(|o| o.controller == Some(true))
}

impl ClusterState for LiveCluster {
    fn namespace_labels(&self, namespace: &str) -> BTreeMap<String, String> {
        let mut labels = self.index.namespace_labels(namespace).unwrap_or_default();
        labels.insert(NAMESPACE_NAME_LABEL.to_owned(), namespace.to_owned());
        labels
    }

    fn service_account(&self, namespace: &str, name: &str) -> KsaLookup {
        let recent = self.recent(namespace, name);
        if let Some(Recent { lookup: mapped @ KsaLookup::Mapped(_), .. }) = &recent {
            return mapped.clone();
        }
        if let Some(found) = self.index.service_account(namespace, name) {
            return found;
        }
        recent.map(|r| r.lookup).unwrap_or(KsaLookup::Missing)
    }

    fn oldest_kubelet(&self) -> Option<NodeKubelet> {
        self.index.oldest_kubelet()
    }
}

/// API group served on GKE Autopilot clusters (its workload allowlists); the Dynatrace operator's
/// chart reads Autopilot from it (`.Capabilities.APIVersions.Has "auto.gke.io/v1"`).
pub const AUTOPILOT_API_GROUP: &str = "auto.gke.io";
/// GKE's own mutating webhooks that exist on Autopilot clusters only (Agones'
/// `pkg/cloudproduct/gke`: "the current best method to detect Autopilot"; Config Sync's
/// `pkg/util/autopilot.go`): the name changed with GKE 1.26.
pub const AUTOPILOT_WEBHOOKS: &[&str] = &[
    "warden-mutating.config.common-webhooks.networking.gke.io",
    "workload-defaulter.config.common-webhooks.networking.gke.io",
];

/// Whether the cluster is GKE Autopilot, and by which signal. Google documents no signal, so
/// two that established projects use are read: the `auto.gke.io` API group, then GKE's
/// Autopilot-only admission webhooks (a 403 there, for want of RBAC, counts as not found).
pub async fn detect_autopilot(client: &Client) -> Result<Option<String>, kube::Error> {
    let groups = client.list_api_groups().await?;
    if groups.groups.iter().any(|g| g.name == AUTOPILOT_API_GROUP) {
        return Ok(Some(format!("API group {AUTOPILOT_API_GROUP}")));
    }
    let api: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    for name in AUTOPILOT_WEBHOOKS {
        match api.get_metadata_opt(name).await {
            Ok(Some(_)) => return Ok(Some(format!("MutatingWebhookConfiguration {name}"))),
            Ok(None) => {}
            Err(kube::Error::Api(status)) if status.code == 403 => {
                warn!(webhook = name, "cannot read GKE's webhook configurations (RBAC): Autopilot detection relies on the API group alone");
                break;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(None)
}

/// `--gke-autopilot`: as given, or for `auto` detected (no API call otherwise).
pub async fn autopilot(setting: GkeAutopilot, client: &Client) -> Result<bool, kube::Error> {
    match setting {
        GkeAutopilot::True => Ok(true),
        GkeAutopilot::False => Ok(false),
        GkeAutopilot::Auto => {
            let signal = detect_autopilot(client).await?;
            info!(
                autopilot = signal.is_some(),
                signal = signal.as_deref().unwrap_or("none"),
                "GKE Autopilot detection"
            );
            Ok(signal.is_some())
        }
    }
}

/// Whether the API server runs Kubernetes 1.29 or newer (native sidecars on by default).
pub async fn supports_native_sidecars(client: &Client) -> Result<bool, kube::Error> {
    let info = client.apiserver_version().await?;
    let number = |s: &str| s.chars().take_while(char::is_ascii_digit).collect::<String>().parse::<u32>().unwrap_or(0);
    let (major, minor) = (number(&info.major), number(&info.minor));
    info!(major, minor, "API server version");
    Ok(major > 1 || (major == 1 && minor >= 29))
}
