//! Traffic through a real Gateway API implementation: Traefik v3.6 on the real node serves
//! the Gateway `gw` of the test's namespace; an HTTPRoute splits `/` over two plain echo
//! Deployments (v1 and v2, each behind its own Service) by weight. A client pod sends load
//! to Traefik's ClusterIP (kube-proxy → Traefik → the echo pods): the measured split must
//! match the weights, nothing may fail, and new weights must move the traffic.
mod ground_common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use ground_common::*;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::{Client, ResourceExt};
use sluice_e2e::gateway::{Backend, deploy_traefik};
use sluice_e2e::scenario::{RunSpec, SERVICE_PORT, echo_deployment, echo_service};

const V1: &str = "echo-v1";
const V2: &str = "echo-v2";
const ROUTE: &str = "echo";

/// Which Deployment each pod of the namespace belongs to (the echo pods carry `app=<name>`).
async fn pod_owners(client: &Client, ns: &str) -> anyhow::Result<BTreeMap<String, String>> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let mut owners = BTreeMap::new();
    for app in [V1, V2] {
        for p in pods
            .list(&ListParams::default().labels(&format!("app={app}")))
            .await?
        {
            owners.insert(p.name_any(), app.to_string());
        }
    }
    Ok(owners)
}

/// Requests by Deployment from a `by_pod` map of the load report.
fn by_deployment(
    by_pod: &serde_json::Value,
    owners: &BTreeMap<String, String>,
) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for (pod, n) in by_pod.as_object().into_iter().flatten() {
        let owner = owners
            .get(pod)
            .cloned()
            .unwrap_or_else(|| format!("?{pod}"));
        *out.entry(owner).or_default() += n.as_u64().unwrap_or(0);
    }
    out
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[tokio::test]
async fn traefik_splits_an_http_route_by_weight_and_follows_new_weights() -> anyhow::Result<()> {
    let (cluster, test_ns) = ground("gateway").await?;
    let client = &cluster.client;
    let ns = test_ns.name.as_str();

    let spec = RunSpec {
        replicas: 2,
        ..Default::default()
    };
    let pp = PostParams::default();
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns);
    let services: Api<Service> = Api::namespaced(client.clone(), ns);
    for (name, image) in [(V1, "sluice/echo:v1"), (V2, "sluice/echo:v2")] {
        deployments
            .create(&pp, &echo_deployment(name, &spec, image))
            .await?;
        services.create(&pp, &echo_service(name)).await?;
    }

    let started = Instant::now();
    let traefik = deploy_traefik(client, ns).await?;
    println!(
        "Traefik ready in {:.1} s: Gateway {}/{} (class {}), clients use {}",
        started.elapsed().as_secs_f64(),
        ns,
        traefik.gateway,
        traefik.gateway_class,
        traefik.url
    );

    for name in [V1, V2] {
        wait_for(
            Duration::from_secs(90),
            &format!("{name}: 2 ready replicas"),
            || {
                let deployments = deployments.clone();
                async move {
                    let d = deployments.get(name).await.ok()?;
                    (d.status?.ready_replicas? == 2).then_some(())
                }
            },
        )
        .await?;
    }

    traefik
        .apply_route(
            client,
            ROUTE,
            &[
                Backend::new(V1, SERVICE_PORT, 80),
                Backend::new(V2, SERVICE_PORT, 20),
            ],
        )
        .await?;
    traefik
        .wait_route(client, ROUTE, Duration::from_secs(60))
        .await?;
    // Traefik applies a new configuration a moment after it accepted the route.
    let seen = wait_until(
        Duration::from_secs(30),
        "Traefik to answer from v1 and v2",
        || async {
            let s = traefik.sample(20, "x-version").await?;
            Ok((s.keys().all(|k| k == "v1" || k == "v2") && s.len() == 2).then_some(s))
        },
    )
    .await?;
    println!("probe through Traefik from the host: {seen:?}");

    // 1. The 80/20 split under load, from a client pod through the ClusterIP.
    let (conns, rate, secs) = (5, 200, 20);
    start_load_pod(client, ns, &traefik.url, conns, rate, secs).await?;
    let (phase, report, log) = load_pod_report(client, ns, Duration::from_secs(120)).await?;
    anyhow::ensure!(phase == "Succeeded", "client pod {phase}: {log}");
    let owners = pod_owners(client, ns).await?;
    let split = by_deployment(&report["by_pod"], &owners);
    let requests = report["requests"].as_u64().context("requests")?;
    let failed = report["failed"].as_u64().context("failed")?;
    let answered: u64 = split.values().sum();
    let v2_share = 100.0 * split.get(V2).copied().unwrap_or(0) as f64 / answered.max(1) as f64;
    println!(
        "weights 80/20, {conns} connections at {rate} requests/s for {secs} s: {requests} requests, \
         {failed} failed {}, {:.0} ok requests/s, p50 {:.1} ms, p99 {:.1} ms; by Deployment {split:?} \
         (by pod {}): v2 got {v2_share:.2} %",
        report["by_outcome"],
        report["achieved_rps"].as_f64().unwrap_or(0.0),
        report["latency_ms"]["p50"].as_f64().unwrap_or(0.0),
        report["latency_ms"]["p99"].as_f64().unwrap_or(0.0),
        report["by_pod"],
    );
    assert_eq!(failed, 0, "failed requests: {}", report["by_outcome"]);
    assert!(
        requests >= u64::from(rate) * secs * 9 / 10,
        "only {requests} requests"
    );
    assert!(
        split.keys().all(|k| k == V1 || k == V2),
        "answers from pods of neither Deployment: {split:?}"
    );
    assert!(
        (17.0..=23.0).contains(&v2_share),
        "v2's share {v2_share:.2} % is not within 3 points of 20 %"
    );

    // 2. New weights, 0/100, applied while a second load runs: traffic moves to v2 without
    // a failed request.
    Api::<Pod>::namespaced(client.clone(), ns)
        .delete("client", &DeleteParams::default())
        .await?;
    wait_pod_gone(client, ns, "client", Duration::from_secs(60)).await?;
    let secs2 = 16;
    start_load_pod(client, ns, &traefik.url, conns, rate, secs2).await?;
    wait_pod(
        client,
        ns,
        "client",
        Duration::from_secs(60),
        "Running",
        |p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"),
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let patched_ms = unix_ms();
    let patched = Instant::now();
    traefik
        .apply_route(
            client,
            ROUTE,
            &[
                Backend::new(V1, SERVICE_PORT, 0),
                Backend::new(V2, SERVICE_PORT, 100),
            ],
        )
        .await?;
    // From the host: how long until Traefik sends everything to v2 (20 answers in a row).
    let mut in_a_row = 0;
    let mut run_start = patched.elapsed();
    while in_a_row < 20 {
        anyhow::ensure!(
            patched.elapsed() < Duration::from_secs(30),
            "v1 still answers 30 s after the weights became 0/100"
        );
        let a = traefik.get("/").await?;
        anyhow::ensure!(a.status == 200, "status {} through Traefik", a.status);
        if a.headers.get("x-version").map(String::as_str) == Some("v2") {
            if in_a_row == 0 {
                run_start = patched.elapsed();
            }
            in_a_row += 1;
        } else {
            in_a_row = 0;
        }
    }
    traefik
        .wait_route(client, ROUTE, Duration::from_secs(30))
        .await?;
    let (phase, report, log) = load_pod_report(client, ns, Duration::from_secs(120)).await?;
    anyhow::ensure!(phase == "Succeeded", "client pod {phase}: {log}");
    let failed = report["failed"].as_u64().context("failed")?;
    let requests = report["requests"].as_u64().context("requests")?;
    let origin = report["origin_unix_ms"]
        .as_u64()
        .context("origin_unix_ms")?;
    let patch_at = (patched_ms as f64 - origin as f64) / 1000.0;
    let series = report["series"].as_array().context("series")?;
    let per_second: Vec<(f64, BTreeMap<String, u64>)> = series
        .iter()
        .map(|b| {
            (
                b["t"].as_f64().unwrap_or(0.0),
                by_deployment(&b["by_pod"], &owners),
            )
        })
        .collect();
    let last_v1 = per_second
        .iter()
        .filter(|(_, s)| s.get(V1).is_some_and(|n| *n > 0))
        .map(|(t, _)| *t)
        .fold(f64::NAN, f64::max);
    let after: BTreeMap<String, u64> = per_second
        .iter()
        .filter(|(t, _)| *t >= patch_at + 5.0)
        .flat_map(|(_, s)| s.clone())
        .fold(BTreeMap::new(), |mut m, (k, v)| {
            *m.entry(k).or_default() += v;
            m
        });
    println!(
        "weights 80/20 → 0/100 at t={patch_at:.1} s of a {secs2} s load: {requests} requests, {failed} \
         failed {}; Traefik answered only from v2 {:.2} s after the patch (host probe); the last \
         second with v1 answers began at t={last_v1:.0} s; from t={:.1} s on: {after:?}",
        report["by_outcome"],
        run_start.as_secs_f64(),
        patch_at + 5.0,
    );
    for (t, s) in &per_second {
        println!("  t={t:>4.0} s {s:?}");
    }
    assert_eq!(failed, 0, "failed requests: {}", report["by_outcome"]);
    assert!(
        last_v1 < patch_at + 5.0,
        "v1 still answered at t={last_v1} s, the patch was at t={patch_at:.1} s"
    );
    assert!(
        after.get(V2).copied().unwrap_or(0) > 0 && after.keys().all(|k| k == V2),
        "after the patch: {after:?}"
    );
    assert!(
        per_second
            .iter()
            .any(|(t, s)| *t < patch_at && s.get(V1).is_some_and(|n| *n > 0)),
        "v1 answered nothing before the patch"
    );

    // Its RBAC is enough: nothing it watches or writes was refused.
    let log = traefik.logs(client).await?;
    let problems: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(" ERR ") || l.contains(" WRN ") || l.contains("forbidden"))
        .collect();
    println!(
        "Traefik's log: {} lines, {} warnings or errors{}",
        log.lines().count(),
        problems.len(),
        problems
            .iter()
            .map(|l| format!("\n  {l}"))
            .collect::<String>()
    );
    assert!(!log.contains("forbidden"), "Traefik was refused something");

    traefik.cleanup(client).await?;
    Ok(())
}

