//! The placer: Sluice's policy and the baselines, in one gang-placement harness.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::error::{FleetError, PlaceError};
use crate::fleet::{Fleet, MILLI_PER_GPU, Node, PodAssignment};
use crate::fx::{FxMap, splitmix64};
use crate::profile::{
    Compiled, View, WorkloadProfile, allowed_products, pods_fit, product_ok, whole_counts,
};
use crate::request::{GangPlacement, GangRequest, GpuDemand, MigSelector, TopologyLevel};

/// A placement policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Policy {
    /// Sluice: topology-aware fragmentation gradient descent with gang domains, preferred
    /// levels, spreading and packing tie-breaks.
    Sluice,
    /// FGD as in the paper: minimise the increase of node fragmentation relative to the
    /// workload; topology-blind (required domains are still honoured by the harness).
    Fgd,
    /// First node (in fleet order) that fits, lowest GPU indices.
    FirstFit,
    /// Node with the least remaining GPU and CPU after placement; tightest GPU.
    BestFit,
    /// GPU packing: shares onto GPUs already in use, then the most-allocated node.
    Packing,
    /// Uniformly random feasible node and GPUs (seeded, deterministic).
    Random {
        /// Seed.
        seed: u64,
    },
}

impl Policy {
    /// Short name.
    pub fn name(&self) -> &'static str {
        match self {
            Policy::Sluice => "sluice",
            Policy::Fgd => "fgd",
            Policy::FirstFit => "first-fit",
            Policy::BestFit => "best-fit",
            Policy::Packing => "packing",
            Policy::Random { .. } => "random",
        }
    }
}

/// Tunables of Sluice's scoring.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PlacerConfig {
    /// Penalty, in GPUs of fragmentation, per replica of the same owner already in the
    /// candidate's spread domain.
    pub spread_weight: f64,
    /// Weight of the domain-level (multi-node gang) fragmentation term.
    pub domain_weight: f64,
}

