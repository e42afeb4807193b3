//! Who owns a Deployment, under load on the real node (operator as a host process):
//!
//! - one Release per Deployment: a second Release naming a Deployment that a Release
//!   already runs is refused (condition `Ready=False reason=DeploymentClaimed`, a Warning
//!   event naming the first) and never touches the Deployment, not even when deleted;
//! - a Release whose spec turned invalid (an agent image the operator does not allow)
//!   still hands the Deployment back, losslessly, when it is deleted.
mod ground_common;

use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures::future::BoxFuture;
use ground_common::require_node;
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams};
use sluice_e2e::scenario::{self, RunContext, RunSpec, Strategy};
use sluice_e2e::scenario_sluice::{Sluice, release_state, releases};

#[derive(Clone, Copy, PartialEq)]
enum Shape {
    /// A second Release for the Deployment is created, checked and deleted.
    SecondRelease,
    /// The Release's agent image is changed to one the operator does not allow, then the
    /// Release is deleted.
    InvalidThenDeleted,
}

/// Sluice's setup (operator, Release `echo` serving 3 pods), then one of the shapes
/// instead of a release; what it checked is kept for the test to assert.
struct Ownership {
    sluice: Sluice,
    shape: Shape,
    findings: std::sync::Mutex<Vec<String>>,
}

const SECOND: &str = "echo-two";

impl Ownership {
    fn note(&self, s: String) {
        eprintln!("{s}");
        self.findings.lock().unwrap().push(s);
    }
}

fn condition(status: &serde_json::Value, type_: &str) -> Option<(String, String, String)> {
    status["conditions"].as_array()?.iter().find_map(|c| {
        (c["type"] == type_).then(|| {
            (
                c["status"].as_str().unwrap_or("").to_string(),
                c["reason"].as_str().unwrap_or("").to_string(),
                c["message"].as_str().unwrap_or("").to_string(),
            )
        })
    })
}

impl Strategy for Ownership {
    fn name(&self) -> String {
        "Sluice-ownership".into()
    }
    fn description(&self) -> String {
        "ownership checks".into()
    }
    fn shape(&self, d: &mut Deployment) {
        self.sluice.shape(d)
    }
    fn prepare<'a>(&'a self, ctx: &'a RunContext) -> BoxFuture<'a, anyhow::Result<()>> {
        self.sluice.prepare(ctx)
    }
    fn release<'a>(&'a self, ctx: &'a RunContext) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move {
            let rels = releases(&ctx.client, &ctx.namespace);
            let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
            match self.shape {
                Shape::SecondRelease => {
                    let mut manifest = self.sluice.release_manifest(&ctx.name, 3, 5.0);
                    manifest["metadata"]["name"] = SECOND.into();
                    let obj: DynamicObject = serde_json::from_value(manifest)?;
                    rels.patch(
                        SECOND,
                        &PatchParams::apply("sluice-e2e"),
                        &Patch::Apply(&obj),
                    )
                    .await
                    .context("creating the second Release")?;
                    let (reason, message) = ground_common::wait_until(
                        Duration::from_secs(30),
                        "the second Release to be refused",
                        || async {
                            let st = release_state(&ctx.client, &ctx.namespace, SECOND).await?;
                            Ok(condition(&st.status, "Ready")
                                .filter(|c| c.0 == "False" && !c.1.is_empty())
                                .map(|c| (c.1, c.2)))
                        },
                    )
                    .await?;
                    self.note(format!(
                        "second Ready=False reason={reason} message={message}"
                    ));
                    // The Event comes with the status.
                    let events: Api<k8s_openapi::api::events::v1::Event> =
                        Api::namespaced(ctx.client.clone(), &ctx.namespace);
                    let note = ground_common::wait_until(
                        Duration::from_secs(10),
                        "the Warning event",
                        || async {
                            Ok(events
                                .list(&ListParams::default())
                                .await?
                                .items
                                .into_iter()
                                .find(|e| {
                                    e.regarding.as_ref().and_then(|r| r.name.as_deref())
                                        == Some(SECOND)
                                        && e.type_.as_deref() == Some("Warning")
                                        && e.reason.as_deref() == Some("DeploymentClaimed")
                                })
                                .and_then(|e| e.note))
                        },
                    )
                    .await
                    .unwrap_or_default();
                    self.note(format!("event DeploymentClaimed note={note}"));
                    // Let it run a few reconciles, then delete it.
                    tokio::time::sleep(Duration::from_secs(3)).await;
                    rels.delete(SECOND, &DeleteParams::default()).await?;
                    ground_common::wait_until(
                        Duration::from_secs(30),
                        "the second Release to go",
                        || async { Ok(rels.get_opt(SECOND).await?.is_none().then_some(())) },
                    )
                    .await?;
                    let d = deployments.get(&ctx.name).await?;
                    self.note(format!(
                        "deployment replicas={:?} claimed-by={:?}",
                        d.spec.as_ref().and_then(|s| s.replicas),
                        d.annotations().get("sluice.dev/claimed-by")
                    ));
                    let rss: Api<ReplicaSet> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
                    let second_rs = rss
                        .list(
                            &ListParams::default().labels(&format!("sluice.dev/release={SECOND}")),
                        )
                        .await?
                        .items
                        .len();
                    self.note(format!("second replicasets={second_rs}"));
                }
                Shape::InvalidThenDeleted => {
                    rels.patch(
                        &ctx.name,
                        &PatchParams::default(),
                        &Patch::Merge(&serde_json::json!({"spec": {"agent": {"image": "evil.example/agent:1"}}})),
                    )
                    .await
                    .context("setting a disallowed agent image")?;
                    let msg = ground_common::wait_until(
                        Duration::from_secs(30),
                        "the Release to fail",
                        || async {
                            let st = release_state(&ctx.client, &ctx.namespace, &ctx.name).await?;
                            Ok((st.phase.as_deref() == Some("Failed")).then_some(st.message))
                        },
                    )
                    .await?;
                    self.note(format!("failed: {msg:?}"));
                    rels.delete(&ctx.name, &DeleteParams::default()).await?;
                }
            }
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
            if self.shape == Shape::InvalidThenDeleted {
                // Handed back: the Release is gone, the Deployment serves `replicas` pods
                // and no pod of the Release is left.
                let rels = releases(&ctx.client, &ctx.namespace);
                let deployments: Api<Deployment> =
                    Api::namespaced(ctx.client.clone(), &ctx.namespace);
                let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
                let left = deadline.saturating_duration_since(Instant::now());
                ground_common::wait_until(left, "the hand-back to the Deployment", || async {
                    let gone = rels.get_opt(&ctx.name).await?.is_none();
                    let available = deployments
                        .get(&ctx.name)
                        .await?
                        .status
                        .and_then(|s| s.available_replicas)
                        .unwrap_or(0);
                    let release_pods = pods
                        .list(&ListParams::default().labels("sluice.dev/release"))
                        .await?
                        .items
                        .len();
                    Ok((gone && available == replicas && release_pods == 0).then_some(()))
                })
                .await?;
                let d = deployments.get(&ctx.name).await?;
                self.note(format!(
                    "handed back: replicas={:?} claimed-by={:?}",
                    d.spec.as_ref().and_then(|s| s.replicas),
                    d.annotations().get("sluice.dev/claimed-by")
                ));
            }
            self.sluice.stop_operator();
            let _ = releases(&ctx.client, &ctx.namespace)
                .patch(
                    &ctx.name,
                    &PatchParams::default(),
                    &Patch::Merge(&serde_json::json!({"metadata": {"finalizers": null}})),
                )
                .await;
            Ok(())
        })
    }
}

