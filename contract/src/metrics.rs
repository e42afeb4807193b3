//! The agent's metric names and the operator's parser of its `/metrics` text.
//!
//! Family names are what the agent registers (prometheus-client appends `_total` to a
//! counter's samples and `_bucket`/`_sum`/`_count` to a histogram's); the `*_TOTAL` and
//! `*_BUCKET` constants are the sample names the exposition carries and the parser reads.

use std::collections::BTreeMap;

/// Defines a counter family name and its `_total` sample name from one literal, so the
/// two cannot drift apart.
macro_rules! counter {
    ($(#[$doc:meta])* $family:ident, $total:ident = $name:literal) => {
        $(#[$doc])*
        pub const $family: &str = $name;
        #[doc = concat!("Sample name of [`", stringify!($family), "`].")]
        pub const $total: &str = concat!($name, "_total");
    };
}

/// Gauge: client connections open now (observe mode: established on the port).
pub const CONNECTIONS_ACTIVE: &str = "sluice_agent_connections_active";
counter!(
    /// Counter: connections accepted; the new-connection rate (quiet detection) is its rate.
    CONNECTIONS_ACCEPTED, CONNECTIONS_ACCEPTED_TOTAL = "sluice_agent_connections_accepted"
);
counter!(
    /// Counter by `reason`: connections ended.
    CONNECTIONS_CLOSED, CONNECTIONS_CLOSED_TOTAL = "sluice_agent_connections_closed"
);
counter!(
    /// Counter: connections closed at once because `--max-connections` were open.
    CONNECTIONS_SHED, CONNECTIONS_SHED_TOTAL = "sluice_agent_connections_shed"
);
/// Gauge: HTTP requests being served.
pub const REQUESTS_IN_FLIGHT: &str = "sluice_agent_requests_in_flight";
counter!(
    /// Counter by `code`: HTTP responses sent.
    REQUESTS, REQUESTS_TOTAL = "sluice_agent_requests"
);
/// Histogram: request head to end of response body, in seconds.
pub const REQUEST_DURATION_SECONDS: &str = "sluice_agent_request_duration_seconds";
/// Sample name of [`REQUEST_DURATION_SECONDS`]' cumulative buckets (label `le`).
pub const REQUEST_DURATION_SECONDS_BUCKET: &str = "sluice_agent_request_duration_seconds_bucket";
counter!(
    /// Counter by `kind`: failures talking to the upstream.
    UPSTREAM_ERRORS, UPSTREAM_ERRORS_TOTAL = "sluice_agent_upstream_errors"
);
counter!(
    /// Counter: connections asked to reconnect by `/rebalance`.
    REBALANCE_ASKED, REBALANCE_ASKED_TOTAL = "sluice_agent_rebalance_asked"
);
/// Gauge: the drain's phase, 0 serving, 1 quiescing, 2 closing, 3 drained.
pub const DRAIN_PHASE: &str = "sluice_agent_drain_phase";
counter!(
    /// Counter by `reason`: `/drain` requests refused (no or wrong drain token).
    DRAIN_REFUSED, DRAIN_REFUSED_TOTAL = "sluice_agent_drain_refused"
);
/// Gauge by `phase`: duration of the drain's phases.
pub const DRAIN_DURATION_SECONDS: &str = "sluice_agent_drain_duration_seconds";
/// Gauge: 1 once a drain went without a termination signal for `--drain-orphan-after`.
pub const DRAIN_ORPHANED: &str = "sluice_agent_drain_orphaned";
/// Gauge: 1 when the last `/ready` answered 200.
pub const READY: &str = "sluice_agent_ready";
/// Gauge (observe mode): connections waiting in the port's accept queue.
pub const ACCEPT_QUEUE_LENGTH: &str = "sluice_agent_accept_queue_length";
counter!(
    /// Counter (observe mode): TCP accepts in the pod's network namespace, all ports.
    TCP_PASSIVE_OPENS, TCP_PASSIVE_OPENS_TOTAL = "sluice_agent_tcp_passive_opens"
);

/// Label of [`REQUESTS`]: the status code.
pub const LABEL_CODE: &str = "code";
/// Label of [`CONNECTIONS_CLOSED`] and [`DRAIN_REFUSED`].
pub const LABEL_REASON: &str = "reason";
/// Label of [`UPSTREAM_ERRORS`].
pub const LABEL_KIND: &str = "kind";
/// Label of [`DRAIN_DURATION_SECONDS`].
pub const LABEL_PHASE: &str = "phase";
/// A histogram bucket's upper bound (written by the exposition format itself).
pub const LABEL_LE: &str = "le";

/// The largest value a sample line may carry (2^53, where f64 stops counting exactly).
/// Every metric the operator reads is a count or a gauge of things, never negative: a line
/// with a negative, non-finite or larger value is skipped, so that an agent (any tenant's
/// pod) cannot feed NaN or infinities into the release gates.
pub const MAX_SAMPLE_VALUE: f64 = 9_007_199_254_740_992.0;

/// One scrape of an agent's `/metrics`, reduced to what the operator reads.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AgentSample {
    /// Seconds since the Unix epoch when the sample was taken.
    pub at: f64,
    pub connections_accepted: f64,
    pub connections_active: f64,
    pub connections_closed: f64,
    pub requests: f64,
    /// Requests answered with a 5xx code (by the application or by the agent).
    pub errors: f64,
    /// Cumulative request-duration histogram: (upper bound in seconds, count).
    pub latency_buckets: Vec<(f64, f64)>,
    pub drain_phase: Option<f64>,
    /// `/drain` requests the agent refused, all reasons together: a refused preStop means
    /// the pod terminates without its paced close.
    pub drain_refused: f64,
}

/// Parse the agent's OpenMetrics/Prometheus text exposition. Lines it cannot read and
/// metrics it does not know are skipped (the agent may add metrics); the agent's tests
/// check that every field here is fed by the agent's real output.
pub fn parse_agent_metrics(text: &str, at: f64) -> AgentSample {
    let mut s = AgentSample {
        at,
        ..Default::default()
    };
    let mut buckets: BTreeMap<u64, (f64, f64)> = BTreeMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (name, labels, rest) = match line.find('{') {
            Some(i) => {
                let Some(j) = line[i..].find('}') else {
                    continue;
                };
                (&line[..i], &line[i + 1..i + j], line[i + j + 1..].trim())
            }
            None => match line.split_once(' ') {
                Some((n, r)) => (n, "", r.trim()),
                None => continue,
            },
        };
        let Some(value) = rest
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
            .filter(|v| (0.0..=MAX_SAMPLE_VALUE).contains(v))
        else {
            continue;
        };
        match name {
            CONNECTIONS_ACCEPTED_TOTAL => s.connections_accepted += value,
            CONNECTIONS_ACTIVE => s.connections_active += value,
            CONNECTIONS_CLOSED_TOTAL => s.connections_closed += value,
            REQUESTS_TOTAL => {
                s.requests += value;
                if label(labels, LABEL_CODE).is_some_and(|c| c.starts_with('5')) {
                    s.errors += value;
                }
            }
            REQUEST_DURATION_SECONDS_BUCKET => {
                if let Some(le) = label(labels, LABEL_LE) {
                    let le = if le == "+Inf" {
                        f64::INFINITY
                    } else {
                        match le.parse::<f64>() {
                            Ok(v) if v.is_finite() => v,
                            _ => continue,
                        }
                    };
                    let e = buckets.entry(le.to_bits()).or_insert((le, 0.0));
                    e.1 += value;
                }
            }
            DRAIN_PHASE => s.drain_phase = Some(value),
            DRAIN_REFUSED_TOTAL => s.drain_refused += value,
            _ => {}
        }
    }
    let mut b: Vec<(f64, f64)> = buckets.into_values().collect();
    b.sort_by(|x, y| x.0.total_cmp(&y.0));
    s.latency_buckets = b;
    s
}

