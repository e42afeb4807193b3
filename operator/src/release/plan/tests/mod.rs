//! Planner tests: single decisions, and whole releases driven through a small simulated
//! cluster (ReplicaSets create and delete pods the way the ReplicaSet controller ranks
//! them, pods become ready and terminate over time), with the lossless invariants checked
//! after every round.
//!
//! This file holds the simulator; the tests are by topic: `steps.rs`, `gates.rs`,
//! `drain.rs`, `lifecycle.rs`, `analysis.rs`.

use std::collections::BTreeMap;

use crate::pod::settings::AgentImagePolicy;
use crate::pod::signals::PodSignals;
use crate::pod::time::rfc3339;
use crate::release::crd::{DrainRecord, Phase, ReleaseSpec, ReleaseStatus};
use crate::release::gates::RevisionWindow;
use crate::release::plan::*;
use crate::release::settings::Settings;
use fake_analysis::FakeAnalysis;
use fake_clients::FakeClients;
use fake_router::FakeRouter;

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
    /// The controller's part for `spec.analysis` (see `analysis.rs`).
    analysis: FakeAnalysis,
    /// The Gateway API data plane, for `spec.trafficRouting`.
    router: Option<FakeRouter>,
    /// Keep-alive clients, for `spec.rebalance`.
    clients: Option<FakeClients>,
    /// Every ask to let connections reconnect (probes and rebalancing), in order: the pod
    /// and how many.
    probes: Vec<(String, i64)>,
    /// Pods whose `Ready` condition the kubelet has not written yet.
    kubelet_behind: Vec<String>,
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
            analysis: FakeAnalysis::default(),
            router: None,
            clients: None,
            probes: Vec::new(),
            kubelet_behind: Vec::new(),
        }
    }

    fn observed(&self) -> Observed {
        let mut pods = self.pods.clone();
        for p in &mut pods {
            // The kubelet: Ready once the containers are and the readiness gate says so.
            p.ready = p.containers_ready
                && p.serving == Some(true)
                && !self.kubelet_behind.contains(&p.name);
            p.signals = (self.signals)(p, self.now);
            if let (Some(c), Some(s)) = (&self.clients, p.signals.as_mut()) {
                s.connections_active = c.active(&p.name);
            }
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
            status: self.analysis.fill(&self.spec, &self.status, self.now),
            promote: self.promote.clone(),
            abort: self.abort.clone(),
            deployment: self.dep.clone(),
            replica_sets: self.rss.clone(),
            pods,
            windows: self.windows.clone(),
            analysis: AnalysisObserved {
                invalid: self.analysis.invalid.clone(),
                requeue_after: Some(std::time::Duration::from_secs(10)),
            },
            routing: self.router.as_ref().map(|r| r.observe(self)),
            split: match (&self.router, &self.clients) {
                (Some(r), _) => r.split(),
                (None, Some(c)) => c.split(self),
                (None, None) => BTreeMap::new(),
            },
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
        assert_eq!(plan, crate::release::plan::plan(&self.observed(), self.now));
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
                Action::RebalanceConnections { pod, connections } => {
                    let now = self.now;
                    if let Some(p) = self.pods.iter_mut().find(|p| &p.name == pod) {
                        p.asked_at = Some(now);
                    }
                    self.probes.push((pod.clone(), *connections));
                    // Without simulated clients (most tests) a probe moves nothing.
                    if let Some(mut c) = self.clients.take() {
                        c.rebalance(self, pod, *connections);
                        self.clients = Some(c);
                    }
                }
                Action::ApplyRoutingServices { .. }
                | Action::SetRouteWeight { .. }
                | Action::SetHeaderRoute { .. } => self
                    .router
                    .as_mut()
                    .expect("routing actions without traffic routing")
                    .apply(a),
            }
        }
        self.status = plan.status.clone();
        self.tick();
        if let Some(mut r) = self.router.take() {
            r.check(self);
            self.router = Some(r);
        }
        if let Some(mut c) = self.clients.take() {
            c.tick(self);
            self.clients = Some(c);
        }
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
                    ip: Some(format!("10.0.0.{}", self.next)),
                    drain_token: Some(format!("token-{}", rs.revision)),
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

mod analysis;
mod drain;
mod fake_analysis;
mod fake_clients;
mod fake_router;
mod gates;
mod lifecycle;
mod rebalance;
mod routing;
mod steps;
