//! The token cache: one slot per audience, each kept fresh by its own background task, so at most
//! one fetch per audience is ever in flight and no request waits on a refresh in steady state.
//! Requests read the slot; they wait only for a first token (or the one replacing a token an
//! upstream refused), and fail closed with the reason when there is none to give.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use prometheus_client::metrics::counter::Counter;
use tokio::sync::{watch, Notify, Semaphore};
use tracing::{debug, info, warn};

use crate::metrics::Metrics;
use crate::source::{FetchError, TokenSource};
use crate::token::Token;

/// Why no token can be given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Unavailable(pub String);

struct Slot {
    audience: String,
    state: Mutex<State>,
    /// Bumped on every change of `state`.
    changed: watch::Sender<u64>,
    /// A fresh token was refused again within `FORCED_REFETCH_INTERVAL`: the audience or the
    /// invoker role is wrong, not the token. Cleared by the next answer that is not a refusal.
    /// An atomic, so the proxy's check after every answer takes no lock.
    refused: AtomicBool,
    /// Cuts the refresher's sleep short: a token was refused upstream.
    wake: Notify,
    /// This audience's series of `token_cache_hits` and `token_cache_waits`, looked up once so a
    /// request counts itself without a label lookup.
    hits: Counter,
    waits: Counter,
}

#[derive(Default)]
struct State {
    /// Shared with the requests that carry it: one reference count per request, no copy.
    token: Option<Arc<Token>>,
    error: Option<String>,
    /// When an upstream's refusal last made the slot drop its token.
    last_forced: Option<Instant>,
}

/// At most one refetch forced by upstream refusals per audience in this time.
pub const FORCED_REFETCH_INTERVAL: Duration = Duration::from_secs(30);

/// What `/readyz` and the 503 body say when fresh tokens are refused too.
pub const REFUSED: &str = "token refused by upstream: check audience and invoker role";

impl Slot {
    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave `State` half-written; keep serving.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn update(&self, change: impl FnOnce(&mut State)) {
        change(&mut self.state());
        self.changed.send_modify(|generation| *generation += 1);
    }
}

/// Retry delays: quick for passing faults, slower for configuration errors a person must fix.
fn backoff(failures: u32, config_error: bool) -> Duration {
    let (base, cap) = if config_error { (2_000u64, 60_000u64) } else { (250, 30_000) };
    let ceiling = base.saturating_mul(1 << failures.saturating_sub(1).min(16)).min(cap);
    Duration::from_millis(fastrand::u64(ceiling / 2..=ceiling))
}

/// When to refresh `token`: `refresh_lead` before `exp`, brought forward by up to a quarter of
/// the lead so that many pods do not refresh in step.
fn refresh_delay(token: &Token, now: SystemTime) -> Duration {
    let lead = token.refresh_lead();
    let jitter = Duration::from_millis(fastrand::u64(0..=(lead.as_millis() as u64 / 4)));
    let at = token.expires_at - lead - jitter;
    at.duration_since(now).unwrap_or_default()
}

/// Token fetches in flight at once across all audiences. The GKE metadata server allows about
/// 200 connections per node, shared by every pod on it: a pod with 32 upstreams starting beside
/// others must not take a sixth of them, and a slow metadata server answers a few requests
/// sooner than many.
pub const MAX_CONCURRENT_FETCHES: usize = 8;

pub struct TokenCache {
    slots: HashMap<String, Arc<Slot>>,
    metrics: Arc<Metrics>,
}

impl TokenCache {
    /// Starts one refresher per audience; they fetch at once and then keep their tokens fresh.
    /// `expected_email`, when set, must equal each token's `email` claim.
    pub fn start(
        audiences: impl IntoIterator<Item = String>,
        source: Arc<dyn TokenSource>,
        expected_email: Option<String>,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        let mut slots = HashMap::new();
        for audience in audiences {
            slots.entry(audience.clone()).or_insert_with(|| {
                // Series start at zero, so a dashboard sees "no waits" rather than "no data".
                let labels = Metrics::audience(&audience);
                Arc::new(Slot {
                    hits: metrics.cache_hits.get_or_create(&labels).clone(),
                    waits: metrics.cache_waits.get_or_create(&labels).clone(),
                    audience,
                    state: Mutex::default(),
                    changed: watch::channel(0).0,
                    refused: AtomicBool::new(false),
                    wake: Notify::new(),
                })
            });
        }
        let fetches = Arc::new(Semaphore::new(MAX_CONCURRENT_FETCHES));
        for slot in slots.values() {
            let (slot, source, fetches) = (slot.clone(), source.clone(), fetches.clone());
            tokio::spawn(refresh(slot, source, fetches, expected_email.clone(), metrics.clone()));
        }
        Arc::new(Self { slots, metrics })
    }

