//! Why the webhook refuses a pod. Each message names the annotation or field, the bad value and the fix.

use wiproxy_common::{
    UpstreamError, ADMIN_PORT_ANNOTATION, GKE_METADATA_NODE_LABEL, GKE_SERVICE_ACCOUNT_ANNOTATION, INJECT_LABEL,
    NATIVE_SIDECAR_ANNOTATION, PORT_ANNOTATION, SERVICE_ACCOUNT_ANNOTATION, SIDECAR_CONTAINER,
    SKIP_CONTAINERS_ANNOTATION, TOKEN_HEADER_ANNOTATION, UPSTREAMS_ANNOTATION,
};

fn list(names: &[String]) -> String {
    names.join(", ")
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denial {
    #[error("the pod has no spec: nothing to inject into")]
    NoSpec,
    #[error("spec.hostNetwork is true: the proxy would listen on the node's loopback, shared with every host-network pod; remove hostNetwork or the label {INJECT_LABEL}")]
    HostNetwork,
    #[error("annotation {UPSTREAMS_ANNOTATION} is missing: add it with at least one entry NAME=https://HOST/PATH, or remove the label {INJECT_LABEL}")]
    NoUpstreams,
    #[error("annotation {UPSTREAMS_ANNOTATION}: {0}")]
    Upstreams(#[from] UpstreamError),
    #[error("annotation {annotation} is {len} bytes long, more than the {max} allowed: shorten it")]
    TooLong { annotation: &'static str, len: usize, max: usize },
    #[error("annotation {annotation}: {value:?} is not a port number from 1024 to 65535 (the sidecar runs as non-root): write e.g. \"15080\"")]
    BadPort { annotation: &'static str, value: String },
    #[error("annotation {annotation}: port {port} is already used by {taken_by} in this pod: set {annotation} to a free port")]
    PortClash { annotation: &'static str, port: u16, taken_by: String },
    #[error("annotations {PORT_ANNOTATION} and {ADMIN_PORT_ANNOTATION} are both {port}: the proxy and the admin server need a port each")]
    SamePorts { port: u16 },
    #[error("{field} places the pod on Windows nodes, but the wiproxy sidecar is a Linux container: run the workload on Linux nodes, or remove the label {INJECT_LABEL}")]
    Windows { field: &'static str },
    #[error("{field} keeps the pod off the nodes labelled {GKE_METADATA_NODE_LABEL}=true{}, the only nodes where the GKE metadata server hands out Workload Identity tokens: remove that constraint, or the label {INJECT_LABEL}", if .value.is_empty() { String::new() } else { format!(" (it asks for {:?})", .value) })]
    MetadataServerExcluded { field: &'static str, value: String },
    #[error("annotation {UPSTREAMS_ANNOTATION}: upstream {upstream:?} has listen={port}, which is {taken_by}: give it another listen=PORT")]
    ListenPortClash { upstream: String, port: u16, taken_by: String },
    #[error("the injection would add {variables} environment variables ({containers} containers × {per_container} each), more than the {max} allowed: list the containers that call no upstream in {SKIP_CONTAINERS_ANNOTATION}, use fewer upstreams, or split the workload")]
    TooMuchInjection { containers: usize, per_container: usize, variables: usize, max: usize },
    #[error("annotation {TOKEN_HEADER_ANNOTATION}: {value:?} is not supported: use authorization or x-serverless-authorization")]
    BadTokenHeader { value: String },
    #[error("annotation {NATIVE_SIDECAR_ANNOTATION}: {value:?} is not a boolean: write \"true\" or \"false\"")]
    BadNativeSidecar { value: String },
    #[error("annotation {SERVICE_ACCOUNT_ANNOTATION}: {value:?} is not a Google service account email: write NAME@PROJECT.iam.gserviceaccount.com")]
    BadServiceAccount { value: String },
    #[error("ServiceAccount {namespace}/{ksa} has annotation {GKE_SERVICE_ACCOUNT_ANNOTATION}: {value:?}, which is not a Google service account email: fix the ServiceAccount")]
    BadKsaServiceAccount { namespace: String, ksa: String, value: String },
    #[error("no Google service account for ServiceAccount {namespace}/{ksa}: set annotation {SERVICE_ACCOUNT_ANNOTATION}, annotate the ServiceAccount with {GKE_SERVICE_ACCOUNT_ANNOTATION}, or give a TokenProxyPolicy a defaultServiceAccount")]
    NoServiceAccount { namespace: String, ksa: String },
    #[error("ServiceAccount {namespace}/{ksa} is mapped to {mapped} ({GKE_SERVICE_ACCOUNT_ANNOTATION}) but annotation {SERVICE_ACCOUNT_ANNOTATION} asks for {wanted}: use the same GSA, or a ServiceAccount of its own for this workload")]
    KsaConflict { namespace: String, ksa: String, mapped: String, wanted: String },
    #[error("the pod runs as ServiceAccount \"default\" in namespace {namespace}, and {}: set spec.serviceAccountName to a ServiceAccount of this workload, or set allowDefaultKsa: true in that policy", match .policy {
        Some(policy) => format!("TokenProxyPolicy {policy}, which allows the pod's GSA and upstreams, does not set allowDefaultKsa"),
        None => "no TokenProxyPolicy selects the namespace".to_owned(),
    })]
    DefaultKsa { namespace: String, policy: Option<String> },
    #[error("no TokenProxyPolicy selects namespace {namespace}: ask the platform team for a policy whose namespaceSelector matches it")]
    NoPolicy { namespace: String },
    #[error("Google service account {gsa} is not allowed in namespace {namespace} by TokenProxyPolicy {}: use a GSA that a policy lists in spec.serviceAccounts ({SERVICE_ACCOUNT_ANNOTATION}), or ask the platform team to allow it", list(.policies))]
    ServiceAccountNotAllowed { gsa: String, namespace: String, policies: Vec<String> },
    #[error("annotation {UPSTREAMS_ANNOTATION}: upstream {upstream:?} URL {url} is not allowed for {gsa} in namespace {namespace} by TokenProxyPolicy {}: use a URL under one of the policy's spec.upstreams, or ask the platform team to allow it", list(.policies))]
    UpstreamNotAllowed { upstream: String, url: String, gsa: String, namespace: String, policies: Vec<String> },
    #[error("annotation {UPSTREAMS_ANNOTATION}: upstream {upstream:?} asks for tokens with audience {audience:?}, which TokenProxyPolicy {} does not allow for {gsa} in namespace {namespace}: drop ';audience=' to use the URL's default, or ask the platform team to add it to spec.audiences", list(.policies))]
    AudienceNotAllowed { upstream: String, audience: String, gsa: String, namespace: String, policies: Vec<String> },
    #[error("no single TokenProxyPolicy among {} allows {gsa} and every upstream of annotation {UPSTREAMS_ANNOTATION}: split the upstreams across workloads, or ask the platform team for one policy that covers them all", list(.policies))]
    NoSinglePolicy { gsa: String, policies: Vec<String> },
    #[error("a container named {SIDECAR_CONTAINER:?} exists but the pod carries no wiproxy.io/status: rename that container")]
    ContainerNameTaken,
    #[error("spec.volumes already has a volume named {volume:?}, which the sidecar needs for Workload Identity Federation: rename that volume")]
    VolumeNameTaken { volume: &'static str },
    /// The review's object holds more than the webhook reads (docs/webhook.md, "Review limits").
    #[error("{0}")]
    TooLarge(#[from] crate::review_limits::TooLarge),
    #[error("{} of an injected pod cannot change: the wiproxy sidecar was set up from the pod's wiproxy.io/ annotations when it was created; change them in the workload's pod template so that new pods are created with them, or delete this pod and create it again", match .annotations.as_slice() {
        [one] => format!("annotation {one}"),
        many => format!("annotations {}", list(many)),
    })]
    InjectedAnnotationsChanged { annotations: Vec<String> },
    /// The review's object (or the workload's pod template) cannot be read as a Pod.
    #[error("{0}")]
    Malformed(String),
    #[error("cannot add {GKE_SERVICE_ACCOUNT_ANNOTATION}: {gsa} to ServiceAccount {namespace}/{ksa}: {error}: create the ServiceAccount first, or annotate it yourself")]
    ServiceAccountPatch { namespace: String, ksa: String, gsa: String, error: String },
    #[error("cannot encode patch: {0}")]
    PatchEncoding(String),
}

impl Denial {
    /// A short, fixed label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NoSpec => "no_spec",
            Self::HostNetwork => "host_network",
            Self::NoUpstreams => "no_upstreams",
            Self::Upstreams(_) => "bad_upstreams",
            Self::TooLong { .. } => "annotation_too_long",
            Self::TooMuchInjection { .. } => "too_much_injection",
            Self::BadPort { .. } => "bad_port",
            Self::PortClash { .. } | Self::SamePorts { .. } | Self::ListenPortClash { .. } => "port_clash",
            Self::Windows { .. } | Self::MetadataServerExcluded { .. } => "node_placement",
            Self::BadTokenHeader { .. } => "bad_token_header",
            Self::BadNativeSidecar { .. } => "bad_native_sidecar",
            Self::BadServiceAccount { .. } | Self::BadKsaServiceAccount { .. } => "bad_service_account",
            Self::NoServiceAccount { .. } => "no_service_account",
            Self::KsaConflict { .. } => "ksa_conflict",
            Self::DefaultKsa { .. } => "default_ksa",
            Self::NoPolicy { .. } => "no_policy",
            Self::ServiceAccountNotAllowed { .. } => "service_account_not_allowed",
            Self::UpstreamNotAllowed { .. } | Self::NoSinglePolicy { .. } => "upstream_not_allowed",
            Self::AudienceNotAllowed { .. } => "audience_not_allowed",
            Self::ContainerNameTaken => "container_name_taken",
            Self::VolumeNameTaken { .. } => "volume_name_taken",
            Self::Malformed(_) => "malformed_pod",
            Self::TooLarge(_) => "too_large",
            Self::InjectedAnnotationsChanged { .. } => "annotations_changed",
            Self::ServiceAccountPatch { .. } => "service_account_patch",
            Self::PatchEncoding(_) => "internal",
        }
    }
}
