//! The lossless drain protocol, shared by the Release and the InferenceSet controllers.
//!
//! A pod leaves service in four steps:
//! 1. the operator sets the readiness gate `sluice.dev/serving=False` and annotates
//!    `sluice.dev/drain-started`: endpoints drop the pod, load balancers follow (late);
//! 2. the operator scrapes the pod's agent (`/metrics` on its admin port) until no new
//!    connection has arrived for `quietPeriod` — the closed-loop signal that every load
//!    balancer has stopped sending — or `propagationTimeout` passes;
//! 3. the pod is released: deleted (InferenceSet) or picked by its ReplicaSet's scale-down
//!    (Release), so the kubelet runs the injected preStop `GET /drain`, in which the agent
//!    closes the remaining keep-alive connections paced (`closeRate`) between requests;
//! 4. the pod terminates.
//!
//! This module holds the pure decision ([`drain_step`]) and the I/O both controllers need
//! for it: scraping agents ([`scrape`], [`scrape_all`]) and a per-pod sample history
//! ([`History`]). Parsing the agent's metrics is part of the operator↔agent contract
//! ([`sluice_contract::metrics`]); the signals derived from it live in [`super::signals`].

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use sluice_contract::METRICS_PATH;

use super::signals::{AgentSample, PodSignals, parse_agent_metrics, pod_signals};

/// Where one draining pod stands.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum DrainStep {
    /// Keep waiting; look again in about this many seconds.
    Wait(f64),
    /// No load balancer sends to it any more: release it (its connections close paced).
    Quiet,
    /// New connections kept coming for the whole propagation timeout: release it anyway.
    TimedOut,
}

/// What is known of a draining pod's traffic.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum QuietSignal {
    /// The pod has no agent: nothing to observe, the drain is open-loop (quiet once
    /// `quietPeriod` has passed).
    NoAgent,
    /// The agent could not be scraped yet.
    Unknown,
    /// Seconds since the agent last accepted a connection (see [`PodSignals::quiet_seconds`]).
    QuietFor(f64),
}

impl QuietSignal {
    /// From the agent's signals (`None`: not scraped yet).
    pub fn from_signals(s: Option<&PodSignals>) -> Self {
        match s.and_then(|s| s.quiet_seconds) {
            Some(q) => QuietSignal::QuietFor(q),
            None => QuietSignal::Unknown,
        }
    }
}

/// Decide a draining pod's next step (pure).
///
/// `elapsed`: seconds since the drain started; `never_served`: the pod never became ready
/// (nothing can be sending to it). A pod is quiet when the drain is at least `quiet_period`
/// old and the agent saw no new connection for `quiet_period`; it times out at
/// `propagation_timeout` even if connections keep coming.
pub fn drain_step(
    elapsed: f64,
    never_served: bool,
    signal: QuietSignal,
    quiet_period: f64,
    propagation_timeout: f64,
) -> DrainStep {
    if never_served {
        return DrainStep::Quiet;
    }
    let quiet = match signal {
        QuietSignal::NoAgent => elapsed >= quiet_period,
        QuietSignal::Unknown => false,
        QuietSignal::QuietFor(q) => elapsed >= quiet_period && q >= quiet_period,
    };
    if quiet {
        return DrainStep::Quiet;
    }
    if elapsed >= propagation_timeout {
        return DrainStep::TimedOut;
    }
    let next = match signal {
        QuietSignal::NoAgent => quiet_period - elapsed,
        // Samples come once per round: look again soon.
        _ => 1.0,
    };
    DrainStep::Wait(next.clamp(0.5, (propagation_timeout - elapsed).max(0.5)))
}

/// Scrape one agent's `/metrics` (`timeout` bounds connect and read).
pub async fn scrape(ip: &str, admin_port: u16, timeout: Duration, now: f64) -> Option<AgentSample> {
    let text = tokio::time::timeout(timeout, http_get(ip, admin_port, METRICS_PATH))
        .await
        .ok()?
        .ok()?;
    Some(parse_agent_metrics(&text, now))
}

/// Scrape every pod's agent in parallel (1 s timeout each); `None` where it failed or the
/// pod has no IP yet.
pub async fn scrape_all(pods: &[&Pod], admin_port: i32) -> Vec<Option<AgentSample>> {
    let futs = pods.iter().map(|p| {
        let ip = p.status.as_ref().and_then(|s| s.pod_ip.clone());
        async move { scrape(&ip?, admin_port as u16, Duration::from_secs(1), now_secs()).await }
    });
    futures::future::join_all(futs).await
}

fn now_secs() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// The most of an agent's answer [`http_get`] reads: its `/metrics` is a few KiB; a pod
/// (a tenant's) that answers more cannot make the operator buffer it.
pub const MAX_AGENT_BODY: usize = 1 << 20;

/// `ip:port` as a socket address (IPv6 in brackets).
fn agent_addr(ip: &str, port: u16) -> String {
    if ip.contains(':') {
        format!("[{ip}]:{port}")
    } else {
        format!("{ip}:{port}")
    }
}

