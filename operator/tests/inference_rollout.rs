//! A model rollout of an InferenceSet on a full GPU fleet, under load, on real nodes
//! (`sluice-e2e node`: a kubelet and containerd each; GPUs advertised as extended
//! resources). The model server is the echo app with a slow start (its
//! `/ready` answers 503 while the "model loads"), fronted by the injected Sluice agent; the
//! load goes through the test ground's service proxy (EndpointSlices, applied late).
//!
//! - `short_rollout_is_lossless` (e2e, `cargo test -- --ignored`, ~2 min): 4 replicas × 4
//!   GPUs on 2 real nodes of 8 GPUs, 5 s model load, maxUnavailable 1.
//! - `gpu_fleet_rollout` (bench, `e2e/bench-gpu.sh`): 16 replicas × 4 GPUs (TP=4) on 8
//!   real nodes of 8 GPUs (64 GPUs, none spare), 20 s model load, maxUnavailable 2;
//!   writes `rollout` into `target/bench/gpu.json`.
//!
//! Both check: the rollout completes (every replica on the new revision and serving, no
//! old pod left), never more than maxUnavailable replicas out of service (sampled from the
//! pods every 200 ms: a replica is in service while its pod has `sluice.dev/serving=True`
//! and is not being deleted), and not one request fails.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use k8s_openapi::api::core::v1::{Node, Pod, Service};
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch,
    PatchParams, PostParams,
};
use serde_json::json;
use sluice_e2e::cluster::{TestCluster, repo_root};
use sluice_e2e::load::{self, LoadConfig};
use sluice_e2e::scenario_sluice::{OperatorProcess, apply_crds};
use sluice_e2e::svc_proxy::{ProxyConfig, ServiceProxy};

const APP: &str = "llm";

#[derive(Clone, Debug)]
struct Spec {
    replicas: i32,
    nodes: usize,
    gpus_per_pod: i32,
    /// First extra node index: nodes are `local-<base+i>` (real nodes, `sluice-e2e node`).
    node_base: usize,
    model_load: Duration,
    max_unavailable: i32,
    connections: usize,
    rate: f64,
    /// The service proxy applies endpoint changes this late (a slow load balancer).
    delay: Duration,
    max_rollout: Duration,
}

#[derive(Debug)]
struct Outcome {
    rollout_s: f64,
    max_out: i32,
    requests: u64,
    failed: u64,
    by_outcome: BTreeMap<String, u64>,
    old_pods: BTreeSet<String>,
    new_pods: BTreeSet<String>,
    answered_by_new_at_end: bool,
    /// InferenceSet events by reason (`ReplicaQuiet`: a drain closed on the agent's signal).
    events: BTreeMap<String, u32>,
}

/// Real nodes started for the run; stopped (SIGTERM) and their Node objects deleted
/// when dropped or by [`Nodes::stop`].
struct Nodes {
    children: Vec<Child>,
    names: Vec<String>,
}

impl Nodes {
    fn start(_kubeconfig: &std::path::Path, spec: &Spec) -> anyhow::Result<Self> {
        let bin = repo_root().join("target/debug/sluice-e2e");
        let logs = sluice_e2e::cluster::state_dir().join("logs");
        std::fs::create_dir_all(&logs)?;
        let mut nodes = Nodes {
            children: Vec::new(),
            names: Vec::new(),
        };
        for i in 0..spec.nodes {
            let n = spec.node_base + i;
            anyhow::ensure!(
                (1..9).contains(&n),
                "node index {n} out of range (local-1 … local-8)"
            );
            let name = format!("local-{n}");
            let log = std::fs::File::create(logs.join(format!("node-{name}.log")))?;
            let child = Command::new(&bin)
                .current_dir(repo_root())
                .args(["node", "--name", &name, "--gpus", "8"])
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .with_context(|| {
                    format!(
                        "starting {} (cargo build -p sluice-e2e --bins)",
                        bin.display()
                    )
                })?;
            nodes.children.push(child);
            nodes.names.push(name);
        }
        Ok(nodes)
    }

    fn stop_processes(&mut self) {
        for c in &mut self.children {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
        }
        for c in &mut self.children {
            let deadline = Instant::now() + Duration::from_secs(40);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        self.children.clear();
    }
}

impl Drop for Nodes {
    fn drop(&mut self) {
        self.stop_processes();
    }
}

fn infs_api(client: &kube::Client, ns: &str) -> Api<DynamicObject> {
    let ar = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("sluice.dev", "v1alpha1", "InferenceSet"),
        "inferencesets",
    );
    Api::namespaced_with(client.clone(), ns, &ar)
}

