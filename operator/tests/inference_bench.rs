//! GPU binding throughput on 1,000 KWOK GPU nodes: Sluice's gang binder next to the real
//! kube-scheduler, the same GPU pods in the same run. Writes `target/bench/gpu.json`.
//! Run by `e2e/bench-gpu.sh` (needs the test ground; the script builds this in release).
//!
//! Method, identical for both schedulers and repeated `BENCH_GPU_RUNS` times (alternating
//! which goes first):
//! - both schedulers run and are warm before a run: kube-scheduler always is; Sluice's
//!   binder is started once, and a run waits until its Pod cache holds every pod of the
//!   run (the binder skips gated pods, as kube-scheduler does);
//! - N pods asking for `nvidia.com/gpu` are created carrying a scheduling gate, so nothing
//!   binds them while they are created (Sluice's with `schedulerName: sluice`);
//! - the clock starts when the first gate is removed (64 patches in flight, the same
//!   client and concurrency for both) and stops when a watch sees the last pod with
//!   `spec.nodeName`. `ungateSeconds` is how long removing the gates took; `tailSeconds`
//!   (last gate removed → last pod bound) is the scheduler's lag behind the pods.
//! - between runs every pod is deleted and the run waits until none is left.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::json;
use sluice_e2e::cluster::{GpuNodeProfile, TestCluster};
use sluice_operator::inference::{TopologyConfig, binder, metrics};

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

const GATE: &str = "sluice.dev/bench";
const RUN_LABEL: &str = "sluice.dev/bench-run";

fn pod(name: &str, run: &str, pool: &str, sluice: bool, gpus: usize) -> Pod {
    let mut spec = json!({
        "nodeSelector": {"sluice.dev/pool": pool},
        "tolerations": [{"key": "kwok.x-k8s.io/node", "operator": "Exists", "effect": "NoSchedule"}],
        "schedulingGates": [{"name": GATE}],
        "containers": [{"name": "m", "image": "fake", "resources": {
            "limits": {"nvidia.com/gpu": gpus.to_string()},
            "requests": {"cpu": "1", "memory": "4Gi"}}}]
    });
    if sluice {
        spec["schedulerName"] = json!("sluice");
    }
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {RUN_LABEL: run}},
        "spec": spec,
    }))
    .unwrap()
}

async fn each<F, Fut>(n: usize, width: usize, f: F) -> anyhow::Result<()>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Result<(), kube::Error>>,
{
    futures::stream::iter((0..n).map(f))
        .buffer_unordered(width)
        .try_collect::<()>()
        .await?;
    Ok(())
}

struct RunResult {
    seconds: f64,
    ungate_seconds: f64,
    tail_seconds: f64,
}

