//! Which upstream a request is for, and the URL it goes to. Origin-form requests name the
//! upstream in their first path segment (`/orders/v1/items`); on an upstream's own port
//! (`listen=PORT`) every path is that upstream's; absolute-form requests (an app with
//! `HTTP_PROXY` set) must lie under a configured upstream URL, unless they are aimed at the
//! sidecar itself. Nothing else is forwarded. Redirects into an upstream are written back to the
//! sidecar's address the same way.

use std::net::{IpAddr, SocketAddr};

use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Method, StatusCode, Uri, Version};
use wiproxy_common::{TokenHeader, Upstream};

mod paths;

pub use paths::{check_dot_segments, climbs_out, stays_inside_decoded};

/// Path of the endpoint that hands out raw tokens.
pub const TOKEN_PATH: &str = "/_wiproxy/token";

/// One upstream, ready for routing.
#[derive(Debug, Clone)]
pub struct Route {
    pub name: String,
    pub audience: String,
    pub header: TokenHeader,
    /// The upstream's own loopback port, when it has one.
    pub listen: Option<u16>,
    /// `host[:port]`, as written in the URL (host lower-cased, the default port dropped).
    authority: String,
    /// The same, parsed once for the URLs requests go to.
    origin: Option<Authority>,
    host: String,
    port: Option<u16>,
    /// The URL's path without its trailing `/`; empty for the root.
    base_path: String,
    base_query: Option<String>,
}

/// Where a request goes.
#[derive(Debug, PartialEq, Eq)]
pub enum Destination {
    /// Forward to `uri` with the token of route `index`; `via` is how the app addressed it.
    Upstream { index: usize, uri: Uri, via: Via },
    /// `GET /_wiproxy/token?upstream=NAME`.
    Token { index: usize },
}

/// A request that is not forwarded: its status and the message of the JSON body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: StatusCode,
    pub message: String,
}

/// How the app addressed an upstream, which is how a redirect into it is written back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// `/<name>/…` on the proxy port.
    Prefix,
    /// The upstream's own port (`listen=PORT`).
    Port,
    /// Absolute form, `GET http://host/path` (`HTTP_PROXY`).
    Proxy,
}

fn refuse(status: StatusCode, message: impl Into<String>) -> Refusal {
    Refusal { status, message: message.into() }
}

#[derive(Debug, Clone)]
pub struct Routes {
    routes: Vec<Route>,
    /// The proxy's own listen address: an absolute-form request aimed at it (or at an upstream's
    /// own port) is an ordinary request, not a proxy request.
    listen: SocketAddr,
}

impl Routes {
    pub fn new(upstreams: &[Upstream], default_header: TokenHeader, listen: SocketAddr) -> Self {
        let routes = upstreams
            .iter()
            .map(|u| {
                let host = u.parsed.host_str().unwrap_or_default().to_ascii_lowercase();
                let port = u.parsed.port();
                let authority = match port {
                    Some(port) => format!("{host}:{port}"),
                    None => host.clone(),
                };
                Route {
                    name: u.name.clone(),
                    audience: u.audience.clone(),
                    header: u.header.unwrap_or(default_header),
                    listen: u.listen,
                    origin: Authority::try_from(authority.as_str()).ok(),
                    authority,
                    host,
                    port,
                    base_path: u.parsed.path().trim_end_matches('/').to_owned(),
                    base_query: u.parsed.query().map(str::to_owned),
                }
            })
            .collect();
        Self { routes, listen }
    }

    pub fn get(&self, index: usize) -> &Route {
        &self.routes[index]
    }

    pub fn iter(&self) -> impl Iterator<Item = &Route> {
        self.routes.iter()
    }

    fn names(&self) -> String {
        self.routes.iter().map(|r| format!("/{}", r.name)).collect::<Vec<_>>().join(", ")
    }

    fn prefixes(&self) -> String {
        self.routes.iter().map(|r| format!("https://{}{}/", r.authority, r.base_path)).collect::<Vec<_>>().join(", ")
    }

    /// The sidecar's own port that `host:port` names, if it names one: the proxy port (`None`
    /// inside) or an upstream's own port (`Some(index)`).
    fn own_port(&self, host: &str, port: Option<u16>) -> Option<Option<usize>> {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let ours = host.eq_ignore_ascii_case("localhost")
            || host
                .parse::<IpAddr>()
                .is_ok_and(|ip| ip.is_loopback() || ip == self.listen.ip() || self.listen.ip().is_unspecified());
        let port = port?;
        if !ours {
            return None;
        }
        if port == self.listen.port() {
            return Some(None);
        }
        self.routes.iter().position(|r| r.listen == Some(port)).map(Some)
    }

