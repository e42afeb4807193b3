//! The set of client connections a proxy holds, and the handle each connection's task
//! watches to learn that it should leave.

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use crate::drain::{Observation, Phase};
use crate::metrics::{CloseReason, Metrics};

/// How urgently a connection is asked to leave.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum CloseLevel {
    Open = 0,
    /// Leave politely (drain's closing phase).
    Graceful = 1,
    /// Leave now (deadline or forced drain).
    Now = 2,
}

/// Shared between a connection's task and the tracker.
#[derive(Debug, Default)]
pub struct ConnCtl {
    level: AtomicU8,
    /// The waker of the task serving the connection, registered by its [`LevelWatch`].
    waker: Mutex<Option<Waker>>,
    /// Set once the connection turned out to speak HTTP/2 (or may: its first bytes are
    /// the start of the HTTP/2 preface).
    pub is_h2: AtomicBool,
}

impl ConnCtl {
    pub fn level(&self) -> CloseLevel {
        match self.level.load(Ordering::Acquire) {
            0 => CloseLevel::Open,
            1 => CloseLevel::Graceful,
            _ => CloseLevel::Now,
        }
    }

    /// Raises the level (never lowers it). Returns whether it changed.
    fn raise(&self, to: CloseLevel) -> bool {
        let prev = self.level.fetch_max(to as u8, Ordering::AcqRel);
        if prev < to as u8 {
            let waker = self.lock_waker().clone();
            if let Some(w) = waker {
                w.wake();
            }
            true
        } else {
            false
        }
    }

    fn lock_waker(&self) -> std::sync::MutexGuard<'_, Option<Waker>> {
        self.waker.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Watches a connection's [`ConnCtl`] from the one task serving the connection. Polling it
/// is an atomic load: the task's waker is registered once (again only if it changes), not
/// on every poll as a `Notify` waiter would be, which takes a lock each time.
pub struct LevelWatch {
    ctl: Arc<ConnCtl>,
    seen: CloseLevel,
    registered: Option<Waker>,
}

impl LevelWatch {
    /// Reports raises above `CloseLevel::Open` (a connection born asked to leave is
    /// reported at once).
    pub fn new(ctl: Arc<ConnCtl>) -> Self {
        LevelWatch {
            ctl,
            seen: CloseLevel::Open,
            registered: None,
        }
    }

    pub fn ctl(&self) -> &Arc<ConnCtl> {
        &self.ctl
    }

    /// Ready with the new level once it is above the last one reported.
    pub fn poll_changed(&mut self, cx: &mut Context<'_>) -> Poll<CloseLevel> {
        let level = self.ctl.level();
        if level > self.seen {
            self.seen = level;
            return Poll::Ready(level);
        }
        if !self
            .registered
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()))
        {
            *self.ctl.lock_waker() = Some(cx.waker().clone());
            self.registered = Some(cx.waker().clone());
            // A raise between the load above and the registration found no waker (or the
            // old one): look again, now that any later raise will wake this one.
            let level = self.ctl.level();
            if level > self.seen {
                self.seen = level;
                return Poll::Ready(level);
            }
        }
        Poll::Pending
    }

    /// Resolves once the level is above the last one reported.
    pub async fn changed(&mut self) -> CloseLevel {
        std::future::poll_fn(|cx| self.poll_changed(cx)).await
    }
}

impl Drop for LevelWatch {
    fn drop(&mut self) {
        if self.registered.is_some() {
            *self.ctl.lock_waker() = None;
        }
    }
}

/// All open connections.
pub struct ConnTracker {
    next_id: AtomicU64,
    conns: Mutex<HashMap<u64, Arc<ConnCtl>>>,
    base: Instant,
    /// Nanoseconds after `base` of the newest accept, plus one (0: none yet).
    last_accept: AtomicU64,
    /// Closing phase: new connections are born already asked to leave.
    born_graceful: AtomicBool,
    metrics: Arc<Metrics>,
}

