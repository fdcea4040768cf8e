//! The upstream grammar: any annotation text parses or fails with an error, never panics, and
//! what parses keeps the grammar's promises.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    if let Ok(upstreams) = wiproxy_common::parse_upstreams(text) {
        assert!(upstreams.len() <= wiproxy_common::MAX_UPSTREAMS);
        for upstream in &upstreams {
            // `url` is the text as written; what is dialled is `parsed`, which must be https.
            assert_eq!(upstream.parsed.scheme(), "https", "{}", upstream.url);
            assert!(!upstream.name.is_empty() && upstream.name.len() <= 63);
            assert!(!upstream.audience.is_empty());
        }
        let mut names: Vec<_> = upstreams.iter().map(|u| &u.name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), upstreams.len(), "duplicate names parsed");
    }
});
