//! InferenceSet end to end on the local test ground (KWOK GPU nodes): gangs placed inside
//! their required rack, scale up, node loss, a full fleet, and a slot-swap rollout that
//! never takes more than `maxUnavailable` replicas out of service.
//!
//! Runs against the test ground (`make test` provides it; a plain `cargo test` starts one):
//! `cargo test -p sluice-operator --test inference_e2e -- --nocapture`.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;
use kube::api::{Api, ListParams, Patch, PatchParams};
use serde_json::json;
use sluice_e2e::cluster::{GpuNodeProfile, TestCluster};
use sluice_operator::inference::{self, InferenceSet};

/// The tests of this file each run an operator whose binder watches every namespace, so
/// two of them at once would bind each other's pods: they take turns.
static ONE_OPERATOR: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn install_crd(client: &kube::Client) -> anyhow::Result<()> {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd = InferenceSet::crd();
    let name = crd.metadata.name.clone().unwrap_or_default();
    crds.patch(
        &name,
        &PatchParams::apply("sluice-e2e").force(),
        &Patch::Apply(&crd),
    )
    .await?;
    for _ in 0..100 {
        let c = crds.get(&name).await?;
        let est = c
            .status
            .and_then(|s| s.conditions)
            .unwrap_or_default()
            .iter()
            .any(|c| c.type_ == "Established" && c.status == "True");
        if est {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("CRD {name} not established")
}

fn set_manifest(name: &str, pool: &str, replicas: i32, version: &str) -> serde_json::Value {
    json!({
        "apiVersion": "sluice.dev/v1alpha1",
        "kind": "InferenceSet",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "podsPerReplica": 2,
            "gpusPerPod": 4,
            "gpu": {"products": ["NVIDIA-H100-80GB-HBM3"]},
            "topology": {"required": "sluice.dev/rack", "preferred": "node"},
            "updateStrategy": {"maxUnavailable": 1, "maxSurge": 1, "surgeTimeout": "2s"},
            "drain": {"quietPeriod": "1s"},
            "nodeLossGracePeriod": "5s",
            "template": {
                "metadata": {"labels": {"app": name}, "annotations": {"model-version": version}},
                "spec": {
                    "nodeSelector": {"sluice.dev/pool": pool},
                    "tolerations": [{"key": "kwok.x-k8s.io/node", "operator": "Exists", "effect": "NoSchedule"}],
                    "containers": [{"name": "model", "image": "fake/model-server:1"}]
                }
            }
        }
    })
}

struct Snapshot {
    serving: i32,
    updated: i32,
    progressing: bool,
    pods: Vec<Pod>,
}

async fn snapshot(
    sets: &Api<InferenceSet>,
    pods: &Api<Pod>,
    name: &str,
) -> anyhow::Result<Snapshot> {
    let s = sets.get(name).await?;
    let st = s.status.unwrap_or_default();
    let progressing = st
        .conditions
        .iter()
        .any(|c| c.type_ == "Progressing" && c.status == "True");
    let pods = pods
        .list(&ListParams::default().labels(&format!("sluice.dev/inferenceset={name}")))
        .await?
        .items;
    Ok(Snapshot {
        serving: st.serving_replicas,
        updated: st.updated_replicas,
        progressing: progressing || st.observed_generation != s.metadata.generation,
        pods,
    })
}

/// Wait until `replicas` serve, all updated, rollout complete; track the fewest serving.
async fn wait_settled(
    sets: &Api<InferenceSet>,
    pods: &Api<Pod>,
    name: &str,
    replicas: i32,
    timeout: Duration,
) -> anyhow::Result<(Snapshot, i32)> {
    let start = Instant::now();
    let mut min_serving = i32::MAX;
    loop {
        let s = snapshot(sets, pods, name).await?;
        min_serving = min_serving.min(s.serving);
        let live: Vec<&Pod> = s
            .pods
            .iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .collect();
        // Status and pods are two reads: a gang re-created between them (a bind that failed
        // part-way on a loaded machine) shows unbound pods beside a status that still
        // counts it serving. Settled means every live pod bound, too.
        let all_bound = live
            .iter()
            .all(|p| p.spec.as_ref().is_some_and(|s| s.node_name.is_some()));
        let live = live.len();
        if s.serving == replicas
            && s.updated == replicas
            && !s.progressing
            && live == (replicas * 2) as usize
            && all_bound
        {
            return Ok((s, min_serving));
        }
        if start.elapsed() > timeout {
            bail!(
                "not settled after {timeout:?}: serving {} updated {} progressing {} pods {}",
                s.serving,
                s.updated,
                s.progressing,
                live
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Every gang's pods lie in one rack; no GPU is given twice on a node.
fn check_placement(pods: &[Pod], racks: &BTreeMap<String, String>) -> anyhow::Result<()> {
    let mut gangs: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut used: BTreeSet<(String, String)> = BTreeSet::new();
    for p in pods
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
    {
        let node = p
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .context("unbound pod")?;
        let gang = p.metadata.labels.as_ref().unwrap()["sluice.dev/gang"].clone();
        let ids = p
            .metadata
            .annotations
            .as_ref()
            .unwrap()
            .get("sluice.dev/gpu-ids")
            .cloned()
            .context("no gpu-ids")?;
        if ids.split(',').count() != 4 {
            bail!("pod {:?} got GPUs {ids}", p.metadata.name);
        }
        for id in ids.split(',') {
            if !used.insert((node.clone(), id.to_string())) {
                bail!("GPU {id} of {node} given twice");
            }
        }
        gangs
            .entry(gang)
            .or_default()
            .insert(racks.get(&node).cloned().unwrap_or_default());
    }
    for (g, r) in gangs {
        if r.len() != 1 {
            bail!("gang {g} spans racks {r:?}");
        }
    }
    Ok(())
}

#[tokio::test]
async fn inference_set_places_scales_survives_node_loss_and_rolls_by_slot_swap()
-> anyhow::Result<()> {
    let _turn = ONE_OPERATOR.lock().await;
    let cluster = TestCluster::get().await?;
    let client = cluster.client.clone();
    install_crd(&client).await?;
    let ns = cluster.namespace("infs").await?;
    let pool = ns.name.clone();

    // 8 nodes × 8 H100 in two NVLink groups of 4; racks of 2 nodes (4 racks).
    let profile = GpuNodeProfile {
        rack_size: 2,
        racks_per_zone: 4,
        gpu_topology: Some(r#"{"groups":[[0,1,2,3],[4,5,6,7]]}"#.into()),
        ..Default::default()
    };
    let nodes = cluster.create_kwok_nodes(&pool, 8, Some(&profile)).await?;
    let node_api: Api<Node> = Api::all(client.clone());
    let mut racks = BTreeMap::new();
    for n in &nodes {
        let node = node_api
            .patch(
                n,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"labels": {"sluice.dev/pool": pool}}})),
            )
            .await?;
        racks.insert(
            n.clone(),
            node.metadata.labels.unwrap()["sluice.dev/rack"].clone(),
        );
    }
    let cleanup = NodeCleanup(cluster.clone(), nodes.clone());
    let operator = start_operator(&client);

    let sets: Api<InferenceSet> = Api::namespaced(client.clone(), &ns.name);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let apply = |replicas: i32, version: &'static str| {
        let sets = sets.clone();
        let pool = pool.clone();
        async move {
            sets.patch(
                "llm",
                &PatchParams::apply("sluice-e2e").force(),
                &Patch::Apply(set_manifest("llm", &pool, replicas, version)),
            )
            .await
        }
    };

    // 1. Three TP=8 replicas (2 pods × 4 GPUs), each inside one rack.
    let t = Instant::now();
    apply(3, "v1").await?;
    let (s, _) = wait_settled(&sets, &pods, "llm", 3, Duration::from_secs(60)).await?;
    check_placement(&s.pods, &racks)?;
    println!("3 replicas serving after {:.1}s", t.elapsed().as_secs_f64());

    // 2. Scale to 5.
    let t = Instant::now();
    apply(5, "v1").await?;
    let (s, _) = wait_settled(&sets, &pods, "llm", 5, Duration::from_secs(60)).await?;
    check_placement(&s.pods, &racks)?;
    println!("scaled to 5 after {:.1}s", t.elapsed().as_secs_f64());

    // 3. Node loss: delete a node holding a pod; its whole replica is placed again.
    let victim_pod = s
        .pods
        .iter()
        .find(|p| p.spec.as_ref().unwrap().node_name.is_some())
        .unwrap();
    let victim_node = victim_pod.spec.as_ref().unwrap().node_name.clone().unwrap();
    let lost_gangs: BTreeSet<String> = s
        .pods
        .iter()
        .filter(|p| p.spec.as_ref().unwrap().node_name.as_deref() == Some(victim_node.as_str()))
        .map(|p| p.metadata.labels.as_ref().unwrap()["sluice.dev/gang"].clone())
        .collect();
    let t = Instant::now();
    cluster
        .delete_nodes(std::slice::from_ref(&victim_node))
        .await?;
    // Settled *and* without the lost gangs: right after the delete, the old settled state
    // may still be what the controller reports.
    let deadline = Instant::now() + Duration::from_secs(90);
    let s = loop {
        let (s, _) = wait_settled(&sets, &pods, "llm", 5, Duration::from_secs(90)).await?;
        let live_gangs: BTreeSet<String> = s
            .pods
            .iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .map(|p| p.metadata.labels.as_ref().unwrap()["sluice.dev/gang"].clone())
            .collect();
        if live_gangs.is_disjoint(&lost_gangs) {
            break s;
        }
        if Instant::now() > deadline {
            bail!("lost gangs {lost_gangs:?} still live after 90s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    check_placement(&s.pods, &racks)?;
    println!(
        "node {victim_node} deleted: {} replica(s) placed again in {:.1}s",
        lost_gangs.len(),
        t.elapsed().as_secs_f64()
    );

    // 4. Fill the fleet: 7 nodes = 14 pods of 4 GPUs = 7 replicas, no spare GPU.
    apply(7, "v1").await?;
    let (s, _) = wait_settled(&sets, &pods, "llm", 7, Duration::from_secs(60)).await?;
    check_placement(&s.pods, &racks)?;

    // 5. Roll to v2 on the full fleet: slot swap, never more than 1 replica out.
    let t = Instant::now();
    apply(7, "v2").await?;
    let (s, min_serving) = wait_settled(&sets, &pods, "llm", 7, Duration::from_secs(180)).await?;
    check_placement(&s.pods, &racks)?;
    let versions: BTreeSet<String> = s
        .pods
        .iter()
        .map(|p| p.metadata.annotations.as_ref().unwrap()["model-version"].clone())
        .collect();
    println!(
        "rolled 7 replicas on a full fleet in {:.1}s, fewest serving {min_serving}",
        t.elapsed().as_secs_f64()
    );
    assert_eq!(versions, BTreeSet::from(["v2".to_string()]));
    assert!(
        min_serving >= 6,
        "more than maxUnavailable=1 out: {min_serving} serving"
    );

    operator.abort();
    cluster.delete_nodes(&nodes).await?;
    cleanup.disarm();
    Ok(())
}

/// Required node affinity: of three 8-GPU nodes, one carries a label that the template's
/// `NotIn` excludes. Three replicas of 2 pods × 4 GPUs would fill all three nodes; two land
/// on the allowed nodes and the third stays pending (PodScheduled=False) although the
/// excluded node is empty. The template's preferred pod anti-affinity is not honoured and
/// is reported once with a `ConstraintsIgnored` warning on the InferenceSet.
#[tokio::test]
async fn required_node_affinity_keeps_gangs_off_excluded_nodes() -> anyhow::Result<()> {
    let _turn = ONE_OPERATOR.lock().await;
    let cluster = TestCluster::get().await?;
    let client = cluster.client.clone();
    install_crd(&client).await?;
    let ns = cluster.namespace("infs-aff").await?;
    let pool = ns.name.clone();
    let (nodes, cleanup) =
        classed_nodes(&cluster, &pool, &["excluded", "allowed", "allowed"]).await?;
    let allowed: BTreeSet<String> = nodes[1..].iter().cloned().collect();
    let operator = start_operator(&client);
    let sets: Api<InferenceSet> = Api::namespaced(client.clone(), &ns.name);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let set = json!({
        "apiVersion": "sluice.dev/v1alpha1",
        "kind": "InferenceSet",
        "metadata": {"name": "aff"},
        "spec": {
            "replicas": 3,
            "podsPerReplica": 2,
            "gpusPerPod": 4,
            "template": {
                "metadata": {"labels": {"app": "aff"}},
                "spec": {
                    "nodeSelector": {"sluice.dev/pool": pool},
                    "tolerations": [{"key": "kwok.x-k8s.io/node", "operator": "Exists", "effect": "NoSchedule"}],
                    "affinity": {
                        "nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                            "nodeSelectorTerms": [{"matchExpressions": [
                                {"key": "sluice.dev/gpu-class", "operator": "NotIn", "values": ["excluded"]},
                                {"key": "nvidia.com/gpu.count", "operator": "Gt", "values": ["4"]}
                            ]}]}},
                        "podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
                            {"weight": 1, "podAffinityTerm": {
                                "topologyKey": "kubernetes.io/hostname",
                                "labelSelector": {"matchLabels": {"app": "aff"}}}}]}
                    },
                    "containers": [{"name": "model", "image": "fake/model-server:1"}]
                }
            }
        }
    });
    let t = Instant::now();
    sets.patch(
        "aff",
        &PatchParams::apply("sluice-e2e").force(),
        &Patch::Apply(set),
    )
    .await?;
    let lp = ListParams::default().labels("sluice.dev/inferenceset=aff");
    let (bound, unschedulable) = loop {
        let list = pods.list(&lp).await?.items;
        let bound: Vec<String> = list
            .iter()
            .filter_map(|p| p.spec.as_ref()?.node_name.clone())
            .collect();
        let unschedulable = list
            .iter()
            .filter(|p| {
                p.status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|cs| {
                        cs.iter().any(|c| {
                            c.type_ == "PodScheduled"
                                && c.status == "False"
                                && c.reason.as_deref() == Some("Unschedulable")
                        })
                    })
            })
            .count();
        if bound.len() == 4 && unschedulable == 2 {
            break (bound, unschedulable);
        }
        if t.elapsed() > Duration::from_secs(30) {
            bail!(
                "after 30s: {} pods bound ({bound:?}), {unschedulable} unschedulable",
                bound.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    println!(
        "4 pods bound on {:?}, {unschedulable} unschedulable, after {:.1}s",
        bound.iter().collect::<BTreeSet<_>>(),
        t.elapsed().as_secs_f64()
    );
    for n in &bound {
        assert!(allowed.contains(n), "pod bound to excluded node {n}");
    }
    // The ignored preferred anti-affinity is reported on the InferenceSet.
    let events: Api<k8s_openapi::api::events::v1::Event> =
        Api::namespaced(client.clone(), &ns.name);
    let warned = loop {
        let evs = events.list(&ListParams::default()).await?.items;
        let hit = evs.into_iter().find(|e| {
            e.reason.as_deref() == Some("ConstraintsIgnored")
                && e.regarding.as_ref().and_then(|r| r.kind.as_deref()) == Some("InferenceSet")
        });
        if let Some(e) = hit {
            break e;
        }
        if t.elapsed() > Duration::from_secs(30) {
            bail!("no ConstraintsIgnored event");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let note = warned.note.unwrap_or_default();
    assert!(note.contains("pod anti-affinity"), "{note}");
    assert_eq!(warned.type_.as_deref(), Some("Warning"));

    operator.abort();
    cluster.delete_nodes(&nodes).await?;
    cleanup.disarm();
    Ok(())
}

/// Preferred node affinity: of four empty 8-GPU nodes, the last carries `gpu-class=fast`
/// (weight 80) and the third `gpu-class=good` (weight 20). Replicas of one 8-GPU pod,
/// added one at a time, go to the fast node, then the good one, then (preferred nodes full)
/// to one of the others rather than staying pending. Left to fragmentation scoring alone
/// the first would go to the first node. Nothing is reported as ignored.
#[tokio::test]
async fn preferred_node_affinity_fills_preferred_nodes_first() -> anyhow::Result<()> {
    let _turn = ONE_OPERATOR.lock().await;
    let cluster = TestCluster::get().await?;
    let client = cluster.client.clone();
    install_crd(&client).await?;
    let ns = cluster.namespace("infs-pref").await?;
    let pool = ns.name.clone();
    let (nodes, cleanup) =
        classed_nodes(&cluster, &pool, &["plain", "plain", "good", "fast"]).await?;
    let operator = start_operator(&client);
    let sets: Api<InferenceSet> = Api::namespaced(client.clone(), &ns.name);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let set = |replicas: i32| {
        json!({
            "apiVersion": "sluice.dev/v1alpha1",
            "kind": "InferenceSet",
            "metadata": {"name": "pref"},
            "spec": {
                "replicas": replicas,
                "podsPerReplica": 1,
                "gpusPerPod": 8,
                "template": {
                    "metadata": {"labels": {"app": "pref"}},
                    "spec": {
                        "nodeSelector": {"sluice.dev/pool": pool},
                        "tolerations": [{"key": "kwok.x-k8s.io/node", "operator": "Exists", "effect": "NoSchedule"}],
                        "affinity": {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
                            {"weight": 80, "preference": {"matchExpressions": [
                                {"key": "sluice.dev/gpu-class", "operator": "In", "values": ["fast"]}]}},
                            {"weight": 20, "preference": {"matchExpressions": [
                                {"key": "sluice.dev/gpu-class", "operator": "In", "values": ["good"]}]}}
                        ]}},
                        "containers": [{"name": "model", "image": "fake/model-server:1"}]
                    }
                }
            }
        })
    };
    let lp = ListParams::default().labels("sluice.dev/inferenceset=pref");
    let t = Instant::now();
    let mut used: BTreeSet<String> = BTreeSet::new();
    for (replicas, expected) in [(1, Some(&nodes[3])), (2, Some(&nodes[2])), (3, None)] {
        sets.patch(
            "pref",
            &PatchParams::apply("sluice-e2e").force(),
            &Patch::Apply(set(replicas)),
        )
        .await?;
        let bound: BTreeSet<String> = loop {
            let bound: BTreeSet<String> = pods
                .list(&lp)
                .await?
                .items
                .iter()
                .filter_map(|p| p.spec.as_ref()?.node_name.clone())
                .collect();
            if bound.len() == replicas as usize {
                break bound;
            }
            if t.elapsed() > Duration::from_secs(60) {
                bail!("{replicas} replicas: only {bound:?} bound after 60s");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let new: Vec<&String> = bound.difference(&used).collect();
        assert_eq!(new.len(), 1, "one new node per replica: {bound:?}");
        match expected {
            Some(n) => assert_eq!(new[0], n, "replica {replicas} on {} not {n}", new[0]),
            None => assert!(
                nodes[..2].contains(new[0]),
                "replica {replicas} on {}: the preferred nodes are full",
                new[0]
            ),
        }
        println!(
            "replica {replicas} bound on {} after {:.1}s",
            new[0],
            t.elapsed().as_secs_f64()
        );
        used = bound;
    }
    // Preferred node affinity is honoured, so not reported as ignored.
    let events: Api<k8s_openapi::api::events::v1::Event> =
        Api::namespaced(client.clone(), &ns.name);
    let ignored: Vec<String> = events
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some("ConstraintsIgnored"))
        .filter_map(|e| e.note)
        .collect();
    assert!(ignored.is_empty(), "{ignored:?}");

    operator.abort();
    cluster.delete_nodes(&nodes).await?;
    cleanup.disarm();
    Ok(())
}

/// KWOK nodes of 8 H100 in `pool`, one per class, labelled `sluice.dev/pool=<pool>` and
/// `sluice.dev/gpu-class=<class>`, Ready and rid of the node lifecycle's `not-ready` taint
/// (a moment after they are created, longer on a loaded machine: until then the binder
/// rightly places nothing there); deleted by the returned guard if the test fails.
async fn classed_nodes(
    cluster: &TestCluster,
    pool: &str,
    classes: &[&str],
) -> anyhow::Result<(Vec<String>, NodeCleanup)> {
    let nodes = cluster
        .create_kwok_nodes(pool, classes.len(), Some(&GpuNodeProfile::default()))
        .await?;
    let cleanup = NodeCleanup(cluster.clone(), nodes.clone());
    let node_api: Api<Node> = Api::all(cluster.client.clone());
    for (n, class) in nodes.iter().zip(classes) {
        node_api
            .patch(
                n,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"labels": {
                    "sluice.dev/pool": pool, "sluice.dev/gpu-class": class}}})),
            )
            .await?;
    }
    let t = Instant::now();
    for n in &nodes {
        loop {
            let node = node_api.get(n).await?;
            let ready = node
                .status
                .and_then(|s| s.conditions)
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True");
            // The node lifecycle controller lifts `node.kubernetes.io/not-ready` a moment
            // after Ready turns True; until then no pod of ours may go there.
            let lifecycle_tainted = node
                .spec
                .and_then(|s| s.taints)
                .unwrap_or_default()
                .iter()
                .any(|t| t.key.starts_with("node.kubernetes.io/"));
            if ready && !lifecycle_tainted {
                break;
            }
            if t.elapsed() > Duration::from_secs(60) {
                bail!("node {n} not Ready and untainted after 60s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok((nodes, cleanup))
}

/// The InferenceSet controller and the binder, in this process.
fn start_operator(client: &kube::Client) -> tokio::task::JoinHandle<()> {
    let mut registry = prometheus_client::registry::Registry::default();
    tokio::spawn(inference::run(
        client.clone(),
        &mut registry,
        inference::Config::new(),
    ))
}

/// Deletes the test's nodes if the test fails half-way (with its own client: the test's
/// runtime is gone by then).
struct NodeCleanup(TestCluster, Vec<String>);

impl NodeCleanup {
    fn disarm(mut self) {
        self.1.clear();
    }
}

impl Drop for NodeCleanup {
    fn drop(&mut self) {
        if self.1.is_empty() {
            return;
        }
        let (kubeconfig, nodes) = (self.0.kubeconfig.clone(), std::mem::take(&mut self.1));
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            rt.block_on(async {
                let client = sluice_e2e::cluster::client_for(&kubeconfig).await.ok()?;
                let api: Api<Node> = Api::all(client);
                for n in nodes {
                    let _ = api.delete(&n, &Default::default()).await;
                }
                Some(())
            })
        })
        .join();
    }
}
