//! Planner tests: single rounds for every case, and a small simulated cluster (binder with
//! a fixed number of GPU slots, kubelet with a model load time) that runs whole rollouts,
//! scale changes and node losses round after round, restarting the planner each round
//! (it keeps nothing between rounds, so every round is a restart).

use std::collections::BTreeMap;

use super::crd::*;
use super::plan::*;
use crate::pod::duration::DurationString;

fn spec(replicas: i32, pods: i32, max_unavailable: i32, max_surge: i32) -> InferenceSetSpec {
    serde_json::from_value(serde_json::json!({
        "replicas": replicas,
        "podsPerReplica": pods,
        "gpusPerPod": 4,
        "updateStrategy": {"maxUnavailable": max_unavailable, "maxSurge": max_surge},
        "template": {"spec": {"containers": [{"name": "m", "image": "x"}]}}
    }))
    .unwrap()
}

fn settings(replicas: i32, pods: i32, mu: i32, ms: i32) -> Settings {
    Settings::from_spec(&spec(replicas, pods, mu, ms)).unwrap()
}

fn pod(gang: &str, slot: i32, rev: &str, index: i32, size: i32) -> PodView {
    PodView {
        name: format!("{gang}-{index}"),
        slot,
        gang: gang.into(),
        revision: rev.into(),
        index,
        gang_size: size,
        created: 0.0,
        ..Default::default()
    }
}

fn serving(mut p: PodView, node: &str) -> PodView {
    p.node = Some(node.into());
    p.gpu_ids = vec![0, 1, 2, 3];
    p.containers_ready = true;
    p.serving = Some(true);
    p.ready = true;
    p
}

fn observed(s: Settings, rev: &str, pods: Vec<PodView>) -> Observed {
    Observed {
        name: "llm".into(),
        generation: 3,
        revision: rev.into(),
        settings: Ok(s),
        status: Default::default(),
        pods,
    }
}

fn creates(p: &Plan) -> Vec<(String, i32, Vec<i32>)> {
    p.actions
        .iter()
        .filter_map(|a| match a {
            Action::CreatePods {
                gang,
                slot,
                indices,
                ..
            } => Some((gang.clone(), *slot, indices.clone())),
            _ => None,
        })
        .collect()
}

fn drains(p: &Plan) -> Vec<Vec<String>> {
    p.actions
        .iter()
        .filter_map(|a| match a {
            Action::StartDrain { pods } => Some(pods.clone()),
            _ => None,
        })
        .collect()
}

fn deletes(p: &Plan) -> Vec<String> {
    p.actions
        .iter()
        .filter_map(|a| match a {
            Action::DeletePods { pods } => Some(pods.clone()),
            _ => None,
        })
        .flatten()
        .collect()
}

#[test]
fn empty_set_creates_every_replica_as_a_whole_gang() {
    let p = plan(&observed(settings(3, 2, 1, 0), "r1", vec![]), 100.0);
    let c = creates(&p);
    assert_eq!(c.len(), 3);
    assert_eq!(c[0], ("llm-0-r1-0".into(), 0, vec![0, 1]));
    assert_eq!(c[2].1, 2);
    assert_eq!(p.status.observed_generation, Some(3));
    assert_eq!(p.status.update_revision.as_deref(), Some("r1"));
    let ready = p
        .status
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .unwrap();
    assert_eq!(ready.status, "False");
}

#[test]
fn incomplete_unbound_gang_gets_its_missing_pods() {
    let pods = vec![pod("llm-0-r1-0", 0, "r1", 1, 2)];
    let p = plan(&observed(settings(1, 2, 1, 0), "r1", pods), 1.0);
    assert_eq!(creates(&p), vec![("llm-0-r1-0".into(), 0, vec![0])]);
}

#[test]
fn pending_gang_waits_and_reports_why() {
    let mut a = pod("llm-0-r1-0", 0, "r1", 0, 1);
    a.unschedulable = Some("required topology level node: no domain has room".into());
    let p = plan(&observed(settings(1, 1, 1, 0), "r1", vec![a]), 1.0);
    assert!(creates(&p).is_empty());
    assert!(p.status.message.unwrap().contains("waits for GPUs"));
    assert_eq!(p.status.pending_gangs, 1);
}

