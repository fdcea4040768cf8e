//! `make demo`: the whole story on one machine, with no cluster and no Google account.
//!
//! 1. `wiproxy-webhook render` injects `examples/deployment.yaml` under `examples/policy.yaml`.
//! 2. A fake GKE metadata server (the KSA bound to the policy's GSA) and a fake Cloud Function
//!    front end on HTTPS start on loopback.
//! 3. The sidecar starts with exactly the env of the rendered `wiproxy` container, plus the three
//!    settings that point it at the fakes instead of Google.
//! 4. A direct call to the function is refused; the same call through the sidecar is answered.
//! 5. Off GKE: the same Deployment rendered for Workload Identity Federation, and the sidecar
//!    reaching the function with a projected token of a cluster outside GKE: no key anywhere.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use serde_json::Value;
use wiproxy_tests::client::{https_get, Http};
use wiproxy_tests::google::{wif_principal, wif_token_audience, WIF_PROVIDER};
use wiproxy_tests::sidecar::{binary, free_port, Sidecar};
use wiproxy_tests::world::{World, FUNCTION_HOST};

fn step(text: &str) {
    println!("\n== {text}");
}

fn env_of(container: &Value) -> Vec<(String, String)> {
    container["env"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| Some((e["name"].as_str()?.to_owned(), e["value"].as_str()?.to_owned())))
        .collect()
}

