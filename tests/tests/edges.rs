//! The proxy-mode and redirect rules, upstream ports and gRPC refusals, end to end: the sidecar
//! as a process against the fakes.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
use support::{raw, wait_ready};
use wiproxy_tests::client::Http;
use wiproxy_tests::sidecar::{free_port, Sidecar};
use wiproxy_tests::world::{World, FUNCTION_HOST, FUNCTION_URL, RUN_HOST};

const READY: Duration = Duration::from_secs(15);

async fn start(world: &World, upstreams: &str) -> Sidecar {
    let sidecar = Sidecar::start(&world.env(upstreams));
    assert_eq!(wait_ready(&Http::new(), &sidecar, READY).await.status, StatusCode::OK, "{}", sidecar.log());
    sidecar
}

/// The JSON echo in a raw HTTP/1.1 answer.
fn echo_of(answer: &str) -> serde_json::Value {
    let body = answer.split("\r\n\r\n").nth(1).unwrap_or_default();
    serde_json::from_str(body).unwrap_or_else(|_| panic!("no JSON echo in {answer}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absolute_form_requests_to_the_sidecar_itself_are_path_requests() {
    let world = World::start().await;
    let sidecar = start(&world, &format!("fn={FUNCTION_URL}")).await;
    let proxy = sidecar.proxy;
    for authority in [proxy.to_string(), format!("localhost:{}", proxy.port())] {
        let (status, answer) = raw(
            proxy,
            &format!("GET http://{authority}/fn/items?x=1 HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n"),
        )
        .await;
        assert_eq!(status, 200, "{answer}");
        let echo = echo_of(&answer);
        assert_eq!(echo["path"], "/orders/items");
        assert_eq!(echo["query"], "x=1");
        assert_eq!(echo["headers"]["authorization"], "Bearer <verified token>");
    }
    // Another port of this host is not the sidecar: it is refused, and the refusal lists URL prefixes.
    let (status, answer) =
        raw(proxy, "GET http://127.0.0.1:1/fn/items HTTP/1.1\r\nHost: 127.0.0.1:1\r\nConnection: close\r\n\r\n").await;
    assert_eq!(status, 403, "{answer}");
    assert!(answer.contains(&format!("URLs under {FUNCTION_URL}/")), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_explicit_default_port_is_the_same_origin() {
    let world = World::start().await;
    let sidecar = start(&world, &format!("fn={FUNCTION_URL}")).await;
    let request = format!(
        "GET http://{FUNCTION_HOST}:443/orders/v1 HTTP/1.1\r\nHost: {FUNCTION_HOST}:443\r\nConnection: close\r\n\r\n"
    );
    let (status, answer) = raw(sidecar.proxy, &request).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(echo_of(&answer)["path"], "/orders/v1");
    let elsewhere = format!(
        "GET http://{FUNCTION_HOST}:8443/orders/v1 HTTP/1.1\r\nHost: {FUNCTION_HOST}:8443\r\nConnection: close\r\n\r\n"
    );
    assert_eq!(raw(sidecar.proxy, &elsewhere).await.0, 403);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2c_upgrade_is_answered_over_http1_and_never_tunnelled() {
    let world = World::start().await;
    let sidecar = start(&world, &format!("fn={FUNCTION_URL}")).await;
    let host = sidecar.proxy;
    // curl --http2 and nghttp -u ask this way; the next request on the connection must still be proxied.
    let requests = format!(
        "POST /fn/first HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n\
         HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\nContent-Length: 5\r\n\r\nhello\
         GET /fn/second HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    );
    let (status, answer) = raw(host, &requests).await;
    assert_eq!(status, 200, "{answer}");
    assert!(!answer.contains("101 Switching"), "{answer}");
    let answers: Vec<&str> = answer.split("HTTP/1.1 ").filter(|a| !a.is_empty()).collect();
    assert_eq!(answers.len(), 2, "{answer}");
    let first = echo_of(&format!("HTTP/1.1 {}", answers[0]));
    assert_eq!(first["body"], "hello", "the body of an upgrade request is not lost");
    assert!(first["headers"].get("upgrade").is_none() && first["headers"].get("http2-settings").is_none(), "{first}");
    let second = echo_of(&format!("HTTP/1.1 {}", answers[1]));
    assert_eq!(second["path"], "/orders/second");
    assert_eq!(second["headers"]["authorization"], "Bearer <verified token>");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_into_an_upstream_come_back_through_the_sidecar() {
    let world = World::start().await;
    let port = free_port();
    let sidecar = start(&world, &format!("fn={FUNCTION_URL};listen={port},run=https://{RUN_HOST}")).await;
    let http = Http::new();
    let redirect = |base: String, location: &str| {
        let query: String =
            url::form_urlencoded::Serializer::new(String::new()).append_pair("location", location).finish();
        format!("{base}/redirect-to?{query}")
    };
    let prefix = sidecar.url("/fn");
    let dedicated = format!("http://127.0.0.1:{port}");
    let cases = [
        (&prefix, format!("{FUNCTION_URL}/next?page=2"), sidecar.url("/fn/next?page=2")),
        (&prefix, "/orders/next".to_owned(), sidecar.url("/fn/next")),
        // Another upstream is another origin: its URL comes back as it is.
        (&prefix, format!("https://{RUN_HOST}/list"), format!("https://{RUN_HOST}/list")),
        (&prefix, "/login".to_owned(), format!("https://{FUNCTION_HOST}/login")),
        (&prefix, "https://accounts.google.com/signin".to_owned(), "https://accounts.google.com/signin".to_owned()),
        (&dedicated, format!("{FUNCTION_URL}/next"), format!("{dedicated}/next")),
        (&dedicated, "/orders/next".to_owned(), format!("{dedicated}/next")),
    ];
    for (base, location, expected) in cases {
        let reply = http.get(&redirect(base.clone(), &location)).await;
        assert_eq!(reply.status, StatusCode::FOUND, "{location}: {}", reply.text());
        assert_eq!(reply.headers["location"], expected.as_str(), "{base} {location}");
    }
    // Proxy mode: the same URL over http://, so the client comes back through HTTP_PROXY.
    let target = redirect(format!("http://{FUNCTION_HOST}/orders"), &format!("{FUNCTION_URL}/next"));
    let (status, answer) =
        raw(sidecar.proxy, &format!("GET {target} HTTP/1.1\r\nHost: {FUNCTION_HOST}\r\nConnection: close\r\n\r\n"))
            .await;
    assert_eq!(status, 302, "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains(&format!("location: http://{FUNCTION_HOST}/orders/next\r\n")),
        "{answer}"
    );
    // And the client can follow the rewritten one: it lands on the upstream with a token.
    let followed = http.get(&sidecar.url("/fn/next")).await.json();
    assert_eq!(followed["headers"]["authorization"], "Bearer <verified token>");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_port_forwards_every_path_over_http1_and_h2c() {
    let world = World::start().await;
    let port = free_port();
    let sidecar = start(&world, &format!("fn={FUNCTION_URL};listen={port},run=https://{RUN_HOST}")).await;
    for http in [Http::new(), Http::h2c()] {
        let echo = http.get(&format!("http://127.0.0.1:{port}/pkg.Service/Method?a=1")).await;
        assert_eq!(echo.status, StatusCode::OK, "{}", echo.text());
        let echo = echo.json();
        assert_eq!(echo["path"], "/orders/pkg.Service/Method");
        assert_eq!(echo["query"], "a=1");
        assert_eq!(echo["audience"], FUNCTION_URL);
        assert_eq!(echo["headers"]["authorization"], "Bearer <verified token>");
    }
    // The proxy port still routes by prefix.
    assert_eq!(Http::new().get(&sidecar.url("/run/x")).await.json()["path"], "/x");
    sidecar.assert_log_free_of(&world.google.minted());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_requests_get_refusals_as_grpc_status() {
    let world = World::start().await;
    let sidecar = start(&world, &format!("fn={FUNCTION_URL}")).await;
    let call = |path: &str| {
        Request::post(sidecar.url(path))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(Full::new(Bytes::from_static(b"\0\0\0\0\0")))
            .expect("request")
    };
    let reply = Http::h2c().send(call("/pkg.Service/Method")).await.expect("answer");
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.headers["grpc-status"], "12", "UNIMPLEMENTED, as gRPC maps 404");
    let message = reply.headers["grpc-message"].to_str().expect("ascii");
    assert!(message.contains("no upstream named") && message.contains("/fn"), "{message}");
    assert!(reply.body.is_empty());
    // The same refusal to an HTTP client stays JSON.
    let plain = Http::new().get(&sidecar.url("/pkg.Service/Method")).await;
    assert_eq!(plain.status, StatusCode::NOT_FOUND);
    assert!(plain.json()["error"].as_str().is_some_and(|e| e.contains("no upstream named")));
}

/// What a client that keeps `Authorization` and cookies on a same-origin redirect does with a
/// `Location` (browsers, curl, requests, Go's net/http): resolved against the URL it asked for
/// (WHATWG rules, which read `\` as `/`), then followed with the same method, headers and body
/// when the origin is the same. A cross-origin one would be followed without them, to a host
/// off this machine, so it is returned instead for the test to check.
async fn follow_like_a_client(http: &Http, asked: &str, location: &str) -> Option<url::Url> {
    let asked = url::Url::parse(asked).expect("asked URL");
    let next = asked.join(location).expect("a Location a client can resolve");
    if next.origin() != asked.origin() {
        return Some(next);
    }
    let request = Request::post(next.as_str())
        .header("authorization", "Bearer app-credential-for-A")
        .header("cookie", "session=A-cookie")
        .body(Full::new(Bytes::from_static(b"amount=1000&to=attacker")))
        .expect("request");
    http.send(request).await.expect("the followed request");
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_to_another_upstream_keeps_its_origin_and_nothing_reaches_it() {
    let world = World::start().await;
    let port = free_port();
    // A is the function (on the prefix and on its own port), B the Cloud Run service.
    let sidecar = start(&world, &format!("fn={FUNCTION_URL};listen={port},run=https://{RUN_HOST}")).await;
    let http = Http::new();
    let upper = RUN_HOST.to_ascii_uppercase();
    let forms = [
        format!("https://{RUN_HOST}/billing/transfer"),
        format!("https:\\\\{RUN_HOST}\\billing\\transfer"),
        format!("/\\{RUN_HOST}/billing/transfer"),
        format!("//{RUN_HOST}/billing/transfer"),
        format!("https://user:pass@{RUN_HOST}/billing/transfer"),
        format!("https://{upper}/billing/transfer"),
        format!("https://{upper}:443/billing/transfer"),
    ];
    for base in [sidecar.url("/fn"), format!("http://127.0.0.1:{port}")] {
        for location in &forms {
            let query: String =
                url::form_urlencoded::Serializer::new(String::new()).append_pair("location", location).finish();
            let asked = format!("{base}/redirect-to?{query}");
            let request = Request::post(&asked)
                .header("authorization", "Bearer app-credential-for-A")
                .header("cookie", "session=A-cookie")
                .body(Full::new(Bytes::from_static(b"amount=1000&to=attacker")))
                .expect("request");
            let reply = http.send(request).await.expect("answer");
            assert_eq!(reply.status, StatusCode::FOUND, "{location}: {}", reply.text());
            let returned = reply.headers["location"].to_str().expect("ascii").to_owned();
            let elsewhere = follow_like_a_client(&http, &asked, &returned).await;
            assert_eq!(
                world.function.requests_to(RUN_HOST),
                0,
                "{base}: {location} came back as {returned}, and following it took the app's request to B"
            );
            assert_eq!(returned, *location, "{base}: the Location is returned as A sent it");
            let elsewhere = elsewhere.expect("a client leaves the sidecar's origin for B");
            assert!(elsewhere.host_str().is_some_and(|h| h.eq_ignore_ascii_case(RUN_HOST)), "{elsewhere}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rewritten_location_names_the_sidecar_never_the_requests_host() {
    let world = World::start().await;
    let port = free_port();
    let sidecar = start(&world, &format!("fn={FUNCTION_URL};listen={port}")).await;
    let query: String = url::form_urlencoded::Serializer::new(String::new())
        .append_pair("location", &format!("{FUNCTION_URL}/orders-next"))
        .finish();
    let dedicated = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let cases = [
        (sidecar.proxy, format!("/fn/redirect-to?{query}"), sidecar.url("/fn/orders-next")),
        (dedicated, format!("/redirect-to?{query}"), format!("http://{dedicated}/orders-next")),
    ];
    for (addr, path, expected) in cases {
        for host in ["evil.example", "evil.example:80", "127.0.0.1:1"] {
            let (status, answer) =
                raw(addr, &format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n")).await;
            assert_eq!(status, 302, "{answer}");
            let location = answer
                .lines()
                .find_map(|line| line.strip_prefix("location: ").or_else(|| line.strip_prefix("Location: ")))
                .unwrap_or_default();
            assert_eq!(location, expected, "Host: {host}");
        }
    }
}
