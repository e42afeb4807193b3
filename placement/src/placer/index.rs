//! The placer's incrementally maintained per-fleet state.

use crate::fleet::{Fleet, MILLI_PER_GPU};
use crate::profile::{Compiled, pods_fit, product_ok};
use crate::request::MigSelector;

use super::types::{Ctx, DomAgg, view_of};

/// Incrementally maintained per-fleet state: Sluice's domain aggregates (the context of a
/// decision), change epochs per domain and an index of whole free GPUs per domain and
/// product. Updated at the start of each decision from the nodes whose state changed since
/// the previous one (a scan of one integer per node), instead of being rebuilt.
#[derive(Default)]
pub(super) struct Index {
    pub(super) built: bool,
    pub(super) fleet_uid: u64,
    pub(super) generation: u64,
    /// Per node: what is counted (0: nothing; otherwise the interned state + 1 of a usable
    /// node).
    pub(super) seen: Vec<u64>,
    /// Per node: free milli-GPU counted.
    pub(super) free: Vec<u64>,
    /// Per node: whole free GPUs counted.
    pub(super) whole: Vec<u32>,
    /// Per node × domain type: pods of that type counted.
    pub(super) fit: Vec<u32>,
    /// Per node: when it last changed (`clock`).
    pub(super) node_epoch: Vec<u64>,
    /// Per label level, per domain: when a member last changed.
    pub(super) epoch: Vec<Vec<u64>>,
    pub(super) clock: u64,
    pub(super) nprod: usize,
    /// Per label level: whole free GPUs per (domain × products + product).
    pub(super) whole_by: Vec<Vec<u32>>,
    /// Sluice's aggregates (domain types, finest label level).
    pub(super) ctx: Ctx,
}

impl Index {
    /// A fresh index for `fleet`, with Sluice's domain aggregates when `compiled` is given
    /// (the Sluice policy; the baselines keep none).
    pub(super) fn new(fleet: &Fleet, compiled: Option<&Compiled>, generation: u64) -> Index {
        let levels = fleet.config().levels.len();
        let mut ctx = Ctx::default();
        if let Some(c) = compiled {
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
            generation,
            epoch: vec![Vec::new(); levels],
            whole_by: vec![Vec::new(); levels],
            nprod: fleet.products.len().max(1),
            ctx,
            ..Default::default()
        }
    }

    /// Re-count the nodes whose state or usability (live, schedulable, not in `excluded`)
    /// changed since the last call.
    pub(super) fn sync(&mut self, fleet: &Fleet, excluded: &[bool]) {
        let ix = self;
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
            let usable = node.usable() && !excluded.get(i).copied().unwrap_or(false);
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
}
