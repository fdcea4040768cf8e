use std::process::ExitCode;

use clap::Parser;
use tokio::sync::watch;
use wiproxy_sidecar::config::{Cli, Command};

/// mimalloc rather than glibc's malloc: a proxied request allocates and frees a few dozen
/// blocks, 16 KiB of them hyper's buffers for the request's connection, which mimalloc's
/// per-thread free lists serve for a fraction of glibc's instructions (about 7,000 fewer per
/// request). Built without transparent huge pages (`no_thp`), which would add 10 MiB of RSS
/// to a sidecar that needs 7.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    if rustls::crypto::ring::default_provider().install_default().is_err() {
        eprintln!("error: a rustls crypto provider was already installed");
        return ExitCode::FAILURE;
    }
    wiproxy_common::logging::init(&cli.settings.log, cli.settings.log_format);
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
