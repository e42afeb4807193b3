//! Status: the plan's status written, metrics recorded; a panicked reconcile's status.

use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;

use crate::release::crd::{FIELD_MANAGER, Release, ReleaseStatus};
use crate::release::plan::{Observed, Plan, set_condition};

use super::context::{Context, Error, now_secs};

/// Write the plan's status (server-side apply, the operator's field manager).
pub(super) async fn write_status(
    ctx: &Context,
    ns: &str,
    name: &str,
    plan: &Plan,
) -> Result<(), Error> {
    let releases: Api<Release> = Api::namespaced(ctx.client.clone(), ns);
    let body = json!({
        "apiVersion": "sluice.dev/v1alpha1",
        "kind": "Release",
        "status": plan.status,
    });
    let written = releases
        .patch_status(
            name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&body),
        )
        .await?;
    ctx.stores
        .saw_release(ns, name, written.resource_version().as_deref());
    Ok(())
}

/// The round's metrics: phase and step, gate evaluations, finished and refused drains,
/// a new abort.
pub(super) fn record_metrics(
    ctx: &Context,
    ns: &str,
    name: &str,
    observed: &Observed,
    plan: &Plan,
) {
    let phase = plan.status.phase.unwrap_or_default();
    ctx.metrics
        .set_phase(ns, name, phase, plan.status.current_step);
    ctx.metrics
        .set_routing(ns, name, plan.status.traffic_routing.as_ref());
    for e in &plan.evaluations {
        ctx.metrics.evaluation(e);
    }
    for d in &plan.finished_drains {
        ctx.metrics.drain_finished(d);
    }
    for _ in &plan.refused_drains {
        ctx.metrics.drains_refused.inc();
    }
    if let Some(a) = &plan.status.abort
        && o_abort_changed(observed, a)
    {
        ctx.metrics.aborted(&a.reason);
    }
}

pub(super) fn o_abort_changed(o: &Observed, a: &crate::release::crd::AbortInfo) -> bool {
    o.status.abort.as_ref() != Some(a)
}

/// Run one reconcile; a panic in it becomes [`Error::Panic`] for this object alone
/// (the controller's error policy requeues it, with backoff, like any other error).
pub async fn contain_panic<T>(
    reconcile: impl std::future::Future<Output = Result<T, Error>>,
) -> Result<T, Error> {
    crate::panic_guard::catch_panic(reconcile)
        .await
        .unwrap_or_else(|msg| Err(Error::Panic(msg)))
}

/// The status a panicked reconcile leaves (pure): everything as it was, the message and
/// the `Degraded` condition saying what happened.
pub fn panic_status(prev: &ReleaseStatus, generation: i64, msg: &str, now: f64) -> ReleaseStatus {
    let mut status = prev.clone();
    let message = format!(
        "the operator failed on this Release (a bug; please report it with the operator's log): {msg}; retrying with backoff"
    );
    status.message = Some(message.clone());
    set_condition(
        &mut status,
        "Ready",
        false,
        "ReconcilePanicked",
        &message,
        generation,
        now,
    );
    set_condition(
        &mut status,
        "Degraded",
        true,
        "ReconcilePanicked",
        &message,
        generation,
        now,
    );
    status
}

/// Write [`panic_status`] (best effort: the error is already counted and logged).
pub(super) async fn report_panic(release: &Release, ctx: &Context, msg: &str) {
    let (Some(ns), name) = (release.namespace(), release.name_any()) else {
        return;
    };
    let status = panic_status(
        &release.status.clone().unwrap_or_default(),
        release.metadata.generation.unwrap_or(0),
        msg,
        now_secs(),
    );
    // A merge patch of the two fields: the rest of status stays as the last round wrote it.
    let body = json!({"status": {"message": status.message, "conditions": status.conditions}});
    let api: Api<Release> = Api::namespaced(ctx.client.clone(), &ns);
    match api
        .patch_status(&name, &PatchParams::default(), &Patch::Merge(&body))
        .await
    {
        Ok(written) => ctx
            .stores
            .saw_release(&ns, &name, written.resource_version().as_deref()),
        Err(err) => {
            tracing::warn!(error = %err, "could not report the panic in the Release's status")
        }
    }
}
