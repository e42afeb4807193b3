//! Gates and rollbacks: health, comparison and connection-rate gates, user aborts, and
//! template changes mid-release.

use super::*;

#[test]
fn crash_looping_canary_is_rolled_back() {
    let mut sim = Sim::new(STEPS, 6);
    sim.settle();
    sim.crashing.push("v2".into());
    sim.new_template("v2");
    sim.run_until(100, |s| s.phase() == Phase::Aborted);
    let abort = sim.status.abort.clone().unwrap();
    assert_eq!(abort.reason, "GateFailed");
    assert_eq!(abort.gate.as_deref(), Some("health"));
    assert_eq!(abort.revision, "v2");
    assert!(
        abort.message.contains("CrashLoopBackOff"),
        "{}",
        abort.message
    );
    assert!(abort.values.contains_key("crashLooping"));
    assert!(sim.has_event("GateFailed"));
    // Traffic returns to stable and the canary leaves.
    sim.run_until(100, |s| s.pods_of("v2") == 0 && s.serving() == 6);
    for _ in 0..5 {
        sim.round();
    }
    assert_eq!(sim.phase(), Phase::Aborted);
    assert_eq!(sim.status.aborted_revision.as_deref(), Some("v2"));
    let degraded = sim
        .status
        .conditions
        .iter()
        .find(|c| c.type_ == "Degraded")
        .unwrap();
    assert_eq!(degraded.status, "True");
    sim.assert_lossless(6);
    // The aborted revision is not retried by itself.
    for _ in 0..10 {
        sim.round();
    }
    assert_eq!(sim.pods_of("v2"), 0);
}

fn window(requests: f64, errors: f64, p99: f64) -> RevisionWindow {
    RevisionWindow {
        requests,
        errors,
        latency_buckets: vec![(p99, requests), (f64::INFINITY, requests)],
    }
}

#[test]
fn a_canary_with_more_errors_is_rolled_back_with_values() {
    let mut sim = Sim::new(
        &format!("{STEPS}gates: {{comparison: {{maxErrorRatioDelta: 0.05, interval: 2s}}}}"),
        6,
    );
    sim.settle();
    sim.new_template("v2");
    sim.windows.insert("v1".into(), window(1000.0, 0.0, 0.01));
    sim.windows.insert("v2".into(), window(500.0, 100.0, 0.01));
    sim.run_until(100, |s| s.phase() == Phase::Aborted);
    let abort = sim.status.abort.clone().unwrap();
    assert_eq!(abort.gate.as_deref(), Some("comparison"));
    assert_eq!(abort.values["canaryErrorRatio"], 0.2);
    assert!(sim.has_event("GateFailing"));
    let gate = sim
        .status
        .gates
        .iter()
        .find(|g| g.name == "comparison")
        .unwrap();
    assert_eq!(gate.result, "Failed");
    assert_eq!(gate.consecutive_failures, 2);
    sim.run_until(100, |s| s.pods_of("v2") == 0);
    sim.assert_lossless(6);
}

#[test]
fn a_slower_canary_is_rolled_back() {
    let mut sim = Sim::new(
        &format!("{STEPS}gates: {{comparison: {{maxLatencyRatio: 1.5, interval: 2s}}}}"),
        6,
    );
    sim.settle();
    sim.new_template("v2");
    sim.windows.insert("v1".into(), window(1000.0, 0.0, 0.01));
    sim.windows.insert("v2".into(), window(500.0, 0.0, 0.03));
    sim.run_until(100, |s| s.phase() == Phase::Aborted);
    assert!(sim.status.abort.as_ref().unwrap().message.contains("p99"));
}

#[test]
fn inconclusive_comparison_does_not_abort() {
    let mut sim = Sim::new(
        &format!("{STEPS}gates: {{comparison: {{interval: 2s}}}}"),
        3,
    );
    sim.settle();
    sim.new_template("v2");
    sim.run_until(200, |s| s.phase() == Phase::Completed);
    // No canary data at all in the last evaluation: inconclusive, never failed.
    assert!(sim.status.abort.is_none());
}

