//! `spec.analysis` in the plan: the pre-rollout webhooks before a new revision gets a pod,
//! and each step held until its metric analysis is Successful and its webhooks agree.
//!
//! Pure: the controller runs the measurements and calls the webhooks, writing what it
//! got into `status.analysis` of the stage the planner named there before planning (see
//! `controller/analysis.rs`); the planner reads that status and decides.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::analysis::Verdict;
use crate::pod::time::parse_rfc3339;
use crate::release::crd::{ReleaseAnalysisStatus, WebhookType};

use super::model::{Ctx, Hold, Observed};
use super::takeover::abort;

/// How long a halted webhook waits before it is asked again (the controller's pace).
pub const HALT_RETRY: Duration = Duration::from_secs(10);

/// What the analysis says about the current step.
pub(super) enum Judgement {
    Advance,
    Hold,
    Aborted,
}

fn has_hooks(c: &Ctx, t: WebhookType) -> bool {
    c.s.analysis
        .as_ref()
        .is_some_and(|a| a.webhooks.iter().any(|w| w.type_ == t))
}

/// The first webhook of type `t` (in spec order) without a `Proceed` in `st`:
/// `(name, decision, message)`; the decision is `None` when it has not answered yet.
fn first_unsettled(
    c: &Ctx,
    st: &ReleaseAnalysisStatus,
    t: WebhookType,
) -> Option<(String, Option<String>, String)> {
    let a = c.s.analysis.as_ref()?;
    a.webhooks.iter().filter(|w| w.type_ == t).find_map(|w| {
        match st.webhooks.iter().find(|r| r.name == w.name) {
            Some(r) if r.decision == "Proceed" => None,
            Some(r) => Some((w.name.clone(), Some(r.decision.clone()), r.message.clone())),
            None => Some((w.name.clone(), None, String::new())),
        }
    })
}

/// How long until the halted hook `name` is asked again: [`HALT_RETRY`] after its last
/// answer, not after this round (other rounds in between must not push the question out).
fn retry_in(c: &Ctx, st: &ReleaseAnalysisStatus, name: &str) -> Duration {
    let asked = st
        .webhooks
        .iter()
        .find(|r| r.name == name)
        .and_then(|r| parse_rfc3339(&r.at));
    match asked {
        Some(t) => {
            let left = HALT_RETRY.as_secs_f64() - (c.now - t);
            Duration::from_secs_f64(left.clamp(0.0, HALT_RETRY.as_secs_f64()))
        }
        None => HALT_RETRY,
    }
}

fn hold(c: &mut Ctx, reason: &'static str, message: String, paused: bool, degraded: bool) {
    // One event per reason entered, not one per round.
    let before = c.status.conditions.iter().find(|k| k.type_ == "Ready");
    if matches!(
        reason,
        "AnalysisInconclusive" | "WebhookHalted" | "AnalysisTemplateInvalid"
    ) && before.is_none_or(|k| k.reason != reason)
    {
        c.event(true, reason, message.clone());
    }
    c.hold = Some(Hold {
        reason,
        message,
        paused,
        degraded,
    });
}

/// Whether a new revision `r` must wait before its canary starts: the templates cannot
/// be read, or a pre-rollout webhook has not said yes yet.
pub(super) fn pre_rollout_holds(c: &mut Ctx, o: &Observed, r: &str) -> bool {
    if c.s.analysis.is_none() {
        return false;
    }
    if let Some(why) = &o.analysis.invalid {
        let msg = format!("revision {r} waits: {why}");
        hold(c, "AnalysisTemplateInvalid", msg, true, true);
        return true;
    }
    if !has_hooks(c, WebhookType::PreRollout) {
        return false;
    }
    let stage = c
        .status
        .analysis
        .clone()
        .filter(|a| a.revision == r && a.step.is_none());
    let Some(st) = stage else {
        c.status.analysis = Some(ReleaseAnalysisStatus {
            revision: r.into(),
            step: None,
            run: None,
            webhooks: Vec::new(),
        });
        c.busy = true;
        c.status.message = Some(format!("revision {r}: calling the pre-rollout webhooks"));
        return true;
    };
    match first_unsettled(c, &st, WebhookType::PreRollout) {
        None => false,
        Some((name, None, _)) => {
            c.busy = true;
            c.status.message = Some(format!(
                "revision {r}: waiting for pre-rollout webhook {name}"
            ));
            true
        }
        Some((name, Some(_), msg)) => {
            c.requeue_hint = Some(retry_in(c, &st, &name));
            hold(
                c,
                "WebhookHalted",
                format!("revision {r} holds before its first pod: {msg}"),
                false,
                false,
            );
            true
        }
    }
}

