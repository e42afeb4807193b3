//! Trace-driven placement simulator and benchmark (`make bench-placement`).
//!
//! Replays the Alibaba GPU trace (openb, as used by the FGD paper) and synthetic inference
//! fleets with every policy in the same harness, and writes `target/bench/placement.json`
//! and `target/bench/placement.svg`.

mod run;
mod svg;
mod workloads;

use std::path::PathBuf;
use std::time::Instant;

use serde_json::json;
use sluice_placement::*;

use crate::run::{result_json, round, run, scale_bench};
use crate::svg::svg;
use crate::workloads::{
    H200, L40S, Scenario, capacity_milli, clique_nodes, inflate, nvl_mix, pcie_mix, pcie_nodes,
    profile_of, synthetic_arrivals, trace_nodes, trace_pods,
};

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
