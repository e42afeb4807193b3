//! [`FakeAnalysis`] plays the controller's part for `spec.analysis` in the simulator:
//! it writes verdicts and webhook answers into `status.analysis`.

use std::collections::BTreeMap;

use chrono::{TimeZone, Utc};

use crate::analysis::{AnalysisStatus, Verdict};
use crate::pod::time::rfc3339;
use crate::release::crd::{ReleaseSpec, ReleaseStatus, WebhookResult, WebhookType};

/// What the simulated controller measures and hears.
pub(crate) struct FakeAnalysis {
    /// The verdict of every step's run.
    pub(crate) verdict: Verdict,
    /// Webhook name → decision (`Proceed`, `Halt`, `RollBack`); unnamed hooks proceed.
    pub(crate) hooks: BTreeMap<String, &'static str>,
    pub(crate) invalid: Option<String>,
    /// How long before the round the hooks answered (seconds).
    pub(crate) answered_ago: f64,
}

impl Default for FakeAnalysis {
    fn default() -> Self {
        Self {
            verdict: Verdict::Successful,
            hooks: BTreeMap::new(),
            invalid: None,
            answered_ago: 0.0,
        }
    }
}

impl FakeAnalysis {
    /// The status the planner reads: the stage it named, with a run and the answers (the
    /// hooks asked at `now`, every round).
    pub(crate) fn fill(
        &self,
        spec: &ReleaseSpec,
        status: &ReleaseStatus,
        now: f64,
    ) -> ReleaseStatus {
        let mut st = status.clone();
        let (Some(a), Some(stage)) = (&spec.analysis, st.analysis.as_mut()) else {
            return st;
        };
        if stage.step.is_some() && !a.templates.is_empty() {
            let at = Utc.timestamp_opt(1_700_000_000, 0).single().unwrap();
            stage.run = Some(AnalysisStatus {
                verdict: self.verdict,
                started_at: at,
                terminated: false,
                message: Some(format!("verdict {:?}", self.verdict)),
                metrics: vec![],
            });
        }
        let types: &[WebhookType] = if stage.step.is_some() {
            &[WebhookType::Rollout, WebhookType::Rollback]
        } else {
            &[WebhookType::PreRollout]
        };
        stage.webhooks = a
            .webhooks
            .iter()
            .filter(|w| types.contains(&w.type_))
            .map(|w| WebhookResult {
                name: w.name.clone(),
                type_: w.type_.as_str().into(),
                decision: self.hooks.get(&w.name).copied().unwrap_or("Proceed").into(),
                message: format!("webhook {}: HTTP 500", w.name),
                at: rfc3339(now - self.answered_ago),
            })
            .collect();
        st
    }
}
