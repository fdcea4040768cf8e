//! Admission bytes → response: raw bodies, and the fixture review with fuzzed annotations and
//! service account. No panic; a denied pod is never patched; injection is idempotent.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::json;

fuzz_target!(|input: (bool, &str, &str, &str)| {
    let (raw, upstreams, service_account, port) = input;
    let body = if raw {
        upstreams.as_bytes().to_vec()
    } else {
        let mut review = wiproxy_fuzz::review_fixture();
        let annotations = &mut review["request"]["object"]["metadata"]["annotations"];
        annotations["wiproxy.io/upstreams"] = json!(upstreams);
        annotations["wiproxy.io/service-account"] = json!(service_account);
        annotations["wiproxy.io/port"] = json!(port);
        serde_json::to_vec(&review).expect("serializes")
    };
    if let Err(e) = wiproxy_fuzz::review_checked(&body) {
        panic!("{e}");
    }
});
