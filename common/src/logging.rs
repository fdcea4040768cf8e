//! Log set-up shared by both binaries: a `target=level` filter and text or JSON lines on stderr.
//! Never an object or a token: what is logged is the caller's choice of fields.

use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One JSON object per line, event fields flattened (what log collectors parse).
    Json,
    /// Human-readable lines.
    Text,
}

/// Installs the global subscriber. `filter` is a level or a list such as
/// `info,wiproxy_webhook=debug`; a filter that does not parse falls back to `info`.
pub fn init(filter: &str, format: LogFormat) {
    let targets: Targets = filter.parse().unwrap_or_else(|_| Targets::new().with_default(tracing::Level::INFO));
    let registry = tracing_subscriber::registry().with(targets);
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(false);
    match format {
        LogFormat::Json => registry.with(fmt.json().flatten_event(true).with_span_list(false)).init(),
        LogFormat::Text => registry.with(fmt).init(),
    }
}
