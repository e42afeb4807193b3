//! Benchmark, the gateway scenario of `make bench-lossless` (`#[ignore]`d: `cargo test`
//! skips it; `SCENARIO=gateway e2e/bench-lossless.sh` runs it alone). The same rolling
//! release v1 → v2 of the echo app (6 replicas on `local-0`) under the same load from a
//! client of Traefik v3.6, the Gateway API implementation the ground runs, twice, each run
//! in its own namespace with its own Traefik:
//!
//! - **baseline**, what a user runs without Sluice: the Deployment shaped like B2
//!   (`preStop: sleep 15`, an app that drains gracefully on SIGTERM), its Service behind an
//!   HTTPRoute, the image changed and the RollingUpdate (maxSurge and maxUnavailable 25%)
//!   waited for until every new pod is available and no old pod is left;
//! - **Sluice**: the same app taken over by a Release (proxy mode, the scenario runner's
//!   Release) with `spec.trafficRouting` steering the same kind of HTTPRoute
//!   (`echo-stable`/`echo-canary`), steps 25% → 50% → 100% with 10 s pauses, waited for until
//!   the route is back on stable (now v2) and no old pod is left.
//!
//! The client is the load generator in this process, as in the scenario runner: open loop,
//! keep-alive HTTP/1.1, 16 connections at 500 requests/s by default, to Traefik's pod address
//! (the host does not reach ClusterIPs; Traefik's pod stays put through the release), 15 s
//! steady, the release, a 10 s tail. Every request is recorded, so both windows' percentiles
//! are exact.
//!
//! Per run: requests, failed by outcome, p50/p99 of the requests due in the steady window
//! (after 2 s) and in the release window, the release's duration, and the peak of new
//! upstream connections per second that Traefik opened to the new pods (over the release
//! and the tail, sampled every half second from a counter each pod exposes: its agent's
//! `sluice_agent_connections_accepted_total` under Sluice, the echo app's own
//! `sluice_echo_connections_total` in the baseline, where no agent runs; probes and scrapes
//! are not counted in either); the storm factor is that peak over 5/s × new pods, the
//! capacity the other scenarios use. Writes `target/bench/lossless-gateway.json` (both runs,
//! their per-second series, and the ratios Sluice/baseline) and prints a table.
//!
//! Knobs (environment): `SLUICE_BENCH_GATEWAY_REPLICAS` (6), `SLUICE_BENCH_GATEWAY_CONNECTIONS`
//! (16), `SLUICE_BENCH_GATEWAY_RATE` (500), `SLUICE_BENCH_GATEWAY_OUT` (the JSON's path);
//! Sluice's Release takes the scenario runner's `SLUICE_E2E_MAX_SURGE`,
//! `SLUICE_E2E_MAX_CONCURRENT` and `SLUICE_E2E_AGENT_CPU`.
mod ground_common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use ground_common::routing::{route_weight, routes};
use ground_common::{sluice_app, wait_for, wait_until};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde::Serialize;
use serde_json::json;
use sluice_e2e::cluster::TestCluster;
use sluice_e2e::gateway::{Backend, TRAEFIK_VERSION, Traefik, deploy_traefik};
use sluice_e2e::load::{self, LoadConfig, LoadReport, Outcome};
use sluice_e2e::scenario::{
    APP, APP_PORT, RunContext, RunSpec, SERVICE_PORT, Strategy, b2, echo_deployment, echo_service,
};
use sluice_e2e::scenario_sluice::{release_state, releases};
use sluice_e2e::upstream::{
    AGENT_ACCEPTED, AGENT_ADMIN_PORT, ECHO_CONNECTIONS, peak_rate, pod_counters,
};

const ROUTE: &str = "echo";
const STEADY: Duration = Duration::from_secs(15);
const TAIL: Duration = Duration::from_secs(10);
const MAX_RELEASE: Duration = Duration::from_secs(240);
/// New connections per second one pod can take: the reference of every scenario's storm
/// factor (`RunSpec::new_pod_capacity`).
const NEW_POD_CAPACITY: f64 = 5.0;

