//! One pod's life on the process node, the way the kubelet runs it: network, init containers
//! and native sidecars in order, main containers, probes, restarts with back-off, status
//! written through the status subresource, and termination (preStop, SIGTERM, grace period,
//! SIGKILL; main containers first, sidecars after in reverse order) ending in the deletion.
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{
    Container, ContainerState, ContainerStateRunning, ContainerStateTerminated,
    ContainerStateWaiting, ContainerStatus, HostIP, Pod, PodCondition, PodIP, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, Patch, PatchParams, Preconditions};
use kube::{Api, Client, ResourceExt};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::creds::{self, ClusterAccess, PodCreds};
use super::images::{Images, container_env};
use super::net::NodeNet;
use super::probe::{self, ProbeKind, ProbeResult, ProbeTarget};
use super::runtime::{Proc, spawn_container};

/// What every pod worker of a node shares.
pub struct NodeCtx {
    pub client: Client,
    pub node_name: String,
    pub host_ip: Ipv4Addr,
    pub net: NodeNet,
    pub images: Images,
    pub log_dir: PathBuf,
    pub workdir: PathBuf,
    /// How pods reach the API server (for their service-account kubeconfigs).
    pub cluster: ClusterAccess,
    /// Per-pod directories (`<uid>/`): credentials, process-group records.
    pub pods_dir: PathBuf,
}

/// Where a pod's processes run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PodNet {
    /// `hostNetwork: true`: the node's own network namespace; the pod's IP is the node's.
    Host,
    /// The pod's own namespace.
    Ns(String),
}

