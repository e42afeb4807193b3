//! The pure planner: `plan(&Observed, now) -> Plan`.
//!
//! Deterministic and level-triggered: it looks only at what is observed now (the Release
//! with its previous status, the Deployment, the ReplicaSets and pods the Release owns,
//! agent signals) and says what to do next and what status to write. Every piece of
//! progress is in status or in pod annotations, so a restart at any point (kill -9)
//! resumes: a pod carrying `sluice.dev/drain-started` is never picked for a drain again,
//! and one carrying `sluice.dev/drain-released` is the one its ReplicaSet deletes.
//!
//! Traffic moves by replica ratio: the Service selects both revisions' pods and the
//! operator decides which pods are in its endpoints through the `sluice.dev/serving`
//! readiness gate.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use super::crd::{
    AbortInfo, DrainRecord, GateResult, Phase, ReleaseCondition, ReleaseStatus, RevisionStatus,
};
use super::gates::{
    Evaluation, PodHealth, PodSignals, RevisionWindow, Verdict, evaluate_comparison,
    evaluate_connection_rate, evaluate_health,
};
use super::settings::{Settings, StepKind};
use crate::drain::{DrainStep, QuietSignal, drain_step};

/// Most drain records kept in status.
pub const MAX_DRAIN_RECORDS: usize = 50;
/// [`DrainRecord::state`] of a released pod whose agent refused a `/drain` (the kubelet's
/// preStop): it terminates without a paced close.
pub const DRAIN_REFUSED: &str = "Refused";

/// The Deployment, as the planner needs it.
#[derive(Clone, Debug, PartialEq)]
pub struct DeploymentView {
    /// Revision (hash) of the Deployment's current pod template.
    pub revision: String,
    pub spec_replicas: i32,
    /// `sluice.dev/replicas` annotation.
    pub recorded_replicas: Option<i32>,
    pub available_replicas: i32,
    /// Why the current template cannot be run (injection failed), if it cannot.
    pub inject_error: Option<String>,
    /// Which Release runs the Deployment (`sluice.dev/claimed-by`).
    pub claim: Claim,
}

/// The Deployment's claim, as seen by one Release.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum Claim {
    /// No claim, or one naming a Release that no longer exists.
    #[default]
    Free,
    /// Claimed by this Release.
    Ours,
    /// Claimed by another Release of the namespace, which exists: this one is refused.
    Other(String),
}

/// A ReplicaSet the Release owns.
#[derive(Clone, Debug, PartialEq)]
pub struct ReplicaSetView {
    pub name: String,
    /// Pods are the ReplicaSet's by this UID in their owner reference, not by name.
    pub uid: String,
    pub revision: String,
    pub replicas: i32,
}

/// A pod of one of the Release's ReplicaSets.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PodView {
    pub name: String,
    pub revision: String,
    /// Seconds since the epoch.
    pub created: f64,
    pub deleting: bool,
    pub containers_ready: bool,
    /// When the containers became ready (seconds since the epoch).
    pub ready_since: Option<f64>,
    /// The `sluice.dev/serving` condition: `None` when absent.
    pub serving: Option<bool>,
    pub restarts: i32,
    pub crash_looping: bool,
    pub drain_started: Option<f64>,
    pub drain_released: Option<f64>,
    /// From the agent; `None` when it could not be scraped.
    pub signals: Option<PodSignals>,
}

/// Everything the planner looks at.
#[derive(Clone, Debug)]
pub struct Observed {
    pub generation: i64,
    pub deleting: bool,
    pub has_finalizer: bool,
    pub settings: Result<Settings, Vec<String>>,
    pub status: ReleaseStatus,
    /// `sluice.dev/promote` annotation.
    pub promote: Option<String>,
    /// `sluice.dev/abort` annotation.
    pub abort: Option<String>,
    pub deployment: Option<DeploymentView>,
    pub replica_sets: Vec<ReplicaSetView>,
    pub pods: Vec<PodView>,
    /// Request figures per revision over the comparison window.
    pub windows: BTreeMap<String, RevisionWindow>,
}

/// What to do. The executor runs the actions in order; each is idempotent.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    AddFinalizer,
    RemoveFinalizer,
    /// Record this Release as the Deployment's one Release (`sluice.dev/claimed-by`), only
    /// if the Deployment did not change since it was read: a concurrent claim fails.
    /// Comes before anything else that touches the Deployment.
    ClaimDeployment,
    /// Remove this Release's claim from the Deployment (after the hand-back).
    ReleaseClaim,
    /// Remember the Deployment's replica count in its `sluice.dev/replicas` annotation.
    RecordDeploymentReplicas(i32),
    ScaleDeployment(i32),
    /// Create the ReplicaSet of the Deployment's current template (injected).
    CreateReplicaSet {
        revision: String,
        replicas: i32,
    },
    ScaleReplicaSet {
        name: String,
        replicas: i32,
    },
    DeleteReplicaSet {
        name: String,
    },
    /// Set the pod's `sluice.dev/serving` condition.
    SetServing {
        pod: String,
        serving: bool,
    },
    /// Annotate `sluice.dev/drain-started` and set serving False.
    StartDrain {
        pod: String,
    },
    /// The pod went quiet: annotate `sluice.dev/drain-released` and the lowest deletion
    /// cost, so that the following scale-down of its ReplicaSet deletes exactly it.
    ReleasePod {
        pod: String,
    },
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
    pub status: ReleaseStatus,
    /// Gate evaluations made in this round (for metrics).
    pub evaluations: Vec<Evaluation>,
    /// Drains finished in this round (for metrics).
    pub finished_drains: Vec<DrainRecord>,
    /// Drains whose `/drain` the agent refused, newly seen in this round (for metrics).
    pub refused_drains: Vec<DrainRecord>,
    pub requeue_after: Duration,
}

/// Seconds since the epoch → RFC 3339.
pub fn rfc3339(t: f64) -> String {
    k8s_openapi::jiff::Timestamp::from_millisecond((t * 1000.0) as i64)
        .map(|ts| ts.to_string())
        .unwrap_or_default()
}

/// RFC 3339 → seconds since the epoch.
pub fn parse_rfc3339(s: &str) -> Option<f64> {
    s.parse::<k8s_openapi::jiff::Timestamp>()
        .ok()
        .map(|t| t.as_millisecond() as f64 / 1000.0)
}

struct Ctx<'a> {
    now: f64,
    s: &'a Settings,
    actions: Vec<Action>,
    status: ReleaseStatus,
    evaluations: Vec<Evaluation>,
    finished: Vec<DrainRecord>,
    refused: Vec<DrainRecord>,
    busy: bool,
}

