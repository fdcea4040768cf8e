//! The sidecar's configuration: flags, each also an environment variable (`WIPROXY_<FLAG>`), as
//! the webhook sets them on the injected container.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use wiproxy_common::logging::LogFormat;
use wiproxy_common::{parse_upstreams, TokenHeader, Upstream, UpstreamError};

use crate::credentials::{Credentials, CredentialsError, FederationTrust};
use crate::http::{ClientError, Pins};

#[derive(Debug, Parser)]
#[command(
    name = "wiproxy",
    version,
    about = "Token proxy: adds Google-signed ID tokens to calls to private Cloud Functions and Cloud Run"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub settings: Settings,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the proxy (the default).
    Proxy,
    /// Print an ID token through the configured credentials, like `gcloud auth print-identity-token`.
    Token(TokenArgs),
}

#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct TokenArgs {
    /// Audience of the token.
    #[arg(long)]
    pub audience: Option<String>,
    /// Use the audience of this configured upstream.
    #[arg(long)]
    pub upstream: Option<String>,
}

#[derive(Debug, Args)]
pub struct Settings {
    /// Upstreams: NAME=URL[;audience=AUD][;header=HEADER], one per line or comma-separated.
    #[arg(long, global = true, env = "WIPROXY_UPSTREAMS", default_value = "", hide_default_value = true)]
    pub upstreams: String,
    /// Address of the proxy; loopback only by default.
    #[arg(long, global = true, env = "WIPROXY_LISTEN", default_value = "127.0.0.1:15080")]
    pub listen: SocketAddr,
    /// Address of the admin server (/healthz, /readyz, /metrics).
    #[arg(long, global = true, env = "WIPROXY_ADMIN_LISTEN", default_value = "0.0.0.0:15081")]
    pub admin_listen: SocketAddr,
    /// Header the token travels in: authorization or x-serverless-authorization.
    #[arg(long, global = true, env = "WIPROXY_TOKEN_HEADER", default_value = "authorization")]
    pub token_header: String,
    /// Google service account every token must be for (its `email` claim).
    #[arg(long, global = true, env = "WIPROXY_EXPECTED_SERVICE_ACCOUNT")]
    pub expected_service_account: Option<String>,
    /// Where tokens come from: metadata, key-file:PATH, impersonate:GSA or external-account:PATH.
    #[arg(long, global = true, env = "WIPROXY_CREDENTIALS", default_value = "metadata")]
    pub credentials: String,
    /// The universe whose STS and IAM Credentials may receive a federated subject token; a
    /// credential configuration naming another universe is refused at start.
    #[arg(long, global = true, env = "WIPROXY_UNIVERSE_DOMAIN", default_value = crate::credentials::DEFAULT_UNIVERSE_DOMAIN)]
    pub universe_domain: String,
    /// SHA-256 (hex) the external-account configuration file must have (the webhook sets it);
    /// unset, the file is not checked.
    #[arg(long, global = true, env = "WIPROXY_CREDENTIAL_CONFIG_SHA256")]
    pub credential_config_sha256: Option<String>,
    /// Metadata server address (host[:port]).
    #[arg(long, global = true, env = "GCE_METADATA_HOST")]
    pub metadata_host: Option<String>,
    /// Extra PEM roots for upstream TLS.
    #[arg(long, global = true, env = "WIPROXY_EXTRA_CA_FILE")]
    pub extra_ca_file: Option<PathBuf>,
    /// Pin hosts to addresses, HOST=IP[:PORT],…; TLS still verifies the host name.
    #[arg(long, global = true, env = "WIPROXY_RESOLVE", default_value = "", hide_default_value = true)]
    pub resolve: String,
    /// Longest wait of a request for a token that is on its way, in seconds.
    #[arg(long, global = true, env = "WIPROXY_TOKEN_WAIT", default_value_t = 15)]
    pub token_wait: u64,
    /// Longest wait for an upstream's response headers, connection included, in seconds (0: no
    /// limit). The default is Cloud Run's longest request timeout (60 minutes, as Cloud
    /// Functions' 2nd gen), so no request those services would answer is cut, yet no request
    /// waits forever. A response already answering (SSE, gRPC streaming) is never cut. Past it
    /// the app gets 504.
    #[arg(long, global = true, env = "WIPROXY_UPSTREAM_TIMEOUT", default_value_t = 3600)]
    pub upstream_timeout: u64,
    /// Longest time to connect to an upstream and finish its TLS handshake, in seconds; applies
    /// even when WIPROXY_UPSTREAM_TIMEOUT is 0. Past it the app gets 504.
    #[arg(long, global = true, env = "WIPROXY_CONNECT_TIMEOUT", default_value_t = 10)]
    pub connect_timeout: u64,
    /// Connections the proxy port and the upstream ports serve at once, together; more wait in
    /// the kernel's backlog.
    #[arg(long, global = true, env = "WIPROXY_MAX_CONNECTIONS", default_value_t = 256)]
    pub max_connections: usize,
    /// Requests in flight at once on the proxy port and the upstream ports together (HTTP/2
    /// streams and HTTP/1.1 requests); past it an HTTP/2 stream is refused with REFUSED_STREAM
    /// and an HTTP/1.1 request gets 503. Bounds the sidecar's memory (see docs/sidecar.md,
    /// "Limits").
    #[arg(long, global = true, env = "WIPROXY_MAX_REQUESTS", default_value_t = MAX_REQUESTS)]
    pub max_requests: usize,
    /// Longest time for a request's headers (and an idle HTTP/1.1 keep-alive) on the proxy
    /// ports, in seconds.
    #[arg(long, global = true, env = "WIPROXY_HEADER_TIMEOUT", default_value_t = 60)]
    pub header_timeout: u64,
    /// Longest wait for the next piece of a request body, in seconds; past it the app gets 408.
    #[arg(long, global = true, env = "WIPROXY_BODY_TIMEOUT", default_value_t = 60)]
    pub body_timeout: u64,
    /// A proxy connection with no request in flight for this long is closed, in seconds.
    #[arg(long, global = true, env = "WIPROXY_IDLE_TIMEOUT", default_value_t = 300)]
    pub idle_timeout: u64,
    /// Memory shared by the request bodies kept to send again after a token refusal, in KiB;
    /// a body that does not fit streams through once, without that retry.
    #[arg(long, global = true, env = "WIPROXY_RETRY_BUFFER_KIB", default_value_t = 8192)]
    pub retry_buffer_kib: u64,
    /// Log filter: a level, or targets such as "info,wiproxy_sidecar=debug".
    #[arg(long, global = true, env = "WIPROXY_LOG", default_value = "info")]
    pub log: String,
    /// Log line format.
    #[arg(long, global = true, env = "WIPROXY_LOG_FORMAT", value_enum, default_value_t = LogFormat::Json)]
    pub log_format: LogFormat,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("WIPROXY_UPSTREAMS: {0}")]
    Upstreams(#[from] UpstreamError),
    #[error("WIPROXY_TOKEN_HEADER: {0:?} is not supported: use {values}", values = TokenHeader::VALUES)]
    TokenHeader(String),
    #[error("WIPROXY_EXPECTED_SERVICE_ACCOUNT: {0:?} is not a Google service account email")]
    ExpectedServiceAccount(String),
    #[error(transparent)]
    Credentials(#[from] CredentialsError),
    #[error(transparent)]
    Client(#[from] ClientError),
}

/// Largest request head on the proxy ports: room for large cookies and several tokens.
const PROXY_HEADER_BYTES: usize = 128 * 1024;

/// The default of `WIPROXY_MAX_REQUESTS`: what fits the injected 64Mi memory limit with room
/// for the rest (docs/sidecar.md, "Limits", has the per-request budget and its measurement).
pub const MAX_REQUESTS: usize = 256;
/// Concurrent HTTP/2 streams on one connection from the app: HTTP/2's recommended minimum
/// (RFC 9113 §6.5.2); more streams take turns within the request limit anyway.
const PROXY_STREAMS: u32 = 100;
/// Request body bytes an HTTP/2 client may send ahead on one stream (HTTP/2's initial window,
/// RFC 9113 §6.9.2) and on one connection, before the upstream takes them; and response bytes
/// queued for one stream while the app does not read. Plenty on the pod's loopback, where a
/// round trip takes microseconds; per request in flight they bound what the sidecar buffers.
const PROXY_STREAM_WINDOW: u32 = 64 * 1024;
const PROXY_CONNECTION_WINDOW: u32 = 256 * 1024;
const PROXY_SEND_BUFFER: usize = 64 * 1024;

/// The checked configuration the proxy runs with.
pub struct Config {
    pub upstreams: Vec<Upstream>,
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub token_header: TokenHeader,
    pub expected_service_account: Option<String>,
    pub credentials: Credentials,
    pub tls: rustls::ClientConfig,
    pub pins: Pins,
    pub token_wait: Duration,
    pub upstream_timeout: Option<Duration>,
    pub connect_timeout: Duration,
    /// The proxy port's and upstream ports' connection policy (one cap for all of them).
    pub connections: wiproxy_common::serve::ConnectionPolicy,
    /// Bytes of request bodies kept for a retry, across all requests.
    pub retry_buffer_bytes: usize,
}

impl Settings {
    /// Checks everything; `need_upstreams` is false for `wiproxy token --audience`.
    pub fn config(&self, need_upstreams: bool) -> Result<Config, ConfigError> {
        let upstreams = if need_upstreams || !self.upstreams.trim().is_empty() {
            parse_upstreams(&self.upstreams)?
        } else {
            Vec::new()
        };
        let token_header = TokenHeader::parse(&self.token_header)
            .ok_or_else(|| ConfigError::TokenHeader(self.token_header.clone()))?;
        let expected_service_account =
            self.expected_service_account.as_deref().map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned);
        if let Some(gsa) = &expected_service_account {
            if !wiproxy_common::is_service_account_email(gsa) {
                return Err(ConfigError::ExpectedServiceAccount(gsa.clone()));
            }
        }
        Ok(Config {
            upstreams,
            listen: self.listen,
            admin_listen: self.admin_listen,
            token_header,
            expected_service_account,
            credentials: Credentials::parse(
                &self.credentials,
                self.metadata_host.as_deref(),
                &FederationTrust::new(&self.universe_domain, self.credential_config_sha256.as_deref())?,
            )?,
            tls: crate::http::tls_config(self.extra_ca_file.as_deref())?,
            pins: Pins::parse(&self.resolve)?,
            token_wait: Duration::from_secs(self.token_wait),
            upstream_timeout: (self.upstream_timeout > 0).then(|| Duration::from_secs(self.upstream_timeout)),
            connect_timeout: Duration::from_secs(self.connect_timeout.max(1)),
            // The proxy ports listen on the pod's loopback: every connection comes from the app
            // (127.0.0.1), so one source holds the whole cap.
            connections: wiproxy_common::serve::ConnectionPolicy::new("proxy", self.max_connections)
                .per_source(self.max_connections)
                .max_requests(self.max_requests)
                .header_timeout(Duration::from_secs(self.header_timeout.max(1)))
                .body_timeout(Duration::from_secs(self.body_timeout.max(1)))
                .idle_timeout(Duration::from_secs(self.idle_timeout.max(1)))
                .max_header_bytes(PROXY_HEADER_BYTES)
                .max_headers(200)
                .max_streams(PROXY_STREAMS)
                .windows(PROXY_STREAM_WINDOW, PROXY_CONNECTION_WINDOW)
                .send_buffer(PROXY_SEND_BUFFER),
            retry_buffer_bytes: usize::try_from(self.retry_buffer_kib.saturating_mul(1024)).unwrap_or(usize::MAX),
        })
    }
}
