//! Why a gang does not fit: the most specific [`PlaceError`] the fleet supports.

use crate::error::PlaceError;
use crate::fleet::{Fleet, MILLI_PER_GPU, Node};
use crate::profile::{product_ok, whole_counts};
use crate::request::{GangRequest, GpuDemand};

use super::Placer;
use super::types::{Lvl, Rq, view_of};

impl Placer {
    pub(super) fn diagnose(&self, fleet: &Fleet, req: &GangRequest, rq: &Rq) -> PlaceError {
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

    pub(super) fn group_capacity(n: &Node, rq: &Rq) -> u32 {
        let GpuDemand::Whole(g) = rq.demand else {
            return 1;
        };
        let mut sizes = vec![0u32; n.ngroups as usize];
        n.group_of.iter().for_each(|&gr| sizes[gr as usize] += 1);
        sizes.iter().map(|s| s / g.max(1)).max().unwrap_or(0)
    }

    pub(super) fn fit_now(n: &Node, rq: &Rq) -> u32 {
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