impl PodNet {
    fn netns(&self) -> Option<String> {
        match self {
            PodNet::Host => None,
            PodNet::Ns(ns) => Some(ns.clone()),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Init,
    Sidecar,
    Main,
}

#[derive(Clone, Debug, PartialEq)]
enum CState {
    Waiting {
        reason: String,
        message: Option<String>,
    },
    Running {
        started_at: Timestamp,
    },
    Terminated {
        exit_code: i32,
        reason: String,
        started_at: Option<Timestamp>,
        finished_at: Timestamp,
    },
}

impl CState {
    fn to_api(&self) -> ContainerState {
        match self {
            CState::Waiting { reason, message } => ContainerState {
                waiting: Some(ContainerStateWaiting {
                    reason: Some(reason.clone()),
                    message: message.clone(),
                }),
                ..Default::default()
            },
            CState::Running { started_at } => ContainerState {
                running: Some(ContainerStateRunning {
                    started_at: Some(Time(to_ts(*started_at))),
                }),
                ..Default::default()
            },
            CState::Terminated {
                exit_code,
                reason,
                started_at,
                finished_at,
            } => ContainerState {
                terminated: Some(ContainerStateTerminated {
                    exit_code: *exit_code,
                    reason: Some(reason.clone()),
                    started_at: started_at.map(|t| Time(to_ts(t))),
                    finished_at: Some(Time(to_ts(*finished_at))),
                    ..Default::default()
                }),
                ..Default::default()
            },
        }
    }
}

fn to_ts(t: Timestamp) -> Timestamp {
    // Kubernetes times have a resolution of one second.
    Timestamp::from_second(t.as_second()).unwrap_or(Timestamp::UNIX_EPOCH)
}

struct Ctr {
    spec: Container,
    kind: Kind,
    generation: u32,
    proc: Option<Proc>,
    state: CState,
    last_state: Option<CState>,
    restarts: i32,
    launched: bool,
    started: bool,
    ready: bool,
    probes: Vec<JoinHandle<()>>,
    restart_at: Option<Instant>,
    backoff: Duration,
    target: Option<ProbeTarget>,
}

impl Ctr {
    fn new(spec: Container, kind: Kind) -> Self {
        Ctr {
            spec,
            kind,
            generation: 0,
            proc: None,
            state: CState::Waiting {
                reason: "PodInitializing".into(),
                message: None,
            },
            last_state: None,
            restarts: 0,
            launched: false,
            started: false,
            ready: false,
            probes: Vec::new(),
            restart_at: None,
            backoff: BACKOFF_BASE,
            target: None,
        }
    }

    fn running(&self) -> bool {
        self.proc.as_ref().is_some_and(Proc::is_running)
    }

    fn succeeded(&self) -> bool {
        matches!(self.state, CState::Terminated { exit_code: 0, .. })
    }

    fn stop_probes(&mut self) {
        for p in self.probes.drain(..) {
            p.abort();
        }
    }
}

/// Restart back-off: the kubelet's doubling, from 1 s up to 30 s (the kubelet starts at 10 s
/// and caps at 5 min; shorter here so that tests of crash loops stay short).
const BACKOFF_BASE: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

enum Ev {
    Exited {
        idx: usize,
        generation: u32,
        code: i32,
    },
}

/// Whether a pod is Ready: its containers are ready and every readiness gate's condition is
/// True (a missing gate condition counts as False). Pure, so it is unit-tested.
pub fn pod_ready(containers_ready: bool, gates: &[String], conditions: &[PodCondition]) -> bool {
    containers_ready
        && gates.iter().all(|g| {
            conditions
                .iter()
                .any(|c| &c.type_ == g && c.status == "True")
        })
}

/// Whether a container that exited with `code` is restarted.
pub fn should_restart(kind: Kind, pod_policy: &str, code: i32) -> bool {
    match kind {
        Kind::Sidecar => true,
        // Init containers restart on failure unless the pod never restarts anything.
        Kind::Init => code != 0 && pod_policy != "Never",
        Kind::Main => match pod_policy {
            "Never" => false,
            "OnFailure" => code != 0,
            _ => true,
        },
    }
}

/// Sets `cond` in `conds`, keeping its transition time when the status did not change.
fn set_condition(conds: &mut Vec<PodCondition>, type_: &str, ok: bool, reason: Option<&str>) {
    let status = if ok { "True" } else { "False" };
    if let Some(c) = conds.iter_mut().find(|c| c.type_ == type_) {
        if c.status != status {
            c.status = status.into();
            c.last_transition_time = Some(Time(k8s_openapi::jiff::Timestamp::now()));
        }
        c.reason = reason.map(str::to_string);
    } else {
        conds.push(PodCondition {
            type_: type_.into(),
            status: status.into(),
            last_transition_time: Some(Time(k8s_openapi::jiff::Timestamp::now())),
            reason: reason.map(str::to_string),
            ..Default::default()
        });
    }
}

const OWN_CONDITIONS: [&str; 5] = [
    "PodScheduled",
    "PodReadyToStartContainers",
    "Initialized",
    "ContainersReady",
    "Ready",
];

pub struct PodWorker {
    ctx: Arc<NodeCtx>,
    api: Api<Pod>,
    pod: Arc<Pod>,
    uid: String,
    name: String,
    ctrs: Vec<Ctr>,
    net: Option<PodNet>,
    /// The address allocated from the node's CIDR (not for host-network pods).
    pod_ip: Option<Ipv4Addr>,
    creds: Option<PodCreds>,
    /// Credentials are in place (or the pod needs none); containers may start.
    creds_ready: bool,
    creds_retry: Option<Instant>,
    start_time: Option<Time>,
    initialized: bool,
    conditions: Vec<PodCondition>,
    last_written: Option<serde_json::Value>,
    write_retry: Option<Instant>,
    ev_tx: mpsc::UnboundedSender<Ev>,
    ev_rx: mpsc::UnboundedReceiver<Ev>,
    probe_tx: mpsc::UnboundedSender<ProbeResult>,
    probe_rx: mpsc::UnboundedReceiver<ProbeResult>,
    terminating: bool,
    setup_error: Option<String>,
}

impl PodWorker {
    pub fn new(ctx: Arc<NodeCtx>, pod: Arc<Pod>) -> Self {
        let api = Api::namespaced(ctx.client.clone(), &pod.namespace().unwrap_or_default());
        let spec = pod.spec.clone().unwrap_or_default();
        let mut ctrs = Vec::new();
        for c in spec.init_containers.iter().flatten() {
            let kind = if c.restart_policy.as_deref() == Some("Always") {
                Kind::Sidecar
            } else {
                Kind::Init
            };
            ctrs.push(Ctr::new(c.clone(), kind));
        }
        for c in &spec.containers {
            ctrs.push(Ctr::new(c.clone(), Kind::Main));
        }
        let conditions = pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.clone())
            .unwrap_or_default()
            .into_iter()
            .filter(|c| OWN_CONDITIONS.contains(&c.type_.as_str()))
            .collect();
        let (ev_tx, ev_rx) = mpsc::unbounded_channel();
        let (probe_tx, probe_rx) = mpsc::unbounded_channel();
        PodWorker {
            ctx,
            api,
            uid: pod.uid().unwrap_or_default(),
            name: pod.name_any(),
            pod,
            ctrs,
            net: None,
            pod_ip: None,
            creds: None,
            creds_ready: false,
            creds_retry: None,
            start_time: None,
            initialized: false,
            conditions,
            last_written: None,
            write_retry: None,
            ev_tx,
            ev_rx,
            probe_tx,
            probe_rx,
            terminating: false,
            setup_error: None,
        }
    }

    fn policy(&self) -> String {
        self.pod
            .spec
            .as_ref()
            .and_then(|s| s.restart_policy.clone())
            .unwrap_or_else(|| "Always".into())
    }

    fn host_network(&self) -> bool {
        self.pod
            .spec
            .as_ref()
            .and_then(|s| s.host_network)
            .unwrap_or(false)
    }

    fn dir(&self) -> PathBuf {
        creds::pod_dir(&self.ctx.pods_dir, &self.uid)
    }

    /// The pod's address: the node's for host-network pods.
    fn ip(&self) -> Option<Ipv4Addr> {
        match self.net {
            Some(PodNet::Host) => Some(self.ctx.host_ip),
            _ => self.pod_ip,
        }
    }

    /// Requests the pod's service-account token and writes its kubeconfig; on failure the
    /// containers wait (as behind a volume the kubelet cannot mount yet) and it is retried.
    async fn setup_creds(&mut self) {
        match creds::setup(
            &self.ctx.client,
            &self.ctx.cluster,
            &self.ctx.pods_dir,
            &self.pod,
        )
        .await
        {
            Ok(c) => {
                self.creds = c;
                self.creds_ready = true;
                self.creds_retry = None;
            }
            Err(e) => {
                tracing::warn!(pod = %self.key(), "service-account credentials: {e:#}");
                for c in self.ctrs.iter_mut().filter(|c| !c.launched) {
                    c.state = CState::Waiting {
                        reason: "ContainerCreating".into(),
                        message: Some(format!("{e:#}")),
                    };
                }
                self.creds_retry = Some(Instant::now() + Duration::from_secs(2));
            }
        }
    }

    fn key(&self) -> String {
        format!("{}/{}", self.pod.namespace().unwrap_or_default(), self.name)
    }

    /// Runs the pod until it is deleted; `pod_rx` carries its latest version (`None` once it
    /// is gone from the API).
    pub async fn run(mut self, mut pod_rx: watch::Receiver<Option<Arc<Pod>>>) {
        let phase = self
            .pod
            .status
            .as_ref()
            .and_then(|s| s.phase.clone())
            .unwrap_or_default();
        let finished_before = phase == "Succeeded" || phase == "Failed";
        if self.pod.metadata.deletion_timestamp.is_none() && !finished_before {
            self.setup_network().await;
        }
        let mut termination: Option<JoinHandle<()>> = None;
        let mut gone = false;
        loop {
            if !self.terminating
                && self.net.is_some()
                && !self.creds_ready
                && self.creds_retry.is_none_or(|at| at <= Instant::now())
            {
                self.setup_creds().await;
            }
            if !self.terminating && self.net.is_some() && self.creds_ready {
                self.progress();
            }
            if !gone {
                self.write_status().await;
            }
            if self.pod.metadata.deletion_timestamp.is_some() && !self.terminating {
                self.terminating = true;
                termination = Some(self.start_termination(false));
            }
            let next_restart = self
                .ctrs
                .iter()
                .filter_map(|c| c.restart_at)
                .chain(self.write_retry)
                .chain(self.creds_retry.filter(|_| !self.creds_ready))
                .min()
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                changed = pod_rx.changed() => {
                    let latest = if changed.is_ok() { pod_rx.borrow_and_update().clone() } else { None };
                    match latest {
                        Some(p) => self.pod = p,
                        None => {
                            // Gone from the API (force-deleted): stop at once.
                            tracing::info!(pod = %self.key(), "pod removed from the API; killing its containers");
                            gone = true;
                            if let Some(t) = termination.take() { t.abort(); }
                            self.terminating = true;
                            termination = Some(self.start_termination(true));
                        }
                    }
                }
                Some(ev) = self.ev_rx.recv() => self.on_event(ev),
                Some(p) = self.probe_rx.recv() => self.on_probe(p),
                _ = tokio::time::sleep_until(next_restart) => { self.write_retry = None; }
                _ = async { termination.as_mut().expect("guarded").await }, if termination.is_some() => break,
            }
        }
        // Everything has stopped; collect exits the event loop has not seen yet.
        while let Ok(ev) = self.ev_rx.try_recv() {
            self.on_event(ev);
        }
        for c in &mut self.ctrs {
            c.stop_probes();
            c.ready = false;
        }
        if let Some(ip) = self.pod_ip {
            self.ctx.net.teardown_pod(&self.uid).await;
            self.ctx.net.alloc.lock().expect("poisoned").release(ip);
        }
        // A host-network pod has no namespace to empty: its own process groups go instead.
        kill_recorded_groups(&self.dir());
        self.creds = None;
        if let Err(e) = std::fs::remove_dir_all(self.dir())
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(pod = %self.key(), "removing {}: {e}", self.dir().display());
        }
        if !gone {
            self.write_status().await;
            let dp = DeleteParams {
                grace_period_seconds: Some(0),
                preconditions: Some(Preconditions {
                    uid: Some(self.uid.clone()),
                    resource_version: None,
                }),
                ..Default::default()
            };
            match self.api.delete(&self.name, &dp).await {
                Ok(_) => tracing::info!(pod = %self.key(), "pod terminated and deleted"),
                Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {}
                Err(e) => tracing::warn!(pod = %self.key(), "finishing the deletion: {e}"),
            }
        }
    }

    async fn setup_network(&mut self) {
        if self.host_network() {
            // Containers left running by an earlier run of the node go first (the pod's own
            // process groups only: the host's namespace holds everything else too).
            kill_recorded_groups(&self.dir());
            let _ = std::fs::remove_file(self.dir().join("host-process-groups"));
            self.net = Some(PodNet::Host);
            self.start_time = Some(Time(k8s_openapi::jiff::Timestamp::now()));
            return;
        }
        let existing: Option<Ipv4Addr> = self
            .pod
            .status
            .as_ref()
            .and_then(|s| s.pod_ip.as_deref())
            .and_then(|ip| ip.parse().ok());
        let ip = {
            let mut alloc = self.ctx.net.alloc.lock().expect("poisoned");
            match existing {
                Some(ip) if alloc.claim(ip) => Some(ip),
                _ => alloc.allocate(),
            }
        };
        let Some(ip) = ip else {
            self.setup_error = Some("the node's pod CIDR is exhausted".into());
            return;
        };
        self.pod_ip = Some(ip);
        match self.ctx.net.setup_pod(&self.uid, ip).await {
            Ok(ns) => {
                self.net = Some(PodNet::Ns(ns));
                self.start_time = Some(Time(k8s_openapi::jiff::Timestamp::now()));
            }
            Err(e) => {
                tracing::error!(pod = %self.key(), "network setup failed: {e:#}");
                self.setup_error = Some(format!("{e:#}"));
            }
        }
    }

    /// Starts what should run now: init containers one after the other (a sidecar counts as
    /// done once started), then all main containers; restarts what is due.
    fn progress(&mut self) {
        let now = Instant::now();
        let mut init_done = true;
        for i in 0..self.ctrs.len() {
            let kind = self.ctrs[i].kind;
            if kind == Kind::Main {
                break;
            }
            let c = &self.ctrs[i];
            let due = c.restart_at.is_some_and(|at| at <= now);
            if !c.launched || due {
                // A sidecar without a startup probe counts as started at once, so the next
                // init container may start in this same pass.
                self.start(i);
            }
            let c = &self.ctrs[i];
            let done = match kind {
                Kind::Sidecar => c.started || self.initialized,
                _ => c.succeeded() || self.initialized,
            };
            if !done {
                init_done = false;
                break;
            }
        }
        if init_done && !self.initialized {
            self.initialized = true;
        }
        if self.initialized {
            for i in 0..self.ctrs.len() {
                let c = &self.ctrs[i];
                let due = c.restart_at.is_some_and(|at| at <= now);
                if (c.kind == Kind::Main && !c.launched) || due {
                    self.start(i);
                }
            }
        }
    }

    fn start(&mut self, idx: usize) {
        let Some(net) = self.net.clone() else {
            return;
        };
        let netns = net.netns();
        let ip = self.ip();
        let pod_ip = ip.map(|i| i.to_string()).unwrap_or_default();
        let kubeconfig = self
            .creds
            .as_ref()
            .map(|c| c.kubeconfig.display().to_string());
        let dir = self.dir();
        let host_ip = self.ctx.host_ip.to_string();
        let pod = self.pod.clone();
        let ns = pod.namespace().unwrap_or_default();
        let c = &mut self.ctrs[idx];
        if c.launched {
            c.restarts += 1;
            c.last_state = Some(c.state.clone());
        }
        c.launched = true;
        c.restart_at = None;
        c.generation += 1;
        c.started = false;
        c.ready = false;
        c.stop_probes();
        let generation = c.generation;
        let log = self
            .ctx
            .log_dir
            .join(format!("{ns}_{}_{}.log", self.name, c.spec.name));
        let workdir = c
            .spec
            .working_dir
            .as_ref()
            .map(PathBuf::from)
            .unwrap_or_else(|| self.ctx.workdir.clone());
        let prepared = container_env(&pod, &c.spec, &pod_ip, &host_ip).and_then(|mut env| {
            // The service-account credentials, in place of the projected volume.
            if let Some(k) = kubeconfig {
                env.entry("KUBECONFIG".to_string()).or_insert(k);
            }
            let (program, args) = self.ctx.images.argv(&c.spec, &env)?;
            Ok((env, program, args))
        });
        let (env, program, args) = match prepared {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(pod = %format!("{ns}/{}", self.name), container = %c.spec.name, "cannot start: {e:#}");
                c.state = CState::Waiting {
                    reason: "CreateContainerConfigError".into(),
                    message: Some(format!("{e:#}")),
                };
                c.restart_at = Some(Instant::now() + c.backoff);
                c.backoff = (c.backoff * 2).min(BACKOFF_MAX);
                return;
            }
        };
        let tx = self.ev_tx.clone();
        let spawned = spawn_container(
            netns.as_deref(),
            &program,
            &args,
            &env,
            &workdir,
            &log,
            move |code| {
                let _ = tx.send(Ev::Exited {
                    idx,
                    generation,
                    code,
                });
            },
        );
        match spawned {
            Ok(s) => {
                tracing::info!(pod = %format!("{ns}/{}", self.name), container = %c.spec.name, pid = s.proc.pid, program = %program.display(), "started");
                if net == PodNet::Host
                    && let Err(e) = record_group(&dir, s.proc.pid)
                {
                    tracing::warn!(pod = %format!("{ns}/{}", self.name), "recording the process group: {e:#}");
                }
                c.proc = Some(s.proc);
                c.state = CState::Running {
                    started_at: Timestamp::now(),
                };
                let target = ProbeTarget {
                    pod_ip: ip
                        .map(std::net::IpAddr::V4)
                        .unwrap_or(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST)),
                    netns,
                    env,
                    workdir,
                };
                c.target = Some(target.clone());
                if let Some(p) = c.spec.startup_probe.clone() {
                    spawn_probe(c, idx, ProbeKind::Startup, p, &target, &self.probe_tx);
                } else {
                    c.started = true;
                    spawn_steady_probes(c, idx, &target, &self.probe_tx);
                }
            }
            Err(e) => {
                tracing::warn!(pod = %format!("{ns}/{}", self.name), container = %c.spec.name, "start failed: {e:#}");
                c.state = CState::Waiting {
                    reason: "RunContainerError".into(),
                    message: Some(format!("{e:#}")),
                };
                c.restart_at = Some(Instant::now() + c.backoff);
                c.backoff = (c.backoff * 2).min(BACKOFF_MAX);
            }
        }
    }

    fn on_event(&mut self, ev: Ev) {
        let Ev::Exited {
            idx,
            generation,
            code,
        } = ev;
        let policy = self.policy();
        let terminating = self.terminating;
        let key = self.key();
        let c = &mut self.ctrs[idx];
        if c.generation != generation {
            return;
        }
        tracing::info!(pod = %key, container = %c.spec.name, code, "exited");
        let started_at = match &c.state {
            CState::Running { started_at } => Some(*started_at),
            _ => None,
        };
        if started_at.is_some_and(|s| Timestamp::now().duration_since(s).as_secs() > 60) {
            c.backoff = BACKOFF_BASE;
        }
        c.state = CState::Terminated {
            exit_code: code,
            reason: if code == 0 {
                "Completed".into()
            } else {
                "Error".into()
            },
            started_at,
            finished_at: Timestamp::now(),
        };
        c.ready = false;
        c.stop_probes();
        if !terminating && should_restart(c.kind, &policy, code) {
            c.restart_at = Some(Instant::now() + c.backoff);
            c.backoff = (c.backoff * 2).min(BACKOFF_MAX);
        }
    }

    fn on_probe(&mut self, p: ProbeResult) {
        let key = self.key();
        let probe_tx = self.probe_tx.clone();
        let grace = self.grace_period();
        let c = &mut self.ctrs[p.container];
        if c.generation != p.generation || !c.running() {
            return;
        }
        tracing::debug!(pod = %key, container = %c.spec.name, kind = ?p.kind, ok = p.ok, "probe result");
        match (p.kind, p.ok) {
            (ProbeKind::Readiness, ok) => c.ready = ok,
            (ProbeKind::Startup, true) => {
                c.started = true;
                if let Some(t) = c.target.clone() {
                    spawn_steady_probes(c, p.container, &t, &probe_tx);
                }
            }
            (ProbeKind::Startup | ProbeKind::Liveness, false) => {
                tracing::info!(pod = %key, container = %c.spec.name, kind = ?p.kind, "probe failed; restarting the container");
                c.ready = false;
                c.stop_probes();
                if let Some(proc) = c.proc.clone() {
                    tokio::spawn(async move {
                        proc.signal(libc::SIGTERM);
                        if tokio::time::timeout(grace, proc.wait()).await.is_err() {
                            proc.kill_group();
                        }
                    });
                }
            }
            (ProbeKind::Liveness, true) => {}
        }
    }

    fn grace_period(&self) -> Duration {
        let secs = self
            .pod
            .metadata
            .deletion_grace_period_seconds
            .or_else(|| {
                self.pod
                    .spec
                    .as_ref()
                    .and_then(|s| s.termination_grace_period_seconds)
            })
            .unwrap_or(30);
        Duration::from_secs(secs.max(0) as u64)
    }

    /// Stops the pod's containers in the kubelet's order, in a task of its own so that the
    /// worker keeps probing and writing status meanwhile.
    fn start_termination(&mut self, immediate: bool) -> JoinHandle<()> {
        let grace = if immediate {
            Duration::ZERO
        } else {
            self.grace_period()
        };
        tracing::info!(pod = %self.key(), grace_s = grace.as_secs(), "terminating");
        for c in &mut self.ctrs {
            c.restart_at = None;
        }
        let stop = |c: &Ctr| -> Option<Stop> {
            let proc = c.proc.clone().filter(Proc::is_running)?;
            let pre_stop = c
                .spec
                .lifecycle
                .as_ref()
                .and_then(|l| l.pre_stop.as_ref())
                .zip(c.target.as_ref())
                .and_then(|(h, t)| match probe::handler_action(h, &c.spec, t) {
                    Ok(a) => Some((a, t.clone())),
                    Err(e) => {
                        tracing::warn!(container = %c.spec.name, "preStop: {e:#}");
                        None
                    }
                });
            Some(Stop {
                name: c.spec.name.clone(),
                proc,
                pre_stop: if immediate { None } else { pre_stop },
            })
        };
        // Main containers (and init containers still running) together, then sidecars one by
        // one in reverse order of definition.
        let first: Vec<Stop> = self
            .ctrs
            .iter()
            .filter(|c| c.kind != Kind::Sidecar)
            .filter_map(stop)
            .collect();
        let sidecars: Vec<Stop> = self
            .ctrs
            .iter()
            .rev()
            .filter(|c| c.kind == Kind::Sidecar)
            .filter_map(stop)
            .collect();
        let net = self.net.clone();
        let dir = self.dir();
        let key = self.key();
        tokio::spawn(async move {
            let deadline = Instant::now() + grace;
            futures::future::join_all(first.into_iter().map(|s| s.run(deadline))).await;
            for s in sidecars {
                s.run(deadline).await;
            }
            // Anything the containers left behind in the pod's namespace goes too; for a
            // host-network pod, in the process groups its containers were started in (never
            // by namespace: the host's holds everything else).
            if net == Some(PodNet::Host) {
                kill_recorded_groups(&dir);
            }
            if let Some(ns) = net.and_then(|n| n.netns()) {
                let leftover = super::net::netns_pids(&ns);
                if !leftover.is_empty() {
                    tracing::info!(pod = %key, ?leftover, "killing processes left in the pod");
                    for pid in leftover {
                        // SAFETY: kill(2); at worst the process is already gone.
                        unsafe {
                            libc::kill(pid, libc::SIGKILL);
                        }
                    }
                }
            }
        })
    }

    fn build_status(&mut self) -> PodStatus {
        let spec = self.pod.spec.clone().unwrap_or_default();
        let gates: Vec<String> = spec
            .readiness_gates
            .iter()
            .flatten()
            .map(|g| g.condition_type.clone())
            .collect();
        let mains: Vec<&Ctr> = self.ctrs.iter().filter(|c| c.kind == Kind::Main).collect();
        let sidecars_ready = self
            .ctrs
            .iter()
            .filter(|c| c.kind == Kind::Sidecar)
            .all(|c| c.ready && c.started);
        let containers_ready = self.initialized && mains.iter().all(|c| c.ready) && sidecars_ready;
        let all_conditions = self
            .pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.clone())
            .unwrap_or_default();
        let ready = pod_ready(containers_ready, &gates, &all_conditions);
        let policy = self.policy();
        let finished = |c: &&Ctr| {
            matches!(c.state, CState::Terminated { .. }) && c.restart_at.is_none() && !c.running()
        };
        let phase = if self.setup_error.is_some() && self.net.is_none() {
            "Pending"
        } else if !mains.is_empty()
            && mains.iter().all(finished)
            && (self.terminating || policy != "Always")
        {
            if mains.iter().all(|c| c.succeeded()) {
                "Succeeded"
            } else {
                "Failed"
            }
        } else if self.initialized && mains.iter().any(|c| c.launched) {
            "Running"
        } else {
            "Pending"
        };
        let mut conds = std::mem::take(&mut self.conditions);
        set_condition(&mut conds, "PodScheduled", true, None);
        set_condition(
            &mut conds,
            "PodReadyToStartContainers",
            self.net.is_some() && self.creds_ready,
            None,
        );
        set_condition(
            &mut conds,
            "Initialized",
            self.initialized,
            (!self.initialized).then_some("ContainersNotInitialized"),
        );
        set_condition(
            &mut conds,
            "ContainersReady",
            containers_ready,
            (!containers_ready).then_some("ContainersNotReady"),
        );
        let ready_reason = if ready {
            None
        } else if !containers_ready {
            Some("ContainersNotReady")
        } else {
            Some("ReadinessGatesNotReady")
        };
        set_condition(&mut conds, "Ready", ready, ready_reason);
        self.conditions = conds.clone();
        let image = |c: &Ctr| c.spec.image.clone().unwrap_or_default();
        let status_of = |c: &Ctr| ContainerStatus {
            name: c.spec.name.clone(),
            image: image(c),
            image_id: format!("sluice-local://{}", image(c)),
            container_id: c
                .launched
                .then(|| format!("process://{}/{}/{}", self.uid, c.spec.name, c.generation)),
            ready: match c.kind {
                Kind::Init => c.succeeded(),
                _ => c.ready,
            },
            started: Some(c.started && c.running()),
            restart_count: c.restarts,
            state: Some(c.state.to_api()),
            last_state: c.last_state.as_ref().map(CState::to_api),
            ..Default::default()
        };
        let pod_ip = self
            .ip()
            .filter(|_| self.net.is_some() || self.terminating)
            .map(|i| i.to_string());
        PodStatus {
            phase: Some(phase.into()),
            conditions: Some(conds),
            host_ip: Some(self.ctx.host_ip.to_string()),
            host_ips: Some(vec![HostIP {
                ip: self.ctx.host_ip.to_string(),
            }]),
            pod_ip: pod_ip.clone(),
            pod_ips: pod_ip.map(|ip| vec![PodIP { ip }]),
            start_time: self.start_time.clone(),
            message: self.setup_error.clone(),
            container_statuses: Some(
                self.ctrs
                    .iter()
                    .filter(|c| c.kind == Kind::Main)
                    .map(status_of)
                    .collect(),
            ),
            init_container_statuses: Some(
                self.ctrs
                    .iter()
                    .filter(|c| c.kind != Kind::Main)
                    .map(status_of)
                    .collect(),
            ),
            ..Default::default()
        }
    }

    /// Writes the status when it changed (strategic merge: the conditions other writers own,
    /// such as readiness gates, are kept).
    async fn write_status(&mut self) {
        let status = self.build_status();
        let patch = serde_json::json!({ "status": status });
        if self.last_written.as_ref() == Some(&patch) {
            return;
        }
        match self
            .api
            .patch_status(
                &self.name,
                &PatchParams::default(),
                &Patch::Strategic(&patch),
            )
            .await
        {
            Ok(_) => {
                self.last_written = Some(patch);
                self.write_retry = None;
            }
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => {
                tracing::warn!(pod = %self.key(), "writing status: {e}");
                self.write_retry = Some(Instant::now() + Duration::from_secs(1));
            }
        }
    }
}

