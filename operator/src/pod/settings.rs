//! What the operator puts into pods, resolved: the agent (image policy, ports, proxy
//! limits) and the drain, with the defaults both resources use.

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use sluice_contract::ProxyLimits;

use super::agent_spec::{AgentLimits, AgentMode, AgentProtocol, AgentSpec};
use super::duration::{DurationString, parse_duration};

/// Default `drain.quietPeriod` of a Release.
pub const DEFAULT_QUIET_PERIOD: &str = "2s";
/// Default `drain.quietPeriod` of an InferenceSet (documented in its CRD); the other
/// drain defaults are the same for both resources.
pub const DEFAULT_REPLICA_QUIET_PERIOD: &str = "5s";
/// Default `drain.propagationTimeout`.
pub const DEFAULT_PROPAGATION_TIMEOUT: &str = "60s";
/// Default `drain.drainTimeout`.
pub const DEFAULT_DRAIN_TIMEOUT: &str = "90s";
/// Default `drain.closeRate` (connections per second).
pub const DEFAULT_CLOSE_RATE: i32 = 100;
/// Default `spec.agent.proxyPort` (the contract's; see there why 15101).
pub const DEFAULT_PROXY_PORT: i32 = sluice_contract::DEFAULT_PROXY_PORT as i32;
/// Default `spec.agent.adminPort`: the agent's own default admin port.
pub const DEFAULT_ADMIN_PORT: i32 = sluice_contract::DEFAULT_ADMIN_PORT as i32;
/// The agent image used when `spec.agent.image` is unset and the operator was not given
/// one (`SLUICE_AGENT_IMAGE`).
pub const DEFAULT_AGENT_IMAGE: &str = "ghcr.io/sluice-dev/sluice-agent:0.1.0";

/// Which agent images Releases and InferenceSets may run in their pods: the operator's flag
/// `--allowed-agent-images`. Whoever may write a Release must not thereby be able to run
/// any image they like next to the application.
#[derive(Clone, Debug, PartialEq)]
pub struct AgentImagePolicy {
    /// Injected when a Release names no image; always allowed.
    pub default_image: String,
    /// Further images a Release may name: exact references, or a prefix ending in `*`
    /// (`ghcr.io/sluice-dev/sluice-agent:*`).
    pub allowed: Vec<String>,
}

impl Default for AgentImagePolicy {
    /// Only [`DEFAULT_AGENT_IMAGE`].
    fn default() -> Self {
        Self::only(DEFAULT_AGENT_IMAGE)
    }
}

impl AgentImagePolicy {
    /// Only the default image.
    pub fn only(default_image: &str) -> Self {
        Self {
            default_image: default_image.to_string(),
            allowed: Vec::new(),
        }
    }

    pub fn allows(&self, image: &str) -> bool {
        image == self.default_image
            || self.allowed.iter().any(|a| match a.strip_suffix('*') {
                Some(prefix) => image.starts_with(prefix),
                None => image == a,
            })
    }

    /// The allowed images, for messages.
    pub fn describe(&self) -> String {
        let mut all = vec![format!("{:?}", self.default_image)];
        all.extend(
            self.allowed
                .iter()
                .filter(|a| **a != self.default_image)
                .map(|a| format!("{a:?}")),
        );
        all.join(", ")
    }
}

pub(crate) fn default_duration(s: &str) -> Duration {
    parse_duration(s).expect("the built-in defaults parse")
}

#[derive(Clone, Debug, PartialEq)]
pub struct DrainSettings {
    pub quiet_period: Duration,
    pub propagation_timeout: Duration,
    pub close_rate: i32,
    pub drain_timeout: Duration,
    pub max_concurrent: i32,
}

#[derive(Clone, Debug, PartialEq)]
pub struct AgentSettings {
    pub mode: AgentMode,
    pub protocol: AgentProtocol,
    pub image: String,
    pub container: Option<String>,
    pub port: Option<IntOrString>,
    pub proxy_port: i32,
    pub admin_port: i32,
    pub resources: Option<k8s_openapi::api::core::v1::ResourceRequirements>,
    /// The proxy's limits the spec sets; unset ones keep the agent's defaults.
    pub limits: ProxyLimits,
}

impl AgentSettings {
    /// The spec's agent section with defaults filled in; `default_image` when it names none.
    pub fn resolve(a: &AgentSpec, default_image: &str) -> Self {
        Self {
            mode: a.mode,
            protocol: a.protocol.unwrap_or_default(),
            image: a
                .image
                .clone()
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| default_image.to_string()),
            container: a.container.clone(),
            port: a.port.clone(),
            proxy_port: a.proxy_port.unwrap_or(DEFAULT_PROXY_PORT),
            admin_port: a.admin_port.unwrap_or(DEFAULT_ADMIN_PORT),
            resources: a.resources.clone(),
            limits: ProxyLimits::default(),
        }
    }
}

/// The spec's `agent.limits`, bounds checked as admission does (for objects that bypassed
/// it); errors name the field.
pub(crate) fn resolve_limits(errs: &mut Vec<String>, l: &AgentLimits) -> ProxyLimits {
    let count = |errs: &mut Vec<String>, field: &str, v: Option<i32>, max: i32| {
        v.and_then(|n| match u32::try_from(n) {
            Ok(c) if (1..=max).contains(&n) => Some(c),
            _ => {
                errs.push(format!("agent.limits.{field} must be between 1 and {max}"));
                None
            }
        })
    };
    let duration = |errs: &mut Vec<String>,
                    field: &str,
                    v: &Option<DurationString>,
                    zero_ok: bool,
                    max: &str| {
        let d = v.as_ref()?;
        match parse_duration(&d.0) {
            Ok(d) if d > default_duration(max) => {
                errs.push(format!("agent.limits.{field} must be at most {max}"));
                None
            }
            Ok(d) if d.is_zero() && !zero_ok => {
                errs.push(format!("agent.limits.{field} must be longer than 0s"));
                None
            }
            Ok(d) => Some(d),
            Err(e) => {
                errs.push(format!("agent.limits.{field}: {e}"));
                None
            }
        }
    };
    ProxyLimits {
        max_connections: count(errs, "maxConnections", l.max_connections, 1_000_000),
        http2_max_concurrent_streams: count(
            errs,
            "http2MaxConcurrentStreams",
            l.http2_max_concurrent_streams,
            10_000,
        ),
        header_read_timeout: duration(
            errs,
            "headerReadTimeout",
            &l.header_read_timeout,
            false,
            "10m",
        ),
        body_timeout: duration(errs, "bodyTimeout", &l.body_timeout, true, "24h"),
        upstream_timeout: duration(errs, "upstreamTimeout", &l.upstream_timeout, true, "24h"),
        http2_idle_timeout: duration(
            errs,
            "http2IdleTimeout",
            &l.http2_idle_timeout,
            false,
            "24h",
        ),
        tcp_keepalive: duration(errs, "tcpKeepalive", &l.tcp_keepalive, true, "2h"),
    }
}
