//! The canary's gates and its progress deadline.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::release::crd::GateResult;
use crate::release::gates::{
    Evaluation, PodHealth, RevisionWindow, Verdict, evaluate_comparison, evaluate_connection_rate,
    evaluate_health,
};
use crate::release::settings::StepKind;

use super::model::{Ctx, Observed, PodView};
use super::takeover::abort;
use super::weights::step_at;
use crate::pod::time::{parse_rfc3339, rfc3339};

pub(super) fn evaluate_gates(c: &mut Ctx, o: &Observed) {
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

pub(super) fn due(c: &Ctx, gate: &str, interval: Duration) -> bool {
    match c.status.gates.iter().find(|g| g.name == gate) {
        None => true,
        Some(g) => parse_rfc3339(&g.last_evaluated)
            .is_none_or(|t| c.now - t >= interval.as_secs_f64() - 0.05),
    }
}

pub(super) fn check_deadline(c: &mut Ctx) {
    let cur = c.status.current_step.unwrap_or(0);
    let waiting_step = matches!(
        step_at(c.s, cur),
        Some(StepKind::Pause(_) | StepKind::Gate(_))
    );
    // A step held by its analysis has its pods in place: the deadline is for getting there.
    if waiting_step || c.s.paused || super::analysis::step_under_analysis(c) {
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
