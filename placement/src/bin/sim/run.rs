//! One scenario under one policy: arrivals until saturation, then churn; the figures as
//! JSON; and the scale benchmark.

use std::time::Instant;

use serde_json::{Value, json};
use sluice_placement::*;

use crate::workloads::{
    H200, L40S, STOP_PCT, Scenario, capacity_milli, clique_nodes, nvl_mix, pcie_mix, pcie_nodes,
    profile_of, synthetic_arrivals,
};

#[derive(Default)]
pub(crate) struct RunResult {
    pub(crate) curve: Vec<(f64, f64)>,
    pub(crate) placed: u64,
    pub(crate) failed: u64,
    pub(crate) first_failure_alloc_pct: Option<f64>,
    pub(crate) unalloc_at_100: Option<f64>,
    pub(crate) unalloc_end: f64,
    pub(crate) multi_gpu: u64,
    pub(crate) with_required: u64,
    pub(crate) in_required: u64,
    pub(crate) with_preferred: u64,
    pub(crate) in_preferred: u64,
    pub(crate) decision_ns: Vec<u64>,
    pub(crate) pods_decided: u64,
    pub(crate) frag_end_gpus: f64,
    pub(crate) violations: u64,
    pub(crate) churn_rejected_milli: u64,
    pub(crate) churn_arrived_milli: u64,
    pub(crate) churn_unalloc_sum: f64,
    pub(crate) churn_samples: u64,
}

pub(crate) fn run(s: &Scenario, policy: Policy) -> Result<RunResult, String> {
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

pub(crate) fn pct(a: u64, b: u64) -> Value {
    if b == 0 {
        Value::Null
    } else {
        json!(round(100.0 * a as f64 / b as f64))
    }
}

pub(crate) fn round(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

pub(crate) fn result_json(r: &RunResult) -> Value {
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

pub(crate) fn scale_bench(nodes: usize, seed: u64) -> Result<Value, String> {
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
