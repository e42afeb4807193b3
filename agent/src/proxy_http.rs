//! HTTP mode: an HTTP/1.1 + HTTP/2 (prior knowledge) reverse proxy on hyper that drains
//! politely: `Connection: close` on the next HTTP/1.1 response, idle connections closed,
//! two-phase GOAWAY on HTTP/2 (hyper's `graceful_shutdown`), in-flight requests finish.
//!
//! Upstream connections belong to one client connection each (opened lazily, reused for
//! every request of that client connection, reopened after an error). For an HTTP/1.1
//! client the upstream HTTP/1.1 connection is driven by the client connection's own task,
//! so a request crosses no task boundary: no channel hop to a pool's connection task, no
//! cross-thread wake-up. HTTP/2 clients (whose streams hyper runs as tasks) get a small
//! per-connection set of upstream HTTP/1.1 connections, one per concurrent stream, or one
//! upstream HTTP/2 connection with `--upstream-http2`. HTTP/1.1 upgrades (WebSocket) become
//! byte tunnels ([`crate::tunnel`]).

use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::{Either, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::{http1 as client1, http2 as client2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tracing::debug;

use crate::config::LimitArgs;
use crate::conns::{
    CloseLevel, ConnCtl, ConnGuard, DeferWrites, LevelWatch, LingerStream, linger_close,
    set_keepalive,
};
use crate::metrics::{CloseReason, Metrics};
use crate::tunnel::{self, PendingTunnel};
use crate::workers::Workers;

/// After a forced close, how long in-flight requests still get before the socket goes.
const FORCE_GRACE: Duration = Duration::from_secs(1);
/// Longest wait for the upstream to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Upstream HTTP/1.1 connections kept per HTTP/2 client connection between streams.
const MAX_IDLE_H1_PER_H2_CLIENT: usize = 16;

pub use crate::tunnel::requested_upgrade;
pub use crate::workers::set_worker_threads;

type H1Sender = client1::SendRequest<ReqBody>;
type H2Sender = client2::SendRequest<ReqBody>;
/// An upstream connection's future, driven by the client connection's task.
type DrivenConn = Pin<Box<dyn Future<Output = ()> + Send>>;

pub struct HttpProxy {
    builder: auto::Builder<TokioExecutor>,
    upstream: String,
    /// `upstream` when it is an IP address and port (no resolution per connect).
    upstream_addr: Option<SocketAddr>,
    upstream_authority: http::uri::Authority,
    /// `Host` for requests that carry none (HTTP/1.0).
    upstream_host: HeaderValue,
    upstream_http2: bool,
    h1_client: client1::Builder,
    h2_client: client2::Builder<TokioExecutor>,
    header_read_timeout: Duration,
    idle_close_after: Duration,
    http2_idle_timeout: Duration,
    body_timeout: Option<Duration>,
    upstream_timeout: Option<Duration>,
    tcp_keepalive: Option<Duration>,
    upstream_connections_per_client: usize,
    metrics: Arc<Metrics>,
    workers: Option<Workers>,
}

impl HttpProxy {
    pub fn new(
        upstream: String,
        upstream_http2: bool,
        header_read_timeout: Duration,
        idle_close_after: Duration,
        limits: LimitArgs,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Self>, http::uri::InvalidUri> {
        Self::with_workers(
            upstream,
            upstream_http2,
            header_read_timeout,
            idle_close_after,
            limits,
            metrics,
            crate::workers::worker_threads(),
        )
    }

    fn with_workers(
        upstream: String,
        upstream_http2: bool,
        header_read_timeout: Duration,
        idle_close_after: Duration,
        limits: LimitArgs,
        metrics: Arc<Metrics>,
        workers: usize,
    ) -> Result<Arc<Self>, http::uri::InvalidUri> {
        let upstream_authority = http::uri::Authority::try_from(upstream.as_str())?;
        let upstream_host = HeaderValue::from_str(upstream_authority.as_str())
            .unwrap_or_else(|_| HeaderValue::from_static("localhost"));
        let mut builder = auto::Builder::new(TokioExecutor::new());
        // No hyper header read timeout: it arms a boxed timer for every request head. The
        // serve loop keeps one timer per connection instead (see `serve_here`).
        builder
            .http1()
            .header_read_timeout(None)
            .keep_alive(true)
            .writev(false);
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(limits.http2_max_concurrent_streams)
            .keep_alive_interval(LimitArgs::nonzero(limits.http2_keepalive_interval))
            .keep_alive_timeout(limits.http2_keepalive_timeout);
        let mut h1_client = client1::Builder::new();
        // One buffer, one send(2) per message: cheaper than writev for small ones.
        h1_client.writev(false);
        let mut h2_client = client2::Builder::new(TokioExecutor::new());
        h2_client.timer(TokioTimer::new());
        Ok(Arc::new(HttpProxy {
            builder,
            upstream_addr: upstream.parse().ok(),
            upstream,
            upstream_authority,
            upstream_host,
            upstream_http2,
            h1_client,
            h2_client,
            header_read_timeout,
            idle_close_after,
            http2_idle_timeout: limits.http2_idle_timeout,
            body_timeout: LimitArgs::nonzero(limits.body_timeout),
            upstream_timeout: LimitArgs::nonzero(limits.upstream_timeout),
            tcp_keepalive: LimitArgs::nonzero(limits.tcp_keepalive),
            upstream_connections_per_client: limits.upstream_connections_per_client.max(1),
            metrics,
            workers: Workers::start(workers),
        }))
    }

    /// A new TCP connection to the upstream.
    async fn connect(&self) -> Result<TokioIo<DeferWrites<TcpStream>>, UpstreamError> {
        let connect = async {
            match self.upstream_addr {
                Some(a) => TcpStream::connect(a).await,
                None => TcpStream::connect(self.upstream.as_str()).await,
            }
        };
        match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
            Ok(Ok(s)) => {
                let _ = s.set_nodelay(true);
                set_keepalive(&s, self.tcp_keepalive);
                Ok(TokioIo::new(DeferWrites::new(s)))
            }
            Ok(Err(e)) => {
                debug!(error = %e, "upstream connect failed");
                Err(UpstreamError::Connect)
            }
            Err(_) => Err(UpstreamError::ConnectTimeout),
        }
    }

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

/// Why the upstream could not answer.
#[derive(Debug, Clone, Copy)]
enum UpstreamError {
    Connect,
    ConnectTimeout,
    Request,
    /// No response head within `--upstream-timeout`.
    Timeout,
    /// The response body failed mid-way (the upstream reset or closed early).
    Body,
}

impl UpstreamError {
    fn kind(self) -> &'static str {
        match self {
            UpstreamError::Connect => "connect",
            UpstreamError::ConnectTimeout => "connect_timeout",
            UpstreamError::Request => "request",
            UpstreamError::Timeout => "timeout",
            UpstreamError::Body => "body",
        }
    }
}

/// One client connection's state, shared by its requests.
struct ConnState {
    proxy: Arc<HttpProxy>,
    ctl: Arc<ConnCtl>,
    peer_ip: IpAddr,
    /// `X-Forwarded-For` when the request carries none.
    xff: HeaderValue,
    up: Mutex<UpState>,
    /// Set when `up.new_driven` has connections for the serve loop to pick up.
    new_driven: AtomicBool,
    /// Requests of this connection in flight.
    in_flight: AtomicUsize,
    born: Instant,
    /// When the last request ended, in nanoseconds after `born` (0: none yet).
    idle_since: AtomicU64,
    /// A request arrived on this connection.
    seen_request: AtomicBool,
    /// Request and response bodies of this connection being moved now.
    bodies: AtomicUsize,
    /// When a body last moved (or began), in nanoseconds after `born`.
    progress: AtomicU64,
    /// Upstream HTTP/1.1 connections of this (HTTP/2) client connection.
    slots: Arc<UpSlots>,
}

/// Counts the upstream connections of one HTTP/2 client connection.
struct UpSlots {
    open: AtomicUsize,
    max: usize,
    /// Woken when a connection closes or goes back to the pool.
    freed: Notify,
}

/// One of [`UpSlots`], held by the upstream connection's task while it runs.
struct UpSlot(Arc<UpSlots>);

impl UpSlot {
    fn take(slots: &Arc<UpSlots>) -> Option<UpSlot> {
        slots
            .open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < slots.max).then_some(n + 1)
            })
            .ok()
            .map(|_| UpSlot(slots.clone()))
    }
}

