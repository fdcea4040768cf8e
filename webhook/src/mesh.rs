//! Service meshes in the pod: which one is there (or about to be injected), where its proxy sits,
//! and what the sidecar needs from it to start. No I/O.
//!
//! What each mesh's injector leaves in a pod, from its public sources:
//! - Istio / Cloud Service Mesh (`istio/istio` `pkg/kube/inject`, its `testdata/inject/*.injected`):
//!   classic mode adds the `istio-init` init container (iptables; moved after every other init
//!   container, "so we do not blackhole init containers") and the `istio-proxy` container (last,
//!   or first with `holdApplicationUntilProxyStarts`); native mode puts `istio-proxy` with
//!   `restartPolicy: Always` right after `istio-init` (or `istio-validation` with Istio CNI),
//!   before the other init containers. With Istio CNI the redirection exists before any
//!   container starts, and the CNI plugin reads the pod's `traffic.sidecar.istio.io/*`
//!   annotations then.
//! - Linkerd (`linkerd2` `charts/partials/templates/_proxy.tpl`, `charts/patch`): classic mode
//!   appends `linkerd-init` to the init containers and puts `linkerd-proxy` first among the
//!   containers; native mode puts `linkerd-init` then `linkerd-proxy` (`restartPolicy: Always`)
//!   first among the init containers.
//!
//! Traffic the sidecar needs before a classic (regular-container) proxy runs, which the mesh's
//! redirection would send to a proxy that is not listening yet: its connections to the GKE
//! metadata server, and the kubelet's probes of its admin port. Both meshes document pod
//! annotations that exclude them (Istio: "Compatibility with application init containers",
//! https://istio.io/latest/docs/setup/additional-setup/cni/#compatibility-with-application-init-containers;
//! Linkerd: proxy configuration reference, `config.linkerd.io/skip-subnets` and
//! `config.linkerd.io/skip-inbound-ports`, https://linkerd.io/2/reference/proxy-configuration/).

use std::collections::BTreeMap;

use json_patch::PatchOperation;
use k8s_openapi::api::core::v1::{Container, Pod};
use serde_json::Value;
use wiproxy_common::mesh_ports;

use crate::inject::add;

/// The GKE metadata server's address, as pods see it.
pub const METADATA_SERVER_RANGE: &str = "169.254.169.254/32";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MeshKind {
    /// Istio, and Cloud Service Mesh (which is Istio).
    Istio,
    Linkerd,
}

impl MeshKind {
    pub fn name(self) -> &'static str {
        match self {
            Self::Istio => "Istio",
            Self::Linkerd => "Linkerd",
        }
    }

    /// Ports the mesh's proxy binds in the pod, declared or not.
    pub fn ports(self) -> &'static [u16] {
        match self {
            Self::Istio => mesh_ports::ISTIO,
            Self::Linkerd => mesh_ports::LINKERD,
        }
    }

    fn proxy(self) -> &'static str {
        match self {
            Self::Istio => "istio-proxy",
            Self::Linkerd => "linkerd-proxy",
        }
    }

    /// The pod annotations that exclude the metadata server from outbound redirection and the
    /// admin port from inbound redirection.
    fn exclusions(self) -> [&'static str; 2] {
        match self {
            Self::Istio => {
                ["traffic.sidecar.istio.io/excludeOutboundIPRanges", "traffic.sidecar.istio.io/excludeInboundPorts"]
            }
            Self::Linkerd => ["config.linkerd.io/skip-subnets", "config.linkerd.io/skip-inbound-ports"],
        }
    }
}

/// A mesh found in the pod, or whose injector the pod's labels call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mesh {
    pub kind: MeshKind,
    /// Index among the init containers of its proxy running as a native sidecar.
    pub native_proxy: Option<usize>,
    /// Index 0 when its proxy is the first regular container.
    pub leading_proxy: Option<usize>,
    /// Whether its proxy is in the pod already (else its injector is still to run).
    pub injected: bool,
}

