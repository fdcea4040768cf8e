//! A fake Kubernetes API server for the webhook's cluster mode: Namespaces, ServiceAccounts and
//! Nodes, listed in pages and watched, as strictly as the webhook relies on the real one; the
//! ServiceAccount read and patch of Workload Identity; Events accepted. Tests change the cluster
//! through [`Cluster`] and see every request the server answered.
//!
//! What it models, from the Kubernetes API concepts page
//! (<https://kubernetes.io/docs/reference/using-api/api-concepts/>):
//! - "Resource versions": one revision counter for every resource type, as etcd keeps it; an
//!   object's `metadata.resourceVersion` is the revision of its last change, a list's is the
//!   revision it was read at. A write that changes nothing keeps the revision.
//! - "Retrieving large results sets in chunks": `limit` and an opaque `continue` token; every page
//!   of one list is read at the resourceVersion of its first page ("a consistent snapshot"), with
//!   `remainingItemCount` on every page but the last; a token whose revision was compacted away is
//!   answered `410 Gone` (reason `Expired`, as apimachinery's `NewResourceExpired` sets it).
//! - "Semantics for get and list": the table of `resourceVersion`, `resourceVersionMatch`,
//!   `limit` and `continue` (Most Recent, Any, Not older than, Exact, Continuation, and the
//!   invalid combinations).
//! - "Efficient detection of changes" and "Semantics for watch": a watch from a resourceVersion
//!   sends every change after it (`ADDED`, `MODIFIED`, `DELETED`); without one it starts with
//!   synthetic `ADDED` events; a resourceVersion older than the retained history is answered with
//!   an `ERROR` event carrying `410 Gone` ("clients must handle the case by recognizing the status
//!   code 410 Gone, clearing their local cache, performing a list operation").
//! - "Watch bookmarks": `BOOKMARK` events, only when `allowWatchBookmarks=true`, whose object has
//!   only `metadata.resourceVersion`; never at any promised interval (tests send them).
//! - "Metadata-only fetches": `Accept: application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1`
//!   for lists and `as=PartialObjectMetadata` for gets and watches; a media type it cannot serve
//!   is `406 Not Acceptable`.
//! - "Updates to existing resources": a merge patch carrying `metadata.resourceVersion` is
//!   conditional on it; a stale one is `409 Conflict`.
//!
//! Beyond the page, from kube-apiserver's sources (not documented there): a list asked for
//! `as=PartialObjectMetadata` (not `…List`), or a single object asked for `…List`, is `406`
//! (`handlers/response.go`); the combinations the table calls invalid are `422`
//! (apimachinery's `ValidateListOptions`), except a continue token with a resourceVersion, which
//! the page gives as `400`; the messages of `410` and `409` are the apiserver's; a watch too
//! slow to read its events is closed (the watch cache drops a blocked watcher). The continue
//! token's `n` (items already returned, for `remainingItemCount`) is the fake's own: the token is
//! opaque to clients.
//!
//! Simplified: JSON only (no Protobuf, YAML, CBOR or Table); no label or field selectors, no
//! streaming lists (`sendInitialEvents`), refused with `400` rather than ignored; merge patches
//! only (`415` for the other patch types); no `managedFields` update on a patch; deleting a
//! Namespace removes it at once (no `Terminating`, no cascade); history is compacted when a test
//! or the binary says so, not every five minutes; only the API groups the webhook probes are
//! listed; policies (`tokenproxypolicies.wiproxy.io`) are not served.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::convert::Infallible;
use std::fmt::Write as _;
use std::ops::Bound;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::response::Response;
use axum::Router;
use base64::Engine as _;
use serde_json::{json, Map, Value};
use tokio::sync::broadcast;

use crate::pki::TestCa;
use crate::serve;

/// The bearer token every request must carry (the kubeconfig holds it).
pub const TOKEN: &str = "wiproxy-fake-apiserver-token";
/// Largest body a PATCH or POST may have.
const BODY_LIMIT: usize = 1 << 20;
/// A watch without `timeoutSeconds` lasts this long (kube-apiserver picks between its
/// `--min-request-timeout`, 1800 s, and twice that).
const DEFAULT_WATCH_SECONDS: u64 = 1800;
/// Changes a watch may fall behind by before it is closed.
const WATCH_BUFFER: usize = 4096;

/// The resource types served.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    Namespace,
    ServiceAccount,
    Node,
}

impl Kind {
    fn index(self) -> usize {
        self as usize
    }

    fn plural(self) -> &'static str {
        match self {
            Self::Namespace => "namespaces",
            Self::ServiceAccount => "serviceaccounts",
            Self::Node => "nodes",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Namespace => "Namespace",
            Self::ServiceAccount => "ServiceAccount",
            Self::Node => "Node",
        }
    }
}

/// An object as stored: its `metadata` and the rest of its fields (`"spec":…,"status":…`), as
/// JSON text, so a page of a large list is copied, not serialised.
#[derive(Debug)]
struct Object {
    metadata: String,
    rest: String,
}

impl Object {
    fn from_value(mut fields: Map<String, Value>) -> Self {
        fields.remove("kind");
        fields.remove("apiVersion");
        let metadata = fields.remove("metadata").unwrap_or_else(|| json!({})).to_string();
        let rest = fields.iter().map(|(k, v)| format!("{}:{v}", Value::from(k.as_str()))).collect::<Vec<_>>().join(",");
        Self { metadata, rest }
    }

