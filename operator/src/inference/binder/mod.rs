//! The gang binder: places pods with `schedulerName: sluice` a whole gang at a time with
//! the topology-aware placer and binds every pod of a gang through the `pods/binding`
//! subresource. The chosen GPU indices travel in the Binding's annotations, which the API
//! server copies onto the pod in the same write as `spec.nodeName` (so a pod is never
//! bound without its `sluice.dev/gpu-ids`).
//!
//! A round brings the fleet index up to date with the Node and Pod caches (only the objects
//! whose resource version changed since the last round; see [`fleet_index`]), places every
//! complete pending gang (oldest first, [`gangs`]) and binds each as soon as it is placed,
//! at most [`BIND_IN_FLIGHT`] pods at once ([`bind`]). A gang whose bind fails part-way is
//! deleted whole; its owner creates it again.
//!
//! Node eligibility (taints, `nodeSelector`, required node affinity) is decided by the pure
//! [`super::affinity::pod_fits_node`] and passed to the placer as the nodes a gang may not
//! use; preferred node affinity orders the attempts (preferred nodes first,
//! [`super::affinity::preference_tiers`]; see [`eligibility`]). The constraints the binder
//! does not honour (pod (anti-)affinity, topology spread) are reported with a Warning event
//! `ConstraintsIgnored` once per owner.
//!
//! The Kubernetes objects as the placer sees them (capacity, usage, gang requests) are pure
//! functions in [`objects`], unit-tested there.

mod bind;
mod eligibility;
pub mod fleet_index;
mod gangs;
pub mod objects;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use k8s_openapi::api::core::v1::{Node, Pod, PodSpec};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::Store;
use sluice_placement::{Placer, TopologyConfig, WorkloadProfile};
use tokio::sync::Notify;
use tracing::Instrument;

use crate::inference::affinity;
use crate::inference::error::Error;
use crate::inference::metrics::InferenceMetrics;
use eligibility::Eligibility;
pub use fleet_index::FleetIndex;
use gangs::PendingGang;
pub use objects::{
    gang_request, gpu_ids, node_schedulable, node_spec, owner_reference, parse_cpu_milli,
    parse_mem_mib, pod_mig, pod_usage,
};
use objects::{ns_name, spread_group};

/// Most pod binds in flight at once. Placement runs ahead of the binds (a gang is bound as
/// soon as it is placed) but waits for a free slot here, so a burst of thousands of pods
/// never opens thousands of requests at once.
pub const BIND_IN_FLIGHT: usize = 128;

/// The binder.
pub struct Binder {
    /// The fleet: nodes, bound pods and the binds in flight.
    index: FleetIndex,
    /// Free bind slots (pods); see [`BIND_IN_FLIGHT`].
    slots: Arc<tokio::sync::Semaphore>,
    /// Results of gang binds: (gang key, bound).
    done_tx: tokio::sync::mpsc::UnboundedSender<(String, bool)>,
    done_rx: tokio::sync::mpsc::UnboundedReceiver<(String, bool)>,
    client: kube::Client,
    nodes: Store<Node>,
    pods: Store<Pod>,
    placer: Placer,
    metrics: InferenceMetrics,
    /// Last unschedulable message written per pod (to write each change once).
    reported: HashMap<String, String>,
    /// Publishes the `ConstraintsIgnored` warnings.
    recorder: Recorder,
    /// Owners (and ignored constraints) already warned about; see
    /// [`Binder::warn_ignored_constraints`].
    warned: HashSet<String>,
}

impl Binder {
    pub fn new(
        client: kube::Client,
        nodes: Store<Node>,
        pods: Store<Pod>,
        topology: TopologyConfig,
        metrics: InferenceMetrics,
        identity: Option<String>,
    ) -> Self {
        let (done_tx, done_rx) = tokio::sync::mpsc::unbounded_channel();
        Self {
            index: FleetIndex::new(topology),
            slots: Arc::new(tokio::sync::Semaphore::new(BIND_IN_FLIGHT)),
            done_tx,
            done_rx,
            nodes,
            pods,
            placer: Placer::new(WorkloadProfile::inference_default()),
            recorder: Recorder::new(
                client.clone(),
                Reporter {
                    controller: "sluice-binder".into(),
                    instance: identity,
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
            if let Err(e) = self
                .round()
                .instrument(tracing::info_span!("binder_round"))
                .await
            {
                tracing::warn!(error = %e, "binder round failed");
                self.metrics.reconcile_error(&e);
            }
        }
    }

    async fn round(&mut self) -> Result<(), Error> {
        // Gangs whose bind failed were deleted whole: forget their binds.
        while let Ok((key, ok)) = self.done_rx.try_recv() {
            if !ok {
                self.index.forget_assumed(&key);
            }
        }
        let pods = self.pods.state();
        self.index.sync_pods(&pods, Instant::now());
        let pending = gangs::pending_gangs(&pods, |uid| self.index.is_assumed(uid));
        self.metrics.gangs_pending.set(pending.len() as i64);
        if pending.is_empty() {
            return Ok(());
        }
        self.metrics.binder_rounds.inc();
        let nodes = self.nodes.state();
        self.index.sync_nodes(&nodes);
        if let Some(took) = self.index.refresh() {
            self.metrics.fleet_build_seconds.observe(took.as_secs_f64());
        }
        let mut failures: Vec<(PendingGang, String)> = Vec::new();
        // Node eligibility per (tolerations, nodeSelector, node affinity) of the gangs in
        // this round (see `affinity`).
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
            let fleet = self.index.fleet();
            let excluded = || elig.excluded.iter().map(String::as_str);
            // Preferred nodes first, tier by tier; then every eligible node. A hard spread
            // stays measured against every eligible domain, hidden ones included.
            let mut placed = None;
            if !elig.tiers.is_empty() {
                let mut tier_req = req.clone();
                if let Some(s) = tier_req.spread.as_mut()
                    && s.max_skew.is_some()
                {
                    s.floor = self
                        .placer
                        .spread_floor_excluding(fleet, &req, excluded())
                        .ok();
                }
                for left_out in elig.attempts() {
                    let attempt = self.placer.place_excluding(fleet, &tier_req, left_out);
                    if attempt.is_ok() {
                        placed = Some(attempt);
                        break;
                    }
                }
            }
            let placed =
                placed.unwrap_or_else(|| self.placer.place_excluding(fleet, &req, excluded()));
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
            let binds: Vec<_> = g
                .pods
                .iter()
                .zip(&p.pods)
                .filter_map(|(pod, a)| Some((pod.metadata.uid.clone()?, a.clone())))
                .collect();
            if let Err(e) = self
                .index
                .assume(&g.key, group.as_deref(), &binds, Instant::now())
            {
                failures.push((g, format!("placement not recordable: {e}")));
                continue;
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
                let ok = bind::bind_gang(client, &g, p.pods, metrics).await;
                drop(permit);
                let _ = done.send((g.key.clone(), ok));
            });
        }
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

/// Start the caches and the binder; returns when the binder stops (never, normally).
/// `identity` names this replica in the events it publishes.
pub async fn run(
    client: kube::Client,
    nodes: Store<Node>,
    pods: Store<Pod>,
    wake: Arc<Notify>,
    topology: TopologyConfig,
    metrics: InferenceMetrics,
    identity: Option<String>,
) {
    let _ = nodes.wait_until_ready().await;
    let _ = pods.wait_until_ready().await;
    Binder::new(client, nodes, pods, topology, metrics, identity)
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
