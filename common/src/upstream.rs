//! The upstream grammar: `NAME=URL[;audience=AUD][;header=HEADER][;listen=PORT]`, entries one per line or
//! comma-separated.

use std::fmt;
use url::Url;

/// Header in which the sidecar sends the ID token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TokenHeader {
    /// `Authorization: Bearer …`; the app's own `Authorization` moves to `X-Forwarded-Authorization`.
    #[default]
    Authorization,
    /// `X-Serverless-Authorization: Bearer …` (Cloud Run, Cloud Functions gen2); the app's `Authorization` passes through.
    XServerlessAuthorization,
}

impl TokenHeader {
    pub const VALUES: &'static str = "authorization or x-serverless-authorization";

    pub fn parse(value: &str) -> Option<Self> {
        match value.trim().to_ascii_lowercase().as_str() {
            "authorization" => Some(Self::Authorization),
            "x-serverless-authorization" => Some(Self::XServerlessAuthorization),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Authorization => "authorization",
            Self::XServerlessAuthorization => "x-serverless-authorization",
        }
    }
}

impl fmt::Display for TokenHeader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One configured upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    /// DNS label naming the upstream; the proxy serves it under `/<name>`.
    pub name: String,
    /// The URL as written.
    pub url: String,
    /// The URL parsed (host lower-cased, default port dropped).
    pub parsed: Url,
    /// Audience of the ID token.
    pub audience: String,
    /// Whether `audience=` was given rather than derived from the URL.
    pub audience_explicit: bool,
    /// Header for this upstream's token, when it overrides the pod-wide choice.
    pub header: Option<TokenHeader>,
    /// A dedicated loopback port for this upstream alone (`;listen=PORT`): every path on it goes
    /// to this upstream, for clients that cannot put a prefix in the path (gRPC).
    pub listen: Option<u16>,
}

impl Upstream {
    /// The entry in canonical form, as the sidecar's `WIPROXY_UPSTREAMS` carries it.
    pub fn to_entry(&self) -> String {
        let mut entry = format!("{}={}", self.name, self.url);
        if self.audience_explicit {
            entry.push_str(";audience=");
            entry.push_str(&self.audience);
        }
        if let Some(header) = self.header {
            entry.push_str(";header=");
            entry.push_str(header.as_str());
        }
        if let Some(port) = self.listen {
            entry.push_str(&format!(";listen={port}"));
        }
        entry
    }
}

/// Why an upstream list was refused. Messages say what is wrong and how to write it instead; the
/// caller names where the list came from (an annotation, an environment variable).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamError {
    #[error("no upstreams: give at least one entry NAME=https://HOST/PATH")]
    Empty,
    #[error("entry {entry:?} has no '=': write NAME=https://HOST/PATH")]
    MissingEquals { entry: String },
    #[error("upstream name {name:?} {why}: use a DNS label such as \"orders\" (lower-case letters, digits and '-', at most 63, starting and ending with a letter or digit)")]
    BadName { name: String, why: &'static str },
    #[error("upstream name {name:?} is used twice: give each upstream its own name")]
    DuplicateName { name: String },
    #[error("upstream {name:?}: URL {url:?} is not a valid URL ({why}): write https://HOST/PATH")]
    BadUrl { name: String, url: String, why: String },
    #[error("upstream {name:?}: URL {url:?} is not https: tokens are only sent over TLS, write https://…")]
    NotHttps { name: String, url: String },
    #[error("upstream {name:?}: URL {url:?} carries user info: remove the 'user@' part")]
    UserInfo { name: String, url: String },
    #[error(
        "upstream {name:?}: unknown option {option:?}: the options are audience=AUD, header=HEADER and listen=PORT"
    )]
    UnknownOption { name: String, option: String },
    #[error("upstream {name:?}: option {option:?} is given twice: keep one")]
    RepeatedOption { name: String, option: &'static str },
    #[error("upstream {name:?}: audience is empty: drop ';audience=' to use the default or give a value")]
    EmptyAudience { name: String },
    #[error("upstream {name:?}: header {value:?} is not supported: use {}", TokenHeader::VALUES)]
    BadHeader { name: String, value: String },
    #[error(
        "more than {max} upstreams: split the workload, or call the others through one upstream with a shared prefix"
    )]
    TooMany { max: usize },
    #[error("upstream {name:?}: listen={value:?} is not a port from 1024 to 65535: give a free unprivileged port such as listen=15082 (the sidecar runs as a non-root user)")]
    BadListen { name: String, value: String },
    #[error("upstreams {first:?} and {second:?} both listen on port {port}: give each its own listen=PORT")]
    SharedListen { first: String, second: String, port: u16 },
}

/// Most upstreams one pod may have: each costs a token fetch at start and an environment
/// variable in every container.
pub const MAX_UPSTREAMS: usize = 32;