    fn to_value(&self) -> Map<String, Value> {
        let text = if self.rest.is_empty() {
            format!(r#"{{"metadata":{}}}"#, self.metadata)
        } else {
            format!(r#"{{"metadata":{},{}}}"#, self.metadata, self.rest)
        };
        match serde_json::from_str(&text) {
            Ok(Value::Object(map)) => map,
            _ => Map::new(),
        }
    }

    /// As the client asked for it: metadata only, or the whole object (with its kind, or as an
    /// item of a typed list, which carries none).
    fn render(&self, kind: Kind, format: Format, typed: bool, out: &mut String) {
        match format {
            Format::Partial | Format::PartialList => {
                let _ = write!(
                    out,
                    r#"{{"kind":"PartialObjectMetadata","apiVersion":"meta.k8s.io/v1","metadata":{}}}"#,
                    self.metadata
                );
            }
            Format::Full => {
                out.push('{');
                if typed {
                    let _ = write!(out, r#""kind":"{}","apiVersion":"v1","#, kind.name());
                }
                let _ = write!(out, r#""metadata":{}"#, self.metadata);
                if !self.rest.is_empty() {
                    out.push(',');
                    out.push_str(&self.rest);
                }
                out.push('}');
            }
        }
    }

    fn resource_version(&self) -> String {
        self.to_value()["metadata"]["resourceVersion"].as_str().unwrap_or_default().to_owned()
    }
}

/// One version of an object; `None` is its deletion.
#[derive(Clone, Debug)]
struct Version {
    revision: u64,
    object: Option<Arc<Object>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Action {
    Added,
    Modified,
    Deleted,
}

/// A change, as the watches send it.
#[derive(Debug)]
struct Change {
    kind: Kind,
    key: String,
    revision: u64,
    action: Action,
    /// The object after the change; for a deletion its last state, at the deletion's revision.
    object: Arc<Object>,
}

#[derive(Clone, Debug)]
enum Message {
    Change(Arc<Change>),
    Bookmark(u64),
    Close,
}

#[derive(Default)]
struct Store {
    /// Key (`name`, or `namespace/name`) → versions, oldest first: the order of etcd's keys.
    objects: BTreeMap<String, Vec<Version>>,
    /// Changes after the compacted revision, in order.
    log: Vec<Arc<Change>>,
}

/// The latest version of `versions` at `revision`, if the object existed then.
fn at(versions: &[Version], revision: u64) -> Option<&Arc<Object>> {
    versions.iter().rev().find(|v| v.revision <= revision).and_then(|v| v.object.as_ref())
}

/// The cluster's state: objects with their history, and the changes watches are sent.
pub struct Cluster {
    revision: u64,
    /// History at or before this revision is gone (etcd's compaction).
    compacted: u64,
    stores: [Store; 3],
    /// Objects in a (kind, key prefix) at a revision: `remainingItemCount` without a scan per page.
    totals: HashMap<(Kind, String, u64), usize>,
    changes: broadcast::Sender<Message>,
    events: Vec<Value>,
}

impl Cluster {
    fn new() -> Self {
        let (changes, _) = broadcast::channel(WATCH_BUFFER);
        Self {
            revision: 1,
            compacted: 0,
            stores: Default::default(),
            totals: HashMap::new(),
            changes,
            events: Vec::new(),
        }
    }

    /// The latest resourceVersion.
    pub fn revision(&self) -> u64 {
        self.revision
    }

    fn current(&self, kind: Kind, key: &str) -> Option<&Arc<Object>> {
        self.stores[kind.index()].objects.get(key).and_then(|v| v.last()).and_then(|v| v.object.as_ref())
    }

    /// Writes `object` (or deletes, with `None`) under a new revision, and tells the watches.
    /// Returns the stored object.
    fn write(&mut self, kind: Kind, key: &str, object: Option<Map<String, Value>>) -> Option<Arc<Object>> {
        let previous = self.current(kind, key).cloned();
        let (action, mut fields) = match (object, &previous) {
            (Some(fields), None) => (Action::Added, fields),
            (Some(fields), Some(_)) => (Action::Modified, fields),
            (None, Some(previous)) => (Action::Deleted, previous.to_value()),
            (None, None) => return None,
        };
        self.revision += 1;
        let revision = self.revision;
        let metadata = fields.entry("metadata").or_insert_with(|| json!({}));
        metadata["resourceVersion"] = json!(revision.to_string());
        if metadata.get("uid").is_none() {
            metadata["uid"] = json!(uid(revision));
        }
        if metadata.get("creationTimestamp").is_none() {
            metadata["creationTimestamp"] = json!("2025-01-06T09:00:00Z");
        }
        let object = Arc::new(Object::from_value(fields));
        let stored = (action != Action::Deleted).then(|| object.clone());
        let store = &mut self.stores[kind.index()];
        store.objects.entry(key.to_owned()).or_default().push(Version { revision, object: stored.clone() });
        let change = Arc::new(Change { kind, key: key.to_owned(), revision, action, object });
        store.log.push(change.clone());
        let _ = self.changes.send(Message::Change(change));
        stored
    }

    /// Drops the history at or before the latest revision, as etcd's compaction does: a
    /// continue token or a watch from an older revision is then `410 Gone`.
    pub fn compact(&mut self) {
        self.compacted = self.revision;
        let compacted = self.compacted;
        for store in &mut self.stores {
            store.log.retain(|change| change.revision > compacted);
            store.objects.retain(|_, versions| {
                let keep_from = versions.iter().rposition(|v| v.revision <= compacted).unwrap_or(0);
                versions.drain(..keep_from);
                if versions.first().is_some_and(|v| v.revision <= compacted && v.object.is_none()) {
                    versions.remove(0);
                }
                !versions.is_empty()
            });
        }
        self.totals.clear();
    }

    /// Ends every open watch, as a restarting API server or a dropped connection does.
    pub fn close_watches(&mut self) {
        let _ = self.changes.send(Message::Close);
    }

    /// Sends a `BOOKMARK` at the latest revision to the watches that allow bookmarks.
    pub fn bookmark(&mut self) {
        let _ = self.changes.send(Message::Bookmark(self.revision));
    }

    /// Watches open now.
    pub fn open_watches(&self) -> usize {
        self.changes.receiver_count()
    }

    /// Creates Namespace `name` with `labels` (and `kubernetes.io/metadata.name`, as Kubernetes sets it).
    pub fn add_namespace(&mut self, name: &str, labels: &[(&str, &str)]) {
        self.write(Kind::Namespace, name, Some(namespace(name, labels)));
    }

    /// Replaces the labels of Namespace `name` (`kubernetes.io/metadata.name` stays).
    pub fn set_namespace_labels(&mut self, name: &str, labels: &[(&str, &str)]) {
        let Some(current) = self.current(Kind::Namespace, name) else { return };
        let mut fields = current.to_value();
        fields["metadata"]["labels"] = namespace_labels(name, labels);
        self.write(Kind::Namespace, name, Some(fields));
    }

    pub fn delete_namespace(&mut self, name: &str) {
        self.write(Kind::Namespace, name, None);
    }

    /// Creates ServiceAccount `namespace/name`, mapped to `gsa` when given, as `kubectl apply` leaves it.
    pub fn add_service_account(&mut self, namespace: &str, name: &str, gsa: Option<&str>) {
        self.write(Kind::ServiceAccount, &format!("{namespace}/{name}"), Some(service_account(namespace, name, gsa)));
    }

    /// Sets (or with `None` removes) the Workload Identity annotation of a ServiceAccount.
    pub fn annotate_service_account(&mut self, namespace: &str, name: &str, gsa: Option<&str>) {
        let key = format!("{namespace}/{name}");
        let Some(current) = self.current(Kind::ServiceAccount, &key) else { return };
        let mut fields = current.to_value();
        let annotations = fields["metadata"]
            .as_object_mut()
            .map(|m| m.entry("annotations").or_insert_with(|| json!({})))
            .and_then(Value::as_object_mut);
        if let Some(annotations) = annotations {
            match gsa {
                Some(gsa) => annotations.insert(GSA_ANNOTATION.to_owned(), json!(gsa)),
                None => annotations.remove(GSA_ANNOTATION),
            };
        }
        self.write(Kind::ServiceAccount, &key, Some(fields));
    }

    pub fn delete_service_account(&mut self, namespace: &str, name: &str) {
        self.write(Kind::ServiceAccount, &format!("{namespace}/{name}"), None);
    }

    /// Creates Node `name` whose kubelet reports `kubelet` (such as `v1.33.2-gke.1000000`).
    pub fn add_node(&mut self, name: &str, kubelet: &str) {
        self.write(Kind::Node, name, Some(node(name, kubelet)));
    }

    /// Sets the kubelet version Node `name` reports (a node pool upgrade).
    pub fn set_kubelet(&mut self, name: &str, kubelet: &str) {
        let Some(current) = self.current(Kind::Node, name) else { return };
        let mut fields = current.to_value();
        fields["status"]["nodeInfo"]["kubeletVersion"] = json!(kubelet);
        fields["status"]["nodeInfo"]["kubeProxyVersion"] = json!(kubelet);
        self.write(Kind::Node, name, Some(fields));
    }

    pub fn delete_node(&mut self, name: &str) {
        self.write(Kind::Node, name, None);
    }

    /// `namespaces` Namespaces `ns-00000…` (labelled `team` and `env`), `service_accounts`
    /// ServiceAccounts `sa-000000…` spread over them (over `default` when there are none), every
    /// other one mapped to one of 1,000 GSAs (many KSAs share a GSA), and `nodes` Nodes.
    pub fn populate(&mut self, namespaces: usize, service_accounts: usize, nodes: usize) {
        let names: Vec<String> = (0..namespaces).map(|i| format!("ns-{i:05}")).collect();
        for (i, name) in names.iter().enumerate() {
            let team = format!("team-{}", i % 50);
            self.add_namespace(name, &[("team", &team), ("env", if i % 2 == 0 { "prod" } else { "staging" })]);
        }
        if names.is_empty() && service_accounts > 0 && self.current(Kind::Namespace, "default").is_none() {
            self.add_namespace("default", &[]);
        }
        for i in 0..service_accounts {
            let namespace = names.get(i % names.len().max(1)).map_or("default", String::as_str);
            let gsa = (i % 2 == 0).then(|| format!("app-{}@client-project.iam.gserviceaccount.com", i % 1000));
            self.add_service_account(namespace, &format!("sa-{i:06}"), gsa.as_deref());
        }
        for i in 0..nodes {
            self.add_node(&format!("gke-cluster-pool-{}-{i:04}", i % 3), "v1.33.2-gke.1000000");
        }
    }

    /// Events the webhook recorded (`events.k8s.io/v1`), as posted.
    pub fn events(&self) -> &[Value] {
        &self.events
    }

    fn total(&mut self, kind: Kind, prefix: &str, revision: u64) -> usize {
        let objects = &self.stores[kind.index()].objects;
        *self.totals.entry((kind, prefix.to_owned(), revision)).or_insert_with(|| {
            objects
                .range::<str, _>((Bound::Included(prefix), Bound::Unbounded))
                .take_while(|(key, _)| key.starts_with(prefix))
                .filter(|(_, versions)| at(versions, revision).is_some())
                .count()
        })
    }
}

const GSA_ANNOTATION: &str = "iam.gke.io/gcp-service-account";

fn uid(revision: u64) -> String {
    format!("{:08x}-5e1f-4a8b-9c2d-{revision:012x}", revision.wrapping_mul(2_654_435_761) as u32)
}

fn namespace_labels(name: &str, labels: &[(&str, &str)]) -> Value {
    let mut map = Map::new();
    map.insert("kubernetes.io/metadata.name".to_owned(), json!(name));
    for (key, value) in labels {
        map.insert((*key).to_owned(), json!(value));
    }
    Value::Object(map)
}

fn object(value: Value) -> Map<String, Value> {
    match value {
        Value::Object(map) => map,
        _ => Map::new(),
    }
}

/// A Namespace as `kubectl create namespace` leaves it.
fn namespace(name: &str, labels: &[(&str, &str)]) -> Map<String, Value> {
    object(json!({
        "metadata": {
            "name": name,
            "labels": namespace_labels(name, labels),
            "managedFields": [{
                "manager": "kubectl-create", "operation": "Update", "apiVersion": "v1",
                "time": "2025-01-06T09:00:00Z", "fieldsType": "FieldsV1",
                "fieldsV1": {"f:metadata": {"f:labels": {".": {}, "f:kubernetes.io/metadata.name": {}}}},
            }],
        },
        "spec": {"finalizers": ["kubernetes"]},
        "status": {"phase": "Active"},
    }))
}

/// A ServiceAccount as `kubectl apply` leaves it: its last applied configuration and managed
/// fields ride along, as they do in a real cluster's metadata.
fn service_account(namespace: &str, name: &str, gsa: Option<&str>) -> Map<String, Value> {
    let mut annotations = Map::new();
    if let Some(gsa) = gsa {
        annotations.insert(GSA_ANNOTATION.to_owned(), json!(gsa));
    }
    let applied = json!({
        "apiVersion": "v1", "kind": "ServiceAccount",
        "metadata": {"annotations": annotations.clone(), "name": name, "namespace": namespace},
    });
    annotations.insert("kubectl.kubernetes.io/last-applied-configuration".to_owned(), json!(format!("{applied}\n")));
    let mut managed = json!({".": {}, "f:kubectl.kubernetes.io/last-applied-configuration": {}});
    if gsa.is_some() {
        managed[format!("f:{GSA_ANNOTATION}")] = json!({});
    }
    object(json!({
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"app.kubernetes.io/managed-by": "kubectl"},
            "annotations": annotations,
            "managedFields": [{
                "manager": "kubectl-client-side-apply", "operation": "Update", "apiVersion": "v1",
                "time": "2025-01-06T09:00:00Z", "fieldsType": "FieldsV1",
                "fieldsV1": {"f:metadata": {"f:annotations": managed, "f:labels": {".": {}, "f:app.kubernetes.io/managed-by": {}}}},
            }],
        },
    }))
}

/// A GKE node: its status lists conditions, addresses and cached images, kilobytes no decision reads.
fn node(name: &str, kubelet: &str) -> Map<String, Value> {
    let images: Vec<Value> = (0..20)
        .map(|i| json!({"names": [format!("gke.gcr.io/component-{i}@sha256:{:064x}", i), format!("gke.gcr.io/component-{i}:v1.{i}.0")], "sizeBytes": 10_000_000 + i}))
        .collect();
    let conditions: Vec<Value> = ["MemoryPressure", "DiskPressure", "PIDPressure", "Ready"]
        .iter()
        .map(|t| json!({"type": t, "status": if *t == "Ready" {"True"} else {"False"}, "lastHeartbeatTime": "2025-01-06T09:00:00Z", "lastTransitionTime": "2025-01-06T09:00:00Z", "reason": "KubeletReady", "message": "kubelet is posting ready status"}))
        .collect();
    object(json!({
        "metadata": {
            "name": name,
            "labels": {
                "kubernetes.io/hostname": name, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64",
                "cloud.google.com/gke-nodepool": "pool", "iam.gke.io/gke-metadata-server-enabled": "true",
            },
            "annotations": {"node.alpha.kubernetes.io/ttl": "0", "volumes.kubernetes.io/controller-managed-attach-detach": "true"},
        },
        "spec": {"podCIDR": "10.4.0.0/24", "providerID": format!("gce://project/europe-west1-b/{name}")},
        "status": {
            "capacity": {"cpu": "4", "memory": "16393244Ki", "pods": "110"},
            "allocatable": {"cpu": "3920m", "memory": "13252636Ki", "pods": "110"},
            "conditions": conditions,
            "addresses": [{"type": "InternalIP", "address": "10.132.0.2"}, {"type": "Hostname", "address": name}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
            "nodeInfo": {
                "machineID": "m", "systemUUID": "u", "bootID": "b", "kernelVersion": "6.1.100+",
                "osImage": "Container-Optimized OS from Google", "containerRuntimeVersion": "containerd://1.7.24",
                "kubeletVersion": kubelet, "kubeProxyVersion": kubelet, "operatingSystem": "linux", "architecture": "amd64",
            },
            "images": images,
        },
    }))
}

/// A request the server answered.
#[derive(Clone, Debug)]
pub struct Logged {
    pub method: String,
    pub path: String,
    pub query: Vec<(String, String)>,
    pub accept: Option<String>,
    pub status: u16,
}

impl Logged {
    pub fn param(&self, name: &str) -> Option<&str> {
        self.query.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    pub fn is_watch(&self) -> bool {
        self.param("watch").is_some_and(|w| parse_bool(w) == Some(true))
    }
}

type Hook = Box<dyn FnOnce(&mut Cluster) + Send>;

struct Shared {
    cluster: Mutex<Cluster>,
    requests: Mutex<Vec<Logged>>,
    before_next_continue: Mutex<Option<Hook>>,
}

/// The fake API server, serving on a loopback port until dropped with the runtime.
pub struct ApiServer {
    shared: Arc<Shared>,
    url: String,
    ca_pem: Option<String>,
}

impl ApiServer {
    /// Serves plain HTTP (kube's client accepts an `http://` server in a kubeconfig).
    pub async fn start() -> Self {
        let shared = Self::shared();
        let addr = serve::http(router(shared.clone())).await;
        Self { shared, url: format!("http://{addr}"), ca_pem: None }
    }

    /// Serves HTTPS with a certificate for 127.0.0.1 from `ca`.
    pub async fn start_tls(ca: &TestCa) -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let shared = Self::shared();
        let addr = serve::https(router(shared.clone()), ca.server_config(&["127.0.0.1", "localhost"])).await;
        Self { shared, url: format!("https://{addr}"), ca_pem: Some(ca.pem()) }
    }

    fn shared() -> Arc<Shared> {
        Arc::new(Shared {
            cluster: Mutex::new(Cluster::new()),
            requests: Mutex::default(),
            before_next_continue: Mutex::default(),
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// A kubeconfig for this server (its CA, its token).
    pub fn kubeconfig(&self) -> String {
        let authority = self
            .ca_pem
            .as_ref()
            .map(|pem| {
                format!("\n    certificate-authority-data: {}", base64::engine::general_purpose::STANDARD.encode(pem))
            })
            .unwrap_or_default();
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}{authority}\nusers:\n- name: fake\n  user:\n    token: {TOKEN}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: default\ncurrent-context: fake\n",
            self.url
        )
    }

    /// The cluster, locked: changes made under one lock reach the watches together, and a
    /// request waits for the lock (so close, change and compact together is one outage).
    pub fn cluster(&self) -> MutexGuard<'_, Cluster> {
        self.shared.cluster.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Every request answered so far, oldest first.
    pub fn requests(&self) -> Vec<Logged> {
        self.shared.requests.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
    }

    /// Runs `hook` on the cluster just before the next request that carries a `continue` token
    /// is answered (to change or compact the cluster between two pages of a list).
    pub fn before_next_continue(&self, hook: impl FnOnce(&mut Cluster) + Send + 'static) {
        *self.shared.before_next_continue.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) =
            Some(Box::new(hook));
    }
}

fn router(shared: Arc<Shared>) -> Router {
    Router::new().fallback(handle).with_state(shared)
}

/// What the client accepts, from its `Accept` header ("Metadata-only fetches").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    Full,
    Partial,
    PartialList,
}

fn negotiate(accept: Option<&str>) -> Result<Format, String> {
    let Some(accept) = accept.filter(|a| !a.trim().is_empty()) else { return Ok(Format::Full) };
    let mut ranges: Vec<(f32, Option<Format>)> = Vec::new();
    for range in accept.split(',') {
        let mut parts = range.split(';').map(str::trim);
        let media = parts.next().unwrap_or_default().to_ascii_lowercase();
        let params: HashMap<String, String> = parts
            .filter_map(|p| p.split_once('='))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().trim_matches('"').to_owned()))
            .collect();
        let q = params.get("q").and_then(|q| q.parse().ok()).unwrap_or(1.0);
        let json = matches!(media.as_str(), "application/json" | "application/*" | "*/*");
        let meta = params.get("g").map(String::as_str) == Some("meta.k8s.io")
            && matches!(params.get("v").map(String::as_str), Some("v1" | "v1beta1"));
        let format = match (json, params.get("as").map(String::as_str)) {
            (false, _) => None,
            (true, None) => Some(Format::Full),
            (true, Some("PartialObjectMetadata")) if meta => Some(Format::Partial),
            (true, Some("PartialObjectMetadataList")) if meta => Some(Format::PartialList),
            (true, Some(_)) => None,
        };
        ranges.push((q, format));
    }
    ranges.sort_by(|a, b| b.0.total_cmp(&a.0));
    ranges.into_iter().filter(|(q, _)| *q > 0.0).find_map(|(_, f)| f).ok_or_else(|| {
        format!("only the following media types are accepted: application/json (with as=PartialObjectMetadata[List];g=meta.k8s.io;v=v1); the fake serves no other: {accept}")
    })
}

/// A failure answered as a `Status` object.
#[derive(Debug)]
struct Failure {
    code: u16,
    reason: &'static str,
    message: String,
    details: Option<Box<Value>>,
    /// `metadata.continue` of the Status (the inconsistent continuation of an expired list).
    continue_token: Option<Box<str>>,
}

impl Failure {
    fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Self { code, reason, message: message.into(), details: None, continue_token: None }
    }

