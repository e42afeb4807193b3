//! The pure planner of the InferenceSet controller: observed pods (grouped into gangs) and
//! the spec → actions and status. No I/O, no clock: `now` is a parameter. Everything a
//! restart needs is on the pods (labels, annotations, conditions); the planner keeps no
//! memory between rounds.
//!
//! A *slot* is a replica index `0..replicas`; a *gang* is one instance of a slot (all its
//! pods, one revision). A slot normally has one gang; during a rollout it may have an old
//! and a new one. Gang states, in order: `Pending` (waiting for the binder) → `Starting`
//! (bound, model loading) → `Warm` (warm-up gate passed) → `Serving` (readiness gate
//! `sluice.dev/serving` True) → `Draining` (unserved until quiet: [`crate::drain`]) → deleted.
//! A gang that loses a pod or a node is `Lost`: all its pods go and the slot is placed
//! again, whole.

use std::collections::BTreeMap;
use std::time::Duration;

use super::crd::{InferenceSetSpec, InferenceSetStatus, ReplicaStatus};
use crate::release::crd::ReleaseCondition;
use crate::release::plan::rfc3339;

/// The spec, validated, with defaults applied.
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    pub replicas: i32,
    pub pods_per_replica: i32,
    pub gpus_per_pod: i32,
    pub max_unavailable: i32,
    pub max_surge: i32,
    pub surge_timeout: f64,
    pub quiet_period: f64,
    /// Longest wait for an agent's quiet signal.
    pub propagation_timeout: f64,
    /// The pods carry the Sluice agent: drains are closed-loop on its quiet signal.
    pub agent: bool,
    pub warmup_timeout: f64,
    pub node_loss_grace: f64,
    pub first_token: bool,
    pub paused: bool,
}

impl Settings {
    /// Validate what the schema cannot (durations of objects stored before a rule existed).
    pub fn from_spec(spec: &InferenceSetSpec) -> Result<Settings, Vec<String>> {
        let mut errors = Vec::new();
        let mut dur = |field: &str, v: Option<&super::crd::DurationString>, default: f64| match v {
            None => default,
            Some(d) => match d.parse() {
                Ok(d) => d.as_secs_f64(),
                Err(e) => {
                    errors.push(format!("{field}: {e}"));
                    default
                }
            },
        };
        let us = &spec.update_strategy;
        let surge_timeout = dur(
            "updateStrategy.surgeTimeout",
            us.surge_timeout.as_ref(),
            10.0,
        );
        let quiet_period = dur("drain.quietPeriod", spec.drain.quiet_period.as_ref(), 5.0);
        let propagation_timeout = dur(
            "drain.propagationTimeout",
            spec.drain.propagation_timeout.as_ref(),
            60.0,
        );
        let _ = dur(
            "drain.drainTimeout",
            spec.drain.drain_timeout.as_ref(),
            90.0,
        );
        let warm = spec.warmup.as_ref();
        let warmup_timeout = dur(
            "warmup.timeout",
            warm.and_then(|w| w.timeout.as_ref()),
            1200.0,
        );
        let node_loss_grace = dur(
            "nodeLossGracePeriod",
            spec.node_loss_grace_period.as_ref(),
            30.0,
        );
        if let Some(ft) = warm.and_then(|w| w.first_token.as_ref())
            && let Err(e) = ft.max_latency.parse()
        {
            errors.push(format!("warmup.firstToken.maxLatency: {e}"));
        }
        if spec.replicas < 0 {
            errors.push("replicas must be zero or more".into());
        }
        if spec.pods_per_replica < 1 || spec.gpus_per_pod < 1 {
            errors.push("podsPerReplica and gpusPerPod must be at least 1".into());
        }
        if us.max_unavailable < 1 {
            errors.push("updateStrategy.maxUnavailable must be at least 1".into());
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Settings {
            replicas: spec.replicas,
            pods_per_replica: spec.pods_per_replica,
            gpus_per_pod: spec.gpus_per_pod,
            max_unavailable: us.max_unavailable,
            max_surge: us.max_surge.max(0),
            surge_timeout,
            quiet_period,
            propagation_timeout,
            agent: spec.agent.is_some(),
            warmup_timeout,
            node_loss_grace,
            first_token: warm.and_then(|w| w.first_token.as_ref()).is_some(),
            paused: us.paused,
        })
    }
}

