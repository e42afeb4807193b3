//! The admin endpoint: `/healthz`, `/ready`, `/drain`, `/metrics`.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tracing::{debug, info, warn};

use crate::controller::Drainer;
use crate::drain::{Outcome, Phase};
use crate::metrics::{CONTENT_TYPE, Metrics};
use crate::observe::Observer;

/// How `/ready` decides that the application can serve.
pub enum Readiness {
    /// The upstream accepts TCP connections.
    Upstream(String),
    /// Something listens on the observed port.
    Observed(Arc<Observer>),
}

pub struct Admin {
    pub drainer: Drainer,
    pub metrics: Arc<Metrics>,
    pub readiness: Readiness,
    pub host_ip: Option<IpAddr>,
}

/// Whether `peer` may call `/drain`: loopback (the pod itself) or the node (the kubelet's
/// preStop hook comes from the node's IP).
pub fn drain_allowed(peer: IpAddr, host_ip: Option<IpAddr>) -> bool {
    let peer = match peer {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    };
    peer.is_loopback() || host_ip.is_some_and(|h| h == peer)
}

fn text(code: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = code;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

impl Admin {
    async fn ready(&self) -> bool {
        if self.drainer.phase() != Phase::Serving {
            return false;
        }
        match &self.readiness {
            Readiness::Upstream(addr) => matches!(
                tokio::time::timeout(
                    Duration::from_secs(1),
                    tokio::net::TcpStream::connect(addr.as_str())
                )
                .await,
                Ok(Ok(_))
            ),
            Readiness::Observed(o) => o.listening(),
        }
    }

    async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        peer: SocketAddr,
    ) -> Response<Full<Bytes>> {
        match (req.method(), req.uri().path()) {
            (&Method::GET | &Method::HEAD, "/healthz") => text(StatusCode::OK, "ok\n"),
            (&Method::GET | &Method::HEAD, "/ready") => {
                let ready = self.ready().await;
                self.metrics.ready.set(i64::from(ready));
                if ready {
                    text(StatusCode::OK, "ready\n")
                } else {
                    text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
                }
            }
            (&Method::GET | &Method::POST, "/drain") => {
                if !drain_allowed(peer.ip(), self.host_ip) {
                    warn!(%peer, "refused /drain from a foreign address");
                    return text(StatusCode::FORBIDDEN, "forbidden\n");
                }
                if self.drainer.begin() {
                    info!(%peer, "drain requested");
                }
                self.metrics.ready.set(0);
                let limit = self.drainer.config().drain_timeout + Duration::from_secs(5);
                let _ = tokio::time::timeout(limit, self.drainer.wait_drained()).await;
                let report = self.drainer.report();
                let code = match report.outcome {
                    Some(Outcome::Complete) => StatusCode::OK,
                    _ => StatusCode::GATEWAY_TIMEOUT,
                };
                let body = serde_json::to_vec(&report).unwrap_or_default();
                let mut r = Response::new(Full::new(Bytes::from(body)));
                *r.status_mut() = code;
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static("application/json"),
                );
                r
            }
            (&Method::GET, "/metrics") => {
                let mut r = text(StatusCode::OK, self.metrics.render());
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static(CONTENT_TYPE),
                );
                r
            }
            (_, "/healthz" | "/ready" | "/drain" | "/metrics") => {
                text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")
            }
            _ => text(StatusCode::NOT_FOUND, "not found\n"),
        }
    }

    /// Serves the admin endpoint on `listener` until the task is dropped.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    debug!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let me = self.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let me = me.clone();
                    async move { Ok::<_, Infallible>(me.handle(req, peer).await) }
                });
                let r = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(Duration::from_secs(10))
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
                if let Err(e) = r {
                    debug!(error = %e, "admin connection error");
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drain_allowed_only_from_loopback_or_node() {
        let node: IpAddr = "10.0.0.5".parse().unwrap();
        assert!(drain_allowed("127.0.0.1".parse().unwrap(), None));
        assert!(drain_allowed("127.1.2.3".parse().unwrap(), None));
        assert!(drain_allowed("::1".parse().unwrap(), None));
        assert!(drain_allowed("::ffff:127.0.0.1".parse().unwrap(), None));
        assert!(drain_allowed("10.0.0.5".parse().unwrap(), Some(node)));
        assert!(drain_allowed(
            "::ffff:10.0.0.5".parse().unwrap(),
            Some(node)
        ));
        assert!(!drain_allowed("10.0.0.6".parse().unwrap(), Some(node)));
        assert!(!drain_allowed("10.0.0.5".parse().unwrap(), None));
        assert!(!drain_allowed("192.168.1.1".parse().unwrap(), None));
    }
}
