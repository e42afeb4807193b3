//! Releases through a real Gateway API implementation: Traefik v3.6 on the real node, an
//! HTTPRoute to the echo app, and a client of the gateway (a pod sending keep-alive
//! load to Traefik's Service). Traefik pools its own connections to the pods, so the
//! drains of old pods run through those pooled upstream connections.
//!
//! 1. v1 → v2 with steps 1% → 10% → 50% → 100%, each verified from the agents' request
//!    counts: 0 failed requests at the client, the split the client saw at each step
//!    within ±2 points of the weight, and the upstream connections the new pods accepted
//!    (from their agents) paced: storm factor ≤ 1.
//! 2. v2 → v3 held at 50%, then aborted: the weight comes back down in more than one move
//!    as v2 pods come up, with 0 failed requests.
mod ground_common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use ground_common::routing::{route_weight, routes, set_image, share_between, unix_ms};
use ground_common::{ground, load_pod_report, sluice_app, start_load_pod, wait_for};
use k8s_openapi::api::core::v1::Pod;
use kube::Client;
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use serde_json::json;
use sluice_e2e::gateway::deploy_traefik;
use sluice_e2e::scenario::APP;
use sluice_e2e::scenario_sluice::{release_state, releases};
use sluice_e2e::upstream::{AGENT_ACCEPTED, AGENT_ADMIN_PORT, peak_rate, pod_counters};

const ROUTE: &str = "echo";

/// One observation of the release, every half second.
#[derive(Debug, Clone)]
struct Sample {
    unix_ms: f64,
    weight: Option<i32>,
    step: serde_json::Value,
    phase: Option<String>,
    measured: serde_json::Value,
}

