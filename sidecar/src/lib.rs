//! wiproxy, the token-proxy sidecar: listens on the pod's loopback, adds a Google-signed ID token
//! for each configured upstream, and forwards over HTTPS.

pub mod admin;
pub mod body;
pub mod cache;
pub mod config;
pub mod credential_file;
pub mod credentials;
pub mod http;
pub mod metrics;
pub mod proxy;
pub mod retry_buffer;
pub mod routes;
pub mod source;
pub mod token;
pub mod upstream;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::info;
use wiproxy_common::serve::{ConnectionPolicy, RequestBody};

use crate::admin::Admin;
use crate::body::Body;
use crate::cache::TokenCache;
use crate::config::Config;
use crate::credentials::CredentialSource;
use crate::metrics::Metrics;
use crate::proxy::Proxy;
use crate::routes::Routes;
use crate::source::FetchError;
use crate::token::Token;
use crate::upstream::Clients;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot listen on {addr} ({what}): {error}")]
    Listen { addr: std::net::SocketAddr, what: String, error: std::io::Error },
}

/// Runs the proxy and the admin server until `shutdown` turns true.
pub async fn run(config: Config, shutdown: watch::Receiver<bool>) -> Result<(), RunError> {
    let metrics = Arc::new(Metrics::default());
    let clients = Clients::new(config.tls, config.pins, config.connect_timeout);
    let routes = Routes::new(&config.upstreams, config.token_header, config.listen);
    let source = Arc::new(CredentialSource { credentials: config.credentials.clone(), clients: clients.clone() });
    let audiences = routes.iter().map(|r| r.audience.clone());
    let cache = TokenCache::start(audiences, source, config.expected_service_account.clone(), metrics.clone());

    let listen = |addr, what: String| async move {
        TcpListener::bind(addr).await.map_err(|error| RunError::Listen { addr, what, error })
    };
    let proxy_listener = listen(config.listen, "WIPROXY_LISTEN".into()).await?;
    let admin_listener = listen(config.admin_listen, "WIPROXY_ADMIN_LISTEN".into()).await?;
    // Each upstream with `listen=PORT` gets its own port, on the proxy's address.
    let mut port_listeners = Vec::new();
    for (index, route) in routes.iter().enumerate() {
        if let Some(port) = route.listen {
            let addr = std::net::SocketAddr::new(config.listen.ip(), port);
            let what = format!("listen={port} of upstream {:?} in WIPROXY_UPSTREAMS", route.name);
            port_listeners.push((index, listen(addr, what).await?));
        }
    }
    info!(
        listen = %config.listen,
        ports = port_listeners
            .iter()
            .map(|(index, l)| format!("{}={}", routes.get(*index).name, l.local_addr().map(|a| a.to_string()).unwrap_or_default()))
            .collect::<Vec<_>>()
            .join(","),
        admin = %config.admin_listen,
        credentials = %config.credentials.describe(),
        upstreams = routes.iter().map(|r| r.name.as_str()).collect::<Vec<_>>().join(","),
        "serving"
    );

    let proxy = Arc::new(Proxy::new(
        routes.clone(),
        &cache,
        clients,
        &metrics,
        config.token_wait,
        config.upstream_timeout,
        crate::retry_buffer::RetryBuffer::new(config.retry_buffer_bytes),
    ));
    let admin = Arc::new(Admin { routes, cache, metrics });
    let mut tasks = vec![tokio::spawn(serve(admin_listener, admin::policy(), shutdown.clone(), move |request| {
        let admin = admin.clone();
        async move { admin.handle(request).await }
    }))];
    for (index, listener) in port_listeners {
        let proxy = proxy.clone();
        let policy = config.connections.shared("upstream port");
        tasks.push(tokio::spawn(serve(listener, policy, shutdown.clone(), move |request| {
            let proxy = proxy.clone();
            async move { proxy.handle_port(index, request).await }
        })));
    }
    serve(proxy_listener, config.connections, shutdown, move |request| {
        let proxy = proxy.clone();
        async move { proxy.handle(request).await }
    })
    .await;
    for task in tasks {
        let _ = task.await;
    }
    Ok(())
}

/// Serves HTTP/1.1 (with upgrades) and h2c on `listener` with `handler` under `policy`; on
/// shutdown, lets open requests finish for up to 10 s.
pub async fn serve<F, Fut>(listener: TcpListener, policy: ConnectionPolicy, shutdown: watch::Receiver<bool>, handler: F)
where
    F: Fn(hyper::Request<RequestBody>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = hyper::Response<Body>> + Send + 'static,
{
    let open = |stream| async move { Some(stream) };
    let service = move || {
        let handler = handler.clone();
        service_fn(move |request| {
            let handler = handler.clone();
            async move {
                let response = handler(request).await;
                if response.extensions().get::<crate::proxy::RefuseStream>().is_some() {
                    // hyper resets the stream with the h2 reason it finds in the error.
                    return Err(h2::Error::from(h2::Reason::REFUSED_STREAM));
                }
                Ok(response)
            }
        })
    };
    wiproxy_common::serve::serve(listener, policy, shutdown, Duration::from_secs(10), open, service).await;
}

/// `wiproxy token`: one fetch through the configured credentials, no cache.
pub async fn print_token(config: &Config, audience: &str) -> Result<Token, FetchError> {
    let clients = Clients::new(config.tls.clone(), config.pins.clone(), config.connect_timeout);
    let token = config.credentials.fetch(&clients, audience).await?;
    if let Some(expected) = &config.expected_service_account {
        if !token.email.as_deref().is_some_and(|email| email.eq_ignore_ascii_case(expected)) {
            return Err(FetchError::Invalid(format!(
                "the token is for {}, not for the expected service account {expected}",
                token.email.as_deref().unwrap_or("no email")
            )));
        }
    }
    Ok(token)
}