    fn not_found(kind: Kind, name: &str) -> Self {
        let mut failure = Self::new(404, "NotFound", format!("{} \"{name}\" not found", kind.plural()));
        failure.details = Some(Box::new(json!({"name": name, "kind": kind.plural()})));
        failure
    }

    fn status(&self) -> Value {
        let mut status = json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": self.message, "reason": self.reason, "code": self.code,
        });
        if let Some(details) = &self.details {
            status["details"] = (**details).clone();
        }
        if let Some(token) = &self.continue_token {
            status["metadata"]["continue"] = json!(&**token);
        }
        status
    }

    fn response(&self) -> Response {
        json_response(
            StatusCode::from_u16(self.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            self.status().to_string(),
        )
    }
}

fn json_response(status: StatusCode, body: String) -> Response {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body))
        .unwrap_or_else(|_| Response::new(Body::empty()))
}

struct Query(Vec<(String, String)>);

impl Query {
    fn get(&self, name: &str) -> Option<&str> {
        self.0.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    /// A parameter set to a non-empty value (`resourceVersion=` is as good as unset).
    fn value(&self, name: &str) -> Option<&str> {
        self.get(name).filter(|v| !v.is_empty())
    }

    fn flag(&self, name: &str) -> Result<bool, Failure> {
        match self.value(name) {
            None => Ok(false),
            Some(v) => {
                parse_bool(v).ok_or_else(|| Failure::new(400, "BadRequest", format!("{name}: invalid boolean {v:?}")))
            }
        }
    }
}

/// Go's `strconv.ParseBool`, which the API server's parameter decoding uses.
fn parse_bool(value: &str) -> Option<bool> {
    match value {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

async fn handle(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let query =
        Query(url::form_urlencoded::parse(request.uri().query().unwrap_or_default().as_bytes()).into_owned().collect());
    let headers = request.headers().clone();
    let accept = headers.get(header::ACCEPT).and_then(|a| a.to_str().ok()).map(str::to_owned);
    let body = match axum::body::to_bytes(request.into_body(), BODY_LIMIT).await {
        Ok(body) => body,
        Err(_) => Bytes::new(),
    };
    let response =
        if headers.get(header::AUTHORIZATION).and_then(|a| a.to_str().ok()) != Some(&format!("Bearer {TOKEN}")) {
            Failure::new(401, "Unauthorized", "Unauthorized").response()
        } else {
            route(&shared, &method, &path, &query, &headers, accept.as_deref(), &body).unwrap_or_else(|f| f.response())
        };
    shared.requests.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).push(Logged {
        method: method.to_string(),
        path,
        query: query.0,
        accept,
        status: response.status().as_u16(),
    });
    response
}

fn route(
    shared: &Arc<Shared>,
    method: &Method,
    path: &str,
    query: &Query,
    headers: &HeaderMap,
    accept: Option<&str>,
    body: &[u8],
) -> Result<Response, Failure> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let get = method == Method::GET;
    let patch = method == Method::PATCH;
    let negotiated = || negotiate(accept).map_err(|m| Failure::new(406, "NotAcceptable", m));
    match segments.as_slice() {
        ["version"] if get => Ok(json_response(StatusCode::OK, version().to_string())),
        ["api"] if get => Ok(json_response(
            StatusCode::OK,
            json!({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "10.0.0.1:443"}]}).to_string(),
        )),
        ["apis"] if get => Ok(json_response(StatusCode::OK, api_groups().to_string())),
        ["api", "v1", "namespaces"] if get => collection(shared, Kind::Namespace, None, query, negotiated()?),
        ["api", "v1", "namespaces", name] if get => read(shared, Kind::Namespace, name, name, query, negotiated()?),
        ["api", "v1", "serviceaccounts"] if get => collection(shared, Kind::ServiceAccount, None, query, negotiated()?),
        ["api", "v1", "namespaces", namespace, "serviceaccounts"] if get => {
            collection(shared, Kind::ServiceAccount, Some(namespace), query, negotiated()?)
        }
        ["api", "v1", "namespaces", namespace, "serviceaccounts", name] if get => {
            read(shared, Kind::ServiceAccount, &format!("{namespace}/{name}"), name, query, negotiated()?)
        }
        ["api", "v1", "namespaces", namespace, "serviceaccounts", name] if patch => {
            patch_service_account(shared, namespace, name, query, headers, body, negotiated()?)
        }
        ["api", "v1", "nodes"] if get => collection(shared, Kind::Node, None, query, negotiated()?),
        ["api", "v1", "nodes", name] if get => read(shared, Kind::Node, name, name, query, negotiated()?),
        ["apis", "events.k8s.io", "v1", "namespaces", namespace, "events"] if method == Method::POST => {
            record_event(shared, namespace, None, body)
        }
        ["apis", "events.k8s.io", "v1", "namespaces", namespace, "events", name] if patch => {
            record_event(shared, namespace, Some(name), body)
        }
        ["api", "v1", "namespaces" | "serviceaccounts" | "nodes", ..] => {
            Err(Failure::new(405, "MethodNotAllowed", format!("the server does not allow this method on the requested resource ({method} {path})")))
        }
        _ => Err(Failure::new(404, "NotFound", "the server could not find the requested resource")),
    }
}

