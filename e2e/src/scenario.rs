//! Scenarios: a rolling release v1 → v2 of an echo Deployment under load, measured the same
//! way whatever drives the release.
//!
//! A [`Strategy`] shapes the workload (preStop hooks, app flags, readiness gates, sidecars)
//! and performs the release; the runner owns everything else — namespace, Service,
//! Deployment, an in-process [`ServiceProxy`] with the run's propagation delay, the load, the
//! analysis and the report — so that baselines and Sluice are measured side by side. The
//! baselines: B1 (no preStop, the app exits on SIGTERM at once) and B2 (`preStop: sleep 15`
//! and a graceful app). A Sluice strategy plugs in by implementing [`Strategy`] and adding
//! itself to [`strategy_by_name`].
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures::future::BoxFuture;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde::{Deserialize, Serialize};

use crate::load::{self, ConnRecord, LoadConfig, LoadReport, Outcome, RequestRecord};
use crate::svc_proxy::{ProxyConfig, ServiceProxy};

pub const APP: &str = "echo";
pub const SERVICE_PORT: u16 = 80;
pub const APP_PORT: u16 = 8080;

/// What a strategy gets to work with.
pub struct RunContext {
    pub client: Client,
    pub namespace: String,
    /// The Deployment's (and the Service's) name.
    pub name: String,
    /// The image of the release's new version.
    pub new_image: String,
    /// New connections per second one pod can take ([`RunSpec::new_pod_capacity`]).
    pub new_pod_capacity: f64,
}

impl RunContext {
    /// The plain rolling update: set the new image on the Deployment.
    pub async fn set_image(&self, image: &str) -> anyhow::Result<()> {
        let api: Api<Deployment> = Api::namespaced(self.client.clone(), &self.namespace);
        let patch = serde_json::json!({"spec": {"template": {"spec": {"containers": [{"name": APP, "image": image}]}}}});
        api.patch(
            &self.name,
            &PatchParams::default(),
            &Patch::Strategic(&patch),
        )
        .await
        .context("patching the Deployment's image")?;
        Ok(())
    }
}

/// How a release is done. Implemented by the baselines here and by Sluice's scenario.
pub trait Strategy: Send + Sync {
    /// Short name for reports ("B1", "B2", "sluice").
    fn name(&self) -> String;
    /// One line for the report.
    fn description(&self) -> String;
    /// Shapes the workload before it is created.
    fn shape(&self, deployment: &mut Deployment);
    /// Prepares anything else the strategy needs once the namespace exists (a Release
    /// object, say). The default needs nothing.
    fn prepare<'a>(&'a self, _ctx: &'a RunContext) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async { Ok(()) })
    }
    /// Starts the release to `ctx.new_image`; the runner then waits until it is complete
    /// (all new pods available, no old pod left). The default patches the image.
    fn release<'a>(&'a self, ctx: &'a RunContext) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(ctx.set_image(&ctx.new_image))
    }
    /// Waits until the release is complete. The default: the Deployment rolled out its
    /// template (all new pods available, no old pod left).
    fn wait_released<'a>(
        &'a self,
        ctx: &'a RunContext,
        replicas: i32,
        deadline: Instant,
    ) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(wait_rolled_out(
            &ctx.client,
            &ctx.namespace,
            &ctx.name,
            replicas,
            deadline,
        ))
    }
}

/// The common-practice baselines.
#[derive(Clone, Debug)]
pub struct Baseline {
    pub name: &'static str,
    /// `preStop: sleep` seconds (the native sleep action), if any.
    pub pre_stop_sleep: Option<i64>,
    /// The app's SIGTERM behaviour (`exit` or `graceful`).
    pub on_sigterm: &'static str,
}

/// B1: no preStop; the app exits on SIGTERM at once.
pub fn b1() -> Baseline {
    Baseline {
        name: "B1",
        pre_stop_sleep: None,
        on_sigterm: "exit",
    }
}

/// B2: the common advice: `preStop: sleep 15` and a graceful app.
pub fn b2() -> Baseline {
    Baseline {
        name: "B2",
        pre_stop_sleep: Some(15),
        on_sigterm: "graceful",
    }
}

impl Strategy for Baseline {
    fn name(&self) -> String {
        self.name.to_string()
    }

    fn description(&self) -> String {
        match self.pre_stop_sleep {
            Some(s) => format!("preStop sleep {s}s, app {} on SIGTERM", self.on_sigterm),
            None => format!("no preStop, app {} on SIGTERM", self.on_sigterm),
        }
    }

