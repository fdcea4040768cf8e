//! Which upstream a request is for, and the URL it goes to. Origin-form requests name the
//! upstream in their first path segment (`/orders/v1/items`); absolute-form requests (an app
//! with `HTTP_PROXY` set) must lie under a configured upstream URL. Nothing else is forwarded.

use http::{Method, StatusCode, Uri, Version};
use wiproxy_common::{TokenHeader, Upstream};

/// Path of the endpoint that hands out raw tokens.
pub const TOKEN_PATH: &str = "/_wiproxy/token";

/// One upstream, ready for routing.
#[derive(Debug, Clone)]
pub struct Route {
    pub name: String,
    pub audience: String,
    pub header: TokenHeader,
    /// `https://host[:port]`, as written in the URL (host lower-cased).
    authority: String,
    host: String,
    port: Option<u16>,
    /// The URL's path without its trailing `/`; empty for the root.
    base_path: String,
    base_query: Option<String>,
}

/// Where a request goes.
#[derive(Debug, PartialEq, Eq)]
pub enum Destination {
    /// Forward to `uri` with the token of route `index`.
    Upstream { index: usize, uri: Uri },
    /// `GET /_wiproxy/token?upstream=NAME`.
    Token { index: usize },
}

/// A request that is not forwarded: its status and the message of the JSON body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: StatusCode,
    pub message: String,
}

fn refuse(status: StatusCode, message: impl Into<String>) -> Refusal {
    Refusal { status, message: message.into() }
}

#[derive(Debug, Clone)]
pub struct Routes {
    routes: Vec<Route>,
}

impl Routes {
    pub fn new(upstreams: &[Upstream], default_header: TokenHeader) -> Self {
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
                    authority,
                    host,
                    port,
                    base_path: u.parsed.path().trim_end_matches('/').to_owned(),
                    base_query: u.parsed.query().map(str::to_owned),
                }
            })
            .collect();
        Self { routes }
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

    /// Routes a request. HTTP/2 requests always carry an authority (`:authority`), so only an
    /// HTTP/1 request with an absolute URI is a proxy request.
    pub fn resolve(&self, method: &Method, version: Version, uri: &Uri) -> Result<Destination, Refusal> {
        if method == Method::CONNECT {
            return Err(refuse(
                StatusCode::METHOD_NOT_ALLOWED,
                "CONNECT is not supported: a token cannot be added inside a TLS tunnel; call http://127.0.0.1:PORT/<upstream>/… or set HTTP_PROXY for http:// URLs",
            ));
        }
        if uri.authority().is_some() && version < Version::HTTP_2 {
            return self.absolute(uri);
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
        let path = format!("{}{rest}", route.base_path);
        Ok(Destination::Upstream { index, uri: target(route, &path, uri.query())? })
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
        let port = uri.port_u16();
        let path = uri.path();
        let best = self
            .routes
            .iter()
            .enumerate()
            .filter(|(_, r)| r.host == host && (port.is_none() || port == r.port))
            .filter(|(_, r)| {
                path.strip_prefix(r.base_path.as_str()).is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
            })
            .max_by_key(|(_, r)| r.base_path.len());
        let Some((index, route)) = best else {
            return Err(refuse(
                StatusCode::FORBIDDEN,
                format!(
                    "{uri} is not under a configured upstream: only {} may be called through this proxy",
                    self.names()
                ),
            ));
        };
        check_dot_segments(&path[route.base_path.len()..])?;
        Ok(Destination::Upstream { index, uri: target(route, path, uri.query())? })
    }
}

fn target(route: &Route, path: &str, query: Option<&str>) -> Result<Uri, Refusal> {
    let path = if path.is_empty() { "/" } else { path };
    let query = match (route.base_query.as_deref(), query) {
        (Some(base), Some(extra)) => format!("?{base}&{extra}"),
        (Some(only), None) | (None, Some(only)) => format!("?{only}"),
        (None, None) => String::new(),
    };
    format!("https://{}{path}{query}", route.authority)
        .parse()
        .map_err(|e| refuse(StatusCode::BAD_REQUEST, format!("cannot build the upstream URL: {e}")))
}

/// Refuses a path whose dot-segments (`..`, `%2e%2e`, …) would climb above its start.
fn check_dot_segments(rest: &str) -> Result<(), Refusal> {
    let mut depth = 0i32;
    for segment in rest.split('/').filter(|s| !s.is_empty()) {
        let decoded = segment.replace("%2e", ".").replace("%2E", ".");
        match decoded.as_str() {
            "." => {}
            ".." => {
                depth -= 1;
                if depth < 0 {
                    return Err(refuse(
                        StatusCode::BAD_REQUEST,
                        "the path climbs out of the upstream's path with '..': remove the dot-segments",
                    ));
                }
            }
            _ => depth += 1,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use wiproxy_common::parse_upstreams;

    fn routes() -> Routes {
        let upstreams = parse_upstreams(
            "orders=https://fn.example.com/orders,root=https://run.example.com,\
             deep=https://fn.example.com/orders/v2;header=x-serverless-authorization,q=https://q.example.com/api?key=1",
        )
        .expect("valid");
        Routes::new(&upstreams, TokenHeader::Authorization)
    }

    fn resolve(method: Method, uri: &str) -> Result<(String, String), StatusCode> {
        let routes = routes();
        match routes.resolve(&method, Version::HTTP_11, &uri.parse().expect("uri")) {
            Ok(Destination::Upstream { index, uri }) => Ok((routes.get(index).name.clone(), uri.to_string())),
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
        ok("/orders/a/../b", "orders", "https://fn.example.com/orders/a/../b");
        ok("/_wiproxy/token?upstream=deep", "deep", "token");
        assert_eq!(resolve(Method::GET, "/nope/x"), Err(StatusCode::NOT_FOUND));
        assert_eq!(resolve(Method::GET, "/"), Err(StatusCode::NOT_FOUND));
        assert_eq!(resolve(Method::GET, "/_wiproxy/token"), Err(StatusCode::BAD_REQUEST));
        assert_eq!(resolve(Method::POST, "/_wiproxy/token?upstream=orders"), Err(StatusCode::METHOD_NOT_ALLOWED));
        assert_eq!(resolve(Method::GET, "/_wiproxy/token?upstream=nope"), Err(StatusCode::NOT_FOUND));
    }

    #[test]
    fn dot_segments_cannot_climb_out() {
        for uri in [
            "/orders/..",
            "/orders/../admin",
            "/orders/a/../../x",
            "/orders/%2e%2e/x",
            "/orders/%2E./x",
            "/orders/.%2e",
        ] {
            assert_eq!(resolve(Method::GET, uri), Err(StatusCode::BAD_REQUEST), "{uri}");
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
        for refused in [
            "http://fn.example.com/orders-admin",
            "http://fn.example.com/",
            "http://evil.example.com/orders",
            "http://fn.example.com:8080/orders",
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
        let Ok(Destination::Upstream { index, uri }) = routes.resolve(&Method::GET, Version::HTTP_2, &uri) else {
            panic!("an h2 request names its upstream in the path");
        };
        assert_eq!(routes.get(index).name, "orders");
        assert_eq!(uri.to_string(), "https://fn.example.com/orders/x");
    }
}
