//! Steps: takeover, weights, pauses and promotes, deadlines, warm-up, replica counts.

use super::*;

#[test]
fn takeover_runs_the_deployment_pods_through_the_release() {
    let mut sim = Sim::new(STEPS, 3);
    let first = sim.round();
    assert!(first.actions.contains(&Action::AddFinalizer));
    assert!(first.actions.contains(&Action::RecordDeploymentReplicas(3)));
    assert!(first.actions.contains(&Action::CreateReplicaSet {
        revision: "v1".into(),
        replicas: 3
    }));
    assert_eq!(sim.status.stable_revision.as_deref(), Some("v1"));
    sim.settle();
    assert_eq!(sim.serving(), 3);
    assert_eq!(sim.dep.as_ref().unwrap().spec_replicas, 0);
    assert!(sim.has_event("DeploymentScaledDown"));
    let ready = sim
        .status
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .unwrap();
    assert_eq!(ready.status, "True");
    assert_eq!(ready.observed_generation, Some(1));
    // Idle once settled.
    assert_eq!(sim.round().requeue_after.as_secs(), 30);
}

#[test]
fn a_release_completes_losslessly_through_every_step() {
    let mut sim = Sim::new(STEPS, 6);
    sim.settle();
    sim.new_template("v2");
    sim.round();
    assert_eq!(sim.status.canary_revision.as_deref(), Some("v2"));
    assert_eq!(sim.phase(), Phase::Progressing);
    assert!(sim.has_event("ReleaseStarted"));
    let mut saw_paused = false;
    let mut saw_weight = false;
    for _ in 0..300 {
        if sim.phase() == Phase::Completed {
            break;
        }
        sim.round();
        saw_paused |= sim.phase() == Phase::Paused;
        saw_weight |= sim.status.canary_weight.is_some_and(|w| w > 0 && w < 100);
    }
    assert_eq!(sim.phase(), Phase::Completed, "{:#?}", sim.status);
    assert!(saw_paused && saw_weight);
    assert_eq!(sim.status.stable_revision.as_deref(), Some("v2"));
    assert_eq!(sim.status.canary_revision, None);
    assert_eq!(sim.pods_of("v1"), 0);
    assert_eq!(sim.serving(), 6);
    sim.assert_lossless(6);
    // Every old pod was drained exactly once and the record says how.
    assert_eq!(sim.drains_started.len(), 6);
    let done: Vec<_> = sim
        .status
        .drains
        .iter()
        .filter(|d| d.state == "Completed")
        .collect();
    assert_eq!(done.len(), 6, "{:#?}", sim.status.drains);
    assert!(
        done.iter()
            .all(|d| d.duration_seconds.is_some() && d.quiet_seconds.is_some())
    );
    assert!(done.iter().all(|d| d.connections_closed == Some(3)));
    assert!(sim.has_event("StepCompleted") && sim.has_event("ReleaseCompleted"));
    assert!(sim.has_event("DrainStarted") && sim.has_event("PodDrained"));
    // The old ReplicaSet is gone.
    sim.round();
    assert!(!sim.rss.iter().any(|r| r.revision == "v1"));
}

#[test]
fn drains_respect_the_concurrency_limit() {
    let mut sim = Sim::new(
        "workloadRef: {name: echo}\ndrain: {maxConcurrent: 1}\nmaxSurge: 6",
        6,
    );
    sim.settle();
    sim.new_template("v2");
    for _ in 0..200 {
        sim.round();
        let in_flight = sim
            .pods
            .iter()
            .filter(|p| p.drain_started.is_some())
            .count();
        assert!(in_flight <= 1, "{in_flight} drains at once");
        if sim.phase() == Phase::Completed {
            break;
        }
    }
    assert_eq!(sim.phase(), Phase::Completed);
    sim.assert_lossless(6);
}

