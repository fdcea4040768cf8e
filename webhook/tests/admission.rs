//! The admission endpoint without sockets: review bodies in, AdmissionReviews or JSON errors out.

mod support;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use k8s_openapi::api::core::v1::Pod;
use serde_json::{json, Value};
use tower::ServiceExt;
use wiproxy_webhook::server::{admin_router, router, AppState, MAX_BODY_BYTES};

async fn post(state: &AppState, body: impl Into<Body>) -> (StatusCode, Value) {
    let request =
        Request::post("/mutate").header("content-type", "application/json").body(body.into()).expect("request");
    let response = router(state.clone()).oneshot(request).await.expect("router answers");
    let status = response.status();
    let bytes = response.into_body().collect().await.expect("body").to_bytes();
    let value =
        serde_json::from_slice(&bytes).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()));
    (status, value)
}

fn state() -> AppState {
    AppState::new(support::webhook())
}

/// `review` with the value at `pointer` set; the parent must exist.
fn with(mut review: Value, pointer: &str, value: Value) -> Value {
    let (parent, last) = pointer.rsplit_once('/').expect("a pointer");
    let key = last.replace("~1", "/").replace("~0", "~");
    match review.pointer_mut(parent).unwrap_or_else(|| panic!("{parent} exists")) {
        Value::Object(map) => {
            map.insert(key, value);
        }
        other => panic!("{parent} is {other}, not an object"),
    }
    review
}

