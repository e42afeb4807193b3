//! The gang binder: places pods with `schedulerName: sluice` a whole gang at a time with
//! the topology-aware placer and binds every pod of a gang through the `pods/binding`
//! subresource. The chosen GPU indices travel in the Binding's annotations, which the API
//! server copies onto the pod in the same write as `spec.nodeName` (so a pod is never
//! bound without its `sluice.dev/gpu-ids`).
//!
//! A round takes the fleet model (built from the Node and Pod caches: bound pods' GPUs from
//! their `sluice.dev/gpu-ids`, plus the binds this binder made that the cache has not seen
//! yet; kept from the last round while the nodes and the pods holding GPUs changed only by
//! this binder's binds), places every complete pending gang (oldest first) and binds each
//! as soon as it is placed, at most [`BIND_IN_FLIGHT`] pods at once. A gang whose bind
//! fails part-way is deleted whole; its owner creates it again.
//!
//! Node eligibility (taints, `nodeSelector`, required node affinity) is decided by the pure
//! [`super::affinity::pod_fits_node`], and preferred node affinity orders the attempts
//! (preferred nodes first, [`super::affinity::preference_tiers`]); the constraints the
//! binder does not honour (pod (anti-)affinity, topology spread) are reported with a
//! Warning event `ConstraintsIgnored` once per owner.
//!
//! Pure pieces ([`node_spec`], [`pod_usage`], [`tolerates`], [`gang_request`],
//! [`parse_cpu_milli`], [`parse_mem_mib`], [`owner_reference`]) are unit-tested below.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{FutureExt, StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Node, ObjectReference, Pod, PodSpec, Taint, Toleration};
use kube::Resource;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::Store;
use sluice_placement::{
    Fleet, GangRequest, GpuDemand, MIG_RESOURCE_PREFIX, MigDevices, NodeSpec, PlaceError, Placer,
    PodAssignment, TopologyConfig, WorkloadProfile,
};
use tokio::sync::Notify;

use super::affinity;
use super::crd::{
    GANG_INDEX_ANNOTATION, GANG_LABEL, GANG_REQUEST_ANNOTATION, GANG_SIZE_ANNOTATION,
    GPU_IDS_ANNOTATION, GPU_RESOURCE, SCHEDULER_NAME, SET_LABEL,
};
use super::metrics::InferenceMetrics;

/// How long a bind this binder made is assumed while the cache has not caught up.
const ASSUME_TTL: Duration = Duration::from_secs(60);
/// Most pod binds in flight at once. Placement runs ahead of the binds (a gang is bound as
/// soon as it is placed) but waits for a free slot here, so a burst of thousands of pods
/// never opens thousands of requests at once.
pub const BIND_IN_FLIGHT: usize = 128;

/// Allocatable capacity of a node, from the Node object.
pub fn node_spec(node: &Node) -> Option<NodeSpec> {
    let name = node.metadata.name.clone()?;
    let alloc = node.status.as_ref().and_then(|s| s.allocatable.as_ref());
    let get = |k: &str| alloc.and_then(|a| a.get(k)).map(|q| q.0.as_str());
    let gpus = get(GPU_RESOURCE).and_then(|q| q.parse::<u32>().ok());
    Some(NodeSpec {
        name,
        labels: node.metadata.labels.clone().unwrap_or_default(),
        annotations: node.metadata.annotations.clone().unwrap_or_default(),
        gpus: Some(gpus.unwrap_or(0)),
        cpu_milli: get("cpu").and_then(parse_cpu_milli).unwrap_or(0),
        memory_mib: get("memory").and_then(parse_mem_mib).unwrap_or(0),
        // MIG `mixed` strategy: allocatable `nvidia.com/mig-<profile>` per profile.
        mig_devices: alloc
            .into_iter()
            .flatten()
            .filter_map(|(k, q)| {
                let profile = k.strip_prefix(MIG_RESOURCE_PREFIX)?;
                Some((profile.to_string(), q.0.parse::<u32>().ok()?))
            })
            .collect(),
    })
}

/// Whether new pods may go to the node: not cordoned and Ready.
pub fn node_schedulable(node: &Node) -> bool {
    let cordoned = node
        .spec
        .as_ref()
        .and_then(|s| s.unschedulable)
        .unwrap_or(false);
    let ready = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"))
        .is_some_and(|c| c.status == "True");
    !cordoned && ready
}

/// CPU quantity (`100m`, `2`, `1.5`) in milli-cores.
pub fn parse_cpu_milli(q: &str) -> Option<u64> {
    if let Some(m) = q.strip_suffix('m') {
        return m.parse().ok();
    }
    q.parse::<f64>().ok().map(|c| (c * 1000.0).round() as u64)
}

/// Memory quantity (`512Mi`, `1Gi`, `1G`, `1000000`) in MiB (rounded up).
pub fn parse_mem_mib(q: &str) -> Option<u64> {
    const UNITS: [(&str, f64); 10] = [
        ("Ki", 1024.0),
        ("Mi", 1048576.0),
        ("Gi", 1073741824.0),
        ("Ti", 1099511627776.0),
        ("k", 1e3),
        ("K", 1e3),
        ("M", 1e6),
        ("G", 1e9),
        ("T", 1e12),
        ("", 1.0),
    ];
    for (suffix, mult) in UNITS {
        if let Some(n) = q.strip_suffix(suffix)
            && let Ok(v) = n.parse::<f64>()
        {
            return Some((v * mult / 1048576.0).ceil() as u64);
        }
    }
    None
}