/// Parses an upstream list. Entries are separated by newlines or commas; blank entries are ignored.
pub fn parse_upstreams(list: &str) -> Result<Vec<Upstream>, UpstreamError> {
    let mut upstreams: Vec<Upstream> = Vec::new();
    for (index, entry) in list.split(['\n', ',']).map(str::trim).filter(|e| !e.is_empty()).enumerate() {
        // Counted before parsing, so an oversized list costs no more than 32 entries' work.
        if index == MAX_UPSTREAMS {
            return Err(UpstreamError::TooMany { max: MAX_UPSTREAMS });
        }
        let upstream = parse_entry(entry)?;
        if upstreams.iter().any(|u| u.name == upstream.name) {
            return Err(UpstreamError::DuplicateName { name: upstream.name });
        }
        if let Some(port) = upstream.listen {
            if let Some(other) = upstreams.iter().find(|u| u.listen == Some(port)) {
                return Err(UpstreamError::SharedListen { first: other.name.clone(), second: upstream.name, port });
            }
        }
        upstreams.push(upstream);
    }
    if upstreams.is_empty() {
        return Err(UpstreamError::Empty);
    }
    Ok(upstreams)
}

fn parse_entry(entry: &str) -> Result<Upstream, UpstreamError> {
    let (name, rest) = entry.split_once('=').ok_or_else(|| UpstreamError::MissingEquals { entry: entry.to_owned() })?;
    let name = name.trim().to_owned();
    check_name(&name)?;

    let mut parts = rest.split(';');
    let url = parts.next().unwrap_or_default().trim().to_owned();
    let parsed = parse_url(&name, &url)?;

    let mut audience = None;
    let mut header = None;
    let mut listen = None;
    for option in parts.map(str::trim).filter(|o| !o.is_empty()) {
        let (key, value) = option.split_once('=').unwrap_or((option, ""));
        let value = value.trim();
        match key.trim() {
            "audience" => {
                if audience.is_some() {
                    return Err(UpstreamError::RepeatedOption { name, option: "audience" });
                }
                if value.is_empty() {
                    return Err(UpstreamError::EmptyAudience { name });
                }
                audience = Some(value.to_owned());
            }
            "header" => {
                if header.is_some() {
                    return Err(UpstreamError::RepeatedOption { name, option: "header" });
                }
                header = Some(
                    TokenHeader::parse(value)
                        .ok_or_else(|| UpstreamError::BadHeader { name: name.clone(), value: value.to_owned() })?,
                );
            }
            "listen" => {
                if listen.is_some() {
                    return Err(UpstreamError::RepeatedOption { name, option: "listen" });
                }
                let port = value.parse::<u16>().ok().filter(|port| *port >= 1024);
                listen =
                    Some(port.ok_or_else(|| UpstreamError::BadListen { name: name.clone(), value: value.to_owned() })?);
            }
            _ => {
                return Err(UpstreamError::UnknownOption { name, option: option.to_owned() });
            }
        }
    }

    let audience_explicit = audience.is_some();
    let audience = audience.unwrap_or_else(|| default_audience(&url, &parsed));
    Ok(Upstream { name, url, parsed, audience, audience_explicit, header, listen })
}

fn check_name(name: &str) -> Result<(), UpstreamError> {
    let why = if name.is_empty() {
        Some("is empty")
    } else if name.len() > 63 {
        Some("is longer than 63 characters")
    } else if name.starts_with('_') {
        Some("starts with '_', which is reserved")
    } else if !name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') {
        Some("has characters other than lower-case letters, digits and '-'")
    } else if name.starts_with('-') || name.ends_with('-') {
        Some("starts or ends with '-'")
    } else {
        None
    };
    match why {
        Some(why) => Err(UpstreamError::BadName { name: name.to_owned(), why }),
        None => Ok(()),
    }
}

fn parse_url(name: &str, url: &str) -> Result<Url, UpstreamError> {
    let bad = |why: String| UpstreamError::BadUrl { name: name.to_owned(), url: url.to_owned(), why };
    let parsed = Url::parse(url).map_err(|e| bad(e.to_string()))?;
    if parsed.scheme() != "https" {
        return Err(UpstreamError::NotHttps { name: name.to_owned(), url: url.to_owned() });
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(bad("no host".to_owned()));
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(UpstreamError::UserInfo { name: name.to_owned(), url: url.to_owned() });
    }
    Ok(parsed)
}

