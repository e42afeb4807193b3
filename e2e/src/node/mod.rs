//! The process node: a node agent of the test ground's own that runs the pods bound to it as
//! real local processes, each pod in its own network namespace on the node's bridge — the
//! part of a kubelet that traffic tests need (see `docs/testing.md` for what differs).
//!
//! `sluice-e2e node --name local-0 --pod-cidr 10.245.0.0/24` registers the Node (Ready,
//! allocatable resources, heartbeats through a Lease in `kube-node-lease`, InternalIP = the
//! bridge address), watches the pods with `spec.nodeName=<name>` and gives each a
//! [`pod::PodWorker`].
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{
    Node, NodeAddress, NodeCondition, NodeSpec, NodeStatus, NodeSystemInfo, Pod,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, OwnerReference, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub mod creds;
pub mod images;
pub mod net;
pub mod pod;
pub mod probe;
pub mod runtime;

pub use net::cleanup_host_network;

/// `sluice-e2e node`: run a process node.
#[derive(clap::Args, Debug, Clone)]
pub struct NodeArgs {
    #[arg(long, default_value = "target/e2e/kubeconfig")]
    pub kubeconfig: PathBuf,
    /// The Node's name.
    #[arg(long, default_value = "local-0")]
    pub name: String,
    /// The node's pod CIDR, inside 10.245.0.0/16; its first address is the node's.
    #[arg(long, default_value = "10.245.0.0/24")]
    pub pod_cidr: String,
    /// Advertise this many `nvidia.com/gpu` and GPU Feature Discovery labels.
    #[arg(long, default_value_t = 0)]
    pub gpus: u32,
    /// Allocatable CPU (cores).
    #[arg(long, default_value = "16")]
    pub cpu: String,
    /// Allocatable memory.
    #[arg(long, default_value = "64Gi")]
    pub memory: String,
    #[arg(long, default_value_t = 110)]
    pub max_pods: u32,
    /// The image map, relative to the repository root.
    #[arg(long, default_value = "e2e/images.yaml")]
    pub images: PathBuf,
    /// Where container logs go, relative to the repository root.
    #[arg(long, default_value = "target/e2e/logs/pods")]
    pub log_dir: PathBuf,
    /// Per-pod directories (service-account credentials), relative to the repository root.
    #[arg(long, default_value = PODS_DIR)]
    pub pods_dir: PathBuf,
    /// Remove every namespace, veth, bridge and route any process node made (killing the
    /// pods' processes) and exit; for after a crash. `cluster down` does the same.
    #[arg(long)]
    pub cleanup: bool,
}

/// Resolves when the process gets SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("installing a SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// Where process nodes keep per-pod directories, relative to the repository root.
pub const PODS_DIR: &str = "target/e2e/pods";
pub const NODE_LABEL: &str = "sluice.dev/process-node";
const FIELD_MANAGER: &str = "sluice-process-node";
const LEASE_DURATION_S: i32 = 40;
const LEASE_RENEW: Duration = Duration::from_secs(10);
const STATUS_REPORT: Duration = Duration::from_secs(30);

fn node_labels(args: &NodeArgs) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::from([
        ("kubernetes.io/hostname".to_string(), args.name.clone()),
        ("kubernetes.io/os".to_string(), "linux".to_string()),
        ("kubernetes.io/arch".to_string(), "amd64".to_string()),
        (
            "node.kubernetes.io/instance-type".to_string(),
            "sluice-process-node".to_string(),
        ),
        (NODE_LABEL.to_string(), "true".to_string()),
    ]);
    if args.gpus > 0 {
        for (k, v) in [
            ("nvidia.com/gpu.present", "true".to_string()),
            ("nvidia.com/gpu.count", args.gpus.to_string()),
            (
                "nvidia.com/gpu.product",
                "NVIDIA-H100-80GB-HBM3".to_string(),
            ),
            ("nvidia.com/gpu.memory", "81559".to_string()),
            ("nvidia.com/gpu.family", "hopper".to_string()),
            ("nvidia.com/gpu.machine", "sluice-process-node".to_string()),
            ("nvidia.com/gpu.clique", format!("{}.0", args.name)),
        ] {
            labels.insert(k.to_string(), v);
        }
    }
    labels
}

