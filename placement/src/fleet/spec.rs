//! What the fleet is built from: node specs (GPUs, product, topology labels, MIG devices,
//! CPU and memory), the topology levels, and one pod's assignment.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

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
    pub mig: Option<MigDevices>,
}

/// MIG devices of one profile that a pod takes on a node with the `mixed` MIG strategy
/// (the pod's `nvidia.com/mig-<profile>` limit), e.g. `{"profile": "1g.5gb", "count": 1}`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MigDevices {
    /// Profile, as in the resource name after `nvidia.com/mig-` (`1g.5gb`, `3g.40gb`).
    pub profile: String,
    /// Devices of that profile.
    pub count: u32,
}