/// The audience Google expects: the origin for Cloud Run (`*.run.app`); for Cloud Functions
/// (`*.cloudfunctions.net`) the function URL `https://HOST/FUNCTION`, the first path segment only
/// (gen1 accepts exactly that; the rest of a longer URL is a route inside the function);
/// otherwise the URL as written without query or fragment.
fn default_audience(url: &str, parsed: &Url) -> String {
    let host = parsed.host_str().unwrap_or_default();
    if host.ends_with(".run.app") {
        return parsed.origin().ascii_serialization();
    }
    if host.ends_with(".cloudfunctions.net") {
        if let Some(function) = parsed.path_segments().and_then(|mut s| s.next()).filter(|s| !s.is_empty()) {
            return format!("{}/{function}", parsed.origin().ascii_serialization());
        }
    }
    let end = url.find(['?', '#']).unwrap_or(url.len());
    url[..end].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(list: &str) -> Upstream {
        let mut all = parse_upstreams(list).expect("valid list");
        assert_eq!(all.len(), 1);
        all.remove(0)
    }

    #[test]
    fn default_audiences() {
        let cases = [
            ("orders=https://orders-abc-ew.a.run.app/v1/items", "https://orders-abc-ew.a.run.app"),
            ("orders=https://Orders-ABC-ew.a.run.app:443", "https://orders-abc-ew.a.run.app"),
            (
                "fn=https://europe-west1-host.cloudfunctions.net/orders?x=1#top",
                "https://europe-west1-host.cloudfunctions.net/orders",
            ),
            (
                "fn=https://europe-west1-host.cloudfunctions.net/orders/v1/items",
                "https://europe-west1-host.cloudfunctions.net/orders",
            ),
            (
                "fn=https://europe-west1-host.cloudfunctions.net/orders/",
                "https://europe-west1-host.cloudfunctions.net/orders",
            ),
            ("fn=https://europe-west1-host.cloudfunctions.net/", "https://europe-west1-host.cloudfunctions.net/"),
            ("api=https://api.example.com", "https://api.example.com"),
        ];
        for (list, audience) in cases {
            let upstream = one(list);
            assert_eq!(upstream.audience, audience, "{list}");
            assert!(!upstream.audience_explicit);
        }
    }

    #[test]
    fn options() {
        let upstream = one(
            " orders = https://h.a.run.app/x ; audience=custom-aud ; header=X-Serverless-Authorization ; listen=15081 ",
        );
        assert_eq!(upstream.name, "orders");
        assert_eq!(upstream.url, "https://h.a.run.app/x");
        assert_eq!(upstream.audience, "custom-aud");
        assert!(upstream.audience_explicit);
        assert_eq!(upstream.header, Some(TokenHeader::XServerlessAuthorization));
        assert_eq!(
            upstream.to_entry(),
            "orders=https://h.a.run.app/x;audience=custom-aud;header=x-serverless-authorization;listen=15081"
        );
        assert_eq!(upstream.listen, Some(15081));
        assert_eq!(one("a=https://a.example.com").listen, None);
    }

    #[test]
    fn separators() {
        let all = parse_upstreams("a=https://a.example.com,\n b=https://b.example.com\n\n,c=https://c.example.com,")
            .expect("valid list");
        let names: Vec<_> = all.iter().map(|u| u.name.as_str()).collect();
        assert_eq!(names, ["a", "b", "c"]);
    }

    #[test]
    fn refusals() {
        let long = "a".repeat(64);
        let cases: Vec<(String, &str)> = vec![
            ("".into(), "no upstreams"),
            (" , \n".into(), "no upstreams"),
            ("orders https://x.example.com".into(), "has no '='"),
            ("Orders=https://x.example.com".into(), "characters other than"),
            ("_x=https://x.example.com".into(), "reserved"),
            ("-x=https://x.example.com".into(), "starts or ends with '-'"),
            (format!("{long}=https://x.example.com"), "longer than 63"),
            ("=https://x.example.com".into(), "is empty"),
            ("a=https://x.example.com,a=https://y.example.com".into(), "used twice"),
            ("a=http://x.example.com".into(), "is not https"),
            ("a=x.example.com/path".into(), "not a valid URL"),
            ("a=https://user:pw@x.example.com".into(), "user info"),
            ("a=https://x.example.com;aud=y".into(), "unknown option"),
            ("a=https://x.example.com;audience=".into(), "audience is empty"),
            ("a=https://x.example.com;header=bearer".into(), "is not supported"),
            ("a=https://x.example.com;audience=a;audience=b".into(), "given twice"),
            (
                (0..33).map(|i| format!("u{i}=https://x.example.com")).collect::<Vec<_>>().join(","),
                "more than 32 upstreams",
            ),
            ("a=https://x.example.com;listen=80".into(), "not a port from 1024"),
            ("a=https://x.example.com;listen=grpc".into(), "not a port from 1024"),
            ("a=https://x.example.com;listen=70000".into(), "not a port from 1024"),
            ("a=https://x.example.com;listen=15081;listen=15082".into(), "given twice"),
            (
                "a=https://x.example.com;listen=15081,b=https://y.example.com;listen=15081".into(),
                "both listen on port 15081",
            ),
        ];
        let most = (0..32).map(|i| format!("u{i}=https://x.example.com/{i}")).collect::<Vec<_>>().join("\n");
        assert_eq!(parse_upstreams(&most).expect("32 upstreams").len(), 32);
        for (list, expected) in cases {
            let err = parse_upstreams(&list).expect_err(&list).to_string();
            assert!(err.contains(expected), "{list:?}: {err}");
        }
    }
}