fn version() -> Value {
    json!({
        "major": "1", "minor": "33", "gitVersion": "v1.33.2-gke.1000000", "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean", "buildDate": "2025-01-06T09:00:00Z", "goVersion": "go1.24.4", "compiler": "gc",
        "platform": "linux/amd64",
    })
}

/// The groups the webhook's probes look at (no `auto.gke.io`: a GKE Standard cluster).
fn api_groups() -> Value {
    let group = |name: &str, version: &str| {
        let group_version = format!("{name}/{version}");
        json!({"name": name, "versions": [{"groupVersion": group_version, "version": version}],
               "preferredVersion": {"groupVersion": group_version, "version": version}})
    };
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": [
        group("apps", "v1"), group("batch", "v1"), group("events.k8s.io", "v1"),
        group("admissionregistration.k8s.io", "v1"),
    ]})
}

fn lock(shared: &Shared) -> MutexGuard<'_, Cluster> {
    shared.cluster.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A list or a watch of a collection.
fn collection(
    shared: &Arc<Shared>,
    kind: Kind,
    namespace: Option<&str>,
    query: &Query,
    format: Format,
) -> Result<Response, Failure> {
    for selector in ["labelSelector", "fieldSelector"] {
        if query.value(selector).is_some() {
            return Err(Failure::new(
                400,
                "BadRequest",
                format!("{selector}: the fake API server does not model selectors"),
            ));
        }
    }
    let prefix = namespace.map(|ns| format!("{ns}/")).unwrap_or_default();
    if query.flag("watch")? {
        return watch(shared, kind, prefix, query, format);
    }
    if format == Format::Partial {
        return Err(Failure::new(
            406,
            "NotAcceptable",
            format!(
                "you requested PartialObjectMetadata, but the requested object is a list (*v1.{}List)",
                kind.name()
            ),
        ));
    }
    if query.value("continue").is_some() {
        let hook = shared.before_next_continue.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).take();
        if let Some(hook) = hook {
            hook(&mut lock(shared));
        }
    }
    let body = list(&mut lock(shared), kind, &prefix, query, format)?;
    Ok(json_response(StatusCode::OK, body))
}

