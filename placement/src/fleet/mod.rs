//! The fleet model: nodes, their GPUs and GPU groups, topology domains and allocations.
//!
//! - [`spec`]: the inputs (node specs, topology levels, pod assignments) and label names;
//! - this file: the fleet's nodes and domains;
//! - [`levels`]: which domain of a topology level a node or a gang lies in;
//! - [`alloc`]: recording and releasing allocations, spread counts.

mod alloc;
mod levels;
pub(crate) mod spec;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::FleetError;
use crate::fx::FxMap;

pub use spec::{
    GPU_TOPOLOGY_ANNOTATION, GpuTopology, LABEL_GPU_CLIQUE, LABEL_GPU_COUNT, LABEL_GPU_MEMORY,
    LABEL_GPU_PRODUCT, LABEL_MIG_STRATEGY, LABEL_RACK, LABEL_ZONE, MAX_GPUS_PER_NODE,
    MIG_RESOURCE_PREFIX, MILLI_PER_GPU, NodeSpec, PodAssignment, TopologyConfig,
};

#[derive(Clone, Debug)]
pub(crate) struct Node {
    pub name: String,
    pub product: u16,
    pub gpu_mem_mib: u64,
    pub mig: bool,
    pub free: Vec<u32>,
    pub group_of: Vec<u8>,
    pub ngroups: u8,
    pub cpu_cap: u64,
    pub cpu_free: u64,
    pub mem_cap: u64,
    pub mem_free: u64,
    /// MIG devices (`mixed` strategy): (profile id, allocatable, free), by profile id.
    pub mig_devs: Vec<(u16, u32, u32)>,
    pub domains: Vec<u32>,
    pub state: u32,
    pub schedulable: bool,
    pub alive: bool,
}

impl Node {
    pub fn usable(&self) -> bool {
        self.alive && self.schedulable
    }

    /// (allocatable, free) MIG devices of a profile.
    pub fn mig_of(&self, profile: u16) -> (u32, u32) {
        self.mig_devs
            .iter()
            .find(|d| d.0 == profile)
            .map_or((0, 0), |d| (d.1, d.2))
    }
}

#[derive(Clone, Debug, Default)]
pub(crate) struct LevelDomains {
    pub names: Vec<String>,
    pub ids: HashMap<String, u32>,
    pub members: Vec<Vec<usize>>,
}

/// One pod of an allocation: node, GPU mask, milli per GPU, CPU, memory, MIG devices
/// (profile id, count).
type AllocPod = (usize, u64, u32, u64, u64, Option<(u16, u32)>);
/// Scratch copy of a node during [`Fleet::allocate`]: node, free milli per GPU, CPU,
/// memory, MIG devices.
type Scratch = (usize, Vec<u32>, u64, u64, Vec<(u16, u32, u32)>);

#[derive(Clone, Debug)]
struct AllocRecord {
    group: Option<String>,
    pods: Vec<AllocPod>,
    spread_keys: Vec<u32>, // domain per spread level (labels..., node)
}

static NEXT_UID: AtomicU64 = AtomicU64::new(1);

/// The fleet: nodes, their free capacity and the allocations on them.
///
/// A clone is a new fleet (it gets its own identity), so a [`crate::Placer`] that caches
/// per-fleet state never mixes up the original and the clone once they diverge.
#[derive(Debug)]
pub struct Fleet {
    pub(crate) uid: u64,
    pub(crate) version: u64,
    config: TopologyConfig,
    pub(crate) nodes: Vec<Node>,
    by_name: HashMap<String, usize>,
    pub(crate) products: Vec<String>,
    product_ids: HashMap<String, u16>,
    /// MIG profiles (`mixed` strategy) seen on any node, by id.
    pub(crate) mig_profiles: Vec<String>,
    mig_profile_ids: HashMap<String, u16>,
    pub(crate) domains: Vec<LevelDomains>,
    states: FxMap<Box<[u32]>, u32>,
    allocations: HashMap<String, AllocRecord>,
    /// group -> per spread level (label levels, then node) -> domain -> replicas.
    spread: HashMap<String, Vec<FxMap<u32, u32>>>,
}

impl Clone for Fleet {
    fn clone(&self) -> Self {
        Fleet {
            uid: NEXT_UID.fetch_add(1, Ordering::Relaxed),
            version: self.version,
            config: self.config.clone(),
            nodes: self.nodes.clone(),
            by_name: self.by_name.clone(),
            products: self.products.clone(),
            product_ids: self.product_ids.clone(),
            mig_profiles: self.mig_profiles.clone(),
            mig_profile_ids: self.mig_profile_ids.clone(),
            domains: self.domains.clone(),
            states: self.states.clone(),
            allocations: self.allocations.clone(),
            spread: self.spread.clone(),
        }
    }
}

