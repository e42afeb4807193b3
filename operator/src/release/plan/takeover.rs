//! Which revision is stable and which the canary: taking a Deployment over, starting a
//! canary, aborting, and handing the Deployment back on deletion.

use std::collections::BTreeMap;

use crate::release::crd::{AbortInfo, Phase};
use crate::release::settings::StepKind;

use super::drain::move_pods;
use super::model::{Action, Claim, Ctx, DeploymentView, Observed};
use super::weights::{counts, step_at, step_count};
use crate::pod::time::rfc3339;

/// Which revision is stable and which is the canary, and what the user asked for.
pub(super) fn decide_revisions(c: &mut Ctx, o: &Observed, dep: &DeploymentView) {
    let r = dep.revision.clone();
    let st = &mut c.status;
    if st.stable_revision.is_none() {
        st.stable_revision = Some(r.clone());
        st.current_step = None;
        c.actions.push(Action::Event {
            warning: false,
            reason: "TakingOver".into(),
            note: format!("running revision {r} of the Deployment through the Release"),
        });
    }
    let stable = c.status.stable_revision.clone().unwrap_or_default();
    if r == stable {
        if let Some(old) = c.status.canary_revision.take() {
            c.event(
                false,
                "CanaryReverted",
                format!(
                    "the Deployment's template is back at stable {stable}: draining canary {old}"
                ),
            );
        }
        c.status.aborted_revision = None;
        c.status.abort = None;
        c.status.current_step = None;
        c.status.step_started_at = None;
    } else if c.status.aborted_revision.as_deref() == Some(r.as_str()) {
        // Stays aborted until the template changes or a promote retries it.
    } else if c.status.canary_revision.as_deref() != Some(r.as_str())
        && !super::analysis::pre_rollout_holds(c, o, &r)
    {
        if let Some(old) = c.status.canary_revision.take() {
            c.event(
                false,
                "CanarySuperseded",
                format!("revision {r} replaces canary {old}, which is drained"),
            );
        }
        start_canary(c, &r);
    }

    // User abort: any new value of the annotation.
    if let Some(token) = &o.abort
        && c.status.abort_token.as_deref() != Some(token.as_str())
    {
        c.status.abort_token = Some(token.clone());
        if c.status.canary_revision.is_some() {
            abort(
                c,
                "UserAbort",
                None,
                "aborted by the user (sluice.dev/abort)".into(),
                BTreeMap::new(),
            );
        }
    }
    // Promote: any new value of the annotation; `full…` skips every remaining step.
    if let Some(token) = &o.promote
        && c.status.promote_token.as_deref() != Some(token.as_str())
    {
        c.status.promote_token = Some(token.clone());
        let full = token.starts_with("full");
        if c.status.canary_revision.is_none() && c.status.aborted_revision.as_deref() == Some(&r) {
            c.status.aborted_revision = None;
            c.status.abort = None;
            c.event(
                false,
                "Retry",
                format!("retrying revision {r} after a promote"),
            );
            start_canary(c, &r);
        } else if c.status.canary_revision.is_some() {
            let steps = step_count(c.s);
            let cur = c.status.current_step.unwrap_or(0);
            if full {
                c.status.current_step = Some(steps);
                c.status.step_started_at = Some(rfc3339(c.now));
                c.event(false, "Promoted", "promoted to 100% (full)".into());
            } else if matches!(
                step_at(c.s, cur),
                Some(StepKind::Pause(_) | StepKind::Gate(_))
            ) || super::analysis::step_under_analysis(c)
            {
                c.status.current_step = Some(cur.saturating_add(1));
                c.status.step_started_at = Some(rfc3339(c.now));
                c.event(false, "Promoted", format!("step {} promoted", cur + 1));
            }
        }
    }
}

pub(super) fn start_canary(c: &mut Ctx, r: &str) {
    c.status.canary_revision = Some(r.to_string());
    c.status.current_step = Some(0);
    c.status.step_started_at = Some(rfc3339(c.now));
    c.status.gates.clear();
    c.status.abort = None;
    c.status.aborted_revision = None;
    c.event(
        false,
        "ReleaseStarted",
        format!(
            "releasing revision {r} over stable {}",
            c.status.stable_revision.clone().unwrap_or_default()
        ),
    );
}

pub(super) fn abort(
    c: &mut Ctx,
    reason: &str,
    gate: Option<&str>,
    message: String,
    values: BTreeMap<String, f64>,
) {
    let Some(rev) = c.status.canary_revision.take() else {
        return;
    };
    c.status.aborted_revision = Some(rev.clone());
    c.status.abort = Some(AbortInfo {
        reason: reason.into(),
        gate: gate.map(str::to_string),
        message: message.clone(),
        values,
        revision: rev.clone(),
        at: rfc3339(c.now),
    });
    c.status.step_started_at = None;
    c.event(
        true,
        if gate.is_some() { "GateFailed" } else { reason },
        format!("aborting revision {rev}: {message}; traffic returns to stable"),
    );
}

/// The Release is being deleted: the Deployment takes the pods back first, then the
/// Release's pods drain, then the finalizer goes.
pub(super) fn hand_back(c: &mut Ctx, o: &Observed, dep: &DeploymentView, n: i32) {
    c.busy = true;
    if dep.spec_replicas != n {
        c.actions.push(Action::ScaleDeployment(n));
    }
    let any_pods = !o.pods.is_empty();
    if !any_pods {
        for rs in &o.replica_sets {
            c.actions.push(Action::DeleteReplicaSet {
                name: rs.name.clone(),
            });
        }
        if o.has_finalizer {
            if dep.claim == Claim::Ours {
                c.actions.push(Action::ReleaseClaim);
            }
            c.actions.push(Action::RemoveFinalizer);
        }
        c.status.message = Some("handed back to the Deployment".into());
        return;
    }
    c.status.phase = Some(Phase::Progressing);
    if dep.available_replicas < n {
        // Keep everything serving until the Deployment's pods are available.
        let mut wants: BTreeMap<String, i32> = BTreeMap::new();
        for (rev, k) in counts(o) {
            wants.insert(rev, k.active - k.draining);
        }
        move_pods(c, o, dep, n, &wants, 0);
        c.status.message = Some(format!(
            "handing back: waiting for the Deployment ({}/{n} available)",
            dep.available_replicas
        ));
        return;
    }
    let wants: BTreeMap<String, i32> = o
        .replica_sets
        .iter()
        .map(|r| (r.revision.clone(), 0))
        .chain(o.pods.iter().map(|p| (p.revision.clone(), 0)))
        .collect();
    move_pods(c, o, dep, n, &wants, dep.available_replicas);
    c.status.message = Some("handing back: draining the Release's pods".into());
}
