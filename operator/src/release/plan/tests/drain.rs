//! Drains: quiet detection, the propagation timeout, restarts mid-drain, drain records,
//! the connection-rate budget for closes, and refused preStop drains.

use super::*;

#[test]
fn a_pod_that_never_goes_quiet_is_closed_at_the_propagation_timeout() {
    let mut sim = Sim::new(
        "workloadRef: {name: echo}\ndrain: {propagationTimeout: 10s}",
        2,
    );
    sim.settle();
    sim.signals = Box::new(|p: &PodView, _| {
        let mut s = quiet_signals(p, 0.0).unwrap();
        s.quiet_seconds = Some(0.0);
        Some(s)
    });
    sim.new_template("v2");
    sim.run_until(200, |s| s.phase() == Phase::Completed);
    let recs: Vec<_> = sim
        .status
        .drains
        .iter()
        .filter(|d| d.revision == "v1")
        .collect();
    assert_eq!(recs.len(), 2, "{recs:#?}");
    for r in recs {
        assert_eq!(r.state, "QuietTimeout");
        assert!(r.quiet_seconds.unwrap() >= 10.0);
    }
    assert!(sim.has_event("QuietTimeout"));
    sim.assert_lossless(2);
}

#[test]
fn quiet_means_quiet_for_the_whole_period() {
    let mut sim = Sim::new("workloadRef: {name: echo}\ndrain: {quietPeriod: 5s}", 1);
    sim.settle();
    // Quiet only for 3 s at any moment: never enough.
    sim.signals = Box::new(|p: &PodView, _| {
        let mut s = quiet_signals(p, 0.0).unwrap();
        s.quiet_seconds = Some(3.0);
        Some(s)
    });
    sim.new_template("v2");
    sim.run_until(50, |s| !s.drains_started.is_empty());
    for _ in 0..20 {
        let plan = sim.round();
        assert!(
            !plan
                .actions
                .iter()
                .any(|a| matches!(a, Action::ReleasePod { .. }))
        );
    }
    sim.signals = Box::new(quiet_signals);
    let plan = sim.round();
    assert!(
        plan.actions
            .iter()
            .any(|a| matches!(a, Action::ReleasePod { .. }))
    );
}

#[test]
fn restart_mid_drain_resumes_without_a_second_drain() {
    let mut sim = Sim::new("workloadRef: {name: echo}\ndrain: {quietPeriod: 3s}", 3);
    sim.settle();
    sim.new_template("v2");
    sim.run_until(50, |s| !s.drains_started.is_empty());
    // The operator dies: its in-memory signal history is gone; the new one has seen
    // each agent once, just now.
    let restart_at = sim.now;
    sim.signals = Box::new(move |p: &PodView, now| {
        let mut s = quiet_signals(p, 0.0).unwrap();
        s.quiet_seconds = Some(now - restart_at);
        s.new_connection_rate = None;
        Some(s)
    });
    let draining: Vec<String> = sim
        .pods
        .iter()
        .filter(|p| p.drain_started.is_some())
        .map(|p| p.name.clone())
        .collect();
    let plan = sim.round();
    // Not released before a full quiet period has been seen again.
    assert!(
        !plan
            .actions
            .iter()
            .any(|a| matches!(a, Action::ReleasePod { pod } if draining.contains(pod)))
    );
    sim.run_until(200, |s| s.phase() == Phase::Completed);
    sim.assert_lossless(3);
}

#[test]
fn restart_with_lost_status_rebuilds_drain_records() {
    let mut sim = Sim::new("workloadRef: {name: echo}\ndrain: {quietPeriod: 3s}", 2);
    sim.settle();
    sim.new_template("v2");
    sim.run_until(50, |s| !s.drains_started.is_empty());
    sim.status.drains.clear();
    sim.round();
    assert!(!sim.status.drains.is_empty());
    sim.run_until(200, |s| s.phase() == Phase::Completed);
    sim.assert_lossless(2);
}

