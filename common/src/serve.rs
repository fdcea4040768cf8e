//! Serving HTTP/1.1 (with upgrades) and h2c on a listener under one connection policy, with a
//! graceful drain, and the signal that starts it: what the webhook (over TLS) and the sidecar
//! (plain) both need. Every listener of both binaries goes through [`serve`], so each one caps
//! its connections, times out slow headers, slow bodies and idle connections, and bounds header
//! sizes, with values of its own ([`ConnectionPolicy`]).

use std::error::Error as StdError;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::service::Service;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio::time::{Instant, Sleep};
use tracing::{debug, info, warn, Instrument};

type BoxError = Box<dyn StdError + Send + Sync>;

/// How one listener treats its connections. Every value bounds what a client that never
/// finishes (or never stops) can hold.
#[derive(Debug, Clone)]
pub struct ConnectionPolicy {
    /// Shown in logs: which listener this is.
    pub name: &'static str,
    /// Connections served at once. Past it, the listener stops accepting: new connections wait
    /// in the kernel's backlog (and past that are refused by the kernel), so neither tasks nor
    /// file descriptors grow with the number of clients. Listeners that clone one policy share
    /// its cap.
    pub max_connections: Arc<Semaphore>,
    /// Longest time to receive a request's head (HTTP/1.1), counted from its first read. hyper
    /// (1.12, `proto/h1/conn.rs`) starts this timer again as soon as a response is written, so
    /// on HTTP/1.1 it also bounds an idle keep-alive wait. Also bounds the TLS handshake.
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
}

/// hyper refuses a smaller HTTP/1.1 buffer (`max_buf_size` asserts it).
const MIN_HEADER_BYTES: usize = 8 * 1024;

