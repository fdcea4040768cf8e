//! Serving HTTP/1.1 (with upgrades) and h2c on a listener under one connection policy, with a
//! graceful drain, and the signal that starts it: what the webhook (over TLS) and the sidecar
//! (plain) both need. Every listener of both binaries goes through [`serve`], so each one caps
//! its connections (and gives each source address a share of them), times out slow headers,
//! slow bodies and idle connections, and bounds header sizes, HTTP/2 streams and, where asked,
//! requests in flight, with values of its own ([`ConnectionPolicy`]).
//!
//! The step, for each connection: [`serve`] accepts it and finds it a slot under the cap
//! (`cap`, which also decides who leaves when a new connection needs room); `connection` opens
//! it (the TLS handshake), tells HTTP/2 from HTTP/1.1 by its first bytes (`sniff`), and serves
//! it with hyper through the per-connection service (`service`), which bounds request bodies
//! (`body`) and counts requests (`activity`).

mod activity;
mod body;
mod cap;
mod connection;
mod service;
mod sniff;
#[cfg(test)]
mod tests;

use std::error::Error as StdError;
use std::future::Future;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hyper::body::Body;
use hyper::server::conn::{http1, http2};
use hyper::service::Service;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Notify};
use tokio::time::Instant;
use tracing::{debug, info, warn, Instrument};

pub use body::{BodyTimeout, RequestBody};
pub use cap::Cap;
pub use connection::Stream;
pub use service::Requests;

use activity::Activity;
use cap::Admission;
use connection::{connection, Held, Shared};
use service::Policed;

type BoxError = Box<dyn StdError + Send + Sync>;

/// How one listener treats its connections. Every value bounds what a client that never
/// finishes (or never stops) can hold.
#[derive(Debug, Clone)]
pub struct ConnectionPolicy {
    /// Shown in logs: which listener this is.
    pub name: &'static str,
    /// Connections served at once, and how many of them one source address may hold. At the
    /// cap, a new connection takes the place of the oldest silent connection (not a byte sent),
    /// else of the kept-alive HTTP/1.1 connection that has waited longest; a connection in its
    /// TLS handshake or first head, one serving a request, and an HTTP/2 connection that has
    /// sent one, never leave for another. With none to ask, new connections wait in the kernel's backlog (and
    /// past that are refused by the kernel), so neither tasks nor file descriptors grow with
    /// the number of clients. A source at its share makes room among its own connections
    /// only, and is refused when all of them are serving. Listeners that clone one policy
    /// share its cap.
    pub max_connections: Arc<Cap>,
    /// Requests in flight at once across the listeners sharing this policy, if bounded; past
    /// it an HTTP/2 stream is refused (`REFUSED_STREAM`) and an HTTP/1.1 request gets 503.
    pub max_requests: Option<Arc<Requests>>,
    /// Longest time to receive a request's head (HTTP/1.1), counted from its first read, and
    /// longest wait for a request to start: on a new connection, and on HTTP/1.1 between
    /// requests (as hyper 1.12 restarts this timer when a response is written,
    /// `proto/h1/conn.rs`). Also bounds the TLS handshake.
    pub header_timeout: Duration,
    /// Longest wait for the next piece of a request body; past it the body fails with
    /// [`BodyTimeout`] and the handler answers 408.
    pub body_timeout: Duration,
    /// A connection with no request in flight for this long is closed (HTTP/2 above all, where
    /// the header timeout does not reach).
    pub idle_timeout: Duration,
    /// Largest request head: hyper's HTTP/1.1 read buffer (at least 8 KiB, hyper's minimum) and
    /// HTTP/2's `SETTINGS_MAX_HEADER_LIST_SIZE`.
    pub max_header_bytes: usize,
    /// Most header fields in one HTTP/1.1 request.
    pub max_headers: usize,
    /// Most concurrent HTTP/2 streams on one connection.
    pub max_streams: u32,
    /// HTTP/2 flow control: request body bytes a client may send on one stream, and on one
    /// connection, before the service reads them (what hyper buffers for it).
    pub stream_window: u32,
    pub connection_window: u32,
    /// HTTP/2: response bytes queued for one stream while the client's window is closed.
    pub send_buffer: usize,
}

/// hyper refuses a smaller HTTP/1.1 buffer (`max_buf_size` asserts it).
const MIN_HEADER_BYTES: usize = 8 * 1024;