/// One pod of the set, as the planner needs it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PodView {
    pub name: String,
    pub slot: i32,
    pub gang: String,
    pub revision: String,
    /// Index inside the gang.
    pub index: i32,
    pub gang_size: i32,
    /// Seconds since the epoch.
    pub created: f64,
    pub node: Option<String>,
    /// `sluice.dev/gpu-ids`.
    pub gpu_ids: Vec<u32>,
    pub deleting: bool,
    /// Phase Failed or Succeeded: a model server that exits has lost its replica.
    pub finished: bool,
    pub containers_ready: bool,
    /// The `sluice.dev/serving` condition.
    pub serving: Option<bool>,
    /// `sluice.dev/drain-started`, seconds since the epoch.
    pub drain_started: Option<f64>,
    /// `sluice.dev/warm` present.
    pub warm: bool,
    /// The binder's PodScheduled=False message, if any.
    pub unschedulable: Option<String>,
    /// Its node is gone, or NotReady past the grace period.
    pub node_lost: bool,
    /// The agent's signals while the pod drains (`None`: not scraped yet or no agent).
    pub signals: Option<crate::drain::PodSignals>,
}

/// Everything the planner looks at.
#[derive(Clone, Debug)]
pub struct Observed {
    pub name: String,
    pub generation: i64,
    /// Revision of the current spec's template.
    pub revision: String,
    pub settings: Result<Settings, Vec<String>>,
    pub status: InferenceSetStatus,
    pub pods: Vec<PodView>,
}

/// What the executor does, in order; each action is idempotent.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Create pods `indices` of gang `gang` (slot `slot`, revision `revision`).
    CreatePods {
        gang: String,
        slot: i32,
        revision: String,
        indices: Vec<i32>,
    },
    /// Delete pods (a lost or unserved gang).
    DeletePods { pods: Vec<String> },
    /// Annotate `sluice.dev/drain-started` and set `sluice.dev/serving` False.
    StartDrain { pods: Vec<String> },
    /// Set `sluice.dev/serving` True.
    Serve { pods: Vec<String> },
    /// Run the first-token check on these pods; annotate `sluice.dev/warm` on success.
    CheckWarm { gang: String, pods: Vec<String> },
    Event {
        warning: bool,
        reason: String,
        note: String,
    },
}

/// The planner's answer.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub actions: Vec<Action>,
    pub status: InferenceSetStatus,
    pub requeue_after: Duration,
}

/// A gang's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum GangState {
    /// Some pods still to create (none bound).
    Incomplete,
    Pending,
    Starting,
    Warm,
    Serving,
    Draining,
    Lost,
    /// Every pod is being deleted.
    Gone,
}

impl GangState {
    pub fn as_str(self) -> &'static str {
        match self {
            GangState::Incomplete | GangState::Pending => "Pending",
            GangState::Starting => "Starting",
            GangState::Warm => "Warm",
            GangState::Serving => "Serving",
            GangState::Draining => "Draining",
            GangState::Lost => "Lost",
            GangState::Gone => "Terminating",
        }
    }
}

/// One gang, derived from its pods.
#[derive(Clone, Debug)]
pub struct Gang<'a> {
    pub id: String,
    pub slot: i32,
    pub revision: String,
    pub size: i32,
    pub pods: Vec<&'a PodView>,
    pub state: GangState,
    /// Why it is lost.
    pub lost_reason: Option<String>,
    pub created: f64,
    pub drain_started: Option<f64>,
}

impl Gang<'_> {
    fn live(&self) -> Vec<String> {
        self.pods
            .iter()
            .filter(|p| !p.deleting)
            .map(|p| p.name.clone())
            .collect()
    }
    fn any_serving(&self) -> bool {
        self.pods
            .iter()
            .any(|p| p.serving == Some(true) && !p.deleting)
    }
    fn in_service(&self) -> bool {
        self.state == GangState::Serving
    }
}

