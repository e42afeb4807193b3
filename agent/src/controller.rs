//! The drain driver: runs the pure [`DrainMachine`] and [`ClosePacer`] against real time and
//! a [`ConnSource`], and publishes the phase.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use tokio::sync::{Notify, watch};
use tracing::{error, info};

use crate::conns::ConnSource;
use crate::drain::{DrainConfig, DrainMachine, DrainReport, Outcome, Phase, Transition};
use crate::metrics::Metrics;
use crate::pacer::ClosePacer;

/// How often the driver looks at the connections while a drain runs.
const POLL: Duration = Duration::from_millis(20);
/// Close gaps are stretched by up to this fraction (see [`ClosePacer`]).
const JITTER: f64 = 0.5;

struct Inner {
    machine: Mutex<DrainMachine>,
    source: Arc<dyn ConnSource>,
    phase: watch::Sender<Phase>,
    wake: Notify,
    metrics: Arc<Metrics>,
    close_rate: u32,
    /// A termination signal came: the pod is going away.
    terminating: AtomicBool,
    /// The drain went unfollowed by a termination signal for the orphan bound.
    orphaned: AtomicBool,
}

/// Handle to the drain; cheap to clone.
#[derive(Clone)]
pub struct Drainer {
    inner: Arc<Inner>,
}

impl Drainer {
    /// Creates the drainer and spawns its driver task (needs a tokio runtime).
    pub fn spawn(
        cfg: DrainConfig,
        close_rate: u32,
        source: Arc<dyn ConnSource>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let (phase, _) = watch::channel(Phase::Serving);
        let inner = Arc::new(Inner {
            machine: Mutex::new(DrainMachine::new(cfg)),
            source,
            phase,
            wake: Notify::new(),
            metrics,
            close_rate,
            terminating: AtomicBool::new(false),
            orphaned: AtomicBool::new(false),
        });
        tokio::spawn(drive(inner.clone()));
        Drainer { inner }
    }

    fn machine(&self) -> std::sync::MutexGuard<'_, DrainMachine> {
        lock(&self.inner.machine)
    }

    pub fn phase(&self) -> Phase {
        *self.inner.phase.borrow()
    }

    pub fn subscribe(&self) -> watch::Receiver<Phase> {
        self.inner.phase.subscribe()
    }

    pub fn config(&self) -> DrainConfig {
        *self.machine().config()
    }

    /// Starts the drain; false if it had already begun.
    pub fn begin(&self) -> bool {
        let obs = self.inner.source.observe();
        let started = self.machine().begin(Instant::now(), obs);
        if started {
            info!(
                active = obs.active,
                "drain started: unready, waiting for quiet"
            );
            publish(&self.inner, Phase::Quiescing);
            self.inner.wake.notify_one();
        }
        started
    }

    /// While serving, asks up to `n` connections to leave politely (they reconnect, and
    /// their load balancer picks a pod anew), paced at the close rate. `None` once a
    /// drain began (it closes everything anyway). Returns at once; a task does the asking.
    pub fn rebalance(&self, n: usize) -> Option<usize> {
        if self.phase() != Phase::Serving {
            return None;
        }
        let n = n.min(self.inner.source.observe().active);
        let inner = self.inner.clone();
        tokio::spawn(async move {
            let mut pacer = ClosePacer::new(inner.close_rate, JITTER);
            let mut rng = rand::rngs::StdRng::from_os_rng();
            let mut asked = 0;
            while asked < n && *inner.phase.borrow() == Phase::Serving {
                let now = Instant::now();
                let permits = pacer.permits(now, &mut || rng.random::<f64>());
                if permits > 0 {
                    let got = inner.source.request_close(permits.min(n - asked));
                    inner.metrics.rebalance_asked.inc_by(got as u64);
                    if got == 0 {
                        break;
                    }
                    asked += got;
                }
                let next = pacer
                    .next_at()
                    .unwrap_or(now + POLL)
                    .max(now + Duration::from_millis(1));
                tokio::time::sleep_until(next.into()).await;
            }
            info!(asked, "rebalance: connections asked to reconnect");
        });
        Some(n)
    }

    /// Ends the drain at once: every connection is closed now.
    pub fn force(&self) {
        let obs = self.inner.source.observe();
        let t = self.machine().force(Instant::now(), obs);
        if let Some(t) = t {
            info!(active = obs.active, "drain forced");
            apply(&self.inner, t);
        }
        self.inner.wake.notify_one();
    }

    /// A termination signal came (the drain was followed by the pod's deletion).
    pub fn set_terminating(&self) {
        self.inner.terminating.store(true, Ordering::Release);
    }

    /// Reports a drain that no termination signal follows within `after` of its start
    /// (a preStop hook run for a container restart, not a deletion, does that): the pod
    /// then serves nothing (unready, listener closed). The agent logs an error (again every
    /// `after` while it lasts), sets `sluice_agent_drain_orphaned` to 1 and fails its
    /// liveness check ([`Drainer::orphaned`]), so the kubelet restarts the agent container
    /// and the pod serves again, through a fresh agent that becomes ready the usual way.
    /// The drain itself is not undone in place: load balancers were told the pod is
    /// leaving, and only a new readiness tells them otherwise.
    pub fn watch_orphan(&self, after: Duration) {
        let me = self.clone();
        tokio::spawn(async move {
            let mut rx = me.subscribe();
            if rx.wait_for(|p| *p != Phase::Serving).await.is_err() {
                return;
            }
            let started = me.machine().started().unwrap_or_else(Instant::now);
            let mut at = started + after;
            loop {
                tokio::time::sleep_until(at.into()).await;
                if me.inner.terminating.load(Ordering::Acquire) {
                    return;
                }
                me.inner.orphaned.store(true, Ordering::Release);
                me.inner.metrics.drain_orphaned.set(1);
                error!(
                    since_drain_start_s = at.saturating_duration_since(started).as_secs(),
                    phase = me.phase().as_str(),
                    "drained but no termination signal followed: this pod serves nothing; replace it"
                );
                at += after;
            }
        });
    }

    /// Whether a drain went unfollowed by a termination signal (see [`Drainer::watch_orphan`]).
    pub fn orphaned(&self) -> bool {
        self.inner.orphaned.load(Ordering::Acquire)
    }

    /// Resolves once the drain is over.
    pub async fn wait_drained(&self) {
        let mut rx = self.subscribe();
        // The sender lives as long as `self`; an error cannot happen while we hold it.
        let _ = rx.wait_for(|p| *p == Phase::Drained).await;
    }

    pub fn report(&self) -> DrainReport {
        let active = self.inner.source.observe().active;
        self.machine().report(Instant::now(), active)
    }
}

