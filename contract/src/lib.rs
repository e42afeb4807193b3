//! The contract between the Sluice operator and its in-pod agent, in one place.
//!
//! Both sides used to spell it out as strings of their own: metric names, admin paths, the
//! drain-token header, flags. A rename on one side then went unnoticed: the operator's
//! parser skipped the unknown metric, every drain turned "quiet" after `quietPeriod`, and
//! the closed loop silently became `preStop: sleep`. Now the agent registers its metrics,
//! serves its admin paths and checks its header with these constants, the operator parses
//! with [`metrics::parse_agent_metrics`] and renders the agent's command line with
//! [`args::AgentArgs::render`]; the agent's tests feed its real `/metrics` output and its
//! real command-line parser with this crate's parser and renderer, so a one-sided change
//! fails a test.

pub mod admin;
pub mod args;
pub mod duration;
pub mod metrics;

pub use admin::{
    DEFAULT_ADMIN_PORT, DEFAULT_PROXY_PORT, DRAIN_PATH, DRAIN_TOKEN_ENV, DRAIN_TOKEN_HEADER,
    HEALTHZ_PATH, METRICS_PATH, READY_PATH, REBALANCE_CONNECTIONS_PARAM, REBALANCE_PATH,
    TERMINATION_MESSAGE_PATH, UNDRAINED_TERMINATION_MESSAGE,
};
pub use args::{AgentArgs, AgentCommand, DrainFlags, Protocol, ProxyLimits};
pub use duration::{format_duration, parse_duration};
pub use metrics::{AgentSample, parse_agent_metrics};