/// Group pods into gangs and classify each.
pub fn gangs<'a>(pods: &'a [PodView], s: &Settings) -> Vec<Gang<'a>> {
    let mut by: BTreeMap<&str, Vec<&PodView>> = BTreeMap::new();
    for p in pods {
        by.entry(p.gang.as_str()).or_default().push(p);
    }
    by.into_iter()
        .map(|(id, mut pods)| {
            pods.sort_by_key(|p| p.index);
            let first = pods[0];
            let size = first.gang_size.max(1);
            let live: Vec<&&PodView> = pods.iter().filter(|p| !p.deleting).collect();
            let drain_started = pods
                .iter()
                .filter_map(|p| p.drain_started)
                .fold(None, |a: Option<f64>, t| Some(a.map_or(t, |a| a.min(t))));
            let created = pods.iter().map(|p| p.created).fold(f64::MAX, f64::min);
            let bound = live.iter().filter(|p| p.node.is_some()).count();
            let mut lost_reason = None;
            let state = if live.is_empty() {
                GangState::Gone
            } else if drain_started.is_some() {
                GangState::Draining
            } else if let Some(p) = live.iter().find(|p| p.node_lost) {
                lost_reason = Some(format!(
                    "node {} of pod {} is gone or not ready",
                    p.node.as_deref().unwrap_or("?"),
                    p.name
                ));
                GangState::Lost
            } else if let Some(p) = live.iter().find(|p| p.finished) {
                lost_reason = Some(format!("pod {} exited", p.name));
                GangState::Lost
            } else if live.len() < pods.len() {
                lost_reason = Some("a pod of the gang is being deleted".into());
                GangState::Lost
            } else if (live.len() as i32) < size {
                if bound > 0 {
                    lost_reason = Some(format!("the gang has {} of its {size} pods", live.len()));
                    GangState::Lost
                } else {
                    GangState::Incomplete
                }
            } else if bound < live.len() {
                GangState::Pending
            } else if !live.iter().all(|p| p.containers_ready)
                || (s.first_token && !live.iter().all(|p| p.warm))
            {
                GangState::Starting
            } else if !live.iter().all(|p| p.serving == Some(true)) {
                GangState::Warm
            } else {
                GangState::Serving
            };
            Gang {
                id: id.to_string(),
                slot: first.slot,
                revision: first.revision.clone(),
                size,
                pods,
                state,
                lost_reason,
                created,
                drain_started,
            }
        })
        .collect()
}

/// Gang name for slot `slot`, revision `rev`: `<set>-<slot>-<rev>-<n>` with the smallest
/// `n` no pod of the slot uses (a terminating gang keeps its name until it is gone).
pub fn gang_name(set: &str, slot: i32, rev: &str, pods: &[PodView]) -> String {
    (0..)
        .map(|n| format!("{set}-{slot}-{rev}-{n}"))
        .find(|g| !pods.iter().any(|p| &p.gang == g))
        .unwrap_or_default()
}

struct Ctx {
    actions: Vec<Action>,
    requeue: f64,
    degraded: Vec<String>,
    progress: Vec<String>,
}

impl Ctx {
    fn event(&mut self, warning: bool, reason: &str, note: String) {
        self.actions.push(Action::Event {
            warning,
            reason: reason.into(),
            note,
        });
    }
    fn requeue_in(&mut self, secs: f64) {
        self.requeue = self.requeue.min(secs.max(0.5));
    }
}

