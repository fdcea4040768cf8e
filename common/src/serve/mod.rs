//! Serving HTTP/1.1 (with upgrades) and h2c on a listener under one connection policy, with a
//! graceful drain, and the signal that starts it: what the webhook (over TLS) and the sidecar
//! (plain) both need. Every listener of both binaries goes through [`serve`], so each one caps
//! its connections, times out slow headers, slow bodies and idle connections, and bounds header
//! sizes, with values of its own ([`ConnectionPolicy`]).

use std::error::Error as StdError;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::server::conn::{http1, http2};
use hyper::service::Service;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Notify, OwnedSemaphorePermit, Semaphore, TryAcquireError};
use tokio::time::{Instant, Sleep};
use tracing::{debug, info, warn, Instrument};

type BoxError = Box<dyn StdError + Send + Sync>;

/// How one listener treats its connections. Every value bounds what a client that never
/// finishes (or never stops) can hold.
#[derive(Debug, Clone)]
pub struct ConnectionPolicy {
    /// Shown in logs: which listener this is.
    pub name: &'static str,
    /// Connections served at once. At it, the listener accepts one more connection and closes
    /// the longest-waiting kept-alive HTTP/1.1 connection to make room for it (as nginx reuses
    /// its kept-alive connections when it runs out); with none to close, new connections wait
    /// in the kernel's backlog (and past that are refused by the kernel), so neither tasks nor
    /// file descriptors grow with the number of clients. Listeners that clone one policy share
    /// its cap.
    pub max_connections: Arc<Cap>,
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
}

/// hyper refuses a smaller HTTP/1.1 buffer (`max_buf_size` asserts it).
const MIN_HEADER_BYTES: usize = 8 * 1024;

/// A connection cap: its permits, and the room asked of kept-alive connections when a new
/// connection finds none.
#[derive(Debug)]
pub struct Cap {
    permits: Arc<Semaphore>,
    /// Kept-alive connections asked to close, and not yet closed.
    wanted: AtomicUsize,
    /// Wakes the longest-waiting kept-alive connection (`Notify` wakes its waiters in the
    /// order they came).
    reclaim: Notify,
}

impl Cap {
    fn new(max: usize) -> Self {
        Self { permits: Arc::new(Semaphore::new(max.max(1))), wanted: AtomicUsize::new(0), reclaim: Notify::new() }
    }

    /// A place under the cap, if one is free.
    fn try_acquire(&self) -> Result<OwnedSemaphorePermit, TryAcquireError> {
        self.permits.clone().try_acquire_owned()
    }

    /// A place under the cap, once one is free; meanwhile one kept-alive connection is asked
    /// to make room. `None`: the cap was closed.
    async fn acquire_making_room(&self) -> Option<OwnedSemaphorePermit> {
        self.wanted.fetch_add(1, Ordering::AcqRel);
        self.reclaim.notify_one();
        let permit = self.permits.clone().acquire_owned().await.ok();
        // Room made otherwise (a connection ended): the request is withdrawn.
        let _ = self.wanted.fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| w.checked_sub(1));
        permit
    }

    /// Whether a kept-alive connection should close now to make room: takes one request for
    /// room, if there is one.
    fn claim(&self) -> bool {
        self.wanted.fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| w.checked_sub(1)).is_ok()
    }

    /// Completes once a kept-alive connection may be asked to close: check [`Cap::claim`].
    fn reclaimed(&self) -> tokio::sync::futures::Notified<'_> {
        self.reclaim.notified()
    }
}

impl ConnectionPolicy {
    /// A policy with its own connection cap.
    pub fn new(name: &'static str, max_connections: usize) -> Self {
        Self {
            name,
            max_connections: Arc::new(Cap::new(max_connections)),
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
            .max_concurrent_streams(self.max_streams);
        Shared {
            http1,
            http2,
            handshake: self.header_timeout,
            idle: self.idle_timeout,
            between_requests: self.header_timeout.min(self.idle_timeout),
            stopping: AtomicBool::new(false),
            stop: Notify::new(),
            cap: self.max_connections.clone(),
        }
    }
}

/// A request body under the policy's body timeout: each frame must come within it of the last
/// (or of the first read).
pub struct RequestBody {
    inner: Incoming,
    timeout: Duration,
    sleep: Option<Pin<Box<Sleep>>>,
    /// Counts the body as unread on its connection until it ends.
    _open: Option<OpenBody>,
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
        Self { inner, timeout, sleep: None, _open: None }
    }
}

