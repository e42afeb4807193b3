//! The controller's only in-memory state: a short history of agent samples per pod, and
//! when each pod's agent was last asked to let connections reconnect (pure, no I/O).
//! Losing it (restart) makes the next decisions wait for fresh samples, never act early.

use std::collections::{BTreeMap, HashMap, VecDeque};

use super::gates::RevisionWindow;
use super::plan::PodView;
use crate::pod::signals::{AgentSample, pod_signals};

/// Which Release a piece of in-memory state belongs to. The UID tells a Release apart
/// from a later one of the same name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ReleaseKey {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

/// The windows the samples are read over (seconds).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SampleWindows {
    /// `gates.connectionRate.interval`.
    pub rate: f64,
    /// `gates.comparison.interval`.
    pub comparison: f64,
    /// `trafficRouting.verify.window`.
    pub split: f64,
}

/// What one round of samples gives the planner.
pub struct Observation {
    pub pods: Vec<PodView>,
    /// Request figures per revision over the comparison window (pods neither draining
    /// nor deleting).
    pub windows: BTreeMap<String, RevisionWindow>,
    /// Requests per revision over the split window, every pod still scraped.
    pub split: BTreeMap<String, f64>,
}

impl SampleWindows {
    /// Samples older than this are dropped (two are always kept).
    fn keep(&self) -> f64 {
        self.rate.max(self.comparison).max(self.split) + 10.0
    }
}

/// Recent agent samples of every Release's pods, per Release: one Release's round never
/// touches another's samples, even in the same namespace.
#[derive(Debug, Default)]
pub struct SampleStore {
    by_release: HashMap<ReleaseKey, HashMap<String, VecDeque<AgentSample>>>,
    /// When the operator last asked a pod's agent to rebalance (`PodView::asked_at`).
    asked: HashMap<ReleaseKey, HashMap<String, f64>>,
}

impl SampleStore {
    /// Record one round of scrapes of one Release's pods (`None`: the scrape failed) and
    /// return the pods with their signals and the per-revision request windows.
    /// Samples of this Release's pods that are gone are dropped.
    pub fn observe(
        &mut self,
        release: &ReleaseKey,
        pods: Vec<(PodView, Option<AgentSample>)>,
        windows: SampleWindows,
        now: f64,
    ) -> Observation {
        let mine = self.by_release.entry(release.clone()).or_default();
        mine.retain(|pod, _| pods.iter().any(|(p, _)| &p.name == pod));
        let asked = self.asked.entry(release.clone()).or_default();
        asked.retain(|pod, _| pods.iter().any(|(p, _)| &p.name == pod));
        let keep = windows.keep();
        let mut views = Vec::with_capacity(pods.len());
        let mut revisions: BTreeMap<String, RevisionWindow> = BTreeMap::new();
        let mut split: BTreeMap<String, RevisionWindow> = BTreeMap::new();
        for (mut view, sample) in pods {
            view.asked_at = asked.get(&view.name).copied();
            let hist = mine.entry(view.name.clone()).or_default();
            if let Some(s) = sample {
                hist.push_back(s);
            }
            while hist.front().is_some_and(|s| now - s.at > keep) && hist.len() > 2 {
                hist.pop_front();
            }
            let hist = hist.make_contiguous();
            if !hist.is_empty() {
                view.signals = Some(pod_signals(hist, windows.rate, now));
            }
            if view.drain_started.is_none() && !view.deleting {
                revisions
                    .entry(view.revision.clone())
                    .or_default()
                    .add_pod(hist, windows.comparison);
            }
            split
                .entry(view.revision.clone())
                .or_default()
                .add_pod(hist, windows.split);
            views.push(view);
        }
        Observation {
            pods: views,
            windows: revisions,
            split: split.into_iter().map(|(r, w)| (r, w.requests)).collect(),
        }
    }

    /// Remember that a pod's agent was asked to let connections reconnect.
    pub fn asked(&mut self, release: &ReleaseKey, pod: &str, now: f64) {
        self.asked
            .entry(release.clone())
            .or_default()
            .insert(pod.to_string(), now);
    }

    /// Drop a Release's samples (its finalizer is gone).
    pub fn forget(&mut self, release: &ReleaseKey) {
        self.by_release.remove(release);
        self.asked.remove(release);
    }

    /// Drop the samples of every Release of this name (it no longer exists, whatever
    /// its UID was).
    pub fn forget_named(&mut self, namespace: &str, name: &str) {
        self.by_release
            .retain(|k, _| k.namespace != namespace || k.name != name);
        self.asked
            .retain(|k, _| k.namespace != namespace || k.name != name);
    }

