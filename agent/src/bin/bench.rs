//! `sluice-agent-bench`: the agent overhead benchmark (`make bench-agent`).
//!
//! In one run on loopback: an in-process hyper upstream; the load client hits it directly,
//! through `sluice-agent` (http and tcp mode) and through HAProxy (http and tcp mode), and
//! measures requests/s at saturation (closed loop, keep-alive; the targets take turns in
//! rounds, in a rotating order, so that a shared machine's drifting load and whichever
//! target ran just before hit them alike), p50/p99 latency at a fixed moderate rate (open
//! loop: a request made late by a slow previous response counts from its scheduled time, so
//! a stall is not hidden), and the proxy process's CPU time per request (utime+stime from
//! /proc/<pid>/stat). Writes JSON with the agent/HAProxy and agent/direct ratios and the
//! issue's goals.
//!
//! The latency runs take turns too: in each round every target (direct included) gets a
//! short fixed-rate run, with the same CPU layout for all (`--pin`: by default the load
//! client, the upstream and the proxy on one core at real-time priority, so that no other
//! work on a shared machine preempts them and no hop waits for another core to wake up).
//! Each figure is the median over the rounds; the added latency is the median of the
//! per-round differences to direct.
//!
//! One file (about 900 lines) on purpose: a benchmark binary read top to bottom as one
//! method (targets, rounds, CPU layout, load clients, the /proc readings), with no API
//! for anything else to use; splitting it would scatter the method without a seam a
//! reader or another caller needs.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::Parser;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Parser, Debug)]
struct Args {
    /// The sluice-agent binary.
    #[arg(long)]
    agent: PathBuf,
    /// The haproxy binary (skipped when absent).
    #[arg(long)]
    haproxy: Option<PathBuf>,
    /// Output JSON file.
    #[arg(long)]
    out: PathBuf,
    /// Keep-alive connections for the saturation run.
    #[arg(long, default_value_t = 64)]
    conns: usize,
    /// Seconds of each target's saturation run (in all, over the rounds).
    #[arg(long, default_value_t = 5)]
    saturation_secs: u64,
    /// Rounds the saturation runs are split into; the targets take turns in each.
    #[arg(long, default_value_t = 5)]
    rounds: u32,
    /// Requests/s of the fixed-rate latency runs (moderate: a few % of saturation).
    #[arg(long, default_value_t = 1000)]
    rate: u64,
    /// Seconds of each target's fixed-rate run in each latency round.
    #[arg(long, default_value_t = 1.0)]
    latency_secs: f64,
    /// Latency rounds (each target once per round); figures are medians over the rounds.
    #[arg(long, default_value_t = 7)]
    latency_rounds: u32,
    /// Threads of every proxy: the agent's SLUICE_AGENT_WORKERS and HAProxy's nbthread.
    #[arg(long, default_value_t = 2)]
    proxy_threads: usize,
    /// CPU layout of the latency runs: `same` (load client, upstream and proxy pinned to
    /// one core: every hop is a switch on that core, no cross-core wake-up), `split` (load
    /// client and upstream on one core, the proxy on another) or `none` (not pinned).
    #[arg(long, default_value = "same")]
    pin: String,
    /// CPU layout of the saturation runs: `none` (default: the scheduler places everyone)
    /// or `split` (load client and upstream on one core, the proxy on another: what a
    /// proxy with a core of its own does; use with `--proxy-threads 1`).
    #[arg(long, default_value = "none")]
    saturation_pin: String,
    /// Do not run the latency runs at real-time priority.
    #[arg(long)]
    no_rt: bool,
    /// Measure only these targets (comma-separated: agent_http, agent_tcp, haproxy_http,
    /// haproxy_tcp); `direct` is always measured, it is the baseline.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Another sluice-agent binary (an older build) measured alongside, as
    /// `baseline_agent_http` and `baseline_agent_tcp`, to compare builds in one run.
    #[arg(long)]
    baseline_agent: Option<PathBuf>,
    /// Extra arguments for every sluice-agent started.
    #[arg(long, allow_hyphen_values = true)]
    agent_arg: Vec<String>,
}

impl Args {
    fn wants(&self, name: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|o| o == name)
    }
}

