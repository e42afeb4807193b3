//! Gang requests and placements.

use serde::{Deserialize, Serialize};

pub use crate::fleet::spec::MigDevices;
use crate::fleet::spec::{MILLI_PER_GPU, PodAssignment};

/// What one pod asks of GPUs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum GpuDemand {
    /// No GPU (CPU-only pod; it still takes CPU and memory).
    None,
    /// Whole GPUs (devices): `Whole(4)` is four free GPUs.
    Whole(u32),
    /// A share of one GPU in milli-GPU, `1..=999` (a GPU-sharing pod, or a MIG-sized slice
    /// when MIG is modelled as shares).
    Milli(u32),
}

impl GpuDemand {
    /// Milli-GPU this demand takes in total.
    pub fn total_milli(self) -> u64 {
        match self {
            GpuDemand::None => 0,
            GpuDemand::Whole(g) => u64::from(g) * u64::from(MILLI_PER_GPU),
            GpuDemand::Milli(m) => u64::from(m),
        }
    }

    /// `Milli(1000)` is `Whole(1)`; `Whole(0)` and `Milli(0)` are `None`.
    pub fn normalized(self) -> Self {
        match self {
            GpuDemand::Whole(0) | GpuDemand::Milli(0) => GpuDemand::None,
            GpuDemand::Milli(m) if m >= MILLI_PER_GPU => GpuDemand::Whole(1),
            d => d,
        }
    }

    pub(crate) fn describe(self) -> String {
        match self {
            GpuDemand::None => "no GPU".into(),
            GpuDemand::Whole(g) => format!("{g} GPU"),
            GpuDemand::Milli(m) => format!("{m} milli-GPU"),
        }
    }
}

/// MIG devices: allowed, excluded or required.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum MigSelector {
    /// Any node.
    #[default]
    Any,
    /// Only nodes without MIG devices.
    Exclude,
    /// Only nodes exposing MIG devices (`nvidia.com/mig.strategy=single`); pick the profile
    /// with [`GpuSelector::products`] (the product label carries it, e.g.
    /// `NVIDIA-A100-SXM4-40GB-MIG-1g.5gb`).
    Only,
}

/// Which GPUs a pod may use.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GpuSelector {
    /// Allowed `nvidia.com/gpu.product` values; empty allows any.
    #[serde(default)]
    pub products: Vec<String>,
    /// Minimum `nvidia.com/gpu.memory` (MiB per GPU); 0: any.
    #[serde(default)]
    pub min_memory_mib: u64,
    /// MIG devices.
    #[serde(default)]
    pub mig: MigSelector,
}

impl GpuSelector {
    pub(crate) fn describe(&self) -> String {
        let mut parts = Vec::new();
        if self.products.is_empty() {
            parts.push("any product".to_string());
        } else {
            parts.push(format!("product in [{}]", self.products.join(", ")));
        }
        if self.min_memory_mib > 0 {
            parts.push(format!("memory >= {} MiB", self.min_memory_mib));
        }
        match self.mig {
            MigSelector::Any => {}
            MigSelector::Exclude => parts.push("no MIG".into()),
            MigSelector::Only => parts.push("MIG only".into()),
        }
        parts.join(", ")
    }
}

/// A topology level: a configured label level, the node, or a GPU group inside the node.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum TopologyLevel {
    /// A label level configured in [`crate::TopologyConfig`], by its label key.
    Label(String),
    /// One node.
    Node,
    /// One GPU group (NVLink/NVSwitch domain or NUMA node) of one node.
    GpuGroup,
}

impl TopologyLevel {
    /// A label level.
    pub fn label(key: &str) -> Self {
        TopologyLevel::Label(key.to_string())
    }
}

impl std::fmt::Display for TopologyLevel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TopologyLevel::Label(k) => write!(f, "{k}"),
            TopologyLevel::Node => write!(f, "node"),
            TopologyLevel::GpuGroup => write!(f, "gpu-group"),
        }
    }
}

/// Spread replicas of one owner across the domains of a (failure-domain) level.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Spread {
    /// The failure-domain level (a label level or the node; not the GPU group).
    pub level: TopologyLevel,
    /// Owner whose replicas are spread (the `group` passed to [`crate::Fleet::allocate`]).
    pub group: String,
    /// Hard limit: a domain may hold at most `max_skew` more replicas than the emptiest
    /// eligible domain. `None`: spreading is only preferred.
    #[serde(default)]
    pub max_skew: Option<u32>,
    /// Replicas of the owner in the emptiest eligible domain, when the caller knows it
    /// better than the fleet does: a binder that hides eligible but less preferred nodes
    /// (cordons them for a first attempt) keeps `max_skew` measured against every eligible
    /// domain this way ([`crate::Placer::spread_floor`]). `None`: from the fleet's
    /// schedulable nodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub floor: Option<u32>,
}