    /// The slot of `audience`, looked up once: the proxy keeps one per route, so a request
    /// reaches its token without hashing the audience.
    pub fn audience(&self, audience: &str) -> Option<Audience> {
        self.slots.get(audience).map(|slot| Audience(slot.clone()))
    }

    /// A servable token for `audience`, waiting at most `wait` when one is on its way.
    pub async fn get(&self, audience: &str, wait: Duration) -> Result<Arc<Token>, Unavailable> {
        match self.audience(audience) {
            Some(slot) => slot.get(wait).await,
            None => Err(Unavailable(format!("no audience {audience:?}"))),
        }
    }

    /// An upstream's front end refused `token` (see [`Audience::reject`]).
    pub fn reject(&self, audience: &str, token: &Token) -> bool {
        self.audience(audience).is_some_and(|slot| slot.reject(token))
    }

    /// An upstream answered without refusing the token (see [`Audience::accepted`]).
    pub fn accepted(&self, audience: &str) {
        if let Some(slot) = self.audience(audience) {
            slot.accepted();
        }
    }

    /// Per audience: `Ok(seconds left)` when a token can be served, else why not.
    pub fn status(&self) -> Vec<(String, Result<i64, String>)> {
        let now = SystemTime::now();
        let mut status: Vec<_> = self
            .slots
            .values()
            .map(|slot| {
                let state = slot.state();
                let result = match (&state.token, &state.error) {
                    _ if slot.refused.load(Ordering::Relaxed) => Err(REFUSED.to_owned()),
                    (Some(token), _) if token.servable(now) => Ok(token.ttl_seconds(now)),
                    (_, Some(error)) => Err(error.clone()),
                    _ => Err("waiting for the first token".to_owned()),
                };
                (slot.audience.clone(), result)
            })
            .collect();
        status.sort_by(|a, b| a.0.cmp(&b.0));
        status
    }

    /// Sets the TTL gauges, just before metrics are read.
    pub fn observe_ttl(&self) {
        let now = SystemTime::now();
        for slot in self.slots.values() {
            let ttl = slot.state().token.as_ref().map_or(0, |t| t.ttl_seconds(now).max(0));
            self.metrics.token_ttl.get_or_create(&Metrics::audience(&slot.audience)).set(ttl);
        }
    }
}

/// One audience's slot in the [`TokenCache`].
#[derive(Clone)]
pub struct Audience(Arc<Slot>);

impl Audience {
    /// A servable token, waiting at most `wait` when one is on its way.
    pub async fn get(&self, wait: Duration) -> Result<Arc<Token>, Unavailable> {
        let slot = &self.0;
        let mut changes: Option<watch::Receiver<u64>> = None;
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            {
                let state = slot.state();
                if let Some(token) = state.token.as_ref().filter(|t| t.servable(SystemTime::now())) {
                    let counter = if changes.is_some() { &slot.waits } else { &slot.hits };
                    counter.inc();
                    return Ok(token.clone());
                }
                if let Some(error) = &state.error {
                    return Err(Unavailable(error.clone()));
                }
            }
            // Watch for changes only once a wait is needed, then look again before waiting, so
            // no change between the look and the watch is missed.
            let Some(changes) = changes.as_mut() else {
                changes = Some(slot.changed.subscribe());
                continue;
            };
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => continue,
                Ok(Err(_)) => return Err(Unavailable("the token refresher stopped".to_owned())),
                Err(_) => return Err(Unavailable(format!("no token yet after {} s", wait.as_secs_f32()))),
            }
        }
    }

    /// An upstream's front end refused `token`. Drops it and fetches a new one now, at most
    /// once per `FORCED_REFETCH_INTERVAL` (several refusals of the same token cause one fetch).
    /// Returns whether the caller may retry: a new token is (or already was) on its way. A refusal
    /// inside the interval keeps the token and marks the audience refused instead.
    pub fn reject(&self, token: &Token) -> bool {
        let slot = &self.0;
        let mut dropped = false;
        let mut retry = false;
        slot.update(|state| {
            if state.token.as_deref() != Some(token) {
                // Already replaced (or being replaced) after another request's refusal.
                retry = true;
            } else if state.last_forced.is_some_and(|at| at.elapsed() < FORCED_REFETCH_INTERVAL) {
                slot.refused.store(true, Ordering::Relaxed);
            } else {
                state.token = None;
                state.error = None;
                state.last_forced = Some(Instant::now());
                dropped = true;
                retry = true;
            }
        });
        if dropped {
            slot.wake.notify_one();
        }
        retry
    }

    /// An upstream answered without refusing the token: a refusal reported before is over.
    pub fn accepted(&self) {
        let slot = &self.0;
        // A read first: the common case writes nothing to the shared flag.
        if slot.refused.load(Ordering::Relaxed) {
            slot.refused.store(false, Ordering::Relaxed);
        }
    }
}

