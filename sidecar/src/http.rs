//! How the sidecar connects to upstreams (crate::upstream keeps the connections): TLS with the web PKI roots plus optional extra roots, ALPN
//! h2/HTTP/1.1, and host pins (`WIPROXY_RESOLVE`) that change where a connection goes but not the
//! name TLS verifies.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_rustls::HttpsConnectorBuilder;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use tokio::net::TcpStream;

use crate::body::BoxError;

/// `HOST=IP[:PORT]` pins, as curl's `--resolve`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pins(HashMap<String, (std::net::IpAddr, Option<u16>)>);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("WIPROXY_RESOLVE: entry {0:?} is not HOST=IP[:PORT]: write e.g. orders.example.com=10.0.0.7 or host=127.0.0.1:8443")]
    BadPin(String),
    #[error("WIPROXY_EXTRA_CA_FILE: cannot read {path}: {error}")]
    ReadCa { path: String, error: std::io::Error },
    #[error("WIPROXY_EXTRA_CA_FILE: {path} holds no usable PEM certificate: {why}")]
    BadCa { path: String, why: String },
}

impl Pins {
    pub fn parse(list: &str) -> Result<Self, ClientError> {
        let mut pins = HashMap::new();
        for entry in list.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let bad = || ClientError::BadPin(entry.to_owned());
            let (host, target) = entry.split_once('=').ok_or_else(bad)?;
            let host = host.trim().to_ascii_lowercase();
            if host.is_empty() {
                return Err(bad());
            }
            let target = target.trim();
            let pin = if let Ok(addr) = target.parse::<SocketAddr>() {
                (addr.ip(), Some(addr.port()))
            } else {
                (target.trim_start_matches('[').trim_end_matches(']').parse().map_err(|_| bad())?, None)
            };
            pins.insert(host, pin);
        }
        Ok(Self(pins))
    }
}

/// Connector that sends pinned hosts to their address and everything else through DNS.
#[derive(Clone)]
pub struct PinnedConnector {
    inner: HttpConnector,
    pins: Arc<Pins>,
}

impl tower_service::Service<Uri> for PinnedConnector {
    type Response = TokioIo<TcpStream>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let host = uri.host().unwrap_or_default().trim_start_matches('[').trim_end_matches(']').to_ascii_lowercase();
        let target = match self.pins.0.get(&host) {
            Some((ip, port)) => {
                let default_port = if uri.scheme_str() == Some("https") { 443 } else { 80 };
                let port = port.or(uri.port_u16()).unwrap_or(default_port);
                let authority = SocketAddr::new(*ip, port).to_string();
                match Uri::builder().scheme("http").authority(authority).path_and_query("/").build() {
                    Ok(target) => target,
                    Err(e) => return Box::pin(async move { Err(e.into()) }),
                }
            }
            None => uri,
        };
        let connecting = self.inner.call(target);
        Box::pin(async move { connecting.await.map_err(Into::into) })
    }
}

/// The TLS roots: Mozilla's (as in webpki-roots) plus an optional PEM file.
pub fn tls_config(extra_ca_file: Option<&Path>) -> Result<rustls::ClientConfig, ClientError> {
    let mut roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
    if let Some(path) = extra_ca_file {
        let name = path.display().to_string();
        let pem = std::fs::read(path).map_err(|error| ClientError::ReadCa { path: name.clone(), error })?;
        let certs = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ClientError::BadCa { path: name.clone(), why: e.to_string() })?;
        if certs.is_empty() {
            return Err(ClientError::BadCa { path: name, why: "no CERTIFICATE block".to_owned() });
        }
        for cert in certs {
            roots.add(cert).map_err(|e| ClientError::BadCa { path: name.clone(), why: e.to_string() })?;
        }
    }
    Ok(rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth())
}

/// A connector whose connections, TCP connect and TLS handshake together, complete within a
/// limit, whatever the request timeout: an upstream that accepts TCP and never finishes TLS
/// ends in a `TimedOut` error (504), not a request that hangs. hyper-util's `HttpConnector`
/// times out the TCP connect only.
#[derive(Clone)]
pub struct TimedConnector<C> {
    inner: C,
    limit: Duration,
}

impl<C> tower_service::Service<Uri> for TimedConnector<C>
where
    C: tower_service::Service<Uri> + Send,
    C::Future: Send + 'static,
    C::Error: Into<BoxError>,
{
    type Response = C::Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<C::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connecting = self.inner.call(uri);
        let limit = self.limit;
        Box::pin(async move {
            match tokio::time::timeout(limit, connecting).await {
                Ok(connected) => connected.map_err(Into::into),
                Err(_) => Err(Box::new(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "no connection with TLS established within {} s (WIPROXY_CONNECT_TIMEOUT)",
                        limit.as_secs()
                    ),
                )) as BoxError),
            }
        })
    }
}

/// What makes upstream connections: TCP (with pins), TLS with ALPN, within the connect timeout.
pub type Connector = TimedConnector<hyper_rustls::HttpsConnector<PinnedConnector>>;

/// Two connectors: one that negotiates h2 or HTTP/1.1, one that offers HTTP/1.1 only (for
/// upgrades such as WebSocket, which need an HTTP/1.1 connection end to end).
/// `connect_timeout` bounds each new connection: TCP connect and TLS handshake together.
pub fn connectors(tls: rustls::ClientConfig, pins: Pins, connect_timeout: Duration) -> (Connector, Connector) {
    let mut inner = HttpConnector::new();
    inner.enforce_http(false);
    inner.set_connect_timeout(Some(connect_timeout));
    inner.set_nodelay(true);
    let connector = PinnedConnector { inner, pins: Arc::new(pins) };
    let any = HttpsConnectorBuilder::new()
        .with_tls_config(tls.clone())
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(connector.clone());
    let http1 =
        HttpsConnectorBuilder::new().with_tls_config(tls).https_or_http().enable_http1().wrap_connector(connector);
    let timed = |inner| TimedConnector { inner, limit: connect_timeout };
    (timed(any), timed(http1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins() {
        let pins = Pins::parse("Orders.Example.com=10.0.0.7, fn.example.com=127.0.0.1:8443,v6.example.com=[::1]:9")
            .expect("valid");
        assert_eq!(pins.0["orders.example.com"], ("10.0.0.7".parse().expect("ip"), None));
        assert_eq!(pins.0["fn.example.com"], ("127.0.0.1".parse().expect("ip"), Some(8443)));
        assert_eq!(pins.0["v6.example.com"], ("::1".parse().expect("ip"), Some(9)));
        for bad in ["host", "=1.2.3.4", "host=not-an-ip", "host=1.2.3.4:x"] {
            assert!(Pins::parse(bad).is_err(), "{bad}");
        }
    }
}