#[test]
fn connection_rate_throttles_drains() {
    let mut sim = Sim::new(
        "workloadRef: {name: echo}\nsteps: [{setWeight: 50}]\ngates: {connectionRate: {maxPerPod: 10, failureLimit: 100}}",
        4,
    );
    sim.settle();
    // New pods take 50 new connections/s: no old pod may be drained.
    sim.signals = Box::new(|p: &PodView, _| {
        let mut s = quiet_signals(p, 0.0).unwrap();
        if p.revision == "v2" {
            s.new_connection_rate = Some(50.0);
        }
        Some(s)
    });
    sim.new_template("v2");
    for _ in 0..30 {
        sim.round();
    }
    assert!(sim.drains_started.is_empty());
    assert!(
        sim.status.message.as_deref().unwrap().contains("throttled"),
        "{:?}",
        sim.status.message
    );
    // The rate drops: the release goes on.
    sim.signals = Box::new(quiet_signals);
    sim.run_until(200, |s| s.phase() == Phase::Completed);
    sim.assert_lossless(4);
}

#[test]
fn sustained_connection_churn_without_drains_aborts() {
    let mut sim = Sim::new(
        "workloadRef: {name: echo}\nsteps: [{setWeight: 25}, {pause: {}}]\ngates: {connectionRate: {maxPerPod: 10, failureLimit: 3, interval: 1s}}",
        4,
    );
    sim.settle();
    sim.new_template("v2");
    sim.run_until(100, |s| s.phase() == Phase::Paused);
    sim.signals = Box::new(|p: &PodView, _| {
        let mut s = quiet_signals(p, 0.0).unwrap();
        if p.revision == "v2" {
            s.new_connection_rate = Some(500.0);
        }
        Some(s)
    });
    sim.run_until(20, |s| s.phase() == Phase::Aborted);
    assert_eq!(
        sim.status.abort.as_ref().unwrap().gate.as_deref(),
        Some("connectionRate")
    );
}

#[test]
fn user_abort_rolls_back() {
    let mut sim = Sim::new(STEPS, 3);
    sim.settle();
    sim.new_template("v2");
    sim.run_until(100, |s| s.phase() == Phase::Paused);
    sim.abort = Some("now".into());
    sim.round();
    assert_eq!(sim.phase(), Phase::Aborted);
    assert_eq!(sim.status.abort.as_ref().unwrap().reason, "UserAbort");
    sim.run_until(100, |s| s.pods_of("v2") == 0);
    sim.assert_lossless(3);
    // Promote retries the aborted revision.
    sim.promote = Some("retry".into());
    sim.round();
    assert_eq!(sim.status.canary_revision.as_deref(), Some("v2"));
    assert!(sim.has_event("Retry"));
}

#[test]
fn reverting_the_template_drains_the_canary() {
    let mut sim = Sim::new(STEPS, 3);
    sim.settle();
    sim.new_template("v2");
    sim.run_until(100, |s| s.phase() == Phase::Paused);
    sim.new_template("v1");
    sim.round();
    assert!(sim.has_event("CanaryReverted"));
    sim.run_until(100, |s| s.phase() == Phase::Completed);
    assert_eq!(sim.pods_of("v2"), 0);
    assert_eq!(sim.status.stable_revision.as_deref(), Some("v1"));
    sim.assert_lossless(3);
}

#[test]
fn a_newer_template_supersedes_the_canary() {
    let mut sim = Sim::new(STEPS, 3);
    sim.settle();
    sim.new_template("v2");
    sim.run_until(100, |s| s.phase() == Phase::Paused);
    sim.new_template("v3");
    sim.round();
    assert!(sim.has_event("CanarySuperseded"));
    assert_eq!(sim.status.canary_revision.as_deref(), Some("v3"));
    sim.run_until(300, |s| s.phase() == Phase::Completed);
    assert_eq!(sim.status.stable_revision.as_deref(), Some("v3"));
    assert_eq!(sim.pods_of("v2"), 0);
    sim.assert_lossless(3);
}
