//! Leader election on a `coordination.k8s.io/v1` Lease, so that with several operator
//! replicas exactly one acts. The protocol is client-go's: the holder renews `renewTime`
//! every `retry_period`; a candidate takes the Lease only once `renewTime +
//! leaseDurationSeconds` has passed. Writes use the Lease's resourceVersion, so two
//! candidates can never both win the same term.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, ObjectMeta, PostParams};
use tokio::sync::watch;

#[derive(Clone, Debug)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    /// This candidate's identity, usually the pod name.
    pub identity: String,
    pub lease_duration: Duration,
    /// How often the holder renews and a candidate retries.
    pub retry_period: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    #[error("Lease API call failed: {0}")]
    Kube(#[from] kube::Error),
}

/// What one attempt found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attempt {
    /// We hold the Lease (just acquired or renewed).
    Leading,
    /// Someone else holds an unexpired Lease.
    Following,
}

pub struct LeaderElector {
    api: Api<Lease>,
    cfg: LeaseConfig,
}

impl LeaderElector {
    pub fn new(client: kube::Client, cfg: LeaseConfig) -> Self {
        Self {
            api: Api::namespaced(client, &cfg.namespace),
            cfg,
        }
    }

    /// Runs forever: tries to acquire or renew every `retry_period` and publishes whether
    /// this candidate leads. A holder that cannot renew for a whole lease duration publishes
    /// `false` (the caller should then stop acting, and in practice exit).
    pub async fn run(&self, leading: watch::Sender<bool>) {
        let mut last_renewal: Option<tokio::time::Instant> = None;
        loop {
            match self.try_acquire_or_renew().await {
                Ok(Attempt::Leading) => {
                    last_renewal = Some(tokio::time::Instant::now());
                    leading.send_if_modified(|v| !std::mem::replace(v, true));
                }
                Ok(Attempt::Following) => {
                    last_renewal = None;
                    leading.send_if_modified(|v| std::mem::replace(v, false));
                }
                Err(err) => {
                    tracing::warn!(lease = %self.cfg.name, error = %err, "leader election attempt failed");
                    if last_renewal.is_some_and(|t| t.elapsed() >= self.cfg.lease_duration) {
                        leading.send_if_modified(|v| std::mem::replace(v, false));
                    }
                }
            }
            tokio::time::sleep(self.cfg.retry_period).await;
        }
    }

    /// One step of the protocol.
    pub async fn try_acquire_or_renew(&self) -> Result<Attempt, LeaderError> {
        let now = Timestamp::now();
        let Some(mut lease) = self.api.get_opt(&self.cfg.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.cfg.name.clone()),
                    ..Default::default()
                },
                spec: Some(self.spec_for_new_term(now, 0)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(Attempt::Leading),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(Attempt::Following),
                Err(e) => Err(e.into()),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.as_deref().unwrap_or("");
        let new_spec = if holder == self.cfg.identity {
            LeaseSpec {
                renew_time: Some(MicroTime(now)),
                ..spec
            }
        } else if holder.is_empty() || is_expired(&spec, now) {
            self.spec_for_new_term(now, spec.lease_transitions.unwrap_or(0) + 1)
        } else {
            return Ok(Attempt::Following);
        };
        lease.spec = Some(new_spec);
        // replace() sends our resourceVersion: a concurrent writer makes this a 409.
        match self
            .api
            .replace(&self.cfg.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(Attempt::Leading),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(Attempt::Following),
            Err(e) => Err(e.into()),
        }
    }

    /// Gives the Lease up (on clean shutdown) so a standby takes over at once.
    pub async fn release(&self) -> Result<(), LeaderError> {
        if let Some(mut lease) = self.api.get_opt(&self.cfg.name).await? {
            let spec = lease.spec.clone().unwrap_or_default();
            if spec.holder_identity.as_deref() == Some(self.cfg.identity.as_str()) {
                lease.spec = Some(LeaseSpec {
                    holder_identity: None,
                    ..spec
                });
                self.api
                    .replace(&self.cfg.name, &PostParams::default(), &lease)
                    .await?;
            }
        }
        Ok(())
    }

    fn spec_for_new_term(&self, now: Timestamp, transitions: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.cfg.identity.clone()),
            lease_duration_seconds: Some(self.cfg.lease_duration.as_secs().max(1) as i32),
            acquire_time: Some(MicroTime(now)),
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(transitions),
            ..Default::default()
        }
    }
}

/// True when the holder's last renewal is older than the lease duration.
pub fn is_expired(spec: &LeaseSpec, now: Timestamp) -> bool {
    let Some(MicroTime(renewed)) = spec.renew_time else {
        return true;
    };
    let duration = SignedDuration::from_secs(spec.lease_duration_seconds.unwrap_or(15).into());
    renewed + duration < now
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(renewed_secs_ago: i64, duration: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some("other".into()),
            renew_time: Some(MicroTime(
                Timestamp::now() - SignedDuration::from_secs(renewed_secs_ago),
            )),
            lease_duration_seconds: Some(duration),
            ..Default::default()
        }
    }

    #[test]
    fn fresh_lease_is_not_expired() {
        assert!(!is_expired(&spec(1, 15), Timestamp::now()));
    }

    #[test]
    fn lease_past_its_duration_is_expired() {
        assert!(is_expired(&spec(20, 15), Timestamp::now()));
    }

    #[test]
    fn lease_never_renewed_is_expired() {
        let s = LeaseSpec {
            renew_time: None,
            ..spec(0, 15)
        };
        assert!(is_expired(&s, Timestamp::now()));
    }
}
