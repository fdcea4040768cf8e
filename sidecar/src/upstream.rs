//! The upstream connection layer: per upstream (scheme and authority), one shared HTTP/2
//! connection or a bounded pool of HTTP/1.1 ones, on hyper's `client::conn`, kept the way a
//! sidecar needs them kept.
//!
//! - At most one connection attempt (TCP, TLS, ALPN) is in flight per upstream whose protocol is
//!   h2 or not yet known; requests that find no usable connection wait for it rather than start
//!   their own. Only an upstream known to speak HTTP/1.1 gets one new connection per concurrent
//!   request, as HTTP/1.1 needs.
//! - An h2 connection carries every stream; hyper queues streams past the server's
//!   `SETTINGS_MAX_CONCURRENT_STREAMS`.
//! - A GOAWAY retires the connection from new streams at once (its accepted streams drain on
//!   it), and the next request opens the one connection that replaces it. A request hyper hands
//!   back unsent (the connection closed before it was written) is sent again here; one refused by
//!   the upstream (above the GOAWAY's last-stream-id, `REFUSED_STREAM`) comes back as an error
//!   [`Error::never_processed`] recognises, for the caller, which owns the body, to send again.
//! - h2 connections are PINGed every [`PING_INTERVAL`] and closed when a PING goes unanswered for
//!   [`PING_TIMEOUT`]; any connection unused for [`IDLE_TIMEOUT`] is closed, before the idle
//!   timeouts of common upstreams can race a request onto a closing connection.
//!
//! The request's path on a ready h2 connection is a lock, a clone of the sender and hyper's own
//! hand-off to its connection task: no task of this layer's own sits between.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{header, HeaderValue, Request, Response, Uri};
use hyper::body::{Body as _, Frame, Incoming, SizeHint};
use hyper::client::conn::{http1, http2};
use hyper_util::client::legacy::connect::Connection as _;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::sync::watch;
use tower_service::Service;

use crate::body::Body;

/// Idle connections close after this long unused. Shorter than the idle timeouts of the
/// upstreams the sidecar meets, so the sidecar, not the upstream, closes an idle connection and
/// never sends a request on one the upstream is closing: Google's front end keeps an idle
/// client connection 620 s (Cloud Load Balancing, "HTTP keepalive timeout"), nginx 75 s
/// (`keepalive_timeout`), Go's `http.Server` its `IdleTimeout` (often 60 s or 90 s),
/// Node's `http.Server` 5 s (`keepAliveTimeout`, which this cannot beat; hyper sends such a
/// request again when the close comes before it is written).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(50);

/// How often an h2 connection is PINGed, while streams are open or not, and how long a PING may
/// go unanswered before the connection is taken for dead and closed.
pub const PING_INTERVAL: Duration = Duration::from_secs(20);
pub const PING_TIMEOUT: Duration = Duration::from_secs(10);

/// The most idle HTTP/1.1 connections kept per upstream.
pub const MAX_IDLE_HTTP1: usize = 64;

/// How many times a request hyper hands back unsent is tried on another connection.
const UNSENT_RETRIES: usize = 3;

pub use crate::http::Connector;
type Io = <Connector as Service<Uri>>::Response;

/// The clients: one that negotiates h2 or HTTP/1.1, one that speaks HTTP/1.1 only (for
/// upgrades such as WebSocket, which need an HTTP/1.1 connection end to end). Each keeps its
/// own connections.
#[derive(Clone)]
pub struct Clients {
    pub any: Client,
    pub http1: Client,
}

impl Clients {
    /// `connect_timeout` bounds each new connection: TCP connect and TLS handshake together.
    pub fn new(tls: rustls::ClientConfig, pins: crate::http::Pins, connect_timeout: std::time::Duration) -> Self {
        let (any, http1) = crate::http::connectors(tls, pins, connect_timeout);
        Self { any: Client::new(any), http1: Client::new(http1) }
    }
}

/// A client for every upstream: cheap to clone, all clones share the connections.
#[derive(Clone)]
pub struct Client {
    shared: Arc<Shared>,
}