/// Plan the next moves.
pub fn plan(o: &Observed, now: f64) -> Plan {
    let mut status = o.status.clone();
    status.observed_generation = Some(o.generation);
    status.update_revision = Some(o.revision.clone());
    let s = match &o.settings {
        Ok(s) => s,
        Err(errors) => {
            let msg = format!("invalid spec: {}", errors.join("; "));
            status.message = Some(msg.clone());
            set_condition(
                &mut status,
                "Degraded",
                true,
                "InvalidSpec",
                &msg,
                o.generation,
                now,
            );
            return Plan {
                actions: vec![Action::Event {
                    warning: true,
                    reason: "InvalidSpec".into(),
                    note: msg,
                }],
                status,
                requeue_after: Duration::from_secs(300),
            };
        }
    };
    let mut c = Ctx {
        actions: Vec::new(),
        requeue: 30.0,
        degraded: Vec::new(),
        progress: Vec::new(),
    };
    let all = gangs(&o.pods, s);

    // 1. Lost gangs: delete every pod; the slot is placed again below.
    // 2. Draining gangs: delete once the quiet period has passed.
    for g in &all {
        match g.state {
            GangState::Lost => {
                c.event(
                    true,
                    "ReplicaLost",
                    format!(
                        "replica {} ({}): {}; placing it again",
                        g.slot,
                        g.id,
                        g.lost_reason.as_deref().unwrap_or("lost")
                    ),
                );
                c.actions.push(Action::DeletePods { pods: g.live() });
            }
            GangState::Draining => drain_step(&mut c, s, g, now),
            _ => {}
        }
    }

    // Active gangs per slot (not lost, draining or gone).
    let active = |g: &&Gang| {
        !matches!(
            g.state,
            GangState::Lost | GangState::Draining | GangState::Gone
        )
    };
    let mut slots: BTreeMap<i32, Vec<&Gang>> = BTreeMap::new();
    for g in all.iter().filter(active) {
        slots.entry(g.slot).or_default().push(g);
    }

    // 3. Scale down: slots beyond `replicas` leave (highest first); serving ones drain.
    for (_, gs) in slots.range(s.replicas..).rev() {
        for g in gs {
            leave(&mut c, g, now, "ScaleDown");
        }
    }

    // 4. Per slot: complete, serve, warm-check; duplicates of a revision go.
    let mut serving_slots = 0;
    let mut surge_in_use = 0;
    let mut needs_update: Vec<i32> = Vec::new();
    for slot in 0..s.replicas {
        let gs = slots.get(&slot).cloned().unwrap_or_default();
        // The most advanced gang of each revision stays; others go.
        let mut keep: Vec<&Gang> = Vec::new();
        for g in &gs {
            match keep.iter().position(|k| k.revision == g.revision) {
                Some(i) if rank(keep[i]) >= rank(g) => leave(&mut c, g, now, "Duplicate"),
                Some(i) => {
                    leave(&mut c, keep[i], now, "Duplicate");
                    keep[i] = g;
                }
                None => keep.push(g),
            }
        }
        if keep.iter().any(|g| g.in_service()) {
            serving_slots += 1;
        }
        let new = keep.iter().find(|g| g.revision == o.revision).copied();
        let old: Vec<&Gang> = keep
            .iter()
            .filter(|g| g.revision != o.revision)
            .copied()
            .collect();
        if new.is_some() && !old.is_empty() {
            surge_in_use += 1;
        }
        match new {
            None if old.is_empty() => {
                let gang = gang_name(&o.name, slot, &o.revision, &o.pods);
                c.event(
                    false,
                    "CreatingReplica",
                    format!("replica {slot}: creating gang {gang}"),
                );
                c.actions.push(Action::CreatePods {
                    gang,
                    slot,
                    revision: o.revision.clone(),
                    indices: (0..s.pods_per_replica).collect(),
                });
            }
            None => needs_update.push(slot),
            Some(n) => advance(&mut c, o, s, n, now),
        }
    }
    let mut unavailable = s.replicas - serving_slots;

    // 5. Rollout: old gangs leave as the budget allows.
    let warm_stuck = c.degraded.iter().any(|d| d.contains("warm-up"));
    let hold = s.paused || warm_stuck;
    // A surge gang that found no room proves there is no spare capacity: roll by slot swap.
    // While a gang drains or terminates its GPUs are about to free up: wait for them
    // rather than conclude there is no room.
    let freeing = all.iter().any(|g| match g.state {
        GangState::Draining => true,
        GangState::Gone => g.pods.iter().any(|p| p.node.is_some() && !p.node_lost),
        _ => false,
    });
    let surge_blocked = !freeing
        && slots.values().any(|gs| {
            gs.iter().any(|n| {
                n.revision == o.revision
                    && n.state <= GangState::Pending
                    && gs.iter().any(|g| g.revision != o.revision)
                    && (n.pods.iter().any(|p| p.unschedulable.is_some())
                        || now - n.created >= s.surge_timeout)
            })
        });
    for slot in 0..s.replicas {
        let Some(gs) = slots.get(&slot) else { continue };
        let new = gs.iter().find(|g| g.revision == o.revision).copied();
        let old: Vec<&Gang> = gs
            .iter()
            .filter(|g| g.revision != o.revision)
            .copied()
            .collect();
        if old.is_empty() {
            continue;
        }
        // Old gangs that do not serve leave at once: nothing flows through them.
        let (old_serving, old_idle): (Vec<&Gang>, Vec<&Gang>) =
            old.iter().partition(|g| g.in_service());
        for g in &old_idle {
            leave(&mut c, g, now, "Replaced");
        }
        let Some(osv) = old_serving.first().copied() else {
            if new.is_none() {
                // The old gang never served (pending/starting): replace it directly.
                let gang = gang_name(&o.name, slot, &o.revision, &o.pods);
                c.actions.push(Action::CreatePods {
                    gang,
                    slot,
                    revision: o.revision.clone(),
                    indices: (0..s.pods_per_replica).collect(),
                });
            }
            continue;
        };
        match new {
            Some(n) if n.in_service() => {
                // Surge finished: the new replica serves, the old one drains at no cost.
                drain(&mut c, osv, slot, "the new replica serves");
            }
            Some(n) if n.state <= GangState::Pending && !hold => {
                // A surge gang without room turns into a slot swap once the timeout passed.
                let waited = now - n.created;
                if waited >= s.surge_timeout && !freeing && unavailable < s.max_unavailable {
                    drain(
                        &mut c,
                        osv,
                        slot,
                        "no spare GPUs for a surge: slot swap into its GPUs",
                    );
                    unavailable += 1;
                } else if waited < s.surge_timeout {
                    c.requeue_in(s.surge_timeout - waited);
                }
            }
            Some(_) => {}
            None if hold => {}
            None => {
                let gang = gang_name(&o.name, slot, &o.revision, &o.pods);
                if surge_in_use < s.max_surge {
                    surge_in_use += 1;
                    c.event(
                        false,
                        "Surge",
                        format!(
                            "replica {slot}: starting the new revision beside the old one ({gang})"
                        ),
                    );
                    c.actions.push(Action::CreatePods {
                        gang,
                        slot,
                        revision: o.revision.clone(),
                        indices: (0..s.pods_per_replica).collect(),
                    });
                    c.requeue_in(s.surge_timeout);
                } else if unavailable < s.max_unavailable && (s.max_surge == 0 || surge_blocked) {
                    unavailable += 1;
                    drain(&mut c, osv, slot, "slot swap");
                    c.actions.push(Action::CreatePods {
                        gang,
                        slot,
                        revision: o.revision.clone(),
                        indices: (0..s.pods_per_replica).collect(),
                    });
                }
            }
        }
    }
    if hold && !needs_update.is_empty() {
        c.progress.push(if s.paused {
            "rollout paused".into()
        } else {
            "rollout held: a new replica did not warm up in time".into()
        });
    }

    // Status.
    fill_status(&mut status, o, s, &all, &c, now);
    Plan {
        actions: c.actions,
        status,
        requeue_after: Duration::from_secs_f64(c.requeue),
    }
}

