//! Everything a sidecar talks to, on loopback: the metadata server, Google's HTTPS APIs and a
//! Cloud Function front end serving several host names, plus the environment that points a
//! sidecar at them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use crate::function::{self, Function, Service};
use crate::google::{self, Google};
use crate::pki::TestCa;
use crate::serve;

pub const GSA: &str = "invoker@client-project.iam.gserviceaccount.com";
pub const KEY_FILE_GSA: &str = "onprem-invoker@client-project.iam.gserviceaccount.com";
pub const IMPERSONATED_GSA: &str = "impersonated@client-project.iam.gserviceaccount.com";

/// The host project's Cloud Functions host, and its gen1 function `orders`.
pub const FUNCTION_HOST: &str = "europe-west1-host-project.cloudfunctions.net";
pub const FUNCTION_URL: &str = "https://europe-west1-host-project.cloudfunctions.net/orders";
/// The Cloud Run service `inventory`: its hash URL, its deterministic URL
/// (`SERVICE-PROJECT_NUMBER.REGION.run.app`), a mapped custom domain and a custom audience.
pub const RUN_HOST: &str = "inventory-abc123-ew.a.run.app";
pub const RUN_DETERMINISTIC_HOST: &str = "inventory-210987654321.europe-west1.run.app";
pub const CUSTOM_HOST: &str = "custom.example.com";
pub const CUSTOM_AUDIENCE: &str = "https://custom-audience.example.com";
/// The gen2 function `invoices`: a cloudfunctions.net URL and the run.app URL of its service.
pub const GEN2_FUNCTION_URL: &str = "https://europe-west1-host-project.cloudfunctions.net/invoices";
pub const GEN2_RUN_HOST: &str = "invoices-abc123-ew.a.run.app";

pub struct World {
    pub ca: TestCa,
    pub google: Arc<Google>,
    pub function: Arc<Function>,
    pub metadata: SocketAddr,
    pub googleapis: SocketAddr,
    pub function_addr: SocketAddr,
    pub ca_file: PathBuf,
    _dir: tempfile::TempDir,
}

impl World {
    pub async fn start() -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let ca = TestCa::new();
        let google = Google::new(GSA);
        google.impersonable.lock().expect("lock").push(IMPERSONATED_GSA.to_owned());
        let function = Function::new(
            google.verifier(),
            vec![
                Service::function(FUNCTION_HOST, "orders", &[]),
                Service::cloud_run(&[RUN_HOST, RUN_DETERMINISTIC_HOST], &[CUSTOM_AUDIENCE]).with_domain(CUSTOM_HOST),
                Service::function(FUNCTION_HOST, "invoices", &[GEN2_RUN_HOST]),
            ],
            &[GSA, KEY_FILE_GSA, IMPERSONATED_GSA],
        );
        let metadata = serve::http(google::metadata_router(google.clone())).await;
        let googleapis = serve::https(
            google::googleapis_router(google.clone()),
            ca.server_config(&["oauth2.googleapis.com", "sts.googleapis.com", "iamcredentials.googleapis.com"]),
        )
        .await;
        let hosts = function.hosts();
        let hosts: Vec<&str> = hosts.iter().map(String::as_str).collect();
        let function_addr = serve::https(function::router(function.clone()), ca.server_config(&hosts)).await;
        let dir = tempfile::tempdir().expect("temp dir");
        let ca_file = ca.write_pem(dir.path());
        Self { ca, google, function, metadata, googleapis, function_addr, ca_file, _dir: dir }
    }

    /// `WIPROXY_RESOLVE`: the function's hosts and Google's APIs pinned to the fakes.
    pub fn resolve(&self) -> String {
        let f = self.function_addr;
        let g = self.googleapis;
        let functions: Vec<String> = self.function.hosts().iter().map(|host| format!("{host}={f}")).collect();
        format!(
            "{},oauth2.googleapis.com={g},sts.googleapis.com={g},iamcredentials.googleapis.com={g}",
            functions.join(",")
        )
    }

    /// The environment that points a sidecar at this world, with the given upstreams.
    pub fn env(&self, upstreams: &str) -> Vec<(String, String)> {
        vec![
            ("WIPROXY_UPSTREAMS".into(), upstreams.into()),
            ("WIPROXY_EXPECTED_SERVICE_ACCOUNT".into(), GSA.into()),
            ("GCE_METADATA_HOST".into(), self.metadata.to_string()),
            ("WIPROXY_EXTRA_CA_FILE".into(), self.ca_file.display().to_string()),
            ("WIPROXY_RESOLVE".into(), self.resolve()),
            ("WIPROXY_LOG".into(), "trace".into()),
        ]
    }

    /// Workload Identity Federation for KSA `namespace/ksa` acting as `gsa`: the binding in the
    /// fake IAM, a projected token file and the `external_account` configuration that
    /// `gcloud iam workload-identity-pools create-cred-config` writes for it. Returns the
    /// configuration's path and the token file's.
    pub fn write_external_account(
        &self,
        dir: &std::path::Path,
        namespace: &str,
        ksa: &str,
        gsa: &str,
    ) -> (PathBuf, PathBuf) {
        self.google
            .federated_bindings
            .lock()
            .expect("lock")
            .push((google::wif_principal(namespace, ksa), gsa.to_owned()));
        let token_path = dir.join("token");
        let token = self.google.cluster_token(namespace, ksa, &google::wif_token_audience(), 3600);
        std::fs::write(&token_path, token).expect("write the subject token");
        let config = serde_json::json!({
            "universe_domain": "googleapis.com",
            "type": "external_account",
            "audience": google::wif_audience(),
            "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
            "token_url": "https://sts.googleapis.com/v1/token",
            "credential_source": {"file": token_path, "format": {"type": "text"}},
            "service_account_impersonation_url": format!("https://iamcredentials.googleapis.com/v1/projects/-/serviceAccounts/{gsa}:generateAccessToken"),
        });
        let config_path = dir.join("credential-configuration.json");
        std::fs::write(&config_path, config.to_string()).expect("write the configuration");
        (config_path, token_path)
    }

    /// The fake service-account key with its `token_uri` left as Google's (pinned to the fake).
    pub fn write_key_file(&self, dir: &std::path::Path) -> PathBuf {
        let path = dir.join("key.json");
        std::fs::write(&path, google::SERVICE_ACCOUNT_KEY).expect("write key file");
        path
    }
}
