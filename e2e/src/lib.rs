//! Sluice's local test ground as a library: a real control plane built from pinned Go
//! modules (see `e2e/cluster/`), KWOK nodes, real nodes (kubelet, containerd), a service proxy and a load
//! generator, a Prometheus that scrapes the agents, and Traefik as a Gateway API implementation
//! ([`gateway`]) with the counters of upstream connections its pods accepted ([`upstream`]).
//! Integration tests use [`TestCluster`](cluster::TestCluster).

pub mod api_requests;
pub mod cluster;
pub mod cpu;
pub mod gateway;
pub mod load;
pub mod node;
pub mod prometheus;
pub mod scenario;
pub mod scenario_sluice;
pub mod svc_proxy;
pub mod tail;
pub mod telemetry;
pub mod upstream;
