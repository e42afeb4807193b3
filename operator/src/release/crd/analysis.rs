//! `spec.analysis` and `status.analysis`: metric analysis (Argo Rollouts and Flagger
//! templates, run by [`crate::analysis`]) and Flagger-shaped webhooks, per step.

use std::collections::BTreeMap;

use kube::KubeSchema;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::analysis::AnalysisStatus;
use crate::pod::duration::{DurationString, duration_positive_at_most};

/// Most templates and webhooks a Release names; each template is read every round.
pub const MAX_ANALYSIS_TEMPLATES: usize = 16;
pub const MAX_WEBHOOKS: usize = 16;

/// Metric analysis and webhooks. At each step, once its pods are in place and the gates
/// pass, the step is held until the analysis is Successful and the `rollout` webhooks say
/// yes.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct AnalysisSpec {
    /// Templates whose metrics judge each step.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    #[x_kube(
        validation = Rule::new("self.all(t, self.exists_one(u, u.kind == t.kind && u.name == t.name))")
            .message("analysis.templates must not name the same template twice")
    )]
    pub templates: Vec<AnalysisTemplateRef>,
    /// Values for the templates' `{{args.NAME}}`; they override the templates' defaults
    /// and the args the Release supplies (`namespace`, `service`, `target`, `canary-revision`,
    /// `stable-revision`: the `sluice.dev/revision` label of each side's pods; also as
    /// `canary-hash` and `stable-hash`, the names Argo Rollouts' templates use).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    #[x_kube(
        validation = Rule::new("self.all(a, self.exists_one(b, b.name == a.name))")
            .message("analysis.args names must be unique")
    )]
    pub args: Vec<AnalysisArg>,
    /// Measurements of each `MetricTemplate` check per step (Flagger's
    /// `analysis.iterations`). Default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 1000").message("analysis.iterations must be between 1 and 1000"))]
    pub iterations: Option<i32>,
    /// Flagger-shaped webhooks.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    #[x_kube(
        validation = Rule::new("self.all(w, self.exists_one(v, v.name == w.name))")
            .message("analysis.webhooks names must be unique")
    )]
    pub webhooks: Vec<WebhookSpec>,
}

/// Which kind of template a reference names.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum TemplateKind {
    /// Argo Rollouts `AnalysisTemplate` (`argoproj.io/v1alpha1`), in the Release's namespace.
    AnalysisTemplate,
    /// Argo Rollouts `ClusterAnalysisTemplate` (cluster-scoped).
    ClusterAnalysisTemplate,
    /// Flagger `MetricTemplate` (`flagger.app/v1beta1`), in the Release's namespace.
    MetricTemplate,
}

/// A template to judge each step with.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.kind == 'MetricTemplate' ? has(self.thresholdRange) && has(self.interval) : !has(self.thresholdRange) && !has(self.interval)")
        .message("thresholdRange and interval are required for a MetricTemplate and not allowed for an AnalysisTemplate or ClusterAnalysisTemplate (their metrics carry their own conditions and intervals)")
)]
pub struct AnalysisTemplateRef {
    pub kind: TemplateKind,
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(
        validation = Rule::new("size(self) <= 253 && self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$')")
            .message("analysis.templates[].name must be a valid object name: lowercase letters, digits, '-' and '.'")
    )]
    pub name: String,
    /// `MetricTemplate` only: the range the query's value must stay in (inclusive).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold_range: Option<ThresholdRangeSpec>,
    /// `MetricTemplate` only: the query window (`{{ interval }}`) and the time between
    /// measurements.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = duration_positive_at_most("analysis.templates[].interval", "1h"))]
    pub interval: Option<DurationString>,
}

/// Flagger's `thresholdRange`: at least one bound.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("has(self.min) || has(self.max)").message("thresholdRange needs min, max or both"),
    validation = Rule::new("!has(self.min) || !has(self.max) || self.min <= self.max").message("thresholdRange.min must not be above thresholdRange.max")
)]
pub struct ThresholdRangeSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<f64>,
}

/// One `{{args.NAME}}` value.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AnalysisArg {
    #[schemars(length(min = 1, max = 63))]
    pub name: String,
    #[schemars(length(max = 1024))]
    pub value: String,
}

/// A webhook in Flagger's shape.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WebhookSpec {
    #[schemars(length(min = 1, max = 63))]
    pub name: String,
    /// `pre-rollout`, `rollout`, `post-rollout`, `rollback` or `event`.
    #[serde(rename = "type")]
    pub type_: WebhookType,
    /// A plain `http://` URL (the client speaks no TLS yet).
    #[schemars(length(min = 8, max = 2048))]
    #[x_kube(
        validation = Rule::new("size(self) <= 2048 && self.matches('^http://[^/?#]+')")
            .message("webhooks[].url must be an http:// URL with a host, at most 2048 characters (https:// is not supported yet)")
    )]
    pub url: String,
    /// Per attempt. Default `60s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = duration_positive_at_most("webhooks[].timeout", "5m"))]
    pub timeout: Option<DurationString>,
    /// Sent as the payload's `metadata`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(length(max = 32))]
    pub metadata: BTreeMap<String, String>,
}

/// When a webhook is called.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum WebhookType {
    /// Before a new revision gets its first pod: no (non-2xx) holds it.
    #[serde(rename = "pre-rollout")]
    PreRollout,
    /// At each step, beside the analysis: no holds the step.
    #[serde(rename = "rollout")]
    Rollout,
    /// After the release completes or is rolled back: reported only.
    #[serde(rename = "post-rollout")]
    PostRollout,
    /// Polled at each step: **yes** (2xx) rolls the release back.
    #[serde(rename = "rollback")]
    Rollback,
    /// Notified of phase changes, fire-and-forget.
    #[serde(rename = "event")]
    Event,
}

impl WebhookType {
    pub fn as_str(self) -> &'static str {
        match self {
            WebhookType::PreRollout => "pre-rollout",
            WebhookType::Rollout => "rollout",
            WebhookType::PostRollout => "post-rollout",
            WebhookType::Rollback => "rollback",
            WebhookType::Event => "event",
        }
    }
}

/// The analysis of one stage of a release: the pre-rollout check of a new revision
/// (`step` absent) or one step of the canary.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReleaseAnalysisStatus {
    /// The revision judged.
    pub revision: String,
    /// The step judged (0-based); absent for the pre-rollout webhooks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub step: Option<i32>,
    /// The metric run of this step; absent until the operator starts it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run: Option<AnalysisStatus>,
    /// The last answer of each webhook called for this stage.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub webhooks: Vec<WebhookResult>,
}

/// A webhook's last answer.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WebhookResult {
    pub name: String,
    #[serde(rename = "type")]
    pub type_: String,
    /// `Proceed`, `Halt` or `RollBack`.
    pub decision: String,
    pub message: String,
    /// RFC 3339.
    pub at: String,
}
