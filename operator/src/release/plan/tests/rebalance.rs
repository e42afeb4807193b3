//! Rebalancing: a replica-ratio step's request split brought to its pods.

use super::*;

fn spec(rebalance: bool) -> String {
    let mut s = String::from(
        "workloadRef: {name: echo}\nsteps:\n  - setWeight: 25\n  - pause: {duration: 2s}\n  - setWeight: 50\n  - pause: {duration: 2s}\n",
    );
    if rebalance {
        s.push_str("rebalance: {tolerance: 5, window: 3s}\n");
    }
    s
}

/// Runs v1 → v2 with 40 keep-alive connections; the canary's share of them when each
/// `setWeight` step is left.
fn run(rebalance: bool) -> (Sim, Vec<f64>) {
    let mut sim = Sim::new(&spec(rebalance), 4);
    sim.clients = Some(FakeClients::new(40));
    sim.settle();
    sim.new_template("v2");
    let mut shares = Vec::new();
    let mut step = sim.status.current_step;
    for _ in 0..400 {
        if sim.phase() == Phase::Completed && sim.status.stable_revision.as_deref() == Some("v2") {
            break;
        }
        let before = sim.clients.as_ref().unwrap().share(&sim, "v2");
        sim.round();
        if sim.status.current_step != step {
            if matches!(step, Some(0) | Some(2)) {
                shares.push(before);
            }
            step = sim.status.current_step;
        }
    }
    assert_eq!(sim.phase(), Phase::Completed, "{:#?}", sim.status);
    (sim, shares)
}

#[test]
fn without_rebalancing_keep_alive_clients_leave_the_split_behind_the_pods() {
    let (sim, shares) = run(false);
    assert_eq!(shares.len(), 2);
    // Only the connections of drained stable pods ever reach the canary.
    assert!(shares[0] < 20.0, "{shares:?}");
    assert!(sim.clients.as_ref().unwrap().asked.is_empty());
}

#[test]
fn rebalancing_brings_each_steps_split_to_its_pods() {
    let (sim, shares) = run(true);
    assert_eq!(shares.len(), 2, "{shares:?}");
    assert!((shares[0] - 25.0).abs() <= 5.0, "{shares:?}");
    assert!((shares[1] - 50.0).abs() <= 5.0, "{shares:?}");
    let c = sim.clients.as_ref().unwrap();
    assert!(!c.asked.is_empty());
    // Only stable pods were asked (the canary was the side with too little).
    assert!(
        c.asked.iter().all(|(pod, _)| pod.starts_with("v1")),
        "{:?}",
        c.asked
    );
    assert!(sim.has_event("Rebalancing"));
    sim.assert_lossless(4);
}

#[test]
fn rebalancing_gives_up_after_its_rounds_and_the_release_goes_on() {
    let mut sim = Sim::new(
        "workloadRef: {name: echo}\nsteps: [{setWeight: 25}, {pause: {duration: 2s}}]\nrebalance: {tolerance: 1, window: 1s, maxRounds: 2}\n",
        4,
    );
    // Five connections over four pods: 25% ± 1 cannot be reached.
    sim.clients = Some(FakeClients::new(5));
    sim.settle();
    sim.new_template("v2");
    sim.run_until(300, |s| {
        s.phase() == Phase::Completed && s.status.stable_revision.as_deref() == Some("v2")
    });
    assert!(sim.has_event("RebalanceGaveUp"), "{:#?}", sim.events);
    let rounds = sim
        .events
        .iter()
        .filter(|(_, r, _)| r == "Rebalancing")
        .count();
    assert_eq!(rounds, 2);
}