/// Judge step `cur` of `canary`, whose pods are in place and whose own hold is over.
pub(super) fn judge_step(c: &mut Ctx, o: &Observed, canary: &str, cur: i32) -> Judgement {
    let Some(a) = c.s.analysis.clone() else {
        return Judgement::Advance;
    };
    let n = cur + 1;
    if let Some(why) = &o.analysis.invalid {
        let msg = format!("step {n} holds: {why}");
        hold(c, "AnalysisTemplateInvalid", msg, true, true);
        return Judgement::Hold;
    }
    let judged = a
        .webhooks
        .iter()
        .any(|w| matches!(w.type_, WebhookType::Rollout | WebhookType::Rollback));
    if a.templates.is_empty() && !judged {
        return Judgement::Advance;
    }
    let stage = c
        .status
        .analysis
        .clone()
        .filter(|s| s.revision == canary && s.step == Some(cur));
    let Some(st) = stage else {
        // A new stage: the run of the step before is dropped, the controller starts a
        // fresh one in the next round.
        c.status.analysis = Some(ReleaseAnalysisStatus {
            revision: canary.into(),
            step: Some(cur),
            run: None,
            webhooks: Vec::new(),
        });
        c.status.message = Some(format!("step {n}: starting the analysis"));
        return Judgement::Hold;
    };
    let verdict = st.run.as_ref().map(|r| r.verdict);
    let run_msg = || {
        st.run
            .as_ref()
            .and_then(|r| r.message.clone())
            .unwrap_or_default()
    };
    if !a.templates.is_empty() && verdict == Some(Verdict::Failed) {
        let msg = format!("analysis of step {n} failed: {}", run_msg());
        abort(c, "AnalysisFailed", None, msg, BTreeMap::new());
        return Judgement::Aborted;
    }
    if let Some((_, Some(d), msg)) = first_unsettled(c, &st, WebhookType::Rollback)
        && d == "RollBack"
    {
        let msg = format!("rollback webhook at step {n}: {msg}");
        abort(c, "WebhookRollback", None, msg, BTreeMap::new());
        return Judgement::Aborted;
    }
    if !a.templates.is_empty() && verdict == Some(Verdict::Inconclusive) {
        let msg = format!(
            "analysis of step {n} is inconclusive: {}; promote (kubectl sluice promote) to go on, or abort",
            run_msg()
        );
        hold(c, "AnalysisInconclusive", msg, true, false);
        return Judgement::Hold;
    }
    match first_unsettled(c, &st, WebhookType::Rollout) {
        Some((name, Some(_), msg)) => {
            c.requeue_hint = Some(retry_in(c, &st, &name));
            hold(
                c,
                "WebhookHalted",
                format!("step {n} holds: {msg}"),
                false,
                false,
            );
            return Judgement::Hold;
        }
        Some((name, None, _)) => {
            c.status.message = Some(format!("step {n}: waiting for rollout webhook {name}"));
            return Judgement::Hold;
        }
        None => {}
    }
    if !a.templates.is_empty() && verdict != Some(Verdict::Successful) {
        let measured = st
            .run
            .as_ref()
            .map(|r| r.metrics.iter().map(|m| m.count).sum::<u32>())
            .unwrap_or(0);
        c.status.message = Some(format!(
            "step {n}: analysis running ({measured} measurement(s) so far)"
        ));
        // Nothing else moves while the run waits for its next measurement.
        c.requeue_hint = o.analysis.requeue_after;
        c.analysis_wait = verdict.is_some();
        return Judgement::Hold;
    }
    Judgement::Advance
}

/// Whether the step is held by its analysis or a webhook (the progress deadline does
/// not run meanwhile, and a promote moves it on).
pub(super) fn step_under_analysis(c: &Ctx) -> bool {
    c.s.analysis.is_some()
        && c.status.analysis.as_ref().is_some_and(|a| {
            Some(&a.revision) == c.status.canary_revision.as_ref()
                && a.step.is_some()
                && a.step == c.status.current_step
        })
}
