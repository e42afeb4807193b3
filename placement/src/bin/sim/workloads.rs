//! The workloads: the Alibaba trace's nodes and pods, the synthetic inference fleets and
//! their request mixes, and the arrivals of a scenario.

use std::collections::BTreeMap;
use std::path::Path;

use sluice_placement::*;

pub(crate) const STOP_PCT: f64 = 130.0;

pub(crate) fn read_csv(path: &Path) -> Result<Vec<BTreeMap<String, String>>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut lines = text.lines();
    let header: Vec<String> = lines
        .next()
        .ok_or("empty csv")?
        .split(',')
        .map(|s| s.trim().to_string())
        .collect();
    Ok(lines
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            header
                .iter()
                .cloned()
                .zip(
                    l.split(',')
                        .map(|s| s.trim().to_string())
                        .chain(std::iter::repeat(String::new())),
                )
                .collect()
        })
        .collect())
}

pub(crate) fn num(row: &BTreeMap<String, String>, k: &str) -> u64 {
    row.get(k)
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0) as u64
}

pub(crate) fn trace_nodes(dir: &Path) -> Result<Vec<NodeSpec>, String> {
    let rows = read_csv(&dir.join("openb_node_list_all_node.csv"))?;
    Ok(rows
        .iter()
        .map(|r| {
            let gpus = num(r, "gpu") as u32;
            NodeSpec::new(
                r["sn"].clone(),
                r.get("model").map_or("", String::as_str),
                gpus,
            )
            .resources(num(r, "cpu_milli"), num(r, "memory_mib"))
        })
        .collect())
}

pub(crate) fn trace_pods(dir: &Path, workload: &str) -> Result<Vec<GangRequest>, String> {
    let rows = read_csv(&dir.join(format!("openb_pod_list_{workload}.csv")))?;
    Ok(rows
        .iter()
        .map(|r| {
            let n = num(r, "num_gpu") as u32;
            let milli = num(r, "gpu_milli") as u32;
            let gpu = match n {
                0 => GpuDemand::None,
                1 if milli > 0 && milli < 1000 => GpuDemand::Milli(milli),
                n => GpuDemand::Whole(n),
            };
            let mut req =
                GangRequest::gpus(1, 0).resources(num(r, "cpu_milli"), num(r, "memory_mib"));
            req.gpu = gpu;
            if let Some(spec) = r.get("gpu_spec").filter(|s| !s.is_empty()) {
                req.selector.products = spec.split('|').map(str::to_string).collect();
            }
            req
        })
        .collect())
}

// ---------------------------------------------------------------- synthetic fleets

pub(crate) const L40S: &str = "NVIDIA-L40S";
pub(crate) const H200: &str = "NVIDIA-H200";

pub(crate) fn pcie_nodes(n: usize, prefix: &str) -> Vec<NodeSpec> {
    let topo = GpuTopology {
        groups: Some(vec![vec![0, 1, 2, 3], vec![4, 5, 6, 7]]),
        numa: Some(vec![0, 0, 0, 0, 1, 1, 1, 1]),
    };
    (0..n)
        .map(|i| {
            NodeSpec::new(format!("{prefix}pcie-{i:05}"), L40S, 8)
                .label(LABEL_GPU_MEMORY, "46068")
                .label(LABEL_ZONE, &format!("zone-{}", i * 2 / n.max(1)))
                .label(LABEL_RACK, &format!("{prefix}rack-{}", i / 8))
                .topology(&topo)
                .resources(192_000, 1_048_576)
        })
        .collect()
}

pub(crate) fn clique_nodes(cliques: usize, prefix: &str) -> Vec<NodeSpec> {
    let mut out = Vec::new();
    for c in 0..cliques {
        for i in 0..18 {
            out.push(
                NodeSpec::new(format!("{prefix}nvl-{c:03}-{i:02}"), H200, 8)
                    .label(LABEL_GPU_MEMORY, "143771")
                    .label(LABEL_ZONE, &format!("zone-{}", c * 2 / cliques.max(1)))
                    .label(LABEL_RACK, &format!("{prefix}nvl-rack-{c}"))
                    .label(LABEL_GPU_CLIQUE, &format!("{prefix}clique-{c}"))
                    .resources(192_000, 2_097_152),
            );
        }
    }
    out
}

pub(crate) fn tp(g: u32) -> GangRequest {
    GangRequest::gpus(1, g).resources(8000 * u64::from(g), 65536 * u64::from(g))
}

