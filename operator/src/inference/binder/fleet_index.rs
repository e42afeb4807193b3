//! The binder's fleet as an index of the Node and Pod objects: [`FleetIndex::apply_node`],
//! [`FleetIndex::apply_pod`] and the deletes update it object by object, so a round pays
//! only for what changed since the last one (a node heartbeat, one pod bound) instead of
//! rebuilding the fleet from every object.
//!
//! The fleet holds every node and every pod holding resources on one: bound pods by their
//! `sluice.dev/gpu-ids` (one allocation per gang, owned by its InferenceSet for spreading),
//! pods another scheduler bound as one allocation each (the lowest free GPUs assumed), and
//! the binds of this binder the cache has not shown yet ([`FleetIndex::assume`]). A change
//! the fleet cannot take in place (a node added, removed, or with new capacity, labels or
//! topology) marks it stale, and [`FleetIndex::refresh`] rebuilds it from the index, not
//! from the objects. An allocation that does not fit (its node gone, or over-committed) is
//! left out and tried again whenever capacity is released.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Node, Pod};
use sluice_placement::{
    Fleet, FleetError, MILLI_PER_GPU, MigDevices, NodeSpec, PodAssignment, TopologyConfig,
};

use super::objects::{
    annotation, gang_key, gpu_ids, holds_resources, node_schedulable, node_spec, pod_mig,
    pod_usage, spread_group,
};
use crate::inference::crd::GPU_IDS_ANNOTATION;

/// How long a bind this binder made is assumed while the cache has not caught up.
pub const ASSUME_TTL: Duration = Duration::from_secs(60);

/// What a pod holds on its node.
#[derive(Clone, Debug, PartialEq)]
enum Holding {
    /// GPUs known: from its `sluice.dev/gpu-ids`, or placed by this binder.
    Exact(PodAssignment),
    /// Bound by another scheduler (the device plugin chose): the lowest whole GPUs free
    /// when the allocation is recorded.
    LowestFree {
        node: String,
        gpus: u32,
        cpu_milli: u64,
        memory_mib: u64,
        mig: Option<MigDevices>,
    },
}

struct NodeEntry {
    rv: Option<String>,
    spec: NodeSpec,
    schedulable: bool,
    /// The last [`FleetIndex::sync_nodes`] that saw it.
    seen: u64,
}

struct PodEntry {
    rv: Option<String>,
    /// The allocation it belongs to.
    alloc: String,
    /// When this binder bound it, while the cache has not shown it bound.
    assumed: Option<Instant>,
    /// The last [`FleetIndex::sync_pods`] that saw it.
    seen: u64,
}

/// One allocation of the fleet: a gang, or one pod another scheduler bound.
#[derive(Default)]
struct Alloc {
    group: Option<String>,
    /// Bound by another scheduler: recorded before the gangs on a rebuild, as their GPUs
    /// are a guess the gangs' known GPUs must not collide with.
    other: bool,
    /// Pod uid and holding, in the order first seen (a placement's pod order).
    members: Vec<(String, Holding)>,
    /// Whether the fleet holds it now.
    recorded: bool,
}

/// The fleet, kept up to date from the Node and Pod objects.
pub struct FleetIndex {
    topology: TopologyConfig,
    nodes: BTreeMap<String, NodeEntry>,
    /// Pods holding resources on a node, or being bound by this binder, by uid.
    pods: HashMap<String, PodEntry>,
    allocs: BTreeMap<String, Alloc>,
    /// Allocations that did not fit when last recorded.
    unrecorded: BTreeSet<String>,
    fleet: Fleet,
    /// Whether `fleet` must be rebuilt from the index before its next use.
    stale: bool,
    node_sweep: u64,
    pod_sweep: u64,
}

