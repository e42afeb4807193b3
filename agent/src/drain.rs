//! The drain state machine: pure, no I/O, time passed in.
//!
//! serving → quiescing → closing → drained.
//!
//! * `begin` (from `/drain` or SIGTERM) leaves `Serving`: the agent turns unready and waits
//!   for quiet, i.e. no new connection for `quiet_period` (counted from the drain's start or
//!   the last new connection, whichever is later), at most `propagation_timeout`.
//! * `Closing`: the driver closes connections (paced, see [`crate::pacer`]); once no
//!   connection is left the drain is `Drained`.
//! * The drain deadline (`drain_timeout` after the start) or [`DrainMachine::force`] ends the
//!   drain in any phase; the report then says it timed out / was forced.

use std::time::{Duration, Instant};

use serde::Serialize;

/// The drain's phase; the numeric value is the `sluice_agent_drain_phase` metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    Serving = 0,
    Quiescing = 1,
    Closing = 2,
    Drained = 3,
}

impl Phase {
    pub fn as_i64(self) -> i64 {
        self as i64
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Serving => "serving",
            Phase::Quiescing => "quiescing",
            Phase::Closing => "closing",
            Phase::Drained => "drained",
        }
    }
}

/// How the drain ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Every connection was gone before the deadline.
    Complete,
    /// The drain deadline passed with connections left.
    TimedOut,
    /// A second termination signal ended it early.
    Forced,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrainConfig {
    pub quiet_period: Duration,
    pub propagation_timeout: Duration,
    pub drain_timeout: Duration,
}

impl Default for DrainConfig {
    fn default() -> Self {
        DrainConfig {
            quiet_period: Duration::from_secs(2),
            propagation_timeout: Duration::from_secs(60),
            drain_timeout: Duration::from_secs(90),
        }
    }
}

/// What the driver sees of the connections at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Observation {
    /// Connections established now.
    pub active: usize,
    /// When the newest connection was accepted (or first seen), if any.
    pub last_new_connection: Option<Instant>,
}

/// A phase change produced by [`DrainMachine::step`], for the driver to act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// Quiet (or the propagation timeout) reached: start closing connections.
    StartClosing { quiet_reached: bool },
    /// Drain over; `outcome` says how.
    Drained(Outcome),
}

#[derive(Debug, Clone)]
pub struct DrainMachine {
    cfg: DrainConfig,
    phase: Phase,
    started: Option<Instant>,
    closing_at: Option<Instant>,
    drained_at: Option<Instant>,
    outcome: Option<Outcome>,
    quiet_reached: bool,
    active_at_start: usize,
    active_at_closing: usize,
    active_at_end: usize,
    new_during_drain: u64,
    last_seen_new: Option<Instant>,
}

/// Timings and counts of one drain, as `/drain` answers them.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DrainReport {
    pub phase: Phase,
    pub outcome: Option<Outcome>,
    /// Whether quiet was observed (false: the propagation timeout ended quiescing).
    pub quiet_reached: bool,
    pub quiesce_seconds: Option<f64>,
    pub closing_seconds: Option<f64>,
    pub total_seconds: Option<f64>,
    pub connections_at_start: usize,
    pub connections_at_closing: usize,
    pub connections_remaining: usize,
    pub new_connections_during_drain: u64,
}

impl DrainMachine {
    pub fn new(cfg: DrainConfig) -> Self {
        DrainMachine {
            cfg,
            phase: Phase::Serving,
            started: None,
            closing_at: None,
            drained_at: None,
            outcome: None,
            quiet_reached: false,
            active_at_start: 0,
            active_at_closing: 0,
            active_at_end: 0,
            new_during_drain: 0,
            last_seen_new: None,
        }
    }