impl Fleet {
    /// An empty fleet with these topology levels.
    pub fn new(config: TopologyConfig) -> Self {
        let levels = config.levels.len();
        Fleet {
            uid: NEXT_UID.fetch_add(1, Ordering::Relaxed),
            version: 0,
            config,
            nodes: Vec::new(),
            by_name: HashMap::new(),
            products: Vec::new(),
            product_ids: HashMap::new(),
            mig_profiles: Vec::new(),
            mig_profile_ids: HashMap::new(),
            domains: vec![LevelDomains::default(); levels],
            states: FxMap::default(),
            allocations: HashMap::new(),
            spread: HashMap::new(),
        }
    }

    /// Build a fleet from nodes.
    pub fn from_nodes(
        config: TopologyConfig,
        nodes: impl IntoIterator<Item = NodeSpec>,
    ) -> Result<Self, FleetError> {
        let mut fleet = Fleet::new(config);
        for n in nodes {
            fleet.add_node(n)?;
        }
        Ok(fleet)
    }

    /// The topology configuration.
    pub fn config(&self) -> &TopologyConfig {
        &self.config
    }

    /// Add a node (all its GPUs free).
    pub fn add_node(&mut self, spec: NodeSpec) -> Result<(), FleetError> {
        if self.by_name.contains_key(&spec.name) {
            return Err(FleetError::DuplicateNode(spec.name));
        }
        let bad = |msg: String| FleetError::BadNode {
            node: spec.name.clone(),
            msg,
        };
        let count = match spec.gpus {
            Some(n) => n as usize,
            None => match spec.labels.get(LABEL_GPU_COUNT) {
                Some(v) => v
                    .trim()
                    .parse::<usize>()
                    .map_err(|_| bad(format!("label {LABEL_GPU_COUNT}={v:?} is not a number")))?,
                None => 0,
            },
        };
        if count > MAX_GPUS_PER_NODE {
            return Err(bad(format!(
                "{count} GPUs, at most {MAX_GPUS_PER_NODE} per node are supported"
            )));
        }
        let gpu_mem_mib = match spec.labels.get(LABEL_GPU_MEMORY) {
            Some(v) => v
                .trim()
                .parse::<u64>()
                .map_err(|_| bad(format!("label {LABEL_GPU_MEMORY}={v:?} is not a number")))?,
            None => 0,
        };
        let product_name = spec
            .labels
            .get(LABEL_GPU_PRODUCT)
            .cloned()
            .unwrap_or_default();
        let mig = spec.labels.get(LABEL_MIG_STRATEGY).map(String::as_str) == Some("single")
            || product_name.contains("-MIG-");
        let topo = match spec.annotations.get(GPU_TOPOLOGY_ANNOTATION) {
            Some(v) => GpuTopology::parse(v)
                .map_err(|e| bad(format!("annotation {GPU_TOPOLOGY_ANNOTATION}: {e}")))?,
            None => GpuTopology::default(),
        };
        let group_of = topo
            .group_of(count)
            .map_err(|e| bad(format!("annotation {GPU_TOPOLOGY_ANNOTATION}: {e}")))?;
        let ngroups = group_of.iter().map(|&g| g + 1).max().unwrap_or(0);
        let mig_profiles = spec.mig_profiles().map_err(bad)?;
        let mut mig_devs = Vec::with_capacity(mig_profiles.len());
        for (profile, n) in mig_profiles {
            if n == 0 {
                continue;
            }
            let id = match self.mig_profile_ids.get(&profile) {
                Some(&id) => id,
                None => {
                    let id = self.mig_profiles.len() as u16;
                    self.mig_profiles.push(profile.clone());
                    self.mig_profile_ids.insert(profile, id);
                    id
                }
            };
            mig_devs.push((id, n, n));
        }
        mig_devs.sort_unstable();
        let product = match self.product_ids.get(&product_name) {
            Some(&id) => id,
            None => {
                let id = self.products.len() as u16;
                self.products.push(product_name.clone());
                self.product_ids.insert(product_name, id);
                id
            }
        };
        let idx = self.nodes.len();
        // Domains: a path of label values, so that levels nest. A node without a level's
        // label forms a domain of its own at that level and all finer ones.
        let mut domains = Vec::with_capacity(self.config.levels.len());
        let mut path = String::new();
        let mut missing = false;
        for (lvl, key) in self.config.levels.iter().enumerate() {
            match spec.labels.get(key) {
                Some(v) if !missing => {
                    if lvl > 0 {
                        path.push('/');
                    }
                    path.push_str(v);
                }
                _ => {
                    if !missing {
                        if lvl > 0 {
                            path.push('/');
                        }
                        path.push_str("node:");
                        path.push_str(&spec.name);
                        missing = true;
                    }
                }
            }
            let ld = &mut self.domains[lvl];
            let id = match ld.ids.get(&path) {
                Some(&id) => id,
                None => {
                    let id = ld.names.len() as u32;
                    ld.names.push(path.clone());
                    ld.ids.insert(path.clone(), id);
                    ld.members.push(Vec::new());
                    id
                }
            };
            ld.members[id as usize].push(idx);
            domains.push(id);
        }
        let node = Node {
            name: spec.name.clone(),
            product,
            gpu_mem_mib,
            mig,
            free: vec![MILLI_PER_GPU; count],
            group_of,
            ngroups,
            cpu_cap: spec.cpu_milli,
            cpu_free: spec.cpu_milli,
            mem_cap: spec.memory_mib,
            mem_free: spec.memory_mib,
            mig_devs,
            domains,
            state: 0,
            schedulable: true,
            alive: true,
        };
        self.nodes.push(node);
        self.by_name.insert(spec.name, idx);
        self.refresh_state(idx);
        self.version += 1;
        Ok(())
    }