#[test]
fn ready_gang_is_served_only_when_every_pod_is_ready() {
    let mut a = pod("g", 0, "r1", 0, 2);
    let mut b = pod("g", 0, "r1", 1, 2);
    a.node = Some("n1".into());
    b.node = Some("n2".into());
    a.containers_ready = true;
    let p = plan(
        &observed(settings(1, 2, 1, 0), "r1", vec![a.clone(), b.clone()]),
        1.0,
    );
    assert!(!p.actions.iter().any(|x| matches!(x, Action::Serve { .. })));
    b.containers_ready = true;
    let p = plan(&observed(settings(1, 2, 1, 0), "r1", vec![a, b]), 1.0);
    assert!(p.actions.contains(&Action::Serve {
        pods: vec!["g-0".into(), "g-1".into()]
    }));
}

#[test]
fn first_token_gate_checks_before_serving() {
    let mut s = settings(1, 1, 1, 0);
    s.first_token = true;
    let mut a = pod("g", 0, "r1", 0, 1);
    a.node = Some("n".into());
    a.containers_ready = true;
    let p = plan(&observed(s.clone(), "r1", vec![a.clone()]), 1.0);
    assert!(
        p.actions
            .iter()
            .any(|x| matches!(x, Action::CheckWarm { .. }))
    );
    assert!(!p.actions.iter().any(|x| matches!(x, Action::Serve { .. })));
    a.warm = true;
    let p = plan(&observed(s, "r1", vec![a]), 1.0);
    assert!(p.actions.iter().any(|x| matches!(x, Action::Serve { .. })));
}

#[test]
fn warmup_timeout_degrades_and_holds_the_rollout() {
    let mut s = settings(2, 1, 1, 0);
    s.warmup_timeout = 60.0;
    let mut starting = pod("llm-0-r2-0", 0, "r2", 0, 1);
    starting.node = Some("n".into());
    let old = serving(pod("llm-1-r1-0", 1, "r1", 0, 1), "n2");
    let p = plan(&observed(s, "r2", vec![starting, old]), 1000.0);
    assert!(
        drains(&p).is_empty(),
        "no new drain while a replica is stuck warming"
    );
    let d = p
        .status
        .conditions
        .iter()
        .find(|c| c.type_ == "Degraded")
        .unwrap();
    assert_eq!(d.status, "True");
    assert_eq!(d.reason, "WarmupTimeout");
}

#[test]
fn node_loss_deletes_the_whole_gang_and_places_it_again() {
    let a = serving(pod("llm-0-r1-0", 0, "r1", 0, 2), "n1");
    let mut b = serving(pod("llm-0-r1-0", 0, "r1", 1, 2), "n2");
    b.node_lost = true;
    let p = plan(&observed(settings(1, 2, 1, 0), "r1", vec![a, b]), 1.0);
    assert_eq!(deletes(&p), vec!["llm-0-r1-0-0", "llm-0-r1-0-1"]);
    // The replacement gang gets a fresh name (the old pods still terminate).
    assert_eq!(creates(&p), vec![("llm-0-r1-1".into(), 0, vec![0, 1])]);
    assert!(
        p.actions
            .iter()
            .any(|a| matches!(a, Action::Event { reason, .. } if reason == "ReplicaLost"))
    );
}

#[test]
fn a_pod_deleted_from_a_bound_gang_loses_the_replica() {
    let a = serving(pod("g", 0, "r1", 0, 2), "n1");
    let mut b = serving(pod("g", 0, "r1", 1, 2), "n2");
    b.deleting = true;
    let p = plan(&observed(settings(1, 2, 1, 0), "r1", vec![a, b]), 1.0);
    assert_eq!(deletes(&p), vec!["g-0"]);
    assert_eq!(creates(&p).len(), 1);
    // A bound gang missing a pod entirely is lost too.
    let a = serving(pod("g", 0, "r1", 0, 2), "n1");
    let p = plan(&observed(settings(1, 2, 1, 0), "r1", vec![a]), 1.0);
    assert_eq!(deletes(&p), vec!["g-0"]);
}