fn rank(g: &Gang) -> GangState {
    g.state
}

/// A gang of the current revision moves forward: create missing pods, warm-check, serve.
fn advance(c: &mut Ctx, o: &Observed, s: &Settings, g: &Gang, now: f64) {
    match g.state {
        GangState::Incomplete => {
            let have: Vec<i32> = g.pods.iter().map(|p| p.index).collect();
            c.actions.push(Action::CreatePods {
                gang: g.id.clone(),
                slot: g.slot,
                revision: g.revision.clone(),
                indices: (0..g.size).filter(|i| !have.contains(i)).collect(),
            });
        }
        GangState::Pending => {
            if let Some(msg) = g.pods.iter().find_map(|p| p.unschedulable.clone()) {
                c.progress
                    .push(format!("replica {} waits for GPUs: {msg}", g.slot));
            }
            c.requeue_in(10.0);
        }
        GangState::Starting => {
            let ready = g.pods.iter().all(|p| p.containers_ready);
            if ready && s.first_token {
                c.actions.push(Action::CheckWarm {
                    gang: g.id.clone(),
                    pods: g.live(),
                });
                c.requeue_in(5.0);
            } else {
                c.requeue_in(5.0);
            }
            let age = now - g.created;
            if age > s.warmup_timeout {
                c.degraded.push(format!(
                    "replica {} ({}) not warm after {:.0}s (warm-up timeout {:.0}s)",
                    g.slot, g.id, age, s.warmup_timeout
                ));
            }
        }
        GangState::Warm => {
            c.event(
                false,
                "ReplicaServing",
                format!("replica {} ({}) is warm: entering service", g.slot, g.id),
            );
            c.actions.push(Action::Serve {
                pods: g
                    .pods
                    .iter()
                    .filter(|p| p.serving != Some(true))
                    .map(|p| p.name.clone())
                    .collect(),
            });
        }
        _ => {}
    }
    let _ = o;
}