    fn shape(&self, d: &mut Deployment) {
        let pod = d
            .spec
            .as_mut()
            .and_then(|s| s.template.spec.as_mut())
            .expect("the runner builds a pod template");
        let c = &mut pod.containers[0];
        c.args
            .get_or_insert_with(Vec::new)
            .extend(["--on-sigterm".to_string(), self.on_sigterm.to_string()]);
        if let Some(secs) = self.pre_stop_sleep {
            c.lifecycle = Some(
                serde_json::from_value(
                    serde_json::json!({"preStop": {"sleep": {"seconds": secs}}}),
                )
                .expect("valid lifecycle"),
            );
        }
    }
}

/// Strategies known to `sluice-e2e scenario`.
pub fn strategy_by_name(name: &str) -> Option<Arc<dyn Strategy>> {
    match name.to_ascii_lowercase().as_str() {
        "b1" => Some(Arc::new(b1())),
        "b2" => Some(Arc::new(b2())),
        other => crate::scenario_sluice::strategy_by_name(other),
    }
}

/// The shape of one run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunSpec {
    pub replicas: i32,
    pub connections: usize,
    pub rate: f64,
    /// Service-proxy propagation delay.
    #[serde(with = "humantime_serde_secs")]
    pub delay: Duration,
    /// Load before the release (the steady-state reference).
    #[serde(with = "humantime_serde_secs")]
    pub steady: Duration,
    /// Load after the release completed (plus the propagation delay).
    #[serde(with = "humantime_serde_secs")]
    pub tail: Duration,
    /// Give up when the release takes longer.
    #[serde(with = "humantime_serde_secs")]
    pub max_release: Duration,
    /// The node the pods run on.
    pub node: String,
    /// Keep the namespace after the run (for debugging).
    pub keep: bool,
    /// New connections per second one pod can take: the application's declared capacity
    /// (a Release states it as `gates.connectionRate.maxPerPod`). The storm factor is
    /// measured against it for every strategy.
    #[serde(default = "default_new_pod_capacity")]
    pub new_pod_capacity: f64,
    /// Run in a namespace that enforces the `restricted` Pod Security Standard (the
    /// workload's own template complies; whatever Sluice adds must too).
    #[serde(default)]
    pub restricted: bool,
}

fn default_new_pod_capacity() -> f64 {
    5.0
}

mod humantime_serde_secs {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_secs_f64(f64::deserialize(d)?))
    }
}

impl Default for RunSpec {
    fn default() -> Self {
        RunSpec {
            replicas: 6,
            connections: 200,
            rate: 500.0,
            delay: Duration::ZERO,
            steady: Duration::from_secs(15),
            tail: Duration::from_secs(10),
            max_release: Duration::from_secs(180),
            node: "local-0".into(),
            keep: false,
            new_pod_capacity: default_new_pod_capacity(),
            restricted: false,
        }
    }
}

/// What one run measured.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunResult {
    pub strategy: String,
    pub description: String,
    pub delay_s: f64,
    pub spec: RunSpec,
    pub namespace: String,
    pub requests: u64,
    pub failed: u64,
    pub by_outcome: BTreeMap<Outcome, u64>,
    pub achieved_rps: f64,
    /// Seconds from the release's start until every new pod was available and every old
    /// pod gone.
    pub release_s: f64,
    /// Release start and end, seconds since the load's origin.
    pub release_start_s: f64,
    pub release_end_s: f64,
    /// p99 latency of the requests due in the steady window (after a 2 s warm-up).
    pub p99_steady_ms: f64,
    /// p99 latency of the requests due from the release's start until the propagation
    /// delay after its end.
    pub p99_release_ms: f64,
    /// The release window's tail, split by old/new pod and by first request on a
    /// connection vs later ones, per second too (the worst second is in here).
    #[serde(default)]
    pub tail: crate::tail::TailBreakdown,
    /// CPU seconds spent from the release's start until the propagation delay after its
    /// end, by role (operator, agents, apps, node, control_plane, load_and_proxy, other).
    #[serde(default)]
    pub cpu_s: BTreeMap<String, f64>,
    pub storm: Storm,
    pub connections_opened: u64,
    pub closed_by_server: u64,
    pub old_pods: Vec<String>,
    pub new_pods: Vec<String>,
    pub series: Vec<load::Bin>,
}

