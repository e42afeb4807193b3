//! Gather: the observed state of one Release, read from the API, the watch caches and the
//! agents.

use std::sync::Arc;

use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::{Api, ListParams, ObjectMeta};
use kube::runtime::reflector::ObjectRef;

use crate::pod::drain::scrape_all;
use crate::pod::inject::{inject, revision_of};
use crate::pod::keys::{DRAIN_STARTED_ANNOTATION, REVISION_LABEL, SERVING_CONDITION};
use crate::pod::settings::DEFAULT_ADMIN_PORT;
use crate::pod::time::parse_rfc3339;
use crate::release::crd::{
    ABORT_ANNOTATION, CLAIM_ANNOTATION, DRAIN_RELEASED_ANNOTATION, FINALIZER, PROMOTE_ANNOTATION,
    RELEASE_LABEL, REPLICAS_ANNOTATION, Release,
};
use crate::release::plan::{Claim, DeploymentView, Observed, PodView, ReplicaSetView};
use crate::release::samples::{ReleaseKey, SampleWindows};
use crate::release::settings::{DEFAULT_SPLIT_WINDOW, Settings};

use super::context::{Context, Error, lock_samples, now_secs};

/// What one round observed, and what executing its plan needs besides.
pub(super) struct Gathered {
    pub(super) ns: String,
    pub(super) name: String,
    /// The Release as read in this round (not the watch cache's copy).
    pub(super) release: Release,
    pub(super) key: ReleaseKey,
    pub(super) deployment: Option<Deployment>,
    pub(super) observed: Observed,
    pub(super) now: f64,
}

