use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{anyhow, Context};
use clap::Parser;
use tracing_subscriber::EnvFilter;
use wiproxy_webhook::cluster::StaticCluster;
use wiproxy_webhook::config::{Cli, Command, LogFormat, NativeSidecars, RenderArgs, ServeArgs};
use wiproxy_webhook::live::{self, LiveCluster};
use wiproxy_webhook::policy::PolicySet;
use wiproxy_webhook::policy_status::{self, Policies};
use wiproxy_webhook::render;
use wiproxy_webhook::server::{self, ServeConfig};
use wiproxy_webhook::tls::ReloadingCertificate;
use wiproxy_webhook::{certs, yaml, Webhook};

fn main() -> ExitCode {
    let cli = Cli::parse();
    if rustls::crypto::ring::default_provider().install_default().is_err() {
        eprintln!("error: a rustls crypto provider was already installed");
        return ExitCode::FAILURE;
    }
    let result = match cli.command {
        Command::Serve(args) => {
            init_logging(&cli.log, cli.log_format);
            serve(args)
        }
        Command::Render(args) => {
            init_logging(&cli.log, LogFormat::Text);
            return render_command(args);
        }
        Command::Crd => {
            print!("{}", wiproxy_webhook::policy::crd_yaml());
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

fn init_logging(filter: &str, format: LogFormat) {
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).with_span_list(false).init(),
        LogFormat::Text => builder.init(),
    }
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(serve_async(args))
}

async fn serve_async(args: ServeArgs) -> anyhow::Result<()> {
    let required = args.shared.policy_required;
    let file_policies = match &args.shared.policy_file {
        Some(path) => Some(yaml::load_policies(path)?),
        None => None,
    };
    let self_signed = args.self_signed().map_err(|e| anyhow!(e))?;
    let from_files = || match (&args.tls_cert_file, &args.tls_key_file) {
        (Some(cert), Some(key)) => {
            ReloadingCertificate::load(cert, key).map(Some).context("loading --tls-cert-file/--tls-key-file")
        }
        _ => Ok(None),
    };

    let (webhook, synced, certificate): (Webhook, Option<server::Synced>, Arc<ReloadingCertificate>) = match &args
        .shared
        .cluster_file
    {
        // No Kubernetes API at all: policies and cluster state from files.
        Some(path) => {
            let Some(policies) = file_policies.or_else(|| (!required).then(Vec::new)) else {
                return Err(anyhow!("--cluster-file needs --policy-file (or --policy-required=false): there is no cluster to read policies from"));
            };
            let documents = yaml::parse_stream(&yaml::read_file(path)?, &path.display().to_string())?;
            let mut cluster = StaticCluster::default();
            cluster.add_documents(&documents, "default");
            // Without an API server to ask, `auto` assumes Kubernetes 1.29 or newer, as every supported GKE version is.
            let native = args.native_sidecars != NativeSidecars::Never;
            let sidecar = args.shared.sidecar(native).map_err(|e| anyhow!(e))?;
            if self_signed.is_some() {
                return Err(anyhow!("--self-signed-secret needs the Kubernetes API: give --tls-cert-file and --tls-key-file with --cluster-file"));
            }
            tracing::info!(policies = policies.len(), native, "running from files, without the Kubernetes API");
            let certificate = from_files()?.ok_or_else(|| anyhow!("give --tls-cert-file and --tls-key-file"))?;
            (
                Webhook::offline(sidecar, PolicySet::new(policies, required), Arc::new(cluster)),
                None,
                Arc::new(certificate),
            )
        }
        None => {
            let client = kube::Client::try_default()
                .await
                .context("connecting to the Kubernetes API (in-cluster or KUBECONFIG); pass --cluster-file and --policy-file to run without one")?;
            let native = match args.native_sidecars {
                NativeSidecars::Always => true,
                NativeSidecars::Never => false,
                NativeSidecars::Auto => live::supports_native_sidecars(&client)
                    .await
                    .context("reading the API server version for --native-sidecars auto")?,
            };
            let sidecar = args.shared.sidecar(native).map_err(|e| anyhow!(e))?;
            let cluster = Arc::new(LiveCluster::watch(client.clone()));
            let policies = Arc::new(Policies::new(PolicySet::new(file_policies.clone().unwrap_or_default(), required)));
            let policy_store =
                file_policies.is_none().then(|| policy_status::watch(client.clone(), policies.clone(), required));
            tracing::info!(native, policies_from_file = policy_store.is_none(), "running in the cluster");
            let watched = cluster.clone();
            let synced: server::Synced = Box::pin(async move {
                watched.synced().await;
                if let Some(store) = policy_store {
                    let _ = store.wait_until_ready().await;
                }
            });
            let webhook = Webhook { sidecar, policies, cluster: cluster.clone(), live: Some(cluster) };
            let certificate = match &self_signed {
                Some(config) => self_signed_certificate(&client, config).await,
                None => Arc::new(
                    from_files()?
                        .ok_or_else(|| anyhow!("give --tls-cert-file and --tls-key-file, or --self-signed-secret"))?,
                ),
            };
            (webhook, Some(synced), certificate)
        }
    };
    tracing::info!(image = %webhook.sidecar.image, "configured");
    let config = ServeConfig {
        listen: args.listen,
        admin_listen: args.admin_listen,
        certificate,
        watch_certificate_files: self_signed.is_none(),
        tls_reload_interval: args.tls_reload_interval(),
        drain_timeout: args.drain_timeout(),
        webhook,
    };
    server::run(config, synced).await
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
    let rendered =
        render::load(&args).and_then(|(input, source_name, options)| render::render(&input, &source_name, &options));
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
