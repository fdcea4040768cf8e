//! Golden tests of the injection: each folder under `tests/golden/` holds `input.yaml`, optional
//! `args` (extra `render` flags) and what `render` must print: `output.yaml` when it succeeds,
//! `stderr.txt` for warnings or the denial. `UPDATE_GOLDEN=1 cargo test --test golden` rewrites
//! the expectations; review the diff before committing it.

use std::fs;
use std::path::{Path, PathBuf};

use clap::Parser;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, ReplicaSet, StatefulSet};
use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, ReplicationController, Service, ServiceAccount};
use serde_json::Value;
use wiproxy_webhook::config::{Cli, Command};
use wiproxy_webhook::policy::TokenProxyPolicy;
use wiproxy_webhook::render::{self, RenderError, Rendered};
use wiproxy_webhook::yaml;

const GOLDEN: &str = "tests/golden";

fn cases() -> Vec<PathBuf> {
    let mut cases: Vec<PathBuf> = fs::read_dir(GOLDEN)
        .expect("tests/golden exists")
        .map(|entry| entry.expect("readable entry").path())
        .filter(|path| path.join("input.yaml").exists())
        .collect();
    cases.sort();
    cases
}

fn render_file(input: &Path, extra: &str) -> Result<Rendered, RenderError> {
    let input = input.to_str().expect("utf-8 path");
    let mut argv = vec!["wiproxy-webhook", "render", "-f", input];
    if !extra.contains("--policy-file") {
        argv.extend(["--policy-file", "tests/golden/policy.yaml"]);
    }
    if !extra.contains("--cluster-file") {
        argv.extend(["--cluster-file", "tests/golden/cluster.yaml"]);
    }
    if !extra.contains("-n ") {
        argv.extend(["-n", "payments"]);
    }
    argv.extend(extra.split_whitespace());
    let Command::Render(args) = Cli::try_parse_from(argv).expect("valid render flags").command else {
        panic!("not a render command");
    };
    let job = args.load()?;
    render::render(&job.input, &job.source_name, &job.options)
}

fn stderr_of(result: &Result<Rendered, RenderError>) -> String {
    let lines: Vec<String> = match result {
        Ok(rendered) => rendered.warnings.iter().map(|w| format!("warning: {w}")).collect(),
        Err(e) => e.to_string().lines().map(|l| format!("error: {l}")).collect(),
    };
    lines.iter().map(|l| format!("{l}\n")).collect()
}

/// Every document of the output must be a valid object of its Kubernetes type.
fn check_types(case: &str, output: &str) {
    for doc in yaml::parse_stream(output, case).expect("output is YAML") {
        check_type(case, &doc);
    }
}

fn check_type(case: &str, doc: &Value) {
    {
        let doc = doc.clone();
        let kind = doc["kind"].as_str().unwrap_or_default().to_owned();
        let typed = |result: Result<(), serde_json::Error>| {
            if let Err(e) = result {
                panic!("{case}: {kind} does not deserialize: {e}");
            }
        };
        fn check<T: serde::de::DeserializeOwned>(doc: &Value) -> Result<(), serde_json::Error> {
            serde_json::from_value::<T>(doc.clone()).map(drop)
        }
        let template = match kind.as_str() {
            "Pod" => Some(doc.clone()),
            "CronJob" => doc.pointer("/spec/jobTemplate/spec/template").cloned(),
            _ => doc.pointer("/spec/template").cloned(),
        };
        // Render passes documents without the label through as they are, valid or not.
        let labelled = |pod: &Value| pod.pointer("/metadata/labels/wiproxy.io~1inject").is_some();
        if template.as_ref().is_some_and(|t| !labelled(t)) {
            return;
        }
        match kind.as_str() {
            "Pod" => typed(check::<Pod>(&doc)),
            "Deployment" => typed(check::<Deployment>(&doc)),
            "StatefulSet" => typed(check::<StatefulSet>(&doc)),
            "DaemonSet" => typed(check::<DaemonSet>(&doc)),
            "ReplicaSet" => typed(check::<ReplicaSet>(&doc)),
            "Job" => typed(check::<Job>(&doc)),
            "CronJob" => typed(check::<CronJob>(&doc)),
            "ServiceAccount" => typed(check::<ServiceAccount>(&doc)),
            "Namespace" => typed(check::<Namespace>(&doc)),
            "ConfigMap" => typed(check::<ConfigMap>(&doc)),
            "Service" => typed(check::<Service>(&doc)),
            "ReplicationController" => typed(check::<ReplicationController>(&doc)),
            "TokenProxyPolicy" => typed(check::<TokenProxyPolicy>(&doc)),
            "List" => {
                for item in doc["items"].as_array().into_iter().flatten() {
                    check_type(case, item);
                }
                return;
            }
            other => panic!("{case}: unexpected kind {other} in output"),
        }
        if let Some(template) = template {
            typed(check::<Pod>(&template));
        }
    }
}

