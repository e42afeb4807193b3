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
use tokio::time::{Instant, Sleep};
use tracing::debug;

use crate::conns::{CloseLevel, ConnGuard, LINGER, LevelWatch, linger_close};
use crate::metrics::{CloseReason, Metrics};
use crate::workers::Workers;

const BUF: usize = 32 * 1024;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

pub struct TcpProxy {
    upstream: String,
    idle_close_after: Duration,
    metrics: Arc<Metrics>,
    workers: Option<Workers>,
}

impl TcpProxy {
    /// Serves on [`crate::workers::set_worker_threads`] worker threads (if any).
    pub fn new(upstream: String, idle_close_after: Duration, metrics: Arc<Metrics>) -> Arc<Self> {
        Self::with_workers(
            upstream,
            idle_close_after,
            metrics,
            crate::workers::worker_threads(),
        )
    }

    fn with_workers(
        upstream: String,
        idle_close_after: Duration,
        metrics: Arc<Metrics>,
        workers: usize,
    ) -> Arc<Self> {
        Arc::new(TcpProxy {
            upstream,
            idle_close_after,
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
        let ctl = guard.ctl().clone();
        let mut watch = LevelWatch::new(ctl.clone());
        let (mut client, mut upstream) = (client, upstream);
        let (mut cr, mut cw) = client.split();
        let (mut ur, mut uw) = upstream.split();
        let mut c2u = vec![0u8; BUF];
        let mut u2c = vec![0u8; BUF];
        let mut client_open = true; // client → upstream direction still flowing
        let mut upstream_open = true; // upstream → client direction still flowing
        let mut last_activity = Instant::now();
        let mut fin_to_client: Option<Instant> = None;
        let mut upstream_error = false;
        let mut level = CloseLevel::Open;
        // Timers exist only while draining (none on the path of a byte).
        let mut idle_timer: Option<Pin<Box<Sleep>>> = None;
        let mut linger_timer: Option<Pin<Box<Sleep>>> = None;

        loop {
            level = level.max(ctl.level());
            if level == CloseLevel::Now {
                break;
            }
            if !client_open && !upstream_open {
                break;
            }
            // When asked to leave: FIN the client at the first idle moment.
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
                r = cr.read(&mut c2u), if client_open => match r {
                    Ok(0) | Err(_) => {
                        client_open = false;
                        let _ = uw.shutdown().await;
                        if fin_to_client.is_some() {
                            // Both sides said goodbye to each other through us.
                            break;
                        }
                    }
                    Ok(n) => {
                        last_activity = Instant::now();
                        if uw.write_all(&c2u[..n]).await.is_err() {
                            upstream_error = true;
                            break;
                        }
                    }
                },
                r = ur.read(&mut u2c), if upstream_open => match r {
                    Ok(0) | Err(_) => {
                        upstream_open = false;
                        if fin_to_client.is_none() {
                            let _ = cw.shutdown().await;
                            fin_to_client = Some(Instant::now());
                        }
                    }
                    Ok(n) => {
                        last_activity = Instant::now();
                        if fin_to_client.is_some() {
                            // The client was told goodbye; late bytes cannot reach it.
                            continue;
                        }
                        if cw.write_all(&u2c[..n]).await.is_err() {
                            break;
                        }
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
                    } else {
                        debug!(%peer, "idle while draining: half-closing towards the client");
                        idle_timer = None;
                        let _ = cw.shutdown().await;
                        fin_to_client = Some(Instant::now());
                    }
                }
                _ = async { linger_timer.as_mut().expect("guarded").await }, if linger_timer.is_some() => break,
            }
        }
        if upstream_error {
            guard.set_reason(CloseReason::UpstreamError);
        }
        drop(guard);
        tokio::join!(linger_close(client), linger_close(upstream));
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
