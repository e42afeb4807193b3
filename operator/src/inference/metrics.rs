//! Prometheus metrics of the InferenceSet controller and the gang binder
//! (`sluice_inference_*` under the operator's `sluice` registry prefix).

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::telemetry::{ObjectLabels, ReasonLabels, ReconcileMetrics};

/// Handles to every metric; cheap to clone.
#[derive(Clone)]
pub struct InferenceMetrics {
    /// Time to choose a gang's placement (the placer's decision).
    pub placement_seconds: Histogram,
    /// Time to bind all pods of a gang through the API server.
    pub bind_seconds: Histogram,
    /// Time to build the binder's fleet model from the Node and Pod caches (per round).
    pub fleet_build_seconds: Histogram,
    /// Binder rounds (each places every complete pending gang).
    pub binder_rounds: Counter,
    /// From the gang's last pod creation until all its pods were bound.
    pub gang_wait_seconds: Histogram,
    /// Pods bound.
    pub binds: Counter,
    /// Gangs bound whole.
    pub gangs_bound: Counter,
    /// Gangs whose bind failed part-way (deleted whole).
    pub bind_failures: Counter,
    /// Complete gangs waiting for a placement at the last binder round.
    pub gangs_pending: Gauge,
    /// Placement failures by reason.
    pub placement_failures: Family<ReasonLabels, Counter>,
    /// Replicas on the update revision / desired, per set.
    pub rollout_progress: Family<ObjectLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    /// Replicas in service, per set.
    pub serving_replicas: Family<ObjectLabels, Gauge>,
    /// Replicas lost (node loss, exited pod) and placed again, per set.
    pub replicas_lost: Family<ObjectLabels, Counter>,
    /// `reconcile_runs_total`, `reconcile_duration_seconds`, `reconcile_errors_total{kind}`
    /// (the errors count failed binder rounds too).
    pub reconcile: ReconcileMetrics,
}

impl Default for InferenceMetrics {
    fn default() -> Self {
        Self {
            placement_seconds: Histogram::new(exponential_buckets(0.00001, 2.0, 18)),
            bind_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 14)),
            fleet_build_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            binder_rounds: Counter::default(),
            gang_wait_seconds: Histogram::new(exponential_buckets(0.01, 2.0, 16)),
            binds: Counter::default(),
            gangs_bound: Counter::default(),
            bind_failures: Counter::default(),
            gangs_pending: Gauge::default(),
            placement_failures: Family::default(),
            rollout_progress: Family::default(),
            serving_replicas: Family::default(),
            replicas_lost: Family::default(),
            reconcile: ReconcileMetrics::default(),
        }
    }
}

/// Register the metrics under `<prefix>_inference_` and return their handles.
pub fn register(registry: &mut Registry) -> InferenceMetrics {
    let mut m = InferenceMetrics::default();
    let r = registry.sub_registry_with_prefix("inference");
    r.register(
        "placement_seconds",
        "Time to choose a gang's placement",
        m.placement_seconds.clone(),
    );
    r.register(
        "bind_seconds",
        "Time to bind all pods of a gang",
        m.bind_seconds.clone(),
    );
    r.register(
        "fleet_build_seconds",
        "Time to build the binder's fleet model from the caches",
        m.fleet_build_seconds.clone(),
    );
    r.register("binder_rounds", "Binder rounds", m.binder_rounds.clone());
    r.register(
        "gang_wait_seconds",
        "From a gang's creation until all its pods were bound",
        m.gang_wait_seconds.clone(),
    );
    r.register("binds", "Pods bound by the gang binder", m.binds.clone());
    r.register("gangs_bound", "Gangs bound whole", m.gangs_bound.clone());
    r.register(
        "bind_failures",
        "Gangs whose bind failed part-way and were deleted whole",
        m.bind_failures.clone(),
    );
    r.register(
        "gangs_pending",
        "Complete gangs waiting for a placement",
        m.gangs_pending.clone(),
    );
    r.register(
        "placement_failures",
        "Gangs that could not be placed, by reason",
        m.placement_failures.clone(),
    );
    r.register(
        "rollout_progress_ratio",
        "Replicas on the update revision divided by desired replicas",
        m.rollout_progress.clone(),
    );
    r.register(
        "serving_replicas",
        "Replicas in service",
        m.serving_replicas.clone(),
    );
    r.register(
        "replicas_lost",
        "Replicas lost and placed again",
        m.replicas_lost.clone(),
    );
    m.reconcile =
        ReconcileMetrics::register(r, "Failed reconciles and binder rounds by error kind");
    m
}

impl InferenceMetrics {
    pub fn reconcile_error(&self, e: &super::error::Error) {
        self.reconcile.error(e.metric_label());
    }

    pub fn placement_failed(&self, e: &sluice_placement::PlaceError) {
        self.placement_failures
            .get_or_create(&ReasonLabels {
                reason: place_error_label(e).to_string(),
            })
            .inc();
    }

    pub fn set_progress(&self, ns: &str, name: &str, updated: i32, desired: i32, serving: i32) {
        let l = ObjectLabels::new(ns, name);
        let ratio = if desired > 0 {
            f64::from(updated) / f64::from(desired)
        } else {
            1.0
        };
        self.rollout_progress.get_or_create(&l).set(ratio);
        self.serving_replicas
            .get_or_create(&l)
            .set(i64::from(serving));
    }

    pub fn replica_lost(&self, ns: &str, name: &str) {
        self.replicas_lost
            .get_or_create(&ObjectLabels::new(ns, name))
            .inc();
    }

    pub fn forget(&self, ns: &str, name: &str) {
        let l = ObjectLabels::new(ns, name);
        self.rollout_progress.remove(&l);
        self.serving_replicas.remove(&l);
    }
}

/// Map a placement error to a short metric label.
pub fn place_error_label(e: &sluice_placement::PlaceError) -> &'static str {
    use sluice_placement::PlaceError;
    match e {
        PlaceError::InvalidRequest(_) => "invalid_request",
        PlaceError::UnknownLevel(_) => "unknown_level",
        PlaceError::NoMatchingGpu { .. } => "no_matching_gpu",
        PlaceError::PodLargerThanAnyNode { .. } => "pod_larger_than_any_node",
        PlaceError::RequiredDomainTooSmall { .. } => "required_domain_too_small",
        PlaceError::RequiredDomainFull { .. } => "required_domain_full",
        PlaceError::SpreadUnsatisfiable { .. } => "spread_unsatisfiable",
        PlaceError::InsufficientCapacity { .. } => "insufficient_capacity",
    }
}
