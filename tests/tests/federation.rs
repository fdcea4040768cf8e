//! Workload Identity Federation end to end: a sidecar with `external-account:` exchanges a
//! projected ServiceAccount token of a cluster outside GKE at the fake STS, gets ID tokens from
//! the fake IAM Credentials with the federated token, and calls the fake function with them.

mod support;

use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use http::StatusCode;
use support::{wait_ready, wait_unready};
use wiproxy_tests::client::Http;
use wiproxy_tests::google::wif_token_audience;
use wiproxy_tests::sidecar::{run_to_exit, Sidecar};
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

fn sha256_hex(bytes: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, bytes).as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// Another universe's STS and IAM Credentials, served by the same fake (so that, were the
/// sidecar to trust the file's `universe_domain`, the exchange would succeed and be counted).
async fn foreign_universe(world: &World) -> String {
    let addr = wiproxy_tests::serve::https(
        wiproxy_tests::google::googleapis_router(world.google.clone()),
        world.ca.server_config(&["sts.evil.example", "iamcredentials.evil.example"]),
    )
    .await;
    format!("sts.evil.example={addr},iamcredentials.evil.example={addr}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configuration_naming_another_universe_stops_the_start_and_sends_nothing() {
    let world = World::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let (config, _) = world.write_external_account(dir.path(), "payments", "orders-client", GSA);
    // The annotation edited after admission: another universe, its URLs on it.
    let mut edited: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&config).expect("read")).expect("the configuration");
    edited["universe_domain"] = "evil.example".into();
    edited["token_url"] = "https://sts.evil.example/v1/token".into();
    edited["service_account_impersonation_url"] =
        format!("https://iamcredentials.evil.example/v1/projects/-/serviceAccounts/{GSA}:generateAccessToken").into();
    std::fs::write(&config, edited.to_string()).expect("edit the configuration");
    let mut env = federation_env(&world, &config);
    let pins = foreign_universe(&world).await;
    for (key, value) in &mut env {
        if key == "WIPROXY_RESOLVE" {
            value.push(',');
            value.push_str(&pins);
        }
    }
    // Run by hand (no digest) and as the webhook injects it (the universe in env, and the
    // digest of this very file, so only the universe can refuse it).
    let digest = sha256_hex(edited.to_string().as_bytes());
    let injected = [("WIPROXY_UNIVERSE_DOMAIN", "googleapis.com"), ("WIPROXY_CREDENTIAL_CONFIG_SHA256", &digest)];
    for extra in [&[][..], &injected[..]] {
        let mut env = env.clone();
        env.extend(extra.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
        let started = Instant::now();
        let (code, log) = run_to_exit(&env, Duration::from_secs(10));
        assert_eq!(code, Some(1), "the sidecar must refuse to start: {log}");
        assert!(started.elapsed() < Duration::from_secs(5), "refused at once");
        assert!(
            log.contains("universe_domain \"evil.example\"") && log.contains("WIPROXY_UNIVERSE_DOMAIN"),
            "the message names the field and the fix: {log}"
        );
    }
    assert_eq!(world.google.sts_requests.load(Ordering::SeqCst), 0, "nothing reached any STS");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configuration_changed_after_admission_stops_the_start_and_sends_nothing() {
    let world = World::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let (config, _) = world.write_external_account(dir.path(), "payments", "orders-client", GSA);
    let admitted = std::fs::read(&config).expect("read");
    let mut env = federation_env(&world, &config);
    env.push(("WIPROXY_UNIVERSE_DOMAIN".into(), "googleapis.com".into()));
    env.push(("WIPROXY_CREDENTIAL_CONFIG_SHA256".into(), sha256_hex(&admitted)));
    // Still on Google's own hosts, but read from another file: the digest alone catches it.
    let mut edited: serde_json::Value = serde_json::from_slice(&admitted).expect("the configuration");
    edited["credential_source"]["file"] = "/var/run/secrets/kubernetes.io/serviceaccount/token".into();
    std::fs::write(&config, edited.to_string()).expect("edit the configuration");
    let (code, log) = run_to_exit(&env, Duration::from_secs(10));
    assert_eq!(code, Some(1), "the sidecar must refuse to start: {log}");
    assert!(log.contains("WIPROXY_CREDENTIAL_CONFIG_SHA256") && log.contains("Recreate the pod"), "{log}");
    assert_eq!(world.google.sts_requests.load(Ordering::SeqCst), 0, "nothing reached STS");

    // The file as admitted starts and serves.
    std::fs::write(&config, &admitted).expect("restore the configuration");
    let sidecar = Sidecar::start(&env);
    let http = Http::new();
    assert_eq!(wait_ready(&http, &sidecar, Duration::from_secs(15)).await.status, StatusCode::OK, "{}", sidecar.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subject_token_file_that_is_no_file_is_refused_quickly_and_sends_nothing() {
    let world = World::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let fifo = dir.path().join("fifo");
    assert!(Command::new("mkfifo").arg(&fifo).status().expect("mkfifo").success());
    let large = dir.path().join("large");
    // 256 MiB, sparse: it costs no disk, and read whole it would cost 256 MiB of memory.
    std::fs::File::create(&large).and_then(|f| f.set_len(256 * 1024 * 1024)).expect("a 256 MiB file");
    let cases = [
        (fifo.clone(), "is a FIFO"),
        ("/dev/zero".into(), "is a character device"),
        (large.clone(), "more than 65536 bytes"),
        ("/proc/self/environ".into(), "under /proc"),
    ];
    for (source, words) in cases {
        let config_dir = tempfile::tempdir().expect("temp dir");
        let (config, _) = world.write_external_account(config_dir.path(), "payments", "orders-client", GSA);
        let mut value: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&config).expect("read")).expect("the configuration");
        value["credential_source"]["file"] = source.display().to_string().into();
        std::fs::write(&config, value.to_string()).expect("write the configuration");
        let started = Instant::now();
        let sidecar = Sidecar::start(&federation_env(&world, &config));
        let http = Http::new();
        let ready = wait_unready(&http, &sidecar, Duration::from_secs(15)).await;
        assert_eq!(ready.status, StatusCode::SERVICE_UNAVAILABLE, "{}", source.display());
        let reason = ready.json()["upstreams"]["fn"]["reason"].as_str().unwrap_or_default().to_owned();
        assert!(
            reason.contains(words) && reason.contains(&source.display().to_string()),
            "{}: {reason}\n{}",
            source.display(),
            sidecar.log()
        );
        assert!(started.elapsed() < Duration::from_secs(10), "{}: refused quickly", source.display());
        let call = http.get(&sidecar.url("/fn/x")).await;
        assert_eq!(call.status, StatusCode::SERVICE_UNAVAILABLE, "fails closed");
        let peak = sidecar.peak_rss_kib();
        assert!(peak < 48 * 1024, "{}: peak RSS {peak} KiB", source.display());
    }
    assert_eq!(world.google.sts_requests.load(Ordering::SeqCst), 0, "nothing reached STS");
    assert_eq!(world.function.requests(), 0, "nothing reached the function");
}
