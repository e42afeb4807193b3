//! kube-proxy's `minSyncPeriod`, changed on the running ground: the second, real source of
//! endpoint lag (beside the service proxy's propagation delay). kube-proxy syncs its rules
//! at most once per period, so an endpoint change that follows another within the period
//! reaches the nftables rules up to that much later; a release makes such bursts.
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;

use super::procs;
use super::state::ClusterState;

/// Restarts the ground's kube-proxy with `period` as its `minSyncPeriod`; returns the period
/// it ran with. Its rules stay in place meanwhile (kube-proxy leaves them on exit), and the
/// new process takes them over on its first sync.
pub fn set_min_sync_period(period: Duration) -> anyhow::Result<Duration> {
    let mut state = ClusterState::load()?.context("the test ground is not up")?;
    let at = state
        .daemons
        .iter()
        .position(|d| d.name == "kube-proxy")
        .context("the test ground runs no kube-proxy")?;
    let old = state.daemons[at].clone();
    let config = config_path()?;
    let text = std::fs::read_to_string(&config)
        .with_context(|| format!("reading {}", config.display()))?;
    let (text, previous) = with_min_sync_period(&text, period)?;
    old.stop(Duration::from_secs(5));
    std::fs::write(&config, text)?;
    let new = procs::spawn(
        "kube-proxy",
        &old.binary,
        &[format!("--config={}", config.display()), "--v=1".into()],
        &old.log,
    )?;
    crate::node::confine_system_daemon(
        &crate::node::NodeSpec::new(crate::node::LOCAL_NODE, 0),
        new.pid,
    );
    state.daemons[at] = new;
    state.save()?;
    Ok(previous)
}

/// The config file of the ground's kube-proxy: the one `up` wrote for the node `local-0`.
fn config_path() -> anyhow::Result<PathBuf> {
    let paths = crate::node::NodePaths::new(&super::state_dir(), "local-0");
    let p = paths.kube_proxy_config();
    anyhow::ensure!(p.exists(), "no kube-proxy config at {}", p.display());
    Ok(p)
}

/// `text` (a KubeProxyConfiguration) with its `minSyncPeriod` set to `period`, and the
/// period it had.
pub fn with_min_sync_period(text: &str, period: Duration) -> anyhow::Result<(String, Duration)> {
    let mut previous = None;
    let lines: Vec<String> = text
        .lines()
        .map(|line| {
            let Some((indent, value)) = line.split_once("minSyncPeriod:") else {
                return line.to_string();
            };
            previous = humantime::parse_duration(value.trim()).ok();
            format!("{indent}minSyncPeriod: {}ms", period.as_millis())
        })
        .collect();
    let previous = previous.context("the kube-proxy config has no readable minSyncPeriod")?;
    Ok((lines.join("\n") + "\n", previous))
}

/// Restores the previous `minSyncPeriod` when dropped (a test that changes it must not leave
/// it changed, even when it fails).
pub struct MinSyncPeriod {
    previous: Duration,
}

impl MinSyncPeriod {
    pub fn set(period: Duration) -> anyhow::Result<Self> {
        let previous = set_min_sync_period(period)?;
        Ok(MinSyncPeriod { previous })
    }
}

impl Drop for MinSyncPeriod {
    fn drop(&mut self) {
        if let Err(e) = set_min_sync_period(self.previous) {
            eprintln!("restoring kube-proxy's minSyncPeriod: {e:#}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sets_the_period_and_reports_the_old_one() {
        let yaml =
            "kind: KubeProxyConfiguration\nnftables:\n  minSyncPeriod: 1000ms\n  syncPeriod: 30s\n";
        let (out, prev) = with_min_sync_period(yaml, Duration::from_secs(10)).unwrap();
        assert_eq!(prev, Duration::from_secs(1));
        assert!(out.contains("  minSyncPeriod: 10000ms\n"), "{out}");
        assert!(out.contains("  syncPeriod: 30s\n"), "{out}");
    }

    #[test]
    fn a_config_without_the_field_is_an_error() {
        assert!(with_min_sync_period("mode: nftables\n", Duration::from_secs(1)).is_err());
    }
}
