//! CPU time the machine's processes spend during a window, by role (the operator, the
//! agents, the applications, the node, the control plane, the load): what a release costs
//! beside its latency. A task samples `/proc/<pid>/stat` every 250 ms; the accounting is
//! pure and unit-tested. A process that exits between two samples loses at most the CPU
//! of that last interval.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::sync::watch;

/// The role of a process, from its name (`comm`, at most 15 bytes).
pub fn role(comm: &str) -> &'static str {
    match comm {
        "sluice-operator" => "operator",
        "sluice-agent" => "agents",
        "sluice-echo" | "nginx" | "python3" | "java" => "apps",
        "kubelet" | "kube-proxy" => "node",
        c if c.starts_with("containerd") || c == "runc" || c == "pause" => "node",
        "kube-apiserver" | "etcd" | "kube-controller" | "kube-scheduler" => "control_plane",
        "sluice-e2e" => "load_and_proxy",
        _ => "other",
    }
}

/// One process in one sample: (pid, start time in ticks since boot) identifies it across
/// samples even if its pid is reused.
#[derive(Clone, Debug, PartialEq)]
pub struct ProcSample {
    pub pid: u32,
    pub start_ticks: u64,
    pub comm: String,
    /// utime + stime, ticks.
    pub cpu_ticks: u64,
}

/// Parse `/proc/<pid>/stat` (the name is in parentheses and may hold spaces or parentheses).
pub fn parse_stat(text: &str) -> Option<ProcSample> {
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let pid = text[..open].trim().parse().ok()?;
    let comm = text.get(open + 1..close)?.to_string();
    // Fields after the name, from field 3 (state): utime is field 14, stime 15, starttime 22.
    let rest: Vec<&str> = text.get(close + 1..)?.split_whitespace().collect();
    let field = |n: usize| rest.get(n - 3).and_then(|v| v.parse::<u64>().ok());
    Some(ProcSample {
        pid,
        start_ticks: field(22)?,
        comm,
        cpu_ticks: field(14)? + field(15)?,
    })
}

/// CPU ticks spent since the first sample, per process, by role.
#[derive(Clone, Debug, Default)]
pub struct CpuAccount {
    /// (pid, start) → (role, ticks at first sight, ticks at last sight).
    seen: BTreeMap<(u32, u64), (&'static str, u64, u64)>,
    first_sample: bool,
}

impl CpuAccount {
    pub fn new() -> Self {
        CpuAccount {
            seen: BTreeMap::new(),
            first_sample: true,
        }
    }

    /// One sample of every process. Processes already running at the first sample count
    /// from there; those born later count from zero.
    pub fn observe(&mut self, sample: &[ProcSample]) {
        for p in sample {
            let base = if self.first_sample { p.cpu_ticks } else { 0 };
            let e = self.seen.entry((p.pid, p.start_ticks)).or_insert((
                role(&p.comm),
                base,
                p.cpu_ticks,
            ));
            e.2 = e.2.max(p.cpu_ticks);
        }
        self.first_sample = false;
    }

    /// Seconds of CPU by role.
    pub fn seconds(&self, ticks_per_second: f64) -> BTreeMap<String, f64> {
        let mut out: BTreeMap<String, f64> = BTreeMap::new();
        for (role, first, last) in self.seen.values() {
            *out.entry((*role).to_string()).or_default() +=
                last.saturating_sub(*first) as f64 / ticks_per_second;
        }
        for v in out.values_mut() {
            *v = (*v * 100.0).round() / 100.0;
        }
        out
    }
}

fn sample_all() -> Vec<ProcSample> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| {
        let e = e.ok()?;
        e.file_name().to_str()?.parse::<u32>().ok()?;
        parse_stat(&std::fs::read_to_string(e.path().join("stat")).ok()?)
    })
    .collect()
}

/// Samples the machine's processes until stopped; [`CpuMeter::stop`] returns CPU seconds
/// by role over the meter's life.
pub struct CpuMeter {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<CpuAccount>,
}

/// The kernel's clock ticks per second for `/proc/<pid>/stat` times (USER_HZ), 100 on every
/// Linux architecture this runs on.
const USER_HZ: f64 = 100.0;

impl CpuMeter {
    pub fn start() -> Self {
        let (stop, mut rx) = watch::channel(false);
        let task = tokio::spawn(async move {
            let mut account = CpuAccount::new();
            loop {
                account.observe(
                    &tokio::task::spawn_blocking(sample_all)
                        .await
                        .unwrap_or_default(),
                );
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                    _ = rx.changed() => {
                        account.observe(&tokio::task::spawn_blocking(sample_all).await.unwrap_or_default());
                        return account;
                    }
                }
            }
        });
        CpuMeter { stop, task }
    }

    pub async fn stop(self) -> BTreeMap<String, f64> {
        let _ = self.stop.send(true);
        self.task
            .await
            .map(|a| a.seconds(USER_HZ))
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(pid: u32, start: u64, comm: &str, ticks: u64) -> ProcSample {
        ProcSample {
            pid,
            start_ticks: start,
            comm: comm.into(),
            cpu_ticks: ticks,
        }
    }

    #[test]
    fn parses_proc_stat_with_awkward_names() {
        let line = "4242 (sluice agent) (x) S 1 4242 4242 0 -1 4194560 100 0 0 0 37 5 0 0 20 0 3 0 987654 1000 200 18446744073709551615";
        assert_eq!(
            parse_stat(line),
            Some(p(4242, 987654, "sluice agent) (x", 42))
        );
        assert_eq!(parse_stat("garbage"), None);
        assert_eq!(parse_stat("1 (init) S 0"), None);
    }

    #[test]
    fn counts_from_the_first_sample_and_newborns_from_zero() {
        let mut a = CpuAccount::new();
        a.observe(&[
            p(1, 10, "sluice-operator", 500),
            p(2, 11, "sluice-agent", 100),
        ]);
        a.observe(&[
            p(1, 10, "sluice-operator", 650),
            p(2, 11, "sluice-agent", 130),
            // Born during the window.
            p(3, 99, "sluice-agent", 40),
        ]);
        // pid 2 exited; its pid is reused by another process.
        a.observe(&[
            p(1, 10, "sluice-operator", 700),
            p(2, 120, "sluice-echo", 25),
        ]);
        let s = a.seconds(100.0);
        assert_eq!(s["operator"], 2.0);
        assert_eq!(s["agents"], 0.7);
        assert_eq!(s["apps"], 0.25);
    }

    #[test]
    fn roles_by_name() {
        assert_eq!(role("containerd-shim"), "node");
        assert_eq!(role("kube-apiserver"), "control_plane");
        assert_eq!(role("bash"), "other");
    }
}
