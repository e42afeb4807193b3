//! The run state of an analysis (pure): which checks are due, what each measurement made of
//! its check, and the run's verdict, with Argo Rollouts' semantics. The whole state is
//! [`AnalysisStatus`], written into the owning object's status between reconciles.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::model::{MeasurementPhase, MetricCheck, PrometheusSource, TemplateContext, render};

/// Measurements kept per metric in status (the counters cover all of them).
pub const KEPT_MEASUREMENTS: usize = 10;
/// Most checks in one analysis.
pub const MAX_CHECKS: usize = 32;
/// Wait before re-measuring after an Error when the check has no interval.
pub const ERROR_RETRY: Duration = Duration::from_secs(10);

/// The run's outcome so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub enum Verdict {
    Running,
    Successful,
    /// A check failed, or erred too many times in a row.
    Failed,
    /// A check was inconclusive too often: a person decides.
    Inconclusive,
}

impl Verdict {
    pub fn is_final(self) -> bool {
        self != Verdict::Running
    }
}

/// One check's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub enum MetricPhase {
    Pending,
    Running,
    Successful,
    Failed,
    Inconclusive,
    Error,
}

impl MetricPhase {
    pub fn is_final(self) -> bool {
        !matches!(self, MetricPhase::Pending | MetricPhase::Running)
    }
}

/// One measurement as kept in status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Measurement {
    pub phase: MeasurementPhase,
    #[schemars(with = "String")]
    #[serde(with = "rfc3339")]
    pub at: DateTime<Utc>,
    /// The raw result, e.g. `[0.93]` or `[NaN]` (NaN and Inf do not fit JSON numbers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// One check's counters and recent measurements.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MetricStatus {
    pub name: String,
    /// The query as sent, placeholders filled.
    pub query: String,
    pub phase: MetricPhase,
    #[serde(default)]
    pub dry_run: bool,
    /// Measurements that returned (Successful, Failed or Inconclusive).
    pub count: u32,
    pub successful: u32,
    pub failed: u32,
    pub inconclusive: u32,
    pub error: u32,
    pub consecutive_error: u32,
    /// The last [`KEPT_MEASUREMENTS`], oldest first.
    #[serde(default)]
    pub measurements: Vec<Measurement>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// The whole state of one analysis run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AnalysisStatus {
    pub verdict: Verdict,
    #[schemars(with = "String")]
    #[serde(with = "rfc3339")]
    pub started_at: DateTime<Utc>,
    /// Set by [`AnalysisStatus::terminate`]: checks without a count stop, as Successful.
    #[serde(default)]
    pub terminated: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    pub metrics: Vec<MetricStatus>,
}

/// Why a run could not start.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum StartError {
    #[error("invalid analysis: {0}")]
    Invalid(String),
    #[error(transparent)]
    Template(#[from] super::model::TemplateError),
}

/// A query to run now for one check.
#[derive(Debug, Clone, PartialEq)]
pub struct DueQuery {
    /// Index into [`AnalysisStatus::metrics`].
    pub metric: usize,
    pub query: String,
    pub source: PrometheusSource,
}

impl AnalysisStatus {
    /// Starts a run at `now`: validates the checks and fills their query templates.
    pub fn start(
        checks: &[MetricCheck],
        ctx: &TemplateContext,
        now: DateTime<Utc>,
    ) -> Result<Self, StartError> {
        if checks.len() > MAX_CHECKS {
            return Err(StartError::Invalid(format!(
                "{} metrics; at most {MAX_CHECKS}",
                checks.len()
            )));
        }
        let mut metrics = Vec::with_capacity(checks.len());
        for (i, c) in checks.iter().enumerate() {
            c.validate().map_err(StartError::Invalid)?;
            if checks[..i].iter().any(|o| o.name == c.name) {
                return Err(StartError::Invalid(format!("two metrics named {}", c.name)));
            }
            metrics.push(MetricStatus {
                name: c.name.clone(),
                query: render(c, ctx)?,
                phase: MetricPhase::Pending,
                dry_run: c.dry_run,
                count: 0,
                successful: 0,
                failed: 0,
                inconclusive: 0,
                error: 0,
                consecutive_error: 0,
                measurements: Vec::new(),
                message: None,
            });
        }
        let mut s = Self {
            verdict: Verdict::Running,
            started_at: now,
            terminated: false,
            message: None,
            metrics,
        };
        s.assess(checks);
        Ok(s)
    }