impl Drop for UpSlot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
        self.0.freed.notify_waiters();
    }
}

/// The serve loop's upstream connections.
#[derive(Default)]
struct Driven {
    conns: Vec<DrivenConn>,
    registered: bool,
}

#[derive(Default)]
struct UpState {
    /// Upstream HTTP/1.1 connections not used by a request (one may still be reading the
    /// previous response's body).
    h1: Vec<H1Sender>,
    h2: Option<H2Sender>,
    /// New upstream connections for the serve loop to drive.
    new_driven: Vec<DrivenConn>,
    waker: Option<Waker>,
    /// An upgrade the upstream accepted: the serve loop runs it once hyper lets go.
    tunnel: Option<PendingTunnel>,
}

impl ConnState {
    /// When the header read timeout closes the connection if no request comes: `timeout`
    /// after the last request ended (or the connection began); later if one is in flight.
    fn head_deadline(&self, timeout: Duration) -> Instant {
        let now = Instant::now();
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return now + timeout;
        }
        let idle = self.born + Duration::from_nanos(self.idle_since.load(Ordering::Acquire));
        idle + timeout
    }

    fn request_started(&self) {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        if !self.seen_request.load(Ordering::Relaxed) {
            self.seen_request.store(true, Ordering::Release);
        }
    }

    fn nanos_since_born(&self) -> u64 {
        u64::try_from(self.born.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// A body began to move.
    fn body_started(&self) {
        self.progress
            .store(self.nanos_since_born(), Ordering::Release);
        self.bodies.fetch_add(1, Ordering::AcqRel);
    }

    /// A body moved a frame.
    fn body_progress(&self) {
        self.progress
            .store(self.nanos_since_born(), Ordering::Release);
    }

    fn body_ended(&self) {
        self.bodies.fetch_sub(1, Ordering::AcqRel);
    }

    /// When the bodies moving now count as stalled (none moving: `None`).
    fn body_stall_at(&self, limit: Duration) -> Option<Instant> {
        if self.bodies.load(Ordering::Acquire) == 0 {
            return None;
        }
        let at = self.born + Duration::from_nanos(self.progress.load(Ordering::Acquire));
        Some(at + limit)
    }

    fn request_ended(&self, now: Instant) {
        let nanos = u64::try_from(now.saturating_duration_since(self.born).as_nanos());
        self.idle_since
            .store(nanos.unwrap_or(u64::MAX), Ordering::Release);
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, UpState> {
        self.up.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Drives the upstream connections opened for HTTP/1.1 requests; never ready.
    fn poll_driven(&self, cx: &mut Context<'_>, driven: &mut Driven) -> Poll<()> {
        if !driven.registered {
            // A task's waker stays valid for the task's life.
            self.lock().waker = Some(cx.waker().clone());
            driven.registered = true;
        }
        if self.new_driven.swap(false, Ordering::Acquire) {
            let mut up = self.lock();
            driven.conns.append(&mut up.new_driven);
        }
        if !driven.conns.is_empty() {
            driven
                .conns
                .retain_mut(|c| c.as_mut().poll(cx).is_pending());
        }
        Poll::Pending
    }

    /// Hands a new upstream connection to the serve loop (same task: HTTP/1.1 clients).
    fn drive(&self, conn: DrivenConn) {
        let waker = {
            let mut up = self.lock();
            up.new_driven.push(conn);
            up.waker.clone()
        };
        self.new_driven.store(true, Ordering::Release);
        // No waker yet: the serve loop has not polled its connections yet and will see
        // this one when it does (same task, same pass).
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// An upstream HTTP/1.1 connection ready for a request: this client connection's own,
    /// or a new one.
    async fn h1_sender(&self, h2_client: bool) -> Result<H1Sender, UpstreamError> {
        if h2_client {
            return Box::pin(self.h1_sender_shared()).await;
        }
        loop {
            // Requests come one after the other: the one connection, once it has read the
            // previous response to its end.
            let cand = {
                let mut up = self.lock();
                up.h1.retain(|s| !s.is_closed());
                up.h1.pop()
            };
            let Some(mut s) = cand else {
                // Boxed: keeps the connect and handshake futures out of every request's.
                return Box::pin(self.new_h1(None)).await;
            };
            if s.ready().await.is_ok() {
                return Ok(s);
            }
        }
    }

    /// For an HTTP/2 client's streams, which run concurrently: a connection that is not
    /// busy, else a new one while fewer than `--upstream-connections-per-client` are open,
    /// else the first busy one once it is done (or any, once one is back or closed).
    async fn h1_sender_shared(&self) -> Result<H1Sender, UpstreamError> {
        enum Next {
            Use(H1Sender),
            New(UpSlot),
            Wait,
        }
        loop {
            let freed = self.slots.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            let next = {
                let mut up = self.lock();
                up.h1.retain(|s| !s.is_closed());
                if let Some(i) = up.h1.iter().position(|s| s.is_ready()) {
                    Next::Use(up.h1.swap_remove(i))
                } else if let Some(slot) = UpSlot::take(&self.slots) {
                    Next::New(slot)
                } else if !up.h1.is_empty() {
                    Next::Use(up.h1.swap_remove(0))
                } else {
                    Next::Wait
                }
            };
            match next {
                Next::Use(mut s) => {
                    if s.ready().await.is_ok() {
                        return Ok(s);
                    }
                }
                Next::New(slot) => return self.new_h1(Some(slot)).await,
                Next::Wait => freed.await,
            }
        }
    }

    /// A new upstream HTTP/1.1 connection: driven by the serve loop for an HTTP/1.1
    /// client (`slot` None), on a task of its own holding `slot` for an HTTP/2 client.
    async fn new_h1(&self, slot: Option<UpSlot>) -> Result<H1Sender, UpstreamError> {
        let h2_client = slot.is_some();
        let io = self.proxy.connect().await?;
        let (sender, conn) = self.proxy.h1_client.handshake(io).await.map_err(|e| {
            debug!(error = %e, "upstream handshake failed");
            UpstreamError::Connect
        })?;
        let conn = Box::pin(async move {
            let _slot = slot;
            if let Err(e) = conn.await {
                debug!(error = %e, "upstream connection ended with an error");
            }
        });
        if h2_client {
            tokio::spawn(conn);
        } else {
            self.drive(conn);
        }
        Ok(sender)
    }

    fn put_h1(&self, sender: H1Sender, h2_client: bool) {
        {
            let mut up = self.lock();
            if !h2_client || up.h1.len() < MAX_IDLE_H1_PER_H2_CLIENT {
                up.h1.push(sender);
            }
        }
        if h2_client {
            self.slots.freed.notify_waiters();
        }
    }

    /// Sends an upgrade request on an upstream connection of its own (the upgrade takes the
    /// connection over).
    async fn forward_upgrade(
        &self,
        req: Request<ReqBody>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let io = self.proxy.connect().await?;
        let (mut sender, conn) = self.proxy.h1_client.handshake(io).await.map_err(|e| {
            debug!(error = %e, "upstream handshake failed");
            UpstreamError::Connect
        })?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                debug!(error = %e, "upstream upgrade connection ended with an error");
            }
        });
        sender.send_request(req).await.map_err(|e| {
            debug!(error = %e, "upstream upgrade request failed");
            UpstreamError::Request
        })
    }

    async fn h2_sender(&self, fresh: bool) -> Result<H2Sender, UpstreamError> {
        if !fresh
            && let Some(s) = self.lock().h2.as_ref()
            && !s.is_closed()
        {
            return Ok(s.clone());
        }
        let io = self.proxy.connect().await?;
        let (sender, conn) = self.proxy.h2_client.handshake(io).await.map_err(|e| {
            debug!(error = %e, "upstream http2 handshake failed");
            UpstreamError::Connect
        })?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(error = %e, "upstream http2 connection ended with an error");
            }
        });
        self.lock().h2 = Some(sender.clone());
        Ok(sender)
    }

    /// Sends the request upstream. A request that was not written because the upstream
    /// connection had just closed (a keep-alive race) is sent once more on a new one.
    async fn forward(
        &self,
        req: Request<ReqBody>,
        h2_client: bool,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let request_failed = |e: hyper::Error| {
            debug!(error = %e, "upstream request failed");
            UpstreamError::Request
        };
        if self.proxy.upstream_http2 {
            return Box::pin(self.forward_h2(req)).await;
        }
        let mut s = self.h1_sender(h2_client).await?;
        match s.try_send_request(req).await {
            Ok(r) => {
                self.put_h1(s, h2_client);
                Ok(r)
            }
            Err(mut e) => match e.take_message() {
                Some(req) => {
                    debug!(error = %e.error(), "upstream connection closed; retrying on a new one");
                    drop(s);
                    Box::pin(async move {
                        let mut s = if h2_client {
                            self.h1_sender_shared().await?
                        } else {
                            self.new_h1(None).await?
                        };
                        let r = s.send_request(req).await.map_err(request_failed)?;
                        self.put_h1(s, h2_client);
                        Ok(r)
                    })
                    .await
                }
                None => Err(request_failed(e.into_error())),
            },
        }
    }

    async fn forward_h2(&self, req: Request<ReqBody>) -> Result<Response<Incoming>, UpstreamError> {
        let request_failed = |e: hyper::Error| {
            debug!(error = %e, "upstream request failed");
            UpstreamError::Request
        };
        let mut s = self.h2_sender(false).await?;
        if s.ready().await.is_err() {
            s = self.h2_sender(true).await?;
        }
        match s.try_send_request(req).await {
            Ok(r) => Ok(r),
            Err(mut e) => match e.take_message() {
                Some(req) => {
                    let mut s = self.h2_sender(true).await?;
                    s.send_request(req).await.map_err(request_failed)
                }
                None => Err(request_failed(e.into_error())),
            },
        }
    }
}

