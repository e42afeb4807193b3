//! Which planned statuses a round writes now, and which wait.
//!
//! While a pod's connections close, every round's scrape sees more of them closed, so the
//! planned status differs from the stored one in nothing but a drain's closed-connection
//! count, round after round. Written each time, that was most of a release's status writes
//! (34 of 79 in one release of 6 pods), each a server-side apply the API server decodes,
//! merges, stores and sends to every watcher while the node's pods are busiest. Such a
//! change alone is written at most every [`COUNTS_WRITE_INTERVAL`]; any other change is
//! written at once, with the counts. Meanwhile the counts are kept here and the next round
//! plans from them (a floor under the stored ones), so a drain that ends records the last
//! count seen, as when every count was written. The agents' own metrics have the live
//! count throughout (`sluice_agent_connections_closed_total`); an operator restart loses
//! at most the counts of one interval.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use crate::release::crd::ReleaseStatus;

/// How often a status whose only change is closed-connection counts is written (seconds).
pub(super) const COUNTS_WRITE_INTERVAL: f64 = 5.0;

/// Per Release: when its status was last written, and the counts not written since.
#[derive(Debug, Default)]
pub(super) struct StatusWrites {
    by_release: Mutex<HashMap<(String, String), Deferred>>,
}

#[derive(Debug, Default)]
struct Deferred {
    /// When this operator last wrote the Release's status (unix seconds; 0: not since it
    /// started).
    last_write: f64,
    /// Closed-connection counts by drain (pod, startedAt) planned but not written.
    counts: HashMap<(String, String), i64>,
}

impl StatusWrites {
    /// Whether the Release `ns/name`'s `planned` status must be written now, `stored` being
    /// the status it has. When not, `planned`'s counts are kept for the next round.
    pub(super) fn write_now(
        &self,
        ns: &str,
        name: &str,
        stored: Option<&ReleaseStatus>,
        planned: &ReleaseStatus,
        now: f64,
    ) -> bool {
        let Some(stored) = stored else {
            return true;
        };
        if !differs_only_in_counts(stored, planned) {
            return true;
        }
        let mut all = self.lock();
        let d = all.entry((ns.to_string(), name.to_string())).or_default();
        if now - d.last_write >= COUNTS_WRITE_INTERVAL {
            return true;
        }
        for r in &planned.drains {
            if let Some(c) = r.connections_closed {
                d.counts.insert((r.pod.clone(), r.started_at.clone()), c);
            }
        }
        false
    }

    /// The Release `ns/name`'s status was written at `now`: nothing is kept any more.
    pub(super) fn wrote(&self, ns: &str, name: &str, now: f64) {
        let mut all = self.lock();
        let d = all.entry((ns.to_string(), name.to_string())).or_default();
        d.last_write = now;
        d.counts.clear();
    }

    /// Raise `status`'s closed-connection counts (as read from the Release `ns/name`) to
    /// the ones kept for it.
    pub(super) fn apply_kept_counts(&self, ns: &str, name: &str, status: &mut ReleaseStatus) {
        let all = self.lock();
        let Some(d) = all.get(&(ns.to_string(), name.to_string())) else {
            return;
        };
        for r in &mut status.drains {
            if let Some(&kept) = d.counts.get(&(r.pod.clone(), r.started_at.clone())) {
                r.connections_closed = Some(r.connections_closed.unwrap_or(0).max(kept));
            }
        }
    }

