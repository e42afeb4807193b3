//! The InferenceSet controller's I/O: gather (set, its pods from the shared cache, nodes)
//! → [`plan`](super::plan::plan) → execute actions idempotently → write status.
//! Pod names are deterministic (`<gang>-<index>`), so a round that acts on a stale cache
//! only meets `AlreadyExists`/`NotFound`, which are success here.
//!
//! - [`context`]: what every reconcile shares;
//! - [`build`]: the objects a spec makes (pure);
//! - [`gather`]: pods and nodes as the planner sees them;
//! - this file: the reconcile (gather → plan → execute → status) and the controller's
//!   watches;
//! - [`execute`]: the actions, idempotently.

mod build;
mod context;
mod execute;
mod gather;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::{Action as Requeue, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::Store;
use kube::runtime::watcher;
use serde_json::json;
use tracing::Instrument;

use crate::inference::crd::*;
use crate::inference::error::Error;
use crate::inference::metrics::InferenceMetrics;
use crate::inference::plan::{self, Observed, PodView, Settings};
use crate::pod::drain::History;
use crate::pod::keys::DRAIN_STARTED_ANNOTATION;
use crate::pod::settings::AgentImagePolicy;
use crate::telemetry::reconcile_span;
pub use build::{agent_settings, build_pod, gang_request, level, revision};
pub use context::Context;
use context::now;
use execute::execute;
pub use execute::first_token;
use gather::node_readiness;
pub use gather::pod_view;

async fn reconcile(set: Arc<InferenceSet>, ctx: Arc<Context>) -> Result<Requeue, Error> {
    let span = reconcile_span(
        "InferenceSet",
        &set.namespace().unwrap_or_default(),
        &set.name_any(),
    );
    async {
        let started = Instant::now();
        let res = reconcile_inner(&set, &ctx).await;
        ctx.metrics.reconcile.finished(started);
        res
    }
    .instrument(span)
    .await
}

/// One round: gather (caches and agents) → plan (pure) → execute → status and metrics.
async fn reconcile_inner(set: &InferenceSet, ctx: &Context) -> Result<Requeue, Error> {
    let ns = set.namespace().unwrap_or_default();
    let name = set.name_any();
    if set.metadata.deletion_timestamp.is_some() {
        ctx.metrics.forget(&ns, &name);
        return Ok(Requeue::await_change());
    }
    let t = now();
    let settings = Settings::from_spec(&set.spec);
    let grace = settings.as_ref().map(|s| s.node_loss_grace).unwrap_or(30.0);
    let nodes = node_readiness(&ctx.nodes);
    let ours: Vec<Arc<Pod>> = ctx
        .pods
        .state()
        .into_iter()
        .filter(|p| p.metadata.namespace.as_deref() == Some(&ns))
        .filter(|p| p.labels().get(SET_LABEL) == Some(&name))
        .collect();
    let mut pods: Vec<PodView> = ours
        .iter()
        .filter_map(|p| pod_view(p, &nodes, t, grace))
        .collect();
    // The drain protocol's quiet signal: scrape the agents of draining pods.
    if let Some((agent, drain)) = agent_settings(&set.spec, &ctx.agent_images.default_image) {
        let draining: Vec<&Pod> = ours
            .iter()
            .map(|p| p.as_ref())
            .filter(|p| {
                p.metadata.deletion_timestamp.is_none()
                    && p.annotations().contains_key(DRAIN_STARTED_ANNOTATION)
            })
            .collect();
        let scraped = crate::pod::drain::scrape_all(&draining, agent.admin_port).await;
        let keep = drain.quiet_period.as_secs_f64() + 10.0;
        let prefix = format!("{ns}/{name}/");
        // A contained panic may have poisoned it; the history is still usable.
        let mut history = ctx
            .history
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let present: Vec<String> = draining
            .iter()
            .map(|p| format!("{prefix}{}", p.name_any()))
            .collect();
        history.retain(&prefix, &present);
        for (p, sample) in draining.iter().zip(scraped) {
            let key = format!("{prefix}{}", p.name_any());
            let signals = history.record(&key, sample, now(), keep, 5.0);
            if let Some(v) = pods.iter_mut().find(|v| v.name == p.name_any()) {
                v.signals = signals;
            }
        }
    }
    let o = Observed {
        name: name.clone(),
        generation: set.metadata.generation.unwrap_or(0),
        revision: revision(&set.spec),
        settings,
        status: set.status.clone().unwrap_or_default(),
        pods: pods.clone(),
    };
    let p = plan::plan(&o, t);
    // A NotReady node inside its grace period: come back when it expires.
    let mut requeue = p.requeue_after;
    for pv in &pods {
        if let Some(Some(since)) = pv.node.as_ref().and_then(|n| nodes.get(n))
            && !pv.node_lost
        {
            requeue = requeue.min(Duration::from_secs_f64((since + grace - t).max(1.0)));
        }
    }
    execute(set, ctx, &p.actions).await?;
    if set.status.as_ref() != Some(&p.status) {
        let api: Api<InferenceSet> = Api::namespaced(ctx.client.clone(), &ns);
        api.patch_status(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({ "status": p.status })),
        )
        .await?;
    }
    ctx.metrics.set_progress(
        &ns,
        &name,
        p.status.updated_replicas,
        set.spec.replicas,
        p.status.serving_replicas,
    );
    Ok(Requeue::requeue(requeue))
}