impl ConnTracker {
    pub fn new(metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(ConnTracker {
            next_id: AtomicU64::new(0),
            conns: Mutex::new(HashMap::new()),
            base: Instant::now(),
            last_accept: AtomicU64::new(0),
            born_graceful: AtomicBool::new(false),
            metrics,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<ConnCtl>>> {
        // A panic while holding this lock cannot leave the map inconsistent.
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a new connection; the guard unregisters it when dropped.
    pub fn register(self: &Arc<Self>) -> ConnGuard {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let ctl = Arc::new(ConnCtl::default());
        if self.born_graceful.load(Ordering::Acquire) {
            ctl.level
                .store(CloseLevel::Graceful as u8, Ordering::Release);
        }
        self.lock().insert(id, ctl.clone());
        let nanos = u64::try_from(self.base.elapsed().as_nanos()).unwrap_or(u64::MAX - 1);
        self.last_accept.store(nanos + 1, Ordering::Release);
        self.metrics.connections_accepted.inc();
        self.metrics.connections_active.inc();
        ConnGuard {
            tracker: self.clone(),
            ctl,
            id,
            reason: None,
        }
    }

    pub fn active(&self) -> usize {
        self.lock().len()
    }

    pub fn last_accept(&self) -> Option<Instant> {
        match self.last_accept.load(Ordering::Acquire) {
            0 => None,
            n => Some(self.base + Duration::from_nanos(n - 1)),
        }
    }

    /// Asks up to `n` connections that were not asked yet to leave politely.
    pub fn request_close(&self, n: usize) -> usize {
        let conns = self.lock();
        let mut asked = 0;
        for ctl in conns.values() {
            if asked >= n {
                break;
            }
            if ctl.raise(CloseLevel::Graceful) {
                asked += 1;
            }
        }
        asked
    }

    /// Raises every connection to `level`.
    pub fn close_all(&self, level: CloseLevel) {
        for ctl in self.lock().values() {
            ctl.raise(level);
        }
    }

    pub fn set_born_graceful(&self, on: bool) {
        self.born_graceful.store(on, Ordering::Release);
    }

    /// A connection accepted while `--max-connections` were open: it still tells the drain
    /// that load balancers send here; it is closed at once (FIN) without being served.
    pub fn shed(&self, stream: TcpStream) {
        let nanos = u64::try_from(self.base.elapsed().as_nanos()).unwrap_or(u64::MAX - 1);
        self.last_accept.store(nanos + 1, Ordering::Release);
        self.metrics.connections_shed.inc();
        // Closing politely reads what the client sent for a moment; a flood of shed
        // connections must not pile those up: beyond a bound they are simply dropped.
        if SHED_LINGERING.fetch_add(1, Ordering::AcqRel) < MAX_SHED_LINGERING {
            tokio::spawn(async move {
                linger_close_for(stream, SHED_LINGER).await;
                SHED_LINGERING.fetch_sub(1, Ordering::AcqRel);
            });
        } else {
            SHED_LINGERING.fetch_sub(1, Ordering::AcqRel);
            let _ = socket2::SockRef::from(&stream).shutdown(std::net::Shutdown::Write);
        }
    }
}

/// Shed connections closing politely right now (all proxies of the process).
static SHED_LINGERING: AtomicUsize = AtomicUsize::new(0);
const MAX_SHED_LINGERING: usize = 256;
const SHED_LINGER: Duration = Duration::from_millis(500);

/// Turns on TCP keep-alive: the first probe after `idle` without traffic, then one every
/// min(`idle`, 10 s); three unanswered probes end the connection (a peer that vanished
/// without FIN or RST). `None`: off.
pub fn set_keepalive(stream: &TcpStream, idle: Option<Duration>) {
    let Some(idle) = idle else { return };
    let ka = socket2::TcpKeepalive::new()
        .with_time(idle)
        .with_interval(idle.min(Duration::from_secs(10)))
        .with_retries(3);
    if let Err(e) = socket2::SockRef::from(stream).set_tcp_keepalive(&ka) {
        tracing::debug!(error = %e, "cannot set TCP keep-alive");
    }
}

/// Whatever the drain controller drives: a proxy's connections, or observe mode's view.
pub trait ConnSource: Send + Sync {
    fn observe(&self) -> Observation;
    /// Asks up to `n` more connections to leave; returns how many were asked.
    fn request_close(&self, n: usize) -> usize;
    /// Drain deadline or forced end: every connection leaves now.
    fn close_now(&self);
    fn on_phase(&self, _phase: Phase) {}
}

/// A proxy's connections as a drain target.
pub struct ProxyConns {
    pub tracker: Arc<ConnTracker>,
    /// http: connections accepted while closing are served and asked to leave at the
    /// close rate like the others. tcp stops accepting instead.
    pub accept_while_closing: bool,
}

impl ConnSource for ProxyConns {
    fn observe(&self) -> Observation {
        Observation {
            active: self.tracker.active(),
            last_new_connection: self.tracker.last_accept(),
        }
    }
    fn request_close(&self, n: usize) -> usize {
        self.tracker.request_close(n)
    }
    fn close_now(&self) {
        self.tracker.close_all(CloseLevel::Now)
    }
    fn on_phase(&self, _phase: Phase) {
        // http keeps accepting while closing: a slow load balancer still sends new
        // connections here. Such stragglers are served and join the pool the pacer asks
        // to leave, at the same close rate. Sending each away on its first response
        // instead would make them bounce between the draining pods as fast as they are
        // served, and land on the new pods all at once when the load balancer catches up.
    }
}

/// Held by a connection's task; unregisters the connection and counts why it closed.
pub struct ConnGuard {
    tracker: Arc<ConnTracker>,
    ctl: Arc<ConnCtl>,
    id: u64,
    reason: Option<CloseReason>,
}

impl ConnGuard {
    pub fn ctl(&self) -> &Arc<ConnCtl> {
        &self.ctl
    }
    /// Overrides the reason the connection is counted as closed for.
    pub fn set_reason(&mut self, reason: CloseReason) {
        self.reason = Some(reason);
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.tracker.lock().remove(&self.id);
        let reason = self.reason.unwrap_or(match self.ctl.level() {
            CloseLevel::Open => CloseReason::Client,
            CloseLevel::Graceful => CloseReason::Drain,
            CloseLevel::Now => CloseReason::Deadline,
        });
        self.tracker.metrics.closed(reason);
        self.tracker.metrics.connections_active.dec();
    }
}

/// How long a closed socket keeps reading (and discarding) what the peer still sends, so
/// that closing it never makes the kernel answer with RST.
pub const LINGER: Duration = Duration::from_secs(2);
const LINGER_MAX_BYTES: usize = 1 << 20;

/// Closes a socket with FIN, never RST: shut down the write side, then read and discard
/// until the peer's FIN (or [`LINGER`]), and only then drop it. Dropping a socket that has
/// unread bytes in its receive buffer makes the kernel send RST.
pub async fn linger_close(stream: TcpStream) {
    linger_close_for(stream, LINGER).await
}

async fn linger_close_for(mut stream: TcpStream, linger: Duration) {
    let _ = stream.shutdown().await;
    let mut buf = [0u8; 4096];
    let mut total = 0usize;
    let deadline = tokio::time::Instant::now() + linger;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => {
                total += n;
                if total > LINGER_MAX_BYTES {
                    break;
                }
            }
        }
    }
}

/// A `TcpStream` that closes itself with [`linger_close`] when dropped (hyper drops the IO
/// when a connection ends).
pub struct LingerStream {
    inner: Option<TcpStream>,
    /// Until the first bytes are read: the connection whose `is_h2` they decide.
    detect_h2: Option<Arc<ConnCtl>>,
}

/// The HTTP/2 connection preface (RFC 9113, 3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

impl LingerStream {
    pub fn new(stream: TcpStream) -> Self {
        LingerStream {
            inner: Some(stream),
            detect_h2: None,
        }
    }

    /// Sets `ctl.is_h2` when the first bytes read are (the start of) the HTTP/2 preface.
    pub fn detecting_h2(stream: TcpStream, ctl: Arc<ConnCtl>) -> Self {
        LingerStream {
            inner: Some(stream),
            detect_h2: Some(ctl),
        }
    }
    fn io(&mut self) -> io::Result<&mut TcpStream> {
        self.inner
            .as_mut()
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotConnected))
    }
}

