//! `serve`: the admission endpoint over TLS and the plain admin port, with graceful drain.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::{Bytes, HttpBody};
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use http_body_util::BodyExt;
use hyper_util::service::TowerToHyperService;
use serde_json::json;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;
use tracing::field::Empty;
use tracing::{debug, info, info_span, warn, Instrument};
use wiproxy_common::serve::ConnectionPolicy;

use crate::admission;
use crate::metrics::Metrics;
use crate::review::Endpoint;
use crate::tls::ReloadingCertificate;
use crate::Webhook;

/// Largest review body accepted. Kubernetes objects stay under 1.5 MiB; a review may carry the
/// object twice (object and oldObject).
pub const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;

/// Review bodies held at once, in bytes: four at the largest size. A review costs a few times
/// its body while it is decided (the scan holds nothing; the parsed pod, the patch, the answer
/// are bounded by the review limits), so this bounds the webhook's memory however many reviews
/// arrive together. It is charged by the bytes each body has sent, as they arrive, never by a
/// declared length: a body that stalls holds what it sent, until the body timeout. A chunk that
/// does not fit is refused at once with 503 (waiting would let bodies that each hold a part
/// wait on one another).
pub const REVIEW_BUDGET_BYTES: usize = 4 * MAX_BODY_BYTES;

/// How the admission port and the admin port treat their connections (see docs/webhook.md,
/// "Connection limits"). Every value is a flag, with env `WIPROXY_WEBHOOK_<FLAG>`.
#[derive(Debug, Clone, clap::Args)]
pub struct ConnectionArgs {
    /// Connections the admission port serves at once; more wait in the kernel's backlog.
    #[arg(long, env = "WIPROXY_WEBHOOK_MAX_CONNECTIONS", value_name = "N", default_value_t = 512)]
    pub max_connections: usize,
    /// Longest time for a TLS handshake or a request's headers (and an idle HTTP/1.1
    /// keep-alive), in seconds.
    #[arg(long, env = "WIPROXY_WEBHOOK_HEADER_TIMEOUT", value_name = "SECONDS", default_value_t = 10)]
    pub header_timeout: u64,
    /// Longest time to receive a review's whole body, in seconds; past it the answer is 408.
    #[arg(long, env = "WIPROXY_WEBHOOK_BODY_TIMEOUT", value_name = "SECONDS", default_value_t = 10)]
    pub body_timeout: u64,
    /// A connection with no review in flight for this long is closed, in seconds.
    #[arg(long, env = "WIPROXY_WEBHOOK_IDLE_TIMEOUT", value_name = "SECONDS", default_value_t = 60)]
    pub idle_timeout: u64,
}

impl Default for ConnectionArgs {
    fn default() -> Self {
        Self { max_connections: 512, header_timeout: 10, body_timeout: 10, idle_timeout: 60 }
    }
}

/// Largest request head on the admission port: the API server sends a few short headers.
const ADMISSION_HEADER_BYTES: usize = 64 * 1024;
/// The admin port (kubelet probes, Prometheus): a small cap and small heads of its own, so
/// nothing on it can take resources from the admission port. 64 slots, 16 per source address (a
/// quarter): one pod holding its share leaves the kubelet's probes 48, and silent connections
/// leave first for them (see docs/webhook.md, "Connection limits").
const ADMIN_CONNECTIONS: usize = 64;
const ADMIN_HEADER_BYTES: usize = 16 * 1024;
const ADMIN_TIMEOUT: Duration = Duration::from_secs(5);
const ADMIN_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

impl ConnectionArgs {
    /// The admission port's policy.
    pub fn admission(&self) -> ConnectionPolicy {
        ConnectionPolicy::new("admission", self.max_connections)
            .header_timeout(Duration::from_secs(self.header_timeout.max(1)))
            .body_timeout(Duration::from_secs(self.body_timeout.max(1)))
            .idle_timeout(Duration::from_secs(self.idle_timeout.max(1)))
            .max_header_bytes(ADMISSION_HEADER_BYTES)
            .max_headers(100)
            .max_streams(100)
    }

    /// The admin port's policy: fixed, small.
    pub fn admin(&self) -> ConnectionPolicy {
        ConnectionPolicy::new("admin", ADMIN_CONNECTIONS)
            .header_timeout(ADMIN_TIMEOUT)
            .body_timeout(ADMIN_TIMEOUT)
            .idle_timeout(ADMIN_IDLE_TIMEOUT)
            .max_header_bytes(ADMIN_HEADER_BYTES)
            .max_headers(64)
            .max_streams(8)
    }
}