    /// Routes a request that came to the proxy port. HTTP/2 requests always carry an authority
    /// (`:authority`), so only an HTTP/1 request with an absolute URI is a proxy request.
    pub fn resolve(&self, method: &Method, version: Version, uri: &Uri) -> Result<Destination, Refusal> {
        if method == Method::CONNECT {
            return Err(refuse(
                StatusCode::METHOD_NOT_ALLOWED,
                "CONNECT is not supported: a token cannot be added inside a TLS tunnel; call http://127.0.0.1:PORT/<upstream>/… or set HTTP_PROXY for http:// URLs",
            ));
        }
        if uri.authority().is_some() && version < Version::HTTP_2 {
            match self.own_port(uri.host().unwrap_or_default(), uri.port_u16()) {
                None => return self.absolute(uri),
                Some(Some(index)) => return self.dedicated(index, method, uri),
                Some(None) => {}
            }
        }
        let path = uri.path();
        if path == TOKEN_PATH {
            return self.token(method, uri);
        }
        let trimmed = path.strip_prefix('/').unwrap_or(path);
        let (name, rest) = match trimmed.find('/') {
            Some(at) => (&trimmed[..at], &trimmed[at..]),
            None => (trimmed, ""),
        };
        let Some(index) = self.routes.iter().position(|r| r.name == name) else {
            return Err(refuse(
                StatusCode::NOT_FOUND,
                format!("no upstream named {name:?}: the configured upstreams are {}", self.names()),
            ));
        };
        check_dot_segments(rest)?;
        let route = &self.routes[index];
        Ok(Destination::Upstream { index, uri: target(route, &route.base_path, rest, uri.query())?, via: Via::Prefix })
    }

    /// Routes a request that came to upstream `index`'s own port: every path is the upstream's,
    /// appended to its URL's path (for a URL without a path, the path as it came).
    pub fn dedicated(&self, index: usize, method: &Method, uri: &Uri) -> Result<Destination, Refusal> {
        let route = &self.routes[index];
        if method == Method::CONNECT {
            return Err(refuse(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("CONNECT is not supported: this port forwards every request to {} with a token; send the requests themselves", route.name),
            ));
        }
        let rest = uri.path();
        // `OPTIONS *` (asterisk form) would be appended to the URL's path as `/orders*`,
        // outside it: only paths are forwarded.
        if !rest.starts_with('/') {
            return Err(refuse(
                StatusCode::BAD_REQUEST,
                format!("this port forwards paths to {}; the request target must start with '/'", route.name),
            ));
        }
        check_dot_segments(rest)?;
        Ok(Destination::Upstream { index, uri: target(route, &route.base_path, rest, uri.query())?, via: Via::Port })
    }

    fn token(&self, method: &Method, uri: &Uri) -> Result<Destination, Refusal> {
        if method != Method::GET {
            return Err(refuse(StatusCode::METHOD_NOT_ALLOWED, format!("{TOKEN_PATH} answers GET only")));
        }
        let name = url::form_urlencoded::parse(uri.query().unwrap_or_default().as_bytes())
            .find(|(key, _)| key == "upstream")
            .map(|(_, value)| value.into_owned())
            .ok_or_else(|| refuse(StatusCode::BAD_REQUEST, format!("give the upstream: {TOKEN_PATH}?upstream=NAME")))?;
        let index = self.routes.iter().position(|r| r.name == name).ok_or_else(|| {
            refuse(
                StatusCode::NOT_FOUND,
                format!("no upstream named {name:?}: the configured upstreams are {}", self.names()),
            )
        })?;
        Ok(Destination::Token { index })
    }

    /// `GET http://host/path`: forwarded over HTTPS when `https://host/path` lies under an
    /// upstream URL on a path-segment boundary; the longest such URL wins.
    fn absolute(&self, uri: &Uri) -> Result<Destination, Refusal> {
        let host = uri.host().unwrap_or_default().to_ascii_lowercase();
        let path = uri.path();
        let Some(index) = self.under(&host, uri.port_u16(), path) else {
            return Err(refuse(
                StatusCode::FORBIDDEN,
                format!(
                    "{uri} is not under a configured upstream: only URLs under {} may be called through this proxy",
                    self.prefixes()
                ),
            ));
        };
        let route = &self.routes[index];
        check_dot_segments(&path[route.base_path.len()..])?;
        Ok(Destination::Upstream { index, uri: target(route, "", path, uri.query())?, via: Via::Proxy })
    }

