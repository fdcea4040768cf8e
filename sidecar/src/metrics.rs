//! Prometheus metrics of the sidecar, served on the admin port.

use std::sync::RwLock;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub upstream: String,
    pub status: u16,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabels {
    pub upstream: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FetchLabels {
    pub audience: String,
    pub result: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AudienceLabels {
    pub audience: String,
}

pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub fetches: Family<FetchLabels, Counter>,
    pub fetch_seconds: Histogram,
    pub token_ttl: Family<AudienceLabels, Gauge>,
    pub cache_hits: Family<AudienceLabels, Counter>,
    pub cache_waits: Family<AudienceLabels, Counter>,
    pub unprocessed_retries: Family<UpstreamLabels, Counter>,
    pub unprocessed_refusals: Family<UpstreamLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("wiproxy");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register("requests", "Proxied requests, by upstream and status", requests.clone());
        let fetches = Family::<FetchLabels, Counter>::default();
        registry.register("token_fetches", "ID token fetches, by audience and result", fetches.clone());
        let fetch_seconds = Histogram::new([0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0]);
        registry.register("token_fetch_duration_seconds", "Time to fetch an ID token", fetch_seconds.clone());
        let token_ttl = Family::<AudienceLabels, Gauge>::default();
        registry.register("token_ttl_seconds", "Seconds until the cached token expires", token_ttl.clone());
        let cache_hits = Family::<AudienceLabels, Counter>::default();
        registry.register("token_cache_hits", "Requests served a cached token at once", cache_hits.clone());
        let cache_waits = Family::<AudienceLabels, Counter>::default();
        registry.register("token_cache_waits", "Requests that waited for a token", cache_waits.clone());
        let unprocessed_retries = Family::<UpstreamLabels, Counter>::default();
        registry.register(
            "upstream_unprocessed_retries",
            "Requests sent again because the upstream never processed them (GOAWAY, REFUSED_STREAM)",
            unprocessed_retries.clone(),
        );
        let unprocessed_refusals = Family::<UpstreamLabels, Counter>::default();
        registry.register(
            "upstream_unprocessed_refusals",
            "Requests the upstream never processed that could not be sent again (past the retry budget)",
            unprocessed_refusals.clone(),
        );
        Self {
            registry,
            requests,
            fetches,
            fetch_seconds,
            token_ttl,
            cache_hits,
            cache_waits,
            unprocessed_retries,
            unprocessed_refusals,
        }
    }
}

impl Metrics {
    pub fn request(&self, upstream: &str, status: u16) {
        self.requests.get_or_create(&RequestLabels { upstream: upstream.to_owned(), status }).inc();
    }

    /// The `requests` series of `upstream` ("-" for requests that reached none).
    pub fn upstream_requests(&self, upstream: &str) -> UpstreamRequests {
        UpstreamRequests { upstream: upstream.to_owned(), family: self.requests.clone(), seen: RwLock::default() }
    }

    pub fn fetch(&self, audience: &str, result: &str, seconds: f64) {
        self.fetches.get_or_create(&FetchLabels { audience: audience.to_owned(), result: result.to_owned() }).inc();
        self.fetch_seconds.observe(seconds);
    }

    pub fn audience(audience: &str) -> AudienceLabels {
        AudienceLabels { audience: audience.to_owned() }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// One upstream's `requests` series, counted by status without building labels (and hashing
/// them) per request: the counters of the statuses seen so far are kept in a short list.
pub struct UpstreamRequests {
    upstream: String,
    family: Family<RequestLabels, Counter>,
    seen: RwLock<Vec<(u16, Counter)>>,
}

impl UpstreamRequests {
    pub fn count(&self, status: u16) {
        if let Ok(seen) = self.seen.read() {
            if let Some((_, counter)) = seen.iter().find(|(seen, _)| *seen == status) {
                counter.inc();
                return;
            }
        }
        let labels = RequestLabels { upstream: self.upstream.clone(), status };
        let counter = self.family.get_or_create(&labels).clone();
        counter.inc();
        if let Ok(mut seen) = self.seen.write() {
            if !seen.iter().any(|(seen, _)| *seen == status) {
                seen.push((status, counter));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_requests_count_into_the_family() {
        let metrics = Metrics::default();
        let orders = metrics.upstream_requests("orders");
        for status in [200, 200, 503, 200] {
            orders.count(status);
        }
        metrics.request("orders", 503);
        let text = metrics.encode();
        assert!(text.contains(r#"wiproxy_requests_total{upstream="orders",status="200"} 3"#), "{text}");
        assert!(text.contains(r#"wiproxy_requests_total{upstream="orders",status="503"} 2"#), "{text}");
    }
}