struct Shared {
    connector: Connector,
    pools: Mutex<HashMap<Key, Arc<Pool>>>,
    h2: http2::Builder<TokioExecutor>,
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct Key {
    https: bool,
    authority: Authority,
}

/// One upstream's connections.
struct Pool {
    key: Key,
    state: Mutex<State>,
    /// The number of the last connection attempt to finish, for requests waiting on it.
    settled: watch::Sender<u64>,
}

#[derive(Default)]
struct State {
    h2: Option<H2>,
    idle: Vec<Idle>,
    /// Whether an attempt is in flight, and the number of the last one started.
    connecting: bool,
    attempt: u64,
    /// The last attempt that failed, and why: the requests that waited on it share its error.
    failed: Option<(u64, ConnectError)>,
    /// The upstream answered the last handshake with HTTP/1.1.
    speaks_http1: bool,
    /// Numbers the h2 connections, so a connection's watcher retires only its own.
    next_id: u64,
}

struct H2 {
    sender: http2::SendRequest<Body>,
    id: u64,
    used: Instant,
}

struct Idle {
    sender: http1::SendRequest<Body>,
    since: Instant,
}

/// Why a connection could not be made; cloned to every request that waited on it.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct ConnectError {
    message: Arc<str>,
    timed_out: bool,
}

/// Why a request got no response.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot connect: {0}")]
    Connect(#[from] ConnectError),
    #[error("{0}")]
    Http(#[from] hyper::Error),
    #[error("{0} connections closed before the request could be written to them")]
    Unsent(usize),
    #[error("the request's URI has no host: {0}")]
    BadUri(Uri),
}

impl Error {
    /// Whether the connection or TLS handshake timed out (WIPROXY_CONNECT_TIMEOUT).
    pub fn timed_out(&self) -> bool {
        matches!(self, Error::Connect(e) if e.timed_out)
    }

    /// Whether the upstream certainly never processed the request, so it may be sent again
    /// whatever its method: an HTTP/2 stream above the last-stream-id of a graceful GOAWAY
    /// (nginx's `keepalive_requests`, a server shutting down, gRPC's max connection age), or
    /// one reset with `REFUSED_STREAM` (RFC 9113 §8.7 and §6.8). A GOAWAY with an error code is
    /// not enough: it fails lower streams too.
    pub fn never_processed(&self) -> bool {
        h2_error(self).is_some_and(|h2| {
            h2.is_remote()
                && ((h2.is_go_away() && h2.reason() == Some(h2::Reason::NO_ERROR))
                    || (h2.is_reset() && h2.reason() == Some(h2::Reason::REFUSED_STREAM)))
        })
    }
}

fn h2_error<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a h2::Error> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(cause) = source {
        if let Some(h2) = cause.downcast_ref::<h2::Error>() {
            return Some(h2);
        }
        source = cause.source();
    }
    None
}

/// A connection taken for one request.
enum Checkout {
    H2 { sender: http2::SendRequest<Body>, id: u64 },
    Http1(http1::SendRequest<Body>),
}

impl Client {
    pub fn new(connector: Connector) -> Self {
        let mut h2 = http2::Builder::new(TokioExecutor::new());
        h2.timer(TokioTimer::new())
            .keep_alive_interval(PING_INTERVAL)
            .keep_alive_timeout(PING_TIMEOUT)
            .keep_alive_while_idle(true);
        Self { shared: Arc::new(Shared { connector, pools: Mutex::new(HashMap::new()), h2 }) }
    }

