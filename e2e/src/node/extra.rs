//! `sluice-e2e node`: one more real node beside `local-0`, in the foreground, for tests
//! that need pods on several nodes (the InferenceSet rollout over GPU nodes). It joins the
//! running ground (its PKI already holds certificates for `local-1` … `local-8`), and on
//! SIGTERM or SIGINT stops its kubelet and containerd, gives back what it took, and deletes
//! its Node.
//!
//! GPUs: `--gpus N` runs a fake device plugin for the node ([`super::device_plugin`]): the
//! kubelet advertises `nvidia.com/gpu: N` itself and its device manager allocates devices to
//! containers (`NVIDIA_VISIBLE_DEVICES`), as on a GPU node with NVIDIA's plugin; the node
//! gets GPU Feature Discovery's labels. No container sees a device node.
use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context as _;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, DeleteParams};

use super::config::NodePaths;
use super::{HostRecord, NodeCtx, NodeSpec, cleanup_node, device_plugin, start_node};
use crate::cluster::{self, MAX_REAL_NODES, pki::Pki};

#[derive(clap::Args, Debug, Clone)]
pub struct NodeArgs {
    /// `local-<i>`, i in 1..=8 (`local-0` is the ground's own).
    #[arg(long)]
    pub name: String,
    /// Advertise this many `nvidia.com/gpu` and GPU Feature Discovery labels.
    #[arg(long, default_value_t = 0)]
    pub gpus: u32,
    /// Extra node labels, `key=value` (repeatable).
    #[arg(long = "label")]
    pub labels: Vec<String>,
}