/// Polls `/readyz` for up to 20 s; returns its last answer.
async fn wait_ready(http: &Http, sidecar: &Sidecar) -> wiproxy_tests::client::Reply {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let reply = http.get(&sidecar.admin_url("/readyz")).await;
        if reply.status.is_success() || Instant::now() > deadline {
            return reply;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn main() -> anyhow::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    std::env::set_current_dir(&root).context("entering the project root")?;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(demo())
}

async fn demo() -> anyhow::Result<()> {
    step("The app team's change: one label and one annotation (examples/deployment.yaml)");
    let deployment = std::fs::read_to_string("examples/deployment.yaml")?;
    for line in deployment.lines().filter(|l| l.contains("wiproxy.io/") && !l.trim_start().starts_with('#')) {
        println!("  {}", line.trim());
    }

    step("wiproxy-webhook render -f examples/deployment.yaml --policy-file examples/policy.yaml");
    let output = Command::new(binary("wiproxy-webhook"))
        .args(["render", "-f", "examples/deployment.yaml", "--policy-file", "examples/policy.yaml"])
        .output()
        .context("running wiproxy-webhook render")?;
    if !output.status.success() {
        bail!("render failed: {}", String::from_utf8_lossy(&output.stderr));
    }
    let rendered = String::from_utf8(output.stdout)?;
    let documents: Vec<Value> = serde_saphyr::from_multiple(&rendered).context("reading the rendered YAML")?;
    let account = documents.iter().find(|d| d["kind"] == "ServiceAccount").ok_or(anyhow!("no ServiceAccount"))?;
    println!(
        "  ServiceAccount {}: iam.gke.io/gcp-service-account={}",
        account["metadata"]["name"].as_str().unwrap_or(""),
        account["metadata"]["annotations"]["iam.gke.io/gcp-service-account"].as_str().unwrap_or("<missing>")
    );
    let pod = documents
        .iter()
        .find(|d| d["kind"] == "Deployment")
        .map(|d| &d["spec"]["template"]["spec"])
        .ok_or(anyhow!("no Deployment in the output"))?;
    let sidecar_container = pod["initContainers"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["name"] == "wiproxy"))
        .ok_or(anyhow!("no wiproxy init container"))?;
    let app = &pod["containers"][0];
    println!(
        "  native sidecar: initContainers[0] {} (restartPolicy {})",
        sidecar_container["image"].as_str().unwrap_or(""),
        sidecar_container["restartPolicy"].as_str().unwrap_or("-")
    );
    println!("  nodeSelector: {}", pod["nodeSelector"]);
    let app_env = env_of(app);
    for (name, value) in &app_env {
        println!("  app env {name}={value}");
    }
    let mut env = env_of(sidecar_container);
    for (name, value) in &env {
        println!("  sidecar env {name}={value}");
    }

    step("Fakes on loopback: GKE metadata server (KSA bound to the GSA) and the Cloud Function front end");
    let world = World::start().await;
    println!("  metadata server  http://{}", world.metadata);
    println!("  {FUNCTION_HOST}  https://{} (test CA), invokers: the policy's GSA", world.function_addr);

    step("Starting the sidecar with that env, plus the settings that reach the fakes instead of Google");
    let local = [
        ("GCE_METADATA_HOST".to_owned(), world.metadata.to_string()),
        ("WIPROXY_EXTRA_CA_FILE".to_owned(), world.ca_file.display().to_string()),
        ("WIPROXY_RESOLVE".to_owned(), world.resolve()),
        // Loopback instead of 0.0.0.0:15081: no need to open the admin port to the network here.
        ("WIPROXY_ADMIN_LISTEN".to_owned(), format!("127.0.0.1:{}", free_port())),
        ("WIPROXY_LOG_FORMAT".to_owned(), "text".to_owned()),
    ];
    for (name, value) in &local {
        println!("  + {name}={value}");
    }
    env.retain(|(name, _)| !local.iter().any(|(n, _)| n == name));
    env.extend(local);
    let sidecar = Sidecar::start(&env);
    let http = Http::new();
    let ready = wait_ready(&http, &sidecar).await;
    println!("  /readyz {}: {}", ready.status.as_u16(), ready.text());
    if !ready.status.is_success() {
        bail!("the sidecar did not become ready:\n{}", sidecar.log());
    }

    let orders_url = app_env
        .iter()
        .find(|(n, _)| n == "WIPROXY_ORDERS_URL")
        .map(|(_, v)| v.clone())
        .ok_or(anyhow!("no WIPROXY_ORDERS_URL"))?;
    step(&format!("A direct call: GET https://{FUNCTION_HOST}/orders/v1/orders without a token"));
    let direct = https_get(world.function_addr, FUNCTION_HOST, "/orders/v1/orders", world.ca.client_config())
        .await
        .map_err(|e| anyhow!("direct call failed: {e}"))?;
    println!("  {} {}", direct.status.as_u16(), direct.status.canonical_reason().unwrap_or(""));
    // Google's front end answers a call without a token 403, as to a caller without the role.
    if direct.status.as_u16() != 403 {
        bail!("the function should refuse a call without a token with 403");
    }

    step(&format!("The same call through the sidecar: GET $WIPROXY_ORDERS_URL/v1/orders ({orders_url}/v1/orders)"));
    let through = http.get(&format!("{orders_url}/v1/orders?status=open")).await;
    println!("  {} {}", through.status.as_u16(), through.status.canonical_reason().unwrap_or(""));
    let answer = through.json();
    for field in ["method", "host", "path", "query", "email", "audience", "token_header"] {
        println!("  function saw {field}: {}", answer[field]);
    }
    if !through.status.is_success() {
        bail!("the call through the sidecar failed: {}", through.text());
    }

    step("The token's non-secret claims (from /_wiproxy/token, signature left out)");
    let token = http.token(&sidecar.url("/_wiproxy/token?upstream=orders")).await.text();
    let claims = world.google.verifier().verify(token.trim()).map_err(|e| anyhow!("token: {e}"))?;
    for claim in ["iss", "aud", "email", "email_verified", "iat", "exp"] {
        println!("  {claim}: {}", claims[claim]);
    }
    let lifetime = claims["exp"].as_u64().unwrap_or(0).saturating_sub(claims["iat"].as_u64().unwrap_or(0));
    println!("  lifetime: {lifetime} s (refreshed in the background 240 s before exp)");
    sidecar.assert_log_free_of(&world.google.minted());

    step("Governance: the same Deployment asking for a GSA outside the policy is refused");
    let forbidden = deployment.replace(
        "wiproxy.io/upstreams:",
        "wiproxy.io/service-account: admin@host-project.iam.gserviceaccount.com\n        wiproxy.io/upstreams:",
    );
    let mut child = Command::new(binary("wiproxy-webhook"))
        .args(["render", "-f", "-", "--policy-file", "examples/policy.yaml"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("running wiproxy-webhook render")?;
    if let Some(mut stdin) = child.stdin.take() {
        std::io::Write::write_all(&mut stdin, forbidden.as_bytes())?;
    }
    let refused = child.wait_with_output()?;
    println!("  exit {}: {}", refused.status.code().unwrap_or(-1), String::from_utf8_lossy(&refused.stderr).trim());
    if refused.status.success() {
        bail!("a GSA outside the policy was not refused");
    }

    federation(&world).await?;

    println!("\nDemo finished: the function answered only through the sidecar, on GKE and off it.");
    Ok(())
}

/// The second story: a cluster outside GKE, keyless through Workload Identity Federation.
async fn federation(world: &World) -> anyhow::Result<()> {
    step(&format!("Off GKE: wiproxy-webhook render … --workload-identity-provider {WIF_PROVIDER}"));
    let output = Command::new(binary("wiproxy-webhook"))
        .args(["render", "-f", "examples/deployment.yaml", "--policy-file", "examples/policy.yaml"])
        .args(["--workload-identity-provider", WIF_PROVIDER])
        .output()
        .context("running wiproxy-webhook render")?;
    if !output.status.success() {
        bail!("render failed: {}", String::from_utf8_lossy(&output.stderr));
    }
    let documents: Vec<Value> =
        serde_saphyr::from_multiple(&String::from_utf8(output.stdout)?).context("reading the rendered YAML")?;
    let deployment = documents.iter().find(|d| d["kind"] == "Deployment").ok_or(anyhow!("no Deployment"))?;
    let template = &deployment["spec"]["template"];
    let pod = &template["spec"];
    let sidecar_container = pod["initContainers"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["name"] == "wiproxy"))
        .ok_or(anyhow!("no wiproxy init container"))?;
    let mapped = documents.iter().any(|d| {
        d["kind"] == "ServiceAccount" && !d["metadata"]["annotations"]["iam.gke.io/gcp-service-account"].is_null()
    });
    println!("  nodeSelector: {}; ServiceAccount annotated: {mapped}", pod["nodeSelector"]);
    let volume = pod["volumes"]
        .as_array()
        .and_then(|vs| vs.iter().find(|v| v["name"] == "wiproxy-federation"))
        .ok_or(anyhow!("no federation volume"))?;
    println!("  projected token: {}", volume["projected"]["sources"][0]["serviceAccountToken"]);
    println!("  mounted into: {} only", sidecar_container["volumeMounts"][0]["mountPath"]);
    let configuration = template["metadata"]["annotations"]["wiproxy.io/credential-configuration"]
        .as_str()
        .ok_or(anyhow!("no credential configuration"))?;
    let mut configuration: Value = serde_json::from_str(configuration)?;
    println!("  credential configuration: audience {}", configuration["audience"]);
    println!("                            impersonates {}", configuration["service_account_impersonation_url"]);
    if !pod["nodeSelector"].is_null() || mapped {
        bail!("federation must not add GKE's node selector or ServiceAccount annotation");
    }

    step("The kubelet's part, played here: the projected token and the configuration in a folder");
    let gsa = configuration["service_account_impersonation_url"]
        .as_str()
        .and_then(|u| u.rsplit_once("/serviceAccounts/"))
        .and_then(|(_, rest)| rest.strip_suffix(":generateAccessToken"))
        .ok_or(anyhow!("no GSA in the configuration"))?
        .to_owned();
    let ksa = pod["serviceAccountName"].as_str().unwrap_or("default");
    let namespace = deployment["metadata"]["namespace"].as_str().unwrap_or("default");
    world
        .google
        .federated_bindings
        .lock()
        .map_err(|_| anyhow!("lock"))?
        .push((wif_principal(namespace, ksa), gsa.clone()));
    println!("  IAM: {} may act as {gsa} (roles/iam.workloadIdentityUser)", wif_principal(namespace, ksa));
    let dir = tempfile::tempdir()?;
    let token_path = dir.path().join("token");
    std::fs::write(&token_path, world.google.cluster_token(namespace, ksa, &wif_token_audience(), 600))?;
    configuration["credential_source"]["file"] = Value::String(token_path.display().to_string());
    let configuration_path = dir.path().join("credential-configuration.json");
    std::fs::write(&configuration_path, configuration.to_string())?;
    println!("  {} (a ServiceAccount token of this cluster, 10 minutes)", token_path.display());

    let mut env = env_of(sidecar_container);
    let local = [
        ("WIPROXY_CREDENTIALS".to_owned(), format!("external-account:{}", configuration_path.display())),
        // No metadata server here: a port nothing listens on.
        ("GCE_METADATA_HOST".to_owned(), "127.0.0.1:9".to_owned()),
        ("WIPROXY_EXTRA_CA_FILE".to_owned(), world.ca_file.display().to_string()),
        ("WIPROXY_RESOLVE".to_owned(), world.resolve()),
        ("WIPROXY_ADMIN_LISTEN".to_owned(), format!("127.0.0.1:{}", free_port())),
        ("WIPROXY_LISTEN".to_owned(), format!("127.0.0.1:{}", free_port())),
        ("WIPROXY_LOG_FORMAT".to_owned(), "text".to_owned()),
    ];
    env.retain(|(name, _)| !local.iter().any(|(n, _)| n == name));
    env.extend(local);
    let sidecar = Sidecar::start(&env);
    let http = Http::new();
    let ready = wait_ready(&http, &sidecar).await;
    println!("  /readyz {}", ready.status.as_u16());
    if !ready.status.is_success() {
        bail!("the sidecar did not become ready through federation:\n{}", sidecar.log());
    }

    step("The call through the sidecar, keyless: projected token → STS → generateIdToken → the function");
    let through = http.get(&sidecar.url("/orders/v1/orders")).await;
    println!("  {} {}", through.status.as_u16(), through.status.canonical_reason().unwrap_or(""));
    println!("  function saw email: {}", through.json()["email"]);
    println!("  STS exchanges: {}", world.google.sts_subjects.lock().map(|s| s.len()).unwrap_or(0));
    if !through.status.is_success() || through.json()["email"] != gsa.as_str() {
        bail!("the call through federation failed: {}", through.text());
    }
    sidecar.assert_log_free_of(&world.google.minted());
    Ok(())
}
