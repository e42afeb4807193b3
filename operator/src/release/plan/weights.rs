//! Step arithmetic: the steps, each revision's wanted pods at a weight, and the pods
//! counted per revision.

use std::collections::BTreeMap;

use crate::release::crd::HeaderMatch;
use crate::release::settings::{Settings, StepKind};

use super::model::{Ctx, Observed};

/// The number of steps, as the status counts them.
pub(super) fn step_count(s: &Settings) -> i32 {
    i32::try_from(s.steps.len()).unwrap_or(i32::MAX)
}

/// Step `i`; `None` past the last one (and before the first).
pub(super) fn step_at(s: &Settings, i: i32) -> Option<&StepKind> {
    usize::try_from(i).ok().and_then(|i| s.steps.get(i))
}

pub(super) fn step_weight(s: &Settings, step: Option<i32>) -> i32 {
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

/// The header route in force at `step`: the last `setHeaderRoute` up to it (none past
/// the last step, where the canary takes everything).
pub(super) fn step_header_route(s: &Settings, step: Option<i32>) -> &[HeaderMatch] {
    let Some(step) = step.and_then(|x| usize::try_from(x).ok()) else {
        return &[];
    };
    if step >= s.steps.len() {
        return &[];
    }
    s.steps[..=step]
        .iter()
        .filter_map(|k| match k {
            StepKind::HeaderRoute(h) => Some(h.as_slice()),
            _ => None,
        })
        .next_back()
        .unwrap_or(&[])
}

pub(super) fn pods_for(n: i32, weight: i32) -> i32 {
    ((n as i64 * weight as i64 + 99) / 100) as i32
}

/// Pods each revision should have at the end of the current step.
pub(super) fn wants(c: &Ctx, o: &Observed, n: i32) -> BTreeMap<String, i32> {
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
            let mut cw = pods_for(n, w);
            // Requests matching a header route need a canary pod whatever the weight.
            if !step_header_route(c.s, c.status.current_step).is_empty() {
                cw = cw.max(1);
            }
            wants.insert(canary.clone(), cw);
            // Routes split by weight, not by pods: each side keeps the pods its own share
            // needs (together at most one above `n`, within any surge).
            let sw = if c.s.routing.is_some() {
                pods_for(n, 100 - w)
            } else {
                n - cw
            };
            wants.insert(stable, sw);
        }
        None => {
            wants.insert(stable, n);
        }
    }
    wants
}

#[derive(Default, Clone, Copy)]
pub(super) struct Counts {
    /// Not deleting and not released: pods the ReplicaSet should keep.
    pub(super) active: i32,
    /// Active pods already draining.
    pub(super) draining: i32,
    /// Active, not draining, serving.
    pub(super) serving: i32,
    /// Serving pods whose `Ready` condition says so too: in the Service's endpoints.
    pub(super) in_endpoints: i32,
    pub(super) ready: i32,
}

pub(super) fn counts(o: &Observed) -> BTreeMap<String, Counts> {
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
            if p.ready {
                e.in_endpoints += 1;
            }
        }
        if p.containers_ready {
            e.ready += 1;
        }
    }
    m
}
