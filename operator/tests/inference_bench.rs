//! GPU binding throughput on 1,000 KWOK GPU nodes: Sluice's gang binder next to the real
//! kube-scheduler, the same GPU pods in the same run. Writes `target/bench/gpu.json`.
//! Run by `e2e/bench-gpu.sh` (needs the test ground).
//!
//! Method: N pods asking for `nvidia.com/gpu` are created first while nothing can bind
//! them (Sluice: the binder is not started yet; kube-scheduler: the pods carry a
//! scheduling gate); the clock starts when binding is let go (binder started / gates
//! removed, 32 patches in flight) and stops when the last pod has `spec.nodeName`.

use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;
use sluice_e2e::cluster::{GpuNodeProfile, TestCluster};
use sluice_operator::inference;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn pod(name: &str, pool: &str, sluice: bool, gpus: usize) -> Pod {
    let mut spec = json!({
        "nodeSelector": {"sluice.dev/pool": pool},
        "tolerations": [{"key": "kwok.x-k8s.io/node", "operator": "Exists", "effect": "NoSchedule"}],
        "containers": [{"name": "m", "image": "fake", "resources": {
            "limits": {"nvidia.com/gpu": gpus.to_string()},
            "requests": {"cpu": "1", "memory": "4Gi"}}}]
    });
    if sluice {
        spec["schedulerName"] = json!("sluice");
    } else {
        spec["schedulingGates"] = json!([{"name": "sluice.dev/bench"}]);
    }
    serde_json::from_value(json!({"metadata": {"name": name}, "spec": spec})).unwrap()
}

async fn create_all(api: &Api<Pod>, pods: Vec<Pod>) -> anyhow::Result<()> {
    futures::stream::iter(pods.into_iter().map(|p| {
        let api = api.clone();
        async move { api.create(&PostParams::default(), &p).await.map(|_| ()) }
    }))
    .buffer_unordered(32)
    .try_collect::<()>()
    .await?;
    Ok(())
}

async fn wait_bound(api: &Api<Pod>, prefix: &str, n: usize, start: Instant) -> anyhow::Result<f64> {
    loop {
        let bound = api
            .list(&ListParams::default())
            .await?
            .items
            .iter()
            .filter(|p| p.metadata.name.as_deref().unwrap_or("").starts_with(prefix))
            .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some())
            .count();
        if bound >= n {
            return Ok(start.elapsed().as_secs_f64());
        }
        if start.elapsed() > Duration::from_secs(300) {
            anyhow::bail!("only {bound}/{n} {prefix} pods bound after 300s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: e2e/bench-gpu.sh"]
async fn gpu_bind_throughput() -> anyhow::Result<()> {
    let nodes_n = env("BENCH_GPU_NODES", 1000);
    let pods_n = env("BENCH_GPU_PODS", 2000);
    let gpus = env("BENCH_GPU_PER_POD", 2);
    let cluster = TestCluster::get().await?;
    let client = cluster.client.clone();
    let ns = cluster.namespace("gpubench").await?;
    let pool = ns.name.clone();
    let t = Instant::now();
    let nodes = cluster
        .create_kwok_nodes(&pool, nodes_n, Some(&GpuNodeProfile::default()))
        .await?;
    let node_api: Api<Node> = Api::all(client.clone());
    futures::stream::iter(nodes.iter().map(|n| {
        let api = node_api.clone();
        let pool = pool.clone();
        async move {
            api.patch(
                n,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"labels": {"sluice.dev/pool": pool}}})),
            )
            .await
            .map(|_| ())
        }
    }))
    .buffer_unordered(32)
    .try_collect::<()>()
    .await?;
    let setup = t.elapsed().as_secs_f64();
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);

    // Sluice.
    create_all(
        &pods,
        (0..pods_n)
            .map(|i| pod(&format!("sl-{i}"), &pool, true, gpus))
            .collect(),
    )
    .await?;
    let mut registry = prometheus_client::registry::Registry::default();
    let cfg = inference::Config {
        binder: true,
        controller: false,
        ..inference::Config::new()
    };
    let start = Instant::now();
    let binder = tokio::spawn(inference::run(client.clone(), &mut registry, cfg));
    let sluice_s = wait_bound(&pods, "sl-", pods_n, start).await?;
    binder.abort();
    // Free the GPUs for the second run.
    pods.delete_collection(&Default::default(), &ListParams::default())
        .await?;
    tokio::time::sleep(Duration::from_secs(5)).await;

    // kube-scheduler.
    create_all(
        &pods,
        (0..pods_n)
            .map(|i| pod(&format!("ks-{i}"), &pool, false, gpus))
            .collect(),
    )
    .await?;
    let start = Instant::now();
    futures::stream::iter((0..pods_n).map(|i| {
        let api = pods.clone();
        async move {
            api.patch(
                &format!("ks-{i}"),
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"schedulingGates": null}})),
            )
            .await
            .map(|_| ())
        }
    }))
    .buffer_unordered(32)
    .try_collect::<()>()
    .await?;
    let ungate_s = start.elapsed().as_secs_f64();
    let ks_s = wait_bound(&pods, "ks-", pods_n, start).await?;

    let out = json!({
        "nodes": nodes_n, "gpusPerNode": 8, "pods": pods_n, "gpusPerPod": gpus,
        "setupSeconds": setup,
        "sluice": {"seconds": sluice_s, "podsPerSecond": pods_n as f64 / sluice_s},
        "kubeScheduler": {"seconds": ks_s, "podsPerSecond": pods_n as f64 / ks_s, "ungateSeconds": ungate_s},
        "method": "pods created first; clock from release (binder start / gates removed) to last spec.nodeName; same nodes, sequential runs"
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    let dir = sluice_e2e::cluster::repo_root().join("target/bench");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("gpu.json"), serde_json::to_string_pretty(&out)?)?;
    pods.delete_collection(&Default::default(), &ListParams::default())
        .await?;
    cluster.delete_nodes(&nodes).await?;
    Ok(())
}
