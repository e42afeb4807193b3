//! The agent under abusive, slow and faulty peers, on loopback: each test reproduces one
//! attack or fault with raw sockets (or hand-written HTTP/2 frames) and checks what the
//! agent does about it. No timing assertions: waits are on conditions with deadlines.

mod common;

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use sluice_agent::RunningAgent;
use sluice_agent::config::{Protocol, ProxyArgs};
use sluice_agent::start_proxy;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const LIMIT: Duration = Duration::from_secs(10);

fn args(upstream: SocketAddr) -> ProxyArgs {
    let mut a = ProxyArgs::new(lo0(), upstream.to_string(), lo0());
    a.drain_token = Some(DRAIN_TOKEN.into());
    a.drain.quiet_period = Duration::from_millis(100);
    a.drain.propagation_timeout = Duration::from_secs(5);
    a.drain.drain_timeout = Duration::from_secs(15);
    a
}

async fn metrics(agent: &RunningAgent) -> String {
    http(agent.admin_addr, "GET", "/metrics").await.1
}

/// Waits until the metric sample has the value.
async fn wait_metric(agent: &RunningAgent, sample: &str, value: f64) {
    let deadline = tokio::time::Instant::now() + LIMIT;
    loop {
        let m = metrics(agent).await;
        if metric(&m, sample) == Some(value) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{sample} never became {value}:\n{m}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An upstream that reads requests and never answers; counts its connections.
async fn holding_upstream() -> (SocketAddr, Arc<AtomicUsize>) {
    let l = TcpListener::bind(lo0()).await.unwrap();
    let addr = l.local_addr().unwrap();
    let n = Arc::new(AtomicUsize::new(0));
    let c = n.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            c.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(async move {
                let mut b = [0u8; 4096];
                while let Ok(n) = s.read(&mut b).await {
                    if n == 0 {
                        break;
                    }
                }
            });
        }
    });
    (addr, n)
}

// ---- raw HTTP/2 ---------------------------------------------------------------------

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const REFUSED_STREAM: u32 = 0x7;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// HEADERS (END_HEADERS | END_STREAM) for `GET http://test/`, HPACK from the static table
/// and one literal without indexing.
fn get_headers(stream: u32) -> Vec<u8> {
    let mut block = vec![0x82, 0x86, 0x84, 0x01, 4];
    block.extend_from_slice(b"test");
    frame(HEADERS, 0x5, stream, &block)
}

struct RawH2 {
    s: TcpStream,
}

impl RawH2 {
    /// Preface and an empty SETTINGS; the server's SETTINGS are acknowledged as they come.
    async fn connect(addr: SocketAddr) -> RawH2 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(PREFACE).await.unwrap();
        s.write_all(&frame(SETTINGS, 0, 0, &[])).await.unwrap();
        RawH2 { s }
    }

    /// The next frame: (type, flags, stream, payload); None at EOF (or a reset).
    async fn read_frame(&mut self) -> Option<(u8, u8, u32, Vec<u8>)> {
        let mut h = [0u8; 9];
        self.s.read_exact(&mut h).await.ok()?;
        let len = (usize::from(h[0]) << 16) | (usize::from(h[1]) << 8) | usize::from(h[2]);
        let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
        let mut payload = vec![0u8; len];
        self.s.read_exact(&mut payload).await.ok()?;
        if h[3] == SETTINGS && h[4] & 0x1 == 0 {
            let _ = self.s.write_all(&frame(SETTINGS, 0x1, 0, &[])).await;
        }
        Some((h[3], h[4], stream, payload))
    }
}

