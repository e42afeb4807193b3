//! Metric analysis and webhooks for canary releases: a self-contained library the Release
//! controller calls once per reconcile. See `docs/release.md`, "Metric analysis and
//! webhooks".
//!
//! - [`model`]: a [`MetricCheck`] (PromQL template, interval, count, conditions, limits).
//! - [`expr`]: the condition language (a subset of Argo Rollouts' `expr`).
//! - [`import`]: Argo Rollouts `AnalysisTemplate` and Flagger `MetricTemplate` → checks.
//! - [`run`]: the pure run state ([`AnalysisStatus`]) with Argo's verdict semantics.
//! - [`prometheus`]: instant queries against Prometheus' HTTP API.
//! - [`webhook`]: Flagger-shaped gate hooks and `event` notifications.
//!
//! A controller's round:
//!
//! ```no_run
//! # async fn round(
//! #     checks: &[sluice_operator::analysis::MetricCheck],
//! #     status: &mut sluice_operator::analysis::AnalysisStatus,
//! # ) {
//! use sluice_operator::analysis::{PrometheusClient, Verdict, reconcile};
//! let prometheus = PrometheusClient::new();
//! let round = reconcile(checks, status, chrono::Utc::now(), &prometheus).await;
//! // Write `status` into the Release's status, then:
//! match round.verdict {
//!     Verdict::Running => { /* requeue after round.requeue_after */ }
//!     Verdict::Successful => { /* advance the step */ }
//!     Verdict::Failed => { /* abort and roll back */ }
//!     Verdict::Inconclusive => { /* pause for a person */ }
//! }
//! # }
//! ```

pub mod expr;
pub mod http;
pub mod import;
pub mod model;
pub mod prometheus;
pub mod run;
pub mod webhook;

use std::future::Future;
use std::time::Duration;

use chrono::{DateTime, Utc};

pub use import::{ImportError, from_argo_analysis_template, from_flagger_metric};
pub use model::{
    Condition, Judge, MeasurementPhase, MetricCheck, PrometheusSource, TemplateContext,
    ThresholdRange,
};
pub use prometheus::{PromError, PrometheusClient};
pub use run::{AnalysisStatus, MetricPhase, StartError, Verdict};
pub use webhook::{
    HookDecision, HookOutcome, HookPayload, HookType, Webhook, WebhookClient, decide,
};

/// Where measurements come from; [`PrometheusClient`] in production, a fake in tests.
pub trait MetricSource {
    fn query(
        &self,
        source: &PrometheusSource,
        query: &str,
    ) -> impl Future<Output = Result<Vec<f64>, PromError>> + Send;
}

impl MetricSource for PrometheusClient {
    fn query(
        &self,
        source: &PrometheusSource,
        query: &str,
    ) -> impl Future<Output = Result<Vec<f64>, PromError>> + Send {
        PrometheusClient::query(self, source, query)
    }
}

/// What one reconcile round did.
#[derive(Debug, Clone, PartialEq)]
pub struct Round {
    pub verdict: Verdict,
    /// Measurements taken in this round.
    pub measured: usize,
    /// When to come back for the next measurement; `None` once the verdict is final.
    pub requeue_after: Option<Duration>,
}

/// One round: takes every due measurement (concurrently, each bounded by its check's
/// timeout), records them at `now`, and returns the verdict and when to requeue.
pub async fn reconcile<S: MetricSource>(
    checks: &[MetricCheck],
    status: &mut AnalysisStatus,
    now: DateTime<Utc>,
    source: &S,
) -> Round {
    let due = status.due(checks, now);
    let results =
        futures::future::join_all(due.iter().map(|d| source.query(&d.source, &d.query))).await;
    for (d, r) in due.iter().zip(results) {
        let r = r.map_err(|e| e.to_string());
        if let Err(e) = &r {
            tracing::info!(metric = %status.metrics[d.metric].name, error = %e, "analysis query failed");
        }
        status.record(checks, d.metric, now, r);
    }
    Round {
        verdict: status.verdict,
        measured: due.len(),
        requeue_after: status.next_due(checks, now),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use std::sync::Mutex;

    /// Answers each query with the next of a fixed list of results.
    struct Scripted(Mutex<Vec<Result<Vec<f64>, PromError>>>);

    impl MetricSource for Scripted {
        fn query(
            &self,
            _: &PrometheusSource,
            _: &str,
        ) -> impl Future<Output = Result<Vec<f64>, PromError>> + Send {
            let next = self
                .0
                .lock()
                .map(|mut v| {
                    if v.is_empty() {
                        Ok(vec![])
                    } else {
                        v.remove(0)
                    }
                })
                .unwrap_or(Ok(vec![]));
            std::future::ready(next)
        }
    }

    #[tokio::test]
    async fn rounds_measure_what_is_due_and_say_when_to_return() {
        let mut check = MetricCheck::new(
            "rate",
            PrometheusSource {
                address: "http://127.0.0.1:9".into(),
                timeout: Duration::from_secs(1),
                headers: vec![],
            },
            "up",
            Judge::Conditions {
                success: Some(Condition::parse("result[0] >= 0.95").expect("parses")),
                failure: None,
            },
        );
        check.interval = Some(Duration::from_secs(30));
        check.count = Some(2);
        let checks = [check];
        let t0 = Utc
            .with_ymd_and_hms(2025, 1, 1, 0, 0, 0)
            .single()
            .expect("time");
        let mut status =
            AnalysisStatus::start(&checks, &TemplateContext::default(), t0).expect("starts");
        let source = Scripted(Mutex::new(vec![
            Err(PromError::Timeout(Duration::from_secs(1))),
            Ok(vec![0.99]),
            Ok(vec![0.97]),
        ]));
        let r = reconcile(&checks, &mut status, t0, &source).await;
        assert_eq!((r.verdict, r.measured), (Verdict::Running, 1));
        assert_eq!(r.requeue_after, Some(Duration::from_secs(30)));
        assert!(
            status.metrics[0].measurements[0]
                .message
                .as_deref()
                .unwrap_or("")
                .contains("no answer")
        );
        let early = reconcile(
            &checks,
            &mut status,
            t0 + chrono::TimeDelta::seconds(10),
            &source,
        )
        .await;
        assert_eq!(early.measured, 0);
        assert_eq!(early.requeue_after, Some(Duration::from_secs(20)));
        for s in [30, 60] {
            reconcile(
                &checks,
                &mut status,
                t0 + chrono::TimeDelta::seconds(s),
                &source,
            )
            .await;
        }
        assert_eq!(status.verdict, Verdict::Successful);
        assert_eq!(status.metrics[0].count, 2);
    }
}
