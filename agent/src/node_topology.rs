//! `sluice-agent node-topology`: discover the GPU topology of this node with NVML and
//! write it as the `sluice.dev/gpu-topology` annotation on the Node (the format the
//! placement library reads: `{"groups":[[0,1,2,3],[4,5,6,7]],"numa":[0,0,0,0,1,1,1,1]}`).
//!
//! - The pure part, [`topology_of`], turns what NVML reports (active NVLinks between GPUs,
//!   NVLinks to an NVSwitch, NUMA node per GPU) into GPU groups; it is tested with recorded
//!   topologies of common machines below.
//! - The I/O part (feature `node-topology`, off by default so the in-pod agent does not
//!   carry a Kubernetes client and NVML) loads `libnvidia-ml.so` at run time (the binary runs
//!   without a GPU driver and fails with a clear error only when asked for the topology),
//!   and patches the Node named by `NODE_NAME` with the in-cluster service account.
//!
//! Rules: GPUs joined by NVLink, directly or through NVSwitches, form one group (an
//! NVSwitch board such as HGX H100 is one group of 8; NVLink-bridged PCIe cards form pairs
//! or quads). Without any NVLink, `groups` is left out and the placer groups GPUs by NUMA
//! node.

use serde::{Deserialize, Serialize};
use sluice_placement::GpuTopology;

/// What NVML reports, reduced to what the grouping needs (also the fixture format).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NvmlObservation {
    /// Number of GPUs (NVML indices `0..gpus`).
    pub gpus: u32,
    /// Active NVLinks between two GPUs (each pair once or twice; order free).
    #[serde(default)]
    pub nvlinks: Vec<(u32, u32)>,
    /// GPUs with an active NVLink to an NVSwitch.
    #[serde(default)]
    pub nvswitch: Vec<u32>,
    /// NUMA node of each GPU (`None` where unknown).
    #[serde(default)]
    pub numa: Vec<Option<u32>>,
}

/// NVLink domains (connected components) and NUMA nodes → the annotation.
pub fn topology_of(obs: &NvmlObservation) -> Result<GpuTopology, String> {
    let n = obs.gpus as usize;
    let mut parent: Vec<usize> = (0..n).collect();
    fn find(p: &mut [usize], x: usize) -> usize {
        let mut r = x;
        while p[r] != r {
            r = p[r];
        }
        let mut c = x;
        while p[c] != r {
            let next = p[c];
            p[c] = r;
            c = next;
        }
        r
    }
    let union = |p: &mut Vec<usize>, a: usize, b: usize| {
        let (ra, rb) = (find(p, a), find(p, b));
        if ra != rb {
            p[ra.max(rb)] = ra.min(rb);
        }
    };
    let check = |i: u32| {
        if (i as usize) < n {
            Ok(i as usize)
        } else {
            Err(format!("GPU index {i} out of range ({n} GPUs)"))
        }
    };
    let mut linked = false;
    for &(a, b) in &obs.nvlinks {
        let (a, b) = (check(a)?, check(b)?);
        if a != b {
            union(&mut parent, a, b);
            linked = true;
        }
    }
    let switched: Vec<usize> = obs
        .nvswitch
        .iter()
        .map(|&i| check(i))
        .collect::<Result<_, _>>()?;
    for w in switched.windows(2) {
        union(&mut parent, w[0], w[1]);
    }
    linked |= !switched.is_empty();
    let mut groups: Vec<Vec<u32>> = Vec::new();
    let mut root_group = std::collections::BTreeMap::new();
    for i in 0..n {
        let r = find(&mut parent, i);
        let g = *root_group.entry(r).or_insert_with(|| {
            groups.push(Vec::new());
            groups.len() - 1
        });
        groups[g].push(i as u32);
    }
    let numa = if obs.numa.len() == n && obs.numa.iter().all(Option::is_some) && n > 0 {
        Some(obs.numa.iter().map(|x| x.unwrap_or(0)).collect())
    } else {
        None
    };
    let topo = GpuTopology {
        groups: if linked && n > 0 { Some(groups) } else { None },
        numa,
    };
    topo.group_of(n)?;
    Ok(topo)
}

#[cfg(feature = "node-topology")]
mod io {
    use super::*;
    use anyhow::Context;
    use std::time::Duration;

