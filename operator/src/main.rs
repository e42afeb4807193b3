//! `sluice-operator`: the binary edge. `crds` prints the CRDs; `run` runs the controllers.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use sluice_operator::{admin, crds, inference, leader, pod, release, telemetry};
use tokio::sync::watch;

#[derive(Parser)]
#[command(
    name = "sluice-operator",
    version,
    about = "Lossless rolling releases and GPU inference fleets"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once at start: the size of the arguments does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Print the CustomResourceDefinitions as YAML (what `crds/` holds).
    Crds,
    /// Run the controllers (leader-elected).
    Run(RunArgs),
}

#[derive(clap::Args)]
struct RunArgs {
    /// Kubeconfig to use; without it, in-cluster config or $KUBECONFIG.
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<std::path::PathBuf>,
    /// Where /healthz, /readyz and /metrics are served.
    #[arg(long, default_value = "0.0.0.0:8080")]
    admin_addr: SocketAddr,
    /// Namespace of the leader-election Lease (the operator's own namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "sluice-system")]
    lease_namespace: String,
    #[arg(long, default_value = "sluice-operator")]
    lease_name: String,
    /// This replica's identity in the Lease and in the events it publishes (the pod name
    /// in a cluster).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Watch Releases, InferenceSets and their pods in this namespace only (tests run one
    /// operator per namespace side by side); empty or unset: every namespace.
    #[arg(long, env = "SLUICE_WATCH_NAMESPACE")]
    watch_namespace: Option<String>,
    /// How long a Lease stays valid without renewal: a standby takes over once the Lease
    /// has not changed for this long (by the standby's own clock).
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    lease_duration: Duration,
    /// A leader that could not renew its Lease for this long stops its controllers and
    /// exits; below --lease-duration. Default: two thirds of --lease-duration.
    #[arg(long, value_parser = humantime::parse_duration)]
    renew_deadline: Option<Duration>,
    /// How often the leader renews and a standby retries; below --renew-deadline.
    /// Default: 2/15 of --lease-duration (2s for 15s).
    #[arg(long, value_parser = humantime::parse_duration)]
    retry_period: Option<Duration>,
    #[arg(long, value_enum, default_value = "text")]
    log_format: telemetry::LogFormat,
    /// GPU topology levels for InferenceSet placement: node label keys, coarse to fine
    /// (node and the GPU groups inside it are always the finest levels).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "topology.kubernetes.io/zone,sluice.dev/rack,nvidia.com/gpu.clique"
    )]
    topology_levels: Vec<String>,
    /// The agent image injected into the pods of a Release that names none.
    #[arg(long, env = "SLUICE_AGENT_IMAGE", default_value = pod::settings::DEFAULT_AGENT_IMAGE)]
    agent_image: String,
    /// Agent images a Release may name in `spec.agent.image`, besides --agent-image
    /// (comma-separated; an entry ending in `*` allows every image starting with the
    /// rest). Default: only --agent-image. A Release naming another image fails with a
    /// status condition that lists these, and nothing is injected.
    #[arg(long, env = "SLUICE_ALLOWED_AGENT_IMAGES", value_delimiter = ',')]
    allowed_agent_images: Vec<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Crds => {
            print!("{}", crds::all_yaml()?);
            Ok(())
        }
        Command::Run(args) => run(args).await,
    }
}

