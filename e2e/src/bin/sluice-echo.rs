//! `sluice-echo`: the test ground's example workload.
//!
//! An HTTP/1.1 and HTTP/2 server that answers every request with its version and pod name
//! (headers `x-version`, `x-pod-name` and the body), so the load generator can tell which
//! pod answered. Flags shape it like real services: added latency, an error rate, a slow
//! start (`/ready` answers 503 until warm) and what it does on SIGTERM: `exit` at once (the
//! naive app) or `graceful` (stop accepting, finish in-flight requests, close keep-alive
//! connections politely, then exit). Politely means: every HTTP/1.1 response after SIGTERM
//! carries `Connection: close`, so a busy connection ends right after a response, and only
//! connections that stayed idle for `--idle-close` are closed by the server. Closing an
//! idle connection at once instead races with the client's next request on it (the
//! request meets a closed socket), which is the keep-alive race a graceful server avoids.
//!
//! `GET /metrics` answers `sluice_echo_connections_total`: the connections that carried a
//! request other than `/ready`, `/healthz` and `/metrics` (the kubelet's probes and the
//! scrapes themselves are left out), so a bench can count the new connections a load
//! balancer opened to a pod that runs no agent.
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::{Parser, ValueEnum};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum OnSigterm {
    /// Exit at once: in-flight requests and keep-alive connections are cut.
    Exit,
    /// Stop accepting, finish in-flight requests, `Connection: close` on each connection's
    /// next response, close connections idle for `--idle-close`, exit.
    Graceful,
}

#[derive(Parser, Debug)]
#[command(
    name = "sluice-echo",
    about = "Echo app for Sluice's test ground",
    disable_version_flag = true
)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0:8080")]
    listen: SocketAddr,
    /// Version reported in `x-version` and the body (the image tag: see e2e/images.yaml).
    #[arg(long, default_value = "v1")]
    version: String,
    /// Pod name reported in `x-pod-name`; defaults to $POD_NAME, then the host name.
    #[arg(long, env = "POD_NAME")]
    pod_name: Option<String>,
    /// Extra latency added to every request.
    #[arg(long, default_value = "0ms", value_parser = humantime::parse_duration)]
    latency: Duration,
    /// Fraction of requests (0..=1) answered with 500.
    #[arg(long, default_value_t = 0.0)]
    error_rate: f64,
    /// Warm-up: `/ready` answers 503 for this long after start.
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// What to do on SIGTERM.
    #[arg(long, value_enum, default_value = "graceful")]
    on_sigterm: OnSigterm,
    /// In graceful mode, the longest it waits for connections to finish before exiting.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    drain_timeout: Duration,
    /// In graceful mode, how long a connection may stay idle after SIGTERM before the
    /// server closes it.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    idle_close: Duration,
}

struct State {
    version: String,
    pod: String,
    latency: Duration,
    error_rate: f64,
    warm_at: Instant,
    draining: AtomicBool,
    /// Connections that carried a request other than a probe or a scrape.
    connections: AtomicU64,
}

/// Paths that are not the app's traffic: the kubelet's probes and the scrapes.
fn is_probe_or_scrape(path: &str) -> bool {
    matches!(path, "/ready" | "/healthz" | "/metrics")
}

async fn handle(
    state: Arc<State>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path();
    let (status, body) = match path {
        "/healthz" => (StatusCode::OK, "ok\n".to_string()),
        "/metrics" => (
            StatusCode::OK,
            format!(
                "# HELP sluice_echo_connections_total Connections that carried a request other than /ready, /healthz and /metrics.\n\
                 # TYPE sluice_echo_connections_total counter\n\
                 sluice_echo_connections_total {}\n",
                state.connections.load(Ordering::Relaxed)
            ),
        ),
        "/ready" => {
            if state.draining.load(Ordering::Relaxed) {
                (StatusCode::SERVICE_UNAVAILABLE, "draining\n".to_string())
            } else if Instant::now() < state.warm_at {
                (StatusCode::SERVICE_UNAVAILABLE, "warming up\n".to_string())
            } else {
                (StatusCode::OK, "ready\n".to_string())
            }
        }
        _ => {
            if !state.latency.is_zero() {
                tokio::time::sleep(state.latency).await;
            }
            if state.error_rate > 0.0 && rand::random::<f64>() < state.error_rate {
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "injected error\n".to_string(),
                )
            } else {
                (
                    StatusCode::OK,
                    format!("version={} pod={}\n", state.version, state.pod),
                )
            }
        }
    };
    let mut resp = Response::builder();
    // HTTP/2 has GOAWAY for this (hyper's graceful shutdown sends it).
    if state.draining.load(Ordering::Relaxed) && req.version() <= hyper::Version::HTTP_11 {
        resp = resp.header("connection", "close");
    }
    let resp = resp
        .status(status)
        .header("x-version", &state.version)
        .header("x-pod-name", &state.pod)
        .header("content-type", "text/plain")
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts are valid");
    Ok(resp)
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let state = Arc::new(State {
        version: args.version.clone(),
        pod: args.pod_name.clone().unwrap_or_else(host_name),
        latency: args.latency,
        error_rate: args.error_rate,
        warm_at: Instant::now() + args.warmup,
        draining: AtomicBool::new(false),
        connections: AtomicU64::new(0),
    });
    let listener = TcpListener::bind(args.listen).await?;
    eprintln!(
        "sluice-echo {} pod={} listening on {} (on SIGTERM: {:?})",
        state.version, state.pod, args.listen, args.on_sigterm
    );
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let graceful = GracefulShutdown::new();
    let builder = auto::Builder::new(TokioExecutor::new());
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _) = match accepted {
                    Ok(a) => a,
                    Err(e) => { eprintln!("accept: {e}"); continue; }
                };
                let _ = stream.set_nodelay(true);
                let state = state.clone();
                let counted = AtomicBool::new(false);
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    if !is_probe_or_scrape(req.uri().path()) && !counted.swap(true, Ordering::Relaxed) {
                        state.connections.fetch_add(1, Ordering::Relaxed);
                    }
                    handle(state.clone(), req)
                });
                let conn = builder.serve_connection(TokioIo::new(stream), svc).into_owned();
                let conn = graceful.watch(conn);
                tokio::spawn(async move { let _ = conn.await; });
            }
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        }
    }
    match args.on_sigterm {
        OnSigterm::Exit => {
            eprintln!("SIGTERM: exiting at once");
            std::process::exit(0);
        }
        OnSigterm::Graceful => {
            state.draining.store(true, Ordering::Relaxed);
            drop(listener);
            eprintln!("SIGTERM: draining {} connections", graceful.count());
            let idle_deadline = Instant::now() + args.idle_close.min(args.drain_timeout);
            while graceful.count() > 0 && Instant::now() < idle_deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let left = args.drain_timeout.saturating_sub(args.idle_close);
            if tokio::time::timeout(left, graceful.shutdown())
                .await
                .is_err()
            {
                eprintln!("drain timeout reached; exiting with connections open");
            } else {
                eprintln!("drained; exiting");
            }
        }
    }
    Ok(())
}
