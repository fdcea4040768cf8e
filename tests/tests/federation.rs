//! Workload Identity Federation end to end: a sidecar with `external-account:` exchanges a
//! projected ServiceAccount token of a cluster outside GKE at the fake STS, gets ID tokens from
//! the fake IAM Credentials with the federated token, and calls the fake function with them.

mod support;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use http::StatusCode;
use support::{wait_ready, wait_unready};
use wiproxy_tests::client::Http;
use wiproxy_tests::google::wif_token_audience;
use wiproxy_tests::sidecar::Sidecar;
use wiproxy_tests::world::{World, FUNCTION_URL, GSA};

/// The environment of a sidecar on a cluster outside GKE: no metadata server at all.
fn federation_env(world: &World, config: &std::path::Path) -> Vec<(String, String)> {
    let mut env = world.env(&format!("fn={FUNCTION_URL}"));
    env.retain(|(k, _)| k != "GCE_METADATA_HOST");
    env.push(("GCE_METADATA_HOST".into(), "127.0.0.1:9".into()));
    env.push(("WIPROXY_CREDENTIALS".into(), format!("external-account:{}", config.display())));
    env
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_function_is_called_through_federation_without_any_key() {
    let world = World::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let (config, _) = world.write_external_account(dir.path(), "payments", "orders-client", GSA);
    let sidecar = Sidecar::start(&federation_env(&world, &config));
    let http = Http::new();
    assert_eq!(wait_ready(&http, &sidecar, Duration::from_secs(15)).await.status, StatusCode::OK, "{}", sidecar.log());
    let echo = http.get(&sidecar.url("/fn/federated")).await;
    assert_eq!(echo.status, StatusCode::OK, "{}", echo.text());
    assert_eq!(echo.json()["email"], GSA, "the function saw the GSA's ID token");
    assert_eq!(world.google.identity_fetches.load(Ordering::SeqCst), 0, "no metadata server involved");
    let exchanges = world.google.sts_subjects.lock().expect("lock").clone();
    assert_eq!(exchanges.len(), 1, "one exchange, its federated token cached: {exchanges:?}");
    assert_eq!(exchanges[0].0, "system:serviceaccount:payments:orders-client");
    sidecar.assert_log_free_of(&world.google.minted());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_subject_token_is_read_at_the_next_exchange() {
    let world = World::start().await;
    // Short-lived ID tokens and federated tokens, so a refresh (and an exchange) comes soon.
    world.google.lifetime_secs.store(20, Ordering::SeqCst);
    world.google.sts_lifetime_secs.store(1, Ordering::SeqCst);
    let dir = tempfile::tempdir().expect("temp dir");
    let (config, token_file) = world.write_external_account(dir.path(), "payments", "orders-client", GSA);
    let sidecar = Sidecar::start(&federation_env(&world, &config));
    let http = Http::new();
    assert_eq!(wait_ready(&http, &sidecar, Duration::from_secs(15)).await.status, StatusCode::OK, "{}", sidecar.log());
    let first = world.google.sts_subjects.lock().expect("lock")[0].1.clone();

    // The kubelet writes a new token in place.
    let rotated = world.google.cluster_token("payments", "orders-client", &wif_token_audience(), 3600);
    std::fs::write(&token_file, &rotated).expect("rotate the token");
    let deadline = Instant::now() + Duration::from_secs(40);
    let seen = loop {
        let jtis: Vec<String> =
            world.google.sts_subjects.lock().expect("lock").iter().map(|(_, j)| j.clone()).collect();
        if jtis.iter().any(|j| *j != first) || Instant::now() > deadline {
            break jtis;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(seen.iter().any(|j| *j != first), "the refresh exchanged the rotated token: {seen:?}\n{}", sidecar.log());
    assert_eq!(http.get(&sidecar.url("/fn/after-rotation")).await.status, StatusCode::OK);
    sidecar.assert_log_free_of(&world.google.minted());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_federated_token_iam_refuses_is_exchanged_again() {
    let world = World::start().await;
    // ID tokens refreshed within seconds; the federated token would be good for an hour.
    world.google.lifetime_secs.store(20, Ordering::SeqCst);
    let dir = tempfile::tempdir().expect("temp dir");
    let (config, _) = world.write_external_account(dir.path(), "payments", "orders-client", GSA);
    let sidecar = Sidecar::start(&federation_env(&world, &config));
    let http = Http::new();
    assert_eq!(wait_ready(&http, &sidecar, Duration::from_secs(15)).await.status, StatusCode::OK, "{}", sidecar.log());
    world.google.revoke_access_tokens();
    let deadline = Instant::now() + Duration::from_secs(40);
    while world.google.sts_subjects.lock().expect("lock").len() < 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        world.google.sts_subjects.lock().expect("lock").len(),
        2,
        "one new exchange after the 401\n{}",
        sidecar.log()
    );
    assert_eq!(wait_ready(&http, &sidecar, Duration::from_secs(5)).await.status, StatusCode::OK, "{}", sidecar.log());
    assert_eq!(http.get(&sidecar.url("/fn/after-revocation")).await.status, StatusCode::OK);
    sidecar.assert_log_free_of(&world.google.minted());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sts_refusal_shows_in_readyz_with_googles_words_and_calls_fail_closed() {
    let world = World::start().await;
    let cases = [
        (
            "a token for another audience",
            "https://kubernetes.default.svc".to_owned(),
            3600,
            "does not match the expected audience",
        ),
        ("an expired token", wif_token_audience(), -60, "ID Token has expired"),
    ];
    for (what, audience, lifetime, words) in cases {
        let dir = tempfile::tempdir().expect("temp dir");
        let (config, token_file) = world.write_external_account(dir.path(), "payments", "orders-client", GSA);
        let bad = world.google.cluster_token("payments", "orders-client", &audience, lifetime);
        std::fs::write(&token_file, bad).expect("write the bad token");
        let sidecar = Sidecar::start(&federation_env(&world, &config));
        let http = Http::new();
        let ready = wait_unready(&http, &sidecar, Duration::from_secs(15)).await;
        assert_eq!(ready.status, StatusCode::SERVICE_UNAVAILABLE, "{what}");
        let reason = ready.json()["upstreams"]["fn"]["reason"].as_str().unwrap_or_default().to_owned();
        assert!(reason.contains("STS answered 400") && reason.contains(words), "{what}: {reason}");
        let call = http.get(&sidecar.url("/fn/refused")).await;
        assert_eq!(call.status, StatusCode::SERVICE_UNAVAILABLE, "{what}");
        assert!(call.text().contains(words), "{what}: the 503 names the reason: {}", call.text());
        sidecar.assert_log_free_of(&world.google.minted());
    }
    assert_eq!(world.function.requests.load(Ordering::SeqCst), 0, "nothing reached the function without a token");
}
