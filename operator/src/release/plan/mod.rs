//! The pure planner: `plan(&Observed, now) -> Plan`.
//!
//! Deterministic and level-triggered: it looks only at what is observed now (the Release
//! with its previous status, the Deployment, the ReplicaSets and pods the Release owns,
//! agent signals) and says what to do next and what status to write. Every piece of
//! progress is in status or in pod annotations, so a restart at any point (kill -9)
//! resumes: a pod carrying `sluice.dev/drain-started` is never picked for a drain again,
//! and one carrying `sluice.dev/drain-released` is the one its ReplicaSet deletes.
//!
//! Traffic moves by replica ratio: the Service selects both revisions' pods and the
//! operator decides which pods are in its endpoints through the `sluice.dev/serving`
//! readiness gate. With `spec.trafficRouting`, Gateway API routes split it by weight
//! between a stable and a canary Service (`routing.rs`), and the replica counts follow.
//!
//! `plan()` is one round in order; each part in its own file: `model.rs` (what is observed,
//! the actions, the plan, the round's state), `weights.rs` (step arithmetic, pods per
//! revision), `takeover.rs` (stable and canary revisions, abort, hand-back), `drain.rs`
//! (pods moved between revisions, paced release, drain records), `gates.rs` (the canary's
//! gates and deadline), `steps.rs` (advancing steps, settling), `status.rs` (failure,
//! conditions, per-revision status, the closing [`Plan`]).

mod analysis;
mod drain;
mod gates;
mod model;
mod rebalance;
mod routing;
mod status;
mod steps;
mod takeover;
mod weights;

pub use analysis::HALT_RETRY;
pub use model::{
    Action, AnalysisObserved, Claim, DRAIN_REFUSED, DeploymentView, MAX_DRAIN_RECORDS, Observed,
    Plan, PodView, ReplicaSetView, RoutingObserved,
};
pub(crate) use status::set_condition;

use drain::{move_pods, record_drains};
use gates::{check_deadline, evaluate_gates};
use model::Ctx;
use status::{failed, failed_as, finish, revision_status, within_status_bounds};
use steps::{advance_steps, settle};
use takeover::{decide_revisions, hand_back};
use weights::{step_count, wants};

/// Plan the next moves.
pub fn plan(o: &Observed, now: f64) -> Plan {
    let mut status = o.status.clone();
    within_status_bounds(&mut status);
    status.observed_generation = Some(o.generation);
    // Messages describe this round only.
    status.message = None;
    let settings = match &o.settings {
        Ok(s) => s,
        Err(errs) => {
            let msg = format!("invalid spec: {}", errs.join("; "));
            let mut actions = Vec::new();
            // The controller hands back with lenient settings when it can; this is only
            // reached when even those are invalid, so nothing was taken over.
            if o.deleting && o.has_finalizer {
                if o.deployment
                    .as_ref()
                    .is_some_and(|d| d.claim == Claim::Ours)
                {
                    actions.push(Action::ReleaseClaim);
                }
                actions.push(Action::RemoveFinalizer);
            }
            return failed(&o.status, status, actions, msg, o.generation, now);
        }
    };
    let mut c = Ctx {
        now,
        s: settings,
        actions: Vec::new(),
        status,
        evaluations: Vec::new(),
        finished: Vec::new(),
        refused: Vec::new(),
        busy: false,
        hold: None,
        requeue_hint: None,
        analysis_wait: false,
    };
    // Status is input too (anyone with status rights can write it): a step outside
    // `0..=steps` would index out of the steps.
    let steps = step_count(settings);
    c.status.current_step = c.status.current_step.map(|s| s.clamp(0, steps));
    if !o.deleting && !o.has_finalizer {
        c.actions.push(Action::AddFinalizer);
    }
    let Some(dep) = &o.deployment else {
        if o.deleting {
            // Nothing to hand back to: the ReplicaSets go with the Release.
            if o.has_finalizer {
                c.actions.push(Action::RemoveFinalizer);
            }
            return finish(c, o);
        }
        let msg = format!(
            "Deployment {:?} not found in the Release's namespace",
            settings.deployment
        );
        return failed(&o.status, c.status, c.actions, msg, o.generation, now);
    };
    // One Release per Deployment: a Deployment another existing Release runs is never
    // touched, not even on deletion.
    if let Claim::Other(first) = &dep.claim {
        if o.deleting && o.has_finalizer {
            c.actions.push(Action::RemoveFinalizer);
        }
        let msg = format!(
            "Deployment {:?} is already run by Release {first:?}: one Release per Deployment; \
             this one waits until {first:?} is deleted",
            settings.deployment
        );
        return failed_as(
            "DeploymentClaimed",
            &o.status,
            c.status,
            c.actions,
            msg,
            o.generation,
            now,
        );
    }
    if !o.deleting && dep.claim == Claim::Free {
        c.actions.push(Action::ClaimDeployment);
    }

    let n = settings
        .replicas
        .or((dep.spec_replicas > 0).then_some(dep.spec_replicas))
        .or(dep.recorded_replicas)
        .or(c.status.replicas)
        .unwrap_or(1)
        .max(1);
    c.status.replicas = Some(n);
    if !o.deleting
        && settings.replicas.is_none()
        && dep.spec_replicas > 0
        && dep.recorded_replicas != Some(dep.spec_replicas)
    {
        c.actions
            .push(Action::RecordDeploymentReplicas(dep.spec_replicas));
    }

    record_drains(&mut c, o);

    if o.deleting {
        routing::steer(&mut c, o, n);
        hand_back(&mut c, o, dep, n);
        return finish(c, o);
    }

    decide_revisions(&mut c, o, dep);

    // Gates judge the canary; a failure aborts before anything else moves.
    if c.status.canary_revision.is_some() {
        evaluate_gates(&mut c, o);
    }
    if c.status.canary_revision.is_some() {
        check_deadline(&mut c);
    }
    routing::steer(&mut c, o, n);

    let wants = wants(&c, o, n);
    if let Some(err) = &dep.inject_error
        && wants.get(&dep.revision).copied().unwrap_or(0) > 0
        && !o.replica_sets.iter().any(|r| r.revision == dep.revision)
    {
        let msg = format!("cannot run the Deployment's template: {err}");
        return failed(&o.status, c.status, c.actions, msg, o.generation, now);
    }
    move_pods(&mut c, o, dep, n, &wants, 0);
    if c.status.canary_revision.is_some() {
        advance_steps(&mut c, o, n, &wants);
    } else {
        settle(&mut c, o, dep, n, &wants);
    }
    revision_status(&mut c, o, &wants);
    finish(c, o)
}

#[cfg(test)]
mod tests;
