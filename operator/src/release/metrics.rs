//! Prometheus metrics of the Release controller (`sluice_release_*` under the operator's
//! `sluice` registry prefix).

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use prometheus_client::encoding::EncodeLabelSet;

use super::crd::Phase;
use super::gates::{Evaluation, Verdict};
use crate::telemetry::{ObjectLabels, ReasonLabels, ReconcileMetrics};

/// A Release's phase series: one per phase, 1 for the current one.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    pub namespace: String,
    pub name: String,
    pub phase: String,
}

/// A gate evaluation's series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GateLabels {
    pub gate: String,
}

/// A gate evaluation's series by result.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GateResultLabels {
    pub gate: String,
    pub result: String,
}

/// Finished drains by outcome (the drain record's state).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: String,
}

/// Analysis measurements by phase (`Successful`, `Failed`, `Inconclusive`, `Error`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MeasurementLabels {
    pub phase: String,
}

/// Webhook calls by type and decision (`Proceed`, `Halt`, `RollBack`, `Sent`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WebhookLabels {
    pub r#type: String,
    pub decision: String,
}

#[derive(Clone)]
pub struct ReleaseMetrics {
    /// 1 for the Release's current phase, 0 for the others.
    pub phase: Family<PhaseLabels, Gauge>,
    /// Current step index.
    pub step: Family<ObjectLabels, Gauge>,
    pub gate_evaluations: Family<GateResultLabels, Counter>,
    pub gate_failures: Family<GateLabels, Counter>,
    pub aborts: Family<ReasonLabels, Counter>,
    pub drain_duration: Histogram,
    pub drain_quiet: Histogram,
    pub drain_connections_closed: Counter,
    pub drains: Family<OutcomeLabels, Counter>,
    /// Released pods whose agent refused the kubelet's preStop `/drain` (counted when
    /// seen, once per pod; `drains_total{outcome="Refused"}` counts them when gone).
    pub drains_refused: Counter,
    pub analysis_measurements: Family<MeasurementLabels, Counter>,
    pub webhook_calls: Family<WebhookLabels, Counter>,
    /// The canary's weight (percent) on the routes of a Release with traffic routing.
    pub route_canary_weight: Family<ObjectLabels, Gauge>,
    /// The canary's share (percent) of the requests its agents measured, for comparison
    /// with the weight.
    pub measured_canary_percent: Family<ObjectLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    /// `reconcile_runs_total`, `reconcile_duration_seconds`, `reconcile_errors_total{kind}`.
    pub reconcile: ReconcileMetrics,
}

impl Default for ReleaseMetrics {
    fn default() -> Self {
        Self {
            phase: Family::default(),
            step: Family::default(),
            gate_evaluations: Family::default(),
            gate_failures: Family::default(),
            aborts: Family::default(),
            drain_duration: Histogram::new(exponential_buckets(0.5, 2.0, 10)),
            drain_quiet: Histogram::new(exponential_buckets(0.25, 2.0, 10)),
            drain_connections_closed: Counter::default(),
            drains: Family::default(),
            drains_refused: Counter::default(),
            analysis_measurements: Family::default(),
            webhook_calls: Family::default(),
            route_canary_weight: Family::default(),
            measured_canary_percent: Family::default(),
            reconcile: ReconcileMetrics::default(),
        }
    }
}

/// Register the Release metrics under `<prefix>_release_` and return their handles.
pub fn register(registry: &mut Registry) -> ReleaseMetrics {
    let mut m = ReleaseMetrics::default();
    let r = registry.sub_registry_with_prefix("release");
    r.register(
        "phase",
        "Release phase (1 for the current one)",
        m.phase.clone(),
    );
    r.register("step", "Index of the step in progress", m.step.clone());
    r.register(
        "gate_evaluations",
        "Gate evaluations by gate and result",
        m.gate_evaluations.clone(),
    );
    r.register(
        "gate_failures",
        "Failed gate evaluations",
        m.gate_failures.clone(),
    );
    r.register("aborts", "Releases aborted, by reason", m.aborts.clone());
    r.register(
        "drain_duration_seconds",
        "From unserving a pod until it is gone",
        m.drain_duration.clone(),
    );
    r.register(
        "drain_quiet_seconds",
        "From unserving a pod until no new connection reached it for the quiet period",
        m.drain_quiet.clone(),
    );
    r.register(
        "drain_connections_closed",
        "Connections the agents closed while draining",
        m.drain_connections_closed.clone(),
    );
    r.register("drains", "Finished drains by outcome", m.drains.clone());
    r.register(
        "drains_refused",
        "Released pods whose agent refused the kubelet's preStop /drain (wrong or missing drain token): no paced close",
        m.drains_refused.clone(),
    );
    r.register(
        "analysis_measurements",
        "Metric analysis measurements by phase",
        m.analysis_measurements.clone(),
    );
    r.register(
        "webhook_calls",
        "Webhook calls by type and decision",
        m.webhook_calls.clone(),
    );
    r.register(
        "route_canary_weight",
        "The canary's weight (percent) on the Gateway API routes of a Release with spec.trafficRouting",
        m.route_canary_weight.clone(),
    );
    r.register(
        "measured_canary_percent",
        "The canary's share (percent) of the requests the agents served over the verification window",
        m.measured_canary_percent.clone(),
    );
    m.reconcile = ReconcileMetrics::register(r, "Failed reconciles by error kind");
    m
}