#[test]
fn drain_records_are_capped() {
    let mut sim = Sim::new(
        "workloadRef: {name: echo}\ndrain: {maxConcurrent: 20}\nmaxSurge: 100%",
        20,
    );
    sim.settle();
    for rev in ["v2", "v3", "v4"] {
        sim.new_template(rev);
        sim.run_until(300, |s| {
            s.phase() == Phase::Completed && s.status.stable_revision.as_deref() == Some(rev)
        });
    }
    assert!(sim.status.drains.len() <= MAX_DRAIN_RECORDS);
    assert_eq!(sim.status.drains.last().unwrap().revision, "v3");
}

#[test]
fn a_drain_record_planned_from_an_older_status_gets_its_quiet_time() {
    // The status the planner starts from lacks what the round that released the pod
    // recorded (a lagging cache): the record is filled in from the pod's annotations.
    let mut sim = Sim::new("workloadRef: {name: echo}", 1);
    sim.pods.push(PodView {
        name: "echo-v1-a".into(),
        revision: "v1".into(),
        created: sim.now - 100.0,
        containers_ready: true,
        ready_since: Some(sim.now - 90.0),
        serving: Some(false),
        drain_started: Some(sim.now - 10.0),
        drain_released: Some(sim.now - 7.5),
        ..Default::default()
    });
    sim.status.drains.push(DrainRecord {
        pod: "echo-v1-a".into(),
        revision: "v1".into(),
        state: "Quiescing".into(),
        started_at: rfc3339(sim.now - 10.0),
        ..Default::default()
    });
    let p = plan(&sim.observed(), sim.now);
    let rec = p
        .status
        .drains
        .iter()
        .find(|d| d.pod == "echo-v1-a")
        .unwrap();
    assert_eq!(rec.quiet_seconds, Some(2.5));
}

#[test]
fn quiet_pods_close_within_the_connection_rate_budget() {
    // 4 new pods × 5 connections/s each = 20/s; each closing pod sends 10/s: two at once.
    let mut sim = Sim::new(
        "workloadRef: {name: echo}\nmaxSurge: 100%\ngates: {connectionRate: {maxPerPod: 5, failureLimit: 100}}\ndrain: {closeRate: 10, maxConcurrent: 4}",
        4,
    );
    // A deleted pod goes once its agent closed the last connection.
    sim.terminate_after = 5.0;
    sim.settle();
    // Every pod holds 40 connections; a released pod's agent closes them at 10/s.
    sim.signals = Box::new(|p: &PodView, now| {
        let mut s = quiet_signals(p, now).unwrap();
        s.connections_active = match p.drain_released {
            Some(r) => (40.0 - 10.0 * (now - r)).max(0.0),
            None => 40.0,
        };
        Some(s)
    });
    sim.new_template("v2");
    let mut most_closing = 0;
    let mut saw_wait = false;
    for _ in 0..200 {
        if sim.phase() == Phase::Completed && sim.pods_of("v1") == 0 {
            break;
        }
        sim.round();
        let now = sim.now;
        let closing = sim
            .pods
            .iter()
            .filter(|p| {
                p.drain_released
                    .is_some_and(|r| 40.0 - 10.0 * (now - 1.0 - r) > 10.0)
            })
            .count();
        most_closing = most_closing.max(closing);
        saw_wait |= sim
            .status
            .message
            .as_deref()
            .is_some_and(|m| m.starts_with("paced close"));
    }
    assert_eq!(
        sim.pods_of("v1"),
        0,
        "release did not finish: {:?}",
        sim.status
    );
    assert!(saw_wait, "no pod ever waited for the close budget");
    // The records keep when each pod went quiet, not when its turn to close came.
    let quiet: Vec<f64> = sim
        .status
        .drains
        .iter()
        .filter(|r| r.revision == "v1")
        .map(|r| r.quiet_seconds.unwrap())
        .collect();
    assert_eq!(quiet.len(), 4);
    assert!(quiet.iter().all(|q| *q <= 3.0), "quiet times {quiet:?}");
    assert!(most_closing <= 2, "{most_closing} pods closing at once");
    assert!(most_closing >= 1);
    sim.assert_lossless(4);
}

