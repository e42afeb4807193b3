//! Moving pods between revisions: drains started, quiet pods released at the receiving
//! side's pace, and the drain records kept in status.

use std::collections::{BTreeMap, BTreeSet};

use crate::pod::agent_spec::AgentMode;
use crate::pod::drain::{DrainStep, QuietSignal, drain_step};
use crate::pod::time::{parse_rfc3339, rfc3339};
use crate::release::crd::DrainRecord;

use super::model::{
    Action, Ctx, DRAIN_REFUSED, DeploymentView, MAX_DRAIN_RECORDS, Observed, PodView,
};
use super::weights::counts;

/// The core: serve new pods, scale ReplicaSets, drain old pods losslessly.
/// `extra_serving` counts pods outside the Release that serve (the Deployment's, while
/// handing back).
pub(super) fn move_pods(
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
            load_balancer_quiet(o, p, started),
            quiet,
            propagation,
        );
        if matches!(step, DrainStep::Wait(_))
            && let Some(connections) = probe(c, p)
        {
            c.actions.push(Action::RebalanceConnections {
                pod: p.name.clone(),
                connections,
            });
        }
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

    // 3. Scale ReplicaSets: grow within the surge, never below the pods to keep. Like a
    // Deployment's terminating pods, pods whose drain has started (unserved, closing)
    // do not count against the surge: new pods then start a few at a time, as soon as
    // the ones before them serve, while older pods drain, so the node starts and stops
    // pods at the pace of a rolling update instead of all at once.
    let surge = c.s.surge(n);
    let total: i32 = counts.values().map(|k| k.active - k.draining).sum();
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
    // Only pods the EndpointSlices already publish as ready count: a new pod's `Ready`
    // follows its serving condition once the kubelet writes it, and a load balancer
    // that syncs in between would otherwise find fewer pods than `replicas`, or none.
    let mut serving_total: i32 = counts
        .values()
        .map(|k| k.in_endpoints)
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
        let mut serving_of_rev = k.serving;
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
                    waiting = Some(
                        "waiting for new pods to serve (Ready, in the Service's endpoints) before draining old ones"
                            .into(),
                    );
                    break;
                }
                if let Some(msg) = &throttle {
                    waiting = Some(msg.clone());
                    break;
                }
                if let Some(floor) = super::routing::serving_floor(c, o, n, rev, serving_of_rev)
                    && serving_of_rev - 1 < floor
                {
                    waiting = Some(format!(
                        "the routes still send revision {rev} traffic for {floor} pod(s): waiting for the weight to move before draining"
                    ));
                    break;
                }
                serving_total -= 1;
                serving_of_rev -= 1;
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
pub(super) const CLOSE_HANDOFF_S: f64 = 1.5;

/// A draining pod that is quiet (or timed out) and may be released.
pub(super) struct Closable<'a> {
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
pub(super) fn receiving_revision(c: &Ctx, wants: &BTreeMap<String, i32>) -> Option<String> {
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
pub(super) fn closing_budget(c: &Ctx, o: &Observed, wants: &BTreeMap<String, i32>) -> Option<i32> {
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
pub(super) fn still_closing(c: &Ctx, p: &PodView) -> bool {
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
pub(super) fn receiving_rate_excess(
    c: &Ctx,
    o: &Observed,
    wants: &BTreeMap<String, i32>,
) -> Option<String> {
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

pub(super) fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Keep drain records in step with the pods: fill in closed-connection counts, finish
/// records of pods that are gone, and re-create records lost with status.
pub(super) fn record_drains(c: &mut Ctx, o: &Observed) {
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

/// How often an unserved pod that is not quiet yet is probed (see [`probe`]).
const PROBE_INTERVAL: f64 = 0.5;
/// The most connections one probe asks for (a round that comes late catches up).
const MAX_PROBE_CONNECTIONS: i64 = 4;

/// How many connections to probe the load balancer with through this unserved pod now:
/// its agent lets them reconnect. Keep-alive clients open no new connections, so without
/// probes a load balancer still sending to the pod goes unseen until the paced close, when
/// it is too late to wait for it. A client told to leave reconnects through the load
/// balancer; while its view is older than the unserve, some probes land on unserved pods
/// again and the quiet period starts over. The agent closes each at an idle moment, like
/// every close of the drain: a probe costs one reconnect. One connection per
/// [`PROBE_INTERVAL`] whatever the rounds' pace.
fn probe(c: &Ctx, p: &PodView) -> Option<i64> {
    let active = p.signals.as_ref()?.connections_active;
    if c.s.agent.mode != AgentMode::Proxy
        || p.ip.is_none()
        || p.drain_token.is_none()
        || active < 1.0
    {
        return None;
    }
    let due = match p.asked_at {
        None => 1,
        Some(t) => ((c.now - t) / PROBE_INTERVAL).floor() as i64,
    };
    (due >= 1).then(|| due.min(MAX_PROBE_CONNECTIONS).min(active as i64))
}

/// The pod's quiet signal with the whole Release's evidence (one load balancer, one view).
/// A new connection at an unserved pod says the load balancer's view is older than that
/// pod's unserve: for a pod unserved no later, older than its unserve too; for one
/// unserved `d` seconds later, it says as much of this pod's unserve `d` seconds earlier
/// (as if the lag were the same for both). So a drain counts another's new connection
/// `d` seconds early, and probes of every draining pod speak for each.
fn load_balancer_quiet(o: &Observed, p: &PodView, started: f64) -> QuietSignal {
    let QuietSignal::QuietFor(own) = QuietSignal::from_signals(p.signals.as_ref()) else {
        return QuietSignal::from_signals(p.signals.as_ref());
    };
    let others = o.pods.iter().filter(|q| q.name != p.name).filter_map(|q| {
        let later_by = (q.drain_started? - started).max(0.0);
        Some(q.signals.as_ref()?.quiet_seconds? + later_by)
    });
    QuietSignal::QuietFor(others.fold(own, f64::min))
}
