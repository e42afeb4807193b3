//! Planner tests: single decisions, and whole releases driven through a small simulated
//! cluster (ReplicaSets create and delete pods the way the ReplicaSet controller ranks
//! them, pods become ready and terminate over time), with the lossless invariants checked
//! after every round.

use std::collections::BTreeMap;

use super::crd::{DrainRecord, Phase, ReleaseSpec, ReleaseStatus};
use super::gates::RevisionWindow;
use super::plan::*;
use super::settings::Settings;
use crate::pod::settings::AgentImagePolicy;
use crate::pod::signals::PodSignals;
use crate::pod::time::{parse_rfc3339, rfc3339};

type SignalFn = Box<dyn Fn(&PodView, f64) -> Option<PodSignals>>;

struct Sim {
    now: f64,
    spec: ReleaseSpec,
    status: ReleaseStatus,
    has_finalizer: bool,
    deleting: bool,
    dep: Option<DeploymentView>,
    rss: Vec<ReplicaSetView>,
    pods: Vec<PodView>,
    deleting_since: BTreeMap<String, f64>,
    next: usize,
    promote: Option<String>,
    abort: Option<String>,
    windows: BTreeMap<String, RevisionWindow>,
    /// Seconds from creation to containers ready.
    ready_after: f64,
    /// Seconds a deleted pod takes to go (preStop drain, exit).
    terminate_after: f64,
    /// Revisions whose pods crash-loop.
    crashing: Vec<String>,
    /// Per-pod signal override; default: quiet for a long time, no new connections.
    signals: SignalFn,
    drains_started: BTreeMap<String, usize>,
    events: Vec<(bool, String, String)>,
    /// Pods deleted by a scale-down without having been drained while serving.
    unsafe_deletes: Vec<String>,
    min_serving_seen: i32,
    last_plan: Option<Plan>,
}

fn quiet_signals(_: &PodView, _: f64) -> Option<PodSignals> {
    Some(PodSignals {
        new_connection_rate: Some(0.0),
        quiet_seconds: Some(1000.0),
        connections_active: 3.0,
        connections_closed: 3.0,
        drain_phase: Some(0.0),
        drain_refused: 0.0,
    })
}

impl Sim {
    fn new(spec_yaml: &str, replicas: i32) -> Sim {
        let spec: ReleaseSpec = serde_yaml::from_str(spec_yaml).unwrap();
        Sim {
            now: 1_700_000_000.0,
            spec,
            status: ReleaseStatus::default(),
            has_finalizer: false,
            deleting: false,
            dep: Some(DeploymentView {
                revision: "v1".into(),
                spec_replicas: replicas,
                recorded_replicas: None,
                available_replicas: replicas,
                inject_error: None,
                claim: Claim::Free,
            }),
            rss: Vec::new(),
            pods: Vec::new(),
            deleting_since: BTreeMap::new(),
            next: 0,
            promote: None,
            abort: None,
            windows: BTreeMap::new(),
            ready_after: 2.0,
            terminate_after: 2.0,
            crashing: Vec::new(),
            signals: Box::new(quiet_signals),
            drains_started: BTreeMap::new(),
            events: Vec::new(),
            unsafe_deletes: Vec::new(),
            min_serving_seen: i32::MAX,
            last_plan: None,
        }
    }

    fn observed(&self) -> Observed {
        let mut pods = self.pods.clone();
        for p in &mut pods {
            p.signals = (self.signals)(p, self.now);
        }
        Observed {
            generation: 1,
            deleting: self.deleting,
            has_finalizer: self.has_finalizer,
            settings: Settings::for_reconcile(
                &self.spec,
                &AgentImagePolicy::only("agent:test"),
                self.deleting,
            ),
            status: self.status.clone(),
            promote: self.promote.clone(),
            abort: self.abort.clone(),
            deployment: self.dep.clone(),
            replica_sets: self.rss.clone(),
            pods,
            windows: self.windows.clone(),
        }
    }