    /// The route whose URL `https://host[:port]/path` lies under on a path-segment boundary; the
    /// longest such URL wins. An explicit `:443` is the default port.
    fn under(&self, host: &str, port: Option<u16>, path: &str) -> Option<usize> {
        let port = port.filter(|port| *port != 443);
        self.routes
            .iter()
            .enumerate()
            .filter(|(_, r)| r.host == host && port == r.port)
            .filter(|(_, r)| {
                path.strip_prefix(r.base_path.as_str()).is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
            })
            .max_by_key(|(_, r)| r.base_path.len())
            .map(|(index, _)| index)
    }

    /// A `Location` from upstream `index`, written back to the sidecar only when it stays inside
    /// that same upstream's URL (as nginx's `proxy_redirect default` does), so the app's client
    /// follows the redirect through the sidecar and keeps its token. All upstreams share the
    /// sidecar's one loopback origin: a rewrite into another upstream would let the client keep
    /// the app's `Authorization` and cookies across what are really two origins, so a `Location`
    /// anywhere else, or one that can be read more than one way (userinfo, `\`, spaces, an
    /// odd authority), is left as it is and the client's own cross-origin rules apply. The
    /// rewritten URL is built from the sidecar's configured listen address, never from the
    /// request's `Host`. A root-relative `Location` outside the upstream is made absolute on the
    /// upstream's origin, where it resolves. `None`: leave the header as it is.
    pub fn rewrite_location(&self, location: &str, index: usize, via: Via) -> Option<String> {
        let route = &self.routes[index];
        // Whatever a client could read differently from us is left alone: backslashes (taken as
        // `/` by browsers), whitespace and controls, anything outside visible ASCII.
        if location.bytes().any(|b| b == b'\\' || !b.is_ascii_graphic()) {
            return None;
        }
        let root_relative = location.starts_with('/') && !location.starts_with("//");
        let after_scheme = if root_relative {
            None
        } else if let Some(rest) = location.strip_prefix("//") {
            Some(rest)
        } else if location.len() > 8 && location[..8].eq_ignore_ascii_case("https://") {
            Some(&location[8..])
        } else {
            // Relative references resolve against the sidecar's URL by themselves; `http://` and
            // other schemes are not an upstream's.
            return None;
        };
        let (path_and_tail, same_origin) = match after_scheme {
            None => (location, true),
            Some(rest) => {
                let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
                let (authority, path_and_tail) = rest.split_at(end);
                (path_and_tail, route.is_origin(authority)?)
            }
        };
        let end = path_and_tail.find(['?', '#']).unwrap_or(path_and_tail.len());
        let (path, tail) = path_and_tail.split_at(end);
        let inside = path
            .strip_prefix(route.base_path.as_str())
            .filter(|_| same_origin)
            .filter(|rest| rest.is_empty() || rest.starts_with('/'))
            .filter(|rest| !climbs_out(rest));
        let Some(rest) = inside else {
            return (root_relative && via != Via::Proxy).then(|| format!("https://{}{location}", route.authority));
        };
        let own = |port: u16| match self.listen.ip() {
            ip if ip.is_unspecified() => SocketAddr::from(([127, 0, 0, 1], port)).to_string(),
            ip => SocketAddr::new(ip, port).to_string(),
        };
        Some(match (via, route.listen) {
            (Via::Proxy, _) => format!("http://{}{path}{tail}", route.authority),
            (Via::Port, Some(port)) => {
                format!("http://{}{}{tail}", own(port), if rest.is_empty() { "/" } else { rest })
            }
            _ => format!("http://{}/{}{rest}{tail}", own(self.listen.port()), route.name),
        })
    }
}

impl Route {
    /// Whether `authority`, as written after `https://` in a `Location`, is this route's origin:
    /// the host compared without case, `:443` or an empty port the default. `None` when it can
    /// be read more than one way (userinfo, percent-escapes, an IP literal, anything but a
    /// plain DNS name and port).
    fn is_origin(&self, authority: &str) -> Option<bool> {
        let (host, port) = match authority.rsplit_once(':') {
            Some((host, port)) => (host, port),
            None => (authority, ""),
        };
        let port = match port {
            "" | "443" => None,
            port if port.bytes().all(|b| b.is_ascii_digit()) => Some(port.parse::<u16>().ok()?),
            _ => return None,
        };
        let plain = !host.is_empty()
            && host.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
            && !host.starts_with('.')
            && !host.contains("..");
        if !plain {
            return None;
        }
        let host = host.strip_suffix('.').unwrap_or(host);
        Some(host.eq_ignore_ascii_case(&self.host) && port == self.port)
    }
}