#[tokio::test]
async fn injects_a_pod_like_render_does() {
    let state = state();
    let review = support::review_fixture();
    let (status, response) = post(&state, review.to_string()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(response["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(response["kind"], "AdmissionReview");
    assert_eq!(response["response"]["uid"], review["request"]["uid"]);
    assert_eq!(response["response"]["allowed"], true);
    let object = &review["request"]["object"];
    let patched = support::apply_response_patch(&response, object);
    let pod: Pod = serde_json::from_value(patched.clone()).expect("patched object is a Pod");
    let spec = pod.spec.expect("spec");
    let init = spec.init_containers.expect("init containers");
    assert_eq!(init[0].name, "wiproxy");
    assert_eq!(init[0].restart_policy.as_deref(), Some("Always"));
    assert_eq!(spec.containers.len(), 1, "the app container is kept, the sidecar is native");
    assert_eq!(patched["spec"], support::render_pod(object)["spec"]);
    assert_eq!(patched["metadata"], support::render_pod(object)["metadata"]);
}

#[tokio::test]
async fn denial_is_an_admission_response_naming_the_fix() {
    let review = with(
        support::review_fixture(),
        "/request/object/metadata/annotations/wiproxy.io~1service-account",
        json!("admin@host-project.iam.gserviceaccount.com"),
    );
    let (status, response) = post(&state(), review.to_string()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(response["response"]["allowed"], false);
    assert_eq!(response["response"]["status"]["code"], 403);
    let message = response["response"]["status"]["message"].as_str().expect("message");
    assert!(
        message.contains("admin@host-project.iam.gserviceaccount.com") && message.contains("spec.serviceAccounts"),
        "{message}"
    );
    assert!(response["response"].get("patch").is_none());
}

#[tokio::test]
async fn warnings_travel_in_the_response() {
    let review = with(
        support::review_fixture(),
        "/request/object/metadata/annotations/wiproxy.io~1upstreams",
        json!("fns=https://europe-west1-host-project.cloudfunctions.net/"),
    );
    let (_, response) = post(&state(), review.to_string()).await;
    assert_eq!(response["response"]["allowed"], true);
    let warnings = response["response"]["warnings"].as_array().expect("warnings");
    assert!(warnings[0].as_str().is_some_and(|w| w.contains("full function URL")), "{warnings:?}");
}

#[tokio::test]
async fn passes_through_what_is_not_for_it() {
    let state = state();
    let cases = [
        ("unlabelled pod", with(support::review_fixture(), "/request/object/metadata/labels", json!({"app": "x"}))),
        ("delete", with(support::review_fixture(), "/request/operation", json!("DELETE"))),
        (
            "configmap",
            with(
                with(
                    support::review_fixture(),
                    "/request/kind",
                    json!({"group": "", "version": "v1", "kind": "ConfigMap"}),
                ),
                "/request/object",
                json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}, "data": {"a": "b"}}),
            ),
        ),
        (
            "already injected",
            with(
                with(
                    support::review_fixture(),
                    "/request/object/metadata/annotations/wiproxy.io~1status",
                    json!("{\"version\":\"0.1.0\"}"),
                ),
                "/request/object/spec/initContainers",
                json!([{"name": "wiproxy", "image": "ghcr.io/wiproxy/wiproxy:0.1.0", "restartPolicy": "Always"}]),
            ),
        ),
    ];
    for (what, review) in cases {
        let (status, response) = post(&state, review.to_string()).await;
        assert_eq!(status, StatusCode::OK, "{what}");
        assert_eq!(response["response"]["allowed"], true, "{what}");
        assert!(response["response"].get("patch").is_none(), "{what}: no patch");
    }
}

#[tokio::test]
async fn dry_run_injects_the_same() {
    let review = with(support::review_fixture(), "/request/dryRun", json!(true));
    let (_, response) = post(&state(), review.to_string()).await;
    assert_eq!(response["response"]["allowed"], true);
    assert!(response["response"]["patch"].is_string());
}

#[tokio::test]
async fn malformed_bodies_get_clear_answers() {
    let state = state();
    let fixture = support::review_fixture();
    let mut no_uid = fixture.clone();
    no_uid["request"].as_object_mut().expect("request").remove("uid");
    let mut no_request = fixture.clone();
    no_request.as_object_mut().expect("review").remove("request");
    let huge = format!("orders=https://europe-west1-host-project.cloudfunctions.net/orders,{}", "x".repeat(40 * 1024));

    // (what, body, expected HTTP status, text the error or denial must contain)
    let cases: Vec<(&str, Vec<u8>, StatusCode, &str)> = vec![
        ("empty body", vec![], StatusCode::BAD_REQUEST, "not JSON"),
        ("truncated JSON", fixture.to_string().as_bytes()[..200].to_vec(), StatusCode::BAD_REQUEST, "not JSON"),
        ("not UTF-8", vec![0xff, 0xfe, 0x00], StatusCode::BAD_REQUEST, "not JSON"),
        ("JSON array", b"[1,2]".to_vec(), StatusCode::BAD_REQUEST, "array"),
        (
            "v1beta1 review",
            with(fixture.clone(), "/apiVersion", json!("admission.k8s.io/v1beta1")).to_string().into_bytes(),
            StatusCode::BAD_REQUEST,
            "admission.k8s.io/v1beta1/AdmissionReview",
        ),
        (
            "wrong kind",
            with(fixture.clone(), "/kind", json!("Pod")).to_string().into_bytes(),
            StatusCode::BAD_REQUEST,
            "send apiVersion admission.k8s.io/v1",
        ),
        ("missing request", no_request.to_string().into_bytes(), StatusCode::BAD_REQUEST, "no request"),
        (
            "null request",
            with(fixture.clone(), "/request", Value::Null).to_string().into_bytes(),
            StatusCode::BAD_REQUEST,
            "no request",
        ),
        ("request without uid", no_uid.to_string().into_bytes(), StatusCode::BAD_REQUEST, "uid"),
        (
            "request is a string",
            with(fixture.clone(), "/request", json!("pod")).to_string().into_bytes(),
            StatusCode::BAD_REQUEST,
            "malformed",
        ),
        (
            "object is not a pod",
            with(fixture.clone(), "/request/object/spec/containers", json!("app")).to_string().into_bytes(),
            StatusCode::OK,
            "not a valid Pod",
        ),
        (
            "object missing on CREATE",
            with(fixture.clone(), "/request/object", Value::Null).to_string().into_bytes(),
            StatusCode::OK,
            "request.object is missing",
        ),
        (
            "huge annotation",
            with(fixture.clone(), "/request/object/metadata/annotations/wiproxy.io~1upstreams", json!(huge))
                .to_string()
                .into_bytes(),
            StatusCode::OK,
            "more than the 32768 allowed",
        ),
        (
            "labelled pod without upstreams",
            with(fixture.clone(), "/request/object/metadata/annotations", json!({})).to_string().into_bytes(),
            StatusCode::OK,
            "annotation wiproxy.io/upstreams is missing",
        ),
        ("body over the limit", vec![b' '; MAX_BODY_BYTES + 1], StatusCode::PAYLOAD_TOO_LARGE, "larger than"),
    ];
    assert!(cases.len() >= 10);
    for (what, body, expected_status, expected_text) in cases {
        let (status, response) = post(&state, body).await;
        assert_eq!(status, expected_status, "{what}: {response}");
        let text = if status == StatusCode::OK {
            assert_eq!(response["response"]["allowed"], false, "{what}");
            assert_eq!(response["response"]["uid"], fixture["request"]["uid"], "{what}: uid echoed");
            response["response"]["status"]["message"].as_str().unwrap_or_default().to_owned()
        } else {
            response["error"].as_str().unwrap_or_else(|| panic!("{what}: JSON error body, got {response}")).to_owned()
        };
        assert!(text.contains(expected_text), "{what}: {text:?} lacks {expected_text:?}");
    }
}

#[tokio::test]
async fn other_routes_and_methods() {
    let state = state();
    let get = Request::get("/mutate").body(Body::empty()).expect("request");
    let response = router(state.clone()).oneshot(get).await.expect("answer");
    assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
    let other = Request::post("/validate-nothing").body(Body::empty()).expect("request");
    let response = router(state.clone()).oneshot(other).await.expect("answer");
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn admin_port_reports_health_readiness_and_metrics() {
    let state = state();
    post(&state, support::review_fixture().to_string()).await;
    post(&state, "{").await;
    let get = |path: &str| Request::get(path).body(Body::empty()).expect("request");
    let admin = admin_router(state.clone());
    assert_eq!(admin.clone().oneshot(get("/healthz")).await.expect("answer").status(), StatusCode::OK);
    assert_eq!(admin.clone().oneshot(get("/readyz")).await.expect("answer").status(), StatusCode::OK);
    let metrics = admin.clone().oneshot(get("/metrics")).await.expect("answer");
    let text =
        String::from_utf8(metrics.into_body().collect().await.expect("body").to_bytes().to_vec()).expect("utf-8");
    assert!(
        text.contains(r#"wiproxy_webhook_reviews_total{webhook="mutate",result="injected",reason=""} 1"#),
        "{text}"
    );
    assert!(
        text.contains(r#"wiproxy_webhook_reviews_total{webhook="mutate",result="error",reason="not_json"} 1"#),
        "{text}"
    );
    assert!(text.contains("wiproxy_webhook_review_duration_seconds_count 2"), "{text}");
    state.draining.store(true, std::sync::atomic::Ordering::Relaxed);
    assert_eq!(admin.oneshot(get("/readyz")).await.expect("answer").status(), StatusCode::SERVICE_UNAVAILABLE);
}

/// An AdmissionReview for `object`, as the API server sends it to the validating webhook.
fn workload_review(object: &Value, operation: &str) -> Value {
    let api_version = object["apiVersion"].as_str().expect("apiVersion");
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    let kind = object["kind"].as_str().expect("kind");
    let resource = format!("{}s", kind.to_lowercase());
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "8f1c1c34-35f4-4b4e-9f0c-2c4e1a1b0a01",
            "kind": {"group": group, "version": version, "kind": kind},
            "resource": {"group": group, "version": version, "resource": resource},
            "name": object["metadata"]["name"],
            "namespace": "payments",
            "operation": operation,
            "userInfo": {"username": "alice@example.com", "groups": ["system:authenticated"]},
            "object": object,
            "oldObject": null,
            "dryRun": false,
        }
    })
}

async fn post_to(state: &AppState, path: &str, body: String) -> Value {
    let request =
        Request::post(path).header("content-type", "application/json").body(Body::from(body)).expect("request");
    let response = router(state.clone()).oneshot(request).await.expect("router answers");
    assert_eq!(response.status(), StatusCode::OK);
    let bytes = response.into_body().collect().await.expect("body").to_bytes();
    serde_json::from_slice(&bytes).expect("JSON")
}

#[tokio::test]
async fn validation_checks_every_workload_kind_like_injection_does() {
    let state = state();
    let cases = ["deployment-plain", "statefulset", "daemonset", "replicaset", "job", "cronjob"];
    for case in cases {
        let text = std::fs::read_to_string(format!("tests/golden/{case}/input.yaml")).expect("golden input");
        let object: Value = serde_saphyr::from_str(&text).expect("YAML");
        let kind = object["kind"].as_str().unwrap_or_default().to_owned();

        let allowed = post_to(&state, "/validate", workload_review(&object, "CREATE").to_string()).await;
        assert_eq!(allowed["response"]["allowed"], true, "{kind}: {allowed}");
        assert!(allowed["response"].get("patch").is_none(), "{kind}: validation never patches");

        // The same workload with a plain-http upstream fails the apply with the webhook's message.
        let bad_text = text.replace("=https://", "=http://");
        let bad: Value = serde_saphyr::from_str(&bad_text).expect("YAML");
        let denied = post_to(&state, "/validate", workload_review(&bad, "UPDATE").to_string()).await;
        assert_eq!(denied["response"]["allowed"], false, "{kind}: {denied}");
        let message = denied["response"]["status"]["message"].as_str().unwrap_or_default();
        assert!(
            message.starts_with("annotation wiproxy.io/upstreams: upstream") && message.contains("is not https"),
            "{kind}: {message}"
        );

        // Deleting is never blocked.
        let deleted = post_to(&state, "/validate", workload_review(&bad, "DELETE").to_string()).await;
        assert_eq!(deleted["response"]["allowed"], true, "{kind}");
    }

    // A workload without the label, and objects that are not workloads, pass.
    let text = std::fs::read_to_string("tests/golden/deployment-plain/input.yaml").expect("golden input");
    let unlabelled =
        text.replace("wiproxy.io/inject: \"true\"", "wiproxy.io/inject: \"false\"").replace("=https://", "=http://");
    let object: Value = serde_saphyr::from_str(&unlabelled).expect("YAML");
    let answer = post_to(&state, "/validate", workload_review(&object, "CREATE").to_string()).await;
    assert_eq!(answer["response"]["allowed"], true);
    let config_map = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}});
    let answer = post_to(&state, "/validate", workload_review(&config_map, "CREATE").to_string()).await;
    assert_eq!(answer["response"]["allowed"], true);
}