    fn serving(&self) -> i32 {
        self.pods
            .iter()
            .filter(|p| {
                !p.deleting
                    && p.serving == Some(true)
                    && p.containers_ready
                    && p.drain_started.is_none()
            })
            .count() as i32
    }

    /// One round: plan, apply, let the simulated cluster move one second.
    fn round(&mut self) -> Plan {
        let plan = plan(&self.observed(), self.now);
        // Determinism: the same observation gives the same plan.
        assert_eq!(plan, super::plan::plan(&self.observed(), self.now));
        for a in &plan.actions {
            match a {
                Action::AddFinalizer => self.has_finalizer = true,
                Action::RemoveFinalizer => self.has_finalizer = false,
                Action::ClaimDeployment => {
                    let d = self.dep.as_mut().unwrap();
                    assert_eq!(d.claim, Claim::Free, "claimed a claimed Deployment");
                    d.claim = Claim::Ours;
                }
                Action::ReleaseClaim => self.dep.as_mut().unwrap().claim = Claim::Free,
                Action::RecordDeploymentReplicas(n) => {
                    self.dep.as_mut().unwrap().recorded_replicas = Some(*n)
                }
                Action::ScaleDeployment(n) => {
                    let d = self.dep.as_mut().unwrap();
                    d.spec_replicas = *n;
                    d.available_replicas = d.available_replicas.min(*n);
                }
                Action::CreateReplicaSet { revision, replicas } => {
                    assert!(!self.rss.iter().any(|r| &r.revision == revision));
                    self.rss.push(ReplicaSetView {
                        name: format!("rel-{revision}"),
                        uid: format!("uid-{revision}"),
                        revision: revision.clone(),
                        replicas: *replicas,
                    })
                }
                Action::ScaleReplicaSet { name, replicas } => {
                    self.rss
                        .iter_mut()
                        .find(|r| &r.name == name)
                        .unwrap()
                        .replicas = *replicas
                }
                Action::DeleteReplicaSet { name } => self.rss.retain(|r| &r.name != name),
                Action::SetServing { pod, serving } => {
                    let p = self.pods.iter_mut().find(|p| &p.name == pod).unwrap();
                    if *serving {
                        assert!(p.drain_started.is_none(), "serving a draining pod {pod}");
                    }
                    p.serving = Some(*serving);
                }
                Action::StartDrain { pod } => {
                    *self.drains_started.entry(pod.clone()).or_default() += 1;
                    let p = self.pods.iter_mut().find(|p| &p.name == pod).unwrap();
                    p.drain_started = Some(self.now);
                    p.serving = Some(false);
                }
                Action::ReleasePod { pod } => {
                    let p = self.pods.iter_mut().find(|p| &p.name == pod).unwrap();
                    assert!(p.drain_started.is_some(), "released {pod} without a drain");
                    p.drain_released = Some(self.now);
                }
                Action::Event {
                    warning,
                    reason,
                    note,
                } => self.events.push((*warning, reason.clone(), note.clone())),
            }
        }
        self.status = plan.status.clone();
        self.tick();
        self.last_plan = Some(plan.clone());
        plan
    }

