//! The agent's Prometheus metrics (OpenMetrics text on `/metrics`). The names are an API:
//! the operator reads them for its connection-rate and comparison gates.

use std::sync::OnceLock;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Why a connection ended (`sluice_agent_connections_closed_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CloseReason {
    /// The client (or the connection's protocol) ended it.
    Client,
    /// The agent closed it politely during the drain's closing phase.
    Drain,
    /// The drain deadline (or a forced drain) ended it.
    Deadline,
    /// The client sent nothing before the header read timeout.
    HeaderTimeout,
    /// The upstream could not be reached (tcp mode) or failed mid-connection.
    UpstreamError,
    /// An I/O or protocol error on the client side.
    Error,
}

impl CloseReason {
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::Client => "client",
            CloseReason::Drain => "drain",
            CloseReason::Deadline => "deadline",
            CloseReason::HeaderTimeout => "header_timeout",
            CloseReason::UpstreamError => "upstream_error",
            CloseReason::Error => "error",
        }
    }
}

type ReasonLabel = [(&'static str, &'static str); 1];
type CodeLabel = [(&'static str, u16); 1];

pub struct Metrics {
    registry: Registry,
    pub connections_active: Gauge,
    pub connections_accepted: Counter,
    connections_closed: Family<ReasonLabel, Counter>,
    pub requests_in_flight: Gauge,
    requests: Family<CodeLabel, Counter>,
    /// Each status code's counter once used, so that counting a response takes neither the
    /// family's lock nor a hash (index: code - 100).
    requests_by_code: Box<[OnceLock<Counter>]>,
    pub request_duration: Histogram,
    upstream_errors: Family<ReasonLabel, Counter>,
    pub drain_phase: Gauge,
    drain_duration: Family<[(&'static str, &'static str); 1], Gauge<f64, AtomicU64>>,
    pub ready: Gauge,
    pub accept_queue: Gauge,
    pub passive_opens: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let m = Metrics {
            connections_active: Gauge::default(),
            connections_accepted: Counter::default(),
            connections_closed: Family::default(),
            requests_in_flight: Gauge::default(),
            requests: Family::default(),
            requests_by_code: (100..600).map(|_| OnceLock::new()).collect(),
            request_duration: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            upstream_errors: Family::default(),
            drain_phase: Gauge::default(),
            drain_duration: Family::default(),
            ready: Gauge::default(),
            accept_queue: Gauge::default(),
            passive_opens: Counter::default(),
            registry: Registry::default(),
        };
        let r = &mut registry;
        r.register(
            "sluice_agent_connections_active",
            "Client connections open now (observe mode: established on the port)",
            m.connections_active.clone(),
        );
        r.register(
            "sluice_agent_connections_accepted",
            "Client connections accepted (observe mode: new established connections seen)",
            m.connections_accepted.clone(),
        );
        r.register(
            "sluice_agent_connections_closed",
            "Client connections ended, by reason",
            m.connections_closed.clone(),
        );
        r.register(
            "sluice_agent_requests_in_flight",
            "HTTP requests being served now",
            m.requests_in_flight.clone(),
        );
        r.register(
            "sluice_agent_requests",
            "HTTP responses sent, by status code",
            m.requests.clone(),
        );
        r.register(
            "sluice_agent_request_duration_seconds",
            "HTTP request duration, from request head to the end of the response body",
            m.request_duration.clone(),
        );
        r.register(
            "sluice_agent_upstream_errors",
            "Failures talking to the upstream, by kind",
            m.upstream_errors.clone(),
        );
        r.register(
            "sluice_agent_drain_phase",
            "Drain phase: 0 serving, 1 quiescing, 2 closing, 3 drained",
            m.drain_phase.clone(),
        );
        r.register(
            "sluice_agent_drain_duration_seconds",
            "Duration of the drain's phases (quiescing, closing, total); grows while a phase runs",
            m.drain_duration.clone(),
        );
        r.register(
            "sluice_agent_ready",
            "1 when /ready answers 200",
            m.ready.clone(),
        );
        r.register(
            "sluice_agent_accept_queue_length",
            "Observe mode: connections waiting in the port's accept queue",
            m.accept_queue.clone(),
        );
        r.register(
            "sluice_agent_tcp_passive_opens",
            "Observe mode: TCP connections accepted in the pod's network namespace (all ports)",
            m.passive_opens.clone(),
        );
        // 200 is always there, so that dashboards see the series from the start.
        m.request_done_by(200, 0);
        Metrics { registry, ..m }
    }

    pub fn closed(&self, reason: CloseReason) {
        self.connections_closed
            .get_or_create(&[("reason", reason.as_str())])
            .inc();
    }

    pub fn request_done(&self, code: u16) {
        self.request_done_by(code, 1);
    }

    fn request_done_by(&self, code: u16, n: u64) {
        match self
            .requests_by_code
            .get(usize::from(code).wrapping_sub(100))
        {
            Some(slot) => slot
                .get_or_init(|| self.requests.get_or_create(&[("code", code)]).clone())
                .inc_by(n),
            None => self.requests.get_or_create(&[("code", code)]).inc_by(n),
        };
    }

    pub fn upstream_error(&self, kind: &'static str) {
        self.upstream_errors.get_or_create(&[("kind", kind)]).inc();
    }

    pub fn set_drain_duration(&self, phase: &'static str, seconds: f64) {
        self.drain_duration
            .get_or_create(&[("phase", phase)])
            .set(seconds);
    }

    /// OpenMetrics text.
    pub fn render(&self) -> String {
        let mut s = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut s, &self.registry);
        s
    }
}

pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_documented_names() {
        let m = Metrics::new();
        m.connections_accepted.inc();
        m.closed(CloseReason::Drain);
        m.request_done(200);
        m.request_done(503);
        m.request_done(503);
        m.request_done(999);
        m.request_duration.observe(0.01);
        m.set_drain_duration("total", 1.5);
        m.upstream_error("connect");
        let text = m.render();
        for name in [
            "sluice_agent_connections_active 0",
            "sluice_agent_connections_accepted_total 1",
            "sluice_agent_connections_closed_total{reason=\"drain\"} 1",
            "sluice_agent_requests_in_flight 0",
            "sluice_agent_requests_total{code=\"200\"} 1",
            "sluice_agent_requests_total{code=\"503\"} 2",
            "sluice_agent_requests_total{code=\"999\"} 1",
            "sluice_agent_request_duration_seconds_count 1",
            "sluice_agent_drain_phase 0",
            "sluice_agent_drain_duration_seconds{phase=\"total\"} 1.5",
            "sluice_agent_upstream_errors_total{kind=\"connect\"} 1",
            "sluice_agent_ready 0",
            "# EOF",
        ] {
            assert!(text.contains(name), "missing {name:?} in\n{text}");
        }
    }
}