#[tokio::test]
async fn validation_denies_a_forbidden_service_account_at_apply_time() {
    let state = state();
    let text = std::fs::read_to_string("tests/golden/policy-denies-gsa/input.yaml").expect("golden input");
    let object: Value = serde_saphyr::from_str(&text).expect("YAML");
    let answer = post_to(&state, "/validate", workload_review(&object, "CREATE").to_string()).await;
    assert_eq!(answer["response"]["allowed"], false);
    let expected = std::fs::read_to_string("tests/golden/policy-denies-gsa/stderr.txt").expect("golden denial");
    let message = answer["response"]["status"]["message"].as_str().unwrap_or_default();
    assert!(expected.contains(message), "the apply-time message equals render's:\n{message}\n{expected}");
}

#[tokio::test]
async fn reviews_past_the_memory_budget_wait_for_it_then_get_503() {
    let mut state = state();
    state.body_timeout = std::time::Duration::from_millis(300);
    // Other reviews hold all of the budget but 1 KiB.
    let budget = state.review_budget.clone();
    let held = budget.clone().acquire_many_owned(budget.available_permits() as u32 - 1).await.expect("budget");
    let review = support::review_fixture().to_string();
    assert!(review.len() > 1024, "the fixture is larger than what is left");
    let (status, answer) = post(&state, review.clone()).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    let message = answer["error"].as_str().expect("error");
    assert!(message.contains("MiB of reviews at once"), "{message}");
    // A review that fits in what is left does not wait.
    let (status, _) = post(&state, Body::from("{}")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "a small body is read and refused as malformed, not kept waiting");
    // Released while a review waits: it is answered.
    let mut patient = state.clone();
    patient.body_timeout = std::time::Duration::from_secs(30);
    let waiting = tokio::spawn(async move { post(&patient, review).await.0 });
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    drop(held);
    assert_eq!(waiting.await.expect("task"), StatusCode::OK);
    assert_eq!(budget.available_permits(), wiproxy_webhook::server::REVIEW_BUDGET_BYTES / 1024, "all returned");
}
