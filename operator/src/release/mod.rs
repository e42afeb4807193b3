//! The Release controller: lossless, gated rolling releases of a Deployment.
//!
//! Shape (see DESIGN.md): gather observed state (I/O, [`controller`]) → the pure
//! [`plan`] → an idempotent executor (I/O, [`controller`]) → status. Everything a
//! restart needs lives in the Release's status and in the pods' annotations. What the
//! operator puts into pods and the drain decision are the pod protocol's
//! ([`crate::pod`]), shared with InferenceSets.
//!
//! - [`crd`]: the `Release` resource and its admission rules;
//! - [`settings`]: the spec validated, with defaults;
//! - [`gates`]: gate evaluation over the agents' samples;
//! - [`gateway_api`]: reading and patching the weights of Gateway API routes;
//! - [`plan`]: the pure planner;
//! - [`samples`]: the agent samples kept in memory, per Release and pod;
//! - [`controller`]: gather, execute, status (I/O); [`metrics`]: its Prometheus metrics.

pub mod controller;
pub mod crd;
pub mod gates;
pub mod gateway_api;
pub mod metrics;
pub mod plan;
pub mod samples;
pub mod settings;

pub use controller::run;
pub use crd::{Release, ReleaseSpec, ReleaseStatus};
pub use metrics::{ReleaseMetrics, register};
