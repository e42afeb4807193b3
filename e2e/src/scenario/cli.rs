//! `sluice-e2e scenario NAME`: the strategies by name, the runs at every delay, the report
//! written as JSON and SVG.
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;

use super::baselines::{b1, b2};
use super::report::Report;
use super::run::run_one;
use super::spec::RunSpec;
use super::strategy::Strategy;
use super::svg::render_svg;

/// Strategies known to `sluice-e2e scenario`.
pub fn strategy_by_name(name: &str) -> Option<Arc<dyn Strategy>> {
    match name.to_ascii_lowercase().as_str() {
        "b1" => Some(Arc::new(b1())),
        "b2" => Some(Arc::new(b2())),
        other => crate::scenario_sluice::strategy_by_name(other),
    }
}

/// `sluice-e2e scenario NAME`: run a scenario against the running test ground.
#[derive(clap::Args, Debug)]
pub struct ScenarioArgs {
    /// `b1`, `b2` or `baselines` (both), each at every --delays value.
    pub name: String,
    #[arg(long, default_value = "target/e2e/kubeconfig")]
    pub kubeconfig: PathBuf,
    /// Service-proxy propagation delays to run at (seconds, comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "0,5,20")]
    pub delays: Vec<f64>,
    #[arg(long, default_value_t = 6)]
    pub replicas: i32,
    #[arg(long, default_value_t = 200)]
    pub connections: usize,
    /// Requests per second (open loop).
    #[arg(long, default_value_t = 500.0)]
    pub rate: f64,
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    pub steady: Duration,
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub tail: Duration,
    #[arg(long, default_value = "180s", value_parser = humantime::parse_duration)]
    pub max_release: Duration,
    #[arg(long, default_value = "local-0")]
    pub node: String,
    #[arg(long, default_value = "target/bench/lossless.json")]
    pub out: PathBuf,
    /// Run in namespaces that enforce the `restricted` Pod Security Standard.
    #[arg(long)]
    pub restricted: bool,
    #[arg(long, default_value = "target/bench/lossless.svg")]
    pub svg: PathBuf,
    /// Keep each run's namespace.
    #[arg(long)]
    pub keep: bool,
    /// New connections per second one pod can take (the storm factor's reference, and
    /// the Release's `connectionRate.maxPerPod`).
    #[arg(long, default_value_t = 5.0)]
    pub new_pod_capacity: f64,
}

pub fn strategies_for(name: &str) -> anyhow::Result<Vec<Arc<dyn Strategy>>> {
    match name.to_ascii_lowercase().as_str() {
        "baselines" => Ok(vec![Arc::new(b1()), Arc::new(b2())]),
        "all" => Ok(vec![
            Arc::new(b1()),
            Arc::new(b2()),
            Arc::new(crate::scenario_sluice::Sluice::proxy()),
        ]),
        list if list.contains(',') => list.split(',').map(strategies_for).try_fold(
            Vec::new(),
            |mut all, s| {
                all.extend(s?);
                anyhow::Ok(all)
            },
        ),
        other => strategy_by_name(other)
            .map(|s| vec![s])
            .with_context(|| format!("unknown scenario {name}; known: b1, b2, baselines, sluice, sluice-observe, sluice-rollback-5xx, sluice-rollback-slow, sluice-kill9, all, or a comma-separated list")),
    }
}

pub fn write_report(report: &Report, json: &Path, svg: &Path) -> anyhow::Result<()> {
    for p in [json, svg] {
        if let Some(d) = p.parent() {
            std::fs::create_dir_all(d)?;
        }
    }
    std::fs::write(json, serde_json::to_string_pretty(report)?)?;
    std::fs::write(svg, render_svg(report))?;
    Ok(())
}

pub async fn run(args: ScenarioArgs) -> anyhow::Result<()> {
    let strategies = strategies_for(&args.name)?;
    let client = crate::cluster::client_for(&args.kubeconfig).await?;
    let mut report = Report {
        generated_unix_ms: chrono::Utc::now().timestamp_millis() as u64,
        cpus: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        runs: Vec::new(),
    };
    for strategy in &strategies {
        for delay in &args.delays {
            let spec = RunSpec {
                replicas: args.replicas,
                connections: args.connections,
                rate: args.rate,
                delay: Duration::from_secs_f64(*delay),
                steady: args.steady,
                tail: args.tail,
                max_release: args.max_release,
                node: args.node.clone(),
                keep: args.keep,
                new_pod_capacity: args.new_pod_capacity,
                restricted: args.restricted,
            };
            let result = run_one(&client, strategy.as_ref(), &spec)
                .await
                .with_context(|| format!("{} at {delay} s", strategy.name()))?;
            eprintln!(
                "{} delay {:.0}s: {} failed of {} ({:?}), storm {:.2}, p99 {:.1} → {:.1} ms (worst second {:.1} ms), release {:.1} s, CPU {:?} s, waiting for a core {:?} s",
                result.strategy,
                result.delay_s,
                result.failed,
                result.requests,
                result
                    .by_outcome
                    .iter()
                    .filter(|(o, n)| o.is_failure() && **n > 0)
                    .collect::<Vec<_>>(),
                result.storm.factor,
                result.p99_steady_ms,
                result.p99_release_ms,
                result.tail.worst_second_p99_ms,
                result.release_s,
                result.cpu_s,
                result.cpu_wait_s
            );
            report.runs.push(result);
            write_report(&report, &args.out, &args.svg)?;
        }
    }
    println!("{}", report.table());
    eprintln!("wrote {} and {}", args.out.display(), args.svg.display());
    Ok(())
}
