//! Failures, deletion and the Deployment claim: invalid specs, missing Deployments,
//! hand-back on deletion, extreme inputs, one Release per Deployment.

use super::*;

#[test]
fn deletion_hands_the_pods_back_to_the_deployment() {
    let mut sim = Sim::new(STEPS, 3);
    sim.settle();
    sim.deleting = true;
    let plan = sim.round();
    assert!(plan.actions.contains(&Action::ScaleDeployment(3)));
    // Nothing is drained before the Deployment's pods are available.
    assert!(sim.drains_started.is_empty());
    sim.run_until(100, |s| !s.has_finalizer);
    assert!(sim.pods.is_empty());
    assert!(sim.rss.is_empty());
    assert_eq!(sim.drains_started.len(), 3);
    assert!(sim.unsafe_deletes.is_empty());
}

#[test]
fn invalid_spec_fails_with_the_reason() {
    let mut sim = Sim::new(
        "workloadRef: {name: echo}\nsteps: [{setWeight: 60}, {setWeight: 10}]",
        2,
    );
    let plan = sim.round();
    assert_eq!(sim.phase(), Phase::Failed);
    assert!(
        sim.status
            .message
            .as_deref()
            .unwrap()
            .contains("must not decrease")
    );
    assert!(
        plan.actions
            .iter()
            .any(|a| matches!(a, Action::Event { reason, .. } if reason == "ReleaseFailed"))
    );
    // Reported once, not every round.
    let plan = sim.round();
    assert!(
        !plan
            .actions
            .iter()
            .any(|a| matches!(a, Action::Event { .. }))
    );
}

#[test]
fn a_missing_deployment_fails_and_deletion_still_completes() {
    let mut sim = Sim::new(STEPS, 2);
    sim.dep = None;
    sim.round();
    assert_eq!(sim.phase(), Phase::Failed);
    assert!(sim.status.message.as_deref().unwrap().contains("not found"));
    sim.deleting = true;
    let plan = sim.round();
    assert!(plan.actions.contains(&Action::RemoveFinalizer));
}

#[test]
fn an_uninjectable_template_fails() {
    let mut sim = Sim::new(STEPS, 2);
    sim.dep.as_mut().unwrap().inject_error = Some("container \"app\" declares no port".into());
    sim.round();
    assert_eq!(sim.phase(), Phase::Failed);
    assert!(
        sim.status
            .message
            .as_deref()
            .unwrap()
            .contains("declares no port")
    );
}

