//! `sluice-operator run` as a host process for a run, watching one namespace.
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;

/// `sluice-operator run` as a host process, watching one namespace.
pub struct OperatorProcess {
    child: Child,
    pub log: PathBuf,
    kubeconfig: PathBuf,
    namespace: String,
    lease_duration: Option<&'static str>,
}

impl OperatorProcess {
    /// With the operator's default Lease (15 s), as users run it.
    pub fn start(kubeconfig: &std::path::Path, namespace: &str) -> anyhow::Result<Self> {
        Self::start_with_lease(kubeconfig, namespace, None)
    }

    /// With a Lease of `lease_duration` (e.g. "3s"): a process started after a SIGKILL
    /// takes over once the dead one's Lease expires. A short Lease is renewed often (every
    /// 2/15 of it), which costs the API server writes a benchmark would count.
    pub fn start_with_lease(
        kubeconfig: &std::path::Path,
        namespace: &str,
        lease_duration: Option<&'static str>,
    ) -> anyhow::Result<Self> {
        let logs = crate::cluster::state_dir().join("logs");
        std::fs::create_dir_all(&logs)?;
        let log = logs.join(format!("operator-{namespace}.log"));
        let child = spawn_operator(kubeconfig, namespace, &log, lease_duration)?;
        Ok(OperatorProcess {
            child,
            log,
            kubeconfig: kubeconfig.to_path_buf(),
            namespace: namespace.to_string(),
            lease_duration,
        })
    }

    /// SIGKILL (no Lease release, no cleanup), then start a new process.
    pub fn kill9_and_restart(&mut self) -> anyhow::Result<()> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = spawn_operator(
            &self.kubeconfig,
            &self.namespace,
            &self.log,
            self.lease_duration,
        )?;
        Ok(())
    }

    pub fn stop(&mut self) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for OperatorProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.stop();
        }
    }
}

fn spawn_operator(
    kubeconfig: &std::path::Path,
    namespace: &str,
    log: &std::path::Path,
    lease_duration: Option<&str>,
) -> anyhow::Result<Child> {
    // SLUICE_E2E_OPERATOR_BIN runs another build (e.g. an older one, to check that a test
    // fails without a fix).
    let bin = std::env::var_os("SLUICE_E2E_OPERATOR_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::cluster::repo_root().join("target/debug/sluice-operator"));
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    let port = crate::cluster::free_port()?;
    let mut cmd = Command::new(&bin);
    cmd.args(["run", "--lease-namespace", namespace]);
    if let Some(d) = lease_duration {
        cmd.args(["--lease-duration", d]);
    }
    cmd.arg("--admin-addr")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .env("SLUICE_AGENT_IMAGE", "sluice/agent:dev")
        .env("SLUICE_WATCH_NAMESPACE", namespace)
        .env(
            "RUST_LOG",
            std::env::var("SLUICE_OPERATOR_LOG").unwrap_or_else(|_| "info".into()),
        )
        .stdout(Stdio::null())
        .stderr(out)
        .spawn()
        .with_context(|| {
            format!(
                "starting {} (cargo build --workspace --bins)",
                bin.display()
            )
        })
}

pub(super) fn kubeconfig() -> PathBuf {
    std::env::var_os("SLUICE_E2E_KUBECONFIG")
        .map(PathBuf::from)
        .unwrap_or_else(crate::cluster::kubeconfig_path)
}
