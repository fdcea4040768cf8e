//! What a decision reads of the cluster, kept compact from the watch events: a namespace's
//! labels; a ServiceAccount's Workload Identity GSA and resourceVersion; a node's kubelet
//! version, with the oldest kept in order. Nothing else of the objects stays (no managed fields,
//! no other annotations): at 100,000 ServiceAccounts whole metadata would weigh hundreds of MiB.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::marker::PhantomData;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use k8s_openapi::api::core::v1::Node;
use kube::api::ObjectMeta;
use kube::runtime::watcher::Event;
use kube::{Resource, ResourceExt};
use serde::de::{Deserializer, IgnoredAny, MapAccess, Visitor};
use serde::Deserialize;
use tokio::sync::watch;
use wiproxy_common::GKE_SERVICE_ACCOUNT_ANNOTATION;

use super::{KsaLookup, NodeKubelet, NAMESPACE_NAME_LABEL};

/// The metadata of a `K` (a Namespace or a ServiceAccount) as the index reads it. Fetched as
/// metadata only, like `PartialObjectMeta<K>`, but deserialised without what no decision reads:
/// serde skips managed fields, owner references and every annotation but Workload Identity's
/// without allocating them, which at 100,000 objects is most of the work of a list.
#[derive(Debug)]
pub struct IndexedMeta<K> {
    pub metadata: ObjectMeta,
    kind: PhantomData<fn() -> K>,
}

impl<K> Clone for IndexedMeta<K> {
    fn clone(&self) -> Self {
        Self { metadata: self.metadata.clone(), kind: PhantomData }
    }
}

impl<K: Resource> Resource for IndexedMeta<K> {
    type DynamicType = K::DynamicType;
    type Scope = K::Scope;

    fn metadata_api() -> bool {
        true
    }

    fn kind(dt: &Self::DynamicType) -> Cow<'_, str> {
        K::kind(dt)
    }

    fn group(dt: &Self::DynamicType) -> Cow<'_, str> {
        K::group(dt)
    }

    fn version(dt: &Self::DynamicType) -> Cow<'_, str> {
        K::version(dt)
    }

    fn plural(dt: &Self::DynamicType) -> Cow<'_, str> {
        K::plural(dt)
    }

    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

impl<'de, K> Deserialize<'de> for IndexedMeta<K> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Object {
            #[serde(default)]
            metadata: Metadata,
        }
        #[derive(Default, Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Metadata {
            name: Option<String>,
            namespace: Option<String>,
            resource_version: Option<String>,
            labels: Option<BTreeMap<String, String>>,
            #[serde(default, deserialize_with = "workload_identity_only")]
            annotations: Option<BTreeMap<String, String>>,
        }
        let Metadata { name, namespace, resource_version, labels, annotations } =
            Object::deserialize(deserializer)?.metadata;
        let metadata = ObjectMeta { name, namespace, resource_version, labels, annotations, ..ObjectMeta::default() };
        Ok(Self { metadata, kind: PhantomData })
    }
}

/// The annotations map, keeping `iam.gke.io/gcp-service-account` only (a kubectl-applied
/// object's last applied configuration is the largest value there, and no decision reads it).
fn workload_identity_only<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<BTreeMap<String, String>>, D::Error> {
    /// A key, borrowed from the input when it has no escapes.
    #[derive(Deserialize)]
    struct Key<'a>(#[serde(borrow)] Cow<'a, str>);

    struct Annotations;

    impl<'de> Visitor<'de> for Annotations {
        type Value = Option<BTreeMap<String, String>>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a map of annotations or null")
        }

        fn visit_none<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
            deserializer.deserialize_map(self)
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut kept = BTreeMap::new();
            while let Some(Key(key)) = map.next_key()? {
                if key == GKE_SERVICE_ACCOUNT_ANNOTATION {
                    kept.insert(key.into_owned(), map.next_value()?);
                } else {
                    map.next_value::<IgnoredAny>()?;
                }
            }
            Ok(Some(kept))
        }
    }

    deserializer.deserialize_option(Annotations)
}