impl Drop for LingerStream {
    fn drop(&mut self) {
        if let Some(s) = self.inner.take()
            && let Ok(h) = tokio::runtime::Handle::try_current()
        {
            h.spawn(linger_close(s));
        }
    }
}

impl AsyncRead for LingerStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = match self.io() {
            Ok(s) => Pin::new(s).poll_read(cx, buf),
            Err(e) => Poll::Ready(Err(e)),
        };
        if self.detect_h2.is_some() && buf.filled().len() > before {
            let read = &buf.filled()[before..];
            let n = read.len().min(H2_PREFACE.len());
            if read[..n] == H2_PREFACE[..n]
                && let Some(ctl) = &self.detect_h2
            {
                ctl.is_h2.store(true, Ordering::Release);
            }
            self.detect_h2 = None;
        }
        r
    }
}

impl AsyncWrite for LingerStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.io() {
            Ok(s) => Pin::new(s).poll_write(cx, buf),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.io() {
            Ok(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
    fn is_write_vectored(&self) -> bool {
        true
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.io() {
            Ok(s) => Pin::new(s).poll_flush(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.io() {
            Ok(s) => Pin::new(s).poll_shutdown(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

/// Tests: accepts on a loopback port and hands every connection, registered with
/// `tracker`, to `serve` on its own task; returns the port's address.
#[cfg(test)]
pub(crate) async fn serve_on_loopback<F, Fut>(
    tracker: Arc<ConnTracker>,
    serve: F,
) -> std::net::SocketAddr
where
    F: Fn(TcpStream, std::net::SocketAddr, ConnGuard) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, peer)) = l.accept().await {
            tokio::spawn(serve(s, peer, tracker.register()));
        }
    });
    addr
}

/// Defers each write by one turn of the worker's runtime: the first `poll_write` of a
/// message wakes the task and returns `Pending`, the next one writes. The connections made
/// ready by one poll of the sockets then send together, after each has been processed, not
/// one by one in between (HAProxy's event loop works the same way): the application and
/// the clients find several messages per wake-up instead of one. Measured with the proxy on
/// a core of its own: −10 % CPU per request for the load client and upstream, −3 % for the
/// agent, +3–6 % requests/s (docs/agent.md).
pub struct DeferWrites<S> {
    inner: S,
    deferred: bool,
}

impl<S> DeferWrites<S> {
    pub fn new(inner: S) -> Self {
        DeferWrites {
            inner,
            deferred: false,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for DeferWrites<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for DeferWrites<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if !self.deferred {
            self.deferred = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if r.is_ready() {
            self.deferred = false;
        }
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracker_counts_and_asks_to_leave() {
        let m = Arc::new(Metrics::new());
        let t = ConnTracker::new(m.clone());
        assert_eq!(t.last_accept(), None);
        let g1 = t.register();
        let g2 = t.register();
        let _g3 = t.register();
        assert_eq!(t.active(), 3);
        assert!(t.last_accept().is_some());
        assert_eq!(t.request_close(2), 2);
        assert_eq!(t.request_close(5), 1);
        assert_eq!(t.request_close(5), 0);
        assert_eq!(g1.ctl().level(), CloseLevel::Graceful);
        t.close_all(CloseLevel::Now);
        assert_eq!(g2.ctl().level(), CloseLevel::Now);
        drop(g1);
        assert_eq!(t.active(), 2);
        t.set_born_graceful(true);
        let g4 = t.register();
        assert_eq!(g4.ctl().level(), CloseLevel::Graceful);
        let text = m.render();
        assert!(text.contains("sluice_agent_connections_closed_total{reason=\"deadline\"} 1"));
        assert!(text.contains("sluice_agent_connections_accepted_total 4"));
    }

    #[tokio::test]
    async fn level_watch_wakes_on_raise_and_reports_each_level_once() {
        let ctl = Arc::new(ConnCtl::default());
        let mut w = LevelWatch::new(ctl.clone());
        let c = ctl.clone();
        let raiser = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            c.raise(CloseLevel::Graceful);
        });
        let got = tokio::time::timeout(Duration::from_secs(5), w.changed()).await;
        assert_eq!(got.expect("woken by the raise"), CloseLevel::Graceful);
        raiser.await.unwrap();
        // Reported once: the next wait needs another raise.
        let again = tokio::time::timeout(Duration::from_millis(50), w.changed()).await;
        assert!(again.is_err());
        ctl.raise(CloseLevel::Now);
        assert_eq!(w.changed().await, CloseLevel::Now);
        // A watch made after the raise reports it at once.
        assert_eq!(LevelWatch::new(ctl).changed().await, CloseLevel::Now);
    }

    #[test]
    fn level_never_lowers() {
        let c = ConnCtl::default();
        assert!(c.raise(CloseLevel::Now));
        assert!(!c.raise(CloseLevel::Graceful));
        assert_eq!(c.level(), CloseLevel::Now);
    }

    #[test]
    fn defer_writes_writes_on_the_second_poll_after_waking_the_task() {
        use std::sync::atomic::AtomicUsize;
        struct Count(AtomicUsize);
        impl std::task::Wake for Count {
            fn wake(self: Arc<Self>) {
                self.0.fetch_add(1, Ordering::Relaxed);
            }
        }
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = std::task::Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        let mut w = DeferWrites::new(Vec::<u8>::new());
        // First poll: nothing written, the task asked to run again.
        assert!(Pin::new(&mut w).poll_write(&mut cx, b"abc").is_pending());
        assert_eq!(count.0.load(Ordering::Relaxed), 1);
        assert!(w.inner.is_empty());
        // Second: written; the next message is deferred again.
        assert!(matches!(
            Pin::new(&mut w).poll_write(&mut cx, b"abc"),
            Poll::Ready(Ok(3))
        ));
        assert_eq!(w.inner, b"abc");
        assert!(Pin::new(&mut w).poll_write(&mut cx, b"d").is_pending());
        assert_eq!(count.0.load(Ordering::Relaxed), 2);
    }
}