#[test]
fn without_a_connection_rate_gate_quiet_pods_close_at_once() {
    let mut sim = Sim::new(
        "workloadRef: {name: echo}\nmaxSurge: 100%\ndrain: {closeRate: 10, maxConcurrent: 4}",
        4,
    );
    sim.settle();
    sim.signals = Box::new(|p: &PodView, now| {
        let mut s = quiet_signals(p, now).unwrap();
        s.connections_active = 40.0;
        Some(s)
    });
    sim.new_template("v2");
    let mut most_released = 0;
    for _ in 0..100 {
        if sim.pods_of("v1") == 0 {
            break;
        }
        sim.round();
        let released = sim
            .pods
            .iter()
            .filter(|p| p.revision == "v1" && p.drain_released.is_some())
            .count();
        most_released = most_released.max(released);
    }
    assert_eq!(most_released, 4);
    sim.assert_lossless(4);
}

#[test]
fn a_quiet_pod_with_nothing_to_close_does_not_wait_for_the_budget() {
    // Budget: 4 × 1 / 10 → one pod closing at a time.
    let mut sim = Sim::new(
        "workloadRef: {name: echo}\nmaxSurge: 100%\ngates: {connectionRate: {maxPerPod: 1, failureLimit: 100}}\ndrain: {closeRate: 10, maxConcurrent: 4}",
        4,
    );
    sim.terminate_after = 5.0;
    sim.settle();
    let empty = sim
        .pods
        .iter()
        .filter(|p| p.revision == "v1")
        .map(|p| p.name.clone())
        .min()
        .unwrap();
    let e = empty.clone();
    sim.signals = Box::new(move |p: &PodView, now| {
        let mut s = quiet_signals(p, now).unwrap();
        s.connections_active = if p.name == e { 0.0 } else { 40.0 };
        Some(s)
    });
    sim.new_template("v2");
    for _ in 0..100 {
        let released: Vec<&PodView> = sim
            .pods
            .iter()
            .filter(|p| p.revision == "v1" && p.drain_released.is_some())
            .collect();
        if !released.is_empty() {
            // The first round that releases anything releases the empty pod too.
            assert!(
                released.iter().any(|p| p.name == empty),
                "{empty} waited: {:?}",
                released.iter().map(|p| &p.name).collect::<Vec<_>>()
            );
            assert_eq!(released.len(), 2);
            return;
        }
        sim.round();
    }
    panic!("nothing was released");
}

#[test]
fn a_refused_prestop_drain_is_recorded_and_told_once_per_pod() {
    // The agents of released pods refuse the kubelet's /drain (a wrong token): each such
    // drain ends `Refused`, with one warning per pod, and the release still completes.
    let mut sim = Sim::new("workloadRef: {name: echo}", 2);
    sim.settle();
    sim.signals = Box::new(|p: &PodView, now| {
        let mut s = quiet_signals(p, now).unwrap();
        if p.drain_released.is_some() {
            s.drain_refused = 1.0;
        }
        Some(s)
    });
    sim.new_template("v2");
    let mut refused_seen = Vec::new();
    for _ in 0..200 {
        if sim.phase() == Phase::Completed && sim.pods_of("v1") == 0 {
            break;
        }
        let plan = sim.round();
        refused_seen.extend(plan.refused_drains.iter().map(|d| d.pod.clone()));
    }
    assert_eq!(sim.phase(), Phase::Completed, "{:#?}", sim.status);
    sim.assert_lossless(2);
    // Once per pod: in the plans (for the metric) and in the events.
    refused_seen.sort();
    let mut unique = refused_seen.clone();
    unique.dedup();
    assert_eq!(refused_seen.len(), 2, "{refused_seen:?}");
    assert_eq!(unique, refused_seen);
    let warnings: Vec<_> = sim
        .events
        .iter()
        .filter(|(warning, reason, _)| *warning && reason == "DrainRefused")
        .collect();
    assert_eq!(warnings.len(), 2, "{warnings:?}");
    for pod in &unique {
        assert!(
            warnings
                .iter()
                .any(|(_, _, note)| note.starts_with(pod.as_str())
                    && note.contains("refused by the agent (wrong or missing drain token)")),
            "{warnings:?}"
        );
    }
    // The records keep saying so once the pods are gone.
    let refused: Vec<_> = sim
        .status
        .drains
        .iter()
        .filter(|d| d.state == DRAIN_REFUSED)
        .collect();
    assert_eq!(refused.len(), 2, "{:#?}", sim.status.drains);
    assert!(refused.iter().all(|d| d.duration_seconds.is_some()));
    // The new revision's pods were never released: nothing refused there.
    assert!(
        sim.status
            .drains
            .iter()
            .all(|d| d.revision == "v1" || d.state != DRAIN_REFUSED)
    );
}

