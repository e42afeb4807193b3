//! The [`Sluice`] strategy and its variants: the workload it shapes, the Release it
//! creates, the GitOps edit that starts the release, and the wait (with the operator
//! SIGKILLed, in the kill9 variant).
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures::future::BoxFuture;
use k8s_openapi::api::apps::v1::Deployment;
use kube::Api;
use kube::api::{DynamicObject, Patch, PatchParams};

use super::operator::{OperatorProcess, kubeconfig};
use super::release::{ReleaseState, apply_crds, release_state, releases, wait_settled};
use crate::scenario::spec::APP;
use crate::scenario::strategy::{RunContext, Strategy};

/// How the agent sits in the pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Proxy,
    Observe,
}

/// A new version that the gates must roll back.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum BadVersion {
    /// Answers this fraction of requests with 500.
    Errors(f64),
    /// This many times slower than v1.
    Slow(u32),
}

/// v1's added latency in the rollback variants, so that "3× slower" is measurable.
const BASE_LATENCY_MS: u32 = 20;

/// The Sluice strategy. One operator process per run, scoped to the run's namespace.
pub struct Sluice {
    pub mode: Mode,
    pub bad: Option<BadVersion>,
    /// SIGKILL the operator this many times during the release (restarting it each time).
    pub kills: u32,
    /// `spec.drain` and the rest of the Release's spec, as YAML overrides.
    pub close_rate: u32,
    pub max_concurrent: u32,
    pub max_surge: String,
    /// The agent's CPU request; None: the operator's default.
    pub agent_cpu: Option<String>,
    operator: Mutex<Option<OperatorProcess>>,
    /// Kills actually done in the last run.
    pub kills_done: Mutex<u32>,
    /// The run's replica count (from the runner's Deployment) and the stable revision
    /// before the release.
    run: Mutex<(i32, Option<String>)>,
}

impl Sluice {
    pub fn new(mode: Mode) -> Self {
        Sluice {
            mode,
            bad: None,
            kills: 0,
            close_rate: 10,
            // The bench's knobs (e2e/bench-lossless.sh), read once here.
            max_concurrent: std::env::var("SLUICE_E2E_MAX_CONCURRENT")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(6),
            max_surge: std::env::var("SLUICE_E2E_MAX_SURGE").unwrap_or_else(|_| "25%".into()),
            agent_cpu: std::env::var("SLUICE_E2E_AGENT_CPU").ok(),
            operator: Mutex::new(None),
            kills_done: Mutex::new(0),
            run: Mutex::new((1, None)),
        }
    }

    pub fn proxy() -> Self {
        Self::new(Mode::Proxy)
    }

    pub fn observe() -> Self {
        Self::new(Mode::Observe)
    }

    pub fn rollback(bad: BadVersion) -> Self {
        Sluice {
            bad: Some(bad),
            ..Self::proxy()
        }
    }

    pub fn with_kills(kills: u32) -> Self {
        Sluice {
            kills,
            ..Self::proxy()
        }
    }

    /// The Release for the run's Deployment.
    /// `new_pod_capacity`: new connections per second one pod can take (the
    /// connection-rate limit that paces the drains).
    pub fn release_manifest(
        &self,
        name: &str,
        replicas: i32,
        new_pod_capacity: f64,
    ) -> serde_json::Value {
        let steps = if self.bad.is_some() {
            // One canary pod, held while the comparison gate judges it.
            serde_json::json!([{"setWeight": 17}, {"gate": {"duration": "60s"}}])
        } else {
            serde_json::json!([])
        };
        let mode = match self.mode {
            Mode::Proxy => "proxy",
            Mode::Observe => "observe",
        };
        let drain_timeout = match self.mode {
            Mode::Proxy => "90s",
            // Observe mode cannot ask clients to leave: the graceful app closes its
            // keep-alive connections once SIGTERM comes, after the agent's drain, which
            // then ends at its timeout. That timeout must outlast the load balancer's lag.
            Mode::Observe => "30s",
        };
        // The agents' p99 comes from histogram buckets: a 3× slower v3 reads about 2×.
        // The lossless runs keep a looser limit, so that CPU noise on a shared machine
        // never aborts an identical v2.
        let max_latency_ratio = if self.bad.is_some() { 1.5 } else { 2.0 };
        let mut agent = serde_json::json!({"mode": mode, "port": "http"});
        if let Some(cpu) = &self.agent_cpu {
            agent["resources"] = serde_json::json!({"requests": {"cpu": cpu, "memory": "32Mi"}, "limits": {"memory": "128Mi"}});
        }
        serde_json::json!({
            "apiVersion": "sluice.dev/v1alpha1",
            "kind": "Release",
            "metadata": {"name": name},
            "spec": {
                "workloadRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
                "replicas": replicas,
                "maxSurge": self.max_surge,
                "steps": steps,
                "gates": {
                    "health": {"maxRestarts": 1},
                    "connectionRate": {"maxPerPod": new_pod_capacity},
                    "comparison": {
                        "maxErrorRatioDelta": 0.05,
                        "maxLatencyRatio": max_latency_ratio,
                        "minRequests": 50,
                        "interval": "5s",
                        "failureLimit": 2,
                    },
                },
                "drain": {
                    "quietPeriod": "2s",
                    "propagationTimeout": "60s",
                    "closeRate": self.close_rate,
                    "drainTimeout": drain_timeout,
                    "maxConcurrent": self.max_concurrent,
                },
                "agent": agent,
            },
        })
    }

