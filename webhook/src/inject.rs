//! The injection core: decides, with no I/O, what the webhook does to one pod (or pod template)
//! and expresses it as a JSON patch, warnings and what the pod's ServiceAccount needs.

use std::collections::BTreeMap;

use json_patch::{AddOperation, Patch, PatchOperation};
use jsonptr::PointerBuf;
use k8s_openapi::api::core::v1::{Container, NodeSelectorTerm, Pod, PodSpec};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use wiproxy_common::{
    env, is_service_account_email, parse_upstreams, TokenHeader, Upstream, ADMIN_PORT, ADMIN_PORT_ANNOTATION,
    CREDENTIAL_CONFIGURATION_ANNOTATION, DEFAULT_PORT, GKE_METADATA_NODE_LABEL, INJECT_LABEL,
    NATIVE_SIDECAR_ANNOTATION, PORT_ANNOTATION, SERVICE_ACCOUNT_ANNOTATION, SIDECAR_CONTAINER,
    SKIP_CONTAINERS_ANNOTATION, STATUS_ANNOTATION, TOKEN_HEADER_ANNOTATION, UPSTREAMS_ANNOTATION,
};

use crate::cluster::{ClusterState, KsaLookup};
use crate::denial::Denial;
use crate::mesh::{self, Mesh};
use crate::policy::{PolicySet, Refusal};

/// Longest `wiproxy.io/upstreams` accepted; Kubernetes caps all annotations of an object at 256 KiB.
pub const MAX_UPSTREAMS_LEN: usize = 32 * 1024;

/// How the sidecar container is built.
#[derive(Debug, Clone)]
pub struct SidecarSettings {
    pub image: String,
    /// Whether the sidecar is native (an init container with `restartPolicy: Always`) unless the
    /// pod says otherwise.
    pub native: NativeSidecars,
    /// Container `resources`, as Kubernetes JSON.
    pub resources: Value,
    /// Workload Identity Federation instead of GKE's Workload Identity (clusters outside GKE).
    pub federation: Option<Federation>,
    /// GKE Autopilot: no metadata-server node selector, which Autopilot rejects.
    pub autopilot: bool,
}

/// Where native sidecars are used when the pod does not say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NativeSidecars {
    Always,
    Never,
    /// Native when every node's kubelet is 1.29 or newer (the API server is, already): a native
    /// sidecar on an older kubelet never lets the pod out of Init.
    WhereKubeletsAllow,
}

/// The oldest kubelet that runs native sidecars (on by default from Kubernetes 1.29).
pub const NATIVE_SIDECAR_KUBELET: (u32, u32) = (1, 29);

/// Workload Identity Federation for clusters outside GKE: the sidecar exchanges a projected
/// ServiceAccount token of this cluster at Google's STS, then mints the GSA's ID tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Federation {
    /// The provider's resource name,
    /// `projects/NUMBER/locations/global/workloadIdentityPools/POOL/providers/PROVIDER`.
    pub provider: String,
    /// The universe whose STS and IAM Credentials receive the subject token (`--universe-domain`).
    pub universe_domain: String,
}

/// Google Cloud's public universe, the default of `--universe-domain`.
pub const DEFAULT_UNIVERSE_DOMAIN: &str = "googleapis.com";

/// Where the sidecar finds the projected token and its credential configuration.
pub const FEDERATION_VOLUME: &str = "wiproxy-federation";
pub const FEDERATION_MOUNT: &str = "/var/run/wiproxy/federation";
/// Lifetime asked of the projected token: the shortest Kubernetes grants (the kubelet renews it
/// at 80 % of that; the sidecar reads it again at every exchange).
pub const FEDERATION_TOKEN_SECONDS: u32 = 600;

impl Federation {
    /// Checks `provider` has the shape of a workload identity pool provider's resource name.
    pub fn new(provider: &str) -> Result<Self, String> {
        let provider = provider.trim().trim_start_matches("//iam.googleapis.com/");
        let parts: Vec<&str> = provider.split('/').collect();
        let shaped = matches!(
            parts.as_slice(),
            ["projects", number, "locations", "global", "workloadIdentityPools", pool, "providers", name]
                if number.bytes().all(|b| b.is_ascii_digit()) && !number.is_empty() && !pool.is_empty() && !name.is_empty()
        );
        if !shaped {
            return Err(format!(
                "--workload-identity-provider {provider:?} is not projects/NUMBER/locations/global/workloadIdentityPools/POOL/providers/PROVIDER: copy the provider's name from `gcloud iam workload-identity-pools providers describe`"
            ));
        }
        Ok(Self { provider: provider.to_owned(), universe_domain: DEFAULT_UNIVERSE_DOMAIN.to_owned() })
    }