/// `https://<route's authority><prefix><path>[?<route's query>&<query>]`, built from its parts:
/// the scheme and authority are the route's own, only the path and query are parsed.
fn target(route: &Route, prefix: &str, path: &str, query: Option<&str>) -> Result<Uri, Refusal> {
    let bad =
        |e: &dyn std::fmt::Display| refuse(StatusCode::BAD_REQUEST, format!("cannot build the upstream URL: {e}"));
    let mut path_and_query = String::with_capacity(
        prefix.len() + path.len() + 2 + route.base_query.as_ref().map_or(0, String::len) + query.map_or(0, str::len),
    );
    path_and_query.push_str(prefix);
    path_and_query.push_str(path);
    if path_and_query.is_empty() {
        path_and_query.push('/');
    }
    for (at, part) in route.base_query.as_deref().into_iter().chain(query).enumerate() {
        path_and_query.push(if at == 0 { '?' } else { '&' });
        path_and_query.push_str(part);
    }
    let Some(origin) = route.origin.clone() else {
        return format!("https://{}{path_and_query}", route.authority).parse().map_err(|e| bad(&e));
    };
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(Scheme::HTTPS);
    parts.authority = Some(origin);
    parts.path_and_query = Some(PathAndQuery::try_from(path_and_query).map_err(|e| bad(&e))?);
    Uri::from_parts(parts).map_err(|e| bad(&e))
}

/// The header a request for `/_wiproxy/token` must carry, with the value `true`; like the
/// metadata server's `Metadata-Flavor: Google`, a request-forgery bug that makes the app fetch a
/// URL cannot add it.
pub const TOKEN_REQUEST_HEADER: &str = "x-wiproxy-token-request";

