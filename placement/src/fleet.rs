//! The fleet model: nodes, their GPUs and GPU groups, topology domains and allocations.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use crate::error::FleetError;
use crate::fx::FxMap;
use crate::request::TopologyLevel;

/// Capacity of one GPU (or one MIG device) in milli-GPU.
pub const MILLI_PER_GPU: u32 = 1000;
/// Most GPUs (devices) one node may expose.
pub const MAX_GPUS_PER_NODE: usize = 64;

/// Node annotation holding the GPU topology inside the node (see [`GpuTopology`]).
pub const GPU_TOPOLOGY_ANNOTATION: &str = "sluice.dev/gpu-topology";
/// GPU Feature Discovery: product name, e.g. `NVIDIA-H100-80GB-HBM3`.
pub const LABEL_GPU_PRODUCT: &str = "nvidia.com/gpu.product";
/// GPU Feature Discovery: number of GPUs (or MIG devices with the `single` strategy).
pub const LABEL_GPU_COUNT: &str = "nvidia.com/gpu.count";
/// GPU Feature Discovery: memory of one GPU in MiB.
pub const LABEL_GPU_MEMORY: &str = "nvidia.com/gpu.memory";
/// GPU Feature Discovery: NVLink clique (multi-node NVLink, e.g. GB200 NVL72).
pub const LABEL_GPU_CLIQUE: &str = "nvidia.com/gpu.clique";
/// GPU Feature Discovery: MIG strategy (`none`, `single`, `mixed`).
pub const LABEL_MIG_STRATEGY: &str = "nvidia.com/mig.strategy";
/// Resource name prefix of a MIG profile with the `mixed` strategy
/// (`nvidia.com/mig-1g.5gb`); GPU Feature Discovery also labels the node
/// `nvidia.com/mig-1g.5gb.count`.
pub const MIG_RESOURCE_PREFIX: &str = "nvidia.com/mig-";
/// Well-known zone label.
pub const LABEL_ZONE: &str = "topology.kubernetes.io/zone";
/// Sluice's rack/block label (any label key can be configured instead).
pub const LABEL_RACK: &str = "sluice.dev/rack";

/// Topology levels above the node, as node label keys, coarse to fine. The node and the GPU
/// group inside the node are always the two finest levels and need no configuration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopologyConfig {
    /// Label keys, coarse to fine, e.g. zone → rack → NVLink clique.
    pub levels: Vec<String>,
}

impl Default for TopologyConfig {
    fn default() -> Self {
        TopologyConfig {
            levels: vec![
                LABEL_ZONE.to_string(),
                LABEL_RACK.to_string(),
                LABEL_GPU_CLIQUE.to_string(),
            ],
        }
    }
}

impl TopologyConfig {
    /// Levels from label keys, coarse to fine.
    pub fn new<S: Into<String>>(levels: impl IntoIterator<Item = S>) -> Self {
        TopologyConfig {
            levels: levels.into_iter().map(Into::into).collect(),
        }
    }
}

/// The `sluice.dev/gpu-topology` annotation: GPU groups (NVLink/NVSwitch domains) and,
/// optionally, the NUMA node of each GPU. JSON, for example
/// `{"groups":[[0,1,2,3],[4,5,6,7]],"numa":[0,0,0,0,1,1,1,1]}`.
///
/// - `groups` must partition the GPU indices `0..count` (each index exactly once).
/// - Without `groups`, GPUs sharing a NUMA node form a group; without either, all GPUs of
///   the node form one group (fully connected, e.g. an NVSwitch HGX board).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuTopology {
    /// GPU indices of each NVLink/NVSwitch domain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub groups: Option<Vec<Vec<u32>>>,
    /// NUMA node of each GPU, by GPU index.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub numa: Option<Vec<u32>>,
}

impl GpuTopology {
    /// Parse the annotation value.
    pub fn parse(value: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(value)
    }