fn inference_set(spec: &Spec, pool: &str, version: &str) -> serde_json::Value {
    json!({
        "apiVersion": "sluice.dev/v1alpha1",
        "kind": "InferenceSet",
        "metadata": {"name": APP},
        "spec": {
            "replicas": spec.replicas,
            "podsPerReplica": 1,
            "gpusPerPod": spec.gpus_per_pod,
            "topology": {"required": "node"},
            "updateStrategy": {"maxUnavailable": spec.max_unavailable, "maxSurge": 0},
            "drain": {"quietPeriod": "2s", "propagationTimeout": "30s", "closeRate": 200, "drainTimeout": "20s"},
            "agent": {},
            "warmup": {"probe": {
                "httpGet": {"path": "/ready", "port": "http"},
                "periodSeconds": 1, "failureThreshold": 300,
            }},
            "template": {
                "metadata": {"labels": {"app": APP}},
                "spec": {
                    "nodeSelector": {"sluice.dev/pool": pool},
                    "tolerations": [{"key": "sluice.dev/pool", "operator": "Equal", "value": pool, "effect": "NoSchedule"}],
                    "terminationGracePeriodSeconds": 30,
                    "containers": [{
                        "name": "server",
                        "image": format!("sluice/echo:{version}"),
                        "args": ["--listen", "0.0.0.0:8080",
                                 "--warmup", format!("{}ms", spec.model_load.as_millis())],
                        "env": [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
                        "ports": [{"name": "http", "containerPort": 8080}],
                        "readinessProbe": {"httpGet": {"path": "/ready", "port": "http"},
                                           "periodSeconds": 1, "failureThreshold": 1},
                    }],
                },
            },
        },
    })
}

async fn wait_nodes_ready(nodes: &Api<Node>, names: &[String], pool: &str) -> anyhow::Result<()> {
    // Each node imports every image into its own containerd before its kubelet starts: with
    // eight nodes doing that at once on two cores, a minute is not enough.
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        let mut ready = 0;
        for n in names {
            if let Some(node) = nodes.get_opt(n).await? {
                let ok = node
                    .status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
                if ok {
                    ready += 1;
                }
            }
        }
        if ready == names.len() {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{ready}/{} real nodes ready after 240s",
            names.len()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // Only this run's pods go there: a pool label and a taint they tolerate.
    for n in names {
        nodes
            .patch(
                n,
                &PatchParams::default(),
                &Patch::Merge(json!({
                    "metadata": {"labels": {"sluice.dev/pool": pool}},
                    "spec": {"taints": [{"key": "sluice.dev/pool", "value": pool, "effect": "NoSchedule"}]},
                })),
            )
            .await?;
    }
    Ok(())
}

/// Slots in service now: a pod with `sluice.dev/serving=True`, not being deleted.
fn in_service(pods: &[Pod]) -> BTreeSet<String> {
    pods.iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter(|p| {
            p.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| {
                    cs.iter()
                        .any(|c| c.type_ == "sluice.dev/serving" && c.status == "True")
                })
        })
        .filter_map(|p| {
            p.metadata
                .labels
                .as_ref()?
                .get("sluice.dev/replica")
                .cloned()
        })
        .collect()
}

async fn pod_names(pods: &Api<Pod>) -> anyhow::Result<BTreeSet<String>> {
    Ok(pods
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .filter_map(|p| p.metadata.name.clone())
        .collect())
}

fn revision_of(p: &Pod) -> String {
    p.metadata
        .labels
        .as_ref()
        .and_then(|l| l.get("sluice.dev/revision"))
        .cloned()
        .unwrap_or_default()
}

async fn run_rollout(spec: &Spec) -> anyhow::Result<Outcome> {
    let cluster = TestCluster::get().await?;
    let client = cluster.client.clone();
    apply_crds(&client).await?;
    let ns = cluster.namespace("infroll").await?;
    let pool = ns.name.clone();
    let mut nodes = Nodes::start(&cluster.kubeconfig, spec)?;
    let node_api: Api<Node> = Api::all(client.clone());
    let result = async {
        wait_nodes_ready(&node_api, &nodes.names, &pool).await?;
        let mut operator = OperatorProcess::start(&cluster.kubeconfig, &ns.name)?;
        let r = rollout_in(&client, &ns.name, &pool, spec).await;
        if r.is_err() {
            eprintln!("operator log: {}", operator.log.display());
        }
        // The operator goes first: running, it would replace the pods deleted below (a
        // replacement started on a node that is stopping outlived a run once). Then the
        // pods go before the nodes (their processes are the nodes' to stop).
        operator.stop();
        let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
        let _ = infs_api(&client, &ns.name)
            .delete(APP, &DeleteParams::default())
            .await;
        let _ = pods
            .delete_collection(
                &DeleteParams::default().grace_period(1),
                &ListParams::default(),
            )
            .await;
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline
            && !pods
                .list_metadata(&ListParams::default())
                .await?
                .items
                .is_empty()
        {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        r
    }
    .await;
    nodes.stop_processes();
    for n in &nodes.names {
        let _ = node_api.delete(n, &DeleteParams::default()).await;
    }
    result
}

async fn rollout_in(
    client: &kube::Client,
    ns: &str,
    pool: &str,
    spec: &Spec,
) -> anyhow::Result<Outcome> {
    let proxy = ServiceProxy::start(
        client.clone(),
        ProxyConfig {
            propagation_delay: spec.delay,
            namespace: Some(ns.to_string()),
            salt: ns.to_string(),
            out: None,
        },
    )
    .await?;
    let svc: Service = serde_json::from_value(json!({
        "metadata": {"name": APP},
        "spec": {"selector": {"app": APP}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]},
    }))?;
    Api::<Service>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &svc)
        .await?;
    let sets = infs_api(client, ns);
    let set: DynamicObject = serde_json::from_value(inference_set(spec, pool, "v1"))?;
    sets.create(&PostParams::default(), &set).await?;
    let target = proxy
        .wait_for_address(&format!("{ns}/{APP}:80"), Duration::from_secs(30))
        .await?;
    let n = spec.replicas as usize;
    let started = Instant::now();
    proxy
        .wait_endpoints(
            &format!("{ns}/{APP}"),
            Duration::from_secs(120) + spec.model_load + spec.delay,
            |eps| eps.iter().filter(|e| e.ready).count() == n,
        )
        .await
        .context("waiting for the v1 replicas to serve behind the proxy")?;
    eprintln!(
        "v1: {n} replicas serving after {:.1}s",
        started.elapsed().as_secs_f64()
    );
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let old_pods = pod_names(&pods).await?;
    let v1_rev = revision_of(&pods.list(&ListParams::default()).await?.items[0]);

    // Load, then the rollout.
    let steady = Duration::from_secs(3);
    let cfg = LoadConfig {
        target,
        path: "/generate".into(),
        connections: spec.connections,
        rate: spec.rate,
        duration: spec.max_rollout + steady + spec.delay + Duration::from_secs(10),
        timeout: Duration::from_secs(5),
        ..Default::default()
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let load_task = tokio::spawn(load::run_load(cfg, Some(stop_rx)));
    tokio::time::sleep(steady).await;
    let t0 = Instant::now();
    sets.patch(
        APP,
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"template": {"spec": {"containers": [{
            "name": "server", "image": "sluice/echo:v2",
            "args": ["--listen", "0.0.0.0:8080", "--warmup", format!("{}ms", spec.model_load.as_millis())],
            "env": [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
            "ports": [{"name": "http", "containerPort": 8080}],
            "readinessProbe": {"httpGet": {"path": "/ready", "port": "http"}, "periodSeconds": 1, "failureThreshold": 1},
        }]}}}})),
    )
    .await?;
    let mut max_out = 0;
    let done = loop {
        let list = pods.list(&ListParams::default()).await?.items;
        let out = spec.replicas - in_service(&list).len() as i32;
        max_out = max_out.max(out);
        let all_new = list.len() == n
            && list
                .iter()
                .all(|p| revision_of(p) != v1_rev && p.metadata.deletion_timestamp.is_none());
        if all_new && out == 0 {
            break true;
        }
        if t0.elapsed() > spec.max_rollout {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let rollout_s = t0.elapsed().as_secs_f64();
    // What the slow load balancer does after the rollout is part of its cost.
    tokio::time::sleep(spec.delay + Duration::from_secs(2)).await;
    let _ = stop_tx.send(true);
    let report = load_task.await??;
    let new_pods = pod_names(&pods).await?;
    let answered_by_new_at_end = report
        .series
        .iter()
        .rev()
        .find(|b| !b.by_pod.is_empty())
        .is_some_and(|b| b.by_pod.keys().all(|p| new_pods.contains(p)));
    drop(proxy);
    let mut events = BTreeMap::new();
    let ev: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), ns);
    for e in ev.list(&ListParams::default()).await?.items {
        if e.reporting_controller.as_deref() == Some("sluice-inference") {
            // The recorder folds repeated events into a series.
            let n = e
                .series
                .as_ref()
                .map(|s| s.count)
                .or(e.deprecated_count)
                .unwrap_or(1)
                .max(1);
            *events.entry(e.reason.unwrap_or_default()).or_insert(0) += n as u32;
        }
    }
    anyhow::ensure!(
        done,
        "the rollout did not complete in {:?}",
        spec.max_rollout
    );
    Ok(Outcome {
        rollout_s,
        max_out,
        requests: report.requests,
        failed: report.failed,
        by_outcome: report
            .by_outcome
            .iter()
            .filter(|(_, v)| **v > 0)
            .map(|(k, v)| (k.as_str().to_string(), *v))
            .collect(),
        old_pods,
        new_pods,
        answered_by_new_at_end,
        events,
    })
}

