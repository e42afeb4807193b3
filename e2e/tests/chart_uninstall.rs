//! The chart's defaults and the uninstall procedure of docs/release.md, under load: the
//! operator installed with Helm (two replicas, a PodDisruptionBudget) runs a Release of an
//! echo Deployment on the real node; then, while requests flow, every Release is deleted
//! with `kubectl delete --wait` (the hand-backs), and only then is the chart uninstalled.
//! Every request is answered and the Deployment serves its replicas at the end. On the
//! way, the chart's admission policy refuses an orphan deletion of the Release.
mod ground_common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use futures::future::BoxFuture;
use ground_common::require_node;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use sluice_e2e::cluster::{repo_root, upstream_binaries};
use sluice_e2e::scenario::{self, RunContext, Strategy};
use sluice_e2e::scenario_sluice::{Sluice, apply_crds, releases};

const OPERATOR_PODS: &str =
    "app.kubernetes.io/name=sluice-operator,app.kubernetes.io/instance=sluice";

struct Tools {
    bins: BTreeMap<String, PathBuf>,
    kubeconfig: PathBuf,
}

impl Tools {
    async fn run(&self, tool: &str, args: &[&str]) -> anyhow::Result<String> {
        let mut cmd = Command::new(&self.bins[tool]);
        cmd.arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .current_dir(repo_root());
        let what = format!("{tool} {}", args.join(" "));
        let out = tokio::task::spawn_blocking(move || cmd.output())
            .await?
            .with_context(|| format!("running {what}"))?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            bail!(
                "{what} failed: {stdout}{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(stdout)
    }
}

struct Uninstall {
    sluice: Sluice,
    tools: Tools,
    notes: Mutex<Vec<String>>,
    installed_in: Mutex<Option<String>>,
}

impl Uninstall {
    fn note(&self, s: String) {
        eprintln!("{s}");
        self.notes.lock().unwrap().push(s);
    }
}

impl Drop for Uninstall {
    fn drop(&mut self) {
        // A failed run must not leave an operator behind.
        if let Some(ns) = self.installed_in.lock().unwrap().take() {
            let _ = Command::new(&self.tools.bins["helm"])
                .arg("--kubeconfig")
                .arg(&self.tools.kubeconfig)
                .args(["uninstall", "sluice", "--namespace", &ns])
                .output();
        }
    }
}

fn ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

async fn deployment_counts(ctx: &RunContext) -> anyhow::Result<(i32, i32)> {
    let d = Api::<Deployment>::namespaced(ctx.client.clone(), &ctx.namespace)
        .get(&ctx.name)
        .await?;
    Ok((
        d.spec.and_then(|s| s.replicas).unwrap_or(0),
        d.status.and_then(|s| s.available_replicas).unwrap_or(0),
    ))
}

impl Strategy for Uninstall {
    fn name(&self) -> String {
        "Sluice-uninstall".into()
    }
    fn description(&self) -> String {
        "the chart installed, then the documented uninstall".into()
    }
    fn shape(&self, d: &mut Deployment) {
        self.sluice.shape(d)
    }
    fn prepare<'a>(&'a self, ctx: &'a RunContext) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move {
            apply_crds(&ctx.client).await?;
            let ns = ctx.namespace.as_str();
            // The chart's defaults, scoped to this namespace, pinned to the real node.
            let sets = format!("image.tag=dev,agent.image=sluice/agent:dev,watchNamespace={ns}");
            self.tools
                .run(
                    "helm",
                    &[
                        "install",
                        "sluice",
                        "charts/sluice",
                        "--namespace",
                        ns,
                        "--set",
                        &sets,
                        "--set-string",
                        "nodeSelector.kubernetes\\.io/hostname=local-0",
                    ],
                )
                .await?;
            *self.installed_in.lock().unwrap() = Some(ns.to_string());
            let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
            let names = ground_common::wait_until(
                Duration::from_secs(120),
                "two operator pods Ready",
                || async {
                    let list = pods
                        .list(&ListParams::default().labels(OPERATOR_PODS))
                        .await?;
                    let ready: Vec<String> = list
                        .items
                        .iter()
                        .filter(|p| ready(p))
                        .filter_map(|p| p.metadata.name.clone())
                        .collect();
                    Ok((ready.len() >= 2).then_some(ready))
                },
            )
            .await?;
            self.note(format!("operator pods ready: {}", names.len()));
            let leases: Api<Lease> = Api::namespaced(ctx.client.clone(), ns);
            let holder = ground_common::wait_until(
                Duration::from_secs(60),
                "the Lease held by a replica",
                || async {
                    Ok(leases
                        .get_opt("sluice-operator")
                        .await?
                        .and_then(|l| l.spec)
                        .and_then(|s| s.holder_identity)
                        .filter(|h| names.contains(h)))
                },
            )
            .await?;
            self.note(format!(
                "lease held by a replica: {}",
                names.contains(&holder)
            ));
            let pdb = self
                .tools
                .run(
                    "kubectl",
                    &[
                        "get",
                        "pdb",
                        "sluice-operator",
                        "-n",
                        ns,
                        "-o",
                        "jsonpath={.spec.maxUnavailable}",
                    ],
                )
                .await?;
            self.note(format!("pdb maxUnavailable={pdb}"));
            let replicas = 3;
            self.sluice.create_release(ctx, replicas).await
        })
    }
    fn release<'a>(&'a self, ctx: &'a RunContext) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move {
            let ns = ctx.namespace.as_str();
            let before = deployment_counts(ctx).await?;
            self.note(format!(
                "before: deployment replicas={} available={}",
                before.0, before.1
            ));
            // The chart's admission policy refuses the one deletion that bypasses the
            // hand-back.
            let orphan = self
                .tools
                .run(
                    "kubectl",
                    &[
                        "delete",
                        "releases.sluice.dev",
                        &ctx.name,
                        "-n",
                        ns,
                        "--cascade=orphan",
                    ],
                )
                .await;
            let still_there = releases(&ctx.client, ns)
                .get_opt(&ctx.name)
                .await?
                .is_some();
            self.note(format!(
                "orphan deletion refused: {} (release still there: {still_there})",
                orphan
                    .err()
                    .is_some_and(|e| e.to_string().contains("propagationPolicy=Orphan"))
            ));
            // docs/release.md, "Uninstalling Sluice", steps 1 to 3 (scoped to this
            // namespace: other tests' Releases are not ours to delete).
            let started = Instant::now();
            self.tools
                .run(
                    "kubectl",
                    &[
                        "delete",
                        "releases.sluice.dev",
                        "--all",
                        "-n",
                        ns,
                        "--wait",
                        "--timeout=180s",
                    ],
                )
                .await?;
            let after = deployment_counts(ctx).await?;
            let left = self
                .tools
                .run(
                    "kubectl",
                    &["get", "releases.sluice.dev", "-n", ns, "-o", "name"],
                )
                .await?;
            self.note(format!(
                "after delete --wait ({:.1} s): releases left={} deployment replicas={} available={}",
                started.elapsed().as_secs_f64(),
                left.lines().count(),
                after.0,
                after.1
            ));
            self.tools
                .run(
                    "helm",
                    &[
                        "uninstall",
                        "sluice",
                        "--namespace",
                        ns,
                        "--wait",
                        "--timeout",
                        "120s",
                    ],
                )
                .await?;
            *self.installed_in.lock().unwrap() = None;
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
            let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
            let left = deadline.saturating_duration_since(Instant::now());
            ground_common::wait_until(left, "operator gone and the Deployment serving", || async {
                let operator = pods
                    .list(&ListParams::default().labels(OPERATOR_PODS))
                    .await?
                    .items
                    .len();
                let release_pods = pods
                    .list(&ListParams::default().labels("sluice.dev/release"))
                    .await?
                    .items
                    .len();
                let (_, available) = deployment_counts(ctx).await?;
                Ok((operator == 0 && release_pods == 0 && available == replicas).then_some(()))
            })
            .await?;
            let (r, a) = deployment_counts(ctx).await?;
            self.note(format!(
                "uninstalled: deployment replicas={r} available={a}"
            ));
            Ok(())
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uninstall_procedure_leaves_every_deployment_serving() -> anyhow::Result<()> {
    let cluster = sluice_e2e::cluster::TestCluster::get().await?;
    require_node(&cluster.client).await?;
    let strategy = Uninstall {
        sluice: Sluice::proxy(),
        tools: Tools {
            bins: upstream_binaries()?,
            kubeconfig: cluster.kubeconfig.clone(),
        },
        notes: Default::default(),
        installed_in: Default::default(),
    };
    let spec = ground_common::small_run(Duration::from_secs(240));
    let r = scenario::run_one(&cluster.client, &strategy, &spec)
        .await
        .map_err(|e| anyhow::anyhow!("the uninstall did not complete: {e:#}"))?;
    eprintln!(
        "uninstall: {} requests, {} failed {:?}, {:.1} s",
        r.requests, r.failed, r.by_outcome, r.release_s
    );
    let notes = strategy.notes.lock().unwrap().clone();
    let has = |s: &str| notes.iter().any(|n| n.contains(s));
    assert!(
        has("operator pods ready: 2"),
        "the chart runs two replicas: {notes:#?}"
    );
    assert!(has("lease held by a replica: true"), "{notes:#?}");
    assert!(
        has("pdb maxUnavailable=1"),
        "the chart has a PodDisruptionBudget: {notes:#?}"
    );
    assert!(has("before: deployment replicas=0"), "{notes:#?}");
    assert!(
        has("orphan deletion refused: true (release still there: true)"),
        "{notes:#?}"
    );
    assert!(
        has("releases left=0 deployment replicas=3 available=3"),
        "kubectl delete --wait returns once the Deployment serves again: {notes:#?}"
    );
    assert!(
        has("uninstalled: deployment replicas=3 available=3"),
        "{notes:#?}"
    );
    assert_eq!(r.failed, 0, "requests failed: {:?}", r.by_outcome);
    assert!(r.old_pods.iter().all(|p| !r.new_pods.contains(p)));
    Ok(())
}
