//! A listener's connection slots: how many connections it serves at once, how many of them one
//! source address may hold, and which connection leaves first when a new one needs room.
//!
//! At the cap, a new connection takes the place of, in this order:
//! 1. the oldest *silent* connection: connected, and not a byte sent yet (no TLS ClientHello, no
//!    request). It had its chance; a kubelet probe or the API server sends at once.
//! 2. the kept-alive HTTP/1.1 connection that has waited longest for its next request (as nginx
//!    reuses its kept-alive connections when it runs out of them).
//!
//! A connection that has started its TLS handshake or its first request head is left to finish
//! it within the header timeout: its request may be complete in the socket already, and closing
//! it would lose it. A connection serving a request, and an HTTP/2 connection once it has sent
//! one, never leaves for another. With nothing to ask, the new connection waits, accepted, for a slot; the ones
//! after it wait in the kernel's backlog.
//!
//! A source address at its share of the slots makes room the same way among its own
//! connections only; when every one of them is serving a request, its new connection is closed
//! at once. One pod then cannot hold the port the kubelet or the API server needs.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use std::time::Duration;

use tokio::sync::futures::Notified;
use tokio::sync::Notify;
use tokio::time::Instant;

/// How long a new connection counts as arriving rather than silent: its first bytes may be in
/// the socket already, and its task not yet run to see them. A kubelet probe or the API server
/// sends within microseconds; a connection quiet past this is silent.
const GRACE: Duration = Duration::from_millis(100);

/// The smallest share of a cap one source gets by default: the kubelet's three probes (startup,
/// liveness, readiness) at once, and one more.
const MIN_SHARE: usize = 4;

/// The default share of one source: a quarter of the cap, at least [`MIN_SHARE`] (never more
/// than the cap).
pub(super) fn default_share(max: usize) -> usize {
    (max / 4).max(MIN_SHARE).min(max.max(1))
}

/// A connection cap: its slots, and who holds them in which standing.
#[derive(Debug)]
pub struct Cap {
    max: usize,
    per_source: usize,
    /// See [`GRACE`].
    grace: Duration,
    slots: Mutex<Slots>,
    /// A slot was freed, or a request for room withdrawn: an accept loop waiting for room looks
    /// again.
    changed: Notify,
}

#[derive(Debug, Default)]
struct Slots {
    open: usize,
    /// Connections asked to leave that have not left yet.
    leaving: usize,
    /// Keys of the two lists: one counter, so a lower key is older.
    next: u64,
    /// Silent connections (not a byte yet), oldest first.
    quiet: BTreeMap<u64, Arc<Place>>,
    /// Kept-alive HTTP/1.1 connections between requests, longest-waiting first.
    waiting: BTreeMap<u64, Arc<Place>>,
    sources: HashMap<IpAddr, Source>,
}

#[derive(Debug, Default, Clone, Copy)]
struct Source {
    open: usize,
    leaving: usize,
}

/// Where a connection stands in the eviction order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Standing {
    /// Not a byte yet; the key in [`Slots::quiet`].
    Quiet(u64),
    /// In its TLS handshake or first request head: left to finish it.
    Started,
    /// Between HTTP/1.1 requests; the key in [`Slots::waiting`].
    Waiting(u64),
    /// Serving, or an HTTP/2 connection that has sent a request: never asked to leave.
    Serving,
    /// Asked to leave for a new connection.
    Leaving,
}

/// What a new connection gets.
#[derive(Debug)]
pub(super) enum Admission {
    /// A slot, held until the [`Slot`] is dropped.
    Admitted(Slot),
    /// The cap is full, or the source at its share, and a connection was asked to leave (or
    /// none can be): wait for [`Cap::changed`], or until the given time when the oldest quiet
    /// connection becomes silent, and ask again.
    Full(Option<Instant>),
    /// The source holds its share and every one of its connections is serving: close the new
    /// one.
    Refused,
}

impl Cap {
    /// `max` connections at once, at most `per_source` of them from one source address.
    pub(super) fn new(max: usize, per_source: usize) -> Self {
        let max = max.max(1);
        Self {
            max,
            per_source: per_source.clamp(1, max),
            grace: GRACE,
            slots: Mutex::new(Slots::default()),
            changed: Notify::new(),
        }
    }

    #[cfg(test)]
    fn without_grace(mut self) -> Self {
        self.grace = Duration::ZERO;
        self
    }

