//! The placer: Sluice's policy and the baselines, in one gang-placement harness.
//!
//! - this file: the policies, the public API, request resolution and the index upkeep;
//! - [`types`]: the internal vocabulary (resolved request, decision context, cache keys);
//! - [`index`]: the incrementally maintained per-fleet aggregates;
//! - [`score`]: one node's candidate GPU sets and score for one pod;
//! - [`search`]: the gang search (greedy passes per domain, their cache, the output);
//! - [`diagnose`]: why a gang does not fit, as a [`PlaceError`].

mod diagnose;
mod index;
mod score;
mod search;
mod types;

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::error::{FleetError, PlaceError};
use crate::fleet::{Fleet, MILLI_PER_GPU, Node};
use crate::fx::FxMap;
use crate::profile::{Compiled, WorkloadProfile, allowed_products, product_ok};
use crate::request::{GangPlacement, GangRequest, GpuDemand, TopologyLevel};
use index::Index;
use types::{Choice, GREEDY_CACHE_MAX, Greedy, GreedyKey, Lvl, Rq, view_of};

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
            let compiled =
                (self.policy == Policy::Sluice).then(|| self.compiled.as_ref().expect("compiled"));
            self.index = Index::new(fleet, compiled, self.generation);
            self.greedy_cache.clear();
        }
        if self.greedy_cache.len() > GREEDY_CACHE_MAX {
            self.greedy_cache.clear();
        }
        self.index.sync(fleet, &self.excluded);
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
}

#[cfg(test)]
mod index_tests;