impl Ctx<'_> {
    fn event(&mut self, warning: bool, reason: &str, note: String) {
        self.actions.push(Action::Event {
            warning,
            reason: reason.into(),
            note,
        });
    }
}

/// Plan the next moves.
pub fn plan(o: &Observed, now: f64) -> Plan {
    let mut status = o.status.clone();
    within_status_bounds(&mut status);
    status.observed_generation = Some(o.generation);
    // Messages describe this round only.
    status.message = None;
    let settings = match &o.settings {
        Ok(s) => s,
        Err(errs) => {
            let msg = format!("invalid spec: {}", errs.join("; "));
            let mut actions = Vec::new();
            // The controller hands back with lenient settings when it can; this is only
            // reached when even those are invalid, so nothing was taken over.
            if o.deleting && o.has_finalizer {
                if o.deployment
                    .as_ref()
                    .is_some_and(|d| d.claim == Claim::Ours)
                {
                    actions.push(Action::ReleaseClaim);
                }
                actions.push(Action::RemoveFinalizer);
            }
            return failed(&o.status, status, actions, msg, o.generation, now);
        }
    };
    let mut c = Ctx {
        now,
        s: settings,
        actions: Vec::new(),
        status,
        evaluations: Vec::new(),
        finished: Vec::new(),
        refused: Vec::new(),
        busy: false,
    };
    // Status is input too (anyone with status rights can write it): a step outside
    // `0..=steps` would index out of the steps.
    let steps = step_count(settings);
    c.status.current_step = c.status.current_step.map(|s| s.clamp(0, steps));
    if !o.deleting && !o.has_finalizer {
        c.actions.push(Action::AddFinalizer);
    }
    let Some(dep) = &o.deployment else {
        if o.deleting {
            // Nothing to hand back to: the ReplicaSets go with the Release.
            if o.has_finalizer {
                c.actions.push(Action::RemoveFinalizer);
            }
            return finish(c, o);
        }
        let msg = format!(
            "Deployment {:?} not found in the Release's namespace",
            settings.deployment
        );
        return failed(&o.status, c.status, c.actions, msg, o.generation, now);
    };
    // One Release per Deployment: a Deployment another existing Release runs is never
    // touched, not even on deletion.
    if let Claim::Other(first) = &dep.claim {
        if o.deleting && o.has_finalizer {
            c.actions.push(Action::RemoveFinalizer);
        }
        let msg = format!(
            "Deployment {:?} is already run by Release {first:?}: one Release per Deployment; \
             this one waits until {first:?} is deleted",
            settings.deployment
        );
        return failed_as(
            "DeploymentClaimed",
            &o.status,
            c.status,
            c.actions,
            msg,
            o.generation,
            now,
        );
    }
    if !o.deleting && dep.claim == Claim::Free {
        c.actions.push(Action::ClaimDeployment);
    }

    let n = settings
        .replicas
        .or((dep.spec_replicas > 0).then_some(dep.spec_replicas))
        .or(dep.recorded_replicas)
        .or(c.status.replicas)
        .unwrap_or(1)
        .max(1);
    c.status.replicas = Some(n);
    if !o.deleting
        && settings.replicas.is_none()
        && dep.spec_replicas > 0
        && dep.recorded_replicas != Some(dep.spec_replicas)
    {
        c.actions
            .push(Action::RecordDeploymentReplicas(dep.spec_replicas));
    }

    record_drains(&mut c, o);

    if o.deleting {
        hand_back(&mut c, o, dep, n);
        return finish(c, o);
    }

    decide_revisions(&mut c, o, dep);

    // Gates judge the canary; a failure aborts before anything else moves.
    if c.status.canary_revision.is_some() {
        evaluate_gates(&mut c, o);
    }
    if c.status.canary_revision.is_some() {
        check_deadline(&mut c);
    }

    let wants = wants(&c, o, n);
    if let Some(err) = &dep.inject_error
        && wants.get(&dep.revision).copied().unwrap_or(0) > 0
        && !o.replica_sets.iter().any(|r| r.revision == dep.revision)
    {
        let msg = format!("cannot run the Deployment's template: {err}");
        return failed(&o.status, c.status, c.actions, msg, o.generation, now);
    }
    move_pods(&mut c, o, dep, n, &wants, 0);
    if c.status.canary_revision.is_some() {
        advance_steps(&mut c, o, n, &wants);
    } else {
        settle(&mut c, o, dep, n, &wants);
    }
    revision_status(&mut c, o, &wants);
    finish(c, o)
}

/// Bring a status read back into the bounds its schema sets (`currentStep` ≥ 0,
/// `canaryWeight` 0–100, `replicas` ≥ 1, `consecutiveFailures` ≥ 0). A status written
/// before those bounds existed, or by hand, would otherwise make every status write of
/// ours fail admission.
fn within_status_bounds(st: &mut ReleaseStatus) {
    st.current_step = st.current_step.map(|s| s.max(0));
    st.canary_weight = st.canary_weight.map(|w| w.clamp(0, 100));
    st.replicas = st.replicas.filter(|r| *r >= 1);
    for g in &mut st.gates {
        g.consecutive_failures = g.consecutive_failures.max(0);
    }
}

fn failed(
    prev: &ReleaseStatus,
    status: ReleaseStatus,
    actions: Vec<Action>,
    msg: String,
    generation: i64,
    now: f64,
) -> Plan {
    failed_as("Failed", prev, status, actions, msg, generation, now)
}

/// Phase `Failed` with `reason` on the conditions; a Warning event (`ReleaseFailed`, or
/// `reason` itself when it is not `Failed`) once per message.
fn failed_as(
    reason: &str,
    prev: &ReleaseStatus,
    mut status: ReleaseStatus,
    actions: Vec<Action>,
    msg: String,
    generation: i64,
    now: f64,
) -> Plan {
    let mut actions = actions;
    if prev.phase != Some(Phase::Failed) || prev.message.as_deref() != Some(msg.as_str()) {
        actions.push(Action::Event {
            warning: true,
            reason: if reason == "Failed" {
                "ReleaseFailed".into()
            } else {
                reason.into()
            },
            note: msg.clone(),
        });
    }
    status.phase = Some(Phase::Failed);
    status.message = Some(msg.clone());
    set_condition(&mut status, "Ready", false, reason, &msg, generation, now);
    set_condition(
        &mut status,
        "Progressing",
        false,
        reason,
        &msg,
        generation,
        now,
    );
    set_condition(&mut status, "Degraded", true, reason, &msg, generation, now);
    Plan {
        actions,
        status,
        evaluations: Vec::new(),
        finished_drains: Vec::new(),
        refused_drains: Vec::new(),
        requeue_after: Duration::from_secs(30),
    }
}

