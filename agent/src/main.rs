use anyhow::Context;
use clap::Parser;
use sluice_agent::config::{Cli, Command};
use tracing_subscriber::EnvFilter;

fn main() -> anyhow::Result<()> {
    // `node-topology` is a node-level DaemonSet mode, outside the in-pod agent's CLI.
    let argv: Vec<String> = std::env::args().collect();
    if argv.get(1).map(String::as_str) == Some("node-topology") {
        tracing_subscriber::fmt().with_writer(std::io::stderr).init();
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
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    rt.block_on(async {
        let agent = match cli.command {
            Command::Proxy(args) => sluice_agent::start_proxy(args).await?,
            Command::Observe(args) => sluice_agent::start_observe(args).await?,
        };
        sluice_agent::run_until_terminated(agent).await?;
        anyhow::Ok(())
    })?;
    Ok(())
}
