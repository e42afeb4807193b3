//! A `ReleaseSpec` checked and with every default filled in (pure). The admission rules
//! catch most mistakes; this is the second line for objects stored before a rule existed
//! or written with validation off, and the one place where defaults live.
//!
//! The agent and drain settings, what the operator puts into pods, are the pod protocol's
//! ([`crate::pod::settings`]), shared with InferenceSets.

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::pod::agent_spec::AgentMode;
use crate::pod::duration::{DurationString, format_duration, parse_duration};
use crate::pod::settings::{
    AgentImagePolicy, AgentSettings, DEFAULT_CLOSE_RATE, DEFAULT_DRAIN_TIMEOUT,
    DEFAULT_PROPAGATION_TIMEOUT, DEFAULT_QUIET_PERIOD, DrainSettings, default_duration,
    resolve_limits,
};
use crate::release::crd::{MAX_REPLICAS, ReleaseSpec};

/// One step, resolved.
#[derive(Clone, Debug, PartialEq)]
pub enum StepKind {
    SetWeight(i32),
    /// Requests with these headers go to the canary from here on (empty: no longer).
    HeaderRoute(Vec<crate::release::crd::HeaderMatch>),
    /// `None`: until promoted.
    Pause(Option<Duration>),
    Gate(Duration),
}

#[derive(Clone, Debug, PartialEq)]
pub struct HealthSettings {
    pub min_ready_ratio: f64,
    pub max_restarts: i32,
    pub fail_on_crash_loop: bool,
    pub startup_timeout: Duration,
    pub failure_limit: i32,
    pub interval: Duration,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ConnectionRateSettings {
    pub max_per_pod: f64,
    pub failure_limit: i32,
    pub interval: Duration,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ComparisonSettings {
    pub max_error_ratio_delta: f64,
    pub max_latency_ratio: f64,
    pub min_requests: i64,
    pub failure_limit: i32,
    pub interval: Duration,
}

/// The spec with defaults applied and durations parsed.
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    pub deployment: String,
    pub replicas: Option<i32>,
    pub steps: Vec<StepKind>,
    pub health: Option<HealthSettings>,
    pub connection_rate: Option<ConnectionRateSettings>,
    pub comparison: Option<ComparisonSettings>,
    pub drain: DrainSettings,
    pub agent: AgentSettings,
    pub warmup: Duration,
    pub max_surge: IntOrString,
    pub progress_deadline: Duration,
    pub paused: bool,
    /// `spec.analysis` as written (admission checks it; the controller imports the
    /// templates it names every round).
    pub analysis: Option<crate::release::crd::AnalysisSpec>,
    /// `spec.trafficRouting`, resolved.
    pub routing: Option<RoutingSettings>,
    /// `spec.rebalance`, resolved.
    pub rebalance: Option<RebalanceSettings>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct RebalanceSettings {
    /// Percentage points.
    pub tolerance: f64,
    pub window: Duration,
    pub max_rounds: i32,
}

/// A route the Release steers.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct RouteName {
    pub kind: RouteKind,
    pub name: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum RouteKind {
    Http,
    Grpc,
}

impl RouteKind {
    pub fn kind(self) -> &'static str {
        match self {
            RouteKind::Http => "HTTPRoute",
            RouteKind::Grpc => "GRPCRoute",
        }
    }
    pub fn plural(self) -> &'static str {
        match self {
            RouteKind::Http => "httproutes",
            RouteKind::Grpc => "grpcroutes",
        }
    }
}

/// `spec.trafficRouting` with defaults.
#[derive(Clone, Debug, PartialEq)]
pub struct RoutingSettings {
    /// The user's Service, whose ports and selector the two Services copy.
    pub service: String,
    pub routes: Vec<RouteName>,
    pub verify: Option<VerifySettings>,
}

