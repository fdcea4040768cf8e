//! A quick run of the admission fuzz target's properties on the API server's review with
//! generated annotations: no panic, a denied pod is never patched, and injecting the injected
//! pod again changes nothing.

mod support;

use base64::Engine;
use proptest::prelude::*;
use serde_json::{json, Value};
use wiproxy_webhook::admission::answer;
use wiproxy_webhook::review::Endpoint;

fn upstreams() -> impl Strategy<Value = String> {
    let entry = prop::sample::select(vec![
        "orders=https://europe-west1-host-project.cloudfunctions.net/orders",
        "inventory=https://inventory-abc123-ew.a.run.app",
        "inventory=https://inventory-abc123-ew.a.run.app/v1;header=x-serverless-authorization",
        "grpc=https://inventory-abc123-ew.a.run.app;listen=15090",
        "evil=https://evil.example.com/",
        "orders=http://europe-west1-host-project.cloudfunctions.net/orders",
        "aud=https://europe-west1-host-project.cloudfunctions.net/orders;audience=https://other.example.com",
        "Bad Name=https://x",
        "",
    ]);
    prop::collection::vec(entry, 0..5).prop_map(|entries| entries.join(","))
}

fn review_with(upstreams: &str, gsa: &str, port: &str) -> Value {
    let mut review = support::review_fixture();
    let annotations = &mut review["request"]["object"]["metadata"]["annotations"];
    annotations["wiproxy.io/upstreams"] = json!(upstreams);
    if !gsa.is_empty() {
        annotations["wiproxy.io/service-account"] = json!(gsa);
    }
    if !port.is_empty() {
        annotations["wiproxy.io/port"] = json!(port);
    }
    review
}

fn patch_of(response: &Value) -> Option<json_patch::Patch> {
    let encoded = response["response"].get("patch")?.as_str()?;
    let bytes = base64::engine::general_purpose::STANDARD.decode(encoded).expect("patch is base64");
    Some(serde_json::from_slice(&bytes).expect("patch is a JSON patch"))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn denied_pods_are_never_patched_and_injection_is_idempotent(
        upstreams in upstreams(),
        gsa in prop::sample::select(vec!["", "invoker@client-project.iam.gserviceaccount.com", "other@evil.iam.gserviceaccount.com", "not-an-email"]),
        port in prop::sample::select(vec!["", "15080", "8080", "0", "x"]),
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
        let webhook = support::webhook();
        let review = review_with(&upstreams, gsa, port);
        let body = serde_json::to_vec(&review).expect("serializes");
        let (response, _) = runtime.block_on(answer(&webhook, Endpoint::Mutate, &body)).expect("a review");
        let response: Value = serde_json::from_slice(&response).expect("the answer is JSON");
        let patch = patch_of(&response);
        if response["response"]["allowed"] == json!(false) {
            prop_assert!(patch.is_none(), "a denied pod carries a patch");
            return Ok(());
        }
        let Some(patch) = patch else { return Ok(()) };
        let mut again = review.clone();
        json_patch::patch(&mut again["request"]["object"], &patch).expect("the patch applies");
        let body = serde_json::to_vec(&again).expect("serializes");
        let (response, _) = runtime.block_on(answer(&webhook, Endpoint::Mutate, &body)).expect("a review");
        let response: Value = serde_json::from_slice(&response).expect("the answer is JSON");
        prop_assert_eq!(&response["response"]["allowed"], &json!(true));
        prop_assert!(patch_of(&response).is_none(), "injecting the injected pod changed it again");
    }
}