const REQ: &[u8] = b"GET / HTTP/1.1\r\nhost: bench\r\n\r\n";

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // The upstream gets its own single-threaded runtime (thread), the load client another.
    let up_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let upstream = up_rt.block_on(start_upstream())?;
    let load_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;

    let ports: Vec<u16> = (0..10)
        .map(|_| free_port())
        .collect::<anyhow::Result<_>>()?;
    // Every target runs for the whole benchmark (an idle proxy costs nothing), so that the
    // saturation runs can take turns in rounds and drifting background load on a shared
    // machine hits every target alike.
    let mut targets = vec![Target {
        name: "direct",
        addr: upstream,
        child: None,
        note: None,
    }];
    let mut agents = vec![
        ("agent_http", &args.agent, "http", ports[0], ports[1]),
        ("agent_tcp", &args.agent, "tcp", ports[2], ports[3]),
    ];
    if let Some(baseline) = &args.baseline_agent {
        agents.push(("baseline_agent_http", baseline, "http", ports[6], ports[7]));
        agents.push(("baseline_agent_tcp", baseline, "tcp", ports[8], ports[9]));
    }
    for (name, agent, proto, port, admin) in agents {
        // The baseline build comes with the agent in the same mode.
        let wanted = args.wants(name)
            || (name.starts_with("baseline") && args.wants(&format!("agent_{proto}")));
        if !wanted {
            continue;
        }
        let child = Command::new(agent)
            .args([
                "proxy",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--upstream",
                &upstream.to_string(),
                "--admin",
                &format!("127.0.0.1:{admin}"),
                "--protocol",
                proto,
            ])
            .args(&args.agent_arg)
            .env("SLUICE_LOG", "warn")
            .env("SLUICE_AGENT_WORKERS", args.proxy_threads.to_string())
            .stdout(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", agent.display()))?;
        targets.push(Target {
            name,
            addr: ([127, 0, 0, 1], port).into(),
            child: Some(child),
            note: None,
        });
    }
    let dir = std::env::temp_dir().join(format!("sluice-bench-{}", std::process::id()));
    if let Some(haproxy) = &args.haproxy {
        std::fs::create_dir_all(&dir)?;
        for (name, mode, port) in [
            ("haproxy_http", "http", ports[4]),
            ("haproxy_tcp", "tcp", ports[5]),
        ] {
            if !args.wants(name) {
                continue;
            }
            let cfg = dir.join(format!("{name}.cfg"));
            std::fs::write(
                &cfg,
                haproxy_config(mode, port, upstream, args.proxy_threads),
            )?;
            let child = Command::new(haproxy)
                .args(["-f", &cfg.to_string_lossy(), "-db"])
                .stdout(Stdio::null())
                .spawn()
                .with_context(|| format!("starting {}", haproxy.display()))?;
            targets.push(Target {
                name,
                addr: ([127, 0, 0, 1], port).into(),
                child: Some(child),
                note: Some(format!(
                    "mode {mode}, nbthread {}{}",
                    args.proxy_threads,
                    if mode == "http" {
                        ", option forwardfor"
                    } else {
                        ""
                    }
                )),
            });
        }
    }

    let measured = load_rt.block_on(measure_all(&args, &targets));
    for t in &mut targets {
        if let Some(c) = &mut t.child {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    let results = measured?;

    let comparison = compare(&results);
    let out = json!({
        "benchmark": "sluice-agent overhead on loopback",
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "config": {
            "saturation": { "connections": args.conns, "seconds": args.saturation_secs,
                            "rounds": args.rounds,
                            "method": "targets take turns in a rotating order, \
                             seconds/rounds each per round",
                            "cpu_layout": describe(saturation_layout(&args).as_ref()) },
            "latency": { "rate_per_second": args.rate, "seconds_per_round": args.latency_secs,
                         "rounds": args.latency_rounds,
                         "connections": latency_conns(args.rate),
                         "method": "targets (direct included) take turns in each round, one \
                          fixed-rate run each; p50/p99 = median over the rounds; added = median \
                          over the rounds of (target - direct of the same round)",
                         "cpu_layout": describe(Layout::new(&args.pin).as_ref()) },
            "proxy_threads": args.proxy_threads,
            "request": "GET / (HTTP/1.1 keep-alive), 5-byte response",
            "cpu_per_request": "utime+stime of the proxy process / requests it served",
        },
        "agent_runtime": format!("SLUICE_AGENT_WORKERS={}", args.proxy_threads),
        "comparison": comparison,
        "results": Value::Object(results),
    });
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&out)?)?;
    println!("{}", serde_json::to_string_pretty(&out)?);
    drop(up_rt);
    Ok(())
}