    /// NVLinks per GPU NVML can report (NVML_NVLINK_MAX_LINKS).
    const MAX_LINKS: u32 = 18;

    /// Read the topology with NVML (loaded at run time).
    pub fn observe() -> anyhow::Result<NvmlObservation> {
        use nvml_wrapper::Nvml;
        let nvml = Nvml::init().context(
            "cannot load NVML (libnvidia-ml.so): is the NVIDIA driver installed and the library mounted into this container?",
        )?;
        let count = nvml.device_count().context("NVML device count")?;
        let mut bus_ids = Vec::new();
        let mut numa = Vec::new();
        for i in 0..count {
            let d = nvml.device_by_index(i)?;
            let pci = d.pci_info()?;
            let bus = pci.bus_id.to_lowercase();
            numa.push(d.numa_node_id().ok().or_else(|| sysfs_numa(&bus)));
            bus_ids.push(bus);
        }
        let norm = |s: &str| s.to_lowercase().trim_start_matches("0000").to_string();
        let mut obs = NvmlObservation {
            gpus: count,
            numa,
            ..Default::default()
        };
        for i in 0..count {
            let d = nvml.device_by_index(i)?;
            for link in 0..MAX_LINKS {
                let l = d.link_wrapper_for(link);
                if !matches!(l.is_active(), Ok(true)) {
                    continue;
                }
                let Ok(remote) = l.remote_pci_info() else {
                    continue;
                };
                let rb = norm(&remote.bus_id);
                match bus_ids.iter().position(|b| norm(b) == rb) {
                    Some(j) => obs.nvlinks.push((i, j as u32)),
                    // An active NVLink to a device that is not a GPU: an NVSwitch.
                    None => {
                        if !obs.nvswitch.contains(&i) {
                            obs.nvswitch.push(i);
                        }
                    }
                }
            }
        }
        Ok(obs)
    }

    fn sysfs_numa(bus_id: &str) -> Option<u32> {
        // NVML bus ids carry an 8-digit domain; sysfs uses 4.
        let short = bus_id.get(4..).unwrap_or(bus_id);
        let s = std::fs::read_to_string(format!("/sys/bus/pci/devices/{short}/numa_node")).ok()?;
        s.trim()
            .parse::<i64>()
            .ok()
            .filter(|n| *n >= 0)
            .map(|n| n as u32)
    }

    #[derive(clap::Parser, Debug)]
    #[command(name = "sluice-agent node-topology")]
    pub struct Args {
        /// Node to annotate (downward API `spec.nodeName`).
        #[arg(long, env = "NODE_NAME")]
        pub node_name: Option<String>,
        /// Print the annotation (and what NVML reported) instead of writing it.
        #[arg(long)]
        pub dry_run: bool,
        /// Check again this often (a DaemonSet keeps running); `0s`: once, then exit.
        #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
        pub interval: Duration,
    }

    pub async fn run(args: Args) -> anyhow::Result<()> {
        loop {
            let obs = observe()?;
            let topo = topology_of(&obs).map_err(anyhow::Error::msg)?;
            let value = topo.to_annotation();
            if args.dry_run {
                println!("{}", serde_json::to_string(&obs)?);
                println!("{}={value}", sluice_placement::GPU_TOPOLOGY_ANNOTATION);
            } else {
                let node = args
                    .node_name
                    .clone()
                    .context("NODE_NAME is not set: pass --node-name or set it from the downward API (spec.nodeName)")?;
                let client = kube::Client::try_default()
                    .await
                    .context("no in-cluster Kubernetes config")?;
                let api: kube::Api<k8s_openapi::api::core::v1::Node> = kube::Api::all(client);
                let patch = serde_json::json!({"metadata": {"annotations": {
                    sluice_placement::GPU_TOPOLOGY_ANNOTATION: value,
                }}});
                api.patch(
                    &node,
                    &kube::api::PatchParams::default(),
                    &kube::api::Patch::Merge(patch),
                )
                .await
                .with_context(|| format!("annotating node {node}"))?;
                tracing::info!(%node, topology = %value, "node annotated");
            }
            if args.interval.is_zero() {
                return Ok(());
            }
            tokio::time::sleep(args.interval).await;
        }
    }
}