/// The connection storm seen by the new pods.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Storm {
    /// The highest count of new connections the new pods together got in one second,
    /// divided by what they can take in one second ([`RunSpec::new_pod_capacity`] × new
    /// pods). 1 or less: the new pods were never asked to accept more connections than
    /// they can; a burst of every client reconnecting at once scores its size over the
    /// capacity.
    pub factor: f64,
    /// The peak, new connections in one second at the new pods together.
    pub peak_per_s: f64,
    /// What the new pods can take together, new connections per second.
    pub capacity_per_s: f64,
    /// The busiest single new pod's busiest second, and that pod (the load balancer's
    /// spread adds to the release's pacing here; one-second counts of a few connections
    /// are integers).
    pub pod_peak_per_s: f64,
    pub pod: Option<String>,
    /// New connections the new pods gained in the window.
    pub connections: u64,
    pub window_s: f64,
}

/// Computes the storm factor from connection records: the new pods' connections opened
/// in `window_ms`, counted per second from its start. Pure, so it is unit-tested.
pub fn storm_factor(
    conns: &[ConnRecord],
    new_pods: &BTreeSet<String>,
    window_ms: (f64, f64),
    capacity_per_pod: f64,
) -> Storm {
    let (start, end) = window_ms;
    let window_s = ((end - start) / 1000.0).max(1.0);
    let bins = window_s.ceil() as usize;
    let mut total = vec![0u64; bins];
    let mut per_pod: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    for c in conns {
        let Some(pod) = c.pod.as_deref() else {
            continue;
        };
        if !new_pods.contains(pod) || c.open_ms < start || c.open_ms >= end {
            continue;
        }
        let b = (((c.open_ms - start) / 1000.0) as usize).min(bins - 1);
        total[b] += 1;
        per_pod.entry(pod).or_insert_with(|| vec![0; bins])[b] += 1;
    }
    let connections: u64 = total.iter().sum();
    let peak = total.iter().copied().max().unwrap_or(0) as f64;
    let capacity = capacity_per_pod * new_pods.len() as f64;
    let pod_peak = per_pod
        .iter()
        .map(|(pod, counts)| (*counts.iter().max().unwrap_or(&0), *pod))
        .max();
    Storm {
        factor: if capacity > 0.0 { peak / capacity } else { 0.0 },
        peak_per_s: peak,
        capacity_per_s: capacity,
        pod_peak_per_s: pod_peak.map(|(p, _)| p as f64).unwrap_or(0.0),
        pod: pod_peak.map(|(_, pod)| pod.to_string()),
        connections,
        window_s,
    }
}

/// p99 latency of the requests scheduled inside `[from, to)` ms.
pub fn p99_between(requests: &[RequestRecord], from_ms: f64, to_ms: f64) -> f64 {
    load::percentiles(
        requests
            .iter()
            .filter(|r| r.scheduled_ms >= from_ms && r.scheduled_ms < to_ms)
            .map(RequestRecord::latency_ms)
            .collect(),
    )
    .p99
}

/// The echo app's Deployment (`spec.replicas` pods of `image` on `spec.node`).
pub fn echo_deployment(name: &str, spec: &RunSpec, image: &str) -> Deployment {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {
            "replicas": spec.replicas,
            "selector": {"matchLabels": {"app": name}},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": "25%"}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {
                    "nodeSelector": {"kubernetes.io/hostname": spec.node},
                    "terminationGracePeriodSeconds": 30,
                    // Compliant with the `restricted` Pod Security Standard, as a platform
                    // team's template would be.
                    "securityContext": {"runAsNonRoot": true, "seccompProfile": {"type": "RuntimeDefault"}},
                    "containers": [{
                        "name": APP,
                        "image": image,
                        "securityContext": {
                            "allowPrivilegeEscalation": false,
                            "readOnlyRootFilesystem": true,
                            "capabilities": {"drop": ["ALL"]},
                        },
                        "args": ["--listen", format!("0.0.0.0:{APP_PORT}")],
                        "env": [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
                        "ports": [{"name": "http", "containerPort": APP_PORT}],
                        "readinessProbe": {
                            "httpGet": {"path": "/ready", "port": "http"},
                            "periodSeconds": 1,
                            "failureThreshold": 1,
                        },
                    }],
                },
            },
        },
    }))
    .expect("valid Deployment")
}

/// The echo app's Service (port 80 to the named port `http`).
pub fn echo_service(name: &str) -> Service {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name},
        "spec": {
            "selector": {"app": name},
            "ports": [{"name": "http", "port": SERVICE_PORT, "targetPort": "http"}],
        },
    }))
    .expect("valid Service")
}