/// GPU Feature Discovery's labels for a node of `gpus` H100s (empty without GPUs).
pub fn gpu_labels(name: &str, gpus: u32) -> BTreeMap<String, String> {
    if gpus == 0 {
        return BTreeMap::new();
    }
    [
        ("nvidia.com/gpu.present", "true".to_string()),
        ("nvidia.com/gpu.count", gpus.to_string()),
        (
            "nvidia.com/gpu.product",
            "NVIDIA-H100-80GB-HBM3".to_string(),
        ),
        ("nvidia.com/gpu.memory", "81559".to_string()),
        ("nvidia.com/gpu.family", "hopper".to_string()),
        ("nvidia.com/gpu.machine", "sluice-e2e-node".to_string()),
        ("nvidia.com/gpu.clique", format!("{name}.0")),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// The node's index from its name (`local-3` → 3), within what the PKI covers.
pub fn node_index(name: &str) -> anyhow::Result<u8> {
    let i: u8 = name
        .strip_prefix("local-")
        .and_then(|i| i.parse().ok())
        .with_context(|| format!("node name {name:?}: use local-<i>"))?;
    anyhow::ensure!(
        (1..MAX_REAL_NODES).contains(&i),
        "node {name}: i must be 1..={} (local-0 is the ground's own)",
        MAX_REAL_NODES - 1
    );
    Ok(i)
}

pub async fn run(args: NodeArgs) -> anyhow::Result<()> {
    let index = node_index(&args.name)?;
    let state = cluster::ClusterState::load()?
        .context("no test ground runs here: `make cluster-up` first")?;
    let mut spec = NodeSpec::new(&args.name, index);
    spec.gpus = args.gpus;
    spec.labels = gpu_labels(&args.name, args.gpus).into_iter().collect();
    for l in &args.labels {
        let (k, v) = l
            .split_once('=')
            .with_context(|| format!("label {l:?}: use key=value"))?;
        spec.labels.push((k.to_string(), v.to_string()));
    }
    let dir = cluster::state_dir();
    let bins = cluster::upstream_binaries()?;
    let kubelet = bins.get("kubelet").context("kubelet not built")?.clone();
    let kube_proxy = bins
        .get("kube-proxy")
        .context("kube-proxy not built")?
        .clone();
    // Signals are ours from here on: a stop while the node is still starting (importing
    // images can take a while) must clean up too, not kill this process half-way.
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let client = cluster::client_for(&cluster::kubeconfig_path()).await?;
    let starting = {
        let (spec, state_dir, server) = (spec.clone(), dir.clone(), state.server.clone());
        tokio::task::spawn_blocking(move || {
            let ctx = NodeCtx {
                state_dir: &state_dir,
                repo_root: &cluster::repo_root(),
                logs: &state_dir.join("logs"),
                pki: &Pki::at(&state_dir.join("pki")),
                server: &server,
                kubelet: &kubelet,
                kube_proxy: &kube_proxy,
            };
            start_node(&spec, &ctx, &mut HostRecord::default())
        })
    };
    let result = tokio::select! {
        started = starting => match started? {
            Ok(daemons) => {
                let r = serve(&client, &spec, &mut term, &mut int).await;
                for d in daemons.iter().rev() {
                    d.stop(Duration::from_secs(10));
                }
                r
            }
            Err(e) => Err(e),
        },
        _ = term.recv() => Ok(()),
        _ = int.recv() => Ok(()),
    };
    let mut errors = Vec::new();
    cleanup_node(&dir, &spec.name, &mut errors);
    let _ = Api::<Node>::all(client)
        .delete(&spec.name, &DeleteParams::default())
        .await;
    if !errors.is_empty() {
        eprintln!("node {}: {}", spec.name, errors.join("; "));
    }
    result
}

/// Waits for the node's registration, advertises its GPUs, then runs until told to stop.
async fn serve(
    client: &kube::Client,
    spec: &NodeSpec,
    term: &mut tokio::signal::unix::Signal,
    int: &mut tokio::signal::unix::Signal,
) -> anyhow::Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while nodes.get_opt(&spec.name).await?.is_none() {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "node {} did not register in 60 s (target/e2e/logs/kubelet-{}.log)",
            spec.name,
            spec.name
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let plugin = async {
        if spec.gpus == 0 {
            return std::future::pending().await;
        }
        let dir = NodePaths::new(&cluster::state_dir(), &spec.name).device_plugins();
        device_plugin::serve(dir, spec.name.clone(), spec.gpus).await
    };
    tokio::pin!(plugin);
    // The kubelet advertises the plugin's GPUs itself once it registered.
    let want = spec.gpus.to_string();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    if spec.gpus > 0 {
        loop {
            let node = nodes.get(&spec.name).await?;
            let gpus = node
                .status
                .and_then(|s| s.allocatable)
                .and_then(|a| a.get(device_plugin::GPU_RESOURCE).map(|q| q.0.clone()));
            if gpus.as_deref() == Some(want.as_str()) {
                break;
            }
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "node {}: the kubelet did not advertise {} {} from the device plugin in 60 s (allocatable: {gpus:?}; target/e2e/logs/kubelet-{}.log)",
                spec.name,
                spec.gpus,
                device_plugin::GPU_RESOURCE,
                spec.name
            );
            tokio::select! {
                r = &mut plugin => return r,
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
        }
    }
    eprintln!("node {} runs; SIGTERM or SIGINT stops it", spec.name);
    tokio::select! {
        r = &mut plugin => r,
        _ = term.recv() => Ok(()),
        _ = int.recv() => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extra_nodes_are_local_one_to_eight() {
        assert_eq!(node_index("local-3").unwrap(), 3);
        assert!(node_index("local-0").is_err());
        assert!(node_index("local-9").is_err());
        assert!(node_index("gpu-1").is_err());
    }

    #[test]
    fn gpu_labels_only_with_gpus() {
        assert!(gpu_labels("local-1", 0).is_empty());
        let l = gpu_labels("local-1", 8);
        assert_eq!(l["nvidia.com/gpu.count"], "8");
        assert_eq!(l["nvidia.com/gpu.clique"], "local-1.0");
    }
}