/// Records a host-network container's process group (its leader's PID and start time) in the
/// pod's directory, so that the node can kill exactly the pod's processes later, even after a
/// restart of the node.
fn record_group(dir: &std::path::Path, pid: i32) -> anyhow::Result<()> {
    use std::io::Write as _;
    std::fs::create_dir_all(dir)?;
    let start = proc_start_time(pid).unwrap_or_default();
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("host-process-groups"))?;
    writeln!(f, "{pid} {start}")?;
    Ok(())
}

/// Field 22 of `/proc/<pid>/stat`: the start time in clock ticks since boot.
fn proc_start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces; it ends at the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// SIGKILL to every process group recorded by [`record_group`] that is still the pod's: a
/// leader that is alive must have the recorded start time (its PID was not reused); a group
/// whose leader is gone keeps its id reserved while any member lives, so it is still ours.
pub fn kill_recorded_groups(dir: &std::path::Path) {
    let Ok(text) = std::fs::read_to_string(dir.join("host-process-groups")) else {
        return;
    };
    for line in text.lines() {
        let mut parts = line.split_whitespace();
        let (Some(Ok(pid)), Some(Ok(start))) = (
            parts.next().map(str::parse::<i32>),
            parts.next().map(str::parse::<u64>),
        ) else {
            continue;
        };
        if pid <= 1 {
            continue;
        }
        if let Some(now) = proc_start_time(pid)
            && now != start
        {
            continue;
        }
        // SAFETY: kill(2) on a process group the pod's container started; at worst it is gone.
        unsafe {
            libc::kill(-pid, libc::SIGKILL);
        }
    }
}

