//! Credential sources end to end: the metadata server's contract, `/_wiproxy/token`,
//! `wiproxy token`, a service-account key and impersonation.

mod support;

use std::process::Command;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
use support::{wait_ready, wait_unready};
use wiproxy_tests::client::{https_send, Http, Reply};
use wiproxy_tests::google::{KsaMapping, OAUTH_TOKEN_URI, SERVICE_ACCOUNT_KEY};
use wiproxy_tests::jwt::Signer;
use wiproxy_tests::sidecar::{binary, Sidecar};
use wiproxy_tests::world::{World, FUNCTION_URL, GSA, IMPERSONATED_GSA, KEY_FILE_GSA, RUN_HOST};

const READY: Duration = Duration::from_secs(15);

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
    world.google.set_ksa(KsaMapping::Unannotated);
    assert_eq!(get(format!("{base}?audience=a"), vec![flavor]).await.status, StatusCode::NOT_FOUND);
    let jwks = get(format!("http://{}/oauth2/v3/certs", world.metadata), vec![flavor]).await;
    assert_eq!(jwks.status, StatusCode::NOT_FOUND, "the JWKS lives on the HTTPS side");
}

const SERVICE_ACCOUNTS: &str = "computeMetadata/v1/instance/service-accounts/default";

async fn metadata_get(world: &World, path: &str, flavor: bool) -> Reply {
    let mut request = Request::get(format!("http://{}/{path}", world.metadata));
    if flavor {
        request = request.header("metadata-flavor", "Google");
    }
    Http::new().send(request.body(Full::new(Bytes::new())).expect("request")).await.expect("answer")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_refuses_every_path_without_the_flavor_header_and_the_sidecar_sends_it() {
    let world = World::start().await;
    for path in [
        format!("{SERVICE_ACCOUNTS}/email"),
        format!("{SERVICE_ACCOUNTS}/token"),
        format!("{SERVICE_ACCOUNTS}/identity?audience=a"),
        "computeMetadata/v1/".to_owned(),
    ] {
        let refused = metadata_get(&world, &path, false).await;
        assert_eq!(refused.status, StatusCode::FORBIDDEN, "{path}");
        assert_eq!(
            refused.text(),
            "GKE Metadata Server encountered an error: Missing required header \"Metadata-Flavor\": \"Google\"\n"
        );
        assert_eq!(refused.headers["content-type"], "text/plain; charset=utf-8");
        assert!(refused.headers.get("metadata-flavor").is_none(), "{path}: a refusal carries no Metadata-Flavor");
    }
    let email = metadata_get(&world, &format!("{SERVICE_ACCOUNTS}/email"), true).await;
    assert_eq!(email.status, StatusCode::OK);
    assert_eq!(email.text(), GSA);
    assert_eq!(email.headers["metadata-flavor"], "Google");
    assert_eq!(email.headers["server"], "GKE Metadata Server");

    // The sidecar sends the header on each call: metadata and impersonation (/token) alike.
    let mut env = world.env(&format!("fn={FUNCTION_URL}"));
    let sidecar = Sidecar::start(&env);
    env.retain(|(k, _)| k != "WIPROXY_EXPECTED_SERVICE_ACCOUNT");
    env.push(("WIPROXY_CREDENTIALS".into(), format!("impersonate:{IMPERSONATED_GSA}")));
    let impersonating = Sidecar::start(&env);
    let http = Http::new();
    for sidecar in [&sidecar, &impersonating] {
        assert_eq!(wait_ready(&http, sidecar, READY).await.status, StatusCode::OK, "{}", sidecar.log());
        assert_eq!(http.get(&sidecar.url("/fn/x")).await.status, StatusCode::OK);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unannotated_ksa_gets_access_tokens_and_the_pool_as_email_but_no_identity_token() {
    let world = World::start().await;
    world.google.set_ksa(KsaMapping::Unannotated);
    let email = metadata_get(&world, &format!("{SERVICE_ACCOUNTS}/email"), true).await;
    assert_eq!(email.text(), "client-project.svc.id.goog");
    let token = metadata_get(&world, &format!("{SERVICE_ACCOUNTS}/token"), true).await;
    assert_eq!(token.status, StatusCode::OK, "real GKE hands the KSA a federated access token");
    assert!(token.json()["access_token"].as_str().is_some_and(|t| t.starts_with("ya29.")));
    let identity = metadata_get(&world, &format!("{SERVICE_ACCOUNTS}/identity?audience=a"), true).await;
    assert_eq!(identity.status, StatusCode::NOT_FOUND);
    assert!(identity.text().contains("not annotated with a target Google service account"), "{}", identity.text());

    let sidecar = Sidecar::start(&world.env(&format!("fn={FUNCTION_URL}")));
    let http = Http::new();
    let readyz = wait_unready(&http, &sidecar, READY).await;
    assert_eq!(readyz.status, StatusCode::SERVICE_UNAVAILABLE);
    let reason = readyz.json()["upstreams"]["fn"]["reason"].as_str().unwrap_or_default().to_owned();
    assert!(
        reason.contains("404")
            && reason.contains("payments/orders-client is not annotated with a target Google service account"),
        "{}",
        readyz.text()
    );
    let reply = http.get(&sidecar.url("/fn/x")).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(world.function.requests(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_iam_binding_shows_gkes_message_in_readyz_and_in_every_503() {
    let world = World::start().await;
    world.google.set_ksa(KsaMapping::NoBinding(GSA.into()));
    for path in [format!("{SERVICE_ACCOUNTS}/token"), format!("{SERVICE_ACCOUNTS}/identity?audience=a")] {
        let refused = metadata_get(&world, &path, true).await;
        assert_eq!(refused.status, StatusCode::FORBIDDEN, "{path}");
        assert!(refused.text().starts_with(
            "Unable to generate access token; IAM returned 403 Forbidden: The caller does not have permission\n"
        ));
    }
    assert_eq!(metadata_get(&world, &format!("{SERVICE_ACCOUNTS}/email"), true).await.text(), GSA);

    let sidecar = Sidecar::start(&world.env(&format!("fn={FUNCTION_URL}")));
    let http = Http::new();
    let readyz = wait_unready(&http, &sidecar, READY).await;
    assert_eq!(readyz.status, StatusCode::SERVICE_UNAVAILABLE);
    let reason = readyz.json()["upstreams"]["fn"]["reason"].as_str().unwrap_or_default().to_owned();
    for words in [
        "403",
        "IAM returned 403 Forbidden: The caller does not have permission",
        "missing IAM policy binding on the target IAM service account",
        "https://cloud.google.com/kubernetes-engine/docs/how-to/workload-identity",
    ] {
        assert!(reason.contains(words), "{words:?} missing from {reason}");
    }
    for _ in 0..3 {
        let reply = http.get(&sidecar.url("/fn/x")).await;
        assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
        let reason = reply.json()["reason"].as_str().unwrap_or_default().to_owned();
        assert!(reason.contains("missing IAM policy binding"), "{reason}");
    }
    assert_eq!(world.function.requests(), 0, "fail closed");

    // A GSA that does not exist: IAM's 404, also a configuration error.
    world.google.set_ksa(KsaMapping::MissingGsa(GSA.into()));
    let sidecar = Sidecar::start(&world.env(&format!("fn={FUNCTION_URL}")));
    let readyz = wait_unready(&http, &sidecar, READY).await;
    assert!(readyz.text().contains("IAM returned 404 Not Found: Requested entity was not found."), "{}", readyz.text());
}

/// A JWT-bearer assertion signed with the fixture key, with `change` applied to its claims.
fn assertion(change: serde_json::Value) -> String {
    let key: serde_json::Value = serde_json::from_str(SERVICE_ACCOUNT_KEY).expect("fixture key");
    let signer = Signer::from_pem(key["private_key"].as_str().unwrap_or_default(), "sa").expect("RSA key");
    let iat = wiproxy_tests::jwt::now();
    let mut claims = serde_json::json!({
        "iss": KEY_FILE_GSA,
        "sub": KEY_FILE_GSA,
        "aud": OAUTH_TOKEN_URI,
        "iat": iat,
        "exp": iat + 3600,
        "target_audience": "https://onprem.example.com",
    });
    for (name, value) in change.as_object().into_iter().flatten() {
        claims[name] = value.clone();
    }
    signer.sign(&claims)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_oauth_endpoint_refuses_a_foreign_audience_and_an_assertion_longer_than_an_hour() {
    let world = World::start().await;
    let exchange = |assertion: String| {
        let form =
            url_form(&[("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"), ("assertion", &assertion)]);
        let request = Request::post("/token")
            .header("content-type", "application/x-www-form-urlencoded")
            .body(Full::new(Bytes::from(form)))
            .expect("request");
        https_send(world.googleapis, "oauth2.googleapis.com", request, world.ca.client_config())
    };
    let accepted = exchange(assertion(serde_json::json!({}))).await.expect("answer");
    assert_eq!(accepted.status, StatusCode::OK, "{}", accepted.text());
    assert!(accepted.json()["id_token"].is_string());

    let iat = wiproxy_tests::jwt::now();
    let cases = [
        (
            serde_json::json!({"aud": "https://www.googleapis.com/oauth2/v4/token"}),
            "Invalid JWT: Failed audience check.",
        ),
        (serde_json::json!({"aud": "https://onprem.example.com"}), "Invalid JWT: Failed audience check."),
        (serde_json::json!({"exp": iat + 3601}), "Invalid JWT: Token must be a short-lived token (60 minutes)"),
        (serde_json::json!({"iat": iat - 600, "exp": iat + 3600}), "Invalid JWT: Token must be a short-lived token"),
        (serde_json::json!({"exp": iat - 1, "iat": iat - 100}), "Invalid JWT: Token must be a short-lived token"),
        (serde_json::json!({"iat": iat + 3600, "exp": iat + 3700}), "Invalid JWT: Token must be a short-lived token"),
    ];
    for (change, words) in cases {
        let refused = exchange(assertion(change.clone())).await.expect("answer");
        assert_eq!(refused.status, StatusCode::BAD_REQUEST, "{change}");
        assert_eq!(refused.json()["error"], "invalid_grant", "{change}");
        assert!(
            refused.json()["error_description"].as_str().is_some_and(|d| d.starts_with(words)),
            "{change}: {}",
            refused.text()
        );
    }
}

fn url_form(pairs: &[(&str, &str)]) -> String {
    url::form_urlencoded::Serializer::new(String::new()).extend_pairs(pairs).finish()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_endpoint_hands_out_the_upstreams_token() {
    let world = World::start().await;
    let sidecar = Sidecar::start(&world.env(&format!("fn={FUNCTION_URL},run=https://{RUN_HOST}")));
    let http = Http::new();
    assert_eq!(wait_ready(&http, &sidecar, Duration::from_secs(15)).await.status, StatusCode::OK);
    let reply = http.token(&sidecar.url("/_wiproxy/token?upstream=run")).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.headers["cache-control"], "no-store");
    let claims = world.google.verifier().verify(reply.text().trim()).expect("a signed token");
    assert_eq!(claims["aud"], format!("https://{RUN_HOST}"));
    assert_eq!(claims["email"], GSA);
    assert_eq!(http.token(&sidecar.url("/_wiproxy/token?upstream=other")).await.status, StatusCode::NOT_FOUND);
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
