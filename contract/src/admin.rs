//! The agent's admin endpoint, its drain token and default ports.

/// Liveness: answers 200 while the admin server runs (also while draining).
pub const HEALTHZ_PATH: &str = "/healthz";
/// Readiness: 200 while serving and the application is reachable, 503 once draining.
pub const READY_PATH: &str = "/ready";
/// Starts the drain and answers once it is over (the injected preStop hook calls it).
pub const DRAIN_PATH: &str = "/drain";
/// `POST /rebalance?connections=N` (with the drain token): while serving, ask up to N
/// keep-alive connections to reconnect, paced at the close rate, so that the operator can
/// make a replica-ratio step's request split follow its pods.
pub const REBALANCE_PATH: &str = "/rebalance";
/// The query parameter of [`REBALANCE_PATH`].
pub const REBALANCE_CONNECTIONS_PARAM: &str = "connections";
/// OpenMetrics text the operator scrapes ([`crate::metrics`]).
pub const METRICS_PATH: &str = "/metrics";

/// The header that carries the drain secret on `/drain`. A source address proves nothing
/// (the kubelet's hook comes from the CNI's host-side address, an SSRF in the application
/// from loopback): the secret does.
pub const DRAIN_TOKEN_HEADER: &str = "x-sluice-drain-token";
/// The agent's environment variable that holds the drain secret.
pub const DRAIN_TOKEN_ENV: &str = "SLUICE_DRAIN_TOKEN";

/// The agent's admin port unless told otherwise (`--admin`, `spec.agent.adminPort`).
pub const DEFAULT_ADMIN_PORT: u16 = 9901;
/// The port the injected agent listens on in proxy mode (`spec.agent.proxyPort`). Not
/// 15001 (Istio's outbound capture port): no port Istio (15000–15090) or Linkerd
/// (4140–4191) reserves in the pod.
pub const DEFAULT_PROXY_PORT: u16 = 15101;

/// Where the kubelet reads a container's termination message (the container spec's
/// default `terminationMessagePath`); it shows in the pod's status once the container ends.
pub const TERMINATION_MESSAGE_PATH: &str = "/dev/termination-log";
/// The agent's termination message when the pod was stopped before any drain ran: the
/// preStop `/drain` was refused, missing, or the pod was deleted with a zero grace period.
/// Connections then closed without waiting for load balancers to stop sending. The
/// operator reports pods that end with it.
pub const UNDRAINED_TERMINATION_MESSAGE: &str = "sluice-agent: terminated before any drain; connections closed without waiting for load balancers";