/// Which revision is stable and which is the canary, and what the user asked for.
fn decide_revisions(c: &mut Ctx, o: &Observed, dep: &DeploymentView) {
    let r = dep.revision.clone();
    let st = &mut c.status;
    if st.stable_revision.is_none() {
        st.stable_revision = Some(r.clone());
        st.current_step = None;
        c.actions.push(Action::Event {
            warning: false,
            reason: "TakingOver".into(),
            note: format!("running revision {r} of the Deployment through the Release"),
        });
    }
    let stable = c.status.stable_revision.clone().unwrap_or_default();
    if r == stable {
        if let Some(old) = c.status.canary_revision.take() {
            c.event(
                false,
                "CanaryReverted",
                format!(
                    "the Deployment's template is back at stable {stable}: draining canary {old}"
                ),
            );
        }
        c.status.aborted_revision = None;
        c.status.abort = None;
        c.status.current_step = None;
        c.status.step_started_at = None;
    } else if c.status.aborted_revision.as_deref() == Some(r.as_str()) {
        // Stays aborted until the template changes or a promote retries it.
    } else if c.status.canary_revision.as_deref() != Some(r.as_str()) {
        if let Some(old) = c.status.canary_revision.take() {
            c.event(
                false,
                "CanarySuperseded",
                format!("revision {r} replaces canary {old}, which is drained"),
            );
        }
        start_canary(c, &r);
    }

    // User abort: any new value of the annotation.
    if let Some(token) = &o.abort
        && c.status.abort_token.as_deref() != Some(token.as_str())
    {
        c.status.abort_token = Some(token.clone());
        if c.status.canary_revision.is_some() {
            abort(
                c,
                "UserAbort",
                None,
                "aborted by the user (sluice.dev/abort)".into(),
                BTreeMap::new(),
            );
        }
    }
    // Promote: any new value of the annotation; `full…` skips every remaining step.
    if let Some(token) = &o.promote
        && c.status.promote_token.as_deref() != Some(token.as_str())
    {
        c.status.promote_token = Some(token.clone());
        let full = token.starts_with("full");
        if c.status.canary_revision.is_none() && c.status.aborted_revision.as_deref() == Some(&r) {
            c.status.aborted_revision = None;
            c.status.abort = None;
            c.event(
                false,
                "Retry",
                format!("retrying revision {r} after a promote"),
            );
            start_canary(c, &r);
        } else if c.status.canary_revision.is_some() {
            let steps = step_count(c.s);
            let cur = c.status.current_step.unwrap_or(0);
            if full {
                c.status.current_step = Some(steps);
                c.status.step_started_at = Some(rfc3339(c.now));
                c.event(false, "Promoted", "promoted to 100% (full)".into());
            } else if matches!(
                step_at(c.s, cur),
                Some(StepKind::Pause(_) | StepKind::Gate(_))
            ) {
                c.status.current_step = Some(cur.saturating_add(1));
                c.status.step_started_at = Some(rfc3339(c.now));
                c.event(false, "Promoted", format!("step {} promoted", cur + 1));
            }
        }
    }
}

fn start_canary(c: &mut Ctx, r: &str) {
    c.status.canary_revision = Some(r.to_string());
    c.status.current_step = Some(0);
    c.status.step_started_at = Some(rfc3339(c.now));
    c.status.gates.clear();
    c.status.abort = None;
    c.status.aborted_revision = None;
    c.event(
        false,
        "ReleaseStarted",
        format!(
            "releasing revision {r} over stable {}",
            c.status.stable_revision.clone().unwrap_or_default()
        ),
    );
}

fn abort(
    c: &mut Ctx,
    reason: &str,
    gate: Option<&str>,
    message: String,
    values: BTreeMap<String, f64>,
) {
    let Some(rev) = c.status.canary_revision.take() else {
        return;
    };
    c.status.aborted_revision = Some(rev.clone());
    c.status.abort = Some(AbortInfo {
        reason: reason.into(),
        gate: gate.map(str::to_string),
        message: message.clone(),
        values,
        revision: rev.clone(),
        at: rfc3339(c.now),
    });
    c.status.step_started_at = None;
    c.event(
        true,
        if gate.is_some() { "GateFailed" } else { reason },
        format!("aborting revision {rev}: {message}; traffic returns to stable"),
    );
}

/// The number of steps, as the status counts them.
fn step_count(s: &Settings) -> i32 {
    i32::try_from(s.steps.len()).unwrap_or(i32::MAX)
}

/// Step `i`; `None` past the last one (and before the first).
fn step_at(s: &Settings, i: i32) -> Option<&StepKind> {
    usize::try_from(i).ok().and_then(|i| s.steps.get(i))
}

fn step_weight(s: &Settings, step: Option<i32>) -> i32 {
    let Some(step) = step else { return 0 };
    let step = usize::try_from(step).unwrap_or(0);
    if step >= s.steps.len() {
        return 100;
    }
    s.steps[..=step]
        .iter()
        .filter_map(|k| match k {
            StepKind::SetWeight(w) => Some(*w),
            _ => None,
        })
        .next_back()
        .unwrap_or(0)
}

fn pods_for(n: i32, weight: i32) -> i32 {
    ((n as i64 * weight as i64 + 99) / 100) as i32
}

/// Pods each revision should have at the end of the current step.
fn wants(c: &Ctx, o: &Observed, n: i32) -> BTreeMap<String, i32> {
    let mut wants: BTreeMap<String, i32> = BTreeMap::new();
    for r in o
        .replica_sets
        .iter()
        .map(|r| &r.revision)
        .chain(o.pods.iter().map(|p| &p.revision))
    {
        wants.insert(r.clone(), 0);
    }
    let stable = c.status.stable_revision.clone().unwrap_or_default();
    match &c.status.canary_revision {
        Some(canary) => {
            let w = step_weight(c.s, c.status.current_step);
            let cw = pods_for(n, w);
            wants.insert(canary.clone(), cw);
            wants.insert(stable, n - cw);
        }
        None => {
            wants.insert(stable, n);
        }
    }
    wants
}

#[derive(Default, Clone, Copy)]
struct Counts {
    /// Not deleting and not released: pods the ReplicaSet should keep.
    active: i32,
    /// Active pods already draining.
    draining: i32,
    /// Active, not draining, serving.
    serving: i32,
    ready: i32,
}

