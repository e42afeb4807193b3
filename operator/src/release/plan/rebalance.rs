//! Replica-ratio steps whose request split lags their pods (`spec.rebalance`).
//!
//! Keep-alive clients stay on the connections they have: after a step the new pods get
//! only new connections, and the request split lags the pods. Once the step's pods serve,
//! the canary's share of the requests (the agents' counts over the window) is compared
//! with its share of the serving pods; while it is off by more than the tolerance, the
//! side with too much is asked to let a share of its connections reconnect. A client that
//! reconnects lands on any serving pod (the load balancer picks anew), so the share asked
//! is the excess divided by the chance of landing on the other side.

use crate::pod::time::{parse_rfc3339, rfc3339};
use crate::release::crd::RebalanceStatus;

use super::model::{Action, Ctx, Observed};
use super::weights::Counts;

/// Fewer requests than this over the window say nothing about the split.
pub const MIN_REQUESTS: f64 = 50.0;
/// The most of a pod's connections one round asks to reconnect: a measurement off by
/// chance (a new pod's first seconds) must not move everything at once.
const MAX_SHARE: f64 = 0.5;

/// Whether the step's request split follows its pods; `Err`: what the step waits for
/// (this round may have asked agents to rebalance).
pub(super) fn split_follows_pods(
    c: &mut Ctx,
    o: &Observed,
    step: i32,
    canary: &str,
    stable: &str,
    kc: Counts,
    ks: Counts,
) -> Result<(), String> {
    let Some(rb) = c.s.rebalance.clone() else {
        return Ok(());
    };
    if c.s.routing.is_some() || kc.serving + ks.serving == 0 {
        return Ok(());
    }
    let mut st = match c.status.rebalance.take() {
        Some(st) if st.step == step => st,
        _ => RebalanceStatus {
            step,
            ..Default::default()
        },
    };
    let target = f64::from(kc.serving) * 100.0 / f64::from(kc.serving + ks.serving);
    st.target_percent = Some((target * 10.0).round() / 10.0);
    let cr = o.split.get(canary).copied().unwrap_or(0.0);
    let sr = o.split.get(stable).copied().unwrap_or(0.0);
    let window = rb.window.as_secs_f64();
    let since = |at: Option<&str>| {
        at.and_then(parse_rfc3339)
            .map_or(f64::INFINITY, |t| c.now - t)
    };
    // The agents ask at their close rate (and its jitter): the clients of the last round
    // have all moved only after that; then a whole window of the new split.
    let asking = st.asking_seconds.unwrap_or(0.0);
    let settled = since(st.last_at.as_deref()) >= window + asking
        && since(c.status.step_started_at.as_deref()) >= window;
    // A pod still draining moves its clients when it closes: measure after.
    let draining = o.pods.iter().any(|p| p.drain_started.is_some());
    let result = if draining {
        Err("waiting for the drains to end before measuring the request split".into())
    } else if cr + sr < MIN_REQUESTS {
        st.measured_percent = None;
        // No traffic to speak of: nothing to follow.
        Ok(())
    } else {
        let measured = cr * 100.0 / (cr + sr);
        st.measured_percent = Some((measured * 10.0).round() / 10.0);
        if (measured - target).abs() <= rb.tolerance {
            Ok(())
        } else if !settled {
            Err(format!(
                "the canary served {measured:.1}% of the requests, its pods are {target:.1}%: measuring"
            ))
        } else if st.rounds >= rb.max_rounds {
            if st.rounds == rb.max_rounds {
                st.rounds += 1;
                c.event(
                    true,
                    "RebalanceGaveUp",
                    format!(
                        "after {} rounds the canary serves {measured:.1}% of the requests, its pods are {target:.1}%: going on",
                        rb.max_rounds
                    ),
                );
            }
            Ok(())
        } else {
            // The side serving more than its pods' share sheds; a reconnect lands on the
            // other side with the other side's share of the pods.
            let (over, over_share, over_target, under_pods) = if measured < target {
                (stable, 100.0 - measured, 100.0 - target, kc.serving)
            } else {
                (canary, measured, target, ks.serving)
            };
            let land = f64::from(under_pods) / f64::from(kc.serving + ks.serving);
            let share =
                ((over_share - over_target) / over_share / land.max(0.01)).clamp(0.0, MAX_SHARE);
            let mut asked = 0i64;
            let mut most = 0i64;
            for p in &o.pods {
                let serves = p.serving == Some(true) && p.containers_ready;
                if p.revision != over || !serves || p.drain_started.is_some() || p.deleting {
                    continue;
                }
                let active = p.signals.as_ref().map_or(0.0, |s| s.connections_active);
                let n = (active * share).ceil() as i64;
                if n > 0 {
                    c.actions.push(Action::RebalanceConnections {
                        pod: p.name.clone(),
                        connections: n,
                    });
                    asked += n;
                    most = most.max(n);
                }
            }
            st.rounds += 1;
            st.last_at = Some(rfc3339(c.now));
            st.connections_asked += asked;
            // The agent's pacer stretches gaps by up to half (its jitter).
            let rate = f64::from(c.s.drain.close_rate.max(1));
            st.asking_seconds = Some((most as f64 / rate * 1.5 * 10.0).ceil() / 10.0);
            c.event(
                false,
                "Rebalancing",
                format!(
                    "the canary served {measured:.1}% of the requests, its pods are {target:.1}%: asked {asked} connection(s) of revision {over} to reconnect (round {}/{})",
                    st.rounds, rb.max_rounds
                ),
            );
            Err(format!(
                "the canary served {measured:.1}% of the requests, its pods are {target:.1}%: rebalancing (round {}/{})",
                st.rounds, rb.max_rounds
            ))
        }
    };
    c.status.rebalance = Some(st);
    result
}
