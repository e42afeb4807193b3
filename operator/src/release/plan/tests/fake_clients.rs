//! Keep-alive clients for the planner's tests: a fixed number of connections, each on one
//! pod, that move only when their pod stops serving or its agent asks them to reconnect
//! (`/rebalance`); a connection that moves lands on the serving pods in turn, as a load
//! balancer spreads new connections. Requests follow connections.

use std::collections::BTreeMap;

use super::Sim;
use crate::release::plan::PodView;

#[derive(Clone, Debug, Default)]
pub(super) struct FakeClients {
    /// Connections per pod.
    pub(super) conns: BTreeMap<String, usize>,
    pub(super) total: usize,
    /// Round-robin position for the next connection that lands.
    next: usize,
    /// Every `/rebalance` asked: pod and connections.
    pub(super) asked: Vec<(String, i64)>,
}

fn serves(p: &PodView) -> bool {
    !p.deleting && p.containers_ready && p.serving == Some(true) && p.drain_started.is_none()
}

impl FakeClients {
    pub(super) fn new(total: usize) -> Self {
        FakeClients {
            total,
            ..Default::default()
        }
    }

    fn land(&mut self, sim: &Sim, n: usize) {
        let pods: Vec<String> = sim
            .pods
            .iter()
            .filter(|p| serves(p))
            .map(|p| p.name.clone())
            .collect();
        if pods.is_empty() {
            return;
        }
        for _ in 0..n {
            let pod = pods[self.next % pods.len()].clone();
            self.next += 1;
            *self.conns.entry(pod).or_default() += 1;
        }
    }

    /// After the pods moved: connections of pods that no longer serve reconnect.
    pub(super) fn tick(&mut self, sim: &Sim) {
        let serving: Vec<&str> = sim
            .pods
            .iter()
            .filter(|p| serves(p))
            .map(|p| p.name.as_str())
            .collect();
        let mut homeless = self.total - self.conns.values().sum::<usize>();
        self.conns.retain(|pod, n| {
            let keep = serving.contains(&pod.as_str());
            if !keep {
                homeless += *n;
            }
            keep
        });
        self.land(sim, homeless);
    }

    pub(super) fn rebalance(&mut self, sim: &Sim, pod: &str, n: i64) {
        self.asked.push((pod.to_string(), n));
        let have = self.conns.get(pod).copied().unwrap_or(0);
        let moved = have.min(usize::try_from(n).unwrap_or(0));
        if let Some(c) = self.conns.get_mut(pod) {
            *c -= moved;
        }
        self.land(sim, moved);
    }

    pub(super) fn active(&self, pod: &str) -> f64 {
        self.conns.get(pod).copied().unwrap_or(0) as f64
    }

    /// Requests per revision over the window: ten per connection.
    pub(super) fn split(&self, sim: &Sim) -> BTreeMap<String, f64> {
        let mut out = BTreeMap::new();
        for p in &sim.pods {
            *out.entry(p.revision.clone()).or_insert(0.0) += 10.0 * self.active(&p.name);
        }
        out
    }

    /// The canary revision's share of the connections (percent).
    pub(super) fn share(&self, sim: &Sim, rev: &str) -> f64 {
        let s = self.split(sim);
        let total: f64 = s.values().sum();
        if total == 0.0 {
            0.0
        } else {
            s.get(rev).copied().unwrap_or(0.0) * 100.0 / total
        }
    }
}