/// Strings that many entries repeat (label keys and values, GSAs: Workload Identity often maps
/// every KSA of a team to one GSA), stored once.
#[derive(Default)]
struct Interner {
    strings: HashSet<Arc<str>>,
    /// Size of the set after the last purge.
    kept: usize,
}

impl Interner {
    fn intern(&mut self, text: &str) -> Arc<str> {
        if let Some(found) = self.strings.get(text) {
            return found.clone();
        }
        let interned: Arc<str> = Arc::from(text);
        self.strings.insert(interned.clone());
        if self.strings.len() > 2 * self.kept + 64 {
            // Only the index clones these Arcs (readers copy the text out), so a count of one
            // is the set's own: nothing uses the string any more. Amortised O(1) per intern.
            self.strings.retain(|s| Arc::strong_count(s) > 1);
            self.kept = self.strings.len();
        }
        interned
    }
}

/// A resourceVersion as the API server wrote it. The API concepts page ("Resource versions")
/// says clients must pass it back unmodified; kube-apiserver's are decimal revisions, kept as a
/// number (8 bytes, no allocation), anything else as text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResourceVersion {
    Revision(u64),
    Text(Box<str>),
}

impl ResourceVersion {
    pub fn new(text: &str) -> Self {
        let canonical =
            !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) && (text.len() == 1 || !text.starts_with('0'));
        match text.parse() {
            Ok(revision) if canonical => Self::Revision(revision),
            _ => Self::Text(text.into()),
        }
    }
}

impl std::fmt::Display for ResourceVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Revision(revision) => write!(f, "{revision}"),
            Self::Text(text) => f.write_str(text),
        }
    }
}

/// Entries by key, each marked with the list that last saw it. The watcher's `InitDone` says
/// objects "not listed … should be assumed to have been deleted": after a relist, entries of an
/// older list go. A relist updates entries in place (no second copy of the index meanwhile); an
/// object deleted during the relist stays visible until its end, as with a buffered store.
struct Table<V> {
    entries: HashMap<Box<str>, (V, u32)>,
    list: u32,
}

impl<V> Default for Table<V> {
    fn default() -> Self {
        Self { entries: HashMap::new(), list: 0 }
    }
}

impl<V> Table<V> {
    fn get(&self, key: &str) -> Option<&V> {
        self.entries.get(key).map(|(value, _)| value)
    }

    /// Stores `value` under `key`; the value it replaces.
    fn insert(&mut self, key: &str, value: V) -> Option<V> {
        let list = self.list;
        match self.entries.get_mut(key) {
            Some(slot) => Some(std::mem::replace(slot, (value, list)).0),
            None => {
                self.entries.insert(key.into(), (value, list));
                None
            }
        }
    }

    fn remove(&mut self, key: &str) -> Option<V> {
        self.entries.remove(key).map(|(value, _)| value)
    }

    fn begin_list(&mut self) {
        self.list = self.list.wrapping_add(1);
    }

    /// Drops the entries the list just finished did not see; returns them.
    fn end_list(&mut self) -> Vec<(Box<str>, V)> {
        let list = self.list;
        let unseen: Vec<Box<str>> =
            self.entries.iter().filter(|(_, (_, seen))| *seen != list).map(|(key, _)| key.clone()).collect();
        unseen.into_iter().filter_map(|key| self.entries.remove(&key).map(|(value, _)| (key, value))).collect()
    }

    fn len(&self) -> usize {
        self.entries.len()
    }
}

/// One kind of object the index keeps (read as `O`), fed by its watcher's events.
trait Indexed<O> {
    /// The key of `object`, if it names itself.
    fn key(object: &O) -> Option<String>;
    fn upsert(&mut self, key: &str, object: &O);
    fn remove(&mut self, key: &str);
    fn begin_list(&mut self);
    fn end_list(&mut self);
}

/// A namespace's labels, keys and values interned.
type Labels = Box<[(Arc<str>, Arc<str>)]>;

/// Namespace → its labels, without `kubernetes.io/metadata.name` (its value is the name).
#[derive(Default)]
struct Namespaces {
    labels: Table<Labels>,
    strings: Interner,
}