impl FleetIndex {
    /// An empty index.
    pub fn new(topology: TopologyConfig) -> Self {
        Self {
            fleet: Fleet::new(topology.clone()),
            topology,
            nodes: BTreeMap::new(),
            pods: HashMap::new(),
            allocs: BTreeMap::new(),
            unrecorded: BTreeSet::new(),
            stale: false,
            node_sweep: 0,
            pod_sweep: 0,
        }
    }

    /// A Node was added or changed. Heartbeats change nothing; a cordon or readiness change
    /// only flips the node's schedulability; new capacity, labels or topology rebuild.
    pub fn apply_node(&mut self, node: &Node) {
        let Some(spec) = node_spec(node) else {
            return;
        };
        let rv = node.metadata.resource_version.clone();
        let seen = self.node_sweep;
        if let Some(e) = self.nodes.get_mut(&spec.name) {
            e.seen = seen;
            if rv.is_some() && e.rv == rv {
                return;
            }
            if e.spec == spec {
                e.rv = rv;
                let schedulable = node_schedulable(node);
                if e.schedulable != schedulable {
                    e.schedulable = schedulable;
                    if !self.stale {
                        // A node the fleet left out (a malformed one) has nothing to flip.
                        let _ = self.fleet.set_schedulable(&spec.name, schedulable);
                    }
                }
                return;
            }
        }
        self.nodes.insert(
            spec.name.clone(),
            NodeEntry {
                rv,
                schedulable: node_schedulable(node),
                spec,
                seen,
            },
        );
        self.stale = true;
    }

    /// A Node was deleted.
    pub fn delete_node(&mut self, name: &str) {
        if self.nodes.remove(name).is_some() {
            self.stale = true;
        }
    }

