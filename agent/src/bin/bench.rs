//! `sluice-agent-bench`: the agent overhead benchmark (`make bench-agent`).
//!
//! In one run on loopback: an in-process hyper upstream; the load client hits it directly,
//! through `sluice-agent` (http and tcp mode) and through HAProxy (http and tcp mode), and
//! measures requests/s at saturation (closed loop, keep-alive), p50/p99 latency at a fixed
//! moderate rate (open loop: a request made late by a slow previous response counts from
//! its scheduled time, so a stall is not hidden), and the proxy process's CPU time per request (utime+stime from
//! /proc/<pid>/stat). Writes JSON.

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
    /// Seconds of each saturation run.
    #[arg(long, default_value_t = 5)]
    saturation_secs: u64,
    /// Requests/s of the fixed-rate latency run.
    #[arg(long, default_value_t = 2000)]
    rate: u64,
    /// Seconds of each latency run.
    #[arg(long, default_value_t = 5)]
    latency_secs: u64,
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

    let ports: Vec<u16> = (0..6).map(|_| free_port()).collect::<anyhow::Result<_>>()?;
    let mut results = serde_json::Map::new();

    let direct = load_rt.block_on(measure(&args, upstream, None))?;
    results.insert("direct".into(), direct.clone());

    for (name, proto, port, admin) in [
        ("agent_http", "http", ports[0], ports[1]),
        ("agent_tcp", "tcp", ports[2], ports[3]),
    ] {
        let child = Command::new(&args.agent)
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
            .env("SLUICE_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", args.agent.display()))?;
        let r = run_proxy(&args, &load_rt, child, port, &direct).context(name)?;
        results.insert(name.into(), r);
    }

    if let Some(haproxy) = &args.haproxy {
        let dir = std::env::temp_dir().join(format!("sluice-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        for (name, mode, port) in [
            ("haproxy_http", "http", ports[4]),
            ("haproxy_tcp", "tcp", ports[5]),
        ] {
            let cfg = dir.join(format!("{name}.cfg"));
            std::fs::write(&cfg, haproxy_config(mode, port, upstream))?;
            let child = Command::new(haproxy)
                .args(["-f", &cfg.to_string_lossy(), "-db"])
                .stdout(Stdio::null())
                .spawn()
                .with_context(|| format!("starting {}", haproxy.display()))?;
            let mut r = run_proxy(&args, &load_rt, child, port, &direct).context(name)?;
            if let Some(o) = r.as_object_mut() {
                o.insert(
                    "haproxy_config".into(),
                    json!(format!("mode {mode}, nbthread 2")),
                );
            }
            results.insert(name.into(), r);
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    let out = json!({
        "benchmark": "sluice-agent overhead on loopback",
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "config": {
            "saturation": { "connections": args.conns, "seconds": args.saturation_secs },
            "latency": { "rate_per_second": args.rate, "seconds": args.latency_secs,
                         "connections": latency_conns(args.rate) },
            "request": "GET / (HTTP/1.1 keep-alive), 5-byte response",
            "cpu_per_request": "utime+stime of the proxy process / requests it served",
        },
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

fn haproxy_config(mode: &str, port: u16, upstream: SocketAddr) -> String {
    let keepalive = if mode == "http" {
        "  option http-keep-alive\n"
    } else {
        ""
    };
    format!(
        "global\n  maxconn 4096\n  nbthread 2\n\ndefaults\n  mode {mode}\n  timeout connect 5s\n  \
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

/// Runs the measurements against a proxy child process, then stops it.
fn run_proxy(
    args: &Args,
    rt: &tokio::runtime::Runtime,
    mut child: Child,
    port: u16,
    direct: &Value,
) -> anyhow::Result<Value> {
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let pid = child.id();
    let r = rt.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(addr).await.is_err() {
            if Instant::now() > deadline {
                bail!("proxy on {addr} did not start");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        measure(args, addr, Some(pid)).await
    });
    let _ = child.kill();
    let _ = child.wait();
    let mut r = r?;
    if let Some(o) = r.as_object_mut() {
        for (key, p) in [("added_p50_us", "p50_us"), ("added_p99_us", "p99_us")] {
            if let (Some(mine), Some(base)) =
                (o["latency"][p].as_f64(), direct["latency"][p].as_f64())
            {
                o.insert(key.into(), json!(mine - base));
            }
        }
    }
    Ok(r)
}

/// CPU seconds (utime + stime) of a process.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces) in parentheses.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) / clock_ticks())
}

fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

async fn measure(args: &Args, addr: SocketAddr, pid: Option<u32>) -> anyhow::Result<Value> {
    // Warm up (connections, pools).
    saturate(addr, args.conns, Duration::from_millis(500)).await?;
    let cpu0 = pid.and_then(cpu_seconds);
    let sat_dur = Duration::from_secs(args.saturation_secs);
    let n = saturate(addr, args.conns, sat_dur).await?;
    let cpu1 = pid.and_then(cpu_seconds);
    let rps = n as f64 / sat_dur.as_secs_f64();
    let cpu_per_req_us = match (cpu0, cpu1) {
        (Some(a), Some(b)) if n > 0 => Some((b - a) / n as f64 * 1e6),
        _ => None,
    };
    let mut lat = fixed_rate(addr, args.rate, Duration::from_secs(args.latency_secs)).await?;
    lat.sort_unstable();
    let pct = |p: f64| -> f64 {
        if lat.is_empty() {
            return f64::NAN;
        }
        let i = ((lat.len() as f64 - 1.0) * p).round() as usize;
        lat[i] as f64
    };
    Ok(json!({
        "target": addr.to_string(),
        "saturation": { "requests": n, "requests_per_second": rps.round() },
        "latency": {
            "requests": lat.len(),
            "p50_us": pct(0.50),
            "p90_us": pct(0.90),
            "p99_us": pct(0.99),
            "max_us": lat.last().copied().unwrap_or(0),
        },
        "cpu_us_per_request": cpu_per_req_us.map(|c| (c * 100.0).round() / 100.0),
    }))
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
    let start = tokio::time::Instant::now() + Duration::from_millis(50);
    let mut tasks = Vec::new();
    for i in 0..conns {
        let mut c = Conn::connect(addr).await?;
        let offset = gap.mul_f64(i as f64 / conns as f64);
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