async fn refresh(
    slot: Arc<Slot>,
    source: Arc<dyn TokenSource>,
    fetches: Arc<Semaphore>,
    expected_email: Option<String>,
    metrics: Arc<Metrics>,
) {
    let audience = slot.audience.clone();
    let mut failures = 0u32;
    loop {
        let (fetched, seconds) = {
            // The semaphore is never closed: a permit always comes.
            let _permit = fetches.acquire().await.ok();
            let started = Instant::now();
            let fetched = source.fetch(&audience).await;
            (fetched, started.elapsed().as_secs_f64())
        };
        let fetched = fetched.and_then(|token| match (&expected_email, &token.email) {
            (Some(expected), Some(email)) if email.eq_ignore_ascii_case(expected) => Ok(token),
            (None, _) => Ok(token),
            (Some(expected), email) => Err(FetchError::Invalid(format!(
                "the token is for {}, not for the expected service account {expected}: check the Workload Identity binding of the pod's ServiceAccount",
                email.as_deref().unwrap_or("no email")
            ))),
        });
        let delay = match fetched {
            Ok(token) => {
                metrics.fetch(&audience, "ok", seconds);
                failures = 0;
                let delay = refresh_delay(&token, SystemTime::now());
                debug!(%audience, lifetime = token.lifetime().as_secs(), refresh_in = delay.as_secs(), "token fetched");
                slot.update(|state| {
                    state.token = Some(Arc::new(token));
                    state.error = None;
                });
                delay
            }
            Err(error) => {
                metrics.fetch(&audience, error.kind(), seconds);
                failures += 1;
                let config_error = error.is_config();
                let delay = backoff(failures, config_error);
                if config_error {
                    warn!(%audience, error = %error, retry_in_ms = delay.as_millis() as u64, "token fetch refused");
                } else {
                    info!(%audience, error = %error, retry_in_ms = delay.as_millis() as u64, "token fetch failed");
                }
                slot.update(|state| {
                    state.error = Some(error.to_string());
                    // A wrong identity is never served, however fresh the token.
                    if matches!(error, FetchError::Invalid(_)) {
                        state.token = None;
                    }
                });
                delay
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = slot.wake.notified() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use std::pin::Pin;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::UNIX_EPOCH;

    use base64::Engine;

    fn jwt(lifetime: u64, email: &str) -> String {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_secs();
        let b64 = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
        let claims = serde_json::json!({"iat": now, "exp": now + lifetime, "email": email});
        format!("{}.{}.{}", b64(b"{}"), b64(claims.to_string().as_bytes()), b64(b"sig"))
    }

    struct Scripted {
        fetches: AtomicUsize,
        in_flight: AtomicUsize,
        max_in_flight: AtomicUsize,
        delay: Duration,
        lifetime: u64,
        email: &'static str,
        fail_with: Mutex<Option<FetchError>>,
    }

    impl TokenSource for Scripted {
        fn fetch<'a>(
            &'a self,
            _audience: &'a str,
        ) -> Pin<Box<dyn Future<Output = Result<Token, FetchError>> + Send + 'a>> {
            Box::pin(async move {
                self.fetches.fetch_add(1, Ordering::SeqCst);
                let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                self.max_in_flight.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(self.delay).await;
                self.in_flight.fetch_sub(1, Ordering::SeqCst);
                if let Some(error) = self.fail_with.lock().expect("lock").clone() {
                    return Err(error);
                }
                Token::parse(&jwt(self.lifetime, self.email), SystemTime::now()).map_err(Into::into)
            })
        }
    }

    fn scripted(delay_ms: u64, email: &'static str) -> Arc<Scripted> {
        Arc::new(Scripted {
            fetches: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
            delay: Duration::from_millis(delay_ms),
            lifetime: 3600,
            email,
            fail_with: Mutex::new(None),
        })
    }

    #[tokio::test]
    async fn concurrent_first_requests_share_one_fetch() {
        let source = scripted(100, "a@p.iam.gserviceaccount.com");
        let cache = TokenCache::start(["aud".to_owned()], source.clone(), None, Arc::default());
        let waiters: Vec<_> = (0..200)
            .map(|_| {
                let cache = cache.clone();
                tokio::spawn(async move { cache.get("aud", Duration::from_secs(5)).await })
            })
            .collect();
        for waiter in waiters {
            assert!(waiter.await.expect("task").is_ok());
        }
        assert_eq!(source.fetches.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn start_up_fetches_are_bounded() {
        let source = scripted(20, "a@p.iam.gserviceaccount.com");
        let audiences: Vec<String> = (0..32).map(|i| format!("https://u{i}.example.com")).collect();
        let cache = TokenCache::start(audiences.clone(), source.clone(), None, Arc::default());
        for audience in &audiences {
            cache.get(audience, Duration::from_secs(10)).await.expect("a token for every audience");
        }
        assert_eq!(source.fetches.load(Ordering::SeqCst), 32);
        let most = source.max_in_flight.load(Ordering::SeqCst);
        assert!(most <= MAX_CONCURRENT_FETCHES, "{most} fetches at once");
        assert!(most > 1, "fetches still overlap: {most}");
    }

    #[tokio::test]
    async fn rejected_token_is_replaced_once() {
        let source = scripted(10, "a@p.iam.gserviceaccount.com");
        let cache = TokenCache::start(["aud".to_owned()], source.clone(), None, Arc::default());
        let first = cache.get("aud", Duration::from_secs(5)).await.expect("token");
        cache.reject("aud", &first);
        cache.reject("aud", &first);
        let second = cache.get("aud", Duration::from_secs(5)).await.expect("new token");
        assert_eq!(source.fetches.load(Ordering::SeqCst), 2);
        assert!(second.issued_at >= first.issued_at);
    }

    #[tokio::test]
    async fn wrong_identity_is_never_served() {
        let source = scripted(1, "other@p.iam.gserviceaccount.com");
        let cache = TokenCache::start(
            ["aud".to_owned()],
            source,
            Some("expected@p.iam.gserviceaccount.com".to_owned()),
            Arc::default(),
        );
        let error = cache.get("aud", Duration::from_secs(5)).await.expect_err("mismatch");
        assert!(error.0.contains("expected@p.iam.gserviceaccount.com"), "{error}");
        assert!(cache.status()[0].1.is_err());
    }

    #[tokio::test]
    async fn configuration_errors_fail_fast_with_the_servers_words() {
        let source = scripted(1, "a@p.iam.gserviceaccount.com");
        *source.fail_with.lock().expect("lock") = Some(FetchError::Config {
            source_name: "metadata server",
            status: 404,
            message: "ServiceAccount is not bound".into(),
        });
        let cache = TokenCache::start(["aud".to_owned()], source, None, Arc::default());
        let started = Instant::now();
        let error = cache.get("aud", Duration::from_secs(10)).await.expect_err("refused");
        assert!(error.0.contains("404") && error.0.contains("not bound"), "{error}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        assert!(backoff(1, false) <= Duration::from_millis(250));
        assert!(backoff(30, false) <= Duration::from_secs(30));
        assert!(backoff(30, false) >= Duration::from_secs(15));
        assert!(backoff(1, true) >= Duration::from_secs(1));
    }
}