#[derive(Clone)]
struct ProxyService {
    state: Arc<ConnState>,
}

type ProxyBody = Tracked<Either<Incoming, Full<Bytes>>>;

impl hyper::service::Service<Request<Incoming>> for ProxyService {
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let state = self.state.clone();
        Box::pin(async move { Ok(handle(state, req).await) })
    }
}

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// `Trailer` is not among them: it announces the trailer fields end to end (RFC 9110,
/// 6.6.2), and hyper sends HTTP/1.1 trailers only when it is present. `TE` is, but its
/// `trailers` token is passed on (see [`strip_hop_by_hop_keep_te_trailers`]).
static HOP_BY_HOP: [HeaderName; 6] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Whether a `TE` header names `trailers` (the client accepts trailer fields).
fn te_accepts_trailers(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| {
            t.split(';')
                .next()
                .is_some_and(|t| t.trim().eq_ignore_ascii_case("trailers"))
        })
}

/// [`strip_hop_by_hop`] for a request: `TE: trailers` goes on (gRPC needs it, and hyper
/// sends an HTTP/1.1 response's trailers only when the request said so), the rest of `TE`
/// does not.
pub fn strip_hop_by_hop_keep_te_trailers(headers: &mut HeaderMap) {
    let trailers = headers.contains_key(header::TE) && te_accepts_trailers(headers);
    strip_hop_by_hop(headers);
    if trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// Removes the hop-by-hop headers, and those that `Connection` names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages have a few headers and none of these: one pass over the names is
    // cheaper than a lookup per hop-by-hop name.
    if !headers.keys().any(|k| HOP_BY_HOP.contains(k)) {
        return;
    }
    // Headers named in `Connection` are hop-by-hop too.
    if headers.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
            .collect();
        for n in &named {
            headers.remove(n);
        }
    }
    for n in HOP_BY_HOP.iter() {
        headers.remove(n);
    }
}