    /// The same federation in another universe (`--universe-domain`): a DNS name such as
    /// `googleapis.com`.
    pub fn in_universe(mut self, universe_domain: &str) -> Result<Self, String> {
        let domain = universe_domain.trim().trim_end_matches('.').to_ascii_lowercase();
        let labels_ok = domain.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        });
        if !(labels_ok && domain.contains('.') && domain.len() <= 253) {
            return Err(format!(
                "--universe-domain {universe_domain:?} is not a DNS name: give the universe's API domain, {DEFAULT_UNIVERSE_DOMAIN} for Google Cloud"
            ));
        }
        self.universe_domain = domain;
        Ok(self)
    }

    /// The STS audience, as `create-cred-config` writes it.
    pub fn audience(&self) -> String {
        format!("//iam.googleapis.com/{}", self.provider)
    }

    /// The audience of the projected ServiceAccount token: the provider's default allowed
    /// audience for an OIDC issuer.
    pub fn token_audience(&self) -> String {
        format!("https://iam.googleapis.com/{}", self.provider)
    }

    /// The `external_account` configuration for `gsa`, as `gcloud iam workload-identity-pools
    /// create-cred-config PROVIDER --service-account=GSA --credential-source-file=…
    /// --credential-source-type=text` writes it.
    pub fn credential_configuration(&self, gsa: &str) -> String {
        let universe = &self.universe_domain;
        json!({
            "universe_domain": universe,
            "type": "external_account",
            "audience": self.audience(),
            "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
            "token_url": format!("https://sts.{universe}/v1/token"),
            "credential_source": {"file": format!("{FEDERATION_MOUNT}/token"), "format": {"type": "text"}},
            "service_account_impersonation_url": format!("https://iamcredentials.{universe}/v1/projects/-/serviceAccounts/{gsa}:generateAccessToken"),
        })
        .to_string()
    }

    /// The SHA-256 (hex) of the configuration for `gsa`: the downward API writes the annotation's
    /// value to the file byte for byte, and the sidecar refuses a file with another digest, so
    /// an edit of the annotation after admission cannot steer the subject token.
    pub fn configuration_digest(&self, gsa: &str) -> String {
        Sha256::digest(self.credential_configuration(gsa).as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl SidecarSettings {
    pub fn default_image() -> String {
        format!("ghcr.io/wiproxy/wiproxy:{}", env!("CARGO_PKG_VERSION"))
    }

    pub fn default_resources() -> Value {
        json!({"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"memory": "64Mi"}})
    }

    /// On GKE Autopilot ("Resource requests in Autopilot",
    /// https://cloud.google.com/kubernetes-engine/docs/concepts/autopilot-resource-requests):
    /// requests below the minimum are raised silently, limits are set equal to requests where
    /// the cluster does not burst, and a container that names no ephemeral storage gets 1 GiB.
    /// So: requests equal to limits, at the general-purpose minimums of bursting clusters (50m
    /// CPU, 52 MiB memory; memory 1 to 6.5 times the CPU in GiB per vCPU), with the sidecar's
    /// usual 64 MiB memory and 10 MiB of ephemeral storage (it writes nothing).
    pub fn autopilot_resources() -> Value {
        let amounts = json!({"cpu": "50m", "memory": "64Mi", "ephemeral-storage": "10Mi"});
        json!({"requests": amounts, "limits": amounts})
    }
}

impl Default for SidecarSettings {
    fn default() -> Self {
        Self {
            image: Self::default_image(),
            native: NativeSidecars::Always,
            resources: Self::default_resources(),
            federation: None,
            autopilot: false,
        }
    }
}

/// Everything besides the pod that the decision depends on.
pub struct Inputs<'a> {
    /// Namespace the pod is created in.
    pub namespace: &'a str,
    pub sidecar: &'a SidecarSettings,
    pub policies: &'a PolicySet,
    pub cluster: &'a dyn ClusterState,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The pod does not carry `wiproxy.io/inject: "true"`.
    NotRequested,
    /// The pod already has the sidecar; it is left as it is.
    AlreadyInjected,
    Injected(Injection),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Injection {
    /// Operations on the pod (or a pod template: same `metadata` and `spec` paths).
    pub patch: Patch,
    /// Likely mistakes that are not errors, for admission `warnings`.
    pub warnings: Vec<String>,
    pub service_account: ServiceAccountChange,
    pub gsa: String,
    /// The policy that allowed the pod, if any selects its namespace.
    pub policy: Option<String>,
}

/// What the pod's Kubernetes ServiceAccount needs for Workload Identity to hand out `gsa`'s tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServiceAccountChange {
    /// Already mapped to the GSA, or the policy leaves ServiceAccounts to the platform team.
    None,
    /// Add `iam.gke.io/gcp-service-account: gsa` to ServiceAccount `name` of the pod's namespace.
    Annotate { name: String, gsa: String },
}

/// The pod-level settings read from the annotations.
struct Settings {
    upstreams: Vec<Upstream>,
    upstreams_entries: String,
    port: u16,
    admin_port: u16,
    token_header: TokenHeader,
    native: bool,
    skip: Vec<String>,
}

pub fn inject(pod: &Pod, inputs: &Inputs) -> Result<Outcome, Denial> {
    let requested = pod.metadata.labels.as_ref().and_then(|labels| labels.get(INJECT_LABEL));
    if requested.map(String::as_str) != Some("true") {
        return Ok(Outcome::NotRequested);
    }
    let no_annotations = BTreeMap::new();
    let annotations = pod.metadata.annotations.as_ref().unwrap_or(&no_annotations);
    let spec = pod.spec.as_ref().ok_or(Denial::NoSpec)?;
    let has_sidecar = all_containers(spec).any(|c| c.name == SIDECAR_CONTAINER);
    // A status without the sidecar it describes (forged, or copied from another pod) never skips
    // the checks below.
    if has_sidecar && annotations.contains_key(STATUS_ANNOTATION) {
        return Ok(Outcome::AlreadyInjected);
    }
    if has_sidecar {
        return Err(Denial::ContainerNameTaken);
    }
    if spec.host_network == Some(true) {
        return Err(Denial::HostNetwork);
    }
    if inputs.sidecar.federation.is_some() && spec.volumes.iter().flatten().any(|v| v.name == FEDERATION_VOLUME) {
        return Err(Denial::VolumeNameTaken { volume: FEDERATION_VOLUME });
    }

    check_placement(spec, inputs.sidecar.federation.is_none())?;
    let native_default = match inputs.sidecar.native {
        NativeSidecars::Always => true,
        NativeSidecars::Never => false,
        NativeSidecars::WhereKubeletsAllow => {
            inputs.cluster.oldest_kubelet().is_none_or(|oldest| oldest.version >= NATIVE_SIDECAR_KUBELET)
        }
    };
    let settings = read_settings(annotations, native_default)?;
    check_work(spec, &settings)?;

    let namespace = inputs.namespace;
    let namespace_labels = inputs.cluster.namespace_labels(namespace);
    let meshes = mesh::detect(pod, &namespace_labels);
    check_ports(spec, &settings, &meshes)?;
    crate::listen_ports::check(spec, settings.port, settings.admin_port, &meshes, &settings.upstreams)?;
    let selecting = inputs.policies.selecting(&namespace_labels);
    let ksa = service_account_name(spec);

    let pod_gsa = match annotations.get(SERVICE_ACCOUNT_ANNOTATION).map(|v| v.trim()) {
        Some(value) if !is_service_account_email(value) => {
            return Err(Denial::BadServiceAccount { value: value.to_owned() });
        }
        value => value.map(str::to_owned),
    };
    let ksa_lookup = inputs.cluster.service_account(namespace, &ksa);
    let ksa_gsa = match &ksa_lookup {
        KsaLookup::Mapped(gsa) => Some(gsa.trim().to_owned()),
        _ => None,
    };
    let gsa = pod_gsa
        .clone()
        .or_else(|| ksa_gsa.clone())
        .or_else(|| selecting.iter().find_map(|p| p.default_service_account.clone()))
        .ok_or_else(|| Denial::NoServiceAccount { namespace: namespace.to_owned(), ksa: ksa.clone() })?;
    if let Some(mapped) = &ksa_gsa {
        if !mapped.eq_ignore_ascii_case(&gsa) {
            return Err(Denial::KsaConflict {
                namespace: namespace.to_owned(),
                ksa,
                mapped: mapped.clone(),
                wanted: gsa,
            });
        }
        if !is_service_account_email(mapped) {
            return Err(Denial::BadKsaServiceAccount { namespace: namespace.to_owned(), ksa, value: mapped.clone() });
        }
    }
    let allowance = inputs.policies.allow(&selecting, &gsa, &settings.upstreams).map_err(|refusal| match refusal {
        Refusal::NoPolicy => Denial::NoPolicy { namespace: namespace.to_owned() },
        Refusal::ServiceAccount { policies } => {
            Denial::ServiceAccountNotAllowed { gsa: gsa.clone(), namespace: namespace.to_owned(), policies }
        }
        Refusal::Upstream { upstream, url, policies } => {
            Denial::UpstreamNotAllowed { upstream, url, gsa: gsa.clone(), namespace: namespace.to_owned(), policies }
        }
        Refusal::Audience { upstream, audience, policies } => Denial::AudienceNotAllowed {
            upstream,
            audience,
            gsa: gsa.clone(),
            namespace: namespace.to_owned(),
            policies,
        },
        Refusal::NoSinglePolicy { policies } => Denial::NoSinglePolicy { gsa: gsa.clone(), policies },
    })?;
    // The KSA named `default` is shared by every pod of the namespace that names none: only the
    // policy that allows this pod can let it act as a GSA.
    if ksa == "default" && !allowance.allow_default_ksa {
        return Err(Denial::DefaultKsa { namespace: namespace.to_owned(), policy: allowance.policy });
    }

    let mut warnings = upstream_warnings(&settings.upstreams, settings.token_header);
    let pod_chose = annotations.contains_key(NATIVE_SIDECAR_ANNOTATION);
    warnings.extend(kubelet_warning(&settings, inputs.sidecar.native, pod_chose, inputs.cluster));
    let service_account = match ksa_lookup {
        // Off GKE the ServiceAccount's annotation means nothing to anyone: federation maps the
        // KSA's token to the GSA through IAM bindings.
        _ if inputs.sidecar.federation.is_some() => ServiceAccountChange::None,
        KsaLookup::Mapped(_) => ServiceAccountChange::None,
        _ if allowance.manage_service_accounts => ServiceAccountChange::Annotate { name: ksa, gsa: gsa.clone() },
        _ => {
            warnings.push(format!(
                "ServiceAccount {namespace}/{ksa} has no {} annotation and policy {} does not manage ServiceAccounts: the sidecar stays unready until it maps to {gsa}",
                wiproxy_common::GKE_SERVICE_ACCOUNT_ANNOTATION,
                allowance.policy.as_deref().unwrap_or("-"),
            ));
            ServiceAccountChange::None
        }
    };

    let mut patch = Vec::new();
    add_app_env(spec, &settings, &mut patch, &mut warnings);
    add_sidecar(spec, &settings, &gsa, inputs.sidecar, &meshes, &mut patch, &mut warnings);
    mesh::add_exclusions(pod, &meshes, settings.admin_port, &mut patch);
    match &inputs.sidecar.federation {
        // Off GKE there is no metadata server node label to select.
        Some(federation) => add_federation(spec, federation, &gsa, &mut patch),
        // Every Autopilot node runs the metadata server, and Autopilot rejects the selector.
        None if inputs.sidecar.autopilot => {}
        None => add_node_selector(spec, &mut patch),
    }
    patch.push(add(
        ["metadata", "annotations", STATUS_ANNOTATION],
        Value::String(status(&settings, &gsa, inputs.sidecar)),
    ));

    Ok(Outcome::Injected(Injection { patch: Patch(patch), warnings, service_account, gsa, policy: allowance.policy }))
}

/// The pod's Kubernetes ServiceAccount: `serviceAccountName`, the deprecated `serviceAccount`, or `default`.
pub fn service_account_name(spec: &PodSpec) -> String {
    let ksa = spec.service_account_name.clone().or_else(|| spec.service_account.clone());
    ksa.filter(|k| !k.is_empty()).unwrap_or_else(|| "default".to_owned())
}

fn all_containers(spec: &PodSpec) -> impl Iterator<Item = &Container> {
    spec.init_containers.iter().flatten().chain(spec.containers.iter())
}

fn read_settings(annotations: &BTreeMap<String, String>, native_default: bool) -> Result<Settings, Denial> {
    let raw = annotations.get(UPSTREAMS_ANNOTATION).ok_or(Denial::NoUpstreams)?;
    if raw.len() > MAX_UPSTREAMS_LEN {
        return Err(Denial::TooLong { annotation: UPSTREAMS_ANNOTATION, len: raw.len(), max: MAX_UPSTREAMS_LEN });
    }
    let upstreams = parse_upstreams(raw)?;
    let upstreams_entries = upstreams.iter().map(Upstream::to_entry).collect::<Vec<_>>().join(",");

    let port_from = |annotation: &'static str, default: u16| match annotations.get(annotation).map(|v| v.trim()) {
        None => Ok(default),
        Some(value) => match value.parse::<u16>() {
            Ok(port) if port >= 1024 => Ok(port),
            _ => Err(Denial::BadPort { annotation, value: value.to_owned() }),
        },
    };
    let port = port_from(PORT_ANNOTATION, DEFAULT_PORT)?;
    let admin_port = port_from(ADMIN_PORT_ANNOTATION, ADMIN_PORT)?;
    if port == admin_port {
        return Err(Denial::SamePorts { port });
    }
    let token_header = match annotations.get(TOKEN_HEADER_ANNOTATION) {
        None => TokenHeader::default(),
        Some(value) => TokenHeader::parse(value).ok_or_else(|| Denial::BadTokenHeader { value: value.clone() })?,
    };
    let native = match annotations.get(NATIVE_SIDECAR_ANNOTATION).map(|v| v.trim()) {
        None => native_default,
        Some("true") => true,
        Some("false") => false,
        Some(value) => return Err(Denial::BadNativeSidecar { value: value.to_owned() }),
    };
    let skip = annotations
        .get(SKIP_CONTAINERS_ANNOTATION)
        .map(|v| v.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned).collect())
        .unwrap_or_default();
    Ok(Settings { upstreams, upstreams_entries, port, admin_port, token_header, native, skip })
}

/// Most environment variables one injection adds across the pod's containers: with the 32
/// upstreams at most, room for 31 containers that each call all of them. It bounds the patch,
/// and so the memory and time of one review, whatever the pod holds.
pub const MAX_ADDED_VARIABLES: usize = 1024;

/// Refuses a pod whose injection would grow far beyond its own size: every app container gets a
/// variable per upstream.
fn check_work(spec: &PodSpec, settings: &Settings) -> Result<(), Denial> {
    let containers =
        all_containers(spec).filter(|c| !settings.skip.contains(&c.name) && !mesh::is_mesh_container(&c.name)).count();
    let per_container = 1 + settings.upstreams.len() + settings.upstreams.iter().filter(|u| u.listen.is_some()).count();
    let variables = containers.saturating_mul(per_container);
    if variables > MAX_ADDED_VARIABLES {
        return Err(Denial::TooMuchInjection { containers, per_container, variables, max: MAX_ADDED_VARIABLES });
    }
    Ok(())
}

/// The sidecar's ports must be free in the pod's network namespace: no container declares them,
/// and no service mesh proxy in the pod (or about to be injected) binds them.
fn check_ports(spec: &PodSpec, settings: &Settings, meshes: &[Mesh]) -> Result<(), Denial> {
    let ours = [(PORT_ANNOTATION, settings.port), (ADMIN_PORT_ANNOTATION, settings.admin_port)];
    for container in all_containers(spec) {
        for declared in container.ports.iter().flatten() {
            let declared = u16::try_from(declared.container_port).unwrap_or_default();
            if let Some((annotation, port)) = ours.iter().find(|(_, port)| *port == declared) {
                return Err(Denial::PortClash {
                    annotation,
                    port: *port,
                    taken_by: format!("container {:?}", container.name),
                });
            }
        }
    }
    for mesh in meshes {
        if let Some((annotation, port)) = ours.iter().find(|(_, port)| mesh.kind.ports().contains(port)) {
            return Err(Denial::PortClash {
                annotation,
                port: *port,
                taken_by: format!("the {} proxy", mesh.kind.name()),
            });
        }
    }
    Ok(())
}

/// Denies a pod that cannot run where the sidecar works: on Windows nodes (the sidecar is a
/// Linux container), or, on GKE, off the nodes that run the metadata server.
fn check_placement(spec: &PodSpec, gke: bool) -> Result<(), Denial> {
    const OS_LABEL: &str = "kubernetes.io/os";
    let selector = spec.node_selector.as_ref();
    let terms = spec
        .affinity
        .as_ref()
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|n| n.required_during_scheduling_ignored_during_execution.as_ref())
        .map(|required| required.node_selector_terms.as_slice())
        .unwrap_or_default();
    // Terms are ORed: the affinity excludes a label value only when every term does.
    let affinity_excludes =
        |key: &str, value: &str| !terms.is_empty() && terms.iter().all(|t| term_excludes(t, key, value));
    if spec.os.as_ref().is_some_and(|os| os.name == "windows") {
        return Err(Denial::Windows { field: "spec.os.name" });
    }
    if selector.and_then(|s| s.get(OS_LABEL)).is_some_and(|os| os == "windows") {
        return Err(Denial::Windows { field: "spec.nodeSelector" });
    }
    if affinity_excludes(OS_LABEL, "linux") {
        return Err(Denial::Windows { field: NODE_AFFINITY_FIELD });
    }
    if !gke {
        return Ok(());
    }
    if let Some(value) = selector.and_then(|s| s.get(GKE_METADATA_NODE_LABEL)).filter(|v| *v != "true") {
        return Err(Denial::MetadataServerExcluded { field: "spec.nodeSelector", value: value.clone() });
    }
    if affinity_excludes(GKE_METADATA_NODE_LABEL, "true") {
        return Err(Denial::MetadataServerExcluded { field: NODE_AFFINITY_FIELD, value: String::new() });
    }
    Ok(())
}

