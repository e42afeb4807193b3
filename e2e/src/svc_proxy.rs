//! Placeholder: arrives with the traffic test ground (issue 4).

#[derive(clap::Args, Debug)]
pub struct SvcProxyArgs {}

pub async fn run(_args: SvcProxyArgs) -> anyhow::Result<()> {
    anyhow::bail!("'svc_proxy' is not part of this build yet")
}
