//! Sluice in-pod agent: lossless drain (graceful TCP shutdown) and connection signals.
//!
//! Pure cores, unit-tested without I/O: [`drain`] (the phase machine), [`pacer`] (close
//! pacing), [`procfs`] (kernel table parsers). Everything else is I/O around them.

pub mod admin;
pub mod agent;
pub mod config;
pub mod conns;
pub mod controller;
pub mod drain;
pub mod metrics;
pub mod node_topology;
pub mod observe;
pub mod pacer;
pub mod procfs;
pub mod proxy_http;
pub mod proxy_tcp;
mod tunnel;
pub mod workers;

pub use agent::{AgentError, RunningAgent, run_until_terminated, start_observe, start_proxy};
