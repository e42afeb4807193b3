//! Execute: the plan's actions, each idempotent.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet, ReplicaSetSpec};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, OwnerReference};
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::events::{Event, EventType};
use kube::{Resource, ResourceExt};
use serde_json::json;

use crate::pod::inject::{inject, new_drain_token};
use crate::pod::keys::{DRAIN_STARTED_ANNOTATION, REVISION_LABEL, SERVING_CONDITION};
use crate::pod::time::rfc3339;
use crate::release::crd::{
    CLAIM_ANNOTATION, DELETION_COST_ANNOTATION, DRAIN_RELEASED_ANNOTATION, FINALIZER,
    RELEASE_LABEL, REPLICAS_ANNOTATION, Release,
};
use crate::release::plan::{Action, Plan};
use crate::release::settings::Settings;

use super::context::{Context, Error, lock_samples, now_secs};
use super::gather::Gathered;
use super::stores::Kind;

/// How the execute stage ended.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Executed {
    /// Every action ran: status is written next.
    All,
    /// The finalizer was removed: the Release may be gone, nothing more to write.
    Finalized,
}

/// Run the plan's actions in order. An error stops the round; the next reconcile plans
/// again from what it then observes.
pub(super) async fn execute(ctx: &Context, g: &Gathered, plan: &Plan) -> Result<Executed, Error> {
    let (ns, name, release, key) = (&g.ns, &g.name, &g.release, &g.key);
    let (deployment, observed, now) = (&g.deployment, &g.observed, g.now);
    let client = ctx.client.clone();
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns);
    let rss: Api<ReplicaSet> = Api::namespaced(client.clone(), ns);
    let pods: Api<Pod> = Api::namespaced(client, ns);
    let reference = release.object_ref(&());
    // Each Deployment, ReplicaSet and pod write is remembered until the caches show it
    // (`stores.rs`); `None`: the object was gone, nothing to wait for.
    let wrote = |kind: Kind, version: Option<String>| {
        if let Some(v) = version {
            ctx.stores.wrote(ns, name, kind, Some(&v));
        }
    };
    for action in &plan.actions {
        tracing::debug!(?action, "executing");
        match action {
            Action::AddFinalizer => {
                let patch = add_finalizer_patch(release.finalizers());
                patch_release_json(ctx, ns, name, patch).await?;
            }
            Action::RemoveFinalizer => {
                if let Some(patch) = remove_finalizer_patch(release.finalizers()) {
                    patch_release_json(ctx, ns, name, patch).await?;
                }
                ctx.metrics.forget(ns, name);
                lock_samples(ctx).forget(key);
                ctx.stores.forget(ns, name);
                // The object may be gone now: no status to write.
                return Ok(Executed::Finalized);
            }
            Action::ClaimDeployment => {
                let dep = deployment
                    .as_ref()
                    .ok_or(Error::MissingField("Deployment"))?;
                // The resourceVersion read makes this conditional: when another Release
                // claimed the Deployment meanwhile, it fails with a conflict, and the next
                // reconcile sees that claim. Nothing after it in this plan runs.
                let claimed = deployments
                    .patch(
                        &release.spec.workload_ref.name,
                        &PatchParams::default(),
                        &Patch::Merge(&json!({"metadata": {
                            "resourceVersion": dep.resource_version(),
                            "annotations": {CLAIM_ANNOTATION: name},
                        }})),
                    )
                    .await?;
                wrote(Kind::Deployment, claimed.resource_version());
            }
            Action::ReleaseClaim => {
                let patch = json!([
                    {"op": "test", "path": CLAIM_POINTER, "value": name},
                    {"op": "remove", "path": CLAIM_POINTER},
                ]);
                match deployments
                    .patch(
                        &release.spec.workload_ref.name,
                        &PatchParams::default(),
                        &Patch::<()>::Json(serde_json::from_value(patch)?),
                    )
                    .await
                {
                    Ok(released) => wrote(Kind::Deployment, released.resource_version()),
                    // Gone, or the claim is no longer ours (a failed test is a 422).
                    Err(kube::Error::Api(e)) if e.code == 404 || e.code == 422 => {}
                    Err(e) => return Err(e.into()),
                }
            }
            Action::RecordDeploymentReplicas(n) => {
                let v = merge(
                    &deployments,
                    &release.spec.workload_ref.name,
                    json!({"metadata": {"annotations": {REPLICAS_ANNOTATION: n.to_string()}}}),
                )
                .await?;
                wrote(Kind::Deployment, v);
            }
            Action::ScaleDeployment(n) => {
                let v = merge(
                    &deployments,
                    &release.spec.workload_ref.name,
                    json!({"spec": {"replicas": n}}),
                )
                .await?;
                wrote(Kind::Deployment, v);
            }
            Action::CreateReplicaSet { revision, replicas } => {
                let dep = deployment
                    .as_ref()
                    .ok_or(Error::MissingField("Deployment"))?;
                let settings = observed
                    .settings
                    .as_ref()
                    .map_err(|_| Error::MissingField("valid spec"))?;
                let rs = build_replica_set(release, dep, settings, revision, *replicas)?;
                match rss.create(&PostParams::default(), &rs).await {
                    Ok(created) => wrote(Kind::ReplicaSet, created.resource_version()),
                    // Created already (a round before, or by a Release of the same name
                    // before): never a second one.
                    Err(kube::Error::Api(e)) if e.code == 409 => {}
                    Err(e) => return Err(e.into()),
                }
            }
            Action::ScaleReplicaSet { name: rs, replicas } => {
                let v = merge(&rss, rs, json!({"spec": {"replicas": replicas}})).await?;
                wrote(Kind::ReplicaSet, v);
            }
            Action::DeleteReplicaSet { name: rs } => {
                match rss.delete(rs, &Default::default()).await {
                    Ok(res) => match res.left() {
                        Some(going) => wrote(Kind::ReplicaSet, going.resource_version()),
                        // Deleted at once: the answer has no version to wait for.
                        None => ctx.stores.wrote(ns, name, Kind::ReplicaSet, None),
                    },
                    Err(kube::Error::Api(e)) if e.code == 404 => {}
                    Err(e) => return Err(e.into()),
                }
            }
            Action::SetServing { pod, serving } => {
                wrote(Kind::Pod, set_serving(&pods, pod, *serving).await?);
            }
            Action::StartDrain { pod } => {
                let v = merge(
                    &pods,
                    pod,
                    json!({"metadata": {"annotations": {DRAIN_STARTED_ANNOTATION: rfc3339(now)}}}),
                )
                .await?;
                wrote(Kind::Pod, v);
                wrote(Kind::Pod, set_serving(&pods, pod, false).await?);
            }
            Action::ReleasePod { pod } => {
                let v = merge(
                    &pods,
                    pod,
                    json!({"metadata": {"annotations": {
                        DRAIN_RELEASED_ANNOTATION: rfc3339(now),
                        DELETION_COST_ANNOTATION: "-1000000",
                    }}}),
                )
                .await?;
                wrote(Kind::Pod, v);
            }
            Action::ApplyRoutingServices { stable, canary } => {
                if let Some(r) = routing_settings(observed) {
                    super::routing::apply_services(ctx, ns, name, r, stable, canary).await?;
                }
            }
            Action::SetRouteWeight { canary } => {
                if let Some(r) = routing_settings(observed) {
                    super::routing::set_weight(ctx, ns, r, *canary).await?;
                }
            }
            Action::RebalanceConnections { pod, connections } => {
                // Best effort: an agent that cannot be asked leaves the split as it is,
                // and the next round measures again.
                let view = observed.pods.iter().find(|p| &p.name == pod);
                let port = observed
                    .settings
                    .as_ref()
                    .map(|s| s.agent.admin_port)
                    .unwrap_or(crate::pod::settings::DEFAULT_ADMIN_PORT);
                match view.and_then(|v| Some((v.ip.as_deref()?, v.drain_token.as_deref()?))) {
                    Some((ip, token)) => {
                        match crate::pod::drain::ask_rebalance(ip, port as u16, token, *connections)
                            .await
                        {
                            Ok(_) => {
                                tracing::debug!(
                                    pod,
                                    connections,
                                    "asked the agent to let connections reconnect"
                                );
                                super::context::lock_samples(ctx).asked(
                                    key,
                                    pod,
                                    super::context::now_secs(),
                                )
                            }
                            Err(e) => {
                                tracing::warn!(pod, error = %e, "could not ask the agent to rebalance")
                            }
                        }
                    }
                    None => tracing::warn!(pod, "no IP or drain token: not rebalanced"),
                }
            }
            Action::SetHeaderRoute { headers } => {
                if let Some(r) = routing_settings(observed) {
                    super::routing::set_header_route(ctx, ns, r, headers).await?;
                }
            }
            Action::Event {
                warning,
                reason,
                note,
            } => {
                let ev = Event {
                    type_: if *warning {
                        EventType::Warning
                    } else {
                        EventType::Normal
                    },
                    reason: reason.clone(),
                    note: Some(note.chars().take(1000).collect()),
                    action: "Release".into(),
                    secondary: None,
                };
                if let Err(err) = ctx.recorder.publish(&ev, &reference).await {
                    tracing::warn!(error = %err, "could not publish event");
                }
                tracing::info!(reason, note, "event");
            }
        }
    }
    Ok(Executed::All)
}

