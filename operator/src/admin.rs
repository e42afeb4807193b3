//! The operator's admin HTTP server: `/healthz` (the process runs), `/readyz` (it has
//! reached the API server and, as leader, started its controllers or, as standby, is
//! ready to take over) and `/metrics` (OpenMetrics text from prometheus-client).
//!
//! Hardened against slow and abusive peers: HTTP/1.1 only (probes and scrapers speak it)
//! with a header read timeout that also bounds idle keep-alive connections, at most
//! [`MAX_CONNECTIONS`] connections at once (one more is closed at once), and an accept
//! loop that backs off on errors (out of file descriptors) instead of spinning.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Incoming, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// Connections served at once; one more is closed at once.
pub const MAX_CONNECTIONS: usize = 64;
/// A request head (the first, or the next on a keep-alive connection) must arrive within
/// this, else the connection is closed.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Backoff after a failed accept: doubles from the first to the last, reset by a success.
const ACCEPT_BACKOFF: (Duration, Duration) = (Duration::from_millis(10), Duration::from_secs(1));

/// State the admin endpoints report.
pub struct AdminState {
    pub registry: Registry,
    pub ready: AtomicBool,
}

impl AdminState {
    pub fn new(registry: Registry) -> Arc<Self> {
        Arc::new(Self {
            registry,
            ready: AtomicBool::new(false),
        })
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }
}

/// Serves until the process ends. Binding errors are returned so `run` fails fast with a
/// clear message (for example, the port is in use).
pub async fn serve(addr: SocketAddr, state: Arc<AdminState>) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    tracing::info!(%addr, "admin server listening (/healthz, /readyz, /metrics)");
    serve_listener(listener, state, MAX_CONNECTIONS, HEADER_READ_TIMEOUT).await;
    Ok(())
}

async fn serve_listener(
    listener: TcpListener,
    state: Arc<AdminState>,
    max_connections: usize,
    header_read_timeout: Duration,
) {
    serve_accepted(
        || listener.accept(),
        state,
        max_connections,
        header_read_timeout,
    )
    .await
}

/// The accept loop, over any source of accepted connections (a listener; a test's source
/// of errors). An accept error (out of file descriptors, say) backs off, 10 ms doubling to
/// 1 s, instead of spinning on the error.
async fn serve_accepted<A, F>(
    mut accept: A,
    state: Arc<AdminState>,
    max_connections: usize,
    header_read_timeout: Duration,
) where
    A: FnMut() -> F,
    F: std::future::Future<Output = std::io::Result<(tokio::net::TcpStream, SocketAddr)>>,
{
    let slots = Arc::new(Semaphore::new(max_connections));
    let mut backoff = ACCEPT_BACKOFF.0;
    loop {
        let (stream, peer) = match accept().await {
            Ok(conn) => {
                backoff = ACCEPT_BACKOFF.0;
                conn
            }
            Err(err) => {
                tracing::warn!(error = %err, backoff_ms = backoff.as_millis() as u64, "admin accept failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(ACCEPT_BACKOFF.1);
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "admin connection limit reached: closing");
            drop(stream);
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let service = service_fn(move |req| handle(req, state.clone()));
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_read_timeout)
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn handle(
    req: Request<Incoming>,
    state: Arc<AdminState>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (status, content_type, body) = match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => (StatusCode::OK, "text/plain", "ok\n".to_string()),
        (&Method::GET, "/readyz") if state.ready.load(Ordering::Relaxed) => {
            (StatusCode::OK, "text/plain", "ok\n".to_string())
        }
        (&Method::GET, "/readyz") => (
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "not ready: API server not reached yet\n".to_string(),
        ),
        (&Method::GET, "/metrics") => {
            let mut text = String::new();
            match prometheus_client::encoding::text::encode(&mut text, &state.registry) {
                Ok(()) => (
                    StatusCode::OK,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    text,
                ),
                Err(err) => (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    format!("encoding metrics failed: {err}\n"),
                ),
            }
        }
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found\n".to_string(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        content_type.parse().expect("static"),
    );
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    async fn start(max: usize, header_timeout: Duration) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let state = AdminState::new(Registry::default());
        tokio::spawn(serve_listener(l, state, max, header_timeout));
        addr
    }

    async fn healthz(s: &mut TcpStream) -> String {
        s.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let mut got = Vec::new();
        let mut b = [0u8; 512];
        while !got.ends_with(b"ok\n") {
            let n = s.read(&mut b).await.unwrap();
            assert!(n > 0, "closed: {:?}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&b[..n]);
        }
        String::from_utf8_lossy(&got).into_owned()
    }

    /// Reads until EOF or an error (a reset): Ok(bytes) for a clean EOF.
    async fn until_closed(s: &mut TcpStream) -> std::io::Result<Vec<u8>> {
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).await.map(|_| rest)
    }

    /// Accept errors back off instead of spinning: with the clock paused, a source that
    /// fails every time is asked about a dozen times in the first 5 s (10 ms doubling to
    /// 1 s), not thousands.
    #[tokio::test(start_paused = true)]
    async fn accept_errors_back_off_instead_of_spinning() {
        use std::sync::atomic::AtomicUsize;
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = calls.clone();
        let server = tokio::spawn(serve_accepted(
            move || {
                let n = counted.fetch_add(1, Ordering::Relaxed);
                async move {
                    if n < 10_000 {
                        Err(std::io::Error::other("too many open files"))
                    } else {
                        std::future::pending().await
                    }
                }
            },
            AdminState::new(Registry::default()),
            8,
            Duration::from_secs(10),
        ));
        tokio::time::sleep(Duration::from_secs(5)).await;
        let n = calls.load(Ordering::Relaxed);
        server.abort();
        // 10+20+40+…+640 ms = 1.27 s for the first 7, then one a second.
        assert!((8..=14).contains(&n), "{n} accept calls in 5 s");
    }

    #[tokio::test]
    async fn a_slow_request_head_is_cut_off() {
        let addr = start(8, Duration::from_millis(300)).await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nhost").await.unwrap();
        // The head never ends: the server closes the connection (with or without 408).
        let r = tokio::time::timeout(Duration::from_secs(10), until_closed(&mut s))
            .await
            .expect("closed by the header read timeout");
        if let Ok(rest) = r {
            let text = String::from_utf8_lossy(&rest);
            assert!(
                rest.is_empty() || text.starts_with("HTTP/1.1 408"),
                "{text}"
            );
        }
    }

    #[tokio::test]
    async fn a_connection_over_the_cap_is_closed_and_the_others_are_served() {
        let addr = start(2, Duration::from_secs(30)).await;
        let mut a = TcpStream::connect(addr).await.unwrap();
        let mut b = TcpStream::connect(addr).await.unwrap();
        assert!(healthz(&mut a).await.starts_with("HTTP/1.1 200"));
        assert!(healthz(&mut b).await.starts_with("HTTP/1.1 200"));
        let mut c = TcpStream::connect(addr).await.unwrap();
        let _ = c
            .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
            .await;
        let r = tokio::time::timeout(Duration::from_secs(10), until_closed(&mut c))
            .await
            .expect("the third closed at once");
        assert!(
            r.is_err() || r.unwrap().is_empty(),
            "the third got an answer"
        );
        assert!(healthz(&mut a).await.starts_with("HTTP/1.1 200"));
        // A slot freed: served again.
        drop(b);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let mut d = TcpStream::connect(addr).await.unwrap();
            let _ = d
                .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
                .await;
            let mut buf = [0u8; 16];
            if matches!(d.read(&mut buf).await, Ok(n) if n > 0) {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "slot never freed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