/// What both runs share.
#[derive(Clone, Debug, Serialize)]
struct Knobs {
    replicas: i32,
    connections: usize,
    rate: f64,
    steady_s: f64,
    tail_s: f64,
    new_pod_capacity: f64,
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Baseline,
    Sluice,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Baseline => "baseline",
            Kind::Sluice => "sluice",
        }
    }

    fn description(self) -> &'static str {
        match self {
            Kind::Baseline => {
                "Deployment RollingUpdate 25%/25%, preStop sleep 15 s, graceful app; HTTPRoute → Service echo"
            }
            Kind::Sluice => {
                "Release (proxy mode) with trafficRouting: HTTPRoute → echo-stable/echo-canary, steps 25% → 50% → 100%, 10 s pauses"
            }
        }
    }

    /// Where the new pods' count of upstream connections comes from: (port, metric).
    fn counter(self) -> (u16, &'static str) {
        match self {
            Kind::Baseline => (APP_PORT, ECHO_CONNECTIONS),
            Kind::Sluice => (AGENT_ADMIN_PORT, AGENT_ACCEPTED),
        }
    }
}

#[derive(Debug, Serialize)]
struct Latency {
    requests: usize,
    p50_ms: f64,
    p99_ms: f64,
}

#[derive(Debug, Serialize)]
struct Upstream {
    /// Where the counts come from.
    source: String,
    /// The highest count of new connections the new pods accepted together in one second
    /// (over the release and the tail).
    peak_new_per_s: f64,
    capacity_per_s: f64,
    storm_factor: f64,
    /// Connections the new pods accepted in all, by the end of the tail.
    new_pod_connections: f64,
    new_pods: Vec<String>,
}

#[derive(Debug, Serialize)]
struct RunFigures {
    run: &'static str,
    description: &'static str,
    namespace: String,
    requests: u64,
    failed: u64,
    /// Failed requests by outcome (only outcomes that occurred).
    failed_by_outcome: BTreeMap<Outcome, u64>,
    achieved_rps: f64,
    /// Requests due from 2 s after the load started until the release started.
    latency_steady: Latency,
    /// Requests due from the release's start until its end.
    latency_release: Latency,
    release_s: f64,
    /// Seconds since the load started, as `series`.
    release_start_s: f64,
    release_end_s: f64,
    upstream: Upstream,
    /// Sluice: the canary weights the route carried, in order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    weights: Vec<i32>,
    series: Vec<load::Bin>,
}

/// One half-second reading: ms since the load's origin, the pods' counters, and the
/// route's canary weight (Sluice).
struct Sample {
    ms: f64,
    counters: BTreeMap<String, f64>,
    weight: Option<i32>,
}

/// Reads the pods' counters (and the route's weight) every half second until stopped.
fn start_sampler(
    client: &Client,
    ns: &str,
    kind: Kind,
    origin: Instant,
) -> (
    tokio::sync::watch::Sender<bool>,
    tokio::task::JoinHandle<Vec<Sample>>,
) {
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let route_api = routes(client, ns);
    let (port, metric) = kind.counter();
    let task = tokio::spawn(async move {
        let mut samples = Vec::new();
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop_rx.changed() => break,
            }
            let ms = origin.elapsed().as_secs_f64() * 1000.0;
            let counters = pod_counters(&pods, &format!("app={APP}"), port, metric).await;
            let weight = match kind {
                Kind::Sluice => route_weight(&route_api, ROUTE).await,
                Kind::Baseline => None,
            };
            samples.push(Sample {
                ms,
                counters,
                weight,
            });
        }
        samples
    });
    (stop_tx, task)
}