#[test]
fn an_open_pause_waits_for_promote() {
    let mut sim = Sim::new(
        "workloadRef: {name: echo}\nsteps: [{setWeight: 50}, {pause: {}}]",
        2,
    );
    sim.settle();
    sim.new_template("v2");
    sim.run_until(100, |s| s.phase() == Phase::Paused);
    for _ in 0..50 {
        sim.round();
    }
    assert_eq!(sim.phase(), Phase::Paused);
    assert_eq!(sim.status.current_step, Some(1));
    assert!(sim.status.message.as_deref().unwrap().contains("promote"));
    sim.promote = Some("t1".into());
    sim.round();
    assert_eq!(sim.status.current_step, Some(2));
    assert_eq!(sim.status.promote_token.as_deref(), Some("t1"));
    sim.run_until(100, |s| s.phase() == Phase::Completed);
    // The same token again does nothing.
    let before = sim.status.clone();
    sim.round();
    assert_eq!(sim.status.stable_revision, before.stable_revision);
    sim.assert_lossless(2);
}

#[test]
fn full_promote_skips_all_steps() {
    let mut sim = Sim::new(
        "workloadRef: {name: echo}\nsteps: [{setWeight: 25}, {pause: {}}, {setWeight: 50}, {pause: {}}]",
        4,
    );
    sim.settle();
    sim.new_template("v2");
    sim.run_until(100, |s| s.phase() == Phase::Paused);
    sim.promote = Some("full-1".into());
    sim.round();
    assert_eq!(sim.status.current_step, Some(4));
    sim.run_until(100, |s| s.phase() == Phase::Completed);
    sim.assert_lossless(4);
}

#[test]
fn spec_paused_holds_new_drains() {
    let mut sim = Sim::new("workloadRef: {name: echo}\nsteps: [{setWeight: 50}]", 4);
    sim.settle();
    sim.spec.paused = true;
    sim.new_template("v2");
    for _ in 0..30 {
        sim.round();
    }
    assert_eq!(sim.phase(), Phase::Paused);
    assert!(sim.drains_started.is_empty(), "{:?}", sim.drains_started);
    sim.spec.paused = false;
    sim.run_until(200, |s| s.phase() == Phase::Completed);
    sim.assert_lossless(4);
}

#[test]
fn a_step_past_its_deadline_aborts() {
    let mut sim = Sim::new(
        "workloadRef: {name: echo}\nsteps: [{setWeight: 50}]\nprogressDeadline: 10s\ngates: {health: {enabled: false}}",
        2,
    );
    sim.settle();
    sim.ready_after = 1000.0;
    sim.new_template("v2");
    sim.run_until(30, |s| s.phase() == Phase::Aborted);
    assert_eq!(
        sim.status.abort.as_ref().unwrap().reason,
        "ProgressDeadlineExceeded"
    );
}

#[test]
fn warmup_delays_serving() {
    let mut sim = Sim::new("workloadRef: {name: echo}\nwarmup: 5s", 1);
    let mut first_serving = None;
    for _ in 0..30 {
        sim.round();
        if first_serving.is_none() && sim.serving() > 0 {
            first_serving = Some(sim.now);
        }
    }
    let created = 1_700_000_000.0 + 1.0;
    let ready = created + sim.ready_after;
    assert!(first_serving.unwrap() >= ready + 5.0, "{first_serving:?}");
}

#[test]
fn explicit_replicas_win_and_deployment_rescale_is_adopted() {
    let mut sim = Sim::new("workloadRef: {name: echo}\nreplicas: 4", 2);
    sim.settle();
    assert_eq!(sim.serving(), 4);
    let mut sim = Sim::new("workloadRef: {name: echo}", 2);
    sim.settle();
    // GitOps scales the Deployment to 3: the Release adopts it and zeroes it again.
    sim.dep.as_mut().unwrap().spec_replicas = 3;
    let plan = sim.round();
    assert!(plan.actions.contains(&Action::RecordDeploymentReplicas(3)));
    sim.run_until(100, |s| {
        s.serving() == 3
            && s.dep.as_ref().unwrap().spec_replicas == 0
            && s.phase() == Phase::Completed
    });
}