#[test]
fn exited_model_server_loses_the_replica() {
    let mut a = serving(pod("g", 0, "r1", 0, 1), "n1");
    a.finished = true;
    let p = plan(&observed(settings(1, 1, 1, 0), "r1", vec![a]), 1.0);
    assert_eq!(deletes(&p), vec!["g-0"]);
}

#[test]
fn scale_down_drains_the_highest_slots_then_deletes_after_quiet() {
    let pods: Vec<PodView> = (0..3)
        .map(|i| serving(pod(&format!("llm-{i}-r1-0"), i, "r1", 0, 1), "n"))
        .collect();
    let p = plan(&observed(settings(1, 1, 1, 0), "r1", pods.clone()), 10.0);
    assert_eq!(
        drains(&p),
        vec![
            vec!["llm-2-r1-0-0".to_string()],
            vec!["llm-1-r1-0-0".to_string()]
        ]
    );
    assert!(
        deletes(&p).is_empty(),
        "serving pods are drained, never deleted at once"
    );
    let mut draining = pods;
    draining[2].drain_started = Some(10.0);
    draining[2].serving = Some(false);
    let p = plan(
        &observed(settings(1, 1, 1, 0), "r1", draining.clone()),
        12.0,
    );
    assert!(deletes(&p).is_empty(), "quiet period (5s) not over");
    let p = plan(&observed(settings(1, 1, 1, 0), "r1", draining), 15.5);
    assert!(deletes(&p).contains(&"llm-2-r1-0-0".to_string()));
}

#[test]
fn scale_down_deletes_pending_gangs_without_drain() {
    let pods = vec![
        serving(pod("llm-0-r1-0", 0, "r1", 0, 1), "n"),
        pod("llm-1-r1-0", 1, "r1", 0, 1),
    ];
    let p = plan(&observed(settings(1, 1, 1, 0), "r1", pods), 1.0);
    assert!(drains(&p).is_empty());
    assert_eq!(deletes(&p), vec!["llm-1-r1-0-0"]);
}

#[test]
fn slot_swap_without_surge_drains_at_most_max_unavailable() {
    let pods: Vec<PodView> = (0..4)
        .map(|i| serving(pod(&format!("llm-{i}-r1-0"), i, "r1", 0, 1), "n"))
        .collect();
    let p = plan(&observed(settings(4, 1, 1, 0), "r2", pods.clone()), 1.0);
    assert_eq!(drains(&p).len(), 1);
    assert_eq!(creates(&p), vec![("llm-0-r2-0".into(), 0, vec![0])]);
    let p = plan(&observed(settings(4, 1, 2, 0), "r2", pods), 1.0);
    assert_eq!(drains(&p).len(), 2);
    assert_eq!(creates(&p).len(), 2);
}

#[test]
fn surge_first_then_swap_when_the_surge_finds_no_room() {
    let pods: Vec<PodView> = (0..2)
        .map(|i| serving(pod(&format!("llm-{i}-r1-0"), i, "r1", 0, 1), "n"))
        .collect();
    let p = plan(&observed(settings(2, 1, 1, 1), "r2", pods.clone()), 1.0);
    assert!(drains(&p).is_empty(), "surge first: nothing drains");
    assert_eq!(creates(&p), vec![("llm-0-r2-0".into(), 0, vec![0])]);
    // The surge gang is pending; before the surge timeout nothing drains.
    let mut with_surge = pods;
    let mut n = pod("llm-0-r2-0", 0, "r2", 0, 1);
    n.created = 1.0;
    with_surge.push(n);
    let p = plan(
        &observed(settings(2, 1, 1, 1), "r2", with_surge.clone()),
        5.0,
    );
    assert!(drains(&p).is_empty());
    // After it: slot swap, the old replica of slot 0 drains to free its GPUs.
    let p = plan(&observed(settings(2, 1, 1, 1), "r2", with_surge), 12.0);
    assert_eq!(drains(&p), vec![vec!["llm-0-r1-0-0".to_string()]]);
}

