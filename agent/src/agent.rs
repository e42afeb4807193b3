//! Wiring: binds the sockets, starts the proxy or observer, the drain driver and the admin
//! endpoint; and the SIGTERM handling of the binary.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tracing::{debug, error, info};

use crate::admin::{Admin, Readiness};
use crate::config::{LimitArgs, ObserveArgs, Protocol, ProxyArgs};
use crate::conns::{ConnTracker, ProxyConns};
use crate::controller::Drainer;
use crate::drain::Phase;
use crate::metrics::Metrics;
use crate::observe::Observer;
use crate::proxy_http::HttpProxy;
use crate::proxy_tcp::TcpProxy;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("invalid upstream address {addr:?}: {source}")]
    Upstream {
        addr: String,
        source: http::uri::InvalidUri,
    },
    #[error("cannot install signal handler: {0}")]
    Signal(std::io::Error),
}

/// A started agent. Dropping it does not stop it; call [`RunningAgent::abort`].
pub struct RunningAgent {
    /// Where clients connect (proxy mode).
    pub listen_addr: Option<SocketAddr>,
    pub admin_addr: SocketAddr,
    pub drainer: Drainer,
    pub metrics: Arc<Metrics>,
    tracker: Option<Arc<ConnTracker>>,
    observer: Option<Arc<Observer>>,
    tasks: Vec<JoinHandle<()>>,
}

impl RunningAgent {
    /// Connections open now (proxy) or established on the port (observe).
    pub fn active(&self) -> usize {
        use crate::conns::ConnSource;
        match (&self.tracker, &self.observer) {
            (Some(t), _) => t.active(),
            (None, Some(o)) => o.observe().active,
            _ => 0,
        }
    }

    /// Stops the listeners and the admin endpoint (connections already open keep going).
    pub fn abort(&self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, AgentError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| AgentError::Bind { addr, source })
}

async fn start_admin(
    addr: SocketAddr,
    admin: Admin,
) -> Result<(SocketAddr, JoinHandle<()>), AgentError> {
    let l = bind(addr).await?;
    let local = l
        .local_addr()
        .map_err(|source| AgentError::Bind { addr, source })?;
    info!(%local, "admin endpoint listening");
    Ok((local, tokio::spawn(Arc::new(admin).serve(l))))
}

/// Starts proxy mode.
pub async fn start_proxy(args: ProxyArgs) -> Result<RunningAgent, AgentError> {
    let metrics = Arc::new(Metrics::new());
    let tracker = ConnTracker::new(metrics.clone());
    let source = Arc::new(ProxyConns {
        tracker: tracker.clone(),
        accept_while_closing: args.protocol == Protocol::Http,
    });
    let drainer = Drainer::spawn(
        args.drain.drain_config(),
        args.drain.close_rate,
        source,
        metrics.clone(),
    );
    drainer.watch_orphan(args.drain.orphan_after());
    let listener = bind(args.listen).await?;
    let listen_addr = listener.local_addr().map_err(|source| AgentError::Bind {
        addr: args.listen,
        source,
    })?;
    let (admin_addr, admin_task) = start_admin(
        args.admin,
        Admin {
            drainer: drainer.clone(),
            metrics: metrics.clone(),
            readiness: Readiness::Upstream(args.upstream.clone()),
            drain_token: args.drain_token.clone(),
        },
    )
    .await?;
    info!(%listen_addr, upstream = %args.upstream, protocol = ?args.protocol, "proxy listening");

    let stop_at = match args.protocol {
        Protocol::Http => Phase::Drained,
        Protocol::Tcp => Phase::Closing,
    };
    let accept_task = match args.protocol {
        Protocol::Http => {
            let proxy = HttpProxy::new(
                args.upstream.clone(),
                args.upstream_http2,
                args.header_read_timeout,
                args.idle_close_after,
                args.limits.clone(),
                metrics.clone(),
            )
            .map_err(|source| AgentError::Upstream {
                addr: args.upstream.clone(),
                source,
            })?;
            tokio::spawn(accept_loop(
                listener,
                tracker.clone(),
                drainer.clone(),
                stop_at,
                args.limits.max_connections,
                move |s, peer, g| {
                    let p = proxy.clone();
                    tokio::spawn(p.serve(s, peer, g));
                },
            ))
        }
        Protocol::Tcp => {
            let proxy = TcpProxy::new(
                args.upstream.clone(),
                args.idle_close_after,
                LimitArgs::nonzero(args.limits.tcp_keepalive),
                metrics.clone(),
            );
            tokio::spawn(accept_loop(
                listener,
                tracker.clone(),
                drainer.clone(),
                stop_at,
                args.limits.max_connections,
                move |s, peer, g| {
                    let p = proxy.clone();
                    tokio::spawn(p.serve(s, peer, g));
                },
            ))
        }
    };
    Ok(RunningAgent {
        listen_addr: Some(listen_addr),
        admin_addr,
        drainer,
        metrics,
        tracker: Some(tracker),
        observer: None,
        tasks: vec![accept_task, admin_task],
    })
}