/// What a pod takes: whole GPUs (`nvidia.com/gpu` limits, else requests), CPU and memory
/// requests, summed over its containers.
pub fn pod_usage(pod: &Pod) -> (u32, u64, u64) {
    let mut gpus = 0u32;
    let mut cpu = 0u64;
    let mut mem = 0u64;
    for c in pod.spec.iter().flat_map(|s| s.containers.iter()) {
        let Some(r) = &c.resources else { continue };
        let req = r.requests.as_ref();
        let lim = r.limits.as_ref();
        let g = lim
            .and_then(|l| l.get(GPU_RESOURCE))
            .or_else(|| req.and_then(|l| l.get(GPU_RESOURCE)));
        gpus += g.and_then(|q| q.0.parse::<u32>().ok()).unwrap_or(0);
        cpu += req
            .and_then(|l| l.get("cpu"))
            .and_then(|q| parse_cpu_milli(&q.0))
            .unwrap_or(0);
        mem += req
            .and_then(|l| l.get("memory"))
            .and_then(|q| parse_mem_mib(&q.0))
            .unwrap_or(0);
    }
    (gpus, cpu, mem)
}

/// The MIG devices a pod takes with the `mixed` strategy: its `nvidia.com/mig-<profile>`
/// limits (else requests), summed over its containers. `Err` when it asks for more than
/// one profile (not modelled).
pub fn pod_mig(pod: &Pod) -> Result<Option<MigDevices>, String> {
    let mut by: BTreeMap<String, u32> = BTreeMap::new();
    for c in pod.spec.iter().flat_map(|s| s.containers.iter()) {
        let Some(r) = &c.resources else { continue };
        let src = r
            .limits
            .as_ref()
            .filter(|l| l.keys().any(|k| k.starts_with(MIG_RESOURCE_PREFIX)))
            .or(r.requests.as_ref());
        for (k, q) in src.into_iter().flatten() {
            if let Some(profile) = k.strip_prefix(MIG_RESOURCE_PREFIX) {
                let n =
                    q.0.parse::<u32>()
                        .map_err(|_| format!("{k}={} is not a count", q.0))?;
                *by.entry(profile.to_string()).or_default() += n;
            }
        }
    }
    by.retain(|_, n| *n > 0);
    if by.len() > 1 {
        return Err(format!(
            "pods asking for several MIG profiles ({}) are not supported",
            by.keys().cloned().collect::<Vec<_>>().join(", ")
        ));
    }
    Ok(by
        .into_iter()
        .next()
        .map(|(profile, count)| MigDevices { profile, count }))
}

/// The GPU indices in `sluice.dev/gpu-ids`.
pub fn gpu_ids(pod: &Pod) -> Option<Vec<u32>> {
    let v = pod.metadata.annotations.as_ref()?.get(GPU_IDS_ANNOTATION)?;
    if v.trim().is_empty() {
        return Some(Vec::new());
    }
    v.split(',').map(|s| s.trim().parse().ok()).collect()
}

/// Whether `tolerations` tolerate every NoSchedule/NoExecute taint.
pub fn tolerates(taints: &[Taint], tolerations: &[Toleration]) -> bool {
    taints
        .iter()
        .filter(|t| t.effect == "NoSchedule" || t.effect == "NoExecute")
        .all(|t| {
            tolerations.iter().any(|tol| {
                let effect_ok = tol
                    .effect
                    .as_deref()
                    .is_none_or(|e| e.is_empty() || e == t.effect);
                let key_ok = match tol.key.as_deref() {
                    None | Some("") => tol.operator.as_deref() == Some("Exists"),
                    Some(k) => k == t.key,
                };
                let value_ok = match tol.operator.as_deref() {
                    Some("Exists") => true,
                    _ => tol.value.as_deref().unwrap_or("") == t.value.as_deref().unwrap_or(""),
                };
                effect_ok && key_ok && value_ok
            })
        })
}

/// The placement request of a gang: the controller's annotation, else one pod of the
/// GPUs, CPU and memory it asks for; MIG devices (`mixed` strategy) from its
/// `nvidia.com/mig-<profile>` resources.
pub fn gang_request(pod: &Pod, size: u32) -> Result<GangRequest, String> {
    let (gpus, cpu, mem) = pod_usage(pod);
    let mut req = match pod
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(GANG_REQUEST_ANNOTATION))
    {
        Some(json) => serde_json::from_str::<GangRequest>(json).map_err(|e| {
            format!("annotation {GANG_REQUEST_ANNOTATION} is not a gang request: {e}")
        })?,
        None => GangRequest::gpus(size, gpus),
    };
    req.pods = size;
    req.cpu_milli = cpu;
    req.memory_mib = mem;
    if gpus == 0 {
        req.gpu = GpuDemand::None;
    }
    req.mig_devices = pod_mig(pod)?;
    Ok(req)
}

fn ns_name(p: &Pod) -> (String, String) {
    (
        p.metadata.namespace.clone().unwrap_or_default(),
        p.metadata.name.clone().unwrap_or_default(),
    )
}

fn gang_key(p: &Pod) -> String {
    let (ns, name) = ns_name(p);
    match p.metadata.labels.as_ref().and_then(|l| l.get(GANG_LABEL)) {
        Some(g) => format!("{ns}/{g}"),
        None => format!("{ns}/pod/{name}"),
    }
}

fn spread_group(p: &Pod) -> Option<String> {
    let set = p.metadata.labels.as_ref()?.get(SET_LABEL)?;
    Some(format!(
        "{}/{set}",
        p.metadata.namespace.as_deref().unwrap_or_default()
    ))
}

fn annotation<'a>(p: &'a Pod, key: &str) -> Option<&'a str> {
    p.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(key))
        .map(String::as_str)
}

