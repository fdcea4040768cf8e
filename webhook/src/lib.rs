//! wiproxy-webhook: the mutating admission webhook that injects the wiproxy token-proxy sidecar,
//! and `render`, the same injection offline.

pub mod admission;
pub mod certs;
pub mod cluster;
pub mod config;
pub mod denial;
pub mod inject;
pub mod live;
pub mod metrics;
pub mod policy;
pub mod policy_status;
pub mod render;
pub mod server;
pub mod tls;
pub mod yaml;

use std::sync::Arc;

use cluster::ClusterView;
use inject::SidecarSettings;
use live::LiveCluster;
use policy::PolicySet;
use policy_status::Policies;

/// What the admission handlers decide with.
pub struct Webhook {
    pub sidecar: SidecarSettings,
    pub policies: Arc<Policies>,
    pub cluster: Arc<dyn ClusterView>,
    /// The Kubernetes API, when the webhook runs in a cluster rather than from files.
    pub live: Option<Arc<LiveCluster>>,
}

impl Webhook {
    /// A webhook deciding from fixed policies and cluster state, with no Kubernetes API.
    pub fn offline(sidecar: SidecarSettings, policies: PolicySet, cluster: Arc<dyn ClusterView>) -> Self {
        Self { sidecar, policies: Arc::new(Policies::new(policies)), cluster, live: None }
    }
}
