//! What the planner reads and writes: the observed pods and their gangs, the actions, and
//! the scratch of one planning round.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::inference::crd::InferenceSetStatus;

use super::settings::Settings;

/// One pod of the set, as the planner needs it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PodView {
    pub name: String,
    pub slot: i32,
    pub gang: String,
    pub revision: String,
    /// Index inside the gang.
    pub index: i32,
    pub gang_size: i32,
    /// Seconds since the epoch.
    pub created: f64,
    pub node: Option<String>,
    /// `sluice.dev/gpu-ids`.
    pub gpu_ids: Vec<u32>,
    pub deleting: bool,
    /// Phase Failed or Succeeded: a model server that exits has lost its replica.
    pub finished: bool,
    pub containers_ready: bool,
    /// The `sluice.dev/serving` condition.
    pub serving: Option<bool>,
    /// The pod's `Ready` condition (containers and readiness gates, as the kubelet last
    /// wrote it): what the EndpointSlices publish. It follows `serving`.
    pub ready: bool,
    /// `sluice.dev/drain-started`, seconds since the epoch.
    pub drain_started: Option<f64>,
    /// `sluice.dev/warm` present.
    pub warm: bool,
    /// The binder's PodScheduled=False message, if any.
    pub unschedulable: Option<String>,
    /// Its node is gone, or NotReady past the grace period.
    pub node_lost: bool,
    /// The agent's signals while the pod drains (`None`: not scraped yet or no agent).
    pub signals: Option<crate::pod::signals::PodSignals>,
}

/// Everything the planner looks at.
#[derive(Clone, Debug)]
pub struct Observed {
    pub name: String,
    pub generation: i64,
    /// Revision of the current spec's template.
    pub revision: String,
    pub settings: Result<Settings, Vec<String>>,
    pub status: InferenceSetStatus,
    pub pods: Vec<PodView>,
}

/// What the executor does, in order; each action is idempotent.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Create pods `indices` of gang `gang` (slot `slot`, revision `revision`).
    CreatePods {
        gang: String,
        slot: i32,
        revision: String,
        indices: Vec<i32>,
    },
    /// Delete pods (a lost or unserved gang).
    DeletePods { pods: Vec<String> },
    /// Annotate `sluice.dev/drain-started` and set `sluice.dev/serving` False.
    StartDrain { pods: Vec<String> },
    /// Set `sluice.dev/serving` True.
    Serve { pods: Vec<String> },
    /// Run the first-token check on these pods; annotate `sluice.dev/warm` on success.
    CheckWarm { gang: String, pods: Vec<String> },
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
    pub status: InferenceSetStatus,
    pub requeue_after: Duration,
}

/// A gang's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum GangState {
    /// Some pods still to create (none bound).
    Incomplete,
    Pending,
    Starting,
    Warm,
    Serving,
    Draining,
    Lost,
    /// Every pod is being deleted.
    Gone,
}

impl GangState {
    pub fn as_str(self) -> &'static str {
        match self {
            GangState::Incomplete | GangState::Pending => "Pending",
            GangState::Starting => "Starting",
            GangState::Warm => "Warm",
            GangState::Serving => "Serving",
            GangState::Draining => "Draining",
            GangState::Lost => "Lost",
            GangState::Gone => "Terminating",
        }
    }
}

/// One gang, derived from its pods.
#[derive(Clone, Debug)]
pub struct Gang<'a> {
    pub id: String,
    pub slot: i32,
    pub revision: String,
    pub size: i32,
    pub pods: Vec<&'a PodView>,
    pub state: GangState,
    /// Why it is lost.
    pub lost_reason: Option<String>,
    pub created: f64,
    pub drain_started: Option<f64>,
}

impl Gang<'_> {
    pub(super) fn live(&self) -> Vec<String> {
        self.pods
            .iter()
            .filter(|p| !p.deleting)
            .map(|p| p.name.clone())
            .collect()
    }
    pub(super) fn any_serving(&self) -> bool {
        self.pods
            .iter()
            .any(|p| p.serving == Some(true) && !p.deleting)
    }
    pub(super) fn in_service(&self) -> bool {
        self.state == GangState::Serving
    }
}