fn spec() -> RunSpec {
    ground_common::small_run(Duration::from_secs(120))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_release_for_a_deployment_is_refused() -> anyhow::Result<()> {
    let cluster = sluice_e2e::cluster::TestCluster::get().await?;
    require_node(&cluster.client).await?;
    let strategy = Ownership {
        sluice: Sluice::proxy(),
        shape: Shape::SecondRelease,
        findings: Default::default(),
    };
    let r = scenario::run_one(&cluster.client, &strategy, &spec())
        .await
        .map_err(|e| anyhow::anyhow!("the run did not complete: {e:#}"))?;
    eprintln!(
        "second Release: {} requests, {} failed {:?}",
        r.requests, r.failed, r.by_outcome
    );
    let f = strategy.findings.lock().unwrap().clone();
    let has = |s: &str| f.iter().any(|x| x.contains(s));
    assert!(has("second Ready=False reason=DeploymentClaimed"), "{f:#?}");
    assert!(
        has("already run by Release \"echo\""),
        "the condition names the first Release: {f:#?}"
    );
    assert!(
        f.iter()
            .any(|x| x.starts_with("event DeploymentClaimed note=") && x.contains("\"echo\"")),
        "a Warning event names the first Release: {f:#?}"
    );
    assert!(
        has("deployment replicas=Some(0) claimed-by=Some(\"echo\")"),
        "the Deployment was left alone: {f:#?}"
    );
    assert!(has("second replicasets=0"), "{f:#?}");
    assert_eq!(r.failed, 0, "requests failed: {:?}", r.by_outcome);
    assert_eq!(
        r.old_pods, r.new_pods,
        "the first Release's pods kept serving"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_release_with_an_invalid_spec_hands_back() -> anyhow::Result<()> {
    let cluster = sluice_e2e::cluster::TestCluster::get().await?;
    require_node(&cluster.client).await?;
    let strategy = Ownership {
        sluice: Sluice::proxy(),
        shape: Shape::InvalidThenDeleted,
        findings: Default::default(),
    };
    let r = scenario::run_one(&cluster.client, &strategy, &spec())
        .await
        .map_err(|e| anyhow::anyhow!("the run did not complete: {e:#}"))?;
    eprintln!(
        "invalid spec, deleted: {} requests, {} failed {:?}, hand-back {:.1} s",
        r.requests, r.failed, r.by_outcome, r.release_s
    );
    let f = strategy.findings.lock().unwrap().clone();
    assert!(
        f.iter()
            .any(|x| x.starts_with("failed:") && x.contains("evil.example")),
        "{f:#?}"
    );
    assert!(
        f.iter()
            .any(|x| x == "handed back: replicas=Some(3) claimed-by=None"),
        "{f:#?}"
    );
    assert_eq!(r.failed, 0, "requests failed: {:?}", r.by_outcome);
    // By the end only the Deployment's own pods answer.
    assert!(r.old_pods.iter().all(|p| !r.new_pods.contains(p)));
    Ok(())
}