/// A `Traefik` dropped without `cleanup` (a failed test) still removes what it made outside
/// its namespace; meanwhile it runs beside the other test's Traefik, each on its own
/// GatewayClass.
#[tokio::test]
async fn a_dropped_traefik_leaves_nothing_cluster_scoped() -> anyhow::Result<()> {
    use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
    use kube::api::DynamicObject;
    let (cluster, test_ns) = ground("gateway").await?;
    let client = &cluster.client;
    let traefik = deploy_traefik(client, &test_ns.name).await?;
    let name = traefik.gateway_class.clone();
    let classes: Api<DynamicObject> = Api::all_with(
        client.clone(),
        &sluice_e2e::gateway::gateway_class_resource(),
    );
    let class = classes.get(&name).await?;
    assert_eq!(
        class.data["spec"]["controllerName"],
        sluice_e2e::gateway::CONTROLLER_NAME
    );
    drop(traefik);
    assert!(
        classes.get_opt(&name).await?.is_none(),
        "GatewayClass {name} left"
    );
    assert!(
        Api::<ClusterRole>::all(client.clone())
            .get_opt(&name)
            .await?
            .is_none(),
        "ClusterRole {name} left"
    );
    assert!(
        Api::<ClusterRoleBinding>::all(client.clone())
            .get_opt(&name)
            .await?
            .is_none(),
        "ClusterRoleBinding {name} left"
    );
    Ok(())
}