/// One run: create `n` gated pods, wait until `ready` says the scheduler sees them, ungate
/// all, time until all are bound.
async fn one_run(
    pods: &Api<Pod>,
    run: &str,
    pool: &str,
    sluice: bool,
    n: usize,
    gpus: usize,
    ready: impl Fn() -> usize,
) -> anyhow::Result<RunResult> {
    let names: Vec<String> = (0..n).map(|i| format!("{run}-{i}")).collect();
    each(n, 32, |i| {
        let api = pods.clone();
        let p = pod(&names[i], run, pool, sluice, gpus);
        async move { api.create(&PostParams::default(), &p).await.map(|_| ()) }
    })
    .await?;
    // Warm caches: the scheduler has seen every pod (kube-scheduler: a fixed settle).
    let deadline = Instant::now() + Duration::from_secs(60);
    while ready() < n {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the binder's cache never saw all pods"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Watch for binds before the clock starts.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
    let watch = {
        let api = pods.clone();
        let sel = format!("{RUN_LABEL}={run}");
        tokio::spawn(async move {
            let mut seen = HashSet::new();
            let stream = watcher(api, watcher::Config::default().labels(&sel))
                .default_backoff()
                .applied_objects();
            futures::pin_mut!(stream);
            while let Ok(Some(p)) = stream.try_next().await {
                let bound = p.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some();
                if bound && seen.insert(p.metadata.name.clone().unwrap_or_default()) {
                    let _ = tx.send(Instant::now());
                }
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;

    let start = Instant::now();
    each(n, 64, |i| {
        let api = pods.clone();
        let name = names[i].clone();
        async move {
            api.patch(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"schedulingGates": null}})),
            )
            .await
            .map(|_| ())
        }
    })
    .await?;
    let ungated = start.elapsed().as_secs_f64();
    let mut bound = 0;
    let mut last = start;
    let deadline = start + Duration::from_secs(300);
    while bound < n {
        match tokio::time::timeout_at(deadline.into(), rx.recv()).await {
            Ok(Some(t)) => {
                bound += 1;
                last = last.max(t);
            }
            _ => anyhow::bail!("only {bound}/{n} {run} pods bound after 300s"),
        }
    }
    watch.abort();
    let seconds = last.duration_since(start).as_secs_f64();
    Ok(RunResult {
        seconds,
        ungate_seconds: ungated,
        tail_seconds: (seconds - ungated).max(0.0),
    })
}

async fn delete_all(pods: &Api<Pod>) -> anyhow::Result<()> {
    pods.delete_collection(&DeleteParams::default(), &ListParams::default())
        .await?;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let left = pods
            .list_metadata(&ListParams::default())
            .await?
            .items
            .len();
        if left == 0 {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "{left} pods left after 120s");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn summary(rs: &[f64]) -> serde_json::Value {
    let mut v = rs.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    json!({"runs": rs, "median": v[v.len() / 2], "min": v[0], "max": v[v.len() - 1]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: e2e/bench-gpu.sh"]
async fn gpu_bind_throughput() -> anyhow::Result<()> {
    let nodes_n = env("BENCH_GPU_NODES", 1000);
    let pods_n = env("BENCH_GPU_PODS", 1000);
    let gpus = env("BENCH_GPU_PER_POD", 2);
    let runs = env("BENCH_GPU_RUNS", 3).max(1);
    let cluster = TestCluster::get().await?;
    let client = cluster.client.clone();
    let ns = cluster.namespace("gpubench").await?;
    let pool = ns.name.clone();
    let t = Instant::now();
    let nodes = cluster
        .create_kwok_nodes(&pool, nodes_n, Some(&GpuNodeProfile::default()))
        .await?;
    let node_api: Api<Node> = Api::all(client.clone());
    each(nodes.len(), 32, |i| {
        let api = node_api.clone();
        let (name, pool) = (nodes[i].clone(), pool.clone());
        async move {
            api.patch(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"labels": {"sluice.dev/pool": pool}}})),
            )
            .await
            .map(|_| ())
        }
    })
    .await?;
    let setup = t.elapsed().as_secs_f64();
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);

    // Sluice's binder, started once with its own caches (as `inference::run` does).
    let mut registry = prometheus_client::registry::Registry::default();
    let m = metrics::register(&mut registry);
    let wake = std::sync::Arc::new(tokio::sync::Notify::new());
    let (node_store, node_watch) = binder::reflect(
        Api::<Node>::all(client.clone()),
        watcher::Config::default(),
        wake.clone(),
    );
    let (pod_store, pod_watch) = binder::reflect(
        Api::<Pod>::all(client.clone()),
        watcher::Config::default(),
        wake.clone(),
    );
    let cache = pod_store.clone();
    let bg = tokio::spawn(async move {
        tokio::join!(
            node_watch,
            pod_watch,
            binder::run(
                client.clone(),
                node_store.clone(),
                pod_store.clone(),
                wake,
                TopologyConfig::default(),
                m.clone(),
                None,
            )
        );
    });

    let mut sl = Vec::new();
    let mut ks = Vec::new();
    let mut details = Vec::new();
    for r in 0..runs {
        let order: [bool; 2] = if r % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        for sluice in order {
            let run = format!("{}{r}", if sluice { "sl" } else { "ks" });
            let res = one_run(&pods, &run, &pool, sluice, pods_n, gpus, || {
                if sluice {
                    cache
                        .state()
                        .iter()
                        .filter(|p| {
                            p.metadata.labels.as_ref().and_then(|l| l.get(RUN_LABEL)) == Some(&run)
                        })
                        .count()
                } else {
                    pods_n
                }
            })
            .await?;
            let pps = pods_n as f64 / res.seconds;
            println!(
                "run {r} {}: {:.1} pods/s ({:.2}s; ungating {:.2}s, tail {:.2}s)",
                if sluice { "sluice" } else { "kube-scheduler" },
                pps,
                res.seconds,
                res.ungate_seconds,
                res.tail_seconds
            );
            details.push(json!({
                "run": r, "scheduler": if sluice { "sluice" } else { "kube-scheduler" },
                "seconds": res.seconds, "podsPerSecond": pps,
                "ungateSeconds": res.ungate_seconds, "tailSeconds": res.tail_seconds,
            }));
            if sluice { &mut sl } else { &mut ks }.push(pps);
            delete_all(&pods).await?;
        }
    }
    bg.abort();
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry)?;
    let metric = |name: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    };
    let out = json!({
        "nodes": nodes_n, "gpusPerNode": 8, "pods": pods_n, "gpusPerPod": gpus,
        "build": if cfg!(debug_assertions) { "debug" } else { "release" },
        "setupSeconds": setup,
        "sluice": {"podsPerSecond": summary(&sl)},
        "kubeScheduler": {"podsPerSecond": summary(&ks)},
        "binderProfile": {
            "rounds": metric("inference_binder_rounds_total"),
            "fleetBuildSecondsSum": metric("inference_fleet_build_seconds_sum"),
            "placementSecondsSum": metric("inference_placement_seconds_sum"),
            "placements": metric("inference_placement_seconds_count"),
            "bindSecondsSum": metric("inference_bind_seconds_sum"),
        },
        "runs": details,
        "method": "both schedulers running and warm; N gated pods created; clock from the first gate removal (64 patches in flight, same for both) to the last spec.nodeName seen by a watch; alternating order, pods deleted between runs; shared 2-core test ground",
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    let dir = sluice_e2e::cluster::repo_root().join("target/bench");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("gpu.json");
    let mut all: serde_json::Value = std::fs::read_to_string(&path)
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok())
        .filter(|v: &serde_json::Value| v.is_object())
        .unwrap_or_else(|| json!({}));
    all["bind"] = out;
    std::fs::write(&path, serde_json::to_string_pretty(&all)?)?;
    cluster.delete_nodes(&nodes).await?;
    Ok(())
}
