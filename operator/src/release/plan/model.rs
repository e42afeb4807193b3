//! The planner's input ([`Observed`]) and output ([`Plan`], [`Action`]), and the state one
//! planning round works on.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::pod::signals::PodSignals;
use crate::release::crd::{DrainRecord, HeaderMatch, ReleaseStatus};
use crate::release::gates::{Evaluation, RevisionWindow};
use crate::release::settings::Settings;

/// Most drain records kept in status.
pub const MAX_DRAIN_RECORDS: usize = 50;

/// [`DrainRecord::state`] of a released pod whose agent refused a `/drain` (the kubelet's
/// preStop): it terminates without a paced close.
pub const DRAIN_REFUSED: &str = "Refused";

/// The Deployment, as the planner needs it.
#[derive(Clone, Debug, PartialEq)]
pub struct DeploymentView {
    /// Revision (hash) of the Deployment's current pod template.
    pub revision: String,
    pub spec_replicas: i32,
    /// `sluice.dev/replicas` annotation.
    pub recorded_replicas: Option<i32>,
    pub available_replicas: i32,
    /// Why the current template cannot be run (injection failed), if it cannot.
    pub inject_error: Option<String>,
    /// Which Release runs the Deployment (`sluice.dev/claimed-by`).
    pub claim: Claim,
}

/// The Deployment's claim, as seen by one Release.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum Claim {
    /// No claim, or one naming a Release that no longer exists.
    #[default]
    Free,
    /// Claimed by this Release.
    Ours,
    /// Claimed by another Release of the namespace, which exists: this one is refused.
    Other(String),
}

/// A ReplicaSet the Release owns.
#[derive(Clone, Debug, PartialEq)]
pub struct ReplicaSetView {
    pub name: String,
    /// Pods are the ReplicaSet's by this UID in their owner reference, not by name.
    pub uid: String,
    pub revision: String,
    pub replicas: i32,
}

/// A pod of one of the Release's ReplicaSets.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PodView {
    pub name: String,
    pub revision: String,
    /// Seconds since the epoch.
    pub created: f64,
    pub deleting: bool,
    pub containers_ready: bool,
    /// When the containers became ready (seconds since the epoch).
    pub ready_since: Option<f64>,
    /// The `sluice.dev/serving` condition: `None` when absent.
    pub serving: Option<bool>,
    /// The pod's `Ready` condition (its containers and its readiness gates, as the kubelet
    /// last wrote it): what the EndpointSlice controller publishes. It lags `serving`.
    pub ready: bool,
    pub restarts: i32,
    pub crash_looping: bool,
    pub drain_started: Option<f64>,
    pub drain_released: Option<f64>,
    /// From the agent; `None` when it could not be scraped.
    pub signals: Option<PodSignals>,
    /// The pod's IP and its agent's drain token, for asking the agent to rebalance.
    pub ip: Option<String>,
    pub drain_token: Option<String>,
    /// When the operator last asked its agent to let connections reconnect (seconds since
    /// the epoch; in memory, so `None` after a restart).
    pub asked_at: Option<f64>,
}

/// Everything the planner looks at.
#[derive(Clone, Debug)]
pub struct Observed {
    pub generation: i64,
    pub deleting: bool,
    pub has_finalizer: bool,
    pub settings: Result<Settings, Vec<String>>,
    pub status: ReleaseStatus,
    /// `sluice.dev/promote` annotation.
    pub promote: Option<String>,
    /// `sluice.dev/abort` annotation.
    pub abort: Option<String>,
    pub deployment: Option<DeploymentView>,
    pub replica_sets: Vec<ReplicaSetView>,
    pub pods: Vec<PodView>,
    /// Request figures per revision over the comparison window.
    pub windows: BTreeMap<String, RevisionWindow>,
    /// What the controller found for `spec.analysis` (the verdicts and webhook answers
    /// themselves are in `status.analysis`).
    pub analysis: AnalysisObserved,
    /// The routes and Services of `spec.trafficRouting`; `None` without it.
    pub routing: Option<RoutingObserved>,
    /// Requests the agents served per revision over the split window (trafficRouting's
    /// verification, rebalancing), draining pods included.
    pub split: BTreeMap<String, f64>,
}

