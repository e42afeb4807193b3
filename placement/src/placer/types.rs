//! The placer's internal vocabulary: a request resolved against the fleet, the context
//! of one decision, the keys of its caches, and the node view the scoring reads.

use crate::fleet::Node;
use crate::profile::View;
use crate::request::{GpuDemand, MigSelector};

#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct Choice {
    pub(super) score: f64,
    pub(super) mask: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum GMode {
    Any,
    SingleGroup,
    Exactly(u8),
}

impl GMode {
    pub(super) fn code(self) -> u64 {
        match self {
            GMode::Any => 0,
            GMode::SingleGroup => 1,
            GMode::Exactly(g) => 2 + u64::from(g),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Lvl {
    Label(usize),
    Node,
    Group,
}

pub(super) struct Rq {
    pub(super) pods: u32,
    pub(super) demand: GpuDemand,
    pub(super) cpu: u64,
    pub(super) mem: u64,
    pub(super) allowed: Option<Vec<bool>>,
    pub(super) min_mem: u64,
    pub(super) mig: MigSelector,
    /// MIG devices per pod (`mixed` strategy): profile id in the fleet, count.
    pub(super) mig_devs: Option<(u16, u32)>,
    pub(super) required: Option<Lvl>,
    pub(super) preferred: Option<Lvl>,
    pub(super) spread: Option<(usize, String, Option<u32>)>,
    pub(super) key: u64,
}

#[derive(Default)]
pub(super) struct DomAgg {
    pub(super) level: usize,
    pub(super) per_pod: u32,
    pub(super) pods: u32,
    pub(super) w: f64,
    pub(super) allowed: Option<Vec<bool>>,
    pub(super) min_mem: u64,
    pub(super) cap: Vec<u32>,
    pub(super) free: Vec<u64>,
}

#[derive(Default)]
pub(super) struct Ctx {
    pub(super) doms: Vec<DomAgg>,
    pub(super) fine: Option<usize>,
    pub(super) fine_free: Vec<u64>,
    pub(super) fine_cap: Vec<u64>,
    pub(super) spread_min: u32,
    pub(super) decision: u64,
}

/// A cached greedy pass over one domain: valid while the domain's signature holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) struct GreedyKey {
    pub(super) lvl: u32,
    pub(super) dom: u32,
    pub(super) shape: u64,
    pub(super) pods: u32,
    pub(super) gmode: u64,
}

/// Entries of the greedy cache kept at most (it is cleared when it grows past this).
pub(super) const GREEDY_CACHE_MAX: usize = 1 << 20;

/// Scratch state of nodes touched by a gang being placed: node, free milli per GPU, CPU,
/// memory, free MIG devices of the requested profile (`mixed` strategy).
pub(super) type Overlay = Vec<(usize, Vec<u32>, u64, u64, u32)>;
/// (total score, first pod's score, per pod: node index and GPU mask).
pub(super) type Greedy = (f64, f64, Vec<(usize, u64)>);

pub(super) fn view_of(n: &Node) -> View<'_> {
    View {
        product: n.product,
        gpu_mem: n.gpu_mem_mib,
        mig: n.mig,
        free: &n.free,
        group_of: &n.group_of,
        ngroups: n.ngroups,
        cpu_cap: n.cpu_cap,
        cpu_free: n.cpu_free,
        mem_cap: n.mem_cap,
        mem_free: n.mem_free,
    }
}

pub(super) fn mask_iter(mut mask: u64) -> impl Iterator<Item = usize> {
    std::iter::from_fn(move || {
        if mask == 0 {
            return None;
        }
        let i = mask.trailing_zeros() as usize;
        mask &= mask - 1;
        Some(i)
    })
}
