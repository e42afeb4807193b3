//! `sluice-e2e`: the local test ground's command line.
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "sluice-e2e",
    version,
    about = "Sluice's local Kubernetes test ground"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start or stop the local control plane (etcd, kube-apiserver, controller-manager,
    /// scheduler, KWOK), the real node and the service proxy.
    #[command(subcommand)]
    Cluster(sluice_e2e::cluster::ClusterCommand),
    /// Build the container images of `e2e/images.yaml` that changed and import them into
    /// the running nodes' containerd.
    Images,
    /// Run one more real node (local-1 … local-8) in the foreground, beside the ground's.
    Node(sluice_e2e::node::extra::NodeArgs),
    /// Run the service proxy: follows EndpointSlices like kube-proxy, on loopback.
    SvcProxy(sluice_e2e::svc_proxy::SvcProxyArgs),
    /// Run the load generator against a URL and record every request and connection.
    Load(sluice_e2e::load::LoadArgs),
    /// Run a named scenario (baselines, Sluice releases) against the running test ground.
    Scenario(sluice_e2e::scenario::ScenarioArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    sluice_e2e::telemetry::init();
    match Cli::parse().command {
        Command::Cluster(cmd) => sluice_e2e::cluster::run(cmd).await,
        Command::Node(args) => sluice_e2e::node::extra::run(args).await,
        Command::Images => {
            let done = sluice_e2e::node::sync_images(
                &sluice_e2e::cluster::state_dir(),
                &sluice_e2e::cluster::repo_root(),
            )?;
            if done.is_empty() {
                println!("images: every node has the current images");
            }
            for d in done {
                println!("imported {d}");
            }
            Ok(())
        }
        Command::SvcProxy(args) => sluice_e2e::svc_proxy::run(args).await,
        Command::Load(args) => sluice_e2e::load::run(args).await,
        Command::Scenario(args) => sluice_e2e::scenario::run(args).await,
    }
}
