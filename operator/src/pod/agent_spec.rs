//! The agent section both resources share (`spec.agent` of a Release and of an
//! InferenceSet): how the agent sits in the pod, which ports it uses, and the proxy's limits.
//! Admission rules (OpenAPI + CEL) live beside the fields they check.

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::KubeSchema;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::duration::{DurationString, duration_at_most, duration_positive_at_most};

/// How the agent sits in the pod.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum AgentMode {
    /// In the data path: the agent takes the application port's name and proxies to it.
    #[default]
    #[serde(rename = "proxy")]
    Proxy,
    /// Beside the data path: the agent only watches the application's connections.
    #[serde(rename = "observe")]
    Observe,
}

/// Protocol the agent proxies.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum AgentProtocol {
    #[default]
    #[serde(rename = "http")]
    Http,
    #[serde(rename = "tcp")]
    Tcp,
}

/// The agent injected as a native sidecar.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("(has(self.mode) && self.mode == 'observe') || (has(self.adminPort) ? self.adminPort : 9901) != (has(self.proxyPort) ? self.proxyPort : 15101)")
        .message("agent.adminPort and agent.proxyPort must differ (defaults 9901 and 15101): change one of them"),
    validation = Rule::new("!has(self.port) || type(self.port) != int || self.port != (has(self.adminPort) ? self.adminPort : 9901)")
        .message("agent.port is the application's port and must differ from agent.adminPort (default 9901): change agent.adminPort"),
    validation = Rule::new("(has(self.mode) && self.mode == 'observe') || !has(self.port) || type(self.port) != int || self.port != (has(self.proxyPort) ? self.proxyPort : 15101)")
        .message("agent.port is the application's port and must differ from agent.proxyPort (default 15101): change agent.proxyPort")
)]
pub struct AgentSpec {
    /// `proxy` (default) or `observe`.
    #[serde(default)]
    pub mode: AgentMode,
    /// `http` (default) or `tcp`; proxy mode only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<AgentProtocol>,
    /// Agent image. Default: the operator's `SLUICE_AGENT_IMAGE`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("size(self) > 0 && size(self) <= 512").message("agent.image must be an image reference of 1 to 512 characters; leave it out to use the operator's default"))]
    pub image: Option<String>,
    /// The application container. Default: the container that declares `port`, else
    /// the first container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
    /// The application port the agent fronts (proxy) or watches (observe), by name or
    /// number. Default: the application container's first port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(
        validation = Rule::new("type(self) == int ? self >= 1 && self <= 65535 : size(self) <= 15 && self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')")
            .message("agent.port must be a port number between 1 and 65535 or a port name (at most 15 lowercase letters, digits and '-')")
    )]
    pub port: Option<IntOrString>,
    /// Port the agent listens on in proxy mode. Default 15101 (a port neither Istio
    /// nor Linkerd uses).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 65535").message("agent.proxyPort must be a port number between 1 and 65535"))]
    pub proxy_port: Option<i32>,
    /// Agent admin port (`/ready`, `/drain`, `/metrics`). Default 9901.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 65535").message("agent.adminPort must be a port number between 1 and 65535"))]
    pub admin_port: Option<i32>,
    /// Resources of the agent container. Default: requests 10m CPU, 32Mi memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Limits of the proxy (proxy mode): what one client, or a crowd of them, may hold
    /// and how long a peer may stall. Each unset field keeps the agent's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<AgentLimits>,
}

/// The proxy's limits a Release may set (docs/agent.md: each default and what a client
/// over it sees). `0s` turns off the timeouts that can be off.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct AgentLimits {
    /// Client connections open at once; one more is accepted and closed at once, the
    /// others are untouched. Default 4096.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 1000000").message("agent.limits.maxConnections must be between 1 and 1000000"))]
    pub max_connections: Option<i32>,
    /// Concurrent HTTP/2 streams per client connection; one more is refused with
    /// REFUSED_STREAM (safe to retry). Default 100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 10000").message("agent.limits.http2MaxConcurrentStreams must be between 1 and 10000"))]
    pub http2_max_concurrent_streams: Option<i32>,
    /// A client that sends no complete request head for this long is closed. Default `30s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = duration_positive_at_most("agent.limits.headerReadTimeout", "10m"))]
    pub header_read_timeout: Option<DurationString>,
    /// A request or response body that moves no byte for this long closes the client
    /// connection; streaming APIs (SSE, long polls, gRPC streams) need more, or `0s`
    /// (off). Default `60s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = duration_at_most("agent.limits.bodyTimeout", "24h"))]
    pub body_timeout: Option<DurationString>,
    /// Longest wait for the application's response head, then 504. Default `0s` (none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = duration_at_most("agent.limits.upstreamTimeout", "24h"))]
    pub upstream_timeout: Option<DurationString>,
    /// An HTTP/2 connection with no stream open for this long gets GOAWAY. Default `5m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = duration_positive_at_most("agent.limits.http2IdleTimeout", "24h"))]
    pub http2_idle_timeout: Option<DurationString>,
    /// TCP keep-alive idle time on client and application sockets; `0s` turns it off.
    /// Default `60s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = duration_at_most("agent.limits.tcpKeepalive", "2h"))]
    pub tcp_keepalive: Option<DurationString>,
}
