//! CPU time the machine's processes spend during a window, by role (the operator, the
//! agents, the applications, the node, the control plane, the load): what a release costs
//! beside its latency; and, for the roles that serve requests, how long their threads
//! waited for a core (the scheduler's run-queue delay): a request path that is slow while
//! the machine is not saturated is waiting there. A task samples `/proc/<pid>/stat` (and
//! `/proc/<pid>/task/*/schedstat`) every 250 ms; the accounting is pure and unit-tested. A
//! process that exits between two samples loses at most that last interval.

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
    /// Nanoseconds its threads have spent runnable but waiting for a core (0 when not
    /// read: only the roles in [`WAIT_ROLES`] are).
    pub wait_ns: u64,
}

/// Roles whose run-queue waits are sampled: the request path (reading every thread of
/// every process would cost more than the processes it measures).
pub const WAIT_ROLES: [&str; 4] = ["agents", "apps", "load_and_proxy", "operator"];

/// The run-queue delay in `/proc/<pid>/task/<tid>/schedstat` (its second field, ns).
pub fn parse_schedstat(text: &str) -> Option<u64> {
    text.split_whitespace().nth(1)?.parse().ok()
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
        wait_ns: 0,
    })
}

/// CPU ticks spent since the first sample, by role, by name and when. A process's ticks of
/// an interval go to the name it has at the interval's end: a container's process is
/// `runc:[2:INIT]` until it execs the container's program, and its work is the
/// program's.
#[derive(Clone, Debug, Default)]
pub struct CpuAccount {
    /// (pid, start) → ticks at last sight.
    last: BTreeMap<(u32, u64), u64>,
    first_sample: bool,
    /// Whole seconds since the first sample → role → ticks spent in that second (the ticks
    /// of an interval go to the second the interval ends in).
    by_second: BTreeMap<u64, BTreeMap<&'static str, u64>>,
    /// Ticks by process name, for the processes no role names.
    other_by_comm: BTreeMap<String, u64>,
    /// (pid, start) → run-queue wait (ns) at last sight.
    last_wait: BTreeMap<(u32, u64), u64>,
    /// Whole seconds since the first sample → role → ns waited in that second.
    wait_by_second: BTreeMap<u64, BTreeMap<&'static str, u64>>,
}

/// CPU by role in one second of the window: how many cores each role kept busy.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CpuSecond {
    /// Seconds since the window opened.
    pub t: u64,
    pub cores: BTreeMap<String, f64>,
    /// Threads waiting for a core, on average over the second, by role (the roles of
    /// [`WAIT_ROLES`]; a role absent waited less than 5 ms).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub waiting: BTreeMap<String, f64>,
}

impl CpuAccount {
    pub fn new() -> Self {
        CpuAccount {
            first_sample: true,
            ..Default::default()
        }
    }

    /// One sample of every process, taken `at` after the window opened. Processes already
    /// running at the first sample count from there; those born later count from zero.
    pub fn observe(&mut self, at: Duration, sample: &[ProcSample]) {
        let first = self.first_sample;
        let second = self.by_second.entry(at.as_secs()).or_default();
        let waits = self.wait_by_second.entry(at.as_secs()).or_default();
        for p in sample {
            let key = (p.pid, p.start_ticks);
            let role = role(&p.comm);
            let spent = advance(&mut self.last, key, p.cpu_ticks, first);
            if spent > 0 {
                *second.entry(role).or_default() += spent;
                if role == "other" {
                    *self.other_by_comm.entry(p.comm.clone()).or_default() += spent;
                }
            }
            let waited = advance(&mut self.last_wait, key, p.wait_ns, first);
            if waited > 0 {
                *waits.entry(role).or_default() += waited;
            }
        }
        self.first_sample = false;
    }

    /// Cores busy by role, second by second.
    pub fn series(&self, ticks_per_second: f64) -> Vec<CpuSecond> {
        self.by_second
            .iter()
            .map(|(t, roles)| CpuSecond {
                t: *t,
                cores: roles
                    .iter()
                    .map(|(r, ticks)| {
                        let cores = *ticks as f64 / ticks_per_second;
                        (r.to_string(), (cores * 100.0).round() / 100.0)
                    })
                    .collect(),
                waiting: self
                    .wait_by_second
                    .get(t)
                    .into_iter()
                    .flatten()
                    .map(|(r, ns)| (r.to_string(), (*ns as f64 / 1e7).round() / 100.0))
                    .filter(|(_, w)| *w > 0.0)
                    .collect(),
            })
            .collect()
    }

    /// The processes of role `other` that spent the most, by name (so that what "other"
    /// is can be read off a report): at most `n`, seconds each.
    pub fn top_other(&self, ticks_per_second: f64, n: usize) -> Vec<(String, f64)> {
        let mut top: Vec<(String, f64)> = self
            .other_by_comm
            .iter()
            .filter(|(_, t)| **t > 0)
            .map(|(c, t)| {
                (
                    c.to_string(),
                    (*t as f64 / ticks_per_second * 100.0).round() / 100.0,
                )
            })
            .collect();
        top.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        top.truncate(n);
        top
    }

