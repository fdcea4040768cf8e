//! Bodies, upgrades and protocols through the sidecar process: a 100 MiB body streamed both ways
//! in little memory, a WebSocket echo, h2c in and h2 out.

mod support;

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Request, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use support::wait_ready;
use tokio_tungstenite::tungstenite::Message;
use wiproxy_tests::client::Http;
use wiproxy_tests::sidecar::Sidecar;
use wiproxy_tests::world::{World, FUNCTION_URL};

const MIB: usize = 1024 * 1024;

/// A body of `remaining` bytes produced 64 KiB at a time, never held whole.
struct Generated {
    remaining: usize,
    chunk: Bytes,
}

impl Body for Generated {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if self.remaining == 0 {
            return Poll::Ready(None);
        }
        let take = self.remaining.min(self.chunk.len());
        self.remaining -= take;
        Poll::Ready(Some(Ok(Frame::data(self.chunk.slice(..take)))))
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining as u64)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_100_mib_body_streams_through_in_little_memory() {
    let world = World::start().await;
    let sidecar = Sidecar::start(&world.env(&format!("fn={FUNCTION_URL}")));
    let http = Http::new();
    assert_eq!(wait_ready(&http, &sidecar, Duration::from_secs(15)).await.status, StatusCode::OK);
    let baseline = sidecar.peak_rss_kib();

    let client: Client<_, Generated> = Client::builder(TokioExecutor::new()).build_http();
    let size = 100 * MIB;
    let request = Request::post(sidecar.url("/fn/stream-echo"))
        .body(Generated { remaining: size, chunk: Bytes::from(vec![b'w'; 64 * 1024]) })
        .expect("request");
    let response = client.request(request).await.expect("response");
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    let mut received = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame.expect("body frame");
        if let Some(data) = frame.data_ref() {
            assert!(data.iter().all(|b| *b == b'w'));
            received += data.len();
        }
    }
    assert_eq!(received, size, "the whole body came back");
    let peak = sidecar.peak_rss_kib();
    println!("sidecar peak RSS: {baseline} KiB when ready, {peak} KiB after streaming 100 MiB each way");
    assert!(peak < 64 * 1024, "peak RSS {peak} KiB exceeds 64 MiB");
    sidecar.assert_log_free_of(&world.google.minted());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrades_pass_through() {
    let world = World::start().await;
    let sidecar = Sidecar::start(&world.env(&format!("fn={FUNCTION_URL}")));
    let http = Http::new();
    assert_eq!(wait_ready(&http, &sidecar, Duration::from_secs(15)).await.status, StatusCode::OK);
    let url = format!("ws://{}/fn/ws", sidecar.proxy);
    let (mut socket, response) = tokio_tungstenite::connect_async(url).await.expect("WebSocket handshake");
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    for text in ["hello wiproxy", "second message"] {
        socket.send(Message::text(text)).await.expect("send");
        let echoed = tokio::time::timeout(Duration::from_secs(5), socket.next()).await.expect("echo in time");
        assert_eq!(echoed.expect("a message").expect("not an error"), Message::text(text));
    }
    socket.close(None).await.expect("close");
    sidecar.assert_log_free_of(&world.google.minted());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_in_and_h2_out() {
    let world = World::start().await;
    let sidecar = Sidecar::start(&world.env(&format!("fn={FUNCTION_URL}")));
    let http = Http::new();
    assert_eq!(wait_ready(&http, &sidecar, Duration::from_secs(15)).await.status, StatusCode::OK);
    let h2c = Http::h2c();
    let replies = futures_util::future::join_all((0..20).map(|i| {
        let (h2c, url) = (h2c.clone(), sidecar.url(&format!("/fn/h2/{i}")));
        async move { h2c.get(&url).await }
    }))
    .await;
    for reply in replies {
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        assert_eq!(reply.json()["version"], "HTTP/2.0", "the upstream connection negotiated h2 by ALPN");
    }
    sidecar.assert_log_free_of(&world.google.minted());
}