#[test]
fn serving_surge_replica_lets_the_old_one_drain_without_budget() {
    let mut pods: Vec<PodView> = (0..2)
        .map(|i| serving(pod(&format!("llm-{i}-r1-0"), i, "r1", 0, 1), "n"))
        .collect();
    pods.push(serving(pod("llm-0-r2-0", 0, "r2", 0, 1), "m"));
    // Slot 1 is already out (draining) so the budget is spent; slot 0 may still drain.
    pods[1].drain_started = Some(0.5);
    let p = plan(&observed(settings(2, 1, 1, 1), "r2", pods), 1.0);
    assert_eq!(drains(&p), vec![vec!["llm-0-r1-0-0".to_string()]]);
}

#[test]
fn the_old_replica_drains_only_once_its_successor_is_ready_in_the_endpoints() {
    let mut pods: Vec<PodView> = (0..2)
        .map(|i| serving(pod(&format!("llm-{i}-r1-0"), i, "r1", 0, 1), "n"))
        .collect();
    let mut successor = serving(pod("llm-0-r2-0", 0, "r2", 0, 1), "m");
    // Marked serving, but the kubelet has not turned `Ready` yet.
    successor.ready = false;
    pods.push(successor);
    pods[1].drain_started = Some(0.5);
    let p = plan(&observed(settings(2, 1, 1, 1), "r2", pods.clone()), 1.0);
    assert!(drains(&p).is_empty(), "{:?}", drains(&p));
    // No second "entering service" while the kubelet catches up.
    assert!(!p.actions.iter().any(|a| matches!(a, Action::Serve { .. })));
    pods[2].ready = true;
    let p = plan(&observed(settings(2, 1, 1, 1), "r2", pods), 1.0);
    assert_eq!(drains(&p), vec![vec!["llm-0-r1-0-0".to_string()]]);
}

#[test]
fn paused_rollout_starts_nothing_new() {
    let mut s = settings(2, 1, 1, 1);
    s.paused = true;
    let pods: Vec<PodView> = (0..2)
        .map(|i| serving(pod(&format!("llm-{i}-r1-0"), i, "r1", 0, 1), "n"))
        .collect();
    let p = plan(&observed(s, "r2", pods), 1.0);
    assert!(drains(&p).is_empty());
    assert!(creates(&p).is_empty());
    assert!(p.status.message.unwrap().contains("paused"));
}

#[test]
fn old_replica_that_never_served_is_replaced_directly() {
    let mut old = pod("llm-0-r1-0", 0, "r1", 0, 1);
    old.node = Some("n".into());
    let p = plan(&observed(settings(1, 1, 1, 0), "r2", vec![old]), 1.0);
    assert!(drains(&p).is_empty());
    assert_eq!(deletes(&p), vec!["llm-0-r1-0-0"]);
    assert_eq!(creates(&p).len(), 1);
}

#[test]
fn duplicate_gangs_of_one_revision_keep_the_most_advanced() {
    let a = serving(pod("llm-0-r1-0", 0, "r1", 0, 1), "n");
    let b = pod("llm-0-r1-1", 0, "r1", 0, 1);
    let p = plan(&observed(settings(1, 1, 1, 0), "r1", vec![a, b]), 1.0);
    assert_eq!(deletes(&p), vec!["llm-0-r1-1-0"]);
    assert!(creates(&p).is_empty());
}

#[test]
fn invalid_settings_are_reported_not_acted_on() {
    let mut sp = spec(1, 1, 1, 0);
    sp.drain.quiet_period = Some(DurationString::new("5 seconds"));
    let settings = Settings::from_spec(&sp);
    assert!(settings.is_err());
    let o = Observed {
        settings,
        ..observed(self::settings(1, 1, 1, 0), "r1", vec![])
    };
    let p = plan(&o, 1.0);
    assert!(creates(&p).is_empty());
    assert!(p.status.message.unwrap().contains("drain.quietPeriod"));
}