/// A gang leaves without being replaced in its slot: drain if it serves, else delete.
fn leave(c: &mut Ctx, g: &Gang, now: f64, why: &str) {
    let _ = now;
    if g.any_serving() {
        drain(c, g, g.slot, why);
    } else {
        c.actions.push(Action::DeletePods { pods: g.live() });
    }
}

/// A draining gang: every live pod must be quiet (the shared drain protocol,
/// [`crate::drain`]); then all its pods are deleted together and their agents close the
/// remaining connections paced in the preStop hook.
fn drain_step(c: &mut Ctx, s: &Settings, g: &Gang, now: f64) {
    use crate::drain::{DrainStep, QuietSignal};
    let started = g.drain_started.unwrap_or(now);
    let elapsed = now - started;
    let mut timed_out = false;
    for p in g.pods.iter().filter(|p| !p.deleting) {
        let signal = if s.agent {
            QuietSignal::from_signals(p.signals.as_ref())
        } else {
            QuietSignal::NoAgent
        };
        let never_served = !p.containers_ready;
        match crate::drain::drain_step(
            elapsed,
            never_served,
            signal,
            s.quiet_period,
            s.propagation_timeout,
        ) {
            DrainStep::Wait(secs) => {
                c.requeue_in(secs);
                return;
            }
            DrainStep::TimedOut => timed_out = true,
            DrainStep::Quiet => {}
        }
    }
    if s.agent {
        c.event(
            timed_out,
            if timed_out { "QuietTimeout" } else { "ReplicaQuiet" },
            if timed_out {
                format!(
                    "replica {} ({}) saw new connections for the whole propagation timeout ({:.0}s): closing anyway",
                    g.slot, g.id, s.propagation_timeout
                )
            } else {
                format!(
                    "replica {} ({}) quiet after {elapsed:.1}s: closing its connections",
                    g.slot, g.id
                )
            },
        );
    }
    c.actions.push(Action::DeletePods { pods: g.live() });
}

fn drain(c: &mut Ctx, g: &Gang, slot: i32, why: &str) {
    c.event(
        false,
        "DrainingReplica",
        format!("replica {slot} ({}): draining ({why})", g.id),
    );
    c.actions.push(Action::StartDrain { pods: g.live() });
    c.requeue_in(1.0);
}

