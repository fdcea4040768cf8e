//! Test fakes for wiproxy: the GKE metadata server, Google's OAuth and IAM Credentials
//! endpoints, a Cloud Function front end that checks ID tokens like Google, a Kubernetes API
//! server, a test CA, and the `wiproxy` process under test. Used by the end-to-end tests, the
//! benchmark and `make demo`.

pub mod apiserver;
pub mod client;
pub mod function;
pub mod google;
pub mod jwt;
pub mod pki;
pub mod serve;
pub mod sidecar;
pub mod world;
