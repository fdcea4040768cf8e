use std::io::Write;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{anyhow, Context};
use clap::Parser;
use wiproxy_common::logging::{self, LogFormat};
use wiproxy_webhook::cluster::{Cluster, LiveCluster, StaticCluster};
use wiproxy_webhook::config::{Cli, Command, Mode, NativeSidecars, RenderArgs, ServeArgs, ServingCertificate};
use wiproxy_webhook::policy::{Policy, PolicySet};
use wiproxy_webhook::policy_status::{self, Policies};
use wiproxy_webhook::render;
use wiproxy_webhook::server::{self, ServeConfig};
use wiproxy_webhook::settings::GkeAutopilot;
use wiproxy_webhook::tls::ReloadingCertificate;
use wiproxy_webhook::{certs, cluster, yaml, Webhook};

/// mimalloc rather than glibc's malloc, as in the sidecar: a review allocates and frees
/// thousands of small blocks (a typed pod, JSON values, the patch), which mimalloc's per-thread
/// free lists serve for far fewer instructions.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    if rustls::crypto::ring::default_provider().install_default().is_err() {
        eprintln!("error: a rustls crypto provider was already installed");
        return ExitCode::FAILURE;
    }
    let result = match cli.command {
        Command::Serve(args) => {
            logging::init(&cli.log, cli.log_format);
            serve(args)
        }
        Command::Render(args) => {
            logging::init(&cli.log, LogFormat::Text);
            return render_command(args);
        }
        Command::Crd => {
            print!("{}", wiproxy_webhook::yaml::crd_yaml());
            return ExitCode::SUCCESS;
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "exiting");
            ExitCode::FAILURE
        }
    }
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(serve_async(args))
}

/// What a run mode starts: the webhook, what `/readyz` waits for, and the serving pair.
struct Started {
    webhook: Webhook,
    synced: Option<server::Synced>,
    certificate: Arc<ReloadingCertificate>,
}

async fn serve_async(args: ServeArgs) -> anyhow::Result<()> {
    let mode = args.mode().map_err(|e| anyhow!(e))?;
    let file_policies = args.shared.policy_file.as_deref().map(yaml::load_policies).transpose()?;
    let started = match mode {
        Mode::Files { cluster_file, cert, key } => from_files(&args, file_policies, &cluster_file, &cert, &key)?,
        Mode::Cluster { certificate } => in_cluster(&args, file_policies, certificate).await?,
    };
    tracing::info!(image = %started.webhook.sidecar.image, "configured");
    let config = ServeConfig {
        listen: args.listen,
        admin_listen: args.admin_listen,
        certificate: started.certificate,
        tls_reload_interval: args.tls_reload_interval(),
        drain_timeout: args.drain_timeout(),
        connections: args.connections.clone(),
        webhook: started.webhook,
    };
    server::run(config, started.synced).await
}

/// No Kubernetes API at all: policies and cluster state from files.
fn from_files(
    args: &ServeArgs,
    policies: Option<Vec<Policy>>,
    cluster_file: &Path,
    cert: &Path,
    key: &Path,
) -> anyhow::Result<Started> {
    let policies = policies.unwrap_or_default();
    let documents = yaml::parse_stream(&yaml::read_file(cluster_file)?, &cluster_file.display().to_string())?;
    let mut cluster = StaticCluster::default();
    cluster.add_documents(&documents, "default");
    // Without an API server to ask, `auto` assumes Kubernetes 1.29 or newer, as every supported
    // GKE version is, and reads the kubelets from the Node documents of the cluster file.
    let native = args.native_sidecars.settle(None);
    let autopilot = args.gke_autopilot == GkeAutopilot::True;
    let sidecar = args.shared.sidecar(native, autopilot).map_err(|e| anyhow!(e))?;
    tracing::info!(policies = policies.len(), ?native, autopilot, "running from files, without the Kubernetes API");
    let certificate = ReloadingCertificate::load(cert, key).context("loading --tls-cert-file/--tls-key-file")?;
    let webhook = Webhook::from_files(sidecar, PolicySet::new(policies, args.shared.policy_required), cluster);
    Ok(Started { webhook, synced: None, certificate: Arc::new(certificate) })
}