fn spawn_probe(
    c: &mut Ctr,
    idx: usize,
    kind: ProbeKind,
    p: k8s_openapi::api::core::v1::Probe,
    target: &ProbeTarget,
    tx: &mpsc::UnboundedSender<ProbeResult>,
) {
    match probe::probe_action(&p, &c.spec, target) {
        Ok(action) => {
            let task = tokio::spawn(probe::probe_loop(
                kind,
                p,
                action,
                target.clone(),
                idx,
                c.generation,
                tx.clone(),
            ));
            c.probes.push(task);
        }
        Err(e) => tracing::warn!(container = %c.spec.name, "{kind:?} probe ignored: {e:#}"),
    }
}

fn spawn_steady_probes(
    c: &mut Ctr,
    idx: usize,
    target: &ProbeTarget,
    tx: &mpsc::UnboundedSender<ProbeResult>,
) {
    match c.spec.readiness_probe.clone() {
        Some(p) => spawn_probe(c, idx, ProbeKind::Readiness, p, target, tx),
        None => c.ready = true,
    }
    if let Some(p) = c.spec.liveness_probe.clone() {
        spawn_probe(c, idx, ProbeKind::Liveness, p, target, tx);
    }
}

/// Stopping one container: preStop, SIGTERM, wait until the deadline, SIGKILL.
struct Stop {
    name: String,
    proc: Proc,
    pre_stop: Option<(probe::Action, ProbeTarget)>,
}

