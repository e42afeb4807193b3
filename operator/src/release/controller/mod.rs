//! The Release controller's I/O: gather the observed state, run the pure planner, execute
//! its actions idempotently, write status.
//!
//! Only the leader runs this (the operator shell starts [`run`] once it holds the Lease).
//! The only in-memory state is a short history of agent metric samples per Release and
//! pod ([`super::samples`]); losing it (restart) makes the next decisions wait for fresh
//! samples, never act early.
//!
//! One round ([`reconcile_inner`]) in stages, each in its own file: `gather.rs` (the
//! Release, its Deployment, ReplicaSets and pods, the agents' samples → `Observed`), the
//! pure planner (`super::plan`), `execute.rs` (the plan's actions, each idempotent),
//! `status.rs` (status, metrics, and the status a panicked round leaves); `context.rs`
//! holds the errors, the shared context and the configuration; `stores.rs` the watch
//! caches that the Deployment, ReplicaSets and pods are read from (no GET or LIST per
//! round).

mod analysis;
mod context;
mod execute;
mod gather;
mod routing;
mod status;
mod status_writes;
mod stores;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use kube::runtime::controller::{Action as Requeue, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{Predicate, PredicateConfig, WatchStreamExt, predicates, watcher};
use kube::{Client, Resource, ResourceExt};
use tracing::Instrument;

use crate::release::crd::{RELEASE_LABEL, Release};
use crate::release::metrics::ReleaseMetrics;
use crate::release::plan::plan;
use crate::release::samples::SampleStore;
use crate::telemetry::reconcile_span;

pub use context::{Config, Context, Error};
pub use execute::{add_finalizer_patch, build_replica_set, remove_finalizer_patch};
pub use status::{contain_panic, panic_status};

use execute::{Executed, execute};
use gather::gather;
use status::{record_metrics, report_panic, write_status};
use stores::Stores;

#[cfg(test)]
mod tests;

/// How soon a round comes back while the caches are still listing.
const CACHE_SYNC_RETRY: Duration = Duration::from_millis(200);

/// Run the Release controller until the returned future is dropped.
pub async fn run(client: Client, metrics: ReleaseMetrics, config: Config) {
    let reporter = Reporter {
        controller: "sluice-release".into(),
        instance: config.identity.clone(),
    };
    let scope = config.watch_namespace.clone();
    fn api<K>(client: &Client, scope: &Option<String>) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as Resource>::DynamicType: Default,
    {
        match scope {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        }
    }
    let releases: Api<Release> = api(&client, &scope);
    let rs: Api<ReplicaSet> = api(&client, &scope);
    let pods: Api<Pod> = api(&client, &scope);
    let deployments: Api<Deployment> = api(&client, &scope);
    // One watch per kind: it fills the cache reconciles read and triggers the Controller.
    let (stores, triggers) = Stores::new(deployments, rs, pods);
    let ctx = Arc::new(Context {
        recorder: Recorder::new(client.clone(), reporter),
        client: client.clone(),
        metrics,
        agent_images: config.agent_images,
        samples: Mutex::new(SampleStore::default()),
        stores,
    });
    // The Releases' cache takes every change (the rounds read their status from it); only
    // changes that ask for a round trigger one (`release_trigger`). No backoff of its own:
    // the Controller backs off all its triggers.
    let (release_store, release_writer) = reflector::store();
    let release_changes = watcher(releases, watcher::Config::default())
        .reflect(release_writer)
        .applied_objects()
        .predicate_filter(release_trigger(), PredicateConfig::default());
    let controller = Controller::for_stream(release_changes, release_store);
    let store = controller.store();
    controller
        .owns_stream(triggers.replica_sets)
        .watches_stream(triggers.pods, |pod: Pod| {
            let ns = pod.namespace();
            pod.labels()
                .get(RELEASE_LABEL)
                .map(|name| {
                    let r = ObjectRef::new(name);
                    match ns {
                        Some(ns) => r.within(&ns),
                        None => r,
                    }
                })
                .into_iter()
                .collect::<Vec<_>>()
        })
        .watches_stream(triggers.deployments, move |dep: Deployment| {
            let ns = dep.namespace().unwrap_or_default();
            let name = dep.name_any();
            store
                .state()
                .into_iter()
                .filter(|r| {
                    r.namespace().as_deref() == Some(ns.as_str())
                        && r.spec.workload_ref.name == name
                })
                .map(|r| ObjectRef::from_obj(&*r))
                .collect::<Vec<_>>()
        })
        .run(reconcile, error_policy, ctx)
        .for_each(|res| async move {
            if let Err(err) = res {
                tracing::debug!(error = %err, "release reconcile failed");
            }
        })
        .await;
}

/// What makes a change to a Release worth a round of its own: its spec (`generation`,
/// which also moves when its deletion starts), its annotations (promote, abort) and its
/// finalizers. Not the operator's own status writes: the round that wrote one already asked
/// for the next (`requeue_after`), and a round per write doubled a busy Release's rounds,
/// each scraping every agent and adding to the API server's load during the release.
fn release_trigger() -> impl Predicate<Release> {
    predicates::generation
        .combine(predicates::annotations)
        .combine(predicates::finalizers)
}

fn error_policy(release: Arc<Release>, err: &Error, ctx: Arc<Context>) -> Requeue {
    let _span = reconcile_span(
        "Release",
        &release.namespace().unwrap_or_default(),
        &release.name_any(),
    )
    .entered();
    tracing::warn!(error = %err, "reconcile failed");
    ctx.metrics.reconcile.error(err.metric_label());
    Requeue::requeue(Duration::from_secs(if err.metric_label() == "conflict" {
        1
    } else {
        5
    }))
}

async fn reconcile(release: Arc<Release>, ctx: Arc<Context>) -> Result<Requeue, Error> {
    let span = reconcile_span(
        "Release",
        &release.namespace().unwrap_or_default(),
        &release.name_any(),
    );
    async {
        let started = Instant::now();
        let res = contain_panic(reconcile_inner(&release, &ctx)).await;
        if let Err(Error::Panic(msg)) = &res {
            tracing::error!(panic = %msg, "release reconcile panicked");
            report_panic(&release, &ctx, msg).await;
        }
        ctx.metrics.reconcile.finished(started);
        res
    }
    .instrument(span)
    .await
}

/// One round: gather → plan (pure) → execute → status and metrics.
async fn reconcile_inner(cached: &Release, ctx: &Context) -> Result<Requeue, Error> {
    // Until both caches hold their first listing they read as "no ReplicaSets, no pods";
    // planning from that would recreate ReplicaSets and lose drains. Their watches run
    // inside the Controller, so the round waits by coming back shortly.
    if !ctx.stores.ready() {
        tracing::debug!("ReplicaSet and pod caches not synced yet");
        return Ok(Requeue::requeue(CACHE_SYNC_RETRY));
    }
    let Some(g) = gather(cached, ctx).await? else {
        return Ok(Requeue::await_change());
    };
    let plan = plan(&g.observed, g.now);
    if execute(ctx, &g, &plan).await? == Executed::Finalized {
        return Ok(Requeue::await_change());
    }
    // An unchanged status is not written: even a no-op apply costs the API server a full
    // decode, merge and compare, and a busy Release is reconciled every 500 ms. A change of
    // closed-connection counts alone waits a little (`status_writes.rs`).
    if g.release.status.as_ref() != Some(&plan.status)
        && ctx.stores.status_writes.write_now(
            &g.ns,
            &g.name,
            g.release.status.as_ref(),
            &plan.status,
            g.now,
        )
    {
        write_status(ctx, &g.ns, &g.name, &plan).await?;
        ctx.stores.status_writes.wrote(&g.ns, &g.name, g.now);
    }
    record_metrics(ctx, &g.ns, &g.name, &g.observed, &plan);
    analysis::after_plan(ctx, &g.release, &g.observed, &plan);
    Ok(Requeue::requeue(plan.requeue_after))
}