impl<K: Resource> Indexed<K> for Namespaces {
    fn key(namespace: &K) -> Option<String> {
        namespace.meta().name.clone()
    }

    fn upsert(&mut self, key: &str, namespace: &K) {
        let labels = namespace
            .labels()
            .iter()
            .filter(|(k, v)| !(k.as_str() == NAMESPACE_NAME_LABEL && v.as_str() == key))
            .map(|(k, v)| (self.strings.intern(k), self.strings.intern(v)))
            .collect();
        self.labels.insert(key, labels);
    }

    fn remove(&mut self, key: &str) {
        self.labels.remove(key);
    }

    fn begin_list(&mut self) {
        self.labels.begin_list();
    }

    fn end_list(&mut self) {
        self.labels.end_list();
    }
}

/// What the index keeps of a ServiceAccount.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Ksa {
    gsa: Option<Arc<str>>,
    resource_version: ResourceVersion,
}

/// `namespace/name` → the KSA (neither part can hold a `/`: both are DNS names).
#[derive(Default)]
struct ServiceAccounts {
    ksas: Table<Ksa>,
    gsas: Interner,
}

fn ksa_key(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

impl<K: Resource> Indexed<K> for ServiceAccounts {
    fn key(ksa: &K) -> Option<String> {
        Some(ksa_key(ksa.meta().namespace.as_deref()?, ksa.meta().name.as_deref()?))
    }

    fn upsert(&mut self, key: &str, ksa: &K) {
        let gsa = ksa.annotations().get(GKE_SERVICE_ACCOUNT_ANNOTATION).map(|gsa| self.gsas.intern(gsa));
        let resource_version = ResourceVersion::new(ksa.meta().resource_version.as_deref().unwrap_or_default());
        self.ksas.insert(key, Ksa { gsa, resource_version });
    }

    fn remove(&mut self, key: &str) {
        self.ksas.remove(key);
    }

    fn begin_list(&mut self) {
        self.ksas.begin_list();
    }

    fn end_list(&mut self) {
        self.ksas.end_list();
    }
}

/// What the index keeps of a Node.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Kubelet {
    version: (u32, u32),
    raw: Box<str>,
}

/// Node → kubelet version, and the nodes ordered oldest kubelet first (then by name), so the
/// oldest is read in O(1) and kept in O(log n) per event rather than found by a scan per review.
#[derive(Default)]
struct Kubelets {
    nodes: Table<Kubelet>,
    by_age: BTreeSet<((u32, u32), Box<str>)>,
}

impl Kubelets {
    fn forget(&mut self, node: &str, kubelet: &Kubelet) {
        self.by_age.remove(&(kubelet.version, Box::from(node)));
    }

    fn oldest(&self) -> Option<NodeKubelet> {
        let (version, node) = self.by_age.first()?;
        let kubelet = self.nodes.get(node)?;
        Some(NodeKubelet { node: node.to_string(), raw: kubelet.raw.to_string(), version: *version })
    }
}

impl Indexed<Node> for Kubelets {
    fn key(node: &Node) -> Option<String> {
        node.metadata.name.clone()
    }

    fn upsert(&mut self, key: &str, node: &Node) {
        let raw = node.status.as_ref().and_then(|s| s.node_info.as_ref()).map(|i| i.kubelet_version.as_str());
        let parsed = NodeKubelet::new(key, raw.unwrap_or_default());
        let kubelet = Kubelet { version: parsed.version, raw: parsed.raw.into() };
        self.by_age.insert((kubelet.version, key.into()));
        if let Some(old) = self.nodes.insert(key, kubelet.clone()) {
            if old.version != kubelet.version {
                self.forget(key, &old);
            }
        }
    }

    fn remove(&mut self, key: &str) {
        if let Some(old) = self.nodes.remove(key) {
            self.forget(key, &old);
        }
    }

    fn begin_list(&mut self) {
        self.nodes.begin_list();
    }

    fn end_list(&mut self) {
        for (node, old) in self.nodes.end_list() {
            self.forget(&node, &old);
        }
    }
}

/// Which watches have listed once.
#[derive(Debug, Default, Clone, Copy)]
struct Listed {
    namespaces: bool,
    service_accounts: bool,
    nodes: bool,
}

