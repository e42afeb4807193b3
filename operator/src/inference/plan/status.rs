//! The InferenceSet's status from a planning round: replicas, counts and conditions.

use crate::inference::crd::{InferenceSetStatus, ReplicaStatus};
use crate::pod::condition::Condition;
use crate::pod::time::rfc3339;

use super::model::{Ctx, Gang, GangState, Observed, PodView};
use super::settings::Settings;

pub(super) fn fill_status(
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
    status.selector = Some(format!("{}={}", crate::inference::crd::SET_LABEL, o.name));
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
    let cond = Condition {
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
            *c = Condition {
                last_transition_time: t,
                ..cond
            };
        }
        None => status.conditions.push(cond),
    }
}
