//! The record of what `up` started (`target/e2e/state.json`), so that `down` can stop
//! exactly that.
use std::path::PathBuf;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use super::ground::state_dir;
use super::procs::Daemon;

/// What `up` started, so that `down` can stop exactly that.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct ClusterState {
    pub server: String,
    pub daemons: Vec<Daemon>,
    /// Blackhole routes `up` added (and `down` removes).
    pub routes: Vec<String>,
    /// What the real nodes changed on the machine.
    #[serde(default)]
    pub host: Option<crate::node::HostRecord>,
}

impl ClusterState {
    pub(super) fn path() -> PathBuf {
        state_dir().join("state.json")
    }

    pub fn load() -> anyhow::Result<Option<Self>> {
        match std::fs::read_to_string(Self::path()) {
            Ok(text) => Ok(Some(
                serde_json::from_str(&text).context("target/e2e/state.json is corrupt")?,
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    pub(super) fn save(&self) -> anyhow::Result<()> {
        let tmp = Self::path().with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)?;
        std::fs::rename(tmp, Self::path())?;
        Ok(())
    }

    /// Recorded daemons that are no longer running, as `name (pid N)`.
    pub fn dead_daemons(&self) -> Vec<String> {
        self.daemons
            .iter()
            .filter(|d| !d.is_running())
            .map(|d| format!("{} (pid {})", d.name, d.pid))
            .collect()
    }
}
