//! Daemons of the test ground: started in their own session (so they outlive the command
//! that started them and never get its terminal's signals), logged to a file each, and
//! stopped by PID, checking first that the PID still runs the binary we started.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// One started daemon, as recorded in the cluster's state file.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Daemon {
    pub name: String,
    pub pid: i32,
    pub binary: PathBuf,
    pub log: PathBuf,
}

/// The mount namespace a daemon runs in.
#[derive(Clone, Debug, Default)]
pub enum MountNamespace {
    /// The machine's.
    #[default]
    Host,
    /// A new one, every mount private, with `source` bind-mounted on `target` (a path the
    /// daemon cannot be told to use elsewhere, such as the kubelet's device-plugin
    /// directory). It ends with the last process in it.
    New { source: PathBuf, target: PathBuf },
    /// The one process `pid` runs in (the node's containerd's, for its kubelet: both must
    /// see the same mounts, the kubelet's volume mounts above all).
    Of(i32),
}

/// Starts `binary args…` detached, stdout and stderr appended to `log`.
pub fn spawn(name: &str, binary: &Path, args: &[String], log: &Path) -> anyhow::Result<Daemon> {
    spawn_in(name, binary, args, log, &MountNamespace::Host)
}

/// [`spawn`] in the mount namespace `ns`.
pub fn spawn_in(
    name: &str,
    binary: &Path,
    args: &[String],
    log: &Path,
    ns: &MountNamespace,
) -> anyhow::Result<Daemon> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt as _;
    use std::os::unix::process::CommandExt;
    let c = |p: &Path| CString::new(p.as_os_str().as_bytes()).expect("no NUL in a path");
    // Prepared before the fork: the child may only make system calls.
    let setup: Option<(CString, CString)> = match ns {
        MountNamespace::New { source, target } => Some((c(source), c(target))),
        _ => None,
    };
    let join: Option<CString> = match ns {
        MountNamespace::Of(pid) => Some(c(Path::new(&format!("/proc/{pid}/ns/mnt")))),
        _ => None,
    };
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    let mut cmd = Command::new(binary);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out);
    // SAFETY: only system calls (async-signal-safe) on memory prepared before the fork.
    unsafe {
        cmd.pre_exec(move || {
            let check = |rc: libc::c_int| {
                if rc == -1 {
                    Err(std::io::Error::last_os_error())
                } else {
                    Ok(())
                }
            };
            check(libc::setsid())?;
            if let Some((source, target)) = &setup {
                check(libc::unshare(libc::CLONE_NEWNS))?;
                check(libc::mount(
                    std::ptr::null(),
                    c"/".as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ))?;
                check(libc::mount(
                    source.as_ptr(),
                    target.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND,
                    std::ptr::null(),
                ))?;
            }
            if let Some(path) = &join {
                let fd = libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
                check(fd)?;
                let rc = libc::setns(fd, libc::CLONE_NEWNS);
                libc::close(fd);
                check(rc)?;
            }
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .map_err(|e| anyhow::anyhow!("cannot start {name} ({}): {e}", binary.display()))?;
    let binary = binary
        .canonicalize()
        .unwrap_or_else(|_| binary.to_path_buf());
    Ok(Daemon {
        name: name.to_string(),
        pid: child.id() as i32,
        binary,
        log: log.to_path_buf(),
    })
}

impl Daemon {
    /// True while the PID exists and still runs our binary (PIDs get reused). A zombie
    /// (exited, not yet reaped) has no exe link and counts as stopped.
    pub fn is_running(&self) -> bool {
        let Ok(exe) = std::fs::read_link(format!("/proc/{}/exe", self.pid)) else {
            return false;
        };
        let exe = exe.to_string_lossy();
        exe.trim_end_matches(" (deleted)") == self.binary.to_string_lossy()
    }

    /// SIGTERM, wait up to `grace`, then SIGKILL. Returns once the process is gone.
    pub fn stop(&self, grace: Duration) {
        if !self.is_running() {
            return;
        }
        signal(self.pid, libc::SIGTERM);
        let deadline = Instant::now() + grace;
        while self.is_running() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        if self.is_running() {
            tracing::warn!(name = %self.name, pid = self.pid, "did not stop on SIGTERM; sending SIGKILL");
            signal(self.pid, libc::SIGKILL);
            let deadline = Instant::now() + Duration::from_secs(5);
            while self.is_running() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// The last `n` lines of the daemon's log, to explain a failed start.
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

fn signal(pid: i32, sig: i32) {
    // SAFETY: kill(2) on a PID we started and checked; no memory is shared.
    unsafe {
        libc::kill(pid, sig);
    }
}