fn plain(code: StatusCode, msg: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(msg.as_bytes())));
    *r.status_mut() = code;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

async fn handle(state: Arc<ConnState>, mut req: Request<Incoming>) -> Response<ProxyBody> {
    let proxy = &state.proxy;
    let metrics = &proxy.metrics;
    metrics.request_start();
    state.request_started();
    let guard = RequestGuard {
        state: state.clone(),
        start: Instant::now(),
    };
    let version = req.version();
    let h2_client = version == Version::HTTP_2;
    if h2_client {
        state.ctl.is_h2.store(true, Ordering::Release);
    }
    // An HTTP/1.1 upgrade (WebSocket): the client's half of the tunnel, if the upstream
    // agrees.
    let upgrade = if h2_client || proxy.upstream_http2 {
        None
    } else {
        tunnel::requested_upgrade(req.headers()).map(|p| (p, hyper::upgrade::on(&mut req)))
    };
    let (mut parts, body) = req.into_parts();
    let body = ReqBody::new(body, state.clone());
    let mut host_from_authority = None;
    if proxy.upstream_http2 {
        // HTTP/2 needs the absolute form (`:scheme`, `:authority`).
        host_from_authority = parts.uri.authority().cloned();
        let mut uri = http::uri::Parts::default();
        uri.scheme = Some(http::uri::Scheme::HTTP);
        uri.authority = Some(proxy.upstream_authority.clone());
        uri.path_and_query = Some(
            parts
                .uri
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")),
        );
        parts.uri = match Uri::from_parts(uri) {
            Ok(u) => u,
            Err(_) => {
                let resp = plain(StatusCode::BAD_REQUEST, "bad request target\n");
                return resp.map(|b| Tracked::new(Either::Right(b), guard, 400));
            }
        };
    } else if parts.uri.authority().is_some() || parts.uri.scheme().is_some() {
        // HTTP/1.1 upstream: origin form (`/path?query`); the authority goes to `Host`.
        host_from_authority = parts.uri.authority().cloned();
        parts.uri = Uri::from(
            parts
                .uri
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")),
        );
    }
    strip_hop_by_hop_keep_te_trailers(&mut parts.headers);
    if let Some((proto, _)) = &upgrade {
        tunnel::restore_upgrade_headers(&mut parts.headers, proto.clone());
    }
    if !parts.headers.contains_key(header::HOST) {
        let host = host_from_authority
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
            .unwrap_or_else(|| proxy.upstream_host.clone());
        parts.headers.insert(header::HOST, host);
    }
    let xff = match parts
        .headers
        .get(&X_FORWARDED_FOR)
        .and_then(|v| v.to_str().ok())
    {
        Some(prev) => HeaderValue::from_str(&format!("{prev}, {}", state.peer_ip)).ok(),
        None => Some(state.xff.clone()),
    };
    if let Some(v) = xff {
        parts.headers.insert(X_FORWARDED_FOR.clone(), v);
    }
    parts.version = if proxy.upstream_http2 {
        Version::HTTP_2
    } else {
        Version::HTTP_11
    };
    let upstream_req = Request::from_parts(parts, body);

    let is_upgrade = upgrade.is_some();
    let forward = async {
        if is_upgrade {
            state.forward_upgrade(upstream_req).await
        } else {
            state.forward(upstream_req, h2_client).await
        }
    };
    let forwarded = match proxy.upstream_timeout {
        None => forward.await,
        Some(t) => tokio::time::timeout(t, forward)
            .await
            .unwrap_or(Err(UpstreamError::Timeout)),
    };
    let mut resp = match forwarded {
        Ok(mut r) if r.status() == StatusCode::SWITCHING_PROTOCOLS => {
            match (upgrade, r.headers().get(header::UPGRADE).cloned()) {
                (Some((_, client)), Some(proto)) => {
                    let upstream = hyper::upgrade::on(&mut r);
                    strip_hop_by_hop(r.headers_mut());
                    tunnel::restore_upgrade_headers(r.headers_mut(), proto);
                    state.lock().tunnel = Some(PendingTunnel { client, upstream });
                    return r.map(|b| Tracked::new(Either::Left(b), guard, 101));
                }
                _ => {
                    // A switch nobody asked for (or to no protocol): not passed on.
                    metrics.upstream_error("protocol");
                    plain(StatusCode::BAD_GATEWAY, "upstream switched protocols\n")
                        .map(Either::Right)
                }
            }
        }
        Ok(r) => r.map(Either::Left),
        Err(UpstreamError::Timeout) => {
            metrics.upstream_error(UpstreamError::Timeout.kind());
            plain(StatusCode::GATEWAY_TIMEOUT, "upstream timed out\n").map(Either::Right)
        }
        Err(e) => {
            metrics.upstream_error(e.kind());
            plain(StatusCode::BAD_GATEWAY, "upstream unavailable\n").map(Either::Right)
        }
    };
    strip_hop_by_hop(resp.headers_mut());
    if !h2_client && state.ctl.level() >= CloseLevel::Graceful {
        // hyper closes the connection after a response that says so.
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    let code = resp.status().as_u16();
    resp.map(|b| Tracked::new(b, guard, code))
}

/// Counts a request as in flight until its response body is done (or dropped).
struct RequestGuard {
    state: Arc<ConnState>,
    start: Instant,
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        let now = Instant::now();
        self.state
            .proxy
            .metrics
            .request_end(now.saturating_duration_since(self.start));
        self.state.request_ended(now);
    }
}