/// In every injected pod of the output, the sidecar starts where it can get its tokens and binds
/// no port another container (a mesh proxy's undeclared ports included) binds:
/// - after a mesh proxy that runs as a native sidecar;
/// - with a classic mesh proxy: before the mesh's init container installs its redirection, or
///   after a proxy the kubelet starts first, or with the metadata server excluded from it.
fn check_start_order(case: &str, output: &str) {
    const MESHES: [(&str, &str, &[u16], &str, &str); 2] = [
        (
            "istio-proxy",
            "istio-init",
            wiproxy_common::mesh_ports::ISTIO,
            "traffic.sidecar.istio.io/excludeOutboundIPRanges",
            "169.254.169.254/32",
        ),
        (
            "linkerd-proxy",
            "linkerd-init",
            wiproxy_common::mesh_ports::LINKERD,
            "config.linkerd.io/skip-subnets",
            "169.254.169.254/32",
        ),
    ];
    for doc in yaml::parse_stream(output, case).expect("output is YAML") {
        let pod = match doc["kind"].as_str() {
            Some("Pod") => doc.clone(),
            Some("CronJob") => doc.pointer("/spec/jobTemplate/spec/template").cloned().unwrap_or_default(),
            _ => doc.pointer("/spec/template").cloned().unwrap_or_default(),
        };
        let names = |list: &str| -> Vec<Value> { pod["spec"][list].as_array().cloned().unwrap_or_default() };
        let (inits, containers) = (names("initContainers"), names("containers"));
        let position = |list: &[Value], name: &str| list.iter().position(|c| c["name"] == name);
        let (Some(sidecar), native) = (match position(&inits, "wiproxy") {
            Some(at) => (Some(at), true),
            None => (position(&containers, "wiproxy"), false),
        }) else {
            continue;
        };
        for (proxy, init, ports, exclusion, range) in MESHES {
            let excluded =
                pod["metadata"]["annotations"][exclusion].as_str().is_some_and(|v| v.split(',').any(|r| r == range));
            if let Some(at) = position(&inits, proxy) {
                assert!(!native || sidecar > at, "{case}: wiproxy starts before {proxy}, a native sidecar it needs");
            } else if let Some(at) = position(&containers, proxy) {
                let before_redirection = native && position(&inits, init).is_none_or(|init_at| sidecar < init_at);
                let after_proxy = !native && at < sidecar && at == 0;
                assert!(
                    before_redirection || after_proxy || excluded,
                    "{case}: wiproxy cannot reach the metadata server before {proxy} runs"
                );
            } else {
                continue;
            }
            let sidecar = if native { &inits[sidecar] } else { &containers[sidecar] };
            let env = |name: &str| {
                sidecar["env"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|e| e["name"] == name)
                    .and_then(|e| e["value"].as_str())
                    .unwrap_or_default()
                    .to_owned()
            };
            for listen in [env("WIPROXY_LISTEN"), env("WIPROXY_ADMIN_LISTEN")] {
                let port: u16 = listen.rsplit(':').next().and_then(|p| p.parse().ok()).expect("a port");
                assert!(!ports.contains(&port), "{case}: wiproxy listens on {port}, a port of {proxy}");
                for other in inits.iter().chain(&containers).filter(|c| c["name"] != "wiproxy") {
                    let declared = other["ports"].as_array().into_iter().flatten().any(|p| p["containerPort"] == port);
                    assert!(!declared, "{case}: wiproxy listens on {port}, declared by {}", other["name"]);
                }
            }
        }
    }
}

#[test]
fn golden_cases() {
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    let cases = cases();
    assert!(cases.len() >= 15, "expected at least 15 golden cases, found {}", cases.len());
    let mut failures = Vec::new();
    for dir in &cases {
        let case = dir.file_name().and_then(|n| n.to_str()).expect("case name").to_owned();
        let extra = fs::read_to_string(dir.join("args")).unwrap_or_default();
        let result = render_file(&dir.join("input.yaml"), &extra);
        let stderr = stderr_of(&result);
        let output = result.as_ref().ok().map(|r| r.output.clone());

        let expectations = [
            (dir.join("output.yaml"), output.clone()),
            (dir.join("stderr.txt"), Some(stderr).filter(|s| !s.is_empty())),
        ];
        for (path, actual) in expectations {
            if update {
                match &actual {
                    Some(text) => fs::write(&path, text).expect("write expectation"),
                    None => drop(fs::remove_file(&path)),
                }
                continue;
            }
            let expected = fs::read_to_string(&path).ok();
            if expected != actual {
                failures.push(format!(
                    "{case}: {} differs\n--- expected\n{}\n--- actual\n{}",
                    path.display(),
                    expected.unwrap_or_else(|| "<none>".into()),
                    actual.unwrap_or_else(|| "<none>".into())
                ));
            }
        }

        if let Some(output) = output {
            check_types(&case, &output);
            check_start_order(&case, &output);
            // Rendering the output again changes nothing and warns about nothing new.
            let again_path = std::env::temp_dir().join(format!("wiproxy-golden-{}-{case}.yaml", std::process::id()));
            fs::write(&again_path, &output).expect("write temp");
            let again = render_file(&again_path, &extra);
            let _ = fs::remove_file(&again_path);
            match again {
                Ok(again) => {
                    if again.output != output {
                        failures.push(format!("{case}: rendering the output again changed it"));
                    }
                }
                Err(e) => failures.push(format!("{case}: rendering the output again failed: {e}")),
            }
        }
    }
    assert!(failures.is_empty(), "{} golden case(s) failed:\n\n{}", failures.len(), failures.join("\n\n"));
}