    /// Serialise to the annotation value.
    pub fn to_annotation(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Group index of each GPU, validated against the GPU count.
    pub fn group_of(&self, count: usize) -> Result<Vec<u8>, String> {
        if let Some(numa) = &self.numa
            && numa.len() != count
        {
            return Err(format!("numa lists {} GPUs, node has {count}", numa.len()));
        }
        let mut out = vec![u8::MAX; count];
        match (&self.groups, &self.numa) {
            (Some(groups), _) => {
                if groups.len() > 255 {
                    return Err("more than 255 groups".into());
                }
                for (g, members) in groups.iter().enumerate() {
                    if members.is_empty() {
                        return Err(format!("group {g} is empty"));
                    }
                    for &i in members {
                        let i = i as usize;
                        if i >= count {
                            return Err(format!("GPU index {i} out of range (node has {count})"));
                        }
                        if out[i] != u8::MAX {
                            return Err(format!("GPU index {i} is in two groups"));
                        }
                        out[i] = g as u8;
                    }
                }
                if let Some(i) = out.iter().position(|&g| g == u8::MAX) {
                    return Err(format!("GPU index {i} is in no group"));
                }
            }
            (None, Some(numa)) => {
                let mut ids: Vec<u32> = numa.clone();
                ids.sort_unstable();
                ids.dedup();
                for (i, n) in numa.iter().enumerate() {
                    out[i] = ids.binary_search(n).unwrap_or(0) as u8;
                }
            }
            (None, None) => out.iter_mut().for_each(|g| *g = 0),
        }
        Ok(out)
    }
}

/// A node as the controller sees it: labels and annotations as plain string maps plus
/// allocatable capacity.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeSpec {
    /// Node name (unique in the fleet).
    pub name: String,
    /// Node labels (GPU Feature Discovery labels, topology labels).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Node annotations (`sluice.dev/gpu-topology`).
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    /// Allocatable GPUs (`nvidia.com/gpu`); `None` reads the `nvidia.com/gpu.count` label.
    #[serde(default)]
    pub gpus: Option<u32>,
    /// Allocatable CPU in milli-cores (0: not modelled, never limits).
    #[serde(default)]
    pub cpu_milli: u64,
    /// Allocatable memory in MiB (0: not modelled, never limits).
    #[serde(default)]
    pub memory_mib: u64,
    /// MIG devices per profile with the `mixed` strategy (allocatable
    /// `nvidia.com/mig-<profile>`), e.g. `{"1g.5gb": 7}`. Empty on a node labelled
    /// `nvidia.com/mig.strategy=mixed`: read from the `nvidia.com/mig-<profile>.count`
    /// labels. Pods ask for them with [`crate::GangRequest::mig_devices`]; they are counted,
    /// not indexed (the device plugin picks the device).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub mig_devices: BTreeMap<String, u32>,
}

impl NodeSpec {
    /// A node with `gpus` GPUs of `product` and no other labels.
    pub fn new(name: impl Into<String>, product: &str, gpus: u32) -> Self {
        let mut labels = BTreeMap::new();
        labels.insert(LABEL_GPU_PRODUCT.to_string(), product.to_string());
        labels.insert(LABEL_GPU_COUNT.to_string(), gpus.to_string());
        NodeSpec {
            name: name.into(),
            labels,
            gpus: Some(gpus),
            ..Default::default()
        }
    }

    /// Add a label.
    pub fn label(mut self, key: &str, value: &str) -> Self {
        self.labels.insert(key.to_string(), value.to_string());
        self
    }

    /// Set the GPU topology annotation.
    pub fn topology(mut self, topo: &GpuTopology) -> Self {
        self.annotations
            .insert(GPU_TOPOLOGY_ANNOTATION.to_string(), topo.to_annotation());
        self
    }

    /// Add MIG devices of a profile (`mixed` strategy), e.g. `mig("1g.5gb", 7)`.
    pub fn mig(mut self, profile: &str, count: u32) -> Self {
        self.mig_devices.insert(profile.to_string(), count);
        self
    }

    /// MIG devices per profile: [`NodeSpec::mig_devices`], else, with
    /// `nvidia.com/mig.strategy=mixed`, the `nvidia.com/mig-<profile>.count` labels.
    pub fn mig_profiles(&self) -> Result<BTreeMap<String, u32>, String> {
        if !self.mig_devices.is_empty()
            || self.labels.get(LABEL_MIG_STRATEGY).map(String::as_str) != Some("mixed")
        {
            return Ok(self.mig_devices.clone());
        }
        let mut out = BTreeMap::new();
        for (k, v) in &self.labels {
            if let Some(profile) = k
                .strip_prefix(MIG_RESOURCE_PREFIX)
                .and_then(|r| r.strip_suffix(".count"))
            {
                let n = v
                    .trim()
                    .parse::<u32>()
                    .map_err(|_| format!("label {k}={v:?} is not a number"))?;
                out.insert(profile.to_string(), n);
            }
        }
        Ok(out)
    }