/// The baseline's app: B2's Deployment, its Service and the route to it; v1 available.
async fn baseline_app(
    client: &Client,
    ns: &str,
    traefik: &Traefik,
    k: &Knobs,
) -> anyhow::Result<(RunContext, Box<dyn Strategy>)> {
    let spec = RunSpec {
        replicas: k.replicas,
        new_pod_capacity: k.new_pod_capacity,
        ..Default::default()
    };
    let pp = PostParams::default();
    Api::<Service>::namespaced(client.clone(), ns)
        .create(&pp, &echo_service(APP))
        .await?;
    let strategy = b2();
    let mut deployment = echo_deployment(APP, &spec, "sluice/echo:v1");
    strategy.shape(&mut deployment);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns);
    deployments.create(&pp, &deployment).await?;
    wait_for(
        Duration::from_secs(120),
        "the v1 pods to be available",
        || {
            let deployments = deployments.clone();
            async move {
                let st = deployments.get(APP).await.ok()?.status?;
                (st.available_replicas? == k.replicas).then_some(())
            }
        },
    )
    .await?;
    traefik
        .apply_route(client, ROUTE, &[Backend::new(APP, SERVICE_PORT, 1)])
        .await?;
    let ctx = RunContext {
        client: client.clone(),
        namespace: ns.to_string(),
        name: APP.to_string(),
        new_image: "sluice/echo:v2".into(),
        new_pod_capacity: k.new_pod_capacity,
    };
    Ok((ctx, Box::new(strategy)))
}

/// Sluice's app: the Release with `trafficRouting` and its steps, the route to
/// `echo-stable`; returns once the Release has taken v1 over and steers the route (the
/// canary's backendRef at 0%).
async fn sluice_release(
    client: &Client,
    ns: &str,
    traefik: &Traefik,
    k: &Knobs,
) -> anyhow::Result<(RunContext, Box<dyn Strategy>)> {
    let (ctx, sluice, _svc) = sluice_app(client, ns, k.replicas).await?;
    releases(client, ns)
        .patch(
            APP,
            &PatchParams::default(),
            &Patch::Merge(&json!({"spec": {
                "gates": {"comparison": null},
                "trafficRouting": {
                    "service": APP,
                    "gatewayAPI": {"httpRoutes": [{"name": ROUTE}]},
                },
                "steps": [
                    {"setWeight": 25}, {"pause": {"duration": "10s"}},
                    {"setWeight": 50}, {"pause": {"duration": "10s"}},
                ],
            }})),
        )
        .await?;
    traefik
        .apply_route(
            client,
            ROUTE,
            &[Backend::new("echo-stable", SERVICE_PORT, 1)],
        )
        .await?;
    wait_for(
        Duration::from_secs(180),
        "the takeover with the route at 0%",
        || async {
            let st = release_state(client, ns, APP).await.ok()?;
            let w = route_weight(&routes(client, ns), ROUTE).await?;
            (st.phase.as_deref() == Some("Completed") && w == 0).then_some(())
        },
    )
    .await?;
    Ok((ctx, Box::new(sluice)))
}

/// Sluice: the release is over for the client once the route is back on stable, now the
/// new revision (the operator is stopped right after the pods settle).
async fn route_back_on_stable(
    client: &Client,
    ns: &str,
    from: Option<String>,
    timeout: Duration,
) -> anyhow::Result<()> {
    wait_until(timeout, "the route back on stable (now v2)", || async {
        let st = release_state(client, ns, APP).await?;
        anyhow::ensure!(
            st.phase.as_deref() != Some("Aborted"),
            "the release was aborted: {}",
            st.status["abort"]
        );
        let w = route_weight(&routes(client, ns), ROUTE).await;
        Ok(
            (st.phase.as_deref() == Some("Completed") && st.stable != from && w == Some(0))
                .then_some(()),
        )
    })
    .await
}