fn counts(o: &Observed) -> BTreeMap<String, Counts> {
    let mut m: BTreeMap<String, Counts> = BTreeMap::new();
    for p in &o.pods {
        let e = m.entry(p.revision.clone()).or_default();
        if p.deleting || p.drain_released.is_some() {
            continue;
        }
        e.active += 1;
        if p.drain_started.is_some() {
            e.draining += 1;
        } else if p.serving == Some(true) && p.containers_ready {
            e.serving += 1;
        }
        if p.containers_ready {
            e.ready += 1;
        }
    }
    m
}

/// The core: serve new pods, scale ReplicaSets, drain old pods losslessly.
/// `extra_serving` counts pods outside the Release that serve (the Deployment's, while
/// handing back).
fn move_pods(
    c: &mut Ctx,
    o: &Observed,
    dep: &DeploymentView,
    n: i32,
    wants: &BTreeMap<String, i32>,
    extra_serving: i32,
) {
    let d = c.s.drain.clone();
    let counts = counts(o);
    let quiet = d.quiet_period.as_secs_f64();
    let propagation = d.propagation_timeout.as_secs_f64();

    // 1. Drains under way: unserved → quiet → released.
    let mut closable: Vec<Closable> = Vec::new();
    for p in &o.pods {
        let Some(started) = p.drain_started else {
            continue;
        };
        if p.deleting || p.drain_released.is_some() {
            continue;
        }
        c.busy = true;
        if p.serving != Some(false) {
            c.actions.push(Action::SetServing {
                pod: p.name.clone(),
                serving: false,
            });
        }
        let elapsed = c.now - started;
        let never_served = p.ready_since.is_none() && !p.containers_ready;
        let step = drain_step(
            elapsed,
            never_served,
            QuietSignal::from_signals(p.signals.as_ref()),
            quiet,
            propagation,
        );
        let is_quiet = step == DrainStep::Quiet;
        if is_quiet || step == DrainStep::TimedOut {
            // Nothing to close: never served, or the agent holds no connection.
            let nothing_to_close = never_served
                || p.signals
                    .as_ref()
                    .is_some_and(|s| s.connections_active <= 0.0);
            closable.push(Closable {
                pod: p,
                started,
                elapsed,
                is_quiet,
                nothing_to_close,
            });
        }
    }
    // Paced close: quiet pods start closing only while the close rates of the pods that
    // are closing fit the receiving pods' connection-rate budget, so the connections
    // leave the old pods at an even pace instead of all at once.
    closable.sort_by(|a, b| {
        a.started
            .total_cmp(&b.started)
            .then(a.pod.name.cmp(&b.pod.name))
    });
    let budget = closing_budget(c, o, wants);
    let mut closing = o.pods.iter().filter(|p| still_closing(c, p)).count() as i32;
    for Closable {
        pod: p,
        elapsed,
        is_quiet,
        nothing_to_close,
        ..
    } in closable
    {
        if let Some(max) = budget
            && !nothing_to_close
        {
            if closing >= max {
                if let Some(r) = c.status.drains.iter_mut().rev().find(|r| r.pod == p.name) {
                    r.quiet_seconds.get_or_insert(round3(elapsed));
                    r.state = "Quiet".into();
                }
                c.status.message = Some(format!(
                    "paced close: {closing} pod(s) closing connections at {}/s each; {} waits (at most {max} at once: connectionRate.maxPerPod × serving new pods / drain.closeRate)",
                    c.s.drain.close_rate, p.name
                ));
                continue;
            }
            closing += 1;
        }
        c.actions.push(Action::ReleasePod {
            pod: p.name.clone(),
        });
        if let Some(r) = c.status.drains.iter_mut().rev().find(|r| r.pod == p.name) {
            r.quiet_seconds.get_or_insert(round3(elapsed));
            r.state = if is_quiet { "Closing" } else { "QuietTimeout" }.into();
        }
        c.event(
            !is_quiet,
            if is_quiet { "PodQuiet" } else { "QuietTimeout" },
            if is_quiet {
                format!("{} quiet after {:.1}s: closing its connections", p.name, elapsed)
            } else {
                format!(
                    "{} saw new connections for the whole propagation timeout ({}s): closing anyway",
                    p.name, propagation
                )
            },
        );
    }
    let released_now: BTreeSet<&str> = c
        .actions
        .iter()
        .filter_map(|a| match a {
            Action::ReleasePod { pod } => Some(pod.as_str()),
            _ => None,
        })
        .collect();
    let released_now: BTreeSet<String> = released_now.into_iter().map(str::to_string).collect();

    // 2. Serve new pods once ready and warm, no more than the revision wants.
    let warm = c.s.warmup.as_secs_f64();
    for (rev, want) in wants {
        let k = counts.get(rev).copied().unwrap_or_default();
        let mut serving = k.serving;
        let mut candidates: Vec<&PodView> = o
            .pods
            .iter()
            .filter(|p| {
                &p.revision == rev
                    && !p.deleting
                    && p.drain_started.is_none()
                    && p.drain_released.is_none()
                    && p.containers_ready
                    && p.serving != Some(true)
            })
            .collect();
        candidates.sort_by(|a, b| a.name.cmp(&b.name));
        for p in candidates {
            if serving >= *want {
                break;
            }
            let since = p.ready_since.unwrap_or(p.created);
            if c.now - since >= warm {
                c.actions.push(Action::SetServing {
                    pod: p.name.clone(),
                    serving: true,
                });
                serving += 1;
            } else {
                c.busy = true;
            }
        }
    }

    // 3. Scale ReplicaSets: grow within the surge, never below the pods to keep.
    let surge = c.s.surge(n);
    let total: i32 = counts.values().map(|k| k.active).sum::<i32>() - released_now.len() as i32;
    let mut headroom = n.saturating_add(surge).saturating_sub(total).max(0);
    for (rev, want) in wants {
        let k = counts.get(rev).copied().unwrap_or_default();
        let released_here = o
            .pods
            .iter()
            .filter(|p| &p.revision == rev && released_now.contains(&p.name))
            .count() as i32;
        let keep = k.active - released_here;
        let target = if *want > keep {
            let grow = (*want - keep).min(headroom);
            headroom -= grow;
            keep + grow
        } else {
            keep
        };
        match o.replica_sets.iter().find(|r| &r.revision == rev) {
            Some(rs) => {
                if rs.replicas != target {
                    c.actions.push(Action::ScaleReplicaSet {
                        name: rs.name.clone(),
                        replicas: target,
                    });
                }
                if target != k.active || rs.replicas != target {
                    c.busy = true;
                }
            }
            None if target > 0 && *rev == dep.revision => {
                c.actions.push(Action::CreateReplicaSet {
                    revision: rev.clone(),
                    replicas: target,
                });
                c.busy = true;
            }
            None => {}
        }
    }

    // 4. Start drains where a revision has more pods than it wants.
    let in_flight = o.pods.iter().filter(|p| p.drain_started.is_some()).count() as i32;
    let mut slots = (d.max_concurrent - in_flight).max(0);
    let mut serving_total: i32 = counts
        .values()
        .map(|k| k.serving)
        .sum::<i32>()
        .saturating_add(extra_serving);
    let throttle = receiving_rate_excess(c, o, wants);
    let aborting = c.status.canary_revision.is_none() && c.status.aborted_revision.is_some();
    let held = c.s.paused && !o.deleting && !aborting;
    let mut waiting: Option<String> = None;
    for (rev, want) in wants {
        let k = counts.get(rev).copied().unwrap_or_default();
        let mut excess = k.active - k.draining - want;
        if excess <= 0 {
            continue;
        }
        c.busy = true;
        let mut candidates: Vec<&PodView> = o
            .pods
            .iter()
            .filter(|p| {
                &p.revision == rev
                    && !p.deleting
                    && p.drain_started.is_none()
                    && p.drain_released.is_none()
            })
            .collect();
        // Pods that serve nobody go first; then the youngest (least warm caches lost).
        candidates.sort_by(|a, b| {
            let sa = a.serving == Some(true) && a.containers_ready;
            let sb = b.serving == Some(true) && b.containers_ready;
            sa.cmp(&sb)
                .then(b.created.total_cmp(&a.created))
                .then(a.name.cmp(&b.name))
        });
        for p in candidates {
            if excess <= 0 {
                break;
            }
            let serves = p.serving == Some(true) && p.containers_ready;
            if serves {
                if held {
                    waiting = Some("paused: no new drain starts".into());
                    break;
                }
                if slots <= 0 {
                    waiting = Some(format!("{in_flight} drain(s) under way"));
                    break;
                }
                if serving_total - 1 < n {
                    waiting = Some("waiting for new pods to serve before draining old ones".into());
                    break;
                }
                if let Some(msg) = &throttle {
                    waiting = Some(msg.clone());
                    break;
                }
                serving_total -= 1;
                slots -= 1;
            }
            c.actions.push(Action::StartDrain {
                pod: p.name.clone(),
            });
            c.status.drains.push(DrainRecord {
                pod: p.name.clone(),
                revision: p.revision.clone(),
                state: "Quiescing".into(),
                started_at: rfc3339(c.now),
                ..Default::default()
            });
            c.event(
                false,
                "DrainStarted",
                format!("{} (revision {}) taken out of service", p.name, p.revision),
            );
            excess -= 1;
        }
    }
    if let Some(w) = waiting {
        c.status.message = Some(w);
    }
}

