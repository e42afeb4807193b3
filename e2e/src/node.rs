//! Placeholder: arrives with the traffic test ground (issue 4).

#[derive(clap::Args, Debug)]
pub struct NodeArgs {}

pub async fn run(_args: NodeArgs) -> anyhow::Result<()> {
    anyhow::bail!("'node' is not part of this build yet")
}
