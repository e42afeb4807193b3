use std::collections::BTreeSet;

use crate::*;

const CLIQUE: &str = LABEL_GPU_CLIQUE;

fn pcie_topo() -> GpuTopology {
    GpuTopology {
        groups: Some(vec![vec![0, 1, 2, 3], vec![4, 5, 6, 7]]),
        numa: None,
    }
}

fn pcie_fleet(nodes: usize) -> Fleet {
    let mut f = Fleet::new(TopologyConfig::default());
    for i in 0..nodes {
        f.add_node(
            NodeSpec::new(format!("p{i:03}"), "NVIDIA-L40S", 8)
                .label(LABEL_ZONE, "z1")
                .label(LABEL_RACK, &format!("r{}", i / 4))
                .topology(&pcie_topo()),
        )
        .unwrap();
    }
    f
}

fn clique_fleet(cliques: usize, per: usize) -> Fleet {
    let mut f = Fleet::new(TopologyConfig::default());
    for c in 0..cliques {
        for i in 0..per {
            f.add_node(
                NodeSpec::new(format!("c{c}-n{i:02}"), "NVIDIA-H100-80GB-HBM3", 8)
                    .label(LABEL_ZONE, "z1")
                    .label(LABEL_RACK, &format!("rack{c}"))
                    .label(CLIQUE, &format!("clique{c}")),
            )
            .unwrap();
        }
    }
    f
}

fn sluice() -> Placer {
    Placer::new(WorkloadProfile::inference_default())
}

/// One pod taking all 8 GPUs of node `n`.
fn whole_node(n: &str) -> PodAssignment {
    PodAssignment {
        node: n.into(),
        gpus: (0..8).collect(),
        milli_per_gpu: 1000,
        cpu_milli: 0,
        memory_mib: 0,
        mig: None,
    }
}

fn commit(f: &mut Fleet, id: &str, p: &GangPlacement) {
    f.allocate(id, None, &p.pods).unwrap();
}

