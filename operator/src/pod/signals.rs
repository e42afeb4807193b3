//! What an agent's samples say about its pod (pure): the signals the drain decision
//! reads (time since the last new connection, the new-connection rate) and the drain's
//! own figures (connections closed, `/drain` refusals).
//!
//! The agent exposes OpenMetrics text on its admin port; the controllers scrape it and
//! keep a short history of samples per pod in memory (losing it only delays a decision
//! until fresh samples arrive, it never makes one early).

// The agent's sample and its parser are the operator↔agent contract (`sluice-contract`),
// checked against the agent's real output in the agent's tests.
pub use sluice_contract::metrics::{AgentSample, parse_agent_metrics};

/// Counter increase between two samples; a counter that went down means the agent
/// restarted, and the new value is the increase since then.
pub(crate) fn increase(old: f64, new: f64) -> f64 {
    if new >= old { new - old } else { new }
}

/// What a pod's sample history says, as the planner reads it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PodSignals {
    /// New connections per second over the connection-rate window; `None` with fewer
    /// than two samples.
    pub new_connection_rate: Option<f64>,
    /// Seconds since the accepted-connections counter last grew (measured from the first
    /// sample when it never grew while watched).
    pub quiet_seconds: Option<f64>,
    pub connections_active: f64,
    pub connections_closed: f64,
    pub drain_phase: Option<f64>,
    /// `/drain` requests the agent refused (all reasons; see
    /// [`AgentSample::drain_refused`]).
    pub drain_refused: f64,
}

/// Derive [`PodSignals`] from a pod's samples (oldest first) at time `now`.
pub fn pod_signals(samples: &[AgentSample], rate_window: f64, now: f64) -> PodSignals {
    let Some(last) = samples.last() else {
        return PodSignals::default();
    };
    let mut quiet_since = samples[0].at;
    for w in samples.windows(2) {
        if w[1].connections_accepted != w[0].connections_accepted {
            quiet_since = w[1].at;
        }
    }
    let new_connection_rate = window_start(samples, last.at - rate_window).and_then(|first| {
        let dt = last.at - first.at;
        (dt > 0.0).then(|| increase(first.connections_accepted, last.connections_accepted) / dt)
    });
    PodSignals {
        new_connection_rate,
        quiet_seconds: Some((now - quiet_since).max(0.0)),
        connections_active: last.connections_active,
        connections_closed: last.connections_closed,
        drain_phase: last.drain_phase,
        drain_refused: last.drain_refused,
    }
}

/// The newest sample at or before `start`, else the oldest one (a shorter window); `None`
/// when there is only one sample.
pub(crate) fn window_start(samples: &[AgentSample], start: f64) -> Option<&AgentSample> {
    if samples.len() < 2 {
        return None;
    }
    Some(
        samples[..samples.len() - 1]
            .iter()
            .rev()
            .find(|s| s.at <= start)
            .unwrap_or(&samples[0]),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(at: f64, accepted: f64) -> AgentSample {
        AgentSample {
            at,
            connections_accepted: accepted,
            ..Default::default()
        }
    }

    #[test]
    fn rate_and_quiet_time() {
        let s = [
            sample(0.0, 0.0),
            sample(1.0, 10.0),
            sample(2.0, 30.0),
            sample(3.0, 30.0),
            sample(4.0, 30.0),
        ];
        let sig = pod_signals(&s, 2.0, 4.5);
        assert_eq!(sig.new_connection_rate, Some(0.0));
        assert_eq!(sig.quiet_seconds, Some(2.5));
        let sig = pod_signals(&s[..3], 10.0, 2.0);
        assert_eq!(sig.new_connection_rate, Some(15.0));
        assert_eq!(sig.quiet_seconds, Some(0.0));
        // One sample: rate unknown, quiet measured from that sample.
        let sig = pod_signals(&s[..1], 2.0, 3.0);
        assert_eq!(sig.new_connection_rate, None);
        assert_eq!(sig.quiet_seconds, Some(3.0));
        assert_eq!(pod_signals(&[], 2.0, 3.0), PodSignals::default());
    }

    #[test]
    fn counter_reset_counts_from_zero() {
        let s = [sample(0.0, 100.0), sample(1.0, 5.0)];
        assert_eq!(pod_signals(&s, 5.0, 1.0).new_connection_rate, Some(5.0));
    }
}