impl ConnectionPolicy {
    /// A policy with its own connection cap.
    pub fn new(name: &'static str, max_connections: usize) -> Self {
        Self {
            name,
            max_connections: Arc::new(Semaphore::new(max_connections.max(1))),
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_header_bytes: 64 * 1024,
            max_headers: 100,
            max_streams: 100,
        }
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

    /// The same values under another name, sharing this policy's connection cap.
    pub fn shared(&self, name: &'static str) -> Self {
        Self { name, ..self.clone() }
    }

    fn builder(&self) -> auto::Builder<TokioExecutor> {
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(self.header_timeout)
            .max_buf_size(self.max_header_bytes.max(MIN_HEADER_BYTES))
            .max_headers(self.max_headers);
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_header_list_size(u32::try_from(self.max_header_bytes).unwrap_or(u32::MAX))
            .max_concurrent_streams(self.max_streams);
        builder
    }
}

/// A request body under the policy's body timeout: each frame must come within it of the last
/// (or of the first read).
pub struct RequestBody {
    inner: Incoming,
    timeout: Duration,
    sleep: Option<Pin<Box<Sleep>>>,
}

/// The error a [`RequestBody`] ends with when the client stops sending it.
#[derive(Debug, thiserror::Error)]
#[error("the request body stalled: nothing received for {} s", .0.as_secs_f64())]
pub struct BodyTimeout(pub Duration);

impl BodyTimeout {
    /// Whether `error`, or one of its causes, is a body timeout.
    pub fn is_cause_of(error: &(dyn StdError + 'static)) -> bool {
        let mut source = Some(error);
        while let Some(cause) = source {
            if cause.is::<BodyTimeout>() {
                return true;
            }
            source = cause.source();
        }
        false
    }
}

impl RequestBody {
    pub fn new(inner: Incoming, timeout: Duration) -> Self {
        Self { inner, timeout, sleep: None }
    }
}

impl Body for RequestBody {
    type Data = bytes::Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Self::Data>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                this.sleep = None;
                Poll::Ready(frame.map(|f| f.map_err(BoxError::from)))
            }
            Poll::Pending => {
                let timeout = this.timeout;
                let sleep = this.sleep.get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                match sleep.as_mut().poll(cx) {
                    Poll::Ready(()) => {
                        this.sleep = None;
                        Poll::Ready(Some(Err(BodyTimeout(timeout).into())))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
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

/// Requests in flight on one connection and when the last one ended.
struct Activity {
    in_flight: AtomicUsize,
    last: Mutex<Instant>,
}

impl Activity {
    fn touch(&self) {
        if let Ok(mut last) = self.last.lock() {
            *last = Instant::now();
        }
    }

    /// Completes once the connection has had no request in flight for `limit`.
    async fn idle(&self, limit: Duration) {
        loop {
            let last = self.last.lock().map(|last| *last).unwrap_or_else(|_| Instant::now());
            if self.in_flight.load(Ordering::Acquire) == 0 && last.elapsed() >= limit {
                return;
            }
            let until = if self.in_flight.load(Ordering::Acquire) == 0 { last + limit } else { Instant::now() + limit };
            tokio::time::sleep_until(until).await;
        }
    }
}

/// One request counted in flight until its response body ends or is dropped.
struct InFlight(Arc<Activity>);

impl InFlight {
    fn start(activity: &Arc<Activity>) -> Self {
        activity.in_flight.fetch_add(1, Ordering::AcqRel);
        activity.touch();
        Self(activity.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body that keeps its request in flight until it is done.
pub struct Tracked<B> {
    inner: B,
    _in_flight: InFlight,
}

impl<B: Body + Unpin> Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The per-connection service: bodies under the body timeout, requests counted in flight.
struct Policed<S> {
    inner: S,
    activity: Arc<Activity>,
    body_timeout: Duration,
}

impl<S, B> Service<Request<Incoming>> for Policed<S>
where
    S: Service<Request<RequestBody>, Response = Response<B>>,
    S::Future: Send + 'static,
    B: Body + Unpin,
{
    type Response = Response<Tracked<B>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        let in_flight = InFlight::start(&self.activity);
        let request = request.map(|body| RequestBody::new(body, self.body_timeout));
        let answering = self.inner.call(request);
        Box::pin(async move {
            let response = answering.await?;
            Ok(response.map(|inner| Tracked { inner, _in_flight: in_flight }))
        })
    }
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
    Open: Fn(TcpStream) -> Opened,
    Opened: Future<Output = Option<Io>> + Send + 'static,
    Io: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    MakeService: Fn() -> S,
    S: Service<Request<RequestBody>, Response = Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let graceful = GracefulShutdown::new();
    let builder = policy.builder();
    let mut errors = AcceptErrors { name: policy.name, last_logged: None, quiet: 0, backoff: ACCEPT_BACKOFF_FIRST };
    loop {
        // The permit comes first: at the cap nothing is accepted, so waiting clients stay in
        // the kernel's backlog instead of becoming tasks and file descriptors here.
        let permit = tokio::select! {
            permit = policy.max_connections.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            _ = async { drop(shutdown.wait_for(|stop| *stop).await) } => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => {
                    errors.accepted();
                    accepted
                }
                Err(e) => {
                    drop(permit);
                    let wait = errors.failed(&e);
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => continue,
                        _ = async { drop(shutdown.wait_for(|stop| *stop).await) } => break,
                    }
                }
            },
            _ = async { drop(shutdown.wait_for(|stop| *stop).await) } => break,
        };
        let _ = stream.set_nodelay(true);
        let opened = tokio::time::timeout(policy.header_timeout, open(stream));
        let activity = Arc::new(Activity { in_flight: AtomicUsize::new(0), last: Mutex::new(Instant::now()) });
        let service = Policed { inner: service(), activity: activity.clone(), body_timeout: policy.body_timeout };
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let idle_timeout = policy.idle_timeout;
        tokio::spawn(
            async move {
                let _permit = permit;
                let stream = match opened.await {
                    Ok(Some(stream)) => stream,
                    Ok(None) => return,
                    Err(_) => {
                        debug!("connection setup (TLS handshake) timed out");
                        return;
                    }
                };
                let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service).into_owned();
                tokio::select! {
                    ended = watcher.watch(connection) => if let Err(e) = ended {
                        debug!(error = %e, "connection ended with an error");
                    },
                    () = activity.idle(idle_timeout) => debug!("idle connection closed"),
                }
            }
            .instrument(tracing::debug_span!("connection", listener = policy.name, %peer)),
        );
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => info!(listener = policy.name, "drained"),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_errors_back_off_and_log_at_most_once_a_second() {
        let mut errors = AcceptErrors { name: "test", last_logged: None, quiet: 0, backoff: ACCEPT_BACKOFF_FIRST };
        let emfile = std::io::Error::from_raw_os_error(24);
        let waits: Vec<_> = (0..10).map(|_| errors.failed(&emfile)).collect();
        assert_eq!(waits[0], ACCEPT_BACKOFF_FIRST);
        assert!(waits.windows(2).all(|w| w[1] >= w[0]));
        assert_eq!(*waits.last().expect("waits"), ACCEPT_BACKOFF_MAX);
        // One line logged, nine kept quiet.
        assert_eq!(errors.quiet, 9);
        errors.accepted();
        assert_eq!(errors.failed(&emfile), ACCEPT_BACKOFF_FIRST);
    }

    /// With a cap of one, a second client is served only once the first has gone: its answer
    /// comes after the first connection closed, never before.
    #[tokio::test]
    async fn past_the_cap_a_client_waits_for_a_free_slot() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let (_stop, stopped) = watch::channel(false);
        let policy = ConnectionPolicy::new("test", 1).header_timeout(Duration::from_secs(60));
        let service = || {
            hyper::service::service_fn(|_request: Request<RequestBody>| async {
                Ok::<_, std::convert::Infallible>(Response::new(String::from("ok")))
            })
        };
        tokio::spawn(serve(listener, policy, stopped, Duration::from_secs(1), |s| async move { Some(s) }, service));

        let first = TcpStream::connect(addr).await.expect("connect");
        // Let the server accept the first connection before the second arrives.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let second = tokio::spawn(async move {
            let mut stream = TcpStream::connect(addr).await.expect("connect");
            stream.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.expect("write");
            let mut answer = String::new();
            let _ = stream.read_to_string(&mut answer).await;
            (answer, Instant::now())
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        let closed = Instant::now();
        drop(first);
        let (answer, answered) =
            tokio::time::timeout(Duration::from_secs(30), second).await.expect("answered").expect("task");
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answered > closed, "the second client was served while the first held the only slot");
    }

    #[test]
    fn a_header_limit_below_hypers_minimum_is_raised() {
        assert_eq!(ConnectionPolicy::new("t", 1).max_header_bytes(100).max_header_bytes, MIN_HEADER_BYTES);
    }
}