/// What a response whose body was not sent to its end counts as: the upstream failed
/// mid-body (an error for the gates, like any 5xx)…
const CODE_UPSTREAM_FAILED_MID_BODY: u16 = 502;
/// …or the client went away (or was closed for a stalled body) before the end (nginx's
/// "client closed request"; not a server error).
const CODE_CLIENT_GONE_MID_BODY: u16 = 499;

/// A response body that holds the request's [`RequestGuard`], counts the response's status
/// once the body is done (`code` at its end, [`CODE_UPSTREAM_FAILED_MID_BODY`] or
/// [`CODE_CLIENT_GONE_MID_BODY`] if it ends early) and reports its progress to the
/// connection's body timer.
pub struct Tracked<B: Body> {
    inner: B,
    guard: RequestGuard,
    code: u16,
    counted: bool,
    /// Counted in the connection's moving bodies.
    moving: bool,
}

impl<B: Body> Tracked<B> {
    fn new(inner: B, guard: RequestGuard, code: u16) -> Self {
        let moving = !inner.is_end_stream();
        if moving {
            guard.state.body_started();
        }
        Tracked {
            inner,
            guard,
            code,
            counted: false,
            moving,
        }
    }

    fn count(&mut self, code: u16) {
        if !self.counted {
            self.counted = true;
            self.guard.state.proxy.metrics.request_done(code);
        }
    }

