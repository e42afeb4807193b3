//! Gate evaluation (pure): the windowed figures a Release's gates judge, per revision
//! (requests, errors, latency) from the agents' samples, and the verdicts.
//!
//! The per-pod signals (new-connection rate, quiet time) are the drain protocol's, in
//! [`crate::pod::signals`]; gates read them too.

use std::collections::BTreeMap;

use super::settings::{ComparisonSettings, ConnectionRateSettings, HealthSettings};
use crate::pod::signals::{AgentSample, increase, window_start};

/// Quantile `q` (0–1) of a histogram given as cumulative (upper bound, count) buckets,
/// interpolated linearly inside the bucket as Prometheus' `histogram_quantile` does.
pub fn histogram_quantile(q: f64, buckets: &[(f64, f64)]) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut prev_bound = 0.0;
    let mut prev_count = 0.0;
    for &(bound, count) in buckets {
        if count >= rank {
            if bound.is_infinite() {
                return Some(prev_bound);
            }
            let in_bucket = count - prev_count;
            if in_bucket <= 0.0 {
                return Some(bound);
            }
            return Some(prev_bound + (bound - prev_bound) * (rank - prev_count) / in_bucket);
        }
        prev_bound = bound;
        prev_count = count;
    }
    Some(prev_bound)
}

/// Requests, errors and latency of one revision over a window.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RevisionWindow {
    pub requests: f64,
    pub errors: f64,
    /// Cumulative histogram of the window.
    pub latency_buckets: Vec<(f64, f64)>,
}

impl RevisionWindow {
    pub fn error_ratio(&self) -> Option<f64> {
        (self.requests > 0.0).then(|| self.errors / self.requests)
    }
    pub fn p99(&self) -> Option<f64> {
        histogram_quantile(0.99, &self.latency_buckets)
    }
    /// Add one pod's increase over the window.
    pub fn add_pod(&mut self, samples: &[AgentSample], window: f64) {
        let Some(last) = samples.last() else { return };
        let Some(first) = window_start(samples, last.at - window) else {
            return;
        };
        self.requests += increase(first.requests, last.requests);
        self.errors += increase(first.errors, last.errors);
        for &(le, count) in &last.latency_buckets {
            let before = first
                .latency_buckets
                .iter()
                .find(|(b, _)| *b == le)
                .map(|(_, c)| *c)
                .unwrap_or(0.0);
            let inc = increase(before, count);
            match self.latency_buckets.iter_mut().find(|(b, _)| *b == le) {
                Some(e) => e.1 += inc,
                None => self.latency_buckets.push((le, inc)),
            }
        }
        self.latency_buckets.sort_by(|x, y| x.0.total_cmp(&y.0));
    }
}

/// Outcome of one gate evaluation.
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    Passed,
    Failed(String),
    /// Not enough data to judge; does not count as a failure.
    Inconclusive(String),
}

/// A gate's verdict with the values it was judged on.
#[derive(Clone, Debug, PartialEq)]
pub struct Evaluation {
    pub gate: &'static str,
    pub verdict: Verdict,
    pub values: BTreeMap<String, f64>,
}

/// What the health gate looks at, per new pod.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PodHealth {
    pub ready: bool,
    pub age_seconds: f64,
    pub restarts: i32,
    pub crash_looping: bool,
}

pub fn evaluate_health(h: &HealthSettings, pods: &[PodHealth]) -> Evaluation {
    let mut values = BTreeMap::new();
    let restarts: i32 = pods
        .iter()
        .fold(0i32, |sum, p| sum.saturating_add(p.restarts.max(0)));
    let crash = pods.iter().filter(|p| p.crash_looping).count();
    let eligible: Vec<_> = pods
        .iter()
        .filter(|p| p.ready || p.age_seconds >= h.startup_timeout.as_secs_f64())
        .collect();
    let ready = eligible.iter().filter(|p| p.ready).count();
    values.insert("restarts".into(), restarts as f64);
    values.insert("crashLooping".into(), crash as f64);
    let verdict = if h.fail_on_crash_loop && crash > 0 {
        Verdict::Failed(format!("{crash} new pod(s) in CrashLoopBackOff"))
    } else if restarts > h.max_restarts {
        Verdict::Failed(format!(
            "new pods restarted {restarts} times (maxRestarts {})",
            h.max_restarts
        ))
    } else if eligible.is_empty() {
        Verdict::Inconclusive("no new pod old enough to judge yet".into())
    } else {
        let ratio = ready as f64 / eligible.len() as f64;
        values.insert("readyRatio".into(), ratio);
        if ratio + 1e-9 < h.min_ready_ratio {
            Verdict::Failed(format!(
                "ready ratio {ratio:.2} below minReadyRatio {}",
                h.min_ready_ratio
            ))
        } else {
            Verdict::Passed
        }
    };
    Evaluation {
        gate: "health",
        verdict,
        values,
    }
}

