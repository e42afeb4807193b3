//! The service proxy: kube-proxy's data-path semantics on loopback.
//!
//! Every Service with a cluster IP gets a stable loopback address (`127.x.y.z`, derived from
//! its name) and a listener per port. Each *new* TCP connection goes to a ready endpoint of
//! the Service's EndpointSlices (round robin); when no endpoint is ready it falls back to
//! endpoints that are serving and terminating (kube-proxy's ProxyTerminatingEndpoints). An
//! established connection stays with its backend whatever the EndpointSlices say later, as
//! conntrack keeps it. `--propagation-delay` applies every EndpointSlice change only after a
//! delay, reproducing load balancers that learn about endpoint changes late.
//!
//! The daemon (`sluice-e2e svc-proxy`) serves every namespace and writes the address map to
//! `services.json`; scenarios start their own [`ServiceProxy`] in-process with their own
//! delay for their own namespace.
//!
//! - [`endpoints`]: EndpointSlices to endpoints, the backend choice, stable addresses (pure);
//! - [`proxy`]: [`ServiceProxy`], following the API and applying changes late;
//! - [`datapath`]: listeners and forwarded connections;
//! - [`cli`]: `sluice-e2e svc-proxy`.

mod cli;
mod datapath;
mod endpoints;
mod proxy;

pub use cli::{SvcProxyArgs, run};
pub use endpoints::{Endpoint, derive_address, endpoints_of, pick};
pub use proxy::{ProxyConfig, ServiceProxy, write_atomically};

#[cfg(test)]
mod tests;