/// Accepts until the drain reaches `stop_at`, then closes the listener. With
/// `max_connections` open, a new connection is closed at once (FIN) instead of served.
async fn accept_loop(
    listener: TcpListener,
    tracker: Arc<ConnTracker>,
    drainer: Drainer,
    stop_at: Phase,
    max_connections: usize,
    handle: impl Fn(tokio::net::TcpStream, SocketAddr, crate::conns::ConnGuard),
) {
    let mut phase = drainer.subscribe();
    loop {
        if *phase.borrow_and_update() >= stop_at {
            info!("no longer accepting connections");
            return;
        }
        tokio::select! {
            r = listener.accept() => match r {
                Ok((s, peer)) => {
                    if tracker.active() >= max_connections {
                        debug!(%peer, max_connections, "connection limit reached: closing");
                        tracker.shed(s);
                        continue;
                    }
                    let g = tracker.register();
                    handle(s, peer, g);
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off, keep serving.
                    debug!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            },
            r = phase.changed() => if r.is_err() { return },
        }
    }
}

/// Starts observe mode.
pub async fn start_observe(args: ObserveArgs) -> Result<RunningAgent, AgentError> {
    let metrics = Arc::new(Metrics::new());
    let observer = Observer::new(args.port, metrics.clone());
    observer.poll();
    let drainer = Drainer::spawn(
        args.drain.drain_config(),
        args.drain.close_rate,
        observer.clone(),
        metrics.clone(),
    );
    drainer.watch_orphan(args.drain.orphan_after());
    let (admin_addr, admin_task) = start_admin(
        args.admin,
        Admin {
            drainer: drainer.clone(),
            metrics: metrics.clone(),
            readiness: Readiness::Observed(observer.clone()),
            drain_token: args.drain_token.clone(),
        },
    )
    .await?;
    info!(port = args.port, "observing");
    let poll_task = tokio::spawn(observer.clone().run(args.poll_interval));
    Ok(RunningAgent {
        listen_addr: None,
        admin_addr,
        drainer,
        metrics,
        tracker: None,
        observer: Some(observer),
        tasks: vec![admin_task, poll_task],
    })
}

/// The binary's life after start: the first SIGTERM (or SIGINT) starts the drain (if
/// `/drain` has not already), a second one or the drain deadline ends it; returns once
/// the connections are gone (or a short grace after a forced end).
///
/// A termination signal that finds the agent still serving (no `/drain` before it: the
/// preStop hook was refused or missing) is logged as an error and left as the container's
/// termination message, which the operator reports.
pub async fn run_until_terminated(
    agent: RunningAgent,
    termination_log: &std::path::Path,
) -> Result<(), AgentError> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).map_err(AgentError::Signal)?;
    let mut int = signal(SignalKind::interrupt()).map_err(AgentError::Signal)?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    let phase = agent.drainer.phase();
    info!(phase = phase.as_str(), "termination signal");
    if phase == Phase::Serving {
        error!(
            active = agent.active(),
            "termination signal before any drain (the preStop /drain was refused or did not run): \
             connections close now, without waiting for load balancers to stop sending"
        );
        leave_termination_message(
            termination_log,
            sluice_contract::UNDRAINED_TERMINATION_MESSAGE,
        );
    }
    agent.drainer.set_terminating();
    agent.drainer.begin();
    tokio::select! {
        _ = agent.drainer.wait_drained() => {}
        _ = term.recv() => { info!("second signal: ending the drain now"); agent.drainer.force(); }
        _ = int.recv() => { info!("second signal: ending the drain now"); agent.drainer.force(); }
    }
    // After a forced or timed-out drain the connections were told to go now; give them a
    // moment to finish closing (with FIN).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while agent.tracker.is_some() && agent.active() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let report = agent.drainer.report();
    info!(report = %serde_json::to_string(&report).unwrap_or_default(), "exiting");
    agent.abort();
    Ok(())
}

/// Writes `message` to the kubelet's termination-message file, if it exists (never creates
/// one: outside a pod there is none).
fn leave_termination_message(path: &std::path::Path, message: &str) {
    use std::io::Write as _;
    let written = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .and_then(|mut f| f.write_all(message.as_bytes()));
    if let Err(e) = written {
        tracing::debug!(path = %path.display(), error = %e, "no termination message left");
    }
}
