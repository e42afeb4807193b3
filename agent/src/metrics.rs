//! The agent's Prometheus metrics (OpenMetrics text on `/metrics`). The names are an API:
//! the operator reads them for its drains and its connection-rate and comparison gates, so
//! they come from the contract crate (`sluice_contract::metrics`), whose parser the
//! operator uses; `tests/contract.rs` parses this output with it.

use std::cell::Cell;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use sluice_contract::metrics::{self as names, LABEL_CODE, LABEL_KIND, LABEL_PHASE, LABEL_REASON};

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
    /// A request or response body moved no byte for the body timeout.
    BodyTimeout,
    /// An HTTP/2 connection had no stream open for the idle timeout (GOAWAY).
    IdleTimeout,
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
            CloseReason::BodyTimeout => "body_timeout",
            CloseReason::IdleTimeout => "idle_timeout",
        }
    }
}

/// Why a `/drain` was refused (`sluice_agent_drain_refused_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DrainRefusal {
    /// The agent was started without a drain token.
    NotConfigured,
    /// The request carried no token.
    MissingToken,
    /// The request carried another token.
    WrongToken,
}

impl DrainRefusal {
    pub fn as_str(self) -> &'static str {
        match self {
            DrainRefusal::NotConfigured => "not_configured",
            DrainRefusal::MissingToken => "missing_token",
            DrainRefusal::WrongToken => "wrong_token",
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
    /// Requests in flight, responses by code and the request duration histogram.
    requests: Arc<RequestStats>,
    upstream_errors: Family<ReasonLabel, Counter>,
    pub drain_phase: Gauge,
    drain_refused: Family<ReasonLabel, Counter>,
    drain_duration: Family<[(&'static str, &'static str); 1], Gauge<f64, AtomicU64>>,
    pub ready: Gauge,
    pub accept_queue: Gauge,
    pub passive_opens: Counter,
    /// Connections closed at once because `--max-connections` were open.
    pub connections_shed: Counter,
    /// 1 once a drain went unfollowed by a termination signal for `--drain-orphan-after`.
    pub drain_orphaned: Gauge,
    /// Connections asked to reconnect by `/rebalance`.
    pub rebalance_asked: Counter,
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
            requests: Arc::new(RequestStats::new()),
            upstream_errors: Family::default(),
            drain_phase: Gauge::default(),
            drain_refused: Family::default(),
            drain_duration: Family::default(),
            ready: Gauge::default(),
            accept_queue: Gauge::default(),
            passive_opens: Counter::default(),
            connections_shed: Counter::default(),
            drain_orphaned: Gauge::default(),
            rebalance_asked: Counter::default(),
            registry: Registry::default(),
        };
        let r = &mut registry;
        r.register(
            names::CONNECTIONS_ACTIVE,
            "Client connections open now (observe mode: established on the port)",
            m.connections_active.clone(),
        );
        r.register(
            names::CONNECTIONS_ACCEPTED,
            "Client connections accepted (observe mode: new established connections seen)",
            m.connections_accepted.clone(),
        );
        r.register(
            names::CONNECTIONS_CLOSED,
            "Client connections ended, by reason",
            m.connections_closed.clone(),
        );
        r.register(
            names::REQUESTS_IN_FLIGHT,
            "HTTP requests being served now",
            InFlight(m.requests.clone()),
        );
        r.register(
            names::REQUESTS,
            "HTTP responses sent, by status code",
            ByCode(m.requests.clone()),
        );
        r.register(
            names::REQUEST_DURATION_SECONDS,
            "HTTP request duration, from request head to the end of the response body",
            DurationHistogram(m.requests.clone()),
        );
        r.register(
            names::UPSTREAM_ERRORS,
            "Failures talking to the upstream, by kind",
            m.upstream_errors.clone(),
        );
        r.register(
            names::REBALANCE_ASKED,
            "Connections asked to reconnect by /rebalance (replica-ratio steps)",
            m.rebalance_asked.clone(),
        );
        r.register(
            names::DRAIN_PHASE,
            "Drain phase: 0 serving, 1 quiescing, 2 closing, 3 drained",
            m.drain_phase.clone(),
        );
        r.register(
            names::DRAIN_REFUSED,
            "/drain requests refused (no or wrong drain token), by reason",
            m.drain_refused.clone(),
        );
        r.register(
            names::DRAIN_DURATION_SECONDS,
            "Duration of the drain's phases (quiescing, closing, total); grows while a phase runs",
            m.drain_duration.clone(),
        );
        r.register(names::READY, "1 when /ready answers 200", m.ready.clone());
        r.register(
            names::ACCEPT_QUEUE_LENGTH,
            "Observe mode: connections waiting in the port's accept queue",
            m.accept_queue.clone(),
        );
        r.register(
            names::TCP_PASSIVE_OPENS,
            "Observe mode: TCP connections accepted in the pod's network namespace (all ports)",
            m.passive_opens.clone(),
        );
        r.register(
            names::CONNECTIONS_SHED,
            "Client connections closed at once because --max-connections were open",
            m.connections_shed.clone(),
        );
        r.register(
            names::DRAIN_ORPHANED,
            "1 when a drain was not followed by a termination signal within --drain-orphan-after: the pod serves nothing and should be replaced",
            m.drain_orphaned.clone(),
        );
        Metrics { registry, ..m }
    }

    pub fn closed(&self, reason: CloseReason) {
        self.connections_closed
            .get_or_create(&[(LABEL_REASON, reason.as_str())])
            .inc();
    }

    /// A request began (`sluice_agent_requests_in_flight`).
    pub fn request_start(&self) {
        self.requests
            .shard()
            .in_flight
            .fetch_add(1, Ordering::Relaxed);
    }

    /// A request ended after `elapsed` (in flight, duration histogram).
    pub fn request_end(&self, elapsed: Duration) {
        let shard = self.requests.shard();
        shard.in_flight.fetch_sub(1, Ordering::Relaxed);
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        shard.duration_nanos.fetch_add(nanos, Ordering::Relaxed);
        shard.buckets[bucket_index(nanos)].fetch_add(1, Ordering::Relaxed);
    }

    /// A response with this status code was sent (`sluice_agent_requests_total{code}`).
    pub fn request_done(&self, code: u16) {
        let i = usize::from(code.clamp(MIN_CODE, MAX_CODE) - MIN_CODE);
        self.requests.shard().codes[i].fetch_add(1, Ordering::Relaxed);
    }

    pub fn upstream_error(&self, kind: &'static str) {
        self.upstream_errors
            .get_or_create(&[(LABEL_KIND, kind)])
            .inc();
    }

    pub fn drain_refused(&self, why: DrainRefusal) {
        self.drain_refused
            .get_or_create(&[(LABEL_REASON, why.as_str())])
            .inc();
    }

    pub fn set_drain_duration(&self, phase: &'static str, seconds: f64) {
        self.drain_duration
            .get_or_create(&[(LABEL_PHASE, phase)])
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

const MIN_CODE: u16 = 100;
/// Status codes are three digits (hyper rejects others); anything above counts as 999.
const MAX_CODE: u16 = 999;
const CODES: usize = (MAX_CODE - MIN_CODE + 1) as usize;
/// Duration buckets: 0.5 ms × √2^i, i = 0..32 (up to 23 s), then +Inf. Steps of √2, not 2:
/// the operator's comparison gate reads p99 from these buckets, and a quantile
/// interpolated inside a bucket can be off by up to the bucket's ratio.
const FIRST_BUCKET_NANOS: u64 = 500_000;
const BUCKETS: usize = 32;
/// Shards of [`RequestStats`]: each thread counts into its own (threads beyond this share),
/// so that two worker threads never contend for one cache line on every request.
const SHARDS: usize = 4;

/// The request metrics, counted per thread without locks and summed when rendered:
/// counting a request is a few uncontended atomic adds (prometheus-client's histogram
/// takes a mutex per observation, and its counters are shared by every thread).
struct RequestStats {
    shards: Box<[Shard]>,
}

#[repr(align(128))]
struct Shard {
    in_flight: AtomicI64,
    duration_nanos: AtomicU64,
    /// Per bucket (not cumulative); the last one is +Inf.
    buckets: [AtomicU64; BUCKETS + 1],
    /// Index: code - 100.
    codes: Box<[AtomicU64]>,
}

fn bucket_index(nanos: u64) -> usize {
    // The first bucket whose upper bound (F × √2^i) is >= the value: the least i with
    // 2^i >= (nanos / F)², in integers (no float on the request path).
    if nanos <= FIRST_BUCKET_NANOS {
        return 0;
    }
    let q = u128::from(nanos) * u128::from(nanos);
    let f2 = u128::from(FIRST_BUCKET_NANOS) * u128::from(FIRST_BUCKET_NANOS);
    // f2 << i has q's bit length (so f2 << (i - 1) < q); one more if still below q.
    let i = (f2.leading_zeros() - q.leading_zeros()) as usize;
    if i >= BUCKETS {
        return BUCKETS;
    }
    if (f2 << i) < q { i + 1 } else { i }.min(BUCKETS)
}

fn bucket_bound(i: usize) -> f64 {
    if i >= BUCKETS {
        f64::INFINITY
    } else {
        0.0005 * 2f64.powf(i as f64 / 2.0)
    }
}

thread_local! {
    static SHARD: Cell<usize> = const { Cell::new(usize::MAX) };
}
static NEXT_SHARD: AtomicUsize = AtomicUsize::new(0);

impl RequestStats {
    fn new() -> Self {
        RequestStats {
            shards: (0..SHARDS)
                .map(|_| Shard {
                    in_flight: AtomicI64::new(0),
                    duration_nanos: AtomicU64::new(0),
                    buckets: std::array::from_fn(|_| AtomicU64::new(0)),
                    codes: (0..CODES).map(|_| AtomicU64::new(0)).collect(),
                })
                .collect(),
        }
    }

    fn shard(&self) -> &Shard {
        let i = SHARD.with(|s| {
            let mut i = s.get();
            if i == usize::MAX {
                i = NEXT_SHARD.fetch_add(1, Ordering::Relaxed) % SHARDS;
                s.set(i);
            }
            i
        });
        &self.shards[i]
    }

    fn sum(&self, f: impl Fn(&Shard) -> u64) -> u64 {
        self.shards.iter().map(f).fold(0, u64::wrapping_add)
    }
}

struct InFlight(Arc<RequestStats>);
struct ByCode(Arc<RequestStats>);
struct DurationHistogram(Arc<RequestStats>);

macro_rules! opaque_debug {
    ($($t:ident),*) => {$(
        impl std::fmt::Debug for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(stringify!($t))
            }
        }
    )*};
}
opaque_debug!(InFlight, ByCode, DurationHistogram);

