//! Allocations: recording a placement (atomically), releasing it, and the per-group
//! replica counts per domain that spreading reads.

use crate::error::FleetError;
use crate::fx::FxMap;

use super::{AllocRecord, Fleet, MILLI_PER_GPU, PodAssignment, Scratch};

impl Fleet {
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
}
