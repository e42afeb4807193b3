//! The Release controller's I/O: gather the observed state, run the pure planner, execute
//! its actions idempotently, write status.
//!
//! Only the leader runs this (the operator shell starts [`run`] once it holds the Lease).
//! The only in-memory state is a short history of agent metric samples per Release and
//! pod ([`super::samples`]); losing it (restart) makes the next decisions wait for fresh
//! samples, never act early.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet, ReplicaSetSpec};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, OwnerReference};
use kube::api::{Api, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action as Requeue, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use serde_json::json;

use super::crd::{
    ABORT_ANNOTATION, CLAIM_ANNOTATION, DEFAULT_ADMIN_PORT, DELETION_COST_ANNOTATION,
    DRAIN_RELEASED_ANNOTATION, DRAIN_STARTED_ANNOTATION, FIELD_MANAGER, FINALIZER,
    PROMOTE_ANNOTATION, RELEASE_LABEL, REPLICAS_ANNOTATION, REVISION_LABEL, Release, ReleaseStatus,
    SERVING_CONDITION,
};
use super::inject::{inject, new_drain_token, revision_of};
use super::metrics::ReleaseMetrics;
use super::plan::{
    Action, Claim, DeploymentView, Observed, PodView, ReplicaSetView, parse_rfc3339, plan, rfc3339,
    set_condition,
};
use super::samples::{ReleaseKey, SampleStore, SampleWindows};
use super::settings::{AgentImagePolicy, Settings};
use crate::drain::scrape_all;

/// Errors of one reconcile; each has a metric label.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("serializing: {0}")]
    Serialize(#[from] serde_json::Error),
    #[error("object has no {0}")]
    MissingField(&'static str),
    #[error("Deployment {0:?} has no pod template spec")]
    NoTemplate(String),
    /// A bug: the reconcile of this object panicked. Contained to this object; the
    /// process and every other object's reconciles go on.
    #[error("the reconcile panicked: {0}")]
    Panic(String),
}

impl Error {
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(kube::Error::Api(s)) if s.code == 409 => "conflict",
            Error::Kube(kube::Error::Api(_)) => "api",
            Error::Kube(_) => "kube",
            Error::Serialize(_) => "serialize",
            Error::MissingField(_) => "invalid_object",
            Error::NoTemplate(_) => "invalid_workload",
            Error::Panic(_) => "panic",
        }
    }
}

/// Shared by every reconcile.
pub struct Context {
    pub client: Client,
    pub metrics: ReleaseMetrics,
    pub recorder: Recorder,
    /// The agent image injected by default and the ones Releases may name.
    pub agent_images: AgentImagePolicy,
    samples: Mutex<SampleStore>,
}

/// How the Release controller runs: the operator's flags.
#[derive(Clone, Debug)]
pub struct Config {
    pub agent_images: AgentImagePolicy,
    /// The one namespace to watch (tests run one operator per namespace side by side);
    /// `None`: every namespace.
    pub watch_namespace: Option<String>,
    /// This replica's name in the events it publishes (the pod name in a cluster).
    pub identity: Option<String>,
}

impl Config {
    /// `allowed`: images a Release may name besides `default_image` (blanks ignored).
    pub fn new(default_image: String, allowed: impl IntoIterator<Item = String>) -> Self {
        Self {
            agent_images: AgentImagePolicy {
                default_image,
                allowed: allowed
                    .into_iter()
                    .map(|a| a.trim().to_string())
                    .filter(|a| !a.is_empty())
                    .collect(),
            },
            watch_namespace: None,
            identity: None,
        }
    }
}

