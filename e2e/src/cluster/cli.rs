//! `sluice-e2e cluster up|down|status`.
use super::ground::{kubeconfig_path, repo_root, state_dir};
use super::state::ClusterState;
use super::up::{UpArgs, down, up};

#[derive(clap::Subcommand, Debug)]
pub enum ClusterCommand {
    /// Start the test ground (does nothing when it already runs).
    Up(UpArgs),
    /// Stop everything `up` started and remove its state (logs are kept).
    Down,
    /// Print whether the test ground runs, and its components.
    Status,
}

pub async fn run(cmd: ClusterCommand) -> anyhow::Result<()> {
    match cmd {
        ClusterCommand::Up(args) => {
            let started = up(&args).await?;
            if !started {
                for d in crate::node::sync_images(&state_dir(), &repo_root())? {
                    println!("imported {d}");
                }
            }
            let kc = kubeconfig_path();
            let what = if started { "is up" } else { "already runs" };
            println!("test ground {what}; kubeconfig: {}", kc.display());
            println!("try: kubectl --kubeconfig {} get nodes", kc.display());
            Ok(())
        }
        ClusterCommand::Down => down(),
        ClusterCommand::Status => {
            match ClusterState::load()? {
                None => println!("not running (no {})", ClusterState::path().display()),
                Some(state) => {
                    println!("server: {}", state.server);
                    for d in &state.daemons {
                        let s = if d.is_running() { "running" } else { "STOPPED" };
                        println!("{:<24} pid {:<8} {s}", d.name, d.pid);
                    }
                }
            }
            Ok(())
        }
    }
}
