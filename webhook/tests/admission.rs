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
async fn a_review_whose_bytes_do_not_fit_the_budget_gets_503_at_once() {
    let mut state = state();
    state.body_timeout = std::time::Duration::from_secs(30);
    // Other reviews hold all of the budget but 1 KiB.
    let budget = state.review_budget.clone();
    let held = budget.clone().acquire_many_owned(budget.available_permits() as u32 - 1).await.expect("budget");
    let review = support::review_fixture().to_string();
    assert!(review.len() > 1024, "the fixture is larger than what is left");
    let started = std::time::Instant::now();
    let (status, answer) = post(&state, review.clone()).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(started.elapsed() < std::time::Duration::from_secs(5), "refused at once, not after the body timeout");
    let message = answer["error"].as_str().expect("error");
    assert!(message.contains("MiB of reviews at once"), "{message}");
    // A review that fits in what is left is read.
    let (status, _) = post(&state, Body::from("{}")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "a small body is read and refused as malformed, not kept waiting");
    drop(held);
    assert_eq!(post(&state, review).await.0, StatusCode::OK);
    assert_eq!(budget.available_permits(), wiproxy_webhook::server::REVIEW_BUDGET_BYTES / 1024, "all returned");
}

/// A body that declares `declared` bytes, sends `sent` of them, then stalls.
fn stalled_body(declared: usize, sent: usize) -> Request<Body> {
    use futures_util::StreamExt;
    let first = futures_util::stream::iter((sent > 0).then(|| Ok::<_, std::io::Error>(vec![b' '; sent])));
    let body = Body::from_stream(first.chain(futures_util::stream::pending()));
    Request::post("/mutate")
        .header("content-type", "application/json")
        .header("content-length", declared.to_string())
        .body(body)
        .expect("request")
}

#[tokio::test]
async fn the_budget_is_charged_by_bytes_received_not_by_declared_lengths() {
    let mut state = state();
    state.body_timeout = std::time::Duration::from_secs(30);
    let total = state.review_budget.available_permits();
    // Eight bodies declare the largest size and send nothing: together twice the budget.
    let mut stalled = Vec::new();
    for _ in 0..8 {
        stalled.push(tokio::spawn(router(state.clone()).oneshot(stalled_body(MAX_BODY_BYTES, 0))));
    }
    // One more has sent 1 MiB of its 4: it holds that much, no more.
    stalled.push(tokio::spawn(router(state.clone()).oneshot(stalled_body(MAX_BODY_BYTES, 1024 * 1024))));
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert_eq!(state.review_budget.available_permits(), total - 1024, "only the bytes sent are held");
    for _ in 0..5 {
        let review = post(&state, support::review_fixture().to_string());
        let (status, answer) =
            tokio::time::timeout(std::time::Duration::from_secs(2), review).await.expect("answered without waiting");
        assert_eq!(status, StatusCode::OK);
        assert_eq!(answer["response"]["allowed"], true);
    }
    for request in stalled {
        request.abort();
        let _ = request.await;
    }
    assert_eq!(state.review_budget.available_permits(), total, "a body that ends gives back what it held");
}

/// `count` copies of `entry`, as a JSON array.
fn repeated(entry: &str, count: usize) -> Value {
    serde_json::from_str(&format!("[{}]", vec![entry; count].join(","))).expect("JSON array")
}

