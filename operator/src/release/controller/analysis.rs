//! `spec.analysis` in the controller: reads the templates, runs the current step's metric
//! analysis and calls its webhooks before planning (their results go into
//! `status.analysis`, which the pure planner reads), and after planning fires the `event`
//! and `post-rollout` webhooks.
//!
//! Every call is bounded: Prometheus queries by their check's timeout, webhooks by their
//! `timeout` (at most 5 m by admission), each called at most once per [`HALT_RETRY`].

use std::sync::OnceLock;

use chrono::{DateTime, Utc};
use kube::ResourceExt;
use kube::api::{Api, ApiResource, DynamicObject};
use serde_json::{Value, json};

use crate::analysis::{
    self, AnalysisStatus, HookDecision, HookPayload, HookType, MetricCheck, PrometheusClient,
    TemplateContext, Webhook, WebhookClient, decide, from_argo_analysis_template,
    from_flagger_metric,
};
use crate::pod::time::{parse_rfc3339, rfc3339};
use crate::release::crd::{
    AnalysisSpec, Phase, Release, ReleaseAnalysisStatus, TemplateKind, WebhookResult,
};
use crate::release::plan::{AnalysisObserved, HALT_RETRY, Observed, Plan};

use super::context::Context;

/// One client for every Release: its semaphore bounds the `event` calls in flight.
fn webhook_client() -> &'static WebhookClient {
    static CLIENT: OnceLock<WebhookClient> = OnceLock::new();
    CLIENT.get_or_init(WebhookClient::default)
}

fn prometheus() -> &'static PrometheusClient {
    static CLIENT: OnceLock<PrometheusClient> = OnceLock::new();
    CLIENT.get_or_init(PrometheusClient::new)
}

fn to_utc(t: f64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis((t * 1000.0) as i64).unwrap_or_default()
}

/// The group, version, kind and plural of a template kind.
pub(super) fn api_resource(kind: TemplateKind) -> ApiResource {
    let (group, version, kind, plural) = match kind {
        TemplateKind::AnalysisTemplate => (
            "argoproj.io",
            "v1alpha1",
            "AnalysisTemplate",
            "analysistemplates",
        ),
        TemplateKind::ClusterAnalysisTemplate => (
            "argoproj.io",
            "v1alpha1",
            "ClusterAnalysisTemplate",
            "clusteranalysistemplates",
        ),
        TemplateKind::MetricTemplate => (
            "flagger.app",
            "v1beta1",
            "MetricTemplate",
            "metrictemplates",
        ),
    };
    ApiResource {
        group: group.into(),
        version: version.into(),
        api_version: format!("{group}/{version}"),
        kind: kind.into(),
        plural: plural.into(),
    }
}

/// The checks of one template document (pure): the importer's, plus the Release's own
/// rule that every check ends (a step must be able to finish).
pub(super) fn checks_of(
    spec: &AnalysisSpec,
    index: usize,
    doc: &Value,
) -> Result<Vec<MetricCheck>, String> {
    let t = &spec.templates[index];
    let what = format!("{:?} {:?}", t.kind, t.name);
    let checks = match t.kind {
        TemplateKind::AnalysisTemplate | TemplateKind::ClusterAnalysisTemplate => {
            from_argo_analysis_template(doc).map_err(|e| format!("{what}: {e}"))?
        }
        TemplateKind::MetricTemplate => {
            let interval = t.interval.as_ref().map(|d| d.0.clone());
            let metric = json!({
                "name": t.name,
                "templateRef": {"name": t.name},
                "thresholdRange": t.threshold_range,
                "interval": interval,
            });
            let run = json!({"interval": interval, "iterations": spec.iterations.unwrap_or(1)});
            vec![
                from_flagger_metric(doc, &metric, Some(&run))
                    .map_err(|e| format!("{what}: {e}"))?,
            ]
        }
    };
    if let Some(c) = checks.iter().find(|c| c.effective_count().is_none()) {
        return Err(format!(
            "{what}: metric {:?} has an interval but no count, so it would measure until stopped; a Release step must end: set its count",
            c.name
        ));
    }
    Ok(checks)
}