    /// Forget the Release `ns/name` (it is gone or finalized).
    pub(super) fn forget(&self, ns: &str, name: &str) {
        self.lock().remove(&(ns.to_string(), name.to_string()));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), Deferred>> {
        self.by_release
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// Whether `planned` differs from `stored` in nothing but the closed-connection counts of
/// drains both have (same pod, same start).
fn differs_only_in_counts(stored: &ReleaseStatus, planned: &ReleaseStatus) -> bool {
    if stored == planned {
        return false;
    }
    let mut p = planned.clone();
    for r in &mut p.drains {
        if let Some(s) = stored
            .drains
            .iter()
            .find(|s| s.pod == r.pod && s.started_at == r.started_at)
        {
            r.connections_closed = s.connections_closed;
        }
    }
    &p == stored
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::release::crd::{DrainRecord, Phase};

    fn status(counts: &[(&str, Option<i64>)]) -> ReleaseStatus {
        ReleaseStatus {
            phase: Some(Phase::Progressing),
            drains: counts
                .iter()
                .map(|(pod, c)| DrainRecord {
                    pod: pod.to_string(),
                    revision: "old".into(),
                    state: "Closing".into(),
                    started_at: "2026-12-08T00:00:00Z".into(),
                    connections_closed: *c,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn only_a_count_moving_is_a_counts_only_change() {
        let stored = status(&[("a", Some(3)), ("b", None)]);
        assert!(differs_only_in_counts(
            &stored,
            &status(&[("a", Some(9)), ("b", Some(1))])
        ));
        assert!(!differs_only_in_counts(&stored, &stored.clone()));
        // A new drain, a state change, a phase change: not counts only.
        assert!(!differs_only_in_counts(
            &stored,
            &status(&[("a", Some(3)), ("b", None), ("c", None)])
        ));
        let mut state = status(&[("a", Some(9)), ("b", None)]);
        state.drains[0].state = "Completed".into();
        assert!(!differs_only_in_counts(&stored, &state));
        let mut phase = status(&[("a", Some(9)), ("b", None)]);
        phase.phase = Some(Phase::Completed);
        assert!(!differs_only_in_counts(&stored, &phase));
        // A drain of the same pod started again is another drain.
        let mut again = status(&[("a", Some(9)), ("b", None)]);
        again.drains[0].started_at = "2026-12-08T00:01:00Z".into();
        assert!(!differs_only_in_counts(&stored, &again));
    }

    #[test]
    fn counts_wait_for_the_interval_and_the_next_round_plans_from_them() {
        let w = StatusWrites::default();
        let stored = status(&[("a", Some(3))]);
        // No write since the operator started: written.
        assert!(w.write_now("ns", "r", Some(&stored), &status(&[("a", Some(5))]), 100.0));
        w.wrote("ns", "r", 100.0);
        // Counts alone within the interval: kept, not written.
        let planned = status(&[("a", Some(8))]);
        assert!(!w.write_now("ns", "r", Some(&stored), &planned, 101.0));
        let mut next = stored.clone();
        w.apply_kept_counts("ns", "r", &mut next);
        assert_eq!(next.drains[0].connections_closed, Some(8));
        // Another Release is not affected.
        let mut other = stored.clone();
        w.apply_kept_counts("ns", "other", &mut other);
        assert_eq!(other.drains[0].connections_closed, Some(3));
        // Any other change is written at once.
        let mut changed = status(&[("a", Some(9))]);
        changed.drains[0].state = "Completed".into();
        assert!(w.write_now("ns", "r", Some(&stored), &changed, 101.5));
        // The interval over: counts alone are written.
        assert!(w.write_now(
            "ns",
            "r",
            Some(&stored),
            &planned,
            100.0 + COUNTS_WRITE_INTERVAL
        ));
        // A write clears what was kept; a kept count never lowers a stored one.
        w.wrote("ns", "r", 106.0);
        let mut after = status(&[("a", Some(20))]);
        w.apply_kept_counts("ns", "r", &mut after);
        assert_eq!(after.drains[0].connections_closed, Some(20));
        assert!(!w.write_now("ns", "r", Some(&after), &status(&[("a", Some(21))]), 107.0));
        let mut lower = status(&[("a", Some(30))]);
        w.apply_kept_counts("ns", "r", &mut lower);
        assert_eq!(lower.drains[0].connections_closed, Some(30));
        w.forget("ns", "r");
        let mut forgotten = stored.clone();
        w.apply_kept_counts("ns", "r", &mut forgotten);
        assert_eq!(forgotten.drains[0].connections_closed, Some(3));
        // No stored status yet: written.
        assert!(w.write_now("ns", "r", None, &planned, 107.0));
    }
}
