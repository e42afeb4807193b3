//! One request: hop-by-hop headers, `X-Forwarded-For`, the upstream round trip and the
//! response body that counts the status once it is done.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::{Either, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};

use super::conn::{ConnState, ReqBody};
use super::proxy::UpstreamError;
use crate::conns::CloseLevel;
use crate::tunnel::{self, PendingTunnel};

#[derive(Clone)]
pub(super) struct ProxyService {
    pub(super) state: Arc<ConnState>,
}

pub(super) type ProxyBody = Tracked<Either<Incoming, Full<Bytes>>>;

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
pub(super) fn te_accepts_trailers(headers: &HeaderMap) -> bool {
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

pub(super) fn plain(code: StatusCode, msg: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(msg.as_bytes())));
    *r.status_mut() = code;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

pub(super) async fn handle(
    state: Arc<ConnState>,
    mut req: Request<Incoming>,
) -> Response<ProxyBody> {
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
pub(super) struct RequestGuard {
    pub(super) state: Arc<ConnState>,
    pub(super) start: Instant,
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
pub(super) const CODE_UPSTREAM_FAILED_MID_BODY: u16 = 502;
/// …or the client went away (or was closed for a stalled body) before the end (nginx's
/// "client closed request"; not a server error).
pub(super) const CODE_CLIENT_GONE_MID_BODY: u16 = 499;

/// A response body that holds the request's [`RequestGuard`], counts the response's status
/// once the body is done (`code` at its end, [`CODE_UPSTREAM_FAILED_MID_BODY`] or
/// [`CODE_CLIENT_GONE_MID_BODY`] if it ends early) and reports its progress to the
/// connection's body timer.
pub struct Tracked<B: Body> {
    pub(super) inner: B,
    pub(super) guard: RequestGuard,
    pub(super) code: u16,
    pub(super) counted: bool,
    /// Counted in the connection's moving bodies.
    pub(super) moving: bool,
}

impl<B: Body> Tracked<B> {
    pub(super) fn new(inner: B, guard: RequestGuard, code: u16) -> Self {
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

    pub(super) fn count(&mut self, code: u16) {
        if !self.counted {
            self.counted = true;
            self.guard.state.proxy.metrics.request_done(code);
        }
    }

    pub(super) fn stop_moving(&mut self) {
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
