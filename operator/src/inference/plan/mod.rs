//! The pure planner of the InferenceSet controller: observed pods (grouped into gangs) and
//! the spec → actions and status. No I/O, no clock: `now` is a parameter. Everything a
//! restart needs is on the pods (labels, annotations, conditions); the planner keeps no
//! memory between rounds.
//!
//! A *slot* is a replica index `0..replicas`; a *gang* is one instance of a slot (all its
//! pods, one revision). A slot normally has one gang; during a rollout it may have an old
//! and a new one. Gang states, in order: `Pending` (waiting for the binder) → `Starting`
//! (bound, model loading) → `Warm` (warm-up gate passed) → `Serving` (readiness gate
//! `sluice.dev/serving` True) → `Draining` (unserved until quiet: [`crate::pod::drain`]) → deleted.
//! A gang that loses a pod or a node is `Lost`: all its pods go and the slot is placed
//! again, whole.
//!
//! - [`settings`]: the spec, validated, with defaults;
//! - [`model`]: the observed pods, gangs and their states, the actions;
//! - this file: the planning round (scale, node loss, slot-swap rollouts, drains);
//! - [`status`]: the status and conditions a round writes.

mod model;
mod settings;
mod status;

use std::collections::BTreeMap;
use std::time::Duration;

pub use model::{Action, Gang, GangState, Observed, Plan, PodView, gang_name, gangs, node_lost};
pub use settings::Settings;
pub use status::set_condition;

use model::Ctx;
use status::fill_status;

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
            let pods: Vec<String> = g
                .pods
                .iter()
                .filter(|p| p.serving != Some(true))
                .map(|p| p.name.clone())
                .collect();
            // Marked serving already: waiting for the kubelet to turn `Ready`.
            if !pods.is_empty() {
                c.event(
                    false,
                    "ReplicaServing",
                    format!("replica {} ({}) is warm: entering service", g.slot, g.id),
                );
                c.actions.push(Action::Serve { pods });
            }
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
/// [`crate::pod::drain`]); then all its pods are deleted together and their agents close the
/// remaining connections paced in the preStop hook.
fn drain_step(c: &mut Ctx, s: &Settings, g: &Gang, now: f64) {
    use crate::pod::drain::{DrainStep, QuietSignal};
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
        match crate::pod::drain::drain_step(
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
