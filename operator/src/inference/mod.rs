//! The InferenceSet controller and the gang binder (GPU inference fleets).
//!
//! - [`crd`]: the `InferenceSet` resource and its admission rules;
//! - [`affinity`]: node eligibility of a pod (taints, `nodeSelector`, required node
//!   affinity) and the constraints the binder does not honour;
//! - [`plan`]: the pure planner (gangs, scale, node loss, slot-swap rollouts);
//! - [`binder`]: the gang binder for pods with `schedulerName: sluice` (its fleet an
//!   index the Node and Pod caches update object by object);
//! - [`controller`]: gather → plan → execute → status;
//! - [`metrics`]: the `sluice_inference_*` metrics.
//!
//! See `docs/inference.md`.

pub mod affinity;
pub mod binder;
pub mod controller;
pub mod crd;
mod error;
pub mod metrics;
pub mod plan;

#[cfg(test)]
mod plan_tests;

use std::sync::Arc;

use crate::pod::settings::{AgentImagePolicy, DEFAULT_AGENT_IMAGE};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::Api;
use kube::runtime::watcher;
use prometheus_client::registry::Registry;
pub use sluice_placement::TopologyConfig;
use tokio::sync::Notify;

pub use crd::{InferenceSet, InferenceSetSpec, InferenceSetStatus};
pub use error::Error;

/// Options of the InferenceSet controller and the binder.
#[derive(Clone, Debug, Default)]
pub struct Config {
    /// Topology label levels, coarse to fine (default zone → `sluice.dev/rack` →
    /// `nvidia.com/gpu.clique`).
    pub topology: TopologyConfig,
    /// Run the gang binder (pods with `schedulerName: sluice`). Default true via `new`.
    pub binder: bool,
    /// Run the InferenceSet controller.
    pub controller: bool,
    /// The agent image injected when a set names none, and the ones a set may name.
    pub agent_images: AgentImagePolicy,
    /// The one namespace the controller and the binder watch pods in (tests run one
    /// operator per namespace side by side); `None`: every namespace. Nodes stay
    /// cluster-wide.
    pub watch_namespace: Option<String>,
    /// This replica's name in the events it publishes (the pod name in a cluster).
    pub identity: Option<String>,
}

impl Config {
    /// Both the controller and the binder with the default topology levels, the default
    /// agent image only, every namespace. The binary fills the rest from its flags.
    pub fn new() -> Self {
        Self {
            topology: TopologyConfig::default(),
            binder: true,
            controller: true,
            agent_images: AgentImagePolicy::only(DEFAULT_AGENT_IMAGE),
            watch_namespace: None,
            identity: None,
        }
    }
}

/// Register the metrics and return the future that runs the InferenceSet controller and
/// the gang binder (shared Node and Pod caches). Spawn it after winning leadership; it
/// runs until dropped.
pub fn run(
    client: kube::Client,
    registry: &mut Registry,
    config: Config,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    let metrics = metrics::register(registry);
    async move {
        let wake = Arc::new(Notify::new());
        let (nodes, node_watch) = binder::reflect(
            Api::<Node>::all(client.clone()),
            watcher::Config::default(),
            wake.clone(),
        );
        let scope = config.watch_namespace.clone();
        let pod_api = match &scope {
            Some(ns) => Api::<Pod>::namespaced(client.clone(), ns),
            None => Api::<Pod>::all(client.clone()),
        };
        let (pods, pod_watch) = binder::reflect(pod_api, watcher::Config::default(), wake.clone());
        let binder = {
            let (client, nodes, pods, metrics) =
                (client.clone(), nodes.clone(), pods.clone(), metrics.clone());
            let (run_binder, topology, identity) =
                (config.binder, config.topology, config.identity.clone());
            async move {
                if run_binder {
                    binder::run(client, nodes, pods, wake, topology, metrics, identity).await;
                } else {
                    std::future::pending::<()>().await;
                }
            }
        };
        let controller = async move {
            if config.controller {
                controller::run(
                    client,
                    pods,
                    nodes,
                    metrics,
                    scope,
                    config.agent_images,
                    config.identity,
                )
                .await;
            } else {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            _ = node_watch => tracing::error!("node watch ended"),
            _ = pod_watch => tracing::error!("pod watch ended"),
            _ = binder => tracing::error!("gang binder ended"),
            _ = controller => tracing::error!("InferenceSet controller ended"),
        }
    }
}
