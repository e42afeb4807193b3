//! The local test ground: etcd, kube-apiserver, kube-controller-manager, kube-scheduler
//! and KWOK as local processes, the real node `local-0` (kubelet, containerd, kube-proxy;
//! see [`crate::node`]) and the service proxy, from binaries that `e2e/cluster/build.sh`
//! builds from pinned Go modules (and caches). `up` is idempotent; `down` stops exactly
//! what `up` started (by PID), gives back what the node changed on the machine, and
//! removes its state. Everything lives under `target/e2e/`.
//!
//! - [`ground`]: address ranges, node count, where things live;
//! - [`up`](mod@up): `up` and `down`;
//! - [`state`]: what `up` started;
//! - [`procs`]: the daemons, started and stopped by PID; [`pki`]: the throwaway PKI;
//! - [`client`], [`net`]: the API server, ports and routes;
//! - [`gateway_api`]: the Gateway API CRDs `up` installs;
//! - [`kube_proxy`]: kube-proxy's `minSyncPeriod` changed on the running ground;
//! - [`cli`]: `sluice-e2e cluster`;
//! - [`TestCluster`]: the ground for integration tests.

mod cli;
mod client;
pub mod gateway_api;
mod ground;
pub mod kube_proxy;
pub(crate) mod net;
pub(crate) mod pki;
pub(crate) mod procs;
mod state;
mod test_cluster;
mod up;

pub use cli::{ClusterCommand, run};
pub use client::{client_for, healthy};
pub use ground::{
    KWOK_NODE_ANNOTATION, KWOK_POD_CIDR, MAX_REAL_NODES, NODE_POD_CIDR, SERVICE_CIDR,
    kubeconfig_path, repo_root, state_dir,
};
pub use net::free_port;
pub use procs::Daemon;
pub use state::ClusterState;
pub use test_cluster::{GpuNodeProfile, TestCluster, TestNamespace};
pub use up::{UpArgs, down, up, upstream_binaries};

#[cfg(test)]
mod tests;