fn is_pending_for_us(p: &Pod) -> bool {
    let spec = p.spec.as_ref();
    spec.and_then(|s| s.scheduler_name.as_deref()) == Some(SCHEDULER_NAME)
        && spec.and_then(|s| s.node_name.as_deref()).is_none()
        && spec
            .and_then(|s| s.scheduling_gates.as_ref())
            .is_none_or(|g| g.is_empty())
        && p.metadata.deletion_timestamp.is_none()
        && p.status
            .as_ref()
            .and_then(|s| s.phase.as_deref())
            .unwrap_or("Pending")
            == "Pending"
}

fn holds_resources(p: &Pod) -> bool {
    let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
    !matches!(phase, Some("Succeeded") | Some("Failed"))
}

/// A bind this binder made.
#[derive(Clone)]
struct Assumed {
    at: Instant,
    gang: String,
    group: Option<String>,
    assignment: PodAssignment,
}

/// The fleet kept between rounds, with what it was built from.
struct CachedFleet {
    fleet: Fleet,
    /// [`nodes_fingerprint`] of the nodes it was built from.
    nodes_fp: u64,
    /// Uids of the pods it accounts for (see [`Binder::accounted`]).
    accounted: HashSet<String>,
}

/// Order-independent fingerprint of the nodes' names and resource versions.
fn nodes_fingerprint(nodes: &[Arc<Node>]) -> u64 {
    use std::hash::{Hash, Hasher};
    nodes.iter().fold(nodes.len() as u64, |acc, n| {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        n.metadata.name.hash(&mut h);
        n.metadata.resource_version.hash(&mut h);
        acc.wrapping_add(h.finish())
    })
}

/// The binder.
pub struct Binder {
    /// The fleet of the last round (rebuilt when nodes or other pods change).
    cached: Option<CachedFleet>,
    /// Free bind slots (pods); see [`BIND_IN_FLIGHT`].
    slots: Arc<tokio::sync::Semaphore>,
    /// Results of gang binds: (gang key, bound).
    done_tx: tokio::sync::mpsc::UnboundedSender<(String, bool)>,
    done_rx: tokio::sync::mpsc::UnboundedReceiver<(String, bool)>,
    client: kube::Client,
    nodes: Store<Node>,
    pods: Store<Pod>,
    placer: Placer,
    topology: TopologyConfig,
    assumed: HashMap<String, Assumed>,
    metrics: InferenceMetrics,
    /// Last unschedulable message written per pod (to write each change once).
    reported: HashMap<String, String>,
    /// Publishes the `ConstraintsIgnored` warnings.
    recorder: Recorder,
    /// Owners (and ignored constraints) already warned about; see
    /// [`Binder::warn_ignored_constraints`].
    warned: HashSet<String>,
}

/// One gang ready to place: its pods in gang order.
struct PendingGang {
    key: String,
    pods: Vec<Arc<Pod>>,
    created: Option<k8s_openapi::jiff::Timestamp>,
}

impl Binder {
    pub fn new(
        client: kube::Client,
        nodes: Store<Node>,
        pods: Store<Pod>,
        topology: TopologyConfig,
        metrics: InferenceMetrics,
    ) -> Self {
        let (done_tx, done_rx) = tokio::sync::mpsc::unbounded_channel();
        Self {
            cached: None,
            slots: Arc::new(tokio::sync::Semaphore::new(BIND_IN_FLIGHT)),
            done_tx,
            done_rx,
            nodes,
            pods,
            placer: Placer::new(WorkloadProfile::inference_default()),
            topology,
            assumed: HashMap::new(),
            recorder: Recorder::new(
                client.clone(),
                Reporter {
                    controller: "sluice-binder".into(),
                    instance: std::env::var("POD_NAME").ok(),
                },
            ),
            client,
            metrics,
            reported: HashMap::new(),
            warned: HashSet::new(),
        }
    }

