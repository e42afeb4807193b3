//! A canary judged by the user's own Prometheus: the Release's comparison gate is off and
//! `spec.analysis` names an Argo Rollouts `AnalysisTemplate` whose PromQL reads the canary's
//! error ratio from a real Prometheus (Debian's, a host process) that scrapes the agents. v3 answers 30% of its requests with 500: the
//! analysis must fail the step, the Release must roll back through the drain path, and
//! nothing but the bad canary's own 500s may fail.
//!
//! The `AnalysisTemplate` CRD here is a schema-less stand-in for Argo Rollouts' (the
//! operator only reads these objects as they are).
mod ground_common;

use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use ground_common::{require_node, wait_for};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams, PostParams};
use serde_json::json;
use sluice_e2e::load::Outcome;
use sluice_e2e::prometheus::Prometheus;
use sluice_e2e::scenario::{self, RunContext, RunSpec, Strategy};
use sluice_e2e::scenario_sluice::{BadVersion, Sluice, release_state, releases};

/// The canary's share of 5xx over the last 10 s, from the agents' request counters.
const ERROR_RATIO: &str = r#"sum(rate(sluice_agent_requests_total{namespace="{{args.namespace}}",revision="{{args.canary-revision}}",code=~"5.."}[10s])) / sum(rate(sluice_agent_requests_total{namespace="{{args.namespace}}",revision="{{args.canary-revision}}"}[10s]))"#;

async fn ensure_analysis_template_crd(client: &kube::Client) -> anyhow::Result<()> {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd: CustomResourceDefinition = serde_json::from_value(json!({
        "metadata": {"name": "analysistemplates.argoproj.io"},
        "spec": {
            "group": "argoproj.io",
            "scope": "Namespaced",
            "names": {"kind": "AnalysisTemplate", "listKind": "AnalysisTemplateList",
                      "plural": "analysistemplates", "singular": "analysistemplate"},
            "versions": [{"name": "v1alpha1", "served": true, "storage": true,
                          "schema": {"openAPIV3Schema": {"type": "object",
                                     "x-kubernetes-preserve-unknown-fields": true}}}],
        }
    }))?;
    match crds.create(&PostParams::default(), &crd).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => return Err(e.into()),
    }
    wait_for(
        Duration::from_secs(30),
        "the AnalysisTemplate CRD to be established",
        || {
            let crds = crds.clone();
            async move {
                let c = crds.get("analysistemplates.argoproj.io").await.ok()?;
                c.status?
                    .conditions?
                    .iter()
                    .any(|c| c.type_ == "Established" && c.status == "True")
                    .then_some(())
            }
        },
    )
    .await
}

/// Sluice's rollback scenario with the comparison gate off and the analysis on.
struct Analysed {
    sluice: Sluice,
    prometheus: Mutex<Option<Prometheus>>,
}