const NODE_AFFINITY_FIELD: &str = "spec.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution";

/// Whether no node whose label `key` is `value` matches the node selector term (its expressions
/// are ANDed; Kubernetes' operators as in `NodeSelectorRequirement`).
fn term_excludes(term: &NodeSelectorTerm, key: &str, value: &str) -> bool {
    term.match_expressions.iter().flatten().filter(|e| e.key == key).any(|e| {
        let values = e.values.as_deref().unwrap_or_default();
        match e.operator.as_str() {
            "In" => !values.iter().any(|v| v == value),
            "NotIn" => values.iter().any(|v| v == value),
            "DoesNotExist" => true,
            // Gt and Lt compare integers: a value that is not one never matches.
            "Gt" | "Lt" => value.parse::<i64>().is_err(),
            _ => false,
        }
    })
}

/// On a cluster with kubelets older than 1.29, the warning that says which sidecar the pod got
/// and why.
fn kubelet_warning(
    settings: &Settings,
    mode: NativeSidecars,
    pod_chose: bool,
    cluster: &dyn ClusterState,
) -> Option<String> {
    let oldest = cluster.oldest_kubelet().filter(|oldest| oldest.version < NATIVE_SIDECAR_KUBELET)?;
    let (node, version) = (&oldest.node, &oldest.raw);
    match (settings.native, pod_chose) {
        (false, false) if mode == NativeSidecars::WhereKubeletsAllow => Some(format!(
            "node {node} runs kubelet {version}, older than 1.29, which cannot run native sidecars: the sidecar is a regular container; upgrade the node pool for a native sidecar"
        )),
        (true, _) => Some(format!(
            "native sidecar, but node {node} runs kubelet {version}, older than 1.29: a pod scheduled there never leaves Init; upgrade the node pool, or set annotation {NATIVE_SIDECAR_ANNOTATION}: \"false\""
        )),
        _ => None,
    }
}

fn upstream_warnings(upstreams: &[Upstream], pod_header: TokenHeader) -> Vec<String> {
    let mut warnings = Vec::new();
    for upstream in upstreams {
        let name = &upstream.name;
        let host = upstream.parsed.host_str().unwrap_or_default();
        let function = host.ends_with(".cloudfunctions.net");
        // A second path segment: the URL names a route inside the function, not the function.
        let beyond_function = upstream.parsed.path().split('/').filter(|s| !s.is_empty()).nth(1).is_some();
        if function && !upstream.audience_explicit && beyond_function {
            warnings.push(format!(
                "upstream {name:?}: URL {} is longer than the function URL: the token's audience is {} (Cloud Functions accepts exactly https://{host}/FUNCTION), and the rest of the path is a route inside the function",
                upstream.url, upstream.audience
            ));
        }
        if function && upstream.header.unwrap_or(pod_header) == TokenHeader::XServerlessAuthorization {
            warnings.push(format!(
                "upstream {name:?}: x-serverless-authorization is documented for Cloud Run and gen2 functions (their run.app URL), not for cloudfunctions.net URLs: a gen1 function reads Authorization only; use header=authorization or the function's run.app URL"
            ));
        }
        let host_only = |audience: &str| {
            audience.trim_end_matches('/').strip_prefix("https://").is_some_and(|rest| !rest.contains('/'))
        };
        if host.ends_with(".cloudfunctions.net") && host_only(&upstream.audience) {
            warnings.push(format!(
                "upstream {name:?}: audience {} is the host alone; Cloud Functions (gen1) expects the full function URL https://{host}/FUNCTION",
                upstream.audience
            ));
        }
        if upstream.audience.contains(['?', '#']) {
            warnings.push(format!(
                "upstream {name:?}: audience {} has a query or fragment, which Google refuses in an ID token audience",
                upstream.audience
            ));
        }
    }
    warnings
}

