//! Credential sources end to end: the metadata server's contract, `/_wiproxy/token`,
//! `wiproxy token`, a service-account key and impersonation.

mod support;

use std::process::Command;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
use support::wait_ready;
use wiproxy_tests::client::Http;
use wiproxy_tests::sidecar::{binary, Sidecar};
use wiproxy_tests::world::{World, FUNCTION_URL, GSA, IMPERSONATED_GSA, KEY_FILE_GSA, RUN_HOST};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fake_metadata_server_keeps_the_gke_contract() {
    let world = World::start().await;
    let http = Http::new();
    let base = format!("http://{}/computeMetadata/v1/instance/service-accounts/default/identity", world.metadata);
    let get = |uri: String, headers: Vec<(&'static str, &'static str)>| {
        let http = http.clone();
        async move {
            let mut request = Request::get(uri);
            for (name, value) in headers {
                request = request.header(name, value);
            }
            http.send(request.body(Full::new(Bytes::new())).expect("request")).await.expect("answer")
        }
    };
    let flavor = ("metadata-flavor", "Google");
    assert_eq!(get(format!("{base}?audience=a"), vec![]).await.status, StatusCode::FORBIDDEN);
    assert_eq!(
        get(format!("{base}?audience=a"), vec![flavor, ("x-forwarded-for", "10.0.0.1")]).await.status,
        StatusCode::FORBIDDEN
    );
    assert_eq!(get(base.clone(), vec![flavor]).await.status, StatusCode::BAD_REQUEST);
    let full = get(format!("{base}?audience=https%3A%2F%2Fx.example.com&format=full"), vec![flavor]).await;
    let claims = world.google.verifier().verify(&full.text()).expect("signed by the fake key");
    for claim in ["iss", "aud", "azp", "sub", "email", "email_verified", "iat", "exp"] {
        assert!(claims.get(claim).is_some(), "{claim} missing from {claims}");
    }
    assert_eq!(claims["aud"], "https://x.example.com");
    let standard = get(format!("{base}?audience=a"), vec![flavor]).await;
    assert!(world.google.verifier().verify(&standard.text()).expect("signed").get("email").is_none());
    *world.google.bound.lock().expect("lock") = None;
    assert_eq!(get(format!("{base}?audience=a"), vec![flavor]).await.status, StatusCode::NOT_FOUND);
    let jwks = http.get(&format!("http://{}/oauth2/v3/certs", world.metadata)).await;
    assert_eq!(jwks.status, StatusCode::NOT_FOUND, "the JWKS lives on the HTTPS side");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_endpoint_hands_out_the_upstreams_token() {
    let world = World::start().await;
    let sidecar = Sidecar::start(&world.env(&format!("fn={FUNCTION_URL},run=https://{RUN_HOST}")));
    let http = Http::new();
    assert_eq!(wait_ready(&http, &sidecar, Duration::from_secs(15)).await.status, StatusCode::OK);
    let reply = http.get(&sidecar.url("/_wiproxy/token?upstream=run")).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.headers["cache-control"], "no-store");
    let claims = world.google.verifier().verify(reply.text().trim()).expect("a signed token");
    assert_eq!(claims["aud"], format!("https://{RUN_HOST}"));
    assert_eq!(claims["email"], GSA);
    assert_eq!(http.get(&sidecar.url("/_wiproxy/token?upstream=other")).await.status, StatusCode::NOT_FOUND);
    sidecar.assert_log_free_of(&world.google.minted());
}