async fn pod_names(client: &Client, ns: &str) -> anyhow::Result<BTreeSet<String>> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    Ok(pods
        .list(&ListParams::default().labels(&format!("app={APP}")))
        .await?
        .items
        .iter()
        .map(|p| p.name_any())
        .collect())
}

/// Waits until the Deployment has rolled out its current template and no pod of an older
/// template is left (terminating ones included).
async fn wait_rolled_out(
    client: &Client,
    ns: &str,
    name: &str,
    replicas: i32,
    deadline: Instant,
) -> anyhow::Result<()> {
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns);
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    loop {
        let d = deployments.get(name).await?;
        let st = d.status.clone().unwrap_or_default();
        let generation_seen =
            st.observed_generation.unwrap_or(0) >= d.metadata.generation.unwrap_or(0);
        let rolled = generation_seen
            && st.updated_replicas.unwrap_or(0) == replicas
            && st.available_replicas.unwrap_or(0) == replicas
            && st.replicas.unwrap_or(0) == replicas;
        if rolled {
            let hash = latest_template_hash(client, ns, &d).await?;
            let list = pods
                .list(&ListParams::default().labels(&format!("app={APP}")))
                .await?;
            let old_left = list
                .items
                .iter()
                .filter(|p| p.labels().get("pod-template-hash") != hash.as_ref())
                .count();
            if old_left == 0 {
                return Ok(());
            }
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the release did not complete in time (deployment status: {st:?})"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn latest_template_hash(
    client: &Client,
    ns: &str,
    d: &Deployment,
) -> anyhow::Result<Option<String>> {
    use k8s_openapi::api::apps::v1::ReplicaSet;
    let rss: Api<ReplicaSet> = Api::namespaced(client.clone(), ns);
    let revision = d
        .annotations()
        .get("deployment.kubernetes.io/revision")
        .cloned();
    let list = rss
        .list(&ListParams::default().labels(&format!("app={APP}")))
        .await?;
    Ok(list
        .items
        .iter()
        .filter(|rs| {
            rs.owner_references()
                .iter()
                .any(|o| Some(&o.uid) == d.metadata.uid.as_ref())
        })
        .find(|rs| rs.annotations().get("deployment.kubernetes.io/revision") == revision.as_ref())
        .and_then(|rs| rs.labels().get("pod-template-hash").cloned()))
}

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
    tokio::time::sleep(spec.steady).await;
    let cpu = crate::cpu::CpuMeter::start();
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
    let cpu_s = cpu.stop().await;
    if released.is_ok() {
        tokio::time::sleep(spec.tail).await;
    }
    let _ = stop_tx.send(true);
    let report: LoadReport = load_task.await.context("load task")??;
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
        cpu_s,
        storm,
        connections_opened: report.connections_opened,
        closed_by_server: report.closed_by_server,
        old_pods: old_pods.into_iter().collect(),
        new_pods: new_pods.into_iter().collect(),
        series: report.series,
    })
}

/// The whole report: every run, side by side.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Report {
    pub generated_unix_ms: u64,
    pub cpus: usize,
    pub runs: Vec<RunResult>,
}

impl Report {
    pub fn table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "| strategy | delay | requests | failed | outcomes | storm factor | peak new conns/s at the new pods (capacity) | busiest new pod's peak | p99 steady | p99 release | worst 1 s p99 | p99 release old / new pods | p99 release first / later on a connection | CPU s operator / agents / apps / all | release | ok req/s |"
        );
        let _ = writeln!(
            s,
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
        );
        for r in &self.runs {
            let outcomes: Vec<String> = r
                .by_outcome
                .iter()
                .filter(|(o, n)| o.is_failure() && **n > 0)
                .map(|(o, n)| format!("{} {n}", o.as_str()))
                .collect();
            let cpu = |role: &str| r.cpu_s.get(role).copied().unwrap_or(0.0);
            let _ = writeln!(
                s,
                "| {} | {:.0} s | {} | {} | {} | {:.2} | {:.0} ({:.0}) | {:.0} | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} / {:.1} ms | {:.1} / {:.1} ms | {:.1} / {:.1} / {:.1} / {:.1} | {:.1} s | {:.0} |",
                r.strategy,
                r.delay_s,
                r.requests,
                r.failed,
                if outcomes.is_empty() {
                    "-".to_string()
                } else {
                    outcomes.join(", ")
                },
                r.storm.factor,
                r.storm.peak_per_s,
                r.storm.capacity_per_s,
                r.storm.pod_peak_per_s,
                r.p99_steady_ms,
                r.p99_release_ms,
                r.tail.worst_second_p99_ms,
                r.tail.window.p99_old_ms,
                r.tail.window.p99_new_ms,
                r.tail.window.p99_first_ms,
                r.tail.window.p99_reused_ms,
                cpu("operator"),
                cpu("agents"),
                cpu("apps"),
                r.cpu_s.values().sum::<f64>(),
                r.release_s,
                r.achieved_rps
            );
        }
        s
    }
}