fn add_app_env(spec: &PodSpec, settings: &Settings, patch: &mut Vec<PatchOperation>, warnings: &mut Vec<String>) {
    let base = format!("http://127.0.0.1:{}", settings.port);
    let mut wanted = vec![(env::URL.to_owned(), base.clone())];
    for upstream in &settings.upstreams {
        wanted.push((env::upstream_url(&upstream.name), format!("{base}/{}", upstream.name)));
    }
    wanted.extend(crate::listen_ports::app_env(&settings.upstreams));

    let lists =
        [("initContainers", spec.init_containers.as_deref().unwrap_or_default()), ("containers", &spec.containers)];
    for skipped in &settings.skip {
        if !lists.iter().any(|(_, cs)| cs.iter().any(|c| &c.name == skipped)) {
            warnings.push(format!("annotation {SKIP_CONTAINERS_ANNOTATION}: no container named {skipped:?}"));
        }
    }
    for (list, containers) in lists {
        for (index, container) in containers.iter().enumerate() {
            if settings.skip.contains(&container.name) || mesh::is_mesh_container(&container.name) {
                continue;
            }
            let existing = container.env.as_deref().unwrap_or_default();
            if let Some(sources) = container.env_from.as_deref().filter(|s| !s.is_empty()) {
                let names: Vec<String> = sources
                    .iter()
                    .filter_map(|s| {
                        let (kind, name) = match (&s.config_map_ref, &s.secret_ref) {
                            (Some(map), _) => ("ConfigMap", map.name.as_str()),
                            (_, Some(secret)) => ("Secret", secret.name.as_str()),
                            _ => return None,
                        };
                        Some(format!("{kind} {name}"))
                    })
                    .collect();
                warnings.push(format!(
                    "container {:?} takes variables from envFrom ({}): a WIPROXY_URL or WIPROXY_<NAME>_URL there is overridden by the injected value",
                    container.name,
                    names.join(", ")
                ));
            }
            let mut vars = Vec::new();
            for (name, value) in &wanted {
                if existing.iter().any(|e| &e.name == name) {
                    warnings.push(format!("container {:?} already sets {name}; it is left as it is", container.name));
                } else {
                    vars.push(json!({"name": name, "value": value}));
                }
            }
            if vars.is_empty() {
                continue;
            }
            let index = index.to_string();
            if container.env.is_none() {
                patch.push(add(["spec", list, &index, "env"], Value::Array(vars)));
            } else {
                patch.extend(vars.into_iter().map(|var| add(["spec", list, &index, "env", "-"], var)));
            }
        }
    }
}

fn add_sidecar(
    spec: &PodSpec,
    settings: &Settings,
    gsa: &str,
    sidecar: &SidecarSettings,
    meshes: &[Mesh],
    patch: &mut Vec<PatchOperation>,
    warnings: &mut Vec<String>,
) {
    let container = sidecar_container(settings, gsa, sidecar);
    if settings.native {
        // First, unless a mesh proxy runs as a native sidecar: then right after it, so the
        // sidecar's connections find the proxy running.
        let at = meshes.iter().filter_map(|m| m.native_proxy).map(|index| index + 1).max().unwrap_or(0);
        match spec.init_containers {
            None => patch.push(add(["spec", "initContainers"], Value::Array(vec![container]))),
            Some(_) => patch.push(add(["spec", "initContainers", &at.to_string()], container)),
        }
        return;
    }
    // First, unless a mesh proxy leads the containers (Istio's holdApplicationUntilProxyStarts):
    // then right after it.
    let at = meshes.iter().filter_map(|m| m.leading_proxy).map(|index| index + 1).max().unwrap_or(0);
    patch.push(add(["spec", "containers", &at.to_string()], container));
    if matches!(spec.restart_policy.as_deref(), Some("Never" | "OnFailure")) {
        warnings.push(format!(
            "the sidecar is a regular container, so a pod with restartPolicy {} never completes: set {NATIVE_SIDECAR_ANNOTATION}: \"true\" (Kubernetes 1.29+)",
            spec.restart_policy.as_deref().unwrap_or_default()
        ));
    }
    let calls_upstreams = |c: &Container| !settings.skip.contains(&c.name) && !mesh::is_mesh_container(&c.name);
    if spec.init_containers.as_ref().is_some_and(|cs| cs.iter().any(calls_upstreams)) {
        warnings.push(format!(
            "the sidecar is a regular container, so init containers run before it and cannot reach it: set {NATIVE_SIDECAR_ANNOTATION}: \"true\" or list them in {SKIP_CONTAINERS_ANNOTATION}"
        ));
    }
}

fn sidecar_container(settings: &Settings, gsa: &str, sidecar: &SidecarSettings) -> Value {
    let probe = |path: &str, period: u32, failures: u32| {
        json!({
            "httpGet": {"path": path, "port": settings.admin_port},
            "periodSeconds": period,
            "timeoutSeconds": 2,
            "failureThreshold": failures,
        })
    };
    let mut container = json!({
        "name": SIDECAR_CONTAINER,
        "image": sidecar.image,
        "imagePullPolicy": "IfNotPresent",
        "args": ["proxy"],
        "env": [
            {"name": env::UPSTREAMS, "value": settings.upstreams_entries},
            {"name": env::LISTEN, "value": format!("127.0.0.1:{}", settings.port)},
            {"name": env::ADMIN_LISTEN, "value": format!("0.0.0.0:{}", settings.admin_port)},
            {"name": env::TOKEN_HEADER, "value": settings.token_header.as_str()},
            {"name": env::EXPECTED_SERVICE_ACCOUNT, "value": gsa},
            {"name": env::LOG_FORMAT, "value": "json"},
        ],
        "ports": [{"name": "wiproxy-admin", "containerPort": settings.admin_port, "protocol": "TCP"}],
        // The GKE metadata server can take seconds on a new pod: allow two minutes to become ready.
        "startupProbe": probe("/readyz", 1, 120),
        "readinessProbe": probe("/readyz", 5, 3),
        "livenessProbe": probe("/healthz", 10, 3),
        "resources": sidecar.resources,
        "securityContext": {
            "runAsNonRoot": true,
            "runAsUser": 65532,
            "runAsGroup": 65532,
            "readOnlyRootFilesystem": true,
            "allowPrivilegeEscalation": false,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    });
    if settings.native {
        container["restartPolicy"] = json!("Always");
    }
    if let Some(federation) = &sidecar.federation {
        if let Some(vars) = container["env"].as_array_mut() {
            let credentials = format!("external-account:{FEDERATION_MOUNT}/credential-configuration.json");
            vars.push(json!({"name": env::CREDENTIALS, "value": credentials}));
            // Container env cannot change once the pod exists; the annotation can. What decides
            // where the subject token goes is here, and the file is checked against it.
            vars.push(json!({"name": env::UNIVERSE_DOMAIN, "value": federation.universe_domain}));
            vars.push(json!({"name": env::CREDENTIAL_CONFIG_SHA256, "value": federation.configuration_digest(gsa)}));
        }
        container["volumeMounts"] =
            json!([{"name": FEDERATION_VOLUME, "mountPath": FEDERATION_MOUNT, "readOnly": true}]);
    }
    container
}

/// The projected token and the credential configuration, in one volume the sidecar alone mounts:
/// the configuration travels in a pod annotation, read through the downward API, so no object
/// besides the pod is needed.
fn add_federation(spec: &PodSpec, federation: &Federation, gsa: &str, patch: &mut Vec<PatchOperation>) {
    patch.push(add(
        ["metadata", "annotations", CREDENTIAL_CONFIGURATION_ANNOTATION],
        Value::String(federation.credential_configuration(gsa)),
    ));
    let volume = json!({
        "name": FEDERATION_VOLUME,
        "projected": {"sources": [
            {"serviceAccountToken": {
                "audience": federation.token_audience(),
                "expirationSeconds": FEDERATION_TOKEN_SECONDS,
                "path": "token",
            }},
            {"downwardAPI": {"items": [{
                "path": "credential-configuration.json",
                "fieldRef": {"fieldPath": format!("metadata.annotations['{CREDENTIAL_CONFIGURATION_ANNOTATION}']")},
            }]}},
        ]},
    });
    match spec.volumes {
        None => patch.push(add(["spec", "volumes"], Value::Array(vec![volume]))),
        Some(_) => patch.push(add(["spec", "volumes", "-"], volume)),
    }
}

fn add_node_selector(spec: &PodSpec, patch: &mut Vec<PatchOperation>) {
    match &spec.node_selector {
        None => patch.push(add(["spec", "nodeSelector"], json!({GKE_METADATA_NODE_LABEL: "true"}))),
        Some(selector) if !selector.contains_key(GKE_METADATA_NODE_LABEL) => {
            patch.push(add(["spec", "nodeSelector", GKE_METADATA_NODE_LABEL], json!("true")));
        }
        Some(_) => {}
    }
}

/// The `wiproxy.io/status` value: what was injected and a hash of the inputs it came from.
fn status(settings: &Settings, gsa: &str, sidecar: &SidecarSettings) -> String {
    let mut hasher = Sha256::new();
    for part in [
        settings.upstreams_entries.as_str(),
        gsa,
        &settings.port.to_string(),
        settings.token_header.as_str(),
        if settings.native { "native" } else { "regular" },
        &settings.skip.join(","),
        &sidecar.image,
    ] {
        hasher.update(part.as_bytes());
        hasher.update([0]);
    }
    // Hashed only when set, so the status of pods injected on GKE stays what it was.
    if let Some(federation) = &sidecar.federation {
        hasher.update(federation.provider.as_bytes());
        hasher.update([0]);
        if federation.universe_domain != DEFAULT_UNIVERSE_DOMAIN {
            hasher.update(federation.universe_domain.as_bytes());
            hasher.update([0]);
        }
    }
    if settings.admin_port != ADMIN_PORT {
        hasher.update(settings.admin_port.to_string().as_bytes());
        hasher.update([0]);
    }
    let digest = hasher.finalize();
    let inputs: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "container": SIDECAR_CONTAINER,
        "native": settings.native,
        "inputs": inputs,
    })
    .to_string()
}