    /// A Pod was added or changed.
    pub fn apply_pod(&mut self, pod: &Pod) {
        let Some(uid) = pod.metadata.uid.as_deref() else {
            return;
        };
        let rv = &pod.metadata.resource_version;
        if let Some(e) = self.pods.get_mut(uid) {
            e.seen = self.pod_sweep;
            if rv.is_some() && e.rv == *rv {
                return;
            }
        }
        if !holds_resources(pod) {
            self.delete_pod(uid);
            return;
        }
        let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.clone()) else {
            // Unbound: only a bind of this binder in flight holds resources.
            match self.pods.get_mut(uid) {
                Some(e) if e.assumed.is_some() => e.rv = rv.clone(),
                Some(_) => self.delete_pod(uid),
                None => {}
            }
            return;
        };
        let (alloc, group, other) = if annotation(pod, GPU_IDS_ANNOTATION).is_some() {
            (gang_key(pod), spread_group(pod), false)
        } else {
            (format!("pod/{uid}"), None, true)
        };
        let holding = holding_of(pod, node);
        let unchanged = self.pods.get(uid).is_some_and(|e| e.alloc == alloc)
            && self.allocs.get(&alloc).is_some_and(|a| {
                a.group == group && a.members.iter().any(|m| m.0 == uid && m.1 == holding)
            });
        if unchanged {
            // The cache confirming a bind of this binder: the fleet has it already.
            let e = self.pods.get_mut(uid).expect("checked");
            e.rv = rv.clone();
            e.assumed = None;
            return;
        }
        self.delete_pod(uid);
        self.pods.insert(
            uid.to_string(),
            PodEntry {
                rv: rv.clone(),
                alloc: alloc.clone(),
                assumed: None,
                seen: self.pod_sweep,
            },
        );
        let a = self.allocs.entry(alloc.clone()).or_default();
        a.group = group;
        a.other = other;
        a.members.push((uid.to_string(), holding));
        self.rerecord(&alloc);
    }

    /// A Pod was deleted (or stopped holding resources).
    pub fn delete_pod(&mut self, uid: &str) {
        let Some(e) = self.pods.remove(uid) else {
            return;
        };
        if let Some(a) = self.allocs.get_mut(&e.alloc) {
            a.members.retain(|m| m.0 != uid);
        }
        self.rerecord(&e.alloc);
    }

    /// Apply every node of the cache and delete the ones it no longer has.
    pub fn sync_nodes(&mut self, nodes: &[Arc<Node>]) {
        self.node_sweep += 1;
        for n in nodes {
            self.apply_node(n);
        }
        let sweep = self.node_sweep;
        let gone: Vec<String> = self
            .nodes
            .iter()
            .filter(|(_, e)| e.seen != sweep)
            .map(|(name, _)| name.clone())
            .collect();
        for name in gone {
            self.delete_node(&name);
        }
    }

    /// Apply every pod of the cache, delete the ones it no longer has, and forget binds of
    /// this binder the cache has not shown within [`ASSUME_TTL`].
    pub fn sync_pods(&mut self, pods: &[Arc<Pod>], now: Instant) {
        self.pod_sweep += 1;
        for p in pods {
            self.apply_pod(p);
        }
        let sweep = self.pod_sweep;
        let gone: Vec<String> = self
            .pods
            .iter()
            .filter(|(_, e)| {
                e.seen != sweep
                    || e.assumed
                        .is_some_and(|at| now.duration_since(at) >= ASSUME_TTL)
            })
            .map(|(uid, _)| uid.clone())
            .collect();
        for uid in gone {
            self.delete_pod(&uid);
        }
    }

    /// Record a gang this binder placed and is binding now (`pods`: uid and assignment, in
    /// gang order). Nothing changes on error.
    pub fn assume(
        &mut self,
        id: &str,
        group: Option<&str>,
        pods: &[(String, PodAssignment)],
        now: Instant,
    ) -> Result<(), FleetError> {
        self.refresh();
        if self.allocs.get(id).is_some_and(|a| !a.members.is_empty()) {
            return Err(FleetError::DuplicateAllocation(id.to_string()));
        }
        let assignments: Vec<PodAssignment> = pods.iter().map(|p| p.1.clone()).collect();
        self.fleet.allocate(id, group, &assignments)?;
        for (uid, _) in pods {
            // A pod of the gang indexed before (it cannot be: pending pods hold nothing).
            self.delete_pod(uid);
            self.pods.insert(
                uid.clone(),
                PodEntry {
                    rv: None,
                    alloc: id.to_string(),
                    assumed: Some(now),
                    seen: self.pod_sweep,
                },
            );
        }
        self.allocs.insert(
            id.to_string(),
            Alloc {
                group: group.map(str::to_string),
                other: false,
                members: pods
                    .iter()
                    .map(|(uid, a)| (uid.clone(), Holding::Exact(a.clone())))
                    .collect(),
                recorded: true,
            },
        );
        Ok(())
    }

    /// Forget the binds of this binder in gang `id` (its bind failed and the gang was
    /// deleted); pods of it the cache shows bound stay until deleted.
    pub fn forget_assumed(&mut self, id: &str) {
        let assumed: Vec<String> = self
            .allocs
            .get(id)
            .into_iter()
            .flat_map(|a| a.members.iter().map(|m| m.0.clone()))
            .filter(|uid| self.pods.get(uid).is_some_and(|e| e.assumed.is_some()))
            .collect();
        for uid in assumed {
            self.delete_pod(&uid);
        }
    }

    /// Whether this binder is binding the pod now.
    pub fn is_assumed(&self, uid: &str) -> bool {
        self.pods.get(uid).is_some_and(|e| e.assumed.is_some())
    }

    /// Bring the fleet up to date; the time a rebuild took, if one was needed.
    pub fn refresh(&mut self) -> Option<Duration> {
        if !self.stale {
            return None;
        }
        let started = Instant::now();
        let mut fleet = Fleet::new(self.topology.clone());
        for (name, e) in &self.nodes {
            match fleet.add_node(e.spec.clone()) {
                Ok(()) if !e.schedulable => {
                    let _ = fleet.set_schedulable(name, false);
                }
                Ok(()) => {}
                Err(e) => tracing::debug!(node = %name, error = %e, "node left out of the fleet"),
            }
        }
        self.fleet = fleet;
        self.stale = false;
        self.unrecorded.clear();
        let mut ids: Vec<(bool, String)> = Vec::with_capacity(self.allocs.len());
        for (id, a) in &mut self.allocs {
            a.recorded = false;
            ids.push((!a.other, id.clone()));
        }
        ids.sort();
        for (_, id) in ids {
            self.record(&id);
        }
        Some(started.elapsed())
    }

    /// The fleet; call [`FleetIndex::refresh`] first.
    pub fn fleet(&self) -> &Fleet {
        debug_assert!(!self.stale, "refresh the index before reading its fleet");
        &self.fleet
    }

    /// Record allocation `id` again after its members changed (or drop it once empty).
    fn rerecord(&mut self, id: &str) {
        let Some(a) = self.allocs.get_mut(id) else {
            return;
        };
        let freed = a.recorded && !self.stale;
        if freed {
            let _ = self.fleet.release(id);
        }
        a.recorded = false;
        if a.members.is_empty() {
            self.allocs.remove(id);
            self.unrecorded.remove(id);
        } else if !self.stale {
            self.record(id);
        }
        if freed {
            // Released capacity may let an allocation that did not fit in.
            let retry: Vec<String> = self
                .unrecorded
                .iter()
                .filter(|u| *u != id)
                .cloned()
                .collect();
            for u in retry {
                self.record(&u);
            }
        }
    }

    /// Try to put allocation `id` (not in the fleet now) into the fleet.
    fn record(&mut self, id: &str) {
        let Some(a) = self.allocs.get_mut(id) else {
            return;
        };
        let pods: Vec<PodAssignment> = a
            .members
            .iter()
            .map(|m| resolve(&self.fleet, &m.1))
            .collect();
        match self.fleet.allocate(id, a.group.as_deref(), &pods) {
            Ok(()) => {
                a.recorded = true;
                self.unrecorded.remove(id);
            }
            Err(e) => {
                // A node that went away, or an over-committed node: left out for now.
                tracing::debug!(allocation = %id, error = %e, "existing pods not recorded");
                self.unrecorded.insert(id.to_string());
            }
        }
    }
}

