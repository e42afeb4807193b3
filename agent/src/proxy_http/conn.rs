//! One client connection's shared state and its upstream connections (lazily opened,
//! reused, reopened after an error; a small per-connection pool for HTTP/2 clients), and
//! the request body that reports its progress to the connection's body timer.

use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::HeaderValue;
use http::{Request, Response};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::{http1 as client1, http2 as client2};
use tokio::sync::Notify;
use tracing::debug;

use super::proxy::{HttpProxy, UpstreamError};
use crate::conns::ConnCtl;
use crate::tunnel::PendingTunnel;

/// Upstream HTTP/1.1 connections kept per HTTP/2 client connection between streams.
const MAX_IDLE_H1_PER_H2_CLIENT: usize = 16;

pub(super) type H1Sender = client1::SendRequest<ReqBody>;
pub(super) type H2Sender = client2::SendRequest<ReqBody>;
/// An upstream connection's future, driven by the client connection's task.
pub(super) type DrivenConn = Pin<Box<dyn Future<Output = ()> + Send>>;

/// One client connection's state, shared by its requests.
pub(super) struct ConnState {
    pub(super) proxy: Arc<HttpProxy>,
    pub(super) ctl: Arc<ConnCtl>,
    pub(super) peer_ip: IpAddr,
    /// `X-Forwarded-For` when the request carries none.
    pub(super) xff: HeaderValue,
    pub(super) up: Mutex<UpState>,
    /// Set when `up.new_driven` has connections for the serve loop to pick up.
    pub(super) new_driven: AtomicBool,
    /// Requests of this connection in flight.
    pub(super) in_flight: AtomicUsize,
    pub(super) born: Instant,
    /// When the last request ended, in nanoseconds after `born` (0: none yet).
    pub(super) idle_since: AtomicU64,
    /// A request arrived on this connection.
    pub(super) seen_request: AtomicBool,
    /// Request and response bodies of this connection being moved now.
    pub(super) bodies: AtomicUsize,
    /// When a body last moved (or began), in nanoseconds after `born`.
    pub(super) progress: AtomicU64,
    /// Upstream HTTP/1.1 connections of this (HTTP/2) client connection.
    pub(super) slots: Arc<UpSlots>,
}

/// Counts the upstream connections of one HTTP/2 client connection.
pub(super) struct UpSlots {
    pub(super) open: AtomicUsize,
    pub(super) max: usize,
    /// Woken when a connection closes or goes back to the pool.
    pub(super) freed: Notify,
}

/// One of [`UpSlots`], held by the upstream connection's task while it runs.
pub(super) struct UpSlot(Arc<UpSlots>);

impl UpSlot {
    pub(super) fn take(slots: &Arc<UpSlots>) -> Option<UpSlot> {
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
pub(super) struct Driven {
    pub(super) conns: Vec<DrivenConn>,
    pub(super) registered: bool,
}

#[derive(Default)]
pub(super) struct UpState {
    /// Upstream HTTP/1.1 connections not used by a request (one may still be reading the
    /// previous response's body).
    pub(super) h1: Vec<H1Sender>,
    pub(super) h2: Option<H2Sender>,
    /// New upstream connections for the serve loop to drive.
    pub(super) new_driven: Vec<DrivenConn>,
    pub(super) waker: Option<Waker>,
    /// An upgrade the upstream accepted: the serve loop runs it once hyper lets go.
    pub(super) tunnel: Option<PendingTunnel>,
}

impl ConnState {
    /// When the header read timeout closes the connection if no request comes: `timeout`
    /// after the last request ended (or the connection began); later if one is in flight.
    pub(super) fn head_deadline(&self, timeout: Duration) -> Instant {
        let now = Instant::now();
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return now + timeout;
        }
        let idle = self.born + Duration::from_nanos(self.idle_since.load(Ordering::Acquire));
        idle + timeout
    }

    pub(super) fn request_started(&self) {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        if !self.seen_request.load(Ordering::Relaxed) {
            self.seen_request.store(true, Ordering::Release);
        }
    }

    pub(super) fn nanos_since_born(&self) -> u64 {
        u64::try_from(self.born.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// A body began to move.
    pub(super) fn body_started(&self) {
        self.progress
            .store(self.nanos_since_born(), Ordering::Release);
        self.bodies.fetch_add(1, Ordering::AcqRel);
    }

    /// A body moved a frame.
    pub(super) fn body_progress(&self) {
        self.progress
            .store(self.nanos_since_born(), Ordering::Release);
    }

    pub(super) fn body_ended(&self) {
        self.bodies.fetch_sub(1, Ordering::AcqRel);
    }

    /// When the bodies moving now count as stalled (none moving: `None`).
    pub(super) fn body_stall_at(&self, limit: Duration) -> Option<Instant> {
        if self.bodies.load(Ordering::Acquire) == 0 {
            return None;
        }
        let at = self.born + Duration::from_nanos(self.progress.load(Ordering::Acquire));
        Some(at + limit)
    }

    pub(super) fn request_ended(&self, now: Instant) {
        let nanos = u64::try_from(now.saturating_duration_since(self.born).as_nanos());
        self.idle_since
            .store(nanos.unwrap_or(u64::MAX), Ordering::Release);
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
    }

    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, UpState> {
        self.up.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Drives the upstream connections opened for HTTP/1.1 requests; never ready.
    pub(super) fn poll_driven(&self, cx: &mut Context<'_>, driven: &mut Driven) -> Poll<()> {
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
    pub(super) fn drive(&self, conn: DrivenConn) {
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
    pub(super) async fn h1_sender(&self, h2_client: bool) -> Result<H1Sender, UpstreamError> {
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
    pub(super) async fn h1_sender_shared(&self) -> Result<H1Sender, UpstreamError> {
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
    pub(super) async fn new_h1(&self, slot: Option<UpSlot>) -> Result<H1Sender, UpstreamError> {
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

    pub(super) fn put_h1(&self, sender: H1Sender, h2_client: bool) {
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
    pub(super) async fn forward_upgrade(
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

    pub(super) async fn h2_sender(&self, fresh: bool) -> Result<H2Sender, UpstreamError> {
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
    pub(super) async fn forward(
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

    pub(super) async fn forward_h2(
        &self,
        req: Request<ReqBody>,
    ) -> Result<Response<Incoming>, UpstreamError> {
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

/// A request body on its way upstream: reports its progress to the connection's body
/// timer from the moment the upstream side first asks for it until its end.
pub struct ReqBody {
    pub(super) inner: Incoming,
    pub(super) state: Arc<ConnState>,
    pub(super) moving: bool,
    pub(super) done: bool,
}

impl ReqBody {
    pub(super) fn new(inner: Incoming, state: Arc<ConnState>) -> Self {
        ReqBody {
            inner,
            state,
            moving: false,
            done: false,
        }
    }

    pub(super) fn stop_moving(&mut self) {
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