pub(crate) fn add<'a>(tokens: impl IntoIterator<Item = &'a str>, value: Value) -> PatchOperation {
    PatchOperation::Add(AddOperation { path: PointerBuf::from_tokens(tokens), value })
}

#[cfg(test)]
mod tests {
    //! One table per rule of the core: each row a pod (or a cluster or policy set-up) and what
    //! `inject` must answer. The golden files cover whole manifests; these pin each rule alone.
    use super::*;
    use crate::cluster::StaticCluster;
    use crate::policy::{Policy, TokenProxyPolicySpec};

    const GSA: &str = "invoker@client-project.iam.gserviceaccount.com";
    const OTHER_GSA: &str = "other@client-project.iam.gserviceaccount.com";
    const FUNCTION: &str = "https://europe-west1-host-project.cloudfunctions.net/orders";

    fn policy(
        name: &str,
        service_accounts: &[&str],
        upstreams: &[&str],
        change: impl Fn(&mut TokenProxyPolicySpec),
    ) -> Policy {
        let mut spec = TokenProxyPolicySpec {
            namespace_selector: Default::default(),
            service_accounts: service_accounts.iter().map(|s| s.to_string()).collect(),
            upstreams: upstreams.iter().map(|s| s.to_string()).collect(),
            audiences: Vec::new(),
            default_service_account: None,
            manage_service_accounts: true,
            allow_default_ksa: false,
        };
        change(&mut spec);
        Policy::from_spec(name.to_owned(), &spec).expect("valid policy")
    }

    fn open_policy() -> PolicySet {
        PolicySet::new(
            vec![policy(
                "payments",
                &["*@client-project.iam.gserviceaccount.com"],
                &["https://europe-west1-host-project.cloudfunctions.net/"],
                |_| {},
            )],
            true,
        )
    }

    /// A labelled pod with one container `app` on ServiceAccount `orders`, acting as `GSA`,
    /// changed by `change` (a JSON merge over the pod).
    fn pod(change: Value) -> Pod {
        let mut pod = json!({
            "metadata": {
                "name": "orders",
                "labels": {INJECT_LABEL: "true"},
                "annotations": {UPSTREAMS_ANNOTATION: format!("orders={FUNCTION}"), SERVICE_ACCOUNT_ANNOTATION: GSA},
            },
            "spec": {"serviceAccountName": "orders", "containers": [{"name": "app", "image": "app"}]},
        });
        json_patch::merge(&mut pod, &change);
        serde_json::from_value(pod).expect("a valid pod")
    }

    fn run(pod: &Pod, policies: &PolicySet, cluster: &StaticCluster) -> Result<Outcome, Denial> {
        let sidecar = SidecarSettings::default();
        inject(pod, &Inputs { namespace: "payments", sidecar: &sidecar, policies, cluster })
    }

    fn injected(outcome: Result<Outcome, Denial>) -> Injection {
        match outcome {
            Ok(Outcome::Injected(injection)) => injection,
            other => panic!("expected an injection, got {other:?}"),
        }
    }

    /// The pod after the injection's patch.
    fn patched(pod: &Pod, injection: &Injection) -> Value {
        let mut value = serde_json::to_value(pod).expect("pod serializes");
        json_patch::patch(&mut value, &injection.patch).expect("the patch applies");
        value
    }

    #[test]
    fn only_the_label_true_asks_for_injection() {
        let cases = [
            (json!({"metadata": {"labels": null}}), true),
            (json!({"metadata": {"labels": {INJECT_LABEL: "false"}}}), true),
            (json!({"metadata": {"labels": {INJECT_LABEL: "True"}}}), true),
            (json!({"metadata": {"labels": {INJECT_LABEL: "true"}}}), false),
        ];
        for (change, untouched) in cases {
            let outcome = run(&pod(change.clone()), &open_policy(), &StaticCluster::default());
            assert_eq!(matches!(outcome, Ok(Outcome::NotRequested)), untouched, "{change}: {outcome:?}");
        }
    }

    #[test]
    fn pod_shape_rules() {
        let sidecar_named = json!({"spec": {"containers": [{"name": SIDECAR_CONTAINER, "image": "x"}]}});
        let cases = [
            (json!({"spec": null}), Err(Denial::NoSpec)),
            (json!({"spec": {"hostNetwork": true}}), Err(Denial::HostNetwork)),
            (sidecar_named.clone(), Err(Denial::ContainerNameTaken)),
            (json!({"metadata": {"annotations": {UPSTREAMS_ANNOTATION: null}}}), Err(Denial::NoUpstreams)),
        ];
        for (change, expected) in cases {
            let outcome = run(&pod(change.clone()), &open_policy(), &StaticCluster::default());
            assert_eq!(outcome.map(|_| ()), expected, "{change}");
        }
        let mut already = sidecar_named;
        json_patch::merge(&mut already, &json!({"metadata": {"annotations": {STATUS_ANNOTATION: "{}"}}}));
        let outcome = run(&pod(already), &open_policy(), &StaticCluster::default());
        assert_eq!(outcome, Ok(Outcome::AlreadyInjected));
    }

    #[test]
    fn annotation_rules() {
        let too_long = format!("orders={FUNCTION}/{}", "a".repeat(MAX_UPSTREAMS_LEN));
        let cases: Vec<(Value, &str)> = vec![
            (json!({UPSTREAMS_ANNOTATION: too_long}), "annotation_too_long"),
            (json!({UPSTREAMS_ANNOTATION: "orders=http://plain.example.com/"}), "bad_upstreams"),
            (json!({UPSTREAMS_ANNOTATION: format!("a={FUNCTION},a={FUNCTION}")}), "bad_upstreams"),
            (json!({PORT_ANNOTATION: "80"}), "bad_port"),
            (json!({PORT_ANNOTATION: "http"}), "bad_port"),
            (json!({PORT_ANNOTATION: ADMIN_PORT.to_string()}), "port_clash"),
            (json!({TOKEN_HEADER_ANNOTATION: "x-api-key"}), "bad_token_header"),
            (json!({NATIVE_SIDECAR_ANNOTATION: "yes"}), "bad_native_sidecar"),
            (json!({SERVICE_ACCOUNT_ANNOTATION: "invoker@example.com"}), "bad_service_account"),
        ];
        for (annotations, reason) in cases {
            let outcome =
                run(&pod(json!({"metadata": {"annotations": annotations}})), &open_policy(), &StaticCluster::default());
            assert_eq!(outcome.as_ref().err().map(Denial::reason), Some(reason), "{annotations}: {outcome:?}");
        }
    }

