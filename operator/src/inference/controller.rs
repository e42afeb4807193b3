//! The InferenceSet controller's I/O: gather (set, its pods from the shared cache, nodes)
//! → [`plan`](super::plan::plan) → execute actions idempotently → write status.
//! Pod names are deterministic (`<gang>-<index>`), so a round that acts on a stale cache
//! only meets `AlreadyExists`/`NotFound`, which are success here.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{FutureExt, StreamExt};
use k8s_openapi::api::core::v1::{
    Container, EnvVar, EnvVarSource, Node, ObjectFieldSelector, Pod, PodReadinessGate,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::api::{Api, DeleteParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action as Requeue, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use serde_json::json;
use sluice_placement::{GangRequest, TopologyLevel};

use super::crd::*;
use super::error::Error;
use super::metrics::InferenceMetrics;
use super::plan::{self, Action, Observed, PodView, Settings};
use crate::drain::History;
use crate::release::crd::{DRAIN_STARTED_ANNOTATION, SERVING_CONDITION, parse_duration};
use crate::release::inject::{inject, new_drain_token};
use crate::release::plan::{parse_rfc3339, rfc3339};
use crate::release::settings::{AgentImagePolicy, AgentSettings, DrainSettings};

/// Shared by every reconcile.
pub struct Context {
    pub client: kube::Client,
    pub pods: Store<Pod>,
    pub nodes: Store<Node>,
    pub metrics: InferenceMetrics,
    pub recorder: Recorder,
    /// The agent image when `spec.agent.image` is not set, and the ones a set may name.
    pub agent_images: AgentImagePolicy,
    /// Agent samples of draining pods (the drain protocol's quiet signal).
    pub history: Mutex<History>,
}

fn now() -> f64 {
    k8s_openapi::jiff::Timestamp::now().as_millisecond() as f64 / 1000.0
}

/// A topology level as written in the spec.
pub fn level(s: &str) -> TopologyLevel {
    match s {
        "node" => TopologyLevel::Node,
        "gpu-group" => TopologyLevel::GpuGroup,
        key => TopologyLevel::Label(key.to_string()),
    }
}

/// The placement request of one replica (the binder adds CPU and memory from the pods).
pub fn gang_request(ns: &str, name: &str, spec: &InferenceSetSpec) -> GangRequest {
    let mut req = GangRequest::gpus(spec.pods_per_replica as u32, spec.gpus_per_pod as u32)
        .products(spec.gpu.products.clone())
        .min_memory_mib(spec.gpu.min_memory_mib.unwrap_or(0).max(0) as u64);
    if let Some(t) = &spec.topology {
        req.required = t.required.as_deref().map(level);
        req.preferred = t.preferred.as_deref().map(level);
        if let Some(sp) = &t.spread {
            req = req.spread(
                level(&sp.level),
                &format!("{ns}/{name}"),
                sp.max_skew.map(|m| m.max(1) as u32),
            );
        }
    }
    req
}

/// Revision of everything that defines a replica: template, shape, selectors, warm-up probe.
pub fn revision(spec: &InferenceSetSpec) -> String {
    let mut v = json!({
        "template": spec.template,
        "podsPerReplica": spec.pods_per_replica,
        "gpusPerPod": spec.gpus_per_pod,
        "gpu": spec.gpu,
        "topology": spec.topology,
        "probe": spec.warmup.as_ref().and_then(|w| w.probe.as_ref()),
    });
    // Only when set, so that sets without an agent keep their revision.
    if let Some(a) = &spec.agent {
        v["agent"] = json!(a);
        v["drain"] = json!({
            "closeRate": spec.drain.close_rate,
            "drainTimeout": spec.drain.drain_timeout,
        });
    }
    let bytes = serde_json::to_vec(&v).unwrap_or_default();
    let mut h: u64 = 0xcbf29ce484222325;
    for b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100000001b3);
    }
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    (0..10)
        .map(|_| {
            let c = ALPHABET[(h % ALPHABET.len() as u64) as usize] as char;
            h /= ALPHABET.len() as u64;
            c
        })
        .collect()
}