/// What a bound pod holds on `node`.
fn holding_of(pod: &Pod, node: String) -> Holding {
    let (gpus, cpu_milli, memory_mib) = pod_usage(pod);
    let mig = pod_mig(pod).ok().flatten();
    match gpu_ids(pod) {
        Some(ids) => Holding::Exact(PodAssignment {
            node,
            milli_per_gpu: if ids.is_empty() { 0 } else { MILLI_PER_GPU },
            gpus: ids,
            cpu_milli,
            memory_mib,
            mig,
        }),
        None => Holding::LowestFree {
            node,
            gpus,
            cpu_milli,
            memory_mib,
            mig,
        },
    }
}

/// The assignment of a holding in the fleet as it is now.
fn resolve(fleet: &Fleet, h: &Holding) -> PodAssignment {
    match h {
        Holding::Exact(a) => a.clone(),
        Holding::LowestFree {
            node,
            gpus,
            cpu_milli,
            memory_mib,
            mig,
        } => {
            let ids: Vec<u32> = fleet
                .free_milli(node)
                .map(|f| {
                    f.iter()
                        .enumerate()
                        .filter(|(_, m)| **m >= MILLI_PER_GPU)
                        .map(|(i, _)| i as u32)
                        .take(*gpus as usize)
                        .collect()
                })
                .unwrap_or_default();
            PodAssignment {
                node: node.clone(),
                milli_per_gpu: if ids.is_empty() { 0 } else { MILLI_PER_GPU },
                gpus: ids,
                cpu_milli: *cpu_milli,
                memory_mib: *memory_mib,
                mig: mig.clone(),
            }
        }
    }
}

#[cfg(test)]
#[path = "fleet_index_tests.rs"]
mod tests;
