//! A Release end to end on the test ground: the operator (a host process) takes over an
//! echo Deployment, v1 → v2 is started by editing the Deployment's image (as GitOps would),
//! under load through a service proxy that learns endpoint changes 2 s late. No request may
//! fail; the Release must end `Completed` with its conditions, drain records and events.
mod ground_common;

use std::time::Duration;

use ground_common::{assert_rolled_over, require_node};
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, DeleteParams, ListParams};
use sluice_e2e::scenario::{self, RunSpec};
use sluice_e2e::scenario_sluice::{Sluice, release_state};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_is_lossless_behind_a_slow_load_balancer() -> anyhow::Result<()> {
    let cluster = sluice_e2e::cluster::TestCluster::get().await?;
    require_node(&cluster.client).await?;
    let spec = RunSpec {
        replicas: 3,
        connections: 45,
        rate: 150.0,
        delay: Duration::from_secs(2),
        steady: Duration::from_secs(4),
        tail: Duration::from_secs(2),
        max_release: Duration::from_secs(120),
        keep: true,
        ..Default::default()
    };
    let strategy = Sluice::proxy();
    let r = scenario::run_one(&cluster.client, &strategy, &spec).await;
    let r = match r {
        Ok(r) => r,
        Err(e) => anyhow::bail!("the release did not complete: {e:#}"),
    };
    let ns = r.namespace.clone();
    let cleanup = async {
        let _ = Api::<Namespace>::all(cluster.client.clone())
            .delete(&ns, &DeleteParams::default())
            .await;
    };
    eprintln!(
        "Sluice short run: {} requests, {} failed {:?}, storm {:.1}, release {:.1} s",
        r.requests, r.failed, r.by_outcome, r.storm.factor, r.release_s
    );
    let st = release_state(&cluster.client, &ns, scenario::APP).await?;
    let events: Api<k8s_openapi::api::events::v1::Event> =
        Api::namespaced(cluster.client.clone(), &ns);
    let reasons: Vec<String> = events
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|e| e.reporting_controller.as_deref() == Some("sluice-release"))
        .filter_map(|e| e.reason)
        .collect();
    cleanup.await;

    assert_eq!(r.failed, 0, "requests failed: {:?}", r.by_outcome);
    let expected = spec.rate * (spec.steady + spec.delay + spec.tail).as_secs_f64();
    assert!(
        r.requests as f64 >= 0.8 * expected,
        "{} requests",
        r.requests
    );
    assert_rolled_over(&r, 3);

    assert_eq!(st.phase.as_deref(), Some("Completed"), "{:?}", st.message);
    let conditions = st.status["conditions"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let cond = |t: &str| {
        conditions
            .iter()
            .find(|c| c["type"] == t)
            .map(|c| c["status"].as_str().unwrap_or("").to_string())
    };
    assert_eq!(cond("Ready").as_deref(), Some("True"));
    assert_eq!(cond("Progressing").as_deref(), Some("False"));
    assert_eq!(cond("Degraded").as_deref(), Some("False"));
    assert!(st.status["observedGeneration"].as_i64().is_some());
    // One drain record per old pod, each finished, with the connections it closed.
    let drains = st.status["drains"].as_array().cloned().unwrap_or_default();
    for pod in &r.old_pods {
        let d = drains
            .iter()
            .find(|d| d["pod"] == pod.as_str())
            .unwrap_or_else(|| panic!("no drain record for {pod}: {drains:?}"));
        assert_eq!(d["state"], "Completed", "{d}");
        assert!(d["durationSeconds"].as_f64().is_some(), "{d}");
        assert!(d["connectionsClosed"].as_i64().is_some(), "{d}");
    }
    for reason in [
        "ReleaseStarted",
        "DrainStarted",
        "PodDrained",
        "ReleaseCompleted",
    ] {
        assert!(
            reasons.iter().any(|r| r == reason),
            "no {reason} event: {reasons:?}"
        );
    }
    Ok(())
}

/// The same release in a namespace that enforces the `restricted` Pod Security Standard,
/// with an app whose own template complies: the pods Sluice creates, agent included, are
/// admitted, and the release is lossless.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_in_a_restricted_namespace_is_lossless() -> anyhow::Result<()> {
    let cluster = sluice_e2e::cluster::TestCluster::get().await?;
    require_node(&cluster.client).await?;
    let spec = RunSpec {
        replicas: 3,
        connections: 45,
        rate: 150.0,
        delay: Duration::from_secs(1),
        steady: Duration::from_secs(3),
        tail: Duration::from_secs(2),
        max_release: Duration::from_secs(120),
        restricted: true,
        ..Default::default()
    };
    let r = scenario::run_one(&cluster.client, &Sluice::proxy(), &spec)
        .await
        .map_err(|e| {
            anyhow::anyhow!("the release in a restricted namespace did not complete: {e:#}")
        })?;
    eprintln!(
        "restricted: {} requests, {} failed {:?}, storm {:.2}, release {:.1} s",
        r.requests, r.failed, r.by_outcome, r.storm.factor, r.release_s
    );
    assert_eq!(r.failed, 0, "requests failed: {:?}", r.by_outcome);
    assert_rolled_over(&r, 3);
    Ok(())
}