impl Strategy for Analysed {
    fn name(&self) -> String {
        "Sluice-analysis".into()
    }
    fn description(&self) -> String {
        "a bad canary judged by a PromQL analysis".into()
    }
    fn shape(&self, d: &mut Deployment) {
        self.sluice.shape(d)
    }
    fn prepare<'a>(&'a self, ctx: &'a RunContext) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move {
            ensure_analysis_template_crd(&ctx.client).await?;
            let prom = Prometheus::for_agents(ctx.client.clone(), &ctx.namespace, 9901).await?;
            let ar = ApiResource {
                group: "argoproj.io".into(),
                version: "v1alpha1".into(),
                api_version: "argoproj.io/v1alpha1".into(),
                kind: "AnalysisTemplate".into(),
                plural: "analysistemplates".into(),
            };
            let template: DynamicObject = serde_json::from_value(json!({
                "apiVersion": "argoproj.io/v1alpha1",
                "kind": "AnalysisTemplate",
                "metadata": {"name": "error-rate"},
                "spec": {
                    "args": [{"name": "namespace"}, {"name": "canary-revision"}],
                    "metrics": [{
                        "name": "error-ratio",
                        "interval": "2s",
                        "count": 15,
                        "failureLimit": 1,
                        // Before the canary's first scrapes there is no value: inconclusive.
                        "inconclusiveLimit": 12,
                        "successCondition": "len(result) > 0 && result[0] < 0.05",
                        "failureCondition": "len(result) > 0 && result[0] >= 0.05",
                        "provider": {"prometheus": {"address": prom.url(), "query": ERROR_RATIO}},
                    }],
                }
            }))?;
            Api::<DynamicObject>::namespaced_with(ctx.client.clone(), &ctx.namespace, &ar)
                .create(&PostParams::default(), &template)
                .await?;
            *self.prometheus.lock().expect("lock") = Some(prom);
            self.sluice.prepare(ctx).await?;
            // The user's analysis alone judges the canary.
            let patch = json!({"spec": {
                "gates": {"comparison": null},
                "analysis": {"templates": [{"kind": "AnalysisTemplate", "name": "error-rate"}]},
            }});
            releases(&ctx.client, &ctx.namespace)
                .patch(&ctx.name, &PatchParams::default(), &Patch::Merge(&patch))
                .await?;
            Ok(())
        })
    }
    fn release<'a>(&'a self, ctx: &'a RunContext) -> BoxFuture<'a, anyhow::Result<()>> {
        self.sluice.release(ctx)
    }
    fn wait_released<'a>(
        &'a self,
        ctx: &'a RunContext,
        replicas: i32,
        deadline: Instant,
    ) -> BoxFuture<'a, anyhow::Result<()>> {
        self.sluice.wait_released(ctx, replicas, deadline)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_failed_by_a_promql_analysis_is_rolled_back() -> anyhow::Result<()> {
    let cluster = sluice_e2e::cluster::TestCluster::get().await?;
    require_node(&cluster.client).await?;
    let spec = RunSpec {
        replicas: 3,
        connections: 60,
        rate: 150.0,
        delay: Duration::from_secs(1),
        steady: Duration::from_secs(4),
        tail: Duration::from_secs(2),
        max_release: Duration::from_secs(150),
        keep: true,
        ..Default::default()
    };
    let strategy = Analysed {
        sluice: Sluice::rollback(BadVersion::Errors(0.3)),
        prometheus: Mutex::new(None),
    };
    let r = scenario::run_one(&cluster.client, &strategy, &spec).await;
    let r = match r {
        Ok(r) => r,
        Err(e) => anyhow::bail!("the release was not rolled back: {e:#}"),
    };
    let st = release_state(&cluster.client, &r.namespace, scenario::APP).await?;
    drop(strategy.prometheus.lock().expect("lock").take());
    let _ = Api::<k8s_openapi::api::core::v1::Namespace>::all(cluster.client.clone())
        .delete(&r.namespace, &Default::default())
        .await;
    let app_errors = r.by_outcome.get(&Outcome::Status5xx).copied().unwrap_or(0);
    eprintln!(
        "analysis rollback: {} requests, {} failed {:?} ({app_errors} 5xx from the bad canary), \
         release {:.1} s, abort {}, analysis {}",
        r.requests, r.failed, r.by_outcome, r.release_s, st.status["abort"], st.status["analysis"]
    );
    assert_eq!(
        r.failed - app_errors,
        0,
        "the rollback itself lost requests: {:?}",
        r.by_outcome
    );
    assert_eq!(st.phase.as_deref(), Some("Aborted"), "{:?}", st.message);
    let abort = &st.status["abort"];
    assert_eq!(abort["reason"], "AnalysisFailed", "{abort}");
    assert!(
        app_errors > 0,
        "the canary never served: the analysis judged nothing"
    );
    // The measurements that failed it are in status, with the resolved query and values.
    let run = &st.status["analysis"]["run"];
    assert_eq!(run["verdict"], "Failed", "{run}");
    let text = run.to_string();
    assert!(
        text.contains("sluice_agent_requests_total") && text.contains(&r.namespace),
        "no resolved query in {run}"
    );
    assert_eq!(
        r.new_pods.len(),
        3,
        "only stable pods are left: {:?}",
        r.new_pods
    );
    Ok(())
}