#[test]
fn status_lists_each_replica_with_its_placement() {
    let pods = vec![
        serving(pod("llm-0-r1-0", 0, "r1", 0, 2), "n1"),
        serving(pod("llm-0-r1-0", 0, "r1", 1, 2), "n2"),
    ];
    let p = plan(&observed(settings(1, 2, 1, 0), "r1", pods), 1.0);
    let r = &p.status.replica_status[0];
    assert_eq!(r.state, "Serving");
    assert_eq!(r.placement, vec!["n1:0,1,2,3", "n2:0,1,2,3"]);
    assert_eq!(r.ready, "2/2");
    assert_eq!(p.status.gpus, 8);
    assert_eq!(p.status.serving_replicas, 1);
    assert_eq!(p.status.current_revision.as_deref(), Some("r1"));
    let ready = p
        .status
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .unwrap();
    assert_eq!(ready.status, "True");
    let prog = p
        .status
        .conditions
        .iter()
        .find(|c| c.type_ == "Progressing")
        .unwrap();
    assert_eq!(prog.status, "False");
}

#[test]
fn condition_transition_time_is_kept_while_unchanged() {
    let mut st = InferenceSetStatus::default();
    set_condition(&mut st, "Ready", true, "A", "m", 1, 100.0);
    set_condition(&mut st, "Ready", true, "A", "m2", 2, 200.0);
    assert_eq!(
        st.conditions[0].last_transition_time,
        crate::pod::time::rfc3339(100.0)
    );
    set_condition(&mut st, "Ready", false, "B", "m", 2, 300.0);
    assert_eq!(
        st.conditions[0].last_transition_time,
        crate::pod::time::rfc3339(300.0)
    );
}

#[test]
fn node_lost_after_grace() {
    assert!(node_lost(false, None, 0.0, 30.0));
    assert!(!node_lost(true, None, 100.0, 30.0));
    assert!(!node_lost(true, Some(90.0), 100.0, 30.0));
    assert!(node_lost(true, Some(60.0), 100.0, 30.0));
}

// ---- simulation -------------------------------------------------------------------------

/// A toy cluster: `capacity` gangs fit at once; binding takes one round; a bound gang's
/// pods are ready `load` seconds later; deleted pods vanish the next round.
struct Sim {
    capacity: usize,
    load: f64,
    now: f64,
    pods: BTreeMap<String, PodView>,
    bound_at: BTreeMap<String, f64>,
    max_out: i32,
    min_serving_after_start: i32,
}

impl Sim {
    fn new(capacity: usize, load: f64) -> Self {
        Sim {
            capacity,
            load,
            now: 0.0,
            pods: BTreeMap::new(),
            bound_at: BTreeMap::new(),
            max_out: 0,
            min_serving_after_start: i32::MAX,
        }
    }

    fn gangs_holding(&self) -> usize {
        let mut g: Vec<&str> = self
            .pods
            .values()
            .filter(|p| p.node.is_some())
            .map(|p| p.gang.as_str())
            .collect();
        g.sort();
        g.dedup();
        g.len()
    }

