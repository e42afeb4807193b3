//! Helpers shared by the traffic test ground's e2e tests (`ground_*.rs`).
#![allow(dead_code)]

pub mod routing;

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, PostParams};
use kube::{Client, ResourceExt};
use sluice_e2e::cluster::{TestCluster, TestNamespace};

pub const NODE: &str = "local-0";

/// The running test ground with its real node, and a fresh namespace.
pub async fn ground(prefix: &str) -> anyhow::Result<(TestCluster, TestNamespace)> {
    let cluster = TestCluster::get()
        .await
        .context("the test ground's control plane")?;
    require_node(&cluster.client).await?;
    let ns = cluster.namespace(prefix).await?;
    Ok((cluster, ns))
}

/// Fails (does not skip) when the real node is missing: `make cluster-up` starts it.
pub async fn require_node(client: &Client) -> anyhow::Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    wait_for(
        Duration::from_secs(30),
        "real node local-0 to be Ready (`make cluster-up` starts it)",
        || {
            let nodes = nodes.clone();
            async move {
                let n = nodes.get_opt(NODE).await.ok()??;
                let ready = n
                    .status?
                    .conditions?
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True");
                ready.then_some(())
            }
        },
    )
    .await
}

/// Polls `f` every 200 ms until it yields a value or `timeout` passes.
pub async fn wait_for<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub async fn create_pod(client: &Client, ns: &str, pod: serde_json::Value) -> anyhow::Result<Pod> {
    let pod: Pod = serde_json::from_value(pod)?;
    let api: Api<Pod> = Api::namespaced(client.clone(), ns);
    Ok(api.create(&PostParams::default(), &pod).await?)
}

pub fn condition(pod: &Pod, type_: &str) -> Option<String> {
    pod.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| c.status.clone())
}

pub fn is_ready(pod: &Pod) -> bool {
    condition(pod, "Ready").as_deref() == Some("True")
}

/// Waits until the pod satisfies `pred`; returns it.
pub async fn wait_pod(
    client: &Client,
    ns: &str,
    name: &str,
    timeout: Duration,
    what: &str,
    pred: impl Fn(&Pod) -> bool,
) -> anyhow::Result<Pod> {
    let api: Api<Pod> = Api::namespaced(client.clone(), ns);
    wait_for(timeout, &format!("pod {name}: {what}"), || {
        let api = api.clone();
        let pred = &pred;
        async move { api.get_opt(name).await.ok()?.filter(|p| pred(p)) }
    })
    .await
}

/// Waits until the pod is gone from the API.
pub async fn wait_pod_gone(
    client: &Client,
    ns: &str,
    name: &str,
    timeout: Duration,
) -> anyhow::Result<()> {
    let api: Api<Pod> = Api::namespaced(client.clone(), ns);
    wait_for(timeout, &format!("pod {name} to be deleted"), || {
        let api = api.clone();
        async move {
            match api.get_opt(name).await {
                Ok(None) => Some(()),
                _ => None,
            }
        }
    })
    .await
}

pub fn pod_ip(pod: &Pod) -> Option<String> {
    pod.status.as_ref()?.pod_ip.clone()
}

pub fn restart_count(pod: &Pod, container: &str) -> i32 {
    pod.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.name == container))
        .map(|c| c.restart_count)
        .unwrap_or(0)
}

/// A scratch directory for a test's pods to write to (pods share the host's file system).
pub fn scratch(ns: &str) -> std::path::PathBuf {
    let dir = sluice_e2e::cluster::repo_root()
        .join("target/e2e/scratch")
        .join(ns);
    std::fs::create_dir_all(&dir).expect("creating a scratch directory");
    dir
}

pub fn name_of(pod: &Pod) -> String {
    pod.name_any()
}

/// The release replaced all `replicas` old pods with new ones, and by the end of the run
/// only new pods answer.
pub fn assert_rolled_over(r: &sluice_e2e::scenario::RunResult, replicas: usize) {
    assert_eq!(r.old_pods.len(), replicas);
    assert_eq!(r.new_pods.len(), replicas);
    assert!(r.old_pods.iter().all(|p| !r.new_pods.contains(p)));
    let last = r
        .series
        .iter()
        .rev()
        .find(|b| !b.by_pod.is_empty())
        .expect("answers in the series");
    assert!(
        last.by_pod.keys().all(|p| r.new_pods.contains(p)),
        "old pods still answering at the end: {:?}",
        last.by_pod
    );
}

/// The small release run most e2e tests use: 3 replicas behind the service proxy 1 s late,
/// 45 keep-alive connections at 150 requests/s, 3 s of steady load before and 2 s after.
pub fn small_run(max_release: Duration) -> sluice_e2e::scenario::RunSpec {
    sluice_e2e::scenario::RunSpec {
        replicas: 3,
        connections: 45,
        rate: 150.0,
        delay: Duration::from_secs(1),
        steady: Duration::from_secs(3),
        tail: Duration::from_secs(2),
        max_release,
        ..Default::default()
    }
}