impl Default for PlacerConfig {
    fn default() -> Self {
        PlacerConfig {
            spread_weight: 4.0,
            domain_weight: 1.0,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
struct Choice {
    score: f64,
    mask: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum GMode {
    Any,
    SingleGroup,
    Exactly(u8),
}

impl GMode {
    fn code(self) -> u64 {
        match self {
            GMode::Any => 0,
            GMode::SingleGroup => 1,
            GMode::Exactly(g) => 2 + u64::from(g),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Lvl {
    Label(usize),
    Node,
    Group,
}

struct Rq {
    pods: u32,
    demand: GpuDemand,
    cpu: u64,
    mem: u64,
    allowed: Option<Vec<bool>>,
    min_mem: u64,
    mig: MigSelector,
    /// MIG devices per pod (`mixed` strategy): profile id in the fleet, count.
    mig_devs: Option<(u16, u32)>,
    required: Option<Lvl>,
    preferred: Option<Lvl>,
    spread: Option<(usize, String, Option<u32>)>,
    key: u64,
}

#[derive(Default)]
struct DomAgg {
    level: usize,
    per_pod: u32,
    pods: u32,
    w: f64,
    allowed: Option<Vec<bool>>,
    min_mem: u64,
    cap: Vec<u32>,
    free: Vec<u64>,
}

#[derive(Default)]
struct Ctx {
    doms: Vec<DomAgg>,
    fine: Option<usize>,
    fine_free: Vec<u64>,
    fine_cap: Vec<u64>,
    spread_min: u32,
    decision: u64,
}

/// Incrementally maintained per-fleet state: Sluice's domain aggregates (the context of a
/// decision), change epochs per domain and an index of whole free GPUs per domain and
/// product. Updated at the start of each decision from the nodes whose state changed since
/// the previous one (a scan of one integer per node), instead of being rebuilt.
#[derive(Default)]
struct Index {
    built: bool,
    fleet_uid: u64,
    generation: u64,
    /// Per node: what is counted (0: nothing; otherwise the interned state + 1 of a usable
    /// node).
    seen: Vec<u64>,
    /// Per node: free milli-GPU counted.
    free: Vec<u64>,
    /// Per node: whole free GPUs counted.
    whole: Vec<u32>,
    /// Per node × domain type: pods of that type counted.
    fit: Vec<u32>,
    /// Per node: when it last changed (`clock`).
    node_epoch: Vec<u64>,
    /// Per label level, per domain: when a member last changed.
    epoch: Vec<Vec<u64>>,
    clock: u64,
    nprod: usize,
    /// Per label level: whole free GPUs per (domain × products + product).
    whole_by: Vec<Vec<u32>>,
    /// Sluice's aggregates (domain types, finest label level).
    ctx: Ctx,
}

/// A cached greedy pass over one domain: valid while the domain's signature holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct GreedyKey {
    lvl: u32,
    dom: u32,
    shape: u64,
    pods: u32,
    gmode: u64,
}

/// Entries of the greedy cache kept at most (it is cleared when it grows past this).
const GREEDY_CACHE_MAX: usize = 1 << 20;

/// Scratch state of nodes touched by a gang being placed: node, free milli per GPU, CPU,
/// memory, free MIG devices of the requested profile (`mixed` strategy).
type Overlay = Vec<(usize, Vec<u32>, u64, u64, u32)>;
/// (total score, first pod's score, per pod: node index and GPU mask).
type Greedy = (f64, f64, Vec<(usize, u64)>);

/// The gang placer. One instance per fleet; it caches evaluations keyed by node state.
pub struct Placer {
    policy: Policy,
    profile: WorkloadProfile,
    config: PlacerConfig,
    compiled: Option<Compiled>,
    memo: FxMap<u64, Option<Choice>>,
    memo_fleet: u64,
    req_keys: HashMap<String, u64>,
    decisions: u64,
    generation: u64,
    index: Index,
    greedy_cache: FxMap<GreedyKey, (Vec<u64>, Option<Greedy>)>,
    accel: bool,
    /// Per fleet node: left out of the current decision by the caller (empty: none). Set at
    /// the start of every decision, so it never outlives the call that passed it.
    excluded: Vec<bool>,
}

fn view_of(n: &Node) -> View<'_> {
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

fn mask_iter(mut mask: u64) -> impl Iterator<Item = usize> {
    std::iter::from_fn(move || {
        if mask == 0 {
            return None;
        }
        let i = mask.trailing_zeros() as usize;
        mask &= mask - 1;
        Some(i)
    })
}

impl Placer {
    /// Sluice's placer, keeping the fleet unfragmented for `profile` (an empty profile
    /// uses [`WorkloadProfile::inference_default`]).
    pub fn new(profile: WorkloadProfile) -> Self {
        Self::with_policy(Policy::Sluice, profile)
    }

    /// A placer with any policy (baselines for benchmarks).
    pub fn with_policy(policy: Policy, profile: WorkloadProfile) -> Self {
        Placer {
            policy,
            profile,
            config: PlacerConfig::default(),
            compiled: None,
            memo: FxMap::default(),
            memo_fleet: 0,
            req_keys: HashMap::new(),
            decisions: 0,
            generation: 0,
            index: Index::default(),
            greedy_cache: FxMap::default(),
            accel: true,
            excluded: Vec::new(),
        }
    }

    /// Change the tunables.
    pub fn with_config(mut self, config: PlacerConfig) -> Self {
        self.config = config;
        self.greedy_cache.clear();
        self
    }

    /// Without the incremental index, the domain pruning and the per-domain greedy cache:
    /// every decision rebuilds its aggregates and runs every greedy pass (the reference the
    /// tests compare the accelerated placer with; same results, slower).
    #[cfg(test)]
    pub(crate) fn without_acceleration(mut self) -> Self {
        self.accel = false;
        self
    }

    /// The policy.
    pub fn policy(&self) -> Policy {
        self.policy
    }

    /// Replace the workload profile (e.g. when the set of InferenceSets changes).
    pub fn set_profile(&mut self, profile: WorkloadProfile) {
        self.profile = profile;
        self.compiled = None;
        self.memo.clear();
        self.greedy_cache.clear();
    }

    /// Fragmentation of the whole fleet relative to the profile, in GPUs (FGD's measure,
    /// with Sluice's topology terms for the Sluice policy).
    pub fn fleet_fragmentation(&mut self, fleet: &Fleet) -> f64 {
        self.ensure_compiled(fleet);
        let c = self.compiled.as_ref().expect("compiled");
        fleet
            .nodes
            .iter()
            .filter(|n| n.usable())
            .map(|n| c.frag(&view_of(n)))
            .sum::<f64>()
            / f64::from(MILLI_PER_GPU)
    }

    /// Choose where a gang goes, all pods or none. Does not change the fleet; record the
    /// result with [`Fleet::allocate`] (or use [`Placer::place_and_allocate`]).
    pub fn place(&mut self, fleet: &Fleet, req: &GangRequest) -> Result<GangPlacement, PlaceError> {
        self.place_excluding(fleet, req, std::iter::empty())
    }

    /// [`Placer::place`] on the fleet without the `excluded` nodes (unknown names are
    /// ignored): the same decision as cordoning them for the call, without changing the
    /// fleet, so one fleet serves gangs whose pods may use different nodes (taints, node
    /// selectors, node affinity).
    pub fn place_excluding<'a>(
        &mut self,
        fleet: &Fleet,
        req: &GangRequest,
        excluded: impl IntoIterator<Item = &'a str>,
    ) -> Result<GangPlacement, PlaceError> {
        self.exclude(fleet, excluded);
        self.ensure_compiled(fleet);
        let rq = self.resolve(fleet, req)?;
        self.decisions += 1;
        self.sync(fleet);
        let mut ctx = std::mem::take(&mut self.index.ctx);
        ctx.decision = self.decisions;
        ctx.spread_min = match req.spread.as_ref().and_then(|s| s.floor) {
            Some(floor) if self.policy == Policy::Sluice => floor,
            _ => self.spread_min(fleet, &rq),
        };
        let res = self.place_gang(fleet, &ctx, &rq);
        self.index.ctx = ctx;
        match res {
            Some((score, pods)) => Ok(self.output(fleet, req, &rq, score, &pods)),
            None => Err(self.diagnose(fleet, req, &rq)),
        }
    }

    /// Replicas of the request's spread group in its emptiest eligible domain, as
    /// [`Placer::place`] measures a hard `max_skew` against (0 without a spread). A caller
    /// that leaves out eligible nodes for a first attempt reads this before, and passes it as
    /// [`crate::Spread::floor`].
    pub fn spread_floor(&mut self, fleet: &Fleet, req: &GangRequest) -> Result<u32, PlaceError> {
        self.spread_floor_excluding(fleet, req, std::iter::empty())
    }

    /// [`Placer::spread_floor`] on the fleet without the `excluded` nodes.
    pub fn spread_floor_excluding<'a>(
        &mut self,
        fleet: &Fleet,
        req: &GangRequest,
        excluded: impl IntoIterator<Item = &'a str>,
    ) -> Result<u32, PlaceError> {
        self.exclude(fleet, excluded);
        self.ensure_compiled(fleet);
        let rq = self.resolve(fleet, req)?;
        Ok(self.spread_min(fleet, &rq))
    }

    /// Record the nodes the next decision leaves out.
    fn exclude<'a>(&mut self, fleet: &Fleet, names: impl IntoIterator<Item = &'a str>) {
        self.excluded.clear();
        for name in names {
            if let Ok(i) = fleet.index_of(name) {
                if self.excluded.is_empty() {
                    self.excluded.resize(fleet.nodes.len(), false);
                }
                self.excluded[i] = true;
            }
        }
    }

    /// Whether the current decision may use node `i`: live, schedulable, not excluded.
    fn usable(&self, i: usize, n: &Node) -> bool {
        n.usable() && !self.excluded.get(i).copied().unwrap_or(false)
    }

    /// Place a gang and record it in the fleet under `id`, owned by the spread group (if any).
    pub fn place_and_allocate(
        &mut self,
        fleet: &mut Fleet,
        id: &str,
        req: &GangRequest,
    ) -> Result<GangPlacement, PlaceError> {
        let p = self.place(fleet, req)?;
        let group = req.spread.as_ref().map(|s| s.group.as_str());
        fleet
            .allocate(id, group, &p.pods)
            .map_err(|e: FleetError| PlaceError::InvalidRequest(e.to_string()))?;
        Ok(p)
    }

    fn ensure_compiled(&mut self, fleet: &Fleet) {
        let stale = match &self.compiled {
            Some(c) => c.fleet_uid != fleet.uid || c.products != fleet.products.len(),
            None => true,
        };
        if stale {
            let aware = self.policy == Policy::Sluice;
            self.compiled = Some(Compiled::build(fleet, &self.profile, aware));
            self.memo.clear();
            self.req_keys.clear();
            self.greedy_cache.clear();
            self.generation += 1;
        }
        if self.memo_fleet != fleet.uid || self.memo.len() > 4_000_000 {
            self.memo.clear();
            self.memo_fleet = fleet.uid;
        }
    }

    fn lvl(fleet: &Fleet, l: &TopologyLevel) -> Result<Lvl, PlaceError> {
        Ok(match l {
            TopologyLevel::Label(k) => Lvl::Label(
                fleet
                    .level_index(k)
                    .ok_or_else(|| PlaceError::UnknownLevel(k.clone()))?,
            ),
            TopologyLevel::Node => Lvl::Node,
            TopologyLevel::GpuGroup => Lvl::Group,
        })
    }

    fn resolve(&mut self, fleet: &Fleet, req: &GangRequest) -> Result<Rq, PlaceError> {
        if req.pods == 0 {
            return Err(PlaceError::InvalidRequest(
                "a gang needs at least one pod".into(),
            ));
        }
        let demand = req.gpu.normalized();
        if let GpuDemand::Whole(g) = demand
            && g as usize > crate::fleet::MAX_GPUS_PER_NODE
        {
            return Err(PlaceError::InvalidRequest(format!(
                "{g} GPUs per pod is more than any node has"
            )));
        }
        let required = req
            .required
            .as_ref()
            .map(|l| Self::lvl(fleet, l))
            .transpose()?;
        let preferred = req
            .preferred
            .as_ref()
            .map(|l| Self::lvl(fleet, l))
            .transpose()?;
        let spread = match &req.spread {
            None => None,
            Some(s) => {
                let lvl = match Self::lvl(fleet, &s.level)? {
                    Lvl::Label(i) => i,
                    Lvl::Node => fleet.config().levels.len(),
                    Lvl::Group => {
                        return Err(PlaceError::InvalidRequest(
                            "spread level must be a label level or the node".into(),
                        ));
                    }
                };
                Some((lvl, s.group.clone(), s.max_skew))
            }
        };
        let mig_devs = match req.mig_devices.as_ref().filter(|m| m.count > 0) {
            None => None,
            Some(m) => match fleet.mig_profile_id(&m.profile) {
                Some(id) => Some((id, m.count)),
                None => {
                    return Err(PlaceError::NoMatchingGpu {
                        selector: format!("MIG profile {} (no node offers it)", m.profile),
                    });
                }
            },
        };
        let mut prods = req.selector.products.clone();
        prods.sort();
        let k = format!(
            "{:?}|{}|{}|{:?}|{}|{:?}|{:?}",
            demand,
            req.cpu_milli,
            req.memory_mib,
            prods,
            req.selector.min_memory_mib,
            req.selector.mig,
            mig_devs
        );
        let next = self.req_keys.len() as u64;
        if next >= (1 << 24) {
            self.req_keys.clear();
            self.memo.clear();
            self.greedy_cache.clear();
        }
        let next = self.req_keys.len() as u64;
        let key = *self.req_keys.entry(k).or_insert(next);
        Ok(Rq {
            pods: req.pods,
            demand,
            cpu: req.cpu_milli,
            mem: req.memory_mib,
            allowed: allowed_products(fleet, &req.selector.products),
            min_mem: req.selector.min_memory_mib,
            mig: req.selector.mig,
            mig_devs,
            required,
            preferred,
            spread,
            key,
        })
    }

    /// Bring the index up to date with the fleet: rebuilt for a new fleet (or profile),
    /// otherwise only the nodes whose state or schedulability changed are re-counted.
    fn sync(&mut self, fleet: &Fleet) {
        let fresh = !self.accel
            || !self.index.built
            || self.index.fleet_uid != fleet.uid
            || self.index.generation != self.generation;
        if fresh {
            self.index = self.new_index(fleet);
            self.greedy_cache.clear();
        }
        if self.greedy_cache.len() > GREEDY_CACHE_MAX {
            self.greedy_cache.clear();
        }
        let ix = &mut self.index;
        // Nodes (and with them domains) may have been added since.
        let n = fleet.nodes.len();
        let k = ix.ctx.doms.len();
        ix.seen.resize(n, 0);
        ix.free.resize(n, 0);
        ix.whole.resize(n, 0);
        ix.node_epoch.resize(n, 0);
        ix.fit.resize(n * k, 0);
        for (l, ld) in fleet.domains.iter().enumerate() {
            ix.epoch[l].resize(ld.names.len(), 0);
            ix.whole_by[l].resize(ld.names.len() * ix.nprod, 0);
        }
        for d in &mut ix.ctx.doms {
            let m = fleet.domains[d.level].names.len();
            d.cap.resize(m, 0);
            d.free.resize(m, 0);
        }
        if let Some(f) = ix.ctx.fine {
            let m = fleet.domains[f].names.len();
            ix.ctx.fine_free.resize(m, 0);
            ix.ctx.fine_cap.resize(m, 0);
        }
        for (i, node) in fleet.nodes.iter().enumerate() {
            let usable = node.usable() && !self.excluded.get(i).copied().unwrap_or(false);
            let sig = if usable { u64::from(node.state) + 1 } else { 0 };
            if ix.seen[i] == sig {
                continue;
            }
            let v = view_of(node);
            let ngpu_milli = (node.free.len() as u64) * u64::from(MILLI_PER_GPU);
            let prod = node.product as usize;
            if ix.seen[i] != 0 {
                let (free, whole) = (ix.free[i], ix.whole[i]);
                for (t, d) in ix.ctx.doms.iter_mut().enumerate() {
                    if product_ok(&d.allowed, d.min_mem, MigSelector::Any, &v) {
                        let dom = node.domains[d.level] as usize;
                        d.cap[dom] -= ix.fit[i * k + t];
                        d.free[dom] -= free;
                    }
                }
                if let Some(f) = ix.ctx.fine {
                    let dom = node.domains[f] as usize;
                    ix.ctx.fine_free[dom] -= free;
                    ix.ctx.fine_cap[dom] -= ngpu_milli;
                }
                for (l, w) in ix.whole_by.iter_mut().enumerate() {
                    w[node.domains[l] as usize * ix.nprod + prod] -= whole;
                }
            }
            let (mut free, mut whole) = (0, 0);
            if sig != 0 {
                free = node.free.iter().map(|&f| u64::from(f)).sum();
                whole = node.free.iter().filter(|&&f| f == MILLI_PER_GPU).count() as u32;
            }
            for (t, d) in ix.ctx.doms.iter_mut().enumerate() {
                let mut fit = 0;
                if sig != 0 && product_ok(&d.allowed, d.min_mem, MigSelector::Any, &v) {
                    let dom = node.domains[d.level] as usize;
                    fit = pods_fit(&v, d.per_pod);
                    d.cap[dom] += fit;
                    d.free[dom] += free;
                }
                ix.fit[i * k + t] = fit;
            }
            if sig != 0 {
                if let Some(f) = ix.ctx.fine {
                    let dom = node.domains[f] as usize;
                    ix.ctx.fine_free[dom] += free;
                    ix.ctx.fine_cap[dom] += ngpu_milli;
                }
                for (l, w) in ix.whole_by.iter_mut().enumerate() {
                    w[node.domains[l] as usize * ix.nprod + prod] += whole;
                }
            }
            ix.free[i] = free;
            ix.whole[i] = whole;
            ix.seen[i] = sig;
            ix.clock += 1;
            ix.node_epoch[i] = ix.clock;
            for (l, e) in ix.epoch.iter_mut().enumerate() {
                e[node.domains[l] as usize] = ix.clock;
            }
        }
    }

    fn new_index(&self, fleet: &Fleet) -> Index {
        let levels = fleet.config().levels.len();
        let mut ctx = Ctx::default();
        if self.policy == Policy::Sluice {
            let c = self.compiled.as_ref().expect("compiled");
            for t in &c.domain_types {
                ctx.doms.push(DomAgg {
                    level: t.level,
                    per_pod: t.per_pod,
                    pods: t.pods,
                    w: t.w,
                    allowed: t.allowed.clone(),
                    min_mem: t.min_mem,
                    cap: Vec::new(),
                    free: Vec::new(),
                });
            }
            if levels > 0 {
                ctx.fine = Some(levels - 1);
            }
        }
        Index {
            built: true,
            fleet_uid: fleet.uid,
            generation: self.generation,
            epoch: vec![Vec::new(); levels],
            whole_by: vec![Vec::new(); levels],
            nprod: fleet.products.len().max(1),
            ctx,
            ..Default::default()
        }
    }

    /// Replicas of the owner in the emptiest eligible spread domain (with at least one node
    /// matching the selector); Sluice only.
    fn spread_min(&self, fleet: &Fleet, rq: &Rq) -> u32 {
        if self.policy != Policy::Sluice {
            return 0;
        }
        let Some((lvl, group, _)) = &rq.spread else {
            return 0;
        };
        let levels = fleet.config().levels.len();
        let mut min = u32::MAX;
        let mut seen: FxMap<u32, ()> = FxMap::default();
        for (i, node) in fleet
            .nodes
            .iter()
            .enumerate()
            .filter(|&(i, n)| self.usable(i, n))
        {
            if !product_ok(&rq.allowed, rq.min_mem, rq.mig, &view_of(node)) {
                continue;
            }
            let d = if *lvl < levels {
                node.domains[*lvl]
            } else {
                i as u32
            };
            if seen.insert(d, ()).is_none() {
                min = min.min(fleet.spread_count(group, *lvl, d));
                if min == 0 {
                    break;
                }
            }
        }
        if min == u32::MAX { 0 } else { min }
    }

    /// Candidate GPU sets on a node for one pod, in a canonical order.
    fn options(&self, v: &View, rq: &Rq, gmode: GMode, out: &mut Vec<u64>) {
        out.clear();
        let group_ok = |g: u8| match gmode {
            GMode::Any | GMode::SingleGroup => true,
            GMode::Exactly(x) => x == g,
        };
        match rq.demand {
            GpuDemand::None => out.push(0),
            GpuDemand::Milli(m) => {
                let mut seen: [(u32, u8); 64] = [(u32::MAX, 0); 64];
                let mut ns = 0;
                let dedupe = matches!(self.policy, Policy::Sluice | Policy::Fgd);
                for (i, &f) in v.free.iter().enumerate() {
                    if f >= m && group_ok(v.group_of[i]) {
                        let key = (f, v.group_of[i]);
                        if dedupe && seen[..ns].contains(&key) {
                            continue;
                        }
                        seen[ns] = key;
                        ns += 1;
                        out.push(1u64 << i);
                    }
                }
            }
            GpuDemand::Whole(g) => {
                let mut groups = [0u8; 64];
                let whole = whole_counts(v, &mut groups);
                if whole < g {
                    return;
                }
                let blind = self.policy != Policy::Sluice;
                if gmode == GMode::Any && blind {
                    // Topology-blind: the lowest-index free GPUs.
                    let mut mask = 0u64;
                    let mut k = 0;
                    for (i, &f) in v.free.iter().enumerate() {
                        if k < g && f == MILLI_PER_GPU {
                            mask |= 1 << i;
                            k += 1;
                        }
                    }
                    out.push(mask);
                    return;
                }
                for gr in 0..v.ngroups {
                    if !group_ok(gr) || u32::from(groups[gr as usize]) < g {
                        continue;
                    }
                    let mut mask = 0u64;
                    let mut k = 0;
                    for (i, &f) in v.free.iter().enumerate() {
                        if k < g && f == MILLI_PER_GPU && v.group_of[i] == gr {
                            mask |= 1 << i;
                            k += 1;
                        }
                    }
                    out.push(mask);
                }
                if out.is_empty() && gmode == GMode::Any {
                    // Span groups, taking from the groups with the fewest whole GPUs first.
                    let mut order: Vec<u8> = (0..v.ngroups).collect();
                    order.sort_by_key(|&gr| (groups[gr as usize], gr));
                    let mut mask = 0u64;
                    let mut k = 0;
                    for gr in order {
                        for (i, &f) in v.free.iter().enumerate() {
                            if k < g && f == MILLI_PER_GPU && v.group_of[i] == gr {
                                mask |= 1 << i;
                                k += 1;
                            }
                        }
                    }
                    out.push(mask);
                }
            }
        }
    }

    fn milli_of(rq: &Rq) -> u32 {
        match rq.demand {
            GpuDemand::None => 0,
            GpuDemand::Whole(_) => MILLI_PER_GPU,
            GpuDemand::Milli(m) => m,
        }
    }

    /// The node-local part of the score and the GPU choice (memoisable for FGD/Sluice).
    fn base_choice(
        &self,
        v: &View,
        rq: &Rq,
        gmode: GMode,
        idx: usize,
        decision: u64,
    ) -> Option<Choice> {
        let mut opts = Vec::with_capacity(8);
        self.options(v, rq, gmode, &mut opts);
        if opts.is_empty() {
            return None;
        }
        let milli = Self::milli_of(rq);
        let ngpu = v.free.len().max(1) as f64;
        let total_free: u64 = v.free.iter().map(|&f| u64::from(f)).sum();
        match self.policy {
            Policy::Sluice | Policy::Fgd => {
                let c = self.compiled.as_ref().expect("compiled");
                let before = c.frag(v);
                let mut buf = [0u32; 64];
                let n = v.free.len();
                let mut best: Option<Choice> = None;
                for &mask in &opts {
                    buf[..n].copy_from_slice(v.free);
                    for i in mask_iter(mask) {
                        buf[i] -= milli;
                    }
                    let after = View {
                        free: &buf[..n],
                        cpu_free: v.cpu_free.saturating_sub(rq.cpu),
                        mem_free: v.mem_free.saturating_sub(rq.mem),
                        ..*v
                    };
                    let score = (c.frag(&after) - before) / f64::from(MILLI_PER_GPU);
                    if best.is_none_or(|b| score < b.score - 1e-9) {
                        best = Some(Choice { score, mask });
                    }
                }
                best
            }
            Policy::FirstFit => Some(Choice {
                score: idx as f64,
                mask: opts[0],
            }),
            Policy::BestFit | Policy::Packing => {
                // Tightest option: the GPU (or group) with the least free capacity.
                let tight = |mask: u64| -> u64 {
                    match rq.demand {
                        GpuDemand::Whole(_) => {
                            let gr = mask_iter(mask).next().map(|i| v.group_of[i]).unwrap_or(0);
                            v.free
                                .iter()
                                .enumerate()
                                .filter(|(i, f)| v.group_of[*i] == gr && **f == MILLI_PER_GPU)
                                .count() as u64
                        }
                        _ => mask_iter(mask).map(|i| u64::from(v.free[i])).sum(),
                    }
                };
                let mask = *opts.iter().min_by_key(|&&m| tight(m)).expect("non-empty");
                let used = mask_iter(mask).count() as u64 * u64::from(milli);
                let score = if self.policy == Policy::BestFit {
                    let gpu_after = (total_free - used) as f64 / (ngpu * f64::from(MILLI_PER_GPU));
                    let cpu_after = if v.cpu_cap > 0 {
                        v.cpu_free.saturating_sub(rq.cpu) as f64 / v.cpu_cap as f64
                    } else {
                        0.0
                    };
                    gpu_after + cpu_after
                } else {
                    let alloc = 1.0 - total_free as f64 / (ngpu * f64::from(MILLI_PER_GPU));
                    let occupied = matches!(rq.demand, GpuDemand::Milli(_))
                        && mask_iter(mask).any(|i| v.free[i] < MILLI_PER_GPU);
                    -alloc - if occupied { 1.0 } else { 0.0 }
                };
                Some(Choice { score, mask })
            }
            Policy::Random { seed } => {
                let h = splitmix64(seed ^ splitmix64(decision ^ splitmix64(idx as u64)));
                let mask = opts[(h % opts.len() as u64) as usize];
                Some(Choice {
                    score: (splitmix64(h) >> 11) as f64 / (1u64 << 53) as f64,
                    mask,
                })
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn eval(
        &mut self,
        fleet: &Fleet,
        ctx: &Ctx,
        rq: &Rq,
        idx: usize,
        ov: &Overlay,
        gmode: GMode,
    ) -> Option<Choice> {
        let node = &fleet.nodes[idx];
        if !self.usable(idx, node) {
            return None;
        }
        let ovl = ov.iter().find(|o| o.0 == idx);
        if let Some((profile, count)) = rq.mig_devs {
            let free = ovl.map_or_else(|| node.mig_of(profile).1, |o| o.4);
            if free < count {
                return None;
            }
        }
        let v = match ovl {
            Some((_, free, cpu, mem, _)) => View {
                free,
                cpu_free: *cpu,
                mem_free: *mem,
                ..view_of(node)
            },
            None => view_of(node),
        };
        if !product_ok(&rq.allowed, rq.min_mem, rq.mig, &v) {
            return None;
        }
        if (v.cpu_cap > 0 && v.cpu_free < rq.cpu) || (v.mem_cap > 0 && v.mem_free < rq.mem) {
            return None;
        }
        match rq.demand {
            GpuDemand::None => {}
            GpuDemand::Whole(g) => {
                if v.free.iter().filter(|&&f| f == MILLI_PER_GPU).count() < g as usize {
                    return None;
                }
            }
            GpuDemand::Milli(m) => {
                if !v.free.iter().any(|&f| f >= m) {
                    return None;
                }
            }
        }
        let memoisable = ovl.is_none()
            && matches!(self.policy, Policy::Sluice | Policy::Fgd)
            && matches!(gmode, GMode::Any | GMode::SingleGroup);
        let base = if memoisable {
            let key = (u64::from(node.state) << 32) | (rq.key << 8) | gmode.code();
            match self.memo.get(&key) {
                Some(c) => *c,
                None => {
                    let c = self.base_choice(&v, rq, gmode, idx, ctx.decision);
                    self.memo.insert(key, c);
                    c
                }
            }
        } else {
            self.base_choice(&v, rq, gmode, idx, ctx.decision)
        }?;
        if self.policy != Policy::Sluice {
            return Some(base);
        }
        let mut score = base.score;
        let milli = Self::milli_of(rq);
        let used = mask_iter(base.mask).count() as u64 * u64::from(milli);
        let total_free: u64 = v.free.iter().map(|&f| u64::from(f)).sum();
        // Multi-node gang domains (e.g. NVLink cliques) that stop being able to take a gang.
        if !ctx.doms.is_empty() {
            // Whole free GPUs before and after (a GPU stops being whole when anything is
            // taken from it).
            let whole0 = v.free.iter().filter(|&&f| f == MILLI_PER_GPU).count() as u32;
            let broken = if milli == 0 {
                0
            } else {
                mask_iter(base.mask)
                    .filter(|&i| v.free[i] == MILLI_PER_GPU)
                    .count() as u32
            };
            let whole1 = whole0 - broken;
            let mut delta = 0.0;
            for d in &ctx.doms {
                if !product_ok(&d.allowed, d.min_mem, MigSelector::Any, &v) {
                    continue;
                }
                let dom = node.domains[d.level] as usize;
                let (cap0, free0) = (d.cap[dom], d.free[dom]);
                let fit = |w: u32| w.checked_div(d.per_pod).unwrap_or(0);
                let cap1 = cap0.saturating_sub(fit(whole0)) + fit(whole1);
                let free1 = free0.saturating_sub(used);
                let f0 = if cap0 < d.pods { free0 } else { 0 };
                let f1 = if cap1 < d.pods { free1 } else { 0 };
                delta += d.w * (f1 as f64 - f0 as f64);
            }
            score += self.config.domain_weight * delta / f64::from(MILLI_PER_GPU);
        }
        if let Some((lvl, group, max_skew)) = &rq.spread {
            let levels = fleet.config().levels.len();
            let d = if *lvl < levels {
                node.domains[*lvl]
            } else {
                idx as u32
            };
            let count = fleet.spread_count(group, *lvl, d);
            if let Some(skew) = max_skew
                && count + 1 > ctx.spread_min + skew
            {
                return None;
            }
            score += self.config.spread_weight * f64::from(count);
        }
        // Tie-breaks: fuller node, then fuller finest domain (keeps whole nodes and whole
        // racks/cliques free for large gangs).
        let ngpu_milli = (v.free.len().max(1) as f64) * f64::from(MILLI_PER_GPU);
        score += 1e-4 * ((total_free - used) as f64 / ngpu_milli);
        if let Some(f) = ctx.fine {
            let dom = node.domains[f] as usize;
            let cap = ctx.fine_cap[dom].max(1) as f64;
            score += 1e-5 * (ctx.fine_free[dom] as f64 / cap);
        }
        Some(Choice {
            score,
            mask: base.mask,
        })
    }

    /// Greedy: place the pods one by one inside `scope`, best node each time.
    fn greedy(
        &mut self,
        fleet: &Fleet,
        ctx: &Ctx,
        rq: &Rq,
        scope: Option<&[usize]>,
        gmode: GMode,
    ) -> Option<Greedy> {
        let mut ov: Overlay = Vec::new();
        let mut out = Vec::with_capacity(rq.pods as usize);
        let mut total = 0.0;
        let mut first = 0.0;
        let milli = Self::milli_of(rq);
        for pod in 0..rq.pods {
            let mut best: Option<(usize, Choice)> = None;
            let n = scope.map_or(fleet.nodes.len(), <[usize]>::len);
            for k in 0..n {
                let idx = scope.map_or(k, |s| s[k]);
                if let Some(c) = self.eval(fleet, ctx, rq, idx, &ov, gmode)
                    && best.is_none_or(|(_, b)| c.score < b.score)
                {
                    best = Some((idx, c));
                }
            }
            let (idx, c) = best?;
            if pod == 0 {
                first = c.score;
            }
            total += c.score;
            out.push((idx, c.mask));
            if rq.pods > 1 {
                let node = &fleet.nodes[idx];
                let pos = match ov.iter().position(|o| o.0 == idx) {
                    Some(p) => p,
                    None => {
                        let mig = rq.mig_devs.map_or(0, |(p, _)| node.mig_of(p).1);
                        ov.push((idx, node.free.clone(), node.cpu_free, node.mem_free, mig));
                        ov.len() - 1
                    }
                };
                let o = &mut ov[pos];
                for i in mask_iter(c.mask) {
                    o.1[i] -= milli;
                }
                o.2 = o.2.saturating_sub(rq.cpu);
                o.3 = o.3.saturating_sub(rq.mem);
                o.4 = o.4.saturating_sub(rq.mig_devs.map_or(0, |(_, c)| c));
            }
        }
        Some((total, first, out))
    }

    /// Whether the domain has enough GPU capacity on matching nodes for the whole gang
    /// (an upper bound: never false where the greedy pass could place it).
    fn quick_room(&self, fleet: &Fleet, rq: &Rq, members: &[usize]) -> bool {
        let need = match rq.demand {
            GpuDemand::None => return true,
            GpuDemand::Whole(g) => u64::from(g) * u64::from(rq.pods),
            GpuDemand::Milli(_) => u64::from(rq.pods),
        };
        let mut have = 0u64;
        for &i in members {
            let n = &fleet.nodes[i];
            if !self.usable(i, n) || !product_ok(&rq.allowed, rq.min_mem, rq.mig, &view_of(n)) {
                continue;
            }
            have += match rq.demand {
                // Several shares of a gang may go to one GPU.
                GpuDemand::Milli(m) => n.free.iter().map(|&f| u64::from(f / m)).sum(),
                _ => n.free.iter().filter(|&&f| f == MILLI_PER_GPU).count() as u64,
            };
            if have >= need {
                return true;
            }
        }
        false
    }

    /// Index bound for a label-level domain: whole free GPUs on nodes of an allowed product
    /// (selectors other than the product are ignored, so it is an upper bound).
    fn index_room(&self, l: usize, d: usize, need: u64, prods: &[usize]) -> bool {
        let ix = &self.index;
        let row = &ix.whole_by[l][d * ix.nprod..(d + 1) * ix.nprod];
        let have: u64 = if prods.is_empty() {
            row.iter().map(|&w| u64::from(w)).sum()
        } else {
            prods.iter().map(|&p| u64::from(row[p])).sum()
        };
        have >= need
    }

    /// What a greedy pass over one domain depends on besides the request: the domain's change
    /// epoch (its nodes' states) and, for Sluice, the aggregates read from outside the
    /// domain: coarser gang-domain types (unless so roomy that the term is zero for any node)
    /// and, for node/group domains, the finest label domain's fill (the tie-break).
    fn domain_sig(&self, fleet: &Fleet, ctx: &Ctx, lvl: Lvl, d: usize, out: &mut Vec<u64>) {
        out.clear();
        let ix = &self.index;
        let (level, rep) = match lvl {
            Lvl::Label(l) => {
                out.push(ix.epoch[l][d]);
                (l, fleet.domains[l].members[d][0])
            }
            Lvl::Node | Lvl::Group => {
                out.push(ix.node_epoch[d]);
                (usize::MAX, d)
            }
        };
        let node = &fleet.nodes[rep];
        for t in ctx.doms.iter().filter(|t| t.level < level) {
            let dom = node.domains[t.level] as usize;
            let cap = t.cap[dom];
            // A node holds at most MAX_GPUS_PER_NODE pods of the type: a domain with that
            // many more than the gang can hold it before and after any placement.
            if cap
                >= t.pods
                    .saturating_add(crate::fleet::MAX_GPUS_PER_NODE as u32)
            {
                out.push(u64::MAX);
            } else {
                out.push(u64::from(cap));
                out.push(t.free[dom]);
            }
        }
        if level == usize::MAX
            && let Some(f) = ctx.fine
        {
            let dom = node.domains[f] as usize;
            out.push(ctx.fine_free[dom]);
            out.push(ctx.fine_cap[dom]);
        }
    }

    /// The greedy pass over one domain of a gang, from the cache when the domain has not
    /// changed since (same result as running it; only deterministic policies, no spread).
    #[allow(clippy::too_many_arguments)]
    fn greedy_domain(
        &mut self,
        fleet: &Fleet,
        ctx: &Ctx,
        rq: &Rq,
        lvl: Lvl,
        d: usize,
        gmode: GMode,
        sig: &mut Vec<u64>,
    ) -> Option<Greedy> {
        let cacheable =
            self.accel && rq.spread.is_none() && !matches!(self.policy, Policy::Random { .. });
        let run = |me: &mut Self| match lvl {
            Lvl::Label(l) => {
                let members = &fleet.domains[l].members[d];
                me.greedy(fleet, ctx, rq, Some(members), gmode)
            }
            Lvl::Node | Lvl::Group => me.greedy(fleet, ctx, rq, Some(&[d]), gmode),
        };
        if !cacheable {
            return run(self);
        }
        let key = GreedyKey {
            lvl: match lvl {
                Lvl::Label(l) => l as u32,
                Lvl::Node => u32::MAX - 1,
                Lvl::Group => u32::MAX,
            },
            dom: d as u32,
            shape: rq.key,
            pods: rq.pods,
            gmode: gmode.code(),
        };
        self.domain_sig(fleet, ctx, lvl, d, sig);
        if let Some((s, r)) = self.greedy_cache.get(&key)
            && s == sig
        {
            return r.clone();
        }
        let r = run(self);
        self.greedy_cache.insert(key, (sig.clone(), r.clone()));
        r
    }

    fn place_at(
        &mut self,
        fleet: &Fleet,
        ctx: &Ctx,
        rq: &Rq,
        lvl: Option<Lvl>,
    ) -> Option<(f64, Vec<(usize, u64)>)> {
        let sluice = self.policy == Policy::Sluice;
        let pick = |best: &mut Option<Greedy>, cand: Greedy| {
            let key = if sluice { cand.0 } else { cand.1 };
            let bkey = best.as_ref().map(|b| if sluice { b.0 } else { b.1 });
            if bkey.is_none_or(|b| key < b) {
                *best = Some(cand);
            }
        };
        let mut best = None;
        let mut sig = Vec::new();
        match lvl {
            None => {
                return self
                    .greedy(fleet, ctx, rq, None, GMode::Any)
                    .map(|r| (r.0, r.2));
            }
            Some(Lvl::Group) if rq.pods == 1 => {
                return self
                    .greedy(fleet, ctx, rq, None, GMode::SingleGroup)
                    .map(|r| (r.0, r.2));
            }
            Some(Lvl::Node | Lvl::Label(_)) if rq.pods == 1 => {
                return self
                    .greedy(fleet, ctx, rq, None, GMode::Any)
                    .map(|r| (r.0, r.2));
            }
            Some(Lvl::Label(l)) => {
                // Index bound first (no scan of the members), then the exact room check.
                let need = match rq.demand {
                    GpuDemand::Whole(g) if self.accel => u64::from(g) * u64::from(rq.pods),
                    _ => 0,
                };
                let prods: Vec<usize> = match &rq.allowed {
                    Some(a) => (0..a.len()).filter(|&p| a[p]).collect(),
                    None => Vec::new(),
                };
                if need > 0 && rq.allowed.is_some() && prods.is_empty() {
                    return None;
                }
                for d in 0..fleet.domains[l].members.len() {
                    if need > 0 && !self.index_room(l, d, need, &prods) {
                        continue;
                    }
                    if !self.quick_room(fleet, rq, &fleet.domains[l].members[d]) {
                        continue;
                    }
                    if let Some(r) =
                        self.greedy_domain(fleet, ctx, rq, Lvl::Label(l), d, GMode::Any, &mut sig)
                    {
                        pick(&mut best, r);
                    }
                }
            }
            Some(Lvl::Node) => {
                for i in 0..fleet.nodes.len() {
                    if !self.quick_room(fleet, rq, &[i]) {
                        continue;
                    }
                    if let Some(r) =
                        self.greedy_domain(fleet, ctx, rq, Lvl::Node, i, GMode::Any, &mut sig)
                    {
                        pick(&mut best, r);
                    }
                }
            }
            Some(Lvl::Group) => {
                for i in 0..fleet.nodes.len() {
                    if !self.quick_room(fleet, rq, &[i]) {
                        continue;
                    }
                    for g in 0..fleet.nodes[i].ngroups {
                        if let Some(r) = self.greedy_domain(
                            fleet,
                            ctx,
                            rq,
                            Lvl::Group,
                            i,
                            GMode::Exactly(g),
                            &mut sig,
                        ) {
                            pick(&mut best, r);
                        }
                    }
                }
            }
        }
        best.map(|r| (r.0, r.2))
    }

    fn place_gang(
        &mut self,
        fleet: &Fleet,
        ctx: &Ctx,
        rq: &Rq,
    ) -> Option<(f64, Vec<(usize, u64)>)> {
        // Sluice tries the preferred level first (when it is finer than the required one).
        if self.policy == Policy::Sluice
            && let Some(p) = rq.preferred
            && Some(p) != rq.required
            && let Some(r) = self.place_at(fleet, ctx, rq, Some(p))
        {
            return Some(r);
        }
        self.place_at(fleet, ctx, rq, rq.required)
    }

    fn output(
        &self,
        fleet: &Fleet,
        req: &GangRequest,
        rq: &Rq,
        score: f64,
        pods: &[(usize, u64)],
    ) -> GangPlacement {
        let milli = Self::milli_of(rq);
        let assignments: Vec<PodAssignment> = pods
            .iter()
            .map(|&(idx, mask)| PodAssignment {
                node: fleet.nodes[idx].name.clone(),
                gpus: mask_iter(mask).map(|i| i as u32).collect(),
                milli_per_gpu: milli,
                cpu_milli: rq.cpu,
                memory_mib: rq.mem,
                mig: rq.mig_devs.map(|(p, count)| crate::request::MigDevices {
                    profile: fleet.mig_profiles[p as usize].clone(),
                    count,
                }),
            })
            .collect();
        let first = pods[0].0;
        let required_domain = rq.required.map(|l| match l {
            Lvl::Label(i) => fleet.domains[i].names[fleet.nodes[first].domains[i] as usize].clone(),
            Lvl::Node => fleet.nodes[first].name.clone(),
            Lvl::Group => {
                let g = mask_iter(pods[0].1)
                    .next()
                    .map(|i| fleet.nodes[first].group_of[i])
                    .unwrap_or(0);
                format!("{}/group-{g}", fleet.nodes[first].name)
            }
        });
        let preferred_satisfied = match &req.preferred {
            None => true,
            Some(l) => fleet.within_one_domain(&assignments, l).unwrap_or(false),
        };
        GangPlacement {
            pods: assignments,
            required_domain,
            preferred_satisfied,
            score,
        }
    }

    fn diagnose(&self, fleet: &Fleet, req: &GangRequest, rq: &Rq) -> PlaceError {
        let mut pod = format!("{}, {} mCPU, {} MiB", rq.demand.describe(), rq.cpu, rq.mem);
        if let Some(m) = &req.mig_devices {
            pod.push_str(&format!(", {} MIG {}", m.count, m.profile));
        }
        let matching: Vec<usize> = (0..fleet.nodes.len())
            .filter(|&i| {
                let n = &fleet.nodes[i];
                self.usable(i, n)
                    && product_ok(&rq.allowed, rq.min_mem, rq.mig, &view_of(n))
                    && (rq.demand == GpuDemand::None || !n.free.is_empty())
                    && rq.mig_devs.is_none_or(|(p, c)| n.mig_of(p).0 >= c)
            })
            .collect();
        let mut is_matching = vec![false; fleet.nodes.len()];
        for &i in &matching {
            is_matching[i] = true;
        }
        if matching.is_empty() {
            let mut selector = req.selector.describe();
            if let Some(m) = &req.mig_devices {
                selector.push_str(&format!(", {} MIG {} per pod", m.count, m.profile));
            }
            return PlaceError::NoMatchingGpu { selector };
        }
        // Pods of this shape a node holds when empty.
        let empty_fit = |n: &Node| -> u32 {
            let by_cpu = if n.cpu_cap > 0 && rq.cpu > 0 {
                n.cpu_cap / rq.cpu
            } else {
                u64::MAX
            };
            let by_mem = if n.mem_cap > 0 && rq.mem > 0 {
                n.mem_cap / rq.mem
            } else {
                u64::MAX
            };
            let by_gpu = match rq.demand {
                GpuDemand::None => u64::MAX,
                GpuDemand::Whole(g) => {
                    if rq.required == Some(Lvl::Group) {
                        let mut sizes = vec![0u64; n.ngroups as usize];
                        n.group_of.iter().for_each(|&gr| sizes[gr as usize] += 1);
                        sizes.iter().map(|s| s / u64::from(g)).sum()
                    } else {
                        n.free.len() as u64 / u64::from(g)
                    }
                }
                GpuDemand::Milli(m) => n.free.len() as u64 * u64::from(MILLI_PER_GPU / m),
            };
            let by_mig = rq
                .mig_devs
                .map_or(u64::MAX, |(p, c)| u64::from(n.mig_of(p).0 / c));
            by_cpu
                .min(by_mem)
                .min(by_gpu)
                .min(by_mig)
                .min(u64::from(u32::MAX)) as u32
        };
        let largest_node = matching
            .iter()
            .map(|&i| empty_fit(&fleet.nodes[i]))
            .max()
            .unwrap_or(0);
        if largest_node == 0 {
            let n = matching
                .iter()
                .map(|&i| &fleet.nodes[i])
                .max_by_key(|n| (n.free.len(), n.cpu_cap, n.mem_cap))
                .expect("non-empty");
            return PlaceError::PodLargerThanAnyNode {
                pod,
                largest: format!(
                    "{} GPU, {} mCPU, {} MiB ({})",
                    n.free.len(),
                    n.cpu_cap,
                    n.mem_cap,
                    if rq.required == Some(Lvl::Group) {
                        "GPU groups of the node counted separately"
                    } else {
                        "whole node"
                    }
                ),
            };
        }
        if let Some(req_l) = rq.required
            && rq.pods > 1
        {
            let level = req
                .required
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default();
            let singles: Vec<[usize; 1]>;
            let members: Vec<&[usize]> = match req_l {
                Lvl::Label(l) => fleet.domains[l].members.iter().map(Vec::as_slice).collect(),
                Lvl::Node | Lvl::Group => {
                    singles = matching.iter().map(|&i| [i]).collect();
                    singles.iter().map(|s| s.as_slice()).collect()
                }
            };
            let cap_of = |ms: &&[usize]| -> u32 {
                let s: u64 = ms
                    .iter()
                    .filter(|&&i| is_matching[i])
                    .map(|&i| {
                        if req_l == Lvl::Group {
                            // One group only: the largest group's fit.
                            u64::from(Self::group_capacity(&fleet.nodes[i], rq))
                        } else {
                            u64::from(empty_fit(&fleet.nodes[i]))
                        }
                    })
                    .sum();
                s.min(u64::from(u32::MAX)) as u32
            };
            let largest = members.iter().map(cap_of).max().unwrap_or(0);
            if largest < rq.pods {
                return PlaceError::RequiredDomainTooSmall {
                    level,
                    pods: rq.pods,
                    pod,
                    largest,
                };
            }
            let best_now = members
                .iter()
                .map(|ms| {
                    ms.iter()
                        .filter(|&&i| is_matching[i])
                        .map(|&i| Self::fit_now(&fleet.nodes[i], rq))
                        .sum::<u32>()
                })
                .max()
                .unwrap_or(0);
            if rq.spread.as_ref().is_some_and(|s| s.2.is_some()) && best_now >= rq.pods {
                let s = req.spread.as_ref().expect("spread");
                return PlaceError::SpreadUnsatisfiable {
                    level: s.level.to_string(),
                    max_skew: s.max_skew.unwrap_or(0),
                };
            }
            return PlaceError::RequiredDomainFull {
                level,
                pods: rq.pods,
                pod,
                best: best_now.min(rq.pods.saturating_sub(1)),
            };
        }
        let now: u32 = matching
            .iter()
            .map(|&i| Self::fit_now(&fleet.nodes[i], rq))
            .sum();
        if let Some(s) = &req.spread
            && s.max_skew.is_some()
            && now >= rq.pods
        {
            return PlaceError::SpreadUnsatisfiable {
                level: s.level.to_string(),
                max_skew: s.max_skew.unwrap_or(0),
            };
        }
        let free_whole: usize = matching
            .iter()
            .map(|&i| {
                fleet.nodes[i]
                    .free
                    .iter()
                    .filter(|&&f| f == MILLI_PER_GPU)
                    .count()
            })
            .sum();
        PlaceError::InsufficientCapacity {
            pods: rq.pods,
            pod,
            detail: format!(
                "{now} pods of this shape fit now on {} matching nodes ({free_whole} whole GPUs free)",
                matching.len()
            ),
        }
    }

    fn group_capacity(n: &Node, rq: &Rq) -> u32 {
        let GpuDemand::Whole(g) = rq.demand else {
            return 1;
        };
        let mut sizes = vec![0u32; n.ngroups as usize];
        n.group_of.iter().for_each(|&gr| sizes[gr as usize] += 1);
        sizes.iter().map(|s| s / g.max(1)).max().unwrap_or(0)
    }

    fn fit_now(n: &Node, rq: &Rq) -> u32 {
        let by_cpu = if n.cpu_cap > 0 && rq.cpu > 0 {
            n.cpu_free / rq.cpu
        } else {
            u64::MAX
        };
        let by_mem = if n.mem_cap > 0 && rq.mem > 0 {
            n.mem_free / rq.mem
        } else {
            u64::MAX
        };
        let by_gpu = match rq.demand {
            GpuDemand::None => u64::MAX,
            GpuDemand::Whole(g) => {
                let mut groups = [0u8; 64];
                let v = view_of(n);
                let whole = whole_counts(&v, &mut groups);
                if rq.required == Some(Lvl::Group) {
                    groups[..n.ngroups as usize]
                        .iter()
                        .map(|&w| u64::from(w) / u64::from(g))
                        .sum()
                } else {
                    u64::from(whole / g)
                }
            }
            GpuDemand::Milli(m) => n.free.iter().map(|&f| u64::from(f / m)).sum(),
        };
        let by_mig = rq
            .mig_devs
            .map_or(u64::MAX, |(p, c)| u64::from(n.mig_of(p).1 / c));
        by_cpu.min(by_mem).min(by_gpu).min(by_mig).min(1 << 20) as u32
    }
}

#[cfg(test)]
mod index_tests {
    //! The incremental index, the domain pruning and the per-domain greedy cache must never
    //! change a decision: random fleets and operation sequences, accelerated placer against
    //! the reference that rebuilds everything and runs every greedy pass.

    use super::*;
    use crate::fleet::{
        GpuTopology, LABEL_GPU_CLIQUE, LABEL_GPU_MEMORY, LABEL_RACK, LABEL_ZONE, NodeSpec,
        TopologyConfig,
    };
    use crate::fx::Rng;
    use crate::request::GangRequest;

    const PRODUCTS: [&str; 3] = ["NVIDIA-L40S", "NVIDIA-H200", "NVIDIA-A100-SXM4-40GB"];

    fn random_node(rng: &mut Rng, name: String) -> NodeSpec {
        let gpus = [2u32, 4, 8, 8, 8][rng.below(5)];
        let product = PRODUCTS[rng.below(PRODUCTS.len())];
        let mut n = NodeSpec::new(name, product, gpus).label(
            LABEL_GPU_MEMORY,
            if product == "NVIDIA-H200" {
                "143771"
            } else {
                "46068"
            },
        );
        // Zone, rack and clique labels, each sometimes missing (singleton domains).
        let zone = rng.below(2);
        let rack = rng.below(4);
        if rng.below(8) != 0 {
            n = n.label(LABEL_ZONE, &format!("z{zone}"));
        }
        if rng.below(6) != 0 {
            n = n.label(LABEL_RACK, &format!("z{zone}-r{rack}"));
        }
        if rng.below(3) != 0 {
            n = n.label(
                LABEL_GPU_CLIQUE,
                &format!("z{zone}-r{rack}-c{}", rng.below(2)),
            );
        }
        if gpus == 8 && rng.below(2) == 0 {
            n = n.topology(&GpuTopology {
                groups: Some(vec![vec![0, 1, 2, 3], vec![4, 5, 6, 7]]),
                numa: None,
            });
        }
        if rng.below(3) == 0 {
            n = n.resources(64_000, 512_000);
        }
        n
    }

    fn random_request(rng: &mut Rng) -> GangRequest {
        let levels = [
            None,
            Some(TopologyLevel::Node),
            Some(TopologyLevel::GpuGroup),
            Some(TopologyLevel::label(LABEL_ZONE)),
            Some(TopologyLevel::label(LABEL_RACK)),
            Some(TopologyLevel::label(LABEL_GPU_CLIQUE)),
        ];
        let mut r = match rng.below(6) {
            0 => GangRequest::share([250, 500, 700][rng.below(3)]),
            1 => GangRequest {
                gpu: GpuDemand::None,
                ..GangRequest::gpus(1, 1)
            },
            _ => GangRequest::gpus(1, [1u32, 2, 4, 8][rng.below(4)]),
        };
        r.pods = [1u32, 1, 2, 3, 4][rng.below(5)];
        r.required = levels[rng.below(levels.len())].clone();
        if rng.below(3) == 0 {
            r.preferred = levels[rng.below(levels.len())].clone();
        }
        if rng.below(3) == 0 {
            r = r.products([PRODUCTS[rng.below(PRODUCTS.len())]]);
        }
        if rng.below(4) == 0 {
            r = r.resources(4000 * u64::from(rng.below(8) as u32), 32_000);
        }
        if rng.below(6) == 0 {
            let level = [
                TopologyLevel::Node,
                TopologyLevel::label(LABEL_RACK),
                TopologyLevel::label(LABEL_ZONE),
            ][rng.below(3)]
            .clone();
            let skew = if rng.below(2) == 0 { Some(1) } else { None };
            r = r.spread(level, &format!("g{}", rng.below(2)), skew);
        }
        r
    }

    /// Runs the same random operations against two placers and asserts equal decisions.
    fn compare(seed: u64, policy: Policy, nodes: usize, ops: usize) {
        let mut rng = Rng::new(seed);
        let mut fleet = Fleet::new(TopologyConfig::default());
        for i in 0..nodes {
            fleet
                .add_node(random_node(&mut rng, format!("n{i}")))
                .unwrap();
        }
        let shapes: Vec<GangRequest> = (0..12).map(|_| random_request(&mut rng)).collect();
        let profile = WorkloadProfile::from_requests(&shapes);
        let mut fast = Placer::with_policy(policy, profile.clone());
        let mut slow = Placer::with_policy(policy, profile).without_acceleration();
        let mut live: Vec<String> = Vec::new();
        let mut added = nodes;
        for op in 0..ops {
            match rng.below(20) {
                0..=3 if !live.is_empty() => {
                    let id = live.swap_remove(rng.below(live.len()));
                    fleet.release(&id).unwrap();
                }
                4 => {
                    let names: Vec<String> = fleet.node_names().map(str::to_string).collect();
                    let name = &names[rng.below(names.len())];
                    fleet.set_schedulable(name, rng.below(3) != 0).unwrap();
                }
                5 if op % 7 == 0 => {
                    let names: Vec<String> = fleet.node_names().map(str::to_string).collect();
                    if names.len() > 4 {
                        let lost = fleet.remove_node(&names[rng.below(names.len())]).unwrap();
                        live.retain(|id| !lost.contains(id));
                    }
                }
                6 if op % 5 == 0 => {
                    fleet
                        .add_node(random_node(&mut rng, format!("n{added}")))
                        .unwrap();
                    added += 1;
                }
                _ => {
                    let req = if rng.below(4) == 0 {
                        random_request(&mut rng)
                    } else {
                        shapes[rng.below(shapes.len())].clone()
                    };
                    let a = fast.place(&fleet, &req);
                    let b = slow.place(&fleet, &req);
                    assert_eq!(
                        format!("{a:?}"),
                        format!("{b:?}"),
                        "seed {seed}, {policy:?}, op {op}: {req:?}"
                    );
                    if let Ok(p) = a {
                        let id = format!("a{op}");
                        let group = req.spread.as_ref().map(|s| s.group.as_str());
                        fleet.allocate(&id, group, &p.pods).unwrap();
                        live.push(id);
                    }
                }
            }
        }
    }

    #[test]
    fn accelerated_decisions_equal_reference_on_random_fleets() {
        for seed in 0..12 {
            for policy in [Policy::Sluice, Policy::Fgd, Policy::BestFit] {
                compare(seed, policy, 24 + (seed as usize % 4) * 8, 300);
            }
        }
        for policy in [
            Policy::FirstFit,
            Policy::Packing,
            Policy::Random { seed: 3 },
        ] {
            compare(99, policy, 32, 300);
        }
    }

    /// The incrementally maintained aggregates equal a rebuild from scratch.
    #[test]
    fn incremental_index_equals_rebuild() {
        let mut rng = Rng::new(7);
        let mut fleet = Fleet::new(TopologyConfig::default());
        for i in 0..40 {
            fleet
                .add_node(random_node(&mut rng, format!("n{i}")))
                .unwrap();
        }
        let shapes: Vec<GangRequest> = (0..12).map(|_| random_request(&mut rng)).collect();
        let profile = WorkloadProfile::from_requests(&shapes);
        let mut pl = Placer::new(profile.clone());
        for op in 0..400 {
            let req = &shapes[rng.below(shapes.len())];
            if let Ok(p) = pl.place(&fleet, req) {
                fleet.allocate(&format!("a{op}"), None, &p.pods).unwrap();
            }
            if op % 3 == 0 {
                let ids = fleet.allocation_ids();
                if !ids.is_empty() {
                    fleet.release(&ids[rng.below(ids.len())]).unwrap();
                }
            }
            if op % 50 == 0 {
                let names: Vec<String> = fleet.node_names().map(str::to_string).collect();
                fleet
                    .set_schedulable(&names[rng.below(names.len())], false)
                    .unwrap();
            }
            pl.sync(&fleet);
            let mut fresh = Placer::new(profile.clone());
            fresh.ensure_compiled(&fleet);
            fresh.sync(&fleet);
            let (a, b) = (&pl.index, &fresh.index);
            assert_eq!(a.whole_by, b.whole_by, "op {op}");
            assert_eq!(a.ctx.fine_free, b.ctx.fine_free, "op {op}");
            assert_eq!(a.ctx.fine_cap, b.ctx.fine_cap, "op {op}");
            assert_eq!(a.ctx.doms.len(), b.ctx.doms.len());
            for (x, y) in a.ctx.doms.iter().zip(&b.ctx.doms) {
                assert_eq!((&x.cap, &x.free), (&y.cap, &y.free), "op {op}");
            }
        }
        assert!(
            !pl.index.ctx.doms.is_empty(),
            "the profile has gang domain types"
        );
    }

    /// Nodes left out by argument give the decisions of the same nodes cordoned in the
    /// fleet, also for one placer whose index sees a different set every call.
    #[test]
    fn excluding_nodes_equals_cordoning_them() {
        for seed in 0..6 {
            let mut rng = Rng::new(100 + seed);
            let mut fleet = Fleet::new(TopologyConfig::default());
            for i in 0..32 {
                fleet
                    .add_node(random_node(&mut rng, format!("n{i}")))
                    .unwrap();
            }
            let shapes: Vec<GangRequest> = (0..12).map(|_| random_request(&mut rng)).collect();
            let profile = WorkloadProfile::from_requests(&shapes);
            let mut shared = Placer::new(profile.clone());
            let names: Vec<String> = fleet.node_names().map(str::to_string).collect();
            for op in 0..200 {
                let req = shapes[rng.below(shapes.len())].clone();
                let excluded: Vec<&str> = names
                    .iter()
                    .filter(|_| rng.below(4) == 0)
                    .map(String::as_str)
                    .collect();
                let a = shared.place_excluding(&fleet, &req, excluded.iter().copied());
                let floor_a = shared.spread_floor_excluding(&fleet, &req, excluded.iter().copied());
                let mut cordoned = fleet.clone();
                for n in &excluded {
                    cordoned.set_schedulable(n, false).unwrap();
                }
                let mut fresh = Placer::new(profile.clone());
                let b = fresh.place(&cordoned, &req);
                let floor_b = fresh.spread_floor(&cordoned, &req);
                assert_eq!(format!("{a:?}"), format!("{b:?}"), "seed {seed}, op {op}");
                assert_eq!(format!("{floor_a:?}"), format!("{floor_b:?}"));
                // Nothing left out afterwards: the fleet itself is unchanged.
                let c = shared.place(&fleet, &req);
                let d = Placer::new(profile.clone()).place(&fleet, &req);
                assert_eq!(format!("{c:?}"), format!("{d:?}"), "seed {seed}, op {op}");
                if let Ok(p) = c {
                    let group = req.spread.as_ref().map(|s| s.group.as_str());
                    fleet.allocate(&format!("a{op}"), group, &p.pods).unwrap();
                }
            }
        }
    }

    /// A domain that cannot hold the gang is skipped by the index without scanning it, and
    /// one that can is never skipped.
    #[test]
    fn index_bound_is_an_upper_bound() {
        let mut rng = Rng::new(11);
        let mut fleet = Fleet::new(TopologyConfig::default());
        for i in 0..48 {
            fleet
                .add_node(random_node(&mut rng, format!("n{i}")))
                .unwrap();
        }
        let mut pl = Placer::new(WorkloadProfile::inference_default());
        for op in 0..300 {
            let req = random_request(&mut rng);
            pl.ensure_compiled(&fleet);
            let Ok(rq) = pl.resolve(&fleet, &req) else {
                continue;
            };
            pl.sync(&fleet);
            if let GpuDemand::Whole(g) = rq.demand {
                let need = u64::from(g) * u64::from(rq.pods);
                let prods: Vec<usize> = rq
                    .allowed
                    .as_ref()
                    .map_or(Vec::new(), |a| (0..a.len()).filter(|&p| a[p]).collect());
                let ctx = std::mem::take(&mut pl.index.ctx);
                for l in 0..fleet.domains.len() {
                    for d in 0..fleet.domains[l].members.len() {
                        if rq.allowed.is_some() && prods.is_empty() {
                            continue;
                        }
                        if !pl.index_room(l, d, need, &prods) {
                            let members = fleet.domains[l].members[d].clone();
                            assert!(!pl.quick_room(&fleet, &rq, &members));
                            assert!(
                                pl.greedy(&fleet, &ctx, &rq, Some(&members), GMode::Any)
                                    .is_none(),
                                "op {op}: pruned a domain that fits"
                            );
                        }
                    }
                }
                pl.index.ctx = ctx;
            }
            if let Ok(p) = pl.place(&fleet, &req) {
                fleet.allocate(&format!("a{op}"), None, &p.pods).unwrap();
            }
        }
    }
}