    fn tick(&mut self) {
        // The ReplicaSet controller.
        for rs in self.rss.clone() {
            let mut active: Vec<usize> = (0..self.pods.len())
                .filter(|&i| self.pods[i].revision == rs.revision && !self.pods[i].deleting)
                .collect();
            while (active.len() as i32) < rs.replicas {
                self.next += 1;
                self.pods.push(PodView {
                    name: format!("{}-{}", rs.revision, self.next),
                    revision: rs.revision.clone(),
                    created: self.now,
                    ..Default::default()
                });
                active.push(self.pods.len() - 1);
            }
            if (active.len() as i32) > rs.replicas {
                // Rank: not ready first, then lowest deletion cost (released pods).
                active.sort_by_key(|&i| {
                    let p = &self.pods[i];
                    (p.containers_ready, p.drain_released.is_none(), i)
                });
                let extra = active.len() - rs.replicas as usize;
                for &i in active.iter().take(extra) {
                    let p = &mut self.pods[i];
                    if p.drain_released.is_none() && p.serving == Some(true) {
                        self.unsafe_deletes.push(p.name.clone());
                    }
                    p.deleting = true;
                    self.deleting_since.insert(p.name.clone(), self.now);
                }
            }
        }
        // Pods of vanished ReplicaSets are garbage collected.
        let revs: Vec<String> = self.rss.iter().map(|r| r.revision.clone()).collect();
        for p in &mut self.pods {
            if !revs.contains(&p.revision) && !p.deleting {
                p.deleting = true;
                self.deleting_since.insert(p.name.clone(), self.now);
            }
        }
        self.now += 1.0;
        let now = self.now;
        for p in &mut self.pods {
            if self.crashing.contains(&p.revision) {
                p.crash_looping = now - p.created > 3.0;
                p.restarts = ((now - p.created) / 5.0) as i32;
                continue;
            }
            if !p.containers_ready && now - p.created >= self.ready_after {
                p.containers_ready = true;
                p.ready_since = Some(now);
            }
        }
        let term = self.terminate_after;
        let ds = &self.deleting_since;
        self.pods
            .retain(|p| !p.deleting || ds.get(&p.name).is_none_or(|t| now - t < term));
        if let Some(d) = self.dep.as_mut() {
            d.available_replicas = d.spec_replicas.min(d.available_replicas + 1);
        }
        let s = self.serving();
        if self.status.phase.is_some() && self.status.stable_revision.is_some() {
            self.min_serving_seen = self.min_serving_seen.min(s);
        }
    }

    fn run_until(&mut self, max: usize, done: impl Fn(&Sim) -> bool) -> usize {
        for i in 0..max {
            if done(self) {
                return i;
            }
            self.round();
        }
        panic!(
            "not done after {max} rounds: status {:#?}\npods {:#?}\nevents {:#?}",
            self.status, self.pods, self.events
        );
    }

    fn phase(&self) -> Phase {
        self.status.phase.unwrap_or_default()
    }

    fn settle(&mut self) {
        self.run_until(200, |s| {
            s.phase() == Phase::Completed && s.dep.as_ref().unwrap().spec_replicas == 0
        });
        self.min_serving_seen = i32::MAX;
    }

    /// The user edits the Deployment; the planner sees it in the next round.
    fn new_template(&mut self, rev: &str) {
        self.dep.as_mut().unwrap().revision = rev.into();
        self.round();
    }

    fn assert_lossless(&self, n: i32) {
        assert!(
            self.unsafe_deletes.is_empty(),
            "deleted without drain: {:?}",
            self.unsafe_deletes
        );
        for (pod, count) in &self.drains_started {
            assert_eq!(*count, 1, "{pod} drained {count} times");
        }
        assert!(
            self.min_serving_seen >= n,
            "serving pods dropped to {} (< {n})",
            self.min_serving_seen
        );
    }

    fn has_event(&self, reason: &str) -> bool {
        self.events.iter().any(|(_, r, _)| r == reason)
    }

    fn pods_of(&self, rev: &str) -> usize {
        self.pods.iter().filter(|p| p.revision == rev).count()
    }
}

const STEPS: &str = r#"
workloadRef: {name: echo}
steps:
  - setWeight: 34
  - pause: {duration: 5s}
  - setWeight: 67
  - gate: {duration: 5s}
"#;

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
fn rfc3339_round_trips() {
    let t = 1_700_000_000.5;
    assert_eq!(parse_rfc3339(&rfc3339(t)), Some(t));
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
                            .map(|g| super::crd::GateResult {
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