    /// Set allocatable CPU (milli-cores) and memory (MiB).
    pub fn resources(mut self, cpu_milli: u64, memory_mib: u64) -> Self {
        self.cpu_milli = cpu_milli;
        self.memory_mib = memory_mib;
        self
    }
}

/// One pod's share of a gang placement: the node and the GPU indices on it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodAssignment {
    /// Node name.
    pub node: String,
    /// GPU indices on the node (for the `sluice.dev/gpu-ids` pod annotation).
    pub gpus: Vec<u32>,
    /// Milli-GPU taken on each listed GPU (1000 for whole GPUs).
    pub milli_per_gpu: u32,
    /// CPU taken, milli-cores.
    pub cpu_milli: u64,
    /// Memory taken, MiB.
    pub memory_mib: u64,
    /// MIG devices taken (`mixed` strategy), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mig: Option<crate::request::MigDevices>,
}

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

    /// Name of the domain holding `node` at `level` (`None` for the GPU-group level, which
    /// depends on the GPUs, not only the node).
    pub fn domain_of(
        &self,
        node: &str,
        level: &TopologyLevel,
    ) -> Result<Option<String>, FleetError> {
        let idx = self.index_of(node)?;
        Ok(match level {
            TopologyLevel::Label(key) => {
                let lvl = self
                    .level_index(key)
                    .ok_or_else(|| FleetError::UnknownLevel(key.clone()))?;
                Some(self.domains[lvl].names[self.nodes[idx].domains[lvl] as usize].clone())
            }
            TopologyLevel::Node => Some(self.nodes[idx].name.clone()),
            TopologyLevel::GpuGroup => None,
        })
    }

    /// Whether all the pods of a gang lie inside one domain of `level`.
    pub fn within_one_domain(
        &self,
        pods: &[PodAssignment],
        level: &TopologyLevel,
    ) -> Result<bool, FleetError> {
        let Some(first) = pods.first() else {
            return Ok(true);
        };
        let f = self.index_of(&first.node)?;
        for p in pods {
            let i = self.index_of(&p.node)?;
            let same = match level {
                TopologyLevel::Label(key) => {
                    let lvl = self
                        .level_index(key)
                        .ok_or_else(|| FleetError::UnknownLevel(key.clone()))?;
                    self.nodes[i].domains[lvl] == self.nodes[f].domains[lvl]
                }
                TopologyLevel::Node => i == f,
                TopologyLevel::GpuGroup => {
                    let g0 = first
                        .gpus
                        .first()
                        .map(|&g| self.nodes[f].group_of[g as usize]);
                    i == f
                        && p.gpus
                            .iter()
                            .all(|&g| Some(self.nodes[i].group_of[g as usize]) == g0)
                }
            };
            if !same {
                return Ok(false);
            }
        }
        Ok(true)
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

    /// Record an allocation (an existing pod or gang, or a placement just chosen). Atomic:
    /// on error nothing changes. `group` names the owner (e.g. the InferenceSet) for spreading.
    pub fn allocate(
        &mut self,
        id: &str,
        group: Option<&str>,
        pods: &[PodAssignment],
    ) -> Result<(), FleetError> {
        if self.allocations.contains_key(id) {
            return Err(FleetError::DuplicateAllocation(id.to_string()));
        }
        let mut resolved = Vec::with_capacity(pods.len());
        // Validate against a scratch copy of the touched nodes' free capacity.
        let mut scratch: Vec<Scratch> = Vec::new();
        for p in pods {
            let idx = self.index_of(&p.node)?;
            if p.milli_per_gpu == 0 && !p.gpus.is_empty() || p.milli_per_gpu > MILLI_PER_GPU {
                return Err(FleetError::BadAssignment {
                    node: p.node.clone(),
                    msg: format!("milli_per_gpu {} out of range", p.milli_per_gpu),
                });
            }
            let node = &self.nodes[idx];
            let pos = match scratch.iter().position(|s| s.0 == idx) {
                Some(pos) => pos,
                None => {
                    scratch.push((
                        idx,
                        node.free.clone(),
                        node.cpu_free,
                        node.mem_free,
                        node.mig_devs.clone(),
                    ));
                    scratch.len() - 1
                }
            };
            let s = &mut scratch[pos];
            let mut mask = 0u64;
            for &g in &p.gpus {
                let g = g as usize;
                if g >= s.1.len() {
                    return Err(FleetError::BadAssignment {
                        node: p.node.clone(),
                        msg: format!("GPU index {g} out of range"),
                    });
                }
                if mask & (1 << g) != 0 {
                    return Err(FleetError::BadAssignment {
                        node: p.node.clone(),
                        msg: format!("GPU index {g} listed twice"),
                    });
                }
                mask |= 1 << g;
                if s.1[g] < p.milli_per_gpu {
                    return Err(FleetError::Overcommitted {
                        node: p.node.clone(),
                        what: format!("GPU {g}"),
                    });
                }
                s.1[g] -= p.milli_per_gpu;
            }
            if node.cpu_cap > 0 {
                s.2 =
                    s.2.checked_sub(p.cpu_milli)
                        .ok_or(FleetError::Overcommitted {
                            node: p.node.clone(),
                            what: "CPU".into(),
                        })?;
            }
            if node.mem_cap > 0 {
                s.3 =
                    s.3.checked_sub(p.memory_mib)
                        .ok_or(FleetError::Overcommitted {
                            node: p.node.clone(),
                            what: "memory".into(),
                        })?;
            }
            let mut mig = None;
            if let Some(m) = p.mig.as_ref().filter(|m| m.count > 0) {
                let slot = self
                    .mig_profile_ids
                    .get(&m.profile)
                    .and_then(|id| s.4.iter_mut().find(|d| d.0 == *id))
                    .filter(|d| d.2 >= m.count)
                    .ok_or_else(|| FleetError::Overcommitted {
                        node: p.node.clone(),
                        what: format!("MIG {}", m.profile),
                    })?;
                slot.2 -= m.count;
                mig = Some((slot.0, m.count));
            }
            resolved.push((idx, mask, p.milli_per_gpu, p.cpu_milli, p.memory_mib, mig));
        }
        for (idx, free, cpu, mem, mig) in scratch {
            let n = &mut self.nodes[idx];
            n.free = free;
            n.cpu_free = cpu;
            n.mem_free = mem;
            n.mig_devs = mig;
            self.refresh_state(idx);
        }
        let mut spread_keys = Vec::new();
        if let (Some(g), Some(&(first, ..))) = (group, resolved.first()) {
            let levels = self.config.levels.len();
            let per = self
                .spread
                .entry(g.to_string())
                .or_insert_with(|| vec![FxMap::default(); levels + 1]);
            for (lvl, counts) in per.iter_mut().enumerate() {
                let d = if lvl < levels {
                    self.nodes[first].domains[lvl]
                } else {
                    first as u32
                };
                *counts.entry(d).or_insert(0) += 1;
                spread_keys.push(d);
            }
        }
        self.allocations.insert(
            id.to_string(),
            AllocRecord {
                group: group.map(str::to_string),
                pods: resolved,
                spread_keys,
            },
        );
        self.version += 1;
        Ok(())
    }

    /// Release an allocation recorded with [`Fleet::allocate`].
    pub fn release(&mut self, id: &str) -> Result<(), FleetError> {
        let rec = self
            .allocations
            .remove(id)
            .ok_or_else(|| FleetError::UnknownAllocation(id.to_string()))?;
        for &(idx, mask, milli, cpu, mem, mig) in &rec.pods {
            let n = &mut self.nodes[idx];
            for (g, f) in n.free.iter_mut().enumerate() {
                if mask & (1 << g) != 0 {
                    *f = (*f + milli).min(MILLI_PER_GPU);
                }
            }
            if n.cpu_cap > 0 {
                n.cpu_free = (n.cpu_free + cpu).min(n.cpu_cap);
            }
            if n.mem_cap > 0 {
                n.mem_free = (n.mem_free + mem).min(n.mem_cap);
            }
            if let Some((id, count)) = mig
                && let Some(d) = n.mig_devs.iter_mut().find(|d| d.0 == id)
            {
                d.2 = (d.2 + count).min(d.1);
            }
            self.refresh_state(idx);
        }
        if let Some(g) = rec.group
            && let Some(per) = self.spread.get_mut(&g)
        {
            for (lvl, d) in rec.spread_keys.iter().enumerate() {
                if let Some(c) = per[lvl].get_mut(d) {
                    *c = c.saturating_sub(1);
                }
            }
        }
        self.version += 1;
        Ok(())
    }

    /// Ids of the recorded allocations, sorted.
    pub fn allocation_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.allocations.keys().cloned().collect();
        ids.sort();
        ids
    }

    pub(crate) fn spread_count(&self, group: &str, lvl: usize, domain: u32) -> u32 {
        self.spread
            .get(group)
            .and_then(|per| per.get(lvl))
            .and_then(|m| m.get(&domain))
            .copied()
            .unwrap_or(0)
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