/// A hand-written SVG: per run, requests/s and errors/s over time, and the connections
/// open to each pod (old pods in greys, new pods in colours).
pub fn render_svg(report: &Report) -> String {
    const W: f64 = 960.0;
    const PANEL_H: f64 = 300.0;
    const LEFT: f64 = 60.0;
    const RIGHT: f64 = 20.0;
    let colours = [
        "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#bcbd22", "#8c564b", "#e377c2",
    ];
    let greys = [
        "#888", "#999", "#aaa", "#777", "#bbb", "#666", "#ccc", "#555",
    ];
    let h = 40.0 + PANEL_H * report.runs.len() as f64;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{h}" viewBox="0 0 {W} {h}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{LEFT}" y="24" font-size="15" font-weight="bold">Rolling release v1 → v2 under load: requests/s (blue), errors/s (red), connections per pod (below)</text>"#
    );
    for (i, r) in report.runs.iter().enumerate() {
        let top = 40.0 + PANEL_H * i as f64;
        let n = r.series.len().max(1) as f64;
        let x = |t: f64| LEFT + (W - LEFT - RIGHT) * t / n;
        let upper = (top + 20.0, top + 140.0);
        let lower = (top + 160.0, top + 270.0);
        let _ = writeln!(
            s,
            r#"<text x="{LEFT}" y="{}" font-weight="bold">{} (propagation delay {:.0} s): {} failed of {}, storm factor {:.1}, release {:.1} s — {}</text>"#,
            top + 12.0,
            r.strategy,
            r.delay_s,
            r.failed,
            r.requests,
            r.storm.factor,
            r.release_s,
            xml_escape(&r.description)
        );
        for (y0, y1) in [upper, lower] {
            let _ = writeln!(
                s,
                r##"<rect x="{LEFT}" y="{y0}" width="{}" height="{}" fill="none" stroke="#ccc"/>"##,
                W - LEFT - RIGHT,
                y1 - y0
            );
        }
        // Release window.
        let _ = writeln!(
            s,
            r##"<rect x="{}" y="{}" width="{}" height="{}" fill="#fff3cd" opacity="0.6"/>"##,
            x(r.release_start_s),
            upper.0,
            (x(r.release_end_s) - x(r.release_start_s)).max(1.0),
            lower.1 - upper.0
        );
        let max_rps = r
            .series
            .iter()
            .map(|b| b.requests)
            .max()
            .unwrap_or(1)
            .max(1) as f64;
        let max_err = r
            .series
            .iter()
            .map(|b| b.error_count())
            .max()
            .unwrap_or(0)
            .max(1) as f64;
        let scale = max_rps;
        let y_up = |v: f64| upper.1 - (upper.1 - upper.0) * v / scale;
        // Errors get their own scale (right-hand label): a few lost requests must show.
        let y_err = |v: f64| upper.1 - (upper.1 - upper.0) * v / max_err;
        for b in &r.series {
            let e = b.error_count() as f64;
            if e > 0.0 {
                let _ = writeln!(
                    s,
                    r##"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="#d62728" opacity="0.8"><title>{} errors</title></rect>"##,
                    x(b.t),
                    y_err(e).min(upper.1 - 2.0),
                    (x(b.t + 1.0) - x(b.t) - 1.0).max(1.0),
                    (upper.1 - y_err(e)).max(2.0),
                    e
                );
            }
        }
        let _ = writeln!(
            s,
            r##"<text x="{}" y="{}" fill="#d62728" text-anchor="end">{:.0} err/s</text>"##,
            W - RIGHT,
            upper.0 + 10.0,
            max_err
        );
        let pts: Vec<String> = r
            .series
            .iter()
            .map(|b| format!("{:.1},{:.1}", x(b.t + 0.5), y_up(b.requests as f64)))
            .collect();
        let _ = writeln!(
            s,
            r##"<polyline fill="none" stroke="#1f77b4" stroke-width="1.5" points="{}"/>"##,
            pts.join(" ")
        );
        let _ = writeln!(
            s,
            r#"<text x="4" y="{}">{:.0}/s</text><text x="4" y="{}">0</text>"#,
            upper.0 + 10.0,
            scale,
            upper.1
        );
        // Connections per pod.
        let pods: BTreeSet<&String> = r.series.iter().flat_map(|b| b.open_conns.keys()).collect();
        let max_conns = r
            .series
            .iter()
            .flat_map(|b| b.open_conns.values())
            .copied()
            .max()
            .unwrap_or(1)
            .max(1) as f64;
        let y_lo = |v: f64| lower.1 - (lower.1 - lower.0) * v / max_conns;
        let (mut old_i, mut new_i) = (0, 0);
        for pod in pods {
            let colour = if r.new_pods.contains(pod) {
                new_i += 1;
                colours[(new_i - 1) % colours.len()]
            } else {
                old_i += 1;
                greys[(old_i - 1) % greys.len()]
            };
            let pts: Vec<String> = r
                .series
                .iter()
                .map(|b| {
                    format!(
                        "{:.1},{:.1}",
                        x(b.t + 1.0),
                        y_lo(*b.open_conns.get(pod).unwrap_or(&0) as f64)
                    )
                })
                .collect();
            let _ = writeln!(
                s,
                r#"<polyline fill="none" stroke="{colour}" stroke-width="1.2" points="{}"><title>{}</title></polyline>"#,
                pts.join(" "),
                xml_escape(pod)
            );
        }
        let _ = writeln!(
            s,
            r#"<text x="4" y="{}">{:.0} conns</text><text x="4" y="{}">0</text>"#,
            lower.0 + 10.0,
            max_conns,
            lower.1
        );
        let step = if n > 120.0 { 20.0 } else { 10.0 };
        let mut t = 0.0;
        while t <= n {
            let _ = writeln!(
                s,
                r##"<text x="{:.1}" y="{}" fill="#555">{t:.0}s</text>"##,
                x(t) - 6.0,
                lower.1 + 14.0
            );
            t += step;
        }
    }
    s.push_str("</svg>\n");
    s
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// `sluice-e2e scenario NAME`: run a scenario against the running test ground.
#[derive(clap::Args, Debug)]
pub struct ScenarioArgs {
    /// `b1`, `b2` or `baselines` (both), each at every --delays value.
    pub name: String,
    #[arg(long, default_value = "target/e2e/kubeconfig")]
    pub kubeconfig: PathBuf,
    /// Service-proxy propagation delays to run at (seconds, comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "0,5,20")]
    pub delays: Vec<f64>,
    #[arg(long, default_value_t = 6)]
    pub replicas: i32,
    #[arg(long, default_value_t = 200)]
    pub connections: usize,
    /// Requests per second (open loop).
    #[arg(long, default_value_t = 500.0)]
    pub rate: f64,
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    pub steady: Duration,
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub tail: Duration,
    #[arg(long, default_value = "180s", value_parser = humantime::parse_duration)]
    pub max_release: Duration,
    #[arg(long, default_value = "local-0")]
    pub node: String,
    #[arg(long, default_value = "target/bench/lossless.json")]
    pub out: PathBuf,
    /// Run in namespaces that enforce the `restricted` Pod Security Standard.
    #[arg(long)]
    pub restricted: bool,
    #[arg(long, default_value = "target/bench/lossless.svg")]
    pub svg: PathBuf,
    /// Keep each run's namespace.
    #[arg(long)]
    pub keep: bool,
    /// New connections per second one pod can take (the storm factor's reference, and
    /// the Release's `connectionRate.maxPerPod`).
    #[arg(long, default_value_t = 5.0)]
    pub new_pod_capacity: f64,
}

