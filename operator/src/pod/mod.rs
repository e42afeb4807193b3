//! The pod protocol both controllers (Release and InferenceSet) speak: owned by neither.
//!
//! - [`keys`]: the labels, annotations and condition type on the pods the operator runs;
//! - [`agent_spec`] and [`duration`]: the `spec.agent` section and the duration strings
//!   both resources share;
//! - [`settings`]: the agent and drain settings resolved, with their defaults, and the
//!   agent image policy;
//! - [`inject`]: what the operator adds to a pod template (agent sidecar, readiness gate,
//!   preStop `/drain`);
//! - [`signals`]: what an agent's samples say about its pod; [`drain`]: the drain decision
//!   and the scraping it needs;
//! - [`condition`], [`time`], [`revision`]: the status condition, RFC 3339 times, and the
//!   revision hash of what a pod runs;
//! - [`undrained`]: pods that ended before their agent drained, reported (Event, metric).

pub mod agent_spec;
pub mod condition;
pub mod drain;
pub mod duration;
pub mod inject;
pub mod keys;
pub mod revision;
pub mod settings;
pub mod signals;
pub mod time;
pub mod undrained;