/// What the controller read of the routes, the two Services and their endpoints.
#[derive(Clone, Debug, PartialEq)]
pub struct RoutingObserved {
    /// The canary's share (percent) every steered rule of every route carries; `Err`:
    /// why the routes cannot be steered (missing, rules that disagree, …).
    pub canary_weight: Result<i32, String>,
    /// A steered rule has no backendRef to the canary Service yet.
    pub canary_ref_missing: bool,
    /// The header matches the routes' header rules send to the canary (empty: none);
    /// `None` when the routes disagree or a rule was edited.
    pub header_route: Option<Vec<HeaderMatch>>,
    /// The revision each Service selects: `Some(None)` selects every pod of the user's
    /// Service (the state a deleted Release leaves); `None`: the Service does not exist.
    pub stable_selects: Option<Option<String>>,
    pub canary_selects: Option<Option<String>>,
    /// Ready endpoints of each Service (the data plane's view of the pods).
    pub stable_ready: i32,
    pub canary_ready: i32,
    /// The user's Service is missing or selects nothing: why.
    pub service_problem: Option<String>,
}

/// The controller's findings for `spec.analysis` besides `status.analysis`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AnalysisObserved {
    /// The templates could not be read or imported: why. The release holds.
    pub invalid: Option<String>,
    /// When the run of the current step wants its next measurement.
    pub requeue_after: Option<Duration>,
}

/// What to do. The executor runs the actions in order; each is idempotent.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    AddFinalizer,
    RemoveFinalizer,
    /// Record this Release as the Deployment's one Release (`sluice.dev/claimed-by`), only
    /// if the Deployment did not change since it was read: a concurrent claim fails.
    /// Comes before anything else that touches the Deployment.
    ClaimDeployment,
    /// Remove this Release's claim from the Deployment (after the hand-back).
    ReleaseClaim,
    /// Remember the Deployment's replica count in its `sluice.dev/replicas` annotation.
    RecordDeploymentReplicas(i32),
    ScaleDeployment(i32),
    /// Create the ReplicaSet of the Deployment's current template (injected).
    CreateReplicaSet {
        revision: String,
        replicas: i32,
    },
    ScaleReplicaSet {
        name: String,
        replicas: i32,
    },
    DeleteReplicaSet {
        name: String,
    },
    /// Set the pod's `sluice.dev/serving` condition.
    SetServing {
        pod: String,
        serving: bool,
    },
    /// Annotate `sluice.dev/drain-started` and set serving False.
    StartDrain {
        pod: String,
    },
    /// The pod went quiet: annotate `sluice.dev/drain-released` and the lowest deletion
    /// cost, so that the following scale-down of its ReplicaSet deletes exactly it.
    ReleasePod {
        pod: String,
    },
    /// Server-side apply the stable and canary Services, each selecting the revision given
    /// (`None`: every pod the user's Service selects).
    ApplyRoutingServices {
        stable: Option<String>,
        canary: Option<String>,
    },
    /// Give the canary this share (percent) in every steered route rule.
    SetRouteWeight {
        canary: i32,
    },
    /// Ask the pod's agent to let this many of its connections reconnect (`/rebalance`).
    RebalanceConnections {
        pod: String,
        connections: i64,
    },
    /// Make the routes send requests with these headers to the canary (empty: none).
    SetHeaderRoute {
        headers: Vec<HeaderMatch>,
    },
    Event {
        warning: bool,
        reason: String,
        note: String,
    },
}

/// The planner's answer.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub actions: Vec<Action>,
    pub status: ReleaseStatus,
    /// Gate evaluations made in this round (for metrics).
    pub evaluations: Vec<Evaluation>,
    /// Drains finished in this round (for metrics).
    pub finished_drains: Vec<DrainRecord>,
    /// Drains whose `/drain` the agent refused, newly seen in this round (for metrics).
    pub refused_drains: Vec<DrainRecord>,
    pub requeue_after: Duration,
}

pub(super) struct Ctx<'a> {
    pub(super) now: f64,
    pub(super) s: &'a Settings,
    pub(super) actions: Vec<Action>,
    pub(super) status: ReleaseStatus,
    pub(super) evaluations: Vec<Evaluation>,
    pub(super) finished: Vec<DrainRecord>,
    pub(super) refused: Vec<DrainRecord>,
    pub(super) busy: bool,
    /// Held by the analysis or a webhook: the phase, message and condition reason.
    pub(super) hold: Option<Hold>,
    /// Come back no later than this (the analysis' next measurement, a halted webhook).
    pub(super) requeue_hint: Option<Duration>,
    /// The step waits only for its analysis' next measurement.
    pub(super) analysis_wait: bool,
}

/// Why the release holds, as `finish` reports it.
pub(super) struct Hold {
    pub(super) reason: &'static str,
    pub(super) message: String,
    pub(super) paused: bool,
    pub(super) degraded: bool,
}

impl Ctx<'_> {
    pub(super) fn event(&mut self, warning: bool, reason: &str, note: String) {
        self.actions.push(Action::Event {
            warning,
            reason: reason.into(),
            note,
        });
    }
}