/// No status or count makes the planner panic: step indices outside the steps (negative
/// ones from a hand-edited status), replica counts and surges near 2^31, failure counts at
/// their maximum. The planner clamps the step into `0..=steps`.
#[test]
fn extreme_inputs_do_not_panic_the_planner() {
    let steps = [i32::MIN, -2, -1, 0, 1, 2, 3, 4, 5, i32::MAX - 1, i32::MAX];
    let replicas = [1, 3, 1 << 30, i32::MAX - 1, i32::MAX];
    let surges = ["1", "25%", "100%", "2147483647"];
    for surge in surges {
        let spec = format!(
            "workloadRef: {{name: echo}}\nmaxSurge: {surge}\nsteps: [{{setWeight: 20}}, {{pause: {{}}}}, {{gate: {{duration: 1m}}}}, {{setWeight: 60}}]\ngates: {{connectionRate: {{maxPerPod: 5}}, comparison: {{}}}}"
        );
        for &n in &replicas {
            for &step in &steps {
                for failures in [0, i32::MAX] {
                    let mut sim = Sim::new(&spec, n);
                    sim.has_finalizer = true;
                    let dep = sim.dep.as_mut().unwrap();
                    dep.revision = "v2".into();
                    dep.recorded_replicas = Some(i32::MIN);
                    dep.available_replicas = i32::MAX;
                    sim.status = ReleaseStatus {
                        stable_revision: Some("v1".into()),
                        canary_revision: Some("v2".into()),
                        current_step: Some(step),
                        replicas: Some(i32::MIN),
                        gates: ["health", "connectionRate", "comparison"]
                            .iter()
                            .map(|g| crate::release::crd::GateResult {
                                name: (*g).into(),
                                result: "Failed".into(),
                                consecutive_failures: failures,
                                last_evaluated: "2000-01-01T00:00:00Z".into(),
                                ..Default::default()
                            })
                            .collect(),
                        ..Default::default()
                    };
                    sim.promote = Some(format!("p{step}"));
                    sim.rss = vec![
                        ReplicaSetView {
                            name: "rel-v1".into(),
                            uid: "uid-v1".into(),
                            revision: "v1".into(),
                            replicas: i32::MAX,
                        },
                        ReplicaSetView {
                            name: "rel-v2".into(),
                            uid: "uid-v2".into(),
                            revision: "v2".into(),
                            replicas: i32::MAX,
                        },
                    ];
                    sim.pods = (0..4)
                        .map(|i| PodView {
                            name: format!("p{i}"),
                            revision: if i % 2 == 0 { "v1" } else { "v2" }.into(),
                            created: sim.now - 100.0,
                            containers_ready: true,
                            ready_since: Some(sim.now - 90.0),
                            serving: Some(true),
                            restarts: i32::MAX,
                            ..Default::default()
                        })
                        .collect();
                    sim.status.canary_weight = Some(step);
                    let plan = plan(&sim.observed(), sim.now);
                    // Whatever came in, what goes out is within the status schema's bounds.
                    let st = &plan.status;
                    if let Some(s) = st.current_step {
                        // Clamped into the steps where the spec is valid (a `maxSurge`
                        // above 100000 is not: then only the schema's bound applies).
                        let max = if st.phase == Some(Phase::Failed) {
                            i32::MAX
                        } else {
                            4
                        };
                        assert!((0..=max).contains(&s), "step {step} planned as {s}");
                    }
                    if let Some(w) = st.canary_weight {
                        assert!((0..=100).contains(&w), "weight {w}");
                    }
                    assert!(st.replicas.is_none_or(|r| r >= 1), "{:?}", st.replicas);
                    for g in &st.gates {
                        assert!(g.consecutive_failures >= 0, "{g:?}");
                    }
                }
            }
        }
    }
}

/// A Release naming an agent image the operator does not allow fails, saying which are
/// allowed, and creates no ReplicaSet (nothing is injected anywhere).
#[test]
fn a_disallowed_agent_image_fails_and_injects_nothing() {
    let mut sim = Sim::new(
        "workloadRef: {name: echo}\nagent: {image: evil.example/miner:1}",
        3,
    );
    let plan = sim.round();
    assert_eq!(plan.status.phase, Some(Phase::Failed));
    assert!(
        !plan
            .actions
            .iter()
            .any(|a| matches!(a, Action::CreateReplicaSet { .. })),
        "{:?}",
        plan.actions
    );
    let degraded = plan
        .status
        .conditions
        .iter()
        .find(|c| c.type_ == "Degraded")
        .unwrap();
    assert_eq!(degraded.status, "True");
    assert!(
        degraded.message.contains("allowed are \"agent:test\""),
        "{}",
        degraded.message
    );
}

/// The actions that touch the Deployment, in order.
fn deployment_actions(plan: &Plan) -> Vec<&Action> {
    plan.actions
        .iter()
        .filter(|a| {
            matches!(
                a,
                Action::ClaimDeployment
                    | Action::ReleaseClaim
                    | Action::RecordDeploymentReplicas(_)
                    | Action::ScaleDeployment(_)
            )
        })
        .collect()
}