    /// Run rounds whenever `wake` fires (cache changes), at least every second.
    pub async fn run(mut self, wake: Arc<Notify>) {
        loop {
            tokio::select! {
                _ = wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            // Let a burst of events settle into one round.
            tokio::time::sleep(Duration::from_millis(5)).await;
            if let Err(e) = self.round().await {
                tracing::warn!(error = %e, "binder round failed");
                self.metrics.reconcile_error(&e);
            }
        }
    }

    /// Complete pending gangs, oldest first (not those being bound now).
    fn pending_gangs(&self, pods: &[Arc<Pod>]) -> Vec<PendingGang> {
        let mut by: BTreeMap<String, Vec<Arc<Pod>>> = BTreeMap::new();
        let binding = |p: &Pod| {
            p.metadata
                .uid
                .as_ref()
                .is_some_and(|u| self.assumed.contains_key(u))
        };
        for p in pods.iter().filter(|p| is_pending_for_us(p) && !binding(p)) {
            by.entry(gang_key(p)).or_default().push(p.clone());
        }
        let mut out: Vec<PendingGang> = by
            .into_iter()
            .filter_map(|(key, mut pods)| {
                let size = annotation(&pods[0], GANG_SIZE_ANNOTATION)
                    .and_then(|s| s.parse::<usize>().ok())
                    .unwrap_or(1);
                if pods.len() != size {
                    return None;
                }
                pods.sort_by_key(|p| {
                    annotation(p, GANG_INDEX_ANNOTATION)
                        .and_then(|s| s.parse::<i64>().ok())
                        .unwrap_or(0)
                });
                let created = pods
                    .iter()
                    .filter_map(|p| p.metadata.creation_timestamp.as_ref().map(|t| t.0))
                    .max();
                Some(PendingGang { key, pods, created })
            })
            .collect();
        out.sort_by(|a, b| (a.created, &a.key).cmp(&(b.created, &b.key)));
        out
    }

    /// Build the fleet: nodes, then every pod holding resources (bound or assumed).
    fn fleet(&mut self, nodes: &[Arc<Node>], pods: &[Arc<Pod>]) -> Fleet {
        let mut fleet = Fleet::new(self.topology.clone());
        for n in nodes {
            if let Some(spec) = node_spec(n) {
                let name = spec.name.clone();
                match fleet.add_node(spec) {
                    Ok(()) => {
                        if !node_schedulable(n) {
                            let _ = fleet.set_schedulable(&name, false);
                        }
                    }
                    Err(e) => {
                        tracing::debug!(node = %name, error = %e, "node left out of the fleet")
                    }
                }
            }
        }
        // Group the bound pods (and the assumed ones) by gang: one allocation each.
        let mut gangs: BTreeMap<String, (Option<String>, Vec<PodAssignment>)> = BTreeMap::new();
        for p in pods.iter().filter(|p| holds_resources(p)) {
            let uid = p.metadata.uid.clone().unwrap_or_default();
            if let Some(a) = self.assumed.get(&uid) {
                let e = gangs
                    .entry(a.gang.clone())
                    .or_insert((a.group.clone(), Vec::new()));
                e.1.push(a.assignment.clone());
                continue;
            }
            let Some(node) = p.spec.as_ref().and_then(|s| s.node_name.clone()) else {
                continue;
            };
            let (g, cpu, mem) = pod_usage(p);
            let gpus = match gpu_ids(p) {
                Some(ids) => ids,
                // Bound by another scheduler: the device plugin chose; assume the lowest free.
                None => fleet
                    .free_milli(&node)
                    .map(|f| {
                        f.iter()
                            .enumerate()
                            .filter(|(_, m)| **m >= 1000)
                            .map(|(i, _)| i as u32)
                            .take(g as usize)
                            .collect()
                    })
                    .unwrap_or_default(),
            };
            let assignment = PodAssignment {
                node,
                milli_per_gpu: if gpus.is_empty() { 0 } else { 1000 },
                gpus,
                cpu_milli: cpu,
                memory_mib: mem,
                mig: pod_mig(p).ok().flatten(),
            };
            if annotation(p, GPU_IDS_ANNOTATION).is_some() {
                let e = gangs
                    .entry(gang_key(p))
                    .or_insert((spread_group(p), Vec::new()));
                e.1.push(assignment);
            } else if let Err(e) = fleet.allocate(&format!("pod/{uid}"), None, &[assignment]) {
                // Bound by another scheduler: recorded at once so that the lowest-free
                // guess for the next such pod sees this one.
                tracing::debug!(pod = %uid, error = %e, "existing pod not recorded");
            }
        }
        for (k, (group, pods)) in gangs {
            if let Err(e) = fleet.allocate(&k, group.as_deref(), &pods) {
                // A node that went away, or an over-committed node: leave it out.
                tracing::debug!(gang = %k, error = %e, "existing gang not recorded");
            }
        }
        fleet
    }

    /// Forget assumptions the cache has caught up with (or that expired).
    fn forget_confirmed(&mut self, pods: &[Arc<Pod>]) {
        let now = Instant::now();
        let by_uid: HashMap<&str, &Arc<Pod>> = pods
            .iter()
            .filter_map(|p| p.metadata.uid.as_deref().map(|u| (u, p)))
            .collect();
        self.assumed.retain(|uid, a| {
            now.duration_since(a.at) < ASSUME_TTL
                && by_uid.get(uid.as_str()).is_some_and(|p| {
                    p.spec
                        .as_ref()
                        .and_then(|s| s.node_name.as_deref())
                        .is_none()
                })
        });
    }

    /// Pods the fleet accounts for: holding resources and bound (or being bound by us).
    fn accounted<'a>(&'a self, pods: &'a [Arc<Pod>]) -> impl Iterator<Item = &'a str> + 'a {
        pods.iter().filter(|p| holds_resources(p)).filter_map(|p| {
            let uid = p.metadata.uid.as_deref()?;
            let bound = p.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some();
            (bound || self.assumed.contains_key(uid)).then_some(uid)
        })
    }

    /// The fleet for this round: the one kept from the last round when neither the nodes
    /// nor the set of pods holding GPUs changed other than by this binder's own binds;
    /// otherwise built again from the caches.
    fn take_fleet(&mut self, nodes: &[Arc<Node>], pods: &[Arc<Pod>]) -> (Fleet, HashSet<String>) {
        let fp = nodes_fingerprint(nodes);
        if let Some(c) = self.cached.take()
            && c.nodes_fp == fp
        {
            let mut n = 0;
            let same = self.accounted(pods).all(|uid| {
                n += 1;
                c.accounted.contains(uid)
            }) && n == c.accounted.len();
            if same {
                return (c.fleet, c.accounted);
            }
        }
        let built = Instant::now();
        let fleet = self.fleet(nodes, pods);
        let accounted = self.accounted(pods).map(str::to_string).collect();
        self.metrics
            .fleet_build_seconds
            .observe(built.elapsed().as_secs_f64());
        (fleet, accounted)
    }