fn now_secs() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Run the Release controller until the returned future is dropped.
pub async fn run(client: Client, metrics: ReleaseMetrics, config: Config) {
    let reporter = Reporter {
        controller: "sluice-release".into(),
        instance: config.identity.clone(),
    };
    let ctx = Arc::new(Context {
        recorder: Recorder::new(client.clone(), reporter),
        client: client.clone(),
        metrics,
        agent_images: config.agent_images,
        samples: Mutex::new(SampleStore::default()),
    });
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
    let controller = Controller::new(releases, watcher::Config::default());
    let store = controller.store();
    controller
        .owns(rs, watcher::Config::default().labels(RELEASE_LABEL))
        .watches(
            pods,
            watcher::Config::default().labels(RELEASE_LABEL),
            |pod: Pod| {
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
            },
        )
        .watches(
            deployments,
            watcher::Config::default(),
            move |dep: Deployment| {
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
            },
        )
        .run(reconcile, error_policy, ctx)
        .for_each(|res| async move {
            if let Err(err) = res {
                tracing::debug!(error = %err, "release reconcile failed");
            }
        })
        .await;
}

fn error_policy(release: Arc<Release>, err: &Error, ctx: Arc<Context>) -> Requeue {
    tracing::warn!(release = %release.name_any(), error = %err, "reconcile failed");
    ctx.metrics
        .reconcile_errors
        .get_or_create(&vec![("kind", err.metric_label().to_string())])
        .inc();
    Requeue::requeue(Duration::from_secs(if err.metric_label() == "conflict" {
        1
    } else {
        5
    }))
}

#[tracing::instrument(skip_all, fields(release = %release.name_any(), ns = release.namespace().unwrap_or_default()))]
async fn reconcile(release: Arc<Release>, ctx: Arc<Context>) -> Result<Requeue, Error> {
    let started = Instant::now();
    let res = contain_panic(reconcile_inner(&release, &ctx)).await;
    if let Err(Error::Panic(msg)) = &res {
        tracing::error!(panic = %msg, "release reconcile panicked");
        report_panic(&release, &ctx, msg).await;
    }
    ctx.metrics
        .reconcile_duration
        .observe(started.elapsed().as_secs_f64());
    res
}