/// The index behind a live cluster's decisions; each watch feeds its part with `apply_*`.
pub struct ClusterIndex {
    namespaces: RwLock<Namespaces>,
    service_accounts: RwLock<ServiceAccounts>,
    nodes: RwLock<Kubelets>,
    listed: watch::Sender<Listed>,
}

impl Default for ClusterIndex {
    fn default() -> Self {
        Self {
            namespaces: RwLock::default(),
            service_accounts: RwLock::default(),
            nodes: RwLock::default(),
            listed: watch::Sender::new(Listed::default()),
        }
    }
}

fn read<T>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn write<T>(lock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Applies one watcher event; true when it ends a complete list.
fn apply<O, I: Indexed<O>>(lock: &RwLock<I>, event: Event<O>) -> bool {
    let mut index = write(lock);
    match event {
        Event::Init => index.begin_list(),
        Event::InitApply(object) | Event::Apply(object) => {
            if let Some(key) = I::key(&object) {
                index.upsert(&key, &object);
            }
        }
        Event::Delete(object) => {
            if let Some(key) = I::key(&object) {
                index.remove(&key);
            }
        }
        Event::InitDone => {
            index.end_list();
            return true;
        }
    }
    false
}

impl ClusterIndex {
    /// A Namespace watch's event (of `IndexedMeta<Namespace>`, or any form of a Namespace).
    pub fn apply_namespace<K: Resource>(&self, event: Event<K>) {
        if apply(&self.namespaces, event) {
            self.listed.send_modify(|listed| listed.namespaces = true);
        }
    }

    /// A ServiceAccount watch's event (of `IndexedMeta<ServiceAccount>`, or any form of one).
    pub fn apply_service_account<K: Resource>(&self, event: Event<K>) {
        if apply(&self.service_accounts, event) {
            self.listed.send_modify(|listed| listed.service_accounts = true);
        }
    }

    pub fn apply_node(&self, event: Event<Node>) {
        if apply(&self.nodes, event) {
            self.listed.send_modify(|listed| listed.nodes = true);
        }
    }

    /// Waits until Namespaces, ServiceAccounts and Nodes have each been listed completely once.
    pub async fn synced(&self) {
        let mut listed = self.listed.subscribe();
        let _ = listed.wait_for(|l| l.namespaces && l.service_accounts && l.nodes).await;
    }

    /// The namespace's labels, `kubernetes.io/metadata.name` left out; `None` when not known.
    pub fn namespace_labels(&self, namespace: &str) -> Option<BTreeMap<String, String>> {
        let namespaces = read(&self.namespaces);
        let labels = namespaces.labels.get(namespace)?;
        Some(labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect())
    }

    /// The KSA's mapping, when the index holds it.
    pub fn service_account(&self, namespace: &str, name: &str) -> Option<KsaLookup> {
        let ksas = read(&self.service_accounts);
        let ksa = ksas.ksas.get(&ksa_key(namespace, name))?;
        Some(match &ksa.gsa {
            Some(gsa) => KsaLookup::Mapped(gsa.to_string()),
            None => KsaLookup::Unmapped,
        })
    }

    /// The resourceVersion of the KSA as the index last saw it.
    pub fn service_account_version(&self, namespace: &str, name: &str) -> Option<String> {
        let ksas = read(&self.service_accounts);
        ksas.ksas.get(&ksa_key(namespace, name)).map(|ksa| ksa.resource_version.to_string())
    }

    /// The oldest kubelet (the first node by name on a tie), as `NodeKubelet::oldest` picks it.
    pub fn oldest_kubelet(&self) -> Option<NodeKubelet> {
        read(&self.nodes).oldest()
    }

    /// Namespaces, ServiceAccounts and Nodes held.
    pub fn counts(&self) -> (usize, usize, usize) {
        (read(&self.namespaces).labels.len(), read(&self.service_accounts).ksas.len(), read(&self.nodes).nodes.len())
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{Namespace, NodeStatus, NodeSystemInfo, ServiceAccount};
    use kube::api::PartialObjectMeta;

    use super::*;

    type KsaEvent = Event<PartialObjectMeta<ServiceAccount>>;

    fn ksa(
        namespace: &str,
        name: &str,
        gsa: Option<&str>,
        resource_version: &str,
    ) -> PartialObjectMeta<ServiceAccount> {
        let annotations = gsa.map(|gsa| {
            [
                (GKE_SERVICE_ACCOUNT_ANNOTATION.to_owned(), gsa.to_owned()),
                ("kubectl.kubernetes.io/last-applied-configuration".to_owned(), "{}".to_owned()),
            ]
            .into()
        });
        let metadata = ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(namespace.to_owned()),
            resource_version: Some(resource_version.to_owned()),
            annotations,
            ..ObjectMeta::default()
        };
        PartialObjectMeta { types: None, metadata, _phantom: std::marker::PhantomData }
    }

    fn namespace(name: &str, labels: &[(&str, &str)]) -> PartialObjectMeta<Namespace> {
        let mut labels: BTreeMap<String, String> =
            labels.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        labels.insert(NAMESPACE_NAME_LABEL.to_owned(), name.to_owned());
        let metadata = ObjectMeta { name: Some(name.to_owned()), labels: Some(labels), ..ObjectMeta::default() };
        PartialObjectMeta { types: None, metadata, _phantom: std::marker::PhantomData }
    }

    fn node(name: &str, kubelet: &str) -> Node {
        Node {
            metadata: ObjectMeta { name: Some(name.to_owned()), ..ObjectMeta::default() },
            status: Some(NodeStatus {
                node_info: Some(NodeSystemInfo { kubelet_version: kubelet.to_owned(), ..NodeSystemInfo::default() }),
                ..NodeStatus::default()
            }),
            ..Node::default()
        }
    }

    fn oldest(index: &ClusterIndex) -> Option<(String, String)> {
        index.oldest_kubelet().map(|k| (k.node, k.raw))
    }

    #[test]
    fn indexed_metadata_reads_what_the_index_keeps_and_skips_the_rest() {
        let page = serde_json::json!({
            "kind": "PartialObjectMetadataList", "apiVersion": "meta.k8s.io/v1",
            "metadata": {"resourceVersion": "900", "continue": "token", "remainingItemCount": 1},
            "items": [
                {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": {
                    "name": "orders", "namespace": "payments", "resourceVersion": "41", "uid": "u",
                    "labels": {"app": "orders"},
                    "annotations": {
                        "kubectl.kubernetes.io/last-applied-configuration": "{\"kind\":\"ServiceAccount\"}\n",
                        "iam.gke.io/gcp-service-account": "invoker@client-project.iam.gserviceaccount.com",
                    },
                    "managedFields": [{"manager": "kubectl", "fieldsV1": {"f:metadata": {}}}],
                    "ownerReferences": [{"apiVersion": "v1", "kind": "X", "name": "x", "uid": "y"}],
                }},
                {"metadata": {"name": "plain", "namespace": "payments", "resourceVersion": "42", "annotations": null}},
            ],
        });
        let list: kube::core::ObjectList<IndexedMeta<ServiceAccount>> =
            serde_json::from_str(&page.to_string()).expect("a page of ServiceAccounts");
        assert_eq!(list.metadata.continue_.as_deref(), Some("token"));
        let orders = &list.items[0].metadata;
        let expected = ObjectMeta {
            name: Some("orders".to_owned()),
            namespace: Some("payments".to_owned()),
            resource_version: Some("41".to_owned()),
            labels: Some([("app".to_owned(), "orders".to_owned())].into()),
            annotations: Some(
                [(
                    GKE_SERVICE_ACCOUNT_ANNOTATION.to_owned(),
                    "invoker@client-project.iam.gserviceaccount.com".to_owned(),
                )]
                .into(),
            ),
            ..ObjectMeta::default()
        };
        assert_eq!(orders, &expected, "managed fields, owners, uid and other annotations left out");
        assert_eq!(list.items[1].metadata.annotations, None);
        // A key written with an escape cannot be borrowed from the input; it is still read.
        let escaped: IndexedMeta<ServiceAccount> = serde_json::from_str(
            r#"{"metadata":{"name":"escaped","annotations":{"iam.gke.io\/gcp-service-account":"e@p.iam.gserviceaccount.com"}}}"#,
        )
        .expect("an escaped key");
        assert_eq!(
            escaped.annotations().get(GKE_SERVICE_ACCOUNT_ANNOTATION).map(String::as_str),
            Some("e@p.iam.gserviceaccount.com")
        );
        assert!(IndexedMeta::<ServiceAccount>::metadata_api(), "fetched as metadata only");
        assert_eq!(IndexedMeta::<ServiceAccount>::plural(&()), "serviceaccounts");
        let event: kube::api::WatchEvent<IndexedMeta<Namespace>> = serde_json::from_str(
            r#"{"type":"MODIFIED","object":{"kind":"PartialObjectMetadata","apiVersion":"meta.k8s.io/v1","metadata":{"name":"payments","resourceVersion":"7","labels":{"team":"payments"}}}}"#,
        )
        .expect("a watch event");
        let kube::api::WatchEvent::Modified(namespace) = event else { panic!("a modification") };
        assert_eq!(namespace.labels().get("team").map(String::as_str), Some("payments"));
    }

    #[test]
    fn resource_versions_come_back_as_written() {
        for text in ["0", "7", "123456789012", "18446744073709551615", "", "007", "18446744073709551616", "abc", "12a"]
        {
            assert_eq!(ResourceVersion::new(text).to_string(), text);
        }
        assert_eq!(ResourceVersion::new("42"), ResourceVersion::Revision(42));
        assert!(matches!(ResourceVersion::new("042"), ResourceVersion::Text(_)));
    }

    #[test]
    fn a_ksa_keeps_its_gsa_and_resource_version_only() {
        let index = ClusterIndex::default();
        let gsa = "invoker@client-project.iam.gserviceaccount.com";
        index.apply_service_account(Event::Apply(ksa("payments", "orders", Some(gsa), "41")));
        index.apply_service_account(Event::Apply(ksa("payments", "plain", None, "42")));
        assert_eq!(index.service_account("payments", "orders"), Some(KsaLookup::Mapped(gsa.to_owned())));
        assert_eq!(index.service_account("payments", "plain"), Some(KsaLookup::Unmapped));
        assert_eq!(index.service_account("other", "orders"), None);
        assert_eq!(index.service_account_version("payments", "orders").as_deref(), Some("41"));
        index.apply_service_account(Event::Apply(ksa("payments", "orders", None, "50")));
        assert_eq!(index.service_account("payments", "orders"), Some(KsaLookup::Unmapped));
        assert_eq!(index.service_account_version("payments", "orders").as_deref(), Some("50"));
        index.apply_service_account(Event::Delete(ksa("payments", "orders", None, "51")));
        assert_eq!(index.service_account("payments", "orders"), None);
    }

    #[test]
    fn ksas_mapped_to_one_gsa_share_its_text() {
        let index = ClusterIndex::default();
        let gsa = "team@client-project.iam.gserviceaccount.com";
        for i in 0..100 {
            index.apply_service_account(Event::Apply(ksa("team", &format!("ksa-{i}"), Some(gsa), "1")));
        }
        let ksas = read(&index.service_accounts);
        let first = ksas.ksas.get("team/ksa-0").and_then(|k| k.gsa.clone()).expect("mapped");
        assert_eq!(Arc::strong_count(&first), 102, "one string: 100 KSAs, the interner and this handle");
        assert_eq!(ksas.gsas.strings.len(), 1);
    }

    #[test]
    fn a_namespace_keeps_its_labels() {
        let index = ClusterIndex::default();
        index.apply_namespace(Event::Apply(namespace("payments", &[("team", "payments")])));
        let labels = index.namespace_labels("payments").expect("known");
        assert_eq!(labels, BTreeMap::from([("team".to_owned(), "payments".to_owned())]));
        index.apply_namespace(Event::Apply(namespace("payments", &[("team", "billing"), ("env", "prod")])));
        assert_eq!(index.namespace_labels("payments").expect("known").get("team").map(String::as_str), Some("billing"));
        index.apply_namespace(Event::Delete(namespace("payments", &[])));
        assert_eq!(index.namespace_labels("payments"), None);
    }

    #[test]
    fn a_relist_drops_what_it_did_not_see_and_readiness_waits_for_the_first() {
        let index = ClusterIndex::default();
        let ready = || index.listed.borrow().service_accounts;
        index.apply_service_account(KsaEvent::Init);
        index.apply_service_account(Event::InitApply(ksa("a", "kept", None, "1")));
        index.apply_service_account(Event::InitApply(ksa("a", "deleted-later", None, "2")));
        assert!(!ready(), "not ready before the list ends");
        index.apply_service_account(KsaEvent::InitDone);
        assert!(ready());
        // A watch gap (410): relisted; the deleted one is gone once the list ends, not before.
        index.apply_service_account(KsaEvent::Init);
        index.apply_service_account(Event::InitApply(ksa("a", "kept", Some("g@p.iam.gserviceaccount.com"), "9")));
        assert_eq!(index.service_account("a", "deleted-later"), Some(KsaLookup::Unmapped));
        index.apply_service_account(Event::InitApply(ksa("a", "created", None, "10")));
        index.apply_service_account(KsaEvent::InitDone);
        assert_eq!(index.service_account("a", "deleted-later"), None);
        assert_eq!(
            index.service_account("a", "kept"),
            Some(KsaLookup::Mapped("g@p.iam.gserviceaccount.com".to_owned()))
        );
        assert_eq!(index.service_account("a", "created"), Some(KsaLookup::Unmapped));
        assert_eq!(index.counts().1, 2);
    }

    #[test]
    fn the_oldest_kubelet_follows_node_events() {
        let index = ClusterIndex::default();
        assert_eq!(oldest(&index), None);
        index.apply_node(Event::Init);
        for (name, kubelet) in [("b", "v1.30.2"), ("c", "v1.28.9-gke.1"), ("a", "v1.28.15"), ("d", "v1.31.0")] {
            index.apply_node(Event::InitApply(node(name, kubelet)));
        }
        index.apply_node(Event::InitDone);
        assert_eq!(oldest(&index), Some(("a".to_owned(), "v1.28.15".to_owned())), "oldest, then first by name");
        index.apply_node(Event::Apply(node("a", "v1.29.4")));
        assert_eq!(oldest(&index), Some(("c".to_owned(), "v1.28.9-gke.1".to_owned())), "a upgraded");
        index.apply_node(Event::Delete(node("c", "v1.28.9-gke.1")));
        assert_eq!(oldest(&index), Some(("a".to_owned(), "v1.29.4".to_owned())));
        // A relist that no longer sees `a`.
        index.apply_node(Event::Init);
        index.apply_node(Event::InitApply(node("b", "v1.30.2")));
        index.apply_node(Event::InitApply(node("d", "v1.31.0")));
        index.apply_node(Event::InitDone);
        assert_eq!(oldest(&index), Some(("b".to_owned(), "v1.30.2".to_owned())));
        assert_eq!(read(&index.nodes).by_age.len(), 2, "the order holds only the nodes there are");
        index.apply_node(Event::Apply(node("e", "not a version")));
        assert_eq!(oldest(&index).map(|(n, _)| n).as_deref(), Some("e"), "an unreadable version counts as oldest");
    }

    #[test]
    fn the_oldest_kubelet_is_the_one_a_scan_finds() {
        let index = ClusterIndex::default();
        let mut nodes = Vec::new();
        for i in 0..200u32 {
            let kubelet = format!("v1.{}.{}", 27 + (i * 7919) % 5, i % 3);
            let name = format!("node-{:03}", (i * 37) % 200);
            index.apply_node(Event::Apply(node(&name, &kubelet)));
            nodes.retain(|n: &NodeKubelet| n.node != name);
            nodes.push(NodeKubelet::new(&name, &kubelet));
            if i % 3 == 0 {
                let gone = nodes.remove(0);
                index.apply_node(Event::Delete(node(&gone.node, &gone.raw)));
            }
            assert_eq!(index.oldest_kubelet(), NodeKubelet::oldest(nodes.clone()), "after event {i}");
        }
    }
}
