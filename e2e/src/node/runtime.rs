//! Starting and signalling a container's process inside its pod's network namespace.
use std::collections::BTreeMap;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::Context as _;
use tokio::sync::watch;

/// A command that runs `program` inside the network namespace `netns` (`None`: the host's,
/// for `hostNetwork` pods), in a process group of its own (so that SIGKILL reaches everything
/// it started), with exactly `env`.
pub fn pod_command(
    netns: Option<&str>,
    program: &Path,
    args: &[String],
    env: &BTreeMap<String, String>,
    workdir: &Path,
) -> anyhow::Result<tokio::process::Command> {
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .env_clear()
        .envs(env)
        .current_dir(workdir)
        .stdin(Stdio::null())
        .process_group(0);
    let Some(netns) = netns else {
        return Ok(cmd);
    };
    let ns_path = Path::new("/run/netns").join(netns);
    let ns_file =
        std::fs::File::open(&ns_path).with_context(|| format!("opening {}", ns_path.display()))?;
    // SAFETY: between fork and exec only async-signal-safe calls: setns(2) on an fd opened
    // (with O_CLOEXEC) before the fork.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(ns_file.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(cmd)
}

/// A started container process.
#[derive(Clone, Debug)]
pub struct Proc {
    pub pid: i32,
    /// Becomes `Some(exit code)` when the process has exited (128 + signal when killed).
    pub exited: watch::Receiver<Option<i32>>,
}

impl Proc {
    pub fn signal(&self, sig: i32) {
        if self.exited.borrow().is_none() {
            // SAFETY: kill(2) on the PID of a child we have not reaped yet.
            unsafe {
                libc::kill(self.pid, sig);
            }
        }
    }

    /// SIGKILL to the whole process group.
    pub fn kill_group(&self) {
        // SAFETY: kill(2) on the process group the child leads; at worst it is gone.
        unsafe {
            libc::kill(-self.pid, libc::SIGKILL);
        }
    }

    pub fn is_running(&self) -> bool {
        self.exited.borrow().is_none()
    }

    /// Waits for the exit; returns the code.
    pub async fn wait(&self) -> i32 {
        let mut rx = self.exited.clone();
        loop {
            if let Some(code) = *rx.borrow_and_update() {
                return code;
            }
            if rx.changed().await.is_err() {
                return 137;
            }
        }
    }
}

pub struct Spawned {
    pub proc: Proc,
}

/// Starts a container: output appended to `log`, the exit reported on `on_exit`.
pub fn spawn_container(
    netns: Option<&str>,
    program: &Path,
    args: &[String],
    env: &BTreeMap<String, String>,
    workdir: &Path,
    log: &Path,
    on_exit: impl FnOnce(i32) + Send + 'static,
) -> anyhow::Result<Spawned> {
    if let Some(dir) = log.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    let err = out.try_clone()?;
    let mut cmd = pod_command(netns, program, args, env, workdir)?;
    cmd.stdout(out).stderr(err).kill_on_drop(false);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {}", program.display()))?;
    let pid = child.id().context("child without pid")? as i32;
    let (tx, rx) = watch::channel(None);
    tokio::spawn(async move {
        let code = match child.wait().await {
            Ok(status) => {
                use std::os::unix::process::ExitStatusExt;
                status
                    .code()
                    .or_else(|| status.signal().map(|s| 128 + s))
                    .unwrap_or(128)
            }
            Err(_) => 128,
        };
        let _ = tx.send(Some(code));
        on_exit(code);
    });
    Ok(Spawned {
        proc: Proc { pid, exited: rx },
    })
}

/// The repository root: `$SLUICE_REPO`, else the nearest ancestor of the working directory
/// or of this executable that holds `e2e/images.yaml`, else the working directory.
pub fn repo_root() -> PathBuf {
    if let Ok(r) = std::env::var("SLUICE_REPO") {
        return PathBuf::from(r);
    }
    let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
    let exe = std::env::current_exe().ok();
    for start in [Some(cwd.clone()), exe].into_iter().flatten() {
        for dir in start.ancestors() {
            if dir.join("e2e/images.yaml").exists() {
                return dir.to_path_buf();
            }
        }
    }
    cwd
}
