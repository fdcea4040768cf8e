//! Self-signed mode against a mocked Kubernetes API: create-if-absent, losing the create race,
//! keeping a valid pair, renewing a due one, and the caBundle patches.

mod support;

use std::time::{Duration, SystemTime};

use base64::Engine;
use http::{Method, StatusCode};
use serde_json::{json, Value};
use support::api::{body_json, client, next, no_more_calls, reply};
use wiproxy_webhook::certs::{due, ensure, publish_ca, SelfSigned};
use wiproxy_webhook::tls::ReloadingCertificate;

const SECRET_PATH: &str = "/api/v1/namespaces/wiproxy-system/secrets/wiproxy-tls";

fn config() -> SelfSigned {
    SelfSigned {
        namespace: "wiproxy-system".into(),
        secret: "wiproxy-tls".into(),
        service: "wiproxy".into(),
        lifetime: Duration::from_secs(365 * 24 * 3600),
        webhook_configurations: vec!["wiproxy".into()],
    }
}

fn status(code: u16, reason: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason, "code": code, "message": reason})
}

fn b64(text: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(text)
}

fn secret_json(pair: &wiproxy_webhook::certs::Pair, version: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
        "metadata": {"name": "wiproxy-tls", "namespace": "wiproxy-system", "resourceVersion": version, "annotations": {
            "wiproxy.io/not-before": pair.not_before.to_string(), "wiproxy.io/not-after": pair.not_after.to_string(),
        }},
        "data": {"tls.crt": b64(&pair.cert_pem), "tls.key": b64(&pair.key_pem), "ca.crt": b64(&pair.ca_pem)},
    })
}

#[tokio::test]
async fn creates_the_secret_when_absent() {
    let (client, mut handle) = client();
    let calls = tokio::spawn(async move {
        let (request, send) = next(&mut handle).await;
        assert_eq!((request.method(), request.uri().path()), (&Method::GET, SECRET_PATH));
        reply(send, StatusCode::NOT_FOUND, status(404, "NotFound"));
        let (request, send) = next(&mut handle).await;
        assert_eq!(
            (request.method(), request.uri().path()),
            (&Method::POST, "/api/v1/namespaces/wiproxy-system/secrets")
        );
        let secret = body_json(request).await;
        assert_eq!(secret["type"], "kubernetes.io/tls");
        for key in ["tls.crt", "tls.key", "ca.crt"] {
            assert!(secret["data"][key].as_str().is_some_and(|v| !v.is_empty()), "{key}");
        }
        reply(send, StatusCode::CREATED, secret);
        no_more_calls(&mut handle).await;
    });
    let pair = ensure(&client, &config(), SystemTime::now()).await.expect("a pair");
    calls.await.expect("GET then POST");
    // The pair serves TLS, and the certificate names the Service.
    ReloadingCertificate::from_pem(pair.cert_pem.as_bytes(), pair.key_pem.as_bytes()).expect("a usable pair");
    assert!(config().dns_names().contains(&"wiproxy.wiproxy-system.svc".to_owned()));
    assert!(!due(&pair, SystemTime::now()));
}

#[tokio::test]
async fn a_replica_that_loses_the_create_race_serves_the_winners_pair() {
    let winner = config().generate(SystemTime::now()).expect("pair");
    let winner_json = secret_json(&winner, "7");
    let (client, mut handle) = client();
    let calls = tokio::spawn(async move {
        let (_, send) = next(&mut handle).await;
        reply(send, StatusCode::NOT_FOUND, status(404, "NotFound"));
        let (request, send) = next(&mut handle).await;
        assert_eq!(request.method(), Method::POST);
        reply(send, StatusCode::CONFLICT, status(409, "AlreadyExists"));
        let (request, send) = next(&mut handle).await;
        assert_eq!((request.method(), request.uri().path()), (&Method::GET, SECRET_PATH));
        reply(send, StatusCode::OK, winner_json);
        no_more_calls(&mut handle).await;
    });
    let pair = ensure(&client, &config(), SystemTime::now()).await.expect("a pair");
    assert_eq!(pair, winner, "every replica serves the same certificate");
    calls.await.expect("GET, POST (conflict), GET");
}