    #[test]
    fn ports_of_other_containers_and_meshes_are_respected() {
        let port = |port: u16| json!({"spec": {"containers": [{"name": "app", "image": "app", "ports": [{"containerPort": port}]}]}});
        let annotated = |key: &str, value: &str| json!({"metadata": {"annotations": {key: value}}});
        let istio_label = |key: &str, value: &str| json!({"metadata": {"labels": {"sidecar.istio.io/inject": "true"}, "annotations": {key: value}}});
        let clash =
            |annotation, port, taken_by: &str| Some(Denial::PortClash { annotation, port, taken_by: taken_by.into() });
        let cases = [
            (port(DEFAULT_PORT), clash(PORT_ANNOTATION, DEFAULT_PORT, "container \"app\"")),
            (port(ADMIN_PORT), clash(ADMIN_PORT_ANNOTATION, ADMIN_PORT, "container \"app\"")),
            (port(8080), None),
            // The admin port moves with its annotation, and then may not be the proxy port.
            (annotated(ADMIN_PORT_ANNOTATION, "15082"), None),
            (annotated(ADMIN_PORT_ANNOTATION, "15080"), Some(Denial::SamePorts { port: 15080 })),
            (
                annotated(ADMIN_PORT_ANNOTATION, "80"),
                Some(Denial::BadPort { annotation: ADMIN_PORT_ANNOTATION, value: "80".into() }),
            ),
            // A mesh's proxy binds its ports whether or not it declares them, even before it is injected.
            (istio_label(ADMIN_PORT_ANNOTATION, "15090"), clash(ADMIN_PORT_ANNOTATION, 15090, "the Istio proxy")),
            (istio_label(PORT_ANNOTATION, "15001"), clash(PORT_ANNOTATION, 15001, "the Istio proxy")),
            (annotated(PORT_ANNOTATION, "15001"), None),
            (
                json!({"metadata": {"annotations": {PORT_ANNOTATION: "4143"}}, "spec": {"containers": [{"name": "app", "image": "app"}, {"name": "linkerd-proxy", "image": "proxy"}]}}),
                clash(PORT_ANNOTATION, 4143, "the Linkerd proxy"),
            ),
        ];
        for (change, expected) in cases {
            let outcome = run(&pod(change.clone()), &open_policy(), &StaticCluster::default());
            assert_eq!(outcome.err(), expected, "{change}");
        }
    }

