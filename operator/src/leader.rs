//! Leader election on a `coordination.k8s.io/v1` Lease, so that with several operator
//! replicas at most one acts at a time. The protocol is client-go's:
//!
//! - the holder renews the Lease every `retry_period`;
//! - every attempt (a read and a write of the Lease) is bounded by a timeout, so a stalled
//!   API server cannot hold an attempt for minutes;
//! - a leader whose last successful renewal *started* more than `renew_deadline` ago stops
//!   leading (`renew_deadline` < `lease_duration`): it has stopped acting before anyone
//!   else may take over;
//! - a candidate judges expiry on its own monotonic clock: it takes an unreleased Lease
//!   only once the Lease's record has not changed for `leaseDurationSeconds` since it first
//!   saw that record. The holder's `renewTime` (another machine's wall clock) is never
//!   compared with ours;
//! - writes carry the resourceVersion, so two candidates can never both win a term.
//!
//! The decisions are [`Election`], a pure state machine driven with explicit instants;
//! [`LeaderElector`] runs it against the API server.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ObjectMeta, PostParams};
use tokio::sync::watch;

#[derive(Clone, Debug)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    /// This candidate's identity, usually the pod name.
    pub identity: String,
    /// How long others wait, after the Lease last changed, before taking it over.
    pub lease_duration: Duration,
    /// A leader that could not renew for this long stops leading. Below `lease_duration`.
    pub renew_deadline: Duration,
    /// How often the holder renews and a candidate retries. Below `renew_deadline`.
    pub retry_period: Duration,
}