/// A released pod stops counting as closing once fewer connections than this many seconds
/// of closing are left; the next one is released that early, so that the hand-over
/// (scale-down, preStop, `/drain`) leaves no gap in the pace.
const CLOSE_HANDOFF_S: f64 = 1.5;

/// A draining pod that is quiet (or timed out) and may be released.
struct Closable<'a> {
    pod: &'a PodView,
    /// When its drain started.
    started: f64,
    /// Seconds since.
    elapsed: f64,
    /// Quiet; else the propagation timeout passed.
    is_quiet: bool,
    /// Never served, or its agent holds no connection: releasing it costs no budget.
    nothing_to_close: bool,
}

/// The revision gaining share: the canary going forward, stable when rolling back or
/// settling.
fn receiving_revision(c: &Ctx, wants: &BTreeMap<String, i32>) -> Option<String> {
    let receiving = c
        .status
        .canary_revision
        .clone()
        .or_else(|| c.status.stable_revision.clone())?;
    (wants.get(&receiving).copied().unwrap_or(0) > 0).then_some(receiving)
}

/// How many pods may close their connections at once: the receiving pods together take
/// `connectionRate.maxPerPod` new connections/s each, and each closing pod sends its
/// clients over at `drain.closeRate`. At least one, so a drain always progresses. `None`
/// (no limit) without a connection-rate gate.
fn closing_budget(c: &Ctx, o: &Observed, wants: &BTreeMap<String, i32>) -> Option<i32> {
    let cr = c.s.connection_rate.as_ref()?;
    let receiving = receiving_revision(c, wants);
    let takers = o
        .pods
        .iter()
        .filter(|p| {
            Some(&p.revision) == receiving.as_ref()
                && p.serving == Some(true)
                && p.containers_ready
                && p.drain_started.is_none()
                && !p.deleting
        })
        .count()
        .max(1) as f64;
    let rate = f64::from(c.s.drain.close_rate.max(1));
    Some(((cr.max_per_pod * takers / rate).floor() as i32).max(1))
}

/// A released pod whose agent still has more than [`CLOSE_HANDOFF_S`] of connections to
/// close (or has not been seen since: it counts until it is gone, so a restart can only
/// slow the pace, never speed it up).
fn still_closing(c: &Ctx, p: &PodView) -> bool {
    if p.drain_released.is_none() && !(p.deleting && p.drain_started.is_some()) {
        return false;
    }
    match &p.signals {
        Some(s) => s.connections_active > f64::from(c.s.drain.close_rate) * CLOSE_HANDOFF_S,
        None => true,
    }
}