/// hyper's own HTTP/2 defaults (`proto/h2/server.rs`): 1 MiB windows, 400 KiB send buffer.
const HYPER_WINDOW: u32 = 1024 * 1024;
const HYPER_SEND_BUFFER: usize = 400 * 1024;

impl ConnectionPolicy {
    /// A policy with its own connection cap, each source address holding at most a quarter of
    /// it (at least 4 connections; see [`ConnectionPolicy::per_source`]).
    pub fn new(name: &'static str, max_connections: usize) -> Self {
        Self {
            name,
            max_connections: Arc::new(Cap::new(max_connections, cap::default_share(max_connections))),
            max_requests: None,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_header_bytes: 64 * 1024,
            max_headers: 100,
            max_streams: 100,
            stream_window: HYPER_WINDOW,
            connection_window: HYPER_WINDOW,
            send_buffer: HYPER_SEND_BUFFER,
        }
    }

    /// Most connections one source address may hold (the whole cap: no share). Call it before
    /// [`ConnectionPolicy::shared`]: it gives the policy a cap of its own.
    pub fn per_source(mut self, value: usize) -> Self {
        self.max_connections = Arc::new(Cap::new(self.max_connections.max(), value));
        self
    }

    /// Most requests in flight at once, across the listeners that share this policy. Call it
    /// before [`ConnectionPolicy::shared`].
    pub fn max_requests(mut self, value: usize) -> Self {
        self.max_requests = Some(Arc::new(Requests::new(value)));
        self
    }

    pub fn header_timeout(mut self, value: Duration) -> Self {
        self.header_timeout = value;
        self
    }

    pub fn body_timeout(mut self, value: Duration) -> Self {
        self.body_timeout = value;
        self
    }

    pub fn idle_timeout(mut self, value: Duration) -> Self {
        self.idle_timeout = value;
        self
    }

    pub fn max_header_bytes(mut self, value: usize) -> Self {
        self.max_header_bytes = value.max(MIN_HEADER_BYTES);
        self
    }

    pub fn max_headers(mut self, value: usize) -> Self {
        self.max_headers = value;
        self
    }

    pub fn max_streams(mut self, value: u32) -> Self {
        self.max_streams = value;
        self
    }

    /// HTTP/2 flow-control windows: per stream, and per connection (at least the stream's).
    pub fn windows(mut self, stream: u32, connection: u32) -> Self {
        self.stream_window = stream;
        self.connection_window = connection.max(stream);
        self
    }

    pub fn send_buffer(mut self, value: usize) -> Self {
        self.send_buffer = value;
        self
    }

    /// The same values under another name, sharing this policy's connection cap and request
    /// limit.
    pub fn shared(&self, name: &'static str) -> Self {
        Self { name, ..self.clone() }
    }

    fn shared_state(&self) -> Shared {
        let mut http1 = http1::Builder::new();
        http1
            .timer(TokioTimer::new())
            .header_read_timeout(self.header_timeout)
            .max_buf_size(self.max_header_bytes.max(MIN_HEADER_BYTES))
            .max_headers(self.max_headers);
        let mut http2 = http2::Builder::new(TokioExecutor::new());
        http2
            .timer(TokioTimer::new())
            .max_header_list_size(u32::try_from(self.max_header_bytes).unwrap_or(u32::MAX))
            .max_concurrent_streams(self.max_streams)
            .initial_stream_window_size(self.stream_window)
            .initial_connection_window_size(self.connection_window)
            .max_send_buf_size(self.send_buffer);
        Shared {
            http1,
            http2,
            handshake: self.header_timeout,
            idle: self.idle_timeout,
            between_requests: self.header_timeout.min(self.idle_timeout),
            stopping: AtomicBool::new(false),
            stop: Notify::new(),
        }
    }
}

/// Logs accept errors at most once per second, counting the ones it kept quiet.
struct AcceptErrors {
    name: &'static str,
    last_logged: Option<Instant>,
    quiet: u64,
    backoff: Duration,
}

const ACCEPT_BACKOFF_FIRST: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