/// Replica mix of a PCIe fleet (two NVLink groups of 4 per node).
pub(crate) fn pcie_mix(product: Option<&str>) -> Vec<(GangRequest, f64)> {
    let sel = |r: GangRequest| match product {
        Some(p) => r.products([p]),
        None => r,
    };
    vec![
        (sel(tp(1)), 30.0),
        (sel(GangRequest::share(500).resources(4000, 32768)), 10.0),
        (
            sel(tp(2)
                .required(TopologyLevel::Node)
                .preferred(TopologyLevel::GpuGroup)),
            25.0,
        ),
        (sel(tp(4).required(TopologyLevel::GpuGroup)), 25.0),
        (sel(tp(8).required(TopologyLevel::Node)), 10.0),
    ]
}

/// Replica mix of an NVL-clique fleet (fully connected 8-GPU nodes, cliques of 18).
pub(crate) fn nvl_mix(product: Option<&str>) -> Vec<(GangRequest, f64)> {
    let sel = |r: GangRequest| match product {
        Some(p) => r.products([p]),
        None => r,
    };
    let clique = TopologyLevel::label(LABEL_GPU_CLIQUE);
    let multi = |p: u32| GangRequest {
        pods: p,
        ..tp(8).required(clique.clone())
    };
    vec![
        (sel(tp(1)), 20.0),
        (sel(tp(2).required(TopologyLevel::Node)), 15.0),
        (sel(tp(4).required(TopologyLevel::Node)), 15.0),
        (sel(tp(8).required(TopologyLevel::Node)), 15.0),
        (
            sel(GangRequest {
                pods: 2,
                ..tp(4)
                    .required(TopologyLevel::label(LABEL_ZONE))
                    .preferred(clique.clone())
            }),
            5.0,
        ),
        (sel(multi(2)), 15.0),
        (sel(multi(3)), 8.0),
        (sel(multi(4)), 7.0),
    ]
}

pub(crate) fn sample_mix(mix: &[(GangRequest, f64)], rng: &mut Rng) -> GangRequest {
    let total: f64 = mix.iter().map(|m| m.1).sum();
    let mut x = rng.next_f64() * total;
    for (r, w) in mix {
        if x < *w {
            return r.clone();
        }
        x -= w;
    }
    mix[mix.len() - 1].0.clone()
}

// ---------------------------------------------------------------- harness

pub(crate) struct Scenario {
    pub(crate) name: String,
    pub(crate) kind: &'static str,
    pub(crate) config: TopologyConfig,
    pub(crate) nodes: Vec<NodeSpec>,
    pub(crate) arrivals: Vec<GangRequest>,
    pub(crate) profile: WorkloadProfile,
    pub(crate) note: String,
    /// Churn: replica i departs just before arrival `i + lifetimes[i]`.
    pub(crate) lifetimes: Option<Vec<usize>>,
}

pub(crate) fn capacity_milli(nodes: &[NodeSpec]) -> u64 {
    nodes
        .iter()
        .map(|n| u64::from(n.gpus.unwrap_or(0)) * 1000)
        .sum()
}

/// Arrivals until the arrived GPU demand reaches STOP_PCT of capacity: first `base` in
/// order, then ("inflation") requests sampled uniformly with replacement from `base`.
pub(crate) fn inflate(base: &[GangRequest], cap_milli: u64, rng: &mut Rng) -> Vec<GangRequest> {
    let limit = (cap_milli as f64 * STOP_PCT / 100.0) as u64;
    let mut out = Vec::new();
    let mut arrived = 0u64;
    for r in base {
        if arrived >= limit {
            return out;
        }
        arrived += r.total_milli();
        out.push(r.clone());
    }
    while arrived < limit {
        let r = &base[rng.below(base.len())];
        arrived += r.total_milli();
        out.push(r.clone());
    }
    out
}

pub(crate) fn synthetic_arrivals(
    mix: &[(GangRequest, f64)],
    cap_milli: u64,
    rng: &mut Rng,
) -> Vec<GangRequest> {
    let limit = (cap_milli as f64 * STOP_PCT / 100.0) as u64;
    let mut out = Vec::new();
    let mut arrived = 0u64;
    while arrived < limit {
        let r = sample_mix(mix, rng);
        arrived += r.total_milli();
        out.push(r);
    }
    out
}

pub(crate) fn profile_of(mix: &[(GangRequest, f64)]) -> WorkloadProfile {
    let mut p = WorkloadProfile::new();
    for (r, w) in mix {
        p.add(r.clone(), *w);
    }
    p
}
