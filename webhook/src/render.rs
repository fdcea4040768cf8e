//! `render`: offline injection of manifests, like `istioctl kube-inject`. Labelled pod templates
//! are injected, ServiceAccounts get their Workload Identity annotation, everything else passes
//! through byte for byte, and rendering the output again changes nothing.

use k8s_openapi::api::core::v1::ServiceAccount;
use serde_json::{json, Value};
use wiproxy_common::{GKE_SERVICE_ACCOUNT_ANNOTATION, INJECT_LABEL};

use crate::cluster::StaticCluster;
use crate::inject::{inject, Inputs, Outcome, ServiceAccountChange, SidecarSettings};
use crate::policy::{Policy, PolicySet};
use crate::workload::{pod_value, TypeKey, WorkloadKind};
use crate::yaml::{self, to_yaml, FileError};

/// What `render` works with besides the manifests.
pub struct RenderOptions {
    /// Namespace of documents that name none.
    pub namespace: String,
    pub sidecar: SidecarSettings,
    /// Policies from `--policy-file`, the only ones: TokenProxyPolicy documents of the input pass
    /// through unused.
    pub policies: Vec<Policy>,
    pub policy_required: bool,
    /// Documents of `--cluster-file`; ServiceAccounts and Namespaces of the input are added to them.
    pub cluster: Vec<Value>,
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Rendered {
    pub output: String,
    /// `KIND/NAME: message` lines.
    pub warnings: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error(transparent)]
    Input(#[from] FileError),
    #[error("{0}")]
    Config(String),
    #[error("reading standard input: {0}")]
    Stdin(std::io::Error),
    /// One `KIND/NAME (namespace NS): message` line per denied workload.
    #[error("{}", .0.join("\n"))]
    Denied(Vec<String>),
}

/// The manifests to render, with the name messages give them, and how to render them.
pub struct RenderJob {
    pub input: String,
    pub source_name: String,
    pub options: RenderOptions,
}

/// One document of the input: its exact text, and its value once parsed.
struct Entry {
    separator: String,
    text: String,
    value: Option<Value>,
    changed: bool,
}

pub fn render(input: &str, source_name: &str, options: &RenderOptions) -> Result<Rendered, RenderError> {
    let mut entries = Vec::new();
    for (index, document) in yaml::split_documents(input).into_iter().enumerate() {
        let value = yaml::parse_document(&document.text).map_err(|e| FileError::Yaml {
            source_name: source_name.to_owned(),
            index: index + 1,
            why: e.to_string(),
        })?;
        entries.push(Entry { separator: document.separator, text: document.text, value, changed: false });
    }

    let mut cluster = StaticCluster::default();
    cluster.add_documents(&options.cluster, &options.namespace);
    cluster.add_documents(entries.iter().filter_map(|e| e.value.as_ref()), &options.namespace);
    // Policies come from --policy-file only: in a CI gate the input is the app team's, and a
    // policy in it must not authorise the workloads beside it.
    let policies = PolicySet::new(options.policies.clone(), options.policy_required);
    let mut pass =
        Pass { options, policies: &policies, cluster, warnings: Vec::new(), denials: Vec::new(), mappings: Vec::new() };

    for entry in &mut entries {
        let Some(doc) = entry.value.as_mut() else { continue };
        let key = TypeKey::of(doc);
        if key.group == "wiproxy.io" && key.kind == crate::policy::KIND {
            let name = doc["metadata"]["name"].as_str().unwrap_or("<unnamed>");
            pass.warnings.push(format!(
                "{}/{name}: policies are read from --policy-file only; this one passes through unused",
                key.kind
            ));
        } else if key.is_list() {
            // `kubectl get -o yaml` prints several objects as one List.
            for item in doc.get_mut("items").and_then(Value::as_array_mut).into_iter().flatten() {
                entry.changed |= pass.workload(item);
            }
        } else {
            entry.changed |= pass.workload(doc);
        }
    }
    let Pass { mut warnings, denials, mappings, .. } = pass;
    let mut rendered = Rendered::default();
    rendered.warnings.append(&mut warnings);
    if !denials.is_empty() {
        return Err(RenderError::Denied(denials));
    }

    let mut added = Vec::new();
    for Mapping { explicit_namespace, namespace, name, gsa } in mappings {
        let existing = entries.iter_mut().find(|e| {
            e.value.as_ref().is_some_and(|v| {
                TypeKey::of(v).is::<ServiceAccount>()
                    && v["metadata"]["name"] == name.as_str()
                    && v["metadata"]["namespace"].as_str().unwrap_or(&options.namespace) == namespace
            })
        });
        match existing {
            Some(entry) => {
                if let Some(metadata) = entry.value.as_mut().and_then(|v| v.get_mut("metadata")) {
                    if !metadata["annotations"].is_object() {
                        metadata["annotations"] = json!({});
                    }
                    metadata["annotations"][GKE_SERVICE_ACCOUNT_ANNOTATION] = json!(gsa);
                    entry.changed = true;
                }
            }
            None => {
                let mut metadata = json!({"name": name});
                if let Some(namespace) = explicit_namespace {
                    metadata["namespace"] = json!(namespace);
                }
                metadata["annotations"] = json!({GKE_SERVICE_ACCOUNT_ANNOTATION: gsa});
                added.push(json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": metadata}));
            }
        }
    }

    for entry in &entries {
        rendered.output.push_str(&entry.separator);
        match (&entry.value, entry.changed) {
            (Some(value), true) => rendered.output.push_str(&to_yaml(value)),
            _ => rendered.output.push_str(&entry.text),
        }
    }
    for value in added {
        if !rendered.output.is_empty() && !rendered.output.ends_with('\n') {
            rendered.output.push('\n');
        }
        rendered.output.push_str("---\n");
        rendered.output.push_str(&to_yaml(&value));
    }
    Ok(rendered)
}

/// What one render has seen and decided so far.
struct Pass<'a> {
    options: &'a RenderOptions,
    policies: &'a PolicySet,
    /// The cluster file, the input's Namespaces and ServiceAccounts, and the mappings decided so far.
    cluster: StaticCluster,
    warnings: Vec<String>,
    denials: Vec<String>,
    mappings: Vec<Mapping>,
}

impl Pass<'_> {
    /// Injects `doc` when it is a labelled workload; whether it changed. Anything else, and
    /// any workload without the label, is left as it is, whatever it holds.
    fn workload(&mut self, doc: &mut Value) -> bool {
        let key = TypeKey::of(doc);
        let Some(kind) = WorkloadKind::of(&key) else { return false };
        let explicit_namespace = doc["metadata"]["namespace"].as_str().map(str::to_owned);
        let namespace = explicit_namespace.clone().unwrap_or_else(|| self.options.namespace.clone());
        let what = format!("{}/{}", key.kind, doc["metadata"]["name"].as_str().unwrap_or("<unnamed>"));
        let Some(template) = doc.pointer_mut(kind.template_pointer()) else { return false };
        // The label is read before the template is: an unlabelled template is none of ours.
        if template.pointer(&format!("/metadata/labels/{}", INJECT_LABEL.replace('/', "~1"))) != Some(&json!("true")) {
            return false;
        }
        let pod = match serde_json::from_value(pod_value(template)) {
            Ok(pod) => pod,
            Err(e) => {
                self.denials.push(format!("{what} (namespace {namespace}): the pod template is not valid: {e}"));
                return false;
            }
        };
        let inputs = Inputs {
            namespace: &namespace,
            sidecar: &self.options.sidecar,
            policies: self.policies,
            cluster: &self.cluster,
        };
        match inject(&pod, &inputs) {
            Ok(Outcome::NotRequested | Outcome::AlreadyInjected) => false,
            Ok(Outcome::Injected(injection)) => {
                if let Err(e) = json_patch::patch(template, &injection.patch) {
                    self.denials.push(format!("{what} (namespace {namespace}): cannot apply the injection: {e}"));
                    return false;
                }
                self.warnings.extend(injection.warnings.iter().map(|w| format!("{what}: {w}")));
                if let ServiceAccountChange::Annotate { name, gsa } = injection.service_account {
                    // Later workloads of the same ServiceAccount see the mapping this one needs.
                    self.cluster.set_service_account(&namespace, &name, Some(gsa.clone()));
                    self.mappings.push(Mapping { explicit_namespace, namespace, name, gsa });
                }
                true
            }
            Err(denial) => {
                self.denials.push(format!("{what} (namespace {namespace}): {denial}"));
                false
            }
        }
    }
}

/// A ServiceAccount the rendered workloads need mapped to their Google service account.
struct Mapping {
    /// The workload's own `metadata.namespace`, copied to a ServiceAccount document added for it.
    explicit_namespace: Option<String>,
    namespace: String,
    name: String,
    gsa: String,
}