    async fn round(&mut self) -> Result<(), super::Error> {
        // Gangs whose bind failed were deleted whole: forget their assumptions.
        while let Ok((key, ok)) = self.done_rx.try_recv() {
            if !ok {
                self.assumed.retain(|_, a| a.gang != key);
            }
        }
        let pods = self.pods.state();
        self.forget_confirmed(&pods);
        let pending = self.pending_gangs(&pods);
        self.metrics.gangs_pending.set(pending.len() as i64);
        if pending.is_empty() {
            return Ok(());
        }
        self.metrics.binder_rounds.inc();
        let nodes = self.nodes.state();
        let (mut fleet, mut accounted) = self.take_fleet(&nodes, &pods);
        let nodes_fp = nodes_fingerprint(&nodes);
        let mut failures: Vec<(PendingGang, String)> = Vec::new();
        // Node eligibility per (tolerations, nodeSelector, node affinity) of the gangs in
        // this round: the nodes a gang may not use are cordoned in the fleet while it is
        // placed; with preferred node affinity, so are the less preferred nodes in the first
        // attempts (see `affinity`).
        let mut eligibility: HashMap<String, Eligibility> = HashMap::new();
        for g in pending {
            let started = Instant::now();
            let first = g.pods[0].clone();
            let mut req = match gang_request(&first, g.pods.len() as u32) {
                Ok(r) => r,
                Err(msg) => {
                    failures.push((g, msg));
                    continue;
                }
            };
            if let (Some(s), Some(group)) = (req.spread.as_mut(), spread_group(&first)) {
                s.group = group;
            }
            let spec = first.spec.clone().unwrap_or_default();
            self.warn_ignored_constraints(&first, &spec).await;
            let elig = eligibility
                .entry(affinity::eligibility_key(&spec))
                .or_insert_with(|| Eligibility::of(&spec, &nodes));
            for n in elig.excluded.iter() {
                let _ = fleet.set_schedulable(n, false);
            }
            // Preferred nodes first, tier by tier; then every eligible node. A hard spread
            // stays measured against every eligible domain, hidden ones included.
            let mut placed = None;
            if !elig.tiers.is_empty() {
                let mut tier_req = req.clone();
                if let Some(s) = tier_req.spread.as_mut()
                    && s.max_skew.is_some()
                {
                    s.floor = self.placer.spread_floor(&fleet, &req).ok();
                }
                for less_preferred in &elig.tiers {
                    for n in less_preferred {
                        let _ = fleet.set_schedulable(n, false);
                    }
                    let attempt = self.placer.place(&fleet, &tier_req);
                    for n in less_preferred {
                        let _ = fleet.set_schedulable(n, true);
                    }
                    if attempt.is_ok() {
                        placed = Some(attempt);
                        break;
                    }
                }
            }
            let placed = placed.unwrap_or_else(|| self.placer.place(&fleet, &req));
            for n in elig.excluded.iter() {
                let _ = fleet.set_schedulable(n, true);
            }
            self.metrics
                .placement_seconds
                .observe(started.elapsed().as_secs_f64());
            let p = match placed {
                Ok(p) => p,
                Err(e) => {
                    self.metrics.placement_failed(&e);
                    failures.push((g, e.to_string()));
                    continue;
                }
            };
            let group = req
                .spread
                .as_ref()
                .map(|s| s.group.clone())
                .or_else(|| spread_group(&first));
            if let Err(e) = fleet.allocate(&g.key, group.as_deref(), &p.pods) {
                failures.push((g, format!("placement not recordable: {e}")));
                continue;
            }
            for (pod, a) in g.pods.iter().zip(&p.pods) {
                if let Some(uid) = &pod.metadata.uid {
                    accounted.insert(uid.clone());
                    self.assumed.insert(
                        uid.clone(),
                        Assumed {
                            at: Instant::now(),
                            gang: g.key.clone(),
                            group: group.clone(),
                            assignment: a.clone(),
                        },
                    );
                }
            }
            // Bind at once (pipelined with the placement of the next gangs), waiting only
            // for free bind slots.
            let n = (g.pods.len() as u32).min(BIND_IN_FLIGHT as u32);
            let permit = self
                .slots
                .clone()
                .acquire_many_owned(n)
                .await
                .expect("bind slots are never closed");
            let (client, metrics, done) = (
                self.client.clone(),
                self.metrics.clone(),
                self.done_tx.clone(),
            );
            tokio::spawn(async move {
                let ok = bind_gang(client, &g, p.pods, metrics).await;
                drop(permit);
                let _ = done.send((g.key.clone(), ok));
            });
        }
        self.cached = Some(CachedFleet {
            fleet,
            nodes_fp,
            accounted,
        });
        // Report unschedulable gangs (once per message change).
        for (g, msg) in &failures {
            self.report_unschedulable(g, msg).await;
        }
        Ok(())
    }

    /// The binder honours taints, `nodeSelector` and node affinity (required and
    /// preferred) only. A pod that also asks for pod (anti-)affinity or topology spread
    /// constraints is placed without them; say so with a Warning event
    /// `ConstraintsIgnored` (and a log line), once per owner (the InferenceSet, or the pod
    /// itself when it has no controller) and set of ignored constraints.
    async fn warn_ignored_constraints(&mut self, pod: &Pod, spec: &PodSpec) {
        let ignored = affinity::ignored_constraints(spec);
        if ignored.is_empty() {
            return;
        }
        let reference = owner_reference(pod);
        let key = format!(
            "{}/{}/{}/{}",
            reference.namespace.as_deref().unwrap_or_default(),
            reference.kind.as_deref().unwrap_or_default(),
            reference.uid.as_deref().unwrap_or_default(),
            ignored.join(",")
        );
        if self.warned.len() > 100_000 {
            self.warned.clear();
        }
        if !self.warned.insert(key) {
            return;
        }
        let note = format!(
            "the sluice binder does not honour {} of pod {}; it places the pod by taints, \
             nodeSelector and required node affinity only",
            ignored.join(", "),
            pod.metadata.name.as_deref().unwrap_or_default()
        );
        tracing::warn!(
            kind = reference.kind.as_deref().unwrap_or_default(),
            name = reference.name.as_deref().unwrap_or_default(),
            namespace = reference.namespace.as_deref().unwrap_or_default(),
            "{note}"
        );
        let ev = Event {
            type_: EventType::Warning,
            reason: "ConstraintsIgnored".into(),
            note: Some(note),
            action: "Scheduling".into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&ev, &reference).await {
            tracing::debug!(error = %e, "event not recorded");
        }
    }

