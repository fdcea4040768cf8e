//! One accepted connection from its opening to its end: the protocol sniff, HTTP/2 or HTTP/1.1
//! served by hyper, and the kept-alive wait between HTTP/1.1 requests; each step ends early when
//! the connection is asked to leave for a new one (see `cap`).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::Body;
use hyper::server::conn::{http1, http2};
use hyper::service::Service;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Notify};
use tokio::time::{Instant, Sleep};
use tracing::debug;

use super::activity::Activity;
use super::body::RequestBody;
use super::cap::Slot;
use super::service::Policed;
use super::sniff::sniff;
use super::BoxError;

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
pub(super) struct Watched<Io> {
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

/// What the connections of one listener share: its HTTP/1.1 and HTTP/2 servers, configured
/// once, its timeouts, and its shutdown.
pub(super) struct Shared {
    pub(super) http1: http1::Builder,
    pub(super) http2: http2::Builder<TokioExecutor>,
    /// Opening a connection (the TLS handshake).
    pub(super) handshake: Duration,
    /// No request in flight for this long: the connection is closed.
    pub(super) idle: Duration,
    /// Waiting for a request to start on HTTP/1.1 (hyper's header timeout restarts when a
    /// response is written, so a kept-alive wait is bounded by it too) or for the first bytes.
    pub(super) between_requests: Duration,
    /// Set, then notified, when the listener stops.
    pub(super) stopping: AtomicBool,
    pub(super) stop: Notify,
}

impl Shared {
    /// Completes once the listener stops.
    async fn stopped(&self) {
        let notified = self.stop.notified();
        if !self.stopping.load(Ordering::Acquire) {
            notified.await;
        }
    }

    pub(super) fn stop(&self) {
        self.stopping.store(true, Ordering::Release);
        self.stop.notify_waiters();
    }
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

/// What a connection holds until it ends: its slot under the connection cap, and the drain's
/// count of open connections.
pub(super) struct Held {
    pub(super) slot: Slot,
    pub(super) _open: mpsc::Sender<()>,
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
pub(super) fn connection<Open, Opened, Io, S, B>(
    tcp: TcpStream,
    open: Arc<Open>,
    mut service: Policed<S>,
    shared: Arc<Shared>,
    held: Held,
) -> impl Future<Output = ()> + Send
where
    Open: Fn(TcpStream) -> Opened + Send + Sync + 'static,
    Opened: Future<Output = Option<Io>> + Send + 'static,
    Io: Stream,
    S: Service<Request<RequestBody>, Response = Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + Unpin + 'static,
    B::Data: Send + From<Bytes>,
    B::Error: Into<BoxError>,
{
    async move {
        let _held = &held;
        let place = held.slot.place().clone();
        let activity = service.activity.clone();
        let mut timer = std::pin::pin!(tokio::time::sleep_until(activity.last() + shared.handshake));
        let mut stop = std::pin::pin!(shared.stopped());
        let mut stopping = false;
        // Completes once the cap asks this connection to leave for a new one, which it does only
        // while the connection is silent or waits between HTTP/1.1 requests.
        let mut leave = std::pin::pin!(place.told_to_leave());

        // The first bytes (a TLS ClientHello, or a request): until they come the connection is
        // quiet, the first to leave at the cap. Within the header timeout, as the handshake.
        let mut byte = [0u8; 1];
        let first = tokio::select! {
            biased;
            // `peek`, not `readable`: readiness may be reported where no byte is.
            peeked = tcp.peek(&mut byte) => peeked,
            () = stop.as_mut() => return,
            () = leave.as_mut() => {
                debug!("quiet connection closed to make room at the connection cap");
                return;
            }
            () = timer.as_mut() => {
                debug!("nothing received before the header timeout");
                return;
            }
        };
        if let Err(e) = first {
            debug!(error = %e, "connection ended with an error");
            return;
        }
        place.spoke();

        // Open (the TLS handshake), within the header timeout.
        let mut opened = Box::pin(open(tcp));
        let stream = tokio::select! {
            biased;
            stream = opened.as_mut() => stream,
            () = stop.as_mut() => return,
            () = leave.as_mut() => {
                debug!("connection closed in its TLS handshake to make room at the connection cap");
                return;
            }
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
                () = leave.as_mut() => {
                    debug!("silent connection closed to make room at the connection cap");
                    return;
                }
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
                        // Only before its first request: an HTTP/2 connection is never asked after.
                        () = leave.as_mut() => {
                            debug!("HTTP/2 connection closed before its first request to make room at the connection cap");
                            return;
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
                    // Only before the first request's head is complete: hyper holds the
                    // connection only while it has a request to read or answer, and a
                    // connection between requests waits below.
                    () = leave.as_mut() => {
                        debug!("connection closed before its first request to make room at the connection cap");
                        return;
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

            // Between requests: only the stream is held until the next request's first bytes,
            // and the connection may be asked to leave for a new one (after the silent ones).
            // The timer is only ever brought forward here; one set for an earlier wait fires
            // early and is moved on by `expired`, so a busy connection moves it seldom.
            let deadline = activity.last() + shared.between_requests;
            if timer.deadline() > deadline {
                timer.as_mut().reset(deadline);
            }
            place.waiting();
            loop {
                tokio::select! {
                    biased;
                    ready = std::future::poll_fn(|cx| io.io.poll_read_ready(cx)) => match ready {
                        Ok(()) => break,
                        Err(e) => {
                            debug!(error = %e, "connection ended with an error");
                            return;
                        }
                    },
                    () = stop.as_mut() => return,
                    () = leave.as_mut() => {
                        debug!("kept-alive connection closed to make room at the connection cap");
                        return;
                    }
                    () = timer.as_mut() => if expired(timer.as_mut(), Some(activity.last() + shared.between_requests), shared.between_requests) {
                        debug!("kept-alive connection closed after the header timeout");
                        return;
                    },
                }
            }
            // The next request's first bytes: serving again (a request to leave that came at
            // the same moment is withdrawn).
            place.serving();
        }
    }
}
