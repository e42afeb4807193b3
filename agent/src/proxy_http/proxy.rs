//! The proxy: its configuration, built once, and the upstream connect.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::header::HeaderValue;
use hyper::client::conn::{http1 as client1, http2 as client2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpStream;
use tracing::debug;

use crate::config::LimitArgs;
use crate::conns::{DeferWrites, set_keepalive};
use crate::metrics::Metrics;
use crate::workers::Workers;

/// Longest wait for the upstream to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

pub struct HttpProxy {
    pub(super) builder: auto::Builder<TokioExecutor>,
    pub(super) upstream: String,
    /// `upstream` when it is an IP address and port (no resolution per connect).
    pub(super) upstream_addr: Option<SocketAddr>,
    pub(super) upstream_authority: http::uri::Authority,
    /// `Host` for requests that carry none (HTTP/1.0).
    pub(super) upstream_host: HeaderValue,
    pub(super) upstream_http2: bool,
    pub(super) h1_client: client1::Builder,
    pub(super) h2_client: client2::Builder<TokioExecutor>,
    pub(super) header_read_timeout: Duration,
    pub(super) idle_close_after: Duration,
    pub(super) http2_idle_timeout: Duration,
    pub(super) body_timeout: Option<Duration>,
    pub(super) upstream_timeout: Option<Duration>,
    pub(super) tcp_keepalive: Option<Duration>,
    pub(super) upstream_connections_per_client: usize,
    pub(super) metrics: Arc<Metrics>,
    pub(super) workers: Option<Workers>,
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

    pub(super) fn with_workers(
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
    pub(super) async fn connect(&self) -> Result<TokioIo<DeferWrites<TcpStream>>, UpstreamError> {
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
}

/// Why the upstream could not answer.
#[derive(Debug, Clone, Copy)]
pub(super) enum UpstreamError {
    Connect,
    ConnectTimeout,
    Request,
    /// No response head within `--upstream-timeout`.
    Timeout,
    /// The response body failed mid-way (the upstream reset or closed early).
    Body,
}

impl UpstreamError {
    pub(super) fn kind(self) -> &'static str {
        match self {
            UpstreamError::Connect => "connect",
            UpstreamError::ConnectTimeout => "connect_timeout",
            UpstreamError::Request => "request",
            UpstreamError::Timeout => "timeout",
            UpstreamError::Body => "body",
        }
    }
}