/// Group pods into gangs and classify each.
pub fn gangs<'a>(pods: &'a [PodView], s: &Settings) -> Vec<Gang<'a>> {
    let mut by: BTreeMap<&str, Vec<&PodView>> = BTreeMap::new();
    for p in pods {
        by.entry(p.gang.as_str()).or_default().push(p);
    }
    by.into_iter()
        .map(|(id, mut pods)| {
            pods.sort_by_key(|p| p.index);
            let first = pods[0];
            let size = first.gang_size.max(1);
            let live: Vec<&&PodView> = pods.iter().filter(|p| !p.deleting).collect();
            let drain_started = pods
                .iter()
                .filter_map(|p| p.drain_started)
                .fold(None, |a: Option<f64>, t| Some(a.map_or(t, |a| a.min(t))));
            let created = pods.iter().map(|p| p.created).fold(f64::MAX, f64::min);
            let bound = live.iter().filter(|p| p.node.is_some()).count();
            let mut lost_reason = None;
            let state = if live.is_empty() {
                GangState::Gone
            } else if drain_started.is_some() {
                GangState::Draining
            } else if let Some(p) = live.iter().find(|p| p.node_lost) {
                lost_reason = Some(format!(
                    "node {} of pod {} is gone or not ready",
                    p.node.as_deref().unwrap_or("?"),
                    p.name
                ));
                GangState::Lost
            } else if let Some(p) = live.iter().find(|p| p.finished) {
                lost_reason = Some(format!("pod {} exited", p.name));
                GangState::Lost
            } else if live.len() < pods.len() {
                lost_reason = Some("a pod of the gang is being deleted".into());
                GangState::Lost
            } else if (live.len() as i32) < size {
                if bound > 0 {
                    lost_reason = Some(format!("the gang has {} of its {size} pods", live.len()));
                    GangState::Lost
                } else {
                    GangState::Incomplete
                }
            } else if bound < live.len() {
                GangState::Pending
            } else if !live.iter().all(|p| p.containers_ready)
                || (s.first_token && !live.iter().all(|p| p.warm))
            {
                GangState::Starting
            } else if !live.iter().all(|p| p.serving == Some(true) && p.ready) {
                // Serving only once the Service's endpoints name every pod: a replica
                // replaced on that word must not leave before its successor is reachable.
                GangState::Warm
            } else {
                GangState::Serving
            };
            Gang {
                id: id.to_string(),
                slot: first.slot,
                revision: first.revision.clone(),
                size,
                pods,
                state,
                lost_reason,
                created,
                drain_started,
            }
        })
        .collect()
}

/// Gang name for slot `slot`, revision `rev`: `<set>-<slot>-<rev>-<n>` with the smallest
/// `n` no pod of the slot uses (a terminating gang keeps its name until it is gone).
pub fn gang_name(set: &str, slot: i32, rev: &str, pods: &[PodView]) -> String {
    (0..)
        .map(|n| format!("{set}-{slot}-{rev}-{n}"))
        .find(|g| !pods.iter().any(|p| &p.gang == g))
        .unwrap_or_default()
}

/// Whether a pod's node counts as lost: deleted, or NotReady for longer than `grace`.
/// `not_ready_since` is when its Ready condition last turned non-True.
pub fn node_lost(exists: bool, not_ready_since: Option<f64>, now: f64, grace: f64) -> bool {
    !exists || not_ready_since.is_some_and(|t| now - t >= grace)
}

/// The scratch of one planning round: actions, requeue, status notes.
pub(super) struct Ctx {
    pub(super) actions: Vec<Action>,
    pub(super) requeue: f64,
    pub(super) degraded: Vec<String>,
    pub(super) progress: Vec<String>,
}

impl Ctx {
    pub(super) fn event(&mut self, warning: bool, reason: &str, note: String) {
        self.actions.push(Action::Event {
            warning,
            reason: reason.into(),
            note,
        });
    }
    pub(super) fn requeue_in(&mut self, secs: f64) {
        self.requeue = self.requeue.min(secs.max(0.5));
    }
}
