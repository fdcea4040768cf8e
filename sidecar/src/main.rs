use std::process::ExitCode;

use clap::Parser;
use tokio::sync::watch;
use tracing_subscriber::filter::Targets;
use wiproxy_sidecar::config::{Cli, Command, LogFormat};

fn main() -> ExitCode {
    let cli = Cli::parse();
    if rustls::crypto::ring::default_provider().install_default().is_err() {
        eprintln!("error: a rustls crypto provider was already installed");
        return ExitCode::FAILURE;
    }
    init_logging(&cli.settings.log, cli.settings.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let token_command = matches!(cli.command, Some(Command::Token(_)));
    let config = match cli
        .settings
        .config(!token_command || matches!(&cli.command, Some(Command::Token(t)) if t.upstream.is_some()))
    {
        Ok(config) => config,
        Err(e) => {
            tracing::error!(error = %e, "invalid configuration");
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    match cli.command {
        Some(Command::Token(args)) => {
            let audience = match (args.audience, args.upstream) {
                (Some(audience), _) => audience,
                // clap's argument group makes one of --audience and --upstream required.
                (None, name) => {
                    let name = name.unwrap_or_default();
                    match config.upstreams.iter().find(|u| u.name == name) {
                        Some(upstream) => upstream.audience.clone(),
                        None => {
                            eprintln!("error: --upstream {name:?} is not in WIPROXY_UPSTREAMS");
                            return ExitCode::FAILURE;
                        }
                    }
                }
            };
            match runtime.block_on(wiproxy_sidecar::print_token(&config, &audience)) {
                Ok(token) => {
                    println!("{}", token.secret());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        None | Some(Command::Proxy) => {
            let (stop, stopped) = watch::channel(false);
            runtime.spawn(async move {
                wiproxy_common::serve::shutdown_signal().await;
                tracing::info!("shutting down");
                let _ = stop.send(true);
            });
            match runtime.block_on(wiproxy_sidecar::run(config, stopped)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = %e, "exiting");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn init_logging(filter: &str, format: LogFormat) {
    let targets: Targets = filter.parse().unwrap_or_else(|_| Targets::new().with_default(tracing::Level::INFO));
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let registry = tracing_subscriber::registry().with(targets);
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(false);
    match format {
        LogFormat::Json => registry.with(fmt.json().flatten_event(true)).init(),
        LogFormat::Text => registry.with(fmt).init(),
    }
}
