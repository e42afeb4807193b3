use super::*;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::client::conn::{http1 as client1, http2 as client2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::config::LimitArgs;
use crate::conns::{CloseLevel, ConnTracker, serve_on_loopback};
use crate::metrics::Metrics;

/// An upstream answering "ok"; counts its connections.
async fn upstream() -> (SocketAddr, Arc<AtomicU64>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let conns = Arc::new(AtomicU64::new(0));
    let c = conns.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            c.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|_req| async {
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    (addr, conns)
}

/// An HTTP/2 (prior knowledge) upstream answering "ok"; counts its connections.
async fn upstream_h2() -> (SocketAddr, Arc<AtomicU64>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let conns = Arc::new(AtomicU64::new(0));
    let c = conns.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            c.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                    assert_eq!(req.version(), Version::HTTP_2);
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    (addr, conns)
}

/// The proxy on worker threads, with its own accept loop.
async fn proxy(upstream: SocketAddr, workers: usize) -> (SocketAddr, Arc<ConnTracker>) {
    proxy_with(upstream, workers, false).await
}

async fn proxy_with(
    upstream: SocketAddr,
    workers: usize,
    upstream_http2: bool,
) -> (SocketAddr, Arc<ConnTracker>) {
    let metrics = Arc::new(Metrics::new());
    let p = HttpProxy::with_workers(
        upstream.to_string(),
        upstream_http2,
        Duration::from_secs(30),
        Duration::from_secs(1),
        LimitArgs::default(),
        metrics.clone(),
        workers,
    )
    .unwrap();
    let tracker = ConnTracker::new(metrics);
    let addr = serve_on_loopback(tracker.clone(), move |s, peer, guard| {
        p.clone().serve(s, peer, guard)
    })
    .await;
    (addr, tracker)
}

fn get() -> Request<Empty<Bytes>> {
    Request::builder()
        .uri("/x")
        .header(header::HOST, "test")
        .body(Empty::new())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_reuses_one_upstream_connection_and_drains_on_workers() {
    for workers in [0, 2] {
        let (up, up_conns) = upstream().await;
        let (addr, tracker) = proxy(up, workers).await;
        let io = TokioIo::new(TcpStream::connect(addr).await.unwrap());
        let (mut tx, conn) = client1::handshake::<_, Empty<Bytes>>(io).await.unwrap();
        let conn = tokio::spawn(conn);
        for _ in 0..3 {
            tx.ready().await.unwrap();
            let r = tx.send_request(get()).await.unwrap();
            assert_eq!(r.status(), StatusCode::OK);
            assert!(!r.headers().contains_key(header::CONNECTION));
            let body = r.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(&body[..], b"ok");
        }
        assert_eq!(up_conns.load(Ordering::Relaxed), 1, "workers={workers}");
        // Asked to leave: the next response says so, then the connection ends.
        assert_eq!(tracker.request_close(10), 1);
        tx.ready().await.unwrap();
        let r = tx.send_request(get()).await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()[header::CONNECTION], "close");
        r.into_body().collect().await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), conn)
            .await
            .expect("connection closed after Connection: close")
            .unwrap()
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_http2_serves_http1_clients_on_one_upstream_connection_each() {
    let (up, up_conns) = upstream_h2().await;
    let (addr, _tracker) = proxy_with(up, 2, true).await;
    for _client in 0..2 {
        let io = TokioIo::new(TcpStream::connect(addr).await.unwrap());
        let (mut tx, conn) = client1::handshake::<_, Empty<Bytes>>(io).await.unwrap();
        tokio::spawn(conn);
        for _ in 0..3 {
            tx.ready().await.unwrap();
            let r = tx.send_request(get()).await.unwrap();
            assert_eq!(r.status(), StatusCode::OK);
            let body = r.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(&body[..], b"ok");
        }
    }
    assert_eq!(up_conns.load(Ordering::Relaxed), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_streams_share_a_few_upstream_connections_on_workers() {
    let (up, up_conns) = upstream().await;
    let (addr, _tracker) = proxy(up, 2).await;
    let io = TokioIo::new(TcpStream::connect(addr).await.unwrap());
    let (tx, conn) = client2::handshake::<_, _, Empty<Bytes>>(TokioExecutor::new(), io)
        .await
        .unwrap();
    tokio::spawn(conn);
    for _round in 0..3 {
        let mut streams = Vec::new();
        for _ in 0..8 {
            let mut tx = tx.clone();
            streams.push(tokio::spawn(async move {
                let req = Request::builder()
                    .uri("http://test/x")
                    .body(Empty::new())
                    .unwrap();
                let r = tx.send_request(req).await.unwrap();
                assert_eq!(r.status(), StatusCode::OK);
                r.into_body().collect().await.unwrap().to_bytes()
            }));
        }
        for s in streams {
            assert_eq!(&s.await.unwrap()[..], b"ok");
        }
    }
    let n = up_conns.load(Ordering::Relaxed);
    assert!(
        (1..=8).contains(&n),
        "{n} upstream connections for 8 concurrent streams"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_read_timeout_spares_slow_responses_and_closes_idle_keep_alive() {
    // An upstream that answers after 600 ms.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|_req| async {
                    tokio::time::sleep(Duration::from_millis(600)).await;
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    let metrics = Arc::new(Metrics::new());
    let p = HttpProxy::with_workers(
        up.to_string(),
        false,
        Duration::from_millis(200),
        Duration::from_secs(1),
        LimitArgs::default(),
        metrics.clone(),
        2,
    )
    .unwrap();
    let tracker = ConnTracker::new(metrics.clone());
    let addr = serve_on_loopback(tracker.clone(), move |s, peer, guard| {
        p.clone().serve(s, peer, guard)
    })
    .await;
    let io = TokioIo::new(TcpStream::connect(addr).await.unwrap());
    let (mut tx, conn) = client1::handshake::<_, Empty<Bytes>>(io).await.unwrap();
    let conn = tokio::spawn(conn);
    // Longer than the timeout in flight: answered.
    for _ in 0..2 {
        tx.ready().await.unwrap();
        let r = tx.send_request(get()).await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        r.into_body().collect().await.unwrap();
    }
    // Then idle: closed about 200 ms later.
    let t0 = Instant::now();
    tokio::time::timeout(Duration::from_secs(5), conn)
        .await
        .expect("idle keep-alive connection closed")
        .unwrap()
        .unwrap();
    assert!(
        t0.elapsed() >= Duration::from_millis(150),
        "{:?}",
        t0.elapsed()
    );
    assert!(
        metrics
            .render()
            .contains("sluice_agent_connections_closed_total{reason=\"header_timeout\"} 1")
    );
}

/// An upstream that accepts WebSocket upgrades and echoes the tunnel's bytes, and
/// answers "ok" to anything else (h2c upgrades included).
async fn upgrading_upstream() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|mut req: Request<Incoming>| async move {
                    let ws = req
                        .headers()
                        .get(header::UPGRADE)
                        .is_some_and(|v| v == "websocket");
                    if !ws {
                        return Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(
                            b"ok",
                        ))));
                    }
                    let on = hyper::upgrade::on(&mut req);
                    tokio::spawn(async move {
                        let mut io = TokioIo::new(on.await.unwrap());
                        let (mut r, mut w) = tokio::io::split(&mut io);
                        let _ = tokio::io::copy(&mut r, &mut w).await;
                        let _ = w.shutdown().await;
                    });
                    let mut resp = Response::new(Full::new(Bytes::new()));
                    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
                    resp.headers_mut()
                        .insert(header::UPGRADE, HeaderValue::from_static("websocket"));
                    resp.headers_mut()
                        .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
                    Ok(resp)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .with_upgrades()
                    .await;
            });
        }
    });
    addr
}

