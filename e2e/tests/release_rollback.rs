//! A bad version is rolled back by the gates: v3 answers 20% of its requests with 500; the
//! comparison gate (canary against stable, from the agents' metrics) must abort, traffic
//! returns to stable losslessly, and the Release says which gate failed with which values.
//! The 5xx the bad canary answered are the app's errors; nothing else may fail.
mod ground_common;

use std::time::Duration;

use ground_common::require_node;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, DeleteParams};
use sluice_e2e::load::Outcome;
use sluice_e2e::scenario::{self, RunSpec};
use sluice_e2e::scenario_sluice::{BadVersion, Sluice, release_state};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_canary_is_rolled_back_without_losing_requests() -> anyhow::Result<()> {
    let cluster = sluice_e2e::cluster::TestCluster::get().await?;
    require_node(&cluster.client).await?;
    let spec = RunSpec {
        replicas: 3,
        connections: 60,
        rate: 150.0,
        delay: Duration::from_secs(1),
        steady: Duration::from_secs(4),
        tail: Duration::from_secs(2),
        max_release: Duration::from_secs(120),
        keep: true,
        ..Default::default()
    };
    let strategy = Sluice::rollback(BadVersion::Errors(0.2));
    let r = scenario::run_one(&cluster.client, &strategy, &spec).await;
    let r = match r {
        Ok(r) => r,
        Err(e) => anyhow::bail!("the release was not rolled back: {e:#}"),
    };
    let st = release_state(&cluster.client, &r.namespace, scenario::APP).await?;
    let _ = Api::<Namespace>::all(cluster.client.clone())
        .delete(&r.namespace, &DeleteParams::default())
        .await;
    let app_errors = r.by_outcome.get(&Outcome::Status5xx).copied().unwrap_or(0);
    eprintln!(
        "rollback: {} requests, {} failed {:?} ({app_errors} 5xx from the bad canary), release {:.1} s, abort {}",
        r.requests, r.failed, r.by_outcome, r.release_s, st.status["abort"]
    );
    assert_eq!(
        r.failed - app_errors,
        0,
        "the rollback itself lost requests: {:?}",
        r.by_outcome
    );
    assert_eq!(st.phase.as_deref(), Some("Aborted"));
    let abort = &st.status["abort"];
    assert_eq!(abort["reason"], "GateFailed", "{abort}");
    assert_eq!(abort["gate"], "comparison", "{abort}");
    assert!(
        abort["values"].as_object().is_some_and(|v| !v.is_empty()),
        "{abort}"
    );
    // Only stable (v1) pods are left, as many as before.
    assert_eq!(r.new_pods.len(), 3);
    let degraded = st.status["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == "Degraded").cloned());
    assert_eq!(degraded.map(|c| c["status"].clone()), Some("True".into()));
    Ok(())
}