async fn patch_release_json(
    ctx: &Context,
    ns: &str,
    name: &str,
    patch: serde_json::Value,
) -> Result<(), Error> {
    let api: Api<Release> = Api::namespaced(ctx.client.clone(), ns);
    let written = api
        .patch(
            name,
            &PatchParams::default(),
            &Patch::<()>::Json(serde_json::from_value(patch)?),
        )
        .await?;
    ctx.stores
        .saw_release(ns, name, written.resource_version().as_deref());
    Ok(())
}

/// A merge patch; the patched object's `resourceVersion`, `None` when it is gone.
async fn merge<K>(
    api: &Api<K>,
    name: &str,
    body: serde_json::Value,
) -> Result<Option<String>, Error>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api
        .patch(name, &PatchParams::default(), &Patch::Merge(&body))
        .await
    {
        Ok(o) => Ok(o.resource_version()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Set the readiness-gate condition. Strategic merge keys conditions by type, so the
/// kubelet's conditions are left alone. The pod's `resourceVersion`, `None` when it is gone.
async fn set_serving(pods: &Api<Pod>, pod: &str, serving: bool) -> Result<Option<String>, Error> {
    let body = json!({"status": {"conditions": [{
        "type": SERVING_CONDITION,
        "status": if serving { "True" } else { "False" },
        "reason": if serving { "Serving" } else { "Draining" },
        "message": if serving { "sluice: in service" } else { "sluice: taken out of service for a drain" },
        "lastTransitionTime": rfc3339(now_secs()),
    }]}});
    match pods
        .patch_status(pod, &PatchParams::default(), &Patch::Strategic(&body))
        .await
    {
        Ok(p) => Ok(p.resource_version()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// [`CLAIM_ANNOTATION`] as a JSON pointer (`/` escaped as `~1`).
pub(super) const CLAIM_POINTER: &str = "/metadata/annotations/sluice.dev~1claimed-by";

/// JSON patch that adds [`FINALIZER`] to the list read as `current`, only if the list is
/// still that: a finalizer another controller added meanwhile is never overwritten (the
/// `test` fails, the reconcile retries on a fresh read).
pub fn add_finalizer_patch(current: &[String]) -> serde_json::Value {
    if current.is_empty() {
        // An absent list tests equal to null.
        json!([
            {"op": "test", "path": "/metadata/finalizers", "value": null},
            {"op": "add", "path": "/metadata/finalizers", "value": [FINALIZER]},
        ])
    } else {
        json!([
            {"op": "test", "path": "/metadata/finalizers", "value": current},
            {"op": "add", "path": "/metadata/finalizers/-", "value": FINALIZER},
        ])
    }
}

/// JSON patch that removes [`FINALIZER`] at the index it was read at, only if it is still
/// there; `None` when it is not in `current`.
pub fn remove_finalizer_patch(current: &[String]) -> Option<serde_json::Value> {
    let i = current.iter().position(|f| f == FINALIZER)?;
    let path = format!("/metadata/finalizers/{i}");
    Some(json!([
        {"op": "test", "path": path, "value": FINALIZER},
        {"op": "remove", "path": path},
    ]))
}

/// The ReplicaSet of one revision: the Deployment's template, injected, labelled with
/// the Release and the revision, owned by the Release.
pub fn build_replica_set(
    release: &Release,
    dep: &Deployment,
    settings: &Settings,
    revision: &str,
    replicas: i32,
) -> Result<ReplicaSet, Error> {
    let name = release.name_any();
    let spec = dep
        .spec
        .as_ref()
        .ok_or_else(|| Error::NoTemplate(dep.name_any()))?;
    let injected = inject(
        &spec.template,
        &settings.agent,
        &settings.drain,
        &new_drain_token(),
    )
    .map_err(|_| Error::NoTemplate(dep.name_any()))?;
    let mut template = injected.template;
    let labels = template
        .metadata
        .get_or_insert_with(Default::default)
        .labels
        .get_or_insert_with(BTreeMap::new);
    labels.insert(RELEASE_LABEL.into(), name.clone());
    labels.insert(REVISION_LABEL.into(), revision.into());
    let labels = labels.clone();
    let mut match_labels = spec.selector.match_labels.clone().unwrap_or_default();
    match_labels.insert(RELEASE_LABEL.into(), name.clone());
    match_labels.insert(REVISION_LABEL.into(), revision.into());
    let owner = OwnerReference {
        api_version: "sluice.dev/v1alpha1".into(),
        kind: "Release".into(),
        name: name.clone(),
        uid: release.uid().ok_or(Error::MissingField("metadata.uid"))?,
        controller: Some(true),
        block_owner_deletion: Some(true),
    };
    Ok(ReplicaSet {
        metadata: ObjectMeta {
            name: Some(format!("{name}-{revision}")),
            namespace: release.namespace(),
            labels: Some(labels),
            owner_references: Some(vec![owner]),
            annotations: Some(
                [(
                    "sluice.dev/agent-notes".to_string(),
                    injected.notes.join("\n"),
                )]
                .into(),
            ),
            ..Default::default()
        },
        spec: Some(ReplicaSetSpec {
            replicas: Some(replicas),
            min_ready_seconds: spec.min_ready_seconds,
            selector: LabelSelector {
                match_labels: Some(match_labels),
                match_expressions: spec.selector.match_expressions.clone(),
            },
            template: Some(template),
        }),
        status: None,
    })
}

fn routing_settings(
    observed: &crate::release::plan::Observed,
) -> Option<&crate::release::settings::RoutingSettings> {
    observed.settings.as_ref().ok()?.routing.as_ref()
}