pub fn strategies_for(name: &str) -> anyhow::Result<Vec<Arc<dyn Strategy>>> {
    match name.to_ascii_lowercase().as_str() {
        "baselines" => Ok(vec![Arc::new(b1()), Arc::new(b2())]),
        "all" => Ok(vec![
            Arc::new(b1()),
            Arc::new(b2()),
            Arc::new(crate::scenario_sluice::Sluice::proxy()),
        ]),
        list if list.contains(',') => list.split(',').map(strategies_for).try_fold(
            Vec::new(),
            |mut all, s| {
                all.extend(s?);
                anyhow::Ok(all)
            },
        ),
        other => strategy_by_name(other)
            .map(|s| vec![s])
            .with_context(|| format!("unknown scenario {name}; known: b1, b2, baselines, sluice, sluice-observe, sluice-rollback-5xx, sluice-rollback-slow, sluice-kill9, all, or a comma-separated list")),
    }
}

pub fn write_report(report: &Report, json: &Path, svg: &Path) -> anyhow::Result<()> {
    for p in [json, svg] {
        if let Some(d) = p.parent() {
            std::fs::create_dir_all(d)?;
        }
    }
    std::fs::write(json, serde_json::to_string_pretty(report)?)?;
    std::fs::write(svg, render_svg(report))?;
    Ok(())
}