#[test]
fn a_refusal_before_the_release_is_not_blamed_on_the_prestop() {
    // A /drain refused while the pod still quiesces (not the kubelet's: it runs only once
    // the pod is released) leaves the record alone until the pod is released.
    let mut sim = Sim::new("workloadRef: {name: echo}", 1);
    sim.pods.push(PodView {
        name: "echo-v1-a".into(),
        revision: "v1".into(),
        created: sim.now - 100.0,
        containers_ready: true,
        ready_since: Some(sim.now - 90.0),
        serving: Some(false),
        drain_started: Some(sim.now - 1.0),
        ..Default::default()
    });
    sim.signals = Box::new(|p: &PodView, now| {
        let mut s = quiet_signals(p, now).unwrap();
        s.drain_refused = 2.0;
        // Not quiet yet: the pod is not released in this round.
        s.quiet_seconds = Some(0.5);
        Some(s)
    });
    let p = plan(&sim.observed(), sim.now);
    let rec = p
        .status
        .drains
        .iter()
        .find(|d| d.pod == "echo-v1-a")
        .unwrap();
    assert_eq!(rec.state, "Quiescing");
    assert!(p.refused_drains.is_empty());
}

/// A load balancer that learns each unserve `lag` seconds late, in front of keep-alive
/// clients that open no connection unless one is closed: a connection closed while the
/// load balancer still names the pod comes back to it.
#[derive(Default)]
struct LaggingBalancer {
    lag: f64,
    /// The newest connection each pod accepted (seconds since the epoch).
    last_new: BTreeMap<String, f64>,
}

fn lagging_sim(lag: f64) -> (Sim, std::rc::Rc<std::cell::RefCell<LaggingBalancer>>) {
    let mut sim = Sim::new(
        "workloadRef: {name: echo}\nmaxSurge: 100%\ndrain: {quietPeriod: 2s, maxConcurrent: 3}",
        3,
    );
    sim.settle();
    let lb = std::rc::Rc::new(std::cell::RefCell::new(LaggingBalancer {
        lag,
        ..Default::default()
    }));
    let seen = lb.clone();
    sim.signals = Box::new(move |p: &PodView, now| {
        let mut s = quiet_signals(p, now).unwrap();
        s.connections_active = 10.0;
        s.quiet_seconds = Some(
            seen.borrow()
                .last_new
                .get(&p.name)
                .map_or(1000.0, |t| now - t),
        );
        Some(s)
    });
    (sim, lb)
}