    async fn report_unschedulable(&mut self, g: &PendingGang, msg: &str) {
        for p in &g.pods {
            let (ns, name) = ns_name(p);
            let key = format!("{ns}/{name}");
            if self.reported.get(&key).map(String::as_str) == Some(msg) {
                continue;
            }
            let existing = p
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .and_then(|cs| cs.iter().find(|c| c.type_ == "PodScheduled"))
                .and_then(|c| c.message.clone());
            if existing.as_deref() != Some(msg) {
                let patch = serde_json::json!({"status": {"conditions": [{
                    "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                    "message": format!("gang {}: {msg}", g.key),
                    "lastTransitionTime": k8s_openapi::jiff::Timestamp::now().to_string(),
                }]}});
                let api: Api<Pod> = Api::namespaced(self.client.clone(), &ns);
                if let Err(e) = api
                    .patch_status(&name, &PatchParams::default(), &Patch::Strategic(patch))
                    .await
                {
                    tracing::debug!(pod = %key, error = %e, "could not report unschedulable");
                }
            }
            self.reported.insert(key, msg.to_string());
        }
        if self.reported.len() > 100_000 {
            self.reported.clear();
        }
    }
}

/// The object an event about a pod's template belongs to: the pod's controller (e.g. its
/// InferenceSet), else the pod.
/// Where a pod may go: the schedulable nodes it may not use (taints, `nodeSelector`,
/// required node affinity), and the preference tiers among the others.
struct Eligibility {
    excluded: Vec<String>,
    /// Per attempt before the last, the eligible nodes it leaves out
    /// ([`affinity::preference_tiers`]).
    tiers: Vec<Vec<String>>,
}

impl Eligibility {
    fn of(spec: &PodSpec, nodes: &[Arc<Node>]) -> Eligibility {
        let mut excluded = Vec::new();
        let mut scored = Vec::new();
        let prefers = !affinity::preferred_terms(spec).is_empty();
        for n in nodes.iter().filter(|n| node_schedulable(n)) {
            let Some(name) = n.metadata.name.clone() else {
                continue;
            };
            if !affinity::pod_fits_node(spec, n) {
                excluded.push(name);
            } else if prefers {
                scored.push((name, affinity::preference_score(spec, n)));
            }
        }
        Eligibility {
            excluded,
            tiers: affinity::preference_tiers(&scored),
        }
    }
}

pub fn owner_reference(pod: &Pod) -> ObjectReference {
    let owner = pod
        .metadata
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true));
    match owner {
        Some(o) => ObjectReference {
            api_version: Some(o.api_version.clone()),
            kind: Some(o.kind.clone()),
            name: Some(o.name.clone()),
            namespace: pod.metadata.namespace.clone(),
            uid: Some(o.uid.clone()),
            ..Default::default()
        },
        None => pod.object_ref(&()),
    }
}

/// Bind every pod of a gang; on any failure delete the gang's pods (all or nothing).
async fn bind_gang(
    client: kube::Client,
    g: &PendingGang,
    assignment: Vec<PodAssignment>,
    metrics: InferenceMetrics,
) -> bool {
    let started = Instant::now();
    let jobs: Vec<futures::future::BoxFuture<'static, Result<(), kube::Error>>> = g
        .pods
        .iter()
        .cloned()
        .zip(assignment)
        .map(|(pod, a)| {
            let client = client.clone();
            async move { bind_pod(&client, &pod, &a).await }.boxed()
        })
        .collect();
    let results: Vec<Result<(), kube::Error>> = futures::stream::iter(jobs)
        .buffer_unordered(8)
        .collect()
        .await;
    let failed: Vec<&kube::Error> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    if failed.is_empty() {
        metrics.binds.inc_by(g.pods.len() as u64);
        metrics.gangs_bound.inc();
        metrics
            .bind_seconds
            .observe(started.elapsed().as_secs_f64());
        if let Some(created) = g.created {
            let waited =
                k8s_openapi::jiff::Timestamp::now().as_millisecond() - created.as_millisecond();
            metrics
                .gang_wait_seconds
                .observe(waited.max(0) as f64 / 1000.0);
        }
        tracing::debug!(gang = %g.key, pods = g.pods.len(), "gang bound");
        return true;
    }
    metrics.bind_failures.inc();
    tracing::warn!(gang = %g.key, error = %failed[0], "bind failed part-way: deleting the whole gang");
    for p in &g.pods {
        let (ns, name) = ns_name(p);
        let api: Api<Pod> = Api::namespaced(client.clone(), &ns);
        let _ = api.delete(&name, &DeleteParams::default()).await;
    }
    false
}

async fn bind_pod(client: &kube::Client, pod: &Pod, a: &PodAssignment) -> Result<(), kube::Error> {
    let (ns, name) = ns_name(pod);
    let ids: Vec<String> = a.gpus.iter().map(u32::to_string).collect();
    let binding = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Binding",
        "metadata": {
            "name": name,
            "namespace": ns,
            "annotations": { GPU_IDS_ANNOTATION: ids.join(",") },
        },
        "target": { "apiVersion": "v1", "kind": "Node", "name": a.node },
    });
    let api: Api<Pod> = Api::namespaced(client.clone(), &ns);
    api.create_subresource::<_, serde_json::Value>(
        "binding",
        &name,
        &PostParams::default(),
        &binding,
    )
    .await
    .map(|_| ())
}