/// In a cluster: the watched index, policies watched (unless from a file), the serving pair from
/// files or the self-signed Secret.
async fn in_cluster(
    args: &ServeArgs,
    file_policies: Option<Vec<Policy>>,
    certificate: ServingCertificate,
) -> anyhow::Result<Started> {
    let required = args.shared.policy_required;
    let client = kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API (in-cluster or KUBECONFIG); pass --cluster-file and --policy-file to run without one")?;
    let api_server_supports = match args.native_sidecars {
        NativeSidecars::Auto => Some(
            cluster::live::supports_native_sidecars(&client)
                .await
                .context("reading the API server version for --native-sidecars auto")?,
        ),
        NativeSidecars::Always | NativeSidecars::Never => None,
    };
    let native = args.native_sidecars.settle(api_server_supports);
    let autopilot = cluster::live::autopilot(args.gke_autopilot, &client)
        .await
        .context("detecting GKE Autopilot for --gke-autopilot auto; set --gke-autopilot true or false")?;
    let sidecar = args.shared.sidecar(native, autopilot).map_err(|e| anyhow!(e))?;
    let live = Arc::new(LiveCluster::watch(client.clone()));
    let policies = Arc::new(Policies::new(PolicySet::new(file_policies.clone().unwrap_or_default(), required)));
    let policy_store =
        file_policies.is_none().then(|| policy_status::watch(client.clone(), policies.clone(), required));
    tracing::info!(?native, autopilot, policies_from_file = policy_store.is_none(), "running in the cluster");
    let watched = live.clone();
    let synced: server::Synced = Box::pin(async move {
        watched.synced().await;
        if let Some(store) = policy_store {
            let _ = store.wait_until_ready().await;
        }
    });
    let certificate = match certificate {
        ServingCertificate::SelfSigned(config) => self_signed_certificate(&client, &config).await,
        ServingCertificate::Files { cert, key } => {
            Arc::new(ReloadingCertificate::load(&cert, &key).context("loading --tls-cert-file/--tls-key-file")?)
        }
    };
    let webhook = Webhook { sidecar, policies, cluster: Cluster::Live(live) };
    Ok(Started { webhook, synced: Some(synced), certificate })
}

/// Self-signed mode: the pair from the Secret (created if absent), retried until the API answers,
/// with the CA published and kept current in the background.
async fn self_signed_certificate(client: &kube::Client, config: &certs::SelfSigned) -> Arc<ReloadingCertificate> {
    loop {
        let pair = match certs::ensure(client, config, std::time::SystemTime::now()).await {
            Ok(pair) => pair,
            Err(e) => {
                tracing::warn!(error = %e, secret = %config.secret, "cannot get the serving certificate; retrying in 5 s");
                tokio::time::sleep(std::time::Duration::from_secs(5)).await;
                continue;
            }
        };
        let certificate = match ReloadingCertificate::from_pem(pair.cert_pem.as_bytes(), pair.key_pem.as_bytes()) {
            Ok(certificate) => Arc::new(certificate),
            Err(e) => {
                tracing::warn!(error = %e, secret = %config.secret, "the Secret's certificate does not load; retrying in 5 s");
                tokio::time::sleep(std::time::Duration::from_secs(5)).await;
                continue;
            }
        };
        if let Err(e) = certs::publish_ca(client, config, &pair.ca_pem).await {
            tracing::warn!(error = %e, "cannot update caBundle yet; it is retried every minute");
        }
        certs::maintain(client.clone(), config.clone(), certificate.clone(), std::time::Duration::from_secs(60));
        return certificate;
    }
}

fn render_command(args: RenderArgs) -> ExitCode {
    let rendered = args.load().and_then(|job| render::render(&job.input, &job.source_name, &job.options));
    match rendered {
        Ok(rendered) => {
            for warning in &rendered.warnings {
                eprintln!("warning: {warning}");
            }
            let mut stdout = std::io::stdout().lock();
            if stdout.write_all(rendered.output.as_bytes()).and_then(|()| stdout.flush()).is_err() {
                return ExitCode::FAILURE;
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            for line in e.to_string().lines() {
                eprintln!("error: {line}");
            }
            ExitCode::FAILURE
        }
    }
}