fn phase_labels(ns: &str, name: &str, p: Phase) -> PhaseLabels {
    PhaseLabels {
        namespace: ns.to_string(),
        name: name.to_string(),
        phase: p.as_str().to_string(),
    }
}

impl ReleaseMetrics {
    /// A Release was aborted for `reason`.
    pub fn aborted(&self, reason: &str) {
        self.aborts
            .get_or_create(&ReasonLabels {
                reason: reason.to_string(),
            })
            .inc();
    }

    pub fn set_phase(&self, ns: &str, name: &str, phase: Phase, step: Option<i32>) {
        for p in Phase::ALL {
            self.phase
                .get_or_create(&phase_labels(ns, name, p))
                .set(i64::from(p == phase));
        }
        self.step
            .get_or_create(&ObjectLabels::new(ns, name))
            .set(step.unwrap_or(-1) as i64);
    }

    pub fn forget(&self, ns: &str, name: &str) {
        for p in Phase::ALL {
            self.phase.remove(&phase_labels(ns, name, p));
        }
        let labels = ObjectLabels::new(ns, name);
        self.step.remove(&labels);
        self.route_canary_weight.remove(&labels);
        self.measured_canary_percent.remove(&labels);
    }

    /// The weight on the routes and the measured split, from a status written.
    pub fn set_routing(&self, ns: &str, name: &str, st: Option<&super::crd::TrafficRoutingStatus>) {
        let labels = ObjectLabels::new(ns, name);
        match st.and_then(|s| s.canary_weight) {
            Some(w) => {
                self.route_canary_weight
                    .get_or_create(&labels)
                    .set(i64::from(w));
            }
            None => {
                self.route_canary_weight.remove(&labels);
            }
        }
        match st.and_then(|s| s.measured_canary_percent) {
            Some(p) => {
                self.measured_canary_percent.get_or_create(&labels).set(p);
            }
            None => {
                self.measured_canary_percent.remove(&labels);
            }
        }
    }

    pub fn evaluation(&self, e: &Evaluation) {
        let result = match e.verdict {
            Verdict::Passed => "passed",
            Verdict::Failed(_) => "failed",
            Verdict::Inconclusive(_) => "inconclusive",
        };
        self.gate_evaluations
            .get_or_create(&GateResultLabels {
                gate: e.gate.to_string(),
                result: result.into(),
            })
            .inc();
        if matches!(e.verdict, Verdict::Failed(_)) {
            self.gate_failures
                .get_or_create(&GateLabels {
                    gate: e.gate.to_string(),
                })
                .inc();
        }
    }

    pub fn measured(&self, phase: &str, n: u32) {
        if n > 0 {
            self.analysis_measurements
                .get_or_create(&MeasurementLabels {
                    phase: phase.into(),
                })
                .inc_by(u64::from(n));
        }
    }

    pub fn webhook_called(&self, type_: &str, decision: &str) {
        self.webhook_calls
            .get_or_create(&WebhookLabels {
                r#type: type_.into(),
                decision: decision.into(),
            })
            .inc();
    }

    pub fn drain_finished(&self, r: &super::crd::DrainRecord) {
        if let Some(d) = r.duration_seconds {
            self.drain_duration.observe(d);
        }
        if let Some(q) = r.quiet_seconds {
            self.drain_quiet.observe(q);
        }
        if let Some(c) = r.connections_closed {
            self.drain_connections_closed.inc_by(c.max(0) as u64);
        }
        self.drains
            .get_or_create(&OutcomeLabels {
                outcome: r.state.clone(),
            })
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_under_the_release_prefix() {
        let mut registry = Registry::with_prefix("sluice");
        let m = register(&mut registry);
        m.set_phase("default", "echo", Phase::Progressing, Some(1));
        m.reconcile.error("kube");
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
        assert!(out.contains(
            "sluice_release_phase{namespace=\"default\",name=\"echo\",phase=\"Progressing\"} 1"
        ));
        assert!(out.contains("sluice_release_step{namespace=\"default\",name=\"echo\"} 1"));
        assert!(out.contains("sluice_release_reconcile_errors_total{kind=\"kube\"} 1"));
        assert!(out.contains("sluice_release_drain_duration_seconds_bucket"));
        m.drains_refused.inc();
        m.measured("Failed", 2);
        m.webhook_called("rollout", "Halt");
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
        assert!(
            out.contains("sluice_release_drains_refused_total 1"),
            "{out}"
        );
        assert!(out.contains("sluice_release_analysis_measurements_total{phase=\"Failed\"} 2"));
        assert!(
            out.contains(
                "sluice_release_webhook_calls_total{type=\"rollout\",decision=\"Halt\"} 1"
            )
        );
    }
}