/// Polls `f` every 250 ms until it yields a value, fails, or `timeout` passes.
pub async fn wait_until<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await? {
            return Ok(v);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "timed out after {timeout:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The echo app run by Sluice in `ns`: its Service, the operator (a host process) and the
/// Release, and the Deployment shaped for it, `replicas` pods of v1 (not waited for).
/// Returns the context a [`sluice_e2e::scenario::Strategy`] needs, the strategy (it owns
/// the operator process) and the Service as created.
pub async fn sluice_app(
    client: &Client,
    ns: &str,
    replicas: i32,
) -> anyhow::Result<(
    sluice_e2e::scenario::RunContext,
    sluice_e2e::scenario_sluice::Sluice,
    k8s_openapi::api::core::v1::Service,
)> {
    use k8s_openapi::api::apps::v1::Deployment;
    use sluice_e2e::scenario::{APP, RunContext, RunSpec, Strategy, echo_deployment, echo_service};
    let spec = RunSpec {
        replicas,
        ..Default::default()
    };
    let ctx = RunContext {
        client: client.clone(),
        namespace: ns.to_string(),
        name: APP.to_string(),
        new_image: "sluice/echo:v2".into(),
        new_pod_capacity: spec.new_pod_capacity,
    };
    let strategy = sluice_e2e::scenario_sluice::Sluice::proxy();
    let svc = Api::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &echo_service(APP))
        .await?;
    let mut deployment = echo_deployment(APP, &spec, "sluice/echo:v1");
    strategy.shape(&mut deployment);
    strategy.prepare(&ctx).await?;
    Api::<Deployment>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &deployment)
        .await?;
    Ok((ctx, strategy, svc))
}

/// Stops the operator of [`sluice_app`] and drops the Release's hand-back finalizer: no
/// operator is left to hand the pods back, and the namespace's deletion must not wait for
/// one.
pub async fn stop_sluice(
    client: &Client,
    ns: &str,
    sluice: &sluice_e2e::scenario_sluice::Sluice,
) -> anyhow::Result<()> {
    use kube::api::{Patch, PatchParams};
    sluice.stop_operator();
    sluice_e2e::scenario_sluice::releases(client, ns)
        .patch(
            sluice_e2e::scenario::APP,
            &PatchParams::default(),
            &Patch::Merge(&serde_json::json!({"metadata": {"finalizers": null}})),
        )
        .await?;
    Ok(())
}

/// Starts the pod `client` on the real node: our load generator (in its image) sending
/// `rate` requests/s on `connections` keep-alive connections to `url` for `secs` seconds.
pub async fn start_load_pod(
    client: &Client,
    ns: &str,
    url: &str,
    connections: u32,
    rate: u32,
    secs: u64,
) -> anyhow::Result<Pod> {
    create_pod(
        client,
        ns,
        serde_json::json!({
            "metadata": {"name": "client"},
            "spec": {
                "nodeName": NODE,
                "restartPolicy": "Never",
                "containers": [{
                    "name": "load",
                    "image": "sluice/e2e:dev",
                    "args": ["load", "--url", url, "-c", connections.to_string(),
                             "-r", rate.to_string(), "-d", format!("{secs}s")],
                }],
            }
        }),
    )
    .await
}

/// Waits for the pod `client` (see [`start_load_pod`]) to finish; its phase, its load
/// summary (the JSON line of its log) and the whole log.
pub async fn load_pod_report(
    client: &Client,
    ns: &str,
    timeout: Duration,
) -> anyhow::Result<(String, serde_json::Value, String)> {
    let api: Api<Pod> = Api::namespaced(client.clone(), ns);
    let phase = wait_for(timeout, "the client pod to finish", || {
        let api = api.clone();
        async move {
            let p = api.get_opt("client").await.ok()??;
            let phase = p.status?.phase?;
            matches!(phase.as_str(), "Succeeded" | "Failed").then_some(phase)
        }
    })
    .await?;
    let log = api.logs("client", &kube::api::LogParams::default()).await?;
    let report =
        summary_of(&log).with_context(|| format!("no JSON summary in the client's log: {log}"))?;
    Ok((phase, report, log))
}

/// The one-second bins of a load report in which some request failed.
pub fn failed_bins(report: &serde_json::Value) -> impl Iterator<Item = &serde_json::Value> {
    report["series"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|bin| bin["errors"].as_object().is_some_and(|e| !e.is_empty()))
}

/// The load CLI's JSON summary in a pod's log. The container runtime splits lines longer
/// than its limit (32 KiB here) into several: join the lines from the first `{` on until
/// they parse (the CLI writes its recap line before it, on the same stream).
pub fn summary_of(log: &str) -> Option<serde_json::Value> {
    let is_recap = |l: &str| {
        l.split_once(" requests, ")
            .is_some_and(|(n, _)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    };
    let mut lines = log.lines().skip_while(|l| !l.starts_with('{'));
    let mut text = String::new();
    for l in lines.by_ref() {
        if is_recap(l) {
            continue;
        }
        text.push_str(l);
        if let Ok(v) = serde_json::from_str(&text) {
            return Some(v);
        }
    }
    None
}