fn window_latency(report: &LoadReport, from_ms: f64, to_ms: f64) -> Latency {
    let values: Vec<f64> = report
        .request_log
        .iter()
        .filter(|r| r.scheduled_ms >= from_ms && r.scheduled_ms < to_ms)
        .map(|r| r.latency_ms())
        .collect();
    let requests = values.len();
    let p = load::percentiles(values);
    Latency {
        requests,
        p50_ms: p.p50,
        p99_ms: p.p99,
    }
}

/// One run in the namespace `ns`: its Traefik, the app, the load, the release, the figures.
async fn run_in(client: &Client, ns: &str, kind: Kind, k: &Knobs) -> anyhow::Result<RunFigures> {
    let traefik = deploy_traefik(client, ns).await?;
    let (ctx, strategy) = match kind {
        Kind::Baseline => baseline_app(client, ns, &traefik, k).await?,
        Kind::Sluice => sluice_release(client, ns, &traefik, k).await?,
    };
    traefik
        .wait_route(client, ROUTE, Duration::from_secs(60))
        .await?;
    traefik.wait_serving(client, "/").await?;
    let from = match kind {
        Kind::Sluice => release_state(client, ns, APP).await?.stable,
        Kind::Baseline => None,
    };
    let target = traefik
        .pod_url
        .strip_prefix("http://")
        .context("Traefik's pod address")?
        .parse()?;

    let origin = Instant::now();
    let cfg = LoadConfig {
        target,
        path: "/".into(),
        connections: k.connections,
        rate: k.rate,
        duration: STEADY + MAX_RELEASE + TAIL + Duration::from_secs(5),
        http2: false,
        streams: 1,
        timeout: Duration::from_secs(5),
        connect_timeout: Duration::from_secs(2),
        origin: Some(origin),
    };
    let (stop_load, stop_rx) = tokio::sync::watch::channel(false);
    let load_task = tokio::spawn(load::run_load(cfg, Some(stop_rx)));
    let (stop_sampler, sampler) = start_sampler(client, ns, kind, origin);
    tokio::time::sleep(STEADY).await;
    let release_start = origin.elapsed();
    let deadline = Instant::now() + MAX_RELEASE;
    let released = async {
        strategy.release(&ctx).await?;
        if kind == Kind::Sluice {
            route_back_on_stable(client, ns, from, MAX_RELEASE).await?;
        }
        strategy.wait_released(&ctx, k.replicas, deadline).await
    }
    .await;
    let release_end = origin.elapsed();
    if released.is_ok() {
        tokio::time::sleep(TAIL).await;
    }
    let _ = stop_load.send(true);
    let _ = stop_sampler.send(true);
    let report = load_task.await.context("load task")??;
    let samples = sampler.await.context("sampler task")?;
    released.with_context(|| format!("{} release", kind.name()))?;
    traefik.cleanup(client).await?;

    let new_pods: BTreeSet<String> = Api::<Pod>::namespaced(client.clone(), ns)
        .list(&ListParams::default().labels(&format!("app={APP}")))
        .await?
        .items
        .iter()
        .map(|p| p.name_any())
        .collect();
    let (rs_ms, re_ms) = (
        release_start.as_secs_f64() * 1000.0,
        release_end.as_secs_f64() * 1000.0,
    );
    let counters: Vec<(f64, BTreeMap<String, f64>)> =
        samples.iter().map(|s| (s.ms, s.counters.clone())).collect();
    let peak = peak_rate(
        &counters,
        |pod| new_pods.contains(pod),
        rs_ms,
        re_ms + TAIL.as_secs_f64() * 1000.0,
    );
    let new_pod_connections = new_pods
        .iter()
        .filter_map(|pod| samples.iter().rev().find_map(|s| s.counters.get(pod)))
        .sum();
    let capacity = k.new_pod_capacity * new_pods.len() as f64;
    let (_, metric) = kind.counter();
    let mut weights: Vec<i32> = samples.iter().filter_map(|s| s.weight).collect();
    weights.dedup();
    Ok(RunFigures {
        run: kind.name(),
        description: kind.description(),
        namespace: ns.to_string(),
        requests: report.requests,
        failed: report.failed,
        failed_by_outcome: report
            .by_outcome
            .iter()
            .filter(|(o, n)| o.is_failure() && **n > 0)
            .map(|(o, n)| (*o, *n))
            .collect(),
        achieved_rps: report.achieved_rps,
        latency_steady: window_latency(&report, 2000.0, rs_ms),
        latency_release: window_latency(&report, rs_ms, re_ms),
        release_s: (re_ms - rs_ms) / 1000.0,
        release_start_s: rs_ms / 1000.0,
        release_end_s: re_ms / 1000.0,
        upstream: Upstream {
            source: format!("{metric} of each new pod, every 0.5 s"),
            peak_new_per_s: peak,
            capacity_per_s: capacity,
            storm_factor: if capacity > 0.0 { peak / capacity } else { 0.0 },
            new_pod_connections,
            new_pods: new_pods.into_iter().collect(),
        },
        weights,
        series: report.series,
    })
}