    /// Seconds of CPU by role.
    pub fn seconds(&self, ticks_per_second: f64) -> BTreeMap<String, f64> {
        let mut out: BTreeMap<String, f64> = BTreeMap::new();
        for roles in self.by_second.values() {
            for (role, ticks) in roles {
                *out.entry(role.to_string()).or_default() += *ticks as f64 / ticks_per_second;
            }
        }
        for v in out.values_mut() {
            *v = (*v * 100.0).round() / 100.0;
        }
        out
    }
}

/// How much a process's counter grew since it was last seen, remembering the new value.
/// At the window's first sample a process counts from there; one born later from zero.
fn advance(last: &mut BTreeMap<(u32, u64), u64>, key: (u32, u64), now: u64, first: bool) -> u64 {
    let seen = last.entry(key).or_insert(if first { now } else { 0 });
    let grew = now.saturating_sub(*seen);
    *seen = (*seen).max(now);
    grew
}

/// CPU seconds by role over the seconds of `series` from `from` until `to` (seconds, the
/// window rounded out to whole seconds).
pub fn seconds_between(series: &[CpuSecond], from: f64, to: f64) -> BTreeMap<String, f64> {
    sum_between(series, from, to, |s| &s.cores)
}

/// Seconds spent waiting for a core, by role, over the same window as [`seconds_between`].
pub fn waiting_between(series: &[CpuSecond], from: f64, to: f64) -> BTreeMap<String, f64> {
    sum_between(series, from, to, |s| &s.waiting)
}

fn sum_between(
    series: &[CpuSecond],
    from: f64,
    to: f64,
    field: impl Fn(&CpuSecond) -> &BTreeMap<String, f64>,
) -> BTreeMap<String, f64> {
    let (first, last) = (from.floor() as u64, to.ceil() as u64);
    let mut out: BTreeMap<String, f64> = BTreeMap::new();
    for s in series.iter().filter(|s| s.t >= first && s.t < last) {
        for (role, v) in field(s) {
            *out.entry(role.clone()).or_default() += v;
        }
    }
    for v in out.values_mut() {
        *v = (*v * 100.0).round() / 100.0;
    }
    out
}

fn sample_all() -> Vec<ProcSample> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| {
        let e = e.ok()?;
        e.file_name().to_str()?.parse::<u32>().ok()?;
        let mut p = parse_stat(&std::fs::read_to_string(e.path().join("stat")).ok()?)?;
        if WAIT_ROLES.contains(&role(&p.comm)) {
            p.wait_ns = threads_waited(&e.path());
        }
        Some(p)
    })
    .collect()
}

