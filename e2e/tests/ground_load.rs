//! The load generator against the echo app on loopback (no cluster needed): HTTP/1.1 and
//! HTTP/2 pools, outcome recording, and the echo app's SIGTERM behaviours as clients see
//! them — `exit` cuts connections, `graceful` finishes what is in flight.
use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sluice_e2e::load::{ClosedBy, LoadConfig, Outcome, run_load};

fn free_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("binding a free port");
    l.local_addr().unwrap()
}

struct Echo {
    child: Child,
}

impl Echo {
    fn start(addr: SocketAddr, extra: &[&str]) -> Self {
        let child = Command::new(env!("CARGO_BIN_EXE_sluice-echo"))
            .args([
                "--listen",
                &addr.to_string(),
                "--pod-name",
                "p1",
                "--version",
                "v7",
            ])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting sluice-echo");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(
                Instant::now() < deadline,
                "sluice-echo did not listen on {addr}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Echo { child }
    }

    fn sigterm(&self) {
        // SAFETY: kill(2) on our own child.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Generous timeouts: these tests judge outcomes, and on a busy machine a stall must not
/// pass for a failure (nor a cut request for a stall).
fn cfg(target: SocketAddr, connections: usize, rate: f64, secs: u64) -> LoadConfig {
    LoadConfig {
        target,
        connections,
        rate,
        duration: Duration::from_secs(secs),
        timeout: Duration::from_secs(10),
        connect_timeout: Duration::from_secs(5),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_and_http2_pools_answer_and_name_the_pod() -> anyhow::Result<()> {
    let addr = free_addr();
    let _echo = Echo::start(addr, &[]);
    let r = run_load(cfg(addr, 8, 200.0, 1), None).await?;
    assert_eq!(r.requests, 200);
    assert_eq!(r.failed, 0, "{:?}", r.by_outcome);
    assert_eq!(r.by_pod.get("p1"), Some(&200));
    assert!(
        r.connections_opened <= 8,
        "keep-alive: {} connections",
        r.connections_opened
    );
    assert!(r.request_log.iter().all(|q| q.end_ms >= q.scheduled_ms));

    let r = run_load(
        LoadConfig {
            http2: true,
            streams: 4,
            ..cfg(addr, 2, 200.0, 1)
        },
        None,
    )
    .await?;
    assert_eq!(r.failed, 0, "{:?}", r.by_outcome);
    assert_eq!(
        r.connections_opened, 2,
        "HTTP/2 multiplexes on its connections"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_errors_count_as_5xx_and_a_dead_server_as_refused() -> anyhow::Result<()> {
    let addr = free_addr();
    let echo = Echo::start(addr, &["--error-rate", "1.0"]);
    let r = run_load(cfg(addr, 4, 100.0, 1), None).await?;
    assert_eq!(r.by_outcome[&Outcome::Status5xx], 100);
    drop(echo);
    let r = run_load(cfg(addr, 4, 50.0, 1), None).await?;
    assert_eq!(r.by_outcome[&Outcome::Refused], 50, "{:?}", r.by_outcome);
    assert_eq!(r.connections_opened, 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_on_sigterm_cuts_connections_and_later_requests_fail() -> anyhow::Result<()> {
    let addr = free_addr();
    let echo = Echo::start(addr, &["--on-sigterm", "exit"]);
    let load = tokio::spawn(run_load(cfg(addr, 10, 200.0, 2), None));
    tokio::time::sleep(Duration::from_millis(800)).await;
    echo.sigterm();
    let r = load.await??;
    assert!(r.by_outcome[&Outcome::Ok] > 50);
    assert!(
        r.failed > 100,
        "the server is gone for half the run: {:?}",
        r.by_outcome
    );
    assert!(r.conn_log.iter().any(|c| c.closed_by == ClosedBy::Server));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_sigterm_finishes_requests_in_flight() -> anyhow::Result<()> {
    let addr = free_addr();
    let echo = Echo::start(addr, &["--on-sigterm", "graceful", "--latency", "400ms"]);
    // A generous timeout: on a busy machine a stall must not pass for a cut request.
    let load = tokio::spawn(run_load(
        LoadConfig {
            timeout: Duration::from_secs(10),
            ..cfg(addr, 10, 20.0, 2)
        },
        None,
    ));
    tokio::time::sleep(Duration::from_millis(900)).await;
    let sigterm_ms = 900.0;
    echo.sigterm();
    let r = load.await??;
    let in_flight: Vec<_> = r
        .request_log
        .iter()
        .filter(|q| q.conn != 0 && q.start_ms < sigterm_ms - 20.0 && q.end_ms > sigterm_ms + 20.0)
        .collect();
    assert!(!in_flight.is_empty(), "no request was in flight at SIGTERM");
    assert!(
        in_flight
            .iter()
            .all(|q| q.outcome != Outcome::Reset && q.outcome != Outcome::Truncated),
        "graceful shutdown cut a request in flight: {in_flight:?}"
    );
    assert!(in_flight.iter().any(|q| q.outcome == Outcome::Ok));
    // Afterwards nothing listens any more.
    assert!(r.by_outcome[&Outcome::Refused] > 0, "{:?}", r.by_outcome);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_sigterm_ends_busy_keep_alive_connections_after_a_response() -> anyhow::Result<()>
{
    let addr = free_addr();
    let echo = Echo::start(addr, &["--on-sigterm", "graceful"]);
    // Busy keep-alive connections: each sends every 25 ms, so a server that closed idle
    // connections at once would meet requests on closing sockets.
    let load = tokio::spawn(run_load(cfg(addr, 20, 800.0, 2), None));
    tokio::time::sleep(Duration::from_millis(900)).await;
    echo.sigterm();
    let r = load.await??;
    assert!(r.by_outcome[&Outcome::Ok] > 300, "{:?}", r.by_outcome);
    // Every connection ended after a response; later requests find nobody listening.
    let cut: u64 = r
        .by_outcome
        .iter()
        .filter(|(o, _)| o.is_failure() && **o != Outcome::Refused)
        .map(|(_, n)| *n)
        .sum();
    assert_eq!(cut, 0, "requests cut by the shutdown: {:?}", r.by_outcome);
    assert!(r.by_outcome[&Outcome::Refused] > 0, "{:?}", r.by_outcome);
    assert!(r.conn_log.iter().any(|c| c.closed_by == ClosedBy::Server));
    Ok(())
}
