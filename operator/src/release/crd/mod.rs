//! The `Release` custom resource (`sluice.dev/v1alpha1`): types, defaults and the
//! admission rules (OpenAPI schema plus CEL `x-kubernetes-validations`) generated from them.
//!
//! The rules live beside the fields they check so that the schema the apiserver enforces
//! and the Rust types cannot drift apart. Every rule carries a message that says what to
//! fix, because "failed rule: self >= 1" helps nobody at 3 a.m.

use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

mod analysis;
mod routing;
mod status;

pub use analysis::{
    AnalysisArg, AnalysisSpec, AnalysisTemplateRef, MAX_ANALYSIS_TEMPLATES, MAX_WEBHOOKS,
    ReleaseAnalysisStatus, TemplateKind, ThresholdRangeSpec, WebhookResult, WebhookSpec,
    WebhookType,
};
pub use routing::{
    GatewayApiRouting, HeaderMatch, HeaderMatchType, HeaderRouteStep, MAX_ROUTES, RebalanceSpec,
    RebalanceStatus, RouteRef, SplitVerification, TrafficRouting, TrafficRoutingStatus,
    is_header_name,
};
pub use status::{AbortInfo, DrainRecord, GateResult, Phase, ReleaseStatus, RevisionStatus};

use crate::pod::agent_spec::AgentSpec;
use crate::pod::duration::{
    DurationString, duration_at_most, duration_order_rule, duration_positive_at_most, interval_rule,
};
use crate::pod::settings::{
    DEFAULT_DRAIN_TIMEOUT, DEFAULT_PROPAGATION_TIMEOUT, DEFAULT_QUIET_PERIOD,
};

/// API group of every Sluice resource.
pub const GROUP: &str = "sluice.dev";
pub use crate::pod::keys::RELEASE_LABEL;
/// Pod annotation: when the operator let the pod be deleted after it went quiet (RFC 3339).
pub const DRAIN_RELEASED_ANNOTATION: &str = "sluice.dev/drain-released";
/// Pod annotation honoured by the ReplicaSet controller when it picks pods to delete.
pub const DELETION_COST_ANNOTATION: &str = "controller.kubernetes.io/pod-deletion-cost";
/// Release annotation: promote the current pause or gate step (value: any new token;
/// a value starting with `full` skips all remaining steps).
pub const PROMOTE_ANNOTATION: &str = "sluice.dev/promote";
/// Release annotation: abort the release in progress (value: any new token).
pub const ABORT_ANNOTATION: &str = "sluice.dev/abort";
/// Deployment annotation: the replica count the Release took over, so that the
/// Deployment can be handed back at that size.
pub const REPLICAS_ANNOTATION: &str = "sluice.dev/replicas";
/// Deployment annotation: the name of the Release that runs the Deployment. One Release
/// per Deployment: another Release naming it is refused while that Release exists.
pub const CLAIM_ANNOTATION: &str = "sluice.dev/claimed-by";
/// Finalizer that hands pods back to the Deployment before a Release goes away.
pub const FINALIZER: &str = "sluice.dev/handback";
/// Field manager for server-side apply of status.
pub const FIELD_MANAGER: &str = "sluice-release";
/// Most replicas a Release runs (a cluster holds at most 150 000 pods); keeps every
/// count far from `i32` overflow.
pub const MAX_REPLICAS: i32 = 100_000;

