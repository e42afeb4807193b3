//! A run's report: counts, percentiles and the per-second time series. Pure.
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::config::LoadConfig;
use super::records::{ClosedBy, ConnRecord, Outcome, RequestRecord};

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

/// Nearest-rank percentile of an ascending slice (`q` in 0..=1); 0 for an empty slice.
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

pub fn percentiles(mut values: Vec<f64>) -> Percentiles {
    values.sort_by(|a, b| a.total_cmp(b));
    Percentiles {
        p50: percentile(&values, 0.50),
        p90: percentile(&values, 0.90),
        p99: percentile(&values, 0.99),
        max: values.last().copied().unwrap_or(0.0),
    }
}

/// One second of the run.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Bin {
    /// Start of the bin, seconds since the origin.
    pub t: f64,
    /// Requests that ended in this bin.
    pub requests: u64,
    /// Failed requests that ended in this bin, by outcome.
    pub errors: BTreeMap<Outcome, u64>,
    pub p99_ms: f64,
    /// Connections opened in this bin, by the pod they reached ("?" when none answered).
    pub new_conns: BTreeMap<String, u64>,
    /// Connections open at the end of the bin, by pod.
    pub open_conns: BTreeMap<String, u64>,
    /// Requests answered in this bin, by pod.
    pub by_pod: BTreeMap<String, u64>,
}

impl Bin {
    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }
}

/// Per-second time series of a run. Pure, so it is unit-tested.
pub fn time_series(requests: &[RequestRecord], conns: &[ConnRecord], end_ms: f64) -> Vec<Bin> {
    let n = (end_ms / 1000.0).ceil().max(1.0) as usize;
    let mut bins: Vec<Bin> = (0..n)
        .map(|i| Bin {
            t: i as f64,
            ..Default::default()
        })
        .collect();
    let idx = |ms: f64| ((ms / 1000.0).floor().max(0.0) as usize).min(n - 1);
    let mut lat: Vec<Vec<f64>> = vec![Vec::new(); n];
    for r in requests {
        let b = &mut bins[idx(r.end_ms)];
        b.requests += 1;
        if r.outcome.is_failure() {
            *b.errors.entry(r.outcome).or_default() += 1;
        }
        if let Some(p) = &r.pod {
            *b.by_pod.entry(p.clone()).or_default() += 1;
        }
        lat[idx(r.end_ms)].push(r.latency_ms());
    }
    for (b, l) in bins.iter_mut().zip(lat) {
        b.p99_ms = percentiles(l).p99;
    }
    for c in conns {
        let pod = c.pod.clone().unwrap_or_else(|| "?".into());
        *bins[idx(c.open_ms)]
            .new_conns
            .entry(pod.clone())
            .or_default() += 1;
        // Open at the end of bin i when opened before and closed after that instant.
        for (i, b) in bins.iter_mut().enumerate() {
            let edge = (i as f64 + 1.0) * 1000.0;
            if c.open_ms <= edge && c.close_ms > edge {
                *b.open_conns.entry(pod.clone()).or_default() += 1;
            }
        }
    }
    bins
}

/// Everything a run measured.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct LoadReport {
    /// Wall-clock time of the origin, ms since the Unix epoch.
    pub origin_unix_ms: u64,
    pub target: String,
    pub connections: usize,
    pub rate: f64,
    pub http2: bool,
    pub duration_s: f64,
    pub requests: u64,
    pub by_outcome: BTreeMap<Outcome, u64>,
    pub failed: u64,
    pub achieved_rps: f64,
    pub latency_ms: Percentiles,
    pub connections_opened: u64,
    pub closed_by_server: u64,
    pub closed_by_client: u64,
    pub by_pod: BTreeMap<String, u64>,
    pub series: Vec<Bin>,
    #[serde(skip)]
    pub request_log: Vec<RequestRecord>,
    #[serde(skip)]
    pub conn_log: Vec<ConnRecord>,
}

impl LoadReport {
    /// Every request and then every connection as JSON lines (`{"request": …}`,
    /// `{"connection": …}`).
    pub fn write_records(&self, path: &std::path::Path) -> std::io::Result<()> {
        use std::io::Write as _;
        let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
        for r in &self.request_log {
            writeln!(f, "{}", serde_json::json!({"request": r}))?;
        }
        for c in &self.conn_log {
            writeln!(f, "{}", serde_json::json!({"connection": c}))?;
        }
        f.flush()
    }

    pub(super) fn build(
        cfg: &LoadConfig,
        origin_unix_ms: u64,
        end_ms: f64,
        mut requests: Vec<RequestRecord>,
        mut conns: Vec<ConnRecord>,
    ) -> Self {
        requests.sort_by(|a, b| a.scheduled_ms.total_cmp(&b.scheduled_ms));
        conns.sort_by_key(|c| c.id);
        let mut by_outcome: BTreeMap<Outcome, u64> = Outcome::ALL.iter().map(|o| (*o, 0)).collect();
        let mut by_pod = BTreeMap::new();
        for r in &requests {
            *by_outcome.entry(r.outcome).or_default() += 1;
            if let Some(p) = &r.pod {
                *by_pod.entry(p.clone()).or_default() += 1;
            }
        }
        let failed = requests.iter().filter(|r| r.outcome.is_failure()).count() as u64;
        let ok = requests.len() as u64 - failed;
        let duration_s = end_ms / 1000.0;
        LoadReport {
            origin_unix_ms,
            target: cfg.target.to_string(),
            connections: cfg.connections,
            rate: cfg.rate,
            http2: cfg.http2,
            duration_s,
            requests: requests.len() as u64,
            by_outcome,
            failed,
            achieved_rps: if duration_s > 0.0 {
                ok as f64 / duration_s
            } else {
                0.0
            },
            latency_ms: percentiles(requests.iter().map(|r| r.latency_ms()).collect()),
            connections_opened: conns.len() as u64,
            closed_by_server: conns
                .iter()
                .filter(|c| c.closed_by == ClosedBy::Server)
                .count() as u64,
            closed_by_client: conns
                .iter()
                .filter(|c| c.closed_by == ClosedBy::Client)
                .count() as u64,
            by_pod,
            series: time_series(&requests, &conns, end_ms),
            request_log: requests,
            conn_log: conns,
        }
    }
}