    fn step(&mut self, s: &Settings, rev: &str) -> Plan {
        // Deleted pods vanish.
        self.pods.retain(|_, p| !p.deleting);
        // Binder: complete pending gangs, oldest first, while capacity lasts.
        let mut pending: BTreeMap<(i64, String), Vec<String>> = BTreeMap::new();
        for p in self.pods.values().filter(|p| p.node.is_none()) {
            pending
                .entry(((p.created * 1000.0) as i64, p.gang.clone()))
                .or_default()
                .push(p.name.clone());
        }
        for ((_, gang), names) in pending {
            let size = self.pods[&names[0]].gang_size as usize;
            if names.len() == size && self.gangs_holding() < self.capacity {
                for n in names {
                    let p = self.pods.get_mut(&n).unwrap();
                    p.node = Some(format!("node-{gang}"));
                    p.gpu_ids = vec![0, 1, 2, 3];
                    p.unschedulable = None;
                }
                self.bound_at.insert(gang, self.now);
            } else {
                for n in names {
                    self.pods.get_mut(&n).unwrap().unschedulable = Some("no room".into());
                }
            }
        }
        // Kubelet: ready after the load time.
        for p in self.pods.values_mut() {
            if let Some(t) = self.bound_at.get(&p.gang)
                && self.now - t >= self.load
            {
                p.containers_ready = true;
            }
            // `Ready` follows the serving gate a step late, as the kubelet writes it.
            p.ready = p.containers_ready && p.serving == Some(true);
        }
        let o = Observed {
            name: "llm".into(),
            generation: 1,
            revision: rev.into(),
            settings: Ok(s.clone()),
            status: Default::default(),
            pods: self.pods.values().cloned().collect(),
        };
        let plan = plan(&o, self.now);
        for a in &plan.actions {
            match a {
                Action::CreatePods {
                    gang,
                    slot,
                    revision,
                    indices,
                } => {
                    for i in indices {
                        let mut p = pod(gang, *slot, revision, *i, s.pods_per_replica);
                        p.created = self.now;
                        self.pods.entry(p.name.clone()).or_insert(p);
                    }
                }
                Action::DeletePods { pods } => {
                    for n in pods {
                        if let Some(p) = self.pods.get_mut(n) {
                            p.deleting = true;
                        }
                    }
                }
                Action::StartDrain { pods } => {
                    for n in pods {
                        let p = self.pods.get_mut(n).unwrap();
                        p.drain_started = Some(self.now);
                        p.serving = Some(false);
                    }
                }
                Action::Serve { pods } => {
                    for n in pods {
                        self.pods.get_mut(n).unwrap().serving = Some(true);
                    }
                }
                Action::CheckWarm { .. } | Action::Event { .. } => {}
            }
        }
        // Invariant: serving slots.
        let serving = plan.status.serving_replicas;
        self.max_out = self.max_out.max(s.replicas - serving);
        self.min_serving_after_start = self.min_serving_after_start.min(serving);
        self.now += 1.0;
        plan
    }

    fn run_until_done(&mut self, s: &Settings, rev: &str, limit: usize) -> usize {
        for i in 0..limit {
            let p = self.step(s, rev);
            let done = p
                .status
                .conditions
                .iter()
                .any(|c| c.type_ == "Progressing" && c.status == "False");
            if done {
                return i;
            }
        }
        panic!(
            "did not converge in {limit} rounds: {:#?}",
            self.pods.keys().collect::<Vec<_>>()
        );
    }
}

#[test]
fn sim_full_fleet_rollout_never_exceeds_max_unavailable() {
    for (mu, ms) in [(1, 0), (2, 0), (1, 1), (3, 2)] {
        let s = settings(16, 1, mu, ms);
        let mut sim = Sim::new(16, 20.0);
        sim.run_until_done(&s, "r1", 200);
        assert_eq!(sim.pods.len(), 16);
        sim.max_out = 0;
        sim.min_serving_after_start = i32::MAX;
        let rounds = sim.run_until_done(&s, "r2", 2000);
        assert!(sim.max_out <= mu, "mu={mu} ms={ms}: {} out", sim.max_out);
        assert!(sim.pods.values().all(|p| p.revision == "r2"));
        assert_eq!(sim.pods.len(), 16);
        // Each swap costs about a drain (5 s) plus a load (20 s); mu swaps run in parallel.
        assert!(
            rounds < 16 / mu as usize * 30 + 40,
            "mu={mu}: {rounds} rounds"
        );
    }
}

#[test]
fn sim_rollout_with_spare_capacity_surges_without_losing_service() {
    let s = settings(8, 2, 1, 2);
    let mut sim = Sim::new(10, 10.0);
    sim.run_until_done(&s, "r1", 100);
    sim.max_out = 0;
    sim.run_until_done(&s, "r2", 1000);
    assert_eq!(
        sim.max_out, 0,
        "with room for the surge no replica leaves service early"
    );
}