    pub fn config(&self) -> &DrainConfig {
        &self.cfg
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    pub fn started(&self) -> Option<Instant> {
        self.started
    }

    /// The drain deadline, once the drain began.
    pub fn deadline(&self) -> Option<Instant> {
        self.started.map(|s| s + self.cfg.drain_timeout)
    }

    /// Starts the drain. Returns false (and changes nothing) if it already began.
    pub fn begin(&mut self, now: Instant, obs: Observation) -> bool {
        if self.phase != Phase::Serving {
            return false;
        }
        self.phase = Phase::Quiescing;
        self.started = Some(now);
        self.active_at_start = obs.active;
        self.last_seen_new = obs.last_new_connection;
        true
    }

    /// Ends the drain at once (second SIGTERM). Returns the transition if it changed anything.
    pub fn force(&mut self, now: Instant, obs: Observation) -> Option<Transition> {
        match self.phase {
            Phase::Drained => None,
            Phase::Serving => {
                self.begin(now, obs);
                Some(self.finish(now, obs.active, Outcome::Forced))
            }
            _ => Some(self.finish(now, obs.active, Outcome::Forced)),
        }
    }

    fn finish(&mut self, now: Instant, active: usize, outcome: Outcome) -> Transition {
        if self.closing_at.is_none() {
            self.closing_at = Some(now);
            self.active_at_closing = active;
        }
        self.phase = Phase::Drained;
        self.drained_at = Some(now);
        self.outcome = Some(outcome);
        self.active_at_end = active;
        Transition::Drained(outcome)
    }

    /// When quiet would be reached given what has been seen so far.
    fn quiet_at(&self) -> Option<Instant> {
        let start = self.started?;
        let from = match self.last_seen_new {
            Some(t) if t > start => t,
            _ => start,
        };
        Some(from + self.cfg.quiet_period)
    }

    /// A connection that arrives after closing began proves that a load balancer still
    /// sends new connections here (a slow one: its view is older than the unserve). Such
    /// stragglers are served and sent away; the drain then does not end before the load
    /// balancer had as long again to catch up as it has been seen lagging: until the last
    /// straggler plus the time from the drain's start to it (at least `quiet_period`).
    /// Ending earlier would let the next reconnects that the load balancer still sends
    /// here (another pod's drain, say) find a dead pod. `None`: no straggler came.
    fn linger_until(&self) -> Option<Instant> {
        let (start, closing, last) = (self.started?, self.closing_at?, self.last_seen_new?);
        if last < closing {
            return None;
        }
        let lag = last.saturating_duration_since(start);
        Some(last + lag.max(self.cfg.quiet_period))
    }

    /// Advances the machine. Call it whenever time passes or the observation changes; at
    /// most one transition happens per call, so call again until it returns `None`.
    pub fn step(&mut self, now: Instant, obs: Observation) -> Option<Transition> {
        let start = self.started?;
        if let Some(t) = obs.last_new_connection
            && self.last_seen_new.is_none_or(|prev| t > prev)
        {
            if t >= start && self.phase != Phase::Drained {
                self.new_during_drain += 1;
            }
            self.last_seen_new = Some(t);
        }
        match self.phase {
            Phase::Serving | Phase::Drained => None,
            Phase::Quiescing => {
                if now >= start + self.cfg.drain_timeout {
                    return Some(self.finish(now, obs.active, Outcome::TimedOut));
                }
                let quiet = self.quiet_at().is_some_and(|q| now >= q);
                let propagation_over = now >= start + self.cfg.propagation_timeout;
                if quiet || propagation_over {
                    self.quiet_reached = quiet;
                    self.phase = Phase::Closing;
                    self.closing_at = Some(now);
                    self.active_at_closing = obs.active;
                    Some(Transition::StartClosing {
                        quiet_reached: quiet,
                    })
                } else {
                    None
                }
            }
            Phase::Closing => {
                let lingering = self.linger_until().is_some_and(|l| now < l);
                if obs.active == 0 && !lingering {
                    Some(self.finish(now, 0, Outcome::Complete))
                } else if now >= start + self.cfg.drain_timeout {
                    let outcome = if obs.active == 0 {
                        Outcome::Complete
                    } else {
                        Outcome::TimedOut
                    };
                    Some(self.finish(now, obs.active, outcome))
                } else {
                    None
                }
            }
        }
    }

    /// The next moment at which `step` could change something without a new observation.
    pub fn next_wakeup(&self) -> Option<Instant> {
        let deadline = self.deadline()?;
        match self.phase {
            Phase::Quiescing => {
                let prop = self.started? + self.cfg.propagation_timeout;
                let quiet = self.quiet_at()?;
                Some(quiet.min(prop).min(deadline))
            }
            Phase::Closing => Some(match self.linger_until() {
                Some(l) => l.min(deadline),
                None => deadline,
            }),
            _ => None,
        }
    }

    pub fn report(&self, now: Instant, active: usize) -> DrainReport {
        let secs = |a: Option<Instant>, b: Option<Instant>| match (a, b) {
            (Some(a), Some(b)) => Some(b.saturating_duration_since(a).as_secs_f64()),
            (Some(a), None) => Some(now.saturating_duration_since(a).as_secs_f64()),
            _ => None,
        };
        DrainReport {
            phase: self.phase,
            outcome: self.outcome,
            quiet_reached: self.quiet_reached,
            quiesce_seconds: secs(self.started, self.closing_at),
            closing_seconds: secs(self.closing_at, self.drained_at),
            total_seconds: secs(self.started, self.drained_at),
            connections_at_start: self.active_at_start,
            connections_at_closing: self.active_at_closing,
            connections_remaining: if self.phase == Phase::Drained {
                self.active_at_end
            } else {
                active
            },
            new_connections_during_drain: self.new_during_drain,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> DrainConfig {
        DrainConfig {
            quiet_period: Duration::from_secs(2),
            propagation_timeout: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(30),
        }
    }

    fn obs(active: usize, last: Option<Instant>) -> Observation {
        Observation {
            active,
            last_new_connection: last,
        }
    }

    const S: fn(u64) -> Duration = Duration::from_secs;
    const MS: fn(u64) -> Duration = Duration::from_millis;

    #[test]
    fn serving_until_begin() {
        let t0 = Instant::now();
        let mut m = DrainMachine::new(cfg());
        assert_eq!(m.phase(), Phase::Serving);
        assert_eq!(m.step(t0 + S(100), obs(5, Some(t0))), None);
        assert_eq!(m.phase(), Phase::Serving);
        assert_eq!(m.next_wakeup(), None);
        assert_eq!(m.deadline(), None);
    }

    #[test]
    fn begin_is_idempotent() {
        let t0 = Instant::now();
        let mut m = DrainMachine::new(cfg());
        assert!(m.begin(t0, obs(3, None)));
        assert!(!m.begin(t0 + S(1), obs(3, None)));
        assert_eq!(m.started(), Some(t0));
        assert_eq!(m.phase(), Phase::Quiescing);
    }

    #[test]
    fn quiet_after_quiet_period_without_new_connections() {
        let t0 = Instant::now();
        let mut m = DrainMachine::new(cfg());
        m.begin(t0, obs(3, Some(t0 - S(10))));
        assert_eq!(m.step(t0 + MS(1999), obs(3, Some(t0 - S(10)))), None);
        assert_eq!(
            m.step(t0 + S(2), obs(3, Some(t0 - S(10)))),
            Some(Transition::StartClosing {
                quiet_reached: true
            })
        );
        assert_eq!(m.phase(), Phase::Closing);
        let r = m.report(t0 + S(2), 3);
        assert_eq!(r.quiesce_seconds, Some(2.0));
        assert!(r.quiet_reached);
        assert_eq!(r.new_connections_during_drain, 0);
    }

    #[test]
    fn new_connection_restarts_quiet_window() {
        let t0 = Instant::now();
        let mut m = DrainMachine::new(cfg());
        m.begin(t0, obs(1, None));
        let t1 = t0 + MS(1500);
        assert_eq!(m.step(t1, obs(2, Some(t1))), None);
        assert_eq!(m.next_wakeup(), Some(t1 + S(2)));
        assert_eq!(m.step(t0 + MS(3000), obs(2, Some(t1))), None);
        assert!(matches!(
            m.step(t1 + S(2), obs(2, Some(t1))),
            Some(Transition::StartClosing { .. })
        ));
        assert_eq!(m.report(t1 + S(2), 2).new_connections_during_drain, 1);
    }

    #[test]
    fn new_connections_counted_once_each_observation() {
        let t0 = Instant::now();
        let mut m = DrainMachine::new(cfg());
        m.begin(t0, obs(1, None));
        for i in 1..=5u64 {
            let t = t0 + MS(100 * i);
            m.step(t, obs(1, Some(t)));
            m.step(t, obs(1, Some(t)));
        }
        assert_eq!(m.report(t0 + S(1), 1).new_connections_during_drain, 5);
    }

    #[test]
    fn propagation_timeout_bounds_quiescing() {
        let t0 = Instant::now();
        let mut m = DrainMachine::new(cfg());
        m.begin(t0, obs(1, None));
        let mut t = t0;
        // A connection every second: never quiet.
        while t < t0 + S(10) {
            assert_eq!(m.step(t, obs(1, Some(t))), None, "at {:?}", t - t0);
            t += S(1);
        }
        assert_eq!(
            m.step(t0 + S(10), obs(1, Some(t0 + S(10) - MS(1)))),
            Some(Transition::StartClosing {
                quiet_reached: false
            })
        );
        assert!(!m.report(t0 + S(10), 1).quiet_reached);
    }

    #[test]
    fn closing_ends_when_no_connection_left() {
        let t0 = Instant::now();
        let mut m = DrainMachine::new(cfg());
        m.begin(t0, obs(2, None));
        m.step(t0 + S(2), obs(2, None));
        assert_eq!(m.step(t0 + S(3), obs(1, None)), None);
        assert_eq!(
            m.step(t0 + S(4), obs(0, None)),
            Some(Transition::Drained(Outcome::Complete))
        );
        assert_eq!(m.phase(), Phase::Drained);
        let r = m.report(t0 + S(100), 0);
        assert_eq!(r.outcome, Some(Outcome::Complete));
        assert_eq!(r.closing_seconds, Some(2.0));
        assert_eq!(r.total_seconds, Some(4.0));
        assert_eq!(r.connections_at_start, 2);
        assert_eq!(r.connections_remaining, 0);
    }

    #[test]
    fn zero_connections_drains_right_after_quiet() {
        let t0 = Instant::now();
        let mut m = DrainMachine::new(cfg());
        m.begin(t0, obs(0, None));
        assert!(matches!(
            m.step(t0 + S(2), obs(0, None)),
            Some(Transition::StartClosing { .. })
        ));
        assert_eq!(
            m.step(t0 + S(2), obs(0, None)),
            Some(Transition::Drained(Outcome::Complete))
        );
    }

    #[test]
    fn deadline_in_closing_times_out() {
        let t0 = Instant::now();
        let mut m = DrainMachine::new(cfg());
        m.begin(t0, obs(5, None));
        m.step(t0 + S(2), obs(5, None));
        assert_eq!(m.next_wakeup(), Some(t0 + S(30)));
        assert_eq!(m.step(t0 + S(29), obs(5, None)), None);
        assert_eq!(
            m.step(t0 + S(30), obs(4, None)),
            Some(Transition::Drained(Outcome::TimedOut))
        );
        assert_eq!(m.report(t0 + S(30), 4).connections_remaining, 4);
    }

    #[test]
    fn deadline_shorter_than_propagation_timeout_wins() {
        let t0 = Instant::now();
        let mut m = DrainMachine::new(DrainConfig {
            quiet_period: S(5),
            propagation_timeout: S(60),
            drain_timeout: S(3),
        });
        m.begin(t0, obs(1, None));
        assert_eq!(m.next_wakeup(), Some(t0 + S(3)));
        assert_eq!(
            m.step(t0 + S(3), obs(1, None)),
            Some(Transition::Drained(Outcome::TimedOut))
        );
    }

    #[test]
    fn force_ends_any_phase() {
        let t0 = Instant::now();
        let mut m = DrainMachine::new(cfg());
        assert_eq!(
            m.force(t0, obs(2, None)),
            Some(Transition::Drained(Outcome::Forced))
        );
        assert_eq!(m.force(t0, obs(2, None)), None);

        let mut m = DrainMachine::new(cfg());
        m.begin(t0, obs(2, None));
        assert_eq!(
            m.force(t0 + S(1), obs(2, None)),
            Some(Transition::Drained(Outcome::Forced))
        );
        assert_eq!(m.report(t0 + S(1), 2).outcome, Some(Outcome::Forced));
    }

    #[test]
    fn drained_is_terminal() {
        let t0 = Instant::now();
        let mut m = DrainMachine::new(cfg());
        m.begin(t0, obs(0, None));
        m.step(t0 + S(2), obs(0, None));
        m.step(t0 + S(2), obs(0, None));
        assert_eq!(m.phase(), Phase::Drained);
        assert_eq!(m.step(t0 + S(50), obs(7, Some(t0 + S(49)))), None);
        assert_eq!(m.phase(), Phase::Drained);
        assert!(!m.begin(t0 + S(51), obs(0, None)));
        assert_eq!(m.next_wakeup(), None);
    }

    #[test]
    fn next_wakeup_in_quiescing_is_the_earliest_of_quiet_propagation_deadline() {
        let t0 = Instant::now();
        let mut m = DrainMachine::new(cfg());
        m.begin(t0, obs(0, None));
        assert_eq!(m.next_wakeup(), Some(t0 + S(2)));
        let mut m = DrainMachine::new(DrainConfig {
            quiet_period: S(20),
            propagation_timeout: S(5),
            drain_timeout: S(30),
        });
        m.begin(t0, obs(0, None));
        assert_eq!(m.next_wakeup(), Some(t0 + S(5)));
    }

    #[test]
    fn old_connection_before_start_does_not_delay_quiet() {
        let t0 = Instant::now();
        let mut m = DrainMachine::new(cfg());
        m.begin(t0, obs(1, Some(t0 - MS(500))));
        assert!(matches!(
            m.step(t0 + S(2), obs(1, Some(t0 - MS(500)))),
            Some(Transition::StartClosing {
                quiet_reached: true
            })
        ));
    }

    #[test]
    fn stragglers_during_closing_make_the_drain_linger() {
        let t0 = Instant::now();
        let mut m = DrainMachine::new(cfg());
        m.begin(t0, obs(2, None));
        assert!(matches!(
            m.step(t0 + S(2), obs(2, None)),
            Some(Transition::StartClosing { .. })
        ));
        // A reconnect lands here 3 s after the start: the load balancer still sends here.
        let straggler = t0 + S(3);
        assert_eq!(m.step(t0 + S(3), obs(1, Some(straggler))), None);
        // Every connection is gone, but the drain lingers: until 3 s + 3 s.
        assert_eq!(m.step(t0 + S(4), obs(0, Some(straggler))), None);
        assert_eq!(m.phase(), Phase::Closing);
        assert_eq!(m.next_wakeup(), Some(t0 + S(6)));
        // Another straggler at 5 s pushes it to 10 s.
        let later = t0 + S(5);
        assert_eq!(m.step(t0 + S(5), obs(1, Some(later))), None);
        assert_eq!(m.step(t0 + S(8), obs(0, Some(later))), None);
        assert_eq!(
            m.step(t0 + S(10), obs(0, Some(later))),
            Some(Transition::Drained(Outcome::Complete))
        );
        assert_eq!(m.report(t0 + S(10), 0).new_connections_during_drain, 2);
    }

    #[test]
    fn lingering_ends_at_the_deadline_as_complete_when_nothing_is_left() {
        let t0 = Instant::now();
        let mut m = DrainMachine::new(cfg());
        m.begin(t0, obs(1, None));
        m.step(t0 + S(2), obs(1, None));
        let straggler = t0 + S(20);
        assert_eq!(m.step(t0 + S(20), obs(0, Some(straggler))), None);
        assert_eq!(m.next_wakeup(), Some(t0 + S(30)));
        assert_eq!(
            m.step(t0 + S(30), obs(0, Some(straggler))),
            Some(Transition::Drained(Outcome::Complete))
        );
    }

    #[test]
    fn no_straggler_no_linger() {
        let t0 = Instant::now();
        let mut m = DrainMachine::new(cfg());
        m.begin(t0, obs(1, Some(t0 - S(1))));
        m.step(t0 + S(2), obs(1, Some(t0 - S(1))));
        assert_eq!(
            m.step(t0 + MS(2100), obs(0, Some(t0 - S(1)))),
            Some(Transition::Drained(Outcome::Complete))
        );
    }

    #[test]
    fn phase_numbers_are_the_metric_values() {
        assert_eq!(Phase::Serving.as_i64(), 0);
        assert_eq!(Phase::Quiescing.as_i64(), 1);
        assert_eq!(Phase::Closing.as_i64(), 2);
        assert_eq!(Phase::Drained.as_i64(), 3);
        assert!(Phase::Closing > Phase::Quiescing);
    }

    #[test]
    fn report_serializes() {
        let t0 = Instant::now();
        let mut m = DrainMachine::new(cfg());
        m.begin(t0, obs(0, None));
        let j = serde_json::to_value(m.report(t0, 0)).unwrap();
        assert_eq!(j["phase"], "quiescing");
        assert!(j["outcome"].is_null());
    }
}
