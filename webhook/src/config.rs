//! Command line of `wiproxy-webhook`; every flag can also be set as `WIPROXY_WEBHOOK_<FLAG>`.

use std::io::Read;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgAction, Args, Parser, Subcommand, ValueEnum};
use serde_json::Value;
use wiproxy_common::logging::LogFormat;

use crate::certs::SelfSigned;
use crate::inject::{self, Federation, SidecarSettings};
use crate::render::{RenderError, RenderJob, RenderOptions};
use crate::settings::GkeAutopilot;
use crate::yaml;

#[derive(Debug, Parser)]
#[command(name = "wiproxy-webhook", version, about = "Injects the wiproxy token-proxy sidecar into labelled pods")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log filter: a level, or targets such as "info,wiproxy_webhook=debug".
    #[arg(long, global = true, env = "WIPROXY_WEBHOOK_LOG", default_value = "info")]
    pub log: String,
    /// Log line format.
    #[arg(long, global = true, env = "WIPROXY_WEBHOOK_LOG_FORMAT", value_enum, default_value_t = LogFormat::Json)]
    pub log_format: LogFormat,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the admission webhook (POST /mutate) over TLS, with an admin port for probes and metrics.
    Serve(ServeArgs),
    /// Inject offline: read manifests, print them with every labelled pod template injected.
    Render(RenderArgs),
    /// Print the TokenProxyPolicy CustomResourceDefinition.
    Crd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum NativeSidecars {
    /// Native when the API server and every node's kubelet are 1.29 or newer (`render`: the
    /// Node documents of --cluster-file).
    Auto,
    Always,
    Never,
}

impl NativeSidecars {
    /// The injection's setting once the API server's version is known (`None`: no API server).
    pub fn settle(self, api_server_supports: Option<bool>) -> inject::NativeSidecars {
        match (self, api_server_supports) {
            (Self::Always, _) => inject::NativeSidecars::Always,
            (Self::Never, _) | (Self::Auto, Some(false)) => inject::NativeSidecars::Never,
            (Self::Auto, _) => inject::NativeSidecars::WhereKubeletsAllow,
        }
    }
}

/// Flags shared by `serve` and `render`.
#[derive(Debug, Args)]
pub struct SharedArgs {
    /// Read TokenProxyPolicies from this multi-document YAML file instead of the cluster.
    #[arg(long, env = "WIPROXY_WEBHOOK_POLICY_FILE", value_name = "FILE")]
    pub policy_file: Option<PathBuf>,
    /// ServiceAccounts and Namespaces that exist, as multi-document YAML, standing in for the cluster.
    #[arg(long, env = "WIPROXY_WEBHOOK_CLUSTER_FILE", value_name = "FILE")]
    pub cluster_file: Option<PathBuf>,
    /// Deny pods in namespaces that no policy selects.
    #[arg(long, env = "WIPROXY_WEBHOOK_POLICY_REQUIRED", value_name = "true|false", default_value_t = true, action = ArgAction::Set)]
    pub policy_required: bool,
    /// Image of the injected sidecar.
    #[arg(long, env = "WIPROXY_WEBHOOK_SIDECAR_IMAGE", value_name = "IMAGE", default_value_t = SidecarSettings::default_image())]
    pub sidecar_image: String,
    /// Workload Identity Federation for clusters outside GKE: the provider that trusts this
    /// cluster's ServiceAccount issuer, projects/NUMBER/locations/global/workloadIdentityPools/POOL/providers/PROVIDER.
    /// Injected sidecars then exchange a projected token instead of asking the GKE metadata server.
    #[arg(long, env = "WIPROXY_WEBHOOK_WORKLOAD_IDENTITY_PROVIDER", value_name = "PROVIDER")]
    pub workload_identity_provider: Option<String>,
    /// With --workload-identity-provider: the universe whose STS and IAM Credentials receive the
    /// subject token. Injected sidecars get it in their env and refuse a credential configuration
    /// that names another.
    #[arg(long, env = "WIPROXY_WEBHOOK_UNIVERSE_DOMAIN", value_name = "DOMAIN", default_value = inject::DEFAULT_UNIVERSE_DOMAIN)]
    pub universe_domain: String,
    /// Container resources of the sidecar, as JSON (the chart passes `sidecar.resources`). By
    /// default SidecarSettings::default_resources, or on GKE Autopilot requests equal to limits at
    /// Autopilot's minimums, so Autopilot takes them as they are.
    #[arg(long, env = "WIPROXY_WEBHOOK_SIDECAR_RESOURCES", value_name = "JSON")]
    pub sidecar_resources: Option<String>,
}

