use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{anyhow, Context};
use clap::Parser;
use tracing_subscriber::EnvFilter;
use wiproxy_webhook::cluster::StaticCluster;
use wiproxy_webhook::config::{Cli, Command, LogFormat, NativeSidecars, RenderArgs, ServeArgs};
use wiproxy_webhook::policy::PolicySet;
use wiproxy_webhook::render;
use wiproxy_webhook::server::{self, ServeConfig};
use wiproxy_webhook::tls::ReloadingCertificate;
use wiproxy_webhook::{yaml, Webhook};

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
    // Without an API server to ask, `auto` assumes Kubernetes 1.29 or newer, as every supported GKE version is.
    let native = args.native_sidecars != NativeSidecars::Never;
    let sidecar = args.shared.sidecar(native).map_err(|e| anyhow!(e))?;
    let policies = match &args.shared.policy_file {
        Some(path) => yaml::load_policies(path)?,
        None if !args.shared.policy_required => Vec::new(),
        None => {
            return Err(anyhow!(
                "--policy-file is required: this build reads TokenProxyPolicies from a file only (or pass --policy-required=false)"
            ))
        }
    };
    let mut cluster = StaticCluster::default();
    if let Some(path) = &args.shared.cluster_file {
        let documents = yaml::parse_stream(&yaml::read_file(path)?, &path.display().to_string())?;
        cluster.add_documents(&documents, "default");
    }
    let certificate = ReloadingCertificate::load(&args.tls_cert_file, &args.tls_key_file)
        .context("loading --tls-cert-file/--tls-key-file")?;
    tracing::info!(policies = policies.len(), native, image = %sidecar.image, "configured");
    let config = ServeConfig {
        listen: args.listen,
        admin_listen: args.admin_listen,
        certificate: Arc::new(certificate),
        tls_reload_interval: args.tls_reload_interval(),
        drain_timeout: args.drain_timeout(),
        webhook: Webhook {
            sidecar,
            policies: PolicySet::new(policies, args.shared.policy_required),
            cluster: Arc::new(cluster),
        },
    };
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(server::run(config))
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