    /// Sends `request` (absolute URI) and waits for the response's head.
    pub async fn request(&self, mut request: Request<Body>) -> Result<Response<ResponseBody>, Error> {
        let pool = self.pool(request.uri())?;
        let mut unsent = 0;
        loop {
            let checkout = pool.checkout(&self.shared).await?;
            let sent = match checkout {
                Checkout::H2 { mut sender, id } => {
                    *request.version_mut() = http::Version::HTTP_2;
                    let sending = sender.try_send_request(request);
                    // No sender is held while the response is awaited: a request that lands
                    // in hyper's queue just as the connection's task ends is handed back only
                    // when the last sender is gone (tokio's channel drops what it holds then),
                    // so holding one here would wait for it forever.
                    drop(sender);
                    match sending.await {
                        Ok(response) => return Ok(response.map(|inner| ResponseBody { inner, give_back: None })),
                        Err(mut e) => {
                            // A GOAWAY (graceful or not) or a closed connection: no new stream goes
                            // to this connection again, and the next request opens its successor.
                            if e.message().is_some() || h2_error(e.error()).is_some_and(h2::Error::is_go_away) {
                                pool.retire_h2(id);
                            }
                            e.take_message().ok_or_else(|| e.into_error())
                        }
                    }
                }
                Checkout::Http1(mut sender) => {
                    *request.version_mut() = http::Version::HTTP_11;
                    origin_form(&mut request);
                    match sender.try_send_request(request).await {
                        Ok(response) => {
                            let give_back = Some(GiveBack { pool: pool.clone(), sender });
                            return Ok(response.map(|inner| ResponseBody { inner, give_back }));
                        }
                        Err(mut e) => e.take_message().ok_or_else(|| e.into_error()),
                    }
                }
            };
            match sent {
                // Handed back unsent: the connection closed before the request was written.
                Ok(returned) if unsent < UNSENT_RETRIES => {
                    unsent += 1;
                    request = returned;
                }
                Ok(_) => return Err(Error::Unsent(UNSENT_RETRIES + 1)),
                Err(error) => return Err(Error::Http(error)),
            }
        }
    }

    fn pool(&self, uri: &Uri) -> Result<Arc<Pool>, Error> {
        let https = uri.scheme() == Some(&Scheme::HTTPS);
        let authority = uri.authority().cloned().ok_or_else(|| Error::BadUri(uri.clone()))?;
        let key = Key { https, authority };
        let mut pools = lock(&self.shared.pools);
        if let Some(pool) = pools.get(&key) {
            return Ok(pool.clone());
        }
        let pool = Arc::new(Pool { key: key.clone(), state: Mutex::default(), settled: watch::Sender::new(0) });
        pools.insert(key, pool.clone());
        Ok(pool)
    }

    /// How many h2 connections and idle HTTP/1.1 connections this client holds now, for tests.
    pub fn connections(&self) -> (usize, usize) {
        let pools = lock(&self.shared.pools);
        pools.values().fold((0, 0), |(h2, h1), pool| {
            let state = lock(&pool.state);
            (h2 + usize::from(state.h2.is_some()), h1 + state.idle.len())
        })
    }
}

impl Pool {
    /// A usable connection: the h2 one, an idle HTTP/1.1 one, or a new one, waiting for an
    /// attempt in flight rather than starting another.
    async fn checkout(self: &Arc<Self>, shared: &Arc<Shared>) -> Result<Checkout, ConnectError> {
        loop {
            let (mut settled, waiting_for) = match self.look() {
                Look::Ready(checkout) => return Ok(checkout),
                Look::ConnectOwn => {
                    return match self.connect(shared).await? {
                        Connected::Http1(sender) => Ok(Checkout::Http1(sender)),
                        Connected::H2(sender, connection) => {
                            let id = self.install_h2(&mut lock(&self.state), sender.clone(), connection);
                            Ok(Checkout::H2 { sender, id })
                        }
                    };
                }
                Look::Wait { settled, waiting_for, start } => {
                    if let Some(attempt) = start {
                        let (pool, shared) = (self.clone(), shared.clone());
                        // Its own task, so the attempt finishes for the requests waiting on it
                        // even if the request that started it goes away.
                        tokio::spawn(async move { pool.settle(attempt, pool.connect(&shared).await) });
                    }
                    (settled, waiting_for)
                }
            };
            let _ = settled.changed().await;
            let state = lock(&self.state);
            if let Some((failed, error)) = &state.failed {
                if *failed > waiting_for && !state.connecting && state.h2.is_none() && state.idle.is_empty() {
                    return Err(error.clone());
                }
            }
        }
    }

