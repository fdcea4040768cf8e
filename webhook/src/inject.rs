//! The injection core: decides, with no I/O, what the webhook does to one pod (or pod template)
//! and expresses it as a JSON patch, warnings and what the pod's ServiceAccount needs.

use std::collections::BTreeMap;

use json_patch::{AddOperation, Patch, PatchOperation};
use jsonptr::PointerBuf;
use k8s_openapi::api::core::v1::{Container, Pod, PodSpec};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use wiproxy_common::{
    env, is_service_account_email, parse_upstreams, TokenHeader, Upstream, ADMIN_PORT, DEFAULT_PORT,
    GKE_METADATA_NODE_LABEL, INJECT_LABEL, NATIVE_SIDECAR_ANNOTATION, PORT_ANNOTATION, SERVICE_ACCOUNT_ANNOTATION,
    SIDECAR_CONTAINER, SKIP_CONTAINERS_ANNOTATION, STATUS_ANNOTATION, TOKEN_HEADER_ANNOTATION, UPSTREAMS_ANNOTATION,
};

use crate::cluster::{ClusterState, KsaLookup};
use crate::denial::Denial;
use crate::policy::{PolicySet, Refusal};

/// Longest `wiproxy.io/upstreams` accepted; Kubernetes caps all annotations of an object at 256 KiB.
pub const MAX_UPSTREAMS_LEN: usize = 32 * 1024;

/// How the sidecar container is built.
#[derive(Debug, Clone)]
pub struct SidecarSettings {
    pub image: String,
    /// Native sidecar (first init container with `restartPolicy: Always`) unless the pod says otherwise.
    pub native: bool,
    /// Container `resources`, as Kubernetes JSON.
    pub resources: Value,
}

impl SidecarSettings {
    pub fn default_image() -> String {
        format!("ghcr.io/wiproxy/wiproxy:{}", env!("CARGO_PKG_VERSION"))
    }