struct Target {
    name: &'static str,
    addr: SocketAddr,
    child: Option<Child>,
    note: Option<String>,
}

impl Target {
    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }
}

/// Saturation in rounds over all targets, then latency in rounds over all targets.
async fn measure_all(
    args: &Args,
    targets: &[Target],
) -> anyhow::Result<serde_json::Map<String, Value>> {
    for t in targets {
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(t.addr).await.is_err() {
            if Instant::now() > deadline {
                bail!("{} on {} did not start", t.name, t.addr);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Warm up (connections, pools).
        saturate(t.addr, args.conns, Duration::from_millis(500))
            .await
            .context(t.name)?;
    }
    let rounds = args.rounds.max(1);
    let slice = Duration::from_secs(args.saturation_secs).div_f64(rounds as f64);
    let mut requests = vec![0u64; targets.len()];
    // (user, system) CPU seconds of each proxy process over its saturation runs.
    let mut cpu = vec![Some((0.0f64, 0.0f64)); targets.len()];
    // Where the rest of the machine's time went, to tell a proxy's own cost from what it
    // makes the others spend: the bench process's CPU seconds (load client and upstream)
    // and the machine's (idle, total) jiffies over each target's runs.
    let mut load_cpu = vec![0.0f64; targets.len()];
    let mut machine = vec![(0u64, 0u64); targets.len()];
    // TCP segments sent machine-wide (every hop, pure ACKs included) over each target's runs.
    let mut segments = vec![0u64; targets.len()];
    // `--saturation-pin split`: the proxies on a core of their own.
    let sat_layout = saturation_layout(args);
    if let Some(l) = &sat_layout {
        l.pin_self();
        for pid in targets.iter().filter_map(Target::pid) {
            l.pin_proxy(pid);
        }
    }
    // A rotating order, as for latency: in a fixed order each target always follows the
    // same one (whose connections are still closing, whose threads are still waking), and
    // that bias showed as a steady 5 % between runs with and without the tcp targets.
    for round in 0..rounds as usize {
        for k in 0..targets.len() {
            let i = (k + round) % targets.len();
            let t = &targets[i];
            let cpu0 = t.pid().and_then(cpu_seconds);
            let own0 = cpu_seconds(std::process::id());
            let machine0 = machine_jiffies();
            let segs0 = tcp_out_segments();
            requests[i] += saturate(t.addr, args.conns, slice).await.context(t.name)?;
            let cpu1 = t.pid().and_then(cpu_seconds);
            let own1 = cpu_seconds(std::process::id());
            let machine1 = machine_jiffies();
            if let (Some(a), Some(b)) = (segs0, tcp_out_segments()) {
                segments[i] += b.saturating_sub(a);
            }
            cpu[i] = match (cpu[i], cpu0, cpu1) {
                (Some(sum), Some(a), Some(b)) => Some((sum.0 + b.0 - a.0, sum.1 + b.1 - a.1)),
                _ => None,
            };
            if let (Some(a), Some(b)) = (own0, own1) {
                load_cpu[i] += (b.0 - a.0) + (b.1 - a.1);
            }
            if let (Some(a), Some(b)) = (machine0, machine1) {
                machine[i].0 += b.0.saturating_sub(a.0);
                machine[i].1 += b.1.saturating_sub(a.1);
            }
        }
    }

    if let Some(l) = &sat_layout {
        l.unpin_self();
        for pid in targets.iter().filter_map(Target::pid) {
            l.unpin(pid);
        }
    }

    // Latency: every target once per round, direct included, in a rotating order; the
    // same CPU layout for all (see the module comment).
    let layout = Layout::new(&args.pin);
    if let Some(l) = &layout {
        l.pin_self();
        for t in targets {
            if let Some(pid) = t.pid() {
                l.pin_proxy(pid);
            }
        }
    }
    // Real-time priority (SCHED_FIFO) for the load client, the upstream and every proxy
    // alike, so that other processes on a shared machine (builds) do not preempt them: the
    // latency measured is the proxies', not the machine's. At this rate they use a few % of
    // a core; the kernel keeps 5 % of every second for other processes anyway.
    let rt = !args.no_rt && sched::set_fifo(std::process::id(), RT_PRIORITY);
    if rt {
        for pid in targets.iter().filter_map(Target::pid) {
            sched::set_fifo(pid, RT_PRIORITY);
        }
    }
    let lat_dur = Duration::from_secs_f64(args.latency_secs);
    let lat_rounds = args.latency_rounds.max(1) as usize;
    // Per target, per round: (p50, p90, p99) in µs.
    let mut per_round = vec![Vec::<[f64; 3]>::new(); targets.len()];
    for round in 0..lat_rounds {
        for k in 0..targets.len() {
            let i = (k + round) % targets.len();
            let t = &targets[i];
            let lat = fixed_rate(t.addr, args.rate, lat_dur)
                .await
                .context(t.name)?;
            let p = percentiles(lat);
            per_round[i].push([
                p["p50_us"].as_f64().unwrap_or(f64::NAN),
                p["p90_us"].as_f64().unwrap_or(f64::NAN),
                p["p99_us"].as_f64().unwrap_or(f64::NAN),
            ]);
        }
    }
    if rt {
        sched::set_normal(std::process::id());
        for pid in targets.iter().filter_map(Target::pid) {
            sched::set_normal(pid);
        }
    }
    if let Some(l) = &layout {
        l.unpin_self();
    }
    let direct_i = targets.iter().position(|t| t.child.is_none());

    let mut out = serde_json::Map::new();
    for (i, t) in targets.iter().enumerate() {
        let n = requests[i];
        let rps = n as f64 / (slice.as_secs_f64() * rounds as f64);
        let per_req = |c: f64| (c / n as f64 * 1e8).round() / 100.0;
        let (cpu_per_req_us, user_sys) = match cpu[i] {
            Some((u, s)) if n > 0 && t.child.is_some() => (
                Some(per_req(u + s)),
                json!({ "user": per_req(u), "system": per_req(s) }),
            ),
            _ => (None, Value::Null),
        };
        let col = |j: usize| -> Vec<f64> { per_round[i].iter().map(|r| r[j]).collect() };
        let idle_share = (machine[i].1 > 0)
            .then(|| (machine[i].0 as f64 / machine[i].1 as f64 * 1000.0).round() / 1000.0);
        let mut r = json!({
            "target": t.addr.to_string(),
            "saturation": { "requests": n, "requests_per_second": rps.round() },
            "cpu_us_per_request": cpu_per_req_us,
            "cpu_us_per_request_user_system": user_sys,
            "load_client_and_upstream_cpu_us_per_request": (n > 0).then(|| per_req(load_cpu[i])),
            "machine_idle_share": idle_share,
            "tcp_segments_per_request": (n > 0)
                .then(|| (segments[i] as f64 / n as f64 * 100.0).round() / 100.0),
            "latency": {
                "requests_per_round": (args.rate as f64 * args.latency_secs) as u64,
                "rounds": lat_rounds,
                "p50_us": median(col(0)),
                "p90_us": median(col(1)),
                "p99_us": median(col(2)),
                "realtime_priority": rt,
                "p50_us_per_round": col(0),
                "p99_us_per_round": col(2),
            },
        });
        let o = r.as_object_mut().expect("object");
        if let Some(d) = direct_i
            && d != i
        {
            for (key, j) in [("added_p50_us", 0), ("added_p99_us", 2)] {
                let diffs: Vec<f64> = per_round[i]
                    .iter()
                    .zip(&per_round[d])
                    .map(|(m, b)| m[j] - b[j])
                    .collect();
                o.insert(key.into(), json!(median(diffs)));
            }
        }
        if let Some(note) = &t.note {
            o.insert("haproxy_config".into(), json!(note));
        }
        out.insert(t.name.into(), r);
    }
    Ok(out)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| !x.is_nan());
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

/// The latency runs' CPU layout: this process (load client and upstream) on one core, the
/// proxies on another.
struct Layout {
    allowed: Vec<usize>,
    load_cpu: usize,
    proxy_cpu: usize,
}

impl Layout {
    /// None for `none`, or `split` on a machine (or cpuset) with fewer than two cores.
    fn new(pin: &str) -> Option<Layout> {
        let allowed = sched::get(0)?;
        let (load_cpu, proxy_cpu) = match pin {
            "same" => (*allowed.last()?, *allowed.last()?),
            "split" if allowed.len() >= 2 => {
                (allowed[allowed.len() - 2], allowed[allowed.len() - 1])
            }
            _ => return None,
        };
        Some(Layout {
            load_cpu,
            proxy_cpu,
            allowed,
        })
    }
    fn pin_self(&self) {
        sched::set_process(std::process::id(), &[self.load_cpu]);
    }
    fn unpin_self(&self) {
        sched::set_process(std::process::id(), &self.allowed);
    }
    fn pin_proxy(&self, pid: u32) {
        sched::set_process(pid, &[self.proxy_cpu]);
    }
    fn unpin(&self, pid: u32) {
        sched::set_process(pid, &self.allowed);
    }
}

/// `--saturation-pin`: only `split` pins (the proxies on a core of their own).
fn saturation_layout(args: &Args) -> Option<Layout> {
    Layout::new(&args.saturation_pin).filter(|_| args.saturation_pin == "split")
}

fn describe(layout: Option<&Layout>) -> String {
    match layout {
        Some(l) if l.load_cpu == l.proxy_cpu => format!(
            "load client, upstream and proxy pinned to cpu {}",
            l.load_cpu
        ),
        Some(l) => format!(
            "load client and upstream pinned to cpu {}, the proxy to cpu {}",
            l.load_cpu, l.proxy_cpu
        ),
        None => "not pinned".into(),
    }
}

const RT_PRIORITY: i32 = 10;

/// CPU affinity and scheduling policy (glibc) for every thread of a process.
mod sched {
    /// A `cpu_set_t`: 1024 bits.
    type CpuSet = [u64; 16];

    #[repr(C)]
    struct SchedParam {
        sched_priority: i32,
    }
    const SCHED_OTHER: i32 = 0;
    const SCHED_FIFO: i32 = 1;

    unsafe extern "C" {
        fn sched_getaffinity(pid: i32, cpusetsize: usize, mask: *mut u64) -> i32;
        fn sched_setaffinity(pid: i32, cpusetsize: usize, mask: *const u64) -> i32;
        fn sched_setscheduler(pid: i32, policy: i32, param: *const SchedParam) -> i32;
    }

    fn threads(pid: u32) -> Vec<i32> {
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .map(|d| {
                d.flatten()
                    .filter_map(|t| t.file_name().to_str()?.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    fn set_policy(pid: u32, policy: i32, priority: i32) -> bool {
        let param = SchedParam {
            sched_priority: priority,
        };
        let mut all = true;
        for tid in threads(pid) {
            // SAFETY: `param` is a valid `struct sched_param` for the call's duration.
            all &= unsafe { sched_setscheduler(tid, policy, &param) } == 0;
        }
        all
    }

    /// SCHED_FIFO at `priority` for every thread of `pid`; false if not permitted.
    pub fn set_fifo(pid: u32, priority: i32) -> bool {
        set_policy(pid, SCHED_FIFO, priority)
    }

    /// Back to the normal policy.
    pub fn set_normal(pid: u32) {
        set_policy(pid, SCHED_OTHER, 0);
    }

    /// The CPUs thread `tid` may run on (0: the calling thread).
    pub fn get(tid: i32) -> Option<Vec<usize>> {
        let mut set: CpuSet = [0; 16];
        // SAFETY: `set` is a writable buffer of exactly the size passed.
        let rc = unsafe { sched_getaffinity(tid, std::mem::size_of::<CpuSet>(), set.as_mut_ptr()) };
        (rc == 0).then(|| {
            (0..1024)
                .filter(|&c| set[c / 64] & (1 << (c % 64)) != 0)
                .collect()
        })
    }

    /// Sets the CPUs of every thread of process `pid` (threads it starts later inherit it
    /// from the thread starting them). Best effort: a failure leaves that thread unpinned.
    pub fn set_process(pid: u32, cpus: &[usize]) {
        let mut set: CpuSet = [0; 16];
        for &c in cpus.iter().filter(|&&c| c < 1024) {
            set[c / 64] |= 1 << (c % 64);
        }
        for tid in threads(pid) {
            // SAFETY: `set` is a readable buffer of exactly the size passed.
            unsafe { sched_setaffinity(tid, std::mem::size_of::<CpuSet>(), set.as_ptr()) };
        }
    }
}

fn percentiles(mut lat: Vec<u64>) -> Value {
    lat.sort_unstable();
    let pct = |p: f64| -> f64 {
        if lat.is_empty() {
            return f64::NAN;
        }
        let i = ((lat.len() as f64 - 1.0) * p).round() as usize;
        lat[i] as f64
    };
    json!({
        "requests": lat.len(),
        "p50_us": pct(0.50),
        "p90_us": pct(0.90),
        "p99_us": pct(0.99),
        "max_us": lat.last().copied().unwrap_or(0),
    })
}

/// Ratios and goals, per protocol: agent/HAProxy and agent/direct throughput, CPU per
/// request agent/HAProxy, and p99 added over direct at the fixed rate. The goals (issue 3):
/// at least HAProxy's throughput, under 100 µs added at p99.
fn compare(results: &serde_json::Map<String, Value>) -> Value {
    let rps = |name: &str| results.get(name)?["saturation"]["requests_per_second"].as_f64();
    let cpu = |name: &str| results.get(name)?["cpu_us_per_request"].as_f64();
    let added = |name: &str, key: &str| results.get(name)?[key].as_f64();
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => json!((a / b * 1000.0).round() / 1000.0),
        _ => Value::Null,
    };
    let mut out = serde_json::Map::new();
    for proto in ["http", "tcp"] {
        let agent = format!("agent_{proto}");
        let haproxy = format!("haproxy_{proto}");
        if !results.contains_key(&agent) {
            continue;
        }
        let throughput_vs_haproxy = ratio(rps(&agent), rps(&haproxy));
        let added_p99 = added(&agent, "added_p99_us");
        out.insert(
            proto.into(),
            json!({
                "throughput_agent_vs_haproxy": throughput_vs_haproxy,
                "throughput_agent_vs_direct": ratio(rps(&agent), rps("direct")),
                "cpu_per_request_agent_vs_haproxy": ratio(cpu(&agent), cpu(&haproxy)),
                "agent_added_p50_us": added(&agent, "added_p50_us"),
                "agent_added_p99_us": added_p99,
                "haproxy_added_p50_us": added(&haproxy, "added_p50_us"),
                "haproxy_added_p99_us": added(&haproxy, "added_p99_us"),
                "goal_throughput_at_least_haproxy": throughput_vs_haproxy.as_f64().map(|r| r >= 1.0),
                "goal_added_p99_under_100us": added_p99.map(|a| a < 100.0),
            }),
        );
    }
    Value::Object(out)
}

fn haproxy_config(mode: &str, port: u16, upstream: SocketAddr, threads: usize) -> String {
    // http: like the agent, HAProxy adds X-Forwarded-For (the same work per request).
    let keepalive = if mode == "http" {
        "  option http-keep-alive\n  option forwardfor\n"
    } else {
        ""
    };
    format!(
        "global\n  maxconn 4096\n  nbthread {threads}\n\ndefaults\n  mode {mode}\n  timeout connect 5s\n  \
         timeout client 60s\n  timeout server 60s\n{keepalive}\nfrontend f\n  bind 127.0.0.1:{port}\n  \
         default_backend b\n\nbackend b\n  server s1 {upstream}\n"
    )
}

fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

fn latency_conns(rate: u64) -> usize {
    (rate / 100).clamp(4, 32) as usize
}

/// CPU seconds (utime, stime) of a process.
fn cpu_seconds(pid: u32) -> Option<(f64, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces) in parentheses.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    let hz = clock_ticks();
    Some((utime / hz, stime / hz))
}

/// TCP segments sent by the machine (`OutSegs` in /proc/net/snmp).
fn tcp_out_segments() -> Option<u64> {
    let snmp = std::fs::read_to_string("/proc/net/snmp").ok()?;
    let mut tcp = snmp.lines().filter(|l| l.starts_with("Tcp:"));
    let (names, values) = (tcp.next()?, tcp.next()?);
    let i = names.split_whitespace().position(|n| n == "OutSegs")?;
    values.split_whitespace().nth(i)?.parse().ok()
}

/// The machine's (idle + iowait, total) jiffies over all CPUs, from /proc/stat.
fn machine_jiffies() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let idle = f.get(3)? + f.get(4).copied().unwrap_or(0);
    Some((idle, f.iter().sum()))
}

fn clock_ticks() -> f64 {
    static HZ: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *HZ.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

struct Conn {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    async fn connect(addr: SocketAddr) -> anyhow::Result<Conn> {
        let s = TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        Ok(Conn {
            s,
            buf: Vec::with_capacity(4096),
        })
    }

    /// One request, one complete response (Content-Length bodies only).
    async fn roundtrip(&mut self) -> anyhow::Result<()> {
        self.s.write_all(REQ).await?;
        loop {
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = &self.buf[..end];
                if !head.starts_with(b"HTTP/1.1 200") {
                    bail!("bad response: {}", String::from_utf8_lossy(head));
                }
                let total = end + 4 + content_length(head).unwrap_or(0);
                while self.buf.len() < total {
                    self.fill().await?;
                }
                self.buf.drain(..total);
                return Ok(());
            }
            self.fill().await?;
        }
    }

    async fn fill(&mut self) -> anyhow::Result<()> {
        let mut b = [0u8; 4096];
        let n = self.s.read(&mut b).await?;
        if n == 0 {
            bail!("connection closed");
        }
        self.buf.extend_from_slice(&b[..n]);
        Ok(())
    }
}

fn content_length(head: &[u8]) -> Option<usize> {
    let text = std::str::from_utf8(head).ok()?;
    text.split("\r\n").find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case("content-length")
            .then(|| v.trim().parse().ok())
            .flatten()
    })
}

/// Closed loop: `conns` keep-alive connections, each sending back to back for `dur`.
async fn saturate(addr: SocketAddr, conns: usize, dur: Duration) -> anyhow::Result<u64> {
    let count = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let mut c = Conn::connect(addr).await?;
        let (count, stop) = (count.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                c.roundtrip().await?;
                count.fetch_add(1, Ordering::Relaxed);
            }
            anyhow::Ok(())
        }));
    }
    let start_count = count.load(Ordering::Relaxed);
    tokio::time::sleep(dur).await;
    let n = count.load(Ordering::Relaxed) - start_count;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(10), t)
            .await
            .context("load task stuck")???;
    }
    Ok(n)
}