/// The state of a continued list, inside the opaque token (kube-apiserver's carries `v`, `rv`
/// and `start`; `n`, the items already returned, is the fake's own).
#[derive(serde::Serialize, serde::Deserialize)]
struct ContinueToken {
    v: String,
    rv: i64,
    start: String,
    n: usize,
}

fn encode_token(token: &ContinueToken) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(serde_json::to_vec(token).unwrap_or_default())
}

fn decode_token(text: &str) -> Result<ContinueToken, Failure> {
    let invalid = |e: String| Failure::new(400, "BadRequest", format!("continue key is not valid: {e}"));
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(text).map_err(|e| invalid(e.to_string()))?;
    let token: ContinueToken = serde_json::from_slice(&bytes).map_err(|e| invalid(e.to_string()))?;
    if token.v != "meta.k8s.io/v1" {
        return Err(invalid(format!("got version {:?}", token.v)));
    }
    Ok(token)
}

/// Parses a resourceVersion given as a parameter (a decimal revision).
fn revision_param(value: &str) -> Result<u64, Failure> {
    value.parse().map_err(|_| Failure::new(400, "BadRequest", format!("invalid resource version: {value:?}")))
}

fn too_large(requested: u64, current: u64) -> Failure {
    // "Unavailable resource versions": the apiserver waits briefly, then answers 504 with this
    // message; the fake answers at once.
    let mut failure =
        Failure::new(504, "Timeout", format!("Too large resource version: {requested}, current: {current}"));
    let details = json!({"causes": [{"reason": "ResourceVersionTooLarge", "message": "Too large resource version"}], "retryAfterSeconds": 1});
    failure.details = Some(Box::new(details));
    failure
}