/// A lossless, gated rolling release of a Deployment.
///
/// The operator takes over the Deployment's rollouts: it runs the pods through
/// ReplicaSets it owns (stable and canary), keeps the Deployment at zero replicas, moves
/// traffic by replica ratio step by step, and removes old pods only through the drain
/// protocol (unserve, wait for quiet, paced close, delete).
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "sluice.dev",
    version = "v1alpha1",
    kind = "Release",
    namespaced,
    status = "ReleaseStatus",
    shortname = "rel",
    category = "sluice",
    derive = "PartialEq",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "Step",
        type_ = "string",
        description = "Current step / number of steps",
        json_path = ".status.stepDisplay"
    ),
    printcolumn(
        name = "Weight",
        type_ = "integer",
        description = "Percent of replicas on the canary revision",
        json_path = ".status.canaryWeight"
    ),
    printcolumn(name = "Stable", type_ = "string", json_path = ".status.stableRevision"),
    printcolumn(name = "Canary", type_ = "string", json_path = ".status.canaryRevision"),
    printcolumn(
        name = "Message",
        type_ = "string",
        priority = 1,
        json_path = ".status.message"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = Rule::new("size(self.metadata.name) <= 52").message(
        "metadata.name must be at most 52 characters: it is used in ReplicaSet names and label values"
    ),
    validation = Rule::new("!has(self.spec.steps) || !self.spec.steps.exists(s, has(s.setHeaderRoute)) || has(self.spec.trafficRouting)").message(
        "setHeaderRoute steps need spec.trafficRouting: header matches are written into the Gateway API routes"
    ),
    validation = Rule::new("!has(self.spec.rebalance) || !has(self.spec.trafficRouting)").message(
        "rebalance is for releases by replica ratio: with trafficRouting the routes' weights set the split"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct ReleaseSpec {
    /// The Deployment whose rollouts this Release runs. Users keep editing that
    /// Deployment (GitOps changes its image); its pod template is the source of each
    /// new revision.
    #[x_kube(
        validation = Rule::new("self == oldSelf").message(
            "workloadRef is immutable: to run another Deployment, create a new Release (deleting this one hands its pods back to its Deployment)"
        )
    )]
    pub workload_ref: WorkloadRef,

    /// Number of pods to run. Defaults to the Deployment's `spec.replicas` at takeover
    /// (remembered in the Deployment's `sluice.dev/replicas` annotation while the
    /// Deployment is held at zero).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 100000").message("replicas must be between 1 and 100000"))]
    pub replicas: Option<i32>,

    /// The steps of a release, in order. After the last step the canary takes 100% and
    /// becomes the stable revision. No steps means: straight to 100%, still through the
    /// drain protocol and the gates' throttles.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    #[x_kube(
        validation = Rule::new("self.filter(s, has(s.setWeight)).map(s, s.setWeight).isSorted()")
            .message("setWeight values must not decrease from one step to the next: order the steps by increasing weight")
    )]
    pub steps: Vec<Step>,

    /// Signals that must stay green; a failing gate aborts the release.
    #[serde(default)]
    pub gates: Gates,

    /// How old pods leave: the drain protocol's timings (passed to the agent too).
    #[serde(default)]
    pub drain: DrainPolicy,

    /// The in-pod agent the operator injects into the pods it runs.
    #[serde(default)]
    pub agent: AgentSpec,

    /// Time a new pod must have been ready before it receives traffic (its
    /// `sluice.dev/serving` condition turns True). Default `0s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = duration_at_most("warmup", "1h"))]
    pub warmup: Option<DurationString>,

    /// Extra pods allowed above `replicas` while new pods start, like a Deployment's
    /// `maxSurge`: a number or a percentage of `replicas` (rounded up). Default `25%`,
    /// at least one pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(
        validation = Rule::new("type(self) == int ? self >= 1 && self <= 100000 : self.matches('^[1-9][0-9]?%$|^100%$')")
            .message("maxSurge must be a number of pods between 1 and 100000 or a percentage between 1% and 100%")
    )]
    pub max_surge: Option<IntOrString>,

    /// A step that has not finished after this long aborts the release
    /// (`ProgressDeadlineExceeded`). Default `10m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = duration_positive_at_most("progressDeadline", "24h"))]
    pub progress_deadline: Option<DurationString>,

    /// Metric analysis (Argo Rollouts / Flagger templates against Prometheus) and
    /// webhooks that judge each step. Without it, steps advance on the gates alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub analysis: Option<AnalysisSpec>,

    /// Move traffic by the weights of Gateway API routes rather than by replica ratio.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traffic_routing: Option<TrafficRouting>,

    /// Without `trafficRouting`: make each step's request split follow its pods by asking
    /// a paced share of keep-alive clients to reconnect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rebalance: Option<RebalanceSpec>,

    /// Hold the release where it is: no step advances and no new drain starts (drains
    /// already under way finish). Independent of status, so GitOps can set it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub paused: bool,
}

