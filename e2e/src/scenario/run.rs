//! One run: a namespace, the Service and Deployment, an in-process [`ServiceProxy`] with
//! the run's propagation delay, the load, the release and its measurement.
use std::time::{Duration, Instant};

use anyhow::Context as _;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Service};
use kube::api::{DeleteParams, PostParams};
use kube::{Api, Client};

use super::result::{RunResult, p99_between, storm_factor};
use super::spec::{APP, RunSpec, SERVICE_PORT, echo_deployment, echo_service};
use super::strategy::{RunContext, Strategy, pod_names};
use crate::load::{self, LoadConfig, LoadReport};
use crate::svc_proxy::{ProxyConfig, ServiceProxy};

/// Runs one release under load and measures it.
pub async fn run_one(
    client: &Client,
    strategy: &dyn Strategy,
    spec: &RunSpec,
) -> anyhow::Result<RunResult> {
    let suffix: String = (0..4)
        .map(|_| char::from(b'a' + rand::random_range(0..26u8)))
        .collect();
    let namespace = format!(
        "lossless-{}-{}s-{suffix}",
        strategy.name().to_ascii_lowercase(),
        spec.delay.as_secs()
    );
    check_node(client, &spec.node).await?;
    tracing::info!(%namespace, strategy = %strategy.name(), delay = ?spec.delay, "run starting");
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let mut labels = serde_json::json!({"sluice.dev/e2e": "scenario"});
    if spec.restricted {
        labels["pod-security.kubernetes.io/enforce"] = "restricted".into();
        labels["pod-security.kubernetes.io/enforce-version"] = "latest".into();
    }
    let ns_obj: Namespace = serde_json::from_value(serde_json::json!({
        "metadata": {"name": namespace, "labels": labels}
    }))?;
    namespaces
        .create(&PostParams::default(), &ns_obj)
        .await
        .context("creating the namespace")?;
    let result = run_in_namespace(client, strategy, spec, &namespace).await;
    if !spec.keep {
        let _ = namespaces
            .delete(&namespace, &DeleteParams::default())
            .await;
        // The next run must not share the node with this one's teardown: B2's pods alone
        // take their 15 s preStop to go, and the namespace controller's sweep costs the
        // control plane CPU; measured beside the next run's steady window and release,
        // they were the next strategy's tail.
        let deadline = Instant::now() + Duration::from_secs(180);
        while !matches!(namespaces.get_opt(&namespace).await, Ok(None)) {
            if Instant::now() > deadline {
                tracing::warn!(%namespace, "the run's namespace is still terminating after 180 s");
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    result
}

/// Fails with advice when the real node is not there to run the pods.
async fn check_node(client: &Client, node: &str) -> anyhow::Result<()> {
    use k8s_openapi::api::core::v1::Node;
    let nodes: Api<Node> = Api::all(client.clone());
    let n = nodes
        .get_opt(node)
        .await?
        .with_context(|| format!("node {node} is not registered; `make cluster-up` starts it"))?;
    let ready = n
        .status
        .and_then(|s| s.conditions)
        .unwrap_or_default()
        .iter()
        .any(|c| c.type_ == "Ready" && c.status == "True");
    anyhow::ensure!(
        ready,
        "node {node} is not Ready; see target/e2e/logs/kubelet-{node}.log"
    );
    Ok(())
}

async fn run_in_namespace(
    client: &Client,
    strategy: &dyn Strategy,
    spec: &RunSpec,
    ns: &str,
) -> anyhow::Result<RunResult> {
    let ctx = RunContext {
        client: client.clone(),
        namespace: ns.to_string(),
        name: APP.to_string(),
        new_image: "sluice/echo:v2".into(),
        new_pod_capacity: spec.new_pod_capacity,
    };
    // The proxy starts first so that its propagation delay overlaps the pods' start.
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
    let svc_api: Api<Service> = Api::namespaced(client.clone(), ns);
    svc_api
        .create(&PostParams::default(), &echo_service(APP))
        .await
        .context("creating the Service")?;
    let mut deployment = echo_deployment(APP, spec, "sluice/echo:v1");
    strategy.shape(&mut deployment);
    strategy.prepare(&ctx).await?;
    let dep_api: Api<Deployment> = Api::namespaced(client.clone(), ns);
    dep_api
        .create(&PostParams::default(), &deployment)
        .await
        .context("creating the Deployment")?;
    let target = proxy
        .wait_for_address(
            &format!("{ns}/{APP}:{SERVICE_PORT}"),
            Duration::from_secs(30),
        )
        .await?;
    let replicas = spec.replicas as usize;
    proxy
        .wait_endpoints(
            &format!("{ns}/{APP}"),
            Duration::from_secs(90) + spec.delay,
            |eps| eps.iter().filter(|e| e.ready).count() == replicas,
        )
        .await
        .context("waiting for the v1 pods to be ready behind the proxy")?;
    let old_pods = pod_names(client, ns).await?;

    let origin = Instant::now();
    let max_total =
        spec.steady + spec.max_release + spec.tail + spec.delay + Duration::from_secs(5);
    let cfg = LoadConfig {
        target,
        path: "/".into(),
        connections: spec.connections,
        rate: spec.rate,
        duration: max_total,
        http2: false,
        streams: 1,
        timeout: Duration::from_secs(5),
        connect_timeout: Duration::from_secs(2),
        origin: Some(origin),
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let load_task = tokio::spawn(load::run_load(cfg, Some(stop_rx)));
    // From the start, so that the release's CPU can be read beside the steady window's.
    let cpu = crate::cpu::CpuMeter::start();
    tokio::time::sleep(spec.steady).await;
    let api_before = crate::api_requests::read(client).await;
    let release_start = origin.elapsed();
    let released = async {
        strategy.release(&ctx).await?;
        strategy
            .wait_released(&ctx, spec.replicas, Instant::now() + spec.max_release)
            .await
    }
    .await;
    let release_end = origin.elapsed();
    // The tail outlasts the propagation delay: what a slow load balancer does after the
    // release is part of the release's cost.
    let tail = spec.tail + spec.delay;
    if released.is_ok() {
        tokio::time::sleep(spec.delay).await;
    }
    let cpu = cpu.stop().await;
    let api_requests =
        crate::api_requests::delta(&api_before, &crate::api_requests::read(client).await);
    if released.is_ok() {
        tokio::time::sleep(spec.tail).await;
    }
    let _ = stop_tx.send(true);
    let report: LoadReport = load_task.await.context("load task")??;
    // Every request and connection of the run, for a closer look at where its latency went.
    if let Some(dir) = std::env::var_os("SLUICE_E2E_RECORDS_DIR") {
        let path = std::path::Path::new(&dir).join(format!("{ns}.jsonl"));
        report
            .write_records(&path)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    released?;
    let new_pods = pod_names(client, ns).await?;
    drop(proxy);
    let rs_ms = release_start.as_secs_f64() * 1000.0;
    let re_ms = release_end.as_secs_f64() * 1000.0;
    let storm = storm_factor(
        &report.conn_log,
        &new_pods,
        (rs_ms, re_ms + tail.as_secs_f64() * 1000.0),
        spec.new_pod_capacity,
    );
    Ok(RunResult {
        strategy: strategy.name(),
        description: strategy.description(),
        delay_s: spec.delay.as_secs_f64(),
        spec: spec.clone(),
        namespace: ns.to_string(),
        requests: report.requests,
        failed: report.failed,
        by_outcome: report.by_outcome.clone(),
        achieved_rps: report.achieved_rps,
        release_s: (re_ms - rs_ms) / 1000.0,
        release_start_s: rs_ms / 1000.0,
        release_end_s: re_ms / 1000.0,
        p99_steady_ms: p99_between(&report.request_log, 2000.0, rs_ms),
        // Clients feel a release until the load balancer has caught up with it.
        p99_release_ms: p99_between(
            &report.request_log,
            rs_ms,
            re_ms + spec.delay.as_secs_f64() * 1000.0,
        ),
        tail: crate::tail::tail_breakdown(
            &report.request_log,
            &new_pods,
            (rs_ms, re_ms + spec.delay.as_secs_f64() * 1000.0),
        ),
        cpu_s: crate::cpu::seconds_between(
            &cpu.series,
            rs_ms / 1000.0,
            re_ms / 1000.0 + spec.delay.as_secs_f64(),
        ),
        cpu_wait_s: crate::cpu::waiting_between(
            &cpu.series,
            rs_ms / 1000.0,
            re_ms / 1000.0 + spec.delay.as_secs_f64(),
        ),
        cpu_series: cpu.series,
        api_requests,
        cpu_top_other: cpu.top_other,
        storm,
        connections_opened: report.connections_opened,
        closed_by_server: report.closed_by_server,
        old_pods: old_pods.into_iter().collect(),
        new_pods: new_pods.into_iter().collect(),
        series: report.series,
    })
}
