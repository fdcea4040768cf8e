//! The upstream grammar on arbitrary annotation text (a quick run of the `upstreams` fuzz
//! target's property): it parses or fails with an error, and what parses keeps its promises.

use proptest::prelude::*;
use wiproxy_common::{parse_upstreams, MAX_UPSTREAMS};

fn entry() -> impl Strategy<Value = String> {
    let name = prop::sample::select(vec!["orders", "a", "-x", "_token", "UP", "orders", "b-2", ""]);
    let url = prop::sample::select(vec![
        "https://fn.example.com/orders",
        "http://fn.example.com",
        "https://run.example.com",
        "https://[::1]:8443/x",
        "https://h/%2e%2e",
        "ftp://x",
        "",
    ]);
    let option = prop::sample::select(vec![
        "",
        ";audience=https://aud",
        ";header=authorization",
        ";header=bad",
        ";listen=15090",
        ";listen=0",
        ";x",
    ]);
    (name, url, option).prop_map(|(n, u, o)| format!("{n}={u}{o}"))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_text_never_panics(text in ".{0,200}") {
        let _ = parse_upstreams(&text);
    }

    #[test]
    fn what_parses_keeps_the_grammar(entries in prop::collection::vec(entry(), 0..40), newline in any::<bool>()) {
        let text = entries.join(if newline { "\n" } else { "," });
        if let Ok(upstreams) = parse_upstreams(&text) {
            prop_assert!(upstreams.len() <= MAX_UPSTREAMS);
            let mut names: Vec<_> = upstreams.iter().map(|u| u.name.as_str()).collect();
            names.sort_unstable();
            names.dedup();
            prop_assert_eq!(names.len(), upstreams.len());
            for upstream in &upstreams {
                prop_assert_eq!(upstream.parsed.scheme(), "https");
                prop_assert!(!upstream.name.starts_with('_') && !upstream.name.starts_with('-'));
            }
        }
    }
}
