//! Path normalisation: `climbs_out` never panics, and a path it lets through stays inside its
//! start under the plain RFC 3986 reading of the decoded path too.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|path: &str| {
    if !wiproxy_sidecar::routes::climbs_out(path) {
        assert!(wiproxy_sidecar::routes::stays_inside_decoded(path), "{path:?} let through but climbs out");
    }
});