impl SharedArgs {
    pub fn sidecar(&self, native: inject::NativeSidecars, autopilot: bool) -> Result<SidecarSettings, String> {
        let default_resources = || match autopilot {
            true => SidecarSettings::autopilot_resources(),
            false => SidecarSettings::default_resources(),
        };
        let resources: Value = match self.sidecar_resources.as_deref().filter(|r| !r.trim().is_empty()) {
            None => default_resources(),
            Some(resources) => serde_json::from_str(resources)
                .map_err(|e| format!("--sidecar-resources is not JSON ({e}): write e.g. {}", default_resources()))?,
        };
        let valid = resources.as_object().is_some_and(|map| {
            map.iter().all(|(key, value)| match key.as_str() {
                "requests" | "limits" => value.is_object(),
                "claims" => value.is_array(),
                _ => false,
            })
        });
        if !valid {
            return Err(format!(
                "--sidecar-resources must be an object with \"requests\" and/or \"limits\": write e.g. {}",
                default_resources()
            ));
        }
        if self.sidecar_image.trim().is_empty() {
            return Err("--sidecar-image is empty: give the sidecar image reference".to_owned());
        }
        let federation = self
            .workload_identity_provider
            .as_deref()
            .filter(|p| !p.trim().is_empty())
            .map(|provider| Federation::new(provider)?.in_universe(&self.universe_domain))
            .transpose()?;
        Ok(SidecarSettings { image: self.sidecar_image.clone(), native, resources, federation, autopilot })
    }
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address of the TLS admission endpoint; 10250 passes the GKE private-cluster control-plane firewall.
    #[arg(long, env = "WIPROXY_WEBHOOK_LISTEN", default_value = "0.0.0.0:10250")]
    pub listen: SocketAddr,
    /// PEM certificate chain; reloaded when it changes.
    #[arg(
        long,
        env = "WIPROXY_WEBHOOK_TLS_CERT_FILE",
        value_name = "FILE",
        required_unless_present = "self_signed_secret"
    )]
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key; reloaded when it changes.
    #[arg(
        long,
        env = "WIPROXY_WEBHOOK_TLS_KEY_FILE",
        value_name = "FILE",
        required_unless_present = "self_signed_secret"
    )]
    pub tls_key_file: Option<PathBuf>,
    /// Manage a self-signed CA and serving certificate in this Secret instead of reading files
    /// (created if absent, shared by all replicas, renewed at two thirds of its lifetime).
    #[arg(long, env = "WIPROXY_WEBHOOK_SELF_SIGNED_SECRET", value_name = "NAMESPACE/NAME", conflicts_with_all = ["tls_cert_file", "tls_key_file"])]
    pub self_signed_secret: Option<String>,
    /// Self-signed mode: the Service the API server calls (its DNS names go into the certificate).
    #[arg(long, env = "WIPROXY_WEBHOOK_SELF_SIGNED_SERVICE", value_name = "NAME", default_value = "wiproxy")]
    pub self_signed_service: String,
    /// Self-signed mode: certificate lifetime in hours.
    #[arg(long, env = "WIPROXY_WEBHOOK_SELF_SIGNED_DURATION_HOURS", value_name = "HOURS", default_value_t = 8760)]
    pub self_signed_duration_hours: u64,
    /// Self-signed mode: webhook configurations (mutating and validating, by name) that get the CA as caBundle.
    #[arg(long, env = "WIPROXY_WEBHOOK_WEBHOOK_CONFIGURATIONS", value_name = "NAME[,NAME]", value_delimiter = ',')]
    pub webhook_configurations: Vec<String>,
    /// How often the certificate files are checked for changes, in seconds.
    #[arg(long, env = "WIPROXY_WEBHOOK_TLS_RELOAD_INTERVAL", value_name = "SECONDS", default_value_t = 5)]
    pub tls_reload_interval: u64,
    /// Address of the plain-HTTP admin server (/healthz, /readyz, /metrics).
    #[arg(long, env = "WIPROXY_WEBHOOK_ADMIN_LISTEN", default_value = "0.0.0.0:9090")]
    pub admin_listen: SocketAddr,
    /// Inject native sidecars (Kubernetes 1.29+).
    #[arg(long, env = "WIPROXY_WEBHOOK_NATIVE_SIDECARS", value_enum, default_value_t = NativeSidecars::Auto)]
    pub native_sidecars: NativeSidecars,
    /// GKE Autopilot: no metadata-server node selector (Autopilot rejects it) and Autopilot's
    /// sidecar resources.
    #[arg(long, env = "WIPROXY_WEBHOOK_GKE_AUTOPILOT", value_enum, default_value_t = GkeAutopilot::Auto)]
    pub gke_autopilot: GkeAutopilot,
    /// Longest wait for in-flight reviews after SIGTERM, in seconds.
    #[arg(long, env = "WIPROXY_WEBHOOK_DRAIN_TIMEOUT", value_name = "SECONDS", default_value_t = 20)]
    pub drain_timeout: u64,
    #[command(flatten)]
    pub connections: crate::server::ConnectionArgs,
    #[command(flatten)]
    pub shared: SharedArgs,
}

/// How `serve` runs, decided once from the flags.
#[derive(Debug)]
pub enum Mode {
    /// `--cluster-file`: no Kubernetes API at all; the serving pair from files.
    Files { cluster_file: PathBuf, cert: PathBuf, key: PathBuf },
    /// Against the Kubernetes API (in-cluster or KUBECONFIG).
    Cluster { certificate: ServingCertificate },
}