fn lock(m: &Mutex<DrainMachine>) -> std::sync::MutexGuard<'_, DrainMachine> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn publish(inner: &Inner, phase: Phase) {
    inner.source.on_phase(phase);
    inner.metrics.drain_phase.set(phase.as_i64());
    inner.phase.send_replace(phase);
}

fn apply(inner: &Inner, t: Transition) {
    match t {
        Transition::StartClosing { quiet_reached } => {
            info!(quiet_reached, "drain: closing connections");
            publish(inner, Phase::Closing);
        }
        Transition::Drained(outcome) => {
            if outcome != Outcome::Complete {
                inner.source.close_now();
            }
            info!(?outcome, "drain: drained");
            publish(inner, Phase::Drained);
        }
    }
}

fn export_durations(inner: &Inner, r: &DrainReport) {
    if let Some(s) = r.quiesce_seconds {
        inner.metrics.set_drain_duration("quiescing", s);
    }
    if let Some(s) = r.closing_seconds {
        inner.metrics.set_drain_duration("closing", s);
    }
    let total = r.total_seconds.or(r
        .quiesce_seconds
        .map(|q| q + r.closing_seconds.unwrap_or(0.0)));
    if let Some(s) = total {
        inner.metrics.set_drain_duration("total", s);
    }
}

async fn drive(inner: Arc<Inner>) {
    let mut rx = inner.phase.subscribe();
    if rx.wait_for(|p| *p != Phase::Serving).await.is_err() {
        return;
    }
    let mut pacer = ClosePacer::new(inner.close_rate, JITTER);
    let mut rng = rand::rngs::StdRng::from_os_rng();
    loop {
        let now = Instant::now();
        let obs = inner.source.observe();
        let (phase, wakeup, report) = {
            let mut m = lock(&inner.machine);
            while let Some(t) = m.step(now, obs) {
                apply(&inner, t);
            }
            (m.phase(), m.next_wakeup(), m.report(now, obs.active))
        };
        export_durations(&inner, &report);
        if phase == Phase::Drained {
            return;
        }
        let mut next = now + POLL;
        if phase == Phase::Closing {
            let n = pacer.permits(now, &mut || rng.random::<f64>());
            if n > 0 {
                inner.source.request_close(n);
            }
            if let Some(p) = pacer.next_at() {
                next = next.min(p.max(now + Duration::from_millis(1)));
            }
        }
        if let Some(w) = wakeup {
            next = next.min(w);
        }
        tokio::select! {
            _ = tokio::time::sleep_until(next.into()) => {}
            _ = inner.wake.notified() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conns::{CloseLevel, ConnTracker, ProxyConns};

    fn drainer(close_rate: u32) -> (Drainer, Arc<ConnTracker>, Arc<Metrics>) {
        let metrics = Arc::new(Metrics::new());
        let tracker = ConnTracker::new(metrics.clone());
        let source = Arc::new(ProxyConns {
            tracker: tracker.clone(),
            accept_while_closing: true,
        });
        let cfg = DrainConfig {
            quiet_period: Duration::from_millis(50),
            propagation_timeout: Duration::from_secs(1),
            drain_timeout: Duration::from_secs(5),
        };
        (
            Drainer::spawn(cfg, close_rate, source, metrics.clone()),
            tracker,
            metrics,
        )
    }

    #[tokio::test]
    async fn rebalance_asks_that_many_connections_to_reconnect_and_no_more() {
        let (d, tracker, metrics) = drainer(1000);
        let guards: Vec<_> = (0..10).map(|_| tracker.register()).collect();
        assert_eq!(d.rebalance(4), Some(4));
        let asked = || {
            guards
                .iter()
                .filter(|g| g.ctl().level() == CloseLevel::Graceful)
                .count()
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while asked() < 4 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(asked(), 4);
        assert!(
            metrics
                .render()
                .contains("sluice_agent_rebalance_asked_total 4")
        );
        // The agent keeps serving: still ready, nothing else asked.
        assert_eq!(d.phase(), Phase::Serving);
        // Never more than it has.
        assert_eq!(d.rebalance(100), Some(10));
        // Once draining, the drain closes everything: no rebalance.
        d.begin();
        assert_eq!(d.rebalance(1), None);
    }
}
