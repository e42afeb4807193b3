//! `spec.analysis`: steps held by metric verdicts and webhooks, with
//! [`super::fake_analysis::FakeAnalysis`] in the controller's place.

use std::time::Duration;

use super::*;
use crate::analysis::Verdict;

const ANALYSED: &str = r#"
workloadRef: {name: echo}
steps:
  - setWeight: 34
  - setWeight: 67
analysis:
  templates: [{kind: AnalysisTemplate, name: success-rate}]
  webhooks:
    - {name: load-test, type: rollout, url: "http://hooks/load"}
    - {name: gate, type: pre-rollout, url: "http://hooks/gate"}
    - {name: panic-button, type: rollback, url: "http://hooks/rollback"}
"#;

fn reason(sim: &Sim, type_: &str) -> String {
    sim.status
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| c.reason.clone())
        .unwrap_or_default()
}

fn analysed(verdict: Verdict) -> Sim {
    let mut sim = Sim::new(ANALYSED, 3);
    sim.analysis.verdict = verdict;
    sim.settle();
    sim.new_template("v2");
    sim
}

#[test]
fn a_successful_analysis_advances_every_step() {
    let mut sim = analysed(Verdict::Successful);
    sim.run_until(200, |s| {
        s.phase() == Phase::Completed && s.status.stable_revision.as_deref() == Some("v2")
    });
    sim.assert_lossless(3);
    let a = sim.status.analysis.clone().unwrap();
    assert_eq!((a.revision.as_str(), a.step), ("v2", Some(1)));
}

#[test]
fn a_running_analysis_holds_the_step_and_says_when_to_return() {
    let mut sim = analysed(Verdict::Running);
    for _ in 0..60 {
        sim.round();
    }
    assert_eq!(sim.status.current_step, Some(0));
    assert_eq!(sim.phase(), Phase::Progressing);
    // 34% of 3 pods, rounded up.
    assert_eq!(sim.pods_of("v2"), 2);
    let msg = sim.status.message.clone().unwrap();
    assert!(msg.contains("analysis running"), "{msg}");
    // Held on a measurement, not on pods: no progress deadline, back at the run's pace.
    assert!(sim.status.abort.is_none());
    let plan = sim.last_plan.clone().unwrap();
    assert_eq!(plan.requeue_after, std::time::Duration::from_secs(10));
    sim.analysis.verdict = Verdict::Successful;
    sim.run_until(100, |s| s.status.current_step == Some(1));
}

#[test]
fn a_failed_analysis_aborts_and_rolls_back() {
    let mut sim = analysed(Verdict::Failed);
    sim.run_until(100, |s| s.phase() == Phase::Aborted);
    let abort = sim.status.abort.clone().unwrap();
    assert_eq!(abort.reason, "AnalysisFailed");
    assert!(
        abort.message.contains("verdict Failed"),
        "{}",
        abort.message
    );
    assert!(sim.has_event("AnalysisFailed"));
    sim.run_until(100, |s| s.pods_of("v2") == 0 && s.serving() == 3);
    sim.assert_lossless(3);
    assert_eq!(reason(&sim, "Degraded"), "AnalysisFailed");
}

#[test]
fn an_inconclusive_analysis_pauses_until_promoted() {
    let mut sim = analysed(Verdict::Inconclusive);
    sim.run_until(100, |s| s.phase() == Phase::Paused);
    assert_eq!(reason(&sim, "Ready"), "AnalysisInconclusive");
    assert!(sim.has_event("AnalysisInconclusive"));
    for _ in 0..30 {
        sim.round();
    }
    assert_eq!(sim.status.current_step, Some(0));
    let events = sim.events.iter().filter(|e| e.1 == "AnalysisInconclusive");
    assert_eq!(events.count(), 1, "one event, not one per round");
    // A person decides: promote moves the step on.
    sim.analysis.verdict = Verdict::Successful;
    sim.promote = Some("1".into());
    sim.run_until(100, |s| s.status.current_step == Some(1));
}

#[test]
fn a_halted_hook_is_asked_again_ten_seconds_after_its_answer_not_after_the_round() {
    let mut sim = analysed(Verdict::Successful);
    sim.analysis.hooks.insert("load-test".into(), "Halt");
    sim.analysis.answered_ago = 4.0;
    for _ in 0..40 {
        sim.round();
    }
    assert_eq!(reason(&sim, "Ready"), "WebhookHalted");
    let plan = sim.last_plan.clone().unwrap();
    assert_eq!(plan.requeue_after, HALT_RETRY - Duration::from_secs(4));
}

