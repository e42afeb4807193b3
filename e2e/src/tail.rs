//! Where a release's tail latency comes from: p99 over the release window and per second,
//! split by the pod that answered (old or new) and by the request's place on its
//! connection (the first one also pays for the connection: a handshake at the load
//! balancer and, in proxy mode, the agent's own connection to the application). Pure, so it
//! is unit-tested; the scenarios put it in every run's report.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::load::{RequestRecord, percentiles};

/// p99 latencies of one slice of requests, each with its count (a p99 of a handful of
/// requests is their maximum, so the counts say how much a figure can be trusted).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TailSplit {
    pub requests: u64,
    pub p99_ms: f64,
    pub old_pods: u64,
    pub p99_old_ms: f64,
    pub new_pods: u64,
    pub p99_new_ms: f64,
    /// Requests that were the first on their connection.
    pub first_on_conn: u64,
    pub p99_first_ms: f64,
    pub reused_conn: u64,
    pub p99_reused_ms: f64,
}

/// One second of the window, seconds since the load's origin.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TailSecond {
    pub t: f64,
    #[serde(flatten)]
    pub split: TailSplit,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TailBreakdown {
    /// The whole window.
    pub window: TailSplit,
    /// The window's worst one-second p99 and when it was.
    pub worst_second_p99_ms: f64,
    pub worst_second_t: f64,
    pub seconds: Vec<TailSecond>,
}

fn split(requests: &[(&RequestRecord, bool)], new_pods: &BTreeSet<String>) -> TailSplit {
    let mut all = Vec::new();
    let (mut old, mut new, mut first, mut reused) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (r, is_first) in requests {
        let ms = r.latency_ms();
        all.push(ms);
        match &r.pod {
            Some(p) if new_pods.contains(p) => new.push(ms),
            Some(_) => old.push(ms),
            None => {}
        }
        if *is_first {
            first.push(ms);
        } else {
            reused.push(ms);
        }
    }
    let n = |v: &Vec<f64>| v.len() as u64;
    TailSplit {
        requests: n(&all),
        old_pods: n(&old),
        new_pods: n(&new),
        first_on_conn: n(&first),
        reused_conn: n(&reused),
        p99_ms: percentiles(all).p99,
        p99_old_ms: percentiles(old).p99,
        p99_new_ms: percentiles(new).p99,
        p99_first_ms: percentiles(first).p99,
        p99_reused_ms: percentiles(reused).p99,
    }
}

/// The breakdown of the requests scheduled in `[from, to)` ms (the window
/// `scenario::p99_between` uses). A request is the first on its connection when no
/// request of the same connection started before it; requests that got no connection
/// (`conn` 0) count as first.
pub fn tail_breakdown(
    requests: &[RequestRecord],
    new_pods: &BTreeSet<String>,
    window_ms: (f64, f64),
) -> TailBreakdown {
    let mut first_start: BTreeMap<u64, f64> = BTreeMap::new();
    for r in requests.iter().filter(|r| r.conn != 0) {
        let e = first_start.entry(r.conn).or_insert(r.start_ms);
        *e = e.min(r.start_ms);
    }
    let (from, to) = window_ms;
    let in_window: Vec<(&RequestRecord, bool)> = requests
        .iter()
        .filter(|r| r.scheduled_ms >= from && r.scheduled_ms < to)
        .map(|r| {
            (
                r,
                r.conn == 0 || first_start.get(&r.conn) == Some(&r.start_ms),
            )
        })
        .collect();
    let mut by_second: BTreeMap<i64, Vec<(&RequestRecord, bool)>> = BTreeMap::new();
    for (r, f) in &in_window {
        by_second
            .entry((r.scheduled_ms / 1000.0).floor() as i64)
            .or_default()
            .push((r, *f));
    }
    let seconds: Vec<TailSecond> = by_second
        .into_iter()
        .map(|(s, rs)| TailSecond {
            t: s as f64,
            split: split(&rs, new_pods),
        })
        .collect();
    let worst = seconds
        .iter()
        .max_by(|a, b| a.split.p99_ms.total_cmp(&b.split.p99_ms));
    TailBreakdown {
        window: split(&in_window, new_pods),
        worst_second_p99_ms: worst.map_or(0.0, |s| s.split.p99_ms),
        worst_second_t: worst.map_or(0.0, |s| s.t),
        seconds,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::Outcome;

    fn req(conn: u64, sched: f64, latency: f64, pod: Option<&str>) -> RequestRecord {
        RequestRecord {
            scheduled_ms: sched,
            start_ms: sched,
            end_ms: sched + latency,
            outcome: Outcome::Ok,
            pod: pod.map(str::to_string),
            conn,
            detail: None,
        }
    }

    #[test]
    fn splits_by_pod_and_place_on_the_connection() {
        let new: BTreeSet<String> = ["new-1".to_string()].into();
        let mut rs = Vec::new();
        // Connection 1 on an old pod: first request slow, then fast ones.
        rs.push(req(1, 100.0, 40.0, Some("old-1")));
        for i in 1..10 {
            rs.push(req(1, 100.0 + f64::from(i) * 50.0, 2.0, Some("old-1")));
        }
        // Connection 2 reaches the new pod in the next second: its first request is slow.
        rs.push(req(2, 1100.0, 90.0, Some("new-1")));
        rs.push(req(2, 1200.0, 3.0, Some("new-1")));
        // A request that got no connection at all.
        rs.push(req(0, 1300.0, 2000.0, None));
        let b = tail_breakdown(&rs, &new, (0.0, 2000.0));
        assert_eq!(b.window.requests, 13);
        assert_eq!((b.window.old_pods, b.window.new_pods), (10, 2));
        assert_eq!((b.window.first_on_conn, b.window.reused_conn), (3, 10));
        assert_eq!(b.window.p99_reused_ms, 3.0);
        assert_eq!(b.window.p99_first_ms, 2000.0);
        assert_eq!(b.window.p99_new_ms, 90.0);
        assert_eq!(b.seconds.len(), 2);
        assert_eq!(b.seconds[0].split.p99_ms, 40.0);
        assert_eq!((b.worst_second_t, b.worst_second_p99_ms), (1.0, 2000.0));
    }

    #[test]
    fn only_the_window_counts_but_connections_started_before_it_are_not_new() {
        let new = BTreeSet::new();
        let rs = vec![
            req(7, 500.0, 30.0, Some("old")),
            req(7, 1500.0, 5.0, Some("old")),
        ];
        let b = tail_breakdown(&rs, &new, (1000.0, 2000.0));
        assert_eq!(b.window.requests, 1);
        assert_eq!(b.window.first_on_conn, 0);
        assert_eq!(b.window.p99_ms, 5.0);
    }

    #[test]
    fn an_empty_window_is_all_zero() {
        let b = tail_breakdown(&[], &BTreeSet::new(), (0.0, 1000.0));
        assert_eq!(b, TailBreakdown::default());
    }
}