/// A list (or a page of one) as the semantics table of "Semantics for get and list" says.
fn list(cluster: &mut Cluster, kind: Kind, prefix: &str, query: &Query, format: Format) -> Result<String, Failure> {
    let limit = match query.value("limit") {
        None => None,
        Some(limit) => match limit.parse::<i64>() {
            Ok(0) => None,
            Ok(n) if n > 0 => Some(n as usize),
            _ => {
                return Err(Failure::new(
                    400,
                    "BadRequest",
                    format!("limit: must be a non-negative integer, got {limit:?}"),
                ))
            }
        },
    };
    let resource_version = query.value("resourceVersion");
    let version_match = query.value("resourceVersionMatch");
    let continued = query.value("continue");
    // apimachinery's ValidateListOptions: these combinations are 422 Invalid.
    if let Some(version_match) = version_match {
        let forbidden = if resource_version.is_none() {
            Some("resourceVersionMatch is forbidden unless resourceVersion is provided".to_owned())
        } else if continued.is_some() {
            Some("resourceVersionMatch is forbidden when continue is provided".to_owned())
        } else if !matches!(version_match, "Exact" | "NotOlderThan") {
            Some(format!("resourceVersionMatch: Unsupported value: {version_match:?}"))
        } else if version_match == "Exact" && resource_version == Some("0") {
            Some("resourceVersionMatch \"exact\" is forbidden for resourceVersion \"0\"".to_owned())
        } else {
            None
        };
        if let Some(message) = forbidden {
            return Err(Failure::new(422, "Invalid", format!("ListOptions.meta.k8s.io \"\" is invalid: {message}")));
        }
    }
    let (snapshot, start, returned, consistent) = if let Some(text) = continued {
        // Continuation: with a continue token, a resourceVersion other than "0" is 400.
        if resource_version.is_some_and(|rv| rv != "0") {
            return Err(Failure::new(
                400,
                "BadRequest",
                "specifying resource version is not allowed when using continue",
            ));
        }
        let token = decode_token(text)?;
        if token.rv > 0 && (token.rv as u64) < cluster.compacted {
            let mut failure = Failure::new(
                410,
                "Expired",
                "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter, or use the continue token in this response to retrieve the remainder of the results. Continuing with the provided token results in an inconsistent list - objects that were created, modified, or deleted between the time the first chunk was returned and now may show up in the list.",
            );
            failure.continue_token = Some(encode_token(&ContinueToken { rv: -1, ..token }).into());
            return Err(failure);
        }
        let consistent = token.rv > 0;
        let snapshot = if consistent { token.rv as u64 } else { cluster.revision };
        (snapshot, token.start, token.n, consistent)
    } else {
        let current = cluster.revision;
        let not_older_than = |rv: &str| {
            let requested = revision_param(rv)?;
            if requested > current {
                return Err(too_large(requested, current));
            }
            Ok(current)
        };
        let exact = |rv: &str| {
            let requested = revision_param(rv)?;
            if requested > current {
                return Err(too_large(requested, current));
            }
            if requested < cluster.compacted {
                return Err(Failure::new(410, "Expired", "The resourceVersion for the provided list is too old."));
            }
            Ok(requested)
        };
        let snapshot = match (version_match, resource_version) {
            // Most Recent (a match without a resourceVersion was refused above).
            (_, None) => current,
            // Any: the latest revision is as good as any.
            (_, Some("0")) => current,
            (Some("NotOlderThan"), Some(rv)) => not_older_than(rv)?,
            (None, Some(rv)) if limit.is_none() => not_older_than(rv)?,
            // Exact: resourceVersionMatch=Exact, or a resourceVersion with a limit and no match.
            (_, Some(rv)) => exact(rv)?,
        };
        (snapshot, prefix.to_owned(), 0, true)
    };
    let start = if start.as_str() < prefix { prefix.to_owned() } else { start };
    let total = consistent.then(|| cluster.total(kind, prefix, snapshot));
    let objects = &cluster.stores[kind.index()].objects;
    let mut items = String::new();
    let mut count = 0;
    let mut last_key = None;
    let mut more = false;
    for (key, versions) in objects.range::<str, _>((Bound::Included(start.as_str()), Bound::Unbounded)) {
        if !key.starts_with(prefix) {
            break;
        }
        let Some(object) = at(versions, snapshot) else { continue };
        if limit.is_some_and(|limit| count == limit) {
            more = true;
            break;
        }
        if count > 0 {
            items.push(',');
        }
        object.render(kind, format, false, &mut items);
        count += 1;
        last_key = Some(key);
    }
    let mut metadata = json!({"resourceVersion": snapshot.to_string()});
    if more {
        let n = returned + count;
        let token = ContinueToken {
            v: "meta.k8s.io/v1".to_owned(),
            rv: if consistent { snapshot as i64 } else { -1 },
            start: format!("{}\u{0}", last_key.map(String::as_str).unwrap_or_default()),
            n,
        };
        metadata["continue"] = json!(encode_token(&token));
        if let Some(total) = total {
            metadata["remainingItemCount"] = json!(total.saturating_sub(n));
        }
    }
    let (list_kind, api_version) = match format {
        Format::Full => (format!("{}List", kind.name()), "v1"),
        Format::Partial | Format::PartialList => ("PartialObjectMetadataList".to_owned(), "meta.k8s.io/v1"),
    };
    Ok(format!(r#"{{"kind":"{list_kind}","apiVersion":"{api_version}","metadata":{metadata},"items":[{items}]}}"#))
}

/// A get of one object ("Semantics for get": unset is Most Recent, "0" Any, other Not older than).
fn read(
    shared: &Shared,
    kind: Kind,
    key: &str,
    name: &str,
    query: &Query,
    format: Format,
) -> Result<Response, Failure> {
    if format == Format::PartialList {
        return Err(Failure::new(
            406,
            "NotAcceptable",
            format!(
                "you requested PartialObjectMetadataList, but the requested object is not a list (*v1.{})",
                kind.name()
            ),
        ));
    }
    let cluster = lock(shared);
    if let Some(rv) = query.value("resourceVersion").filter(|rv| *rv != "0") {
        let requested = revision_param(rv)?;
        if requested > cluster.revision {
            return Err(too_large(requested, cluster.revision));
        }
    }
    let object = cluster.current(kind, key).ok_or_else(|| Failure::not_found(kind, name))?;
    let mut body = String::new();
    object.render(kind, format, true, &mut body);
    Ok(json_response(StatusCode::OK, body))
}

/// RFC 7386 JSON Merge Patch.
fn merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(target), Value::Object(patch)) => {
            for (key, value) in patch {
                if value.is_null() {
                    target.remove(key);
                } else {
                    merge(target.entry(key.clone()).or_insert(Value::Null), value);
                }
            }
        }
        (target, patch) => {
            let mut patch = patch.clone();
            if let Value::Object(map) = &mut patch {
                map.retain(|_, v| !v.is_null());
            }
            *target = patch;
        }
    }
}