async fn client(kubeconfig: Option<&std::path::Path>) -> anyhow::Result<kube::Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?
        }
        None => kube::Config::infer()
            .await
            .context("no in-cluster config and no kubeconfig: pass --kubeconfig")?,
    };
    Ok(kube::Client::try_from(config)?)
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    telemetry::init(args.log_format);
    let client = client(args.kubeconfig.as_deref()).await?;
    let mut registry = prometheus_client::registry::Registry::with_prefix("sluice");
    let release_metrics = release::register(&mut registry);
    let undrained_metrics = pod::undrained::register(&mut registry);
    let watch_namespace = args.watch_namespace.clone().filter(|ns| !ns.is_empty());
    let release_config = release::controller::Config {
        watch_namespace: watch_namespace.clone(),
        identity: args.identity.clone(),
        ..release::controller::Config::new(args.agent_image, args.allowed_agent_images)
    };
    let agent_images = release_config.agent_images.clone();
    let undrained = pod::undrained::run(
        client.clone(),
        watch_namespace.clone(),
        args.identity.clone(),
        undrained_metrics,
    );
    let inference = inference::run(
        client.clone(),
        &mut registry,
        inference::Config {
            topology: inference::TopologyConfig {
                levels: args.topology_levels,
            },
            agent_images,
            watch_namespace,
            identity: args.identity.clone(),
            ..inference::Config::new()
        },
    );
    let state = admin::AdminState::new(registry);

    let admin_addr = args.admin_addr;
    let admin_state = state.clone();
    let admin = tokio::spawn(async move { admin::serve(admin_addr, admin_state).await });

    let version = client
        .apiserver_version()
        .await
        .context("cannot reach the Kubernetes API server")?;
    tracing::info!(server = %version.git_version, "connected to the API server");
    state.set_ready(true);

    let identity = match args.identity {
        Some(id) => id,
        None => hostname(),
    };
    let lease_cfg = leader::LeaseConfig {
        namespace: args.lease_namespace,
        name: args.lease_name,
        identity: identity.clone(),
        lease_duration: args.lease_duration,
        renew_deadline: args.renew_deadline.unwrap_or(args.lease_duration * 2 / 3),
        retry_period: args.retry_period.unwrap_or(args.lease_duration * 2 / 15),
    };
    let elector = leader::LeaderElector::new(client.clone(), lease_cfg)?;
    let (leading_tx, mut leading) = watch::channel(false);
    let elector = std::sync::Arc::new(elector);
    let mut election = {
        let elector = elector.clone();
        tokio::spawn(async move { elector.run(leading_tx).await })
    };

    tracing::info!(%identity, "waiting for leadership");
    tokio::select! {
        res = leading.wait_for(|l| *l) => { res.context("leader election stopped")?; }
        res = admin => return admin_exit(res),
        _ = shutdown_signal() => return Ok(()),
    }
    tracing::info!(%identity, "leading: starting controllers");
    let mut controllers = tokio::spawn(async move {
        tokio::select! {
            _ = release::run(client.clone(), release_metrics, release_config) => "Release",
            _ = inference => "InferenceSet",
            _ = undrained => "undrained-pod reporter",
        }
    });

    // Whatever ends the term, the controllers stop before anything else happens: before
    // the process exits on a lost Lease, and before the Lease is released on shutdown.
    let outcome = tokio::select! {
        res = &mut controllers => Err(anyhow::anyhow!(
            "the {} controller stopped unexpectedly",
            res.unwrap_or("(panicked)")
        )),
        _ = leading.wait_for(|l| !*l) => Err(anyhow::anyhow!(
            "lost leadership: exiting so that a fresh start re-joins the election"
        )),
        _ = &mut election => Err(anyhow::anyhow!("leader election stopped")),
        _ = shutdown_signal() => Ok(()),
    };
    // (A JoinHandle must not be awaited again once it returned.)
    if !controllers.is_finished() {
        controllers.abort();
        let _ = controllers.await;
    }
    tracing::info!(%identity, "stopped acting: controllers stopped");
    // No renewal after this point: the Lease is only released (on shutdown) or left to
    // expire.
    if !election.is_finished() {
        election.abort();
        let _ = election.await;
    }
    if outcome.is_ok()
        && let Err(err) = elector.release().await
    {
        tracing::warn!(error = %err, "could not release the Lease on shutdown");
    }
    outcome
}

fn admin_exit(res: Result<std::io::Result<()>, tokio::task::JoinError>) -> anyhow::Result<()> {
    match res {
        Ok(Ok(())) => anyhow::bail!("admin server stopped"),
        Ok(Err(err)) => Err(err).context("admin server failed (is the --admin-addr port in use?)"),
        Err(err) => Err(err).context("admin server panicked"),
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "sluice-operator".to_string())
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler can be installed");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
