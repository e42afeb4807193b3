//! The target workload and the fragmentation measure (after FGD, Weng et al., ATC '23).
//!
//! The fragmentation of a node relative to one task type `m` is the free GPU capacity on
//! the node that `m` cannot use: all of it when `m` cannot run on the node at all (wrong
//! product, too little CPU/memory/GPU), otherwise the free capacity of the GPUs that are
//! too small for `m` (a GPU with less free than `min(demand, 1 GPU)`). Relative to a
//! workload `M` (task types with popularity `p_m`) it is `F_n(M) = sum_m p_m F_n(m)`.
//! Sluice extends it with topology: a type whose pods must sit in one GPU group also
//! counts the whole free GPUs of groups too small for it, and a multi-node type that must
//! sit in one domain (e.g. an NVLink clique) counts the free GPUs of a domain that cannot
//! hold the whole gang any more.

use serde::{Deserialize, Serialize};

use crate::fleet::{Fleet, MILLI_PER_GPU};
use crate::request::{GangRequest, GpuDemand, MigSelector, TopologyLevel};

/// The target workload: request shapes with their popularity (any positive weights; they
/// are normalised). The placer keeps the fleet unfragmented *for this workload*.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct WorkloadProfile {
    /// Shapes and weights.
    pub entries: Vec<(GangRequest, f64)>,
}

impl WorkloadProfile {
    /// An empty profile (the placer then falls back to [`WorkloadProfile::inference_default`]).
    pub fn new() -> Self {
        Self::default()
    }

    /// Add a shape with a weight (e.g. how many replicas of it run or are expected).
    pub fn add(&mut self, req: GangRequest, weight: f64) -> &mut Self {
        if weight > 0.0 && weight.is_finite() {
            self.entries.push((req, weight));
        }
        self
    }

    /// Count identical shapes (spread ignored) from a list of requests.
    pub fn from_requests<'a>(reqs: impl IntoIterator<Item = &'a GangRequest>) -> Self {
        let mut counts: std::collections::HashMap<GangRequest, f64> = Default::default();
        let mut order = Vec::new();
        for r in reqs {
            let mut r = r.clone();
            r.spread = None;
            let c = counts.entry(r.clone()).or_insert_with(|| {
                order.push(r);
                0.0
            });
            *c += 1.0;
        }
        WorkloadProfile {
            entries: order
                .into_iter()
                .map(|r| {
                    let w = counts[&r];
                    (r, w)
                })
                .collect(),
        }
    }

    /// A generic LLM-inference mix: replicas of tensor-parallel size 1, 2, 4 and 8, the
    /// multi-GPU ones inside one GPU group or node.
    pub fn inference_default() -> Self {
        let mut p = WorkloadProfile::new();
        p.add(GangRequest::gpus(1, 1), 4.0);
        p.add(
            GangRequest::gpus(1, 2).required(TopologyLevel::GpuGroup),
            3.0,
        );
        p.add(
            GangRequest::gpus(1, 4).required(TopologyLevel::GpuGroup),
            2.0,
        );
        p.add(GangRequest::gpus(1, 8).required(TopologyLevel::Node), 1.0);
        p
    }
}

#[derive(Clone, Debug)]
pub(crate) struct Member {
    pub cpu: u64,
    pub mem: u64,
    pub w: f64,
}

#[derive(Clone, Debug)]
pub(crate) struct GpuClass {
    pub demand: GpuDemand,
    pub allowed: Option<Vec<bool>>,
    pub min_mem: u64,
    pub mig: MigSelector,
    pub group_required: bool,
    pub members: Vec<Member>,
    pub wsum: f64,
}

#[derive(Clone, Debug)]
pub(crate) struct DomainType {
    pub level: usize,
    pub per_pod: u32,
    pub pods: u32,
    pub allowed: Option<Vec<bool>>,
    pub min_mem: u64,
    pub w: f64,
}

#[derive(Clone, Debug, Default)]
pub(crate) struct Compiled {
    pub fleet_uid: u64,
    pub products: usize,
    pub classes: Vec<GpuClass>,
    pub domain_types: Vec<DomainType>,
}

/// A node's state as the measure sees it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct View<'a> {
    pub product: u16,
    pub gpu_mem: u64,
    pub mig: bool,
    pub free: &'a [u32],
    pub group_of: &'a [u8],
    pub ngroups: u8,
    pub cpu_cap: u64,
    pub cpu_free: u64,
    pub mem_cap: u64,
    pub mem_free: u64,
}

pub(crate) fn product_ok(
    allowed: &Option<Vec<bool>>,
    min_mem: u64,
    mig: MigSelector,
    v: &View,
) -> bool {
    if let Some(a) = allowed
        && !a.get(v.product as usize).copied().unwrap_or(false)
    {
        return false;
    }
    if v.gpu_mem < min_mem {
        return false;
    }
    match mig {
        MigSelector::Any => true,
        MigSelector::Exclude => !v.mig,
        MigSelector::Only => v.mig,
    }
}

pub(crate) fn allowed_products(fleet: &Fleet, products: &[String]) -> Option<Vec<bool>> {
    if products.is_empty() {
        return None;
    }
    let mut a = vec![false; fleet.products.len()];
    for p in products {
        if let Some(id) = fleet.product_id(p) {
            a[id as usize] = true;
        }
    }
    Some(a)
}

