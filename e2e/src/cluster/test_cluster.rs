//! The test ground as a library for Rust integration tests: reuse the running cluster (or
//! the one named by `SLUICE_E2E_KUBECONFIG`), or start one; a namespace per test; KWOK
//! nodes, GPU nodes included.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Context;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Namespace, Node, NodeSpec, NodeStatus, Taint};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::api::{Api, DeleteParams, ObjectMeta, PostParams};

use super::ground::KWOK_NODE_ANNOTATION;

/// A running control plane and an admin client for it.
#[derive(Clone)]
pub struct TestCluster {
    pub client: kube::Client,
    pub kubeconfig: PathBuf,
}

impl TestCluster {
    /// The cluster named by `SLUICE_E2E_KUBECONFIG`, else the repo's running test ground,
    /// else a freshly started one (left running for the next test; `make cluster-down`
    /// stops it).
    pub async fn get() -> anyhow::Result<Self> {
        let kubeconfig = match std::env::var_os("SLUICE_E2E_KUBECONFIG") {
            Some(path) => PathBuf::from(path),
            None => {
                super::up::up(&Default::default()).await?;
                super::ground::kubeconfig_path()
            }
        };
        let client = super::client::client_for(&kubeconfig).await?;
        Ok(Self { client, kubeconfig })
    }

    /// A fresh namespace `<prefix>-<random>`, deleted when the returned guard drops.
    pub async fn namespace(&self, prefix: &str) -> anyhow::Result<TestNamespace> {
        let name = format!("{prefix}-{:08x}", rand::random::<u32>());
        let ns = Namespace {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                labels: Some(BTreeMap::from([("sluice.dev/e2e".into(), "true".into())])),
                ..Default::default()
            },
            ..Default::default()
        };
        Api::<Namespace>::all(self.client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .with_context(|| format!("creating namespace {name}"))?;
        Ok(TestNamespace {
            name,
            kubeconfig: self.kubeconfig.clone(),
        })
    }

    /// Creates `count` KWOK nodes named `<prefix>-<i>` (16 requests in flight at a time).
    pub async fn create_kwok_nodes(
        &self,
        prefix: &str,
        count: usize,
        gpu: Option<&GpuNodeProfile>,
    ) -> anyhow::Result<Vec<String>> {
        let api = Api::<Node>::all(self.client.clone());
        let names: Vec<String> = (0..count).map(|i| format!("{prefix}-{i}")).collect();
        futures::stream::iter(names.iter().enumerate().map(|(i, name)| {
            let api = api.clone();
            let node = kwok_node(name, i, gpu);
            async move {
                match api.create(&PostParams::default(), &node).await {
                    Ok(_) => Ok(()),
                    Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
                    Err(e) => Err(anyhow::Error::from(e).context(format!(
                        "creating node {}",
                        node.metadata.name.as_deref().unwrap_or("")
                    ))),
                }
            }
        }))
        .buffer_unordered(16)
        .try_collect::<()>()
        .await?;
        Ok(names)
    }

    /// Deletes nodes (for example those [`create_kwok_nodes`](Self::create_kwok_nodes) made).
    pub async fn delete_nodes(&self, names: &[String]) -> anyhow::Result<()> {
        let api = Api::<Node>::all(self.client.clone());
        futures::stream::iter(names.iter().map(|name| {
            let api = api.clone();
            async move {
                match api.delete(name, &DeleteParams::default()).await {
                    Ok(_) => Ok(()),
                    Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
                    Err(e) => Err(anyhow::Error::from(e)),
                }
            }
        }))
        .buffer_unordered(16)
        .try_collect::<()>()
        .await
    }
}

/// A test's namespace; deleted (in the background, without waiting) when dropped.
pub struct TestNamespace {
    pub name: String,
    kubeconfig: PathBuf,
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        if std::env::var_os("SLUICE_E2E_KEEP").is_some() {
            eprintln!("keeping namespace {} (SLUICE_E2E_KEEP)", self.name);
            return;
        }
        // Drop cannot await, and the test's runtime may be shutting down: use a thread
        // with its own runtime and wait for the delete call (not for the namespace to go).
        let name = self.name.clone();
        let kubeconfig = self.kubeconfig.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            rt.block_on(async {
                let client = super::client::client_for(&kubeconfig).await.ok()?;
                Api::<Namespace>::all(client)
                    .delete(&name, &DeleteParams::background())
                    .await
                    .ok()
            })
        })
        .join();
    }
}

