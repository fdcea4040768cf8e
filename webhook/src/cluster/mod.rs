//! The cluster the webhook decides against, and the only module that knows whether it runs from
//! files or against the Kubernetes API. It reads the state a decision needs (namespace labels,
//! the Workload Identity mapping of ServiceAccounts) and applies the effects a decision asks for.

pub mod files;
pub mod index;
pub mod live;

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use tracing::info;

use crate::denial::Denial;

pub use files::StaticCluster;
pub use live::LiveCluster;

/// Label Kubernetes sets on every namespace.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// What is known of a Kubernetes service account (KSA).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KsaLookup {
    /// Not known: it may not exist yet.
    Missing,
    /// Exists without `iam.gke.io/gcp-service-account`.
    Unmapped,
    /// Exists and maps to this GSA.
    Mapped(String),
}

/// A node's kubelet version, `status.nodeInfo.kubeletVersion` (such as `v1.28.9-gke.1000000`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeKubelet {
    pub node: String,
    /// As the node reports it.
    pub raw: String,
    /// Major and minor; `(0, 0)` when the version does not read as `vMAJOR.MINOR…`, so an
    /// unknown kubelet counts as old.
    pub version: (u32, u32),
}

impl NodeKubelet {
    pub fn new(node: &str, raw: &str) -> Self {
        let mut numbers = raw.trim_start_matches('v').split(['.', '-', '+']).map(|n| n.parse::<u32>().ok());
        let version = match (numbers.next().flatten(), numbers.next().flatten()) {
            (Some(major), Some(minor)) => (major, minor),
            _ => (0, 0),
        };
        Self { node: node.to_owned(), raw: raw.to_owned(), version }
    }

    /// The oldest of `kubelets` (the first such, by name, on a tie).
    pub fn oldest(kubelets: impl IntoIterator<Item = Self>) -> Option<Self> {
        kubelets.into_iter().min_by(|a, b| a.version.cmp(&b.version).then_with(|| a.node.cmp(&b.node)))
    }
}

/// Read access to the cluster state the injection depends on; no I/O behind it.
pub trait ClusterState: Send + Sync {
    /// The namespace's labels, `kubernetes.io/metadata.name` always among them.
    fn namespace_labels(&self, namespace: &str) -> BTreeMap<String, String>;
    fn service_account(&self, namespace: &str, name: &str) -> KsaLookup;
    /// The oldest kubelet among the nodes, if any node is known.
    fn oldest_kubelet(&self) -> Option<NodeKubelet>;
}

/// A change in the cluster that a decision asks for; the cluster applies it.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Add `iam.gke.io/gcp-service-account: gsa` to ServiceAccount `namespace/name`.
    AnnotateServiceAccount { namespace: String, name: String, gsa: String },
    /// A Warning Event on the workload that owns the denied pod, so `kubectl describe` shows why.
    RecordDenial { namespace: String, owners: Vec<OwnerReference>, message: String },
}

/// An effect that could not be applied, as the denial the review then gets.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct EffectFailed(pub Denial);

/// The cluster a running webhook serves: fixed from files, or the live API.
pub enum Cluster {
    /// `--cluster-file`: no Kubernetes API; effects are logged for the operator.
    Files(StaticCluster),
    /// The compact index the API server's watches feed, and the API for effects.
    Live(Arc<LiveCluster>),
}

impl Cluster {
    /// Makes sure the state a decision about `namespace/ksa` reads is at hand: an index miss is
    /// read from the API (a ServiceAccount created in the same apply as its workload).
    pub async fn load(&self, namespace: &str, ksa: &str) {
        if let Self::Live(live) = self {
            live.ensure_service_account(namespace, ksa).await;
        }
    }

    /// Applies `effects` in order; the first that fails stops the rest.
    pub async fn apply(&self, effects: &[Effect]) -> Result<(), EffectFailed> {
        for effect in effects {
            match (self, effect) {
                (Self::Live(live), Effect::AnnotateServiceAccount { namespace, name, gsa }) => {
                    live.annotate_service_account(namespace, name, gsa).await.map_err(|e| {
                        let error = match &e {
                            kube::Error::Api(status) if status.code == 409 => {
                                "it changed after the webhook read it (another writer mapped it meanwhile); the pod's controller creates the pod again, which reads it anew".to_owned()
                            }
                            _ => e.to_string(),
                        };
                        EffectFailed(Denial::ServiceAccountPatch {
                            namespace: namespace.clone(),
                            ksa: name.clone(),
                            gsa: gsa.clone(),
                            error,
                        })
                    })?;
                }
                (Self::Live(live), Effect::RecordDenial { namespace, owners, message }) => {
                    // In the background: the answer to the API server does not wait for an Event.
                    let (live, namespace, owners, message) =
                        (live.clone(), namespace.clone(), owners.clone(), message.clone());
                    tokio::spawn(async move { live.record_denial(&namespace, &owners, &message).await });
                }
                (Self::Files(_), Effect::AnnotateServiceAccount { namespace, name, gsa }) => {
                    info!(%namespace, ksa = %name, %gsa, "ServiceAccount needs the Workload Identity annotation; no Kubernetes API in file mode, left to the operator");
                }
                (Self::Files(_), Effect::RecordDenial { .. }) => {}
            }
        }
        Ok(())
    }

    fn state(&self) -> &dyn ClusterState {
        match self {
            Self::Files(files) => files,
            Self::Live(live) => live.as_ref(),
        }
    }
}

impl ClusterState for Cluster {
    fn namespace_labels(&self, namespace: &str) -> BTreeMap<String, String> {
        self.state().namespace_labels(namespace)
    }

    fn service_account(&self, namespace: &str, name: &str) -> KsaLookup {
        self.state().service_account(namespace, name)
    }

    fn oldest_kubelet(&self) -> Option<NodeKubelet> {
        self.state().oldest_kubelet()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubelet_versions() {
        for (raw, version) in [
            ("v1.28.9-gke.1000000", (1, 28)),
            ("v1.29.0", (1, 29)),
            ("v1.31.1+k3s1", (1, 31)),
            ("1.30", (1, 30)),
            ("", (0, 0)),
            ("vX.Y", (0, 0)),
        ] {
            assert_eq!(NodeKubelet::new("n", raw).version, version, "{raw:?}");
        }
        let oldest = NodeKubelet::oldest([
            NodeKubelet::new("b", "v1.30.2"),
            NodeKubelet::new("c", "v1.28.9-gke.1"),
            NodeKubelet::new("a", "v1.28.15"),
        ]);
        assert_eq!(oldest.map(|k| k.node), Some("a".to_owned()));
        assert_eq!(NodeKubelet::oldest([]), None);
    }
}