impl EncodeMetric for InFlight {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let n: i64 = self
            .0
            .shards
            .iter()
            .map(|s| s.in_flight.load(Ordering::Relaxed))
            .sum();
        encoder.encode_gauge(&n)
    }
    fn metric_type(&self) -> MetricType {
        MetricType::Gauge
    }
}

impl EncodeMetric for ByCode {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        for i in 0..CODES {
            let code = MIN_CODE + i as u16;
            let n = self.0.sum(|s| s.codes[i].load(Ordering::Relaxed));
            // 200 is always there, so that dashboards see the series from the start.
            if n == 0 && code != 200 {
                continue;
            }
            let labels: CodeLabel = [(LABEL_CODE, code)];
            encoder
                .encode_family(&labels)?
                .encode_counter::<NoLabelSet, _, u64>(&n, None)?;
        }
        Ok(())
    }
    fn metric_type(&self) -> MetricType {
        MetricType::Counter
    }
}

impl EncodeMetric for DurationHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let buckets: Vec<(f64, u64)> = (0..=BUCKETS)
            .map(|i| {
                (
                    bucket_bound(i),
                    self.0.sum(|s| s.buckets[i].load(Ordering::Relaxed)),
                )
            })
            .collect();
        let count = buckets.iter().map(|b| b.1).sum();
        let sum = self.0.sum(|s| s.duration_nanos.load(Ordering::Relaxed)) as f64 / 1e9;
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }
    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
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
        m.request_start();
        m.request_end(Duration::from_millis(10));
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
            "sluice_agent_request_duration_seconds_sum 0.01",
            "sluice_agent_request_duration_seconds_bucket{le=\"0.016\"} 1",
            "sluice_agent_request_duration_seconds_bucket{le=\"0.008\"} 0",
            "sluice_agent_request_duration_seconds_bucket{le=\"+Inf\"} 1",
            "sluice_agent_drain_phase 0",
            "sluice_agent_drain_duration_seconds{phase=\"total\"} 1.5",
            "sluice_agent_upstream_errors_total{kind=\"connect\"} 1",
            "sluice_agent_ready 0",
            "# EOF",
        ] {
            assert!(text.contains(name), "missing {name:?} in\n{text}");
        }
    }

    #[test]
    fn duration_buckets_match_their_bounds() {
        for (nanos, want) in [
            (0, 0),
            (500_000, 0),
            (500_001, 1),
            (707_106, 1),
            (707_107, 2),
            (1_000_000, 2),
            (1_000_001, 3),
            (2_000_000, 4),
            (16_384_000_000, 30),
            (16_384_000_001, 31),
            (23_170_475_000, 31),
            (23_170_476_000, 32),
            (u64::MAX, 32),
        ] {
            assert_eq!(bucket_index(nanos), want, "{nanos} ns");
            // The value lies in (bound(i-1), bound(i)].
            let secs = nanos as f64 / 1e9;
            assert!(secs <= bucket_bound(want) * (1.0 + 1e-9), "{nanos} ns");
            if want > 0 {
                assert!(secs > bucket_bound(want - 1) * (1.0 - 1e-9), "{nanos} ns");
            }
        }
        assert_eq!(bucket_bound(0), 0.0005);
        assert!((bucket_bound(1) - 0.0005 * std::f64::consts::SQRT_2).abs() < 1e-12);
        assert!((bucket_bound(30) - 16.384).abs() < 1e-9);
        assert_eq!(bucket_bound(32), f64::INFINITY);
        // A sweep from 1 µs to 60 s agrees with the float definition (away from a bound).
        let mut nanos = 1_000u64;
        while nanos < 60_000_000_000 {
            let secs = nanos as f64 / 1e9;
            let want = (0..BUCKETS)
                .find(|&i| bucket_bound(i) >= secs)
                .unwrap_or(BUCKETS);
            let near_bound = (0..BUCKETS).any(|i| (secs / bucket_bound(i) - 1.0).abs() < 1e-9);
            if !near_bound {
                assert_eq!(bucket_index(nanos), want, "{nanos} ns");
            }
            nanos += nanos / 97 + 1;
        }
    }
}