    /// When check `m` next wants a measurement; `None` when it wants no more.
    fn due_at(&self, check: &MetricCheck, m: &MetricStatus) -> Option<DateTime<Utc>> {
        if self.verdict.is_final() || m.phase.is_final() {
            return None;
        }
        let Some(last) = m.measurements.last() else {
            return Some(self.started_at + to_chrono(check.initial_delay));
        };
        let wait = match (last.phase, check.interval) {
            (_, Some(i)) => i,
            (MeasurementPhase::Error, None) => ERROR_RETRY,
            // One measurement without an interval completes the check.
            (_, None) => return None,
        };
        Some(last.at + to_chrono(wait))
    }

    /// The queries to run now.
    pub fn due(&self, checks: &[MetricCheck], now: DateTime<Utc>) -> Vec<DueQuery> {
        self.metrics
            .iter()
            .enumerate()
            .filter_map(|(i, m)| {
                let c = check_for(checks, &m.name)?;
                (self.due_at(c, m)? <= now).then(|| DueQuery {
                    metric: i,
                    query: m.query.clone(),
                    source: c.source.clone(),
                })
            })
            .collect()
    }

    /// How long until the next measurement is due (zero when one is due now); `None` when
    /// the run is over.
    pub fn next_due(&self, checks: &[MetricCheck], now: DateTime<Utc>) -> Option<Duration> {
        self.metrics
            .iter()
            .filter_map(|m| self.due_at(check_for(checks, &m.name)?, m))
            .min()
            .map(|at| (at - now).to_std().unwrap_or(Duration::ZERO))
    }

    /// Records the outcome of metric `metric`'s query taken at `at`: the values, or why
    /// the query failed (an Error measurement).
    pub fn record(
        &mut self,
        checks: &[MetricCheck],
        metric: usize,
        at: DateTime<Utc>,
        result: Result<Vec<f64>, String>,
    ) {
        let Some(m) = self.metrics.get_mut(metric) else {
            return;
        };
        let Some(check) = check_for(checks, &m.name) else {
            return;
        };
        if m.phase.is_final() || self.verdict.is_final() {
            return;
        }
        let (phase, value, message) = match result {
            Ok(values) => {
                let (phase, message) = check.judge(&values);
                (phase, Some(format_values(&values)), message)
            }
            Err(e) => (MeasurementPhase::Error, None, Some(e)),
        };
        match phase {
            MeasurementPhase::Error => {
                m.error += 1;
                m.consecutive_error += 1;
            }
            p => {
                m.count += 1;
                m.consecutive_error = 0;
                match p {
                    MeasurementPhase::Successful => m.successful += 1,
                    MeasurementPhase::Failed => m.failed += 1,
                    _ => m.inconclusive += 1,
                }
            }
        }
        m.measurements.push(Measurement {
            phase,
            at,
            value,
            message,
        });
        if m.measurements.len() > KEPT_MEASUREMENTS {
            m.measurements.remove(0);
        }
        self.assess(checks);
    }

    /// Ends the run early, as Argo's `terminate`: checks that measure until stopped, or
    /// that have not measured yet, complete as Successful unless a limit was crossed.
    pub fn terminate(&mut self, checks: &[MetricCheck]) {
        self.terminated = true;
        self.assess(checks);
    }