fn wiproxy_token(env: &[(String, String)], args: &[&str]) -> (bool, String, String) {
    let output = Command::new(binary("wiproxy"))
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .arg("token")
        .args(args)
        .output()
        .expect("run wiproxy token");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).trim().to_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wiproxy_token_uses_each_credential_source() {
    let world = World::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let key_file = world.write_key_file(dir.path());
    let verify = |token: &str| world.google.verifier().verify(token).expect("a token signed by the fake Google key");

    // The metadata server, with the audience of a configured upstream.
    let env = world.env(&format!("fn={FUNCTION_URL}"));
    let env_for_command = env.clone();
    let (ok, token, stderr) =
        tokio::task::spawn_blocking(move || wiproxy_token(&env_for_command, &["--upstream", "fn"]))
            .await
            .expect("task");
    assert!(ok, "{stderr}");
    assert_eq!(verify(&token)["aud"], FUNCTION_URL);
    assert_eq!(verify(&token)["email"], GSA);

    // A service-account key: a signed JWT exchanged at its token_uri.
    let mut key_env = env.clone();
    key_env.push(("WIPROXY_CREDENTIALS".into(), format!("key-file:{}", key_file.display())));
    key_env.retain(|(k, _)| k != "WIPROXY_EXPECTED_SERVICE_ACCOUNT");
    let (ok, token, stderr) =
        tokio::task::spawn_blocking(move || wiproxy_token(&key_env, &["--audience", "https://onprem.example.com"]))
            .await
            .expect("task");
    assert!(ok, "{stderr}");
    assert_eq!(verify(&token)["email"], KEY_FILE_GSA);
    assert_eq!(verify(&token)["aud"], "https://onprem.example.com");

    // Impersonation through IAM Credentials, with the metadata server's access token.
    let mut imp_env = env.clone();
    imp_env.push(("WIPROXY_CREDENTIALS".into(), format!("impersonate:{IMPERSONATED_GSA}")));
    imp_env.retain(|(k, _)| k != "WIPROXY_EXPECTED_SERVICE_ACCOUNT");
    let (ok, token, stderr) =
        tokio::task::spawn_blocking(move || wiproxy_token(&imp_env, &["--audience", "https://imp.example.com"]))
            .await
            .expect("task");
    assert!(ok, "{stderr}");
    assert_eq!(verify(&token)["email"], IMPERSONATED_GSA);

    // A GSA the caller may not act as: refused with IAM's words, exit 1, no token printed.
    let mut denied_env = env.clone();
    denied_env
        .push(("WIPROXY_CREDENTIALS".into(), "impersonate:stranger@client-project.iam.gserviceaccount.com".into()));
    denied_env.retain(|(k, _)| k != "WIPROXY_EXPECTED_SERVICE_ACCOUNT");
    let (ok, token, stderr) =
        tokio::task::spawn_blocking(move || wiproxy_token(&denied_env, &["--audience", "x"])).await.expect("task");
    assert!(!ok && token.is_empty());
    assert!(stderr.contains("403") && stderr.contains("getOpenIdToken"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_runs_on_a_service_account_key_off_gke() {
    let world = World::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let key_file = world.write_key_file(dir.path());
    let mut env = world.env(&format!("fn={FUNCTION_URL}"));
    env.retain(|(k, _)| k != "WIPROXY_EXPECTED_SERVICE_ACCOUNT" && k != "GCE_METADATA_HOST");
    env.push(("WIPROXY_CREDENTIALS".into(), format!("key-file:{}", key_file.display())));
    env.push(("WIPROXY_EXPECTED_SERVICE_ACCOUNT".into(), KEY_FILE_GSA.into()));
    let sidecar = Sidecar::start(&env);
    let http = Http::new();
    assert_eq!(wait_ready(&http, &sidecar, Duration::from_secs(15)).await.status, StatusCode::OK, "{}", sidecar.log());
    let echo = http.get(&sidecar.url("/fn/onprem")).await.json();
    assert_eq!(echo["email"], KEY_FILE_GSA);
    assert_eq!(
        world.google.identity_fetches.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "no metadata server involved"
    );
    sidecar.assert_log_free_of(&world.google.minted());
}

#[test]
fn bad_configuration_is_named_and_refused() {
    let cases: [(&[(&str, &str)], &str); 4] = [
        (&[("WIPROXY_UPSTREAMS", "orders=http://x.example.com")], "WIPROXY_UPSTREAMS"),
        (
            &[("WIPROXY_UPSTREAMS", "a=https://x.example.com"), ("WIPROXY_TOKEN_HEADER", "bearer")],
            "WIPROXY_TOKEN_HEADER",
        ),
        (&[("WIPROXY_UPSTREAMS", "a=https://x.example.com"), ("WIPROXY_RESOLVE", "x.example.com")], "WIPROXY_RESOLVE"),
        (
            &[("WIPROXY_UPSTREAMS", "a=https://x.example.com"), ("WIPROXY_CREDENTIALS", "vault:x")],
            "WIPROXY_CREDENTIALS",
        ),
    ];
    for (env, named) in cases {
        let output =
            Command::new(binary("wiproxy")).env_clear().envs(env.iter().copied()).output().expect("run wiproxy");
        assert!(!output.status.success());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(named), "{named}: {stderr}");
    }
}
