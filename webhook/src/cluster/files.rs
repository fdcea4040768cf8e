//! The cluster from YAML documents (`--cluster-file`, `render` input): namespace labels and the
//! Workload Identity mapping of ServiceAccounts, held in memory.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Namespace, Node, ServiceAccount};
use serde_json::Value;
use wiproxy_common::GKE_SERVICE_ACCOUNT_ANNOTATION;

use super::{ClusterState, KsaLookup, NodeKubelet, NAMESPACE_NAME_LABEL};
use crate::workload::TypeKey;

#[derive(Debug, Clone, Default)]
pub struct StaticCluster {
    namespaces: BTreeMap<String, BTreeMap<String, String>>,
    service_accounts: BTreeMap<(String, String), Option<String>>,
    /// Node name → kubelet version, from Node documents (`status.nodeInfo.kubeletVersion`).
    kubelets: BTreeMap<String, String>,
}

impl StaticCluster {
    /// Takes the Namespace, ServiceAccount and Node objects among `documents` and ignores the
    /// rest. A ServiceAccount without a namespace is in `default_namespace`.
    pub fn add_documents<'a>(&mut self, documents: impl IntoIterator<Item = &'a Value>, default_namespace: &str) {
        for doc in documents {
            let metadata = &doc["metadata"];
            let Some(name) = metadata["name"].as_str() else { continue };
            let key = TypeKey::of(doc);
            if key.is::<Namespace>() {
                let labels = string_map(&metadata["labels"]);
                self.namespaces.insert(name.to_owned(), labels);
            } else if key.is::<ServiceAccount>() {
                let namespace = metadata["namespace"].as_str().unwrap_or(default_namespace);
                let gsa = metadata["annotations"][GKE_SERVICE_ACCOUNT_ANNOTATION].as_str().map(str::to_owned);
                self.service_accounts.insert((namespace.to_owned(), name.to_owned()), gsa);
            } else if key.is::<Node>() {
                let version = doc["status"]["nodeInfo"]["kubeletVersion"].as_str().unwrap_or_default();
                self.kubelets.insert(name.to_owned(), version.to_owned());
            }
        }
    }

    pub fn set_service_account(&mut self, namespace: &str, name: &str, gsa: Option<String>) {
        self.service_accounts.insert((namespace.to_owned(), name.to_owned()), gsa);
    }
}

impl ClusterState for StaticCluster {
    fn namespace_labels(&self, namespace: &str) -> BTreeMap<String, String> {
        let mut labels = self.namespaces.get(namespace).cloned().unwrap_or_default();
        labels.insert(NAMESPACE_NAME_LABEL.to_owned(), namespace.to_owned());
        labels
    }

    fn service_account(&self, namespace: &str, name: &str) -> KsaLookup {
        match self.service_accounts.get(&(namespace.to_owned(), name.to_owned())) {
            None => KsaLookup::Missing,
            Some(None) => KsaLookup::Unmapped,
            Some(Some(gsa)) => KsaLookup::Mapped(gsa.clone()),
        }
    }

    fn oldest_kubelet(&self) -> Option<NodeKubelet> {
        NodeKubelet::oldest(self.kubelets.iter().map(|(node, version)| NodeKubelet::new(node, version)))
    }
}

fn string_map(value: &Value) -> BTreeMap<String, String> {
    value
        .as_object()
        .map(|map| map.iter().filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned()))).collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reads_namespaces_and_service_accounts() {
        let docs = [
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "payments", "labels": {"team": "payments"}}}),
            json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "orders",
                "annotations": {"iam.gke.io/gcp-service-account": "a@p.iam.gserviceaccount.com"}}}),
            json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "plain", "namespace": "payments"}}),
            json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "other"}}),
        ];
        let mut cluster = StaticCluster::default();
        cluster.add_documents(&docs, "apps");
        let labels = cluster.namespace_labels("payments");
        assert_eq!(labels.get("team").map(String::as_str), Some("payments"));
        assert_eq!(labels.get(NAMESPACE_NAME_LABEL).map(String::as_str), Some("payments"));
        assert_eq!(cluster.namespace_labels("unknown").len(), 1);
        assert_eq!(cluster.service_account("apps", "orders"), KsaLookup::Mapped("a@p.iam.gserviceaccount.com".into()));
        assert_eq!(cluster.service_account("payments", "plain"), KsaLookup::Unmapped);
        assert_eq!(cluster.service_account("payments", "orders"), KsaLookup::Missing);
    }
}