fn node_status(args: &NodeArgs, host_ip: &str, since: &Time) -> NodeStatus {
    let mut resources = BTreeMap::from([
        ("cpu".to_string(), Quantity(args.cpu.clone())),
        ("memory".to_string(), Quantity(args.memory.clone())),
        ("pods".to_string(), Quantity(args.max_pods.to_string())),
        ("ephemeral-storage".to_string(), Quantity("100Gi".into())),
    ]);
    if args.gpus > 0 {
        resources.insert("nvidia.com/gpu".into(), Quantity(args.gpus.to_string()));
    }
    let now = Time(Timestamp::now());
    let cond = |type_: &str, status: &str, reason: &str| NodeCondition {
        type_: type_.into(),
        status: status.into(),
        reason: Some(reason.into()),
        message: Some(format!("sluice process node: {reason}")),
        last_heartbeat_time: Some(now.clone()),
        // The conditions have held since the node process started.
        last_transition_time: Some(since.clone()),
    };
    NodeStatus {
        capacity: Some(resources.clone()),
        allocatable: Some(resources),
        conditions: Some(vec![
            cond("Ready", "True", "KubeletReady"),
            cond("MemoryPressure", "False", "KubeletHasSufficientMemory"),
            cond("DiskPressure", "False", "KubeletHasNoDiskPressure"),
            cond("PIDPressure", "False", "KubeletHasSufficientPID"),
        ]),
        addresses: Some(vec![
            NodeAddress {
                type_: "InternalIP".into(),
                address: host_ip.into(),
            },
            NodeAddress {
                type_: "Hostname".into(),
                address: args.name.clone(),
            },
        ]),
        node_info: Some(NodeSystemInfo {
            architecture: "amd64".into(),
            operating_system: "linux".into(),
            kubelet_version: "v1.34.0-sluice".into(),
            kube_proxy_version: String::new(),
            container_runtime_version: "sluice-process://0.1".into(),
            os_image: "sluice process node".into(),
            kernel_version: String::new(),
            boot_id: String::new(),
            machine_id: String::new(),
            system_uuid: String::new(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Creates or updates the Node; returns its uid.
async fn register(
    client: &Client,
    args: &NodeArgs,
    cidr: &str,
    host_ip: &str,
) -> anyhow::Result<String> {
    let nodes: Api<Node> = Api::all(client.clone());
    let node = Node {
        metadata: ObjectMeta {
            name: Some(args.name.clone()),
            labels: Some(node_labels(args)),
            ..Default::default()
        },
        spec: Some(NodeSpec {
            pod_cidr: Some(cidr.into()),
            pod_cidrs: Some(vec![cidr.into()]),
            ..Default::default()
        }),
        ..Default::default()
    };
    let created = match nodes.create(&PostParams::default(), &node).await {
        Ok(n) => n,
        Err(kube::Error::Api(e)) if e.code == 409 => {
            let patch = serde_json::json!({ "metadata": { "labels": node_labels(args) } });
            nodes
                .patch(&args.name, &PatchParams::default(), &Patch::Merge(&patch))
                .await?
        }
        Err(e) => return Err(e).context("registering the Node"),
    };
    if created.annotations().contains_key("kwok.x-k8s.io/node") {
        anyhow::bail!("Node {} is a KWOK node; pick another --name", args.name);
    }
    report_status(client, args, host_ip).await?;
    Ok(created.uid().unwrap_or_default())
}

async fn report_status(client: &Client, args: &NodeArgs, host_ip: &str) -> anyhow::Result<()> {
    static SINCE: std::sync::OnceLock<Time> = std::sync::OnceLock::new();
    let since = SINCE.get_or_init(|| Time(Timestamp::now()));
    let nodes: Api<Node> = Api::all(client.clone());
    let patch = serde_json::json!({ "status": node_status(args, host_ip, since) });
    nodes
        .patch_status(&args.name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .context("reporting node status")?;
    Ok(())
}

async fn renew_lease(client: &Client, name: &str, node_uid: &str) -> anyhow::Result<()> {
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
    let lease = Lease {
        metadata: ObjectMeta {
            name: Some(name.into()),
            owner_references: Some(vec![OwnerReference {
                api_version: "v1".into(),
                kind: "Node".into(),
                name: name.into(),
                uid: node_uid.into(),
                ..Default::default()
            }]),
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(name.into()),
            lease_duration_seconds: Some(LEASE_DURATION_S),
            renew_time: Some(MicroTime(Timestamp::now())),
            ..Default::default()
        }),
    };
    leases
        .patch(
            name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&lease),
        )
        .await
        .context("renewing the node lease")?;
    Ok(())
}

fn heartbeat(client: Client, args: NodeArgs, host_ip: String, node_uid: String) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut lease_tick = tokio::time::interval(LEASE_RENEW);
        let mut status_tick = tokio::time::interval(STATUS_REPORT);
        loop {
            tokio::select! {
                _ = lease_tick.tick() => {
                    if let Err(e) = renew_lease(&client, &args.name, &node_uid).await {
                        tracing::warn!("{e:#}");
                    }
                }
                _ = status_tick.tick() => {
                    if let Err(e) = report_status(&client, &args, &host_ip).await {
                        tracing::warn!("{e:#}");
                    }
                }
            }
        }
    })
}

struct WorkerHandle {
    tx: watch::Sender<Option<Arc<Pod>>>,
    task: JoinHandle<()>,
}

/// Keeps one worker per pod uid in step with the pods bound to this node.
fn dispatch(
    ctx: &Arc<pod::NodeCtx>,
    store: &Store<Pod>,
    workers: &mut HashMap<String, WorkerHandle>,
    done: &mut HashSet<String>,
) {
    let pods = store.state();
    let present: HashSet<String> = pods.iter().filter_map(|p| p.uid()).collect();
    for p in pods {
        let Some(uid) = p.uid() else { continue };
        if let Some(w) = workers.get(&uid) {
            w.tx.send_if_modified(|cur| {
                let changed =
                    cur.as_ref().map(|c| c.resource_version()) != Some(p.resource_version());
                if changed {
                    *cur = Some(p.clone());
                }
                changed
            });
        } else if !done.contains(&uid) {
            let (tx, rx) = watch::channel(Some(p.clone()));
            let worker = pod::PodWorker::new(ctx.clone(), p.clone());
            let task = tokio::spawn(worker.run(rx));
            workers.insert(uid, WorkerHandle { tx, task });
        }
    }
    workers.retain(|uid, w| {
        if w.task.is_finished() {
            done.insert(uid.clone());
            return false;
        }
        if !present.contains(uid) {
            let _ = w.tx.send(None);
        }
        true
    });
    done.retain(|uid| present.contains(uid));
}

pub async fn run(args: NodeArgs) -> anyhow::Result<()> {
    if args.cleanup {
        return cleanup_host_network();
    }
    let repo = runtime::repo_root();
    let client = crate::cluster::client_for(&args.kubeconfig).await?;
    let cidr: net::Cidr = args
        .pod_cidr
        .parse()
        .with_context(|| format!("--pod-cidr {}", args.pod_cidr))?;
    let host_ip = cidr.gateway();
    let net = net::NodeNet::setup(&args.name, cidr)
        .await
        .context("setting up the node's bridge")?;
    let images = images::Images::load(&repo.join(&args.images), &repo)?;
    let cluster = creds::ClusterAccess::from_kubeconfig(&args.kubeconfig)?;
    let node_uid = register(&client, &args, &cidr.to_string(), &host_ip.to_string()).await?;
    renew_lease(&client, &args.name, &node_uid).await?;
    let _heartbeat = heartbeat(client.clone(), args.clone(), host_ip.to_string(), node_uid);
    tracing::info!(node = %args.name, %cidr, bridge = %net.bridge, "process node registered");
    let ctx = Arc::new(pod::NodeCtx {
        client: client.clone(),
        node_name: args.name.clone(),
        host_ip,
        net,
        images,
        log_dir: repo.join(&args.log_dir),
        workdir: repo.clone(),
        cluster,
        pods_dir: repo.join(&args.pods_dir),
    });
    let pods: Api<Pod> = Api::all(client);
    let (store, writer) = reflector::store();
    let cfg = watcher::Config::default().fields(&format!("spec.nodeName={}", args.name));
    let mut events = reflector::reflector(writer, watcher(pods, cfg))
        .default_backoff()
        .boxed();
    let mut workers: HashMap<String, WorkerHandle> = HashMap::new();
    let mut done = HashSet::new();
    let mut sweep = tokio::time::interval(Duration::from_secs(2));
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            ev = events.next() => match ev {
                Some(Ok(_)) => dispatch(&ctx, &store, &mut workers, &mut done),
                Some(Err(e)) => tracing::warn!("pod watch: {e}"),
                None => anyhow::bail!("pod watch ended"),
            },
            // Also notices workers that finished without a pod event.
            _ = sweep.tick() => dispatch(&ctx, &store, &mut workers, &mut done),
            _ = &mut shutdown => break,
        }
    }
    // Like a kubelet that stops, leave the pods running; `cluster down` (or
    // cleanup_host_network) removes them.
    tracing::info!(node = %args.name, pods = workers.len(), "process node stopping");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(gpus: u32) -> NodeArgs {
        NodeArgs {
            kubeconfig: PathBuf::new(),
            name: "local-1".into(),
            pod_cidr: "10.245.1.0/24".into(),
            gpus,
            cpu: "16".into(),
            memory: "64Gi".into(),
            max_pods: 110,
            images: PathBuf::new(),
            log_dir: PathBuf::new(),
            pods_dir: PathBuf::new(),
            cleanup: false,
        }
    }

    #[test]
    fn node_advertises_gpus_only_when_asked() {
        let plain = node_status(&args(0), "10.245.1.1", &Time(Timestamp::now()));
        assert!(!plain.allocatable.unwrap().contains_key("nvidia.com/gpu"));
        assert!(!node_labels(&args(0)).contains_key("nvidia.com/gpu.product"));
        let gpu = node_status(&args(8), "10.245.1.1", &Time(Timestamp::now()));
        assert_eq!(
            gpu.allocatable.unwrap()["nvidia.com/gpu"],
            Quantity("8".into())
        );
        let labels = node_labels(&args(8));
        assert_eq!(labels["nvidia.com/gpu.count"], "8");
        assert_eq!(labels["kubernetes.io/hostname"], "local-1");
        let addrs = gpu.addresses.unwrap();
        assert!(
            addrs
                .iter()
                .any(|a| a.type_ == "InternalIP" && a.address == "10.245.1.1")
        );
    }
}
