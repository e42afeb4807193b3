//! `sluice-e2e svc-proxy`: the service proxy daemon.
use std::path::PathBuf;
use std::time::Duration;

use super::proxy::{ProxyConfig, ServiceProxy};

/// `sluice-e2e svc-proxy`: the service proxy daemon.
#[derive(clap::Args, Debug)]
pub struct SvcProxyArgs {
    #[arg(long, default_value = "target/e2e/kubeconfig")]
    pub kubeconfig: PathBuf,
    /// Where to write the address map.
    #[arg(long, default_value = "target/e2e/services.json")]
    pub out: PathBuf,
    /// Apply EndpointSlice changes only after this delay (e.g. `5s`).
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    pub propagation_delay: Duration,
    /// Serve only this namespace.
    #[arg(long)]
    pub namespace: Option<String>,
}

pub async fn run(args: SvcProxyArgs) -> anyhow::Result<()> {
    let client = crate::cluster::client_for(&args.kubeconfig).await?;
    let _proxy = ServiceProxy::start(
        client,
        ProxyConfig {
            propagation_delay: args.propagation_delay,
            namespace: args.namespace,
            salt: String::new(),
            out: Some(args.out.clone()),
        },
    )
    .await?;
    tracing::info!(out = %args.out.display(), delay = ?args.propagation_delay, "service proxy running");
    shutdown_signal().await;
    Ok(())
}

/// Resolves when the process gets SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("installing a SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