#[test]
fn the_claim_comes_first_and_goes_last() {
    let mut sim = Sim::new(STEPS, 3);
    let first = sim.round();
    assert_eq!(
        deployment_actions(&first),
        vec![
            &Action::ClaimDeployment,
            &Action::RecordDeploymentReplicas(3)
        ]
    );
    let claim_at = first
        .actions
        .iter()
        .position(|a| *a == Action::ClaimDeployment)
        .unwrap();
    let create_at = first
        .actions
        .iter()
        .position(|a| matches!(a, Action::CreateReplicaSet { .. }))
        .unwrap();
    assert!(claim_at < create_at);
    sim.settle();
    assert_eq!(sim.dep.as_ref().unwrap().claim, Claim::Ours);
    sim.deleting = true;
    let mut last = None;
    sim.run_until(100, |s| !s.has_finalizer);
    if let Some(p) = &sim.last_plan {
        last = Some(p.clone());
    }
    let last = last.unwrap();
    let release_at = last.actions.iter().position(|a| *a == Action::ReleaseClaim);
    let remove_at = last
        .actions
        .iter()
        .position(|a| *a == Action::RemoveFinalizer);
    assert!(
        release_at.is_some() && release_at < remove_at,
        "{:?}",
        last.actions
    );
    assert_eq!(sim.dep.as_ref().unwrap().claim, Claim::Free);
}

/// A second Release for a Deployment another existing Release runs: refused with a
/// condition and one Warning event naming the first, the Deployment never touched (not
/// on deletion either); once the first is gone it takes over.
#[test]
fn a_second_release_for_a_claimed_deployment_is_refused() {
    let mut sim = Sim::new(STEPS, 3);
    sim.dep.as_mut().unwrap().claim = Claim::Other("first".into());
    let dep_before = sim.dep.clone();
    let mut warnings = Vec::new();
    for _ in 0..5 {
        let plan = sim.round();
        assert!(deployment_actions(&plan).is_empty(), "{:?}", plan.actions);
        assert!(
            !plan
                .actions
                .iter()
                .any(|a| matches!(a, Action::CreateReplicaSet { .. })),
            "{:?}",
            plan.actions
        );
        for a in &plan.actions {
            if let Action::Event {
                warning: true,
                reason,
                note,
            } = a
            {
                warnings.push((reason.clone(), note.clone()));
            }
        }
    }
    assert_eq!(sim.dep, dep_before);
    assert!(sim.rss.is_empty() && sim.pods.is_empty());
    assert_eq!(sim.phase(), Phase::Failed);
    let ready = sim
        .status
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .unwrap();
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "DeploymentClaimed")
    );
    assert!(ready.message.contains("\"first\""), "{}", ready.message);
    assert_eq!(
        warnings.len(),
        1,
        "one warning, not one per round: {warnings:?}"
    );
    assert_eq!(warnings[0].0, "DeploymentClaimed");
    assert!(warnings[0].1.contains("\"first\""));

    // Deleting the refused Release leaves the Deployment alone.
    let mut deleted = Sim::new(STEPS, 3);
    deleted.dep = sim.dep.clone();
    deleted.status = sim.status.clone();
    deleted.has_finalizer = true;
    deleted.deleting = true;
    let plan = deleted.round();
    assert_eq!(
        plan.actions
            .iter()
            .filter(|a| !matches!(a, Action::Event { .. }))
            .collect::<Vec<_>>(),
        vec![&Action::RemoveFinalizer]
    );

    // The first Release is gone (its claim removed): this one takes over.
    sim.dep.as_mut().unwrap().claim = Claim::Free;
    sim.run_until(100, |s| s.phase() == Phase::Completed && s.serving() == 3);
    assert_eq!(sim.dep.as_ref().unwrap().claim, Claim::Ours);
}

/// A Release whose spec turned invalid (here: an agent image the operator does not
/// allow) still hands the Deployment back when deleted, losslessly.
#[test]
fn deleting_a_release_with_an_invalid_spec_hands_back() {
    let mut sim = Sim::new(STEPS, 3);
    sim.settle();
    sim.spec.agent.image = Some("evil.example/agent:1".into());
    sim.round();
    assert_eq!(sim.phase(), Phase::Failed);
    sim.deleting = true;
    let plan = sim.round();
    assert!(
        plan.actions.contains(&Action::ScaleDeployment(3)),
        "{:?}",
        plan.actions
    );
    assert!(!plan.actions.contains(&Action::RemoveFinalizer));
    sim.run_until(100, |s| !s.has_finalizer);
    assert!(sim.pods.is_empty());
    assert_eq!(sim.dep.as_ref().unwrap().spec_replicas, 3);
    assert_eq!(sim.drains_started.len(), 3);
    assert!(sim.unsafe_deletes.is_empty());
}