#[test]
fn probes_hold_the_drain_while_a_load_balancer_still_sends_to_the_pod() {
    let (mut sim, lb) = lagging_sim(8.0);
    sim.new_template("v2");
    let mut released: BTreeMap<String, f64> = BTreeMap::new();
    for _ in 0..120 {
        let now = sim.now;
        let started: BTreeMap<String, Option<f64>> = sim
            .pods
            .iter()
            .map(|p| (p.name.clone(), p.drain_started))
            .collect();
        let plan = sim.round();
        for a in &plan.actions {
            match a {
                Action::RebalanceConnections { pod, .. } => {
                    let started = started[pod].expect("probed a pod that serves");
                    if now < started + lb.borrow().lag {
                        lb.borrow_mut().last_new.insert(pod.clone(), now);
                    }
                }
                Action::ReleasePod { pod } => {
                    released.insert(pod.clone(), now);
                }
                _ => {}
            }
        }
        if sim.phase() == Phase::Completed {
            break;
        }
    }
    assert_eq!(sim.phase(), Phase::Completed);
    assert_eq!(released.len(), 3, "{released:?}");
    let drains = &sim.status.drains;
    for (pod, at) in &released {
        let rec = drains.iter().find(|d| &d.pod == pod).unwrap();
        let waited = at - crate::pod::time::parse_rfc3339(&rec.started_at).unwrap();
        // Released only once the probes stopped coming back, and the quiet period after.
        assert!(waited >= 8.0 + 2.0 - 1.0, "{pod} released after {waited} s");
        assert!(waited <= 8.0 + 2.0 + 2.0, "{pod} released after {waited} s");
    }
    assert!(sim.probes.len() >= 3 * 8, "probes: {:?}", sim.probes);
    sim.assert_lossless(3);
}

#[test]
fn without_a_lag_probes_cost_no_time() {
    let (mut sim, _lb) = lagging_sim(0.0);
    sim.new_template("v2");
    sim.run_until(100, |s| s.phase() == Phase::Completed);
    for r in sim.status.drains.iter().filter(|d| d.revision == "v1") {
        let q = r.quiet_seconds.unwrap();
        assert!((2.0..3.5).contains(&q), "{r:?}");
    }
    // Two connections a second per pod while not quiet (rounds are a second apart here).
    let asked: i64 = sim.probes.iter().map(|(_, n)| n).sum();
    assert!(asked > 0);
    assert!(asked <= 3 * 2 * 3, "probes: {:?}", sim.probes);
}

#[test]
fn new_connections_at_one_unserved_pod_hold_the_others() {
    let mut sim = Sim::new("workloadRef: {name: echo}\ndrain: {quietPeriod: 2s}", 2);
    let unserved = |name: &str, started: f64| PodView {
        name: name.into(),
        revision: "v1".into(),
        created: sim.now - 100.0,
        containers_ready: true,
        ready_since: Some(sim.now - 90.0),
        serving: Some(false),
        drain_started: Some(started),
        ..Default::default()
    };
    // a: unserved 10 s ago, a new connection 0.5 s ago; b: unserved 5 s ago, quiet since.
    sim.pods.push(unserved("echo-v1-a", sim.now - 10.0));
    sim.pods.push(unserved("echo-v1-b", sim.now - 5.0));
    sim.signals = Box::new(|p: &PodView, now| {
        let mut s = quiet_signals(p, now).unwrap();
        s.quiet_seconds = Some(if p.name.ends_with('a') { 0.5 } else { 5.0 });
        Some(s)
    });
    let released = |sim: &Sim| -> Vec<String> {
        plan(&sim.observed(), sim.now)
            .actions
            .into_iter()
            .filter_map(|a| match a {
                Action::ReleasePod { pod } => Some(pod),
                _ => None,
            })
            .collect()
    };
    // The load balancer's view is older than a's unserve, so older than b's too.
    assert_eq!(released(&sim), Vec::<String>::new());
    // Unserved the other way round, 2 s after b: a's new connection 0.5 s ago counts for
    // b as one 2.5 s ago, older than b's quiet period.
    sim.pods[0].drain_started = Some(sim.now - 3.0);
    assert_eq!(released(&sim), vec!["echo-v1-b".to_string()]);
    // 1 s after b: as one 1.5 s ago, which still holds b.
    sim.pods[0].drain_started = Some(sim.now - 4.0);
    assert_eq!(released(&sim), Vec::<String>::new());
}

