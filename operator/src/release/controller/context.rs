//! What every reconcile shares: the errors, the context, the controller's configuration.

use std::sync::Mutex;

use kube::Client;
use kube::runtime::events::Recorder;

use crate::pod::settings::AgentImagePolicy;
use crate::release::metrics::ReleaseMetrics;
use crate::release::samples::SampleStore;

use super::stores::Stores;

/// Errors of one reconcile; each has a metric label.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("serializing: {0}")]
    Serialize(#[from] serde_json::Error),
    #[error("object has no {0}")]
    MissingField(&'static str),
    #[error("Deployment {0:?} has no pod template spec")]
    NoTemplate(String),
    /// A bug: the reconcile of this object panicked. Contained to this object; the
    /// process and every other object's reconciles go on.
    #[error("the reconcile panicked: {0}")]
    Panic(String),
}

impl Error {
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(kube::Error::Api(s)) if s.code == 409 => "conflict",
            Error::Kube(kube::Error::Api(_)) => "api",
            Error::Kube(_) => "kube",
            Error::Serialize(_) => "serialize",
            Error::MissingField(_) => "invalid_object",
            Error::NoTemplate(_) => "invalid_workload",
            Error::Panic(_) => "panic",
        }
    }
}

/// Shared by every reconcile.
pub struct Context {
    pub client: Client,
    pub metrics: ReleaseMetrics,
    pub recorder: Recorder,
    /// The agent image injected by default and the ones Releases may name.
    pub agent_images: AgentImagePolicy,
    pub(super) samples: Mutex<SampleStore>,
    /// The ReplicaSets and pods a round reads, from the watches.
    pub(super) stores: Stores,
}

/// How the Release controller runs: the operator's flags.
#[derive(Clone, Debug)]
pub struct Config {
    pub agent_images: AgentImagePolicy,
    /// The one namespace to watch (tests run one operator per namespace side by side);
    /// `None`: every namespace.
    pub watch_namespace: Option<String>,
    /// This replica's name in the events it publishes (the pod name in a cluster).
    pub identity: Option<String>,
}

impl Config {
    /// `allowed`: images a Release may name besides `default_image` (blanks ignored).
    pub fn new(default_image: String, allowed: impl IntoIterator<Item = String>) -> Self {
        Self {
            agent_images: AgentImagePolicy {
                default_image,
                allowed: allowed
                    .into_iter()
                    .map(|a| a.trim().to_string())
                    .filter(|a| !a.is_empty())
                    .collect(),
            },
            watch_namespace: None,
            identity: None,
        }
    }
}

pub(super) fn now_secs() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// The sample store. A panic while it was held (contained by [`contain_panic`]) leaves it
/// poisoned; the samples are still consistent enough to go on with (the worst is a lost
/// sample), so carry on rather than fail every later reconcile.
pub(super) fn lock_samples(ctx: &Context) -> std::sync::MutexGuard<'_, SampleStore> {
    ctx.samples
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