    /// Stops the run's operator process (SIGTERM), if one runs.
    pub fn stop_operator(&self) {
        if let Some(mut op) = self.operator.lock().expect("operator lock").take() {
            op.stop();
        }
    }
}

impl Strategy for Sluice {
    fn name(&self) -> String {
        match (self.mode, self.bad, self.kills) {
            (Mode::Observe, _, _) => "Sluice-observe".into(),
            (_, Some(BadVersion::Errors(_)), _) => "Sluice-rollback-5xx".into(),
            (_, Some(BadVersion::Slow(_)), _) => "Sluice-rollback-slow".into(),
            (_, None, k) if k > 0 => "Sluice-kill9".into(),
            _ => "Sluice".into(),
        }
    }

    fn description(&self) -> String {
        let base = match self.mode {
            Mode::Proxy => format!(
                "Release, proxy mode (agent takes the Service's named port), close rate {}/s, {} drains at once",
                self.close_rate, self.max_concurrent
            ),
            Mode::Observe => "Release, observe mode, graceful app".to_string(),
        };
        match (self.bad, self.kills) {
            (Some(BadVersion::Errors(f)), _) => {
                format!("{base}; v3 answers {:.0}% 5xx: rolled back", f * 100.0)
            }
            (Some(BadVersion::Slow(k)), _) => format!("{base}; v3 {k}× slower: rolled back"),
            (None, k) if k > 0 => format!("{base}; operator SIGKILLed {k}× during the release"),
            _ => base,
        }
    }

    fn shape(&self, d: &mut Deployment) {
        let spec = d.spec.as_mut().expect("the runner builds a spec");
        let replicas = spec.replicas.unwrap_or(1);
        // The Release runs the pods; the Deployment stays the GitOps source of truth at 0.
        spec.replicas = Some(0);
        let c = &mut spec
            .template
            .spec
            .as_mut()
            .expect("the runner builds a pod template")
            .containers[0];
        let on_sigterm = match self.mode {
            // The agent drains before SIGTERM: the app may exit at once (B1's app).
            Mode::Proxy => "exit",
            Mode::Observe => "graceful",
        };
        let args = c.args.get_or_insert_with(Vec::new);
        args.extend(["--on-sigterm".to_string(), on_sigterm.to_string()]);
        if self.bad.is_some() {
            args.extend(["--latency".to_string(), format!("{BASE_LATENCY_MS}ms")]);
        }
        self.run.lock().expect("run lock").0 = replicas;
    }