fn check(spec: &Spec, o: &Outcome) {
    eprintln!("{spec:?}\n{o:?}");
    assert_eq!(o.failed, 0, "requests failed: {:?}", o.by_outcome);
    assert!(
        o.max_out <= spec.max_unavailable,
        "{} replicas out of service at once (maxUnavailable {})",
        o.max_out,
        spec.max_unavailable
    );
    assert_eq!(o.new_pods.len(), spec.replicas as usize);
    assert!(o.old_pods.is_disjoint(&o.new_pods));
    assert!(
        o.answered_by_new_at_end,
        "old pods still answered at the end"
    );
    assert!(o.requests > 0);
    // Old replicas left on the agent's quiet signal, none at the propagation timeout.
    assert!(o.events.contains_key("ReplicaQuiet"), "{:?}", o.events);
    assert!(!o.events.contains_key("QuietTimeout"), "{:?}", o.events);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_rollout_is_lossless() -> anyhow::Result<()> {
    let spec = Spec {
        replicas: 4,
        nodes: 2,
        gpus_per_pod: 4,
        node_base: 1,
        model_load: Duration::from_secs(5),
        max_unavailable: 1,
        connections: 16,
        rate: 100.0,
        delay: Duration::from_secs(1),
        max_rollout: Duration::from_secs(150),
    };
    let o = run_rollout(&spec).await?;
    check(&spec, &o);
    Ok(())
}

fn env_num<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: e2e/bench-gpu.sh"]
async fn gpu_fleet_rollout() -> anyhow::Result<()> {
    let replicas: i32 = env_num("BENCH_ROLLOUT_REPLICAS", 16);
    let gpus_per_pod: i32 = env_num("BENCH_ROLLOUT_TP", 4);
    let spec = Spec {
        replicas,
        nodes: ((replicas * gpus_per_pod) as usize).div_ceil(8),
        gpus_per_pod,
        node_base: 1,
        model_load: Duration::from_secs(env_num("BENCH_ROLLOUT_LOAD_S", 20)),
        max_unavailable: env_num("BENCH_ROLLOUT_MAX_UNAVAILABLE", 2),
        connections: env_num("BENCH_ROLLOUT_CONNECTIONS", 32),
        rate: env_num("BENCH_ROLLOUT_RATE", 200.0),
        delay: Duration::from_secs(2),
        max_rollout: Duration::from_secs(600),
    };
    let o = run_rollout(&spec).await?;
    let out = json!({
        "replicas": spec.replicas, "podsPerReplica": 1, "gpusPerPod": spec.gpus_per_pod,
        "nodes": spec.nodes, "gpusPerNode": 8, "spareGpus": spec.nodes as i32 * 8 - spec.replicas * spec.gpus_per_pod,
        "modelLoadSeconds": spec.model_load.as_secs_f64(),
        "maxUnavailable": spec.max_unavailable, "maxSurge": 0,
        "loadBalancerDelaySeconds": spec.delay.as_secs_f64(),
        "load": {"connections": spec.connections, "rate": spec.rate},
        "rolloutSeconds": o.rollout_s,
        "maxReplicasOut": o.max_out,
        "requests": o.requests, "failed": o.failed, "byOutcome": o.by_outcome,
        "events": o.events,
        "method": "InferenceSet with the Sluice agent injected, on real nodes advertising 8 GPUs each; template change under keep-alive load through the service proxy; rollout clock from the template patch until every replica is on the new revision and serving; replicas out sampled from the pods every 200 ms",
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    let path: PathBuf = repo_root().join("target/bench/gpu.json");
    std::fs::create_dir_all(path.parent().unwrap())?;
    let mut all: serde_json::Value = std::fs::read_to_string(&path)
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok())
        .filter(|v: &serde_json::Value| v.is_object())
        .unwrap_or_else(|| json!({}));
    all["rollout"] = out;
    std::fs::write(&path, serde_json::to_string_pretty(&all)?)?;
    check(&spec, &o);
    Ok(())
}