/// GPU capacity and the labels NVIDIA GPU Feature Discovery writes.
#[derive(Clone, Debug)]
pub struct GpuNodeProfile {
    pub product: String,
    pub gpus: u32,
    /// Per-GPU memory in MiB (`nvidia.com/gpu.memory`).
    pub memory_mib: u32,
    /// Nodes per NVLink clique (`nvidia.com/gpu.clique`); `None` for no clique label.
    pub clique_size: Option<usize>,
    /// Nodes per rack (`sluice.dev/rack`), and racks per zone (`topology.kubernetes.io/zone`).
    pub rack_size: usize,
    pub racks_per_zone: usize,
    /// Optional `sluice.dev/gpu-topology` annotation value (NVLink groups inside a node).
    pub gpu_topology: Option<String>,
}

impl Default for GpuNodeProfile {
    fn default() -> Self {
        Self {
            product: "NVIDIA-H100-80GB-HBM3".into(),
            gpus: 8,
            memory_mib: 81559,
            clique_size: None,
            rack_size: 16,
            racks_per_zone: 4,
            gpu_topology: None,
        }
    }
}

fn kwok_node(name: &str, index: usize, gpu: Option<&GpuNodeProfile>) -> Node {
    let mut labels = BTreeMap::from([
        ("type".to_string(), "kwok".to_string()),
        ("kubernetes.io/hostname".to_string(), name.to_string()),
        ("kubernetes.io/os".to_string(), "linux".to_string()),
        ("kubernetes.io/arch".to_string(), "amd64".to_string()),
    ]);
    let mut annotations = BTreeMap::from([(
        KWOK_NODE_ANNOTATION.0.to_string(),
        KWOK_NODE_ANNOTATION.1.to_string(),
    )]);
    let mut capacity = BTreeMap::from([
        ("cpu".to_string(), Quantity("64".into())),
        ("memory".to_string(), Quantity("512Gi".into())),
        ("pods".to_string(), Quantity("110".into())),
    ]);
    if let Some(g) = gpu {
        let rack = index / g.rack_size.max(1);
        let zone = rack / g.racks_per_zone.max(1);
        labels.extend([
            ("nvidia.com/gpu.present".to_string(), "true".to_string()),
            ("nvidia.com/gpu.product".to_string(), g.product.clone()),
            ("nvidia.com/gpu.count".to_string(), g.gpus.to_string()),
            (
                "nvidia.com/gpu.memory".to_string(),
                g.memory_mib.to_string(),
            ),
            ("nvidia.com/mig.strategy".to_string(), "none".to_string()),
            (
                "topology.kubernetes.io/zone".to_string(),
                format!("zone-{zone}"),
            ),
            ("sluice.dev/rack".to_string(), format!("rack-{rack}")),
        ]);
        if let Some(size) = g.clique_size {
            labels.insert(
                "nvidia.com/gpu.clique".to_string(),
                format!("clique-{}", index / size.max(1)),
            );
        }
        if let Some(topo) = &g.gpu_topology {
            annotations.insert("sluice.dev/gpu-topology".to_string(), topo.clone());
        }
        capacity.insert("nvidia.com/gpu".to_string(), Quantity(g.gpus.to_string()));
    }
    Node {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            labels: Some(labels),
            annotations: Some(annotations),
            ..Default::default()
        },
        spec: Some(NodeSpec {
            taints: Some(vec![Taint {
                key: KWOK_NODE_ANNOTATION.0.to_string(),
                value: Some(KWOK_NODE_ANNOTATION.1.to_string()),
                effect: "NoSchedule".to_string(),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        status: Some(NodeStatus {
            allocatable: Some(capacity.clone()),
            capacity: Some(capacity),
            ..Default::default()
        }),
    }
}