    fn prepare<'a>(&'a self, ctx: &'a RunContext) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move {
            apply_crds(&ctx.client).await?;
            self.stop_operator();
            *self.operator.lock().expect("operator lock") =
                Some(OperatorProcess::start_with_lease(
                    &kubeconfig(),
                    &ctx.namespace,
                    // A restart after SIGKILL waits for the dead process's Lease to expire.
                    (self.kills > 0).then_some("3s"),
                )?);
            let replicas = self.run.lock().expect("run lock").0;
            self.create_release(ctx, replicas).await
        })
    }

    fn wait_released<'a>(
        &'a self,
        ctx: &'a RunContext,
        replicas: i32,
        deadline: Instant,
    ) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move {
            let from = self.run.lock().expect("run lock").1.clone();
            let st = self.wait(ctx, replicas, from, deadline).await;
            // The Release has done its work: stop the operator and drop the hand-back
            // finalizer, so that deleting the run's namespace needs no operator.
            self.stop_operator();
            let _ = releases(&ctx.client, &ctx.namespace)
                .patch(
                    &ctx.name,
                    &PatchParams::default(),
                    &Patch::Merge(&serde_json::json!({"metadata": {"finalizers": null}})),
                )
                .await;
            st.map(|_| ())
        })
    }

    fn release<'a>(&'a self, ctx: &'a RunContext) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move {
            let before = release_state(&ctx.client, &ctx.namespace, &ctx.name).await?;
            self.run.lock().expect("run lock").1 = before.stable;
            let api: Api<Deployment> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
            let mut patch = serde_json::json!({"name": APP, "image": ctx.new_image});
            match self.bad {
                None => {}
                Some(bad) => {
                    // A v3 with a defect, shipped the GitOps way (image and flags).
                    let d = api.get(&ctx.name).await?;
                    let mut args = d
                        .spec
                        .and_then(|s| s.template.spec)
                        .and_then(|s| s.containers.into_iter().next())
                        .and_then(|c| c.args)
                        .unwrap_or_default();
                    match bad {
                        BadVersion::Errors(f) => {
                            args.extend(["--error-rate".into(), f.to_string()]);
                        }
                        BadVersion::Slow(k) => {
                            // v1's `--latency` flag, k times the value (clap takes a flag once).
                            let slow = format!("{}ms", BASE_LATENCY_MS * k);
                            match args.iter().position(|a| a == "--latency") {
                                Some(i) if i + 1 < args.len() => args[i + 1] = slow,
                                _ => args.extend(["--latency".into(), slow]),
                            }
                        }
                    }
                    patch =
                        serde_json::json!({"name": APP, "image": "sluice/echo:v3", "args": args});
                }
            }
            let body = serde_json::json!({"spec": {"template": {"spec": {"containers": [patch]}}}});
            api.patch(&ctx.name, &PatchParams::default(), &Patch::Strategic(&body))
                .await
                .context("editing the Deployment's template")?;
            Ok(())
        })
    }
}

impl Sluice {
    /// Creates the Release (before the Deployment, so that no takeover is needed) and
    /// waits until it serves `replicas` pods.
    pub async fn create_release(&self, ctx: &RunContext, replicas: i32) -> anyhow::Result<()> {
        let obj: DynamicObject = serde_json::from_value(self.release_manifest(
            &ctx.name,
            replicas,
            ctx.new_pod_capacity,
        ))?;
        releases(&ctx.client, &ctx.namespace)
            .patch(
                &ctx.name,
                &PatchParams::apply("sluice-e2e").force(),
                &Patch::Apply(&obj),
            )
            .await
            .context("creating the Release")?;
        Ok(())
    }

    /// The release's wait, with the operator SIGKILLed `kills` times at random moments.
    pub async fn wait(
        &self,
        ctx: &RunContext,
        replicas: i32,
        from: Option<String>,
        deadline: Instant,
    ) -> anyhow::Result<ReleaseState> {
        let mut done = 0;
        if self.kills > 0 {
            loop {
                let pause = Duration::from_millis(rand::random_range(200..1500));
                tokio::time::sleep(pause).await;
                let st = release_state(&ctx.client, &ctx.namespace, &ctx.name).await?;
                if st.phase.as_deref() == Some("Completed") && st.canary.is_none() {
                    break;
                }
                if let Some(op) = self.operator.lock().expect("operator lock").as_mut() {
                    op.kill9_and_restart()?;
                    done += 1;
                }
                if done >= self.kills {
                    break;
                }
            }
        }
        *self.kills_done.lock().expect("kills lock") = done;
        if self.kills > 0 {
            eprintln!(
                "operator SIGKILLed and restarted {done} time(s) during the release ({})",
                ctx.namespace
            );
        }
        let st = wait_settled(
            &ctx.client,
            &ctx.namespace,
            &ctx.name,
            replicas,
            from.as_deref(),
            self.bad.is_some(),
            deadline,
        )
        .await?;
        if self.bad.is_some() {
            eprintln!("rolled back ({}): {}", ctx.namespace, st.status["abort"]);
        }
        Ok(st)
    }
}

/// Sluice's strategies for `sluice-e2e scenario`.
pub fn strategy_by_name(name: &str) -> Option<std::sync::Arc<dyn Strategy>> {
    let s = match name {
        "sluice" => Sluice::proxy(),
        "sluice-observe" => Sluice::observe(),
        "sluice-rollback-5xx" => Sluice::rollback(BadVersion::Errors(0.2)),
        "sluice-rollback-slow" => Sluice::rollback(BadVersion::Slow(3)),
        "sluice-kill9" => Sluice::with_kills(10),
        _ => return None,
    };
    Some(std::sync::Arc::new(s))
}
