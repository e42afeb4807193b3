//! Integration tests on real loopback sockets: the agent in-process (and once as the built
//! binary), real clients, real upstreams. No timing assertions: waits are on conditions
//! with deadlines.

mod common;

use std::io;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use sluice_agent::config::{ObserveArgs, Protocol, ProxyArgs};
use sluice_agent::drain::Phase;
use sluice_agent::{start_observe, start_proxy};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const LIMIT: Duration = Duration::from_secs(20);

fn proxy_args(upstream: std::net::SocketAddr) -> ProxyArgs {
    let mut a = ProxyArgs::new(lo0(), upstream.to_string(), lo0());
    a.drain_token = Some(DRAIN_TOKEN.into());
    a.drain.quiet_period = Duration::from_millis(300);
    a.drain.propagation_timeout = Duration::from_secs(5);
    a.drain.drain_timeout = Duration::from_secs(15);
    a
}

/// Checks that no one-second window holds more closes than the rate allows (the pacer's
/// bound is 1.05 * rate + 1; a little slack for when the response carrying the close
/// reached the client).
fn assert_close_rate(mut times: Vec<Instant>, rate: u32) {
    times.sort();
    let max = (f64::from(rate) * 1.05).ceil() as usize + 1 + 4;
    for (i, t) in times.iter().enumerate() {
        let n = times[i..]
            .iter()
            .take_while(|u| u.duration_since(*t) < Duration::from_secs(1))
            .count();
        assert!(n <= max, "{n} closes within one second (limit {max})");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_drain_under_load_is_lossless_and_paced() {
    let upstream = start_upstream().await;
    let mut args = proxy_args(upstream);
    let rate = 50;
    args.drain.close_rate = rate;
    args.idle_close_after = Duration::from_millis(300);
    let agent = start_proxy(args).await.unwrap();
    let addr = agent.listen_addr.unwrap();
    assert_eq!(http(agent.admin_addr, "GET", "/ready").await.0, 200);

    const BUSY: usize = 100;
    const IDLE: usize = 10;
    let responses = Arc::new(AtomicU64::new(0));
    let closes = Arc::new(Mutex::new(Vec::new()));
    let mut clients = Vec::new();
    for i in 0..BUSY {
        let responses = responses.clone();
        let closes = closes.clone();
        clients.push(tokio::spawn(async move {
            let mut c = H1::connect(addr).await?;
            let mut n = 0u64;
            loop {
                // Every request written must get a complete response: any error here
                // (EOF mid-response, RST) fails the test.
                let path = if (n + i as u64).is_multiple_of(10) {
                    "/slow"
                } else {
                    "/"
                };
                let r = c.request(path).await?;
                n += 1;
                assert_eq!(r.status, 200);
                assert_eq!(r.body, b"hello");
                responses.fetch_add(1, Ordering::Relaxed);
                if r.close {
                    closes.lock().unwrap().push(Instant::now());
                    // The server closes right after: clean FIN, nothing more.
                    c.expect_eof().await?;
                    return io::Result::Ok(n);
                }
            }
        }));
    }
    // Idle keep-alive clients: one request, then silence; they must be closed while idle.
    let mut idle = Vec::new();
    for _ in 0..IDLE {
        idle.push(tokio::spawn(async move {
            let mut c = H1::connect(addr).await?;
            let r = c.request("/").await?;
            assert!(!r.close);
            c.expect_eof().await
        }));
    }
    wait_until(LIMIT, "all clients connected and busy", || {
        agent.active() == BUSY + IDLE && responses.load(Ordering::Relaxed) > 2_000
    })
    .await;

    let (code, report) = within(LIMIT, "drain", drain(agent.admin_addr)).await;
    assert_eq!(code, 200, "{report}");
    let report: serde_json::Value = serde_json::from_str(&report).unwrap();
    assert_eq!(report["outcome"], "complete");
    assert_eq!(report["phase"], "drained");
    assert_eq!(report["quiet_reached"], true);
    assert_eq!(report["connections_at_start"], BUSY + IDLE);

    for c in clients {
        let n = within(LIMIT, "client", c).await.unwrap();
        n.expect("busy client saw an error: a request was lost");
    }
    for c in idle {
        within(LIMIT, "idle client", c)
            .await
            .unwrap()
            .expect("idle client was not closed cleanly");
    }
    let closes = closes.lock().unwrap().clone();
    assert_eq!(
        closes.len(),
        BUSY,
        "every busy connection got Connection: close"
    );
    assert_close_rate(closes, rate);

    assert_eq!(http(agent.admin_addr, "GET", "/ready").await.0, 503);
    let m = http(agent.admin_addr, "GET", "/metrics").await.1;
    assert_eq!(metric(&m, "sluice_agent_drain_phase"), Some(3.0));
    assert_eq!(metric(&m, "sluice_agent_connections_active"), Some(0.0));
    assert_eq!(
        metric(&m, "sluice_agent_connections_accepted_total"),
        Some((BUSY + IDLE) as f64)
    );
    assert_eq!(
        metric(
            &m,
            "sluice_agent_connections_closed_total{reason=\"drain\"}"
        ),
        Some((BUSY + IDLE) as f64)
    );
    assert_eq!(metric(&m, "sluice_agent_requests_in_flight"), Some(0.0));
    let ok = metric(&m, "sluice_agent_requests_total{code=\"200\"}").unwrap();
    assert_eq!(ok as u64, responses.load(Ordering::Relaxed) + IDLE as u64);
    assert!(m.contains("sluice_agent_request_duration_seconds_bucket"));
    assert!(metric(&m, "sluice_agent_drain_duration_seconds{phase=\"total\"}").is_some());
    // Drained: the listener is closed.
    wait_until(LIMIT, "listener closed", || {
        std::net::TcpStream::connect(addr).is_err()
    })
    .await;
    agent.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_drain_sends_goaway_and_streams_complete() {
    let upstream = start_upstream().await;
    let mut args = proxy_args(upstream);
    args.drain.close_rate = 20;
    let agent = start_proxy(args).await.unwrap();
    let addr = agent.listen_addr.unwrap();

    const CONNS: usize = 10;
    const STREAMS: usize = 4;
    let completed = Arc::new(AtomicU64::new(0));
    let mut conns = Vec::new();
    for _ in 0..CONNS {
        let completed = completed.clone();
        conns.push(tokio::spawn(async move {
            let tcp = TcpStream::connect(addr).await.unwrap();
            let (client, conn) = h2::client::handshake(tcp).await.unwrap();
            let conn = tokio::spawn(conn);
            let mut workers = Vec::new();
            for _ in 0..STREAMS {
                let mut client = client.clone();
                let completed = completed.clone();
                workers.push(tokio::spawn(async move {
                    loop {
                        // Refused before sending (GOAWAY received): not a lost request.
                        let Ok(c) = client.clone().ready().await else {
                            return Ok::<_, h2::Error>(());
                        };
                        client = c;
                        let req = http::Request::get("http://test/slow").body(()).unwrap();
                        let Ok((resp, _)) = client.send_request(req, true) else {
                            return Ok(());
                        };
                        // Sent: it must complete.
                        let resp = resp.await?;
                        assert_eq!(resp.status(), 200);
                        let mut body = resp.into_body();
                        let mut got = Vec::new();
                        while let Some(chunk) = body.data().await {
                            let chunk = chunk?;
                            let _ = body.flow_control().release_capacity(chunk.len());
                            got.extend_from_slice(&chunk);
                        }
                        assert_eq!(got, b"hello");
                        completed.fetch_add(1, Ordering::Relaxed);
                    }
                }));
            }
            drop(client);
            for w in workers {
                w.await.unwrap().expect("a sent stream failed");
            }
            // The server ended the connection with GOAWAY (NO_ERROR): a clean end.
            conn.await.unwrap().expect("connection ended with an error");
        }));
    }
    wait_until(LIMIT, "h2 load", || {
        agent.active() == CONNS && completed.load(Ordering::Relaxed) > 100
    })
    .await;
    let (code, report) = within(LIMIT, "drain", drain(agent.admin_addr)).await;
    assert_eq!(code, 200, "{report}");
    for c in conns {
        within(LIMIT, "h2 connection", c).await.unwrap();
    }
    let m = http(agent.admin_addr, "GET", "/metrics").await.1;
    assert_eq!(
        metric(
            &m,
            "sluice_agent_connections_closed_total{reason=\"drain\"}"
        ),
        Some(CONNS as f64)
    );
    assert_eq!(
        metric(&m, "sluice_agent_requests_total{code=\"502\"}"),
        None
    );
    agent.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_mode_echo_drains_at_idle_moments() {
    let upstream = start_line_echo().await;
    let mut args = proxy_args(upstream);
    args.protocol = Protocol::Tcp;
    args.drain.close_rate = 100;
    // A connection is closed after 500 ms of silence in both directions. The clients
    // below pause either 5 ms (busy) or 1.5 s (idle): far from 500 ms on either side, so
    // a client never writes into a FIN that is already on its way.
    args.idle_close_after = Duration::from_millis(500);
    let agent = start_proxy(args).await.unwrap();
    let addr = agent.listen_addr.unwrap();

    const CLIENTS: usize = 20;
    let echoed = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    for i in 0..CLIENTS {
        let echoed = echoed.clone();
        clients.push(tokio::spawn(async move {
            let s = TcpStream::connect(addr).await?;
            let (rd, mut wr) = s.into_split();
            let mut rd = BufReader::new(rd);
            let mut n = 0u64;
            loop {
                let pause = if n % 5 == 4 { 1500 } else { 5 };
                // Before writing: has the server said goodbye?
                let mut line = String::new();
                match tokio::time::timeout(Duration::from_millis(pause), rd.read_line(&mut line))
                    .await
                {
                    Err(_) => {}
                    Ok(Ok(0)) => {
                        // FIN while idle: what the agent promises. Say goodbye too.
                        wr.shutdown().await?;
                        return io::Result::Ok(n);
                    }
                    Ok(r) => panic!("unexpected read while idle: {r:?} {line:?}"),
                }
                let msg = format!("client {i} line {n}\n");
                wr.write_all(msg.as_bytes()).await?;
                let mut back = String::new();
                rd.read_line(&mut back).await?;
                assert_eq!(back, msg, "every line sent is echoed back");
                n += 1;
                echoed.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    wait_until(LIMIT, "tcp clients", || {
        agent.active() == CLIENTS && echoed.load(Ordering::Relaxed) > 100
    })
    .await;
    let (code, report) = within(LIMIT, "drain", drain(agent.admin_addr)).await;
    assert_eq!(code, 200, "{report}");
    for c in clients {
        within(LIMIT, "tcp client", c)
            .await
            .unwrap()
            .expect("tcp client error");
    }
    // Closing stopped the listener in tcp mode.
    assert!(TcpStream::connect(addr).await.is_err());
    let m = http(agent.admin_addr, "GET", "/metrics").await.1;
    assert_eq!(
        metric(
            &m,
            "sluice_agent_connections_closed_total{reason=\"drain\"}"
        ),
        Some(CLIENTS as f64)
    );
    agent.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn observe_mode_counts_connections_and_waits_for_them() {
    // A plain server that holds its connections until the client leaves.
    let server = tokio::net::TcpListener::bind(lo0()).await.unwrap();
    let port = server.local_addr().unwrap().port();
    let accepted = Arc::new(AtomicUsize::new(0));
    let acc = accepted.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = server.accept().await else {
                continue;
            };
            acc.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(async move {
                let mut b = [0u8; 16];
                while let Ok(n) = tokio::io::AsyncReadExt::read(&mut s, &mut b).await {
                    if n == 0 {
                        break;
                    }
                }
            });
        }
    });
    let mut args = ObserveArgs::new(port, lo0());
    args.drain_token = Some(DRAIN_TOKEN.into());
    args.poll_interval = Duration::from_millis(20);
    args.drain.quiet_period = Duration::from_millis(300);
    args.drain.drain_timeout = Duration::from_secs(15);
    let agent = start_observe(args).await.unwrap();
    let admin = agent.admin_addr;
    let metrics = || async move { http(admin, "GET", "/metrics").await.1 };
    assert_eq!(http(admin, "GET", "/ready").await.0, 200);

    let mut conns = Vec::new();
    for _ in 0..5 {
        conns.push(TcpStream::connect(("127.0.0.1", port)).await.unwrap());
    }
    wait_until(LIMIT, "server accepted", || {
        accepted.load(Ordering::Relaxed) == 5
    })
    .await;
    let deadline = Instant::now() + LIMIT;
    loop {
        let m = metrics().await;
        if metric(&m, "sluice_agent_connections_active") == Some(5.0)
            && metric(&m, "sluice_agent_connections_accepted_total") == Some(5.0)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "observe did not see 5 connections:\n{m}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    conns.truncate(3);
    wait_until(LIMIT, "two connections gone", || agent.active() == 3).await;

    // Drain: quiet comes, then it waits for the 3 remaining to leave on their own.
    let drain = tokio::spawn(drain(admin));
    let mut phase = agent.drainer.subscribe();
    within(
        LIMIT,
        "closing phase",
        phase.wait_for(|p| *p == Phase::Closing),
    )
    .await
    .unwrap();
    assert_eq!(http(admin, "GET", "/ready").await.0, 503);
    assert_eq!(agent.active(), 3, "observe mode cannot close connections");
    conns.clear();
    let (code, report) = within(LIMIT, "drain", drain).await.unwrap();
    assert_eq!(code, 200, "{report}");
    let m = metrics().await;
    assert_eq!(
        metric(&m, "sluice_agent_connections_accepted_total"),
        Some(5.0)
    );
    assert_eq!(metric(&m, "sluice_agent_drain_phase"), Some(3.0));
    agent.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_the_right_answer_and_others_are_unaffected() {
    let upstream = start_upstream().await;
    let mut args = proxy_args(upstream);
    args.header_read_timeout = Duration::from_millis(300);
    let agent = start_proxy(args).await.unwrap();
    let addr = agent.listen_addr.unwrap();

    // Malformed request: 400, then the connection closes.
    let mut bad = H1::connect(addr).await.unwrap();
    bad.s.write_all(b"THIS IS NOT HTTP\r\n\r\n").await.unwrap();
    let r = within(LIMIT, "400", bad.read_response()).await.unwrap();
    assert_eq!(r.status, 400);

    // A client that never sends: closed (FIN) after the header read timeout.
    let mut silent = H1::connect(addr).await.unwrap();
    within(LIMIT, "silent client closed", silent.expect_eof())
        .await
        .unwrap();
    // A client that sends half a request head and stalls: closed too.
    let mut slow = H1::connect(addr).await.unwrap();
    slow.s
        .write_all(b"GET / HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    let r = within(LIMIT, "slowloris", slow.read_response()).await;
    assert!(r.is_err() || r.unwrap().status == 408);

    // (hyper's header read timeout also bounds a keep-alive connection's idle time, so
    // this well-behaved client starts now.)
    let mut good = H1::connect(addr).await.unwrap();
    assert_eq!(good.request("/").await.unwrap().status, 200);
    // The upstream resets this request: 502; the same connection keeps working.
    let r = within(LIMIT, "reset", good.request("/reset"))
        .await
        .unwrap();
    assert_eq!(r.status, 502);
    assert_eq!(good.request("/").await.unwrap().status, 200);

    // Many concurrent clients while others trigger resets: all the good ones get 200.
    let mut tasks = Vec::new();
    for i in 0..20u32 {
        tasks.push(tokio::spawn(async move {
            let mut c = H1::connect(addr).await.unwrap();
            for _ in 0..20 {
                let path = if i.is_multiple_of(4) { "/reset" } else { "/" };
                let r = c.request(path).await.unwrap();
                assert_eq!(r.status, if i.is_multiple_of(4) { 502 } else { 200 });
            }
        }));
    }
    for t in tasks {
        within(LIMIT, "mixed clients", t).await.unwrap();
    }
    assert_eq!(good.request("/").await.unwrap().status, 200);
    let m = http(agent.admin_addr, "GET", "/metrics").await.1;
    assert!(
        metric(
            &m,
            "sluice_agent_connections_closed_total{reason=\"header_timeout\"}"
        ) >= Some(1.0)
    );
    assert!(metric(&m, "sluice_agent_requests_total{code=\"502\"}") >= Some(101.0));
    agent.abort();

    // Upstream down: 502, and not ready.
    let down = start_proxy(proxy_args(dead_port().await)).await.unwrap();
    let (code, _) = http(down.listen_addr.unwrap(), "GET", "/").await;
    assert_eq!(code, 502);
    assert_eq!(http(down.admin_addr, "GET", "/ready").await.0, 503);
    assert_eq!(http(down.admin_addr, "GET", "/healthz").await.0, 200);
    assert_eq!(http(down.admin_addr, "GET", "/nope").await.0, 404);
    assert_eq!(http(down.admin_addr, "DELETE", "/drain").await.0, 405);
    down.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_drains_on_sigterm_and_exits_zero() {
    let upstream = start_upstream().await;
    let listen = free_port().await;
    let admin = free_port().await;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_sluice-agent"))
        .args([
            "proxy",
            "--listen",
            &listen.to_string(),
            "--upstream",
            &upstream.to_string(),
            "--admin",
            &admin.to_string(),
            "--quiet-period",
            "200ms",
            "--drain-timeout",
            "10s",
        ])
        .env("SLUICE_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + LIMIT;
    while TcpStream::connect(admin).await.is_err() || TcpStream::connect(listen).await.is_err() {
        assert!(Instant::now() < deadline, "agent did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(http(admin, "GET", "/ready").await.0, 200);
    let mut c = H1::connect(listen).await.unwrap();
    assert_eq!(c.request("/").await.unwrap().status, 200);

    let pid = child.id().unwrap().to_string();
    let st = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(st.success());
    // The idle keep-alive connection is closed politely, then the agent exits 0.
    within(LIMIT, "idle connection closed", c.expect_eof())
        .await
        .unwrap();
    let status = within(LIMIT, "agent exit", child.wait()).await.unwrap();
    assert!(status.success(), "{status:?}");
}

/// The kubelet's preStop reaches the agent from whatever address the CNI gives the host
/// side, and an SSRF in the application comes from loopback: only the token counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_without_the_token_is_refused_loudly_and_changes_nothing() {
    let upstream = start_upstream().await;
    let agent = start_proxy(proxy_args(upstream)).await.unwrap();
    let admin = agent.admin_addr;
    // From loopback, without a token and with a wrong one: refused, still serving.
    assert_eq!(http(admin, "POST", "/drain").await.0, 403);
    assert_eq!(http(admin, "GET", "/drain").await.0, 403);
    let mut c = H1::connect(admin).await.unwrap();
    c.send_with("GET", "/drain", "x-sluice-drain-token: not-it\r\n")
        .await
        .unwrap();
    assert_eq!(c.read_response().await.unwrap().status, 403);
    assert_eq!(http(admin, "GET", "/ready").await.0, 200);
    let m = http(admin, "GET", "/metrics").await.1;
    assert_eq!(
        metric(
            &m,
            "sluice_agent_drain_refused_total{reason=\"missing_token\"}"
        ),
        Some(2.0)
    );
    assert_eq!(
        metric(
            &m,
            "sluice_agent_drain_refused_total{reason=\"wrong_token\"}"
        ),
        Some(1.0)
    );
    assert_eq!(metric(&m, "sluice_agent_drain_phase"), Some(0.0));
    // With the token (GET, as the kubelet's httpGet hook sends it): drains.
    let mut c = H1::connect(admin).await.unwrap();
    let header = format!("x-sluice-drain-token: {DRAIN_TOKEN}\r\n");
    c.send_with("GET", "/drain", &header).await.unwrap();
    let r = within(LIMIT, "drain", c.read_response()).await.unwrap();
    assert_eq!(r.status, 200);
    agent.abort();
}