#[test]
fn a_halting_rollout_webhook_holds_the_step() {
    let mut sim = analysed(Verdict::Successful);
    sim.analysis.hooks.insert("load-test".into(), "Halt");
    for _ in 0..40 {
        sim.round();
    }
    assert_eq!(sim.status.current_step, Some(0));
    assert_eq!(reason(&sim, "Ready"), "WebhookHalted");
    assert!(sim.has_event("WebhookHalted"));
    let plan = sim.last_plan.clone().unwrap();
    assert_eq!(plan.requeue_after, HALT_RETRY);
    sim.analysis.hooks.clear();
    sim.run_until(200, |s| s.phase() == Phase::Completed);
    sim.assert_lossless(3);
}

#[test]
fn a_rollback_webhook_that_says_yes_aborts() {
    let mut sim = analysed(Verdict::Running);
    sim.analysis.hooks.insert("panic-button".into(), "RollBack");
    sim.run_until(100, |s| s.phase() == Phase::Aborted);
    assert_eq!(sim.status.abort.clone().unwrap().reason, "WebhookRollback");
    sim.run_until(100, |s| s.pods_of("v2") == 0);
    sim.assert_lossless(3);
}

#[test]
fn a_halting_pre_rollout_webhook_holds_before_any_new_pod() {
    let mut sim = Sim::new(ANALYSED, 3);
    sim.settle();
    sim.analysis.hooks.insert("gate".into(), "Halt");
    sim.new_template("v2");
    for _ in 0..30 {
        sim.round();
    }
    assert_eq!(sim.pods_of("v2"), 0);
    assert!(sim.status.canary_revision.is_none());
    assert_eq!(reason(&sim, "Ready"), "WebhookHalted");
    sim.analysis.hooks.clear();
    sim.run_until(200, |s| s.status.stable_revision.as_deref() == Some("v2"));
}

#[test]
fn templates_that_cannot_be_read_hold_the_release_degraded() {
    let mut sim = analysed(Verdict::Running);
    sim.run_until(100, |s| {
        s.status
            .analysis
            .as_ref()
            .is_some_and(|a| a.step == Some(0))
    });
    sim.analysis.invalid = Some("AnalysisTemplate \"success-rate\" not found".into());
    for _ in 0..40 {
        sim.round();
    }
    assert_eq!(sim.phase(), Phase::Paused);
    assert_eq!(sim.status.current_step, Some(0));
    assert_eq!(reason(&sim, "Degraded"), "AnalysisTemplateInvalid");
    let degraded = sim.status.conditions.iter().find(|c| c.type_ == "Degraded");
    assert_eq!(degraded.unwrap().status, "True");
    assert!(sim.status.message.clone().unwrap().contains("not found"));
    sim.analysis.invalid = None;
    sim.analysis.verdict = Verdict::Successful;
    sim.run_until(200, |s| s.phase() == Phase::Completed);
}

#[test]
fn templates_that_cannot_be_read_hold_a_new_revision_before_its_first_pod() {
    let mut sim = Sim::new(ANALYSED, 3);
    sim.settle();
    sim.analysis.invalid = Some("MetricTemplate \"errors\" not found".into());
    sim.new_template("v2");
    for _ in 0..20 {
        sim.round();
    }
    assert_eq!(sim.pods_of("v2"), 0);
    assert_eq!(reason(&sim, "Degraded"), "AnalysisTemplateInvalid");
    assert!(sim.has_event("AnalysisTemplateInvalid"));
}

/// Without `spec.analysis` the verdicts are never looked at.
#[test]
fn without_analysis_nothing_changes() {
    let mut sim = Sim::new(STEPS, 3);
    sim.analysis.verdict = Verdict::Failed;
    sim.analysis.invalid = Some("ignored".into());
    sim.settle();
    sim.new_template("v2");
    sim.run_until(200, |s| {
        s.phase() == Phase::Completed && s.status.stable_revision.as_deref() == Some("v2")
    });
    assert!(sim.status.analysis.is_none());
    sim.assert_lossless(3);
}