/// The connection-rate throttle: `Some(reason)` while a receiving pod takes new
/// connections faster than the limit.
fn receiving_rate_excess(c: &Ctx, o: &Observed, wants: &BTreeMap<String, i32>) -> Option<String> {
    let cr = c.s.connection_rate.as_ref()?;
    let receiving = receiving_revision(c, wants)?;
    o.pods
        .iter()
        .filter(|p| p.revision == receiving && p.serving == Some(true) && p.drain_started.is_none())
        .filter_map(|p| {
            let r = p.signals.as_ref()?.new_connection_rate?;
            (r > cr.max_per_pod).then(|| (p.name.clone(), r))
        })
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(pod, r)| {
            format!(
                "throttled: {pod} takes {r:.1} new connections/s (limit {})",
                cr.max_per_pod
            )
        })
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Keep drain records in step with the pods: fill in closed-connection counts, finish
/// records of pods that are gone, and re-create records lost with status.
fn record_drains(c: &mut Ctx, o: &Observed) {
    let now = c.now;
    let mut refused = Vec::new();
    for p in &o.pods {
        let Some(started) = p.drain_started else {
            continue;
        };
        let rec = match c.status.drains.iter().rposition(|r| r.pod == p.name) {
            Some(i) => &mut c.status.drains[i],
            None => {
                c.status.drains.push(DrainRecord {
                    pod: p.name.clone(),
                    revision: p.revision.clone(),
                    state: if p.drain_released.is_some() {
                        "Closing"
                    } else {
                        "Quiescing"
                    }
                    .into(),
                    started_at: rfc3339(started),
                    quiet_seconds: p.drain_released.map(|r| round3(r - started)),
                    ..Default::default()
                });
                c.status.drains.last_mut().expect("just pushed")
            }
        };
        if rec.quiet_seconds.is_none()
            && let Some(released) = p.drain_released
        {
            rec.quiet_seconds = Some(round3(released - started));
        }
        if let Some(sig) = &p.signals {
            let closed = sig.connections_closed as i64;
            rec.connections_closed = Some(rec.connections_closed.unwrap_or(0).max(closed));
        }
        // A released pod's preStop is the kubelet's `/drain`; an agent that refused one
        // (wrong or missing token: a template the operator did not inject, or a token
        // changed under it) lets the pod die without its paced close, which nothing else
        // would show. Told once per pod: the record keeps the state.
        let released = p.drain_released.is_some() || p.deleting;
        if released
            && rec.duration_seconds.is_none()
            && rec.state != DRAIN_REFUSED
            && p.signals.as_ref().is_some_and(|s| s.drain_refused > 0.0)
        {
            rec.state = DRAIN_REFUSED.into();
            refused.push(rec.clone());
        }
    }
    for r in refused {
        c.event(
            true,
            "DrainRefused",
            format!(
                "{}: the kubelet's preStop /drain was refused by the agent (wrong or missing drain token): the pod terminates without a paced close",
                r.pod
            ),
        );
        c.refused.push(r);
    }
    let present: BTreeSet<&str> = o.pods.iter().map(|p| p.name.as_str()).collect();
    let mut events = Vec::new();
    for r in c.status.drains.iter_mut() {
        if r.duration_seconds.is_none() && !present.contains(r.pod.as_str()) {
            let started = parse_rfc3339(&r.started_at).unwrap_or(now);
            r.duration_seconds = Some(round3(now - started));
            // A refused or timed-out drain keeps saying so.
            if r.state != "QuietTimeout" && r.state != DRAIN_REFUSED {
                r.state = "Completed".into();
            }
            events.push(r.clone());
        }
    }
    for r in events {
        c.event(
            r.state == "QuietTimeout" || r.state == DRAIN_REFUSED,
            "PodDrained",
            format!(
                "{} drained in {:.1}s (quiet after {:.1}s, {} connections closed)",
                r.pod,
                r.duration_seconds.unwrap_or(0.0),
                r.quiet_seconds.unwrap_or(0.0),
                r.connections_closed.unwrap_or(0)
            ),
        );
        c.finished.push(r);
    }
    // Keep every unfinished record and the newest finished ones.
    while c.status.drains.len() > MAX_DRAIN_RECORDS {
        match c
            .status
            .drains
            .iter()
            .position(|r| r.duration_seconds.is_some())
        {
            Some(i) => {
                c.status.drains.remove(i);
            }
            None => break,
        }
    }
}

fn evaluate_gates(c: &mut Ctx, o: &Observed) {
    let canary = c.status.canary_revision.clone().unwrap_or_default();
    let stable = c.status.stable_revision.clone().unwrap_or_default();
    let canary_pods: Vec<&PodView> = o
        .pods
        .iter()
        .filter(|p| p.revision == canary && !p.deleting && p.drain_started.is_none())
        .collect();
    if canary_pods.is_empty() {
        return;
    }
    let drains_in_flight = o.pods.iter().any(|p| p.drain_started.is_some());
    let mut results: Vec<(Evaluation, i32, Duration)> = Vec::new();
    if let Some(h) = c.s.health.clone()
        && due(c, "health", h.interval)
    {
        let pods: Vec<PodHealth> = canary_pods
            .iter()
            .map(|p| PodHealth {
                ready: p.containers_ready,
                age_seconds: c.now - p.created,
                restarts: p.restarts,
                crash_looping: p.crash_looping,
            })
            .collect();
        results.push((evaluate_health(&h, &pods), h.failure_limit, h.interval));
    }
    if let Some(cr) = c.s.connection_rate.clone()
        && due(c, "connectionRate", cr.interval)
    {
        let rates: Vec<Option<f64>> = canary_pods
            .iter()
            .filter(|p| p.serving == Some(true))
            .map(|p| p.signals.as_ref().and_then(|s| s.new_connection_rate))
            .collect();
        let mut e = evaluate_connection_rate(&cr, &rates);
        if drains_in_flight && let Verdict::Failed(m) = &e.verdict {
            // Reconnects from a drain are expected; the throttle handles them.
            e.verdict = Verdict::Inconclusive(format!("{m}, while a drain runs (throttling)"));
        }
        results.push((e, cr.failure_limit, cr.interval));
    }
    if let Some(cmp) = c.s.comparison.clone()
        && due(c, "comparison", cmp.interval)
    {
        let empty = RevisionWindow::default();
        let cw = o.windows.get(&canary).unwrap_or(&empty);
        let sw = o.windows.get(&stable).unwrap_or(&empty);
        results.push((
            evaluate_comparison(&cmp, cw, sw),
            cmp.failure_limit,
            cmp.interval,
        ));
    }
    for (e, limit, _) in results {
        let now = rfc3339(c.now);
        let idx = match c.status.gates.iter().position(|g| g.name == e.gate) {
            Some(i) => i,
            None => {
                c.status.gates.push(GateResult {
                    name: e.gate.into(),
                    ..Default::default()
                });
                c.status.gates.len() - 1
            }
        };
        let g = &mut c.status.gates[idx];
        g.last_evaluated = now;
        g.values = e.values.clone();
        let mut fail = None;
        match &e.verdict {
            Verdict::Passed => {
                g.result = "Passed".into();
                g.consecutive_failures = 0;
                g.message = None;
            }
            Verdict::Inconclusive(m) => {
                g.result = "Inconclusive".into();
                g.message = Some(m.clone());
            }
            Verdict::Failed(m) => {
                g.result = "Failed".into();
                g.consecutive_failures = g.consecutive_failures.max(0).saturating_add(1);
                g.message = Some(m.clone());
                fail = Some((m.clone(), g.consecutive_failures));
            }
        }
        c.evaluations.push(e.clone());
        if let Some((m, count)) = fail {
            if count >= limit {
                abort(
                    c,
                    "GateFailed",
                    Some(e.gate),
                    format!("gate {} failed {count} time(s) in a row: {m}", e.gate),
                    e.values.clone(),
                );
                return;
            }
            c.event(
                true,
                "GateFailing",
                format!("gate {} failed ({count}/{limit}): {m}", e.gate),
            );
        }
    }
}