/// Read and import every template; `Err` says which one and why.
async fn load_checks(
    ctx: &Context,
    ns: &str,
    spec: &AnalysisSpec,
) -> Result<Vec<MetricCheck>, String> {
    let mut checks = Vec::new();
    for (i, t) in spec.templates.iter().enumerate() {
        let ar = api_resource(t.kind);
        let api: Api<DynamicObject> = match t.kind {
            TemplateKind::ClusterAnalysisTemplate => Api::all_with(ctx.client.clone(), &ar),
            _ => Api::namespaced_with(ctx.client.clone(), ns, &ar),
        };
        let obj = match api.get_opt(&t.name).await {
            Ok(Some(o)) => o,
            Ok(None) => return Err(format!("{} {:?} not found", ar.kind, t.name)),
            Err(e) => return Err(format!("{} {:?} cannot be read: {e}", ar.kind, t.name)),
        };
        let doc = serde_json::to_value(&obj).map_err(|e| e.to_string())?;
        checks.extend(checks_of(spec, i, &doc)?);
    }
    Ok(checks)
}

/// The webhooks of the spec, as the library takes them.
pub(super) fn webhooks(spec: &AnalysisSpec) -> Result<Vec<Webhook>, String> {
    spec.webhooks
        .iter()
        .enumerate()
        .map(|(i, w)| {
            let v = serde_json::to_value(w).map_err(|e| e.to_string())?;
            Webhook::from_flagger(&v, &format!("analysis.webhooks[{i}]")).map_err(|e| e.to_string())
        })
        .collect()
}

/// Whether hook `h` is due in `stage` at `now`: never asked, or (a halted gate, or a
/// rollback hook, which is polled) asked at least [`HALT_RETRY`] ago.
fn due(stage: &ReleaseAnalysisStatus, h: &Webhook, now: f64) -> bool {
    match stage.webhooks.iter().find(|r| r.name == h.name) {
        None => true,
        Some(r) if r.decision == "Proceed" && h.hook_type != HookType::Rollback => false,
        Some(r) => parse_rfc3339(&r.at).is_none_or(|t| now - t >= HALT_RETRY.as_secs_f64()),
    }
}

/// Call the due hooks of `types` concurrently and record their answers in `stage`.
async fn call_hooks(
    ctx: &Context,
    stage: &mut ReleaseAnalysisStatus,
    hooks: &[Webhook],
    types: &[HookType],
    payload: &HookPayload,
    now: f64,
) {
    let due: Vec<&Webhook> = hooks
        .iter()
        .filter(|h| types.contains(&h.hook_type) && due(stage, h, now))
        .collect();
    let client = webhook_client();
    let outcomes = futures::future::join_all(due.iter().map(|h| client.call(h, payload))).await;
    for (h, outcome) in due.into_iter().zip(outcomes) {
        let (decision, message) = match decide(h, &outcome) {
            HookDecision::Proceed => (
                "Proceed",
                format!("webhook {}: {}", h.name, outcome.describe()),
            ),
            HookDecision::Halt(m) => ("Halt", m),
            HookDecision::RollBack(m) => ("RollBack", m),
        };
        let type_ = hook_type_str(h.hook_type);
        ctx.metrics.webhook_called(type_, decision);
        let result = WebhookResult {
            name: h.name.clone(),
            type_: type_.into(),
            decision: decision.into(),
            message: message.chars().take(512).collect(),
            at: rfc3339(now),
        };
        stage.webhooks.retain(|r| r.name != h.name);
        stage.webhooks.push(result);
    }
}

fn hook_type_str(t: HookType) -> &'static str {
    match t {
        HookType::PreRollout => "pre-rollout",
        HookType::Rollout => "rollout",
        HookType::PostRollout => "post-rollout",
        HookType::Rollback => "rollback",
        HookType::Event => "event",
    }
}

