use anyhow::Context;
use clap::Parser;
use sluice_agent::config::{Cli, Command};
use tracing_subscriber::EnvFilter;

fn main() -> anyhow::Result<()> {
    // `node-topology` is a node-level DaemonSet mode, outside the in-pod agent's CLI.
    let argv: Vec<String> = std::env::args().collect();
    if argv.get(1).map(String::as_str) == Some("node-topology") {
        tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            .init();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("cannot start the tokio runtime")?;
        return rt.block_on(sluice_agent::node_topology::main(argv[2..].to_vec()));
    }
    let cli = Cli::parse();
    let filter = EnvFilter::try_new(&cli.log).context("invalid --log filter")?;
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if cli.log_json {
        fmt.json().init();
    } else {
        fmt.init();
    }
    let rt = runtime(&cli.command, cli.workers).context("cannot start the tokio runtime")?;
    rt.block_on(async {
        let agent = match cli.command {
            Command::Proxy(args) => sluice_agent::start_proxy(args).await?,
            Command::Observe(args) => sluice_agent::start_observe(args).await?,
        };
        sluice_agent::run_until_terminated(agent, &cli.termination_log).await?;
        anyhow::Ok(())
    })?;
    Ok(())
}

/// The runtime. A sidecar should stay small: at most 2 threads unless `--workers`
/// (`SLUICE_AGENT_WORKERS`) says otherwise.
///
/// * proxy mode (http and tcp): thread per core. The main runtime is single-threaded
///   (accepts, admin, drain); each client connection is served by one of
///   `workers` threads with a single-threaded runtime each, so a request never wakes
///   another thread. 0 or 1 serve everything on the main thread.
/// * observe mode: a multi-threaded runtime with that many workers (0: single-threaded).
fn runtime(command: &Command, workers: Option<usize>) -> std::io::Result<tokio::runtime::Runtime> {
    let workers = workers.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get().min(2))
            .unwrap_or(1)
    });
    let proxy = matches!(command, Command::Proxy(_));
    if proxy {
        // One worker is no better than the main thread itself.
        sluice_agent::workers::set_worker_threads(if workers > 1 { workers } else { 0 });
    }
    if proxy || workers == 0 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .enable_all()
            .build()
    }
}