fn due(c: &Ctx, gate: &str, interval: Duration) -> bool {
    match c.status.gates.iter().find(|g| g.name == gate) {
        None => true,
        Some(g) => parse_rfc3339(&g.last_evaluated)
            .is_none_or(|t| c.now - t >= interval.as_secs_f64() - 0.05),
    }
}

fn check_deadline(c: &mut Ctx) {
    let cur = c.status.current_step.unwrap_or(0);
    let waiting_step = matches!(
        step_at(c.s, cur),
        Some(StepKind::Pause(_) | StepKind::Gate(_))
    );
    if waiting_step || c.s.paused {
        return;
    }
    let Some(started) = c.status.step_started_at.as_deref().and_then(parse_rfc3339) else {
        return;
    };
    let limit = c.s.progress_deadline.as_secs_f64();
    if c.now - started > limit {
        abort(
            c,
            "ProgressDeadlineExceeded",
            None,
            format!(
                "step {} did not finish within the progress deadline ({limit}s)",
                cur + 1
            ),
            BTreeMap::new(),
        );
    }
}

/// Move through the steps once the current one is done.
fn advance_steps(c: &mut Ctx, o: &Observed, n: i32, wants: &BTreeMap<String, i32>) {
    let canary = c.status.canary_revision.clone().unwrap_or_default();
    let stable = c.status.stable_revision.clone().unwrap_or_default();
    let k = counts(o);
    let kc = k.get(&canary).copied().unwrap_or_default();
    let ks = k.get(&stable).copied().unwrap_or_default();
    let want_c = wants.get(&canary).copied().unwrap_or(0);
    let want_s = wants.get(&stable).copied().unwrap_or(0);
    let converged = kc.active == want_c
        && kc.serving >= want_c
        && ks.active - ks.draining <= want_s
        && ks.active == want_s;
    let steps = step_count(c.s);
    let cur = c.status.current_step.unwrap_or(0).clamp(0, steps);
    let started = c
        .status
        .step_started_at
        .as_deref()
        .and_then(parse_rfc3339)
        .unwrap_or(c.now);
    let elapsed = c.now - started;
    c.busy = true;

    if cur >= steps {
        // Everything on the canary: once no other pod is left, it becomes stable.
        let others = o.pods.iter().any(|p| p.revision != canary);
        if converged && !others {
            c.status.stable_revision = Some(canary.clone());
            c.status.canary_revision = None;
            c.status.current_step = None;
            c.status.step_started_at = None;
            c.status.phase = Some(Phase::Completed);
            c.status.message = Some(format!("revision {canary} is stable on {n} pods"));
            c.event(
                false,
                "ReleaseCompleted",
                format!("revision {canary} is stable"),
            );
        } else {
            c.status.phase = Some(Phase::Progressing);
            if !converged || c.status.message.is_none() {
                c.status
                    .message
                    .get_or_insert_with(|| "moving all pods to the new revision".into());
            }
        }
        return;
    }
    let Some(step) = step_at(c.s, cur) else {
        return;
    };
    let paused = c.s.paused;
    let mut next = false;
    let mut phase = Phase::Progressing;
    let mut msg = None;
    match step {
        StepKind::SetWeight(w) => {
            if converged && !paused {
                next = true;
            } else {
                msg = Some(format!(
                    "setting weight {w}%: {}/{want_c} new pods serving",
                    kc.serving
                ));
            }
        }
        StepKind::Pause(None) => {
            phase = Phase::Paused;
            msg = Some("paused until promoted (kubectl sluice promote)".into());
        }
        StepKind::Pause(Some(d)) => {
            if elapsed >= d.as_secs_f64() && !paused {
                next = true;
            } else {
                phase = Phase::Paused;
                msg = Some(format!(
                    "paused for {:.0}s more",
                    (d.as_secs_f64() - elapsed).max(0.0)
                ));
            }
        }
        StepKind::Gate(d) => {
            if elapsed >= d.as_secs_f64() && !paused {
                next = true;
            } else {
                msg = Some(format!(
                    "holding while gates stay green, {:.0}s more",
                    (d.as_secs_f64() - elapsed).max(0.0)
                ));
            }
        }
    }
    if paused {
        phase = Phase::Paused;
        msg = Some("paused (spec.paused)".into());
    }
    if next {
        c.status.current_step = Some(cur + 1);
        c.status.step_started_at = Some(rfc3339(c.now));
        let what = if cur + 1 >= steps {
            "all steps done: moving to 100%".to_string()
        } else {
            format!("step {}/{steps} started", cur + 2)
        };
        c.event(
            false,
            "StepCompleted",
            format!("step {}/{steps} done; {what}", cur + 1),
        );
    }
    c.status.phase = Some(phase);
    if let Some(m) = msg
        && (c.status.message.is_none() || phase == Phase::Paused || next)
    {
        c.status.message = Some(m);
    }
}

/// No canary: bring stable to `n` serving pods, finish takeover, clean up.
fn settle(c: &mut Ctx, o: &Observed, dep: &DeploymentView, n: i32, wants: &BTreeMap<String, i32>) {
    let stable = c.status.stable_revision.clone().unwrap_or_default();
    let k = counts(o);
    let ks = k.get(&stable).copied().unwrap_or_default();
    let others = o.pods.iter().any(|p| p.revision != stable);
    let serving_n = ks.serving >= n && ks.active == n;
    // Takeover: the Deployment goes to zero once stable serves in full.
    if dep.spec_replicas > 0 && serving_n {
        c.actions.push(Action::ScaleDeployment(0));
        c.event(
            false,
            "DeploymentScaledDown",
            format!("the Release serves {n} pods: Deployment scaled to 0"),
        );
    }
    for rs in &o.replica_sets {
        if wants.get(&rs.revision).copied().unwrap_or(0) == 0
            && rs.replicas == 0
            && !o.pods.iter().any(|p| p.revision == rs.revision)
        {
            c.actions.push(Action::DeleteReplicaSet {
                name: rs.name.clone(),
            });
        }
    }
    let aborted = c.status.aborted_revision.is_some();
    if aborted {
        c.status.phase = Some(Phase::Aborted);
        if !serving_n || others {
            c.busy = true;
            c.status
                .message
                .get_or_insert_with(|| "rolling back: traffic returns to stable".into());
        } else {
            let why = c
                .status
                .abort
                .as_ref()
                .map(|a| a.message.clone())
                .unwrap_or_default();
            c.status.message = Some(format!("rolled back to {stable}: {why}"));
        }
    } else if serving_n && !others && dep.spec_replicas == 0 {
        c.status.phase = Some(Phase::Completed);
        c.status.message = Some(format!("revision {stable} is stable on {n} pods"));
    } else {
        c.busy = true;
        c.status.phase = Some(Phase::Progressing);
        c.status
            .message
            .get_or_insert_with(|| format!("bringing revision {stable} to {n} serving pods"));
    }
}

