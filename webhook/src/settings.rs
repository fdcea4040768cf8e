//! What the command line and the code that writes to the cluster share, kept below both so
//! neither imports the other: the name the webhook writes under, and the `--gke-autopilot` choice.

use clap::ValueEnum;

/// Field manager of the webhook's writes (server-side apply, status, metadata patches), the
/// reporter of its Events and the `app.kubernetes.io/managed-by` label of what it creates.
pub const MANAGER: &str = "wiproxy-webhook";

/// `--gke-autopilot`: whether the cluster is GKE Autopilot, which admits no privileged pods.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum GkeAutopilot {
    /// Detected at start from the cluster (`false` without a Kubernetes API).
    Auto,
    True,
    False,
}
