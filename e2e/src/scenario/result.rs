//! What one run measured ([`RunResult`]) and the pure analyses behind it: the connection
//! storm at the new pods and windowed latency percentiles.
use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::spec::RunSpec;
use crate::load::{self, ConnRecord, Outcome, RequestRecord};

/// What one run measured.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunResult {
    pub strategy: String,
    pub description: String,
    pub delay_s: f64,
    pub spec: RunSpec,
    pub namespace: String,
    pub requests: u64,
    pub failed: u64,
    pub by_outcome: BTreeMap<Outcome, u64>,
    pub achieved_rps: f64,
    /// Seconds from the release's start until every new pod was available and every old
    /// pod gone.
    pub release_s: f64,
    /// Release start and end, seconds since the load's origin.
    pub release_start_s: f64,
    pub release_end_s: f64,
    /// p99 latency of the requests due in the steady window (after a 2 s warm-up).
    pub p99_steady_ms: f64,
    /// p99 latency of the requests due from the release's start until the propagation
    /// delay after its end.
    pub p99_release_ms: f64,
    /// The release window's tail, split by old/new pod and by first request on a
    /// connection vs later ones, per second too (the worst second is in here).
    #[serde(default)]
    pub tail: crate::tail::TailBreakdown,
    /// CPU seconds spent from the release's start until the propagation delay after its
    /// end, by role (operator, agents, apps, node, control_plane, load_and_proxy, other),
    /// summed from `cpu_series` (whole seconds: the window is rounded out to them).
    #[serde(default)]
    pub cpu_s: BTreeMap<String, f64>,
    /// Seconds the request path's threads (agents, apps, the load and proxy, the operator)
    /// spent runnable but waiting for a core over the same window, by role.
    #[serde(default)]
    pub cpu_wait_s: BTreeMap<String, f64>,
    /// Cores busy by role, second by second, over the whole run (t: seconds since the
    /// load started, as in `series`).
    #[serde(default)]
    pub cpu_series: Vec<crate::cpu::CpuSecond>,
    /// Requests the API server served from the release's start until the propagation delay
    /// after its end, by "VERB resource" (its own `apiserver_request_total`; every client,
    /// the runner's polling included).
    #[serde(default)]
    pub api_requests: BTreeMap<String, u64>,
    /// The busiest processes the roles do not name, by process name, CPU seconds over
    /// the run.
    #[serde(default)]
    pub cpu_top_other: Vec<(String, f64)>,
    pub storm: Storm,
    pub connections_opened: u64,
    pub closed_by_server: u64,
    pub old_pods: Vec<String>,
    pub new_pods: Vec<String>,
    pub series: Vec<load::Bin>,
}

/// The connection storm seen by the new pods.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Storm {
    /// The highest count of new connections the new pods together got in one second,
    /// divided by what they can take in one second ([`RunSpec::new_pod_capacity`] × new
    /// pods). 1 or less: the new pods were never asked to accept more connections than
    /// they can; a burst of every client reconnecting at once scores its size over the
    /// capacity.
    pub factor: f64,
    /// The peak, new connections in one second at the new pods together.
    pub peak_per_s: f64,
    /// What the new pods can take together, new connections per second.
    pub capacity_per_s: f64,
    /// The busiest single new pod's busiest second, and that pod (the load balancer's
    /// spread adds to the release's pacing here; one-second counts of a few connections
    /// are integers).
    pub pod_peak_per_s: f64,
    pub pod: Option<String>,
    /// New connections the new pods gained in the window.
    pub connections: u64,
    pub window_s: f64,
}

/// Computes the storm factor from connection records: the new pods' connections opened
/// in `window_ms`, counted per second from its start. Pure, so it is unit-tested.
pub fn storm_factor(
    conns: &[ConnRecord],
    new_pods: &BTreeSet<String>,
    window_ms: (f64, f64),
    capacity_per_pod: f64,
) -> Storm {
    let (start, end) = window_ms;
    let window_s = ((end - start) / 1000.0).max(1.0);
    let bins = window_s.ceil() as usize;
    let mut total = vec![0u64; bins];
    let mut per_pod: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    for c in conns {
        let Some(pod) = c.pod.as_deref() else {
            continue;
        };
        if !new_pods.contains(pod) || c.open_ms < start || c.open_ms >= end {
            continue;
        }
        let b = (((c.open_ms - start) / 1000.0) as usize).min(bins - 1);
        total[b] += 1;
        per_pod.entry(pod).or_insert_with(|| vec![0; bins])[b] += 1;
    }
    let connections: u64 = total.iter().sum();
    let peak = total.iter().copied().max().unwrap_or(0) as f64;
    let capacity = capacity_per_pod * new_pods.len() as f64;
    let pod_peak = per_pod
        .iter()
        .map(|(pod, counts)| (*counts.iter().max().unwrap_or(&0), *pod))
        .max();
    Storm {
        factor: if capacity > 0.0 { peak / capacity } else { 0.0 },
        peak_per_s: peak,
        capacity_per_s: capacity,
        pod_peak_per_s: pod_peak.map(|(p, _)| p as f64).unwrap_or(0.0),
        pod: pod_peak.map(|(_, pod)| pod.to_string()),
        connections,
        window_s,
    }
}

/// p99 latency of the requests scheduled inside `[from, to)` ms.
pub fn p99_between(requests: &[RequestRecord], from_ms: f64, to_ms: f64) -> f64 {
    load::percentiles(
        requests
            .iter()
            .filter(|r| r.scheduled_ms >= from_ms && r.scheduled_ms < to_ms)
            .map(RequestRecord::latency_ms)
            .collect(),
    )
    .p99
}
