//! What the test ground is made of and where it keeps it: its address ranges, the real
//! nodes it issues certificates for, the repository and `target/e2e/`.
use std::path::{Path, PathBuf};

/// Simulated ClusterIPs. Routed to a blackhole: no packet for a Service IP leaves the machine.
pub const SERVICE_CIDR: &str = "10.96.0.0/16";
/// Pod IPs KWOK hands to simulated pods; blackholed likewise.
pub const KWOK_POD_CIDR: &str = "10.244.0.0/16";
/// Real nodes' pod addresses (one /24 each); blackholed as a whole, so a packet for a
/// vanished pod stays on the machine.
pub const NODE_POD_CIDR: &str = crate::node::POD_SUPERNET;
/// Nodes the PKI issues certificates for: `local-0` and the extra nodes tests may start.
pub const MAX_REAL_NODES: u8 = 9;
/// Annotation selecting the nodes KWOK manages.
pub const KWOK_NODE_ANNOTATION: (&str, &str) = ("kwok.x-k8s.io/node", "fake");

/// The repository root: `$SLUICE_REPO`, or the checkout this crate was built from.
pub fn repo_root() -> PathBuf {
    let root = std::env::var_os("SLUICE_REPO")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".."));
    // Normalized: the kubelet refuses paths with `..` in them.
    root.canonicalize().unwrap_or(root)
}

/// `target/e2e/` in the repository.
pub fn state_dir() -> PathBuf {
    repo_root().join("target").join("e2e")
}

/// The admin kubeconfig `up` writes.
pub fn kubeconfig_path() -> PathBuf {
    state_dir().join("kubeconfig")
}