/// The Release is being deleted: the Deployment takes the pods back first, then the
/// Release's pods drain, then the finalizer goes.
fn hand_back(c: &mut Ctx, o: &Observed, dep: &DeploymentView, n: i32) {
    c.busy = true;
    if dep.spec_replicas != n {
        c.actions.push(Action::ScaleDeployment(n));
    }
    let any_pods = !o.pods.is_empty();
    if !any_pods {
        for rs in &o.replica_sets {
            c.actions.push(Action::DeleteReplicaSet {
                name: rs.name.clone(),
            });
        }
        if o.has_finalizer {
            if dep.claim == Claim::Ours {
                c.actions.push(Action::ReleaseClaim);
            }
            c.actions.push(Action::RemoveFinalizer);
        }
        c.status.message = Some("handed back to the Deployment".into());
        return;
    }
    c.status.phase = Some(Phase::Progressing);
    if dep.available_replicas < n {
        // Keep everything serving until the Deployment's pods are available.
        let mut wants: BTreeMap<String, i32> = BTreeMap::new();
        for (rev, k) in counts(o) {
            wants.insert(rev, k.active - k.draining);
        }
        move_pods(c, o, dep, n, &wants, 0);
        c.status.message = Some(format!(
            "handing back: waiting for the Deployment ({}/{n} available)",
            dep.available_replicas
        ));
        return;
    }
    let wants: BTreeMap<String, i32> = o
        .replica_sets
        .iter()
        .map(|r| (r.revision.clone(), 0))
        .chain(o.pods.iter().map(|p| (p.revision.clone(), 0)))
        .collect();
    move_pods(c, o, dep, n, &wants, dep.available_replicas);
    c.status.message = Some("handing back: draining the Release's pods".into());
}

fn revision_status(c: &mut Ctx, o: &Observed, wants: &BTreeMap<String, i32>) {
    let k = counts(o);
    let stable = c.status.stable_revision.clone();
    let canary = c.status.canary_revision.clone();
    c.status.revisions = wants
        .iter()
        .map(|(rev, want)| {
            let x = k.get(rev).copied().unwrap_or_default();
            RevisionStatus {
                revision: rev.clone(),
                role: if Some(rev) == stable.as_ref() {
                    "stable"
                } else if Some(rev) == canary.as_ref() {
                    "canary"
                } else {
                    "old"
                }
                .into(),
                desired: *want,
                current: x.active,
                ready: x.ready,
                serving: x.serving,
                draining: o
                    .pods
                    .iter()
                    .filter(|p| &p.revision == rev && p.drain_started.is_some())
                    .count() as i32,
            }
        })
        .collect();
    let n = c.status.replicas.unwrap_or(1).max(1);
    c.status.canary_weight = Some(match &canary {
        Some(cr) => {
            let serving = k.get(cr).map(|x| x.serving).unwrap_or(0);
            let total: i32 = k.values().map(|x| x.serving).sum();
            if total > 0 {
                ((serving as i64 * 100) / total.max(n) as i64) as i32
            } else {
                0
            }
        }
        None => 0,
    });
}

fn finish(mut c: Ctx, o: &Observed) -> Plan {
    let g = o.generation;
    let now = c.now;
    let steps = step_count(c.s);
    c.status.step_display = Some(match c.status.current_step {
        Some(s) if c.status.canary_revision.is_some() => {
            format!("{}/{steps}", s.saturating_add(1).min(steps))
        }
        _ => format!("{steps}/{steps}"),
    });
    let phase = c.status.phase.unwrap_or_default();
    c.status.phase = Some(phase);
    let msg = c.status.message.clone().unwrap_or_default();
    let st = &mut c.status;
    match phase {
        Phase::Completed => {
            set_condition(st, "Ready", true, "Completed", &msg, g, now);
            set_condition(st, "Progressing", false, "Completed", &msg, g, now);
            set_condition(st, "Degraded", false, "Completed", &msg, g, now);
        }
        Phase::Progressing | Phase::Paused => {
            let reason = if phase == Phase::Paused {
                "Paused"
            } else {
                "Progressing"
            };
            set_condition(st, "Ready", false, reason, &msg, g, now);
            set_condition(st, "Progressing", true, reason, &msg, g, now);
            set_condition(st, "Degraded", false, reason, &msg, g, now);
        }
        Phase::Aborted => {
            let reason = st
                .abort
                .as_ref()
                .map(|a| a.reason.clone())
                .unwrap_or("Aborted".into());
            set_condition(st, "Ready", false, &reason, &msg, g, now);
            set_condition(st, "Progressing", c.busy, &reason, &msg, g, now);
            set_condition(st, "Degraded", true, &reason, &msg, g, now);
        }
        Phase::Failed => {
            set_condition(st, "Ready", false, "Failed", &msg, g, now);
            set_condition(st, "Progressing", false, "Failed", &msg, g, now);
            set_condition(st, "Degraded", true, "Failed", &msg, g, now);
        }
    }
    let requeue_after = if c.busy {
        Duration::from_millis(500)
    } else {
        Duration::from_secs(30)
    };
    Plan {
        actions: c.actions,
        status: c.status,
        evaluations: c.evaluations,
        finished_drains: c.finished,
        refused_drains: c.refused,
        requeue_after,
    }
}

pub(crate) fn set_condition(
    st: &mut ReleaseStatus,
    type_: &str,
    value: bool,
    reason: &str,
    message: &str,
    generation: i64,
    now: f64,
) {
    let status = if value { "True" } else { "False" };
    let last = st
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .filter(|c| c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| rfc3339(now));
    st.conditions.retain(|c| c.type_ != type_);
    st.conditions.push(ReleaseCondition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message: message.into(),
        last_transition_time: last,
        observed_generation: Some(generation),
    });
    st.conditions.sort_by(|a, b| a.type_.cmp(&b.type_));
}