/// The connection-rate gate over the new pods' rates.
pub fn evaluate_connection_rate(c: &ConnectionRateSettings, rates: &[Option<f64>]) -> Evaluation {
    let known: Vec<f64> = rates.iter().flatten().copied().collect();
    let mut values = BTreeMap::new();
    values.insert("maxPerPod".into(), c.max_per_pod);
    let verdict = match known.iter().copied().reduce(f64::max) {
        None => Verdict::Inconclusive("no connection-rate sample from a new pod yet".into()),
        Some(max) => {
            values.insert("maxNewConnectionRate".into(), max);
            if max > c.max_per_pod {
                Verdict::Failed(format!(
                    "a new pod takes {max:.1} new connections/s (limit {})",
                    c.max_per_pod
                ))
            } else {
                Verdict::Passed
            }
        }
    };
    Evaluation {
        gate: "connectionRate",
        verdict,
        values,
    }
}

/// Canary against stable.
pub fn evaluate_comparison(
    c: &ComparisonSettings,
    canary: &RevisionWindow,
    stable: &RevisionWindow,
) -> Evaluation {
    let mut values = BTreeMap::new();
    values.insert("canaryRequests".into(), canary.requests);
    values.insert("stableRequests".into(), stable.requests);
    if (canary.requests as i64) < c.min_requests || (stable.requests as i64) < c.min_requests {
        return Evaluation {
            gate: "comparison",
            verdict: Verdict::Inconclusive(format!(
                "fewer than {} requests on a side in the window",
                c.min_requests
            )),
            values,
        };
    }
    let ce = canary.error_ratio().unwrap_or(0.0);
    let se = stable.error_ratio().unwrap_or(0.0);
    values.insert("canaryErrorRatio".into(), ce);
    values.insert("stableErrorRatio".into(), se);
    let mut failures = Vec::new();
    if ce - se > c.max_error_ratio_delta {
        failures.push(format!(
            "canary error ratio {ce:.3} exceeds stable's {se:.3} by more than {}",
            c.max_error_ratio_delta
        ));
    }
    if let (Some(cp), Some(sp)) = (canary.p99(), stable.p99()) {
        values.insert("canaryP99Seconds".into(), cp);
        values.insert("stableP99Seconds".into(), sp);
        // A floor keeps microsecond noise on a fast stable from failing a canary.
        let ratio = cp / sp.max(0.001);
        values.insert("latencyRatio".into(), ratio);
        if ratio > c.max_latency_ratio {
            failures.push(format!(
                "canary p99 {:.1} ms is {ratio:.2}x stable's {:.1} ms (limit {}x)",
                cp * 1000.0,
                sp * 1000.0,
                c.max_latency_ratio
            ));
        }
    }
    Evaluation {
        gate: "comparison",
        verdict: if failures.is_empty() {
            Verdict::Passed
        } else {
            Verdict::Failed(failures.join("; "))
        },
        values,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pod::signals::parse_agent_metrics;
    use std::time::Duration;

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
# EOF
"#;

    #[test]
    fn quantiles_interpolate() {
        let b = [(0.01, 500.0), (0.1, 990.0), (f64::INFINITY, 1000.0)];
        let p50 = histogram_quantile(0.5, &b).unwrap();
        assert!((p50 - 0.01).abs() < 1e-9);
        let p99 = histogram_quantile(0.99, &b).unwrap();
        assert!(p99 > 0.01 && p99 <= 0.1, "{p99}");
        // Everything in +Inf: the highest finite bound.
        assert_eq!(
            histogram_quantile(0.99, &[(0.1, 0.0), (f64::INFINITY, 5.0)]),
            Some(0.1)
        );
        assert_eq!(histogram_quantile(0.99, &[]), None);
    }

    #[test]
    fn revision_window_sums_pods() {
        let a0 = parse_agent_metrics(TEXT, 0.0);
        let mut a1 = a0.clone();
        a1.at = 10.0;
        a1.requests += 100.0;
        a1.errors += 20.0;
        a1.latency_buckets = vec![(0.01, 550.0), (0.1, 1090.0), (f64::INFINITY, 1100.0)];
        let mut w = RevisionWindow::default();
        w.add_pod(&[a0.clone(), a1.clone()], 10.0);
        w.add_pod(&[a0, a1], 10.0);
        assert_eq!(w.requests, 200.0);
        assert_eq!(w.error_ratio(), Some(0.2));
        assert_eq!(
            w.latency_buckets,
            vec![(0.01, 100.0), (0.1, 200.0), (f64::INFINITY, 200.0)]
        );
    }

    fn health() -> HealthSettings {
        HealthSettings {
            min_ready_ratio: 1.0,
            max_restarts: 2,
            fail_on_crash_loop: true,
            startup_timeout: Duration::from_secs(60),
            failure_limit: 2,
            interval: Duration::from_secs(5),
        }
    }

    #[test]
    fn health_outcomes() {
        let ready = PodHealth {
            ready: true,
            age_seconds: 5.0,
            ..Default::default()
        };
        let young = PodHealth {
            ready: false,
            age_seconds: 5.0,
            ..Default::default()
        };
        let stuck = PodHealth {
            ready: false,
            age_seconds: 120.0,
            ..Default::default()
        };
        let crash = PodHealth {
            crash_looping: true,
            ..Default::default()
        };
        let restarting = PodHealth {
            ready: true,
            restarts: 3,
            ..Default::default()
        };
        assert_eq!(
            evaluate_health(&health(), &[ready.clone(), young.clone()]).verdict,
            Verdict::Passed
        );
        assert!(matches!(
            evaluate_health(&health(), &[young]).verdict,
            Verdict::Inconclusive(_)
        ));
        assert!(
            matches!(evaluate_health(&health(), &[ready.clone(), stuck.clone()]).verdict, Verdict::Failed(m) if m.contains("ready ratio 0.50"))
        );
        assert!(
            matches!(evaluate_health(&health(), &[ready.clone(), crash]).verdict, Verdict::Failed(m) if m.contains("CrashLoopBackOff"))
        );
        assert!(
            matches!(evaluate_health(&health(), &[restarting]).verdict, Verdict::Failed(m) if m.contains("restarted 3"))
        );
        let lenient = HealthSettings {
            min_ready_ratio: 0.5,
            ..health()
        };
        assert_eq!(
            evaluate_health(&lenient, &[ready, stuck]).verdict,
            Verdict::Passed
        );
    }

    #[test]
    fn connection_rate_outcomes() {
        let c = ConnectionRateSettings {
            max_per_pod: 50.0,
            failure_limit: 3,
            interval: Duration::from_secs(5),
        };
        assert_eq!(
            evaluate_connection_rate(&c, &[Some(10.0), Some(49.0)]).verdict,
            Verdict::Passed
        );
        let e = evaluate_connection_rate(&c, &[Some(10.0), Some(80.0), None]);
        assert!(matches!(e.verdict, Verdict::Failed(_)));
        assert_eq!(e.values["maxNewConnectionRate"], 80.0);
        assert!(matches!(
            evaluate_connection_rate(&c, &[None]).verdict,
            Verdict::Inconclusive(_)
        ));
    }

    fn window(requests: f64, errors: f64, p99_bucket: f64) -> RevisionWindow {
        RevisionWindow {
            requests,
            errors,
            latency_buckets: vec![(p99_bucket, requests), (f64::INFINITY, requests)],
        }
    }

    #[test]
    fn comparison_outcomes() {
        let c = ComparisonSettings {
            max_error_ratio_delta: 0.05,
            max_latency_ratio: 1.5,
            min_requests: 50,
            failure_limit: 2,
            interval: Duration::from_secs(10),
        };
        let stable = window(1000.0, 0.0, 0.01);
        assert_eq!(
            evaluate_comparison(&c, &window(500.0, 10.0, 0.01), &stable).verdict,
            Verdict::Passed
        );
        let e = evaluate_comparison(&c, &window(500.0, 100.0, 0.01), &stable);
        assert!(
            matches!(&e.verdict, Verdict::Failed(m) if m.contains("error ratio 0.200")),
            "{e:?}"
        );
        assert_eq!(e.values["canaryErrorRatio"], 0.2);
        let e = evaluate_comparison(&c, &window(500.0, 0.0, 0.03), &stable);
        assert!(
            matches!(&e.verdict, Verdict::Failed(m) if m.contains("p99")),
            "{e:?}"
        );
        assert!(matches!(
            evaluate_comparison(&c, &window(10.0, 10.0, 0.03), &stable).verdict,
            Verdict::Inconclusive(_)
        ));
    }
}