/// Reference to the workload whose rollouts the Release runs.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadRef {
    /// Only `apps/v1`.
    #[serde(default = "default_apps_v1")]
    #[x_kube(validation = Rule::new("self == 'apps/v1'").message("workloadRef.apiVersion must be apps/v1"))]
    pub api_version: String,
    /// Only `Deployment`.
    #[serde(default = "default_deployment")]
    #[x_kube(validation = Rule::new("self == 'Deployment'").message("workloadRef.kind must be Deployment (the only kind supported)"))]
    pub kind: String,
    /// Name of the Deployment, in the Release's namespace.
    #[x_kube(
        validation = Rule::new("size(self) <= 253 && self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$')")
            .message("workloadRef.name must be a valid Deployment name: lowercase letters, digits, '-' and '.', starting and ending with a letter or digit")
    )]
    pub name: String,
}

fn default_apps_v1() -> String {
    "apps/v1".into()
}
fn default_deployment() -> String {
    "Deployment".into()
}

/// One step of a release. Exactly one of its fields is set.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("[has(self.setWeight), has(self.pause), has(self.gate), has(self.setHeaderRoute)].exists_one(x, x)")
        .message("each step sets exactly one of setWeight, pause, gate or setHeaderRoute")
)]
pub struct Step {
    /// Percent of the replicas that run the new revision (rounded up to whole pods).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 0 && self <= 100").message("setWeight must be a percentage between 0 and 100"))]
    pub set_weight: Option<i32>,
    /// Hold for a duration, or until promoted when no duration is given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause: Option<PauseStep>,
    /// Hold for a duration while every gate stays green.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gate: Option<GateStep>,
    /// From this step on, requests whose headers match go to the canary, whatever the
    /// weight (needs `trafficRouting`). An empty `match` ends it; so do completion and
    /// abort.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub set_header_route: Option<HeaderRouteStep>,
}

/// `pause: {}` waits for `kubectl sluice promote`; `pause: {duration: 30s}` waits 30 s.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct PauseStep {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = duration_at_most("pause.duration", "24h"))]
    pub duration: Option<DurationString>,
}

/// Hold for `duration`; any gate failing its failure limit meanwhile aborts.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GateStep {
    #[x_kube(validation = duration_positive_at_most("gate.duration", "24h"))]
    pub duration: DurationString,
}

/// The gates. Health is always on (with defaults) unless `health.enabled: false`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Gates {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthGate>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_rate: Option<ConnectionRateGate>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comparison: Option<ComparisonGate>,
}

/// Health of the new revision's pods.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct HealthGate {
    /// Default true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// Minimum fraction (0–1) of new pods older than `startupTimeout` that must be
    /// ready. Default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 0.0 && self <= 1.0").message("health.minReadyRatio must be a fraction between 0 and 1, for example 0.9"))]
    pub min_ready_ratio: Option<f64>,
    /// Maximum container restarts summed over the new pods. Default 2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 0 && self <= 10000").message("health.maxRestarts must be between 0 and 10000"))]
    pub max_restarts: Option<i32>,
    /// Fail when a new pod's container is in CrashLoopBackOff. Default true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fail_on_crash_loop: Option<bool>,
    /// How long a new pod may take to become ready before it counts as not ready.
    /// Default `5m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = duration_positive_at_most("health.startupTimeout", "1h"))]
    pub startup_timeout: Option<DurationString>,
    /// Consecutive failed evaluations that abort the release. Default 2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 100").message("health.failureLimit must be between 1 and 100"))]
    pub failure_limit: Option<i32>,
    /// Time between evaluations. Default `5s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = interval_rule("health.interval"))]
    pub interval: Option<DurationString>,
}

