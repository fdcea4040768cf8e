//! A mocked Kubernetes API (`tower-test`): take the client's calls one by one and answer them.

use std::time::Duration;

use http::{Request, Response, StatusCode};
use kube::client::Body;
use kube::Client;
use serde_json::Value;
use tower_test::mock::{self, Handle, SendResponse};

pub type ApiHandle = Handle<Request<Body>, Response<Body>>;

pub fn client() -> (Client, ApiHandle) {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    (Client::new(service, "default"), handle)
}

/// The next call, within five seconds.
pub async fn next(handle: &mut ApiHandle) -> (Request<Body>, SendResponse<Response<Body>>) {
    tokio::time::timeout(Duration::from_secs(5), handle.next_request())
        .await
        .expect("an API call in time")
        .expect("the client is alive")
}

/// Fails when another call arrives within 300 ms.
pub async fn no_more_calls(handle: &mut ApiHandle) {
    if let Ok(Some((request, _))) = tokio::time::timeout(Duration::from_millis(300), handle.next_request()).await {
        panic!("unexpected API call {} {}", request.method(), request.uri());
    }
}

pub fn reply(send: SendResponse<Response<Body>>, status: StatusCode, body: Value) {
    let response =
        Response::builder().status(status).body(Body::from(body.to_string().into_bytes())).expect("response");
    send.send_response(response);
}

pub async fn body_json(request: Request<Body>) -> Value {
    let bytes = request.into_body().collect_bytes().await.expect("body");
    serde_json::from_slice(&bytes).expect("JSON body")
}
