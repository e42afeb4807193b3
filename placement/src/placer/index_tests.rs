//! The incremental index, the domain pruning and the per-domain greedy cache must never
//! change a decision: random fleets and operation sequences, accelerated placer against
//! the reference that rebuilds everything and runs every greedy pass.

use super::types::GMode;
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