/// One run in a namespace of its own, deleted afterwards; the next run starts only once it
/// is gone (a run's teardown must not overlap the next one's measurement).
async fn run(cluster: &TestCluster, kind: Kind, k: &Knobs) -> anyhow::Result<RunFigures> {
    let client = &cluster.client;
    let ns = cluster.namespace(&format!("gw-{}", kind.name())).await?;
    eprintln!("gateway scenario: {} in {}", kind.name(), ns.name);
    let result = run_in(client, &ns.name, kind, k).await;
    if std::env::var_os("SLUICE_E2E_KEEP").is_some() {
        return result;
    }
    // No operator is left to hand pods back (Sluice's runner stops it; a failed run drops it).
    let _ = releases(client, &ns.name)
        .patch(
            APP,
            &PatchParams::default(),
            &Patch::Merge(&json!({"metadata": {"finalizers": null}})),
        )
        .await;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let _ = namespaces.delete(&ns.name, &DeleteParams::default()).await;
    let gone = wait_for(
        Duration::from_secs(180),
        "the run's namespace to be deleted",
        || {
            let namespaces = namespaces.clone();
            let name = ns.name.clone();
            async move { matches!(namespaces.get_opt(&name).await, Ok(None)).then_some(()) }
        },
    )
    .await;
    if let Err(e) = gone {
        eprintln!("warning: {e:#}");
    }
    result
}

fn ratio(sluice: f64, baseline: f64) -> Option<f64> {
    (baseline > 0.0).then(|| sluice / baseline)
}

fn report(k: &Knobs, runs: &[RunFigures]) -> serde_json::Value {
    let ratios = match runs {
        [b, s] => json!({
            "failed": ratio(s.failed as f64, b.failed as f64),
            "p99_release_ms": ratio(s.latency_release.p99_ms, b.latency_release.p99_ms),
            "p50_release_ms": ratio(s.latency_release.p50_ms, b.latency_release.p50_ms),
            "release_s": ratio(s.release_s, b.release_s),
            "storm_factor": ratio(s.upstream.storm_factor, b.upstream.storm_factor),
        }),
        _ => serde_json::Value::Null,
    };
    json!({
        "scenario": "gateway",
        "generated_unix_ms": chrono::Utc::now().timestamp_millis(),
        "gateway": format!("Traefik {TRAEFIK_VERSION}"),
        "client": "in-process open-loop load to Traefik's pod address (keep-alive HTTP/1.1)",
        "knobs": k,
        "runs": runs,
        "ratios_sluice_over_baseline": ratios,
        "notes": "ratios are null where the baseline's figure is 0",
    })
}