/// Where the serving certificate comes from in a cluster.
#[derive(Debug)]
pub enum ServingCertificate {
    Files { cert: PathBuf, key: PathBuf },
    SelfSigned(SelfSigned),
}

impl ServeArgs {
    /// The run mode the flags ask for, or what is missing or contradictory.
    pub fn mode(&self) -> Result<Mode, String> {
        let self_signed = self.self_signed()?;
        let files = match (&self.tls_cert_file, &self.tls_key_file) {
            (Some(cert), Some(key)) => Some((cert.clone(), key.clone())),
            _ => None,
        };
        let Some(cluster_file) = &self.shared.cluster_file else {
            let certificate = match (self_signed, files) {
                (Some(config), _) => ServingCertificate::SelfSigned(config),
                (None, Some((cert, key))) => ServingCertificate::Files { cert, key },
                (None, None) => {
                    return Err("give --tls-cert-file and --tls-key-file, or --self-signed-secret".to_owned())
                }
            };
            return Ok(Mode::Cluster { certificate });
        };
        if self.shared.policy_file.is_none() && self.shared.policy_required {
            return Err("--cluster-file needs --policy-file (or --policy-required=false): there is no cluster to read policies from".to_owned());
        }
        if self_signed.is_some() {
            return Err("--self-signed-secret needs the Kubernetes API: give --tls-cert-file and --tls-key-file with --cluster-file".to_owned());
        }
        let (cert, key) = files.ok_or("give --tls-cert-file and --tls-key-file")?;
        Ok(Mode::Files { cluster_file: cluster_file.clone(), cert, key })
    }

    /// The self-signed mode settings, when `--self-signed-secret` is given.
    pub fn self_signed(&self) -> Result<Option<SelfSigned>, String> {
        let Some(secret) = &self.self_signed_secret else { return Ok(None) };
        let Some((namespace, name)) = secret.split_once('/').filter(|(ns, n)| !ns.is_empty() && !n.is_empty()) else {
            return Err(format!("--self-signed-secret {secret:?}: write NAMESPACE/NAME"));
        };
        if self.self_signed_duration_hours < 24 {
            return Err("--self-signed-duration-hours: give at least 24".to_owned());
        }
        Ok(Some(SelfSigned {
            namespace: namespace.to_owned(),
            secret: name.to_owned(),
            service: self.self_signed_service.clone(),
            lifetime: Duration::from_secs(self.self_signed_duration_hours * 3600),
            webhook_configurations: self.webhook_configurations.clone(),
        }))
    }

    pub fn tls_reload_interval(&self) -> Duration {
        Duration::from_secs(self.tls_reload_interval.max(1))
    }

    pub fn drain_timeout(&self) -> Duration {
        Duration::from_secs(self.drain_timeout)
    }
}

#[derive(Debug, Args)]
pub struct RenderArgs {
    /// Manifests to inject, multi-document YAML; "-" reads standard input.
    #[arg(short = 'f', long = "filename", value_name = "FILE|-")]
    pub file: PathBuf,
    /// Namespace of documents that name none.
    #[arg(short = 'n', long, env = "WIPROXY_WEBHOOK_NAMESPACE", default_value = "default")]
    pub namespace: String,
    /// Inject native sidecars.
    #[arg(long, env = "WIPROXY_WEBHOOK_NATIVE_SIDECARS", value_enum, default_value_t = NativeSidecars::Always)]
    pub native_sidecars: NativeSidecars,
    /// Render for GKE Autopilot: no metadata-server node selector, Autopilot's sidecar resources.
    #[arg(long, env = "WIPROXY_WEBHOOK_GKE_AUTOPILOT", value_name = "true|false", default_value_t = false, action = ArgAction::Set)]
    pub gke_autopilot: bool,
    #[command(flatten)]
    pub shared: SharedArgs,
}

impl RenderArgs {
    /// Reads what the command line names: the manifests (`-` for standard input), the policy
    /// and cluster files, and the sidecar settings.
    pub fn load(&self) -> Result<RenderJob, RenderError> {
        let (input, source_name) = if self.file.as_os_str() == "-" {
            let mut text = String::new();
            std::io::stdin().read_to_string(&mut text).map_err(RenderError::Stdin)?;
            (text, "<stdin>".to_owned())
        } else {
            (yaml::read_file(&self.file)?, self.file.display().to_string())
        };
        let policies = match &self.shared.policy_file {
            Some(path) => yaml::load_policies(path)?,
            None => Vec::new(),
        };
        let cluster = match &self.shared.cluster_file {
            Some(path) => yaml::parse_stream(&yaml::read_file(path)?, &path.display().to_string())?,
            None => Vec::new(),
        };
        let native = self.native_sidecars.settle(None);
        let options = RenderOptions {
            namespace: self.namespace.clone(),
            sidecar: self.shared.sidecar(native, self.gke_autopilot).map_err(RenderError::Config)?,
            policies,
            policy_required: self.shared.policy_required,
            cluster,
        };
        Ok(RenderJob { input, source_name, options })
    }
}