/// Before planning: measure and ask for the stage the planner named in
/// `status.analysis`, writing the results there. Templates are read only while there is
/// something to judge (a canary, or a new revision about to start).
pub(super) async fn observe(
    ctx: &Context,
    release: &Release,
    o: &mut Observed,
    now: f64,
) -> AnalysisObserved {
    let mut seen = AnalysisObserved::default();
    let Some(spec) = o.settings.as_ref().ok().and_then(|s| s.analysis.clone()) else {
        return seen;
    };
    let st = &o.status;
    let candidate = o
        .deployment
        .as_ref()
        .map(|d| d.revision.clone())
        .filter(|r| {
            Some(r) != st.stable_revision.as_ref()
                && Some(r) != st.canary_revision.as_ref()
                && Some(r) != st.aborted_revision.as_ref()
        });
    if o.deleting || (st.canary_revision.is_none() && candidate.is_none()) {
        return seen;
    }
    let ns = release.namespace().unwrap_or_default();
    let name = release.name_any();
    let hooks = match webhooks(&spec) {
        Ok(h) => h,
        Err(e) => {
            seen.invalid = Some(e);
            return seen;
        }
    };
    let checks = match load_checks(ctx, &ns, &spec).await {
        Ok(c) => c,
        Err(e) => {
            seen.invalid = Some(e);
            return seen;
        }
    };
    let (canary, stable) = (st.canary_revision.clone(), st.stable_revision.clone());
    let step = st.current_step;
    let phase = st.phase.unwrap_or_default().as_str();
    let mut payload = HookPayload {
        name: name.clone(),
        namespace: ns.clone(),
        phase: phase.into(),
        metadata: Default::default(),
    };
    let Some(stage) = o.status.analysis.as_mut() else {
        return seen;
    };
    payload
        .metadata
        .insert("revision".into(), stage.revision.clone());
    if stage.step.is_none() {
        if Some(&stage.revision) == candidate.as_ref() {
            call_hooks(ctx, stage, &hooks, &[HookType::PreRollout], &payload, now).await;
        }
        return seen;
    }
    if Some(&stage.revision) != canary.as_ref() || stage.step != step {
        return seen;
    }
    payload
        .metadata
        .insert("step".into(), step.map(|s| s + 1).unwrap_or(0).to_string());
    if !checks.is_empty() {
        if stage.run.is_none() {
            let target = release.spec.workload_ref.name.clone();
            let mut tctx = TemplateContext::for_release(
                &name,
                &ns,
                &target,
                &target,
                canary.as_deref().unwrap_or_default(),
                stable.as_deref().unwrap_or_default(),
            );
            for a in &spec.args {
                tctx.args.insert(a.name.clone(), a.value.clone());
            }
            match AnalysisStatus::start(&checks, &tctx, to_utc(now)) {
                Ok(run) => stage.run = Some(run),
                Err(e) => {
                    seen.invalid = Some(format!("the analysis cannot start: {e}"));
                    return seen;
                }
            }
        }
        if let Some(run) = stage.run.as_mut().filter(|r| !r.verdict.is_final()) {
            let before = counters(run);
            let round = analysis::reconcile(&checks, run, to_utc(now), prometheus()).await;
            let after = counters(run);
            for (i, phase) in ["Successful", "Failed", "Inconclusive", "Error"]
                .iter()
                .enumerate()
            {
                ctx.metrics
                    .measured(phase, after[i].saturating_sub(before[i]));
            }
            seen.requeue_after = round.requeue_after;
        }
    }
    call_hooks(
        ctx,
        stage,
        &hooks,
        &[HookType::Rollout, HookType::Rollback],
        &payload,
        now,
    )
    .await;
    seen
}

fn counters(run: &AnalysisStatus) -> [u32; 4] {
    run.metrics.iter().fold([0; 4], |a, m| {
        [
            a[0] + m.successful,
            a[1] + m.failed,
            a[2] + m.inconclusive,
            a[3] + m.error,
        ]
    })
}

/// After the round: `event` hooks on a phase change (fire-and-forget), `post-rollout`
/// hooks once a release completes or is rolled back (in the background; the answer is
/// only logged and counted).
pub(super) fn after_plan(ctx: &Context, release: &Release, o: &Observed, plan: &Plan) {
    let Some(spec) = o.settings.as_ref().ok().and_then(|s| s.analysis.as_ref()) else {
        return;
    };
    let Ok(hooks) = webhooks(spec) else {
        return;
    };
    let (before, after) = (o.status.phase, plan.status.phase.unwrap_or_default());
    if before == Some(after) {
        return;
    }
    let (ns, name) = (release.namespace().unwrap_or_default(), release.name_any());
    let message = plan.status.message.clone().unwrap_or_default();
    let payload = HookPayload::phase_change(&name, &ns, after.as_str(), &message, Utc::now());
    let sent = webhook_client().notify(&hooks, &payload);
    for _ in 0..sent {
        ctx.metrics.webhook_called("event", "Sent");
    }
    let finished =
        o.status.canary_revision.is_some() && matches!(after, Phase::Completed | Phase::Aborted);
    let post: Vec<Webhook> = hooks
        .into_iter()
        .filter(|h| h.hook_type == HookType::PostRollout)
        .collect();
    if !finished || post.is_empty() {
        return;
    }
    let metrics = ctx.metrics.clone();
    tokio::spawn(async move {
        for h in &post {
            let outcome = webhook_client().call(h, &payload).await;
            metrics.webhook_called(
                "post-rollout",
                if outcome.is_yes() { "Proceed" } else { "Halt" },
            );
            tracing::info!(hook = %h.name, outcome = %outcome.describe(), "post-rollout webhook");
        }
    });
}

#[cfg(test)]
#[path = "analysis_tests.rs"]
mod tests;