#[test]
fn annotation_parses_and_validates() {
    let t = GpuTopology::parse(r#"{"groups":[[0,1,2,3],[4,5,6,7]]}"#).unwrap();
    assert_eq!(t.group_of(8).unwrap(), vec![0, 0, 0, 0, 1, 1, 1, 1]);
    let t = GpuTopology::parse(r#"{"numa":[1,1,0,0]}"#).unwrap();
    assert_eq!(t.group_of(4).unwrap(), vec![1, 1, 0, 0]);
    assert!(
        GpuTopology::parse(r#"{"groups":[[0,1],[1,2,3]]}"#)
            .unwrap()
            .group_of(4)
            .is_err()
    );
    assert!(
        GpuTopology::parse(r#"{"groups":[[0,1]]}"#)
            .unwrap()
            .group_of(4)
            .is_err()
    );
    assert!(
        GpuTopology::parse(r#"{"groups":[[0,9]]}"#)
            .unwrap()
            .group_of(2)
            .is_err()
    );
    assert_eq!(GpuTopology::default().group_of(3).unwrap(), vec![0, 0, 0]);
    let round = GpuTopology::parse(&pcie_topo().to_annotation()).unwrap();
    assert_eq!(round, pcie_topo());
}

#[test]
fn bad_annotation_is_a_node_error() {
    let mut f = Fleet::new(TopologyConfig::default());
    let mut spec = NodeSpec::new("n", "X", 4);
    spec.annotations
        .insert(GPU_TOPOLOGY_ANNOTATION.into(), "{not json".into());
    assert!(matches!(f.add_node(spec), Err(FleetError::BadNode { .. })));
}

#[test]
fn gpu_count_and_memory_from_gfd_labels() {
    let mut f = Fleet::new(TopologyConfig::default());
    let mut spec = NodeSpec {
        name: "gfd".into(),
        ..Default::default()
    };
    spec.labels
        .insert(LABEL_GPU_PRODUCT.into(), "NVIDIA-A100-SXM4-80GB".into());
    spec.labels.insert(LABEL_GPU_COUNT.into(), "4".into());
    spec.labels.insert(LABEL_GPU_MEMORY.into(), "81920".into());
    f.add_node(spec).unwrap();
    assert_eq!(f.total_gpus(), 4);
    let mut p = sluice();
    let ok = GangRequest::gpus(1, 1).min_memory_mib(80_000);
    assert!(p.place(&f, &ok).is_ok());
    let too_big = GangRequest::gpus(1, 1).min_memory_mib(100_000);
    assert!(matches!(
        p.place(&f, &too_big),
        Err(PlaceError::NoMatchingGpu { .. })
    ));
}

#[test]
fn duplicate_and_unknown_nodes() {
    let mut f = pcie_fleet(1);
    assert!(matches!(
        f.add_node(NodeSpec::new("p000", "X", 1)),
        Err(FleetError::DuplicateNode(_))
    ));
    assert!(matches!(
        f.remove_node("nope"),
        Err(FleetError::UnknownNode(_))
    ));
}

#[test]
fn single_pod_whole_gpus() {
    let f = pcie_fleet(2);
    let p = sluice().place(&f, &GangRequest::gpus(1, 2)).unwrap();
    assert_eq!(p.pods.len(), 1);
    assert_eq!(p.pods[0].gpus.len(), 2);
    assert_eq!(p.pods[0].milli_per_gpu, 1000);
}

#[test]
fn required_gpu_group_is_respected() {
    let mut f = pcie_fleet(1);
    let mut pl = sluice();
    // Occupy GPU 0 and GPU 4: each group has 3 whole GPUs left, 6 in total.
    f.allocate(
        "x",
        None,
        &[PodAssignment {
            node: "p000".into(),
            gpus: vec![0, 4],
            milli_per_gpu: 1000,
            cpu_milli: 0,
            memory_mib: 0,
            mig: None,
        }],
    )
    .unwrap();
    let req = GangRequest::gpus(1, 4).required(TopologyLevel::GpuGroup);
    let err = pl.place(&f, &req).unwrap_err();
    assert!(
        matches!(err, PlaceError::InsufficientCapacity { .. }),
        "{err}"
    );
    // Without the requirement it spans groups.
    let p = pl.place(&f, &GangRequest::gpus(1, 4)).unwrap();
    assert_eq!(p.pods[0].gpus.len(), 4);
    // A 3-GPU request inside one group fits.
    let p = pl
        .place(
            &f,
            &GangRequest::gpus(1, 3).required(TopologyLevel::GpuGroup),
        )
        .unwrap();
    assert!(
        f.within_one_domain(&p.pods, &TopologyLevel::GpuGroup)
            .unwrap()
    );
}

#[test]
fn tp2_keeps_a_whole_group_free() {
    // One node, group 0 has 2 GPUs used: a TP2 should go into group 0, not break group 1.
    let mut f = pcie_fleet(1);
    f.allocate(
        "x",
        None,
        &[PodAssignment {
            node: "p000".into(),
            gpus: vec![0, 1],
            milli_per_gpu: 1000,
            cpu_milli: 0,
            memory_mib: 0,
            mig: None,
        }],
    )
    .unwrap();
    let p = sluice()
        .place(
            &f,
            &GangRequest::gpus(1, 2).required(TopologyLevel::GpuGroup),
        )
        .unwrap();
    assert_eq!(p.pods[0].gpus, vec![2, 3]);
}

#[test]
fn whole_free_nodes_are_kept_for_big_requests() {
    // Node a has 4 GPUs used, b is empty: a 1-GPU pod goes to a.
    let mut f = pcie_fleet(2);
    f.allocate(
        "x",
        None,
        &[PodAssignment {
            node: "p001".into(),
            gpus: vec![0, 1, 2, 3],
            milli_per_gpu: 1000,
            cpu_milli: 0,
            memory_mib: 0,
            mig: None,
        }],
    )
    .unwrap();
    let p = sluice().place(&f, &GangRequest::gpus(1, 1)).unwrap();
    assert_eq!(p.pods[0].node, "p001");
    assert!(p.pods[0].gpus[0] >= 4);
}

#[test]
fn gang_is_all_or_nothing() {
    let mut f = clique_fleet(2, 3);
    let mut pl = sluice();
    // 4 nodes of 8 GPUs in one clique: impossible (cliques have 3 nodes).
    let req = GangRequest::gpus(4, 8).required(TopologyLevel::label(CLIQUE));
    let err = pl.place(&f, &req).unwrap_err();
    assert!(
        matches!(err, PlaceError::RequiredDomainTooSmall { largest: 3, .. }),
        "{err}"
    );
    assert_eq!(f.allocated_milli(), 0);
    // 3 nodes fit in a clique.
    let req = GangRequest::gpus(3, 8).required(TopologyLevel::label(CLIQUE));
    let p = pl.place(&f, &req).unwrap();
    assert_eq!(p.pods.len(), 3);
    assert!(
        f.within_one_domain(&p.pods, &TopologyLevel::label(CLIQUE))
            .unwrap()
    );
    let nodes: BTreeSet<_> = p.pods.iter().map(|a| a.node.clone()).collect();
    assert_eq!(nodes.len(), 3);
    commit(&mut f, "g1", &p);
    // Break the second clique: one GPU on one node.
    let one = pl.place(&f, &GangRequest::gpus(1, 1)).unwrap();
    commit(&mut f, "one", &one);
    let err = pl.place(&f, &req).unwrap_err();
    assert!(
        matches!(err, PlaceError::RequiredDomainFull { .. }),
        "{err}"
    );
}

#[test]
fn multi_node_gangs_leave_whole_cliques() {
    // Two cliques of 4 nodes; a 2-node gang, then another: both land in the same clique,
    // keeping the other clique whole for a 4-node gang.
    let mut f = clique_fleet(2, 4);
    let mut profile = WorkloadProfile::inference_default();
    profile.add(
        GangRequest::gpus(4, 8).required(TopologyLevel::label(CLIQUE)),
        1.0,
    );
    profile.add(
        GangRequest::gpus(2, 8).required(TopologyLevel::label(CLIQUE)),
        1.0,
    );
    let mut pl = Placer::new(profile);
    let req = GangRequest::gpus(2, 8).required(TopologyLevel::label(CLIQUE));
    for i in 0..2 {
        let p = pl.place(&f, &req).unwrap();
        commit(&mut f, &format!("g{i}"), &p);
    }
    let big = GangRequest::gpus(4, 8).required(TopologyLevel::label(CLIQUE));
    assert!(pl.place(&f, &big).is_ok());
}

#[test]
fn single_pods_do_not_break_empty_cliques() {
    let mut f = clique_fleet(2, 2);
    let mut profile = WorkloadProfile::inference_default();
    profile.add(
        GangRequest::gpus(2, 8).required(TopologyLevel::label(CLIQUE)),
        1.0,
    );
    let mut pl = Placer::new(profile);
    // Fill one node of clique 1 partly, then a TP1 must not go to clique 0... unless the
    // first node is clique 0; use the placement of the first pod as the reference.
    let a = pl.place(&f, &GangRequest::gpus(1, 1)).unwrap();
    commit(&mut f, "a", &a);
    let b = pl.place(&f, &GangRequest::gpus(1, 4)).unwrap();
    commit(&mut f, "b", &b);
    let dom = |n: &str| f.domain_of(n, &TopologyLevel::label(CLIQUE)).unwrap();
    assert_eq!(dom(&a.pods[0].node), dom(&b.pods[0].node));
    let gang = GangRequest::gpus(2, 8).required(TopologyLevel::label(CLIQUE));
    assert!(pl.place(&f, &gang).is_ok());
}

#[test]
fn preferred_level_is_used_when_possible_and_dropped_otherwise() {
    let mut f = clique_fleet(2, 2);
    let mut pl = sluice();
    let req = GangRequest::gpus(2, 8)
        .required(TopologyLevel::label(LABEL_ZONE))
        .preferred(TopologyLevel::label(CLIQUE));
    let p = pl.place(&f, &req).unwrap();
    assert!(p.preferred_satisfied);
    commit(&mut f, "a", &p);
    // Break the remaining clique's second node partly; a 2-node gang no longer fits in
    // one clique, but fits in the zone... it does not: only 1 whole node is left.
    let x = pl.place(&f, &GangRequest::gpus(1, 1)).unwrap();
    commit(&mut f, "x", &x);
    assert!(pl.place(&f, &req).is_err());
    f.release("x").unwrap();
    f.release("a").unwrap();
    // One node per clique used partly: 2 whole nodes, one in each clique.
    for (i, n) in ["c0-n00", "c1-n00"].iter().enumerate() {
        f.allocate(
            &format!("y{i}"),
            None,
            &[PodAssignment {
                node: n.to_string(),
                gpus: vec![0],
                milli_per_gpu: 1000,
                cpu_milli: 0,
                memory_mib: 0,
                mig: None,
            }],
        )
        .unwrap();
    }
    let p = pl.place(&f, &req).unwrap();
    assert!(!p.preferred_satisfied);
    assert!(
        f.within_one_domain(&p.pods, &TopologyLevel::label(LABEL_ZONE))
            .unwrap()
    );
}

#[test]
fn milli_shares_pack_onto_used_gpus() {
    let mut f = pcie_fleet(1);
    let mut pl = Placer::new({
        let mut p = WorkloadProfile::new();
        p.add(GangRequest::share(500), 1.0);
        p.add(GangRequest::gpus(1, 1), 1.0);
        p
    });
    let a = pl.place(&f, &GangRequest::share(500)).unwrap();
    assert_eq!(a.pods[0].milli_per_gpu, 500);
    commit(&mut f, "a", &a);
    let b = pl.place(&f, &GangRequest::share(500)).unwrap();
    assert_eq!(
        b.pods[0].gpus, a.pods[0].gpus,
        "second half goes onto the same GPU"
    );
    commit(&mut f, "b", &b);
    let free = f.free_milli("p000").unwrap();
    assert_eq!(free.iter().filter(|&&x| x == 1000).count(), 7);
    // 7 GPUs free + nothing shared left: a 600 share goes onto a fresh GPU.
    let c = pl.place(&f, &GangRequest::share(600)).unwrap();
    assert_ne!(c.pods[0].gpus, a.pods[0].gpus);
}

#[test]
fn milli_one_thousand_is_one_gpu() {
    assert_eq!(GpuDemand::Milli(1000).normalized(), GpuDemand::Whole(1));
    assert_eq!(GpuDemand::Whole(0).normalized(), GpuDemand::None);
}

#[test]
fn product_selector_and_errors() {
    let mut f = pcie_fleet(1);
    f.add_node(NodeSpec::new("h0", "NVIDIA-H100-80GB-HBM3", 8))
        .unwrap();
    let mut pl = sluice();
    let p = pl
        .place(
            &f,
            &GangRequest::gpus(1, 1).products(["NVIDIA-H100-80GB-HBM3"]),
        )
        .unwrap();
    assert_eq!(p.pods[0].node, "h0");
    let err = pl
        .place(&f, &GangRequest::gpus(1, 1).products(["NVIDIA-B200"]))
        .unwrap_err();
    assert!(matches!(err, PlaceError::NoMatchingGpu { .. }));
    assert!(err.to_string().contains("NVIDIA-B200"));
    let err = pl.place(&f, &GangRequest::gpus(1, 16)).unwrap_err();
    assert!(
        matches!(err, PlaceError::PodLargerThanAnyNode { .. }),
        "{err}"
    );
    let err = pl
        .place(
            &f,
            &GangRequest::gpus(1, 1).required(TopologyLevel::label("nope")),
        )
        .unwrap_err();
    assert!(matches!(err, PlaceError::UnknownLevel(_)));
    assert!(matches!(
        pl.place(&f, &GangRequest::gpus(0, 1)),
        Err(PlaceError::InvalidRequest(_))
    ));
}

#[test]
fn mig_selector() {
    let mut f = Fleet::new(TopologyConfig::default());
    f.add_node(
        NodeSpec::new("mig", "NVIDIA-A100-SXM4-40GB-MIG-1g.5gb", 7)
            .label(LABEL_MIG_STRATEGY, "single"),
    )
    .unwrap();
    f.add_node(NodeSpec::new("full", "NVIDIA-A100-SXM4-40GB", 8))
        .unwrap();
    let mut pl = sluice();
    let mut only = GangRequest::gpus(1, 1);
    only.selector.mig = MigSelector::Only;
    assert_eq!(pl.place(&f, &only).unwrap().pods[0].node, "mig");
    let mut none = GangRequest::gpus(1, 1);
    none.selector.mig = MigSelector::Exclude;
    assert_eq!(pl.place(&f, &none).unwrap().pods[0].node, "full");
    let slice = GangRequest::gpus(1, 1).products(["NVIDIA-A100-SXM4-40GB-MIG-1g.5gb"]);
    assert_eq!(pl.place(&f, &slice).unwrap().pods[0].node, "mig");
}

#[test]
fn cpu_and_memory_limit_nodes() {
    let mut f = Fleet::new(TopologyConfig::default());
    f.add_node(NodeSpec::new("small", "G", 8).resources(4000, 16384))
        .unwrap();
    f.add_node(NodeSpec::new("big", "G", 8).resources(64000, 262144))
        .unwrap();
    let mut pl = sluice();
    let p = pl
        .place(&f, &GangRequest::gpus(1, 1).resources(8000, 1024))
        .unwrap();
    assert_eq!(p.pods[0].node, "big");
    let err = pl
        .place(&f, &GangRequest::gpus(1, 1).resources(128_000, 1024))
        .unwrap_err();
    assert!(
        matches!(err, PlaceError::PodLargerThanAnyNode { .. }),
        "{err}"
    );
}

#[test]
fn spread_across_racks() {
    let mut f = pcie_fleet(8); // racks r0 (p000-p003), r1 (p004-p007)
    let mut pl = sluice();
    let req = GangRequest::gpus(1, 4)
        .required(TopologyLevel::GpuGroup)
        .spread(TopologyLevel::label(LABEL_RACK), "llama", None);
    let mut racks = Vec::new();
    for i in 0..4 {
        let p = pl
            .place_and_allocate(&mut f, &format!("r{i}"), &req)
            .unwrap();
        racks.push(
            f.domain_of(&p.pods[0].node, &TopologyLevel::label(LABEL_RACK))
                .unwrap()
                .unwrap(),
        );
    }
    let r0 = racks.iter().filter(|r| r.ends_with("r0")).count();
    assert_eq!(r0, 2, "{racks:?}");
}

#[test]
fn spread_max_skew_is_hard() {
    let mut f = pcie_fleet(8);
    let mut pl = sluice().with_config(PlacerConfig {
        spread_weight: 0.0,
        ..PlacerConfig::default()
    });
    let req = GangRequest::gpus(1, 8).spread(TopologyLevel::label(LABEL_RACK), "s", Some(1));
    for i in 0..8 {
        pl.place_and_allocate(&mut f, &format!("s{i}"), &req)
            .unwrap();
    }
    // Release both replicas... instead: fill rack r0 with other work so only r1 has room.
    let mut f = pcie_fleet(8);
    for n in ["p000", "p001", "p002", "p003"] {
        f.allocate(n, None, &[whole_node(n)]).unwrap();
    }
    pl.place_and_allocate(&mut f, "a", &req).unwrap();
    let err = pl.place_and_allocate(&mut f, "b", &req).unwrap_err();
    assert!(
        matches!(err, PlaceError::SpreadUnsatisfiable { .. }),
        "{err}"
    );
}

/// A binder that cordons eligible but less preferred nodes for a first attempt passes the
/// spread floor it read before: `max_skew` still counts the hidden domains.
#[test]
fn spread_floor_keeps_max_skew_over_hidden_domains() {
    let req = GangRequest::gpus(1, 8).spread(TopologyLevel::label(LABEL_RACK), "s", Some(1));
    let mut pl = sluice();
    let mut f = pcie_fleet(8);
    // Two replicas in rack r0, none in r1.
    for (id, n) in [("a", "p000"), ("b", "p001")] {
        f.allocate(id, Some("s"), &[whole_node(n)]).unwrap();
    }
    let floor = pl.spread_floor(&f, &req).unwrap();
    assert_eq!(floor, 0);
    for n in ["p004", "p005", "p006", "p007"] {
        f.set_schedulable(n, false).unwrap();
    }
    // Without the floor, hiding r1 makes r0 the emptiest domain and a third replica fits
    // there (skew 3 against the hidden r1)...
    assert!(pl.place(&f, &req).is_ok());
    // ... with it, the hard limit holds.
    let mut with_floor = req.clone();
    with_floor.spread.as_mut().unwrap().floor = Some(floor);
    let err = pl.place(&f, &with_floor).unwrap_err();
    assert!(
        matches!(err, PlaceError::SpreadUnsatisfiable { .. }),
        "{err}"
    );
}

#[test]
fn deterministic_across_instances() {
    let reqs: Vec<GangRequest> = (0..60)
        .map(|i| match i % 5 {
            0 => GangRequest::gpus(1, 1),
            1 => GangRequest::gpus(1, 2).required(TopologyLevel::GpuGroup),
            2 => GangRequest::share(300),
            3 => GangRequest::gpus(2, 8).required(TopologyLevel::label(LABEL_RACK)),
            _ => GangRequest::gpus(1, 4).required(TopologyLevel::GpuGroup),
        })
        .collect();
    let run = |policy: Policy| {
        let mut f = pcie_fleet(16);
        let mut pl = Placer::with_policy(policy, WorkloadProfile::from_requests(&reqs));
        let mut out = Vec::new();
        for (i, r) in reqs.iter().enumerate() {
            match pl.place(&f, r) {
                Ok(p) => {
                    commit(&mut f, &i.to_string(), &p);
                    out.push(format!("{:?}", p.pods));
                }
                Err(e) => out.push(e.to_string()),
            }
        }
        out
    };
    for policy in [Policy::Sluice, Policy::Fgd, Policy::Random { seed: 7 }] {
        assert_eq!(run(policy), run(policy), "{policy:?}");
    }
}

#[test]
fn fragmentation_score_ordering() {
    // Of two placements of a 1-GPU pod, breaking a whole free node costs more than using a
    // partly used one (for a workload with 8-GPU tasks).
    let mut profile = WorkloadProfile::new();
    profile.add(GangRequest::gpus(1, 8), 1.0);
    profile.add(GangRequest::gpus(1, 1), 1.0);
    let mut f = Fleet::new(TopologyConfig::new(Vec::<String>::new()));
    f.add_node(NodeSpec::new("a", "G", 8)).unwrap();
    let mut pl = Placer::with_policy(Policy::Fgd, profile);
    let empty = pl.fleet_fragmentation(&f);
    assert_eq!(empty, 0.0);
    let p = pl.place(&f, &GangRequest::gpus(1, 1)).unwrap();
    // Breaking the empty node: its 7 remaining GPUs become fragmented for the 8-GPU type
    // (weight 1/2): +3.5 GPUs.
    assert!((p.score - 3.5).abs() < 1e-9, "{}", p.score);
    commit(&mut f, "x", &p);
    let q = pl.place(&f, &GangRequest::gpus(1, 1)).unwrap();
    // Now the node is already broken: using one more GPU lowers fragmentation by 0.5.
    assert!((q.score + 0.5).abs() < 1e-9, "{}", q.score);
    assert!((pl.fleet_fragmentation(&f) - 3.5).abs() < 1e-9);
}

#[test]
fn baselines_place_and_respect_required_domains() {
    for policy in [
        Policy::FirstFit,
        Policy::BestFit,
        Policy::Packing,
        Policy::Random { seed: 1 },
        Policy::Fgd,
    ] {
        let mut f = clique_fleet(3, 3);
        let mut pl = Placer::with_policy(policy, WorkloadProfile::inference_default());
        let gang = GangRequest::gpus(3, 8).required(TopologyLevel::label(CLIQUE));
        let tp4 = GangRequest::gpus(1, 4).required(TopologyLevel::GpuGroup);
        for i in 0..2 {
            let p = pl.place(&f, &gang).unwrap();
            assert!(
                f.within_one_domain(&p.pods, &TopologyLevel::label(CLIQUE))
                    .unwrap()
            );
            commit(&mut f, &format!("g{i}"), &p);
        }
        let p = pl.place(&f, &tp4).unwrap();
        commit(&mut f, "t", &p);
        assert!(pl.place(&f, &gang).is_err(), "{policy:?}");
    }
}

#[test]
fn node_removal_returns_lost_allocations() {
    let mut f = pcie_fleet(2);
    let mut pl = sluice();
    let p = pl
        .place_and_allocate(&mut f, "rep-0", &GangRequest::gpus(2, 8))
        .unwrap();
    assert_eq!(p.pods.len(), 2);
    let lost = f.remove_node("p000").unwrap();
    assert_eq!(lost, vec!["rep-0".to_string()]);
    assert_eq!(f.allocated_milli(), 0);
    assert_eq!(f.total_gpus(), 8);
    assert!(pl.place(&f, &GangRequest::gpus(2, 8)).is_err());
    assert!(pl.place(&f, &GangRequest::gpus(1, 8)).is_ok());
}

#[test]
fn cordoned_nodes_are_skipped() {
    let mut f = pcie_fleet(2);
    f.set_schedulable("p000", false).unwrap();
    let p = sluice().place(&f, &GangRequest::gpus(1, 1)).unwrap();
    assert_eq!(p.pods[0].node, "p001");
}

#[test]
fn allocate_is_atomic_and_release_restores() {
    let mut f = pcie_fleet(1);
    let good = PodAssignment {
        node: "p000".into(),
        gpus: vec![0],
        milli_per_gpu: 1000,
        cpu_milli: 0,
        memory_mib: 0,
        mig: None,
    };
    let bad = PodAssignment {
        gpus: vec![0],
        ..good.clone()
    };
    assert!(matches!(
        f.allocate("x", None, &[good.clone(), bad]),
        Err(FleetError::Overcommitted { .. })
    ));
    assert_eq!(f.allocated_milli(), 0);
    f.allocate("x", None, std::slice::from_ref(&good)).unwrap();
    assert!(matches!(
        f.allocate("x", None, &[]),
        Err(FleetError::DuplicateAllocation(_))
    ));
    f.release("x").unwrap();
    assert_eq!(f.allocated_milli(), 0);
    assert!(f.release("x").is_err());
}

#[test]
fn multi_pod_on_one_node_and_one_group() {
    let f = pcie_fleet(2);
    let mut pl = sluice();
    let p = pl
        .place(
            &f,
            &GangRequest::gpus(2, 2).required(TopologyLevel::GpuGroup),
        )
        .unwrap();
    assert!(
        f.within_one_domain(&p.pods, &TopologyLevel::GpuGroup)
            .unwrap()
    );
    let all: BTreeSet<u32> = p.pods.iter().flat_map(|a| a.gpus.clone()).collect();
    assert_eq!(all.len(), 4);
    let p = pl
        .place(&f, &GangRequest::gpus(4, 2).required(TopologyLevel::Node))
        .unwrap();
    assert!(f.within_one_domain(&p.pods, &TopologyLevel::Node).unwrap());
}

#[test]
fn missing_label_makes_a_singleton_domain() {
    let mut f = Fleet::new(TopologyConfig::default());
    f.add_node(NodeSpec::new("a", "G", 8).label(CLIQUE, "c"))
        .unwrap();
    f.add_node(NodeSpec::new("b", "G", 8)).unwrap();
    let req = GangRequest::gpus(2, 8).required(TopologyLevel::label(CLIQUE));
    assert!(matches!(
        sluice().place(&f, &req),
        Err(PlaceError::RequiredDomainTooSmall { .. })
    ));
}

/// A fleet with two mixed-MIG A100 nodes (one from GFD labels, one from allocatable) and a
/// plain H100 node.
fn mixed_mig_fleet() -> Fleet {
    let labelled = NodeSpec::new("mig-a", "NVIDIA-A100-SXM4-40GB", 0)
        .label(LABEL_MIG_STRATEGY, "mixed")
        .label("nvidia.com/mig-1g.5gb.count", "7")
        .label("nvidia.com/mig-1g.5gb.memory", "4864");
    let allocatable = NodeSpec::new("mig-b", "NVIDIA-A100-SXM4-40GB", 0)
        .mig("3g.20gb", 2)
        .mig("1g.5gb", 0);
    Fleet::from_nodes(
        TopologyConfig::default(),
        [
            NodeSpec::new("h100", "NVIDIA-H100-80GB-HBM3", 8),
            labelled,
            allocatable,
        ],
    )
    .unwrap()
}

#[test]
fn mixed_mig_profile_goes_only_to_nodes_offering_it() {
    let mut f = mixed_mig_fleet();
    let mut p = Placer::new(WorkloadProfile::inference_default());
    let req = GangRequest::mig("1g.5gb", 1);
    for i in 0..7 {
        let placed = p.place(&f, &req).unwrap();
        let a = &placed.pods[0];
        // Only mig-a has 1g.5gb devices (mig-b lists the profile with 0).
        assert_eq!(a.node, "mig-a");
        assert!(a.gpus.is_empty());
        assert_eq!(
            a.mig,
            Some(MigDevices {
                profile: "1g.5gb".into(),
                count: 1
            })
        );
        f.allocate(&format!("r{i}"), None, &placed.pods).unwrap();
    }
    assert_eq!(f.free_mig("mig-a").unwrap()["1g.5gb"], 0);
    // No free slice left anywhere: not placed, and not a "no matching GPU" error.
    let err = p.place(&f, &req).unwrap_err();
    assert!(!matches!(err, PlaceError::NoMatchingGpu { .. }), "{err}");
    // Releasing one frees one device.
    f.release("r3").unwrap();
    assert_eq!(f.free_mig("mig-a").unwrap()["1g.5gb"], 1);
    assert_eq!(p.place(&f, &req).unwrap().pods[0].node, "mig-a");
    // Whole GPUs never go to the MIG nodes (no nvidia.com/gpu there).
    let whole = p.place(&f, &GangRequest::gpus(1, 1)).unwrap();
    assert_eq!(whole.pods[0].node, "h100");
    assert_eq!(whole.pods[0].mig, None);
}

#[test]
fn mixed_mig_unknown_profile_and_too_many_devices() {
    let f = mixed_mig_fleet();
    let mut p = Placer::new(WorkloadProfile::inference_default());
    let err = p.place(&f, &GangRequest::mig("7g.40gb", 1)).unwrap_err();
    assert!(matches!(err, PlaceError::NoMatchingGpu { .. }), "{err}");
    assert!(err.to_string().contains("7g.40gb"), "{err}");
    // 3 devices of 3g.20gb: no node has that many.
    let err = p.place(&f, &GangRequest::mig("3g.20gb", 3)).unwrap_err();
    assert!(err.to_string().contains("3g.20gb"), "{err}");
    // Cordoned: the only node with the profile is out.
    let mut f = f;
    f.set_schedulable("mig-b", false).unwrap();
    assert!(p.place(&f, &GangRequest::mig("3g.20gb", 1)).is_err());
}

#[test]
fn mixed_mig_gang_counts_devices_across_its_own_pods() {
    let mut f = mixed_mig_fleet();
    f.add_node(NodeSpec::new("mig-c", "NVIDIA-A100-SXM4-40GB", 0).mig("3g.20gb", 2))
        .unwrap();
    let mut p = Placer::new(WorkloadProfile::inference_default());
    // 2 pods × 2 devices: each node holds one pod, so the gang spans mig-b and mig-c.
    let gang = GangRequest {
        pods: 2,
        ..GangRequest::mig("3g.20gb", 2)
    };
    let placed = p.place(&f, &gang).unwrap();
    let nodes: std::collections::BTreeSet<&str> =
        placed.pods.iter().map(|a| a.node.as_str()).collect();
    assert_eq!(nodes, ["mig-b", "mig-c"].into_iter().collect());
    f.allocate("g", None, &placed.pods).unwrap();
    assert!(p.place(&f, &GangRequest::mig("3g.20gb", 1)).is_err());
    // 2 pods × 1 device fit on one node.
    f.release("g").unwrap();
    let pair = GangRequest {
        pods: 2,
        ..GangRequest::mig("3g.20gb", 1)
    }
    .required(TopologyLevel::Node);
    let placed = p.place(&f, &pair).unwrap();
    assert_eq!(placed.pods[0].node, placed.pods[1].node);
    // The fleet refuses an over-committed MIG allocation.
    let mut over = placed.pods.clone();
    over[1].mig = Some(MigDevices {
        profile: "3g.20gb".into(),
        count: 2,
    });
    assert!(matches!(
        f.allocate("over", None, &over),
        Err(FleetError::Overcommitted { .. })
    ));
    assert_eq!(f.free_mig(&over[0].node).unwrap()["3g.20gb"], 2);
}

#[test]
fn mixed_mig_bad_label_and_request_json() {
    let bad = NodeSpec::new("m", "NVIDIA-A100-SXM4-40GB", 0)
        .label(LABEL_MIG_STRATEGY, "mixed")
        .label("nvidia.com/mig-1g.5gb.count", "seven");
    let mut f = Fleet::new(TopologyConfig::default());
    assert!(matches!(f.add_node(bad), Err(FleetError::BadNode { .. })));
    // Without the mixed strategy the count labels are not read.
    let single = NodeSpec::new("s", "NVIDIA-A100-SXM4-40GB-MIG-1g.5gb", 7)
        .label(LABEL_MIG_STRATEGY, "single")
        .label("nvidia.com/mig-1g.5gb.count", "7");
    assert!(single.mig_profiles().unwrap().is_empty());
    // Requests without migDevices (older annotations) still parse; with it, round-trip.
    let old: GangRequest = serde_json::from_str(r#"{"pods":1,"gpu":{"whole":2}}"#).unwrap();
    assert_eq!(old.mig_devices, None);
    let req = GangRequest::mig("1g.5gb", 2);
    let json = serde_json::to_string(&req).unwrap();
    assert!(
        json.contains(r#""migDevices":{"profile":"1g.5gb","count":2}"#),
        "{json}"
    );
    assert_eq!(serde_json::from_str::<GangRequest>(&json).unwrap(), req);
}