async fn watch_until(
    client: &Client,
    ns: &str,
    timeout: Duration,
    done: impl Fn(&Sample, &sluice_e2e::scenario_sluice::ReleaseState) -> bool,
    samples: &mut Vec<Sample>,
    accepted: &mut Vec<(f64, BTreeMap<String, f64>)>,
) -> anyhow::Result<()> {
    let api = routes(client, ns);
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let start = Instant::now();
    loop {
        let st = release_state(client, ns, APP).await?;
        let s = Sample {
            unix_ms: unix_ms(),
            weight: route_weight(&api, ROUTE).await,
            step: st.status["currentStep"].clone(),
            phase: st.phase.clone(),
            measured: st.status["trafficRouting"].clone(),
        };
        if samples
            .last()
            .is_none_or(|l| l.weight != s.weight || l.step != s.step)
        {
            eprintln!(
                "t={:.1}s weight {:?} step {} phase {:?} measured {} — {:?}",
                start.elapsed().as_secs_f64(),
                s.weight,
                s.step,
                s.phase,
                s.measured["measuredCanaryPercent"],
                st.message
            );
        }
        accepted.push((
            s.unix_ms,
            pod_counters(
                &pods,
                "sluice.dev/revision",
                AGENT_ADMIN_PORT,
                AGENT_ACCEPTED,
            )
            .await,
        ));
        let finished = done(&s, &st);
        samples.push(s);
        if finished {
            return Ok(());
        }
        anyhow::ensure!(
            start.elapsed() < timeout,
            "the release did not get there in {timeout:?}: {:?} {:#}",
            st.message,
            st.status
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The canary's share of the requests the client got answered while the route carried
/// `weight`, leaving out the first `settle_s` seconds (Traefik applying the change).
fn client_split(
    report: &serde_json::Value,
    samples: &[Sample],
    weight: i32,
    canary_prefix: &str,
    settle_s: f64,
) -> Option<(f64, u64)> {
    let from = samples.iter().find(|s| s.weight == Some(weight))?.unix_ms + settle_s * 1000.0;
    let to = samples
        .iter()
        .skip_while(|s| s.weight != Some(weight))
        .find(|s| s.weight != Some(weight))?
        .unix_ms;
    share_between(report, canary_prefix, from, to)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn releases_through_traefik_follow_the_weights_and_lose_nothing() -> anyhow::Result<()> {
    let (cluster, ns) = ground("gateway").await?;
    let client = cluster.client.clone();
    let ns = ns.name.clone();
    let traefik = deploy_traefik(&client, &ns).await?;
    let (_ctx, sluice, _svc) = sluice_app(&client, &ns, 4).await?;
    releases(&client, &ns)
        .patch(
            APP,
            &PatchParams::default(),
            &Patch::Merge(&json!({"spec": {
                "gates": {"comparison": null},
                "trafficRouting": {
                    "service": APP,
                    "gatewayAPI": {"httpRoutes": [{"name": ROUTE}]},
                    "verify": {"tolerance": 2, "minRequests": 200, "window": "8s"},
                },
                "steps": [
                    {"setWeight": 1}, {"pause": {"duration": "15s"}},
                    {"setWeight": 10}, {"pause": {"duration": "15s"}},
                    {"setWeight": 50}, {"pause": {"duration": "15s"}},
                ],
            }})),
        )
        .await?;
    let route: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": ROUTE},
        "spec": {
            "parentRefs": [{"name": traefik.gateway.clone()}],
            "rules": [{"backendRefs": [{"name": "echo-stable", "port": 80}]}],
        }
    }))?;
    routes(&client, &ns)
        .create(&PostParams::default(), &route)
        .await?;
    // Taken over, and the route steered (canary backendRef added at 0%).
    wait_for(
        Duration::from_secs(120),
        "the takeover with the route at 0%",
        || {
            let (client, ns) = (client.clone(), ns.clone());
            async move {
                let st = release_state(&client, &ns, APP).await.ok()?;
                let w = route_weight(&routes(&client, &ns), ROUTE).await?;
                (st.phase.as_deref() == Some("Completed") && w == 0).then_some(())
            }
        },
    )
    .await?;
    traefik.wait_serving(&client, "/").await?;

    // 1. v1 → v2 through 1% → 10% → 50% → 100%.
    let load_s = 240;
    start_load_pod(&client, &ns, &traefik.url, 8, 200, load_s).await?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let v1 = release_state(&client, &ns, APP)
        .await?
        .stable
        .unwrap_or_default();
    let started = Instant::now();
    set_image(&client, &ns, "sluice/echo:v2").await?;
    let mut samples = Vec::new();
    let mut accepted = Vec::new();
    watch_until(
        &client,
        &ns,
        Duration::from_secs(200),
        |s, st| {
            s.phase.as_deref() == Some("Completed")
                && st.stable.as_deref() != Some(v1.as_str())
                && s.weight == Some(0)
        },
        &mut samples,
        &mut accepted,
    )
    .await?;
    let release_s = started.elapsed().as_secs_f64();
    let v2 = release_state(&client, &ns, APP)
        .await?
        .stable
        .unwrap_or_default();
    let (phase, report, log) =
        load_pod_report(&client, &ns, Duration::from_secs(load_s + 60)).await?;
    let failed = report["failed"].as_u64().unwrap_or(u64::MAX);
    let requests = report["requests"].as_u64().unwrap_or(0);
    let canary_prefix = format!("{APP}-{v2}-");
    let weights: Vec<Option<i32>> = {
        let mut w: Vec<Option<i32>> = samples.iter().map(|s| s.weight).collect();
        w.dedup();
        w
    };
    let peak = peak_rate(
        &accepted,
        |pod| pod.starts_with(&canary_prefix),
        0.0,
        f64::INFINITY,
    );
    let storm = peak / (5.0 * 4.0);
    eprintln!(
        "gateway release: {requests} requests, {failed} failed {}, release {release_s:.1} s, weights {weights:?}, \
         peak new upstream connections on the new pods {peak:.1}/s (storm factor {storm:.2})",
        report["by_outcome"]
    );
    anyhow::ensure!(phase == "Succeeded", "client pod {phase}: {log}");
    assert_eq!(
        failed, 0,
        "requests failed through the gateway: {}",
        report["by_outcome"]
    );
    for w in [1, 10, 50] {
        let (split, n) = client_split(&report, &samples, w, &canary_prefix, 2.0)
            .unwrap_or_else(|| panic!("no client traffic measured at {w}%: {weights:?}"));
        let agents = samples
            .iter()
            .filter(|s| s.weight == Some(w))
            .filter_map(|s| s.measured["measuredCanaryPercent"].as_f64())
            .next_back();
        eprintln!(
            "  at {w}%: the client saw {split:.2}% of {n} requests on v2; the agents {agents:?}%"
        );
        assert!(
            (split - f64::from(w)).abs() <= 2.0,
            "at {w}% the client saw {split:.2}%"
        );
    }
    assert!(storm <= 1.0, "storm factor {storm:.2}");
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    pods.delete("client", &Default::default()).await?;
    ground_common::wait_pod_gone(&client, &ns, "client", Duration::from_secs(60)).await?;

    // 2. v2 → v3 held at 50%, then aborted: the traffic comes back in steps.
    releases(&client, &ns)
        .patch(
            APP,
            &PatchParams::default(),
            &Patch::Merge(&json!({"spec": {"steps": [{"setWeight": 50}, {"pause": {}}]}})),
        )
        .await?;
    start_load_pod(&client, &ns, &traefik.url, 8, 200, 120).await?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    set_image(&client, &ns, "sluice/echo:v3").await?;
    let mut samples = Vec::new();
    let mut accepted = Vec::new();
    watch_until(
        &client,
        &ns,
        Duration::from_secs(120),
        |s, _| s.weight == Some(50) && s.phase.as_deref() == Some("Paused"),
        &mut samples,
        &mut accepted,
    )
    .await?;
    let aborted_at = samples.len();
    releases(&client, &ns)
        .patch(
            APP,
            &PatchParams::default(),
            &Patch::Merge(&json!({"metadata": {"annotations": {"sluice.dev/abort": "e2e"}}})),
        )
        .await?;
    watch_until(
        &client,
        &ns,
        Duration::from_secs(120),
        |s, st| {
            s.phase.as_deref() == Some("Aborted")
                && s.weight == Some(0)
                && st.status["revisions"]
                    .as_array()
                    .is_some_and(|r| r.len() == 1)
        },
        &mut samples,
        &mut accepted,
    )
    .await?;
    let mut down: Vec<i32> = samples[aborted_at..]
        .iter()
        .filter_map(|s| s.weight)
        .collect();
    down.dedup();
    let (phase, report, log) = load_pod_report(&client, &ns, Duration::from_secs(180)).await?;
    let failed = report["failed"].as_u64().unwrap_or(u64::MAX);
    eprintln!(
        "gateway abort: {} requests, {failed} failed {}, weights after the abort {down:?}",
        report["requests"], report["by_outcome"]
    );
    anyhow::ensure!(phase == "Succeeded", "client pod {phase}: {log}");
    assert_eq!(
        failed, 0,
        "requests failed during the abort: {}",
        report["by_outcome"]
    );
    assert_eq!(down.first(), Some(&50));
    assert_eq!(down.last(), Some(&0));
    assert!(
        down.len() >= 3,
        "the traffic came back in one move: {down:?}"
    );
    assert!(down.windows(2).all(|p| p[0] > p[1]), "{down:?}");
    ground_common::stop_sluice(&client, &ns, &sluice).await?;
    traefik.cleanup(&client).await?;
    Ok(())
}
