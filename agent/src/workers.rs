//! Thread per core for the proxies: client connections are dealt round-robin to worker
//! threads, each with its own single-threaded runtime, so that a connection (and, in http
//! mode, its upstream connection) lives on one thread and a request never wakes another.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::net::TcpStream;
use tracing::debug;

use crate::conns::LINGER;

/// Worker threads for proxies created afterwards (0: connections run on the runtime that
/// accepted them).
static WORKER_THREADS: AtomicUsize = AtomicUsize::new(0);

/// Sets how many threads serve the proxies' client connections. Takes effect for proxies
/// created afterwards.
pub fn set_worker_threads(n: usize) {
    WORKER_THREADS.store(n, Ordering::Relaxed);
}

pub(crate) fn worker_threads() -> usize {
    WORKER_THREADS.load(Ordering::Relaxed)
}

/// Single-threaded runtimes on their own threads; they stop when this is dropped (once the
/// sockets they still close are closed).
pub(crate) struct Workers {
    handles: Vec<tokio::runtime::Handle>,
    _stop: Vec<tokio::sync::oneshot::Sender<()>>,
    next: AtomicUsize,
}

impl Workers {
    /// `n` workers; None (serve on the calling runtime) for 0, or if one cannot start.
    pub(crate) fn start(n: usize) -> Option<Workers> {
        if n == 0 {
            return None;
        }
        let mut handles = Vec::new();
        let mut stop = Vec::new();
        for i in 0..n {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot start a worker runtime; serving on the main one");
                    return None;
                }
            };
            let (tx, rx) = tokio::sync::oneshot::channel::<()>();
            handles.push(rt.handle().clone());
            stop.push(tx);
            let spawned = std::thread::Builder::new()
                .name(format!("sluice-worker-{i}"))
                .spawn(move || {
                    rt.block_on(async {
                        let _ = rx.await;
                        // The last connections' sockets may still be closing (FIN, then
                        // reading until the peer's): let that finish, never cut it short.
                        tokio::time::sleep(LINGER + Duration::from_millis(500)).await;
                    });
                });
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "cannot start a worker thread; serving on the main runtime");
                return None;
            }
        }
        Some(Workers {
            handles,
            _stop: stop,
            next: AtomicUsize::new(0),
        })
    }

    /// Moves `stream` to the next worker's reactor and serves it there with `serve`.
    pub(crate) fn spawn<F, Fut>(&self, stream: TcpStream, peer: SocketAddr, serve: F)
    where
        F: FnOnce(TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.handles.len();
        match stream.into_std() {
            Ok(std) => {
                self.handles[i].spawn(async move {
                    match TcpStream::from_std(std) {
                        Ok(s) => serve(s).await,
                        Err(e) => debug!(%peer, error = %e, "cannot move a connection to a worker"),
                    }
                });
            }
            Err(e) => debug!(%peer, error = %e, "cannot move a connection to a worker"),
        }
    }
}