fn table(k: &Knobs, runs: &[RunFigures]) -> String {
    let mut out = format!(
        "gateway scenario: Traefik {TRAEFIK_VERSION}, {} replicas, {} connections at {} requests/s\n\
         {:<9} {:>8} {:>7} {:<22} {:>17} {:>17} {:>9} {:>22} {:>6}\n",
        k.replicas,
        k.connections,
        k.rate,
        "run",
        "requests",
        "failed",
        "outcomes",
        "p50/p99 steady ms",
        "p50/p99 release ms",
        "release s",
        "peak new upstream/s",
        "storm"
    );
    for r in runs {
        let outcomes = if r.failed_by_outcome.is_empty() {
            "-".to_string()
        } else {
            r.failed_by_outcome
                .iter()
                .map(|(o, n)| format!("{} {n}", o.as_str()))
                .collect::<Vec<_>>()
                .join(", ")
        };
        out += &format!(
            "{:<9} {:>8} {:>7} {:<22} {:>17} {:>17} {:>9.1} {:>22} {:>6.2}\n",
            r.run,
            r.requests,
            r.failed,
            outcomes,
            format!(
                "{:.1} / {:.1}",
                r.latency_steady.p50_ms, r.latency_steady.p99_ms
            ),
            format!(
                "{:.1} / {:.1}",
                r.latency_release.p50_ms, r.latency_release.p99_ms
            ),
            r.release_s,
            format!(
                "{:.1} (cap {:.0})",
                r.upstream.peak_new_per_s, r.upstream.capacity_per_s
            ),
            r.upstream.storm_factor,
        );
    }
    if let [b, s] = runs {
        let show = |v: Option<f64>| v.map_or("n/a (baseline 0)".to_string(), |v| format!("{v:.2}"));
        out += &format!(
            "Sluice/baseline: failed {}, p99 release {}, release time {}, storm {}\n",
            show(ratio(s.failed as f64, b.failed as f64)),
            show(ratio(s.latency_release.p99_ms, b.latency_release.p99_ms)),
            show(ratio(s.release_s, b.release_s)),
            show(ratio(s.upstream.storm_factor, b.upstream.storm_factor)),
        );
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run by `make bench-lossless` (SCENARIO=gateway)"]
async fn gateway_release_baseline_vs_sluice() -> anyhow::Result<()> {
    let k = Knobs {
        replicas: env_or("SLUICE_BENCH_GATEWAY_REPLICAS", 6),
        connections: env_or("SLUICE_BENCH_GATEWAY_CONNECTIONS", 16),
        rate: env_or("SLUICE_BENCH_GATEWAY_RATE", 500.0),
        steady_s: STEADY.as_secs_f64(),
        tail_s: TAIL.as_secs_f64(),
        new_pod_capacity: NEW_POD_CAPACITY,
    };
    let out = std::env::var_os("SLUICE_BENCH_GATEWAY_OUT")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            sluice_e2e::cluster::repo_root().join("target/bench/lossless-gateway.json")
        });
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let cluster = TestCluster::get().await?;
    ground_common::require_node(&cluster.client).await?;
    let started = Instant::now();
    let mut runs = Vec::new();
    for kind in [Kind::Baseline, Kind::Sluice] {
        let r = run(&cluster, kind, &k).await?;
        eprintln!(
            "{}: {} failed of {} {:?}, p99 {:.1} → {:.1} ms, release {:.1} s, peak new upstream {:.1}/s (storm {:.2})",
            r.run,
            r.failed,
            r.requests,
            r.failed_by_outcome,
            r.latency_steady.p99_ms,
            r.latency_release.p99_ms,
            r.release_s,
            r.upstream.peak_new_per_s,
            r.upstream.storm_factor
        );
        runs.push(r);
        std::fs::write(&out, serde_json::to_string_pretty(&report(&k, &runs))?)?;
    }
    println!("{}", table(&k, &runs));
    eprintln!(
        "gateway scenario took {:.0} s; wrote {}",
        started.elapsed().as_secs_f64(),
        out.display()
    );
    Ok(())
}