/// Entry point of the `node-topology` subcommand (`args` without the subcommand name).
#[cfg(feature = "node-topology")]
pub async fn main(args: Vec<String>) -> anyhow::Result<()> {
    use clap::Parser;
    let args = io::Args::parse_from(std::iter::once("node-topology".to_string()).chain(args));
    io::run(args).await
}

/// Entry point of the `node-topology` subcommand: this build lacks the feature.
#[cfg(not(feature = "node-topology"))]
pub async fn main(_args: Vec<String>) -> anyhow::Result<()> {
    anyhow::bail!(
        "this sluice-agent was built without the node-topology feature: build it with `cargo build -p sluice-agent --features node-topology`"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obs(json: &str) -> NvmlObservation {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn dgx_h100_nvswitch_is_one_group() {
        // DGX H100: 8 GPUs, each with 18 NVLinks to the 4 NVSwitches; 2 NUMA nodes.
        let o = obs(r#"{"gpus":8,"nvswitch":[0,1,2,3,4,5,6,7],"numa":[0,0,0,0,1,1,1,1]}"#);
        let t = topology_of(&o).unwrap();
        assert_eq!(
            t.to_annotation(),
            r#"{"groups":[[0,1,2,3,4,5,6,7]],"numa":[0,0,0,0,1,1,1,1]}"#
        );
    }

    #[test]
    fn pcie_server_with_two_nvlink_quads() {
        // 8 PCIe cards, NVLink bridges fully connecting 0-3 and 4-7 (each pair seen from
        // both ends, several links per pair).
        let mut links = Vec::new();
        for q in [0u32, 4] {
            for a in q..q + 4 {
                for b in q..q + 4 {
                    if a != b {
                        links.push((a, b));
                        links.push((a, b));
                    }
                }
            }
        }
        let o = NvmlObservation {
            gpus: 8,
            nvlinks: links,
            nvswitch: vec![],
            numa: vec![Some(0); 8],
        };
        let t = topology_of(&o).unwrap();
        assert_eq!(t.groups, Some(vec![vec![0, 1, 2, 3], vec![4, 5, 6, 7]]));
        assert_eq!(t.group_of(8).unwrap(), vec![0, 0, 0, 0, 1, 1, 1, 1]);
    }

    #[test]
    fn nvlink_bridge_pairs() {
        let o =
            obs(r#"{"gpus":8,"nvlinks":[[0,1],[1,0],[2,3],[4,5],[7,6]],"numa":[0,0,0,0,1,1,1,1]}"#);
        let t = topology_of(&o).unwrap();
        assert_eq!(
            t.groups,
            Some(vec![vec![0, 1], vec![2, 3], vec![4, 5], vec![6, 7]])
        );
    }

    #[test]
    fn no_nvlink_two_numa_nodes_leaves_grouping_to_numa() {
        // 8 L40S on PCIe, 4 per CPU socket.
        let o = obs(r#"{"gpus":8,"numa":[0,0,0,0,1,1,1,1]}"#);
        let t = topology_of(&o).unwrap();
        assert_eq!(t.to_annotation(), r#"{"numa":[0,0,0,0,1,1,1,1]}"#);
        assert_eq!(t.group_of(8).unwrap(), vec![0, 0, 0, 0, 1, 1, 1, 1]);
    }

    #[test]
    fn unknown_numa_is_left_out_and_bad_indices_rejected() {
        let o = obs(r#"{"gpus":2,"nvlinks":[[0,1]],"numa":[null,0]}"#);
        assert_eq!(
            topology_of(&o).unwrap().to_annotation(),
            r#"{"groups":[[0,1]]}"#
        );
        assert!(topology_of(&obs(r#"{"gpus":2,"nvlinks":[[0,2]]}"#)).is_err());
        assert_eq!(
            topology_of(&obs(r#"{"gpus":0}"#)).unwrap().to_annotation(),
            "{}"
        );
    }

    #[test]
    fn gpus_on_a_switch_and_a_bridge_join_one_group() {
        let o = obs(r#"{"gpus":4,"nvswitch":[0,1],"nvlinks":[[1,2]]}"#);
        assert_eq!(
            topology_of(&o).unwrap().groups,
            Some(vec![vec![0, 1, 2], vec![3]])
        );
    }
}
