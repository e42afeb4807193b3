//! `spec.trafficRouting` and `status.trafficRouting`: weights set on Gateway API routes
//! instead of by replica ratio, and the split measured from the agents.

use kube::KubeSchema;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::pod::duration::{DurationString, interval_rule};

/// Most routes a Release steers.
pub const MAX_ROUTES: usize = 16;

/// Move traffic with a Gateway API implementation: the operator keeps two Services,
/// `<service>-stable` and `<service>-canary` (the `service`'s ports, its selector plus
/// each side's `sluice.dev/revision`), and writes the weights of the routes' backendRefs
/// that name them. Only those two weights are written (a JSON patch guarded by tests on
/// the backendRef names): every other field of the routes stays the user's.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TrafficRouting {
    /// The Service in front of the Deployment's pods, in the Release's namespace: its
    /// ports and selector are copied into the stable and canary Services.
    #[schemars(length(min = 1, max = 55))]
    #[x_kube(
        validation = Rule::new("size(self) <= 55 && self.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')")
            .message("trafficRouting.service must be a Service name of at most 55 characters (the operator adds -stable and -canary)")
    )]
    pub service: String,
    /// The Gateway API routes whose rules send traffic to the stable Service.
    #[serde(rename = "gatewayAPI")]
    pub gateway_api: GatewayApiRouting,
    /// Count a step as reached only when the requests the agents served on each side
    /// match its weight. Without it, a step is reached once the routes carry its weight.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify: Option<SplitVerification>,
}

/// HTTPRoutes and GRPCRoutes (`gateway.networking.k8s.io/v1`) in the Release's
/// namespace. In each, every rule with a backendRef to `<service>-stable` gets a
/// backendRef to `<service>-canary` (added with weight 0 when missing) and the step's
/// weights.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("size(self.httpRoutes) + size(self.grpcRoutes) >= 1")
        .message("trafficRouting.gatewayAPI names no route: list at least one of httpRoutes or grpcRoutes")
)]
pub struct GatewayApiRouting {
    #[serde(default)]
    #[schemars(length(max = 16))]
    #[x_kube(
        validation = Rule::new("self.all(r, self.exists_one(s, s.name == r.name))")
            .message("trafficRouting.gatewayAPI.httpRoutes must not name a route twice")
    )]
    pub http_routes: Vec<RouteRef>,
    #[serde(default)]
    #[schemars(length(max = 16))]
    #[x_kube(
        validation = Rule::new("self.all(r, self.exists_one(s, s.name == r.name))")
            .message("trafficRouting.gatewayAPI.grpcRoutes must not name a route twice")
    )]
    pub grpc_routes: Vec<RouteRef>,
}

/// A route in the Release's namespace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RouteRef {
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(
        validation = Rule::new("size(self) <= 253 && self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$')")
            .message("route names are DNS subdomains: lowercase letters, digits, '-' and '.'")
    )]
    pub name: String,
}

/// The split the agents measure must match the weight.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct SplitVerification {
    /// Largest allowed distance, in percentage points, between the canary's share of
    /// requests and its weight. Default 2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self > 0.0 && self <= 100.0").message("trafficRouting.verify.tolerance must be between 0 and 100 percentage points, for example 2"))]
    pub tolerance: Option<f64>,
    /// Fewer requests than this over the window leave the step waiting. Default 200.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 1000000000").message("trafficRouting.verify.minRequests must be between 1 and 1000000000"))]
    pub min_requests: Option<i64>,
    /// The split is measured over this window, starting once the weight is written.
    /// Default `10s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = interval_rule("trafficRouting.verify.window"))]
    pub window: Option<DurationString>,
}

/// What the routes carry and what the agents measured.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TrafficRoutingStatus {
    /// The canary's weight (percent) the routes carry, as last read back from them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary_weight: Option<i32>,
    /// When the operator last wrote the weights (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight_set_at: Option<String>,
    /// Percent of the requests the canary's agents served over the verification window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub measured_canary_percent: Option<f64>,
    /// Requests both sides served over that window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub measured_requests: Option<i64>,
    /// The last weight the measured split confirmed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verified_weight: Option<i32>,
    /// The revision each Service selects (`stable`, `canary`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stable_selects: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary_selects: Option<String>,
    /// The header matches that send requests to the canary, as the routes carry them
    /// (`name: value`, or `name ~ regex`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub header_route: Vec<String>,
    /// Why the routes cannot be steered now, if they cannot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

/// `setHeaderRoute`: the headers a request must carry to reach the canary.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct HeaderRouteStep {
    /// All must match (Gateway API header matches). Empty: no header route from here on.
    #[serde(default, rename = "match")]
    #[schemars(length(max = 8))]
    pub matches: Vec<HeaderMatch>,
}

/// One header a request must carry. A cookie is a header too: match `cookie` with a
/// regular expression, for example `(^|; )canary=always(;|$)`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct HeaderMatch {
    /// Header name (case-insensitive; letters, digits and `!#$%&'*+-.^_`|~`).
    #[schemars(length(min = 1, max = 128))]
    pub name: String,
    #[schemars(length(min = 1, max = 4096))]
    pub value: String,
    /// `Exact` (default) or `RegularExpression`.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub match_type: Option<HeaderMatchType>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum HeaderMatchType {
    Exact,
    RegularExpression,
}

impl std::fmt::Display for HeaderMatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.match_type {
            Some(HeaderMatchType::RegularExpression) => write!(f, "{} ~ {}", self.name, self.value),
            _ => write!(f, "{}: {}", self.name, self.value),
        }
    }
}

/// An HTTP header name (RFC 9110 token).
pub fn is_header_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Without a router, make each `setWeight` step's request split follow its pods: keep-alive
/// clients stay on the connections they have, so new pods get only new connections. Once
/// a step's pods serve, the agents (proxy mode) measure the canary's share of requests;
/// while it is further than `tolerance` from the canary's share of the serving pods, the
/// side with too much is asked (`/rebalance` on its agents) to let a paced share of its
/// connections reconnect, and the step waits.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct RebalanceSpec {
    /// Percentage points. Default 5.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self > 0.0 && self <= 100.0").message("rebalance.tolerance must be between 0 and 100 percentage points, for example 5"))]
    pub tolerance: Option<f64>,
    /// Measurement window, and the time between two rounds of asking. Default `10s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = interval_rule("rebalance.window"))]
    pub window: Option<DurationString>,
    /// Rounds of asking per step; then the step goes on as it is (a Warning event
    /// `RebalanceGaveUp`). Default 5.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 100").message("rebalance.maxRounds must be between 1 and 100"))]
    pub max_rounds: Option<i32>,
}

/// How the current step's request split was brought to its pods.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RebalanceStatus {
    /// The step this is about.
    pub step: i32,
    /// Rounds of asking so far in this step.
    pub rounds: i32,
    /// When the agents were last asked (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_at: Option<String>,
    /// The canary's share of the serving pods (percent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_percent: Option<f64>,
    /// The canary's share of the requests over the window (percent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub measured_percent: Option<f64>,
    /// Connections asked to reconnect in this step.
    #[serde(default)]
    pub connections_asked: i64,
    /// How long the agents take to ask the last round's connections (paced at
    /// `drain.closeRate`, with its jitter): measuring starts after that.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub asking_seconds: Option<f64>,
}