impl AcceptErrors {
    /// Records one failure and returns how long to wait before accepting again: out of file
    /// descriptors (EMFILE/ENFILE) or memory, accepting again at once would only spin.
    fn failed(&mut self, error: &std::io::Error) -> Duration {
        let now = Instant::now();
        if self.last_logged.is_none_or(|last| now - last >= Duration::from_secs(1)) {
            warn!(listener = self.name, error = %error, suppressed = self.quiet, "accept failed; backing off (raise the file-descriptor limit if this is EMFILE)");
            self.last_logged = Some(now);
            self.quiet = 0;
        } else {
            self.quiet += 1;
        }
        let wait = self.backoff;
        self.backoff = (self.backoff * 2).min(ACCEPT_BACKOFF_MAX);
        wait
    }

    fn accepted(&mut self) {
        self.backoff = ACCEPT_BACKOFF_FIRST;
    }
}

/// Completes once `shutdown` turns true (or its sender is gone).
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    drop(shutdown.wait_for(|stop| *stop).await);
}

/// Accepts connections on `listener` under `policy` until `shutdown` turns true, then lets open
/// connections finish for up to `drain`. `open` turns each TCP stream into the stream HTTP runs
/// on (a TLS handshake, bounded by the header timeout, or the stream itself); `None` drops the
/// connection. `service` makes the service for one connection.
pub async fn serve<Open, Opened, Io, MakeService, S, B>(
    listener: TcpListener,
    policy: ConnectionPolicy,
    mut shutdown: watch::Receiver<bool>,
    drain: Duration,
    open: Open,
    service: MakeService,
) where
    Open: Fn(TcpStream) -> Opened + Send + Sync + 'static,
    Opened: Future<Output = Option<Io>> + Send + 'static,
    Io: Stream,
    MakeService: Fn() -> S,
    S: Service<Request<RequestBody>, Response = Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + Unpin + 'static,
    B::Data: Send + From<Bytes>,
    B::Error: Into<BoxError>,
{
    let shared = Arc::new(policy.shared_state());
    let open = Arc::new(open);
    let cap = policy.max_connections.clone();
    // Every connection task holds a sender; the drain is over when the last one is gone.
    let (open_connections, mut drained) = mpsc::channel::<()>(1);
    let mut errors = AcceptErrors { name: policy.name, last_logged: None, quiet: 0, backoff: ACCEPT_BACKOFF_FIRST };
    'accepting: loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => {
                    errors.accepted();
                    accepted
                }
                Err(e) => {
                    let wait = errors.failed(&e);
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => continue,
                        () = stopped(&mut shutdown) => break,
                    }
                }
            },
            () = stopped(&mut shutdown) => break,
        };
        // An IPv4 client of a dual-stack listener counts as its IPv4 address.
        let source = peer.ip().to_canonical();
        // At the cap this one connection waits, accepted, for another to leave or end; the ones
        // after it wait in the kernel's backlog, as neither tasks nor file descriptors here.
        let slot = loop {
            let mut changed = std::pin::pin!(cap.changed());
            changed.as_mut().enable();
            match cap.admit(source) {
                Admission::Admitted(slot) => break slot,
                Admission::Refused => {
                    debug!(listener = policy.name, %peer, share = cap.per_source(), "connection refused: its source holds its share of the connections, all serving");
                    continue 'accepting;
                }
                Admission::Full(later) => tokio::select! {
                    () = changed => {}
                    () = tokio::time::sleep_until(later.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600))), if later.is_some() => {}
                    () = stopped(&mut shutdown) => break 'accepting,
                },
            }
        };
        let _ = stream.set_nodelay(true);
        let service = Policed {
            inner: service(),
            activity: Arc::new(Activity::new(slot.place().clone())),
            body_timeout: policy.body_timeout,
            requests: policy.max_requests.clone(),
            name: policy.name,
        };
        let held = Held { slot, _open: open_connections.clone() };
        tokio::spawn(
            connection(stream, open.clone(), service, shared.clone(), held)
                .instrument(tracing::debug_span!("connection", listener = policy.name, %peer)),
        );
    }
    drop(listener);
    shared.stop();
    drop(open_connections);
    tokio::select! {
        _ = drained.recv() => info!(listener = policy.name, "drained"),
        _ = tokio::time::sleep(drain) => warn!(listener = policy.name, seconds = drain.as_secs(), "drain timed out; closing open connections"),
    }
}

/// Completes on SIGTERM (what the kubelet sends) or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = ctrl_c => {},
                _ = term.recv() => {},
            }
        }
        Err(_) => {
            let _ = ctrl_c.await;
        }
    }
}