/// Reads one response head (up to the blank line), byte by byte so that nothing after
/// it is consumed.
async fn read_head(s: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(
            s.read(&mut b).await.unwrap(),
            1,
            "closed mid-head: {head:?}"
        );
        head.push(b[0]);
    }
    String::from_utf8(head).unwrap()
}

/// Connections still counted once all are gone, or once `limit` has passed.
async fn connections_left_after(tracker: &ConnTracker, limit: Duration) -> usize {
    let t = Instant::now();
    while tracker.active() > 0 && t.elapsed() < limit {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tracker.active()
}

async fn echo_line(s: &mut TcpStream, line: &[u8]) {
    s.write_all(line).await.unwrap();
    let mut got = vec![0u8; line.len()];
    s.read_exact(&mut got).await.unwrap();
    assert_eq!(got, line);
}

const WS_UPGRADE: &[u8] = b"GET /chat HTTP/1.1\r\nHost: test\r\nConnection: Upgrade\r\n\
    Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
    Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrade_becomes_a_tunnel_that_the_drain_waits_for_and_ends_with_fin() {
    let up = upgrading_upstream().await;
    let (addr, tracker) = proxy(up, 2).await;
    let mut c = TcpStream::connect(addr).await.unwrap();
    c.write_all(WS_UPGRADE).await.unwrap();
    let head = read_head(&mut c).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let lower = head.to_ascii_lowercase();
    assert!(lower.contains("upgrade: websocket"), "{head}");
    assert!(lower.contains("connection: upgrade"), "{head}");
    echo_line(&mut c, b"hello\n").await;
    // Asked to leave politely: a tunnel cannot be, so it stays open and counted.
    assert_eq!(tracker.request_close(10), 1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    echo_line(&mut c, b"still here\n").await;
    assert_eq!(tracker.active(), 1);
    // The drain deadline: closed with FIN (a clean end of stream, not a reset).
    tracker.close_all(CloseLevel::Now);
    let mut rest = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut rest))
        .await
        .expect("tunnel closed at the deadline")
        .expect("closed with FIN, not RST");
    assert_eq!(n, 0);
    assert_eq!(
        connections_left_after(&tracker, Duration::from_secs(5)).await,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnel_closed_by_the_client_ends_both_sides() {
    let up = upgrading_upstream().await;
    let (addr, tracker) = proxy(up, 2).await;
    let mut c = TcpStream::connect(addr).await.unwrap();
    c.write_all(WS_UPGRADE).await.unwrap();
    assert!(read_head(&mut c).await.starts_with("HTTP/1.1 101"));
    echo_line(&mut c, b"x\n").await;
    // The client's FIN goes through; the upstream's comes back.
    c.shutdown().await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut rest))
        .await
        .expect("upstream FIN passed back")
        .unwrap();
    assert!(rest.is_empty());
    assert_eq!(
        connections_left_after(&tracker, Duration::from_secs(5)).await,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declined_and_h2c_upgrades_are_ordinary_http1_exchanges() {
    // The plain upstream ignores upgrades; an h2c upgrade is declined by the agent.
    for (up, req) in [
        (upstream().await.0, WS_UPGRADE),
        (
            upgrading_upstream().await,
            &b"GET / HTTP/1.1\r\nHost: test\r\nConnection: Upgrade, HTTP2-Settings\r\n\
               Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n"[..],
        ),
    ] {
        let (addr, _tracker) = proxy(up, 2).await;
        let mut c = TcpStream::connect(addr).await.unwrap();
        for _ in 0..2 {
            c.write_all(req).await.unwrap();
            let head = read_head(&mut c).await;
            assert!(head.starts_with("HTTP/1.1 200"), "{head}");
            let mut body = [0u8; 2];
            c.read_exact(&mut body).await.unwrap();
            assert_eq!(&body, b"ok");
        }
    }
}

#[test]
fn strips_hop_by_hop_and_connection_named_headers() {
    let mut h = HeaderMap::new();
    h.insert(
        header::CONNECTION,
        HeaderValue::from_static("close, x-secret"),
    );
    h.insert("x-secret", HeaderValue::from_static("1"));
    h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
    h.insert(
        header::TRANSFER_ENCODING,
        HeaderValue::from_static("chunked"),
    );
    h.insert("x-kept", HeaderValue::from_static("1"));
    strip_hop_by_hop(&mut h);
    assert_eq!(h.len(), 1);
    assert!(h.contains_key("x-kept"));
}

#[test]
fn te_trailers_and_trailer_are_passed_on() {
    let mut h = HeaderMap::new();
    h.insert(header::CONNECTION, HeaderValue::from_static("te"));
    h.insert(header::TE, HeaderValue::from_static("gzip;q=0.5, Trailers"));
    h.insert(header::TRAILER, HeaderValue::from_static("grpc-status"));
    let mut req = h.clone();
    strip_hop_by_hop_keep_te_trailers(&mut req);
    assert_eq!(req[header::TE], "trailers");
    assert_eq!(req[header::TRAILER], "grpc-status");
    assert_eq!(req.len(), 2);
    // Without `trailers` in it, TE goes like any hop-by-hop header.
    let mut other = HeaderMap::new();
    other.insert(header::TE, HeaderValue::from_static("gzip"));
    strip_hop_by_hop_keep_te_trailers(&mut other);
    assert!(other.is_empty());
    // Responses: TE never, Trailer kept.
    strip_hop_by_hop(&mut h);
    assert_eq!(h.len(), 1);
    assert!(h.contains_key(header::TRAILER));
}