impl Drop for RequestBody {
    fn drop(&mut self) {
        // A consumer may stop at `is_end_stream` without polling for the end.
        if let Some(open) = self._open.as_mut() {
            open.ended |= self.inner.is_end_stream();
        }
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
                if frame.is_none() {
                    if let Some(open) = this._open.as_mut() {
                        open.ended = true;
                    }
                }
                if !matches!(frame, Some(Ok(_))) {
                    this._open = None;
                }
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

/// What one connection's requests and stream have done lately: written by the per-connection
/// service (requests and bodies in flight) and by [`Watched`] (whether hyper waits on a read or a
/// write), read by the connection's driver to decide when hyper can let go of an idle
/// connection. All of it is touched by the connection's own task only; atomics make it `Sync`.
struct Activity {
    /// Requests whose response body has not ended.
    in_flight: AtomicUsize,
    /// Request bodies not yet read to their end (or dropped).
    bodies: AtomicUsize,
    /// When a request last started or ended.
    last: Mutex<Instant>,
    /// Requests handed to the service so far.
    requests: AtomicU64,
    /// hyper's last read of the stream found nothing to read.
    read_blocked: AtomicBool,
    /// hyper's last write or flush could not complete.
    write_blocked: AtomicBool,
    /// The driver is taking the stream back from hyper: hyper's shutdown of the stream is
    /// skipped, so the connection stays open.
    keep_open: AtomicBool,
    /// A request body was dropped before its end: hyper then closes the connection after the
    /// response (it cannot find the next request), and must be let do so.
    unfinished: AtomicBool,
}

impl Activity {
    fn new() -> Self {
        Self {
            in_flight: AtomicUsize::new(0),
            bodies: AtomicUsize::new(0),
            last: Mutex::new(Instant::now()),
            requests: AtomicU64::new(0),
            read_blocked: AtomicBool::new(false),
            write_blocked: AtomicBool::new(false),
            keep_open: AtomicBool::new(false),
            unfinished: AtomicBool::new(false),
        }
    }

    fn touch(&self) {
        if let Ok(mut last) = self.last.lock() {
            *last = Instant::now();
        }
    }

    fn last(&self) -> Instant {
        self.last.lock().map(|last| *last).unwrap_or_else(|_| Instant::now())
    }

    /// When the connection counts as idle for `limit`, if nothing happens until then; `None`
    /// while a request is in flight.
    fn idle_deadline(&self, limit: Duration) -> Option<Instant> {
        (self.in_flight.load(Ordering::Acquire) == 0).then(|| self.last() + limit)
    }

    fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Whether hyper holds an HTTP/1.1 connection only to wait for its next request: it took a
    /// request since `requests` were counted, every request has been answered and read, its
    /// writes are flushed, and its last read found nothing. hyper can then let go of the
    /// connection and keep what it read ahead (see [`connection`]).
    fn between_requests(&self, requests: u64) -> bool {
        self.requests() > requests
            && self.in_flight.load(Ordering::Acquire) == 0
            && self.bodies.load(Ordering::Acquire) == 0
            && !self.unfinished.load(Ordering::Relaxed)
            && self.read_blocked.load(Ordering::Relaxed)
            && !self.write_blocked.load(Ordering::Relaxed)
    }
}

/// One request counted in flight until its response body ends or is dropped.
struct InFlight(Arc<Activity>);

impl InFlight {
    fn start(activity: &Arc<Activity>) -> Self {
        activity.in_flight.fetch_add(1, Ordering::AcqRel);
        activity.requests.fetch_add(1, Ordering::Relaxed);
        // hyper read the last body to its end, or it would not have found this request.
        activity.unfinished.store(false, Ordering::Relaxed);
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

/// One request body counted until it ends or is dropped; dropped before its end, it marks the
/// connection [`Activity::unfinished`].
struct OpenBody {
    activity: Arc<Activity>,
    ended: bool,
}

impl OpenBody {
    fn start(activity: &Arc<Activity>) -> Self {
        activity.bodies.fetch_add(1, Ordering::AcqRel);
        Self { activity: activity.clone(), ended: false }
    }
}

impl Drop for OpenBody {
    fn drop(&mut self) {
        if !self.ended {
            self.activity.unfinished.store(true, Ordering::Relaxed);
        }
        self.activity.bodies.fetch_sub(1, Ordering::AcqRel);
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
        let request = request.map(|body| {
            let open = (!body.is_end_stream()).then(|| OpenBody::start(&self.activity));
            RequestBody { inner: body, timeout: self.body_timeout, sleep: None, _open: open }
        });
        let answering = self.inner.call(request);
        Box::pin(async move {
            let response = answering.await?;
            Ok(response.map(|inner| Tracked { inner, _in_flight: in_flight }))
        })
    }
}

/// A connection's stream once opened (plain TCP, or TLS over it): HTTP runs on it, and its next
/// bytes can be awaited without reading them, so a kept-alive connection can wait for its next
/// request with no HTTP state.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// Ready once a read may find something: bytes, the end of the stream, or an error.
    fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>>;
}

impl Stream for TcpStream {
    fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        TcpStream::poll_read_ready(self, cx)
    }
}

/// The stream as hyper sees it: bytes read ahead (the protocol sniff, or what hyper had read
/// when it let go) come first, and every read and write notes in [`Activity`] whether it had
/// to wait.
struct Watched<Io> {
    io: Io,
    ahead: Bytes,
    activity: Arc<Activity>,
}

impl<Io: AsyncRead + Unpin> AsyncRead for Watched<Io> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if !this.ahead.is_empty() {
            let n = this.ahead.len().min(buf.remaining());
            buf.put_slice(&this.ahead.split_to(n));
            return Poll::Ready(Ok(()));
        }
        let polled = Pin::new(&mut this.io).poll_read(cx, buf);
        this.activity.read_blocked.store(polled.is_pending(), Ordering::Relaxed);
        polled
    }
}