/// One replica: a gang of `pods` pods that are placed all together or not at all.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GangRequest {
    /// Pods in the gang (>= 1).
    pub pods: u32,
    /// GPUs of each pod.
    pub gpu: GpuDemand,
    /// CPU of each pod, milli-cores.
    #[serde(default)]
    pub cpu_milli: u64,
    /// Memory of each pod, MiB.
    #[serde(default)]
    pub memory_mib: u64,
    /// Which GPUs.
    #[serde(default)]
    pub selector: GpuSelector,
    /// All of the gang's GPUs must lie inside one domain of this level.
    #[serde(default)]
    pub required: Option<TopologyLevel>,
    /// The gang should lie inside one domain of this level (finer than `required`).
    #[serde(default)]
    pub preferred: Option<TopologyLevel>,
    /// Spread this owner's replicas across a failure-domain level.
    #[serde(default)]
    pub spread: Option<Spread>,
    /// MIG devices of one profile per pod (`mixed` strategy): only nodes offering that
    /// many free devices of the profile qualify. Usually with `gpu: None`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mig_devices: Option<MigDevices>,
}

impl GangRequest {
    /// A gang of `pods` pods with `gpus_per_pod` whole GPUs each.
    pub fn gpus(pods: u32, gpus_per_pod: u32) -> Self {
        GangRequest {
            pods,
            gpu: GpuDemand::Whole(gpus_per_pod),
            cpu_milli: 0,
            memory_mib: 0,
            selector: GpuSelector::default(),
            required: None,
            preferred: None,
            spread: None,
            mig_devices: None,
        }
    }

    /// One pod with `count` MIG devices of `profile` (`mixed` strategy) and no whole GPU.
    pub fn mig(profile: &str, count: u32) -> Self {
        GangRequest {
            gpu: GpuDemand::None,
            mig_devices: Some(MigDevices {
                profile: profile.to_string(),
                count,
            }),
            ..GangRequest::gpus(1, 0)
        }
    }

    /// One pod with a share of one GPU, in milli-GPU.
    pub fn share(milli: u32) -> Self {
        GangRequest {
            gpu: GpuDemand::Milli(milli),
            ..GangRequest::gpus(1, 0)
        }
    }

    /// Require the whole gang inside one domain of `level`.
    pub fn required(mut self, level: TopologyLevel) -> Self {
        self.required = Some(level);
        self
    }

    /// Prefer the whole gang inside one domain of `level`.
    pub fn preferred(mut self, level: TopologyLevel) -> Self {
        self.preferred = Some(level);
        self
    }

    /// Restrict to GPU products.
    pub fn products<S: Into<String>>(mut self, products: impl IntoIterator<Item = S>) -> Self {
        self.selector.products = products.into_iter().map(Into::into).collect();
        self
    }

    /// Require at least this much memory per GPU (MiB).
    pub fn min_memory_mib(mut self, mib: u64) -> Self {
        self.selector.min_memory_mib = mib;
        self
    }

    /// CPU (milli-cores) and memory (MiB) of each pod.
    pub fn resources(mut self, cpu_milli: u64, memory_mib: u64) -> Self {
        self.cpu_milli = cpu_milli;
        self.memory_mib = memory_mib;
        self
    }

    /// Spread replicas of `group` across `level`.
    pub fn spread(mut self, level: TopologyLevel, group: &str, max_skew: Option<u32>) -> Self {
        self.spread = Some(Spread {
            level,
            group: group.to_string(),
            max_skew,
            floor: None,
        });
        self
    }

    /// GPUs (milli) the whole gang takes.
    pub fn total_milli(&self) -> u64 {
        self.gpu.normalized().total_milli() * u64::from(self.pods)
    }
}

/// The result of placing a gang: one assignment per pod, in pod order.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GangPlacement {
    /// Per pod: node and GPU indices.
    pub pods: Vec<PodAssignment>,
    /// The domain of the required level holding the gang, when one was required.
    pub required_domain: Option<String>,
    /// Whether the gang lies inside one domain of the preferred level.
    pub preferred_satisfied: bool,
    /// The policy's score of this placement (lower is better; for Sluice and FGD the
    /// increase of fragmentation, in GPUs).
    pub score: f64,
}