#[tokio::test]
async fn a_valid_pair_is_kept_and_a_due_one_replaced() {
    let now = SystemTime::now();
    let current = config().generate(now).expect("pair");
    let current_json = secret_json(&current, "11");
    let (client, mut handle) = client();
    let calls = tokio::spawn(async move {
        let (_, send) = next(&mut handle).await;
        reply(send, StatusCode::OK, current_json.clone());
        // The next call is the second ensure's read: nothing was written for the valid pair.
        // Eight months later, past two thirds of a year: replaced, bound to the version read.
        let (request, send) = next(&mut handle).await;
        assert_eq!((request.method(), request.uri().path()), (&Method::GET, SECRET_PATH));
        reply(send, StatusCode::OK, current_json);
        let (request, send) = next(&mut handle).await;
        assert_eq!((request.method(), request.uri().path()), (&Method::PUT, SECRET_PATH));
        let secret = body_json(request).await;
        assert_eq!(
            secret["metadata"]["resourceVersion"], "11",
            "an update that loses a race fails instead of overwriting"
        );
        reply(send, StatusCode::OK, secret);
    });
    assert_eq!(ensure(&client, &config(), now).await.expect("kept"), current);
    let later = now + Duration::from_secs(245 * 24 * 3600);
    assert!(due(&current, later));
    let renewed = ensure(&client, &config(), later).await.expect("renewed");
    assert_ne!(renewed.cert_pem, current.cert_pem);
    calls.await.expect("GET; then GET and PUT");
}

#[tokio::test]
async fn the_ca_goes_into_both_webhook_configurations_once() {
    let ca = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
    let (client, mut handle) = client();
    let configuration = |kind: &str, bundle: Option<String>| {
        let mut webhook = json!({
            "name": "inject.wiproxy.io", "admissionReviewVersions": ["v1"], "sideEffects": "None",
            "clientConfig": {"service": {"name": "wiproxy", "namespace": "wiproxy-system"}},
        });
        if let Some(bundle) = bundle {
            webhook["clientConfig"]["caBundle"] = json!(bundle);
        }
        json!({"apiVersion": "admissionregistration.k8s.io/v1", "kind": kind, "metadata": {"name": "wiproxy"}, "webhooks": [webhook]})
    };
    let (mutating, validating) = (
        configuration("MutatingWebhookConfiguration", None),
        configuration("ValidatingWebhookConfiguration", Some(b64(ca))),
    );
    let calls = tokio::spawn(async move {
        let (request, send) = next(&mut handle).await;
        assert_eq!(
            (request.method(), request.uri().path()),
            (&Method::GET, "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/wiproxy")
        );
        reply(send, StatusCode::OK, mutating.clone());
        let (request, send) = next(&mut handle).await;
        assert_eq!(request.method(), Method::PATCH);
        assert_eq!(request.headers()["content-type"], "application/json-patch+json");
        let patch = body_json(request).await;
        assert_eq!(patch, json!([{"op": "add", "path": "/webhooks/0/clientConfig/caBundle", "value": b64(ca)}]));
        reply(send, StatusCode::OK, mutating);
        // The validating configuration already carries the CA: read, not written.
        let (request, send) = next(&mut handle).await;
        assert_eq!(
            request.uri().path(),
            "/apis/admissionregistration.k8s.io/v1/validatingwebhookconfigurations/wiproxy"
        );
        reply(send, StatusCode::OK, validating);
        no_more_calls(&mut handle).await;
    });
    publish_ca(&client, &config(), ca).await.expect("published");
    calls.await.expect("GET, PATCH, GET");
}