/// Open loop at `rate` requests/s over a few connections; latency (µs) to each complete
/// response (see below for where it counts from).
async fn fixed_rate(addr: SocketAddr, rate: u64, dur: Duration) -> anyhow::Result<Vec<u64>> {
    let conns = latency_conns(rate);
    let per_conn = rate as f64 / conns as f64;
    let gap = Duration::from_secs_f64(1.0 / per_conn);
    let total_per_conn = (per_conn * dur.as_secs_f64()) as u64;
    let mut tasks = Vec::new();
    let mut conns_ready = Vec::new();
    for i in 0..conns {
        let mut c = Conn::connect(addr).await?;
        // Not timed: a proxy's first request on a connection also opens its upstream one.
        c.roundtrip().await?;
        let offset = gap.mul_f64(i as f64 / conns as f64);
        conns_ready.push((c, offset));
    }
    let start = tokio::time::Instant::now() + Duration::from_millis(20);
    for (mut c, offset) in conns_ready {
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(total_per_conn as usize);
            let mut prev_done = start;
            for k in 0..total_per_conn {
                let at = start + offset + gap.mul_f64(k as f64);
                tokio::time::sleep_until(at).await;
                // Latency counts from the scheduled time when the previous response made
                // this request late (no coordinated omission), else from the actual send:
                // the client's own timer lateness (~1 ms granularity) is not the server's.
                let from = if prev_done > at {
                    at
                } else {
                    tokio::time::Instant::now()
                };
                c.roundtrip().await?;
                prev_done = tokio::time::Instant::now();
                lat.push(prev_done.duration_since(from).as_micros() as u64);
            }
            anyhow::Ok(lat)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(
            tokio::time::timeout(dur + Duration::from_secs(30), t)
                .await
                .context("latency task stuck")???,
        );
    }
    Ok(all)
}

async fn start_upstream() -> anyhow::Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else {
                continue;
            };
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let svc = service_fn(|_req| async {
                    Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from_static(
                        b"hello",
                    ))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    Ok(addr)
}
