//! The spec, validated, with defaults applied.

use crate::inference::crd::InferenceSetSpec;
use crate::pod::duration::DurationString;

/// The spec, validated, with defaults applied.
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    pub replicas: i32,
    pub pods_per_replica: i32,
    pub gpus_per_pod: i32,
    pub max_unavailable: i32,
    pub max_surge: i32,
    pub surge_timeout: f64,
    pub quiet_period: f64,
    /// Longest wait for an agent's quiet signal.
    pub propagation_timeout: f64,
    /// The pods carry the Sluice agent: drains are closed-loop on its quiet signal.
    pub agent: bool,
    pub warmup_timeout: f64,
    pub node_loss_grace: f64,
    pub first_token: bool,
    pub paused: bool,
}

impl Settings {
    /// Validate what the schema cannot (durations of objects stored before a rule existed).
    pub fn from_spec(spec: &InferenceSetSpec) -> Result<Settings, Vec<String>> {
        let mut errors = Vec::new();
        let mut dur = |field: &str, v: Option<&DurationString>, default: f64| match v {
            None => default,
            Some(d) => match d.parse() {
                Ok(d) => d.as_secs_f64(),
                Err(e) => {
                    errors.push(format!("{field}: {e}"));
                    default
                }
            },
        };
        let us = &spec.update_strategy;
        let surge_timeout = dur(
            "updateStrategy.surgeTimeout",
            us.surge_timeout.as_ref(),
            10.0,
        );
        let quiet_period = dur("drain.quietPeriod", spec.drain.quiet_period.as_ref(), 5.0);
        let propagation_timeout = dur(
            "drain.propagationTimeout",
            spec.drain.propagation_timeout.as_ref(),
            60.0,
        );
        let _ = dur(
            "drain.drainTimeout",
            spec.drain.drain_timeout.as_ref(),
            90.0,
        );
        let warm = spec.warmup.as_ref();
        let warmup_timeout = dur(
            "warmup.timeout",
            warm.and_then(|w| w.timeout.as_ref()),
            1200.0,
        );
        let node_loss_grace = dur(
            "nodeLossGracePeriod",
            spec.node_loss_grace_period.as_ref(),
            30.0,
        );
        if let Some(ft) = warm.and_then(|w| w.first_token.as_ref())
            && let Err(e) = ft.max_latency.parse()
        {
            errors.push(format!("warmup.firstToken.maxLatency: {e}"));
        }
        if spec.replicas < 0 {
            errors.push("replicas must be zero or more".into());
        }
        if spec.pods_per_replica < 1 || spec.gpus_per_pod < 1 {
            errors.push("podsPerReplica and gpusPerPod must be at least 1".into());
        }
        if us.max_unavailable < 1 {
            errors.push("updateStrategy.maxUnavailable must be at least 1".into());
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Settings {
            replicas: spec.replicas,
            pods_per_replica: spec.pods_per_replica,
            gpus_per_pod: spec.gpus_per_pod,
            max_unavailable: us.max_unavailable,
            max_surge: us.max_surge.max(0),
            surge_timeout,
            quiet_period,
            propagation_timeout,
            agent: spec.agent.is_some(),
            warmup_timeout,
            node_loss_grace,
            first_token: warm.and_then(|w| w.first_token.as_ref()).is_some(),
            paused: us.paused,
        })
    }
}