async fn reconcile_inner(cached: &Release, ctx: &Context) -> Result<Requeue, Error> {
    let ns = cached
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    let name = cached.name_any();
    // The planner starts from the status it wrote last. The watch cache can lag behind our
    // own status patch (the next reconcile often comes before the watch event), and
    // planning from an older status would repeat events and lose what the last round
    // recorded (drain records, quiet times); read the Release itself.
    let Some(release) = Api::<Release>::namespaced(ctx.client.clone(), &ns)
        .get_opt(&name)
        .await?
    else {
        lock_samples(ctx).forget_named(&ns, &name);
        return Ok(Requeue::await_change());
    };
    let release = &release;
    let uid = release.uid().ok_or(Error::MissingField("metadata.uid"))?;
    let client = ctx.client.clone();
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let rss: Api<ReplicaSet> = Api::namespaced(client.clone(), &ns);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);

    // Gather.
    let deleting = release.metadata.deletion_timestamp.is_some();
    // An invalid spec must not strand the Deployment at 0 on deletion: the hand-back runs
    // with what the spec still says validly (drain policy, replicas), defaults for the rest.
    let settings = Settings::for_reconcile(&release.spec, &ctx.agent_images, deleting);
    let deployment = deployments.get_opt(&release.spec.workload_ref.name).await?;
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
    let selector = format!("{RELEASE_LABEL}={name}");
    let owned = |m: &ObjectMeta| {
        m.owner_references
            .iter()
            .flatten()
            .any(|o| o.uid == uid && o.controller == Some(true))
    };
    let rs_list = rss.list(&ListParams::default().labels(&selector)).await?;
    let replica_sets: Vec<ReplicaSetView> = rs_list
        .items
        .iter()
        .filter(|r| owned(&r.metadata))
        .filter_map(|r| {
            Some(ReplicaSetView {
                name: r.name_any(),
                uid: r.uid()?,
                revision: r.labels().get(REVISION_LABEL)?.clone(),
                replicas: r.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1),
            })
        })
        .collect();
    let pod_list = pods.list(&ListParams::default().labels(&selector)).await?;
    let our_pods = pods_of_replica_sets(&pod_list.items, &replica_sets);

    let now = now_secs();
    let admin_port = settings
        .as_ref()
        .map(|s| s.agent.admin_port)
        .unwrap_or(DEFAULT_ADMIN_PORT);
    let scraped = scrape_all(&our_pods, admin_port).await;
    let (rate_window, cmp_window) = match &settings {
        Ok(s) => (
            s.connection_rate
                .as_ref()
                .map(|c| c.interval.as_secs_f64())
                .unwrap_or(5.0),
            s.comparison
                .as_ref()
                .map(|c| c.interval.as_secs_f64())
                .unwrap_or(10.0),
        ),
        Err(_) => (5.0, 10.0),
    };
    let key = ReleaseKey {
        namespace: ns.clone(),
        name: name.clone(),
        uid: uid.clone(),
    };
    let (views, windows) = lock_samples(ctx).observe(
        &key,
        our_pods.iter().map(|p| pod_view(p)).zip(scraped).collect(),
        SampleWindows {
            rate: rate_window,
            comparison: cmp_window,
        },
        now,
    );

    let annotations = release.annotations();
    let observed = Observed {
        generation: release.metadata.generation.unwrap_or(0),
        deleting,
        has_finalizer: release.finalizers().iter().any(|f| f == FINALIZER),
        settings,
        status: release.status.clone().unwrap_or_default(),
        promote: annotations.get(PROMOTE_ANNOTATION).cloned(),
        abort: annotations.get(ABORT_ANNOTATION).cloned(),
        deployment: dep_view,
        replica_sets,
        pods: views,
        windows,
    };

    // Plan.
    let plan = plan(&observed, now);

    // Execute.
    let reference = release.object_ref(&());
    for action in &plan.actions {
        tracing::debug!(?action, "executing");
        match action {
            Action::AddFinalizer => {
                let patch = add_finalizer_patch(release.finalizers());
                patch_release_json(ctx, &ns, &name, patch).await?;
            }
            Action::RemoveFinalizer => {
                if let Some(patch) = remove_finalizer_patch(release.finalizers()) {
                    patch_release_json(ctx, &ns, &name, patch).await?;
                }
                ctx.metrics.forget(&ns, &name);
                lock_samples(ctx).forget(&key);
                // The object may be gone now: no status to write.
                return Ok(Requeue::await_change());
            }
            Action::ClaimDeployment => {
                let dep = deployment
                    .as_ref()
                    .ok_or(Error::MissingField("Deployment"))?;
                // The resourceVersion read makes this conditional: when another Release
                // claimed the Deployment meanwhile, it fails with a conflict, and the next
                // reconcile sees that claim. Nothing after it in this plan runs.
                deployments
                    .patch(
                        &release.spec.workload_ref.name,
                        &PatchParams::default(),
                        &Patch::Merge(&json!({"metadata": {
                            "resourceVersion": dep.resource_version(),
                            "annotations": {CLAIM_ANNOTATION: name},
                        }})),
                    )
                    .await?;
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
                    Ok(_) => {}
                    // Gone, or the claim is no longer ours (a failed test is a 422).
                    Err(kube::Error::Api(e)) if e.code == 404 || e.code == 422 => {}
                    Err(e) => return Err(e.into()),
                }
            }
            Action::RecordDeploymentReplicas(n) => {
                merge(
                    &deployments,
                    &release.spec.workload_ref.name,
                    json!({"metadata": {"annotations": {REPLICAS_ANNOTATION: n.to_string()}}}),
                )
                .await?;
            }
            Action::ScaleDeployment(n) => {
                merge(
                    &deployments,
                    &release.spec.workload_ref.name,
                    json!({"spec": {"replicas": n}}),
                )
                .await?;
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
                    Ok(_) => {}
                    Err(kube::Error::Api(e)) if e.code == 409 => {}
                    Err(e) => return Err(e.into()),
                }
            }
            Action::ScaleReplicaSet { name: rs, replicas } => {
                merge(&rss, rs, json!({"spec": {"replicas": replicas}})).await?;
            }
            Action::DeleteReplicaSet { name: rs } => {
                match rss.delete(rs, &Default::default()).await {
                    Ok(_) => {}
                    Err(kube::Error::Api(e)) if e.code == 404 => {}
                    Err(e) => return Err(e.into()),
                }
            }
            Action::SetServing { pod, serving } => set_serving(&pods, pod, *serving).await?,
            Action::StartDrain { pod } => {
                merge(
                    &pods,
                    pod,
                    json!({"metadata": {"annotations": {DRAIN_STARTED_ANNOTATION: rfc3339(now)}}}),
                )
                .await?;
                set_serving(&pods, pod, false).await?;
            }
            Action::ReleasePod { pod } => {
                merge(
                    &pods,
                    pod,
                    json!({"metadata": {"annotations": {
                        DRAIN_RELEASED_ANNOTATION: rfc3339(now),
                        DELETION_COST_ANNOTATION: "-1000000",
                    }}}),
                )
                .await?;
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

    // Status.
    let releases: Api<Release> = Api::namespaced(client, &ns);
    let body = json!({
        "apiVersion": "sluice.dev/v1alpha1",
        "kind": "Release",
        "status": plan.status,
    });
    releases
        .patch_status(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&body),
        )
        .await?;

    // Metrics.
    let phase = plan.status.phase.unwrap_or_default();
    ctx.metrics
        .set_phase(&ns, &name, phase, plan.status.current_step);
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
        && o_abort_changed(&observed, a)
    {
        ctx.metrics
            .aborts
            .get_or_create(&vec![("reason", a.reason.clone())])
            .inc();
    }
    Ok(Requeue::requeue(plan.requeue_after))
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
async fn report_panic(release: &Release, ctx: &Context, msg: &str) {
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
    if let Err(err) = api
        .patch_status(&name, &PatchParams::default(), &Patch::Merge(&body))
        .await
    {
        tracing::warn!(error = %err, "could not report the panic in the Release's status");
    }
}

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

