//! The sidecar's request routing: any method and request target, on the proxy port or an
//! upstream's own port, never yields a destination outside the configured upstream URLs.
#![no_main]

use http::{Method, Uri, Version};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (u8, bool, &str)| {
    let (method, h2, target) = input;
    let Ok(uri) = target.parse::<Uri>() else { return };
    let method = match method % 5 {
        0 => Method::GET,
        1 => Method::POST,
        2 => Method::CONNECT,
        3 => Method::DELETE,
        _ => Method::OPTIONS,
    };
    let version = if h2 { Version::HTTP_2 } else { Version::HTTP_11 };
    let routes = wiproxy_fuzz::routes();
    if let Ok(destination) = routes.resolve(&method, version, &uri) {
        wiproxy_fuzz::inside(routes, &destination).unwrap_or_else(|e| panic!("{target:?}: {e}"));
    }
    for index in 0..routes.iter().count() {
        if let Ok(destination) = routes.dedicated(index, &method, &uri) {
            wiproxy_fuzz::inside(routes, &destination).unwrap_or_else(|e| panic!("port {index} {target:?}: {e}"));
        }
    }
});
