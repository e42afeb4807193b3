//! Observe mode: no data path. Polls the kernel's TCP tables for the application's port and
//! derives the connection count and new-connection rate; the drain waits for quiet and for
//! the established connections to end on their own. It cannot ask clients to leave.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::warn;

use crate::conns::ConnSource;
use crate::drain::Observation;
use crate::metrics::Metrics;
use crate::procfs::{parse_snmp, parse_tcp_table, passive_opens, port_view};

#[derive(Debug, Default)]
struct State {
    initialised: bool,
    known: HashSet<(SocketAddr, SocketAddr)>,
    active: usize,
    listening: bool,
    last_new: Option<Instant>,
    passive_opens: Option<u64>,
}

/// The result of diffing two polls (pure).
#[derive(Debug, PartialEq, Eq)]
pub struct Diff {
    pub new: usize,
    pub gone: usize,
}

/// Compares the established connections of two polls. A connection seen now but not in
/// the previous poll is new (accepted in between); connections that open and close
/// between two polls are missed.
pub fn diff(
    before: &HashSet<(SocketAddr, SocketAddr)>,
    now: &HashSet<(SocketAddr, SocketAddr)>,
) -> Diff {
    Diff {
        new: now.difference(before).count(),
        gone: before.difference(now).count(),
    }
}

pub struct Observer {
    port: u16,
    state: Mutex<State>,
    metrics: Arc<Metrics>,
}

impl Observer {
    pub fn new(port: u16, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Observer {
            port,
            state: Mutex::new(State::default()),
            metrics,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether something listens on the port (observe mode's readiness).
    pub fn listening(&self) -> bool {
        self.lock().listening
    }

    /// Reads the tables once and updates the counts.
    pub fn poll(&self) {
        let mut entries = Vec::new();
        let mut any = false;
        for path in ["/proc/net/tcp", "/proc/net/tcp6"] {
            if let Ok(text) = std::fs::read_to_string(path) {
                any = true;
                entries.extend(parse_tcp_table(&text));
            }
        }
        if !any {
            warn!("cannot read /proc/net/tcp or /proc/net/tcp6");
            return;
        }
        let view = port_view(&entries, self.port);
        let now_set: HashSet<_> = view.established.iter().copied().collect();
        let opens = std::fs::read_to_string("/proc/net/snmp")
            .ok()
            .and_then(|t| passive_opens(&parse_snmp(&t)));

        let mut st = self.lock();
        let d = diff(&st.known, &now_set);
        if st.initialised && d.new > 0 {
            self.metrics.connections_accepted.inc_by(d.new as u64);
            st.last_new = Some(Instant::now());
        }
        if let (Some(prev), Some(now)) = (st.passive_opens, opens)
            && now > prev
        {
            self.metrics.passive_opens.inc_by(now - prev);
        }
        st.passive_opens = opens.or(st.passive_opens);
        st.initialised = true;
        st.active = now_set.len();
        st.known = now_set;
        st.listening = view.listening;
        self.metrics.connections_active.set(st.active as i64);
        self.metrics
            .accept_queue
            .set(i64::try_from(view.accept_queue).unwrap_or(i64::MAX));
    }

    /// Polls every `interval` until the task is dropped.
    pub async fn run(self: Arc<Self>, interval: Duration) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let me = self.clone();
            // Reading procfs is blocking file I/O (fast, but keep it off the reactor).
            let _ = tokio::task::spawn_blocking(move || me.poll()).await;
        }
    }
}

impl ConnSource for Observer {
    fn observe(&self) -> Observation {
        let st = self.lock();
        Observation {
            active: st.active,
            last_new_connection: st.last_new,
        }
    }
    fn request_close(&self, _n: usize) -> usize {
        // Observe mode has no way to ask a client to leave.
        0
    }
    fn close_now(&self) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(l: u16, r: u16) -> (SocketAddr, SocketAddr) {
        (
            SocketAddr::from(([127, 0, 0, 1], l)),
            SocketAddr::from(([127, 0, 0, 1], r)),
        )
    }

    #[test]
    fn diff_counts_new_and_gone() {
        let a: HashSet<_> = [pair(80, 1), pair(80, 2)].into();
        let b: HashSet<_> = [pair(80, 2), pair(80, 3), pair(80, 4)].into();
        assert_eq!(diff(&a, &b), Diff { new: 2, gone: 1 });
        assert_eq!(diff(&b, &b), Diff { new: 0, gone: 0 });
        assert_eq!(diff(&HashSet::new(), &a), Diff { new: 2, gone: 0 });
    }
}