/// A webhook receiver on loopback (the operator runs on the host): answers every POST with
/// the status it is set to, and counts the calls.
struct Hook {
    addr: std::net::SocketAddr,
    status: std::sync::Arc<std::sync::atomic::AtomicU16>,
    calls: std::sync::Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Hook {
    async fn start(status: u16) -> anyhow::Result<Self> {
        use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let status = std::sync::Arc::new(AtomicU16::new(status));
        let calls = std::sync::Arc::new(AtomicU64::new(0));
        let (s, c) = (status.clone(), calls.clone());
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (s, c) = (s.clone(), c.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |_req| {
                        c.fetch_add(1, Ordering::Relaxed);
                        let code = s.load(Ordering::Relaxed);
                        async move {
                            hyper::Response::builder()
                                .status(code)
                                .body(http_body_util::Full::new(bytes::Bytes::from_static(b"{}")))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Ok(Hook {
            addr,
            status,
            calls,
            task,
        })
    }
}

impl Drop for Hook {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A good v2 released in two steps behind a rollout webhook that first says no.
struct HookGated {
    sluice: Sluice,
    hook: Hook,
}

impl Strategy for HookGated {
    fn name(&self) -> String {
        "Sluice-webhook".into()
    }
    fn description(&self) -> String {
        "steps gated by a rollout webhook".into()
    }
    fn shape(&self, d: &mut Deployment) {
        self.sluice.shape(d)
    }
    fn prepare<'a>(&'a self, ctx: &'a RunContext) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move {
            self.sluice.prepare(ctx).await?;
            // The webhook alone gates the steps (a cold canary's latency must not).
            let patch = json!({"spec": {
                "gates": {"comparison": null},
                "steps": [{"setWeight": 34}, {"setWeight": 67}],
                "analysis": {"webhooks": [{
                    "name": "load-test", "type": "rollout",
                    "url": format!("http://{}/", self.hook.addr), "timeout": "2s",
                }]},
            }});
            releases(&ctx.client, &ctx.namespace)
                .patch(&ctx.name, &PatchParams::default(), &Patch::Merge(&patch))
                .await?;
            Ok(())
        })
    }
    fn release<'a>(&'a self, ctx: &'a RunContext) -> BoxFuture<'a, anyhow::Result<()>> {
        use std::sync::atomic::Ordering;
        Box::pin(async move {
            self.sluice.release(ctx).await?;
            let events: Api<k8s_openapi::api::events::v1::Event> =
                Api::namespaced(ctx.client.clone(), &ctx.namespace);
            wait_for(Duration::from_secs(90), "a WebhookHalted event", || {
                let events = events.clone();
                async move {
                    let list = events.list(&Default::default()).await.ok()?;
                    list.items
                        .iter()
                        .any(|e| e.reason.as_deref() == Some("WebhookHalted"))
                        .then_some(())
                }
            })
            .await?;
            let held = release_state(&ctx.client, &ctx.namespace, &ctx.name).await?;
            let calls = self.hook.calls.load(Ordering::Relaxed);
            // The hook is asked again every 10 s; the step must not move meanwhile.
            tokio::time::sleep(Duration::from_secs(12)).await;
            let still = release_state(&ctx.client, &ctx.namespace, &ctx.name).await?;
            anyhow::ensure!(
                still.status["currentStep"] == held.status["currentStep"]
                    && still.phase.as_deref() == Some("Progressing"),
                "the step moved while the webhook said no: {} → {} ({:?})",
                held.status["currentStep"],
                still.status["currentStep"],
                still.message
            );
            let asked = self.hook.calls.load(Ordering::Relaxed);
            anyhow::ensure!(
                asked > calls,
                "the webhook was not asked again ({asked} calls)"
            );
            eprintln!(
                "held at step {} for 12 s by the webhook ({asked} calls): {:?}",
                still.status["currentStep"], still.message
            );
            self.hook.status.store(200, Ordering::Relaxed);
            Ok(())
        })
    }
    fn wait_released<'a>(
        &'a self,
        ctx: &'a RunContext,
        replicas: i32,
        deadline: Instant,
    ) -> BoxFuture<'a, anyhow::Result<()>> {
        self.sluice.wait_released(ctx, replicas, deadline)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_webhook_that_says_no_holds_the_step() -> anyhow::Result<()> {
    let cluster = sluice_e2e::cluster::TestCluster::get().await?;
    require_node(&cluster.client).await?;
    let spec = RunSpec {
        replicas: 3,
        connections: 45,
        rate: 150.0,
        delay: Duration::from_secs(1),
        steady: Duration::from_secs(4),
        tail: Duration::from_secs(2),
        max_release: Duration::from_secs(180),
        ..Default::default()
    };
    let strategy = HookGated {
        sluice: Sluice::proxy(),
        hook: Hook::start(500).await?,
    };
    let r = scenario::run_one(&cluster.client, &strategy, &spec)
        .await
        .map_err(|e| anyhow::anyhow!("{e:#}"))?;
    eprintln!(
        "webhook-gated release: {} requests, {} failed {:?}, release {:.1} s",
        r.requests, r.failed, r.by_outcome, r.release_s
    );
    assert_eq!(r.failed, 0, "requests failed: {:?}", r.by_outcome);
    assert_eq!(r.new_pods.len(), 3);
    Ok(())
}