fn fill_status(
    status: &mut InferenceSetStatus,
    o: &Observed,
    s: &Settings,
    all: &[Gang],
    c: &Ctx,
    now: f64,
) {
    let gen_ = o.generation;
    let mut replica_status = Vec::new();
    let mut serving_slots = std::collections::BTreeSet::new();
    let mut slots = std::collections::BTreeSet::new();
    let mut updated = std::collections::BTreeSet::new();
    let mut pending = 0;
    let mut gpus = 0;
    let mut revisions_serving = std::collections::BTreeSet::new();
    for g in all {
        if g.state == GangState::Gone {
            continue;
        }
        let live: Vec<&&PodView> = g.pods.iter().filter(|p| !p.deleting).collect();
        for p in &live {
            if p.node.is_some() {
                gpus += if p.gpu_ids.is_empty() {
                    s.gpus_per_pod
                } else {
                    p.gpu_ids.len() as i32
                };
            }
        }
        let active = !matches!(g.state, GangState::Lost | GangState::Draining);
        if active && g.slot < s.replicas {
            slots.insert(g.slot);
            if g.revision == o.revision {
                updated.insert(g.slot);
            }
            if g.in_service() {
                serving_slots.insert(g.slot);
                revisions_serving.insert(g.revision.clone());
            }
            if g.state <= GangState::Pending {
                pending += 1;
            }
        }
        replica_status.push(ReplicaStatus {
            slot: g.slot,
            gang: g.id.clone(),
            revision: g.revision.clone(),
            state: g.state.as_str().into(),
            placement: live
                .iter()
                .filter_map(|p| {
                    p.node.as_ref().map(|n| {
                        let ids: Vec<String> = p.gpu_ids.iter().map(u32::to_string).collect();
                        format!("{n}:{}", ids.join(","))
                    })
                })
                .collect(),
            ready: format!(
                "{}/{}",
                live.iter().filter(|p| p.containers_ready).count(),
                g.size
            ),
        });
    }
    replica_status.sort_by(|a, b| (a.slot, &a.gang).cmp(&(b.slot, &b.gang)));
    status.replica_status = replica_status;
    status.replicas = slots.len() as i32;
    status.serving_replicas = serving_slots.len() as i32;
    status.updated_replicas = updated.len() as i32;
    status.pending_gangs = pending;
    status.gpus = gpus;
    status.selector = Some(format!("{}={}", super::crd::SET_LABEL, o.name));
    let done = status.updated_replicas == s.replicas
        && status.serving_replicas == s.replicas
        && revisions_serving.iter().all(|r| r == &o.revision)
        && all
            .iter()
            .all(|g| g.state == GangState::Serving || g.state == GangState::Gone);
    if done {
        status.current_revision = Some(o.revision.clone());
    } else if status.current_revision.is_none() {
        status.current_revision = revisions_serving.iter().next().cloned();
    }
    let ready = status.serving_replicas >= s.replicas;
    let msg = if let Some(d) = c.degraded.first() {
        d.clone()
    } else if let Some(p) = c.progress.first() {
        p.clone()
    } else if done {
        format!("{} replicas serving revision {}", s.replicas, o.revision)
    } else {
        format!(
            "{}/{} serving, {}/{} updated, {} pending",
            status.serving_replicas, s.replicas, status.updated_replicas, s.replicas, pending
        )
    };
    status.message = Some(msg.clone());
    set_condition(
        status,
        "Ready",
        ready,
        if ready {
            "AllReplicasServing"
        } else {
            "ReplicasUnavailable"
        },
        &format!(
            "{}/{} replicas serving",
            status.serving_replicas, s.replicas
        ),
        gen_,
        now,
    );
    set_condition(
        status,
        "Progressing",
        !done,
        if done { "Complete" } else { "RollingOut" },
        &msg,
        gen_,
        now,
    );
    let degraded = !c.degraded.is_empty();
    set_condition(
        status,
        "Degraded",
        degraded,
        if degraded {
            "WarmupTimeout"
        } else {
            "AsExpected"
        },
        c.degraded.first().map(String::as_str).unwrap_or(""),
        gen_,
        now,
    );
}

/// Set a condition, keeping its transition time when the status does not change.
pub fn set_condition(
    status: &mut InferenceSetStatus,
    type_: &str,
    value: bool,
    reason: &str,
    message: &str,
    generation: i64,
    now: f64,
) {
    let v = if value { "True" } else { "False" };
    let cond = ReleaseCondition {
        type_: type_.into(),
        status: v.into(),
        reason: reason.into(),
        message: message.into(),
        last_transition_time: rfc3339(now),
        observed_generation: Some(generation),
    };
    match status.conditions.iter_mut().find(|c| c.type_ == type_) {
        Some(c) => {
            let t = if c.status == v {
                c.last_transition_time.clone()
            } else {
                cond.last_transition_time.clone()
            };
            *c = ReleaseCondition {
                last_transition_time: t,
                ..cond
            };
        }
        None => status.conditions.push(cond),
    }
}

/// Whether a pod's node counts as lost: deleted, or NotReady for longer than `grace`.
/// `not_ready_since` is when its Ready condition last turned non-True.
pub fn node_lost(exists: bool, not_ready_since: Option<f64>, now: f64, grace: f64) -> bool {
    !exists || not_ready_since.is_some_and(|t| now - t >= grace)
}