#[derive(Clone)]
pub struct AppState {
    pub webhook: Arc<Webhook>,
    pub metrics: Arc<Metrics>,
    /// Set once shutdown starts: `/readyz` fails so the Service stops sending new reviews.
    pub draining: Arc<AtomicBool>,
    /// Set once the policies and the cluster state have been read (at once from files).
    pub synced: Arc<AtomicBool>,
    pub max_body_bytes: usize,
    /// Longest time to receive a whole review body.
    pub body_timeout: Duration,
    /// [`REVIEW_BUDGET_BYTES`] in KiB permits: a review takes them as its body's bytes arrive
    /// and holds them until it is answered.
    pub review_budget: Arc<Semaphore>,
}

impl AppState {
    pub fn new(webhook: Webhook) -> Self {
        Self {
            webhook: Arc::new(webhook),
            metrics: Arc::new(Metrics::default()),
            draining: Arc::new(AtomicBool::new(false)),
            synced: Arc::new(AtomicBool::new(true)),
            max_body_bytes: MAX_BODY_BYTES,
            body_timeout: Duration::from_secs(ConnectionArgs::default().body_timeout),
            review_budget: Arc::new(Semaphore::new(REVIEW_BUDGET_BYTES / 1024)),
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
    // A declared length past the limit is refused before anything is read.
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .or_else(|| request.body().size_hint().exact());
    if declared.is_some_and(|length| length > state.max_body_bytes as u64) {
        state.metrics.review(endpoint.name(), "error", "body", started.elapsed().as_secs_f64());
        warn!(limit = state.max_body_bytes, "review body too large");
        return error(StatusCode::PAYLOAD_TOO_LARGE, format!("body is larger than {} bytes", state.max_body_bytes));
    }
    // The whole body within the body timeout: the API server sends it at once, so a body that
    // trickles in is an attack on the connection cap.
    let reading = read_charged(request.into_body(), state.max_body_bytes, &state.review_budget);
    let (body, _held) = match tokio::time::timeout(state.body_timeout, reading).await {
        Ok(Ok(read)) => read,
        Err(_) => return body_timed_out(&state, endpoint, started),
        Ok(Err(BodyError::Read(e))) if wiproxy_common::serve::BodyTimeout::is_cause_of(&e) => {
            return body_timed_out(&state, endpoint, started)
        }
        Ok(Err(BodyError::Read(e))) => {
            state.metrics.review(endpoint.name(), "error", "body", started.elapsed().as_secs_f64());
            return error(StatusCode::BAD_REQUEST, format!("cannot read body: {e}"));
        }
        Ok(Err(BodyError::TooLarge)) => {
            state.metrics.review(endpoint.name(), "error", "body", started.elapsed().as_secs_f64());
            warn!(limit = state.max_body_bytes, "review body too large");
            return error(StatusCode::PAYLOAD_TOO_LARGE, format!("body is larger than {} bytes", state.max_body_bytes));
        }
        Ok(Err(BodyError::Busy { read })) => {
            state.metrics.review(endpoint.name(), "error", "busy", started.elapsed().as_secs_f64());
            warn!(bytes = read, "review refused: the bodies of other reviews fill the memory budget");
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "the webhook holds {} MiB of reviews at once and others fill it now: the pod's controller creates it again",
                    REVIEW_BUDGET_BYTES / 1024 / 1024
                ),
            );
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

/// Why a body was not read whole.
enum BodyError {
    Read(axum::Error),
    TooLarge,
    /// The budget had no room for the next chunk; `read` bytes had arrived.
    Busy {
        read: usize,
    },
}

/// Reads `body` whole, up to `max` bytes, taking a KiB of `budget` for each KiB as it arrives;
/// the body and what it holds of the budget.
async fn read_charged(
    mut body: axum::body::Body,
    max: usize,
    budget: &Arc<Semaphore>,
) -> Result<(Bytes, Option<OwnedSemaphorePermit>), BodyError> {
    let mut chunks = Vec::new();
    let (mut read, mut held_kib) = (0usize, 0usize);
    let mut held: Option<OwnedSemaphorePermit> = None;
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame.map_err(BodyError::Read)?.into_data() else { continue };
        read += data.len();
        if read > max {
            return Err(BodyError::TooLarge);
        }
        let owed = read.div_ceil(1024) - held_kib;
        if owed > 0 {
            let permit = u32::try_from(owed)
                .ok()
                .and_then(|owed| budget.clone().try_acquire_many_owned(owed).ok())
                .ok_or(BodyError::Busy { read })?;
            match &mut held {
                Some(held) => held.merge(permit),
                None => held = Some(permit),
            }
            held_kib += owed;
        }
        chunks.push(data);
    }
    let body = match chunks.len() {
        0 => Bytes::new(),
        1 => chunks.swap_remove(0),
        _ => {
            let mut whole = Vec::with_capacity(read);
            for chunk in chunks {
                whole.extend_from_slice(&chunk);
            }
            Bytes::from(whole)
        }
    };
    Ok((body, held))
}

fn body_timed_out(state: &AppState, endpoint: Endpoint, started: Instant) -> Response {
    state.metrics.review(endpoint.name(), "error", "body", started.elapsed().as_secs_f64());
    warn!(seconds = state.body_timeout.as_secs(), "review body not received in time");
    let mut response = error(
        StatusCode::REQUEST_TIMEOUT,
        format!("the review body did not arrive within {} s (--body-timeout)", state.body_timeout.as_secs()),
    );
    response.headers_mut().insert(header::CONNECTION, header::HeaderValue::from_static("close"));
    response
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

/// Serves `app` over TLS on `listener` under `policy` until `shutdown` turns true, then lets
/// in-flight connections finish for up to `drain`.
pub async fn serve_tls(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    app: Router,
    policy: ConnectionPolicy,
    shutdown: watch::Receiver<bool>,
    drain: Duration,
) {
    let acceptor = TlsAcceptor::from(tls);
    // The policy's header timeout bounds the handshake.
    let open = move |stream| {
        let accepting = acceptor.accept(stream);
        async move {
            match accepting.await {
                Ok(stream) => Some(TlsConnection(stream)),
                Err(e) => {
                    debug!(error = %e, "TLS handshake failed");
                    None
                }
            }
        }
    };
    let service = move || TowerToHyperService::new(app.clone());
    wiproxy_common::serve::serve(listener, policy, shutdown, drain, open, service).await;
}

/// A TLS connection as the connection policy serves it: between reviews it waits for the next
/// one without holding HTTP state.
struct TlsConnection(tokio_rustls::server::TlsStream<TcpStream>);

impl wiproxy_common::serve::Stream for TlsConnection {
    fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let (tcp, tls) = self.0.get_ref();
        // Decrypted bytes (or the peer's close_notify) already wait in rustls.
        if !tls.wants_read() {
            return Poll::Ready(Ok(()));
        }
        tcp.poll_read_ready(cx)
    }
}

impl AsyncRead for TlsConnection {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConnection {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// Serves `app` in plain HTTP on `listener` under `policy` until `shutdown` turns true.
pub async fn serve_plain(
    listener: TcpListener,
    app: Router,
    policy: ConnectionPolicy,
    shutdown: watch::Receiver<bool>,
    drain: Duration,
) {
    let open = |stream| async move { Some(stream) };
    let service = move || TowerToHyperService::new(app.clone());
    wiproxy_common::serve::serve(listener, policy, shutdown, drain, open, service).await;
}

/// Everything `serve` needs, already checked.
pub struct ServeConfig {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    /// The serving pair: polled when it comes from files, replaced by its owner otherwise.
    pub certificate: Arc<ReloadingCertificate>,
    pub tls_reload_interval: Duration,
    pub drain_timeout: Duration,
    pub connections: ConnectionArgs,
    pub webhook: Webhook,
}

/// Completes once the cluster state has been read; `/readyz` fails until then.
pub type Synced = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// Runs the webhook until SIGTERM or Ctrl-C.
pub async fn run(config: ServeConfig, synced: Option<Synced>) -> anyhow::Result<()> {
    let mut state = AppState::new(config.webhook);
    state.body_timeout = Duration::from_secs(config.connections.body_timeout.max(1));
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

    let admin_task = tokio::spawn(serve_plain(
        admin,
        admin_router(state.clone()),
        config.connections.admin(),
        stopped.clone(),
        config.drain_timeout,
    ));
    serve_tls(listener, tls, router(state), config.connections.admission(), stopped, config.drain_timeout).await;
    admin_task.await?;
    Ok(())
}
