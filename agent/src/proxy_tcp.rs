//! TCP mode: an L4 proxy. When a connection is asked to leave it waits for a moment the
//! connection is idle in both directions (no byte moved for `idle_close_after`), then
//! half-closes towards the client (FIN), forwards whatever the client still sends until
//! the client's own FIN, then closes towards the upstream. At the drain deadline it closes
//! whatever is left, still with FIN.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::time::{Instant, Sleep};
use tracing::debug;

use crate::conns::{CloseLevel, ConnGuard, LINGER, LevelWatch, linger_close, set_keepalive};
use crate::metrics::{CloseReason, Metrics};
use crate::workers::Workers;

const BUF: usize = 32 * 1024;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

pub struct TcpProxy {
    upstream: String,
    idle_close_after: Duration,
    tcp_keepalive: Option<Duration>,
    metrics: Arc<Metrics>,
    workers: Option<Workers>,
}

impl TcpProxy {
    /// Serves on [`crate::workers::set_worker_threads`] worker threads (if any).
    pub fn new(
        upstream: String,
        idle_close_after: Duration,
        tcp_keepalive: Option<Duration>,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        Self::with_workers(
            upstream,
            idle_close_after,
            tcp_keepalive,
            metrics,
            crate::workers::worker_threads(),
        )
    }

    fn with_workers(
        upstream: String,
        idle_close_after: Duration,
        tcp_keepalive: Option<Duration>,
        metrics: Arc<Metrics>,
        workers: usize,
    ) -> Arc<Self> {
        Arc::new(TcpProxy {
            upstream,
            idle_close_after,
            tcp_keepalive,
            metrics,
            workers: Workers::start(workers),
        })
    }

    /// Serves one client connection until it ends (on a worker thread, if there are any).
    pub async fn serve(self: Arc<Self>, client: TcpStream, peer: SocketAddr, guard: ConnGuard) {
        let Some(workers) = &self.workers else {
            return self.serve_here(client, peer, guard).await;
        };
        let this = self.clone();
        workers.spawn(client, peer, move |s| async move {
            this.serve_here(s, peer, guard).await
        });
    }

