//! Placeholder: arrives with the traffic test ground (issue 4).

#[derive(clap::Args, Debug)]
pub struct LoadArgs {}

pub async fn run(_args: LoadArgs) -> anyhow::Result<()> {
    anyhow::bail!("'load' is not part of this build yet")
}
