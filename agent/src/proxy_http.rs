//! HTTP mode: an HTTP/1.1 + HTTP/2 (prior knowledge) reverse proxy on hyper that drains
//! politely: `Connection: close` on the next HTTP/1.1 response, idle connections closed,
//! two-phase GOAWAY on HTTP/2 (hyper's `graceful_shutdown`), in-flight requests finish.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::{Either, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpStream;
use tracing::debug;

use crate::conns::{CloseLevel, ConnCtl, ConnGuard, LingerStream, linger_close};
use crate::metrics::{CloseReason, Metrics};

/// After a forced close, how long in-flight requests still get before the socket goes.
const FORCE_GRACE: Duration = Duration::from_secs(1);

pub struct HttpProxy {
    builder: auto::Builder<TokioExecutor>,
    client: Client<HttpConnector, Incoming>,
    upstream_authority: http::uri::Authority,
    upstream_http2: bool,
    header_read_timeout: Duration,
    idle_close_after: Duration,
    metrics: Arc<Metrics>,
}

impl HttpProxy {
    pub fn new(
        upstream: String,
        upstream_http2: bool,
        header_read_timeout: Duration,
        idle_close_after: Duration,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Self>, http::uri::InvalidUri> {
        let upstream_authority = http::uri::Authority::try_from(upstream.as_str())?;
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(header_read_timeout)
            .keep_alive(true);
        builder.http2().timer(TokioTimer::new());
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(5)));
        let client = Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .http2_only(upstream_http2)
            .build(connector);
        Ok(Arc::new(HttpProxy {
            builder,
            client,
            upstream_authority,
            upstream_http2,
            header_read_timeout,
            idle_close_after,
            metrics,
        }))
    }

    /// Serves one client connection until it ends.
    pub async fn serve(self: Arc<Self>, stream: TcpStream, peer: SocketAddr, mut guard: ConnGuard) {
        let _ = stream.set_nodelay(true);
        let ctl = guard.ctl().clone();
        // hyper's auto builder waits for the first bytes to tell HTTP/1 from HTTP/2 with no
        // timeout of its own: bound it here, and leave early if the drain asks.
        let mut first = [0u8; 1];
        let waited = tokio::select! {
            r = tokio::time::timeout(self.header_read_timeout, stream.peek(&mut first)) => Some(r),
            _ = wait_level(&ctl, CloseLevel::Graceful, self.idle_close_after) => None,
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

        let svc = ProxyService {
            proxy: self.clone(),
            ctl: ctl.clone(),
            peer,
        };
        let conn = self
            .builder
            .serve_connection(TokioIo::new(LingerStream::new(stream)), svc);
        tokio::pin!(conn);
        let mut shutdown_sent = false;
        let mut idle_timer: Option<Pin<Box<tokio::time::Sleep>>> = None;
        let mut force_timer: Option<Pin<Box<tokio::time::Sleep>>> = None;
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
                res = conn.as_mut() => {
                    if let Err(e) = res {
                        debug!(%peer, error = %e, "connection ended with an error");
                        if level == CloseLevel::Open {
                            guard.set_reason(CloseReason::Error);
                        }
                    }
                    break;
                }
                _ = ctl.changed() => {}
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
            }
        }
        drop(guard);
    }
}

/// Resolves once the connection is asked to leave at `at_least`, plus `idle` (it is idle).
async fn wait_level(ctl: &ConnCtl, at_least: CloseLevel, idle: Duration) {
    loop {
        if ctl.level() >= at_least {
            if ctl.level() < CloseLevel::Now {
                tokio::time::sleep(idle).await;
            }
            return;
        }
        ctl.changed().await;
    }
}

#[derive(Clone)]
struct ProxyService {
    proxy: Arc<HttpProxy>,
    ctl: Arc<ConnCtl>,
    peer: SocketAddr,
}

type ProxyBody = Tracked<Either<Incoming, Full<Bytes>>>;

impl hyper::service::Service<Request<Incoming>> for ProxyService {
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { Ok(this.handle(req).await) })
    }
}

static HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Headers named in `Connection` are hop-by-hop too.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named.iter().chain(HOP_BY_HOP.iter()) {
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

impl ProxyService {
    async fn handle(self, req: Request<Incoming>) -> Response<ProxyBody> {
        let metrics = self.proxy.metrics.clone();
        metrics.requests_in_flight.inc();
        let guard = RequestGuard {
            metrics: metrics.clone(),
            start: Instant::now(),
        };
        let version = req.version();
        if version == Version::HTTP_2 {
            self.ctl
                .is_h2
                .store(true, std::sync::atomic::Ordering::Release);
        }
        let (mut parts, body) = req.into_parts();
        let authority = parts.uri.authority().cloned();
        let mut uri = http::uri::Parts::default();
        uri.scheme = Some(http::uri::Scheme::HTTP);
        uri.authority = Some(self.proxy.upstream_authority.clone());
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
                metrics.request_done(400);
                let resp = plain(StatusCode::BAD_REQUEST, "bad request target\n");
                return resp.map(|b| Tracked::new(Either::Right(b), guard));
            }
        };
        strip_hop_by_hop(&mut parts.headers);
        if !parts.headers.contains_key(header::HOST)
            && let Some(a) = authority
            && let Ok(v) = HeaderValue::from_str(a.as_str())
        {
            parts.headers.insert(header::HOST, v);
        }
        let xff = match parts
            .headers
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok())
        {
            Some(prev) => format!("{prev}, {}", self.peer.ip()),
            None => self.peer.ip().to_string(),
        };
        if let Ok(v) = HeaderValue::from_str(&xff) {
            parts.headers.insert("x-forwarded-for", v);
        }
        parts.version = if self.proxy.upstream_http2 {
            Version::HTTP_2
        } else {
            Version::HTTP_11
        };
        let upstream_req = Request::from_parts(parts, body);

        let mut resp = match self.proxy.client.request(upstream_req).await {
            Ok(r) => r.map(Either::Left),
            Err(e) => {
                let kind = if e.is_connect() { "connect" } else { "request" };
                debug!(error = %e, kind, "upstream request failed");
                metrics.upstream_error(kind);
                plain(StatusCode::BAD_GATEWAY, "upstream unavailable\n").map(Either::Right)
            }
        };
        strip_hop_by_hop(resp.headers_mut());
        if version < Version::HTTP_2 && self.ctl.level() >= CloseLevel::Graceful {
            // hyper closes the connection after a response that says so.
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        metrics.request_done(resp.status().as_u16());
        resp.map(|b| Tracked::new(b, guard))
    }
}

/// Counts a request as in flight until its response body is done (or dropped).
struct RequestGuard {
    metrics: Arc<Metrics>,
    start: Instant,
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.metrics.requests_in_flight.dec();
        self.metrics
            .request_duration
            .observe(self.start.elapsed().as_secs_f64());
    }
}

/// A response body that holds the request's [`RequestGuard`].
pub struct Tracked<B> {
    inner: B,
    _guard: RequestGuard,
}

impl<B> Tracked<B> {
    fn new(inner: B, guard: RequestGuard) -> Self {
        Tracked {
            inner,
            _guard: guard,
        }
    }
}

impl<B: Body + Unpin> Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
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
}