impl LeaseConfig {
    /// Checks the relations client-go enforces: `retry_period < renew_deadline <
    /// lease_duration`, all above zero, and the lease at least one second (the Lease
    /// stores whole seconds).
    pub fn validate(&self) -> Result<(), LeaderError> {
        let bad = |why: &str| Err(LeaderError::Config(why.to_string()));
        if self.retry_period.is_zero() {
            return bad("the retry period must be above 0");
        }
        if self.lease_duration < Duration::from_secs(1) {
            return bad("the lease duration must be at least 1s");
        }
        if self.renew_deadline >= self.lease_duration {
            return bad("the renew deadline must be below the lease duration");
        }
        if self.retry_period >= self.renew_deadline {
            return bad("the retry period must be below the renew deadline");
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    #[error("Lease API call failed: {0}")]
    Kube(#[from] kube::Error),
    #[error("Lease API call timed out after {0:?}")]
    Timeout(Duration),
    #[error("invalid leader election settings: {0}")]
    Config(String),
}

/// What the state machine wants written, given the Lease as read.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    /// No Lease: create it, holding it.
    Create,
    /// We hold it: write a new `renewTime`.
    Renew,
    /// Free, released or expired by our own clock: take it (a new term).
    Acquire { transitions: i32 },
    /// Another holder, not expired: do nothing.
    Follow { holder: String },
}

/// The part of a Lease whose change proves its holder alive.
#[derive(Clone, Debug, PartialEq)]
struct Record {
    holder: Option<String>,
    renew_time: Option<MicroTime>,
    acquire_time: Option<MicroTime>,
    transitions: Option<i32>,
    duration_seconds: Option<i32>,
}

impl Record {
    fn of(spec: &LeaseSpec) -> Self {
        Self {
            holder: spec.holder_identity.clone().filter(|h| !h.is_empty()),
            renew_time: spec.renew_time.clone(),
            acquire_time: spec.acquire_time.clone(),
            transitions: spec.lease_transitions,
            duration_seconds: spec.lease_duration_seconds,
        }
    }
}

/// The election's memory, as client-go's `LeaderElector` keeps it: the last record seen
/// and when (on this process's monotonic clock) it was first seen, and when the last
/// successful write of ours as holder started.
#[derive(Clone, Debug)]
pub struct Election {
    identity: String,
    lease_duration: Duration,
    renew_deadline: Duration,
    observed: Option<(Record, Instant)>,
    /// Start of the last attempt that left us holding the Lease.
    held_since_attempt: Option<Instant>,
}

impl Election {
    pub fn new(cfg: &LeaseConfig) -> Self {
        Self {
            identity: cfg.identity.clone(),
            lease_duration: cfg.lease_duration,
            renew_deadline: cfg.renew_deadline,
            observed: None,
            held_since_attempt: None,
        }
    }

    /// Records the Lease as read at `now` and says what to write.
    pub fn decide(&mut self, lease: Option<&LeaseSpec>, now: Instant) -> Decision {
        let Some(spec) = lease else {
            self.observed = None;
            return Decision::Create;
        };
        let record = Record::of(spec);
        let seen_at = match &self.observed {
            Some((prev, at)) if *prev == record => *at,
            _ => now,
        };
        self.observed = Some((record.clone(), seen_at));
        let transitions = record.transitions.unwrap_or(0);
        match record.holder.as_deref() {
            Some(h) if h == self.identity => Decision::Renew,
            None => Decision::Acquire {
                transitions: transitions.saturating_add(1),
            },
            Some(holder) => {
                let duration = record
                    .duration_seconds
                    .filter(|s| *s > 0)
                    .map(|s| Duration::from_secs(s as u64))
                    .unwrap_or(self.lease_duration);
                if now.saturating_duration_since(seen_at) >= duration {
                    Decision::Acquire {
                        transitions: transitions.saturating_add(1),
                    }
                } else {
                    Decision::Follow {
                        holder: holder.to_string(),
                    }
                }
            }
        }
    }

    /// The write an attempt started at `started` made us the holder. What we wrote is
    /// the record others now watch change, so it counts as observed.
    pub fn held(&mut self, started: Instant, written: &LeaseSpec) {
        self.held_since_attempt = Some(started);
        self.observed = Some((Record::of(written), started));
    }

    /// Someone else holds the Lease (a lost write race, or a Follow decision).
    pub fn not_held(&mut self) {
        self.held_since_attempt = None;
    }

    /// Whether we may act at `now`: our last successful renewal started less than
    /// `renew_deadline` ago. Others wait `lease_duration` (> `renew_deadline`) from when
    /// they saw that write, which happened after it started.
    pub fn leading(&self, now: Instant) -> bool {
        self.held_since_attempt
            .is_some_and(|t| now.saturating_duration_since(t) < self.renew_deadline)
    }

    /// How long the next attempt may take: a leader's attempt must end by its renew
    /// deadline; a candidate's is bounded by the renew deadline as well.
    pub fn attempt_budget(&self, now: Instant) -> Duration {
        match self.held_since_attempt {
            Some(t) => (t + self.renew_deadline).saturating_duration_since(now),
            None => self.renew_deadline,
        }
    }
}

/// Runs the election against the API server.
pub struct LeaderElector {
    api: Api<Lease>,
    cfg: LeaseConfig,
}

impl LeaderElector {
    pub fn new(client: kube::Client, cfg: LeaseConfig) -> Result<Self, LeaderError> {
        cfg.validate()?;
        Ok(Self {
            api: Api::namespaced(client, &cfg.namespace),
            cfg,
        })
    }

    /// Tries to acquire or renew every `retry_period` and publishes whether this candidate
    /// leads. Returns once a leader has lost the Lease or could not renew it within the
    /// renew deadline (it has published `false` by then): the caller must stop acting, and
    /// should exit so that a fresh start re-joins as a candidate.
    pub async fn run(&self, leading: watch::Sender<bool>) {
        let mut election = Election::new(&self.cfg);
        let mut was_leading = false;
        loop {
            let started = Instant::now();
            let budget = election.attempt_budget(started);
            let result = if budget.is_zero() {
                Err(LeaderError::Timeout(budget))
            } else {
                match tokio::time::timeout(budget, self.attempt(&mut election, started)).await {
                    Ok(r) => r,
                    Err(_) => Err(LeaderError::Timeout(budget)),
                }
            };
            if let Err(err) = &result {
                tracing::warn!(lease = %self.cfg.name, error = %err, "leader election attempt failed");
            }
            let now = Instant::now();
            let is_leading = election.leading(now);
            if is_leading && !was_leading {
                tracing::info!(lease = %self.cfg.name, identity = %self.cfg.identity, "acquired the Lease");
                leading.send_replace(true);
            }
            if was_leading && !is_leading {
                tracing::error!(
                    lease = %self.cfg.name,
                    identity = %self.cfg.identity,
                    renew_deadline = ?self.cfg.renew_deadline,
                    "lost the Lease or could not renew it within the renew deadline: stop acting"
                );
                leading.send_replace(false);
                return;
            }
            was_leading = is_leading;
            // Sleep until the next retry, but wake at the renew deadline: a leader stops
            // acting then even if no attempt is under way.
            let mut pause = self.cfg.retry_period;
            if is_leading {
                pause = pause.min(election.attempt_budget(Instant::now()));
            }
            tokio::time::sleep(pause).await;
        }
    }

    /// One read and (maybe) one write; the caller bounds it with a timeout.
    async fn attempt(&self, election: &mut Election, started: Instant) -> Result<(), LeaderError> {
        let lease = self.api.get_opt(&self.cfg.name).await?;
        let decision = election.decide(lease.as_ref().and_then(|l| l.spec.as_ref()), started);
        let now = Timestamp::now();
        let spec = match (&decision, &lease) {
            (Decision::Follow { .. }, _) => {
                election.not_held();
                return Ok(());
            }
            (Decision::Create, _) => self.spec_for_new_term(now, 0),
            (Decision::Acquire { transitions }, _) => self.spec_for_new_term(now, *transitions),
            (Decision::Renew, Some(l)) => LeaseSpec {
                renew_time: Some(MicroTime(now)),
                lease_duration_seconds: Some(lease_seconds(self.cfg.lease_duration)),
                ..l.spec.clone().unwrap_or_default()
            },
            (Decision::Renew, None) => unreachable!("Renew is decided only for an existing Lease"),
        };
        let written = match lease {
            None => {
                let new = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.cfg.name.clone()),
                        ..Default::default()
                    },
                    spec: Some(spec.clone()),
                };
                self.api.create(&PostParams::default(), &new).await
            }
            Some(mut l) => {
                l.spec = Some(spec.clone());
                // replace() sends the resourceVersion read: a concurrent writer makes this
                // a 409.
                self.api
                    .replace(&self.cfg.name, &PostParams::default(), &l)
                    .await
            }
        };
        match written {
            Ok(_) => {
                election.held(started, &spec);
                Ok(())
            }
            Err(kube::Error::Api(s)) if s.code == 409 => {
                election.not_held();
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Gives the Lease up (on clean shutdown, after the controllers stopped) so a standby
    /// takes over at once. Bounded by the renew deadline.
    pub async fn release(&self) -> Result<(), LeaderError> {
        let budget = self.cfg.renew_deadline;
        tokio::time::timeout(budget, async {
            if let Some(mut lease) = self.api.get_opt(&self.cfg.name).await? {
                let spec = lease.spec.clone().unwrap_or_default();
                if spec.holder_identity.as_deref() == Some(self.cfg.identity.as_str()) {
                    lease.spec = Some(LeaseSpec {
                        holder_identity: None,
                        renew_time: Some(MicroTime(Timestamp::now())),
                        ..spec
                    });
                    self.api
                        .replace(&self.cfg.name, &PostParams::default(), &lease)
                        .await?;
                }
            }
            Ok(())
        })
        .await
        .map_err(|_| LeaderError::Timeout(budget))?
    }

    fn spec_for_new_term(&self, now: Timestamp, transitions: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.cfg.identity.clone()),
            lease_duration_seconds: Some(lease_seconds(self.cfg.lease_duration)),
            acquire_time: Some(MicroTime(now)),
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(transitions),
            ..Default::default()
        }
    }
}