    pub fn default_resources() -> Value {
        json!({"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"memory": "64Mi"}})
    }
}

impl Default for SidecarSettings {
    fn default() -> Self {
        Self { image: Self::default_image(), native: true, resources: Self::default_resources() }
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
    token_header: TokenHeader,
    native: bool,
    skip: Vec<String>,
}

pub fn inject(pod: &Pod, inputs: &Inputs) -> Result<Outcome, Denial> {
    let labels = pod.metadata.labels.clone().unwrap_or_default();
    if labels.get(INJECT_LABEL).map(String::as_str) != Some("true") {
        return Ok(Outcome::NotRequested);
    }
    let annotations = pod.metadata.annotations.clone().unwrap_or_default();
    let spec = pod.spec.as_ref().ok_or(Denial::NoSpec)?;
    let has_sidecar = all_containers(spec).any(|c| c.name == SIDECAR_CONTAINER);
    if annotations.contains_key(STATUS_ANNOTATION) {
        return Ok(Outcome::AlreadyInjected);
    }
    if has_sidecar {
        return Err(Denial::ContainerNameTaken);
    }
    if spec.host_network == Some(true) {
        return Err(Denial::HostNetwork);
    }

    let settings = read_settings(&annotations, inputs.sidecar.native)?;
    check_ports(spec, settings.port)?;

    let namespace = inputs.namespace;
    let namespace_labels = inputs.cluster.namespace_labels(namespace);
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
    if ksa == "default" && !selecting.iter().any(|p| p.allow_default_ksa) {
        return Err(Denial::DefaultKsa { namespace: namespace.to_owned() });
    }

    let allowance = inputs.policies.allow(&selecting, &gsa, &settings.upstreams).map_err(|refusal| match refusal {
        Refusal::NoPolicy => Denial::NoPolicy { namespace: namespace.to_owned() },
        Refusal::ServiceAccount { policies } => {
            Denial::ServiceAccountNotAllowed { gsa: gsa.clone(), namespace: namespace.to_owned(), policies }
        }
        Refusal::Upstream { upstream, url, policies } => {
            Denial::UpstreamNotAllowed { upstream, url, gsa: gsa.clone(), namespace: namespace.to_owned(), policies }
        }
        Refusal::NoSinglePolicy { policies } => Denial::NoSinglePolicy { gsa: gsa.clone(), policies },
    })?;

    let mut warnings = upstream_warnings(&settings.upstreams);
    let service_account = match ksa_lookup {
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
    add_sidecar(spec, &settings, &gsa, inputs.sidecar, &mut patch, &mut warnings);
    add_node_selector(spec, &mut patch);
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

    let port = match annotations.get(PORT_ANNOTATION).map(|v| v.trim()) {
        None => DEFAULT_PORT,
        Some(value) => match value.parse::<u16>() {
            Ok(port) if port >= 1024 && port == ADMIN_PORT => return Err(Denial::AdminPort { port }),
            Ok(port) if port >= 1024 => port,
            _ => return Err(Denial::BadPort { value: value.to_owned() }),
        },
    };
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
    Ok(Settings { upstreams, upstreams_entries, port, token_header, native, skip })
}

fn check_ports(spec: &PodSpec, port: u16) -> Result<(), Denial> {
    for container in all_containers(spec) {
        for declared in container.ports.iter().flatten() {
            let declared = u16::try_from(declared.container_port).unwrap_or_default();
            if declared == port {
                return Err(Denial::PortClash { port, container: container.name.clone() });
            }
            if declared == ADMIN_PORT {
                return Err(Denial::AdminPortClash { port: ADMIN_PORT, container: container.name.clone() });
            }
        }
    }
    Ok(())
}

fn upstream_warnings(upstreams: &[Upstream]) -> Vec<String> {
    let mut warnings = Vec::new();
    for upstream in upstreams {
        let name = &upstream.name;
        let host = upstream.parsed.host_str().unwrap_or_default();
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

    let lists =
        [("initContainers", spec.init_containers.as_deref().unwrap_or_default()), ("containers", &spec.containers)];
    for skipped in &settings.skip {
        if !lists.iter().any(|(_, cs)| cs.iter().any(|c| &c.name == skipped)) {
            warnings.push(format!("annotation {SKIP_CONTAINERS_ANNOTATION}: no container named {skipped:?}"));
        }
    }
    for (list, containers) in lists {
        for (index, container) in containers.iter().enumerate() {
            if settings.skip.contains(&container.name) {
                continue;
            }
            let existing = container.env.as_deref().unwrap_or_default();
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
    patch: &mut Vec<PatchOperation>,
    warnings: &mut Vec<String>,
) {
    let container = sidecar_container(settings, gsa, sidecar);
    if settings.native {
        match spec.init_containers {
            None => patch.push(add(["spec", "initContainers"], Value::Array(vec![container]))),
            Some(_) => patch.push(add(["spec", "initContainers", "0"], container)),
        }
        return;
    }
    patch.push(add(["spec", "containers", "0"], container));
    if matches!(spec.restart_policy.as_deref(), Some("Never" | "OnFailure")) {
        warnings.push(format!(
            "the sidecar is a regular container, so a pod with restartPolicy {} never completes: set {NATIVE_SIDECAR_ANNOTATION}: \"true\" (Kubernetes 1.29+)",
            spec.restart_policy.as_deref().unwrap_or_default()
        ));
    }
    if spec.init_containers.as_ref().is_some_and(|cs| cs.iter().any(|c| !settings.skip.contains(&c.name))) {
        warnings.push(format!(
            "the sidecar is a regular container, so init containers run before it and cannot reach it: set {NATIVE_SIDECAR_ANNOTATION}: \"true\" or list them in {SKIP_CONTAINERS_ANNOTATION}"
        ));
    }
}

fn sidecar_container(settings: &Settings, gsa: &str, sidecar: &SidecarSettings) -> Value {
    let probe = |path: &str, period: u32, failures: u32| {
        json!({
            "httpGet": {"path": path, "port": ADMIN_PORT},
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
            {"name": env::ADMIN_LISTEN, "value": format!("0.0.0.0:{ADMIN_PORT}")},
            {"name": env::TOKEN_HEADER, "value": settings.token_header.as_str()},
            {"name": env::EXPECTED_SERVICE_ACCOUNT, "value": gsa},
            {"name": env::LOG_FORMAT, "value": "json"},
        ],
        "ports": [{"name": "wiproxy-admin", "containerPort": ADMIN_PORT, "protocol": "TCP"}],
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
    container
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

fn add<'a>(tokens: impl IntoIterator<Item = &'a str>, value: Value) -> PatchOperation {
    PatchOperation::Add(AddOperation { path: PointerBuf::from_tokens(tokens), value })
}
