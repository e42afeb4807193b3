//! A replica-ratio release whose request split follows its pods: keep-alive clients (a
//! client pod through the Service's ClusterIP, real kube-proxy) stay on their
//! connections, so without help the new pods get only new connections. With
//! `spec.rebalance` the operator asks the stable agents to let a share of their
//! connections reconnect until the canary serves its pods' share (±4 points by the
//! agents' counts; the client, whose window differs, may see ±7), losing nothing.
mod ground_common;

use std::time::{Duration, Instant};

use ground_common::routing::{set_image, share_between, unix_ms};
use ground_common::{failed_bins, ground, load_pod_report, sluice_app, start_load_pod};
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;
use sluice_e2e::scenario::APP;
use sluice_e2e::scenario_sluice::{release_state, releases};

/// When each step started, from the Release's status (unix ms).
async fn watch_steps(
    client: &kube::Client,
    ns: &str,
    v1: &str,
    timeout: Duration,
) -> anyhow::Result<Vec<(f64, serde_json::Value)>> {
    let start = Instant::now();
    let mut steps: Vec<(f64, serde_json::Value)> = Vec::new();
    loop {
        let st = release_state(client, ns, APP).await?;
        let step = st.status["currentStep"].clone();
        if steps.last().is_none_or(|(_, s)| *s != step) {
            eprintln!(
                "t={:.1}s step {step} {:?} rebalance {}",
                start.elapsed().as_secs_f64(),
                st.message,
                st.status["rebalance"]
            );
            steps.push((unix_ms(), step));
        }
        if st.phase.as_deref() == Some("Completed") && st.stable.as_deref() != Some(v1) {
            return Ok(steps);
        }
        anyhow::ensure!(
            start.elapsed() < timeout,
            "the release did not complete in {timeout:?}: {:?}",
            st.message
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebalancing_makes_a_replica_ratio_split_follow_the_pods() -> anyhow::Result<()> {
    let (cluster, ns) = ground("rebalance").await?;
    let client = cluster.client.clone();
    let ns = ns.name.clone();
    let (_ctx, _operator, svc) = sluice_app(&client, &ns, 4).await?;
    releases(&client, &ns)
        .patch(
            APP,
            &PatchParams::default(),
            &Patch::Merge(&json!({"spec": {
                "gates": {"comparison": null},
                "maxSurge": 1,
                "rebalance": {"tolerance": 4, "window": "4s"},
                "steps": [
                    {"setWeight": 25}, {"pause": {"duration": "15s"}},
                    {"setWeight": 50}, {"pause": {"duration": "15s"}},
                ],
            }})),
        )
        .await?;
    ground_common::wait_for(Duration::from_secs(120), "the takeover", || {
        let (client, ns) = (client.clone(), ns.clone());
        async move {
            let st = release_state(&client, &ns, APP).await.ok()?;
            (st.phase.as_deref() == Some("Completed")).then_some(())
        }
    })
    .await?;
    let ip = svc
        .spec
        .as_ref()
        .and_then(|s| s.cluster_ip.clone())
        .unwrap_or_default();
    let port = svc
        .spec
        .as_ref()
        .and_then(|s| s.ports.as_ref())
        .and_then(|p| p.first())
        .map(|p| p.port)
        .unwrap_or(80);
    let load_s = 150;
    start_load_pod(
        &client,
        &ns,
        &format!("http://{ip}:{port}/"),
        40,
        400,
        load_s,
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(8)).await;
    let v1 = release_state(&client, &ns, APP)
        .await?
        .stable
        .unwrap_or_default();
    let released_at = unix_ms();
    set_image(&client, &ns, "sluice/echo:v2").await?;
    let steps = watch_steps(&client, &ns, &v1, Duration::from_secs(130)).await?;
    let st = release_state(&client, &ns, APP).await?;
    let v2 = st.stable.clone().unwrap_or_default();
    let (phase, report, log) =
        load_pod_report(&client, &ns, Duration::from_secs(load_s + 60)).await?;
    let failed = report["failed"].as_u64().unwrap_or(u64::MAX);
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), &ns);
    let rounds: Vec<String> = events
        .list(&Default::default())
        .await?
        .items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some("Rebalancing"))
        .filter_map(|e| e.note)
        .collect();
    eprintln!(
        "rebalance release: {} requests, {failed} failed {}; rounds: {rounds:#?}",
        report["requests"], report["by_outcome"]
    );
    anyhow::ensure!(phase == "Succeeded", "client pod {phase}: {log}");
    // Nothing may fail, from the takeover on; where anything did, when (and in which step).
    let origin = report["origin_unix_ms"].as_f64().unwrap_or(0.0);
    for bin in failed_bins(&report) {
        let t = origin + bin["t"].as_f64().unwrap_or(0.0) * 1000.0;
        let step = steps
            .iter()
            .rev()
            .find(|(at, _)| *at <= t)
            .map(|(_, s)| s.clone());
        eprintln!(
            "  failures at +{}s (step {step:?}, {:.1} s after the image changed): {} new conns {}",
            bin["t"],
            (t - released_at) / 1000.0,
            bin["errors"],
            bin["new_conns"]
        );
    }
    assert_eq!(failed, 0, "requests failed: {}", report["by_outcome"]);
    assert!(!rounds.is_empty(), "no rebalancing round ran");
    // The pause after each setWeight step: the split there is what the step left.
    let prefix = format!("{APP}-{v2}-");
    for (pause, want) in [(1, 25.0), (3, 50.0)] {
        let i = steps
            .iter()
            .position(|(_, s)| *s == pause)
            .unwrap_or_else(|| panic!("step {pause} never seen: {steps:?}"));
        let from = steps[i].0 + 1000.0;
        let to = steps.get(i + 1).map_or(from + 10_000.0, |(t, _)| *t);
        let (got, n) =
            share_between(&report, &prefix, from, to).expect("client traffic in the pause");
        eprintln!("  pause after {want}%: the client saw {got:.1}% of {n} requests on v2");
        assert!(
            (got - want).abs() <= 7.0,
            "at {want}% the client saw {got:.1}%"
        );
    }
    Ok(())
}