/// The agent and drain settings to inject, when the set asks for the agent (the same
/// defaults as a Release's).
pub fn agent_settings(
    spec: &InferenceSetSpec,
    default_image: &str,
) -> Option<(AgentSettings, DrainSettings)> {
    let a = spec.agent.as_ref()?;
    let d = &spec.drain;
    let dur = |v: &Option<DurationString>, default: u64| {
        v.as_ref()
            .and_then(|d| parse_duration(&d.0).ok())
            .unwrap_or(Duration::from_secs(default))
    };
    Some((
        AgentSettings::resolve(a, default_image),
        DrainSettings {
            quiet_period: dur(&d.quiet_period, 5),
            propagation_timeout: dur(&d.propagation_timeout, 60),
            close_rate: d.close_rate.unwrap_or(100),
            drain_timeout: dur(&d.drain_timeout, 90),
            max_concurrent: 1,
        },
    ))
}

/// One pod of gang `gang` (pure). With `spec.agent`, the template gets the agent sidecar,
/// readiness gate and preStop `/drain` exactly as a Release's pods do
/// ([`crate::release::inject`]); the warm-up probe is set before, so that injection
/// rewrites a probe that names the port the agent takes over.
pub fn build_pod(
    set: &InferenceSet,
    gang: &str,
    slot: i32,
    rev: &str,
    index: i32,
    agent_images: &AgentImagePolicy,
) -> Result<Pod, Error> {
    let spec = &set.spec;
    let name = set.name_any();
    let ns = set.namespace().unwrap_or_default();
    let mut template = spec.template.clone();
    if let Some(probe) = spec.warmup.as_ref().and_then(|w| w.probe.clone())
        && let Some(c) = template
            .spec
            .as_mut()
            .and_then(|s| s.containers.first_mut())
    {
        c.startup_probe = Some(probe);
    }
    if let Some((agent, drain)) = agent_settings(spec, &agent_images.default_image) {
        if !agent_images.allows(&agent.image) {
            return Err(Error::Template(format!(
                "agent.image {:?} is not allowed by this operator: allowed are {} (operator flag --allowed-agent-images); leave agent.image out to use the default",
                agent.image,
                agent_images.describe()
            )));
        }
        template = inject(&template, &agent, &drain, &new_drain_token())
            .map_err(|e| Error::Template(format!("injecting the agent: {e}")))?
            .template;
    }
    let tmeta = template.metadata.clone().unwrap_or_default();
    let mut labels = tmeta.labels.unwrap_or_default();
    labels.insert(SET_LABEL.into(), name.clone());
    labels.insert(SLOT_LABEL.into(), slot.to_string());
    labels.insert(GANG_LABEL.into(), gang.into());
    labels.insert(REVISION_LABEL.into(), rev.into());
    let mut annotations = tmeta.annotations.unwrap_or_default();
    annotations.insert(
        GANG_SIZE_ANNOTATION.into(),
        spec.pods_per_replica.to_string(),
    );
    annotations.insert(GANG_INDEX_ANNOTATION.into(), index.to_string());
    annotations.insert(
        GANG_REQUEST_ANNOTATION.into(),
        serde_json::to_string(&gang_request(&ns, &name, spec))?,
    );
    let mut pspec = template
        .spec
        .ok_or(Error::Template("template.spec is missing".into()))?;
    if pspec.containers.is_empty() {
        return Err(Error::Template("template.spec.containers is empty".into()));
    }
    pspec.scheduler_name = Some(SCHEDULER_NAME.into());
    pspec.node_name = None;
    let gates = pspec.readiness_gates.get_or_insert_with(Vec::new);
    if !gates.iter().any(|g| g.condition_type == SERVING_CONDITION) {
        gates.push(PodReadinessGate {
            condition_type: SERVING_CONDITION.into(),
        });
    }
    let c: &mut Container = &mut pspec.containers[0];
    let res = c.resources.get_or_insert_with(Default::default);
    let gpus = Quantity(spec.gpus_per_pod.to_string());
    res.limits
        .get_or_insert_with(BTreeMap::new)
        .insert(GPU_RESOURCE.into(), gpus.clone());
    res.requests
        .get_or_insert_with(BTreeMap::new)
        .insert(GPU_RESOURCE.into(), gpus);
    let env = c.env.get_or_insert_with(Vec::new);
    let field = |path: &str| EnvVarSource {
        field_ref: Some(ObjectFieldSelector {
            field_path: path.into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let plain = |n: &str, v: String| EnvVar {
        name: n.into(),
        value: Some(v),
        ..Default::default()
    };
    env.retain(|e| !e.name.starts_with("SLUICE_GANG") && e.name != "SLUICE_GPU_IDS");
    env.push(EnvVar {
        name: "SLUICE_GPU_IDS".into(),
        value_from: Some(field(&format!(
            "metadata.annotations['{GPU_IDS_ANNOTATION}']"
        ))),
        ..Default::default()
    });
    env.push(plain("SLUICE_GANG", gang.into()));
    env.push(plain("SLUICE_GANG_INDEX", index.to_string()));
    env.push(plain("SLUICE_GANG_SIZE", spec.pods_per_replica.to_string()));
    Ok(Pod {
        metadata: ObjectMeta {
            name: Some(format!("{gang}-{index}")),
            namespace: Some(ns),
            labels: Some(labels),
            annotations: Some(annotations),
            owner_references: set.controller_owner_ref(&()).map(|o| vec![o]),
            ..Default::default()
        },
        spec: Some(pspec),
        status: None,
    })
}

/// A pod as the planner sees it (pure).
pub fn pod_view(
    p: &Pod,
    nodes: &BTreeMap<String, Option<f64>>,
    now: f64,
    grace: f64,
) -> Option<PodView> {
    let labels = p.metadata.labels.as_ref()?;
    let ann = p.metadata.annotations.clone().unwrap_or_default();
    let status = p.status.as_ref();
    let conds = status.and_then(|s| s.conditions.as_ref());
    let cond = |t: &str| conds.and_then(|cs| cs.iter().find(|c| c.type_ == t));
    let node = p.spec.as_ref().and_then(|s| s.node_name.clone());
    let node_lost = node.as_ref().is_some_and(|n| match nodes.get(n) {
        None => true,
        Some(nr) => plan::node_lost(true, *nr, now, grace),
    });
    let phase = status.and_then(|s| s.phase.as_deref()).unwrap_or("Pending");
    Some(PodView {
        name: p.metadata.name.clone()?,
        slot: labels.get(SLOT_LABEL)?.parse().ok()?,
        gang: labels.get(GANG_LABEL)?.clone(),
        revision: labels.get(REVISION_LABEL)?.clone(),
        index: ann
            .get(GANG_INDEX_ANNOTATION)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
        gang_size: ann
            .get(GANG_SIZE_ANNOTATION)
            .and_then(|v| v.parse().ok())
            .unwrap_or(1),
        created: p
            .metadata
            .creation_timestamp
            .as_ref()
            .map(|t| t.0.as_millisecond() as f64 / 1000.0)
            .unwrap_or(now),
        node,
        gpu_ids: super::binder::gpu_ids(p).unwrap_or_default(),
        deleting: p.metadata.deletion_timestamp.is_some(),
        finished: phase == "Failed" || phase == "Succeeded",
        containers_ready: cond("ContainersReady").is_some_and(|c| c.status == "True"),
        serving: cond(SERVING_CONDITION).map(|c| c.status == "True"),
        drain_started: ann
            .get(DRAIN_STARTED_ANNOTATION)
            .and_then(|v| parse_rfc3339(v)),
        warm: ann.contains_key(WARM_ANNOTATION),
        unschedulable: cond("PodScheduled")
            .filter(|c| c.status == "False")
            .and_then(|c| c.message.clone()),
        node_lost,
        signals: None,
    })
}

/// Node name → when it turned NotReady (`None`: Ready).
fn node_readiness(nodes: &Store<Node>) -> BTreeMap<String, Option<f64>> {
    nodes
        .state()
        .iter()
        .filter_map(|n| {
            let ready = n
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"));
            let since = match ready {
                Some(c) if c.status == "True" => None,
                Some(c) => Some(
                    c.last_transition_time
                        .as_ref()
                        .map(|t| t.0.as_millisecond() as f64 / 1000.0)
                        .unwrap_or(0.0),
                ),
                None => None,
            };
            Some((n.metadata.name.clone()?, since))
        })
        .collect()
}

async fn reconcile(set: Arc<InferenceSet>, ctx: Arc<Context>) -> Result<Requeue, Error> {
    let started = Instant::now();
    let ns = set.namespace().unwrap_or_default();
    let name = set.name_any();
    let span = tracing::info_span!("reconcile", inferenceset = %format!("{ns}/{name}"));
    let _g = span.enter();
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
        let scraped = crate::drain::scrape_all(&draining, agent.admin_port).await;
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
    execute(&set, &ctx, &p.actions).await?;
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
    ctx.metrics
        .reconcile_duration
        .observe(started.elapsed().as_secs_f64());
    Ok(Requeue::requeue(requeue))
}

async fn execute(set: &InferenceSet, ctx: &Context, actions: &[Action]) -> Result<(), Error> {
    let ns = set.namespace().unwrap_or_default();
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let reference = set.object_ref(&());
    for a in actions {
        match a {
            Action::CreatePods {
                gang,
                slot,
                revision,
                indices,
            } => {
                let pods = indices
                    .iter()
                    .map(|i| build_pod(set, gang, *slot, revision, *i, &ctx.agent_images))
                    .collect::<Result<Vec<_>, _>>()?;
                let jobs: Vec<futures::future::BoxFuture<'static, Result<(), kube::Error>>> = pods
                    .into_iter()
                    .map(|pod| {
                        let api = api.clone();
                        async move {
                            match api.create(&PostParams::default(), &pod).await {
                                Ok(_) => Ok(()),
                                Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
                                Err(e) => Err(e),
                            }
                        }
                        .boxed()
                    })
                    .collect();
                let results: Vec<Result<(), kube::Error>> = futures::stream::iter(jobs)
                    .buffer_unordered(8)
                    .collect()
                    .await;
                results.into_iter().collect::<Result<Vec<()>, _>>()?;
            }
            Action::DeletePods { pods } => {
                for p in pods {
                    // A pod whose node no longer exists has no kubelet to confirm its end:
                    // delete it at once (as the pod garbage collector would, later).
                    let node_gone = ctx
                        .pods
                        .get(&ObjectRef::<Pod>::new(p).within(&ns))
                        .and_then(|pod| pod.spec.as_ref().and_then(|s| s.node_name.clone()))
                        .is_some_and(|n| ctx.nodes.get(&ObjectRef::<Node>::new(&n)).is_none());
                    let dp = if node_gone {
                        DeleteParams::default().grace_period(0)
                    } else {
                        DeleteParams::default()
                    };
                    match api.delete(p, &dp).await {
                        Ok(_) => {}
                        Err(kube::Error::Api(s)) if s.code == 404 => {}
                        Err(e) => return Err(e.into()),
                    }
                }
            }
            Action::StartDrain { pods } => {
                let at = rfc3339(now());
                for p in pods {
                    let ann = json!({"metadata": {"annotations": {DRAIN_STARTED_ANNOTATION: at}}});
                    ignore_404(
                        api.patch(p, &PatchParams::default(), &Patch::Merge(ann))
                            .await,
                    )?;
                    set_serving(&api, p, false).await?;
                }
            }
            Action::Serve { pods } => {
                for p in pods {
                    set_serving(&api, p, true).await?;
                }
            }
            Action::CheckWarm { gang, pods } => {
                check_warm(set, ctx, &api, gang, pods).await?;
            }
            Action::Event {
                warning,
                reason,
                note,
            } => {
                if reason == "ReplicaLost" {
                    ctx.metrics.replica_lost(&ns, &set.name_any());
                }
                let ev = Event {
                    type_: if *warning {
                        EventType::Warning
                    } else {
                        EventType::Normal
                    },
                    reason: reason.clone(),
                    note: Some(note.chars().take(1000).collect()),
                    action: reason.clone(),
                    secondary: None,
                };
                if let Err(e) = ctx.recorder.publish(&ev, &reference).await {
                    tracing::debug!(error = %e, "event not recorded");
                }
            }
        }
    }
    Ok(())
}

fn ignore_404<T>(r: Result<T, kube::Error>) -> Result<(), Error> {
    match r {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

async fn set_serving(api: &Api<Pod>, pod: &str, serving: bool) -> Result<(), Error> {
    let patch = json!({"status": {"conditions": [{
        "type": SERVING_CONDITION,
        "status": if serving { "True" } else { "False" },
        "reason": if serving { "Warm" } else { "Draining" },
        "lastTransitionTime": rfc3339(now()),
    }]}});
    ignore_404(
        api.patch_status(pod, &PatchParams::default(), &Patch::Strategic(patch))
            .await,
    )
}

/// The warm-up gate's first-token check: one request per pod, the first byte of the
/// answer within `maxLatency`; on success the pod is annotated `sluice.dev/warm`.
async fn check_warm(
    set: &InferenceSet,
    ctx: &Context,
    api: &Api<Pod>,
    gang: &str,
    pods: &[String],
) -> Result<(), Error> {
    let Some(ft) = set.spec.warmup.as_ref().and_then(|w| w.first_token.clone()) else {
        return Ok(());
    };
    let limit = ft.max_latency.parse().unwrap_or(Duration::from_secs(5));
    let ns = set.namespace().unwrap_or_default();
    for name in pods {
        let Some(pod) = ctx.pods.get(&ObjectRef::<Pod>::new(name).within(&ns)) else {
            continue;
        };
        if pod.annotations().contains_key(WARM_ANNOTATION) {
            continue;
        }
        let Some(ip) = pod.status.as_ref().and_then(|s| s.pod_ip.clone()) else {
            return Ok(());
        };
        match first_token(&ip, ft.port, &ft.path, ft.body.as_deref(), limit * 2).await {
            Ok(secs) if secs <= limit.as_secs_f64() => {
                let ann = json!({"metadata": {"annotations": {
                    WARM_ANNOTATION: rfc3339(now()),
                    FIRST_TOKEN_ANNOTATION: format!("{secs:.3}"),
                }}});
                ignore_404(
                    api.patch(name, &PatchParams::default(), &Patch::Merge(ann))
                        .await,
                )?;
            }
            Ok(secs) => {
                tracing::info!(gang, pod = %name, secs, "first token too slow: not warm yet");
                return Ok(());
            }
            Err(e) => {
                tracing::info!(gang, pod = %name, error = %e, "first-token check failed: not warm yet");
                return Ok(());
            }
        }
    }
    Ok(())
}

/// Seconds until the first byte of the answer's body.
pub async fn first_token(
    ip: &str,
    port: i32,
    path: &str,
    body: Option<&str>,
    timeout: Duration,
) -> Result<f64, String> {
    use http_body_util::{BodyExt, Full};
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;
    let host = if ip.contains(':') {
        format!("[{ip}]")
    } else {
        ip.to_string()
    };
    let uri = format!("http://{host}:{port}{path}");
    let client: Client<_, Full<bytes::Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let req = hyper::Request::builder()
        .method(if body.is_some() { "POST" } else { "GET" })
        .uri(&uri)
        .header("content-type", "application/json")
        .body(Full::new(bytes::Bytes::from(
            body.unwrap_or("").to_string(),
        )))
        .map_err(|e| e.to_string())?;
    let started = Instant::now();
    let fut = async {
        let resp = client.request(req).await.map_err(|e| e.to_string())?;
        if !resp.status().is_success() {
            return Err(format!("{uri}: status {}", resp.status()));
        }
        let mut body = resp.into_body();
        loop {
            match body.frame().await {
                Some(Ok(f)) if f.data_ref().is_some_and(|d| !d.is_empty()) => break,
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(e.to_string()),
                None => break,
            }
        }
        Ok(started.elapsed().as_secs_f64())
    };
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| format!("{uri}: no answer within {timeout:?}"))?
}

fn error_policy(_set: Arc<InferenceSet>, err: &Error, ctx: Arc<Context>) -> Requeue {
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
mod tests {
    use super::*;
    use crate::release::inject::{AGENT_CONTAINER, restricted_violations};

    /// An InferenceSet's pods get the agent through the same injection as a Release's,
    /// `restricted`-compliant too.
    #[test]
    fn the_agent_in_inference_pods_is_restricted_compliant() {
        let set: InferenceSet = serde_json::from_value(serde_json::json!({
            "apiVersion": "sluice.dev/v1alpha1",
            "kind": "InferenceSet",
            "metadata": {"name": "llm", "namespace": "ml", "uid": "u-1"},
            "spec": {
                "replicas": 1,
                "podsPerReplica": 1,
                "gpusPerPod": 1,
                "agent": {},
                "template": {"spec": {"containers": [{"name": "m", "image": "x", "ports": [{"name": "http", "containerPort": 8000}]}]}}
            }
        }))
        .unwrap();
        let images = AgentImagePolicy::only("sluice/agent:dev");
        let pod = build_pod(&set, "g0", 0, "rev", 0, &images).unwrap();
        let spec = pod.spec.unwrap();
        let agent = spec
            .init_containers
            .iter()
            .flatten()
            .find(|c| c.name == AGENT_CONTAINER)
            .expect("the agent is injected");
        assert_eq!(restricted_violations(agent), Vec::<String>::new());
        let ports: Vec<i32> = agent
            .ports
            .iter()
            .flatten()
            .map(|p| p.container_port)
            .collect();
        assert!(ports.contains(&15101), "{ports:?}");
        // An image the operator does not allow is not injected.
        let mut other = set.clone();
        other.spec.agent.as_mut().unwrap().image = Some("evil.example/miner:1".into());
        let err = build_pod(&other, "g0", 0, "rev", 0, &images).unwrap_err();
        assert!(err.to_string().contains("is not allowed"), "{err}");
    }
}
