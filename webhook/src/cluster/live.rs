//! The webhook in a cluster: reflector stores of Namespaces and ServiceAccounts (metadata only),
//! the ServiceAccount annotation Workload Identity needs, Events on the owner of a denied pod, and
//! the API server version that decides `--native-sidecars auto`.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use futures_util::StreamExt;
use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Namespace, ObjectReference, ServiceAccount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, PartialObjectMeta, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::Client;
use serde_json::json;
use tracing::{debug, info, warn};
use wiproxy_common::GKE_SERVICE_ACCOUNT_ANNOTATION;

use super::{ClusterState, KsaLookup, NAMESPACE_NAME_LABEL};

/// Field manager of the webhook's writes.
pub const MANAGER: &str = "wiproxy-webhook";

pub struct LiveCluster {
    client: Client,
    namespaces: Store<PartialObjectMeta<Namespace>>,
    service_accounts: Store<PartialObjectMeta<ServiceAccount>>,
    /// ServiceAccounts read directly because the store had not seen them yet (created in the same
    /// apply), or annotated by this webhook before its watch caught up.
    recent: Mutex<HashMap<(String, String), KsaLookup>>,
    recorder: Recorder,
}

fn lookup(meta: &PartialObjectMeta<ServiceAccount>) -> KsaLookup {
    match meta.metadata.annotations.as_ref().and_then(|a| a.get(GKE_SERVICE_ACCOUNT_ANNOTATION)) {
        Some(gsa) => KsaLookup::Mapped(gsa.clone()),
        None => KsaLookup::Unmapped,
    }
}

impl LiveCluster {
    pub fn new(
        client: Client,
        namespaces: Store<PartialObjectMeta<Namespace>>,
        service_accounts: Store<PartialObjectMeta<ServiceAccount>>,
    ) -> Self {
        let instance = std::env::var("HOSTNAME").ok();
        let recorder = Recorder::new(client.clone(), Reporter { controller: MANAGER.to_owned(), instance });
        Self { client, namespaces, service_accounts, recent: Mutex::default(), recorder }
    }

    /// Starts the watches; the returned stores fill in the background.
    pub fn watch(client: Client) -> Self {
        let (namespaces, writer) = reflector::store();
        let stream = watcher(Api::<PartialObjectMeta<Namespace>>::all(client.clone()), watcher::Config::default())
            .default_backoff();
        tokio::spawn(reflector::reflector(writer, stream).for_each(|event| async move {
            if let Err(e) = event {
                warn!(error = %e, "namespace watch failed; retrying");
            }
        }));
        let (service_accounts, writer) = reflector::store();
        let stream = watcher(Api::<PartialObjectMeta<ServiceAccount>>::all(client.clone()), watcher::Config::default())
            .default_backoff();
        tokio::spawn(reflector::reflector(writer, stream).for_each(|event| async move {
            if let Err(e) = event {
                warn!(error = %e, "service account watch failed; retrying");
            }
        }));
        Self::new(client, namespaces, service_accounts)
    }

    /// Waits until both stores have listed once.
    pub async fn synced(&self) {
        let _ = self.namespaces.wait_until_ready().await;
        let _ = self.service_accounts.wait_until_ready().await;
    }

    fn recent(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), KsaLookup>> {
        self.recent.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Makes sure `namespace/name` is known before deciding: a store miss is read from the API.
    pub async fn ensure_service_account(&self, namespace: &str, name: &str) {
        let key = ObjectRef::new(name).within(namespace);
        if self.service_accounts.get(&key).is_some()
            || self.recent().contains_key(&(namespace.to_owned(), name.to_owned()))
        {
            return;
        }
        let api: Api<ServiceAccount> = Api::namespaced(self.client.clone(), namespace);
        let found = match api.get_metadata_opt(name).await {
            Ok(Some(meta)) => lookup(&meta),
            Ok(None) => KsaLookup::Missing,
            Err(e) => {
                warn!(%namespace, ksa = name, error = %e, "cannot read ServiceAccount");
                return;
            }
        };
        debug!(%namespace, ksa = name, ?found, "ServiceAccount read directly");
        self.recent().insert((namespace.to_owned(), name.to_owned()), found);
    }

    /// Adds `iam.gke.io/gcp-service-account: gsa` to the ServiceAccount with a merge patch.
    pub async fn annotate_service_account(&self, namespace: &str, name: &str, gsa: &str) -> Result<(), kube::Error> {
        let api: Api<ServiceAccount> = Api::namespaced(self.client.clone(), namespace);
        let patch = json!({"metadata": {"annotations": {GKE_SERVICE_ACCOUNT_ANNOTATION: gsa}}});
        api.patch_metadata(name, &PatchParams::apply(MANAGER), &Patch::Merge(&patch)).await?;
        info!(%namespace, ksa = name, %gsa, "ServiceAccount mapped to its Google service account");
        self.recent().insert((namespace.to_owned(), name.to_owned()), KsaLookup::Mapped(gsa.to_owned()));
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
        let mut labels = self
            .namespaces
            .get(&ObjectRef::new(namespace))
            .and_then(|ns| ns.metadata.labels.clone())
            .unwrap_or_default();
        labels.insert(NAMESPACE_NAME_LABEL.to_owned(), namespace.to_owned());
        labels
    }

    fn service_account(&self, namespace: &str, name: &str) -> KsaLookup {
        let key = (namespace.to_owned(), name.to_owned());
        if let Some(recent) = self.recent().get(&key) {
            if matches!(recent, KsaLookup::Mapped(_)) {
                return recent.clone();
            }
        }
        if let Some(meta) = self.service_accounts.get(&ObjectRef::new(name).within(namespace)) {
            return lookup(&meta);
        }
        self.recent().get(&key).cloned().unwrap_or(KsaLookup::Missing)
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
