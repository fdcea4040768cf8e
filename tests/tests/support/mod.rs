//! Helpers shared by the end-to-end tests.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use wiproxy_tests::client::{Http, Reply};
use wiproxy_tests::sidecar::Sidecar;

/// Polls `/readyz` until it answers 200; returns its last answer.
pub async fn wait_ready(http: &Http, sidecar: &Sidecar, within: Duration) -> Reply {
    let deadline = Instant::now() + within;
    loop {
        let reply = http.get(&sidecar.admin_url("/readyz")).await;
        if reply.status == StatusCode::OK || Instant::now() > deadline {
            return reply;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls `/readyz` until it answers 503 with a body; returns it.
pub async fn wait_unready(http: &Http, sidecar: &Sidecar, within: Duration) -> Reply {
    let deadline = Instant::now() + within;
    loop {
        let reply = http.get(&sidecar.admin_url("/readyz")).await;
        let has_reason =
            reply.json()["upstreams"].as_object().is_some_and(|u| u.values().any(|v| v["reason"].is_string()));
        if (reply.status == StatusCode::SERVICE_UNAVAILABLE
            && has_reason
            && !reply.text().contains("waiting for the first token"))
            || Instant::now() > deadline
        {
            return reply;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Sends raw HTTP/1.1 bytes and returns the status code and the whole answer.
pub async fn raw(addr: std::net::SocketAddr, request: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer)).await;
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, text)
}

/// A metric's value from Prometheus text, summed over the series whose labels contain `labels`.
pub fn metric(text: &str, name: &str, labels: &str) -> f64 {
    text.lines()
        .filter(|line| line.starts_with(name) && line.contains(labels))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

pub fn body(bytes: &'static str) -> http_body_util::Full<Bytes> {
    http_body_util::Full::new(Bytes::from_static(bytes.as_bytes()))
}
