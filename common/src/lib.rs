//! The contract shared by the wiproxy webhook and the sidecar: pod labels and annotations, the
//! environment the webhook hands the sidecar, and the upstream grammar both of them parse.

pub mod logging;
pub mod serve;
mod upstream;

pub use upstream::{parse_upstreams, TokenHeader, Upstream, UpstreamError, MAX_UPSTREAMS};

/// Pod label that asks for injection; only the value `"true"` counts.
pub const INJECT_LABEL: &str = "wiproxy.io/inject";
/// Pod annotation with the upstreams, `NAME=URL[;audience=AUD][;header=HEADER][;listen=PORT]`, one per line or comma-separated.
pub const UPSTREAMS_ANNOTATION: &str = "wiproxy.io/upstreams";
/// Pod annotation with the Google service account (GSA) email the pod acts as.
pub const SERVICE_ACCOUNT_ANNOTATION: &str = "wiproxy.io/service-account";
/// Pod annotation with the proxy port.
pub const PORT_ANNOTATION: &str = "wiproxy.io/port";
/// Pod annotation choosing the header the token travels in.
pub const TOKEN_HEADER_ANNOTATION: &str = "wiproxy.io/token-header";
/// Pod annotation listing containers that get no environment variables.
pub const SKIP_CONTAINERS_ANNOTATION: &str = "wiproxy.io/skip-containers";
/// Pod annotation overriding the sidecar's admin port.
pub const ADMIN_PORT_ANNOTATION: &str = "wiproxy.io/admin-port";
/// Pod annotation overriding the webhook's native-sidecar default.
pub const NATIVE_SIDECAR_ANNOTATION: &str = "wiproxy.io/native-sidecar";
/// Pod annotation written by the webhook; its presence marks an injected pod.
pub const STATUS_ANNOTATION: &str = "wiproxy.io/status";
/// Pod annotation written by the webhook off GKE: the sidecar's `external_account` credential
/// configuration, mounted into the sidecar alone through the downward API.
pub const CREDENTIAL_CONFIGURATION_ANNOTATION: &str = "wiproxy.io/credential-configuration";
/// ServiceAccount annotation through which GKE Workload Identity maps a KSA to a GSA.
pub const GKE_SERVICE_ACCOUNT_ANNOTATION: &str = "iam.gke.io/gcp-service-account";
/// Node label of GKE node pools that run the metadata server Workload Identity needs.
pub const GKE_METADATA_NODE_LABEL: &str = "iam.gke.io/gke-metadata-server-enabled";

/// Name of the injected sidecar container.
pub const SIDECAR_CONTAINER: &str = "wiproxy";
/// Default proxy port on the pod's loopback.
pub const DEFAULT_PORT: u16 = 15080;
/// Default port of the sidecar's admin server (`/healthz`, `/readyz`, `/metrics`), outside every
/// well-known port of the service meshes a pod may also carry (see [`mesh_ports`]).
pub const ADMIN_PORT: u16 = 15081;

/// The ports a service mesh's proxy binds inside the pod, whether or not its container declares
/// them: Istio and Cloud Service Mesh ("Ports used by Istio",
/// https://istio.io/latest/docs/ops/deployment/application-requirements/#ports-used-by-istio),
/// and Linkerd (https://linkerd.io/2/reference/architecture/#proxy: 4140 outbound, 4143 inbound,
/// 4190 tap, 4191 admin).
pub mod mesh_ports {
    pub const ISTIO: &[u16] = &[15000, 15001, 15004, 15006, 15008, 15009, 15020, 15021, 15053, 15090];
    pub const LINKERD: &[u16] = &[4140, 4143, 4190, 4191];
}

/// Environment variables the webhook sets on the sidecar and on app containers.
pub mod env {
    pub const UPSTREAMS: &str = "WIPROXY_UPSTREAMS";
    pub const LISTEN: &str = "WIPROXY_LISTEN";
    pub const ADMIN_LISTEN: &str = "WIPROXY_ADMIN_LISTEN";
    pub const TOKEN_HEADER: &str = "WIPROXY_TOKEN_HEADER";
    pub const EXPECTED_SERVICE_ACCOUNT: &str = "WIPROXY_EXPECTED_SERVICE_ACCOUNT";
    pub const LOG_FORMAT: &str = "WIPROXY_LOG_FORMAT";
    pub const CREDENTIALS: &str = "WIPROXY_CREDENTIALS";
    /// Workload Identity Federation: the universe that may receive the subject token, and the
    /// SHA-256 the credential configuration file must have.
    pub const UNIVERSE_DOMAIN: &str = "WIPROXY_UNIVERSE_DOMAIN";
    pub const CREDENTIAL_CONFIG_SHA256: &str = "WIPROXY_CREDENTIAL_CONFIG_SHA256";
    /// Base URL of the proxy, given to app containers.
    pub const URL: &str = "WIPROXY_URL";

    /// `WIPROXY_<NAME>_URL` for an upstream: the name upper-cased, `-` turned into `_`.
    pub fn upstream_url(name: &str) -> String {
        format!("WIPROXY_{}_URL", name.to_ascii_uppercase().replace('-', "_"))
    }

    /// `WIPROXY_<NAME>_ADDR` (`127.0.0.1:PORT`) for an upstream with its own `listen=PORT`.
    pub fn upstream_addr(name: &str) -> String {
        format!("WIPROXY_{}_ADDR", name.to_ascii_uppercase().replace('-', "_"))
    }
}

/// An error with its chain of causes, `outer: cause: root cause`, for messages that must say
/// what went wrong all the way down (a TLS failure inside a connect error, say).
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Whether `email` has the shape of a Google service account email, such as
/// `invoker@client-project.iam.gserviceaccount.com`.
pub fn is_service_account_email(email: &str) -> bool {
    let Some((local, domain)) = email.split_once('@') else {
        return false;
    };
    let label = |s: &str| {
        !s.is_empty()
            && s.len() <= 63
            && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !s.starts_with('-')
            && !s.ends_with('-')
    };
    label(local)
        && domain.ends_with("gserviceaccount.com")
        && domain.split('.').all(label)
        && domain.split('.').count() >= 3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_env_names() {
        assert_eq!(env::upstream_url("orders"), "WIPROXY_ORDERS_URL");
        assert_eq!(env::upstream_url("orders-v2"), "WIPROXY_ORDERS_V2_URL");
        assert_eq!(env::upstream_addr("grpc-api"), "WIPROXY_GRPC_API_ADDR");
    }

    #[test]
    fn service_account_emails() {
        for good in [
            "invoker@client-project.iam.gserviceaccount.com",
            "123456789-compute@developer.gserviceaccount.com",
            "my-project@appspot.gserviceaccount.com",
        ] {
            assert!(is_service_account_email(good), "{good}");
        }
        for bad in [
            "",
            "invoker",
            "invoker@",
            "@client-project.iam.gserviceaccount.com",
            "Invoker@client-project.iam.gserviceaccount.com",
            "invoker@example.com",
            "invoker@client-project.iam.gserviceaccount.com.evil.com",
            "in voker@client-project.iam.gserviceaccount.com",
            "a@b@client-project.iam.gserviceaccount.com",
        ] {
            assert!(!is_service_account_email(bad), "{bad}");
        }
    }
}