    /// What a request finds: a connection, or what to do to get one.
    fn look(&self) -> Look {
        let mut state = lock(&self.state);
        let now = Instant::now();
        if let Some(h2) = state.h2.as_mut() {
            if !h2.sender.is_closed() {
                h2.used = now;
                return Look::Ready(Checkout::H2 { sender: h2.sender.clone(), id: h2.id });
            }
            state.h2 = None;
        }
        while let Some(idle) = state.idle.pop() {
            if idle.sender.is_ready() && now.duration_since(idle.since) < IDLE_TIMEOUT {
                return Look::Ready(Checkout::Http1(idle.sender));
            }
        }
        if state.speaks_http1 && !state.connecting {
            return Look::ConnectOwn;
        }
        let mut settled = self.settled.subscribe();
        let waiting_for = *settled.borrow_and_update();
        let start = (!state.connecting).then(|| {
            state.connecting = true;
            state.attempt += 1;
            state.attempt
        });
        Look::Wait { settled, waiting_for, start }
    }

    /// Records the end of attempt `attempt` and wakes the requests waiting on it.
    fn settle(self: &Arc<Self>, attempt: u64, connected: Result<Connected, ConnectError>) {
        let mut state = lock(&self.state);
        state.connecting = false;
        match connected {
            Ok(Connected::H2(sender, connection)) => {
                self.install_h2(&mut state, sender, connection);
                drop(state);
            }
            Ok(Connected::Http1(sender)) => {
                state.speaks_http1 = true;
                state.idle.push(Idle { sender, since: Instant::now() });
                drop(state);
            }
            Err(error) => {
                state.failed = Some((attempt, error));
                drop(state);
            }
        }
        self.settled.send_replace(attempt);
    }

    /// Makes `sender` the upstream's h2 connection, drives `connection`, and watches for it to
    /// end or go idle.
    fn install_h2(
        self: &Arc<Self>,
        state: &mut State,
        sender: http2::SendRequest<Body>,
        connection: H2Connection,
    ) -> u64 {
        state.next_id += 1;
        let id = state.next_id;
        state.speaks_http1 = false;
        state.h2 = Some(H2 { sender, id, used: Instant::now() });
        // hyper's task for the connection ends at a GOAWAY (its accepted streams go on in h2's
        // own task) or a close: the pool lets go of its sender at once, so that, with no request
        // holding one either, hyper hands back any request that reached its queue too late.
        let pool = self.clone();
        tokio::spawn(async move {
            let _ = connection.await;
            pool.retire_h2(id);
        });
        let pool = self.clone();
        tokio::spawn(async move {
            let mut deadline = Instant::now() + IDLE_TIMEOUT;
            loop {
                tokio::time::sleep_until(deadline.into()).await;
                let mut state = lock(&pool.state);
                match state.h2.as_ref() {
                    Some(h2) if h2.id == id => {
                        if h2.sender.is_closed() || h2.used.elapsed() >= IDLE_TIMEOUT {
                            // Dropping the last sender closes the connection once its open
                            // streams end.
                            state.h2 = None;
                            return;
                        }
                        deadline = h2.used + IDLE_TIMEOUT;
                    }
                    _ => return,
                }
            }
        });
        id
    }

    /// Stops new streams going to h2 connection `id`.
    fn retire_h2(&self, id: u64) {
        let mut state = lock(&self.state);
        if state.h2.as_ref().is_some_and(|h2| h2.id == id) {
            state.h2 = None;
        }
    }