fn label<'a>(labels: &'a str, key: &str) -> Option<&'a str> {
    labels.split(',').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k.trim() == key).then(|| v.trim().trim_matches('"'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP sluice_agent_connections_active Open connections.
# TYPE sluice_agent_connections_active gauge
sluice_agent_connections_active 7
# TYPE sluice_agent_connections_accepted counter
sluice_agent_connections_accepted_total 120
sluice_agent_connections_closed_total{reason="drain"} 3
sluice_agent_connections_closed_total{reason="client"} 10
sluice_agent_requests_total{code="200"} 900
sluice_agent_requests_total{code="503"} 100
sluice_agent_request_duration_seconds_bucket{le="0.01"} 500
sluice_agent_request_duration_seconds_bucket{le="0.1"} 990
sluice_agent_request_duration_seconds_bucket{le="+Inf"} 1000
sluice_agent_request_duration_seconds_sum 30.5
sluice_agent_request_duration_seconds_count 1000
sluice_agent_drain_phase 1
sluice_agent_drain_refused_total{reason="missing_token"} 2
sluice_agent_drain_refused_total{reason="wrong_token"} 1
# EOF
"#;

    #[test]
    fn skips_values_no_agent_can_mean() {
        let text = "sluice_agent_requests_total{code=\"500\"} NaN\n\
                    sluice_agent_requests_total{code=\"200\"} -5\n\
                    sluice_agent_requests_total{code=\"200\"} +Inf\n\
                    sluice_agent_requests_total{code=\"200\"} 1e300\n\
                    sluice_agent_requests_total{code=\"200\"} 4\n\
                    sluice_agent_request_duration_seconds_bucket{le=\"NaN\"} 3\n\
                    sluice_agent_connections_active inf\n";
        let s = parse_agent_metrics(text, 0.0);
        assert_eq!(s.requests, 4.0);
        assert_eq!(s.errors, 0.0);
        assert_eq!(s.connections_active, 0.0);
        assert!(s.latency_buckets.is_empty());
    }

    #[test]
    fn parses_the_agent_exposition() {
        let s = parse_agent_metrics(TEXT, 10.0);
        assert_eq!(s.at, 10.0);
        assert_eq!(s.connections_active, 7.0);
        assert_eq!(s.connections_accepted, 120.0);
        assert_eq!(s.connections_closed, 13.0);
        assert_eq!(s.requests, 1000.0);
        assert_eq!(s.errors, 100.0);
        assert_eq!(s.drain_phase, Some(1.0));
        assert_eq!(s.drain_refused, 3.0);
        assert_eq!(
            s.latency_buckets,
            vec![(0.01, 500.0), (0.1, 990.0), (f64::INFINITY, 1000.0)]
        );
    }

    #[test]
    fn garbage_is_ignored() {
        let s = parse_agent_metrics(
            "nonsense\n{}\nfoo{ 1\nsluice_agent_connections_active x\n",
            0.0,
        );
        assert_eq!(s, AgentSample::default());
    }

    #[test]
    fn sample_names_follow_the_family_names() {
        assert_eq!(
            CONNECTIONS_ACCEPTED_TOTAL,
            "sluice_agent_connections_accepted_total"
        );
        assert_eq!(DRAIN_REFUSED_TOTAL, "sluice_agent_drain_refused_total");
        assert!(REQUEST_DURATION_SECONDS_BUCKET.starts_with(REQUEST_DURATION_SECONDS));
    }
}
