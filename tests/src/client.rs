//! A small HTTP client for talking to the sidecar and the fakes in tests.

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|_| serde_json::Value::String(self.text()))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

#[derive(Clone)]
pub struct Http {
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Default for Http {
    fn default() -> Self {
        Self::new()
    }
}

impl Http {
    pub fn new() -> Self {
        Self { client: Client::builder(TokioExecutor::new()).build_http() }
    }

    /// Speaks h2 with prior knowledge (h2c).
    pub fn h2c() -> Self {
        Self { client: Client::builder(TokioExecutor::new()).http2_only(true).build_http() }
    }

    pub async fn send(&self, request: Request<Full<Bytes>>) -> Result<Reply, String> {
        let response = self.client.request(request).await.map_err(|e| e.to_string())?;
        let status = response.status();
        let headers = response.headers().clone();
        let body = response.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
        Ok(Reply { status, headers, body })
    }

    /// `GET /_wiproxy/token…` as an app asks for it, with `X-Wiproxy-Token-Request: true`.
    pub async fn token(&self, url: &str) -> Reply {
        let request =
            Request::get(url).header("x-wiproxy-token-request", "true").body(Full::new(Bytes::new())).expect("request");
        self.send(request).await.unwrap_or_else(|e| panic!("GET {url}: {e}"))
    }

    pub async fn get(&self, url: &str) -> Reply {
        let request = Request::get(url).body(Full::new(Bytes::new())).expect("request");
        self.send(request).await.unwrap_or_else(|e| panic!("GET {url}: {e}"))
    }
}

/// `GET https://HOST/PATH` sent to `addr`, verifying the server as `host` against `tls`'s roots:
/// a call made straight to a function, without the sidecar.
pub async fn https_get(
    addr: std::net::SocketAddr,
    host: &str,
    path: &str,
    tls: rustls::ClientConfig,
) -> Result<Reply, String> {
    let request = Request::get(path).body(Full::new(Bytes::new())).map_err(|e| e.to_string())?;
    https_send(addr, host, request, tls).await
}

/// `request` (origin-form URI) sent over HTTPS/1.1 to `addr` with `Host: host`, verifying the
/// server as `host` against `tls`'s roots: a call made straight to a fake, without the sidecar.
pub async fn https_send(
    addr: std::net::SocketAddr,
    host: &str,
    mut request: Request<Full<Bytes>>,
    tls: rustls::ClientConfig,
) -> Result<Reply, String> {
    let mut tls = tls;
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let name = rustls::pki_types::ServerName::try_from(host.to_owned()).map_err(|e| e.to_string())?;
    let stream = tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls))
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    request.headers_mut().insert(http::header::HOST, host.parse().map_err(|_| "bad host".to_owned())?);
    let response = sender.send_request(request).await.map_err(|e| e.to_string())?;
    let status = response.status();
    let headers = response.headers().clone();
    let body = response.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok(Reply { status, headers, body })
}
