//! Scenarios: a rolling release v1 → v2 of an echo Deployment under load, measured the same
//! way whatever drives the release.
//!
//! A [`Strategy`] shapes the workload (preStop hooks, app flags, readiness gates, sidecars)
//! and performs the release; the runner owns everything else — namespace, Service,
//! Deployment, an in-process [`ServiceProxy`](crate::svc_proxy::ServiceProxy) with the
//! run's propagation delay, the load, the analysis and the report — so that baselines and
//! Sluice are measured side by side. The baselines: B1 (no preStop, the app exits on
//! SIGTERM at once) and B2 (`preStop: sleep 15` and a graceful app). A Sluice strategy
//! plugs in by implementing [`Strategy`] and adding itself to [`strategy_by_name`].
//!
//! - [`spec`]: the shape of a run ([`RunSpec`]) and the echo workload;
//! - [`strategy`]: the [`Strategy`] trait and its [`RunContext`];
//! - [`baselines`]: B1 and B2;
//! - [`run`](mod@run): one release under load ([`run_one`]);
//! - [`result`]: what a run measured and the pure analyses (storm factor, p99 windows);
//! - [`report`] and [`svg`]: every run side by side, as a table and a chart;
//! - [`cli`]: `sluice-e2e scenario` and the strategies by name.

mod baselines;
mod cli;
mod report;
mod result;
mod run;
pub(crate) mod spec;
pub(crate) mod strategy;
mod svg;

pub use baselines::{Baseline, b1, b2};
pub use cli::{ScenarioArgs, run, strategies_for, strategy_by_name, write_report};
pub use report::Report;
pub use result::{RunResult, Storm, p99_between, storm_factor};
pub use run::run_one;
pub use spec::{
    APP, APP_PORT, RunSpec, SERVICE_PORT, echo_deployment, echo_service, host_program_pod,
};
pub use strategy::{RunContext, Strategy};
pub use svg::render_svg;

#[cfg(test)]
mod tests;