#[test]
fn sim_scale_up_down_and_node_loss() {
    let mut sim = Sim::new(8, 3.0);
    sim.run_until_done(&settings(4, 2, 1, 0), "r1", 100);
    sim.run_until_done(&settings(8, 2, 1, 0), "r1", 100);
    assert_eq!(sim.pods.len(), 16);
    // More replicas than fit: the extra ones stay pending.
    for _ in 0..10 {
        sim.step(&settings(9, 2, 1, 0), "r1");
    }
    let p = sim.step(&settings(9, 2, 1, 0), "r1");
    assert_eq!(p.status.pending_gangs, 1);
    sim.run_until_done(&settings(3, 2, 1, 0), "r1", 100);
    assert_eq!(sim.pods.len(), 6);
    // Lose one pod's node: the whole replica is placed again.
    let victim = sim.pods.keys().next().unwrap().clone();
    sim.pods.get_mut(&victim).unwrap().node_lost = true;
    let gang = sim.pods[&victim].gang.clone();
    sim.step(&settings(3, 2, 1, 0), "r1");
    sim.run_until_done(&settings(3, 2, 1, 0), "r1", 100);
    assert_eq!(sim.pods.len(), 6);
    assert!(
        sim.pods.values().all(|p| p.gang != gang),
        "the whole gang was replaced"
    );
}

#[test]
fn gang_names_skip_terminating_ones() {
    let mut p = pod("llm-0-r1-0", 0, "r1", 0, 1);
    p.deleting = true;
    assert_eq!(gang_name("llm", 0, "r1", &[p]), "llm-0-r1-1");
    assert_eq!(gang_name("llm", 1, "r1", &[]), "llm-1-r1-0");
}

fn draining(p: PodView, started: f64, quiet_for: Option<f64>) -> PodView {
    let mut p = serving(p, "n");
    p.serving = Some(false);
    p.drain_started = Some(started);
    p.signals = quiet_for.map(|q| crate::pod::signals::PodSignals {
        quiet_seconds: Some(q),
        ..Default::default()
    });
    p
}

fn with_agent(replicas: i32, pods: i32) -> Settings {
    let mut sp = spec(replicas, pods, 1, 0);
    sp.agent = Some(Default::default());
    sp.drain.quiet_period = Some(DurationString::new("2s"));
    sp.drain.propagation_timeout = Some(DurationString::new("30s"));
    Settings::from_spec(&sp).unwrap()
}

#[test]
fn with_the_agent_a_gang_is_deleted_only_when_every_pod_is_quiet() {
    let s = with_agent(1, 2);
    let gang = |q0, q1| {
        vec![
            draining(pod("llm-0-r0-0", 0, "r0", 0, 2), 100.0, q0),
            draining(pod("llm-0-r0-0", 0, "r0", 1, 2), 100.0, q1),
        ]
    };
    // Not scraped yet: wait, however long the quiet period has passed.
    let p = plan(&observed(s.clone(), "r1", gang(None, Some(9.0))), 110.0);
    assert!(deletes(&p).is_empty());
    // One pod still sees new connections.
    let p = plan(
        &observed(s.clone(), "r1", gang(Some(0.5), Some(9.0))),
        110.0,
    );
    assert!(deletes(&p).is_empty());
    assert!(p.requeue_after <= std::time::Duration::from_secs(1));
    // Both quiet for the quiet period: released together.
    let p = plan(
        &observed(s.clone(), "r1", gang(Some(2.0), Some(9.0))),
        110.0,
    );
    assert_eq!(deletes(&p), vec!["llm-0-r0-0-0", "llm-0-r0-0-1"]);
    // Never quiet: released at the propagation timeout, with a warning.
    let p = plan(&observed(s, "r1", gang(Some(0.1), Some(0.1))), 131.0);
    assert_eq!(deletes(&p).len(), 2);
    assert!(p.actions.iter().any(|a| matches!(a,
        Action::Event { warning: true, reason, .. } if reason == "QuietTimeout")));
}

#[test]
fn without_the_agent_the_drain_waits_the_quiet_period() {
    let s = settings(1, 1, 1, 0);
    let pods = || vec![draining(pod("llm-0-r0-0", 0, "r0", 0, 1), 100.0, None)];
    assert!(deletes(&plan(&observed(s.clone(), "r1", pods()), 103.0)).is_empty());
    assert_eq!(
        deletes(&plan(&observed(s, "r1", pods()), 105.0)),
        vec!["llm-0-r0-0-0"]
    );
}