/// The Lease stores whole seconds; round up so others never wait less than we assume.
fn lease_seconds(d: Duration) -> i32 {
    let s = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    i32::try_from(s.max(1)).unwrap_or(i32::MAX)
}

#[cfg(test)]
mod tests {
    use k8s_openapi::jiff::SignedDuration;

    use super::*;

    fn cfg() -> LeaseConfig {
        LeaseConfig {
            namespace: "ns".into(),
            name: "lease".into(),
            identity: "me".into(),
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }

    fn held_by(holder: &str, renewed: Timestamp) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(holder.into()),
            renew_time: Some(MicroTime(renewed)),
            acquire_time: Some(MicroTime(renewed)),
            lease_duration_seconds: Some(15),
            lease_transitions: Some(3),
            ..Default::default()
        }
    }

    const S: fn(u64) -> Duration = Duration::from_secs;

    #[test]
    fn settings_follow_client_go_relations() {
        assert!(cfg().validate().is_ok());
        for bad in [
            LeaseConfig {
                renew_deadline: S(15),
                ..cfg()
            },
            LeaseConfig {
                retry_period: S(10),
                ..cfg()
            },
            LeaseConfig {
                retry_period: Duration::ZERO,
                ..cfg()
            },
            LeaseConfig {
                lease_duration: Duration::from_millis(500),
                renew_deadline: Duration::from_millis(400),
                retry_period: Duration::from_millis(100),
                ..cfg()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn no_lease_is_created_and_a_released_one_is_taken_at_once() {
        let t0 = Instant::now();
        let mut e = Election::new(&cfg());
        assert_eq!(e.decide(None, t0), Decision::Create);
        let released = LeaseSpec {
            holder_identity: None,
            ..held_by("other", Timestamp::now())
        };
        assert_eq!(
            e.decide(Some(&released), t0),
            Decision::Acquire { transitions: 4 }
        );
    }

    /// The holder's timestamps are another machine's clock: a `renewTime` an hour old
    /// does not make the Lease expired before we watched it unchanged for the duration.
    #[test]
    fn expiry_is_judged_on_our_clock_not_on_the_holders_timestamps() {
        let t0 = Instant::now();
        let mut e = Election::new(&cfg());
        let stale = held_by("other", Timestamp::now() - SignedDuration::from_secs(3600));
        assert!(matches!(
            e.decide(Some(&stale), t0),
            Decision::Follow { .. }
        ));
        assert!(matches!(
            e.decide(Some(&stale), t0 + S(14)),
            Decision::Follow { .. }
        ));
        assert_eq!(
            e.decide(Some(&stale), t0 + S(15)),
            Decision::Acquire { transitions: 4 }
        );

        // A renewTime in the future (a fast clock) does not hold the Lease forever.
        let mut e = Election::new(&cfg());
        let future = held_by("other", Timestamp::now() + SignedDuration::from_secs(3600));
        assert!(matches!(
            e.decide(Some(&future), t0),
            Decision::Follow { .. }
        ));
        assert_eq!(
            e.decide(Some(&future), t0 + S(15)),
            Decision::Acquire { transitions: 4 }
        );
    }

    #[test]
    fn every_change_of_the_record_restarts_the_wait() {
        let t0 = Instant::now();
        let mut e = Election::new(&cfg());
        let renewed = Timestamp::now();
        e.decide(Some(&held_by("other", renewed)), t0);
        // Renewed at t0+10s: the wait restarts from there.
        let again = held_by("other", renewed + SignedDuration::from_secs(10));
        assert!(matches!(
            e.decide(Some(&again), t0 + S(10)),
            Decision::Follow { .. }
        ));
        assert!(matches!(
            e.decide(Some(&again), t0 + S(24)),
            Decision::Follow { .. }
        ));
        assert!(matches!(
            e.decide(Some(&again), t0 + S(25)),
            Decision::Acquire { .. }
        ));
    }

    #[test]
    fn the_holders_lease_duration_is_used_when_it_says_one() {
        let t0 = Instant::now();
        let mut e = Election::new(&cfg());
        let long = LeaseSpec {
            lease_duration_seconds: Some(60),
            ..held_by("other", Timestamp::now())
        };
        e.decide(Some(&long), t0);
        assert!(matches!(
            e.decide(Some(&long), t0 + S(59)),
            Decision::Follow { .. }
        ));
        assert!(matches!(
            e.decide(Some(&long), t0 + S(60)),
            Decision::Acquire { .. }
        ));
    }

    /// A leader stops at the renew deadline counted from the start of its last successful
    /// renewal; a standby that saw that renewal (after it started) waits the longer lease
    /// duration. So the two never lead at once, whatever the API server's delays.
    #[test]
    fn a_leader_stops_before_a_standby_may_take_over() {
        let t0 = Instant::now();
        let c = cfg();
        let mut leader = Election::new(&c);
        let mut standby = Election::new(&LeaseConfig {
            identity: "standby".into(),
            ..c.clone()
        });
        let written = held_by("me", Timestamp::now());
        // The leader's renewal starts at t0 and takes 3 s to come back; the standby sees it
        // at t0 + 1 s (when the API server applied it).
        assert_eq!(leader.decide(Some(&written), t0), Decision::Renew);
        leader.held(t0, &written);
        assert!(matches!(
            standby.decide(Some(&written), t0 + S(1)),
            Decision::Follow { .. }
        ));
        // Then the API server stalls: nothing changes any more.
        let mut first_standby_acquire = None;
        let mut last_leading = None;
        for ms in (0..40_000).step_by(100) {
            let now = t0 + Duration::from_millis(ms);
            if leader.leading(now) {
                last_leading = Some(now);
            }
            if now >= t0 + S(1)
                && first_standby_acquire.is_none()
                && matches!(
                    standby.decide(Some(&written), now),
                    Decision::Acquire { .. }
                )
            {
                first_standby_acquire = Some(now);
            }
        }
        let last_leading = last_leading.unwrap();
        let acquire = first_standby_acquire.unwrap();
        assert!(last_leading < t0 + c.renew_deadline);
        assert!(acquire >= t0 + S(1) + c.lease_duration);
        assert!(last_leading < acquire);
    }

    #[test]
    fn attempts_of_a_leader_end_by_its_renew_deadline() {
        let t0 = Instant::now();
        let mut e = Election::new(&cfg());
        assert_eq!(
            e.attempt_budget(t0),
            S(10),
            "a candidate gets the renew deadline"
        );
        e.held(t0, &held_by("me", Timestamp::now()));
        assert!(e.leading(t0 + S(9)));
        assert_eq!(e.attempt_budget(t0 + S(4)), S(6));
        assert!(!e.leading(t0 + S(10)));
        assert_eq!(e.attempt_budget(t0 + S(11)), Duration::ZERO);
        // A successful renewal moves the deadline.
        e.held(t0 + S(8), &held_by("me", Timestamp::now()));
        assert!(e.leading(t0 + S(17)));
        // A lost write race ends leadership at once.
        e.not_held();
        assert!(!e.leading(t0 + S(9)));
    }

    #[test]
    fn lease_seconds_round_up() {
        assert_eq!(lease_seconds(Duration::from_millis(2500)), 3);
        assert_eq!(lease_seconds(S(15)), 15);
        assert_eq!(lease_seconds(Duration::from_millis(10)), 1);
    }
}
