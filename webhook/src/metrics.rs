//! Prometheus metrics of the webhook, served on the admin port.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReviewLabels {
    pub webhook: String,
    pub result: String,
    pub reason: String,
}

pub struct Metrics {
    registry: Registry,
    pub reviews: Family<ReviewLabels, Counter>,
    pub review_seconds: Histogram,
    pub certificate_reloads: Family<ReloadLabels, Counter>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    pub result: String,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("wiproxy_webhook");
        let reviews = Family::<ReviewLabels, Counter>::default();
        registry.register(
            "reviews",
            "Admission reviews answered, by webhook (mutate, validate), result and reason",
            reviews.clone(),
        );
        let buckets = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0];
        let review_seconds = Histogram::new(buckets);
        registry.register("review_duration_seconds", "Time to answer an admission review", review_seconds.clone());
        let certificate_reloads = Family::<ReloadLabels, Counter>::default();
        registry.register("certificate_reloads", "Serving certificate reloads, by result", certificate_reloads.clone());
        Self { registry, reviews, review_seconds, certificate_reloads }
    }
}

impl Metrics {
    pub fn review(&self, webhook: &str, result: &str, reason: &str, seconds: f64) {
        let labels = ReviewLabels { webhook: webhook.to_owned(), result: result.to_owned(), reason: reason.to_owned() };
        self.reviews.get_or_create(&labels).inc();
        self.review_seconds.observe(seconds);
    }

    pub fn reload(&self, result: &str) {
        self.certificate_reloads.get_or_create(&ReloadLabels { result: result.to_owned() }).inc();
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
