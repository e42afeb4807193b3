//! Restart safety: the operator is killed with SIGKILL at random moments during a release
//! and restarted each time; the release completes, no request fails, and every old pod
//! was drained exactly once.
mod ground_common;

use std::collections::BTreeMap;
use std::time::Duration;

use ground_common::require_node;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, DeleteParams};
use sluice_e2e::scenario::{self, RunSpec};
use sluice_e2e::scenario_sluice::{Sluice, release_state};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_survives_operator_kills() -> anyhow::Result<()> {
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
        keep: true,
        ..Default::default()
    };
    let strategy = Sluice::with_kills(5);
    let r = match scenario::run_one(&cluster.client, &strategy, &spec).await {
        Ok(r) => r,
        Err(e) => anyhow::bail!("the release did not complete: {e:#}"),
    };
    let st = release_state(&cluster.client, &r.namespace, scenario::APP).await?;
    let _ = Api::<Namespace>::all(cluster.client.clone())
        .delete(&r.namespace, &DeleteParams::default())
        .await;
    let kills = *strategy.kills_done.lock().unwrap();
    eprintln!(
        "{kills} kill(s): {} requests, {} failed {:?}, release {:.1} s",
        r.requests, r.failed, r.by_outcome, r.release_s
    );
    assert!(
        kills >= 1,
        "the operator was never killed during the release"
    );
    assert_eq!(r.failed, 0, "requests failed: {:?}", r.by_outcome);
    assert_eq!(st.phase.as_deref(), Some("Completed"), "{:?}", st.message);
    let mut drains: BTreeMap<String, usize> = BTreeMap::new();
    for d in st.status["drains"].as_array().cloned().unwrap_or_default() {
        *drains
            .entry(d["pod"].as_str().unwrap_or("").to_string())
            .or_default() += 1;
        assert_eq!(d["state"], "Completed", "{d}");
    }
    for pod in &r.old_pods {
        assert_eq!(drains.get(pod), Some(&1), "drains per pod: {drains:?}");
    }
    Ok(())
}
