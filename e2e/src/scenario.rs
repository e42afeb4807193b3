//! Placeholder: arrives with the traffic test ground (issue 4).

#[derive(clap::Args, Debug)]
pub struct ScenarioArgs {}

pub async fn run(_args: ScenarioArgs) -> anyhow::Result<()> {
    anyhow::bail!("'scenario' is not part of this build yet")
}
