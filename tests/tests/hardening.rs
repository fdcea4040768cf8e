//! The sidecar where a hostile or broken client meets it, end to end: path escapes and the
//! token endpoint's guard, stalled bodies and stalled upstream handshakes, the admin port's
//! limits, and a request body sent with an upgrade. Timeouts are set short through the
//! environment; the generous bounds below only keep a broken build from hanging the suite.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
use support::{raw, wait_ready};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use wiproxy_tests::client::Http;
use wiproxy_tests::sidecar::{free_port, Sidecar};
use wiproxy_tests::world::{World, FUNCTION_HOST, FUNCTION_URL};

const READY: Duration = Duration::from_secs(15);
const HANG_GUARD: Duration = Duration::from_secs(30);

async fn start(world: &World, upstreams: &str, extra: &[(&str, &str)]) -> Sidecar {
    let mut env = world.env(upstreams);
    env.extend(extra.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
    let sidecar = Sidecar::start(&env);
    assert_eq!(wait_ready(&Http::new(), &sidecar, READY).await.status, StatusCode::OK, "{}", sidecar.log());
    sidecar
}

/// The JSON echo in a raw HTTP/1.1 answer.
fn echo_of(answer: &str) -> serde_json::Value {
    let body = answer.split("\r\n\r\n").nth(1).unwrap_or_default();
    serde_json::from_str(body).unwrap_or_else(|_| panic!("no JSON echo in {answer}"))
}

const ESCAPES: &[&str] = &[
    "/..%2fadmin",
    "/%2e%2e%2fadmin",
    "/..\\admin",
    "/..%5cadmin",
    "/..;/admin",
    "/../admin",
    "/%2e%2e/admin",
    "/a/..%2F..%2Fadmin",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_escapes_get_400_and_nothing_reaches_the_upstream() {
    let world = World::start().await;
    let port = free_port();
    let sidecar = start(&world, &format!("fn={FUNCTION_URL},fnport={FUNCTION_URL};listen={port}"), &[]).await;
    let before = world.function.requests();
    let h2c = Http::h2c();
    for escape in ESCAPES {
        let origin = format!("GET /fn{escape} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let (status, answer) = raw(sidecar.proxy, &origin).await;
        assert_eq!(status, 400, "origin form {escape}: {answer}");
        assert!(answer.contains("\"error\""), "{answer}");
        let absolute = format!(
            "GET http://{FUNCTION_HOST}/orders{escape} HTTP/1.1\r\nHost: {FUNCTION_HOST}\r\nConnection: close\r\n\r\n"
        );
        let (status, answer) = raw(sidecar.proxy, &absolute).await;
        assert_eq!(status, 400, "absolute form {escape}: {answer}");
        let dedicated = format!("GET {escape} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let (status, answer) = raw(SocketAddr::from(([127, 0, 0, 1], port)), &dedicated).await;
        assert_eq!(status, 400, "upstream port {escape}: {answer}");
        // h2 `:path` (a backslash is not a valid URI byte for the client, so it is skipped there).
        if !escape.contains('\\') {
            let reply = h2c.get(&sidecar.url(&format!("/fn{escape}"))).await;
            assert_eq!(reply.status, StatusCode::BAD_REQUEST, "h2 {escape}: {}", reply.text());
        }
    }
    assert_eq!(world.function.requests(), before, "an escape reached the upstream");

    // Other encoded bytes reach it as they were written.
    for (path, seen) in [("/fn/bucket/a%2Fb", "/orders/bucket/a%2Fb"), ("/fn/a%20b", "/orders/a%20b")] {
        let (status, answer) =
            raw(sidecar.proxy, &format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")).await;
        assert_eq!(status, 200, "{answer}");
        assert_eq!(echo_of(&answer)["path"], seen);
    }
    assert_eq!(world.function.requests(), before + 2);
    sidecar.assert_log_free_of(&world.google.minted());
}

/// Readings some real server applies and the first path rule did not: overlong UTF-8 (`%c0%ae`
/// is `.`, `%c0%af` is `/`), IIS's `%u002e`, NFKC look-alikes raw and percent-encoded (fullwidth
/// `．` U+FF0E, `‥` U+2025, fullwidth `／` U+FF0F), NUL truncation, `?` and `#` decoded inside a
/// segment.
const EXOTIC_ESCAPES: &[&str] = &[
    "/%c0%ae%c0%ae/admin",
    "/%e0%80%ae%e0%80%ae/admin",
    "/..%c0%afadmin",
    "/%u002e%u002e/admin",
    "/\u{ff0e}\u{ff0e}/admin",
    "/%ef%bc%8e%ef%bc%8e/admin",
    "/\u{2025}/admin",
    "/%e2%80%a5/admin",
    "/..\u{ff0f}admin",
    "/..%ef%bc%8fadmin",
    "/..%00",
    "/..%00/admin",
    "/..%3f",
    "/..%3F/admin",
    "/..%23",
    "/..%23/admin",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exotic_path_readings_get_400_in_every_request_form() {
    let world = World::start().await;
    let port = free_port();
    let sidecar = start(&world, &format!("fn={FUNCTION_URL},fnport={FUNCTION_URL};listen={port}"), &[]).await;
    let before = world.function.requests();
    let h2c = Http::h2c();
    for escape in EXOTIC_ESCAPES {
        let origin = format!("GET /fn{escape} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let (status, answer) = raw(sidecar.proxy, &origin).await;
        assert_eq!(status, 400, "origin form {escape}: {answer}");
        let absolute = format!(
            "GET http://{FUNCTION_HOST}/orders{escape} HTTP/1.1\r\nHost: {FUNCTION_HOST}\r\nConnection: close\r\n\r\n"
        );
        let (status, answer) = raw(sidecar.proxy, &absolute).await;
        assert_eq!(status, 400, "absolute form {escape}: {answer}");
        let dedicated = format!("GET {escape} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let (status, answer) = raw(SocketAddr::from(([127, 0, 0, 1], port)), &dedicated).await;
        assert_eq!(status, 400, "upstream port {escape}: {answer}");
        let reply = h2c.get(&sidecar.url(&format!("/fn{escape}"))).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "h2 :path {escape}: {}", reply.text());
    }
    assert_eq!(world.function.requests(), before, "an escape reached the upstream");
    // Characters that only look alike elsewhere in a name still pass, byte for byte.
    for (path, seen) in
        [("/fn/r%C3%A9sum%C3%A9", "/orders/r%C3%A9sum%C3%A9"), ("/fn/a%E2%80%A5b", "/orders/a%E2%80%A5b")]
    {
        let (status, answer) =
            raw(sidecar.proxy, &format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")).await;
        assert_eq!(status, 200, "{answer}");
        assert_eq!(echo_of(&answer)["path"], seen);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_endpoint_refuses_requests_an_app_did_not_mean() {
    let world = World::start().await;
    let sidecar = start(&world, &format!("fn={FUNCTION_URL}"), &[]).await;
    let http = Http::new();
    let url = sidecar.url("/_wiproxy/token?upstream=fn");
    let send = |headers: &'static [(&'static str, &'static str)]| {
        let mut request = Request::get(&url);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request.body(Full::new(Bytes::new())).expect("request");
        let http = &http;
        async move { http.send(request).await.expect("answer") }
    };
    for headers in [
        &[][..],
        &[("x-wiproxy-token-request", "false")][..],
        &[("x-wiproxy-token-request", "true"), ("x-forwarded-for", "10.0.0.9")][..],
        &[("x-wiproxy-token-request", "true"), ("forwarded", "for=10.0.0.9")][..],
    ] {
        let reply = send(headers).await;
        assert_eq!(reply.status, StatusCode::FORBIDDEN, "{headers:?}");
        assert!(reply.json()["error"].as_str().is_some_and(|e| e.contains("_wiproxy/token")), "{}", reply.text());
        assert!(world.google.minted().iter().all(|t| !reply.text().contains(t.as_str())));
    }
    let reply = send(&[("x-wiproxy-token-request", "true")]).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.headers["cache-control"], "no-store");
    assert!(world.google.verifier().verify(reply.text().trim()).is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_request_body_gets_408() {
    let world = World::start().await;
    let sidecar = start(&world, &format!("fn={FUNCTION_URL}"), &[("WIPROXY_BODY_TIMEOUT", "1")]).await;
    // Kept for a retry (small), then streamed (past the 1 MiB a retry keeps).
    for declared in [100, 2 * 1024 * 1024] {
        let request = format!("POST /fn/items HTTP/1.1\r\nHost: x\r\nContent-Length: {declared}\r\n\r\n0123456789");
        let (status, answer) = tokio::time::timeout(HANG_GUARD, raw(sidecar.proxy, &request)).await.expect("answered");
        assert_eq!(status, 408, "{declared}: {answer}");
        assert!(answer.contains("WIPROXY_BODY_TIMEOUT"), "{answer}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_never_finishes_tls_gets_504_without_a_request_timeout() {
    let world = World::start().await;
    // Accepts TCP and never says a word.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let silent_addr = silent.local_addr().expect("address");
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((stream, _)) = silent.accept().await {
            open.push(stream);
        }
    });
    let host = "stalled.example.com";
    let mut env = world.env(&format!("fn={FUNCTION_URL},stalled=https://{host}/"));
    for (key, value) in env.iter_mut() {
        if key == "WIPROXY_RESOLVE" {
            value.push_str(&format!(",{host}={silent_addr}"));
        }
    }
    env.push(("WIPROXY_CONNECT_TIMEOUT".into(), "1".into()));
    let sidecar = Sidecar::start(&env);
    assert_eq!(wait_ready(&Http::new(), &sidecar, READY).await.status, StatusCode::OK, "{}", sidecar.log());
    let reply = tokio::time::timeout(HANG_GUARD, Http::new().get(&sidecar.url("/stalled/x"))).await.expect("answered");
    assert_eq!(reply.status, StatusCode::GATEWAY_TIMEOUT, "{}", reply.text());
    assert!(reply.text().contains("WIPROXY_CONNECT_TIMEOUT"), "{}", reply.text());
    held.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_port_is_get_only_small_and_never_starves_the_proxy() {
    let world = World::start().await;
    let sidecar = start(&world, &format!("fn={FUNCTION_URL}"), &[]).await;
    let admin = sidecar.admin;
    let (status, answer) =
        raw(admin, "POST /readyz HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").await;
    assert_eq!(status, 405, "{answer}");
    let big = "a".repeat(32 * 1024);
    let (status, answer) =
        raw(admin, &format!("GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\nConnection: close\r\n\r\n")).await;
    assert_eq!(status, 431, "{answer}");

    // More slow clients than the admin port serves, each with an unfinished head.
    let mut slow = Vec::new();
    for _ in 0..40 {
        let mut stream = TcpStream::connect(admin).await.expect("connect");
        stream.write_all(b"GET /healthz HTTP/1.1\r\nX-Slow: ").await.expect("write");
        slow.push(stream);
    }
    // The proxy answers all the while.
    for _ in 0..5 {
        let reply =
            tokio::time::timeout(HANG_GUARD, Http::new().get(&sidecar.url("/fn/items"))).await.expect("answered");
        assert_eq!(reply.status, StatusCode::OK);
    }
    // The admin port closes the slow ones (header timeout), so it serves again.
    let first = &mut slow[0];
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(HANG_GUARD, first.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "a slow admin client was never closed");
    drop(slow);
    let ready = tokio::time::timeout(HANG_GUARD, wait_ready(&Http::new(), &sidecar, READY)).await.expect("answered");
    assert_eq!(ready.status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_sent_with_an_h2c_upgrade_is_delivered() {
    let world = World::start().await;
    let sidecar = start(&world, &format!("fn={FUNCTION_URL}"), &[]).await;
    // What curl --http2 -d sends over http://.
    let request = "POST /fn/items HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n\
                   HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello";
    let (status, answer) = tokio::time::timeout(HANG_GUARD, raw(sidecar.proxy, request)).await.expect("answered");
    assert_eq!(status, 200, "{answer}");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(echo_of(&answer)["body"], "hello");
}