    fn stop_moving(&mut self) {
        if self.moving {
            self.moving = false;
            self.guard.state.body_ended();
        }
    }
}

impl<B: Body> Drop for Tracked<B> {
    fn drop(&mut self) {
        let code = if self.inner.is_end_stream() {
            self.code
        } else {
            CODE_CLIENT_GONE_MID_BODY
        };
        self.count(code);
        self.stop_moving();
    }
}

impl<B: Body + Unpin> Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        match &r {
            Poll::Pending => {}
            Poll::Ready(Some(Ok(_))) => {
                if self.moving {
                    self.guard.state.body_progress();
                }
            }
            Poll::Ready(None) => {
                let code = self.code;
                self.count(code);
                self.stop_moving();
            }
            Poll::Ready(Some(Err(_))) => {
                self.guard
                    .state
                    .proxy
                    .metrics
                    .upstream_error(UpstreamError::Body.kind());
                self.count(CODE_UPSTREAM_FAILED_MID_BODY);
                self.stop_moving();
            }
        }
        r
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A request body on its way upstream: reports its progress to the connection's body
/// timer from the moment the upstream side first asks for it until its end.
pub struct ReqBody {
    inner: Incoming,
    state: Arc<ConnState>,
    moving: bool,
    done: bool,
}

impl ReqBody {
    fn new(inner: Incoming, state: Arc<ConnState>) -> Self {
        ReqBody {
            inner,
            state,
            moving: false,
            done: false,
        }
    }

    fn stop_moving(&mut self) {
        self.done = true;
        if self.moving {
            self.moving = false;
            self.state.body_ended();
        }
    }
}

impl Drop for ReqBody {
    fn drop(&mut self) {
        self.stop_moving();
    }
}

impl Body for ReqBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        if !self.moving && !self.done {
            self.moving = true;
            self.state.body_started();
        }
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        match &r {
            Poll::Pending => {}
            Poll::Ready(Some(Ok(_))) => self.state.body_progress(),
            Poll::Ready(_) => self.stop_moving(),
        }
        r
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conns::{ConnTracker, serve_on_loopback};
    use http_body_util::{BodyExt, Empty};
    use std::sync::atomic::AtomicU64;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

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
                            return Ok::<_, Infallible>(Response::new(Full::new(
                                Bytes::from_static(b"ok"),
                            )));
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
}