    async fn serve_here(&self, client: TcpStream, peer: SocketAddr, mut guard: ConnGuard) {
        let _ = client.set_nodelay(true);
        set_keepalive(&client, self.tcp_keepalive);
        let upstream =
            match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&self.upstream)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    debug!(%peer, error = %e, "upstream connect failed");
                    self.metrics.upstream_error("connect");
                    guard.set_reason(CloseReason::UpstreamError);
                    drop(guard);
                    linger_close(client).await;
                    return;
                }
                Err(_) => {
                    self.metrics.upstream_error("connect_timeout");
                    guard.set_reason(CloseReason::UpstreamError);
                    drop(guard);
                    linger_close(client).await;
                    return;
                }
            };
        let _ = upstream.set_nodelay(true);
        set_keepalive(&upstream, self.tcp_keepalive);
        let ctl = guard.ctl().clone();
        let mut watch = LevelWatch::new(ctl.clone());
        let (mut client, mut upstream) = (client, upstream);
        let end = {
            let (mut cr, mut cw) = client.split();
            let (mut ur, mut uw) = upstream.split();
            self.pump(&mut cr, &mut cw, &mut ur, &mut uw, &mut watch, peer)
                .await
        };
        match end {
            End::Done => {}
            End::UpstreamFailed => {
                self.metrics.upstream_error("reset");
                guard.set_reason(CloseReason::UpstreamError);
            }
            End::ClientFailed => {
                if ctl.level() == CloseLevel::Open {
                    guard.set_reason(CloseReason::Error);
                }
            }
        }
        drop(guard);
        // A side that failed (RST, or a write it refused) is passed on as RST to the other
        // side (SO_LINGER 0); everything else closes with FIN.
        match end {
            End::Done => {
                tokio::join!(linger_close(client), linger_close(upstream));
            }
            End::UpstreamFailed => {
                let _ = client.set_zero_linger();
                drop(client);
                drop(upstream);
            }
            End::ClientFailed => {
                let _ = upstream.set_zero_linger();
                drop(upstream);
                drop(client);
            }
        }
    }

    /// Moves bytes both ways until the connection is over.
    ///
    /// Drain: once asked to leave and idle in both directions for `idle_close_after`, FIN
    /// towards the upstream (the application sees its client leave). What the upstream
    /// still sends is delivered until its own FIN, which is passed on to the client; the
    /// client's bytes from then on cannot reach the upstream and are discarded. An upstream
    /// that keeps the connection open without sending for `idle_close_after` more gets the
    /// client closed (FIN) anyway. After the FIN towards the client, the client has
    /// [`LINGER`] for its own. At the drain deadline (or a forced end) the connection ends,
    /// even while a write is blocked on a peer that stopped reading.
    async fn pump(
        &self,
        cr: &mut ReadHalf<'_>,
        cw: &mut WriteHalf<'_>,
        ur: &mut ReadHalf<'_>,
        uw: &mut WriteHalf<'_>,
        watch: &mut LevelWatch,
        peer: SocketAddr,
    ) -> End {
        let ctl = watch.ctl().clone();
        let mut c2u = vec![0u8; BUF];
        let mut u2c = vec![0u8; BUF];
        // Read directions still open, and write directions not shut down yet.
        let (mut client_reading, mut upstream_reading) = (true, true);
        let (mut to_upstream_open, mut to_client_open) = (true, true);
        let mut last_activity = Instant::now();
        // The drain's FIN towards the upstream was sent.
        let mut drain_fin_sent = false;
        let mut fin_to_client: Option<Instant> = None;
        // Timers exist only while draining (none on the path of a byte).
        let mut idle_timer: Option<Pin<Box<Sleep>>> = None;
        let mut linger_timer: Option<Pin<Box<Sleep>>> = None;

        loop {
            let level = ctl.level();
            if level == CloseLevel::Now {
                return End::Done;
            }
            if !client_reading && !upstream_reading {
                return End::Done;
            }
            if level == CloseLevel::Graceful && fin_to_client.is_none() && idle_timer.is_none() {
                idle_timer = Some(Box::pin(tokio::time::sleep_until(
                    last_activity + self.idle_close_after,
                )));
            }
            if let Some(t) = fin_to_client
                && linger_timer.is_none()
            {
                idle_timer = None;
                linger_timer = Some(Box::pin(tokio::time::sleep_until(t + LINGER)));
            }
            tokio::select! {
                biased;
                r = cr.read(&mut c2u), if client_reading => match r {
                    Ok(0) => {
                        client_reading = false;
                        if to_upstream_open {
                            to_upstream_open = false;
                            let _ = uw.shutdown().await;
                        }
                        if fin_to_client.is_some() {
                            // Both sides said goodbye to each other through us.
                            return End::Done;
                        }
                    }
                    Ok(n) => {
                        if !to_upstream_open {
                            // After the drain's FIN towards the upstream: cannot reach it.
                            continue;
                        }
                        last_activity = Instant::now();
                        match write_unless_now(uw, &c2u[..n], watch).await {
                            Ok(true) => {}
                            Ok(false) => return End::Done,
                            Err(e) => {
                                debug!(%peer, error = %e, "upstream refused bytes");
                                return End::UpstreamFailed;
                            }
                        }
                    }
                    Err(e) => {
                        debug!(%peer, error = %e, "client connection failed");
                        return End::ClientFailed;
                    }
                },
                r = ur.read(&mut u2c), if upstream_reading => match r {
                    Ok(0) => {
                        upstream_reading = false;
                        if to_client_open {
                            to_client_open = false;
                            let _ = cw.shutdown().await;
                            fin_to_client = Some(Instant::now());
                        }
                    }
                    Ok(n) => {
                        last_activity = Instant::now();
                        match write_unless_now(cw, &u2c[..n], watch).await {
                            Ok(true) => {}
                            Ok(false) => return End::Done,
                            Err(e) => {
                                debug!(%peer, error = %e, "client refused bytes");
                                return End::ClientFailed;
                            }
                        }
                    }
                    Err(e) => {
                        debug!(%peer, error = %e, "upstream connection failed");
                        return End::UpstreamFailed;
                    }
                },
                _ = watch.changed() => {}
                _ = async { idle_timer.as_mut().expect("guarded").await }, if idle_timer.is_some() => {
                    let idle_at = last_activity + self.idle_close_after;
                    if idle_at > Instant::now() {
                        // Bytes moved since the timer was set: wait for a real idle moment.
                        if let Some(t) = idle_timer.as_mut() {
                            t.as_mut().reset(idle_at);
                        }
                    } else if !drain_fin_sent {
                        debug!(%peer, "idle while draining: half-closing towards the upstream");
                        drain_fin_sent = true;
                        if to_upstream_open {
                            to_upstream_open = false;
                            let _ = uw.shutdown().await;
                        }
                        last_activity = Instant::now();
                        if let Some(t) = idle_timer.as_mut() {
                            t.as_mut().reset(last_activity + self.idle_close_after);
                        }
                    } else {
                        debug!(%peer, "upstream keeps a drained connection open: closing the client");
                        idle_timer = None;
                        to_client_open = false;
                        upstream_reading = false;
                        let _ = cw.shutdown().await;
                        fin_to_client = Some(Instant::now());
                    }
                }
                _ = async { linger_timer.as_mut().expect("guarded").await }, if linger_timer.is_some() => return End::Done,
            }
        }
    }
}