impl RoutingSettings {
    pub fn stable_service(&self) -> String {
        format!("{}-stable", self.service)
    }
    pub fn canary_service(&self) -> String {
        format!("{}-canary", self.service)
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct VerifySettings {
    /// Percentage points.
    pub tolerance: f64,
    pub min_requests: i64,
    pub window: Duration,
}

/// Default `trafficRouting.verify.window`.
pub const DEFAULT_SPLIT_WINDOW: Duration = Duration::from_secs(10);

fn routing_settings(
    errs: &mut Vec<String>,
    spec: &Option<crate::release::crd::TrafficRouting>,
) -> Option<RoutingSettings> {
    let r = spec.as_ref()?;
    let routes: Vec<RouteName> = r
        .gateway_api
        .http_routes
        .iter()
        .map(|x| (RouteKind::Http, x))
        .chain(
            r.gateway_api
                .grpc_routes
                .iter()
                .map(|x| (RouteKind::Grpc, x)),
        )
        .map(|(kind, x)| RouteName {
            kind,
            name: x.name.clone(),
        })
        .collect();
    if routes.is_empty() {
        errs.push(
            "trafficRouting.gatewayAPI: name at least one of httpRoutes or grpcRoutes".into(),
        );
    }
    if routes.len() > crate::release::crd::MAX_ROUTES {
        errs.push(format!(
            "trafficRouting.gatewayAPI: at most {} routes",
            crate::release::crd::MAX_ROUTES
        ));
    }
    if r.service.is_empty() || r.service.len() > 55 {
        errs.push("trafficRouting.service: a Service name of 1 to 55 characters".into());
    }
    let verify = r.verify.as_ref().map(|v| {
        let tolerance = v.tolerance.unwrap_or(2.0);
        if !(tolerance > 0.0 && tolerance <= 100.0) {
            errs.push("trafficRouting.verify.tolerance: between 0 and 100".into());
        }
        let min_requests = v.min_requests.unwrap_or(200);
        if !(1..=1_000_000_000).contains(&min_requests) {
            errs.push("trafficRouting.verify.minRequests: between 1 and 1000000000".into());
        }
        VerifySettings {
            tolerance,
            min_requests,
            window: dur(
                errs,
                "trafficRouting.verify.window",
                &v.window,
                DEFAULT_SPLIT_WINDOW,
            ),
        }
    });
    Some(RoutingSettings {
        service: r.service.clone(),
        routes,
        verify,
    })
}

fn dur(
    errs: &mut Vec<String>,
    field: &str,
    v: &Option<DurationString>,
    default: Duration,
) -> Duration {
    match v {
        None => default,
        Some(d) => match parse_duration(&d.0) {
            Ok(d) => d,
            Err(e) => {
                errs.push(format!("{field}: {e}"));
                default
            }
        },
    }
}

impl Settings {
    /// Pods allowed above `replicas` while new pods start (at least one).
    pub fn surge(&self, replicas: i32) -> i32 {
        let n = match &self.max_surge {
            IntOrString::Int(n) => *n,
            IntOrString::String(s) => {
                let pct: i64 = s.trim_end_matches('%').parse().unwrap_or(25);
                // In i64: `replicas × pct` overflows i32 long before the result does.
                let n = (i64::from(replicas) * pct.clamp(0, 100) + 99) / 100;
                i32::try_from(n).unwrap_or(i32::MAX)
            }
        };
        n.max(1)
    }

    /// Validate and fill defaults, allowing only `default_agent_image` as the agent image.
    pub fn from_spec(
        spec: &ReleaseSpec,
        default_agent_image: &str,
    ) -> Result<Settings, Vec<String>> {
        Self::from_spec_with(spec, &AgentImagePolicy::only(default_agent_image))
    }

    /// The settings a reconcile works with: the spec's; while the Release is being deleted
    /// and its spec is invalid, [`Settings::for_hand_back`] when those are valid.
    pub fn for_reconcile(
        spec: &ReleaseSpec,
        images: &AgentImagePolicy,
        deleting: bool,
    ) -> Result<Settings, Vec<String>> {
        let strict = Self::from_spec_with(spec, images);
        match strict {
            Err(_) if deleting => Self::for_hand_back(spec, images).or(strict),
            _ => strict,
        }
    }

    /// Settings to hand the Deployment back with when the spec is invalid (deleting a
    /// Release must never strand its Deployment at 0 replicas): the spec without its steps,
    /// gates and agent image (a hand-back runs no gate and creates no pod), else only
    /// `workloadRef` and a valid `replicas` with every other field at its default.
    pub fn for_hand_back(
        spec: &ReleaseSpec,
        images: &AgentImagePolicy,
    ) -> Result<Settings, Vec<String>> {
        let mut lenient = spec.clone();
        lenient.steps.clear();
        lenient.gates = Default::default();
        lenient.agent.image = None;
        lenient.analysis = None;
        Self::from_spec_with(&lenient, images).or_else(|_| {
            let mut minimal = serde_json::json!({"workloadRef": spec.workload_ref});
            if let Some(r) = spec.replicas.filter(|r| (1..=100_000).contains(r)) {
                minimal["replicas"] = r.into();
            }
            let minimal: ReleaseSpec =
                serde_json::from_value(minimal).map_err(|e| vec![e.to_string()])?;
            Self::from_spec_with(&minimal, images)
        })
    }

    /// Validate and fill defaults. Errors name the field and what to fix.
    pub fn from_spec_with(
        spec: &ReleaseSpec,
        images: &AgentImagePolicy,
    ) -> Result<Settings, Vec<String>> {
        let default_agent_image = images.default_image.as_str();
        let mut errs = Vec::new();
        let warmup = dur(&mut errs, "warmup", &spec.warmup, Duration::ZERO);
        let progress_deadline = dur(
            &mut errs,
            "progressDeadline",
            &spec.progress_deadline,
            Duration::from_secs(600),
        );
        let mut steps = Vec::new();
        let mut step_durs = Vec::new();
        for (i, s) in spec.steps.iter().enumerate() {
            let set = [
                s.set_weight.is_some(),
                s.pause.is_some(),
                s.gate.is_some(),
                s.set_header_route.is_some(),
            ]
            .iter()
            .filter(|x| **x)
            .count();
            if set != 1 {
                step_durs.push(format!(
                    "steps[{i}]: set exactly one of setWeight, pause, gate or setHeaderRoute"
                ));
                continue;
            }
            if let Some(h) = &s.set_header_route {
                if spec.traffic_routing.is_none() {
                    step_durs.push(format!(
                        "steps[{i}].setHeaderRoute: needs spec.trafficRouting"
                    ));
                }
                for m in &h.matches {
                    if !crate::release::crd::is_header_name(&m.name) {
                        step_durs.push(format!(
                            "steps[{i}].setHeaderRoute.match: {:?} is not an HTTP header name",
                            m.name
                        ));
                    }
                }
                steps.push(StepKind::HeaderRoute(h.matches.clone()));
            } else if let Some(w) = s.set_weight {
                steps.push(StepKind::SetWeight(w));
            } else if let Some(p) = &s.pause {
                let d = p.duration.as_ref().map(|d| {
                    d.parse()
                        .map_err(|e| format!("steps[{i}].pause.duration: {e}"))
                });
                match d {
                    Some(Err(e)) => step_durs.push(e),
                    Some(Ok(d)) => steps.push(StepKind::Pause(Some(d))),
                    None => steps.push(StepKind::Pause(None)),
                }
            } else if let Some(g) = &s.gate {
                match g.duration.parse() {
                    Ok(d) => steps.push(StepKind::Gate(d)),
                    Err(e) => step_durs.push(format!("steps[{i}].gate.duration: {e}")),
                }
            }
        }
        errs.extend(step_durs);

        let health = spec.gates.health.clone().unwrap_or_default();
        let health = if health.enabled == Some(false) {
            None
        } else {
            Some(HealthSettings {
                min_ready_ratio: health.min_ready_ratio.unwrap_or(1.0),
                max_restarts: health.max_restarts.unwrap_or(2),
                fail_on_crash_loop: health.fail_on_crash_loop.unwrap_or(true),
                startup_timeout: dur(
                    &mut errs,
                    "gates.health.startupTimeout",
                    &health.startup_timeout,
                    Duration::from_secs(300),
                ),
                failure_limit: health.failure_limit.unwrap_or(2),
                interval: dur(
                    &mut errs,
                    "gates.health.interval",
                    &health.interval,
                    Duration::from_secs(5),
                ),
            })
        };
        let connection_rate = spec
            .gates
            .connection_rate
            .as_ref()
            .map(|c| ConnectionRateSettings {
                max_per_pod: c.max_per_pod,
                failure_limit: c.failure_limit.unwrap_or(6),
                interval: dur(
                    &mut errs,
                    "gates.connectionRate.interval",
                    &c.interval,
                    Duration::from_secs(5),
                ),
            });
        let comparison = spec.gates.comparison.as_ref().map(|c| ComparisonSettings {
            max_error_ratio_delta: c.max_error_ratio_delta.unwrap_or(0.05),
            max_latency_ratio: c.max_latency_ratio.unwrap_or(1.5),
            min_requests: c.min_requests.unwrap_or(50),
            failure_limit: c.failure_limit.unwrap_or(2),
            interval: dur(
                &mut errs,
                "gates.comparison.interval",
                &c.interval,
                Duration::from_secs(10),
            ),
        });
        let d = &spec.drain;
        let drain = DrainSettings {
            quiet_period: dur(
                &mut errs,
                "drain.quietPeriod",
                &d.quiet_period,
                default_duration(DEFAULT_QUIET_PERIOD),
            ),
            propagation_timeout: dur(
                &mut errs,
                "drain.propagationTimeout",
                &d.propagation_timeout,
                default_duration(DEFAULT_PROPAGATION_TIMEOUT),
            ),
            close_rate: d.close_rate.unwrap_or(DEFAULT_CLOSE_RATE),
            drain_timeout: dur(
                &mut errs,
                "drain.drainTimeout",
                &d.drain_timeout,
                default_duration(DEFAULT_DRAIN_TIMEOUT),
            ),
            max_concurrent: d.max_concurrent.unwrap_or(2),
        };
        let a = &spec.agent;
        let mut agent = AgentSettings::resolve(a, default_agent_image);
        if let Some(l) = &a.limits {
            agent.limits = resolve_limits(&mut errs, l);
        }

        // The same checks as the admission rules, for objects that bypassed them.
        if spec.workload_ref.kind != "Deployment" || spec.workload_ref.api_version != "apps/v1" {
            errs.push("workloadRef: only apps/v1 Deployment is supported".into());
        }
        if spec.workload_ref.name.is_empty() {
            errs.push("workloadRef.name: must name a Deployment".into());
        }
        if let Some(r) = spec.replicas
            && !(1..=MAX_REPLICAS).contains(&r)
        {
            errs.push(format!("replicas: must be between 1 and {MAX_REPLICAS}"));
        }
        if !images.allows(&agent.image) {
            errs.push(format!(
                "agent.image {:?} is not allowed by this operator: allowed are {} (operator flag --allowed-agent-images); leave agent.image out to use the default",
                agent.image,
                images.describe()
            ));
        }
        check_bounds(
            &mut errs,
            &steps,
            &health,
            &connection_rate,
            &comparison,
            &drain,
            warmup,
            progress_deadline,
        );
        check_ports(&mut errs, &agent);
        let mut last = 0;
        for s in &steps {
            if let StepKind::SetWeight(w) = s {
                if !(0..=100).contains(w) {
                    errs.push(format!("setWeight {w}: must be between 0 and 100"));
                } else if *w < last {
                    errs.push(format!(
                        "setWeight {w} after {last}: weights must not decrease"
                    ));
                }
                last = *w;
            }
        }
        if drain.close_rate < 1 {
            errs.push("drain.closeRate: must be at least 1".into());
        }
        if drain.max_concurrent < 1 {
            errs.push("drain.maxConcurrent: must be at least 1".into());
        }
        if let Some(c) = &connection_rate
            && (c.max_per_pod.is_nan() || c.max_per_pod <= 0.0)
        {
            errs.push("gates.connectionRate.maxPerPod: must be positive".into());
        }
        for (name, limit) in [
            ("health", health.as_ref().map(|h| h.failure_limit)),
            (
                "connectionRate",
                connection_rate.as_ref().map(|c| c.failure_limit),
            ),
            ("comparison", comparison.as_ref().map(|c| c.failure_limit)),
        ] {
            if let Some(l) = limit
                && l < 1
            {
                errs.push(format!("gates.{name}.failureLimit: must be at least 1"));
            }
        }
        let max_surge = spec
            .max_surge
            .clone()
            .unwrap_or(IntOrString::String("25%".into()));
        match &max_surge {
            IntOrString::Int(n) if !(1..=MAX_REPLICAS).contains(n) => errs.push(format!(
                "maxSurge: must be a number of pods between 1 and {MAX_REPLICAS} or a percentage"
            )),
            IntOrString::String(s)
                if !s.ends_with('%')
                    || !matches!(s.trim_end_matches('%').parse::<i32>(), Ok(1..=100)) =>
            {
                errs.push("maxSurge: must be a number or a percentage between 1% and 100%".into())
            }
            _ => {}
        }
        let routing = routing_settings(&mut errs, &spec.traffic_routing);
        let rebalance = spec.rebalance.as_ref().map(|r| {
            let tolerance = r.tolerance.unwrap_or(5.0);
            if !(tolerance > 0.0 && tolerance <= 100.0) {
                errs.push("rebalance.tolerance: between 0 and 100".into());
            }
            let max_rounds = r.max_rounds.unwrap_or(5);
            if !(1..=100).contains(&max_rounds) {
                errs.push("rebalance.maxRounds: between 1 and 100".into());
            }
            RebalanceSettings {
                tolerance,
                window: dur(
                    &mut errs,
                    "rebalance.window",
                    &r.window,
                    DEFAULT_SPLIT_WINDOW,
                ),
                max_rounds,
            }
        });
        if rebalance.is_some() && routing.is_some() {
            errs.push("rebalance: not with trafficRouting (the routes set the split)".into());
        }
        if !errs.is_empty() {
            return Err(errs);
        }
        Ok(Settings {
            deployment: spec.workload_ref.name.clone(),
            replicas: spec.replicas,
            steps,
            health,
            connection_rate,
            comparison,
            drain,
            agent,
            warmup,
            max_surge,
            progress_deadline,
            paused: spec.paused,
            analysis: spec.analysis.clone(),
            routing,
            rebalance,
        })
    }
}

/// The admission rules' bounds, again (objects stored before a rule existed).
#[allow(clippy::too_many_arguments)]
fn check_bounds(
    errs: &mut Vec<String>,
    steps: &[StepKind],
    health: &Option<HealthSettings>,
    connection_rate: &Option<ConnectionRateSettings>,
    comparison: &Option<ComparisonSettings>,
    drain: &DrainSettings,
    warmup: Duration,
    progress_deadline: Duration,
) {
    const MINUTE: Duration = Duration::from_secs(60);
    const HOUR: Duration = Duration::from_secs(3600);
    const DAY: Duration = Duration::from_secs(24 * 3600);
    let positive = Duration::from_millis(1);
    let mut at_most = |field: &str, d: Duration, min: Duration, max: Duration| {
        if d < min || d > max {
            let low = if min.is_zero() {
                "0s or more".to_string()
            } else if min == positive {
                "longer than 0s".to_string()
            } else {
                format!("at least {}", format_duration(min))
            };
            errs.push(format!(
                "{field}: must be {low} and at most {}",
                format_duration(max)
            ));
        }
    };
    at_most("warmup", warmup, Duration::ZERO, HOUR);
    at_most("progressDeadline", progress_deadline, positive, DAY);
    at_most(
        "drain.quietPeriod",
        drain.quiet_period,
        Duration::ZERO,
        HOUR,
    );
    at_most(
        "drain.propagationTimeout",
        drain.propagation_timeout,
        positive,
        HOUR,
    );
    at_most("drain.drainTimeout", drain.drain_timeout, positive, HOUR);
    for (i, s) in steps.iter().enumerate() {
        match s {
            StepKind::Pause(Some(d)) => at_most(
                &format!("steps[{i}].pause.duration"),
                *d,
                Duration::ZERO,
                DAY,
            ),
            StepKind::Gate(d) => at_most(&format!("steps[{i}].gate.duration"), *d, positive, DAY),
            _ => {}
        }
    }
    if let Some(h) = health {
        at_most(
            "gates.health.startupTimeout",
            h.startup_timeout,
            positive,
            HOUR,
        );
    }
    let second = Duration::from_secs(1);
    for (field, interval) in [
        ("gates.health.interval", health.as_ref().map(|h| h.interval)),
        (
            "gates.connectionRate.interval",
            connection_rate.as_ref().map(|c| c.interval),
        ),
        (
            "gates.comparison.interval",
            comparison.as_ref().map(|c| c.interval),
        ),
    ] {
        if let Some(d) = interval {
            at_most(field, d, second, 10 * MINUTE);
        }
    }
    if drain.quiet_period >= drain.propagation_timeout {
        errs.push(format!(
            "drain.quietPeriod ({}) must be shorter than drain.propagationTimeout ({}): lengthen propagationTimeout or shorten quietPeriod",
            format_duration(drain.quiet_period),
            format_duration(drain.propagation_timeout)
        ));
    }
    // Not propagationTimeout <= drainTimeout: the operator waits for quiet before the
    // agent's drain starts, so the two do not nest (observe mode wants a short drain).
    if drain.quiet_period >= drain.drain_timeout {
        errs.push(format!(
            "drain.quietPeriod ({}) must be shorter than drain.drainTimeout ({}): lengthen drainTimeout or shorten quietPeriod",
            format_duration(drain.quiet_period),
            format_duration(drain.drain_timeout)
        ));
    }
}

/// Ports: in range, and the agent's own ports apart from each other and the application's.
fn check_ports(errs: &mut Vec<String>, agent: &AgentSettings) {
    let valid = 1..=65535;
    if !valid.contains(&agent.admin_port) {
        errs.push("agent.adminPort: must be a port number between 1 and 65535".into());
    }
    if !valid.contains(&agent.proxy_port) {
        errs.push("agent.proxyPort: must be a port number between 1 and 65535".into());
    }
    let proxy = agent.mode == AgentMode::Proxy;
    if proxy && agent.admin_port == agent.proxy_port {
        errs.push(format!(
            "agent.adminPort and agent.proxyPort are both {}: change one of them",
            agent.admin_port
        ));
    }
    if let Some(IntOrString::Int(n)) = agent.port {
        if !valid.contains(&n) {
            errs.push(
                "agent.port: must be a port number between 1 and 65535 or a port name".into(),
            );
        } else if n == agent.admin_port {
            errs.push(format!(
                "agent.port {n} is also agent.adminPort: change agent.adminPort"
            ));
        } else if proxy && n == agent.proxy_port {
            errs.push(format!(
                "agent.port {n} is also agent.proxyPort: change agent.proxyPort"
            ));
        }
    }
}

#[cfg(test)]
mod tests;
