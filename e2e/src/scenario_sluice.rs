//! The Sluice strategy for the scenario runner: a `Release` takes over the echo Deployment
//! and the release v1 → v2 is started the GitOps way (the Deployment's image is edited);
//! the operator runs as a host process for the run (the operator pod cannot run on the
//! test ground yet).
//!
//! Variants: proxy mode (the Service's named `targetPort` reaches the injected agent),
//! observe mode with a graceful app, a bad v3 (5xx or slow) that the gates roll back, and
//! a release during which the operator is killed with SIGKILL and restarted.
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures::future::BoxFuture;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams};
use kube::{Api, Client, ResourceExt};

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
            max_concurrent: 6,
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
        serde_json::json!({
            "apiVersion": "sluice.dev/v1alpha1",
            "kind": "Release",
            "metadata": {"name": name},
            "spec": {
                "workloadRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
                "replicas": replicas,
                "maxSurge": "100%",
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
                "agent": {"mode": mode, "port": "http"},
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

/// The release's GVK.
pub fn release_resource() -> ApiResource {
    ApiResource::from_gvk(&GroupVersionKind::gvk("sluice.dev", "v1alpha1", "Release"))
}

pub fn releases(client: &Client, ns: &str) -> Api<DynamicObject> {
    Api::namespaced_with(client.clone(), ns, &release_resource())
}

/// Server-side applies the committed CRDs (`crds/sluice.dev.yaml`) and waits until the
/// apiserver serves Releases.
pub async fn apply_crds(client: &Client) -> anyhow::Result<()> {
    let path = crate::cluster::repo_root().join("crds/sluice.dev.yaml");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let mut crds = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let value = serde_yaml::Value::deserialize(doc)?;
        if !value.is_null() {
            crds.push(serde_yaml::from_value::<CustomResourceDefinition>(value)?);
        }
    }
    for crd in crds {
        api.patch(
            &crd.name_any(),
            &PatchParams::apply("sluice-e2e").force(),
            &Patch::Apply(&crd),
        )
        .await
        .with_context(|| format!("applying CRD {}", crd.name_any()))?;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if releases(client, "default")
            .list(&ListParams::default().limit(1))
            .await
            .is_ok()
        {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the apiserver does not serve releases.sluice.dev"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

use serde::Deserialize as _;

/// `sluice-operator run` as a host process, watching one namespace.
pub struct OperatorProcess {
    child: Child,
    pub log: PathBuf,
    kubeconfig: PathBuf,
    namespace: String,
}

impl OperatorProcess {
    pub fn start(kubeconfig: &std::path::Path, namespace: &str) -> anyhow::Result<Self> {
        let logs = crate::cluster::state_dir().join("logs");
        std::fs::create_dir_all(&logs)?;
        let log = logs.join(format!("operator-{namespace}.log"));
        let child = spawn_operator(kubeconfig, namespace, &log)?;
        Ok(OperatorProcess {
            child,
            log,
            kubeconfig: kubeconfig.to_path_buf(),
            namespace: namespace.to_string(),
        })
    }

    /// SIGKILL (no Lease release, no cleanup), then start a new process.
    pub fn kill9_and_restart(&mut self) -> anyhow::Result<()> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = spawn_operator(&self.kubeconfig, &self.namespace, &self.log)?;
        Ok(())
    }

    pub fn stop(&mut self) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for OperatorProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.stop();
        }
    }
}

fn spawn_operator(
    kubeconfig: &std::path::Path,
    namespace: &str,
    log: &std::path::Path,
) -> anyhow::Result<Child> {
    // SLUICE_E2E_OPERATOR_BIN runs another build (e.g. an older one, to check that a test
    // fails without a fix).
    let bin = std::env::var_os("SLUICE_E2E_OPERATOR_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::cluster::repo_root().join("target/debug/sluice-operator"));
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    let port = crate::cluster::free_port()?;
    Command::new(&bin)
        .args([
            "run",
            "--lease-duration",
            "3s",
            "--lease-namespace",
            namespace,
        ])
        .arg("--admin-addr")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .env("SLUICE_AGENT_IMAGE", "sluice/agent:dev")
        .env("SLUICE_WATCH_NAMESPACE", namespace)
        .env(
            "RUST_LOG",
            std::env::var("SLUICE_OPERATOR_LOG").unwrap_or_else(|_| "info".into()),
        )
        .stdout(Stdio::null())
        .stderr(out)
        .spawn()
        .with_context(|| {
            format!(
                "starting {} (cargo build --workspace --bins)",
                bin.display()
            )
        })
}

fn kubeconfig() -> PathBuf {
    std::env::var_os("SLUICE_E2E_KUBECONFIG")
        .map(PathBuf::from)
        .unwrap_or_else(crate::cluster::kubeconfig_path)
}

/// The fields of a Release's status the runner looks at.
#[derive(Clone, Debug, Default)]
pub struct ReleaseState {
    pub phase: Option<String>,
    pub stable: Option<String>,
    pub canary: Option<String>,
    pub aborted: Option<String>,
    pub message: Option<String>,
    pub status: serde_json::Value,
}

pub async fn release_state(client: &Client, ns: &str, name: &str) -> anyhow::Result<ReleaseState> {
    let r = releases(client, ns).get(name).await?;
    let st = r.data.get("status").cloned().unwrap_or_default();
    let s = |k: &str| st.get(k).and_then(|v| v.as_str()).map(str::to_string);
    Ok(ReleaseState {
        phase: s("phase"),
        stable: s("stableRevision"),
        canary: s("canaryRevision"),
        aborted: s("abortedRevision"),
        message: s("message"),
        status: st,
    })
}

/// Pods of the app: (name, revision label, deleting).
async fn app_pods(client: &Client, ns: &str) -> anyhow::Result<Vec<(String, String, bool)>> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    Ok(pods
        .list(&ListParams::default().labels(&format!("app={APP}")))
        .await?
        .items
        .iter()
        .map(|p| {
            (
                p.name_any(),
                p.labels()
                    .get("sluice.dev/revision")
                    .cloned()
                    .unwrap_or_default(),
                p.metadata.deletion_timestamp.is_some(),
            )
        })
        .collect())
}

/// Waits until the Release is `Completed` on `replicas` pods of one revision and no other
/// pod is left (terminating ones included). `from` is the stable revision before the
/// release; with `expect_rollback` the release must instead end `Aborted` with only `from`
/// pods left.
pub async fn wait_settled(
    client: &Client,
    ns: &str,
    name: &str,
    replicas: i32,
    from: Option<&str>,
    expect_rollback: bool,
    deadline: Instant,
) -> anyhow::Result<ReleaseState> {
    loop {
        let st = release_state(client, ns, name).await?;
        let pods = app_pods(client, ns).await?;
        let target = if expect_rollback {
            from.map(str::to_string)
        } else {
            st.stable.clone().filter(|s| Some(s.as_str()) != from)
        };
        let phase_ok = if expect_rollback {
            st.phase.as_deref() == Some("Aborted") && st.canary.is_none()
        } else {
            st.phase.as_deref() == Some("Completed") && st.canary.is_none()
        };
        if phase_ok
            && let Some(t) = &target
            && pods.len() == replicas as usize
            && pods.iter().all(|(_, rev, deleting)| rev == t && !deleting)
        {
            return Ok(st);
        }
        if !expect_rollback && st.phase.as_deref() == Some("Aborted") {
            anyhow::bail!("the release was aborted: {:?}", st.status.get("abort"));
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the release did not settle in time: phase {:?}, message {:?}, pods {pods:?}",
            st.phase,
            st.message
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
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
                Some(OperatorProcess::start(&kubeconfig(), &ctx.namespace)?);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn release_manifest_targets_the_deployment_by_its_named_port() {
        let r = Sluice::proxy().release_manifest("echo", 6, 5.0);
        assert_eq!(r["spec"]["workloadRef"]["name"], "echo");
        assert_eq!(r["spec"]["agent"]["mode"], "proxy");
        assert_eq!(r["spec"]["agent"]["port"], "http");
        assert_eq!(r["spec"]["replicas"], 6);
        let rb = Sluice::rollback(BadVersion::Slow(3)).release_manifest("echo", 6, 5.0);
        assert!(
            rb["spec"]["steps"]
                .as_array()
                .is_some_and(|s| !s.is_empty())
        );
        assert_eq!(
            Sluice::observe().release_manifest("e", 1, 5.0)["spec"]["agent"]["mode"],
            "observe"
        );
        for n in [
            "sluice",
            "sluice-observe",
            "sluice-rollback-5xx",
            "sluice-rollback-slow",
            "sluice-kill9",
        ] {
            assert!(strategy_by_name(n).is_some(), "{n}");
        }
        assert!(strategy_by_name("nope").is_none());
    }
}
