//! The admin endpoint: `/healthz`, `/ready`, `/drain`, `/rebalance`, `/metrics`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tracing::{debug, error, info};

use crate::controller::Drainer;
use crate::drain::{Outcome, Phase};
use crate::metrics::{CONTENT_TYPE, DrainRefusal, Metrics};
use crate::observe::Observer;
use sluice_contract::{
    DRAIN_PATH, HEALTHZ_PATH, METRICS_PATH, READY_PATH, REBALANCE_CONNECTIONS_PARAM, REBALANCE_PATH,
};

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
    /// The secret `/drain` requires (see [`DRAIN_TOKEN_HEADER`]); `None` refuses every drain.
    pub drain_token: Option<String>,
}

/// The header that carries the drain secret. The kubelet's preStop hook comes from whatever
/// address the CNI gives the host side (the bridge, not `status.hostIP`), and an SSRF in
/// the application comes from loopback: a source address proves nothing, the secret does.
/// The operator puts it in the injected preStop hook: it is the contract's.
pub use sluice_contract::DRAIN_TOKEN_HEADER;

/// Whether a `/drain` request carries the configured secret (compared in constant time).
pub fn drain_authorized(
    configured: Option<&str>,
    presented: Option<&[u8]>,
) -> Result<(), DrainRefusal> {
    let Some(want) = configured.filter(|t| !t.is_empty()) else {
        return Err(DrainRefusal::NotConfigured);
    };
    let Some(got) = presented else {
        return Err(DrainRefusal::MissingToken);
    };
    let want = want.as_bytes();
    let same_len = got.len() == want.len();
    let diff = want
        .iter()
        .zip(got.iter().chain(std::iter::repeat(&0)))
        .fold(0u8, |acc, (a, b)| acc | (a ^ b));
    if same_len && diff == 0 {
        Ok(())
    } else {
        Err(DrainRefusal::WrongToken)
    }
}

/// `connections=N` of a `/rebalance` query, 1 to 100 000.
pub fn rebalance_count(query: Option<&str>) -> Option<usize> {
    query?
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == REBALANCE_CONNECTIONS_PARAM)
        .and_then(|(_, v)| v.parse::<usize>().ok())
        .filter(|n| (1..=100_000).contains(n))
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
            // A drain no deletion followed fails liveness: the kubelet restarts the agent
            // container and the pod serves again (see `Drainer::watch_orphan`).
            (&Method::GET | &Method::HEAD, HEALTHZ_PATH) if self.drainer.orphaned() => text(
                StatusCode::SERVICE_UNAVAILABLE,
                "drained, but no termination followed: restart me\n",
            ),
            (&Method::GET | &Method::HEAD, HEALTHZ_PATH) => text(StatusCode::OK, "ok\n"),
            (&Method::GET | &Method::HEAD, READY_PATH) => {
                let ready = self.ready().await;
                self.metrics.ready.set(i64::from(ready));
                if ready {
                    text(StatusCode::OK, "ready\n")
                } else {
                    text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
                }
            }
            (&Method::GET | &Method::POST, DRAIN_PATH) => {
                let presented = req.headers().get(DRAIN_TOKEN_HEADER).map(|v| v.as_bytes());
                if let Err(why) = drain_authorized(self.drain_token.as_deref(), presented) {
                    // Loud: a refused preStop means the pod is about to be killed without
                    // its paced close (the kubelet ignores a hook's status code).
                    error!(%peer, reason = why.as_str(), "refused /drain: the pod will terminate without a paced close");
                    self.metrics.drain_refused(why);
                    return text(
                        StatusCode::FORBIDDEN,
                        format!("forbidden: {}\n", why.as_str()),
                    );
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
            (&Method::POST, REBALANCE_PATH) => {
                let presented = req.headers().get(DRAIN_TOKEN_HEADER).map(|v| v.as_bytes());
                if let Err(why) = drain_authorized(self.drain_token.as_deref(), presented) {
                    tracing::warn!(%peer, reason = why.as_str(), "refused /rebalance");
                    return text(
                        StatusCode::FORBIDDEN,
                        format!("forbidden: {}\n", why.as_str()),
                    );
                }
                let Some(n) = rebalance_count(req.uri().query()) else {
                    return text(
                        StatusCode::BAD_REQUEST,
                        format!("give ?{REBALANCE_CONNECTIONS_PARAM}=N, N from 1 to 100000\n"),
                    );
                };
                match self.drainer.rebalance(n) {
                    Some(asked) => {
                        info!(%peer, requested = n, asking = asked, "rebalance requested");
                        text(StatusCode::ACCEPTED, format!("{{\"asking\":{asked}}}\n"))
                    }
                    None => text(StatusCode::CONFLICT, "draining: not rebalancing\n"),
                }
            }
            (&Method::GET, METRICS_PATH) => {
                let mut r = text(StatusCode::OK, self.metrics.render());
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static(CONTENT_TYPE),
                );
                r
            }
            (_, path)
                if [
                    HEALTHZ_PATH,
                    READY_PATH,
                    DRAIN_PATH,
                    METRICS_PATH,
                    REBALANCE_PATH,
                ]
                .contains(&path) =>
            {
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
    fn drain_needs_the_configured_secret_whatever_the_source() {
        assert_eq!(drain_authorized(Some("s3cret"), Some(b"s3cret")), Ok(()));
        assert_eq!(
            drain_authorized(Some("s3cret"), None),
            Err(DrainRefusal::MissingToken)
        );
        for wrong in [&b"s3cre"[..], b"s3cret!", b"S3CRET", b""] {
            assert_eq!(
                drain_authorized(Some("s3cret"), Some(wrong)),
                Err(DrainRefusal::WrongToken),
                "{wrong:?}"
            );
        }
        assert_eq!(
            drain_authorized(None, Some(b"anything")),
            Err(DrainRefusal::NotConfigured)
        );
        assert_eq!(
            drain_authorized(Some(""), Some(b"")),
            Err(DrainRefusal::NotConfigured)
        );
    }

    #[test]
    fn rebalance_takes_a_bounded_connection_count() {
        assert_eq!(rebalance_count(Some("connections=12")), Some(12));
        assert_eq!(rebalance_count(Some("x=1&connections=3")), Some(3));
        assert_eq!(rebalance_count(Some("connections=0")), None);
        assert_eq!(rebalance_count(Some("connections=100001")), None);
        assert_eq!(rebalance_count(Some("connections=-1")), None);
        assert_eq!(rebalance_count(None), None);
    }
}