impl<Io: AsyncWrite + Unpin> Watched<Io> {
    fn noted<T>(&self, polled: Poll<T>) -> Poll<T> {
        self.activity.write_blocked.store(polled.is_pending(), Ordering::Relaxed);
        polled
    }
}

impl<Io: AsyncWrite + Unpin> AsyncWrite for Watched<Io> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, buf);
        self.noted(polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.noted(polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let polled = Pin::new(&mut self.io).poll_flush(cx);
        self.noted(polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if self.activity.keep_open.load(Ordering::Relaxed) {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// The first bytes of an HTTP/2 connection with prior knowledge (RFC 9113 §3.4).
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Reads until the first bytes tell HTTP/2's preface from anything else (HTTP/1.1), as
/// hyper-util's `auto` server does. `None`: the client closed first.
async fn sniff<Io: AsyncRead + Unpin>(io: &mut Io) -> std::io::Result<Option<(Bytes, bool)>> {
    let mut buf = [0u8; H2_PREFACE.len()];
    let mut len = 0;
    loop {
        let n = io.read(&mut buf[len..]).await?;
        if n == 0 && len == 0 {
            return Ok(None);
        }
        len += n;
        let h2 = buf[..len] == H2_PREFACE[..len];
        if n == 0 || !h2 || len == H2_PREFACE.len() {
            return Ok(Some((Bytes::copy_from_slice(&buf[..len]), h2 && len == H2_PREFACE.len())));
        }
    }
}

/// What the connections of one listener share: its HTTP/1.1 and HTTP/2 servers, configured
/// once, its timeouts, and its shutdown.
struct Shared {
    http1: http1::Builder,
    http2: http2::Builder<TokioExecutor>,
    /// Opening a connection (the TLS handshake).
    handshake: Duration,
    /// No request in flight for this long: the connection is closed.
    idle: Duration,
    /// Waiting for a request to start on HTTP/1.1 (hyper's header timeout restarts when a
    /// response is written, so a kept-alive wait is bounded by it too) or for the first bytes.
    between_requests: Duration,
    /// Set, then notified, when the listener stops.
    stopping: AtomicBool,
    stop: Notify,
    /// The listener's connection cap (shared with the listeners of the same policy), whose
    /// new connections may ask a kept-alive one to make room.
    cap: Arc<Cap>,
}

impl Shared {
    /// Completes once the listener stops.
    async fn stopped(&self) {
        let notified = self.stop.notified();
        if !self.stopping.load(Ordering::Acquire) {
            notified.await;
        }
    }

    fn stop(&self) {
        self.stopping.store(true, Ordering::Release);
        self.stop.notify_waiters();
    }
}

/// Completes once `shutdown` turns true (or its sender is gone).
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    drop(shutdown.wait_for(|stop| *stop).await);
}

/// Whether an idle timer's expiry closes the connection: the wait it bounds is really over.
/// Otherwise the timer is set again to the wait's present deadline; the timer is armed once
/// and moved only when it fires, so no request pays for a timer of its own.
/// `None`: a request is in flight; the timer looks again after `limit`.
fn expired(timer: Pin<&mut Sleep>, deadline: Option<Instant>, limit: Duration) -> bool {
    let now = Instant::now();
    match deadline {
        Some(deadline) if deadline <= now => true,
        Some(deadline) => {
            timer.reset(deadline);
            false
        }
        None => {
            timer.reset(now + limit);
            false
        }
    }
}

/// What a connection holds until it ends: its place under the connection cap, and the drain's
/// count of open connections.
struct Held {
    _permit: OwnedSemaphorePermit,
    _open: mpsc::Sender<()>,
}

/// One accepted connection, from its opening (a TLS handshake, or nothing) to its end: sniffs
/// the protocol, then serves HTTP/2 with hyper until the connection ends, or HTTP/1.1 letting
/// hyper hold the connection only while it has a request to read or answer.
///
/// Between HTTP/1.1 requests hyper's buffers (8 KiB each way) would sit unused in every
/// kept-alive connection. Instead, as soon as hyper is between requests
/// ([`Activity::between_requests`]), its side is closed with the stream kept open
/// ([`Activity::keep_open`]), and only the stream waits for the next request's first bytes (as
/// nginx frees its buffers on a kept-alive connection). Memory follows the requests in flight,
/// not the connections open, for about 3,000 instructions per request (a new hyper connection
/// and its buffers). Bytes hyper read ahead come back with the stream and are served first, so pipelined
/// and half-sent requests lose nothing. A request whose head starts arriving just before the
/// kept-alive wait ends gets hyper's header timeout from its first bytes. The waiting
/// connection is one small task (one timer, one shutdown notification, the stream): about
/// 1.5 KiB with its socket's registration, against about 20 KiB in hyper's hands.
#[allow(clippy::manual_async_fn, reason = "an async fn's future keeps its arguments twice")]
fn connection<Opened, Io, S, B>(
    opened: Pin<Box<Opened>>,
    mut service: Policed<S>,
    shared: Arc<Shared>,
    held: Held,
) -> impl Future<Output = ()> + Send
where
    Opened: Future<Output = Option<Io>> + Send + 'static,
    Io: Stream,
    S: Service<Request<RequestBody>, Response = Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    async move {
        let _held = &held;
        let activity = service.activity.clone();
        let mut timer = std::pin::pin!(tokio::time::sleep_until(activity.last() + shared.handshake));
        let mut stop = std::pin::pin!(shared.stopped());
        let mut stopping = false;

        // Open (the TLS handshake), within the header timeout.
        let mut opened = opened;
        let stream = tokio::select! {
            biased;
            stream = opened.as_mut() => stream,
            () = stop.as_mut() => return,
            () = timer.as_mut() => {
                debug!("connection setup (TLS handshake) timed out");
                return;
            }
        };
        drop(opened);
        let Some(mut stream) = stream else { return };

        // The first bytes: HTTP/2's preface or not.
        activity.touch();
        timer.as_mut().reset(activity.last() + shared.between_requests);
        let sniffed = loop {
            tokio::select! {
                biased;
                sniffed = sniff(&mut stream) => break sniffed,
                () = stop.as_mut() => return,
                () = timer.as_mut() => if expired(timer.as_mut(), Some(activity.last() + shared.between_requests), shared.between_requests) {
                    debug!("no request before the header timeout");
                    return;
                },
            }
        };
        let ahead = match sniffed {
            Ok(Some((ahead, false))) => ahead,
            Ok(Some((ahead, true))) => {
                let io = Watched { io: stream, ahead, activity: activity.clone() };
                let mut serving = Box::pin(shared.http2.serve_connection(TokioIo::new(io), service));
                timer.as_mut().reset(activity.last() + shared.idle);
                loop {
                    tokio::select! {
                        biased;
                        ended = serving.as_mut() => {
                            if let Err(e) = ended {
                                debug!(error = %e, "connection ended with an error");
                            }
                            return;
                        }
                        () = stop.as_mut(), if !stopping => {
                            serving.as_mut().graceful_shutdown();
                            stopping = true;
                        }
                        () = timer.as_mut() => if expired(timer.as_mut(), activity.idle_deadline(shared.idle), shared.idle) {
                            debug!("idle connection closed");
                            return;
                        },
                    }
                }
            }
            Ok(None) => return,
            Err(e) => {
                debug!(error = %e, "connection ended with an error");
                return;
            }
        };

        // HTTP/1.1: hyper serves until it is between requests, then the stream waits alone.
        let mut io = Watched { io: stream, ahead, activity: activity.clone() };
        loop {
            // Requests counted before hyper takes the stream.
            let taken = activity.requests();
            let mut serving = Box::pin(shared.http1.serve_connection(TokioIo::new(io), service).with_upgrades());
            let mut letting_go = false;
            let ended = loop {
                tokio::select! {
                    biased;
                    ended = serving.as_mut() => break ended,
                    () = std::future::poll_fn(|_| if activity.between_requests(taken) { Poll::Ready(()) } else { Poll::Pending }),
                        if !letting_go && !stopping => {
                        activity.keep_open.store(true, Ordering::Relaxed);
                        serving.as_mut().graceful_shutdown();
                        letting_go = true;
                    }
                    () = stop.as_mut(), if !stopping => {
                        activity.keep_open.store(false, Ordering::Relaxed);
                        serving.as_mut().graceful_shutdown();
                        stopping = true;
                    }
                    () = timer.as_mut() => if expired(timer.as_mut(), activity.idle_deadline(shared.idle), shared.idle) {
                        debug!("idle connection closed");
                        return;
                    },
                }
            };
            if let Err(e) = ended {
                debug!(error = %e, "connection ended with an error");
                return;
            }
            if !letting_go || stopping {
                return;
            }
            // `None`: the connection was upgraded (WebSocket): the stream went with it.
            let Some(parts) = Pin::into_inner(serving).into_parts() else { return };
            activity.keep_open.store(false, Ordering::Relaxed);
            (io, service) = (parts.io.into_inner(), parts.service);
            // hyper's read buffer comes back with what it read ahead; empty, it is let go now (a
            // `Bytes` keeps its whole allocation, however little of it is left).
            let read_ahead = parts.read_buf;
            if !read_ahead.is_empty() {
                io.ahead = read_ahead;
                continue;
            }
            drop(read_ahead);

            // Between requests: only the stream is held until the next request's first bytes.
            // The timer is only ever brought forward here; one set for an earlier wait fires
            // early and is moved on by `expired`, so a busy connection moves it seldom.
            let deadline = activity.last() + shared.between_requests;
            if timer.deadline() > deadline {
                timer.as_mut().reset(deadline);
            }
            loop {
                // Registered before the claim is looked at, so no request for room is missed.
                let mut reclaimed = std::pin::pin!(shared.cap.reclaimed());
                reclaimed.as_mut().enable();
                tokio::select! {
                    biased;
                    ready = std::future::poll_fn(|cx| io.io.poll_read_ready(cx)) => match ready {
                        // A request for room this connection was woken for goes to the next
                        // one when `reclaimed` is dropped (tokio's `Notified` passes it on).
                        Ok(()) => break,
                        Err(e) => {
                            debug!(error = %e, "connection ended with an error");
                            return;
                        }
                    },
                    () = stop.as_mut() => return,
                    () = reclaimed.as_mut() => if shared.cap.claim() {
                        debug!("kept-alive connection closed to make room at the connection cap");
                        return;
                    },
                    () = timer.as_mut() => if expired(timer.as_mut(), Some(activity.last() + shared.between_requests), shared.between_requests) {
                        debug!("kept-alive connection closed after the header timeout");
                        return;
                    },
                }
            }
        }
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
    Io: Stream,
    MakeService: Fn() -> S,
    S: Service<Request<RequestBody>, Response = Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let shared = Arc::new(policy.shared_state());
    // Every connection task holds a sender; the drain is over when the last one is gone.
    let (open_connections, mut drained) = mpsc::channel::<()>(1);
    let mut errors = AcceptErrors { name: policy.name, last_logged: None, quiet: 0, backoff: ACCEPT_BACKOFF_FIRST };
    loop {
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
        // At the cap this one connection waits, accepted, for a kept-alive connection to make
        // room or for one to end; the ones after it wait in the kernel's backlog, as neither
        // tasks nor file descriptors here.
        let permit = match policy.max_connections.try_acquire() {
            Ok(permit) => permit,
            Err(TryAcquireError::Closed) => break,
            Err(TryAcquireError::NoPermits) => tokio::select! {
                permit = policy.max_connections.acquire_making_room() => match permit {
                    Some(permit) => permit,
                    None => break,
                },
                () = stopped(&mut shutdown) => break,
            },
        };
        let _ = stream.set_nodelay(true);
        let service =
            Policed { inner: service(), activity: Arc::new(Activity::new()), body_timeout: policy.body_timeout };
        let held = Held { _permit: permit, _open: open_connections.clone() };
        tokio::spawn(
            connection(Box::pin(open(stream)), service, shared.clone(), held)
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

    /// Asserts the server closes `stream` (a clean end, nothing more to read) within 30 s.
    async fn assert_closed(stream: &mut TcpStream, what: &str) {
        use tokio::io::AsyncReadExt;
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut rest)).await;
        assert!(matches!(read, Ok(Ok(0))), "{what}: {read:?} {rest:?}");
    }

    /// Reads one HTTP/1.1 response with a `content-length` from `stream`; its body.
    async fn read_response(stream: &mut TcpStream) -> String {
        use tokio::io::AsyncReadExt;
        let mut bytes = Vec::new();
        let mut byte = [0u8; 1];
        while !bytes.ends_with(b"\r\n\r\n") {
            assert_eq!(stream.read(&mut byte).await.expect("read"), 1, "closed in a head: {bytes:?}");
            bytes.push(byte[0]);
        }
        let head = String::from_utf8(bytes).expect("text");
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        let length = head
            .lines()
            .find_map(|line| line.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_owned()))
            .and_then(|v| v.parse::<usize>().ok())
            .expect("content-length");
        let mut body = vec![0u8; length];
        stream.read_exact(&mut body).await.expect("body");
        String::from_utf8(body).expect("text")
    }

    /// A server answering each request with its path.
    async fn echo_server(policy: ConnectionPolicy) -> (std::net::SocketAddr, watch::Sender<bool>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let (stop, stopped) = watch::channel(false);
        let service = || {
            hyper::service::service_fn(|request: Request<RequestBody>| async move {
                Ok::<_, std::convert::Infallible>(Response::new(request.uri().path().to_owned()))
            })
        };
        tokio::spawn(serve(listener, policy, stopped, Duration::from_secs(1), |s| async move { Some(s) }, service));
        (addr, stop)
    }

    /// hyper lets go of a kept-alive connection between requests; the next request is served
    /// all the same, also one whose head was half sent when hyper let go (what hyper had read
    /// comes back with the stream), and requests sent in one write.
    #[tokio::test]
    async fn kept_alive_connections_are_served_after_hyper_lets_go() {
        use tokio::io::AsyncWriteExt;
        let (addr, _stop) = echo_server(ConnectionPolicy::new("test", 4)).await;
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        let wait = Duration::from_millis(200);

        stream.write_all(b"GET /one HTTP/1.1\r\nHost: x\r\n\r\n").await.expect("write");
        assert_eq!(read_response(&mut stream).await, "/one");
        tokio::time::sleep(wait).await;
        stream.write_all(b"GET /two HTTP/1.1\r\nHost: x\r\n\r\n").await.expect("write");
        assert_eq!(read_response(&mut stream).await, "/two");

        // hyper has read the start of /four when it lets go.
        stream.write_all(b"GET /three HTTP/1.1\r\nHost: x\r\n\r\nGET /four HTTP/1.1\r\nHo").await.expect("write");
        assert_eq!(read_response(&mut stream).await, "/three");
        tokio::time::sleep(wait).await;
        stream.write_all(b"st: x\r\n\r\n").await.expect("write");
        assert_eq!(read_response(&mut stream).await, "/four");

        tokio::time::sleep(wait).await;
        stream
            .write_all(b"GET /five HTTP/1.1\r\nHost: x\r\n\r\nGET /six HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("write");
        assert_eq!(read_response(&mut stream).await, "/five");
        assert_eq!(read_response(&mut stream).await, "/six");
    }

    /// At the cap a new connection takes the place of the kept-alive connection that has waited
    /// longest, instead of waiting for its header timeout; the other kept-alive connection is
    /// left alone and still served.
    #[tokio::test]
    async fn at_the_cap_a_new_connection_takes_the_place_of_the_oldest_kept_alive_one() {
        use tokio::io::AsyncWriteExt;
        let policy = ConnectionPolicy::new("test", 2)
            .header_timeout(Duration::from_secs(600))
            .idle_timeout(Duration::from_secs(600));
        let (addr, _stop) = echo_server(policy).await;
        let mut kept = Vec::new();
        for path in ["/first", "/second"] {
            let mut stream = TcpStream::connect(addr).await.expect("connect");
            stream.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).await.expect("write");
            assert_eq!(read_response(&mut stream).await, path);
            kept.push(stream);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }

        let mut third = TcpStream::connect(addr).await.expect("connect");
        third.write_all(b"GET /third HTTP/1.1\r\nHost: x\r\n\r\n").await.expect("write");
        let answered = tokio::time::timeout(Duration::from_secs(30), read_response(&mut third)).await;
        assert_eq!(answered.expect("the third connection waited for a kept-alive one to time out"), "/third");

        assert_closed(&mut kept[0], "the longest-waiting connection was not closed").await;
        kept[1].write_all(b"GET /again HTTP/1.1\r\nHost: x\r\n\r\n").await.expect("write");
        assert_eq!(read_response(&mut kept[1]).await, "/again");
    }

    /// A kept-alive connection that hyper let go of is still closed once the header timeout
    /// passes without a request.
    #[tokio::test]
    async fn a_kept_alive_wait_ends_at_the_header_timeout() {
        use tokio::io::AsyncWriteExt;
        let (addr, _stop) = echo_server(ConnectionPolicy::new("test", 4).header_timeout(Duration::from_secs(1))).await;
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        stream.write_all(b"GET /one HTTP/1.1\r\nHost: x\r\n\r\n").await.expect("write");
        assert_eq!(read_response(&mut stream).await, "/one");
        assert_closed(&mut stream, "the idle connection was not closed").await;
    }

    /// A request body that stopped arriving (answered after the body timeout) makes hyper close
    /// the connection after the answer: it is not kept open as if it were between requests.
    #[tokio::test]
    async fn a_connection_whose_body_stalled_is_closed_after_the_answer() {
        use http_body_util::BodyExt;
        use tokio::io::AsyncWriteExt;
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let (_stop, stopped) = watch::channel(false);
        let service = || {
            hyper::service::service_fn(|request: Request<RequestBody>| async move {
                let read = request.into_body().collect().await;
                Ok::<_, std::convert::Infallible>(Response::new(String::from(if read.is_ok() {
                    "read"
                } else {
                    "stalled"
                })))
            })
        };
        let policy = ConnectionPolicy::new("test", 4)
            .header_timeout(Duration::from_secs(600))
            .idle_timeout(Duration::from_secs(600))
            .body_timeout(Duration::from_secs(1));
        tokio::spawn(serve(listener, policy, stopped, Duration::from_secs(1), |s| async move { Some(s) }, service));
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        stream.write_all(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123").await.expect("write");
        assert_eq!(read_response(&mut stream).await, "stalled");
        assert_closed(&mut stream, "the connection was kept").await;
    }

    /// On shutdown, a connection waiting between requests is closed, and the drain ends.
    #[tokio::test]
    async fn shutdown_closes_waiting_connections() {
        use tokio::io::AsyncWriteExt;
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let (stop, stopped) = watch::channel(false);
        let service = || {
            hyper::service::service_fn(|_request: Request<RequestBody>| async {
                Ok::<_, std::convert::Infallible>(Response::new(String::from("ok")))
            })
        };
        let policy = ConnectionPolicy::new("test", 4).header_timeout(Duration::from_secs(600));
        let serving = tokio::spawn(serve(
            listener,
            policy,
            stopped,
            Duration::from_secs(60),
            |s| async move { Some(s) },
            service,
        ));
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        stream.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.expect("write");
        assert_eq!(read_response(&mut stream).await, "ok");
        tokio::time::sleep(Duration::from_millis(200)).await;
        stop.send(true).expect("stop");
        assert_closed(&mut stream, "the waiting connection was not closed").await;
        tokio::time::timeout(Duration::from_secs(30), serving).await.expect("drained").expect("task");
    }

    #[test]
    fn a_header_limit_below_hypers_minimum_is_raised() {
        assert_eq!(ConnectionPolicy::new("t", 1).max_header_bytes(100).max_header_bytes, MIN_HEADER_BYTES);
    }
}