/// The run-queue wait of every thread of the process at `proc_dir`, summed.
fn threads_waited(proc_dir: &std::path::Path) -> u64 {
    let Ok(tasks) = std::fs::read_dir(proc_dir.join("task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| parse_schedstat(&std::fs::read_to_string(t.path().join("schedstat")).ok()?))
        .sum()
}

/// Samples the machine's processes until stopped; [`CpuMeter::stop`] returns what they
/// spent over the meter's life.
pub struct CpuMeter {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<CpuAccount>,
}

/// The kernel's clock ticks per second for `/proc/<pid>/stat` times (USER_HZ), 100 on every
/// Linux architecture this runs on.
const USER_HZ: f64 = 100.0;

/// What the processes spent while a meter ran.
#[derive(Clone, Debug, Default)]
pub struct CpuSpent {
    /// CPU seconds by role over the window.
    pub seconds: BTreeMap<String, f64>,
    /// Cores busy by role, second by second.
    pub series: Vec<CpuSecond>,
    /// The busiest processes of role `other`, by name, CPU seconds.
    pub top_other: Vec<(String, f64)>,
}

impl CpuMeter {
    pub fn start() -> Self {
        let (stop, mut rx) = watch::channel(false);
        let task = tokio::spawn(async move {
            let started = tokio::time::Instant::now();
            let mut account = CpuAccount::new();
            loop {
                let sample = tokio::task::spawn_blocking(sample_all)
                    .await
                    .unwrap_or_default();
                account.observe(started.elapsed(), &sample);
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                    _ = rx.changed() => {
                        let sample = tokio::task::spawn_blocking(sample_all).await.unwrap_or_default();
                        account.observe(started.elapsed(), &sample);
                        return account;
                    }
                }
            }
        });
        CpuMeter { stop, task }
    }

    pub async fn stop(self) -> CpuSpent {
        let _ = self.stop.send(true);
        self.task
            .await
            .map(|a| CpuSpent {
                seconds: a.seconds(USER_HZ),
                series: a.series(USER_HZ),
                top_other: a.top_other(USER_HZ, 5),
            })
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
            wait_ns: 0,
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
        a.observe(
            ms(0),
            &[
                p(1, 10, "sluice-operator", 500),
                p(2, 11, "sluice-agent", 100),
            ],
        );
        a.observe(
            ms(500),
            &[
                p(1, 10, "sluice-operator", 650),
                p(2, 11, "sluice-agent", 130),
                // Born during the window.
                p(3, 99, "sluice-agent", 40),
            ],
        );
        // pid 2 exited; its pid is reused by another process.
        a.observe(
            ms(1250),
            &[
                p(1, 10, "sluice-operator", 700),
                p(2, 120, "sluice-echo", 25),
                p(4, 130, "bridge", 12),
                p(5, 131, "host-local", 3),
                p(6, 132, "bridge", 5),
            ],
        );
        let s = a.seconds(100.0);
        assert_eq!(s["operator"], 2.0);
        assert_eq!(s["agents"], 0.7);
        assert_eq!(s["apps"], 0.25);
        assert_eq!(s["other"], 0.2);
        // Second 0: the first two intervals (the first sample spends nothing); second 1:
        // the third.
        let series = a.series(100.0);
        assert_eq!(series.len(), 2);
        assert_eq!(series[0].t, 0);
        assert_eq!(series[0].cores["operator"], 1.5);
        assert_eq!(series[0].cores["agents"], 0.7);
        assert_eq!(series[1].t, 1);
        assert_eq!(series[1].cores["operator"], 0.5);
        assert!(!series[1].cores.contains_key("agents"));
        // The series adds up to the totals.
        for role in ["operator", "agents", "apps", "other"] {
            let sum: f64 = series.iter().filter_map(|x| x.cores.get(role)).sum();
            assert!((sum - s[role]).abs() < 1e-9, "{role}: {sum} vs {}", s[role]);
        }
        assert_eq!(a.top_other(100.0, 1), vec![("bridge".to_string(), 0.17)]);
    }

    #[test]
    fn a_process_that_execs_counts_under_its_new_name() {
        let mut a = CpuAccount::new();
        a.observe(ms(0), &[]);
        // A container's process, caught before it execs the agent...
        a.observe(ms(250), &[p(7, 50, "runc:[2:INIT]", 2)]);
        // ...then the agent, with the same pid and start time.
        a.observe(ms(500), &[p(7, 50, "sluice-agent", 40)]);
        a.observe(ms(750), &[p(7, 50, "sluice-agent", 90)]);
        let s = a.seconds(100.0);
        assert_eq!(s["agents"], 0.88);
        assert_eq!(s["other"], 0.02);
        assert_eq!(
            a.top_other(100.0, 5),
            vec![("runc:[2:INIT]".to_string(), 0.02)]
        );
    }

    #[test]
    fn a_window_sums_the_seconds_it_covers() {
        let second = |t: u64, op: f64| CpuSecond {
            t,
            cores: BTreeMap::from([("operator".to_string(), op)]),
            waiting: BTreeMap::from([("agents".to_string(), op / 2.0)]),
        };
        let series = [
            second(0, 0.1),
            second(1, 0.2),
            second(2, 0.4),
            second(3, 0.8),
        ];
        assert_eq!(seconds_between(&series, 1.2, 2.5)["operator"], 0.6);
        assert_eq!(waiting_between(&series, 1.2, 2.5)["agents"], 0.3);
        assert_eq!(seconds_between(&series, 0.0, 10.0)["operator"], 1.5);
        assert!(seconds_between(&series, 5.0, 6.0).is_empty());
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn run_queue_waits_count_like_cpu_and_by_second() {
        let w = |pid: u32, comm: &str, wait_ns: u64| ProcSample {
            wait_ns,
            ..p(pid, pid as u64, comm, 0)
        };
        let mut a = CpuAccount::new();
        // Waits before the window do not count.
        a.observe(ms(0), &[w(1, "sluice-agent", 7_000_000_000)]);
        a.observe(
            ms(500),
            &[
                w(1, "sluice-agent", 7_300_000_000),
                w(2, "sluice-echo", 20_000_000),
            ],
        );
        a.observe(
            ms(1250),
            &[
                w(1, "sluice-agent", 7_350_000_000),
                w(2, "sluice-echo", 20_000_000),
            ],
        );
        let series = a.series(100.0);
        assert_eq!(series[0].waiting["agents"], 0.3);
        assert_eq!(series[0].waiting["apps"], 0.02);
        assert_eq!(series[1].waiting["agents"], 0.05);
        assert!(!series[1].waiting.contains_key("apps"));
        assert_eq!(waiting_between(&series, 0.0, 2.0)["agents"], 0.35);
        assert_eq!(parse_schedstat("123 456 7\n"), Some(456));
        assert_eq!(parse_schedstat("123"), None);
    }

    #[test]
    fn roles_by_name() {
        assert_eq!(role("containerd-shim"), "node");
        assert_eq!(role("kube-apiserver"), "control_plane");
        assert_eq!(role("bash"), "other");
    }
}