/// How a tcp connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// Closed (FIN both ways), or ended by the drain deadline.
    Done,
    /// The upstream reset the connection or refused bytes: the client gets RST.
    UpstreamFailed,
    /// The client did: the upstream gets RST.
    ClientFailed,
}

/// Writes `buf`, unless the connection is told to close now first (`Ok(false)`): a peer
/// that stopped reading never holds the connection past the drain deadline.
async fn write_unless_now(
    w: &mut WriteHalf<'_>,
    buf: &[u8],
    watch: &mut LevelWatch,
) -> std::io::Result<bool> {
    if watch.ctl().level() == CloseLevel::Now {
        return Ok(false);
    }
    tokio::select! {
        biased;
        r = w.write_all(buf) => r.map(|()| true),
        _ = async {
            while watch.changed().await != CloseLevel::Now {}
        } => Ok(false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conns::{ConnTracker, serve_on_loopback};
    use tokio::net::TcpListener;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn forwards_on_workers_and_half_closes_when_asked_to_leave() {
        // An echo upstream.
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let up = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                });
            }
        });
        for workers in [0, 2] {
            let metrics = Arc::new(Metrics::new());
            let p = TcpProxy::with_workers(
                up.to_string(),
                Duration::from_millis(100),
                None,
                metrics.clone(),
                workers,
            );
            let tracker = ConnTracker::new(metrics);
            let addr = serve_on_loopback(tracker.clone(), move |s, peer, guard| {
                p.clone().serve(s, peer, guard)
            })
            .await;
            let mut c = TcpStream::connect(addr).await.unwrap();
            for i in 0..3u8 {
                c.write_all(&[i; 10]).await.unwrap();
                let mut buf = [0u8; 10];
                c.read_exact(&mut buf).await.unwrap();
                assert_eq!(buf, [i; 10], "workers={workers}");
            }
            // Asked to leave: once idle, FIN towards the client (read returns 0).
            assert_eq!(tracker.request_close(10), 1);
            let mut buf = [0u8; 1];
            let n = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf))
                .await
                .expect("FIN after the idle time")
                .unwrap();
            assert_eq!(n, 0, "workers={workers}");
            drop(c);
            tokio::time::timeout(Duration::from_secs(5), async {
                while tracker.active() > 0 {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
            .await
            .expect("connection ended");
        }
    }
}