/// Read the Release, select its Deployment, ReplicaSets and pods from the caches, and
/// scrape the agents.
/// `None`: the Release is gone (its samples are forgotten).
pub(super) async fn gather(cached: &Release, ctx: &Context) -> Result<Option<Gathered>, Error> {
    let ns = cached
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    let name = cached.name_any();
    // The planner starts from the status it wrote last. The watch cache can lag behind our
    // own status patch (the next reconcile often comes before the watch event), and
    // planning from an older status would repeat events and lose what the last round
    // recorded (drain records, quiet times): unless the cached copy is at least as new as
    // the operator's last write (`stores.rs`), read the Release itself.
    let release = if ctx
        .stores
        .release_current(&ns, &name, cached.resource_version().as_deref())
    {
        cached.clone()
    } else {
        let Some(release) = Api::<Release>::namespaced(ctx.client.clone(), &ns)
            .get_opt(&name)
            .await?
        else {
            lock_samples(ctx).forget_named(&ns, &name);
            ctx.stores.forget(&ns, &name);
            return Ok(None);
        };
        ctx.stores
            .saw_release(&ns, &name, release.resource_version().as_deref());
        release
    };
    let uid = release.uid().ok_or(Error::MissingField("metadata.uid"))?;
    let client = ctx.client.clone();
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);

    let deleting = release.metadata.deletion_timestamp.is_some();
    // An invalid spec must not strand the Deployment at 0 on deletion: the hand-back runs
    // with what the spec still says validly (drain policy, replicas), defaults for the rest.
    let settings = Settings::for_reconcile(&release.spec, &ctx.agent_images, deleting);
    // The watch caches, unless they may not show this Release's own last writes yet
    // (`stores.rs`): then consistent reads through the API, as before the caches.
    let caught_up = ctx.stores.caught_up(&ns, &name);
    let deployment = if caught_up {
        ctx.stores
            .deployments
            .get(&ObjectRef::new(&release.spec.workload_ref.name).within(&ns))
            .map(|d| (*d).clone())
    } else {
        deployments.get_opt(&release.spec.workload_ref.name).await?
    };
    let claim = match deployment
        .as_ref()
        .and_then(|d| d.annotations().get(CLAIM_ANNOTATION))
        .filter(|c| !c.is_empty())
    {
        None => Claim::Free,
        Some(c) if *c == name => Claim::Ours,
        // A claim naming a Release that is gone (deleted while no operator ran, its
        // finalizer removed by hand) is stale: the Deployment is free.
        Some(c) => match Api::<Release>::namespaced(client.clone(), &ns)
            .get_opt(c)
            .await?
        {
            Some(_) => Claim::Other(c.clone()),
            None => Claim::Free,
        },
    };
    let dep_view = deployment
        .as_ref()
        .map(|d| deployment_view(d, &settings, claim));
    let (rs_items, pod_items) = if caught_up {
        let ours = |m: &ObjectMeta| labelled_for(m, &ns, &name);
        (
            ctx.stores.replica_sets.state_filter(|r| ours(&r.metadata)),
            ctx.stores.pods.state_filter(|p| ours(&p.metadata)),
        )
    } else {
        tracing::debug!("the caches lag this Release's last writes: listing");
        let lp = ListParams::default().labels(&format!("{RELEASE_LABEL}={name}"));
        let rs_list = Api::<ReplicaSet>::namespaced(client.clone(), &ns)
            .list(&lp)
            .await?;
        let pod_list = Api::<Pod>::namespaced(client.clone(), &ns)
            .list(&lp)
            .await?;
        (
            rs_list.items.into_iter().map(Arc::new).collect(),
            pod_list.items.into_iter().map(Arc::new).collect(),
        )
    };
    let (replica_sets, our_pods) = select(&rs_items, &pod_items, &ns, &name, &uid);

    let now = now_secs();
    let admin_port = settings
        .as_ref()
        .map(|s| s.agent.admin_port)
        .unwrap_or(DEFAULT_ADMIN_PORT);
    let scraped = scrape_all(&our_pods, admin_port).await;
    let split_default = DEFAULT_SPLIT_WINDOW.as_secs_f64();
    let (rate_window, cmp_window, split_window) = match &settings {
        Ok(s) => (
            s.connection_rate
                .as_ref()
                .map(|c| c.interval.as_secs_f64())
                .unwrap_or(5.0),
            s.comparison
                .as_ref()
                .map(|c| c.interval.as_secs_f64())
                .unwrap_or(10.0),
            s.routing
                .as_ref()
                .and_then(|r| r.verify.as_ref())
                .map(|v| v.window)
                .or(s.rebalance.as_ref().map(|r| r.window))
                .map_or(split_default, |w| w.as_secs_f64()),
        ),
        Err(_) => (5.0, 10.0, split_default),
    };
    let key = ReleaseKey {
        namespace: ns.clone(),
        name: name.clone(),
        uid: uid.clone(),
    };
    let seen = lock_samples(ctx).observe(
        &key,
        our_pods.iter().map(|p| pod_view(p)).zip(scraped).collect(),
        SampleWindows {
            rate: rate_window,
            comparison: cmp_window,
            split: split_window,
        },
        now,
    );
    let routing = match settings.as_ref().ok().and_then(|s| s.routing.as_ref()) {
        Some(r) => Some(super::routing::observe(ctx, &ns, r, &seen.pods).await?),
        None => None,
    };

    let annotations = release.annotations();
    let mut observed = Observed {
        generation: release.metadata.generation.unwrap_or(0),
        deleting,
        has_finalizer: release.finalizers().iter().any(|f| f == FINALIZER),
        settings,
        status: {
            // The counts a round planned but did not write yet (`status_writes.rs`).
            let mut status = release.status.clone().unwrap_or_default();
            ctx.stores
                .status_writes
                .apply_kept_counts(&ns, &name, &mut status);
            status
        },
        promote: annotations.get(PROMOTE_ANNOTATION).cloned(),
        abort: annotations.get(ABORT_ANNOTATION).cloned(),
        deployment: dep_view,
        replica_sets,
        pods: seen.pods,
        windows: seen.windows,
        analysis: Default::default(),
        routing,
        split: seen.split,
    };
    observed.analysis = super::analysis::observe(ctx, &release, &mut observed, now).await;
    Ok(Some(Gathered {
        ns,
        name,
        release,
        key,
        deployment,
        observed,
        now,
    }))
}

fn deployment_view(
    d: &Deployment,
    settings: &Result<Settings, Vec<String>>,
    claim: Claim,
) -> DeploymentView {
    let spec = d.spec.clone().unwrap_or_default();
    let inject_error = match settings {
        Ok(s) => inject(&spec.template, &s.agent, &s.drain, "")
            .err()
            .map(|e| e.to_string()),
        Err(_) => None,
    };
    DeploymentView {
        revision: revision_of(&spec.template),
        spec_replicas: spec.replicas.unwrap_or(1),
        recorded_replicas: d
            .annotations()
            .get(REPLICAS_ANNOTATION)
            .and_then(|v| v.parse().ok()),
        available_replicas: d
            .status
            .as_ref()
            .and_then(|s| s.available_replicas)
            .unwrap_or(0),
        inject_error,
        claim,
    }
}