/// Why a request for `/_wiproxy/token` is refused, if it is: it lacks
/// `X-Wiproxy-Token-Request: true`, or it carries `X-Forwarded-For` or `Forwarded` (it came
/// through another proxy, so not from the app itself; the metadata server refuses those too).
pub fn token_request_refusal(headers: &http::HeaderMap) -> Option<Refusal> {
    if headers.contains_key("x-forwarded-for") || headers.contains_key(http::header::FORWARDED) {
        return Some(refuse(
            StatusCode::FORBIDDEN,
            format!(
                "{TOKEN_PATH} refuses forwarded requests (X-Forwarded-For or Forwarded): call it from the app itself"
            ),
        ));
    }
    let asked = headers
        .get_all(TOKEN_REQUEST_HEADER)
        .iter()
        .any(|v| v.to_str().is_ok_and(|v| v.trim().eq_ignore_ascii_case("true")));
    (!asked).then(|| {
        refuse(StatusCode::FORBIDDEN, format!("{TOKEN_PATH} needs the header \"X-Wiproxy-Token-Request: true\""))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use wiproxy_common::parse_upstreams;

    fn routes() -> Routes {
        let upstreams = parse_upstreams(
            "orders=https://fn.example.com/orders,root=https://run.example.com,\
             deep=https://fn.example.com/orders/v2;header=x-serverless-authorization,q=https://q.example.com/api?key=1,\
             grpc=https://grpc.example.com;listen=15081,fnport=https://fn.example.com/orders/v3;listen=15082",
        )
        .expect("valid");
        Routes::new(&upstreams, TokenHeader::Authorization, LISTEN.parse().expect("address"))
    }

    const LISTEN: &str = "127.0.0.1:15080";

    fn resolve(method: Method, uri: &str) -> Result<(String, String), StatusCode> {
        let routes = routes();
        match routes.resolve(&method, Version::HTTP_11, &uri.parse().expect("uri")) {
            Ok(Destination::Upstream { index, uri, .. }) => Ok((routes.get(index).name.clone(), uri.to_string())),
            Ok(Destination::Token { index }) => Ok((routes.get(index).name.clone(), "token".into())),
            Err(refusal) => Err(refusal.status),
        }
    }

    #[test]
    fn origin_form() {
        let ok = |uri: &str, name: &str, target: &str| {
            assert_eq!(resolve(Method::GET, uri), Ok((name.to_owned(), target.to_owned())), "{uri}");
        };
        ok("/orders", "orders", "https://fn.example.com/orders");
        ok("/orders/", "orders", "https://fn.example.com/orders/");
        ok("/orders/v1/items?a=1&b=2", "orders", "https://fn.example.com/orders/v1/items?a=1&b=2");
        ok("/root/x", "root", "https://run.example.com/x");
        ok("/root", "root", "https://run.example.com/");
        ok("/q/list?page=2", "q", "https://q.example.com/api/list?key=1&page=2");
        ok("/q", "q", "https://q.example.com/api?key=1");
        ok("/orders/a/../b", "orders", "https://fn.example.com/orders/a/../b");
        ok("/_wiproxy/token?upstream=deep", "deep", "token");
        assert_eq!(resolve(Method::GET, "/nope/x"), Err(StatusCode::NOT_FOUND));
        assert_eq!(resolve(Method::GET, "/"), Err(StatusCode::NOT_FOUND));
        assert_eq!(resolve(Method::GET, "/_wiproxy/token"), Err(StatusCode::BAD_REQUEST));
        assert_eq!(resolve(Method::POST, "/_wiproxy/token?upstream=orders"), Err(StatusCode::METHOD_NOT_ALLOWED));
        assert_eq!(resolve(Method::GET, "/_wiproxy/token?upstream=nope"), Err(StatusCode::NOT_FOUND));
    }

    /// Every way of climbing out the sidecar was shown to let through, in origin form, absolute
    /// form and on an upstream's own port.
    const ESCAPES: &[&str] = &[
        "/..",
        "/../admin",
        "/a/../../x",
        "/%2e%2e/x",
        "/%2E./x",
        "/.%2e",
        "/..%2fadmin",
        "/..%2Fadmin",
        "/%2e%2e%2fadmin",
        "/..\\admin",
        "/..%5cadmin",
        "/..%5Cadmin",
        "/..;/admin",
        "/..;jsessionid=1/admin",
        "/%252e%252e/admin",
        "/a%2f..%2f..%2fadmin",
        "/x%2Fy/../..",
        "/a/..%3Bx/..",
    ];

    /// The readings issue 19 found still open: overlong UTF-8, IIS `%u`, NFKC look-alikes (raw,
    /// percent-encoded, `%u`-escaped), NUL truncation, `?` and `#` decoded inside a segment.
    pub(crate) const EXOTIC_ESCAPES: &[&str] = &[
        "/%c0%ae%c0%ae/admin",
        "/%C0%AE%C0%AE",
        "/%e0%80%ae%e0%80%ae/admin",
        "/%f0%80%80%ae%f0%80%80%ae/admin",
        "/..%c0%afadmin",
        "/..%c0%af..%c0%afadmin",
        "/..%e0%80%afadmin",
        "/..%c1%9cadmin",
        "/%25c0%25ae%25c0%25ae/admin",
        "/%u002e%u002e/admin",
        "/%U002E./admin",
        "/..%u002fadmin",
        "/..%u2215admin",
        "/%uff0e%uff0e/admin",
        "/\u{ff0e}\u{ff0e}/admin",
        "/%ef%bc%8e%ef%bc%8e/admin",
        "/\u{2025}/admin",
        "/%e2%80%a5/admin",
        "/.\u{2024}/admin",
        "/\u{fe52}\u{fe52}/admin",
        "/..\u{ff0f}admin",
        "/..%ef%bc%8fadmin",
        "/..\u{2215}admin",
        "/..\u{ff3c}admin",
        "/\u{ff05}2e\u{ff05}2e/admin",
        "/..%00",
        "/..%00/admin",
        "/..%3f",
        "/..%3F/admin",
        "/..%23",
        "/..%2523/admin",
        "/..%e2%81%87",
    ];

    #[test]
    fn no_reading_of_the_path_climbs_out() {
        for escape in ESCAPES.iter().chain(EXOTIC_ESCAPES) {
            let origin = format!("/orders{escape}");
            assert_eq!(resolve(Method::GET, &origin), Err(StatusCode::BAD_REQUEST), "{origin}");
            let absolute = format!("http://fn.example.com/orders{escape}");
            assert_eq!(resolve(Method::GET, &absolute), Err(StatusCode::BAD_REQUEST), "{absolute}");
            let routes = routes();
            let fnport = routes.iter().position(|r| r.name == "fnport").expect("fnport");
            let refused = routes.dedicated(fnport, &Method::GET, &escape.parse().expect("uri"));
            assert_eq!(refused.map_err(|r| r.status), Err(StatusCode::BAD_REQUEST), "port: {escape}");
        }
    }

    #[test]
    fn other_encoded_bytes_pass_through_unchanged() {
        let ok = |uri: &str, target: &str| {
            assert_eq!(resolve(Method::GET, uri), Ok(("orders".to_owned(), target.to_owned())), "{uri}");
        };
        ok("/orders/bucket/a%2Fb", "https://fn.example.com/orders/bucket/a%2Fb");
        ok("/orders/a%20b/c%5Cd", "https://fn.example.com/orders/a%20b/c%5Cd");
        ok("/orders/..a/b..", "https://fn.example.com/orders/..a/b..");
        ok("/orders/a/b/../c", "https://fn.example.com/orders/a/b/../c");
        ok("/orders/v1;x=1/items", "https://fn.example.com/orders/v1;x=1/items");
        ok("/orders/%2e%2e%2e", "https://fn.example.com/orders/%2e%2e%2e");
        ok("/orders/r%C3%A9sum%C3%A9", "https://fn.example.com/orders/r%C3%A9sum%C3%A9");
        ok("/orders/%E2%80%A5x/%ef%bc%8f", "https://fn.example.com/orders/%E2%80%A5x/%ef%bc%8f");
        ok("/orders/a/..%00", "https://fn.example.com/orders/a/..%00");
        ok("/orders/a%3f/b", "https://fn.example.com/orders/a%3f/b");
        ok("/orders/%c0%ae", "https://fn.example.com/orders/%c0%ae");
    }

    #[test]
    fn the_token_endpoint_wants_its_header_and_no_forwarding() {
        let headers = |pairs: &[(&'static str, &'static str)]| {
            let mut map = http::HeaderMap::new();
            for (name, value) in pairs {
                map.append(*name, http::HeaderValue::from_static(value));
            }
            map
        };
        assert_eq!(token_request_refusal(&headers(&[(TOKEN_REQUEST_HEADER, "true")])), None);
        assert_eq!(token_request_refusal(&headers(&[(TOKEN_REQUEST_HEADER, "True")])), None);
        for refused in [
            headers(&[]),
            headers(&[(TOKEN_REQUEST_HEADER, "yes")]),
            headers(&[(TOKEN_REQUEST_HEADER, "true"), ("x-forwarded-for", "10.0.0.1")]),
            headers(&[(TOKEN_REQUEST_HEADER, "true"), ("forwarded", "for=10.0.0.1")]),
        ] {
            let refusal = token_request_refusal(&refused).expect("refused");
            assert_eq!(refusal.status, StatusCode::FORBIDDEN, "{refused:?}");
        }
    }

    #[test]
    fn absolute_form() {
        let ok = |uri: &str, name: &str, target: &str| {
            assert_eq!(resolve(Method::POST, uri), Ok((name.to_owned(), target.to_owned())), "{uri}");
        };
        ok("http://fn.example.com/orders", "orders", "https://fn.example.com/orders");
        ok("http://FN.example.com/orders/v1?x=1", "orders", "https://fn.example.com/orders/v1?x=1");
        ok("http://fn.example.com/orders/v2/items", "deep", "https://fn.example.com/orders/v2/items");
        ok("http://run.example.com/anything", "root", "https://run.example.com/anything");
        // An explicit default port is the same origin.
        ok("http://fn.example.com:443/orders/x", "orders", "https://fn.example.com/orders/x");
        // Aimed at the sidecar itself (HTTP_PROXY set as well as the injected base URL): a path request.
        ok("http://127.0.0.1:15080/orders/x?y=1", "orders", "https://fn.example.com/orders/x?y=1");
        ok("http://localhost:15080/root/a", "root", "https://run.example.com/a");
        ok("http://127.0.0.1:15081/any/path", "grpc", "https://grpc.example.com/any/path");
        for refused in [
            "http://fn.example.com/orders-admin",
            "http://fn.example.com/",
            "http://evil.example.com/orders",
            "http://fn.example.com:8080/orders",
            "http://127.0.0.1:9999/orders",
        ] {
            assert_eq!(resolve(Method::GET, refused), Err(StatusCode::FORBIDDEN), "{refused}");
        }
        assert_eq!(resolve(Method::GET, "http://fn.example.com/orders/../admin"), Err(StatusCode::BAD_REQUEST));
        assert_eq!(resolve(Method::CONNECT, "fn.example.com:443"), Err(StatusCode::METHOD_NOT_ALLOWED));
    }

    #[test]
    fn http2_requests_route_by_path() {
        let routes = routes();
        let uri: Uri = "http://127.0.0.1:15080/orders/x".parse().expect("uri");
        let Ok(Destination::Upstream { index, uri, .. }) = routes.resolve(&Method::GET, Version::HTTP_2, &uri) else {
            panic!("an h2 request names its upstream in the path");
        };
        assert_eq!(routes.get(index).name, "orders");
        assert_eq!(uri.to_string(), "https://fn.example.com/orders/x");
    }

    #[test]
    fn the_proxy_mode_refusal_lists_url_prefixes() {
        let refusal = routes()
            .resolve(&Method::GET, Version::HTTP_11, &"http://evil.example.com/x".parse().expect("uri"))
            .expect_err("refused");
        assert!(
            refusal.message.contains("https://fn.example.com/orders/, https://run.example.com/"),
            "{}",
            refusal.message
        );
        assert!(!refusal.message.contains("/orders,"), "{}", refusal.message);
    }

    #[test]
    fn dedicated_ports_forward_every_path() {
        let routes = routes();
        let to = |index: usize, uri: &str| match routes.dedicated(index, &Method::POST, &uri.parse().expect("uri")) {
            Ok(Destination::Upstream { uri, via: Via::Port, .. }) => Ok(uri.to_string()),
            Ok(other) => panic!("{other:?}"),
            Err(refusal) => Err(refusal.status),
        };
        let grpc = routes.iter().position(|r| r.name == "grpc").expect("grpc");
        let fnport = routes.iter().position(|r| r.name == "fnport").expect("fnport");
        assert_eq!(to(grpc, "/pkg.Service/Method"), Ok("https://grpc.example.com/pkg.Service/Method".into()));
        assert_eq!(
            to(grpc, "/_wiproxy/token?upstream=grpc"),
            Ok("https://grpc.example.com/_wiproxy/token?upstream=grpc".into())
        );
        assert_eq!(to(fnport, "/items?a=1"), Ok("https://fn.example.com/orders/v3/items?a=1".into()));
        assert_eq!(to(fnport, "/../x"), Err(StatusCode::BAD_REQUEST));
        assert_eq!(to(fnport, "*"), Err(StatusCode::BAD_REQUEST));
    }

    #[test]
    fn locations_inside_the_same_upstream_come_back_to_the_sidecar() {
        let routes = routes();
        let index = |name: &str| routes.iter().position(|r| r.name == name).expect("route");
        let cases = [
            // Inside the same upstream: absolute, scheme-relative and root-relative, written to the
            // sidecar's configured address, host case and the default port ignored.
            (
                "orders",
                "https://fn.example.com/orders/next?p=2",
                Via::Prefix,
                Some("http://127.0.0.1:15080/orders/next?p=2"),
            ),
            ("orders", "/orders/login#top", Via::Prefix, Some("http://127.0.0.1:15080/orders/login#top")),
            ("orders", "//fn.example.com/orders/x", Via::Prefix, Some("http://127.0.0.1:15080/orders/x")),
            (
                "orders",
                "HTTPS://FN.Example.COM:443/orders/v2/x",
                Via::Prefix,
                Some("http://127.0.0.1:15080/orders/v2/x"),
            ),
            ("orders", "https://fn.example.com/orders", Via::Prefix, Some("http://127.0.0.1:15080/orders")),
            // Another upstream, in every spelling: returned as it is, whatever the form.
            ("root", "https://fn.example.com/orders", Via::Prefix, None),
            ("orders", "https://run.example.com/billing", Via::Prefix, None),
            ("orders", "//run.example.com/billing", Via::Prefix, None),
            ("orders", "https://RUN.EXAMPLE.COM/billing", Via::Prefix, None),
            ("orders", "https://user:pass@run.example.com/billing", Via::Prefix, None),
            ("orders", "https:\\\\run.example.com\\billing", Via::Prefix, None),
            ("grpc", "https://run.example.com/a", Via::Port, None),
            ("orders", "https://run.example.com/a", Via::Proxy, None),
            // Ambiguous forms of the same upstream are left alone too.
            ("orders", "https://user:pass@fn.example.com/orders/x", Via::Prefix, None),
            ("orders", "https://fn.example.com\\orders/x", Via::Prefix, None),
            ("orders", "/\\run.example.com/billing", Via::Prefix, None),
            ("orders", "https://fn.example.com%2f@run.example.com/orders/x", Via::Prefix, None),
            ("orders", "https://fn.example.com/orders/../admin", Via::Prefix, None),
            ("orders", "https://fn.example.com:8443/orders/x", Via::Prefix, None),
            ("orders", "https://fn.example.com/orders-admin", Via::Prefix, None),
            // Outside every upstream: absolute ones stay, root-relative ones get the upstream's origin.
            ("orders", "https://accounts.google.com/signin", Via::Prefix, None),
            ("orders", "/login", Via::Prefix, Some("https://fn.example.com/login")),
            ("orders", "http://fn.example.com/orders/x", Via::Prefix, None),
            ("orders", "next", Via::Prefix, None),
            // Dedicated port: its own upstream stays on its port.
            ("grpc", "/other", Via::Port, Some("http://127.0.0.1:15081/other")),
            ("fnport", "https://fn.example.com/orders/v3", Via::Port, Some("http://127.0.0.1:15082/")),
            // Proxy mode: the same URL, back through the proxy.
            ("orders", "https://fn.example.com/orders/x", Via::Proxy, Some("http://fn.example.com/orders/x")),
        ];
        for (from, location, via, expected) in cases {
            assert_eq!(
                routes.rewrite_location(location, index(from), via).as_deref(),
                expected,
                "{from} {location} {via:?}"
            );
        }
    }

    #[test]
    fn a_rewritten_location_names_the_configured_address() {
        let upstreams = parse_upstreams("orders=https://fn.example.com/orders").expect("valid");
        let on = |listen: &str| Routes::new(&upstreams, TokenHeader::Authorization, listen.parse().expect("address"));
        let location = "https://fn.example.com/orders/next";
        assert_eq!(
            on("0.0.0.0:15080").rewrite_location(location, 0, Via::Prefix).as_deref(),
            Some("http://127.0.0.1:15080/orders/next")
        );
        assert_eq!(
            on("[::1]:9000").rewrite_location(location, 0, Via::Prefix).as_deref(),
            Some("http://[::1]:9000/orders/next")
        );
    }

    /// The routing invariant, on paths built from the pieces escapes are made of: whatever is
    /// forwarded lies under its upstream's URL, and no reading of the rest climbs out.
    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn piece() -> impl Strategy<Value = &'static str> {
            prop::sample::select(vec![
                "/",
                "..",
                ".",
                "%2e",
                "%2E",
                "%2f",
                "%2F",
                "\\",
                "%5c",
                "%5C",
                ";",
                ";x=1",
                "a",
                "b%20",
                "%25",
                "%252e",
                "orders",
                "v2",
                "?",
                "q=1",
                "%c0%ae",
                "%e0%80%ae",
                "%c0%af",
                "%u002e",
                "%uff0f",
                "%ef%bc%8e",
                "%e2%80%a5",
                "%00",
                "%3f",
                "%23",
            ])
        }

        fn path() -> impl Strategy<Value = String> {
            prop::collection::vec(piece(), 0..12).prop_map(|pieces| pieces.concat())
        }

        fn check(routes: &Routes, destination: Destination) -> Result<(), TestCaseError> {
            let Destination::Upstream { index, uri, .. } = destination else { return Ok(()) };
            let route = routes.get(index);
            prop_assert_eq!(uri.scheme_str(), Some("https"));
            prop_assert_eq!(uri.host(), Some(route.host.as_str()));
            let rest = uri.path().strip_prefix(route.base_path.as_str());
            prop_assert!(
                rest.is_some_and(|rest| rest.is_empty() || rest.starts_with('/')),
                "{uri} outside {}",
                route.base_path
            );
            let rest = rest.unwrap_or_default();
            prop_assert!(!climbs_out(rest), "{uri} climbs out");
            prop_assert!(stays_inside_decoded(rest), "{uri} climbs out when decoded");
            Ok(())
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            #[test]
            fn routing_stays_under_the_configured_urls(path in path(), host in prop::sample::select(vec![
                "", "http://fn.example.com", "http://run.example.com", "http://127.0.0.1:15080", "http://127.0.0.1:15082",
            ])) {
                let routes = routes();
                let target = format!("{host}/{path}");
                let Ok(uri) = target.parse::<Uri>() else { return Ok(()) };
                for version in [Version::HTTP_11, Version::HTTP_2] {
                    if let Ok(destination) = routes.resolve(&Method::GET, version, &uri) {
                        check(&routes, destination)?;
                    }
                }
                for index in 0..routes.routes.len() {
                    if let Ok(destination) = routes.dedicated(index, &Method::GET, &uri) {
                        check(&routes, destination)?;
                    }
                }
            }

            #[test]
            fn a_path_let_through_stays_inside_when_decoded(path in path()) {
                if !climbs_out(&path) {
                    prop_assert!(stays_inside_decoded(&path), "{path}");
                }
            }
        }
    }
}
