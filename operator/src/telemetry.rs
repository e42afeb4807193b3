//! Structured logs (JSON when `--log-format json`, for log pipelines; text otherwise) and
//! the conventions both controllers follow: each registers [`ReconcileMetrics`] under its
//! prefix (`sluice_release_`, `sluice_inference_`), labels per-object series with
//! [`ObjectLabels`] and error counters with [`ErrorLabels`] (`kind`), and runs each
//! reconcile in a [`reconcile_span`].

use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tracing_subscriber::{EnvFilter, fmt};

#[derive(Clone, Copy, Debug, Default, clap::ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Installs the global subscriber; filter from `RUST_LOG` (default `info`).
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// Labels of a series about one object.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ObjectLabels {
    pub namespace: String,
    pub name: String,
}

impl ObjectLabels {
    pub fn new(namespace: &str, name: &str) -> Self {
        Self {
            namespace: namespace.to_string(),
            name: name.to_string(),
        }
    }
}

/// Label of the error counters: the kind of error (a short, fixed word).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub kind: String,
}

/// Label of counters by reason (aborts, placement failures).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

/// Every controller's reconcile metrics: `reconcile_runs_total`,
/// `reconcile_duration_seconds` and `reconcile_errors_total{kind}`.
#[derive(Clone)]
pub struct ReconcileMetrics {
    pub runs: Counter,
    pub duration: Histogram,
    pub errors: Family<ErrorLabels, Counter>,
}

impl Default for ReconcileMetrics {
    fn default() -> Self {
        Self {
            runs: Counter::default(),
            duration: Histogram::new(exponential_buckets(0.001, 2.0, 14)),
            errors: Family::default(),
        }
    }
}

impl ReconcileMetrics {
    /// Register under `r`'s prefix; `errors_help` says what the errors count.
    pub fn register(r: &mut Registry, errors_help: &str) -> Self {
        let m = Self::default();
        r.register("reconcile_runs", "Reconciles run", m.runs.clone());
        r.register(
            "reconcile_duration_seconds",
            "Time per reconcile",
            m.duration.clone(),
        );
        r.register("reconcile_errors", errors_help, m.errors.clone());
        m
    }

    /// One reconcile ended (either way), `started` when it began.
    pub fn finished(&self, started: Instant) {
        self.runs.inc();
        self.duration.observe(started.elapsed().as_secs_f64());
    }

    pub fn error(&self, kind: &str) {
        self.errors
            .get_or_create(&ErrorLabels {
                kind: kind.to_string(),
            })
            .inc();
    }
}

/// The span of one reconcile of `kind` (`Release`, `InferenceSet`) for one object;
/// attach it with `.instrument(span)` so that no guard is held across an `.await`.
pub fn reconcile_span(kind: &'static str, namespace: &str, name: &str) -> tracing::Span {
    tracing::info_span!("reconcile", kind, namespace, name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_runs_duration_and_errors_by_kind() {
        let mut registry = Registry::with_prefix("sluice");
        let m = ReconcileMetrics::register(
            registry.sub_registry_with_prefix("test"),
            "Failed reconciles",
        );
        m.finished(Instant::now());
        m.error("api");
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
        assert!(out.contains("sluice_test_reconcile_runs_total 1"), "{out}");
        assert!(out.contains("sluice_test_reconcile_duration_seconds_count 1"));
        assert!(out.contains("sluice_test_reconcile_errors_total{kind=\"api\"} 1"));
    }
}