    /// Samples held for a Release's pod.
    pub fn samples_of(&self, release: &ReleaseKey, pod: &str) -> usize {
        self.by_release
            .get(release)
            .and_then(|m| m.get(pod))
            .map_or(0, VecDeque::len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::release::crd::{GateResult, ReleaseSpec, ReleaseStatus};
    use crate::release::plan::{DeploymentView, Observed, plan};
    use crate::release::settings::Settings;

    fn key(name: &str, uid: &str) -> ReleaseKey {
        ReleaseKey {
            namespace: "shop".into(),
            name: name.into(),
            uid: uid.into(),
        }
    }

    fn pod(name: &str, revision: &str) -> PodView {
        PodView {
            name: name.into(),
            revision: revision.into(),
            containers_ready: true,
            serving: Some(true),
            ..Default::default()
        }
    }

    /// An agent that has served `rps` requests per second since t = 0, `error_ratio` of
    /// them 5xx.
    fn sample(at: f64, rps: f64, error_ratio: f64) -> AgentSample {
        let requests = rps * at;
        AgentSample {
            at,
            connections_accepted: 10.0,
            connections_active: 10.0,
            requests,
            errors: requests * error_ratio,
            latency_buckets: vec![(0.1, requests), (f64::INFINITY, requests)],
            ..Default::default()
        }
    }

    /// The comparison gate's result for a Release whose canary `bc` runs at 50% over
    /// stable `bs`, judged on `windows`.
    fn comparison_gate(windows: BTreeMap<String, RevisionWindow>) -> GateResult {
        let spec: ReleaseSpec = serde_yaml::from_str(
            "workloadRef: {name: bad}\nsteps: [{setWeight: 50}, {gate: {duration: 1m}}]\ngates: {comparison: {minRequests: 50}}",
        )
        .unwrap();
        let observed = Observed {
            generation: 1,
            deleting: false,
            has_finalizer: true,
            settings: Settings::from_spec(&spec, "agent:test"),
            status: ReleaseStatus {
                stable_revision: Some("bs".into()),
                canary_revision: Some("bc".into()),
                current_step: Some(1),
                ..Default::default()
            },
            promote: None,
            abort: None,
            deployment: Some(DeploymentView {
                revision: "bc".into(),
                spec_replicas: 0,
                recorded_replicas: Some(2),
                available_replicas: 0,
                inject_error: None,
                claim: Default::default(),
            }),
            replica_sets: Vec::new(),
            pods: vec![pod("bad-s1", "bs"), pod("bad-c1", "bc")],
            windows,
            analysis: Default::default(),
            routing: None,
            split: Default::default(),
        };
        let plan = plan(&observed, 1020.0);
        plan.status
            .gates
            .into_iter()
            .find(|g| g.name == "comparison")
            .expect("the comparison gate was evaluated")
    }

    const WINDOWS: SampleWindows = SampleWindows {
        rate: 5.0,
        comparison: 10.0,
        split: 10.0,
    };

    /// Two Releases in one namespace, reconciled in turn: each keeps its own samples, and
    /// the bad canary's window shows its own errors (the namespace-wide store let each
    /// round erase the other Release's samples: one sample each, "0 requests").
    #[test]
    fn two_releases_in_one_namespace_keep_their_own_samples() {
        let good = key("good", "u-good");
        let bad = key("bad", "u-bad");
        let mut store = SampleStore::default();
        let mut bad_windows = BTreeMap::new();
        for round in 1..=3 {
            let t = 1000.0 + 5.0 * f64::from(round);
            store.observe(
                &good,
                vec![
                    (pod("good-s1", "gs"), Some(sample(t, 100.0, 0.0))),
                    (pod("good-c1", "gc"), Some(sample(t, 100.0, 0.0))),
                ],
                WINDOWS,
                t,
            );
            let w = store.observe(
                &bad,
                vec![
                    (pod("bad-s1", "bs"), Some(sample(t, 100.0, 0.0))),
                    (pod("bad-c1", "bc"), Some(sample(t, 100.0, 0.3))),
                ],
                WINDOWS,
                t,
            );
            bad_windows = w.windows;
        }
        // The bad canary's comparison gate judges the bad canary's own errors.
        let gate = comparison_gate(bad_windows.clone());
        assert_eq!(gate.result, "Failed", "{gate:?}");
        assert_eq!(gate.values.get("canaryRequests"), Some(&1000.0), "{gate:?}");
        assert_eq!(store.samples_of(&good, "good-c1"), 3);
        assert_eq!(store.samples_of(&bad, "bad-c1"), 3);
        let canary = &bad_windows["bc"];
        let stable = &bad_windows["bs"];
        assert_eq!(canary.requests, 1000.0);
        assert_eq!(stable.requests, 1000.0);
        assert!((canary.errors - 300.0).abs() < 1e-6, "{canary:?}");
        assert_eq!(stable.errors, 0.0);
        // The good one's gate passes on its own figures.
        let good_windows = store
            .observe(
                &good,
                vec![
                    (pod("good-s1", "gs"), Some(sample(1020.0, 100.0, 0.0))),
                    (pod("good-c1", "gc"), Some(sample(1020.0, 100.0, 0.0))),
                ],
                WINDOWS,
                1020.0,
            )
            .windows;
        assert_eq!(good_windows["gc"].requests, 1000.0);
        assert_eq!(good_windows["gc"].errors, 0.0);
    }

    /// A Release's samples go with it (finalizer removed, or gone), and a new Release of
    /// the same name (another UID) starts with none.
    #[test]
    fn samples_are_forgotten_with_their_release() {
        let first = key("echo", "u-1");
        let second = key("echo", "u-2");
        let other = key("other", "u-3");
        let mut store = SampleStore::default();
        for k in [&first, &other] {
            store.observe(
                k,
                vec![(pod("p", "r"), Some(sample(1.0, 1.0, 0.0)))],
                WINDOWS,
                1.0,
            );
        }
        assert_eq!(store.samples_of(&second, "p"), 0);
        store.forget_named("shop", "echo");
        assert_eq!(store.samples_of(&first, "p"), 0);
        assert_eq!(store.samples_of(&other, "p"), 1);
        store.forget(&other);
        assert_eq!(store.samples_of(&other, "p"), 0);
    }
}