    /// Connections served at once.
    pub fn max(&self) -> usize {
        self.max
    }

    /// Connections one source address may hold at once.
    pub fn per_source(&self) -> usize {
        self.per_source
    }

    /// Connections holding a slot, leaving ones included.
    pub fn open(&self) -> usize {
        self.lock().open
    }

    fn lock(&self) -> MutexGuard<'_, Slots> {
        // Every update is complete before the lock is let go (nothing in it panics).
        self.slots.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Completes after a slot is freed or a request for room withdrawn; enable it before asking
    /// [`Cap::admit`] so no change is missed.
    pub(super) fn changed(&self) -> Notified<'_> {
        self.changed.notified()
    }

    /// A slot for a new connection from `source`, asking another connection to leave when the
    /// cap or the source's share is reached (see the module's doc for the order).
    pub(super) fn admit(self: &Arc<Self>, source: IpAddr) -> Admission {
        let mut slots = self.lock();
        let mine = slots.sources.get(&source).copied().unwrap_or_default();
        // A share as large as the cap is no share: the source waits for room like any other.
        let shared = self.per_source < self.max;
        let mut later = None;
        if shared && mine.open - mine.leaving >= self.per_source {
            match slots.ask_to_leave(Some(source), self.grace) {
                Asked::Now => {}
                Asked::Later(at) => later = Some(at),
                Asked::NoOne => return Admission::Refused,
            }
        }
        if slots.open - slots.leaving >= self.max {
            if let Asked::Later(at) = slots.ask_to_leave(None, self.grace) {
                later = later.min(Some(at)).or(Some(at));
            }
        }
        let mine = slots.sources.get(&source).copied().unwrap_or_default();
        if slots.open >= self.max || mine.open >= self.per_source {
            return Admission::Full(later);
        }
        let key = slots.key();
        let place = Arc::new(Place {
            cap: self.clone(),
            source,
            standing: Mutex::new(Standing::Quiet(key)),
            since: Instant::now(),
            told: Notify::new(),
        });
        slots.quiet.insert(key, place.clone());
        slots.open += 1;
        slots.sources.entry(source).or_default().open += 1;
        Admission::Admitted(Slot(place))
    }
}

impl Slots {
    fn key(&mut self) -> u64 {
        self.next += 1;
        self.next
    }

    /// Asks the first connection in the eviction order (among `source`'s own, if given) to
    /// leave. A quiet connection younger than `grace` is not asked yet, nor anyone after it: it
    /// may be silent, and a kept-alive connection goes only when none is.
    fn ask_to_leave(&mut self, source: Option<IpAddr>, grace: Duration) -> Asked {
        let ours = |place: &&Arc<Place>| source.is_none_or(|source| place.source == source);
        let quiet = self.quiet.values().find(ours);
        if let Some(young) = quiet.filter(|place| place.since + grace > Instant::now()) {
            return Asked::Later(young.since + grace);
        }
        let Some(place) = quiet.or_else(|| self.waiting.values().find(ours)).cloned() else {
            return Asked::NoOne;
        };
        let mut standing = place.standing();
        self.unlist(*standing);
        *standing = Standing::Leaving;
        self.leaving += 1;
        self.sources.entry(place.source).or_default().leaving += 1;
        place.told.notify_one();
        Asked::Now
    }

    /// Takes a connection off the eviction order (or off the count of leaving ones).
    fn unlist(&mut self, standing: Standing) {
        match standing {
            Standing::Quiet(key) => drop(self.quiet.remove(&key)),
            Standing::Waiting(key) => drop(self.waiting.remove(&key)),
            Standing::Started | Standing::Serving | Standing::Leaving => {}
        }
    }

    fn withdraw_leaving(&mut self, source: IpAddr) {
        self.leaving -= 1;
        if let Some(mine) = self.sources.get_mut(&source) {
            mine.leaving -= 1;
        }
    }
}

/// Whether a connection was asked to leave.
enum Asked {
    Now,
    /// Not yet: the oldest quiet connection may still speak until then.
    Later(Instant),
    NoOne,
}

/// One connection's slot, as the cap lists it. Its standing changes only under the cap's lock.
#[derive(Debug)]
pub(super) struct Place {
    cap: Arc<Cap>,
    source: IpAddr,
    standing: Mutex<Standing>,
    /// When it was admitted.
    since: Instant,
    /// Notified when the connection is asked to leave.
    told: Notify,
}