    /// Remove a node (e.g. deleted or lost). Allocations on it are dropped; their ids are
    /// returned so the caller can place those replicas again.
    pub fn remove_node(&mut self, name: &str) -> Result<Vec<String>, FleetError> {
        let idx = self.index_of(name)?;
        let mut lost: Vec<String> = self
            .allocations
            .iter()
            .filter(|(_, r)| r.pods.iter().any(|p| p.0 == idx))
            .map(|(id, _)| id.clone())
            .collect();
        lost.sort();
        for id in &lost {
            self.release(id)?;
        }
        self.nodes[idx].alive = false;
        self.by_name.remove(name);
        self.version += 1;
        Ok(lost)
    }

    /// Mark a node (un)schedulable (cordon); its allocations stay.
    pub fn set_schedulable(&mut self, name: &str, schedulable: bool) -> Result<(), FleetError> {
        let idx = self.index_of(name)?;
        self.nodes[idx].schedulable = schedulable;
        self.version += 1;
        Ok(())
    }

    /// Number of live nodes.
    pub fn node_count(&self) -> usize {
        self.by_name.len()
    }

    /// Node names, in insertion order.
    pub fn node_names(&self) -> impl Iterator<Item = &str> {
        self.nodes
            .iter()
            .filter(|n| n.alive)
            .map(|n| n.name.as_str())
    }

    /// Free milli-GPU of each GPU of a node.
    pub fn free_milli(&self, node: &str) -> Result<&[u32], FleetError> {
        Ok(&self.nodes[self.index_of(node)?].free)
    }

    /// GPU group of each GPU of a node.
    pub fn gpu_groups(&self, node: &str) -> Result<&[u8], FleetError> {
        Ok(&self.nodes[self.index_of(node)?].group_of)
    }

    /// Total GPUs (devices) on live nodes.
    pub fn total_gpus(&self) -> u64 {
        self.nodes
            .iter()
            .filter(|n| n.alive)
            .map(|n| n.free.len() as u64)
            .sum()
    }

    /// Allocated milli-GPU on live nodes.
    pub fn allocated_milli(&self) -> u64 {
        self.nodes
            .iter()
            .filter(|n| n.alive)
            .flat_map(|n| n.free.iter())
            .map(|&f| u64::from(MILLI_PER_GPU - f))
            .sum()
    }

    pub(crate) fn level_index(&self, key: &str) -> Option<usize> {
        self.config.levels.iter().position(|l| l == key)
    }

    pub(crate) fn index_of(&self, name: &str) -> Result<usize, FleetError> {
        self.by_name
            .get(name)
            .copied()
            .ok_or_else(|| FleetError::UnknownNode(name.to_string()))
    }

    pub(crate) fn refresh_state(&mut self, idx: usize) {
        let n = &self.nodes[idx];
        let mut key: Vec<u32> = Vec::with_capacity(8 + n.free.len() * 2);
        key.push(u32::from(n.product));
        key.push(n.gpu_mem_mib as u32);
        key.push(u32::from(n.mig));
        key.push(n.cpu_free as u32);
        key.push((n.cpu_free >> 32) as u32);
        key.push(n.mem_free as u32);
        key.push((n.mem_free >> 32) as u32);
        key.push(n.free.len() as u32);
        key.extend(n.free.iter().copied());
        key.extend(n.group_of.iter().map(|&g| u32::from(g)));
        for &(id, _, free) in &n.mig_devs {
            key.push(u32::from(id));
            key.push(free);
        }
        let next = self.states.len() as u32;
        let id = *self.states.entry(key.into_boxed_slice()).or_insert(next);
        self.nodes[idx].state = id;
    }

    /// Free MIG devices of each profile on a node (`mixed` strategy).
    pub fn free_mig(&self, node: &str) -> Result<BTreeMap<String, u32>, FleetError> {
        let n = &self.nodes[self.index_of(node)?];
        Ok(n.mig_devs
            .iter()
            .map(|&(id, _, free)| (self.mig_profiles[id as usize].clone(), free))
            .collect())
    }

    pub(crate) fn mig_profile_id(&self, profile: &str) -> Option<u16> {
        self.mig_profile_ids.get(profile).copied()
    }

    pub(crate) fn product_id(&self, name: &str) -> Option<u16> {
        self.product_ids.get(name).copied()
    }
}
