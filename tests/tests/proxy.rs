//! The sidecar end to end, as a separate process against the fakes over real loopback sockets.

mod support;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
use support::{metric, raw, wait_ready, wait_unready};
use wiproxy_tests::client::{https_send, Http, Reply};
use wiproxy_tests::google::KsaMapping;
use wiproxy_tests::sidecar::Sidecar;
use wiproxy_tests::world::{
    self, World, CUSTOM_AUDIENCE, CUSTOM_HOST, FUNCTION_URL, GEN2_FUNCTION_URL, GEN2_RUN_HOST, GSA,
    RUN_DETERMINISTIC_HOST, RUN_HOST,
};

const READY: Duration = Duration::from_secs(15);

fn upstreams() -> String {
    format!("fn={FUNCTION_URL},run=https://{RUN_HOST}/api,custom=https://{CUSTOM_HOST}/x;audience={CUSTOM_AUDIENCE}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_upstream_gets_its_audience_and_the_request_arrives_intact() {
    let world = World::start().await;
    let sidecar = Sidecar::start(&world.env(&upstreams()));
    let http = Http::new();
    assert_eq!(wait_ready(&http, &sidecar, READY).await.status, StatusCode::OK, "{}", sidecar.log());

    let echo = http.get(&sidecar.url("/fn/v1/items?limit=5&x=%20y")).await;
    assert_eq!(echo.status, StatusCode::OK, "{}", echo.text());
    let echo = echo.json();
    assert_eq!(echo["audience"], FUNCTION_URL, "Cloud Functions gets the full function URL");
    assert_eq!(echo["path"], "/orders/v1/items");
    assert_eq!(echo["query"], "limit=5&x=%20y");
    assert_eq!(echo["host"], world::FUNCTION_HOST);
    assert_eq!(echo["email"], GSA);

    let run = http.get(&sidecar.url("/run/list")).await.json();
    assert_eq!(run["audience"], format!("https://{RUN_HOST}"), "Cloud Run gets the origin");
    assert_eq!(run["path"], "/api/list");
    let custom = http.get(&sidecar.url("/custom")).await.json();
    assert_eq!(custom["audience"], CUSTOM_AUDIENCE, "an explicit audience wins");

    // The app's own Authorization moves aside; hop-by-hop headers stay on this side; the body arrives.
    let request = Request::post(sidecar.url("/fn/submit"))
        .header("authorization", "Basic YXBwOnNlY3JldA==")
        .header("connection", "x-hop")
        .header("x-hop", "do-not-forward")
        .header("x-app", "kept")
        .body(Full::new(Bytes::from_static(b"{\"order\":42}")))
        .expect("request");
    let echo = http.send(request).await.expect("answer").json();
    assert_eq!(echo["method"], "POST");
    assert_eq!(echo["body"], "{\"order\":42}");
    assert_eq!(echo["token_header"], "authorization");
    assert_eq!(echo["headers"]["authorization"], "Bearer <verified token>");
    assert_eq!(echo["headers"]["x-forwarded-authorization"], "Basic YXBwOnNlY3JldA==");
    assert_eq!(echo["headers"]["x-app"], "kept");
    assert!(echo["headers"].get("x-hop").is_none(), "{echo}");

    // Redirects come back to the app; the sidecar does not follow them.
    let redirect = http.get(&sidecar.url("/fn/redirect")).await;
    assert_eq!(redirect.status, StatusCode::FOUND);
    assert_eq!(redirect.headers["location"], "https://accounts.google.com/signin");

    sidecar.assert_log_free_of(&world.google.minted());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serverless_header_leaves_the_apps_authorization_alone() {
    let world = World::start().await;
    let mut env = world.env(&format!("run=https://{RUN_HOST}"));
    env.push(("WIPROXY_TOKEN_HEADER".into(), "x-serverless-authorization".into()));
    let sidecar = Sidecar::start(&env);
    let http = Http::new();
    assert_eq!(wait_ready(&http, &sidecar, READY).await.status, StatusCode::OK);
    let request = Request::get(sidecar.url("/run/me"))
        .header("authorization", "Bearer app-own-session")
        .body(Full::new(Bytes::new()))
        .expect("request");
    let echo = http.send(request).await.expect("answer").json();
    assert_eq!(echo["token_header"], "x-serverless-authorization");
    assert_eq!(echo["headers"]["authorization"], "Bearer app-own-session");
    assert!(echo["headers"].get("x-forwarded-authorization").is_none());
    sidecar.assert_log_free_of(&world.google.minted());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_first_requests_cause_one_fetch() {
    let world = World::start().await;
    world.google.delay_ms.store(500, Ordering::SeqCst);
    // Every request gets a connection of its own, so the cap is raised past 1,000: at the
    // default 256, the rest wait in the backlog until kept-alive connections are let go of,
    // which is not what this test is about. So is the limit of requests in flight (256 too:
    // past it, 503).
    let mut env = world.env(&format!("fn={FUNCTION_URL}"));
    env.push(("WIPROXY_MAX_CONNECTIONS".into(), "1100".into()));
    env.push(("WIPROXY_MAX_REQUESTS".into(), "1100".into()));
    let sidecar = Sidecar::start(&env);
    let http = Http::new();
    let url = sidecar.url("/fn/first");
    let requests: Vec<_> = (0..1000)
        .map(|_| {
            let (http, url) = (http.clone(), url.clone());
            tokio::spawn(async move { http.get(&url).await.status })
        })
        .collect();
    for request in requests {
        assert_eq!(request.await.expect("task"), StatusCode::OK);
    }
    assert_eq!(world.google.identity_fetches.load(Ordering::SeqCst), 1, "one metadata fetch for 1000 requests");
    assert_eq!(world.function.requests(), 1000);
    sidecar.assert_log_free_of(&world.google.minted());
}

/// A burst of connections past the cap is served at once: each new connection takes the place of
/// a kept-alive one instead of waiting in the backlog for the header timeout (600 s here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_past_the_connection_cap_is_served_without_waiting_for_kept_alive_ones() {
    let world = World::start().await;
    let mut env = world.env(&format!("fn={FUNCTION_URL}"));
    env.push(("WIPROXY_MAX_CONNECTIONS".into(), "8".into()));
    env.push(("WIPROXY_HEADER_TIMEOUT".into(), "600".into()));
    let sidecar = Sidecar::start(&env);
    let http = Http::new();
    assert_eq!(wait_ready(&http, &sidecar, READY).await.status, StatusCode::OK);
    let url = sidecar.url("/fn/burst");
    let requests: Vec<_> = (0..64)
        .map(|_| {
            let (http, url) = (http.clone(), url.clone());
            tokio::spawn(async move { http.get(&url).await.status })
        })
        .collect();
    let answered = tokio::time::timeout(Duration::from_secs(120), async {
        for request in requests {
            assert_eq!(request.await.expect("task"), StatusCode::OK);
        }
    })
    .await;
    assert!(answered.is_ok(), "connections past the cap waited for kept-alive ones to time out");
    assert_eq!(world.function.requests(), 64);
    sidecar.assert_log_free_of(&world.google.minted());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_tokens_refresh_ahead_under_steady_traffic() {
    let world = World::start().await;
    world.google.lifetime_secs.store(20, Ordering::SeqCst);
    let sidecar = Sidecar::start(&world.env(&format!("fn={FUNCTION_URL}")));
    let http = Http::new();
    assert_eq!(wait_ready(&http, &sidecar, READY).await.status, StatusCode::OK);
    let fetches_before = world.google.identity_fetches.load(Ordering::SeqCst);

    let run_for = Duration::from_secs(60);
    let started = Instant::now();
    let workers: Vec<_> = (0..8)
        .map(|_| {
            let (http, url) = (http.clone(), sidecar.url("/fn/steady"));
            tokio::spawn(async move {
                let (mut count, mut max) = (0u32, Duration::ZERO);
                while started.elapsed() < run_for {
                    let sent = Instant::now();
                    let status = http.get(&url).await.status;
                    assert_eq!(status, StatusCode::OK);
                    max = max.max(sent.elapsed());
                    count += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                (count, max)
            })
        })
        .collect();
    let (mut requests, mut max_latency) = (0, Duration::ZERO);
    for worker in workers {
        let (count, max) = worker.await.expect("worker");
        requests += count;
        max_latency = max_latency.max(max);
    }
    let fetches = world.google.identity_fetches.load(Ordering::SeqCst) - fetches_before;
    let metrics = http.get(&sidecar.admin_url("/metrics")).await.text();
    let waits = metric(&metrics, "wiproxy_token_cache_waits_total", "cloudfunctions");
    let hits = metric(&metrics, "wiproxy_token_cache_hits_total", "cloudfunctions");
    assert!(metrics.contains("wiproxy_token_cache_waits_total{audience="), "{metrics}");
    assert!(hits >= f64::from(requests), "every request was served from the cache: {hits} hits");
    println!("steady traffic: {requests} requests in 60 s, {fetches} refreshes of 20 s tokens, max latency {max_latency:?}, waits {waits}");
    // A 20 s token is refreshed 6.7 s (a third of its life) before exp, minus up to 1.7 s of jitter:
    // every 11.7 to 13.3 s, so 4 or 5 refreshes in 60 s; allow one either side.
    assert!((3..=6).contains(&fetches), "{fetches} refreshes in 60 s of 20 s tokens");
    assert_eq!(waits, 0.0, "no request waited for a token once the sidecar was ready");
    sidecar.assert_log_free_of(&world.google.minted());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_outage_serves_the_cache_then_fails_closed_then_recovers() {
    let world = World::start().await;
    world.google.lifetime_secs.store(12, Ordering::SeqCst);
    let sidecar = Sidecar::start(&world.env(&format!("fn={FUNCTION_URL}")));
    let http = Http::new();
    let ready = wait_ready(&http, &sidecar, READY).await;
    assert_eq!(ready.status, StatusCode::OK);
    let token = http.token(&sidecar.url("/_wiproxy/token?upstream=fn")).await.text();
    let claims = world.google.verifier().verify(&token).expect("a real token");
    let exp = claims["exp"].as_u64().expect("exp");
    world.google.set_failure(Some((503, "backend unavailable")));

    // The cached token keeps serving until exp - 1.2 s (a tenth of its 12 s life), then 503.
    let mut served_during_outage = 0;
    let failure = loop {
        let reply = http.get(&sidecar.url("/fn/during-outage")).await;
        if reply.status != StatusCode::OK {
            break reply;
        }
        served_during_outage += 1;
        assert!(wiproxy_tests::jwt::now() <= exp, "a token was served after its exp");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let failed_at = wiproxy_tests::jwt::now();
    assert!(served_during_outage > 0, "the cached token served during the outage");
    assert_eq!(failure.status, StatusCode::SERVICE_UNAVAILABLE);
    let body = failure.json();
    assert_eq!(body["upstream"], "fn");
    assert!(body["reason"].as_str().is_some_and(|r| r.contains("503") && r.contains("backend unavailable")), "{body}");
    assert!(failed_at + 3 >= exp, "failed closed only near exp ({failed_at} vs exp {exp})");
    let requests_before = world.function.requests();

    world.google.set_failure(None);
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        if http.get(&sidecar.url("/fn/after-outage")).await.status == StatusCode::OK {
            break;
        }
        assert!(Instant::now() < deadline, "did not recover after the metadata server came back");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(world.function.requests() > requests_before);
    sidecar.assert_log_free_of(&world.google.minted());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unbound_service_account_is_reported_in_readyz_and_never_forwarded() {
    let world = World::start().await;
    let message = "Workload Identity: the Kubernetes service account payments/orders-client is not bound to invoker@client-project.iam.gserviceaccount.com";
    world.google.set_failure(Some((403, message)));
    let sidecar = Sidecar::start(&world.env(&format!("fn={FUNCTION_URL}")));
    let http = Http::new();
    let readyz = wait_unready(&http, &sidecar, READY).await;
    assert_eq!(readyz.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        readyz.json()["upstreams"]["fn"]["reason"].as_str().is_some_and(|r| r.contains(message)),
        "{}",
        readyz.text()
    );
    let reply = http.get(&sidecar.url("/fn/x")).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(reply.json()["reason"].as_str().is_some_and(|r| r.contains("403") && r.contains(message)));
    assert_eq!(world.function.requests(), 0, "fail closed: nothing reached the function");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_for_another_service_account_is_never_used() {
    let world = World::start().await;
    world.google.set_ksa(KsaMapping::Bound("someone-else@client-project.iam.gserviceaccount.com".into()));
    let sidecar = Sidecar::start(&world.env(&format!("fn={FUNCTION_URL}")));
    let http = Http::new();
    let readyz = wait_unready(&http, &sidecar, READY).await;
    assert_eq!(readyz.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(readyz.text().contains(GSA) && readyz.text().contains("someone-else"), "{}", readyz.text());
    assert_eq!(http.get(&sidecar.url("/fn/x")).await.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(http.token(&sidecar.url("/_wiproxy/token?upstream=fn")).await.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(world.function.requests(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_front_end_401_causes_one_refetch_and_one_retry_at_most_every_30_s() {
    let world = World::start().await;
    let sidecar = Sidecar::start(&world.env(&format!("fn={FUNCTION_URL}")));
    let http = Http::new();
    assert_eq!(wait_ready(&http, &sidecar, READY).await.status, StatusCode::OK);
    assert_eq!(http.get(&sidecar.url("/fn/a")).await.status, StatusCode::OK);
    assert_eq!(world.google.identity_fetches.load(Ordering::SeqCst), 1);
    assert_eq!(world.function.requests(), 1);

    world.function.revoke_seen();
    let request =
        Request::post(sidecar.url("/fn/b")).body(Full::new(Bytes::from_static(b"replayed body"))).expect("request");
    let reply = http.send(request).await.expect("answer");
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.json()["body"], "replayed body");
    assert_eq!(world.google.identity_fetches.load(Ordering::SeqCst), 2, "one refetch");
    assert_eq!(world.function.requests(), 3, "the refused call and one retry");

    // The fresh token refused too, within 30 s: answered as is, no refetch, no replay, and
    // /readyz says why.
    world.function.revoke_seen();
    let request = Request::post(sidecar.url("/fn/c")).body(Full::new(Bytes::from_static(b"once"))).expect("request");
    let reply = http.send(request).await.expect("answer");
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    assert!(reply.headers["www-authenticate"].to_str().is_ok_and(|v| v.contains("invalid_token")));
    assert_eq!(world.function.requests(), 4, "no replay");
    assert_eq!(world.google.identity_fetches.load(Ordering::SeqCst), 2, "no second refetch within 30 s");
    let readyz = http.get(&sidecar.admin_url("/readyz")).await;
    assert_eq!(readyz.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(readyz.text().contains("token refused by upstream: check audience and invoker role"), "{}", readyz.text());
    sidecar.assert_log_free_of(&world.google.minted());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_apps_own_401_is_returned_as_is_never_replayed() {
    let world = World::start().await;
    let sidecar = Sidecar::start(&world.env(&format!("fn={FUNCTION_URL}")));
    let http = Http::new();
    assert_eq!(wait_ready(&http, &sidecar, READY).await.status, StatusCode::OK);
    for n in 0..5 {
        let request =
            Request::post(sidecar.url("/fn/app-401")).body(Full::new(Bytes::from_static(b"x"))).expect("request");
        let reply = http.send(request).await.expect("answer");
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
        assert_eq!(reply.headers["www-authenticate"], "Basic realm=\"orders\"", "the app's challenge passes through");
        assert_eq!(world.function.requests(), n + 1, "each POST reached the upstream once");
    }
    // A 401 with no challenge at all is the app's too.
    assert_eq!(http.get(&sidecar.url("/fn/status/401")).await.status, StatusCode::UNAUTHORIZED);
    assert_eq!(world.function.requests(), 6);
    assert_eq!(world.google.identity_fetches.load(Ordering::SeqCst), 1, "the token was never dropped");
    assert_eq!(http.get(&sidecar.admin_url("/readyz")).await.status, StatusCode::OK);
    sidecar.assert_log_free_of(&world.google.minted());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_configured_upstreams_are_reached() {
    let world = World::start().await;
    let sidecar = Sidecar::start(&world.env(&format!("fn={FUNCTION_URL}")));
    let http = Http::new();
    assert_eq!(wait_ready(&http, &sidecar, READY).await.status, StatusCode::OK);

    let (status, answer) = raw(
        sidecar.proxy,
        "GET http://evil.example.com/steal HTTP/1.1\r\nHost: evil.example.com\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 403, "{answer}");
    let (status, answer) = raw(
        sidecar.proxy,
        &format!("GET http://{}/orders-admin HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", world::FUNCTION_HOST),
    )
    .await;
    assert_eq!(status, 403, "a sibling path is not under the upstream: {answer}");
    let (status, answer) =
        raw(sidecar.proxy, "CONNECT europe-west1-host-project.cloudfunctions.net:443 HTTP/1.1\r\nHost: x\r\n\r\n")
            .await;
    assert_eq!(status, 405, "{answer}");
    assert!(answer.contains("TLS tunnel"));
    assert_eq!(http.get(&sidecar.url("/fn/%2e%2e/admin")).await.status, StatusCode::BAD_REQUEST);
    assert_eq!(http.get(&sidecar.url("/nope/x")).await.status, StatusCode::NOT_FOUND);
    assert_eq!(world.function.requests(), 0, "nothing refused reached the function");

    // The same absolute form under the upstream is forwarded over HTTPS with the token.
    let (status, answer) = raw(
        sidecar.proxy,
        &format!(
            "GET http://{}/orders/via-proxy HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            world::FUNCTION_HOST
        ),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert!(answer.contains("\"path\":\"/orders/via-proxy\""));
    assert_eq!(world.function.requests(), 1);
    sidecar.assert_log_free_of(&world.google.minted());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_and_slow_upstreams_get_502_and_504() {
    let world = World::start().await;
    let closed = wiproxy_tests::sidecar::free_port();
    let mut env = world.env(&format!("fn={FUNCTION_URL},gone=https://gone.example.com"));
    for (name, value) in env.iter_mut() {
        if name == "WIPROXY_RESOLVE" {
            value.push_str(&format!(",gone.example.com=127.0.0.1:{closed}"));
        }
    }
    env.push(("WIPROXY_UPSTREAM_TIMEOUT".into(), "1".into()));
    let mut sidecar = Sidecar::start(&env);
    let http = Http::new();
    assert_eq!(wait_ready(&http, &sidecar, READY).await.status, StatusCode::OK);

    let gone = http.get(&sidecar.url("/gone/x")).await;
    assert_eq!(gone.status, StatusCode::BAD_GATEWAY, "{}", gone.text());
    assert_eq!(gone.json()["upstream"], "gone");
    let slow = http.get(&sidecar.url("/fn/sleep/3")).await;
    assert_eq!(slow.status, StatusCode::GATEWAY_TIMEOUT, "{}", slow.text());

    let metrics = http.get(&sidecar.admin_url("/metrics")).await.text();
    assert_eq!(metric(&metrics, "wiproxy_requests_total", r#"upstream="gone",status="502""#), 1.0, "{metrics}");
    assert_eq!(metric(&metrics, "wiproxy_requests_total", r#"upstream="fn",status="504""#), 1.0);
    assert_eq!(metric(&metrics, "wiproxy_token_fetches_total", r#"result="ok""#), 2.0, "one fetch per audience");
    assert!(metric(&metrics, "wiproxy_token_ttl_seconds", "cloudfunctions") > 3000.0);

    assert_eq!(sidecar.terminate(), Some(0), "SIGTERM stops the sidecar cleanly");
    sidecar.assert_log_free_of(&world.google.minted());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_function_url_longer_than_the_function_asks_for_the_functions_audience() {
    let world = World::start().await;
    // The fake front end accepts exactly the function URL as audience, as gen1 does.
    let sidecar = Sidecar::start(&world.env(&format!("v1={FUNCTION_URL}/v1")));
    let http = Http::new();
    assert_eq!(wait_ready(&http, &sidecar, READY).await.status, StatusCode::OK, "{}", sidecar.log());
    let reply = http.get(&sidecar.url("/v1/items")).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.json()["audience"], FUNCTION_URL);
    assert_eq!(reply.json()["path"], "/orders/v1/items", "the rest of the URL is a route inside the function");
    sidecar.assert_log_free_of(&world.google.minted());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cloud_run_custom_audience_and_both_urls_of_a_gen2_function_work() {
    let world = World::start().await;
    let upstreams = format!(
        "aud=https://{RUN_HOST};audience={CUSTOM_AUDIENCE},det=https://{RUN_DETERMINISTIC_HOST}/api,\
         gen2-cf={GEN2_FUNCTION_URL},gen2-run=https://{GEN2_RUN_HOST}"
    );
    let sidecar = Sidecar::start(&world.env(&upstreams));
    let http = Http::new();
    assert_eq!(wait_ready(&http, &sidecar, READY).await.status, StatusCode::OK, "{}", sidecar.log());
    let cases = [
        ("/aud/x", CUSTOM_AUDIENCE.to_owned(), RUN_HOST, "/x"),
        ("/det/x", format!("https://{RUN_DETERMINISTIC_HOST}"), RUN_DETERMINISTIC_HOST, "/api/x"),
        ("/gen2-cf/x", GEN2_FUNCTION_URL.to_owned(), world::FUNCTION_HOST, "/invoices/x"),
        ("/gen2-run/x", format!("https://{GEN2_RUN_HOST}"), GEN2_RUN_HOST, "/x"),
    ];
    for (path, audience, host, upstream_path) in cases {
        let reply = http.get(&sidecar.url(path)).await;
        assert_eq!(reply.status, StatusCode::OK, "{path}: {} {:?}", reply.text(), world.function.refusals());
        let echo = reply.json();
        assert_eq!(echo["audience"], audience.as_str(), "{path}");
        assert_eq!(echo["host"], host, "{path}");
        assert_eq!(echo["path"], upstream_path, "{path}");
    }
    assert!(world.function.refusals().is_empty(), "{:?}", world.function.refusals());
    sidecar.assert_log_free_of(&world.google.minted());
}

/// A direct call to the fake front end, with `token` in `header` (if any).
async fn direct(world: &World, host: &str, path: &str, header: &str, token: Option<&str>) -> Reply {
    let mut request = Request::get(path);
    if let Some(token) = token {
        request = request.header(header, format!("Bearer {token}"));
    }
    let request = request.body(Full::new(Bytes::new())).expect("request");
    https_send(world.function_addr, host, request, world.ca.client_config()).await.expect("answer")
}

fn assert_forbidden(reply: &Reply, path: &str) {
    assert_eq!(reply.status, StatusCode::FORBIDDEN, "{}", reply.text());
    assert!(reply.headers.get("www-authenticate").is_none(), "Google sends no challenge with its 403");
    assert!(reply.text().contains("<title>403 Forbidden</title>"), "{}", reply.text());
    assert!(reply.text().contains("<h1>Error: Forbidden</h1>"));
    let words = format!("Your client does not have permission to get URL <code>{path}</code> from this server.");
    assert!(reply.text().contains(&words), "{}", reply.text());
}

fn assert_unauthorized(reply: &Reply, path: &str) {
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{}", reply.text());
    assert_eq!(
        reply.headers["www-authenticate"],
        "Bearer error=\"invalid_token\" error_description=\"The access token could not be verified\""
    );
    assert!(reply.text().contains("<h1>Error: Unauthorized</h1>"), "{}", reply.text());
    let words = format!("Your client does not have permission to the requested URL <code>{path}</code>.");
    assert!(reply.text().contains(&words), "{}", reply.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_front_end_refuses_as_google_does() {
    let world = World::start().await;
    let host = world::FUNCTION_HOST;
    let path = "/orders/v1/items";
    let valid = world.google.mint(FUNCTION_URL, GSA, true);
    assert_eq!(direct(&world, host, path, "authorization", Some(&valid)).await.status, StatusCode::OK);

    // No token, and a valid token of a caller without the invoker role: 403, no challenge.
    assert_forbidden(&direct(&world, host, path, "authorization", None).await, path);
    let stranger = world.google.mint(FUNCTION_URL, "stranger@client-project.iam.gserviceaccount.com", true);
    assert_forbidden(&direct(&world, host, path, "authorization", Some(&stranger)).await, path);

    // A token the front end cannot verify: 401 with the Bearer invalid_token challenge.
    let other_function = world.google.mint(GEN2_FUNCTION_URL, GSA, true);
    assert_unauthorized(&direct(&world, host, path, "authorization", Some(&other_function)).await, path);
    let host_only = world.google.mint(&format!("https://{host}"), GSA, true);
    assert_unauthorized(&direct(&world, host, path, "authorization", Some(&host_only)).await, path);
    let forged = format!("{}AAAA", valid.trim_end_matches(|c| c != '.'));
    assert_unauthorized(&direct(&world, host, path, "authorization", Some(&forged)).await, path);
    world.google.lifetime_secs.store(0, Ordering::SeqCst);
    let expired = world.google.mint(FUNCTION_URL, GSA, true);
    assert_unauthorized(&direct(&world, host, path, "authorization", Some(&expired)).await, path);
    // The path in the page is escaped, as HTML.
    assert_forbidden(&direct(&world, host, "/orders/a%3Cb", "authorization", None).await, "/orders/a%3Cb");

    let refusals = world.function.refusals();
    assert_eq!(refusals.len(), 7, "{refusals:?}");
    assert!(refusals[4].contains("invalid signature") && refusals[5] == "token expired", "{refusals:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x_serverless_authorization_counts_on_run_app_only() {
    let world = World::start().await;
    let run = world.google.mint(&format!("https://{RUN_HOST}"), GSA, true);
    let reply = direct(&world, RUN_HOST, "/list", "x-serverless-authorization", Some(&run)).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.json()["token_header"], "x-serverless-authorization");
    // The gen2 function: on its run.app URL the header counts; on its cloudfunctions.net URL
    // only Authorization does, so the same token there is no token at all.
    let gen2 = world.google.mint(GEN2_FUNCTION_URL, GSA, true);
    let reply = direct(&world, GEN2_RUN_HOST, "/x", "x-serverless-authorization", Some(&gen2)).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_forbidden(
        &direct(&world, world::FUNCTION_HOST, "/invoices/x", "x-serverless-authorization", Some(&gen2)).await,
        "/invoices/x",
    );
    assert_eq!(
        direct(&world, world::FUNCTION_HOST, "/invoices/x", "authorization", Some(&gen2)).await.status,
        StatusCode::OK
    );

    // Through the sidecar: the header chosen for a cloudfunctions.net URL is refused by its front end.
    let mut env = world.env(&format!("fn={FUNCTION_URL}"));
    env.push(("WIPROXY_TOKEN_HEADER".into(), "x-serverless-authorization".into()));
    let sidecar = Sidecar::start(&env);
    let http = Http::new();
    assert_eq!(wait_ready(&http, &sidecar, READY).await.status, StatusCode::OK);
    assert_eq!(http.get(&sidecar.url("/fn/x")).await.status, StatusCode::FORBIDDEN);
    sidecar.assert_log_free_of(&world.google.minted());
}