impl Place {
    fn standing(&self) -> MutexGuard<'_, Standing> {
        self.standing.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The connection's first bytes arrived (a TLS ClientHello, or the start of a request): it
    /// is left to finish its handshake and head within the header timeout.
    pub(super) fn spoke(&self) {
        let mut slots = self.cap.lock();
        let mut standing = self.standing();
        if let Standing::Quiet(key) = *standing {
            slots.quiet.remove(&key);
            *standing = Standing::Started;
        }
    }

    /// A complete request head arrived: the connection serves it and leaves for no one (an
    /// HTTP/1.1 connection until it waits for its next request, an HTTP/2 one ever after). A
    /// request for it to leave that came just before is withdrawn: the request came first.
    pub(super) fn serving(&self) {
        let mut slots = self.cap.lock();
        let mut standing = self.standing();
        match *standing {
            Standing::Serving => return,
            Standing::Leaving => {
                slots.withdraw_leaving(self.source);
                self.cap.changed.notify_waiters();
            }
            listed => slots.unlist(listed),
        }
        *standing = Standing::Serving;
    }

    /// A kept-alive HTTP/1.1 connection waits for its next request: it may now be asked to
    /// leave, after every silent connection.
    pub(super) fn waiting(self: &Arc<Self>) {
        let mut slots = self.cap.lock();
        let mut standing = self.standing();
        if *standing == Standing::Serving {
            let key = slots.key();
            slots.waiting.insert(key, self.clone());
            *standing = Standing::Waiting(key);
        }
    }

    /// Completes once the connection has been asked to leave for a new one.
    pub(super) async fn told_to_leave(&self) {
        loop {
            // `notify_one` keeps a notification sent while no one waited, so none is missed.
            self.told.notified().await;
            if *self.standing() == Standing::Leaving {
                return;
            }
        }
    }
}

/// A connection's slot, freed when dropped.
#[derive(Debug)]
pub(super) struct Slot(Arc<Place>);

