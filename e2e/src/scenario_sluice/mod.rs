//! The Sluice strategy for the scenario runner: a `Release` takes over the echo Deployment
//! and the release v1 → v2 is started the GitOps way (the Deployment's image is edited);
//! the operator runs as a host process for the run (the operator pod cannot run on the
//! test ground yet).
//!
//! Variants: proxy mode (the Service's named `targetPort` reaches the injected agent),
//! observe mode with a graceful app, a bad v3 (5xx or slow) that the gates roll back, and
//! a release during which the operator is killed with SIGKILL and restarted.
//!
//! - [`strategy`]: [`Sluice`] and its variants, by name;
//! - [`release`]: the Release's CRDs, objects and status as the runner reads them;
//! - [`operator`]: the operator as a host process.

mod operator;
mod release;
mod strategy;

pub use operator::OperatorProcess;
pub use release::{
    ReleaseState, apply_crds, release_resource, release_state, releases, wait_settled,
};
pub use strategy::{BadVersion, Mode, Sluice, strategy_by_name};

#[cfg(test)]
mod tests;