impl Stop {
    async fn run(self, deadline: Instant) {
        let mut deadline = deadline;
        if let Some((action, target)) = &self.pre_stop {
            let budget = deadline.saturating_duration_since(Instant::now());
            tracing::debug!(container = %self.name, ?action, "running preStop");
            tokio::select! {
                _ = probe::run_action(action, target, budget) => {}
                _ = self.proc.wait() => {}
            }
            // The kubelet grants 2 s more when the hook used up the grace period.
            if Instant::now() >= deadline {
                deadline = Instant::now() + Duration::from_secs(2);
            }
        }
        self.proc.signal(libc::SIGTERM);
        if tokio::time::timeout_at(deadline, self.proc.wait())
            .await
            .is_err()
        {
            tracing::info!(container = %self.name, "grace period over; SIGKILL");
            self.proc.kill_group();
            let _ = tokio::time::timeout(Duration::from_secs(5), self.proc.wait()).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cond(t: &str, s: &str) -> PodCondition {
        PodCondition {
            type_: t.into(),
            status: s.into(),
            ..Default::default()
        }
    }

    #[test]
    fn readiness_gates_hold_ready_back() {
        let gates = vec!["sluice.dev/serving".to_string()];
        assert!(pod_ready(true, &[], &[]));
        assert!(!pod_ready(false, &[], &[]));
        assert!(!pod_ready(true, &gates, &[]));
        assert!(!pod_ready(
            true,
            &gates,
            &[cond("sluice.dev/serving", "False")]
        ));
        assert!(pod_ready(
            true,
            &gates,
            &[cond("sluice.dev/serving", "True")]
        ));
        assert!(!pod_ready(
            false,
            &gates,
            &[cond("sluice.dev/serving", "True")]
        ));
        let two = vec!["a".to_string(), "b".to_string()];
        assert!(!pod_ready(true, &two, &[cond("a", "True")]));
        assert!(pod_ready(
            true,
            &two,
            &[cond("a", "True"), cond("b", "True")]
        ));
    }

    #[test]
    fn restart_rules_follow_kind_and_policy() {
        assert!(should_restart(Kind::Main, "Always", 0));
        assert!(should_restart(Kind::Main, "OnFailure", 1));
        assert!(!should_restart(Kind::Main, "OnFailure", 0));
        assert!(!should_restart(Kind::Main, "Never", 1));
        assert!(should_restart(Kind::Sidecar, "Never", 0));
        assert!(should_restart(Kind::Init, "Always", 1));
        assert!(!should_restart(Kind::Init, "Always", 0));
        assert!(!should_restart(Kind::Init, "Never", 1));
    }

    #[test]
    fn conditions_keep_transition_time_when_unchanged() {
        let mut conds = Vec::new();
        set_condition(&mut conds, "Ready", false, Some("ContainersNotReady"));
        let t0 = conds[0].last_transition_time.clone();
        set_condition(&mut conds, "Ready", false, Some("ContainersNotReady"));
        assert_eq!(conds[0].last_transition_time, t0);
        set_condition(&mut conds, "Ready", true, None);
        assert_eq!(conds.len(), 1);
        assert_eq!(conds[0].status, "True");
        assert_eq!(conds[0].reason, None);
    }
}