fn patch_service_account(
    shared: &Shared,
    namespace: &str,
    name: &str,
    query: &Query,
    headers: &HeaderMap,
    body: &[u8],
    format: Format,
) -> Result<Response, Failure> {
    if format == Format::PartialList {
        return Err(Failure::new(
            406,
            "NotAcceptable",
            "you requested PartialObjectMetadataList, but the requested object is not a list (*v1.ServiceAccount)",
        ));
    }
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|c| c.to_str().ok()).unwrap_or_default();
    if content_type.split(';').next().map(str::trim) != Some("application/merge-patch+json") {
        return Err(Failure::new(
            415,
            "UnsupportedMediaType",
            format!("the fake API server applies merge patches only, not {content_type:?}"),
        ));
    }
    let patch: Value = serde_json::from_slice(body)
        .map_err(|e| Failure::new(400, "BadRequest", format!("error decoding patch: {e}")))?;
    if !patch.is_object() {
        return Err(Failure::new(400, "BadRequest", "a merge patch must be a JSON object"));
    }
    let key = format!("{namespace}/{name}");
    let mut cluster = lock(shared);
    let current = cluster
        .current(Kind::ServiceAccount, &key)
        .cloned()
        .ok_or_else(|| Failure::not_found(Kind::ServiceAccount, name))?;
    // A resourceVersion in the patch is a precondition ("Updates to existing resources").
    if let Some(wanted) = patch["metadata"]["resourceVersion"].as_str() {
        if wanted != current.resource_version() {
            let mut failure = Failure::new(
                409,
                "Conflict",
                format!("Operation cannot be fulfilled on serviceaccounts \"{name}\": the object has been modified; please apply your changes to the latest version and try again"),
            );
            failure.details = Some(Box::new(json!({"name": name, "kind": "serviceaccounts"})));
            return Err(failure);
        }
    }
    let before = Value::Object(current.to_value());
    let mut after = before.clone();
    merge(&mut after, &patch);
    for field in ["name", "namespace", "uid", "resourceVersion", "creationTimestamp"] {
        after["metadata"][field] = before["metadata"][field].clone();
    }
    let dry_run = query.get("dryRun") == Some("All");
    let object = if after == before || dry_run {
        Arc::new(Object::from_value(object(after)))
    } else {
        cluster.write(Kind::ServiceAccount, &key, Some(object(after))).unwrap_or(current)
    };
    let mut body = String::new();
    object.render(Kind::ServiceAccount, format, true, &mut body);
    Ok(json_response(StatusCode::OK, body))
}

