//! wiproxy-webhook: the mutating admission webhook that injects the wiproxy token-proxy sidecar,
//! and `render`, the same injection offline.

pub mod admission;
pub mod certs;
pub mod cluster;
pub mod config;
pub mod denial;
pub mod inject;
pub mod listen_ports;
pub mod mesh;
pub mod metrics;
pub mod policy;
pub mod policy_status;
pub mod render;
pub mod review;
pub mod review_limits;
pub mod server;
pub mod settings;
pub mod tls;
pub mod workload;
pub mod yaml;

use std::sync::Arc;

use cluster::{Cluster, StaticCluster};
use inject::SidecarSettings;
use policy::PolicySet;
use policy_status::Policies;

/// What the admission handlers decide with.
pub struct Webhook {
    pub sidecar: SidecarSettings,
    pub policies: Arc<Policies>,
    pub cluster: Cluster,
}

impl Webhook {
    /// A webhook deciding from fixed policies and cluster state, with no Kubernetes API.
    pub fn from_files(sidecar: SidecarSettings, policies: PolicySet, cluster: StaticCluster) -> Self {
        Self { sidecar, policies: Arc::new(Policies::new(policies)), cluster: Cluster::Files(cluster) }
    }
}