// ---- 1. limits ----------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_over_max_connections_is_closed_and_the_others_keep_working() {
    let upstream = start_upstream().await;
    let mut a = args(upstream);
    a.limits.max_connections = 3;
    let agent = start_proxy(a).await.unwrap();
    let addr = agent.listen_addr.unwrap();
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut c = H1::connect(addr).await.unwrap();
        assert_eq!(c.request("/").await.unwrap().status, 200);
        held.push(c);
    }
    wait_until(LIMIT, "3 connections", || agent.active() == 3).await;
    // The fourth: accepted and closed at once, with FIN, without an answer.
    let mut over = H1::connect(addr).await.unwrap();
    over.send("GET", "/").await.unwrap();
    within(LIMIT, "the fourth closed", over.expect_eof())
        .await
        .expect("closed with FIN, nothing sent");
    // The others are unaffected.
    for c in &mut held {
        assert_eq!(c.request("/").await.unwrap().status, 200);
    }
    wait_metric(&agent, "sluice_agent_connections_shed_total", 1.0).await;
    // Below the limit again: served.
    held.pop();
    wait_until(LIMIT, "one left", || agent.active() == 2).await;
    let mut again = H1::connect(addr).await.unwrap();
    assert_eq!(again.request("/").await.unwrap().status, 200);
    agent.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_streams_over_the_limit_are_refused() {
    let (upstream, _) = holding_upstream().await;
    // The default limit (100): 101 streams held open by the upstream.
    let agent = start_proxy(args(upstream)).await.unwrap();
    let mut c = RawH2::connect(agent.listen_addr.unwrap()).await;
    let mut all = Vec::new();
    for i in 0..101u32 {
        all.extend(get_headers(2 * i + 1));
    }
    c.s.write_all(&all).await.unwrap();
    let refused = within(LIMIT, "RST_STREAM REFUSED_STREAM", async {
        loop {
            let (kind, _, stream, payload) = c.read_frame().await.expect("connection open");
            if kind == RST_STREAM && payload[..] == REFUSED_STREAM.to_be_bytes() {
                return stream;
            }
        }
    })
    .await;
    assert_eq!(refused, 201, "the 101st stream is refused");
    agent.abort();
}

