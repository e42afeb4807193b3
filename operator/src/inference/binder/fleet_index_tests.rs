//! The index without a cluster: objects in, fleet out; and, over random event sequences,
//! the same fleet as a build from scratch of the objects it was fed.

use std::collections::BTreeMap;

use serde_json::json;
use sluice_placement::{GangRequest, Placer, TopologyLevel, WorkloadProfile};

use super::*;
use crate::inference::crd::{GANG_LABEL, SET_LABEL};

fn node(name: &str, gpus: u32, rv: &str, ready: bool, cordoned: bool) -> Node {
    serde_json::from_value(json!({
        "metadata": {"name": name, "resourceVersion": rv,
                     "labels": {"sluice.dev/rack": format!("r-{}", &name[..2])}},
        "spec": {"unschedulable": cordoned},
        "status": {"allocatable": {"nvidia.com/gpu": gpus.to_string(), "cpu": "64", "memory": "512Gi"},
                   "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]}
    }))
    .unwrap()
}

/// A pod of gang `gang` (set `set`), bound to `node` with `ids` when given.
fn pod(uid: &str, gang: &str, set: &str, node: Option<&str>, ids: Option<&str>, rv: &str) -> Pod {
    let gpus = ids.map_or(1, |i| i.split(',').count());
    let mut annotations = serde_json::Map::new();
    if let Some(ids) = ids {
        annotations.insert(GPU_IDS_ANNOTATION.into(), json!(ids));
    }
    serde_json::from_value(json!({
        "metadata": {"name": uid, "namespace": "ns", "uid": uid, "resourceVersion": rv,
                     "labels": {GANG_LABEL: gang, SET_LABEL: set},
                     "annotations": annotations},
        "spec": {"schedulerName": "sluice", "nodeName": node,
                 "containers": [{"name": "c", "resources": {
                     "limits": {"nvidia.com/gpu": gpus.to_string()},
                     "requests": {"cpu": "1", "memory": "1Gi"}}}]},
        "status": {"phase": "Running"}
    }))
    .unwrap()
}

fn free(ix: &FleetIndex, node: &str) -> Vec<u32> {
    ix.fleet().free_milli(node).unwrap().to_vec()
}

fn assignment(node: &str, gpus: &[u32]) -> PodAssignment {
    PodAssignment {
        node: node.into(),
        gpus: gpus.to_vec(),
        milli_per_gpu: 1000,
        cpu_milli: 1000,
        memory_mib: 1024,
        mig: None,
    }
}

#[test]
fn bound_pods_take_their_gpus_one_allocation_per_gang() {
    let mut ix = FleetIndex::new(TopologyConfig::default());
    ix.apply_node(&node("n1", 4, "1", true, false));
    ix.apply_pod(&pod("a", "g1", "s", Some("n1"), Some("0,1"), "1"));
    ix.apply_pod(&pod("b", "g1", "s", Some("n1"), Some("2"), "1"));
    assert!(ix.refresh().is_some(), "a new node rebuilds");
    assert_eq!(free(&ix, "n1"), vec![0, 0, 0, 1000]);
    assert_eq!(ix.fleet().allocation_ids(), vec!["ns/g1".to_string()]);
    // A pod that stops holding resources gives them back; deleting the last, the gang.
    let mut done = pod("b", "g1", "s", Some("n1"), Some("2"), "2");
    done.status.as_mut().unwrap().phase = Some("Succeeded".into());
    ix.apply_pod(&done);
    assert_eq!(ix.refresh(), None, "pods change the fleet in place");
    assert_eq!(free(&ix, "n1"), vec![0, 0, 1000, 1000]);
    ix.delete_pod("a");
    assert_eq!(free(&ix, "n1"), vec![1000; 4]);
    assert!(ix.fleet().allocation_ids().is_empty());
}

#[test]
fn heartbeats_change_nothing_and_a_cordon_only_schedulability() {
    let mut ix = FleetIndex::new(TopologyConfig::default());
    ix.apply_node(&node("n1", 1, "1", true, false));
    ix.refresh();
    let mut placer = Placer::new(WorkloadProfile::inference_default());
    let one = GangRequest::gpus(1, 1);
    assert!(placer.place(ix.fleet(), &one).is_ok());
    ix.apply_node(&node("n1", 1, "2", true, false));
    assert_eq!(ix.refresh(), None);
    ix.apply_node(&node("n1", 1, "3", true, true));
    assert_eq!(ix.refresh(), None);
    assert!(placer.place(ix.fleet(), &one).is_err(), "cordoned");
    ix.apply_node(&node("n1", 1, "4", false, false));
    assert!(placer.place(ix.fleet(), &one).is_err(), "not ready");
    ix.apply_node(&node("n1", 1, "5", true, false));
    assert!(placer.place(ix.fleet(), &one).is_ok());
    // New capacity: rebuilt, with the pods on it.
    ix.apply_pod(&pod("a", "g1", "s", Some("n1"), Some("0"), "1"));
    ix.apply_node(&node("n1", 2, "6", true, false));
    assert!(ix.refresh().is_some());
    assert_eq!(free(&ix, "n1"), vec![0, 1000]);
}

#[test]
fn a_gang_on_a_deleted_node_is_left_out_until_the_node_returns() {
    let mut ix = FleetIndex::new(TopologyConfig::default());
    ix.apply_node(&node("n1", 2, "1", true, false));
    ix.apply_node(&node("n2", 2, "1", true, false));
    ix.apply_pod(&pod("a", "g1", "s", Some("n1"), Some("0"), "1"));
    ix.apply_pod(&pod("b", "g1", "s", Some("n2"), Some("0"), "1"));
    ix.refresh();
    assert_eq!(free(&ix, "n1"), vec![0, 1000]);
    ix.delete_node("n2");
    ix.refresh();
    // The whole gang is out (a gang is recorded all or nothing).
    assert_eq!(free(&ix, "n1"), vec![1000, 1000]);
    ix.apply_node(&node("n2", 2, "2", true, false));
    ix.refresh();
    assert_eq!(free(&ix, "n1"), vec![0, 1000]);
    assert_eq!(free(&ix, "n2"), vec![0, 1000]);
}

#[test]
fn an_allocation_that_did_not_fit_is_recorded_once_capacity_is_released() {
    let mut ix = FleetIndex::new(TopologyConfig::default());
    ix.apply_node(&node("n1", 1, "1", true, false));
    ix.refresh();
    ix.apply_pod(&pod("a", "g1", "s", Some("n1"), Some("0"), "1"));
    // Over-committed (e.g. the cache shows a replacement before the old pod is gone).
    ix.apply_pod(&pod("b", "g2", "s", Some("n1"), Some("0"), "1"));
    assert_eq!(ix.fleet().allocation_ids(), vec!["ns/g1".to_string()]);
    ix.delete_pod("a");
    assert_eq!(ix.fleet().allocation_ids(), vec!["ns/g2".to_string()]);
    assert_eq!(free(&ix, "n1"), vec![0]);
}

#[test]
fn binds_of_the_binder_are_assumed_until_the_cache_shows_them() {
    let mut ix = FleetIndex::new(TopologyConfig::default());
    let t0 = Instant::now();
    ix.sync_nodes(&[Arc::new(node("n1", 4, "1", true, false))]);
    let pending = vec![
        Arc::new(pod("a", "g1", "s", None, None, "1")),
        Arc::new(pod("b", "g1", "s", None, None, "1")),
    ];
    ix.sync_pods(&pending, t0);
    let placed = vec![
        ("a".to_string(), assignment("n1", &[0])),
        ("b".to_string(), assignment("n1", &[1])),
    ];
    ix.assume("ns/g1", Some("ns/s"), &placed, t0).unwrap();
    assert!(ix.is_assumed("a") && ix.is_assumed("b"));
    assert_eq!(free(&ix, "n1"), vec![0, 0, 1000, 1000]);
    // Placed again under the same key: refused, nothing changes.
    assert!(ix.assume("ns/g1", None, &placed, t0).is_err());
    // The cache still shows them unbound: kept.
    ix.sync_pods(&pending, t0 + Duration::from_secs(1));
    assert!(ix.is_assumed("a"));
    // One bound as placed: confirmed, the gang's allocation unchanged.
    let bound_a = Arc::new(pod("a", "g1", "s", Some("n1"), Some("0"), "2"));
    ix.sync_pods(&[bound_a.clone(), pending[1].clone()], t0);
    assert!(!ix.is_assumed("a") && ix.is_assumed("b"));
    assert_eq!(free(&ix, "n1"), vec![0, 0, 1000, 1000]);
    assert_eq!(ix.fleet().allocation_ids(), vec!["ns/g1".to_string()]);
    // The other never shows up bound: forgotten after the TTL, the bound one stays.
    ix.sync_pods(&[bound_a, pending[1].clone()], t0 + ASSUME_TTL);
    assert!(!ix.is_assumed("b"));
    assert_eq!(free(&ix, "n1"), vec![0, 1000, 1000, 1000]);
}

#[test]
fn a_failed_bind_forgets_the_gang_and_a_deleted_pod_its_assumption() {
    let mut ix = FleetIndex::new(TopologyConfig::default());
    let t0 = Instant::now();
    ix.sync_nodes(&[Arc::new(node("n1", 2, "1", true, false))]);
    let pending = vec![Arc::new(pod("a", "g1", "s", None, None, "1"))];
    ix.sync_pods(&pending, t0);
    let placed = vec![("a".to_string(), assignment("n1", &[0]))];
    ix.assume("ns/g1", None, &placed, t0).unwrap();
    ix.forget_assumed("ns/g1");
    assert!(!ix.is_assumed("a"));
    assert_eq!(free(&ix, "n1"), vec![1000, 1000]);
    ix.assume("ns/g1", None, &placed, t0).unwrap();
    ix.sync_pods(&[], t0);
    assert!(!ix.is_assumed("a"));
    assert!(ix.fleet().allocation_ids().is_empty());
}

#[test]
fn pods_another_scheduler_bound_take_the_lowest_free_gpus() {
    let mut ix = FleetIndex::new(TopologyConfig::default());
    ix.apply_node(&node("n1", 4, "1", true, false));
    ix.refresh();
    ix.apply_pod(&pod("g", "g1", "s", Some("n1"), Some("0"), "1"));
    let mut other = pod("o", "x", "s", Some("n1"), None, "1");
    other.spec.as_mut().unwrap().scheduler_name = Some("default-scheduler".into());
    ix.apply_pod(&other);
    assert_eq!(free(&ix, "n1"), vec![0, 0, 1000, 1000]);
    let mut ids = ix.fleet().allocation_ids();
    ids.sort();
    assert_eq!(ids, vec!["ns/g1".to_string(), "pod/o".to_string()]);
}

/// The fleet as the binder built it from scratch before the index: nodes, then the pods
/// another scheduler bound (lowest free GPUs), then the gangs.
fn rebuilt(nodes: &BTreeMap<String, Node>, pods: &BTreeMap<String, Pod>) -> Fleet {
    let mut fleet = Fleet::new(TopologyConfig::default());
    for n in nodes.values() {
        let spec = node_spec(n).unwrap();
        let name = spec.name.clone();
        fleet.add_node(spec).unwrap();
        if !node_schedulable(n) {
            fleet.set_schedulable(&name, false).unwrap();
        }
    }
    let mut gangs: BTreeMap<String, (Option<String>, Vec<PodAssignment>)> = BTreeMap::new();
    for p in pods.values().filter(|p| holds_resources(p)) {
        let Some(node) = p.spec.as_ref().and_then(|s| s.node_name.clone()) else {
            continue;
        };
        let a = resolve(&fleet, &holding_of(p, node));
        if annotation(p, GPU_IDS_ANNOTATION).is_some() {
            let e = gangs
                .entry(gang_key(p))
                .or_insert((spread_group(p), Vec::new()));
            e.1.push(a);
        } else {
            let uid = p.metadata.uid.clone().unwrap();
            let _ = fleet.allocate(&format!("pod/{uid}"), None, &[a]);
        }
    }
    for (k, (group, pods)) in gangs {
        let _ = fleet.allocate(&k, group.as_deref(), &pods);
    }
    fleet
}

fn same_fleet(a: &Fleet, b: &Fleet, step: usize) {
    let mut ia = a.allocation_ids();
    let mut ib = b.allocation_ids();
    ia.sort();
    ib.sort();
    assert_eq!(ia, ib, "step {step}: allocations");
    let na: Vec<&str> = a.node_names().collect();
    assert_eq!(na, b.node_names().collect::<Vec<_>>(), "step {step}: nodes");
    for n in na {
        assert_eq!(a.free_milli(n), b.free_milli(n), "step {step}: node {n}");
    }
    // Schedulability and spread counts, as the placer sees them.
    let probes = [
        GangRequest::gpus(1, 1),
        GangRequest::gpus(2, 1).spread(TopologyLevel::Node, "ns/s0", Some(1)),
        GangRequest::gpus(1, 2).spread(TopologyLevel::label("sluice.dev/rack"), "ns/s1", None),
    ];
    for req in &probes {
        let pa = Placer::new(WorkloadProfile::inference_default()).place(a, req);
        let pb = Placer::new(WorkloadProfile::inference_default()).place(b, req);
        assert_eq!(format!("{pa:?}"), format!("{pb:?}"), "step {step}: {req:?}");
    }
}

/// Whether two pods holding resources name the same GPU of a node.
fn overcommitted(pods: &BTreeMap<String, Pod>) -> bool {
    let mut taken = std::collections::HashSet::new();
    for p in pods.values().filter(|p| holds_resources(p)) {
        let node = p.spec.as_ref().and_then(|s| s.node_name.clone()).unwrap();
        for g in gpu_ids(p).unwrap() {
            if !taken.insert((node.clone(), g)) {
                return true;
            }
        }
    }
    false
}

#[test]
fn incremental_fleet_equals_a_rebuild_on_random_events() {
    let mut compared = 0;
    for seed in 0..8u64 {
        let mut rng = sluice_placement::Rng::new(seed);
        let mut ix = FleetIndex::new(TopologyConfig::default());
        let mut nodes: BTreeMap<String, Node> = BTreeMap::new();
        let mut pods: BTreeMap<String, Pod> = BTreeMap::new();
        let mut rv = 0u64;
        let mut next_rv = || {
            rv += 1;
            rv.to_string()
        };
        for step in 0..300 {
            match rng.below(12) {
                0 if nodes.len() < 8 => {
                    let name = format!("n{}-{}", rng.below(3), rng.below(4));
                    let n = node(&name, 4, &next_rv(), true, false);
                    ix.apply_node(&n);
                    nodes.insert(name, n);
                }
                1 if !nodes.is_empty() => {
                    // Heartbeat, cordon, readiness.
                    let name = nodes.keys().nth(rng.below(nodes.len())).unwrap().clone();
                    let n = node(&name, 4, &next_rv(), rng.below(4) != 0, rng.below(4) == 0);
                    ix.apply_node(&n);
                    nodes.insert(name, n);
                }
                2 if !nodes.is_empty() && rng.below(3) == 0 => {
                    let name = nodes.keys().nth(rng.below(nodes.len())).unwrap().clone();
                    nodes.remove(&name);
                    ix.delete_node(&name);
                    // The pod garbage collector deletes the pods bound to a deleted node
                    // (not all at once: the first of them goes in a later step).
                    let on: Vec<String> = pods
                        .iter()
                        .filter(|(_, p)| {
                            p.spec.as_ref().unwrap().node_name.as_deref() == Some(name.as_str())
                        })
                        .map(|(uid, _)| uid.clone())
                        .skip(1)
                        .collect();
                    for uid in on {
                        pods.remove(&uid);
                        ix.delete_pod(&uid);
                    }
                }
                3 | 4 if !pods.is_empty() => {
                    let uid = pods.keys().nth(rng.below(pods.len())).unwrap().clone();
                    if rng.below(2) == 0 {
                        pods.remove(&uid);
                        ix.delete_pod(&uid);
                    } else {
                        let p = pods.get_mut(&uid).unwrap();
                        p.status.as_mut().unwrap().phase = Some("Failed".into());
                        p.metadata.resource_version = Some(next_rv());
                        ix.apply_pod(p);
                    }
                }
                _ if !nodes.is_empty() => {
                    // A gang of 1-2 pods on free GPUs (as the fleet sees them now), or,
                    // sometimes, on GPUs taken (over-committed: left out, retried later).
                    let gang = format!("g{step}");
                    let set = format!("s{}", rng.below(2));
                    for k in 0..1 + rng.below(2) {
                        let name = nodes.keys().nth(rng.below(nodes.len())).unwrap().clone();
                        // Free as the pods say (a gang left out of the fleet still holds
                        // its GPUs).
                        let taken: Vec<u32> = pods
                            .values()
                            .filter(|p| {
                                holds_resources(p)
                                    && p.spec.as_ref().unwrap().node_name.as_deref()
                                        == Some(name.as_str())
                            })
                            .flat_map(|p| gpu_ids(p).unwrap())
                            .collect();
                        let gpu = if rng.below(80) == 0 {
                            rng.below(4) as u32
                        } else {
                            match (0..4).find(|g| !taken.contains(g)) {
                                Some(g) => g,
                                None => continue,
                            }
                        };
                        let uid = format!("{gang}-{k}");
                        let p = pod(
                            &uid,
                            &gang,
                            &set,
                            Some(&name),
                            Some(&gpu.to_string()),
                            &next_rv(),
                        );
                        ix.apply_pod(&p);
                        pods.insert(uid, p);
                    }
                }
                _ => {}
            }
            // Over-committed allocations make the result depend on the order they came in;
            // compare wherever no GPU is taken twice.
            ix.refresh();
            if !overcommitted(&pods) {
                same_fleet(ix.fleet(), &rebuilt(&nodes, &pods), step);
                compared += 1;
            }
        }
        // Through the store-shaped entry points, from scratch.
        let mut other = FleetIndex::new(TopologyConfig::default());
        other.sync_nodes(&nodes.values().cloned().map(Arc::new).collect::<Vec<_>>());
        other.sync_pods(
            &pods.values().cloned().map(Arc::new).collect::<Vec<_>>(),
            Instant::now(),
        );
        other.refresh();
        same_fleet(other.fleet(), &rebuilt(&nodes, &pods), usize::MAX);
    }
    assert!(compared > 1200, "only {compared} steps compared");
}
