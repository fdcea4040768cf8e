//! Policy globs and URL matching: any policy text and any URL or email are matched without a
//! panic, and a `*` never crosses `@` or `.` in a service-account pattern.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wiproxy_webhook::policy::{Policy, TokenProxyPolicySpec};

fuzz_target!(|input: (&str, &str, &str, &str)| {
    let (account_pattern, upstream_pattern, subject, audience) = input;
    let spec = TokenProxyPolicySpec {
        namespace_selector: Default::default(),
        service_accounts: vec![account_pattern.to_owned()],
        upstreams: vec![upstream_pattern.to_owned()],
        audiences: vec![audience.to_owned()],
        default_service_account: None,
        manage_service_accounts: true,
        allow_default_ksa: false,
    };
    let Ok(policy) = Policy::from_spec("fuzz".into(), &spec) else { return };
    let _ = policy.allows_upstream(subject);
    let _ = policy.allows_audience(subject);
    if policy.allows_service_account(subject) && !account_pattern.contains('*') {
        assert!(subject.eq_ignore_ascii_case(account_pattern), "a pattern without * matches only itself");
    }
    if account_pattern == "*@client-project.iam.gserviceaccount.com" && policy.allows_service_account(subject) {
        let local = subject.split('@').next().unwrap_or_default();
        assert!(!local.contains('.') && !local.contains('@'), "* crossed a separator: {subject}");
    }
});