    /// Re-derives every check's phase and the verdict from the counters.
    fn assess(&mut self, checks: &[MetricCheck]) {
        let mut terminating = self.terminated;
        for m in &mut self.metrics {
            if let Some(c) = check_for(checks, &m.name) {
                assess_metric(c, m, false);
                terminating |= !m.dry_run
                    && matches!(
                        m.phase,
                        MetricPhase::Failed | MetricPhase::Error | MetricPhase::Inconclusive
                    );
            } else if !m.phase.is_final() {
                m.message = Some("no longer in the analysis; not judged".into());
            }
        }
        if terminating {
            for m in &mut self.metrics {
                if let Some(c) = check_for(checks, &m.name) {
                    assess_metric(c, m, true);
                }
            }
        }
        let judged = || {
            self.metrics
                .iter()
                .filter(|m| !m.dry_run && check_for(checks, &m.name).is_some())
        };
        let verdict =
            if judged().any(|m| matches!(m.phase, MetricPhase::Failed | MetricPhase::Error)) {
                Verdict::Failed
            } else if judged().any(|m| m.phase == MetricPhase::Inconclusive) {
                Verdict::Inconclusive
            } else if self
                .metrics
                .iter()
                .filter(|m| check_for(checks, &m.name).is_some())
                .all(|m| m.phase.is_final())
            {
                Verdict::Successful
            } else {
                Verdict::Running
            };
        self.verdict = verdict;
        let mut notes: Vec<String> = judged()
            .filter(|m| m.phase != MetricPhase::Successful && m.phase.is_final())
            .map(|m| format!("{}: {}", m.name, m.message.as_deref().unwrap_or("")))
            .collect();
        notes.extend(
            self.metrics
                .iter()
                .filter(|m| m.dry_run && m.phase.is_final() && m.phase != MetricPhase::Successful)
                .map(|m| format!("dry-run {}: {:?} (not judged)", m.name, m.phase)),
        );
        self.message = (!notes.is_empty()).then(|| notes.join("; "));
    }
}

/// One check's phase from its counters (Argo's `assessMetricStatus`).
fn assess_metric(c: &MetricCheck, m: &mut MetricStatus, terminating: bool) {
    if m.phase.is_final() {
        return;
    }
    let Some(last) = m.measurements.last() else {
        if terminating {
            m.phase = MetricPhase::Successful;
            m.message = Some("the run ended before a measurement".into());
        }
        return;
    };
    let (phase, message) = if m.failed > c.failure_limit {
        (
            MetricPhase::Failed,
            format!(
                "{} failed measurement(s), failureLimit {}",
                m.failed, c.failure_limit
            ),
        )
    } else if m.inconclusive > c.inconclusive_limit {
        (
            MetricPhase::Inconclusive,
            format!(
                "{} inconclusive measurement(s), inconclusiveLimit {}",
                m.inconclusive, c.inconclusive_limit
            ),
        )
    } else if m.consecutive_error > c.consecutive_error_limit {
        (
            MetricPhase::Error,
            format!(
                "{} errors in a row, consecutiveErrorLimit {}; last: {}",
                m.consecutive_error,
                c.consecutive_error_limit,
                last.message.as_deref().unwrap_or("")
            ),
        )
    } else if c.effective_count().is_some_and(|n| m.count >= n) {
        (
            MetricPhase::Successful,
            format!("{} measurement(s)", m.count),
        )
    } else if terminating {
        (
            MetricPhase::Successful,
            format!("{} measurement(s), run ended", m.count),
        )
    } else {
        m.phase = MetricPhase::Running;
        return;
    };
    m.phase = phase;
    m.message = Some(message);
}

fn check_for<'a>(checks: &'a [MetricCheck], name: &str) -> Option<&'a MetricCheck> {
    checks.iter().find(|c| c.name == name)
}

fn to_chrono(d: Duration) -> chrono::TimeDelta {
    chrono::TimeDelta::from_std(d).unwrap_or(chrono::TimeDelta::MAX)
}

/// `[0.5, NaN, +Inf]`: the values as status shows them.
pub fn format_values(values: &[f64]) -> String {
    let shown: Vec<String> = values
        .iter()
        .take(KEPT_MEASUREMENTS)
        .map(|v| match v {
            v if v.is_nan() => "NaN".to_string(),
            v if v.is_infinite() && *v > 0.0 => "+Inf".to_string(),
            v if v.is_infinite() => "-Inf".to_string(),
            v => v.to_string(),
        })
        .collect();
    let more = values.len().saturating_sub(KEPT_MEASUREMENTS);
    if more > 0 {
        format!("[{}, … {more} more]", shown.join(", "))
    } else {
        format!("[{}]", shown.join(", "))
    }
}

/// Times in status as RFC 3339 (`2025-01-01T00:00:00Z`), like Kubernetes' own.
mod rfc3339 {
    use chrono::{DateTime, SecondsFormat, Utc};
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&t.to_rfc3339_opts(SecondsFormat::AutoSi, true))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
        let s = String::deserialize(d)?;
        DateTime::parse_from_rfc3339(&s)
            .map(|t| t.with_timezone(&Utc))
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
#[path = "run_tests.rs"]
mod tests;
