//! wiproxy-webhook: the mutating admission webhook that injects the wiproxy token-proxy sidecar,
//! and `render`, the same injection offline.

pub mod admission;
pub mod cluster;
pub mod config;
pub mod denial;
pub mod inject;
pub mod metrics;
pub mod policy;
pub mod render;
pub mod server;
pub mod tls;
pub mod yaml;

use std::sync::Arc;

use cluster::ClusterView;
use inject::SidecarSettings;
use policy::PolicySet;

/// What the admission handler decides with.
pub struct Webhook {
    pub sidecar: SidecarSettings,
    pub policies: PolicySet,
    pub cluster: Arc<dyn ClusterView>,
}