/// Start the caches and the binder; returns when the binder stops (never, normally).
pub async fn run(
    client: kube::Client,
    nodes: Store<Node>,
    pods: Store<Pod>,
    wake: Arc<Notify>,
    topology: TopologyConfig,
    metrics: InferenceMetrics,
) {
    let _ = nodes.wait_until_ready().await;
    let _ = pods.wait_until_ready().await;
    Binder::new(client, nodes, pods, topology, metrics)
        .run(wake)
        .await
}

/// A reflector stream for `api`, notifying `wake` on every change.
pub fn reflect<K>(
    api: Api<K>,
    cfg: kube::runtime::watcher::Config,
    wake: Arc<Notify>,
) -> (Store<K>, impl futures::Future<Output = ()> + Send + 'static)
where
    K: kube::Resource
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone + Send + Sync,
{
    use kube::runtime::WatchStreamExt;
    let (reader, writer) = kube::runtime::reflector::store();
    let fut = async move {
        let stream = kube::runtime::watcher(api, cfg)
            .default_backoff()
            .reflect(writer)
            .touched_objects();
        futures::pin_mut!(stream);
        loop {
            match stream.try_next().await {
                Ok(Some(_)) => wake.notify_one(),
                Ok(None) => break,
                Err(e) => tracing::warn!(error = %e, "watch error"),
            }
        }
    };
    (reader, fut)
}

/// Map a placement error to a short metric label.
pub fn place_error_label(e: &PlaceError) -> &'static str {
    match e {
        PlaceError::InvalidRequest(_) => "invalid_request",
        PlaceError::UnknownLevel(_) => "unknown_level",
        PlaceError::NoMatchingGpu { .. } => "no_matching_gpu",
        PlaceError::PodLargerThanAnyNode { .. } => "pod_larger_than_any_node",
        PlaceError::RequiredDomainTooSmall { .. } => "required_domain_too_small",
        PlaceError::RequiredDomainFull { .. } => "required_domain_full",
        PlaceError::SpreadUnsatisfiable { .. } => "spread_unsatisfiable",
        PlaceError::InsufficientCapacity { .. } => "insufficient_capacity",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

    #[test]
    fn quantities_parse() {
        assert_eq!(parse_cpu_milli("100m"), Some(100));
        assert_eq!(parse_cpu_milli("2"), Some(2000));
        assert_eq!(parse_cpu_milli("1.5"), Some(1500));
        assert_eq!(parse_mem_mib("512Mi"), Some(512));
        assert_eq!(parse_mem_mib("1Gi"), Some(1024));
        assert_eq!(parse_mem_mib("1048576"), Some(1));
        assert_eq!(parse_mem_mib("1G"), Some(954));
        assert_eq!(parse_mem_mib("x"), None);
    }

    fn taint(key: &str, value: &str, effect: &str) -> Taint {
        Taint {
            key: key.into(),
            value: Some(value.into()),
            effect: effect.into(),
            ..Default::default()
        }
    }

    #[test]
    fn kwok_taint_needs_a_toleration() {
        let t = vec![taint("kwok.x-k8s.io/node", "fake", "NoSchedule")];
        assert!(!tolerates(&t, &[]));
        let exists = Toleration {
            key: Some("kwok.x-k8s.io/node".into()),
            operator: Some("Exists".into()),
            effect: Some("NoSchedule".into()),
            ..Default::default()
        };
        assert!(tolerates(&t, std::slice::from_ref(&exists)));
        let wrong_value = Toleration {
            key: Some("kwok.x-k8s.io/node".into()),
            operator: Some("Equal".into()),
            value: Some("real".into()),
            ..Default::default()
        };
        assert!(!tolerates(&t, &[wrong_value]));
        let all = Toleration {
            operator: Some("Exists".into()),
            ..Default::default()
        };
        assert!(tolerates(&t, &[all]));
        // PreferNoSchedule never blocks.
        assert!(tolerates(&[taint("a", "b", "PreferNoSchedule")], &[]));
    }

    fn gpu_pod(gpus: &str, annotations: &[(&str, &str)]) -> Pod {
        let mut p: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "ns"},
            "spec": {"containers": [{"name": "c", "resources": {
                "limits": {"nvidia.com/gpu": gpus},
                "requests": {"cpu": "500m", "memory": "1Gi"}}}]}
        }))
        .unwrap();
        p.metadata.annotations = Some(
            annotations
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
        p
    }

    #[test]
    fn usage_and_gpu_ids_come_from_the_pod() {
        let p = gpu_pod("4", &[(GPU_IDS_ANNOTATION, "4,5,6,7")]);
        assert_eq!(pod_usage(&p), (4, 500, 1024));
        assert_eq!(gpu_ids(&p), Some(vec![4, 5, 6, 7]));
        assert_eq!(gpu_ids(&gpu_pod("1", &[(GPU_IDS_ANNOTATION, "x")])), None);
        assert_eq!(gpu_ids(&gpu_pod("1", &[])), None);
    }

    #[test]
    fn gang_request_from_annotation_or_resources() {
        let plain = gang_request(&gpu_pod("2", &[]), 1).unwrap();
        assert_eq!(plain.gpu, GpuDemand::Whole(2));
        assert_eq!((plain.cpu_milli, plain.memory_mib), (500, 1024));
        let req = GangRequest::gpus(1, 4)
            .required(sluice_placement::TopologyLevel::GpuGroup)
            .products(["NVIDIA-H100-80GB-HBM3"]);
        let json = serde_json::to_string(&req).unwrap();
        let annotated =
            gang_request(&gpu_pod("4", &[(GANG_REQUEST_ANNOTATION, &json)]), 2).unwrap();
        assert_eq!(annotated.pods, 2);
        assert_eq!(
            annotated.required,
            Some(sluice_placement::TopologyLevel::GpuGroup)
        );
        assert!(gang_request(&gpu_pod("4", &[(GANG_REQUEST_ANNOTATION, "{")]), 1).is_err());
    }

    fn mig_pod(resources: serde_json::Value) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "m", "namespace": "ns"},
            "spec": {"containers": [
                {"name": "c", "resources": resources},
                {"name": "side", "resources": {"requests": {"cpu": "100m"}}}
            ]}
        }))
        .unwrap()
    }

    #[test]
    fn mig_profile_request_comes_from_the_pod_resources() {
        let p = mig_pod(serde_json::json!({"limits": {"nvidia.com/mig-1g.5gb": "2"}}));
        let want = Some(MigDevices {
            profile: "1g.5gb".into(),
            count: 2,
        });
        assert_eq!(pod_mig(&p).unwrap(), want);
        let req = gang_request(&p, 1).unwrap();
        assert_eq!(req.gpu, GpuDemand::None);
        assert_eq!(req.mig_devices, want);
        assert_eq!(req.cpu_milli, 100);
        // Requests when there are no limits.
        let p = mig_pod(serde_json::json!({"requests": {"nvidia.com/mig-3g.20gb": "1"}}));
        assert_eq!(pod_mig(&p).unwrap().unwrap().profile, "3g.20gb");
        // No MIG resource, a zero count: none.
        assert_eq!(pod_mig(&gpu_pod("1", &[])).unwrap(), None);
        let p = mig_pod(serde_json::json!({"limits": {"nvidia.com/mig-1g.5gb": "0"}}));
        assert_eq!(pod_mig(&p).unwrap(), None);
        // Two profiles in one pod: not modelled, reported.
        let p = mig_pod(serde_json::json!({"limits": {
            "nvidia.com/mig-1g.5gb": "1", "nvidia.com/mig-2g.10gb": "1"}}));
        assert!(pod_mig(&p).is_err());
        assert!(gang_request(&p, 1).is_err());
    }

    #[test]
    fn mixed_mig_node_capacity_comes_from_allocatable() {
        let n: Node = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "a100", "labels": {"nvidia.com/mig.strategy": "mixed"}},
            "status": {"allocatable": {"nvidia.com/gpu": "0",
                "nvidia.com/mig-1g.5gb": "7", "nvidia.com/mig-3g.20gb": "1"}}
        }))
        .unwrap();
        let s = node_spec(&n).unwrap();
        assert_eq!(s.gpus, Some(0));
        assert_eq!(
            s.mig_devices,
            BTreeMap::from([("1g.5gb".to_string(), 7), ("3g.20gb".to_string(), 1)])
        );
        let mut fleet = Fleet::new(TopologyConfig::default());
        fleet.add_node(s).unwrap();
        let mut placer = Placer::new(WorkloadProfile::inference_default());
        let p = mig_pod(serde_json::json!({"limits": {"nvidia.com/mig-3g.20gb": "1"}}));
        let placed = placer.place(&fleet, &gang_request(&p, 1).unwrap()).unwrap();
        fleet.allocate("x", None, &placed.pods).unwrap();
        assert!(placer.place(&fleet, &gang_request(&p, 1).unwrap()).is_err());
    }

    #[test]
    fn events_about_a_pod_template_go_to_its_controller() {
        let mut p = gpu_pod("1", &[]);
        let own = owner_reference(&p);
        assert_eq!(
            (
                own.kind.as_deref(),
                own.name.as_deref(),
                own.namespace.as_deref()
            ),
            (Some("Pod"), Some("p"), Some("ns"))
        );
        p.metadata.owner_references = Some(vec![
            k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
                api_version: "v1".into(),
                kind: "ConfigMap".into(),
                name: "not-controller".into(),
                uid: "u0".into(),
                ..Default::default()
            },
            k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
                api_version: "sluice.dev/v1alpha1".into(),
                kind: "InferenceSet".into(),
                name: "llm".into(),
                uid: "u1".into(),
                controller: Some(true),
                ..Default::default()
            },
        ]);
        let own = owner_reference(&p);
        assert_eq!(
            (
                own.kind.as_deref(),
                own.name.as_deref(),
                own.namespace.as_deref(),
                own.uid.as_deref()
            ),
            (Some("InferenceSet"), Some("llm"), Some("ns"), Some("u1"))
        );
    }

    #[test]
    fn node_capacity_and_readiness() {
        let n: Node = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "n1", "labels": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}},
            "status": {"allocatable": {"nvidia.com/gpu": "8", "cpu": "64", "memory": "512Gi"},
                       "conditions": [{"type": "Ready", "status": "True"}]}
        }))
        .unwrap();
        let s = node_spec(&n).unwrap();
        assert_eq!(
            (s.gpus, s.cpu_milli, s.memory_mib),
            (Some(8), 64000, 524288)
        );
        assert!(node_schedulable(&n));
        let mut cordoned = n.clone();
        cordoned.spec = Some(k8s_openapi::api::core::v1::NodeSpec {
            unschedulable: Some(true),
            ..Default::default()
        });
        assert!(!node_schedulable(&cordoned));
        let mut not_ready = n;
        not_ready
            .status
            .as_mut()
            .unwrap()
            .conditions
            .as_mut()
            .unwrap()[0]
            .status = "False".into();
        assert!(!node_schedulable(&not_ready));
        let _ = Quantity("1".into());
    }
}
