//! `TokenProxyPolicy`: which Google service accounts and which upstream URLs the pods of a
//! namespace may use, and how such a policy is evaluated.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::CustomResource;
use kube_core::{Selector, SelectorExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use wiproxy_common::{is_service_account_email, Upstream};

pub const API_VERSION: &str = "wiproxy.io/v1alpha1";
pub const KIND: &str = "TokenProxyPolicy";
/// The fields of `spec`, for catching typos in policy files (the API server prunes unknown fields).
pub const SPEC_FIELDS: [&str; 7] = [
    "namespaceSelector",
    "serviceAccounts",
    "upstreams",
    "audiences",
    "defaultServiceAccount",
    "manageServiceAccounts",
    "allowDefaultKsa",
];

fn yes() -> bool {
    true
}

/// Which Google service accounts the pods of some namespaces may act as, and which upstream URLs
/// they may call. A pod is allowed when one policy that selects its namespace allows its GSA and
/// every upstream.
#[derive(CustomResource, Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
#[kube(
    group = "wiproxy.io",
    version = "v1alpha1",
    kind = "TokenProxyPolicy",
    plural = "tokenproxypolicies",
    shortname = "tpp",
    status = "TokenProxyPolicyStatus",
    doc = "Which Google service accounts and upstream URLs the pods of the selected namespaces may use through wiproxy",
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].reason"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct TokenProxyPolicySpec {
    /// Namespaces the policy applies to; `{}` selects every namespace.
    pub namespace_selector: LabelSelector,
    /// GSA email patterns pods may act as, e.g. `*@client-project.iam.gserviceaccount.com`; `*`
    /// never crosses `@`, `.` or `/`.
    #[serde(default)]
    #[schemars(inner(regex(pattern = r"^[^@\s]+@[^@\s]+$")))]
    pub service_accounts: Vec<String>,
    /// Allowed upstream URL prefixes, matched on path-segment boundaries, e.g.
    /// `https://europe-west1-host-project.cloudfunctions.net/`; `*` as above.
    #[serde(default)]
    #[schemars(inner(regex(pattern = r"^https://[^\s?#]+$")))]
    pub upstreams: Vec<String>,
    /// Explicit token audiences (`;audience=` of an upstream) allowed besides those that
    /// `upstreams` matches as URLs, such as a Cloud Run service's custom audience; `*` as above.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(regex(pattern = r"^\S+$")))]
    pub audiences: Vec<String>,
    /// GSA for pods that name none and whose ServiceAccount carries no mapping.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[a-z0-9-]+@[a-z0-9.-]+\.gserviceaccount\.com$"))]
    pub default_service_account: Option<String>,
    /// Whether the webhook may annotate ServiceAccounts with their GSA.
    #[serde(default = "yes")]
    pub manage_service_accounts: bool,
    /// Whether pods may use the ServiceAccount named `default`.
    #[serde(default)]
    pub allow_default_ksa: bool,
}