    /// Connects: TCP, TLS with ALPN, then the HTTP handshake, all within the connect timeout.
    async fn connect(&self, shared: &Shared) -> Result<Connected, ConnectError> {
        let fail = |e: &(dyn std::error::Error + 'static)| {
            let timed_out = {
                let mut source = Some(e);
                let mut found = false;
                while let Some(cause) = source {
                    found |= cause
                        .downcast_ref::<std::io::Error>()
                        .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut);
                    source = cause.source();
                }
                found
            };
            ConnectError { message: wiproxy_common::error_chain(e).into(), timed_out }
        };
        let scheme = if self.key.https { "https" } else { "http" };
        let uri = Uri::builder()
            .scheme(scheme)
            .authority(self.key.authority.clone())
            .path_and_query("/")
            .build()
            .map_err(|e| fail(&e))?;
        let mut connector = shared.connector.clone();
        std::future::poll_fn(|cx| connector.poll_ready(cx)).await.map_err(|e| fail(e.as_ref()))?;
        let io: Io = connector.call(uri).await.map_err(|e| fail(e.as_ref()))?;
        if io.connected().is_negotiated_h2() {
            let (sender, connection) = shared.h2.handshake(io).await.map_err(|e| fail(&e))?;
            Ok(Connected::H2(sender, connection))
        } else {
            let (sender, connection) = http1::Builder::new().handshake::<_, Body>(io).await.map_err(|e| fail(&e))?;
            tokio::spawn(connection.with_upgrades());
            Ok(Connected::Http1(sender))
        }
    }
}

enum Look {
    Ready(Checkout),
    /// The upstream speaks HTTP/1.1: this request makes its own connection.
    ConnectOwn,
    /// Wait for the attempt in flight, or for attempt `start`, which this request is to begin.
    Wait {
        settled: watch::Receiver<u64>,
        waiting_for: u64,
        start: Option<u64>,
    },
}

type H2Connection = http2::Connection<Io, Body, TokioExecutor>;

enum Connected {
    H2(http2::SendRequest<Body>, H2Connection),
    Http1(http1::SendRequest<Body>),
}

/// HTTP/1.1 wants the origin form on the request line and the authority in `Host`.
fn origin_form<B>(request: &mut Request<B>) {
    let uri = request.uri().clone();
    if !request.headers().contains_key(header::HOST) {
        if let Some(authority) = uri.authority() {
            let default_port = match uri.scheme_str() {
                Some("https") => 443,
                _ => 80,
            };
            let host = match authority.port_u16() {
                Some(port) if port != default_port => authority.as_str(),
                _ => authority.host(),
            };
            if let Ok(value) = HeaderValue::from_str(host) {
                request.headers_mut().insert(header::HOST, value);
            }
        }
    }
    let path = uri.path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/"));
    let mut parts = http::uri::Parts::default();
    parts.path_and_query = Some(path);
    if let Ok(origin) = Uri::from_parts(parts) {
        *request.uri_mut() = origin;
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// An upstream's response body. An HTTP/1.1 connection goes back to its pool when the body has
/// been read to its end, and is closed if the body is dropped before.
pub struct ResponseBody {
    inner: Incoming,
    give_back: Option<GiveBack>,
}

struct GiveBack {
    pool: Arc<Pool>,
    sender: http1::SendRequest<Body>,
}

impl GiveBack {
    fn give_back(self) {
        let GiveBack { pool, mut sender } = self;
        let keep = move |sender: http1::SendRequest<Body>| {
            let mut state = lock(&pool.state);
            let now = Instant::now();
            state.idle.retain(|idle| now.duration_since(idle.since) < IDLE_TIMEOUT && !idle.sender.is_closed());
            if state.idle.len() < MAX_IDLE_HTTP1 {
                state.idle.push(Idle { sender, since: now });
            }
        };
        if sender.is_ready() {
            keep(sender);
            return;
        }
        // hyper's connection task marks the connection ready once it has read the response's
        // end, which may be a moment after the body has given its last frame.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Ok(Ok(())) = tokio::time::timeout(Duration::from_secs(5), sender.ready()).await {
                    keep(sender);
                }
            });
        }
    }
}

impl hyper::body::Body for ResponseBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None)) {
            if let Some(give_back) = self.give_back.take() {
                give_back.give_back();
            }
        } else if matches!(polled, Poll::Ready(Some(Err(_)))) {
            self.give_back = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        if let Some(give_back) = self.give_back.take() {
            if self.inner.is_end_stream() {
                give_back.give_back();
            }
        }
    }
}
