//! What every reconcile shares, and the controller's clock.

use std::sync::Mutex;

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::runtime::events::Recorder;
use kube::runtime::reflector::Store;

use crate::inference::metrics::InferenceMetrics;
use crate::pod::drain::History;
use crate::pod::settings::AgentImagePolicy;

/// Shared by every reconcile.
pub struct Context {
    pub client: kube::Client,
    pub pods: Store<Pod>,
    pub nodes: Store<Node>,
    pub metrics: InferenceMetrics,
    pub recorder: Recorder,
    /// The agent image when `spec.agent.image` is not set, and the ones a set may name.
    pub agent_images: AgentImagePolicy,
    /// Agent samples of draining pods (the drain protocol's quiet signal).
    pub history: Mutex<History>,
}

/// Seconds since the Unix epoch (the planner takes time as a number).
pub(super) fn now() -> f64 {
    k8s_openapi::jiff::Timestamp::now().as_millisecond() as f64 / 1000.0
}