    #[test]
    fn pods_that_cannot_reach_the_metadata_server_are_denied() {
        let required = |expressions: Value| {
            json!({"spec": {"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchExpressions": expressions}]}}}}})
        };
        let expression =
            |key: &str, operator: &str, values: Value| json!([{"key": key, "operator": operator, "values": values}]);
        let cases = [
            (json!({"spec": {"nodeSelector": {GKE_METADATA_NODE_LABEL: "false"}}}), Some("spec.nodeSelector")),
            (json!({"spec": {"nodeSelector": {GKE_METADATA_NODE_LABEL: "true"}}}), None),
            (required(expression(GKE_METADATA_NODE_LABEL, "NotIn", json!(["true"]))), Some(NODE_AFFINITY_FIELD)),
            (required(expression(GKE_METADATA_NODE_LABEL, "In", json!(["false"]))), Some(NODE_AFFINITY_FIELD)),
            (
                required(json!([{"key": GKE_METADATA_NODE_LABEL, "operator": "DoesNotExist"}])),
                Some(NODE_AFFINITY_FIELD),
            ),
            (required(expression(GKE_METADATA_NODE_LABEL, "In", json!(["true"]))), None),
            (required(expression("topology.kubernetes.io/zone", "In", json!(["europe-west1-b"]))), None),
            (json!({"spec": {"nodeSelector": {"kubernetes.io/os": "windows"}}}), Some("spec.nodeSelector")),
            (json!({"spec": {"os": {"name": "windows"}}}), Some("spec.os.name")),
            (required(expression("kubernetes.io/os", "In", json!(["windows"]))), Some(NODE_AFFINITY_FIELD)),
            (json!({"spec": {"nodeSelector": {"kubernetes.io/os": "linux"}}}), None),
        ];
        for (change, field) in cases {
            let outcome = run(&pod(change.clone()), &open_policy(), &StaticCluster::default());
            let denied_field = match outcome {
                Err(Denial::MetadataServerExcluded { field, .. } | Denial::Windows { field }) => Some(field),
                Err(other) => panic!("{change}: unexpected denial {other}"),
                Ok(_) => None,
            };
            assert_eq!(denied_field, field, "{change}");
        }
    }

    #[test]
    fn autopilot_pods_get_no_node_selector() {
        let sidecar = SidecarSettings { autopilot: true, ..SidecarSettings::default() };
        let pod = pod(json!({}));
        let cluster = StaticCluster::default();
        let inputs = Inputs { namespace: "payments", sidecar: &sidecar, policies: &open_policy(), cluster: &cluster };
        let value = patched(&pod, &injected(inject(&pod, &inputs)));
        assert!(value["spec"]["nodeSelector"].is_null(), "{}", value["spec"]);
    }

    #[test]
    fn native_sidecars_follow_the_oldest_kubelet() {
        let nodes = |versions: &[&str]| {
            let docs: Vec<Value> = versions
                .iter()
                .enumerate()
                .map(|(i, v)| json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": format!("node-{i}")}, "status": {"nodeInfo": {"kubeletVersion": v}}}))
                .collect();
            let mut cluster = StaticCluster::default();
            cluster.add_documents(&docs, "default");
            cluster
        };
        let sidecar = SidecarSettings { native: NativeSidecars::WhereKubeletsAllow, ..SidecarSettings::default() };
        let native_annotation = |v: &str| json!({"metadata": {"annotations": {NATIVE_SIDECAR_ANNOTATION: v}}});
        let cases = [
            (nodes(&[]), json!({}), true, None),
            (nodes(&["v1.29.1-gke.1", "v1.31.0"]), json!({}), true, None),
            (
                nodes(&["v1.30.2", "v1.28.9-gke.100"]),
                json!({}),
                false,
                Some("node node-1 runs kubelet v1.28.9-gke.100, older than 1.29"),
            ),
            (
                nodes(&["v1.28.9"]),
                native_annotation("true"),
                true,
                Some("native sidecar, but node node-0 runs kubelet v1.28.9"),
            ),
            (nodes(&["v1.28.9"]), native_annotation("false"), false, None),
        ];
        for (cluster, change, native, warning) in cases {
            let pod = pod(change.clone());
            let inputs =
                Inputs { namespace: "payments", sidecar: &sidecar, policies: &open_policy(), cluster: &cluster };
            let injection = injected(inject(&pod, &inputs));
            let value = patched(&pod, &injection);
            let in_init = value["spec"]["initContainers"][0]["name"] == SIDECAR_CONTAINER;
            assert_eq!(in_init, native, "{change} on {:?}", cluster.oldest_kubelet());
            let found = injection.warnings.iter().find(|w| w.contains("kubelet"));
            match warning {
                Some(text) => assert!(found.is_some_and(|w| w.contains(text)), "{:?}", injection.warnings),
                None => assert_eq!(found, None),
            }
        }
    }

    #[test]
    fn explicit_audiences_need_the_policy() {
        let upstreams = |entry: &str| json!({"metadata": {"annotations": {UPSTREAMS_ANNOTATION: entry}}});
        let with_audiences = PolicySet::new(
            vec![policy(
                "payments",
                &["*@client-project.iam.gserviceaccount.com"],
                &["https://europe-west1-host-project.cloudfunctions.net/", "https://*.a.run.app/"],
                |spec| spec.audiences = vec!["orders-api".into(), "https://api.example.com/*".into()],
            )],
            true,
        );
        let cases = [
            (format!("orders={FUNCTION}"), true),
            (format!("orders={FUNCTION};audience={FUNCTION}"), true),
            ("run=https://orders-x-ew.a.run.app/v1;audience=https://orders-x-ew.a.run.app".to_owned(), true),
            ("run=https://orders-x-ew.a.run.app/;audience=orders-api".to_owned(), true),
            ("run=https://orders-x-ew.a.run.app/;audience=https://api.example.com/orders".to_owned(), true),
            // A token for a service the policy does not let the pod call.
            (format!("orders={FUNCTION};audience=https://other-project.example.com"), false),
            ("run=https://orders-x-ew.a.run.app/;audience=https://api.example.com/orders/v2".to_owned(), false),
            ("run=https://orders-x-ew.a.run.app/;audience=payments-api".to_owned(), false),
        ];
        for (entry, allowed) in cases {
            let outcome = run(&pod(upstreams(&entry)), &with_audiences, &StaticCluster::default());
            match outcome {
                Ok(Outcome::Injected(_)) => assert!(allowed, "{entry}"),
                Err(Denial::AudienceNotAllowed { .. }) => assert!(!allowed, "{entry}"),
                other => panic!("{entry}: {other:?}"),
            }
        }
    }

    #[test]
    fn an_injection_many_times_the_pod_is_refused() {
        let upstreams: Vec<String> =
            (0..32).map(|i| format!("u{i}=https://europe-west1-host-project.cloudfunctions.net/f{i}")).collect();
        let containers =
            |n: usize| -> Vec<Value> { (0..n).map(|i| json!({"name": format!("c{i}"), "image": "app"})).collect() };
        let amplified = |n: usize| json!({"metadata": {"annotations": {UPSTREAMS_ANNOTATION: upstreams.join(",")}}, "spec": {"containers": containers(n)}});
        // 31 containers × 33 variables fit; 100 do not, and nothing is built for them.
        assert!(matches!(
            run(&pod(amplified(31)), &open_policy(), &StaticCluster::default()),
            Ok(Outcome::Injected(_))
        ));
        let refused = run(&pod(amplified(100)), &open_policy(), &StaticCluster::default());
        assert!(
            matches!(
                refused,
                Err(Denial::TooMuchInjection {
                    containers: 100,
                    per_container: 33,
                    variables: 3300,
                    max: MAX_ADDED_VARIABLES
                })
            ),
            "{refused:?}"
        );
        // Skipped containers add nothing.
        let mut skipping = amplified(100);
        let skipped: Vec<String> = (0..90).map(|i| format!("c{i}")).collect();
        skipping["metadata"]["annotations"][SKIP_CONTAINERS_ANNOTATION] = json!(skipped.join(","));
        assert!(matches!(run(&pod(skipping), &open_policy(), &StaticCluster::default()), Ok(Outcome::Injected(_))));
    }

    #[test]
    fn variables_from_env_from_are_shadowed_with_a_warning() {
        let change = json!({"spec": {"containers": [{"name": "app", "image": "app", "envFrom": [{"configMapRef": {"name": "settings"}}, {"secretRef": {"name": "keys"}}]}]}});
        let injection = injected(run(&pod(change), &open_policy(), &StaticCluster::default()));
        assert!(
            injection.warnings.iter().any(|w| w.contains("container \"app\" takes variables from envFrom (ConfigMap settings, Secret keys)")),
            "{:?}",
            injection.warnings
        );
    }

    #[test]
    fn a_status_without_the_sidecar_skips_nothing() {
        let forged = json!({"metadata": {"annotations": {STATUS_ANNOTATION: "{}", SERVICE_ACCOUNT_ANNOTATION: "intruder@other-project.iam.gserviceaccount.com"}}});
        let outcome = run(&pod(forged), &open_policy(), &StaticCluster::default());
        assert!(matches!(outcome, Err(Denial::ServiceAccountNotAllowed { .. })), "{outcome:?}");
    }

    #[test]
    fn the_google_service_account_comes_from_pod_then_ksa_then_policy() {
        let mut mapped = StaticCluster::default();
        mapped.set_service_account("payments", "orders", Some(GSA.to_owned()));
        let mut mapped_to_junk = StaticCluster::default();
        mapped_to_junk.set_service_account("payments", "orders", Some("not-an-email".to_owned()));
        let with_default = PolicySet::new(
            vec![policy(
                "payments",
                &["*@client-project.iam.gserviceaccount.com"],
                &["https://europe-west1-host-project.cloudfunctions.net/"],
                |spec| {
                    spec.default_service_account = Some(OTHER_GSA.to_owned());
                },
            )],
            true,
        );
        let (open, empty) = (open_policy(), StaticCluster::default());
        let no_pod_gsa = json!({"metadata": {"annotations": {SERVICE_ACCOUNT_ANNOTATION: null}}});
        let other_pod_gsa = json!({"metadata": {"annotations": {SERVICE_ACCOUNT_ANNOTATION: OTHER_GSA}}});
        let cases = vec![
            ("pod annotation", json!({}), &with_default, &empty, Ok(GSA)),
            ("KSA mapping", no_pod_gsa.clone(), &with_default, &mapped, Ok(GSA)),
            ("policy default", no_pod_gsa.clone(), &with_default, &empty, Ok(OTHER_GSA)),
            ("none at all", no_pod_gsa.clone(), &open, &empty, Err("no_service_account")),
            ("KSA mapped elsewhere", other_pod_gsa, &open, &mapped, Err("ksa_conflict")),
            ("KSA mapped to junk", no_pod_gsa, &open, &mapped_to_junk, Err("bad_service_account")),
        ];
        for (what, change, policies, cluster, expected) in cases {
            let outcome = run(&pod(change), policies, cluster);
            let got = outcome.map(|o| match o {
                Outcome::Injected(injection) => injection.gsa,
                other => format!("{other:?}"),
            });
            assert_eq!(got.as_deref().map_err(Denial::reason), expected, "{what}");
        }
    }

    #[test]
    fn policies_decide_gsa_upstreams_and_the_default_ksa() {
        let strict = policy("strict", &[GSA], &["https://europe-west1-host-project.cloudfunctions.net/"], |_| {});
        let lenient =
            policy("lenient", &["*@client-project.iam.gserviceaccount.com"], &["https://*.a.run.app/"], |spec| {
                spec.allow_default_ksa = true;
            });
        let both = PolicySet::new(vec![strict.clone(), lenient.clone()], true);
        let run_app = json!({"metadata": {"annotations": {UPSTREAMS_ANNOTATION: "api=https://api-xyz.a.run.app/"}}});
        let mixed = json!({"metadata": {"annotations": {UPSTREAMS_ANNOTATION: format!("api=https://api-xyz.a.run.app/,orders={FUNCTION}")}}});
        let cases = vec![
            ("no policy", json!({}), PolicySet::new(vec![], true), Err("no_policy")),
            ("no policy, none required", json!({}), PolicySet::new(vec![], false), Ok(None)),
            (
                "GSA nobody allows",
                json!({"metadata": {"annotations": {SERVICE_ACCOUNT_ANNOTATION: "x@elsewhere.iam.gserviceaccount.com"}}}),
                both.clone(),
                Err("service_account_not_allowed"),
            ),
            (
                "upstream nobody allows",
                json!({"metadata": {"annotations": {UPSTREAMS_ANNOTATION: "x=https://evil.example.com/"}}}),
                both.clone(),
                Err("upstream_not_allowed"),
            ),
            ("no single policy for all upstreams", mixed, both.clone(), Err("upstream_not_allowed")),
            ("strict allows the function", json!({}), both.clone(), Ok(Some("strict"))),
            ("lenient allows run.app", run_app, both.clone(), Ok(Some("lenient"))),
            (
                "default KSA refused",
                json!({"spec": {"serviceAccountName": null}}),
                PolicySet::new(vec![strict.clone()], true),
                Err("default_ksa"),
            ),
            (
                "default KSA allowed",
                json!({"spec": {"serviceAccountName": "default"}, "metadata": {"annotations": {UPSTREAMS_ANNOTATION: "api=https://api-xyz.a.run.app/"}}}),
                PolicySet::new(vec![lenient.clone()], true),
                Ok(Some("lenient")),
            ),
            (
                // Only the policy that allows the pod can let it use the default KSA: lenient's
                // allowDefaultKsa does not extend to the function only strict allows.
                "default KSA, allowed by another policy than the one that allows the pod",
                json!({"spec": {"serviceAccountName": "default"}}),
                PolicySet::new(vec![strict.clone(), lenient], true),
                Err("default_ksa"),
            ),
        ];
        for (what, change, policies, expected) in cases {
            let outcome = run(&pod(change), &policies, &StaticCluster::default());
            let got = outcome.map(|o| match o {
                Outcome::Injected(injection) => injection.policy,
                other => panic!("{what}: {other:?}"),
            });
            assert_eq!(got.as_ref().map(Option::as_deref).map_err(Denial::reason), expected, "{what}");
        }
    }

    #[test]
    fn service_accounts_are_annotated_only_when_unmapped_and_managed() {
        let mut mapped = StaticCluster::default();
        mapped.set_service_account("payments", "orders", Some(GSA.to_owned()));
        let mut unmapped = StaticCluster::default();
        unmapped.set_service_account("payments", "orders", None);
        let unmanaged = PolicySet::new(
            vec![policy(
                "payments",
                &["*@client-project.iam.gserviceaccount.com"],
                &["https://europe-west1-host-project.cloudfunctions.net/"],
                |spec| {
                    spec.manage_service_accounts = false;
                },
            )],
            true,
        );
        let annotate = ServiceAccountChange::Annotate { name: "orders".into(), gsa: GSA.into() };
        let cases = [
            ("mapped", open_policy(), &mapped, ServiceAccountChange::None, false),
            ("unmapped", open_policy(), &unmapped, annotate.clone(), false),
            ("missing", open_policy(), &StaticCluster::default(), annotate, false),
            ("unmanaged", unmanaged, &unmapped, ServiceAccountChange::None, true),
        ];
        for (what, policies, cluster, change, warned) in cases {
            let injection = injected(run(&pod(json!({})), &policies, cluster));
            assert_eq!(injection.service_account, change, "{what}");
            let warning = injection.warnings.iter().any(|w| w.contains("does not manage ServiceAccounts"));
            assert_eq!(warning, warned, "{what}: {:?}", injection.warnings);
        }
    }

    #[test]
    fn the_sidecar_goes_first_native_or_regular() {
        let init = json!({"spec": {"initContainers": [{"name": "migrate", "image": "m"}]}});
        let regular = json!({"metadata": {"annotations": {NATIVE_SIDECAR_ANNOTATION: "false"}}});
        let cases = [
            (json!({}), "/spec/initContainers/0", true),
            (init.clone(), "/spec/initContainers/0", true),
            (regular, "/spec/containers/0", false),
        ];
        for (change, pointer, native) in cases {
            let pod = pod(change.clone());
            let value = patched(&pod, &injected(run(&pod, &open_policy(), &StaticCluster::default())));
            let sidecar = value.pointer(pointer).expect("the sidecar is there");
            assert_eq!(sidecar["name"], SIDECAR_CONTAINER, "{change}");
            assert_eq!(sidecar["restartPolicy"] == "Always", native, "{change}");
            assert_eq!(sidecar["securityContext"]["runAsNonRoot"], true);
            assert_eq!(value["spec"]["nodeSelector"][GKE_METADATA_NODE_LABEL], "true");
        }
        let mut job = init;
        json_patch::merge(
            &mut job,
            &json!({"spec": {"restartPolicy": "Never"}, "metadata": {"annotations": {NATIVE_SIDECAR_ANNOTATION: "false"}}}),
        );
        let warnings = injected(run(&pod(job), &open_policy(), &StaticCluster::default())).warnings;
        assert!(warnings.iter().any(|w| w.contains("never completes")), "{warnings:?}");
        assert!(warnings.iter().any(|w| w.contains("init containers run before it")), "{warnings:?}");
    }

    #[test]
    fn app_containers_get_the_urls_except_skipped_and_user_set_ones() {
        let change = json!({
            "metadata": {"annotations": {SKIP_CONTAINERS_ANNOTATION: "batch,ghost"}},
            "spec": {
                "initContainers": [{"name": "migrate", "image": "m"}],
                "containers": [
                    {"name": "app", "image": "app", "env": [{"name": "WIPROXY_URL", "value": "mine"}]},
                    {"name": "batch", "image": "b"},
                ],
            },
        });
        let pod = pod(change);
        let injection = injected(run(&pod, &open_policy(), &StaticCluster::default()));
        let value = patched(&pod, &injection);
        let env = |pointer: &str| -> Vec<(String, String)> {
            value
                .pointer(pointer)
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .map(|e| {
                    (
                        e["name"].as_str().unwrap_or_default().to_owned(),
                        e["value"].as_str().unwrap_or_default().to_owned(),
                    )
                })
                .collect()
        };
        let base = format!("http://127.0.0.1:{DEFAULT_PORT}");
        assert_eq!(
            env("/spec/containers/0/env"),
            vec![("WIPROXY_URL".into(), "mine".into()), ("WIPROXY_ORDERS_URL".into(), format!("{base}/orders"))]
        );
        assert_eq!(env("/spec/containers/1/env"), vec![], "batch is skipped");
        // The native sidecar is init container 0 now; the user's init container moved to 1.
        assert_eq!(
            env("/spec/initContainers/1/env"),
            vec![("WIPROXY_URL".into(), base.clone()), ("WIPROXY_ORDERS_URL".into(), format!("{base}/orders"))]
        );
        assert!(injection.warnings.iter().any(|w| w.contains("already sets WIPROXY_URL")), "{:?}", injection.warnings);
        assert!(
            injection.warnings.iter().any(|w| w.contains("no container named \"ghost\"")),
            "{:?}",
            injection.warnings
        );
    }

    #[test]
    fn an_injected_pod_is_left_alone_the_second_time() {
        let pod = pod(json!({}));
        let value = patched(&pod, &injected(run(&pod, &open_policy(), &StaticCluster::default())));
        let again: Pod = serde_json::from_value(value).expect("the patched pod is a Pod");
        assert_eq!(run(&again, &open_policy(), &StaticCluster::default()), Ok(Outcome::AlreadyInjected));
    }

    #[test]
    fn federation_mounts_its_volume_into_the_sidecar_alone_and_leaves_gke_settings_out() {
        let provider = "projects/123/locations/global/workloadIdentityPools/onprem/providers/cluster";
        let sidecar =
            SidecarSettings { federation: Some(Federation::new(provider).expect("a provider")), ..Default::default() };
        let mut unmapped = StaticCluster::default();
        unmapped.set_service_account("payments", "orders", None);
        let policies = open_policy();
        let inputs = Inputs { namespace: "payments", sidecar: &sidecar, policies: &policies, cluster: &unmapped };
        let pod = pod(json!({}));
        let injection = injected(inject(&pod, &inputs));
        assert_eq!(injection.service_account, ServiceAccountChange::None, "no KSA annotation off GKE");
        let value = patched(&pod, &injection);
        assert!(value["spec"]["nodeSelector"].is_null(), "no GKE node selector: {}", value["spec"]);
        assert_eq!(value["spec"]["initContainers"][0]["volumeMounts"][0]["name"], FEDERATION_VOLUME);
        assert!(value["spec"]["containers"][0]["volumeMounts"].is_null(), "the app never sees the token");
        let config: Value = serde_json::from_str(
            value["metadata"]["annotations"][CREDENTIAL_CONFIGURATION_ANNOTATION].as_str().expect("the configuration"),
        )
        .expect("JSON");
        assert_eq!(config["audience"], format!("//iam.googleapis.com/{provider}"));
        assert!(config["service_account_impersonation_url"].as_str().is_some_and(|u| u.contains(GSA)));

        let taken = self::pod(json!({"spec": {"volumes": [{"name": FEDERATION_VOLUME, "emptyDir": {}}]}}));
        assert_eq!(inject(&taken, &inputs).err().as_ref().map(Denial::reason), Some("volume_name_taken"));
        for bad in ["", "projects/x/locations/global/workloadIdentityPools/p/providers/q", "pools/p/providers/q"] {
            assert!(Federation::new(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_sidecar_env_decides_where_the_subject_token_goes() {
        let provider = "projects/123/locations/global/workloadIdentityPools/onprem/providers/cluster";
        let federation = Federation::new(provider).and_then(|f| f.in_universe("Example-Universe.com.")).expect("valid");
        let sidecar = SidecarSettings { federation: Some(federation), ..Default::default() };
        let mut unmapped = StaticCluster::default();
        unmapped.set_service_account("payments", "orders", None);
        let policies = open_policy();
        let inputs = Inputs { namespace: "payments", sidecar: &sidecar, policies: &policies, cluster: &unmapped };
        let pod = pod(json!({}));
        let value = patched(&pod, &injected(inject(&pod, &inputs)));
        let annotation =
            value["metadata"]["annotations"][CREDENTIAL_CONFIGURATION_ANNOTATION].as_str().expect("the configuration");
        let config: Value = serde_json::from_str(annotation).expect("JSON");
        assert_eq!(config["universe_domain"], "example-universe.com");
        assert_eq!(config["token_url"], "https://sts.example-universe.com/v1/token");
        let env = &value["spec"]["initContainers"][0]["env"];
        let var =
            |name: &str| env.as_array().into_iter().flatten().find(|v| v["name"] == name).map(|v| v["value"].clone());
        assert_eq!(var(env::UNIVERSE_DOMAIN), Some(json!("example-universe.com")));
        let digest: String = Sha256::digest(annotation.as_bytes()).iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(var(env::CREDENTIAL_CONFIG_SHA256), Some(json!(digest)), "the digest of the annotation as written");
        for bad in ["", "evil", "evil..example", "-evil.example", "evil.example/x", "user@evil.example"] {
            let refused = Federation::new(provider).and_then(|f| f.in_universe(bad));
            assert!(refused.is_err_and(|e| e.contains("--universe-domain")), "{bad:?}");
        }
    }

    #[test]
    fn likely_mistakes_are_warnings() {
        let cases = [
            ("fn=https://europe-west1-host-project.cloudfunctions.net/orders;audience=https://europe-west1-host-project.cloudfunctions.net".to_owned(), "is the host alone"),
            (format!("fn={FUNCTION};audience={FUNCTION}?x=1"), "query or fragment"),
        ];
        for (upstreams, warning) in cases {
            let injection = injected(run(
                &pod(json!({"metadata": {"annotations": {UPSTREAMS_ANNOTATION: upstreams}}})),
                &open_policy(),
                &StaticCluster::default(),
            ));
            assert!(injection.warnings.iter().any(|w| w.contains(warning)), "{warning}: {:?}", injection.warnings);
        }
    }
}