/// Whole free GPUs per group and in total.
pub(crate) fn whole_counts(v: &View, groups: &mut [u8; 64]) -> u32 {
    let mut total = 0;
    groups[..v.ngroups as usize].iter_mut().for_each(|g| *g = 0);
    for (i, &f) in v.free.iter().enumerate() {
        if f == MILLI_PER_GPU {
            groups[v.group_of[i] as usize] += 1;
            total += 1;
        }
    }
    total
}

/// How many pods of `per_pod` whole GPUs fit on the node (group-blind).
pub(crate) fn pods_fit(v: &View, per_pod: u32) -> u32 {
    let whole = v.free.iter().filter(|&&f| f == MILLI_PER_GPU).count() as u32;
    whole.checked_div(per_pod).unwrap_or(0)
}

impl Compiled {
    pub fn build(fleet: &Fleet, profile: &WorkloadProfile, topology_aware: bool) -> Self {
        let default;
        let profile = if profile.entries.is_empty() {
            default = WorkloadProfile::inference_default();
            &default
        } else {
            profile
        };
        let total: f64 = profile
            .entries
            .iter()
            .map(|(r, w)| {
                if topology_aware {
                    *w
                } else {
                    *w * f64::from(r.pods.max(1))
                }
            })
            .sum();
        let mut classes: Vec<GpuClass> = Vec::new();
        let mut domain_types = Vec::new();
        for (r, w) in &profile.entries {
            let demand = r.gpu.normalized();
            let pods = r.pods.max(1);
            let allowed = allowed_products(fleet, &r.selector.products);
            let (mut demand_c, mut cpu, mut mem, mut weight) =
                (demand, r.cpu_milli, r.memory_mib, *w);
            let mut group_required = false;
            if topology_aware {
                let same_node = matches!(
                    r.required,
                    Some(TopologyLevel::Node | TopologyLevel::GpuGroup)
                );
                if pods > 1 && same_node {
                    if let GpuDemand::Whole(g) = demand {
                        demand_c = GpuDemand::Whole(g * pods);
                    }
                    cpu *= u64::from(pods);
                    mem *= u64::from(pods);
                }
                group_required = r.required == Some(TopologyLevel::GpuGroup);
                if pods > 1
                    && let Some(TopologyLevel::Label(key)) = &r.required
                    && let (Some(level), GpuDemand::Whole(g)) = (fleet.level_index(key), demand)
                {
                    domain_types.push(DomainType {
                        level,
                        per_pod: g,
                        pods,
                        allowed: allowed.clone(),
                        min_mem: r.selector.min_memory_mib,
                        w: *w / total,
                    });
                }
            } else {
                weight *= f64::from(pods);
            }
            let w = weight / total;
            let member = Member { cpu, mem, w };
            match classes.iter_mut().find(|c| {
                c.demand == demand_c
                    && c.allowed == allowed
                    && c.min_mem == r.selector.min_memory_mib
                    && c.mig == r.selector.mig
                    && c.group_required == group_required
            }) {
                Some(c) => {
                    c.members.push(member);
                    c.wsum += w;
                }
                None => classes.push(GpuClass {
                    demand: demand_c,
                    allowed,
                    min_mem: r.selector.min_memory_mib,
                    mig: r.selector.mig,
                    group_required,
                    members: vec![member],
                    wsum: w,
                }),
            }
        }
        Compiled {
            fleet_uid: fleet.uid,
            products: fleet.products.len(),
            classes,
            domain_types,
        }
    }

    /// `F_n(M)` in milli-GPU.
    pub fn frag(&self, v: &View) -> f64 {
        let mut total: u64 = 0;
        let mut partial: u64 = 0;
        let mut max_free = 0;
        for &f in v.free {
            total += u64::from(f);
            if f < MILLI_PER_GPU {
                partial += u64::from(f);
            }
            max_free = max_free.max(f);
        }
        if total == 0 {
            return 0.0;
        }
        let mut groups = [0u8; 64];
        let whole = whole_counts(v, &mut groups);
        let mut out = 0.0;
        for c in &self.classes {
            if !product_ok(&c.allowed, c.min_mem, c.mig, v) {
                out += c.wsum * total as f64;
                continue;
            }
            let (fits, frag) = match c.demand {
                GpuDemand::None => (true, 0u64),
                GpuDemand::Milli(d) => (
                    max_free >= d,
                    v.free
                        .iter()
                        .filter(|&&f| f < d)
                        .map(|&f| u64::from(f))
                        .sum(),
                ),
                GpuDemand::Whole(g) => {
                    if c.group_required {
                        let mut fits = false;
                        let mut frag = partial;
                        for &gw in &groups[..v.ngroups as usize] {
                            if u32::from(gw) >= g {
                                fits = true;
                            } else {
                                frag += u64::from(gw) * u64::from(MILLI_PER_GPU);
                            }
                        }
                        (fits, frag)
                    } else {
                        (whole >= g, partial)
                    }
                }
            };
            if !fits {
                out += c.wsum * total as f64;
                continue;
            }
            let mut run = 0.0;
            for m in &c.members {
                if (v.cpu_cap == 0 || m.cpu <= v.cpu_free)
                    && (v.mem_cap == 0 || m.mem <= v.mem_free)
                {
                    run += m.w;
                }
            }
            out += run * frag as f64 + (c.wsum - run) * total as f64;
        }
        out
    }
}