pub async fn run(args: ScenarioArgs) -> anyhow::Result<()> {
    let strategies = strategies_for(&args.name)?;
    let client = crate::cluster::client_for(&args.kubeconfig).await?;
    let mut report = Report {
        generated_unix_ms: chrono::Utc::now().timestamp_millis() as u64,
        cpus: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        runs: Vec::new(),
    };
    for strategy in &strategies {
        for delay in &args.delays {
            let spec = RunSpec {
                replicas: args.replicas,
                connections: args.connections,
                rate: args.rate,
                delay: Duration::from_secs_f64(*delay),
                steady: args.steady,
                tail: args.tail,
                max_release: args.max_release,
                node: args.node.clone(),
                keep: args.keep,
                new_pod_capacity: args.new_pod_capacity,
                restricted: args.restricted,
            };
            let result = run_one(&client, strategy.as_ref(), &spec)
                .await
                .with_context(|| format!("{} at {delay} s", strategy.name()))?;
            eprintln!(
                "{} delay {:.0}s: {} failed of {} ({:?}), storm {:.2}, p99 {:.1} → {:.1} ms (worst second {:.1} ms), release {:.1} s, CPU {:?} s",
                result.strategy,
                result.delay_s,
                result.failed,
                result.requests,
                result
                    .by_outcome
                    .iter()
                    .filter(|(o, n)| o.is_failure() && **n > 0)
                    .collect::<Vec<_>>(),
                result.storm.factor,
                result.p99_steady_ms,
                result.p99_release_ms,
                result.tail.worst_second_p99_ms,
                result.release_s,
                result.cpu_s
            );
            report.runs.push(result);
            write_report(&report, &args.out, &args.svg)?;
        }
    }
    println!("{}", report.table());
    eprintln!("wrote {} and {}", args.out.display(), args.svg.display());
    Ok(())
}