/// An HTTP/1.1 upstream that answers after 50 ms and records how many connections it had
/// open at once.
async fn counting_upstream() -> (SocketAddr, Arc<AtomicUsize>) {
    let l = TcpListener::bind(lo0()).await.unwrap();
    let addr = l.local_addr().unwrap();
    let open = Arc::new(AtomicUsize::new(0));
    let max = Arc::new(AtomicUsize::new(0));
    let m = max.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let n = open.fetch_add(1, Ordering::AcqRel) + 1;
            m.fetch_max(n, Ordering::AcqRel);
            let open = open.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|_req| async {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
                open.fetch_sub(1, Ordering::AcqRel);
            });
        }
    });
    (addr, max)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_client_opens_at_most_its_share_of_upstream_connections() {
    let (upstream, max_open) = counting_upstream().await;
    let mut a = args(upstream);
    a.limits.upstream_connections_per_client = 4;
    let agent = start_proxy(a).await.unwrap();
    let io = TokioIo::new(
        TcpStream::connect(agent.listen_addr.unwrap())
            .await
            .unwrap(),
    );
    let (tx, conn) = hyper::client::conn::http2::handshake::<_, _, http_body_util::Empty<Bytes>>(
        TokioExecutor::new(),
        io,
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let mut streams = Vec::new();
    for _ in 0..24 {
        let mut tx = tx.clone();
        streams.push(tokio::spawn(async move {
            let req = Request::get("http://test/x")
                .body(http_body_util::Empty::new())
                .unwrap();
            let r = tx.send_request(req).await.unwrap();
            assert_eq!(r.status(), 200);
            r.into_body().collect().await.unwrap().to_bytes()
        }));
    }
    for s in streams {
        assert_eq!(&within(LIMIT, "stream", s).await.unwrap()[..], b"ok");
    }
    let n = max_open.load(Ordering::Acquire);
    assert!(n <= 4, "{n} upstream connections open at once");
    agent.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_connections_get_the_header_read_timeout_until_their_first_request() {
    let upstream = start_upstream().await;
    let mut a = args(upstream);
    a.header_read_timeout = Duration::from_millis(300);
    let agent = start_proxy(a).await.unwrap();
    let addr = agent.listen_addr.unwrap();
    // One byte of the preface…
    let mut p = TcpStream::connect(addr).await.unwrap();
    p.write_all(b"P").await.unwrap();
    // …or the whole preface and SETTINGS, then silence.
    let mut quiet = RawH2::connect(addr).await;
    let mut rest = Vec::new();
    within(LIMIT, "'P' closed", p.read_to_end(&mut rest))
        .await
        .expect("FIN");
    within(LIMIT, "silent h2 connection closed", async {
        while quiet.read_frame().await.is_some() {}
    })
    .await;
    wait_until(LIMIT, "both gone", || agent.active() == 0).await;
    let m = metrics(&agent).await;
    assert_eq!(
        metric(
            &m,
            "sluice_agent_connections_closed_total{reason=\"header_timeout\"}"
        ),
        Some(2.0)
    );
    agent.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_http2_connections_get_goaway() {
    let upstream = start_upstream().await;
    let mut a = args(upstream);
    a.limits.http2_idle_timeout = Duration::from_millis(300);
    let agent = start_proxy(a).await.unwrap();
    let tcp = TcpStream::connect(agent.listen_addr.unwrap())
        .await
        .unwrap();
    let (client, conn) = h2::client::handshake(tcp).await.unwrap();
    let conn = tokio::spawn(conn);
    let mut client = client.ready().await.unwrap();
    let (resp, _) = client
        .send_request(Request::get("http://test/").body(()).unwrap(), true)
        .unwrap();
    assert_eq!(resp.await.unwrap().status(), 200);
    // Idle from now on (the client keeps its handle: it would end the connection itself
    // once none is left): GOAWAY, a clean end of the connection.
    within(LIMIT, "GOAWAY", conn)
        .await
        .unwrap()
        .expect("ended cleanly");
    wait_metric(
        &agent,
        "sluice_agent_connections_closed_total{reason=\"idle_timeout\"}",
        1.0,
    )
    .await;
    drop(client);
    agent.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_peer_that_stops_answering_pings_is_closed() {
    let (upstream, _) = holding_upstream().await;
    let mut a = args(upstream);
    a.limits.http2_keepalive_interval = Duration::from_millis(200);
    a.limits.http2_keepalive_timeout = Duration::from_millis(200);
    let agent = start_proxy(a).await.unwrap();
    let mut c = RawH2::connect(agent.listen_addr.unwrap()).await;
    // A stream in flight (the upstream never answers), and PINGs never acknowledged.
    c.s.write_all(&get_headers(1)).await.unwrap();
    let mut pinged = false;
    within(LIMIT, "connection closed", async {
        while let Some((kind, flags, _, _)) = c.read_frame().await {
            pinged |= kind == PING && flags & 0x1 == 0;
        }
    })
    .await;
    assert!(pinged, "the agent sent a PING first");
    wait_until(LIMIT, "gone", || agent.active() == 0).await;
    agent.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_body_that_stalls_closes_the_connection() {
    let upstream = start_upstream().await;
    let mut a = args(upstream);
    a.limits.body_timeout = Duration::from_millis(300);
    let agent = start_proxy(a).await.unwrap();
    let mut c = H1::connect(agent.listen_addr.unwrap()).await.unwrap();
    c.s.write_all(b"POST /x HTTP/1.1\r\nhost: test\r\ncontent-length: 100\r\n\r\n0123456789")
        .await
        .unwrap();
    // The other 90 bytes never come.
    wait_until(LIMIT, "stalled upload closed", || agent.active() == 0).await;
    wait_metric(
        &agent,
        "sluice_agent_connections_closed_total{reason=\"body_timeout\"}",
        1.0,
    )
    .await;
    agent.abort();
}

/// An upstream answering every request with an endless chunked body (bounded at 1 GiB).
async fn flooding_h1_upstream() -> SocketAddr {
    let l = TcpListener::bind(lo0()).await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut b = [0u8; 4096];
                let _ = s.read(&mut b).await;
                let head = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n";
                if s.write_all(head).await.is_err() {
                    return;
                }
                let mut chunk = b"10000\r\n".to_vec();
                chunk.extend(vec![b'x'; 0x10000]);
                chunk.extend_from_slice(b"\r\n");
                for _ in 0..(1 << 14) {
                    if s.write_all(&chunk).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_a_response_is_closed() {
    let upstream = flooding_h1_upstream().await;
    let mut a = args(upstream);
    a.limits.body_timeout = Duration::from_millis(300);
    let agent = start_proxy(a).await.unwrap();
    let mut c = H1::connect(agent.listen_addr.unwrap()).await.unwrap();
    c.send("GET", "/").await.unwrap();
    // Never reads.
    wait_until(LIMIT, "slow reader closed", || agent.active() == 0).await;
    wait_metric(
        &agent,
        "sluice_agent_connections_closed_total{reason=\"body_timeout\"}",
        1.0,
    )
    .await;
    // Not a server error: the client did not take the body.
    wait_metric(&agent, "sluice_agent_requests_total{code=\"499\"}", 1.0).await;
    drop(c);
    agent.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_never_answers_gets_504_with_an_upstream_timeout() {
    let (upstream, _) = holding_upstream().await;
    let mut a = args(upstream);
    a.limits.upstream_timeout = Duration::from_millis(300);
    let agent = start_proxy(a).await.unwrap();
    let mut c = H1::connect(agent.listen_addr.unwrap()).await.unwrap();
    let r = within(LIMIT, "504", c.request("/")).await.unwrap();
    assert_eq!(r.status, 504);
    wait_metric(
        &agent,
        "sluice_agent_upstream_errors_total{kind=\"timeout\"}",
        1.0,
    )
    .await;
    agent.abort();
}

/// The `tr` (timer) field of the IPv4 socket from `local` to `remote` in /proc/net/tcp:
/// 2 is the keep-alive timer.
fn tcp_timer(local: SocketAddr, remote: SocketAddr) -> Option<u8> {
    let hex = |a: SocketAddr| {
        let SocketAddr::V4(v4) = a else {
            panic!("ipv4")
        };
        format!(
            "{:08X}:{:04X}",
            u32::from_le_bytes(v4.ip().octets()),
            v4.port()
        )
    };
    let (l, r) = (hex(local), hex(remote));
    let text = std::fs::read_to_string("/proc/net/tcp").ok()?;
    text.lines().find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        (f.len() > 5 && f[1] == l && f[2] == r)
            .then(|| f[5].split(':').next()?.parse().ok())
            .flatten()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_and_upstream_sockets_have_tcp_keepalive() {
    for protocol in [Protocol::Http, Protocol::Tcp] {
        let upstream = start_line_echo().await;
        let mut a = args(upstream);
        a.protocol = protocol;
        let agent = start_proxy(a).await.unwrap();
        let listen = agent.listen_addr.unwrap();
        let mut c = TcpStream::connect(listen).await.unwrap();
        if protocol == Protocol::Tcp {
            c.write_all(b"hi\n").await.unwrap();
            let mut b = [0u8; 3];
            c.read_exact(&mut b).await.unwrap();
        } else {
            // Any byte: the agent then holds the connection (a partial request head).
            c.write_all(b"G").await.unwrap();
        }
        let me = c.local_addr().unwrap();
        wait_until(LIMIT, "agent's client socket", || {
            tcp_timer(listen, me).is_some()
        })
        .await;
        assert_eq!(
            tcp_timer(listen, me),
            Some(2),
            "{protocol:?}: keep-alive timer"
        );
        if protocol == Protocol::Tcp {
            // The upstream socket: the one connection to the echo server.
            let text = std::fs::read_to_string("/proc/net/tcp").unwrap();
            let port = format!(":{:04X}", upstream.port());
            let timers: Vec<&str> = text
                .lines()
                .filter_map(|l| {
                    let f: Vec<&str> = l.split_whitespace().collect();
                    (f.len() > 5 && f[2].ends_with(&port) && f[3] == "01").then_some(f[5])
                })
                .collect();
            assert_eq!(timers.len(), 1, "{timers:?}");
            assert!(timers[0].starts_with("02:"), "{timers:?}");
        }
        agent.abort();
    }
}

// ---- 2. tcp mode ----------------------------------------------------------------------

/// An upstream that sends without end (bounded at 1 GiB) and reads nothing.
async fn flooding_tcp_upstream() -> SocketAddr {
    let l = TcpListener::bind(lo0()).await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let chunk = vec![b'x'; 0x10000];
                for _ in 0..(1 << 14) {
                    if s.write_all(&chunk).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_a_client_that_stops_reading_cannot_hold_the_drain_past_its_deadline() {
    let upstream = flooding_tcp_upstream().await;
    let mut a = args(upstream);
    a.protocol = Protocol::Tcp;
    a.drain.drain_timeout = Duration::from_millis(800);
    let agent = start_proxy(a).await.unwrap();
    let c = TcpStream::connect(agent.listen_addr.unwrap())
        .await
        .unwrap();
    wait_until(LIMIT, "connected", || agent.active() == 1).await;
    // The client never reads: the agent's writes towards it block.
    let (code, _) = within(LIMIT, "drain", drain(agent.admin_addr)).await;
    assert_eq!(code, 504);
    wait_until(LIMIT, "connection ended at the deadline", || {
        agent.active() == 0
    })
    .await;
    drop(c);
    agent.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_a_reset_is_passed_on_as_a_reset() {
    // The upstream resets after the first line.
    let l = TcpListener::bind(lo0()).await.unwrap();
    let upstream = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut b = [0u8; 64];
                let _ = s.read(&mut b).await;
                let _ = s.set_zero_linger();
                drop(s);
            });
        }
    });
    let mut a = args(upstream);
    a.protocol = Protocol::Tcp;
    let agent = start_proxy(a).await.unwrap();
    let mut c = TcpStream::connect(agent.listen_addr.unwrap())
        .await
        .unwrap();
    c.write_all(b"hello\n").await.unwrap();
    let mut b = [0u8; 16];
    let r = within(LIMIT, "reset", c.read(&mut b)).await;
    assert_eq!(
        r.map_err(|e| e.kind()),
        Err(io::ErrorKind::ConnectionReset),
        "the upstream's RST reaches the client as RST, not as a clean FIN"
    );
    agent.abort();

    // The other way: the client resets, the upstream sees a reset.
    let l = TcpListener::bind(lo0()).await.unwrap();
    let upstream = l.local_addr().unwrap();
    let (got_first, first_rx) = tokio::sync::oneshot::channel();
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let mut b = [0u8; 64];
        let first = s.read(&mut b).await.map(|_| ());
        let _ = got_first.send(());
        let after = s.read(&mut b).await;
        let _ = tx.send((first, after.map_err(|e| e.kind())));
    });
    let mut a = args(upstream);
    a.protocol = Protocol::Tcp;
    let agent = start_proxy(a).await.unwrap();
    let mut c = TcpStream::connect(agent.listen_addr.unwrap())
        .await
        .unwrap();
    c.write_all(b"hello\n").await.unwrap();
    within(LIMIT, "upstream got the first bytes", first_rx)
        .await
        .unwrap();
    c.set_zero_linger().unwrap();
    drop(c);
    let (first, after) = within(LIMIT, "upstream reads", rx).await.unwrap();
    first.unwrap();
    assert_eq!(after, Err(io::ErrorKind::ConnectionReset));
    agent.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_drain_delivers_the_upstreams_late_answer() {
    // An upstream that answers a request only once its client left (EOF), or after 1 s.
    let l = TcpListener::bind(lo0()).await.unwrap();
    let upstream = l.local_addr().unwrap();
    let saw_eof = Arc::new(AtomicBool::new(false));
    let eof = saw_eof.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let eof = eof.clone();
            tokio::spawn(async move {
                let mut b = [0u8; 64];
                let _ = s.read(&mut b).await;
                if let Ok(Ok(0)) =
                    tokio::time::timeout(Duration::from_secs(1), s.read(&mut b)).await
                {
                    eof.store(true, Ordering::Release);
                }
                let _ = s.write_all(b"late answer\n").await;
                let _ = s.shutdown().await;
            });
        }
    });
    let mut a = args(upstream);
    a.protocol = Protocol::Tcp;
    a.idle_close_after = Duration::from_millis(100);
    let agent = start_proxy(a).await.unwrap();
    let mut c = TcpStream::connect(agent.listen_addr.unwrap())
        .await
        .unwrap();
    c.write_all(b"request\n").await.unwrap();
    wait_until(LIMIT, "connected", || agent.active() == 1).await;
    let drain = tokio::spawn(drain(agent.admin_addr));
    let mut got = Vec::new();
    within(LIMIT, "answer then FIN", c.read_to_end(&mut got))
        .await
        .expect("clean end");
    assert_eq!(
        got, b"late answer\n",
        "the answer was delivered before the FIN"
    );
    assert!(
        saw_eof.load(Ordering::Acquire),
        "the upstream saw its client leave"
    );
    drop(c);
    let (code, report) = within(LIMIT, "drain", drain).await.unwrap();
    assert_eq!(code, 200, "{report}");
    agent.abort();
}

// ---- 3. statuses and trailers ---------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_mid_body_counts_as_an_error_not_as_its_heads_status() {
    let l = TcpListener::bind(lo0()).await.unwrap();
    let upstream = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut b = [0u8; 4096];
                let _ = s.read(&mut b).await;
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n0123456789")
                    .await;
                let _ = s.flush().await;
                tokio::time::sleep(Duration::from_millis(50)).await;
                let _ = s.set_zero_linger();
                drop(s);
            });
        }
    });
    let agent = start_proxy(args(upstream)).await.unwrap();
    let mut c = H1::connect(agent.listen_addr.unwrap()).await.unwrap();
    let r = within(LIMIT, "truncated response", c.request("/")).await;
    assert!(r.is_err(), "the body cannot be complete: {r:?}");
    wait_metric(&agent, "sluice_agent_requests_total{code=\"502\"}", 1.0).await;
    let m = metrics(&agent).await;
    assert_eq!(
        metric(&m, "sluice_agent_requests_total{code=\"200\"}").unwrap_or(0.0),
        0.0
    );
    assert_eq!(
        metric(&m, "sluice_agent_upstream_errors_total{kind=\"body\"}"),
        Some(1.0)
    );
    agent.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_trailers_and_te_trailers_pass_through() {
    let l = TcpListener::bind(lo0()).await.unwrap();
    let upstream = l.local_addr().unwrap();
    let saw_te = Arc::new(AtomicBool::new(false));
    let te = saw_te.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let te = te.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut b = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if s.read(&mut b).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(b[0]);
                }
                let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
                te.store(head.contains("\r\nte: trailers\r\n"), Ordering::Release);
                let _ = s
                    .write_all(
                        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntrailer: grpc-status\r\n\r\n\
                          2\r\nok\r\n0\r\ngrpc-status: 0\r\n\r\n",
                    )
                    .await;
            });
        }
    });
    let agent = start_proxy(args(upstream)).await.unwrap();
    let mut c = TcpStream::connect(agent.listen_addr.unwrap())
        .await
        .unwrap();
    c.write_all(b"GET / HTTP/1.1\r\nhost: test\r\nte: trailers\r\nconnection: te\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    within(LIMIT, "response with trailers", async {
        let mut b = [0u8; 1024];
        while !got.ends_with(b"\r\n0\r\ngrpc-status: 0\r\n\r\n") {
            let n = c.read(&mut b).await.unwrap();
            assert!(n > 0, "closed early: {:?}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&b[..n]);
        }
    })
    .await;
    assert!(
        saw_te.load(Ordering::Acquire),
        "TE: trailers reached the upstream"
    );
    agent.abort();
}