fn error_policy(set: Arc<InferenceSet>, err: &Error, ctx: Arc<Context>) -> Requeue {
    let _span = reconcile_span(
        "InferenceSet",
        &set.namespace().unwrap_or_default(),
        &set.name_any(),
    )
    .entered();
    tracing::warn!(error = %err, "reconcile failed");
    ctx.metrics.reconcile_error(err);
    Requeue::requeue(Duration::from_secs(5))
}

/// Node deletions and readiness flips, as a trigger to reconcile every set.
fn node_changes(nodes: Store<Node>) -> impl futures::Stream<Item = ()> + Send + 'static {
    let (tx, rx) = futures::channel::mpsc::unbounded();
    tokio::spawn(async move {
        let _ = nodes.wait_until_ready().await;
        let mut last = node_readiness(&nodes)
            .into_iter()
            .map(|(k, v)| (k, v.is_none()))
            .collect::<BTreeMap<_, _>>();
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let now: BTreeMap<String, bool> = node_readiness(&nodes)
                .into_iter()
                .map(|(k, v)| (k, v.is_none()))
                .collect();
            let changed = last.iter().any(|(k, v)| now.get(k) != Some(v));
            last = now;
            if changed && tx.unbounded_send(()).is_err() {
                break;
            }
        }
    });
    rx
}

/// Run the controller until it stops (one namespace when `namespace` is set).
pub async fn run(
    client: kube::Client,
    pods: Store<Pod>,
    nodes: Store<Node>,
    metrics: InferenceMetrics,
    namespace: Option<String>,
    agent_images: AgentImagePolicy,
    identity: Option<String>,
) {
    let (sets, owned): (Api<InferenceSet>, Api<Pod>) = match &namespace {
        Some(ns) => (
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client.clone(), ns),
        ),
        None => (Api::all(client.clone()), Api::all(client.clone())),
    };
    let ctx = Arc::new(Context {
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: "sluice-inference".into(),
                instance: identity,
            },
        ),
        client,
        pods: pods.clone(),
        nodes: nodes.clone(),
        metrics,
        agent_images,
        history: Mutex::new(History::default()),
    });
    let _ = pods.wait_until_ready().await;
    Controller::new(sets, watcher::Config::default())
        .owns(owned, watcher::Config::default().labels(SET_LABEL))
        .reconcile_all_on(node_changes(nodes))
        .run(
            |set, ctx| async move {
                crate::panic_guard::catch_panic(reconcile(set, ctx))
                    .await
                    .unwrap_or_else(|msg| {
                        tracing::error!(panic = %msg, "InferenceSet reconcile panicked");
                        Err(Error::Panic(msg))
                    })
            },
            error_policy,
            ctx,
        )
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(error = %e, "reconcile round");
            }
        })
        .await;
}

#[cfg(test)]
mod tests;
