//! Deleting the whole namespace of a Release under load (what removing an application's
//! namespace from a GitOps repository does). The namespace controller deletes the Service,
//! the Deployment, the Release's ReplicaSets and pods at once: nothing is left to hand back
//! to, and the application stops serving, as asked. What must hold: no request that reached
//! the application is cut (each pod's agent drains through the kubelet's preStop: in-flight
//! requests finish, keep-alive connections are closed between requests), no request fails
//! before the deletion begins, and the namespace goes away (no hand-back finalizer holds it).
mod ground_common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use ground_common::{require_node, sluice_app, wait_for};
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, DeleteParams};
use sluice_e2e::load::{LoadConfig, Outcome, run_load};
use sluice_e2e::scenario::{APP, SERVICE_PORT};
use sluice_e2e::scenario_sluice::release_state;
use sluice_e2e::svc_proxy::{ProxyConfig, ServiceProxy};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_the_namespace_cuts_no_request() -> anyhow::Result<()> {
    let cluster = sluice_e2e::cluster::TestCluster::get().await?;
    require_node(&cluster.client).await?;
    let client = cluster.client.clone();
    let ns = cluster.namespace("nsdel").await?;
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
    let (_ctx, strategy, _svc) = sluice_app(&client, &ns.name, 3).await?;
    let target = proxy
        .wait_for_address(
            &format!("{}/{APP}:{SERVICE_PORT}", ns.name),
            Duration::from_secs(30),
        )
        .await?;
    proxy
        .wait_endpoints(
            &format!("{}/{APP}", ns.name),
            Duration::from_secs(90),
            |eps| eps.iter().filter(|e| e.ready).count() == 3,
        )
        .await
        .context("the Release's pods ready behind the proxy")?;
    let st = release_state(&client, &ns.name, APP).await?;
    anyhow::ensure!(
        st.phase.as_deref() == Some("Completed"),
        "the Release runs the pods: {:?} {:?}",
        st.phase,
        st.message
    );

    let origin = Instant::now();
    let load = tokio::spawn(run_load(
        LoadConfig {
            target,
            path: "/".into(),
            connections: 45,
            rate: 150.0,
            duration: Duration::from_secs(60),
            http2: false,
            streams: 1,
            timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(2),
            origin: Some(origin),
        },
        None,
    ));
    tokio::time::sleep(Duration::from_secs(4)).await;
    let deleted_at_ms = origin.elapsed().as_secs_f64() * 1000.0;
    Api::<Namespace>::all(client.clone())
        .delete(&ns.name, &DeleteParams::default())
        .await?;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let gone = wait_for(Duration::from_secs(120), "the namespace to be gone", || {
        let namespaces = namespaces.clone();
        let name = ns.name.clone();
        async move {
            namespaces
                .get_opt(&name)
                .await
                .ok()?
                .is_none()
                .then_some(())
        }
    })
    .await;
    let gone_s = origin.elapsed().as_secs_f64() - deleted_at_ms / 1000.0;
    strategy.stop_operator();
    gone?;
    let report = load.await.context("load task")??;
    drop(proxy);

    // A failure on a connection that had already carried a request is a request cut on an
    // established connection (or sent on one the server was closing without saying so);
    // failures of new connections, once the Service is gone, are the deletion itself.
    let mut answered_before: BTreeMap<u64, f64> = BTreeMap::new();
    for r in &report.request_log {
        if r.outcome == Outcome::Ok {
            let first = answered_before.entry(r.conn).or_insert(r.end_ms);
            *first = first.min(r.end_ms);
        }
    }
    let failed: Vec<_> = report
        .request_log
        .iter()
        .filter(|r| r.outcome.is_failure())
        .collect();
    let cut: Vec<String> = failed
        .iter()
        .filter(|r| {
            r.conn != 0
                && answered_before
                    .get(&r.conn)
                    .is_some_and(|t| *t < r.start_ms)
                || matches!(r.outcome, Outcome::Truncated)
        })
        .map(|r| format!("{:.0} ms {:?} {:?}", r.start_ms, r.outcome, r.detail))
        .collect();
    let early = failed
        .iter()
        .filter(|r| r.scheduled_ms < deleted_at_ms)
        .count();
    eprintln!(
        "namespace deleted under load: {} requests ({} before the deletion), {} failed {:?} \
         after it, none on an established connection: {}; namespace gone after {gone_s:.1} s",
        report.requests,
        report
            .request_log
            .iter()
            .filter(|r| r.scheduled_ms < deleted_at_ms)
            .count(),
        report.failed,
        report.by_outcome,
        cut.is_empty()
    );
    assert!(
        cut.is_empty(),
        "requests cut on established connections: {cut:?}"
    );
    assert_eq!(early, 0, "requests failed before the deletion began");
    assert!(
        report
            .request_log
            .iter()
            .any(|r| r.outcome == Outcome::Ok && r.scheduled_ms > deleted_at_ms),
        "the pods served nothing once the deletion began: the drain was not exercised"
    );
    Ok(())
}
