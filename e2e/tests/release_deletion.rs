//! Deleting a Release under load, with the propagation policies that may be used
//! (`kubectl delete` and most tools: background; Argo CD's prune: foreground). Each must
//! hand the pods back to the Deployment losslessly and leave none of the Release's
//! ReplicaSets or pods behind. Orphan deletion cannot be made lossless (the Deployment
//! adopts the orphaned ReplicaSets); the chart's admission policy refuses it
//! (`chart_uninstall.rs` checks that).
mod ground_common;

use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use ground_common::require_node;
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PropagationPolicy};
use sluice_e2e::scenario::{self, RunContext, Strategy};
use sluice_e2e::scenario_sluice::{Sluice, releases};

struct Deletion {
    sluice: Sluice,
    policy: PropagationPolicy,
}

impl Strategy for Deletion {
    fn name(&self) -> String {
        "Sluice-delete".into()
    }
    fn description(&self) -> String {
        format!("the Release deleted ({:?})", self.policy)
    }
    fn shape(&self, d: &mut Deployment) {
        self.sluice.shape(d)
    }
    fn prepare<'a>(&'a self, ctx: &'a RunContext) -> BoxFuture<'a, anyhow::Result<()>> {
        self.sluice.prepare(ctx)
    }
    fn release<'a>(&'a self, ctx: &'a RunContext) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move {
            let dp = DeleteParams {
                propagation_policy: Some(self.policy.clone()),
                ..Default::default()
            };
            releases(&ctx.client, &ctx.namespace)
                .delete(&ctx.name, &dp)
                .await?;
            Ok(())
        })
    }
    fn wait_released<'a>(
        &'a self,
        ctx: &'a RunContext,
        replicas: i32,
        deadline: Instant,
    ) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move {
            let rels = releases(&ctx.client, &ctx.namespace);
            let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
            let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
            let rss: Api<ReplicaSet> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
            let labelled = ListParams::default().labels("sluice.dev/release");
            let result = loop {
                let gone = rels.get_opt(&ctx.name).await?.is_none();
                let available = deployments
                    .get(&ctx.name)
                    .await?
                    .status
                    .and_then(|s| s.available_replicas)
                    .unwrap_or(0);
                let left_pods = pods.list(&labelled).await?.items.len();
                let left_rss = rss.list(&labelled).await?.items.len();
                if gone && available == replicas && left_pods == 0 && left_rss == 0 {
                    break Ok(());
                }
                if Instant::now() >= deadline {
                    break Err(anyhow::anyhow!(
                        "not handed back: Release gone {gone}, Deployment available \
                         {available}/{replicas}, Release pods left {left_pods}, ReplicaSets \
                         left {left_rss}"
                    ));
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            };
            self.sluice.stop_operator();
            let _ = rels
                .patch(
                    &ctx.name,
                    &PatchParams::default(),
                    &Patch::Merge(&serde_json::json!({"metadata": {"finalizers": null}})),
                )
                .await;
            result
        })
    }
}

async fn delete_under_load(policy: PropagationPolicy) -> anyhow::Result<()> {
    let cluster = sluice_e2e::cluster::TestCluster::get().await?;
    require_node(&cluster.client).await?;
    let strategy = Deletion {
        sluice: Sluice::proxy(),
        policy: policy.clone(),
    };
    let spec = ground_common::small_run(Duration::from_secs(90));
    let r = scenario::run_one(&cluster.client, &strategy, &spec)
        .await
        .map_err(|e| anyhow::anyhow!("{policy:?} deletion: {e:#}"))?;
    eprintln!(
        "{policy:?} deletion: {} requests, {} failed {:?}, hand-back {:.1} s",
        r.requests, r.failed, r.by_outcome, r.release_s
    );
    assert_eq!(r.failed, 0, "requests failed: {:?}", r.by_outcome);
    assert!(r.old_pods.iter().all(|p| !r.new_pods.contains(p)));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_deletion_hands_back_losslessly() -> anyhow::Result<()> {
    delete_under_load(PropagationPolicy::Background).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreground_deletion_hands_back_losslessly() -> anyhow::Result<()> {
    delete_under_load(PropagationPolicy::Foreground).await
}
