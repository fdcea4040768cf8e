//! The body type both servers and the upstream client speak, and the small responses the sidecar
//! makes itself (JSON refusals, admin text), so every file builds them the same way.

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = BoxBody<Bytes, BoxError>;

/// A body of `bytes`, whole.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).map_err(|never| -> BoxError { match never {} }).boxed()
}

pub fn empty() -> Body {
    Empty::new().map_err(|never| -> BoxError { match never {} }).boxed()
}

/// A response with a JSON body.
pub fn json_response(status: StatusCode, body: serde_json::Value) -> Response<Body> {
    text_response(status, body.to_string(), "application/json")
}

/// A response with `body` as `content_type`.
pub fn text_response(status: StatusCode, body: impl Into<Bytes>, content_type: &'static str) -> Response<Body> {
    let mut response = Response::new(full(body));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// An answer the sidecar gives in place of the upstream's (a refusal, no token, an unreachable
/// upstream). HTTP clients get it as JSON; gRPC clients (`content-type: application/grpc*`) as a
/// trailers-only response, since they read `grpc-status`, never the HTTP status or the body.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    pub status: StatusCode,
    /// `{"error": …, "upstream": …, "reason": …}`; only `error` is always there.
    pub body: serde_json::Value,
}

impl Failure {
    pub fn new(status: StatusCode, body: serde_json::Value) -> Self {
        Self { status, body }
    }

    pub fn into_response(self, grpc: bool) -> Response<Body> {
        if !grpc {
            return json_response(self.status, self.body);
        }
        let field = |name: &str| self.body.get(name).and_then(|v| v.as_str()).filter(|v| !v.is_empty());
        let mut message = format!("wiproxy: {}", field("error").unwrap_or("refused"));
        if let Some(reason) = field("reason") {
            message.push_str(&format!(": {reason}"));
        }
        if let Some(upstream) = field("upstream") {
            message.push_str(&format!(" (upstream {upstream})"));
        }
        let mut response = Response::new(empty());
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        headers.insert("grpc-status", HeaderValue::from(grpc_status(self.status)));
        if let Ok(value) = HeaderValue::from_str(&grpc_message(&message)) {
            headers.insert("grpc-message", value);
        }
        response
    }
}

/// Whether a request is gRPC (`application/grpc`, `application/grpc+proto`, …; gRPC-Web, which
/// carries its status in the body, is not).
pub fn is_grpc(headers: &http::HeaderMap) -> bool {
    const GRPC: &[u8] = b"application/grpc";
    headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|v| {
        let v = v.trim().as_bytes();
        v.get(..GRPC.len()).is_some_and(|start| start.eq_ignore_ascii_case(GRPC))
            && matches!(v.get(GRPC.len()), None | Some(b'+' | b';'))
    })
}

/// gRPC's mapping of HTTP statuses to its codes (grpc/doc/http-grpc-status-mapping.md).
fn grpc_status(status: StatusCode) -> u16 {
    match status.as_u16() {
        400 => 13,             // INTERNAL
        401 => 16,             // UNAUTHENTICATED
        403 => 7,              // PERMISSION_DENIED
        404 => 12,             // UNIMPLEMENTED
        429 | 502..=504 => 14, // UNAVAILABLE
        _ => 2,                // UNKNOWN
    }
}

/// `grpc-message` is percent-encoded over UTF-8, leaving printable ASCII other than `%` as is
/// (gRPC's PROTOCOL-HTTP2.md); no crate we use has this exact set.
fn grpc_message(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    for byte in message.bytes() {
        if (0x20..=0x7e).contains(&byte) && byte != b'%' {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_clients_get_trailers_only_answers() {
        let failure = Failure::new(
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({"error": "no token", "upstream": "grpc", "reason": "metadata server: 100% down"}),
        );
        let response = failure.clone().into_response(true);
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["grpc-status"], "14");
        assert_eq!(
            response.headers()["grpc-message"],
            "wiproxy: no token: metadata server: 100%25 down (upstream grpc)"
        );
        assert_eq!(response.headers()[header::CONTENT_TYPE], "application/grpc");
        let json = failure.into_response(false);
        assert_eq!(json.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(json.headers()[header::CONTENT_TYPE], "application/json");
    }

    #[test]
    fn grpc_content_types() {
        let with = |value: &'static str| {
            let mut headers = http::HeaderMap::new();
            headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(value));
            is_grpc(&headers)
        };
        assert!(with("application/grpc"));
        assert!(with("Application/GRPC+proto"));
        assert!(with("application/grpc; charset=utf-8"));
        assert!(!with("application/grpc-web"));
        assert!(!with("application/grp"));
        assert!(!with("application/json"));
    }
}
