//! The gang search: greedy passes over the fleet or over each candidate domain (pruned by
//! the index, cached per domain while it does not change), and the chosen placement.

use crate::fleet::{Fleet, MILLI_PER_GPU, PodAssignment};
use crate::profile::product_ok;
use crate::request::{GangPlacement, GangRequest, GpuDemand};

use super::types::{Choice, Ctx, GMode, Greedy, GreedyKey, Lvl, Overlay, Rq, mask_iter, view_of};
use super::{Placer, Policy};

impl Placer {
    /// Greedy: place the pods one by one inside `scope`, best node each time.
    pub(super) fn greedy(
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
    pub(super) fn quick_room(&self, fleet: &Fleet, rq: &Rq, members: &[usize]) -> bool {
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
    pub(super) fn index_room(&self, l: usize, d: usize, need: u64, prods: &[usize]) -> bool {
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
    pub(super) fn domain_sig(
        &self,
        fleet: &Fleet,
        ctx: &Ctx,
        lvl: Lvl,
        d: usize,
        out: &mut Vec<u64>,
    ) {
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
    pub(super) fn greedy_domain(
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

    pub(super) fn place_at(
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

    pub(super) fn place_gang(
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

    pub(super) fn output(
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
}