/// The new-connection rate seen by each new pod (from the agent's
/// `sluice_agent_connections_accepted_total`). It is a throttle first: no new drain
/// starts and no step moves while a new pod takes connections faster than
/// `maxPerPod`. Sustained excess with no drain under way counts as a failure (a new
/// version that makes clients reconnect, for example by closing every connection).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionRateGate {
    /// New connections per second per new pod.
    #[x_kube(validation = Rule::new("self > 0.0 && self <= 1000000.0").message("connectionRate.maxPerPod must be a positive number of new connections per second, at most 1000000"))]
    pub max_per_pod: f64,
    /// Consecutive failed evaluations (with no drain under way) that abort. Default 6.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 100").message("connectionRate.failureLimit must be between 1 and 100"))]
    pub failure_limit: Option<i32>,
    /// Window over which the rate is measured and time between evaluations. Default `5s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = interval_rule("connectionRate.interval"))]
    pub interval: Option<DurationString>,
}

/// Canary against stable, from the agents' request metrics (proxy mode, http).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ComparisonGate {
    /// Largest allowed (canary 5xx ratio − stable 5xx ratio). Default 0.05.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 0.0 && self <= 1.0").message("comparison.maxErrorRatioDelta must be a fraction between 0 and 1, for example 0.05"))]
    pub max_error_ratio_delta: Option<f64>,
    /// Largest allowed canary p99 latency divided by stable p99 latency. Default 1.5.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1.0 && self <= 1000.0").message("comparison.maxLatencyRatio must be between 1.0 and 1000 (1.5 means the canary's p99 may be 50% above stable's)"))]
    pub max_latency_ratio: Option<f64>,
    /// Fewer requests than this on either side in a window make it inconclusive.
    /// Default 50.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 1000000000").message("comparison.minRequests must be between 1 and 1000000000"))]
    pub min_requests: Option<i64>,
    /// Consecutive failed evaluations that abort. Default 2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 100").message("comparison.failureLimit must be between 1 and 100"))]
    pub failure_limit: Option<i32>,
    /// Measurement window and time between evaluations. Default `10s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = interval_rule("comparison.interval"))]
    pub interval: Option<DurationString>,
}

/// Drain timings. The agent gets the same values as flags.
///
/// `propagationTimeout` may exceed `drainTimeout`: the operator's wait for quiet comes
/// before the agent's drain starts (observe mode relies on a short `drainTimeout`).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new(duration_order_rule("quietPeriod", DEFAULT_QUIET_PERIOD, "<", "propagationTimeout", DEFAULT_PROPAGATION_TIMEOUT))
        .message("drain.quietPeriod must be shorter than drain.propagationTimeout (defaults 2s and 60s), or quiet could never be seen before the wait for it times out: lengthen propagationTimeout or shorten quietPeriod"),
    validation = Rule::new(duration_order_rule("quietPeriod", DEFAULT_QUIET_PERIOD, "<", "drainTimeout", DEFAULT_DRAIN_TIMEOUT))
        .message("drain.quietPeriod must be shorter than drain.drainTimeout (defaults 2s and 90s), or the agent's own drain would time out before it could see quiet: lengthen drainTimeout or shorten quietPeriod")
)]
pub struct DrainPolicy {
    /// No new connection for this long means every load balancer has seen the pod
    /// leave. Default `2s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = duration_at_most("drain.quietPeriod", "1h"))]
    pub quiet_period: Option<DurationString>,
    /// Longest wait for quiet; then the drain goes on and the record says so.
    /// Default `60s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = duration_positive_at_most("drain.propagationTimeout", "1h"))]
    pub propagation_timeout: Option<DurationString>,
    /// Connections per second the agent closes while draining. Default 100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 100000").message("drain.closeRate must be between 1 and 100000 connections per second"))]
    pub close_rate: Option<i32>,
    /// Longest paced close; the pod's termination grace period is raised to cover it.
    /// Default `90s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = duration_positive_at_most("drain.drainTimeout", "1h"))]
    pub drain_timeout: Option<DurationString>,
    /// Pods draining at the same time. Default 2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 1000").message("drain.maxConcurrent must be between 1 and 1000"))]
    pub max_concurrent: Option<i32>,
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod dump {
    #[test]
    #[ignore]
    fn dump_crd() {
        use kube::CustomResourceExt;
        println!("{}", serde_yaml::to_string(&super::Release::crd()).unwrap());
    }
}