/// A pod that runs a program installed on this machine (nginx, python3, java: software
/// the project did not write) on a real node: image `sluice/host` is an empty root with the
/// merged-/usr links, and the host's /usr is mounted read-only into it. (A program that
/// reads its configuration under /etc gets it from a ConfigMap or a flag.)
pub fn host_program_pod(name: &str, node: &str, command: &[&str]) -> serde_json::Value {
    serde_json::json!({
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {
            "nodeName": node,
            "terminationGracePeriodSeconds": 5,
            "containers": [{
                "name": "app",
                "image": "sluice/host:1",
                "imagePullPolicy": "Never",
                "command": command,
                "volumeMounts": [{"name": "usr", "mountPath": "/usr", "readOnly": true}],
            }],
            "volumes": [{"name": "usr", "hostPath": {"path": "/usr", "type": "Directory"}}],
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::ClosedBy;

    fn conn(id: u64, pod: &str, open_ms: f64) -> ConnRecord {
        ConnRecord {
            id,
            open_ms,
            close_ms: open_ms + 1.0,
            closed_by: ClosedBy::Client,
            pod: Some(pod.into()),
            requests: 1,
        }
    }

    #[test]
    fn storm_factor_of_a_burst_is_its_size_over_the_capacity() {
        let new: BTreeSet<String> = ["n1".to_string(), "n2".to_string()].into();
        // 40 connections inside one second of a 10 s window; two pods taking 5/s each.
        let conns: Vec<_> = (0..40)
            .map(|i| {
                conn(
                    i,
                    if i % 2 == 0 { "n1" } else { "n2" },
                    3000.0 + f64::from(i as u32) * 10.0,
                )
            })
            .collect();
        let s = storm_factor(&conns, &new, (0.0, 10_000.0), 5.0);
        assert_eq!(s.peak_per_s, 40.0);
        assert_eq!(s.capacity_per_s, 10.0);
        assert_eq!(s.connections, 40);
        assert!((s.factor - 4.0).abs() < 1e-9);
        assert_eq!(s.pod_peak_per_s, 20.0);
        assert!(s.pod.is_some());
    }

    #[test]
    fn storm_factor_of_paced_arrival_stays_within_capacity_and_ignores_old_pods() {
        let new: BTreeSet<String> = ["n1".to_string(), "n2".to_string()].into();
        // 8 per second for 10 s, alternating pods: 80 % of 2 × 5/s.
        let mut conns: Vec<_> = (0..80)
            .map(|i| {
                let pod = if i % 2 == 0 { "n1" } else { "n2" };
                conn(i, pod, f64::from(i as u32) * 125.0 + 1.0)
            })
            .collect();
        // An old pod's burst and connections outside the window do not count.
        conns.extend((0..50).map(|i| conn(100 + i, "old", 2000.0)));
        conns.extend((0..30).map(|i| conn(200 + i, "n2", 20_000.0)));
        let s = storm_factor(&conns, &new, (0.0, 10_000.0), 5.0);
        assert_eq!(s.connections, 80);
        assert_eq!(s.peak_per_s, 8.0);
        assert!((s.factor - 0.8).abs() < 1e-9);
        assert_eq!(s.pod_peak_per_s, 4.0);
        let none = storm_factor(&[], &new, (0.0, 10_000.0), 5.0);
        assert_eq!(none.factor, 0.0);
        assert_eq!(none.pod, None);
    }

    #[test]
    fn baselines_shape_the_workload() {
        let spec = RunSpec::default();
        let mut d = echo_deployment(APP, &spec, "sluice/echo:v1");
        b2().shape(&mut d);
        let c = &d
            .spec
            .as_ref()
            .unwrap()
            .template
            .spec
            .as_ref()
            .unwrap()
            .containers[0];
        assert!(
            c.args
                .as_ref()
                .unwrap()
                .windows(2)
                .any(|w| w == ["--on-sigterm", "graceful"])
        );
        let pre_stop = c.lifecycle.as_ref().unwrap().pre_stop.as_ref().unwrap();
        assert_eq!(pre_stop.sleep.as_ref().unwrap().seconds, 15);
        let mut d = echo_deployment(APP, &spec, "sluice/echo:v1");
        b1().shape(&mut d);
        let c = &d
            .spec
            .as_ref()
            .unwrap()
            .template
            .spec
            .as_ref()
            .unwrap()
            .containers[0];
        assert!(c.lifecycle.is_none());
        assert!(
            c.args
                .as_ref()
                .unwrap()
                .windows(2)
                .any(|w| w == ["--on-sigterm", "exit"])
        );
        assert!(strategies_for("baselines").unwrap().len() == 2);
        assert!(strategies_for("nope").is_err());
    }

    #[test]
    fn p99_only_counts_the_window() {
        let reqs: Vec<RequestRecord> = (0..200)
            .map(|i| RequestRecord {
                scheduled_ms: f64::from(i) * 10.0,
                start_ms: f64::from(i) * 10.0,
                end_ms: f64::from(i) * 10.0 + if i >= 100 { 50.0 } else { 1.0 },
                outcome: Outcome::Ok,
                pod: None,
                conn: 1,
            })
            .collect();
        assert!((p99_between(&reqs, 0.0, 1000.0) - 1.0).abs() < 1e-6);
        assert!((p99_between(&reqs, 1000.0, 2000.0) - 50.0).abs() < 1e-6);
    }

    #[test]
    fn svg_renders_every_run() {
        let run = RunResult {
            strategy: "B1".into(),
            description: "x < y".into(),
            delay_s: 0.0,
            spec: RunSpec::default(),
            namespace: "ns".into(),
            requests: 10,
            failed: 1,
            by_outcome: BTreeMap::new(),
            achieved_rps: 9.0,
            release_s: 1.0,
            release_start_s: 1.0,
            release_end_s: 2.0,
            p99_steady_ms: 1.0,
            p99_release_ms: 2.0,
            tail: crate::tail::TailBreakdown::default(),
            cpu_s: BTreeMap::from([("operator".to_string(), 1.5)]),
            storm: Storm::default(),
            connections_opened: 2,
            closed_by_server: 1,
            old_pods: vec!["a".into()],
            new_pods: vec!["b".into()],
            series: vec![load::Bin::default(); 3],
        };
        let report = Report {
            generated_unix_ms: 0,
            cpus: 2,
            runs: vec![run.clone(), run],
        };
        let svg = render_svg(&report);
        assert!(svg.starts_with("<svg"));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("(propagation delay").count(), 2);
        assert!(svg.contains("x &lt; y"));
        assert!(report.table().contains("| B1 | 0 s |"));
        assert!(
            report.table().contains("| 1.5 / 0.0 / 0.0 / 1.5 |"),
            "{}",
            report.table()
        );
    }
}
