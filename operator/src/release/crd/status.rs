//! The Release's status: phase, revisions, gate results, abort, drain records, conditions.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::pod::condition::Condition;

/// Phase of a release.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema, Default)]
pub enum Phase {
    /// Moving towards the next step.
    #[default]
    Progressing,
    /// Held by a pause step, `spec.paused`, or waiting for a promote.
    Paused,
    /// Every pod runs the stable revision and serves.
    Completed,
    /// A gate failed or a user aborted: traffic went back to stable.
    Aborted,
    /// The release cannot run (no such Deployment, invalid spec).
    Failed,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Progressing => "Progressing",
            Phase::Paused => "Paused",
            Phase::Completed => "Completed",
            Phase::Aborted => "Aborted",
            Phase::Failed => "Failed",
        }
    }
    pub const ALL: [Phase; 5] = [
        Phase::Progressing,
        Phase::Paused,
        Phase::Completed,
        Phase::Aborted,
        Phase::Failed,
    ];
}

/// Everything the controller needs to resume after a restart lives here (and in the
/// pods' annotations).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReleaseStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// One human sentence on what the release is doing or waiting for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Index of the step in progress; equal to the number of steps once all are done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub current_step: Option<i32>,
    /// `2/5` style, for printer columns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_display: Option<String>,
    /// When the current step started (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_started_at: Option<String>,
    /// Target percent of replicas on the canary revision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100))]
    pub canary_weight: Option<i32>,
    /// Replica count the release runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub replicas: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stable_revision: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary_revision: Option<String>,
    /// The revision that was rolled back; it is not tried again until the Deployment's
    /// template changes or `kubectl sluice promote` retries it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aborted_revision: Option<String>,
    /// Pods per revision.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub revisions: Vec<RevisionStatus>,
    /// Latest result of each gate.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gates: Vec<GateResult>,
    /// Why the release was aborted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort: Option<AbortInfo>,
    /// Drains in progress and the most recent finished ones (newest last, at most 50).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub drains: Vec<DrainRecord>,
    /// Last `sluice.dev/promote` annotation value acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub promote_token: Option<String>,
    /// Last `sluice.dev/abort` annotation value acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort_token: Option<String>,
    /// The analysis and webhooks of the current stage (`spec.analysis`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub analysis: Option<super::ReleaseAnalysisStatus>,
    /// The routes' weights and the measured split (`spec.trafficRouting`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traffic_routing: Option<super::TrafficRoutingStatus>,
    /// The current step's rebalancing (`spec.rebalance`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rebalance: Option<super::RebalanceStatus>,
    /// kstatus-compatible conditions: Ready, Progressing, Degraded.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// Pods of one revision.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RevisionStatus {
    pub revision: String,
    /// `stable`, `canary` or `old`.
    pub role: String,
    /// Pods this revision should end the current step with.
    pub desired: i32,
    /// Pods that exist and are not being deleted.
    pub current: i32,
    /// Pods whose containers are ready.
    pub ready: i32,
    /// Pods with `sluice.dev/serving=True` (in the Service's endpoints).
    pub serving: i32,
    /// Pods being drained.
    pub draining: i32,
}

/// Latest evaluation of one gate.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GateResult {
    /// `health`, `connectionRate` or `comparison`.
    pub name: String,
    /// `Passed`, `Failed` or `Inconclusive`.
    pub result: String,
    #[schemars(range(min = 0))]
    pub consecutive_failures: i32,
    /// RFC 3339.
    pub last_evaluated: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Measured values, e.g. `canaryErrorRatio`, `stableP99Seconds`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub values: BTreeMap<String, f64>,
}

/// Why a release was aborted.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AbortInfo {
    /// `GateFailed`, `UserAbort` or `ProgressDeadlineExceeded`.
    pub reason: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gate: Option<String>,
    pub message: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub values: BTreeMap<String, f64>,
    pub revision: String,
    /// RFC 3339.
    pub at: String,
}

/// One pod's drain.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DrainRecord {
    pub pod: String,
    pub revision: String,
    /// `Quiescing` (unserved, waiting for quiet), `Quiet` (waiting for its turn to close
    /// within the connection-rate budget), `Closing` (deleted; the agent closes
    /// connections paced), `Completed`, `QuietTimeout` (completed, but quiet never came
    /// within the propagation timeout), `Refused` (released, but the agent refused the
    /// kubelet's preStop `/drain`: wrong or missing drain token, no paced close).
    pub state: String,
    /// RFC 3339: when the pod was unserved.
    pub started_at: String,
    /// Seconds from unserve to quiet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quiet_seconds: Option<f64>,
    /// Connections the agent closed during the drain (last value seen).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connections_closed: Option<i64>,
    /// Seconds from unserve until the pod was gone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_seconds: Option<f64>,
}
