//! What one connection's requests and stream have done lately, counted by the requests and
//! bodies themselves and read by the connection's driver.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use super::cap::Place;

/// What one connection's requests and stream have done lately: written by the per-connection
/// service (requests and bodies in flight) and by the stream hyper reads (whether hyper waits
/// on a read or a write), read by the connection's driver to decide when hyper can let go of
/// an idle connection. All of it is touched by the connection's own task only; atomics make it
/// `Sync`.
pub(super) struct Activity {
    /// The connection's slot under the cap: its first request makes it a serving one.
    pub(super) place: Arc<Place>,
    /// Requests whose response body has not ended.
    in_flight: AtomicUsize,
    /// Request bodies not yet read to their end (or dropped).
    bodies: AtomicUsize,
    /// When a request last started or ended.
    last: Mutex<Instant>,
    /// Requests handed to the service so far.
    requests: AtomicU64,
    /// hyper's last read of the stream found nothing to read.
    pub(super) read_blocked: AtomicBool,
    /// hyper's last write or flush could not complete.
    pub(super) write_blocked: AtomicBool,
    /// The driver is taking the stream back from hyper: hyper's shutdown of the stream is
    /// skipped, so the connection stays open.
    pub(super) keep_open: AtomicBool,
    /// A request body was dropped before its end: hyper then closes the connection after the
    /// response (it cannot find the next request), and must be let do so.
    unfinished: AtomicBool,
}

impl Activity {
    pub(super) fn new(place: Arc<Place>) -> Self {
        Self {
            place,
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

    pub(super) fn touch(&self) {
        if let Ok(mut last) = self.last.lock() {
            *last = Instant::now();
        }
    }

    pub(super) fn last(&self) -> Instant {
        self.last.lock().map(|last| *last).unwrap_or_else(|_| Instant::now())
    }

    /// When the connection counts as idle for `limit`, if nothing happens until then; `None`
    /// while a request is in flight.
    pub(super) fn idle_deadline(&self, limit: Duration) -> Option<Instant> {
        (self.in_flight.load(Ordering::Acquire) == 0).then(|| self.last() + limit)
    }

    pub(super) fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Whether hyper holds an HTTP/1.1 connection only to wait for its next request: it took a
    /// request since `requests` were counted, every request has been answered and read, its
    /// writes are flushed, and its last read found nothing. hyper can then let go of the
    /// connection and keep what it read ahead (see `connection`).
    pub(super) fn between_requests(&self, requests: u64) -> bool {
        self.requests() > requests
            && self.in_flight.load(Ordering::Acquire) == 0
            && self.bodies.load(Ordering::Acquire) == 0
            && !self.unfinished.load(Ordering::Relaxed)
            && self.read_blocked.load(Ordering::Relaxed)
            && !self.write_blocked.load(Ordering::Relaxed)
    }
}

/// One request counted in flight until its response body ends or is dropped.
pub(super) struct InFlight(Arc<Activity>);

impl InFlight {
    pub(super) fn start(activity: &Arc<Activity>) -> Self {
        activity.in_flight.fetch_add(1, Ordering::AcqRel);
        if activity.requests.fetch_add(1, Ordering::Relaxed) == 0 {
            // The first complete request head: the connection is no longer a silent one.
            activity.place.serving();
        }
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
pub(super) struct OpenBody {
    activity: Arc<Activity>,
    pub(super) ended: bool,
}

impl OpenBody {
    pub(super) fn start(activity: &Arc<Activity>) -> Self {
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