/// Accepts an Event (POST) or a change to one (PATCH), as the webhook's recorder sends them.
fn record_event(shared: &Shared, namespace: &str, name: Option<&str>, body: &[u8]) -> Result<Response, Failure> {
    let mut event: Value = serde_json::from_slice(body)
        .map_err(|e| Failure::new(400, "BadRequest", format!("error decoding event: {e}")))?;
    let mut cluster = lock(shared);
    cluster.revision += 1;
    let revision = cluster.revision;
    let status = match name {
        None => {
            if event["metadata"]["name"].as_str().is_none() {
                let prefix = event["metadata"]["generateName"].as_str().unwrap_or("event-").to_owned();
                event["metadata"]["name"] = json!(format!("{prefix}{revision:05x}"));
            }
            event["metadata"]["namespace"] = json!(namespace);
            event["metadata"]["resourceVersion"] = json!(revision.to_string());
            cluster.events.push(event.clone());
            StatusCode::CREATED
        }
        Some(name) => {
            let stored = cluster
                .events
                .iter_mut()
                .find(|e| e["metadata"]["name"] == name && e["metadata"]["namespace"] == namespace)
                .ok_or_else(|| Failure::new(404, "NotFound", format!("events.events.k8s.io \"{name}\" not found")))?;
            merge(stored, &event);
            stored["metadata"]["resourceVersion"] = json!(revision.to_string());
            event = stored.clone();
            StatusCode::OK
        }
    };
    Ok(json_response(status, event.to_string()))
}

/// What one watch has yet to send, and where it listens.
struct Watch {
    pending: VecDeque<String>,
    changes: broadcast::Receiver<Message>,
    kind: Kind,
    prefix: String,
    format: Format,
    from: u64,
    bookmarks: bool,
    deadline: tokio::time::Instant,
    done: bool,
}

fn event_line(action: &str, kind: Kind, object: &Object, format: Format) -> String {
    let mut line = format!(r#"{{"type":"{action}","object":"#);
    object.render(kind, format, true, &mut line);
    line.push_str("}\n");
    line
}

fn watch(shared: &Arc<Shared>, kind: Kind, prefix: String, query: &Query, format: Format) -> Result<Response, Failure> {
    if format == Format::PartialList {
        return Err(Failure::new(
            406,
            "NotAcceptable",
            format!("you requested PartialObjectMetadataList, but a watch sends single objects (*v1.{})", kind.name()),
        ));
    }
    if query.flag("sendInitialEvents")? {
        return Err(Failure::new(
            400,
            "BadRequest",
            "sendInitialEvents: the fake API server does not model streaming lists",
        ));
    }
    if query.value("resourceVersionMatch").is_some() {
        return Err(Failure::new(422, "Invalid", "ListOptions.meta.k8s.io \"\" is invalid: resourceVersionMatch: Forbidden: resourceVersionMatch is forbidden for watch"));
    }
    let bookmarks = query.flag("allowWatchBookmarks")?;
    let seconds = match query.value("timeoutSeconds") {
        None => DEFAULT_WATCH_SECONDS,
        Some(s) => {
            s.parse().map_err(|_| Failure::new(400, "BadRequest", format!("timeoutSeconds: invalid value {s:?}")))?
        }
    };
    let cluster = lock(shared);
    let mut pending = VecDeque::new();
    let from = match query.value("resourceVersion") {
        // "Get State and Start at Most Recent" (unset) or "at Any" ("0"): synthetic ADDED events.
        None | Some("0") => {
            let current = cluster.revision;
            for (key, versions) in &cluster.stores[kind.index()].objects {
                if let (true, Some(object)) = (key.starts_with(&prefix), at(versions, current)) {
                    pending.push_back(event_line("ADDED", kind, object, format));
                }
            }
            current
        }
        // "Start at Exact": every change after it, or 410 when its history is gone.
        Some(rv) => {
            let from = revision_param(rv)?;
            if from < cluster.compacted {
                let status =
                    Failure::new(410, "Expired", format!("too old resource version: {from} ({})", cluster.compacted))
                        .status();
                let line = format!(r#"{{"type":"ERROR","object":{status}}}"#) + "\n";
                return Ok(json_response(StatusCode::OK, line));
            }
            for change in &cluster.stores[kind.index()].log {
                if change.revision > from && change.key.starts_with(&prefix) {
                    pending.push_back(event_line(action_name(change.action), kind, &change.object, format));
                }
            }
            from
        }
    };
    // Subscribed under the lock that writes take: no change falls between replay and stream.
    let changes = cluster.changes.subscribe();
    drop(cluster);
    let state = Watch {
        pending,
        changes,
        kind,
        prefix,
        format,
        from,
        bookmarks,
        deadline: tokio::time::Instant::now() + Duration::from_secs(seconds),
        done: false,
    };
    let stream = futures_util::stream::unfold(state, next_line);
    Ok(Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| Response::new(Body::empty())))
}

fn action_name(action: Action) -> &'static str {
    match action {
        Action::Added => "ADDED",
        Action::Modified => "MODIFIED",
        Action::Deleted => "DELETED",
    }
}

async fn next_line(mut watch: Watch) -> Option<(Result<Bytes, Infallible>, Watch)> {
    loop {
        if let Some(line) = watch.pending.pop_front() {
            return Some((Ok(Bytes::from(line)), watch));
        }
        if watch.done {
            return None;
        }
        let message = tokio::select! {
            message = watch.changes.recv() => message,
            () = tokio::time::sleep_until(watch.deadline) => return None,
        };
        match message {
            Ok(Message::Change(change))
                if change.kind == watch.kind
                    && change.revision > watch.from
                    && change.key.starts_with(&watch.prefix) =>
            {
                watch.pending.push_back(event_line(
                    action_name(change.action),
                    change.kind,
                    &change.object,
                    watch.format,
                ));
            }
            Ok(Message::Bookmark(revision)) if watch.bookmarks => {
                let metadata = json!({"resourceVersion": revision.max(watch.from).to_string()});
                let object = match watch.format {
                    Format::Full => json!({"kind": watch.kind.name(), "apiVersion": "v1", "metadata": metadata}),
                    Format::Partial | Format::PartialList => {
                        json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": metadata})
                    }
                };
                watch.pending.push_back(format!(r#"{{"type":"BOOKMARK","object":{object}}}"#) + "\n");
            }
            Ok(Message::Close) => watch.done = true,
            // Fallen behind (the watch cache closes a blocked watcher), or the server is gone.
            Err(_) => watch.done = true,
            Ok(_) => {}
        }
    }
}