/// A body of one data frame and then trailers.
struct WithTrailers {
    data: Option<Bytes>,
    trailers: Option<HeaderMap>,
}

impl Body for WithTrailers {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if let Some(d) = self.data.take() {
            return Poll::Ready(Some(Ok(Frame::data(d))));
        }
        Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_over_upstream_http2_works_end_to_end() {
    // A gRPC-like upstream: refuses requests without `te: trailers` (as gRPC servers do),
    // answers with a body and `grpc-status` in the trailers.
    let l = TcpListener::bind(lo0()).await.unwrap();
    let upstream = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                    let te = req.headers().get(http::header::TE).cloned();
                    let body = req.into_body().collect().await.unwrap().to_bytes();
                    let mut t = HeaderMap::new();
                    t.insert("grpc-status", HeaderValue::from_static("0"));
                    let mut r = Response::new(WithTrailers {
                        data: Some(body),
                        trailers: Some(t),
                    });
                    if te.as_ref().is_none_or(|v| v != "trailers") {
                        *r.status_mut() = http::StatusCode::BAD_REQUEST;
                    }
                    r.headers_mut().insert(
                        http::header::CONTENT_TYPE,
                        HeaderValue::from_static("application/grpc"),
                    );
                    Ok::<_, Infallible>(r)
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    let mut a = args(upstream);
    a.upstream_http2 = true;
    let agent = start_proxy(a).await.unwrap();
    let tcp = TcpStream::connect(agent.listen_addr.unwrap())
        .await
        .unwrap();
    let (client, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    let mut client = client.ready().await.unwrap();
    let req = Request::post("http://test/pkg.Service/Method")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let (resp, mut send) = client.send_request(req, false).unwrap();
    send.send_data(Bytes::from_static(b"\0\0\0\0\x02hi"), true)
        .unwrap();
    let resp = within(LIMIT, "response", resp).await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut got = Vec::new();
    while let Some(chunk) = within(LIMIT, "data", body.data()).await {
        let chunk = chunk.unwrap();
        let _ = body.flow_control().release_capacity(chunk.len());
        got.extend_from_slice(&chunk);
    }
    assert_eq!(got, b"\0\0\0\0\x02hi");
    let trailers = within(LIMIT, "trailers", body.trailers())
        .await
        .unwrap()
        .expect("trailers");
    assert_eq!(trailers["grpc-status"], "0");
    wait_metric(&agent, "sluice_agent_requests_total{code=\"200\"}", 1.0).await;
    agent.abort();
}

// ---- 4. a drain no deletion follows ------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_that_no_termination_follows_is_reported_and_fails_liveness() {
    let upstream = start_upstream().await;
    let mut a = args(upstream);
    a.drain.drain_orphan_after = Some(Duration::from_millis(500));
    let agent = start_proxy(a).await.unwrap();
    let m = metrics(&agent).await;
    assert_eq!(metric(&m, "sluice_agent_drain_orphaned"), Some(0.0));
    let before = http(agent.admin_addr, "GET", "/healthz").await.0;
    let (code, _) = within(LIMIT, "drain", drain(agent.admin_addr)).await;
    assert_eq!(code, 200);
    // Once no termination followed the drain, liveness fails: the kubelet restarts the
    // agent container and the pod serves again.
    wait_metric(&agent, "sluice_agent_drain_orphaned", 1.0).await;
    let after = http(agent.admin_addr, "GET", "/healthz").await;
    assert_eq!(
        (before, after.0),
        (200, 503),
        "healthz before and after the orphan bound: {after:?}"
    );
    agent.abort();
}
