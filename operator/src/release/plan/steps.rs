//! Advancing through the steps with a canary, and settling on stable without one.

use std::collections::BTreeMap;

use crate::release::crd::Phase;
use crate::release::settings::StepKind;

use super::analysis::{Judgement, judge_step};
use super::model::{Action, Ctx, DeploymentView, Observed};
use super::weights::{counts, step_at, step_count};
use crate::pod::time::{parse_rfc3339, rfc3339};

/// Move through the steps once the current one is done.
pub(super) fn advance_steps(c: &mut Ctx, o: &Observed, n: i32, wants: &BTreeMap<String, i32>) {
    let canary = c.status.canary_revision.clone().unwrap_or_default();
    let stable = c.status.stable_revision.clone().unwrap_or_default();
    let k = counts(o);
    let kc = k.get(&canary).copied().unwrap_or_default();
    let ks = k.get(&stable).copied().unwrap_or_default();
    let want_c = wants.get(&canary).copied().unwrap_or(0);
    let want_s = wants.get(&stable).copied().unwrap_or(0);
    let converged = kc.active == want_c
        && kc.serving >= want_c
        && ks.active - ks.draining <= want_s
        && ks.active == want_s;
    let steps = step_count(c.s);
    let cur = c.status.current_step.unwrap_or(0).clamp(0, steps);
    let started = c
        .status
        .step_started_at
        .as_deref()
        .and_then(parse_rfc3339)
        .unwrap_or(c.now);
    let elapsed = c.now - started;
    let was_busy = c.busy;
    c.busy = true;

    if cur >= steps {
        // Everything on the canary: once no other pod is left, it becomes stable.
        let others = o.pods.iter().any(|p| p.revision != canary);
        if converged && !others {
            c.status.stable_revision = Some(canary.clone());
            c.status.canary_revision = None;
            c.status.current_step = None;
            c.status.step_started_at = None;
            c.status.phase = Some(Phase::Completed);
            c.status.message = Some(format!("revision {canary} is stable on {n} pods"));
            c.event(
                false,
                "ReleaseCompleted",
                format!("revision {canary} is stable"),
            );
        } else {
            c.status.phase = Some(Phase::Progressing);
            if !converged || c.status.message.is_none() {
                c.status
                    .message
                    .get_or_insert_with(|| "moving all pods to the new revision".into());
            }
        }
        return;
    }
    let Some(step) = step_at(c.s, cur) else {
        return;
    };
    let paused = c.s.paused;
    let mut next = false;
    let mut phase = Phase::Progressing;
    let mut msg = None;
    match step {
        StepKind::SetWeight(w) => {
            let routed = if converged {
                super::routing::step_reached(c, o, *w).and_then(|()| {
                    super::rebalance::split_follows_pods(c, o, cur, &canary, &stable, kc, ks)
                })
            } else {
                Ok(())
            };
            if let Err(why) = routed {
                msg = Some(format!("setting weight {w}%: {why}"));
            } else if converged && !paused {
                next = true;
            } else {
                msg = Some(format!(
                    "setting weight {w}%: {}/{want_c} new pods serving",
                    kc.serving
                ));
            }
        }
        StepKind::HeaderRoute(h) => {
            if converged && super::routing::header_route_reached(o, h) && !paused {
                next = true;
            } else {
                msg = Some(if h.is_empty() {
                    "removing the header route".into()
                } else {
                    format!("routing requests with header {} to the canary", h[0].name)
                });
            }
        }
        StepKind::Pause(None) => {
            phase = Phase::Paused;
            msg = Some("paused until promoted (kubectl sluice promote)".into());
        }
        StepKind::Pause(Some(d)) => {
            if elapsed >= d.as_secs_f64() && !paused {
                next = true;
            } else {
                phase = Phase::Paused;
                msg = Some(format!(
                    "paused for {:.0}s more",
                    (d.as_secs_f64() - elapsed).max(0.0)
                ));
            }
        }
        StepKind::Gate(d) => {
            if elapsed >= d.as_secs_f64() && !paused {
                next = true;
            } else {
                msg = Some(format!(
                    "holding while gates stay green, {:.0}s more",
                    (d.as_secs_f64() - elapsed).max(0.0)
                ));
            }
        }
    }
    if paused {
        phase = Phase::Paused;
        msg = Some("paused (spec.paused)".into());
    }
    if next {
        match judge_step(c, o, &canary, cur) {
            Judgement::Advance => {}
            Judgement::Hold => {
                next = false;
                // Waiting on a measurement or a webhook: no need for the busy pace.
                if !was_busy && (c.analysis_wait || c.hold.is_some()) {
                    c.busy = false;
                }
            }
            Judgement::Aborted => {
                c.status.phase = Some(Phase::Aborted);
                return;
            }
        }
    }
    if next {
        c.status.current_step = Some(cur + 1);
        c.status.step_started_at = Some(rfc3339(c.now));
        let what = if cur + 1 >= steps {
            "all steps done: moving to 100%".to_string()
        } else {
            format!("step {}/{steps} started", cur + 2)
        };
        c.event(
            false,
            "StepCompleted",
            format!("step {}/{steps} done; {what}", cur + 1),
        );
    }
    c.status.phase = Some(phase);
    if let Some(m) = msg
        && (c.status.message.is_none() || phase == Phase::Paused || next)
    {
        c.status.message = Some(m);
    }
}

/// No canary: bring stable to `n` serving pods, finish takeover, clean up.
pub(super) fn settle(
    c: &mut Ctx,
    o: &Observed,
    dep: &DeploymentView,
    n: i32,
    wants: &BTreeMap<String, i32>,
) {
    let stable = c.status.stable_revision.clone().unwrap_or_default();
    let k = counts(o);
    let ks = k.get(&stable).copied().unwrap_or_default();
    let others = o.pods.iter().any(|p| p.revision != stable);
    // Serving in full means in the Service's endpoints (`Ready`), not only marked serving.
    let serving_n = ks.in_endpoints >= n && ks.active == n;
    // Takeover: the Deployment goes to zero once stable serves in full.
    if dep.spec_replicas > 0 && serving_n {
        c.actions.push(Action::ScaleDeployment(0));
        c.event(
            false,
            "DeploymentScaledDown",
            format!("the Release serves {n} pods: Deployment scaled to 0"),
        );
    }
    for rs in &o.replica_sets {
        if wants.get(&rs.revision).copied().unwrap_or(0) == 0
            && rs.replicas == 0
            && !o.pods.iter().any(|p| p.revision == rs.revision)
        {
            c.actions.push(Action::DeleteReplicaSet {
                name: rs.name.clone(),
            });
        }
    }
    let aborted = c.status.aborted_revision.is_some();
    if aborted {
        c.status.phase = Some(Phase::Aborted);
        if !serving_n || others {
            c.busy = true;
            c.status
                .message
                .get_or_insert_with(|| "rolling back: traffic returns to stable".into());
        } else {
            let why = c
                .status
                .abort
                .as_ref()
                .map(|a| a.message.clone())
                .unwrap_or_default();
            c.status.message = Some(format!("rolled back to {stable}: {why}"));
        }
    } else if serving_n && !others && dep.spec_replicas == 0 {
        c.status.phase = Some(Phase::Completed);
        c.status.message = Some(format!("revision {stable} is stable on {n} pods"));
    } else {
        c.busy = true;
        c.status.phase = Some(Phase::Progressing);
        c.status
            .message
            .get_or_insert_with(|| format!("bringing revision {stable} to {n} serving pods"));
    }
}