fn o_abort_changed(o: &Observed, a: &super::crd::AbortInfo) -> bool {
    o.status.abort.as_ref() != Some(a)
}

async fn patch_release_json(
    ctx: &Context,
    ns: &str,
    name: &str,
    patch: serde_json::Value,
) -> Result<(), Error> {
    let api: Api<Release> = Api::namespaced(ctx.client.clone(), ns);
    api.patch(
        name,
        &PatchParams::default(),
        &Patch::<()>::Json(serde_json::from_value(patch)?),
    )
    .await?;
    Ok(())
}

/// The sample store. A panic while it was held (contained by [`contain_panic`]) leaves it
/// poisoned; the samples are still consistent enough to go on with (the worst is a lost
/// sample), so carry on rather than fail every later reconcile.
fn lock_samples(ctx: &Context) -> std::sync::MutexGuard<'_, SampleStore> {
    ctx.samples
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

async fn merge<K>(api: &Api<K>, name: &str, body: serde_json::Value) -> Result<(), Error>
where
    K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api
        .patch(name, &PatchParams::default(), &Patch::Merge(&body))
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Set the readiness-gate condition. Strategic merge keys conditions by type, so the
/// kubelet's conditions are left alone.
async fn set_serving(pods: &Api<Pod>, pod: &str, serving: bool) -> Result<(), Error> {
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
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// [`CLAIM_ANNOTATION`] as a JSON pointer (`/` escaped as `~1`).
const CLAIM_POINTER: &str = "/metadata/annotations/sluice.dev~1claimed-by";

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

/// The pods whose controlling owner is one of `replica_sets`, by UID: a name says nothing
/// about which ReplicaSet it was (an earlier Release of the same name had a ReplicaSet of
/// the same name, whose pods may still be going).
fn pods_of_replica_sets<'a>(pods: &'a [Pod], replica_sets: &[ReplicaSetView]) -> Vec<&'a Pod> {
    pods.iter()
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
    }
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

#[cfg(test)]
#[path = "controller_tests.rs"]
mod tests;
