//! One node for one pod: the candidate GPU sets and their score under each policy.

use crate::fleet::{Fleet, MILLI_PER_GPU};
use crate::fx::splitmix64;
use crate::profile::{View, product_ok, whole_counts};
use crate::request::{GpuDemand, MigSelector};

use super::types::{Choice, Ctx, GMode, Overlay, Rq, mask_iter, view_of};
use super::{Placer, Policy};

impl Placer {
    /// Candidate GPU sets on a node for one pod, in a canonical order.
    pub(super) fn options(&self, v: &View, rq: &Rq, gmode: GMode, out: &mut Vec<u64>) {
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

    pub(super) fn milli_of(rq: &Rq) -> u32 {
        match rq.demand {
            GpuDemand::None => 0,
            GpuDemand::Whole(_) => MILLI_PER_GPU,
            GpuDemand::Milli(m) => m,
        }
    }

    /// The node-local part of the score and the GPU choice (memoisable for FGD/Sluice).
    pub(super) fn base_choice(
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
    pub(super) fn eval(
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
}
