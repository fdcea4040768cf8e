//! `serve`: the admission endpoint over TLS and the plain admin port, with graceful drain.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use hyper_util::service::TowerToHyperService;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tracing::field::Empty;
use tracing::{debug, info, info_span, warn, Instrument};

use crate::admission;
use crate::metrics::Metrics;
use crate::review::Endpoint;
use crate::tls::ReloadingCertificate;
use crate::Webhook;

/// Largest review body accepted. Kubernetes objects stay under 1.5 MiB; a review may carry the
/// object twice (object and oldObject).
pub const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone)]
pub struct AppState {
    pub webhook: Arc<Webhook>,
    pub metrics: Arc<Metrics>,
    /// Set once shutdown starts: `/readyz` fails so the Service stops sending new reviews.
    pub draining: Arc<AtomicBool>,
    /// Set once the policies and the cluster state have been read (at once from files).
    pub synced: Arc<AtomicBool>,
    pub max_body_bytes: usize,
}

impl AppState {
    pub fn new(webhook: Webhook) -> Self {
        Self {
            webhook: Arc::new(webhook),
            metrics: Arc::new(Metrics::default()),
            draining: Arc::new(AtomicBool::new(false)),
            synced: Arc::new(AtomicBool::new(true)),
            max_body_bytes: MAX_BODY_BYTES,
        }
    }
}

/// The admission routes, served over TLS.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/mutate", post(|state, request| handle(state, request, Endpoint::Mutate)))
        .route("/validate", post(|state, request| handle(state, request, Endpoint::Validate)))
        .fallback(not_found)
        .with_state(state)
}

/// The admin routes, served over plain HTTP.
pub fn admin_router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

fn error(status: StatusCode, message: impl std::fmt::Display) -> Response {
    (status, Json(json!({"error": message.to_string()}))).into_response()
}

async fn not_found() -> Response {
    error(
        StatusCode::NOT_FOUND,
        "no such endpoint: the webhook serves POST /mutate (pods) and POST /validate (workloads)",
    )
}

async fn handle(State(state): State<AppState>, request: Request, endpoint: Endpoint) -> Response {
    let started = Instant::now();
    let body = match axum::body::to_bytes(request.into_body(), state.max_body_bytes).await {
        Ok(body) => body,
        Err(e) => {
            let too_large =
                std::error::Error::source(&e).is_some_and(|source| source.is::<http_body_util::LengthLimitError>());
            state.metrics.review(endpoint.name(), "error", "body", started.elapsed().as_secs_f64());
            return if too_large {
                warn!(limit = state.max_body_bytes, "review body too large");
                error(StatusCode::PAYLOAD_TOO_LARGE, format!("body is larger than {} bytes", state.max_body_bytes))
            } else {
                error(StatusCode::BAD_REQUEST, format!("cannot read body: {e}"))
            };
        }
    };
    let span = info_span!("review", webhook = endpoint.name(), uid = Empty, ns = Empty, object = Empty);
    match admission::answer(&state.webhook, endpoint, &body).instrument(span.clone()).await {
        Ok((response, decision)) => {
            let labels = decision.labels();
            span.in_scope(|| {
                info!(
                    result = labels.result,
                    reason = labels.reason,
                    gsa = labels.gsa,
                    policy = labels.policy,
                    "reviewed"
                );
            });
            state.metrics.review(labels.webhook, labels.result, labels.reason, started.elapsed().as_secs_f64());
            ([(header::CONTENT_TYPE, "application/json")], response).into_response()
        }
        Err(e) => {
            warn!(reason = e.reason(), error = %e, "malformed review");
            state.metrics.review(endpoint.name(), "error", e.reason(), started.elapsed().as_secs_f64());
            error(StatusCode::BAD_REQUEST, e)
        }
    }
}

async fn readyz(State(state): State<AppState>) -> Response {
    if state.draining.load(Ordering::Relaxed) {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response()
    } else if !state.synced.load(Ordering::Relaxed) {
        (StatusCode::SERVICE_UNAVAILABLE, "waiting for the first list of policies, namespaces and service accounts\n")
            .into_response()
    } else {
        (StatusCode::OK, "ready\n").into_response()
    }
}

async fn metrics(State(state): State<AppState>) -> Response {
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], state.metrics.encode())
        .into_response()
}

/// Serves `app` over TLS on `listener` until `shutdown` turns true, then lets in-flight
/// connections finish for up to `drain`.
pub async fn serve_tls(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    app: Router,
    shutdown: watch::Receiver<bool>,
    drain: Duration,
) {
    let acceptor = TlsAcceptor::from(tls);
    let open = move |stream| {
        let accepting = tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream));
        async move {
            match accepting.await {
                Ok(Ok(stream)) => Some(stream),
                Ok(Err(e)) => {
                    debug!(error = %e, "TLS handshake failed");
                    None
                }
                Err(_) => {
                    debug!("TLS handshake timed out");
                    None
                }
            }
        }
    };
    let service = move || TowerToHyperService::new(app.clone());
    wiproxy_common::serve::serve(listener, shutdown, drain, open, service).await;
}

/// Everything `serve` needs, already checked.
pub struct ServeConfig {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    /// The serving pair: polled when it comes from files, replaced by its owner otherwise.
    pub certificate: Arc<ReloadingCertificate>,
    pub tls_reload_interval: Duration,
    pub drain_timeout: Duration,
    pub webhook: Webhook,
}

/// Completes once the cluster state has been read; `/readyz` fails until then.
pub type Synced = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// Runs the webhook until SIGTERM or Ctrl-C.
pub async fn run(config: ServeConfig, synced: Option<Synced>) -> anyhow::Result<()> {
    let state = AppState::new(config.webhook);
    if let Some(synced) = synced {
        state.synced.store(false, Ordering::Relaxed);
        let flag = state.synced.clone();
        tokio::spawn(async move {
            synced.await;
            info!("policies, namespaces and service accounts listed");
            flag.store(true, Ordering::Relaxed);
        });
    }
    let metrics = state.metrics.clone();
    config.certificate.clone().watch(config.tls_reload_interval, move |result| match result {
        Ok(true) => {
            info!("serving certificate reloaded");
            metrics.reload("success");
        }
        Ok(false) => {}
        Err(e) => {
            warn!(error = %e, "serving certificate not reloaded; the previous one stays");
            metrics.reload("error");
        }
    });
    let tls = Arc::new(config.certificate.clone().server_config());

    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {} (--listen): {e}", config.listen))?;
    let admin = TcpListener::bind(config.admin_listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {} (--admin-listen): {e}", config.admin_listen))?;
    info!(listen = %config.listen, admin = %config.admin_listen, "serving");

    let (stop, stopped) = watch::channel(false);
    let draining = state.draining.clone();
    tokio::spawn(async move {
        wiproxy_common::serve::shutdown_signal().await;
        info!("shutting down: draining in-flight reviews");
        draining.store(true, Ordering::Relaxed);
        let _ = stop.send(true);
    });

    let mut admin_stopped = stopped.clone();
    let admin_app = admin_router(state.clone());
    let admin_task = tokio::spawn(async move {
        let shutdown = async move {
            let _ = admin_stopped.wait_for(|stop| *stop).await;
        };
        axum::serve(admin, admin_app).with_graceful_shutdown(shutdown).await
    });
    serve_tls(listener, tls, router(state), stopped, config.drain_timeout).await;
    admin_task.await??;
    Ok(())
}