impl Slot {
    pub(super) fn place(&self) -> &Arc<Place> {
        &self.0
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let place = &self.0;
        let cap = &place.cap;
        let mut slots = cap.lock();
        let mut standing = place.standing();
        match *standing {
            Standing::Leaving => slots.withdraw_leaving(place.source),
            listed => slots.unlist(listed),
        }
        *standing = Standing::Serving;
        drop(standing);
        slots.open -= 1;
        if let Some(mine) = slots.sources.get_mut(&place.source) {
            mine.open -= 1;
            if mine.open == 0 {
                slots.sources.remove(&place.source);
            }
        }
        drop(slots);
        cap.changed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 2));

    fn admitted(cap: &Arc<Cap>, source: IpAddr) -> Slot {
        match cap.admit(source) {
            Admission::Admitted(slot) => slot,
            other => panic!("not admitted: {other:?}"),
        }
    }

    fn told(slot: &Slot) -> bool {
        *slot.place().standing() == Standing::Leaving
    }

    /// A kept-alive connection: admitted, served a request, waiting for the next.
    fn kept_alive(cap: &Arc<Cap>, source: IpAddr) -> Slot {
        let slot = admitted(cap, source);
        slot.place().serving();
        slot.place().waiting();
        slot
    }

    #[test]
    fn at_the_cap_the_oldest_silent_connection_leaves_before_a_kept_alive_one() {
        let cap = Arc::new(Cap::new(3, 3).without_grace());
        let kept = kept_alive(&cap, A);
        let silent = admitted(&cap, A);
        let younger = admitted(&cap, A);
        assert!(matches!(cap.admit(A), Admission::Full(_)));
        assert!(told(&silent), "the oldest silent connection was not asked to leave");
        assert!(!told(&kept) && !told(&younger));
        // Asked once: until it leaves, a new connection asks no one else.
        assert!(matches!(cap.admit(A), Admission::Full(_)));
        assert!(!told(&younger) && !told(&kept));
        drop(silent);
        let serving = admitted(&cap, A);
        serving.place().serving();
        // The silent ones go first, then the kept-alive one; the serving one never.
        assert!(matches!(cap.admit(A), Admission::Full(_)));
        assert!(told(&younger) && !told(&kept));
        drop(younger);
        let also_serving = admitted(&cap, A);
        also_serving.place().serving();
        assert!(matches!(cap.admit(A), Admission::Full(_)));
        assert!(told(&kept) && !told(&serving) && !told(&also_serving));
    }

    #[test]
    fn a_connection_that_has_started_its_head_is_left_to_finish_it() {
        let cap = Arc::new(Cap::new(3, 3).without_grace());
        let handshaking = admitted(&cap, A);
        handshaking.place().spoke();
        let quiet = admitted(&cap, A);
        let kept = kept_alive(&cap, A);
        assert!(matches!(cap.admit(B), Admission::Full(_)));
        assert!(told(&quiet) && !told(&handshaking) && !told(&kept));
        drop(quiet);
        let serving = admitted(&cap, B);
        serving.place().serving();
        assert!(matches!(cap.admit(B), Admission::Full(_)));
        assert!(told(&kept) && !told(&handshaking));
        drop(kept);
        let also_serving = admitted(&cap, B);
        also_serving.place().serving();
        assert!(matches!(cap.admit(B), Admission::Full(_)));
        assert!(!told(&handshaking));
    }

    #[test]
    fn a_connection_just_admitted_is_not_silent_yet_and_no_kept_alive_one_leaves_for_it() {
        let cap = Arc::new(Cap::new(2, 2));
        let kept = kept_alive(&cap, A);
        let arriving = admitted(&cap, A);
        let Admission::Full(Some(at)) = cap.admit(B) else { panic!("expected to wait for the grace") };
        assert!(at > Instant::now() && at <= Instant::now() + GRACE);
        assert!(!told(&kept) && !told(&arriving));
    }

    #[test]
    fn a_serving_connection_is_never_asked_to_leave() {
        let cap = Arc::new(Cap::new(2, 2).without_grace());
        let first = admitted(&cap, A);
        let second = admitted(&cap, B);
        first.place().serving();
        second.place().serving();
        for _ in 0..3 {
            assert!(matches!(cap.admit(A), Admission::Full(_)));
        }
        assert!(!told(&first) && !told(&second));
        drop(first);
        let _new = admitted(&cap, A);
    }

    #[test]
    fn a_request_that_arrives_first_withdraws_the_request_to_leave() {
        let cap = Arc::new(Cap::new(2, 2).without_grace());
        let first = admitted(&cap, A);
        let second = admitted(&cap, A);
        assert!(matches!(cap.admit(B), Admission::Full(_)));
        assert!(told(&first));
        first.place().serving();
        assert!(!told(&first));
        // The next one asked is the other silent connection.
        assert!(matches!(cap.admit(B), Admission::Full(_)));
        assert!(told(&second) && !told(&first));
    }

    #[test]
    fn a_source_at_its_share_makes_room_among_its_own_connections_then_is_refused() {
        let cap = Arc::new(Cap::new(8, 2).without_grace());
        let other = admitted(&cap, B);
        let first = admitted(&cap, A);
        let second = admitted(&cap, A);
        // At its share, though the cap has room: its own oldest silent connection leaves.
        assert!(matches!(cap.admit(A), Admission::Full(_)));
        assert!(told(&first) && !told(&second) && !told(&other));
        drop(first);
        let third = admitted(&cap, A);
        // Every one of its connections serving: the new one is refused, others still admitted.
        second.place().serving();
        third.place().serving();
        assert!(matches!(cap.admit(A), Admission::Refused));
        assert!(!told(&other));
        let _b = admitted(&cap, B);
        assert_eq!(cap.open(), 4);
    }

    #[test]
    fn the_default_share_is_a_quarter_of_the_cap_and_at_least_four() {
        assert_eq!(default_share(512), 128);
        assert_eq!(default_share(32), 8);
        assert_eq!(default_share(8), 4);
        assert_eq!(default_share(2), 2);
        assert_eq!(Cap::new(0, 0).per_source(), 1);
    }

    #[test]
    fn freed_slots_and_sources_are_forgotten() {
        let cap = Arc::new(Cap::new(4, 4).without_grace());
        let slots: Vec<_> = (0..4).map(|_| kept_alive(&cap, A)).collect();
        assert!(matches!(cap.admit(B), Admission::Full(_)));
        drop(slots);
        let state = cap.lock();
        assert_eq!((state.open, state.leaving), (0, 0));
        assert!(state.quiet.is_empty() && state.waiting.is_empty());
        assert!(state.sources.is_empty());
    }
}