/// What the webhook found when it read the policy.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TokenProxyPolicyStatus {
    /// `Ready` is `True` when the policy is in force, `False` (reason `Invalid`) with the problem otherwise.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// Why a policy cannot be used; the message names the policy field and the fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("policy has no metadata.name: give it a name")]
    NoName,
    #[error("policy {policy:?}: spec.namespaceSelector: {why}")]
    Selector { policy: String, why: String },
    #[error("policy {policy:?}: spec.serviceAccounts[{index}] {pattern:?}: {why}")]
    ServiceAccount { policy: String, index: usize, pattern: String, why: &'static str },
    #[error("policy {policy:?}: spec.upstreams[{index}] {pattern:?}: {why}")]
    Upstream { policy: String, index: usize, pattern: String, why: &'static str },
    #[error("policy {policy:?}: spec.audiences[{index}] {pattern:?}: {why}")]
    Audience { policy: String, index: usize, pattern: String, why: &'static str },
    #[error("policy {policy:?}: spec.defaultServiceAccount {gsa:?}: {why}")]
    DefaultServiceAccount { policy: String, gsa: String, why: &'static str },
}

/// A checked policy, ready to evaluate.
#[derive(Debug, Clone)]
pub struct Policy {
    pub name: String,
    selector: Selector,
    service_accounts: Vec<String>,
    upstreams: Vec<String>,
    audiences: Vec<String>,
    pub default_service_account: Option<String>,
    pub manage_service_accounts: bool,
    pub allow_default_ksa: bool,
}

impl Policy {
    pub fn new(policy: &TokenProxyPolicy) -> Result<Self, PolicyError> {
        Self::from_spec(policy.metadata.name.clone().unwrap_or_default(), &policy.spec)
    }

    pub fn from_spec(name: String, spec: &TokenProxyPolicySpec) -> Result<Self, PolicyError> {
        if name.is_empty() {
            return Err(PolicyError::NoName);
        }
        let selector = Selector::try_from(spec.namespace_selector.clone())
            .map_err(|e| PolicyError::Selector { policy: name.clone(), why: e.to_string() })?;

        let mut service_accounts = Vec::new();
        for (index, pattern) in spec.service_accounts.iter().enumerate() {
            let why = if pattern.matches('@').count() != 1 {
                Some("a pattern needs exactly one '@', as in *@PROJECT.iam.gserviceaccount.com")
            } else if pattern.chars().any(|c| c.is_ascii_uppercase() || c.is_whitespace()) {
                Some("write it in lower case without spaces")
            } else {
                None
            };
            if let Some(why) = why {
                return Err(PolicyError::ServiceAccount { policy: name, index, pattern: pattern.clone(), why });
            }
            service_accounts.push(pattern.clone());
        }

        let mut upstreams = Vec::new();
        for (index, pattern) in spec.upstreams.iter().enumerate() {
            let why = if !pattern.starts_with("https://") {
                Some("an upstream prefix starts with https://")
            } else if pattern.len() == "https://".len() {
                Some("give at least a host, as in https://*.a.run.app/")
            } else if pattern.contains(['?', '#']) || pattern.chars().any(char::is_whitespace) {
                Some("a prefix has no query, fragment or spaces")
            } else {
                None
            };
            if let Some(why) = why {
                return Err(PolicyError::Upstream { policy: name, index, pattern: pattern.clone(), why });
            }
            upstreams.push(normalize_prefix(pattern));
        }

        for (index, pattern) in spec.audiences.iter().enumerate() {
            if pattern.is_empty() || pattern.chars().any(char::is_whitespace) {
                let why = "an audience is a non-empty string without spaces";
                return Err(PolicyError::Audience { policy: name, index, pattern: pattern.clone(), why });
            }
        }

        let policy = Self {
            selector,
            service_accounts,
            upstreams,
            audiences: spec.audiences.clone(),
            default_service_account: spec.default_service_account.clone(),
            manage_service_accounts: spec.manage_service_accounts,
            allow_default_ksa: spec.allow_default_ksa,
            name,
        };
        if let Some(gsa) = &policy.default_service_account {
            let why = if !is_service_account_email(gsa) {
                Some("not a Google service account email (NAME@PROJECT.iam.gserviceaccount.com)")
            } else if !policy.allows_service_account(gsa) {
                Some("not allowed by this policy's own spec.serviceAccounts: add it there")
            } else {
                None
            };
            if let Some(why) = why {
                return Err(PolicyError::DefaultServiceAccount { policy: policy.name, gsa: gsa.clone(), why });
            }
        }
        Ok(policy)
    }

    pub fn selects(&self, namespace_labels: &BTreeMap<String, String>) -> bool {
        self.selector.matches(namespace_labels)
    }

    pub fn allows_service_account(&self, gsa: &str) -> bool {
        let gsa = gsa.to_ascii_lowercase();
        self.service_accounts.iter().any(|pattern| glob_ends(pattern, &gsa).contains(&gsa.len()))
    }

    /// Whether `url` (as the `url` crate serializes it: lower-case host, no default port, a path
    /// of at least `/`, dot-segments resolved) lies under one of the allowed prefixes.
    pub fn allows_upstream(&self, url: &str) -> bool {
        self.upstreams.iter().any(|prefix| prefix_matches(prefix, url))
    }

    /// Whether a pod may ask for tokens with this explicit `audience`: one of `audiences`
    /// matches it whole, or it is an https URL that `upstreams` allows (its query and fragment
    /// aside: Google mints no token for an audience that has one, and the webhook warns).
    pub fn allows_audience(&self, audience: &str) -> bool {
        self.audiences.iter().any(|pattern| glob_ends(pattern, audience).contains(&audience.len()))
            || url::Url::parse(audience).ok().filter(|url| url.scheme() == "https").is_some_and(|mut url| {
                url.set_query(None);
                url.set_fragment(None);
                self.allows_upstream(url.as_str())
            })
    }

    /// Whether the policy allows `upstream`'s URL and, when explicit, its audience.
    fn allows(&self, upstream: &Upstream) -> bool {
        self.allows_upstream(upstream.parsed.as_str())
            && (!upstream.audience_explicit || self.allows_audience(&upstream.audience))
    }
}

/// Scheme and host of a prefix compare case-insensitively, so they are lower-cased like parsed URLs.
fn normalize_prefix(pattern: &str) -> String {
    let rest = &pattern["https://".len()..];
    let host_end = rest.find('/').unwrap_or(rest.len());
    let host = rest[..host_end].to_ascii_lowercase();
    let host = host.strip_suffix(":443").unwrap_or(&host);
    format!("https://{host}{}", &rest[host_end..])
}

/// Every position in `text` at which a match of `pattern` starting at 0 can end. `*` matches any
/// run of characters other than `@`, `.`, `/`, `:`, `?` and `#`, so it stays inside one label of a
/// host name, email or path segment.
fn glob_ends(pattern: &str, text: &str) -> Vec<usize> {
    let text = text.as_bytes();
    // The positions reachable so far, in increasing order, and those after the next pattern
    // byte: two vectors, swapped at each byte, so a match costs two allocations.
    let mut ends = Vec::with_capacity(text.len() + 1);
    let mut next = Vec::with_capacity(text.len() + 1);
    ends.push(0);
    for &p in pattern.as_bytes() {
        next.clear();
        if p == b'*' {
            // From each position, every one up to the next separator's. Runs from increasing
            // starts end at non-decreasing separators, so a start inside the run before adds
            // nothing, and the positions come out in order without repeats.
            let mut covered = 0;
            for &at in &ends {
                if at < covered {
                    continue;
                }
                let mut i = at;
                next.push(i);
                while i < text.len() && !is_glob_separator(text[i]) {
                    i += 1;
                    next.push(i);
                }
                covered = i + 1;
            }
        } else {
            next.extend(ends.iter().filter(|&&at| text.get(at) == Some(&p)).map(|at| at + 1));
        }
        std::mem::swap(&mut ends, &mut next);
        if ends.is_empty() {
            break;
        }
    }
    ends
}

/// The characters a `*` never crosses.
fn is_glob_separator(c: u8) -> bool {
    matches!(c, b'@' | b'.' | b'/' | b':' | b'?' | b'#')
}

/// Whether the URL starts with the prefix on a boundary: the prefix ends in `/`, or the URL ends
/// or continues with `/`, `?` or `#` right after it. `https://host/orders` thus covers
/// `https://host/orders/1` but not `https://host/orders-admin`.
fn prefix_matches(prefix: &str, url: &str) -> bool {
    let url = normalize_url(url);
    glob_ends(prefix, &url)
        .into_iter()
        .any(|end| prefix.ends_with('/') || matches!(url.as_bytes().get(end), None | Some(b'/' | b'?' | b'#')))
}

/// The URL with its scheme and host lower-cased and the default port dropped, as policies compare it.
fn normalize_url(url: &str) -> String {
    match url.strip_prefix("https://").or_else(|| url.strip_prefix("HTTPS://")) {
        Some(_) => normalize_prefix(&format!("https://{}", &url["https://".len()..])),
        None => url.to_owned(),
    }
}

/// The policies in force, in name order, and whether a namespace without one is refused.
#[derive(Debug, Clone, Default)]
pub struct PolicySet {
    policies: Vec<Policy>,
    pub required: bool,
}

/// What the policies decided for one pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allowance {
    /// The policy that allows the pod; `None` when no policy selects the namespace and none is required.
    pub policy: Option<String>,
    pub manage_service_accounts: bool,
    pub allow_default_ksa: bool,
}

/// Why the policies refuse a pod; the webhook turns it into a denial message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    NoPolicy,
    ServiceAccount { policies: Vec<String> },
    Upstream { upstream: String, url: String, policies: Vec<String> },
    Audience { upstream: String, audience: String, policies: Vec<String> },
    NoSinglePolicy { policies: Vec<String> },
}

impl PolicySet {
    pub fn new(mut policies: Vec<Policy>, required: bool) -> Self {
        policies.sort_by(|a, b| a.name.cmp(&b.name));
        Self { policies, required }
    }

    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }

    pub fn selecting<'a>(&'a self, namespace_labels: &'a BTreeMap<String, String>) -> Vec<&'a Policy> {
        self.policies.iter().filter(|p| p.selects(namespace_labels)).collect()
    }

    /// Decides for a pod acting as `gsa` and calling `upstreams`: allowed when one policy that
    /// selects the namespace allows the GSA, every upstream and every explicit audience; that
    /// policy's `manageServiceAccounts` and `allowDefaultKsa` then apply.
    pub fn allow(&self, selecting: &[&Policy], gsa: &str, upstreams: &[Upstream]) -> Result<Allowance, Refusal> {
        if selecting.is_empty() {
            return if self.required {
                Err(Refusal::NoPolicy)
            } else {
                Ok(Allowance { policy: None, manage_service_accounts: true, allow_default_ksa: false })
            };
        }
        if let Some(policy) =
            selecting.iter().find(|p| p.allows_service_account(gsa) && upstreams.iter().all(|u| p.allows(u)))
        {
            return Ok(Allowance {
                policy: Some(policy.name.clone()),
                manage_service_accounts: policy.manage_service_accounts,
                allow_default_ksa: policy.allow_default_ksa,
            });
        }
        let names = |ps: &[&Policy]| ps.iter().map(|p| p.name.clone()).collect::<Vec<_>>();
        let for_gsa: Vec<&Policy> = selecting.iter().copied().filter(|p| p.allows_service_account(gsa)).collect();
        if for_gsa.is_empty() {
            return Err(Refusal::ServiceAccount { policies: names(selecting) });
        }
        for upstream in upstreams {
            if !for_gsa.iter().any(|p| p.allows_upstream(upstream.parsed.as_str())) {
                return Err(Refusal::Upstream {
                    upstream: upstream.name.clone(),
                    url: upstream.url.clone(),
                    policies: names(&for_gsa),
                });
            }
        }
        for upstream in upstreams.iter().filter(|u| u.audience_explicit) {
            if !for_gsa.iter().any(|p| p.allows_audience(&upstream.audience)) {
                return Err(Refusal::Audience {
                    upstream: upstream.name.clone(),
                    audience: upstream.audience.clone(),
                    policies: names(&for_gsa),
                });
            }
        }
        Err(Refusal::NoSinglePolicy { policies: names(&for_gsa) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_files_know_every_field_the_crd_has() {
        use kube::CustomResourceExt;
        let crd = serde_json::to_value(TokenProxyPolicy::crd()).expect("CRD as JSON");
        let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"];
        let mut in_crd: Vec<&str> = schema.as_object().expect("spec properties").keys().map(String::as_str).collect();
        let mut in_files = SPEC_FIELDS.to_vec();
        in_crd.sort_unstable();
        in_files.sort_unstable();
        assert_eq!(in_files, in_crd, "a field the cluster accepts is refused in --policy-file, or the reverse");
    }

    /// The first way `glob_ends` was written, one set of positions per pattern byte: the
    /// present one must give the same ends.
    fn glob_ends_by_sets(pattern: &str, text: &str) -> Vec<usize> {
        let text = text.as_bytes();
        let mut ends = vec![0usize];
        for &p in pattern.as_bytes() {
            let mut next = Vec::new();
            for &at in &ends {
                if p == b'*' {
                    let mut i = at;
                    next.push(i);
                    while i < text.len() && !matches!(text[i], b'@' | b'.' | b'/' | b':' | b'?' | b'#') {
                        i += 1;
                        next.push(i);
                    }
                } else if text.get(at) == Some(&p) {
                    next.push(at + 1);
                }
            }
            next.sort_unstable();
            next.dedup();
            ends = next;
            if ends.is_empty() {
                break;
            }
        }
        ends
    }

    proptest::proptest! {
        #[test]
        fn glob_ends_agree_with_the_set_by_set_reading(
            pattern in "[a-c*@./:?#]{0,12}",
            text in "[a-c@./:?#]{0,16}",
        ) {
            proptest::prop_assert_eq!(glob_ends(&pattern, &text), glob_ends_by_sets(&pattern, &text));
        }
    }
    use wiproxy_common::parse_upstreams;

    fn policy(name: &str, selector: &str, service_accounts: &[&str], upstreams: &[&str]) -> Policy {
        let spec = TokenProxyPolicySpec {
            namespace_selector: serde_json::from_str(selector).expect("selector"),
            service_accounts: service_accounts.iter().map(|s| s.to_string()).collect(),
            upstreams: upstreams.iter().map(|s| s.to_string()).collect(),
            audiences: Vec::new(),
            default_service_account: None,
            manage_service_accounts: true,
            allow_default_ksa: false,
        };
        Policy::from_spec(name.into(), &spec).expect("valid policy")
    }

    #[test]
    fn service_account_globs_stay_inside_a_label() {
        let p = policy(
            "p",
            "{}",
            &["*@client-project.iam.gserviceaccount.com", "app-*@other.iam.gserviceaccount.com"],
            &[],
        );
        let cases = [
            ("invoker@client-project.iam.gserviceaccount.com", true),
            ("Invoker@Client-Project.iam.gserviceaccount.com", true),
            ("app-x@other.iam.gserviceaccount.com", true),
            ("x@evil.client-project.iam.gserviceaccount.com", false),
            ("a.b@client-project.iam.gserviceaccount.com", false),
            ("a@b@client-project.iam.gserviceaccount.com", false),
            ("invoker@client-project.iam.gserviceaccount.com.evil", false),
            ("app@other.iam.gserviceaccount.com", false),
        ];
        for (gsa, allowed) in cases {
            assert_eq!(p.allows_service_account(gsa), allowed, "{gsa}");
        }
    }

    #[test]
    fn upstream_prefixes_match_on_boundaries() {
        let p = policy(
            "p",
            "{}",
            &[],
            &[
                "https://europe-west1-host-project.cloudfunctions.net/",
                "https://*.a.run.app/",
                "https://api.example.com/orders",
            ],
        );
        let cases = [
            ("https://europe-west1-host-project.cloudfunctions.net/orders", true),
            ("https://EUROPE-west1-host-project.cloudfunctions.net:443/orders", true),
            ("https://europe-west1-host-project.cloudfunctions.net.evil.com/orders", false),
            ("https://us-central1-host-project.cloudfunctions.net/orders", false),
            ("https://orders-abc-ew.a.run.app/v1", true),
            ("https://orders-abc-ew.a.run.app", false),
            ("https://x.y.a.run.app/", false),
            ("https://evil.com/.a.run.app/", false),
            ("https://api.example.com/orders", true),
            ("https://api.example.com/orders/1?x=2", true),
            ("https://api.example.com/orders?x=2", true),
            ("https://api.example.com/orders-admin", false),
            ("https://api.example.com/order", false),
        ];
        for (url, allowed) in cases {
            assert_eq!(p.allows_upstream(url), allowed, "{url}");
        }
    }

    #[test]
    fn selectors() {
        let labels = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
        };
        let payments = labels(&[("team", "payments"), ("kubernetes.io/metadata.name", "pay")]);
        let other = labels(&[("kubernetes.io/metadata.name", "other")]);
        assert!(policy("all", "{}", &[], &[]).selects(&other));
        let by_label = policy("p", r#"{"matchLabels":{"team":"payments"}}"#, &[], &[]);
        assert!(by_label.selects(&payments));
        assert!(!by_label.selects(&other));
        let by_expr =
            policy("p", r#"{"matchExpressions":[{"key":"team","operator":"NotIn","values":["payments"]}]}"#, &[], &[]);
        assert!(!by_expr.selects(&payments));
        assert!(by_expr.selects(&other));
    }

    #[test]
    fn some_policy_must_allow_everything() {
        let gsa = "invoker@client.iam.gserviceaccount.com";
        let a = policy("a", "{}", &["*@client.iam.gserviceaccount.com"], &["https://a.example.com/"]);
        let b = policy("b", "{}", &["*@client.iam.gserviceaccount.com"], &["https://b.example.com/"]);
        let set = PolicySet::new(vec![b.clone(), a.clone()], true);
        let selecting = [&a, &b];
        let one = parse_upstreams("x=https://b.example.com/x").expect("valid");
        assert_eq!(
            set.allow(&selecting, gsa, &one),
            Ok(Allowance { policy: Some("b".into()), manage_service_accounts: true, allow_default_ksa: false })
        );
        let both = parse_upstreams("x=https://a.example.com/x,y=https://b.example.com/y").expect("valid");
        assert_eq!(
            set.allow(&selecting, gsa, &both),
            Err(Refusal::NoSinglePolicy { policies: vec!["a".into(), "b".into()] })
        );
        let bare = parse_upstreams("x=https://B.example.com").expect("valid");
        assert!(set.allow(&selecting, gsa, &bare).is_ok(), "a URL without a path lies under https://host/");
        let climbing = parse_upstreams("x=https://b.example.com/x/../../y").expect("valid");
        assert!(set.allow(&selecting, gsa, &climbing).is_ok());
        let escape = parse_upstreams("x=https://b.example.com.evil.com/").expect("valid");
        assert!(set.allow(&selecting, gsa, &escape).is_err());
        let elsewhere = parse_upstreams("x=https://c.example.com/x").expect("valid");
        assert!(
            matches!(set.allow(&selecting, gsa, &elsewhere), Err(Refusal::Upstream { upstream, .. }) if upstream == "x")
        );
        assert!(matches!(
            set.allow(&selecting, "x@other.iam.gserviceaccount.com", &one),
            Err(Refusal::ServiceAccount { .. })
        ));
        assert_eq!(set.allow(&[], gsa, &one), Err(Refusal::NoPolicy));
        let optional = PolicySet::new(vec![], false);
        assert_eq!(
            optional.allow(&[], gsa, &one),
            Ok(Allowance { policy: None, manage_service_accounts: true, allow_default_ksa: false })
        );
    }

    #[test]
    fn invalid_policies_name_the_field() {
        let spec = |sa: &str, up: &str, default: Option<&str>| TokenProxyPolicySpec {
            namespace_selector: LabelSelector::default(),
            service_accounts: vec![sa.into()],
            upstreams: vec![up.into()],
            audiences: Vec::new(),
            default_service_account: default.map(Into::into),
            manage_service_accounts: true,
            allow_default_ksa: false,
        };
        let cases = [
            (spec("nobody", "https://x/", None), "spec.serviceAccounts[0]"),
            (spec("*@p.iam.gserviceaccount.com", "http://x/", None), "spec.upstreams[0]"),
            (spec("*@p.iam.gserviceaccount.com", "https://x/?a", None), "no query"),
            (
                spec("*@p.iam.gserviceaccount.com", "https://x/", Some("a@q.iam.gserviceaccount.com")),
                "spec.defaultServiceAccount",
            ),
        ];
        for (spec, expected) in cases {
            let err = Policy::from_spec("p".into(), &spec).expect_err(expected).to_string();
            assert!(err.contains(expected), "{err}");
        }
    }
}
