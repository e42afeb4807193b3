//! Several Releases in one namespace releasing at once, under load, one of them bad: the
//! operator keeps each Release's samples, gates and drains apart. Two good apps (v1 → v2)
//! complete without a failed request; the bad one (v3 answering 30% 500s) is rolled back
//! by its comparison gate on real request counts on both sides, and loses nothing beyond
//! its own canary's 500s.
mod ground_common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use ground_common::require_node;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::ResourceExt;
use kube::api::{Api, ListParams, PostParams};
use sluice_e2e::load::{self, LoadConfig, Outcome};
use sluice_e2e::scenario::{RunContext, RunSpec, Strategy, echo_deployment, echo_service};
use sluice_e2e::scenario_sluice::{
    BadVersion, OperatorProcess, Sluice, apply_crds, release_state, releases,
};
use sluice_e2e::svc_proxy::{ProxyConfig, ServiceProxy};

/// Waits until the Release `name` is `Completed` on a new revision (or, with `rollback`,
/// `Aborted` back on `from`) with exactly `replicas` pods of the app, all of that revision
/// and none terminating.
async fn settle(
    client: &kube::Client,
    ns: &str,
    name: &str,
    replicas: i32,
    from: Option<String>,
    rollback: bool,
    deadline: Instant,
) -> anyhow::Result<()> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    loop {
        let st = release_state(client, ns, name).await?;
        let target = if rollback {
            from.clone()
        } else {
            st.stable.clone().filter(|s| Some(s) != from.as_ref())
        };
        let phase = if rollback { "Aborted" } else { "Completed" };
        let list = pods
            .list(&ListParams::default().labels(&format!("app={name}")))
            .await?
            .items;
        let done = st.phase.as_deref() == Some(phase)
            && st.canary.is_none()
            && target.as_ref().is_some_and(|t| {
                list.len() == replicas as usize
                    && list.iter().all(|p| {
                        p.metadata.deletion_timestamp.is_none()
                            && p.labels().get("sluice.dev/revision") == Some(t)
                    })
            });
        if done {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{name} did not settle: phase {:?}, message {:?}, {} pods",
            st.phase,
            st.message,
            list.len()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn releases_side_by_side_one_bad() -> anyhow::Result<()> {
    let cluster = sluice_e2e::cluster::TestCluster::get().await?;
    require_node(&cluster.client).await?;
    let ns = cluster.namespace("many").await?;
    let client = cluster.client.clone();
    apply_crds(&client).await?;
    let mut operator = OperatorProcess::start(&cluster.kubeconfig, &ns.name)?;
    let proxy = ServiceProxy::start(
        client.clone(),
        ProxyConfig {
            propagation_delay: Duration::from_secs(1),
            namespace: Some(ns.name.clone()),
            salt: ns.name.clone(),
            out: None,
        },
    )
    .await?;
    let replicas = 2;
    let spec = RunSpec {
        replicas,
        ..Default::default()
    };
    let apps: Vec<(&str, Sluice)> = vec![
        ("alpha", Sluice::proxy()),
        ("beta", Sluice::proxy()),
        ("bad", Sluice::rollback(BadVersion::Errors(0.3))),
    ];
    let ctx = |name: &str| RunContext {
        client: client.clone(),
        namespace: ns.name.clone(),
        name: name.to_string(),
        new_image: "sluice/echo:v2".into(),
        new_pod_capacity: 5.0,
    };
    for (name, sluice) in &apps {
        let c = ctx(name);
        Api::<Service>::namespaced(client.clone(), &ns.name)
            .create(&PostParams::default(), &echo_service(name))
            .await?;
        let mut d = echo_deployment(name, &spec, "sluice/echo:v1");
        sluice.shape(&mut d);
        sluice.create_release(&c, replicas).await?;
        Api::<Deployment>::namespaced(client.clone(), &ns.name)
            .create(&PostParams::default(), &d)
            .await?;
    }
    let mut targets = BTreeMap::new();
    for (name, _) in &apps {
        let key = format!("{}/{name}", ns.name);
        targets.insert(
            *name,
            proxy
                .wait_for_address(&format!("{key}:80"), Duration::from_secs(30))
                .await?,
        );
        proxy
            .wait_endpoints(&key, Duration::from_secs(120), |eps| {
                eps.iter().filter(|e| e.ready).count() == replicas as usize
            })
            .await
            .with_context(|| format!("{name}: v1 pods ready behind the proxy"))?;
    }
    let mut stable = BTreeMap::new();
    for (name, _) in &apps {
        stable.insert(*name, release_state(&client, &ns.name, name).await?.stable);
    }

    // Load on all three; every run is bounded by its duration.
    let origin = Instant::now();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut loads = BTreeMap::new();
    for (name, target) in &targets {
        let cfg = LoadConfig {
            target: *target,
            path: "/".into(),
            connections: 20,
            rate: 100.0,
            duration: Duration::from_secs(200),
            http2: false,
            streams: 1,
            timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(2),
            origin: Some(origin),
        };
        loads.insert(
            *name,
            tokio::spawn(load::run_load(cfg, Some(stop_rx.clone()))),
        );
    }
    tokio::time::sleep(Duration::from_secs(4)).await;
    // All three at once.
    for (name, sluice) in &apps {
        sluice.release(&ctx(name)).await?;
    }
    let deadline = Instant::now() + Duration::from_secs(150);
    let waits = apps.iter().map(|(name, sluice)| {
        settle(
            &client,
            &ns.name,
            name,
            replicas,
            stable[name].clone(),
            sluice.bad.is_some(),
            deadline,
        )
    });
    let settled = futures::future::join_all(waits).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let _ = stop_tx.send(true);
    let mut reports = BTreeMap::new();
    for (name, task) in loads {
        reports.insert(name, task.await??);
    }
    let mut states = BTreeMap::new();
    for (name, _) in &apps {
        states.insert(*name, release_state(&client, &ns.name, name).await?);
    }
    operator.stop();
    for (name, _) in &apps {
        let _ = releases(&client, &ns.name)
            .patch(
                name,
                &kube::api::PatchParams::default(),
                &kube::api::Patch::Merge(&serde_json::json!({"metadata": {"finalizers": null}})),
            )
            .await;
    }
    drop(proxy);

    for ((name, _), res) in apps.iter().zip(&settled) {
        let r = &reports[name];
        let st = &states[name];
        eprintln!(
            "{name}: {} requests, {} failed {:?}; phase {:?}, abort {}",
            r.requests, r.failed, r.by_outcome, st.phase, st.status["abort"]
        );
        if let Err(e) = res {
            anyhow::bail!("{name} did not settle: {e:#}");
        }
    }
    for name in ["alpha", "beta"] {
        assert_eq!(
            reports[name].failed, 0,
            "{name}: {:?}",
            reports[name].by_outcome
        );
        assert_eq!(states[name].phase.as_deref(), Some("Completed"));
    }
    let bad = &reports["bad"];
    let app_errors = bad
        .by_outcome
        .get(&Outcome::Status5xx)
        .copied()
        .unwrap_or(0);
    assert_eq!(
        bad.failed - app_errors,
        0,
        "the rollback lost requests: {:?}",
        bad.by_outcome
    );
    let abort = &states["bad"].status["abort"];
    assert_eq!(states["bad"].phase.as_deref(), Some("Aborted"));
    assert_eq!(abort["gate"], "comparison", "{abort}");
    // The comparison was made on real traffic of this Release's own pods on both sides
    // (not "inconclusive, 0 requests", as when Releases shared their samples).
    for side in ["canaryRequests", "stableRequests"] {
        assert!(
            abort["values"][side].as_f64().unwrap_or(0.0) > 0.0,
            "{abort}"
        );
    }
    Ok(())
}