#[test]
fn old_pods_drain_only_once_the_new_ones_are_ready_in_the_endpoints() {
    let mut sim = Sim::new("workloadRef: {name: echo}\nmaxSurge: 100%", 2);
    sim.settle();
    sim.new_template("v2");
    // The kubelet has not turned the new pods' Ready condition yet: they serve by the
    // operator's condition, but no EndpointSlice names them.
    sim.run_until(50, |s| {
        s.pods
            .iter()
            .filter(|p| p.revision != "v1" && p.serving == Some(true))
            .count()
            == 2
    });
    let new: Vec<String> = sim
        .pods
        .iter()
        .filter(|p| p.revision != "v1")
        .map(|p| p.name.clone())
        .collect();
    sim.kubelet_behind = new;
    sim.drains_started.clear();
    for _ in 0..5 {
        sim.round();
    }
    assert!(sim.drains_started.is_empty(), "{:?}", sim.drains_started);
    assert!(
        sim.status
            .message
            .as_deref()
            .is_some_and(|m| m.contains("in the Service's endpoints")),
        "{:?}",
        sim.status.message
    );
    sim.kubelet_behind.clear();
    sim.run_until(100, |s| s.phase() == Phase::Completed);
    assert_eq!(sim.drains_started.len(), 2);
    sim.assert_lossless(2);
}

#[test]
fn the_takeover_scales_the_deployment_down_only_once_the_release_pods_are_ready() {
    let mut sim = Sim::new("workloadRef: {name: echo}", 2);
    sim.run_until(50, |s| {
        s.pods.iter().filter(|p| p.serving == Some(true)).count() == 2
    });
    assert!(sim.dep.as_ref().unwrap().spec_replicas > 0);
    sim.kubelet_behind = sim.pods.iter().map(|p| p.name.clone()).collect();
    for _ in 0..5 {
        sim.round();
    }
    assert_eq!(sim.dep.as_ref().unwrap().spec_replicas, 2);
    assert_ne!(sim.phase(), Phase::Completed);
    sim.kubelet_behind.clear();
    sim.run_until(20, |s| s.phase() == Phase::Completed);
    assert_eq!(sim.dep.as_ref().unwrap().spec_replicas, 0);
}

#[test]
fn new_pods_start_while_old_ones_drain_as_a_deployment_s_start_while_old_ones_terminate() {
    // Pods whose drain has started do not count against maxSurge, as a Deployment's
    // terminating pods do not: the node starts a pod or two at a time as the ones before
    // them serve, instead of waiting for each drain to end.
    let mut sim = Sim::new(
        "workloadRef: {name: echo}\nmaxSurge: 1\ndrain: {quietPeriod: 10s}",
        4,
    );
    sim.settle();
    // An old pod goes quiet 10 s after its drain starts.
    sim.signals = Box::new(|p: &PodView, now| {
        let mut s = quiet_signals(p, now).unwrap();
        s.quiet_seconds = Some(p.drain_started.map_or(0.0, |t| (now - t).max(0.0)));
        Some(s)
    });
    sim.new_template("v2");
    let (mut overlapped, mut first_drain_over) = (false, false);
    for _ in 0..200 {
        if sim.phase() == Phase::Completed && sim.pods_of("v1") == 0 {
            break;
        }
        sim.round();
        let draining_old = sim
            .pods
            .iter()
            .filter(|p| p.revision == "v1" && !p.deleting && p.drain_started.is_some())
            .filter(|p| p.drain_released.is_none())
            .count();
        // The surge still bounds the pods that start: all but the draining ones.
        let not_draining = sim
            .pods
            .iter()
            .filter(|p| !p.deleting && p.drain_started.is_none())
            .count();
        assert!(
            not_draining <= 5,
            "{not_draining} pods beside the drains: {:#?}",
            sim.pods
        );
        // The second new pod exists while the first old pod still drains.
        first_drain_over |= sim.pods_of("v1") < 4
            || sim
                .pods
                .iter()
                .any(|p| p.revision == "v1" && (p.deleting || p.drain_released.is_some()));
        overlapped |= !first_drain_over && draining_old >= 1 && sim.pods_of("v2") >= 2;
    }
    assert_eq!(sim.phase(), Phase::Completed);
    assert_eq!(sim.pods_of("v1"), 0);
    assert!(
        overlapped,
        "each new pod waited for an old pod's drain to end"
    );
    sim.assert_lossless(4);
}
