//! Trace-driven placement simulator and benchmark (`make bench-placement`).
//!
//! Replays the Alibaba GPU trace (openb, as used by the FGD paper) and synthetic inference
//! fleets with every policy in the same harness, and writes `target/bench/placement.json`
//! and `target/bench/placement.svg`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::{Value, json};
use sluice_placement::*;

const STOP_PCT: f64 = 130.0;

struct Args {
    trace: PathBuf,
    out: PathBuf,
    seed: u64,
    workloads: Vec<String>,
    scale_nodes: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        trace: PathBuf::from("../shared/data/alibaba-gpu-v2023"),
        out: PathBuf::from("target/bench"),
        seed: 42,
        workloads: vec![
            "default".into(),
            "multigpu50".into(),
            "gpushare40".into(),
            "gpuspec33".into(),
        ],
        scale_nodes: 5000,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().ok_or(format!("{k} needs a value"));
        match k.as_str() {
            "--trace" => a.trace = PathBuf::from(v()?),
            "--out" => a.out = PathBuf::from(v()?),
            "--seed" => a.seed = v()?.parse().map_err(|e| format!("--seed: {e}"))?,
            "--workloads" => a.workloads = v()?.split(',').map(str::to_string).collect(),
            "--scale-nodes" => {
                a.scale_nodes = v()?.parse().map_err(|e| format!("--scale-nodes: {e}"))?
            }
            "-h" | "--help" => {
                println!(
                    "sluice-placement-sim [--trace DIR] [--out DIR] [--seed N] [--workloads default,multigpu50,...] [--scale-nodes N]"
                );
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(a)
}

fn policies(seed: u64) -> Vec<Policy> {
    vec![
        Policy::Random { seed },
        Policy::FirstFit,
        Policy::BestFit,
        Policy::Packing,
        Policy::Fgd,
        Policy::Sluice,
    ]
}

// ---------------------------------------------------------------- trace

fn read_csv(path: &Path) -> Result<Vec<BTreeMap<String, String>>, String> {
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

fn num(row: &BTreeMap<String, String>, k: &str) -> u64 {
    row.get(k)
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0) as u64
}

fn trace_nodes(dir: &Path) -> Result<Vec<NodeSpec>, String> {
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

fn trace_pods(dir: &Path, workload: &str) -> Result<Vec<GangRequest>, String> {
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

const L40S: &str = "NVIDIA-L40S";
const H200: &str = "NVIDIA-H200";

fn pcie_nodes(n: usize, prefix: &str) -> Vec<NodeSpec> {
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

fn clique_nodes(cliques: usize, prefix: &str) -> Vec<NodeSpec> {
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

fn tp(g: u32) -> GangRequest {
    GangRequest::gpus(1, g).resources(8000 * u64::from(g), 65536 * u64::from(g))
}

/// Replica mix of a PCIe fleet (two NVLink groups of 4 per node).
fn pcie_mix(product: Option<&str>) -> Vec<(GangRequest, f64)> {
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
fn nvl_mix(product: Option<&str>) -> Vec<(GangRequest, f64)> {
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

fn sample_mix(mix: &[(GangRequest, f64)], rng: &mut Rng) -> GangRequest {
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

struct Scenario {
    name: String,
    kind: &'static str,
    config: TopologyConfig,
    nodes: Vec<NodeSpec>,
    arrivals: Vec<GangRequest>,
    profile: WorkloadProfile,
    note: String,
    /// Churn: replica i departs just before arrival `i + lifetimes[i]`.
    lifetimes: Option<Vec<usize>>,
}

fn capacity_milli(nodes: &[NodeSpec]) -> u64 {
    nodes
        .iter()
        .map(|n| u64::from(n.gpus.unwrap_or(0)) * 1000)
        .sum()
}

/// Arrivals until the arrived GPU demand reaches STOP_PCT of capacity: first `base` in
/// order, then ("inflation") requests sampled uniformly with replacement from `base`.
fn inflate(base: &[GangRequest], cap_milli: u64, rng: &mut Rng) -> Vec<GangRequest> {
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

fn synthetic_arrivals(
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

fn profile_of(mix: &[(GangRequest, f64)]) -> WorkloadProfile {
    let mut p = WorkloadProfile::new();
    for (r, w) in mix {
        p.add(r.clone(), *w);
    }
    p
}

#[derive(Default)]
struct RunResult {
    curve: Vec<(f64, f64)>,
    placed: u64,
    failed: u64,
    first_failure_alloc_pct: Option<f64>,
    unalloc_at_100: Option<f64>,
    unalloc_end: f64,
    multi_gpu: u64,
    with_required: u64,
    in_required: u64,
    with_preferred: u64,
    in_preferred: u64,
    decision_ns: Vec<u64>,
    pods_decided: u64,
    frag_end_gpus: f64,
    violations: u64,
    churn_rejected_milli: u64,
    churn_arrived_milli: u64,
    churn_unalloc_sum: f64,
    churn_samples: u64,
}

fn run(s: &Scenario, policy: Policy) -> Result<RunResult, String> {
    let mut fleet =
        Fleet::from_nodes(s.config.clone(), s.nodes.iter().cloned()).map_err(|e| e.to_string())?;
    let cap = fleet.total_gpus() as f64 * 1000.0;
    let mut placer = Placer::with_policy(policy, s.profile.clone());
    let mut r = RunResult::default();
    let mut arrived = 0u64;
    let mut next_pt = 0.0f64;
    r.decision_ns.reserve(s.arrivals.len());
    let mut departures: Vec<Vec<usize>> = vec![Vec::new(); s.arrivals.len() + 1];
    let half = s.arrivals.len() / 2;
    for (i, req) in s.arrivals.iter().enumerate() {
        for id in std::mem::take(&mut departures[i]) {
            fleet.release(&id.to_string()).map_err(|e| e.to_string())?;
        }
        arrived += req.total_milli();
        let t0 = Instant::now();
        let res = placer.place(&fleet, req);
        r.decision_ns.push(t0.elapsed().as_nanos() as u64);
        r.pods_decided += u64::from(req.pods);
        match res {
            Ok(p) => {
                // Independent checks: gang size, required domain, GPUs (allocate validates).
                if p.pods.len() != req.pods as usize {
                    r.violations += 1;
                }
                let gpus: usize = p.pods.iter().map(|a| a.gpus.len()).sum();
                if gpus > 1 {
                    r.multi_gpu += 1;
                    if let Some(l) = &req.required {
                        r.with_required += 1;
                        if fleet
                            .within_one_domain(&p.pods, l)
                            .map_err(|e| e.to_string())?
                        {
                            r.in_required += 1;
                        } else {
                            r.violations += 1;
                        }
                    }
                    if let Some(l) = &req.preferred {
                        r.with_preferred += 1;
                        if fleet
                            .within_one_domain(&p.pods, l)
                            .map_err(|e| e.to_string())?
                        {
                            r.in_preferred += 1;
                        }
                    }
                }
                fleet
                    .allocate(&i.to_string(), None, &p.pods)
                    .map_err(|e| format!("{}: invalid placement: {e}", policy.name()))?;
                r.placed += 1;
                if let Some(l) = &s.lifetimes
                    && i + l[i] < departures.len()
                {
                    departures[i + l[i]].push(i);
                }
            }
            Err(_) => {
                if i >= half {
                    r.churn_rejected_milli += req.total_milli();
                }
                if req.total_milli() > 0 {
                    r.failed += 1;
                    if r.first_failure_alloc_pct.is_none() {
                        r.first_failure_alloc_pct =
                            Some(100.0 * fleet.allocated_milli() as f64 / cap);
                    }
                }
            }
        }
        let arrived_pct = 100.0 * arrived as f64 / cap;
        let unalloc = 100.0 * (1.0 - fleet.allocated_milli() as f64 / cap);
        if i >= half {
            r.churn_arrived_milli += req.total_milli();
            r.churn_unalloc_sum += unalloc;
            r.churn_samples += 1;
        }
        if s.lifetimes.is_some() {
            r.unalloc_end = unalloc;
            continue;
        }
        while arrived_pct >= next_pt && next_pt <= STOP_PCT {
            r.curve.push((next_pt, unalloc));
            if (next_pt - 100.0).abs() < 1e-9 {
                r.unalloc_at_100 = Some(unalloc);
            }
            next_pt += 1.0;
        }
        r.unalloc_end = unalloc;
    }
    let mut fgd = Placer::with_policy(Policy::Fgd, s.profile.clone());
    r.frag_end_gpus = fgd.fleet_fragmentation(&fleet);
    Ok(r)
}

fn pct(a: u64, b: u64) -> Value {
    if b == 0 {
        Value::Null
    } else {
        json!(round(100.0 * a as f64 / b as f64))
    }
}

fn round(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn result_json(r: &RunResult) -> Value {
    let total_ns: u64 = r.decision_ns.iter().sum();
    let mut sorted = r.decision_ns.clone();
    sorted.sort_unstable();
    let p99 = sorted.get(sorted.len() * 99 / 100).copied().unwrap_or(0);
    json!({
        "placed": r.placed,
        "failed": r.failed,
        "unallocated_pct_at_100pct_arrived": r.unalloc_at_100.map(round),
        "unallocated_pct_at_saturation": round(r.unalloc_end),
        "allocated_pct_at_first_failure": r.first_failure_alloc_pct.map(round),
        "fragmented_gpus_at_saturation_fgd_measure": round(r.frag_end_gpus),
        "multi_gpu_replicas": r.multi_gpu,
        "in_required_domain_pct": pct(r.in_required, r.with_required),
        "in_preferred_domain_pct": pct(r.in_preferred, r.with_preferred),
        "violations": r.violations,
        "decisions": r.decision_ns.len(),
        "decisions_per_s": round(r.decision_ns.len() as f64 / (total_ns.max(1) as f64 / 1e9)),
        "mean_us_per_pod": round(total_ns as f64 / 1e3 / r.pods_decided.max(1) as f64),
        "p99_us_per_decision": round(p99 as f64 / 1e3),
        "churn_second_half_rejected_gpu_demand_pct": pct(r.churn_rejected_milli, r.churn_arrived_milli),
        "churn_second_half_mean_unallocated_pct": round(r.churn_unalloc_sum / r.churn_samples.max(1) as f64),
        "curve": r.curve.iter().map(|(x, y)| json!([x, round(*y)])).collect::<Vec<_>>(),
    })
}

// ---------------------------------------------------------------- SVG

const COLORS: [&str; 6] = [
    "#999999", "#e69f00", "#56b4e9", "#009e73", "#0072b2", "#d55e00",
];

/// One panel: title and (policy, curve) series.
type Panel = (String, Vec<(String, Vec<(f64, f64)>)>);

fn svg(panels: &[Panel]) -> String {
    let (pw, ph, cols) = (420.0, 300.0, 3usize);
    let rows = panels.len().div_ceil(cols);
    let (w, h) = (pw * cols as f64, ph * rows as f64 + 40.0);
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="10" y="20" font-size="14">Unallocated GPUs (% of capacity) vs arrived workload (% of cluster GPU capacity)</text>"#
    );
    for (pi, (title, series)) in panels.iter().enumerate() {
        let ox = (pi % cols) as f64 * pw;
        let oy = 40.0 + (pi / cols) as f64 * ph;
        let (l, r, t, b) = (ox + 45.0, ox + pw - 15.0, oy + 25.0, oy + ph - 40.0);
        let (x0, x1) = (60.0, STOP_PCT);
        let ymax = series
            .iter()
            .flat_map(|(_, c)| c.iter().filter(|p| p.0 >= x0).map(|p| p.1))
            .fold(10.0f64, f64::max);
        let ymax = (ymax / 10.0).ceil() * 10.0;
        let sx = |x: f64| l + (x - x0) / (x1 - x0) * (r - l);
        let sy = |y: f64| b - y / ymax * (b - t);
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" font-size="12" font-weight="bold">{title}</text>"#,
            l,
            oy + 15.0
        );
        let _ = writeln!(
            s,
            r##"<rect x="{l}" y="{t}" width="{}" height="{}" fill="none" stroke="#333"/>"##,
            r - l,
            b - t
        );
        for k in 0..=7 {
            let x = x0 + k as f64 * 10.0;
            let _ = writeln!(
                s,
                r##"<line x1="{0}" y1="{t}" x2="{0}" y2="{b}" stroke="#eee"/><text x="{0}" y="{1}" text-anchor="middle">{x}</text>"##,
                sx(x),
                b + 14.0
            );
        }
        for k in 0..=5 {
            let y = ymax * k as f64 / 5.0;
            let _ = writeln!(
                s,
                r##"<line x1="{l}" y1="{0}" x2="{r}" y2="{0}" stroke="#eee"/><text x="{1}" y="{2}" text-anchor="end">{y}</text>"##,
                sy(y),
                l - 4.0,
                sy(y) + 4.0
            );
        }
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="middle">arrived %</text>"#,
            (l + r) / 2.0,
            b + 28.0
        );
        // Ideal: max(0, 100 - arrived).
        let _ = writeln!(
            s,
            r##"<polyline fill="none" stroke="#000" stroke-dasharray="3,3" points="{},{} {},{} {},{}"/>"##,
            sx(x0),
            sy((100.0 - x0).min(ymax)),
            sx(100.0),
            sy(0.0),
            sx(x1),
            sy(0.0)
        );
        for (si, (name, c)) in series.iter().enumerate() {
            let pts: Vec<String> = c
                .iter()
                .filter(|p| p.0 >= x0)
                .map(|p| format!("{:.1},{:.1}", sx(p.0), sy(p.1.min(ymax))))
                .collect();
            let col = COLORS[si % COLORS.len()];
            let width = if name == "sluice" { 2.2 } else { 1.3 };
            let _ = writeln!(
                s,
                r#"<polyline fill="none" stroke="{col}" stroke-width="{width}" points="{}"/>"#,
                pts.join(" ")
            );
            let ly = t + 12.0 + si as f64 * 13.0;
            let _ = writeln!(
                s,
                r#"<line x1="{}" y1="{ly}" x2="{}" y2="{ly}" stroke="{col}" stroke-width="2"/><text x="{}" y="{}">{name}</text>"#,
                r - 80.0,
                r - 62.0,
                r - 58.0,
                ly + 4.0
            );
        }
    }
    s.push_str("</svg>\n");
    s
}

// ---------------------------------------------------------------- main

fn scale_bench(nodes: usize, seed: u64) -> Result<Value, String> {
    let pcie = nodes / 2;
    let cliques = (nodes - pcie) / 18;
    let mut specs = pcie_nodes(pcie, "s-");
    specs.extend(clique_nodes(cliques, "s-"));
    let n = specs.len();
    let mut mix = pcie_mix(Some(L40S));
    mix.extend(nvl_mix(Some(H200)));
    let cap = capacity_milli(&specs);
    let mut rng = Rng::new(seed);
    let arrivals = synthetic_arrivals(&mix, cap * 100 / 130, &mut rng);
    let mut out = serde_json::Map::new();
    out.insert("nodes".into(), json!(n));
    out.insert("gpus".into(), json!(cap / 1000));
    out.insert("arrivals".into(), json!(arrivals.len()));
    for policy in [Policy::Fgd, Policy::Sluice] {
        let s = Scenario {
            name: "scale".into(),
            kind: "scale",
            config: TopologyConfig::default(),
            nodes: specs.clone(),
            arrivals: arrivals.clone(),
            profile: profile_of(&mix),
            note: String::new(),
            lifetimes: None,
        };
        let t0 = Instant::now();
        let r = run(&s, policy)?;
        let mut v = result_json(&r);
        if let Some(o) = v.as_object_mut() {
            o.remove("curve");
            o.insert("wall_s".into(), json!(round(t0.elapsed().as_secs_f64())));
        }
        eprintln!("  scale {} {}: {}", s.name, policy.name(), v);
        out.insert(policy.name().into(), v);
    }
    Ok(Value::Object(out))
}

fn main() {
    if let Err(e) = real_main() {
        eprintln!("sluice-placement-sim: {e}");
        std::process::exit(1);
    }
}

fn real_main() -> Result<(), String> {
    let args = parse_args()?;
    let started = Instant::now();
    let mut scenarios = Vec::new();
    let mut rng = Rng::new(args.seed);
    if args.trace.join("openb_node_list_all_node.csv").exists() {
        let nodes = trace_nodes(&args.trace)?;
        let cap = capacity_milli(&nodes);
        for w in &args.workloads {
            let pods = trace_pods(&args.trace, w)?;
            let profile = WorkloadProfile::from_requests(&pods);
            let arrivals = inflate(&pods, cap, &mut Rng::new(args.seed));
            scenarios.push(Scenario {
                name: format!("trace/{w}"),
                kind: "trace",
                config: TopologyConfig::new(Vec::<String>::new()),
                nodes: nodes.clone(),
                note: format!(
                    "{} trace pods in order, then {} sampled with replacement",
                    pods.len().min(arrivals.len()),
                    arrivals.len().saturating_sub(pods.len())
                ),
                arrivals,
                profile,
                lifetimes: None,
            });
        }
    } else {
        eprintln!(
            "warning: no trace at {} (pass --trace DIR); running synthetic fleets only",
            args.trace.display()
        );
    }
    {
        let nodes = pcie_nodes(128, "");
        let mix = pcie_mix(None);
        let arrivals = synthetic_arrivals(&mix, capacity_milli(&nodes), &mut rng);
        scenarios.push(Scenario {
            name: "synthetic/pcie-2x4".into(),
            kind: "synthetic",
            config: TopologyConfig::default(),
            note: "128 nodes x 8 L40S in two NVLink groups of 4; TP1/0.5-share/TP2/TP4/TP8".into(),
            nodes,
            arrivals,
            profile: profile_of(&mix),
            lifetimes: None,
        });
        let nodes = clique_nodes(8, "");
        let mix = nvl_mix(None);
        let arrivals = synthetic_arrivals(&mix, capacity_milli(&nodes), &mut rng);
        scenarios.push(Scenario {
            name: "synthetic/nvl-cliques".into(),
            kind: "synthetic",
            config: TopologyConfig::default(),
            note: "8 NVLink cliques x 18 nodes x 8 H200 (fully connected); TP1-8 + 2-4 node gangs in one clique".into(),
            nodes,
            arrivals,
            profile: profile_of(&mix),
            lifetimes: None,
        });
        let mut nodes = pcie_nodes(64, "");
        nodes.extend(clique_nodes(4, ""));
        let mut mix = pcie_mix(Some(L40S));
        mix.extend(nvl_mix(Some(H200)));
        let arrivals = synthetic_arrivals(&mix, capacity_milli(&nodes), &mut rng);
        scenarios.push(Scenario {
            name: "synthetic/mixed".into(),
            kind: "synthetic",
            config: TopologyConfig::default(),
            note: "64 PCIe L40S nodes + 4 H200 cliques; product selectors".into(),
            nodes,
            arrivals,
            profile: profile_of(&mix),
            lifetimes: None,
        });
    }

    // Churn: the same fleets with departures. Each replica lives for a number of later
    // arrivals drawn uniformly from [F/2, 3F/2], F = replicas that fill the fleet once;
    // 4x the capacity arrives in total. Lifetimes are fixed per arrival index, the same for
    // every policy.
    let churn: Vec<Scenario> = scenarios
        .iter()
        .filter(|s| s.kind == "synthetic")
        .map(|s| {
            let cap = capacity_milli(&s.nodes);
            let mean: f64 = s
                .arrivals
                .iter()
                .map(|r| r.total_milli() as f64)
                .sum::<f64>()
                / s.arrivals.len() as f64;
            let fill = (cap as f64 / mean).max(2.0) as usize;
            let mut rng = Rng::new(args.seed ^ 0xC0FFEE);
            let mut arrivals = Vec::new();
            let mut lifetimes = Vec::new();
            for k in 0..fill * 4 {
                arrivals.push(s.arrivals[k % s.arrivals.len()].clone());
                lifetimes.push(fill / 2 + rng.below(fill));
            }
            Scenario {
                name: format!("{}+churn", s.name),
                kind: "synthetic-churn",
                config: s.config.clone(),
                nodes: s.nodes.clone(),
                note: format!(
                    "{}; departures, lifetime U[{}, {}] arrivals",
                    s.note,
                    fill / 2,
                    fill / 2 + fill
                ),
                arrivals,
                profile: s.profile.clone(),
                lifetimes: Some(lifetimes),
            }
        })
        .collect();
    scenarios.extend(churn);
    let mut results = serde_json::Map::new();
    let mut panels = Vec::new();
    for s in &scenarios {
        let mut per = serde_json::Map::new();
        let mut series = Vec::new();
        let cap: u64 = capacity_milli(&s.nodes) / 1000;
        eprintln!(
            "{}: {} nodes, {} GPUs, {} arrivals",
            s.name,
            s.nodes.len(),
            cap,
            s.arrivals.len()
        );
        for policy in policies(args.seed) {
            let t0 = Instant::now();
            let r = run(s, policy)?;
            let v = result_json(&r);
            eprintln!(
                "  {:<10} unalloc@100%={:>6} unalloc@sat={:>6} first-fail-alloc={:>6} churn-rej={} churn-unalloc={} req={} pref={} dec/s={} ({:.1}s)",
                policy.name(),
                v["unallocated_pct_at_100pct_arrived"],
                v["unallocated_pct_at_saturation"],
                v["allocated_pct_at_first_failure"],
                v["churn_second_half_rejected_gpu_demand_pct"],
                v["churn_second_half_mean_unallocated_pct"],
                v["in_required_domain_pct"],
                v["in_preferred_domain_pct"],
                v["decisions_per_s"],
                t0.elapsed().as_secs_f64()
            );
            if s.lifetimes.is_none() {
                series.push((policy.name().to_string(), r.curve.clone()));
            }
            per.insert(policy.name().into(), v);
        }
        if !series.is_empty() {
            panels.push((s.name.clone(), series));
        }
        results.insert(
            s.name.clone(),
            json!({
                "kind": s.kind,
                "nodes": s.nodes.len(),
                "gpus": cap,
                "arrivals": s.arrivals.len(),
                "note": s.note,
                "policies": per,
            }),
        );
    }
    eprintln!("scale: {} nodes", args.scale_nodes);
    let scale = scale_bench(args.scale_nodes, args.seed)?;
    let out = json!({
        "bench": "placement",
        "method": {
            "arrivals": "trace: pods in trace order, then inflation: pods sampled uniformly with replacement from the same trace (seeded) until the arrived GPU demand reaches 130% of cluster GPU capacity; synthetic: replicas sampled from the mix until 130%. No departures. A request that cannot be placed is dropped (not retried).",
            "unallocated": "100 * (1 - allocated milli-GPU / capacity) after each arrival, sampled at each 1% of arrived GPU demand",
            "saturation": "at 130% arrived",
            "seed": args.seed,
            "fragmentation_measure": "FGD's F(M) summed over nodes, relative to the scenario's workload, in GPUs",
        },
        "scenarios": results,
        "scale": scale,
        "wall_s": round(started.elapsed().as_secs_f64()),
    });
    std::fs::create_dir_all(&args.out).map_err(|e| e.to_string())?;
    let jp = args.out.join("placement.json");
    std::fs::write(
        &jp,
        serde_json::to_string_pretty(&out).map_err(|e| e.to_string())?,
    )
    .map_err(|e| e.to_string())?;
    let sp = args.out.join("placement.svg");
    std::fs::write(&sp, svg(&panels)).map_err(|e| e.to_string())?;
    eprintln!(
        "wrote {} and {} in {:.0}s",
        jp.display(),
        sp.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