/// One request to an agent's admin endpoint over plain HTTP/1.1, on a connection of its
/// own; `build` gets the request builder with the Host header set.
async fn agent_request(
    addr: &str,
    build: impl FnOnce(hyper::http::request::Builder) -> hyper::http::request::Builder,
) -> std::io::Result<hyper::Response<hyper::body::Incoming>> {
    use http_body_util::Empty;
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(std::io::Error::other)?;
    // Ends by itself once the sender is dropped (the response read to its end).
    tokio::spawn(conn);
    let req = build(hyper::Request::builder().header(hyper::header::HOST, addr))
        .body(Empty::<bytes::Bytes>::new())
        .map_err(std::io::Error::other)?;
    sender
        .send_request(req)
        .await
        .map_err(std::io::Error::other)
}

/// GET over plain HTTP/1.1 (the agent's admin endpoint on the pod IP), on a connection of
/// its own; the body as text, or an error for any status but 200 and for a body over
/// [`MAX_AGENT_BODY`]. Callers bound the time ([`scrape`] does).
pub async fn http_get(ip: &str, port: u16, path: &str) -> std::io::Result<String> {
    use http_body_util::{BodyExt, Limited};
    let resp = agent_request(&agent_addr(ip, port), |b| b.method("GET").uri(path)).await?;
    let status = resp.status();
    if status != hyper::StatusCode::OK {
        return Err(std::io::Error::other(format!("agent answered {status}")));
    }
    let body = Limited::new(resp.into_body(), MAX_AGENT_BODY)
        .collect()
        .await
        .map_err(std::io::Error::other)?
        .to_bytes();
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// Ask the agent at `ip:port` to let `connections` of its keep-alive connections
/// reconnect (`POST /rebalance`, with the pod's drain token), within two seconds.
pub async fn ask_rebalance(
    ip: &str,
    port: u16,
    token: &str,
    connections: i64,
) -> std::io::Result<()> {
    let path = format!(
        "{}?{}={connections}",
        sluice_contract::REBALANCE_PATH,
        sluice_contract::REBALANCE_CONNECTIONS_PARAM
    );
    let addr = agent_addr(ip, port);
    let call = agent_request(&addr, |b| {
        b.method("POST")
            .uri(path)
            .header(sluice_contract::DRAIN_TOKEN_HEADER, token)
    });
    let resp = tokio::time::timeout(Duration::from_secs(2), call)
        .await
        .map_err(|_| std::io::Error::other("timed out"))??;
    match resp.status() {
        hyper::StatusCode::ACCEPTED => Ok(()),
        s => Err(std::io::Error::other(format!("agent answered {s}"))),
    }
}

/// Agent samples per pod (`namespace/name`), oldest first. In memory only: losing it
/// (restart) makes the next drain decisions wait for fresh samples, never act early.
#[derive(Default)]
pub struct History {
    samples: HashMap<String, VecDeque<AgentSample>>,
}

impl History {
    /// Add `sample` (if any) to `key`'s history, drop samples older than `keep` seconds
    /// (keeping at least two), and return the signals at `now`.
    pub fn record(
        &mut self,
        key: &str,
        sample: Option<AgentSample>,
        now: f64,
        keep: f64,
        rate_window: f64,
    ) -> Option<PodSignals> {
        let hist = self.samples.entry(key.to_string()).or_default();
        if let Some(s) = sample {
            hist.push_back(s);
        }
        while hist.front().is_some_and(|s| now - s.at > keep) && hist.len() > 2 {
            hist.pop_front();
        }
        let hist = hist.make_contiguous();
        (!hist.is_empty()).then(|| pod_signals(hist, rate_window, now))
    }

    /// Forget every key under `prefix` that `present` does not name.
    pub fn retain(&mut self, prefix: &str, present: &[String]) {
        self.samples
            .retain(|k, _| !k.starts_with(prefix) || present.contains(k));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An admin endpoint on loopback: `/metrics` answers two agent counters, anything else
    /// 404.
    async fn admin_endpoint() -> u16 {
        use http_body_util::Full;
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(|req: hyper::Request<_>| async move {
                        let (code, body) = if req.uri().path() == "/metrics" {
                            (
                                200,
                                "sluice_agent_connections_accepted_total 7\n\
                                 sluice_agent_connections_active 3\n# EOF\n",
                            )
                        } else {
                            (404, "not found\n")
                        };
                        let mut r = hyper::Response::new(Full::new(bytes::Bytes::from(body)));
                        *r.status_mut() = hyper::StatusCode::from_u16(code).unwrap();
                        Ok::<_, std::convert::Infallible>(r)
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        port
    }

    #[tokio::test]
    async fn scrape_reads_the_agents_metrics_over_http() {
        let port = admin_endpoint().await;
        let s = scrape("127.0.0.1", port, Duration::from_secs(5), 100.0)
            .await
            .expect("scraped");
        assert_eq!(s.connections_accepted, 7.0);
        assert_eq!(s.connections_active, 3.0);
        assert_eq!(s.at, 100.0);
        // Any other status is an error, not an empty sample.
        let err = http_get("127.0.0.1", port, "/nope").await.unwrap_err();
        assert!(err.to_string().contains("404"), "{err}");
        // Nothing listening: no sample.
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dead = closed.local_addr().unwrap().port();
        drop(closed);
        assert!(
            scrape("127.0.0.1", dead, Duration::from_secs(5), 0.0)
                .await
                .is_none()
        );
    }

    /// An endpoint that answers `/metrics` with 200 and a body of `len` bytes (`None`:
    /// without end, until the reader leaves), in chunks of 64 KiB.
    async fn flooding_endpoint(len: Option<usize>) -> u16 {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let mut b = [0u8; 4096];
                    let _ = s.read(&mut b).await;
                    let head = match len {
                        Some(n) => format!("HTTP/1.1 200 OK\r\ncontent-length: {n}\r\n\r\n"),
                        None => "HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n".to_string(),
                    };
                    if s.write_all(head.as_bytes()).await.is_err() {
                        return;
                    }
                    let chunk = vec![b'#'; 1 << 16];
                    let chunks = len.map_or(1 << 14, |n| n.div_ceil(1 << 16));
                    for i in 0..chunks {
                        let n = len.map_or(chunk.len(), |n| (n - i * chunk.len()).min(chunk.len()));
                        if s.write_all(&chunk[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        port
    }

    #[tokio::test]
    async fn a_scrape_reads_at_most_one_mib() {
        // Just under the bound: read.
        let port = flooding_endpoint(Some(MAX_AGENT_BODY)).await;
        let text = http_get("127.0.0.1", port, "/metrics").await.unwrap();
        assert_eq!(text.len(), MAX_AGENT_BODY);
        // Over it, declared or not: an error, not a buffer that grows with the answer.
        for len in [Some(MAX_AGENT_BODY + 1), None] {
            let port = flooding_endpoint(len).await;
            let r = tokio::time::timeout(
                Duration::from_secs(20),
                http_get("127.0.0.1", port, "/metrics"),
            )
            .await
            .expect("bounded");
            assert!(r.is_err(), "{len:?}: read {:?} bytes", r.map(|t| t.len()));
            assert!(
                scrape("127.0.0.1", port, Duration::from_secs(20), 0.0)
                    .await
                    .is_none()
            );
        }
    }

    #[test]
    fn a_pod_that_never_served_is_quiet_at_once() {
        assert_eq!(
            drain_step(0.0, true, QuietSignal::Unknown, 5.0, 60.0),
            DrainStep::Quiet
        );
    }

    #[test]
    fn quiet_needs_the_whole_period_since_the_drain_and_the_last_connection() {
        let q = |elapsed, quiet_for| {
            drain_step(elapsed, false, QuietSignal::QuietFor(quiet_for), 5.0, 60.0)
        };
        assert_eq!(q(3.0, 10.0), DrainStep::Wait(1.0));
        assert_eq!(q(6.0, 3.0), DrainStep::Wait(1.0));
        assert_eq!(q(6.0, 5.0), DrainStep::Quiet);
    }

    #[test]
    fn unknown_traffic_waits_until_the_propagation_timeout() {
        let s = |elapsed| drain_step(elapsed, false, QuietSignal::Unknown, 5.0, 60.0);
        assert_eq!(s(30.0), DrainStep::Wait(1.0));
        assert_eq!(s(60.0), DrainStep::TimedOut);
        assert_eq!(
            drain_step(61.0, false, QuietSignal::QuietFor(1.0), 5.0, 60.0),
            DrainStep::TimedOut
        );
    }

    #[test]
    fn without_an_agent_the_drain_is_open_loop() {
        let s = |elapsed| drain_step(elapsed, false, QuietSignal::NoAgent, 5.0, 60.0);
        assert_eq!(s(2.0), DrainStep::Wait(3.0));
        assert_eq!(s(5.0), DrainStep::Quiet);
    }

    #[test]
    fn history_keeps_a_window_and_reports_quiet_time() {
        let mut h = History::default();
        let sample = |at: f64, accepted: f64| AgentSample {
            at,
            connections_accepted: accepted,
            ..Default::default()
        };
        assert_eq!(h.record("ns/a", None, 0.0, 10.0, 5.0), None);
        h.record("ns/a", Some(sample(0.0, 5.0)), 0.0, 10.0, 5.0);
        h.record("ns/a", Some(sample(1.0, 7.0)), 1.0, 10.0, 5.0);
        let s = h
            .record("ns/a", Some(sample(4.0, 7.0)), 4.0, 10.0, 5.0)
            .unwrap();
        assert_eq!(s.quiet_seconds, Some(3.0));
        assert_eq!(
            QuietSignal::from_signals(Some(&s)),
            QuietSignal::QuietFor(3.0)
        );
        h.retain("ns/", &["ns/b".to_string()]);
        assert_eq!(h.record("ns/a", None, 5.0, 10.0, 5.0), None);
    }
}