/// The Release `ns/name` (UID `uid`)'s ReplicaSets and pods among `rss` and `pods`,
/// selected as the LIST by its label in its namespace was: labelled for it, ReplicaSets it
/// controls (by UID) with a revision label, and the pods those control.
pub(super) fn select<'a>(
    rss: &[Arc<ReplicaSet>],
    pods: &'a [Arc<Pod>],
    ns: &str,
    name: &str,
    uid: &str,
) -> (Vec<ReplicaSetView>, Vec<&'a Pod>) {
    let replica_sets: Vec<ReplicaSetView> = rss
        .iter()
        .filter(|r| labelled_for(&r.metadata, ns, name))
        .filter(|r| {
            r.owner_references()
                .iter()
                .any(|o| o.uid == uid && o.controller == Some(true))
        })
        .filter_map(|r| {
            Some(ReplicaSetView {
                name: r.name_any(),
                uid: r.uid()?,
                revision: r.labels().get(REVISION_LABEL)?.clone(),
                replicas: r.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1),
            })
        })
        .collect();
    let labelled = pods
        .iter()
        .map(|p| &**p)
        .filter(|p| labelled_for(&p.metadata, ns, name));
    let ours = pods_of_replica_sets(labelled, &replica_sets);
    (replica_sets, ours)
}

/// In namespace `ns` and labelled for the Release `name`: what `-l sluice.dev/release=name`
/// in `ns` lists.
pub(super) fn labelled_for(m: &ObjectMeta, ns: &str, name: &str) -> bool {
    m.namespace.as_deref() == Some(ns)
        && m.labels
            .as_ref()
            .and_then(|l| l.get(RELEASE_LABEL))
            .is_some_and(|v| v == name)
}

/// The pods whose controlling owner is one of `replica_sets`, by UID: a name says nothing
/// about which ReplicaSet it was (an earlier Release of the same name had a ReplicaSet of
/// the same name, whose pods may still be going).
pub(super) fn pods_of_replica_sets<'a>(
    pods: impl IntoIterator<Item = &'a Pod>,
    replica_sets: &[ReplicaSetView],
) -> Vec<&'a Pod> {
    pods.into_iter()
        .filter(|p| {
            p.owner_references().iter().any(|o| {
                o.kind == "ReplicaSet"
                    && o.controller == Some(true)
                    && replica_sets.iter().any(|r| r.uid == o.uid)
            })
        })
        .collect()
}

fn time_secs(t: &k8s_openapi::apimachinery::pkg::apis::meta::v1::Time) -> f64 {
    t.0.as_millisecond() as f64 / 1000.0
}

fn pod_view(p: &Pod) -> PodView {
    let status = p.status.clone().unwrap_or_default();
    let conditions = status.conditions.unwrap_or_default();
    let cond = |t: &str| conditions.iter().find(|c| c.type_ == t);
    let ready = cond("ContainersReady").filter(|c| c.status == "True");
    let statuses: Vec<_> = status
        .container_statuses
        .iter()
        .flatten()
        .chain(status.init_container_statuses.iter().flatten())
        .collect();
    let ann = p.annotations();
    PodView {
        name: p.name_any(),
        revision: p.labels().get(REVISION_LABEL).cloned().unwrap_or_default(),
        created: p
            .metadata
            .creation_timestamp
            .as_ref()
            .map(time_secs)
            .unwrap_or(0.0),
        deleting: p.metadata.deletion_timestamp.is_some(),
        containers_ready: ready.is_some(),
        ready_since: ready
            .and_then(|c| c.last_transition_time.as_ref())
            .map(time_secs),
        serving: cond(SERVING_CONDITION).map(|c| c.status == "True"),
        ready: cond("Ready").is_some_and(|c| c.status == "True"),
        restarts: statuses
            .iter()
            .fold(0i32, |sum, s| sum.saturating_add(s.restart_count)),
        crash_looping: statuses.iter().any(|s| {
            s.state
                .as_ref()
                .and_then(|st| st.waiting.as_ref())
                .and_then(|w| w.reason.as_deref())
                == Some("CrashLoopBackOff")
        }),
        drain_started: ann
            .get(DRAIN_STARTED_ANNOTATION)
            .and_then(|v| parse_rfc3339(v)),
        drain_released: ann
            .get(DRAIN_RELEASED_ANNOTATION)
            .and_then(|v| parse_rfc3339(v)),
        signals: None,
        ip: status.pod_ip.clone(),
        drain_token: drain_token_of(p),
        asked_at: None,
    }
}

/// The drain token the operator gave the pod's agent (its `SLUICE_DRAIN_TOKEN`).
fn drain_token_of(p: &Pod) -> Option<String> {
    let spec = p.spec.as_ref()?;
    spec.init_containers
        .iter()
        .flatten()
        .chain(spec.containers.iter())
        .flat_map(|c| c.env.iter().flatten())
        .find(|e| e.name == crate::pod::inject::DRAIN_TOKEN_ENV)
        .and_then(|e| e.value.clone())
}
