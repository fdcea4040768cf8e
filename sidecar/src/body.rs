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
