//! Status: bounds, the failed phase, conditions, per-revision status and the round's
//! closing [`Plan`].

use std::collections::BTreeMap;
use std::time::Duration;

use crate::pod::condition::Condition;
use crate::pod::time::rfc3339;
use crate::release::crd::{Phase, ReleaseStatus, RevisionStatus};

use super::model::{Action, Ctx, Observed, Plan};
use super::weights::{counts, step_count};

/// Bring a status read back into the bounds its schema sets (`currentStep` ≥ 0,
/// `canaryWeight` 0–100, `replicas` ≥ 1, `consecutiveFailures` ≥ 0). A status written
/// before those bounds existed, or by hand, would otherwise make every status write of
/// ours fail admission.
pub(super) fn within_status_bounds(st: &mut ReleaseStatus) {
    st.current_step = st.current_step.map(|s| s.max(0));
    st.canary_weight = st.canary_weight.map(|w| w.clamp(0, 100));
    st.replicas = st.replicas.filter(|r| *r >= 1);
    for g in &mut st.gates {
        g.consecutive_failures = g.consecutive_failures.max(0);
    }
}

pub(super) fn failed(
    prev: &ReleaseStatus,
    status: ReleaseStatus,
    actions: Vec<Action>,
    msg: String,
    generation: i64,
    now: f64,
) -> Plan {
    failed_as("Failed", prev, status, actions, msg, generation, now)
}

/// Phase `Failed` with `reason` on the conditions; a Warning event (`ReleaseFailed`, or
/// `reason` itself when it is not `Failed`) once per message.
pub(super) fn failed_as(
    reason: &str,
    prev: &ReleaseStatus,
    mut status: ReleaseStatus,
    actions: Vec<Action>,
    msg: String,
    generation: i64,
    now: f64,
) -> Plan {
    let mut actions = actions;
    if prev.phase != Some(Phase::Failed) || prev.message.as_deref() != Some(msg.as_str()) {
        actions.push(Action::Event {
            warning: true,
            reason: if reason == "Failed" {
                "ReleaseFailed".into()
            } else {
                reason.into()
            },
            note: msg.clone(),
        });
    }
    status.phase = Some(Phase::Failed);
    status.message = Some(msg.clone());
    set_condition(&mut status, "Ready", false, reason, &msg, generation, now);
    set_condition(
        &mut status,
        "Progressing",
        false,
        reason,
        &msg,
        generation,
        now,
    );
    set_condition(&mut status, "Degraded", true, reason, &msg, generation, now);
    Plan {
        actions,
        status,
        evaluations: Vec::new(),
        finished_drains: Vec::new(),
        refused_drains: Vec::new(),
        requeue_after: Duration::from_secs(30),
    }
}

pub(super) fn revision_status(c: &mut Ctx, o: &Observed, wants: &BTreeMap<String, i32>) {
    let k = counts(o);
    let stable = c.status.stable_revision.clone();
    let canary = c.status.canary_revision.clone();
    c.status.revisions = wants
        .iter()
        .map(|(rev, want)| {
            let x = k.get(rev).copied().unwrap_or_default();
            RevisionStatus {
                revision: rev.clone(),
                role: if Some(rev) == stable.as_ref() {
                    "stable"
                } else if Some(rev) == canary.as_ref() {
                    "canary"
                } else {
                    "old"
                }
                .into(),
                desired: *want,
                current: x.active,
                ready: x.ready,
                serving: x.serving,
                draining: o
                    .pods
                    .iter()
                    .filter(|p| &p.revision == rev && p.drain_started.is_some())
                    .count() as i32,
            }
        })
        .collect();
    let n = c.status.replicas.unwrap_or(1).max(1);
    c.status.canary_weight = Some(match &canary {
        Some(cr) => {
            let serving = k.get(cr).map(|x| x.serving).unwrap_or(0);
            let total: i32 = k.values().map(|x| x.serving).sum();
            if total > 0 {
                ((serving as i64 * 100) / total.max(n) as i64) as i32
            } else {
                0
            }
        }
        None => 0,
    });
}

pub(super) fn finish(mut c: Ctx, o: &Observed) -> Plan {
    let g = o.generation;
    let now = c.now;
    let steps = step_count(c.s);
    c.status.step_display = Some(match c.status.current_step {
        Some(s) if c.status.canary_revision.is_some() => {
            format!("{}/{steps}", s.saturating_add(1).min(steps))
        }
        _ => format!("{steps}/{steps}"),
    });
    let mut phase = c.status.phase.unwrap_or_default();
    let hold = c.hold.take().filter(|_| phase != Phase::Failed);
    if let Some(h) = &hold {
        phase = if h.paused {
            Phase::Paused
        } else {
            Phase::Progressing
        };
        c.status.message = Some(h.message.clone());
    }
    c.status.phase = Some(phase);
    let msg = c.status.message.clone().unwrap_or_default();
    let st = &mut c.status;
    match phase {
        Phase::Completed => {
            set_condition(st, "Ready", true, "Completed", &msg, g, now);
            set_condition(st, "Progressing", false, "Completed", &msg, g, now);
            set_condition(st, "Degraded", false, "Completed", &msg, g, now);
        }
        Phase::Progressing | Phase::Paused => {
            let reason = match &hold {
                Some(h) => h.reason,
                None if phase == Phase::Paused => "Paused",
                None => "Progressing",
            };
            let degraded = hold.as_ref().is_some_and(|h| h.degraded);
            set_condition(st, "Ready", false, reason, &msg, g, now);
            set_condition(st, "Progressing", true, reason, &msg, g, now);
            set_condition(st, "Degraded", degraded, reason, &msg, g, now);
        }
        Phase::Aborted => {
            let reason = st
                .abort
                .as_ref()
                .map(|a| a.reason.clone())
                .unwrap_or("Aborted".into());
            set_condition(st, "Ready", false, &reason, &msg, g, now);
            set_condition(st, "Progressing", c.busy, &reason, &msg, g, now);
            set_condition(st, "Degraded", true, &reason, &msg, g, now);
        }
        Phase::Failed => {
            set_condition(st, "Ready", false, "Failed", &msg, g, now);
            set_condition(st, "Progressing", false, "Failed", &msg, g, now);
            set_condition(st, "Degraded", true, "Failed", &msg, g, now);
        }
    }
    let mut requeue_after = if c.busy {
        Duration::from_millis(500)
    } else {
        Duration::from_secs(30)
    };
    if let Some(hint) = c.requeue_hint {
        requeue_after = requeue_after.min(hint.max(Duration::from_millis(500)));
    }
    Plan {
        actions: c.actions,
        status: c.status,
        evaluations: c.evaluations,
        finished_drains: c.finished,
        refused_drains: c.refused,
        requeue_after,
    }
}

pub(crate) fn set_condition(
    st: &mut ReleaseStatus,
    type_: &str,
    value: bool,
    reason: &str,
    message: &str,
    generation: i64,
    now: f64,
) {
    let status = if value { "True" } else { "False" };
    let last = st
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .filter(|c| c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| rfc3339(now));
    st.conditions.retain(|c| c.type_ != type_);
    st.conditions.push(Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message: message.into(),
        last_transition_time: last,
        observed_generation: Some(generation),
    });
    st.conditions.sort_by(|a, b| a.type_.cmp(&b.type_));
}
