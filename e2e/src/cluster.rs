//! Placeholder: the local control plane (written next).

#[derive(clap::Subcommand, Debug)]
pub enum ClusterCommand {
    Up,
    Down,
}

pub async fn run(_cmd: ClusterCommand) -> anyhow::Result<()> {
    anyhow::bail!("cluster: not built yet")
}