#[tokio::test]
async fn objects_past_the_review_limits_are_denied_while_scanned_before_any_typed_parse() {
    let state = state();
    // Volumes that are no Volume at all: the typed parse would say `invalid type`; the scan
    // refuses on the count first, so the refusal names the limit.
    let volumes = with(support::review_fixture(), "/request/object/spec/volumes", repeated(r#"{"name":5}"#, 300_000));
    let body = volumes.to_string();
    assert!(body.len() < MAX_BODY_BYTES);
    let (status, answer) = post(&state, body).await;
    assert_eq!(status, StatusCode::OK, "a refusal is an AdmissionReview, not an HTTP error");
    assert_eq!(answer["response"]["allowed"], false);
    assert_eq!(answer["response"]["status"]["code"], 403);
    assert_eq!(
        answer["response"]["status"]["message"],
        "spec.volumes has 300000 entries, more than the 256 the webhook reads: combine volumes (one projected volume can hold many ConfigMaps, Secrets and tokens), or split the workload"
    );

    // The env shape: 240,000 `{"name":"A"}` in one container.
    let env =
        with(support::review_fixture(), "/request/object/spec/containers/0/env", repeated(r#"{"name":"A"}"#, 240_000));
    let (_, answer) = post(&state, env.to_string()).await;
    let message = answer["response"]["status"]["message"].as_str().expect("message");
    assert!(message.starts_with("spec.containers[0].env has 240000 entries, more than the 1024"), "{message}");

    // A workload padded with empty arrays where no one looks.
    let text = std::fs::read_to_string("tests/golden/deployment-plain/input.yaml").expect("golden input");
    let mut deployment: Value = serde_saphyr::from_str(&text).expect("YAML");
    deployment["spec"]["x-padding"] = repeated("[]", 1_000_000);
    let answer = post_to(&state, "/validate", workload_review(&deployment, "CREATE").to_string()).await;
    assert_eq!(answer["response"]["allowed"], false);
    let message = answer["response"]["status"]["message"].as_str().expect("message");
    assert!(
        message
            .starts_with("request.object holds more than 100000 JSON values (the limit is reached at spec.x-padding["),
        "{message}"
    );

    // At the limits, the pod is read and injected as usual.
    let at_limit =
        with(support::review_fixture(), "/request/object/spec/containers/0/env", repeated(r#"{"name":"A"}"#, 1024));
    let (_, answer) = post(&state, at_limit.to_string()).await;
    assert_eq!(answer["response"]["allowed"], true, "{answer}");
    assert!(answer["response"]["patch"].is_string());
}

/// An UPDATE of `old` into `new`, as the API server sends it for a labelled pod.
fn pod_update(old: &Value, new: &Value) -> Value {
    let review = with(support::review_fixture(), "/request/operation", json!("UPDATE"));
    let review = with(review, "/request/oldObject", old.clone());
    with(review, "/request/object", new.clone())
}

#[tokio::test]
async fn pod_updates_that_change_wiproxy_annotations_of_an_injected_pod_are_denied() {
    let state = state();
    let review = support::review_fixture();
    let (_, response) = post(&state, review.to_string()).await;
    let injected = support::apply_response_patch(&response, &review["request"]["object"]);
    let annotated = |key: &str, value: Value| with(injected.clone(), &format!("/metadata/annotations/{key}"), value);

    let denied = [
        (
            "changed",
            annotated("wiproxy.io~1upstreams", json!("orders=https://attacker.example/")),
            "annotation wiproxy.io/upstreams",
        ),
        ("added", annotated("wiproxy.io~1port", json!("16000")), "annotation wiproxy.io/port"),
        (
            "status removed",
            {
                let mut pod = injected.clone();
                pod["metadata"]["annotations"].as_object_mut().expect("annotations").remove("wiproxy.io/status");
                pod
            },
            "annotation wiproxy.io/status",
        ),
        (
            "all removed",
            with(injected.clone(), "/metadata/annotations", json!(null)),
            "annotations wiproxy.io/status, wiproxy.io/upstreams",
        ),
    ];
    for (what, new, named) in denied {
        let (status, answer) = post(&state, pod_update(&injected, &new).to_string()).await;
        assert_eq!(status, StatusCode::OK, "{what}");
        assert_eq!(answer["response"]["allowed"], false, "{what}");
        let message = answer["response"]["status"]["message"].as_str().expect("message");
        assert!(message.starts_with(&format!("{named} of an injected pod cannot change")), "{what}: {message}");
        assert!(message.contains("pod template"), "{what}: the fix is named: {message}");
    }

    let mut not_injected = review["request"]["object"].clone();
    not_injected["metadata"]["annotations"]["wiproxy.io/status"] = json!("{}");
    let allowed = [
        ("a label", injected.clone(), with(injected.clone(), "/metadata/labels/tier", json!("gold"))),
        ("another annotation", injected.clone(), annotated("example.com~1owner", json!("team-a"))),
        ("the same annotations", injected.clone(), injected.clone()),
        (
            "a pod that was never injected",
            review["request"]["object"].clone(),
            with(review["request"]["object"].clone(), "/metadata/annotations/wiproxy.io~1port", json!("16000")),
        ),
        (
            "a status without the sidecar",
            not_injected.clone(),
            with(not_injected, "/metadata/annotations/wiproxy.io~1port", json!("16000")),
        ),
    ];
    for (what, old, new) in allowed {
        let (status, answer) = post(&state, pod_update(&old, &new).to_string()).await;
        assert_eq!(status, StatusCode::OK, "{what}");
        assert_eq!(answer["response"]["allowed"], true, "{what}: {answer}");
        assert!(answer["response"].get("patch").is_none(), "{what}: no patch");
    }

    // The status subresource is never judged (the chart does not send it; if it came, it passes).
    let status_update = with(
        pod_update(&injected, &annotated("wiproxy.io~1upstreams", json!("x"))),
        "/request/subResource",
        json!("status"),
    );
    let (_, answer) = post(&state, status_update.to_string()).await;
    assert_eq!(answer["response"]["allowed"], true);
}
