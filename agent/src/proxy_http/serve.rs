//! One client connection, served: protocol detection bounded by the header read timeout,
//! hyper's connection driven together with its upstream HTTP/1.1 connections, and the
//! drain (Connection: close, GOAWAY, idle close, forced close after a grace).

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::header::HeaderValue;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tracing::debug;

use super::conn::{ConnState, Driven, UpSlots, UpState};
use super::handler::ProxyService;
use super::proxy::HttpProxy;
use crate::conns::{
    CloseLevel, ConnGuard, DeferWrites, LevelWatch, LingerStream, linger_close, set_keepalive,
};
use crate::metrics::CloseReason;
use crate::tunnel;

/// After a forced close, how long in-flight requests still get before the socket goes.
const FORCE_GRACE: Duration = Duration::from_secs(1);

impl HttpProxy {
    /// Serves one client connection until it ends (on a worker thread, if there are any).
    pub async fn serve(self: Arc<Self>, stream: TcpStream, peer: SocketAddr, guard: ConnGuard) {
        let Some(workers) = &self.workers else {
            return self.serve_here(stream, peer, guard).await;
        };
        let this = self.clone();
        workers.spawn(stream, peer, move |s| this.serve_here(s, peer, guard));
    }

    async fn serve_here(
        self: Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
        mut guard: ConnGuard,
    ) {
        let _ = stream.set_nodelay(true);
        set_keepalive(&stream, self.tcp_keepalive);
        let ctl = guard.ctl().clone();
        let mut watch = LevelWatch::new(ctl.clone());
        // hyper's auto builder waits for the first bytes to tell HTTP/1 from HTTP/2 with no
        // timeout of its own: bound it here, and leave early if the drain asks.
        let mut first = [0u8; 1];
        let waited = tokio::select! {
            r = tokio::time::timeout(self.header_read_timeout, stream.peek(&mut first)) => Some(r),
            _ = wait_level(&mut watch, CloseLevel::Graceful, self.idle_close_after) => None,
        };
        match waited {
            None => {
                drop(guard);
                linger_close(stream).await;
                return;
            }
            Some(Err(_)) => {
                debug!(%peer, "no request before the header read timeout");
                guard.set_reason(CloseReason::HeaderTimeout);
                drop(guard);
                linger_close(stream).await;
                return;
            }
            Some(Ok(Ok(0))) => return,
            Some(Ok(Err(e))) => {
                debug!(%peer, error = %e, "client connection failed");
                guard.set_reason(CloseReason::Error);
                return;
            }
            Some(Ok(Ok(_))) => {}
        }

        let state = Arc::new(ConnState {
            xff: HeaderValue::from_str(&peer.ip().to_string())
                .unwrap_or_else(|_| HeaderValue::from_static("unknown")),
            peer_ip: peer.ip(),
            proxy: self.clone(),
            ctl: ctl.clone(),
            up: Mutex::new(UpState::default()),
            new_driven: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            born: Instant::now(),
            idle_since: AtomicU64::new(0),
            seen_request: AtomicBool::new(false),
            bodies: AtomicUsize::new(0),
            progress: AtomicU64::new(0),
            slots: Arc::new(UpSlots {
                open: AtomicUsize::new(0),
                max: self.upstream_connections_per_client,
                freed: Notify::new(),
            }),
        });
        let svc = ProxyService {
            state: state.clone(),
        };
        // Upstream HTTP/1.1 connections of this client connection's HTTP/1.1 requests.
        let mut driven = Driven::default();
        let conn = self.builder.serve_connection_with_upgrades(
            TokioIo::new(DeferWrites::new(LingerStream::detecting_h2(
                stream,
                ctl.clone(),
            ))),
            svc,
        );
        tokio::pin!(conn);
        let mut shutdown_sent = false;
        let mut idle_timer: Option<Pin<Box<tokio::time::Sleep>>> = None;
        let mut force_timer: Option<Pin<Box<tokio::time::Sleep>>> = None;
        // HTTP/1 header read timeout: a request head must arrive within it once the
        // connection is idle (no request in flight). One timer for the connection, moved
        // on when it fires early, rather than one per request.
        // Whatever the protocol: an HTTP/2 connection too must send its first request
        // within it; after that, HTTP/2 connections get GOAWAY once no stream was open for
        // the HTTP/2 idle timeout (HTTP/1.1 ones are closed by this timer when idle).
        let mut head_timer = Some(Box::pin(tokio::time::sleep(
            self.header_read_timeout.min(self.http2_idle_timeout),
        )));
        // A request or response body that moves no byte for the body timeout.
        let mut body_timer = self.body_timeout.map(|t| Box::pin(tokio::time::sleep(t)));
        // A connection born while closing is already asked to leave.
        let mut level = CloseLevel::Open;
        loop {
            let now_level = ctl.level();
            if now_level > level {
                level = now_level;
                match level {
                    CloseLevel::Open => {}
                    CloseLevel::Graceful => {
                        if ctl.is_h2.load(std::sync::atomic::Ordering::Acquire) {
                            // Two-phase GOAWAY; open streams finish.
                            conn.as_mut().graceful_shutdown();
                            shutdown_sent = true;
                        } else {
                            // HTTP/1: the next response carries `Connection: close`; if the
                            // client stays idle, close it then.
                            idle_timer = Some(Box::pin(tokio::time::sleep(self.idle_close_after)));
                        }
                    }
                    CloseLevel::Now => {
                        if !shutdown_sent {
                            conn.as_mut().graceful_shutdown();
                            shutdown_sent = true;
                        }
                        force_timer = Some(Box::pin(tokio::time::sleep(FORCE_GRACE)));
                    }
                }
            }
            tokio::select! {
                // In this order: polling the others is a few atomic loads.
                biased;
                res = conn.as_mut() => {
                    if let Err(e) = res {
                        debug!(%peer, error = %e, "connection ended with an error");
                        if level == CloseLevel::Open {
                            guard.set_reason(CloseReason::Error);
                        }
                    }
                    break;
                }
                _ = std::future::poll_fn(|cx| state.poll_driven(cx, &mut driven)) => {}
                _ = watch.changed() => {}
                _ = async { idle_timer.as_mut().expect("guarded").await }, if idle_timer.is_some() => {
                    idle_timer = None;
                    if !shutdown_sent {
                        conn.as_mut().graceful_shutdown();
                        shutdown_sent = true;
                    }
                }
                _ = async { force_timer.as_mut().expect("guarded").await }, if force_timer.is_some() => {
                    break;
                }
                _ = async { head_timer.as_mut().expect("guarded").await }, if head_timer.is_some() => {
                    if ctl.is_h2.load(Ordering::Acquire) && state.seen_request.load(Ordering::Acquire) {
                        let deadline = state.head_deadline(self.http2_idle_timeout);
                        if deadline > Instant::now() {
                            if let Some(t) = head_timer.as_mut() {
                                t.as_mut().reset(deadline.into());
                            }
                        } else {
                            debug!(%peer, "http2 connection idle: GOAWAY");
                            head_timer = None;
                            if !shutdown_sent {
                                conn.as_mut().graceful_shutdown();
                                shutdown_sent = true;
                                if level == CloseLevel::Open {
                                    guard.set_reason(CloseReason::IdleTimeout);
                                }
                            }
                        }
                        continue;
                    }
                    let deadline = state.head_deadline(self.header_read_timeout);
                    let now = Instant::now();
                    if deadline > now {
                        // HTTP/2: look again within the idle timeout, which starts with
                        // the first request.
                        let next = if ctl.is_h2.load(Ordering::Acquire) {
                            deadline.min(now + self.http2_idle_timeout)
                        } else {
                            deadline
                        };
                        if let Some(t) = head_timer.as_mut() {
                            t.as_mut().reset(next.into());
                        }
                    } else {
                        debug!(%peer, "no request head before the header read timeout");
                        guard.set_reason(CloseReason::HeaderTimeout);
                        break;
                    }
                }
                _ = async { body_timer.as_mut().expect("guarded").await }, if body_timer.is_some() => {
                    let limit = self.body_timeout.unwrap_or(Duration::MAX);
                    let now = Instant::now();
                    let next = match state.body_stall_at(limit) {
                        None => now + limit,
                        Some(at) if at > now => at,
                        Some(_) => {
                            debug!(%peer, "no body progress before the body timeout: closing");
                            guard.set_reason(CloseReason::BodyTimeout);
                            break;
                        }
                    };
                    if let Some(t) = body_timer.as_mut() {
                        t.as_mut().reset(next.into());
                    }
                }
            }
        }
        // An upgraded connection lives on as a tunnel, still counted (the drain waits for
        // it) until it ends or the drain deadline closes it.
        let pending = state.lock().tunnel.take();
        if let Some(t) = pending {
            tunnel::run(t, wait_level(&mut watch, CloseLevel::Now, Duration::ZERO)).await;
        }
        drop(guard);
    }
}

/// Resolves once the connection is asked to leave at `at_least`, plus `idle` (it is idle).
async fn wait_level(watch: &mut LevelWatch, at_least: CloseLevel, idle: Duration) {
    loop {
        let level = watch.ctl().level();
        if level >= at_least {
            if level < CloseLevel::Now {
                tokio::time::sleep(idle).await;
            }
            return;
        }
        watch.changed().await;
    }
}