/// The meshes of `pod`, in the namespace labelled `namespace_labels`.
pub fn detect(pod: &Pod, namespace_labels: &BTreeMap<String, String>) -> Vec<Mesh> {
    let labels = pod.metadata.labels.clone().unwrap_or_default();
    let annotations = pod.metadata.annotations.clone().unwrap_or_default();
    let label = |key: &str| labels.get(key).map(String::as_str);
    let namespace_label = |key: &str| namespace_labels.get(key).map(String::as_str);

    // Istio's injection selectors ("Installing the sidecar", automatic injection): the pod label
    // `sidecar.istio.io/inject` wins; else the namespace's `istio-injection=enabled` or a
    // revision label `istio.io/rev`.
    let istio_called = match label("sidecar.istio.io/inject") {
        Some("true") => true,
        Some("false") => false,
        _ => {
            namespace_label("istio-injection") == Some("enabled")
                || (namespace_label("istio-injection").is_none() && namespace_label("istio.io/rev").is_some())
                || label("istio.io/rev").is_some()
        }
    };
    // Linkerd is called by the `linkerd.io/inject` annotation, on the pod or its namespace (the
    // namespace's annotations are not read here: a pod the namespace alone enrols is seen once
    // Linkerd has injected it).
    let linkerd_called =
        matches!(annotations.get("linkerd.io/inject").map(String::as_str), Some("enabled" | "ingress"));

    let mut meshes = Vec::new();
    for (kind, called) in [(MeshKind::Istio, istio_called), (MeshKind::Linkerd, linkerd_called)] {
        let Some(spec) = pod.spec.as_ref() else { continue };
        let inits = spec.init_containers.as_deref().unwrap_or_default();
        let native_proxy = inits.iter().position(|c| c.name == kind.proxy() && is_native(c));
        let leading_proxy = spec.containers.first().filter(|c| c.name == kind.proxy()).map(|_| 0);
        let injected = native_proxy.is_some()
            || inits.iter().chain(&spec.containers).any(|c| c.name == kind.proxy())
            || (kind == MeshKind::Istio && annotations.contains_key("sidecar.istio.io/status"));
        if injected || called {
            meshes.push(Mesh { kind, native_proxy, leading_proxy, injected });
        }
    }
    meshes
}

/// Containers a mesh's injector adds: they never call upstreams through the sidecar.
pub fn is_mesh_container(name: &str) -> bool {
    matches!(name, "istio-init" | "istio-validation" | "istio-proxy" | "linkerd-init" | "linkerd-proxy")
}

fn is_native(container: &Container) -> bool {
    container.restart_policy.as_deref() == Some("Always")
}

/// Where the mesh's own proxy does not run before the sidecar (a classic proxy, or one not
/// injected yet), the pod annotations that let the sidecar reach the metadata server and the
/// kubelet reach its admin port. Values already there are kept and extended. (Istio's classic
/// `istio-init` fixes its rules at injection and runs after every other init container: there
/// the annotations change nothing, and a native sidecar starts before the rules exist.)
pub fn add_exclusions(pod: &Pod, meshes: &[Mesh], admin_port: u16, patch: &mut Vec<PatchOperation>) {
    if meshes.iter().all(|m| m.native_proxy.is_some()) {
        return;
    }
    let existing = pod.metadata.annotations.clone().unwrap_or_default();
    let mut annotations = existing.clone();
    for mesh in meshes.iter().filter(|m| m.native_proxy.is_none()) {
        let [outbound, inbound] = mesh.kind.exclusions();
        extend_list(&mut annotations, outbound, METADATA_SERVER_RANGE);
        extend_list(&mut annotations, inbound, &admin_port.to_string());
    }
    for (key, value) in annotations {
        if existing.get(&key) != Some(&value) {
            // The pod has annotations: the injection reads its upstreams from one.
            patch.push(add(["metadata", "annotations", &key], Value::String(value)));
        }
    }
}

/// Adds `item` to the comma-separated list under `key`, unless it is there.
fn extend_list(annotations: &mut BTreeMap<String, String>, key: &str, item: &str) {
    let current = annotations.get(key).map(String::as_str).unwrap_or_default();
    if current.split(',').any(|existing| existing.trim() == item) {
        return;
    }
    let value = if current.trim().is_empty() { item.to_owned() } else { format!("{current},{item}") };
    annotations.insert(key.to_owned(), value);
}
