//! The model of a metric check (pure): what to query, how often, and how to judge it.

use std::collections::BTreeMap;
use std::time::Duration;

use super::expr::{Expr, ParseError};

/// Most measurements one check may ask for.
pub const MAX_COUNT: u32 = 10_000;
/// Shortest interval between two measurements of one check.
pub const MIN_INTERVAL: Duration = Duration::from_secs(1);
/// Query timeout when the template gives none.
pub const DEFAULT_QUERY_TIMEOUT: Duration = Duration::from_secs(30);
/// Argo Rollouts' default `consecutiveErrorLimit`.
pub const DEFAULT_CONSECUTIVE_ERROR_LIMIT: u32 = 4;

/// Where a check's query goes. Only Prometheus' HTTP API over plain `http://`.
#[derive(Debug, Clone, PartialEq)]
pub struct PrometheusSource {
    /// Base address, e.g. `http://prometheus.monitoring:9090` (a path prefix is kept).
    pub address: String,
    pub timeout: Duration,
    /// Extra request headers (Argo's `headers`, e.g. `X-Scope-OrgID`).
    pub headers: Vec<(String, String)>,
}

/// A parsed success or failure condition, with its source text for status and errors.
#[derive(Debug, Clone, PartialEq)]
pub struct Condition {
    pub source: String,
    pub expr: Expr,
}

impl Condition {
    pub fn parse(source: &str) -> Result<Self, ParseError> {
        Ok(Self {
            source: source.trim().to_string(),
            expr: Expr::parse(source.trim())?,
        })
    }
}

/// Flagger's `thresholdRange`: the first value must lie in `[min, max]` (both inclusive,
/// either optional).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ThresholdRange {
    pub min: Option<f64>,
    pub max: Option<f64>,
}

/// How a measurement's value is judged.
#[derive(Debug, Clone, PartialEq)]
pub enum Judge {
    /// Argo's `successCondition` / `failureCondition`. With neither, every measurement that
    /// returns is Successful.
    Conditions {
        success: Option<Condition>,
        failure: Option<Condition>,
    },
    /// Flagger's `thresholdRange`.
    Range(ThresholdRange),
}

/// The outcome class of one measurement (Argo's measurement phases).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, schemars::JsonSchema,
)]
pub enum MeasurementPhase {
    Successful,
    Failed,
    Inconclusive,
    Error,
}

/// One metric check of a canary analysis.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricCheck {
    pub name: String,
    pub source: PrometheusSource,
    /// PromQL with `{{args.x}}`, `{{ variables.x }}`, `{{ namespace }}`, `{{ target }}`,
    /// `{{ service }}`, `{{ name }}`, `{{ interval }}` placeholders.
    pub query: String,
    /// Default values for placeholders, keyed by their full name (`args.service-name`,
    /// `variables.route`): Argo's `spec.args[].value`, Flagger's `templateVariables`;
    /// `interval` overrides the `{{ interval }}` window (Flagger's metric interval), which
    /// is otherwise the check's interval.
    pub defaults: BTreeMap<String, String>,
    /// Time between measurements; `None` takes one measurement.
    pub interval: Option<Duration>,
    /// Wait before the first measurement.
    pub initial_delay: Duration,
    /// Measurements to take; `None` with an interval measures until the run is terminated.
    pub count: Option<u32>,
    pub judge: Judge,
    /// The check fails when more than this many measurements failed.
    pub failure_limit: u32,
    /// The check is inconclusive when more than this many measurements were.
    pub inconclusive_limit: u32,
    /// The check errs (counted as failed) after more than this many errors in a row.
    pub consecutive_error_limit: u32,
    /// Measured and reported, but never fails the run.
    pub dry_run: bool,
}

impl MetricCheck {
    /// A check with Argo's defaults: one measurement, no limits, 4 consecutive errors.
    pub fn new(name: &str, source: PrometheusSource, query: &str, judge: Judge) -> Self {
        Self {
            name: name.to_string(),
            source,
            query: query.to_string(),
            defaults: BTreeMap::new(),
            interval: None,
            initial_delay: Duration::ZERO,
            count: None,
            judge,
            failure_limit: 0,
            inconclusive_limit: 0,
            consecutive_error_limit: DEFAULT_CONSECUTIVE_ERROR_LIMIT,
            dry_run: false,
        }
    }

    /// Checks the bounds that keep a run finite and well-formed.
    pub fn validate(&self) -> Result<(), String> {
        if self.name.trim().is_empty() {
            return Err("a metric needs a name".into());
        }
        if self.query.trim().is_empty() {
            return Err(format!("metric {}: the query is empty", self.name));
        }
        if let Some(i) = self.interval
            && i < MIN_INTERVAL
        {
            return Err(format!(
                "metric {}: interval {i:?} is shorter than {MIN_INTERVAL:?}",
                self.name
            ));
        }
        match self.count {
            Some(0) => return Err(format!("metric {}: count must be at least 1", self.name)),
            Some(c) if c > MAX_COUNT => {
                return Err(format!(
                    "metric {}: count {c} exceeds {MAX_COUNT}",
                    self.name
                ));
            }
            Some(c) if c > 1 && self.interval.is_none() => {
                return Err(format!(
                    "metric {}: count {c} needs an interval between measurements",
                    self.name
                ));
            }
            _ => {}
        }
        if let Judge::Range(ThresholdRange { min, max }) = self.judge {
            if min.is_none() && max.is_none() {
                return Err(format!(
                    "metric {}: thresholdRange needs min or max",
                    self.name
                ));
            }
            if let (Some(lo), Some(hi)) = (min, max)
                && lo > hi
            {
                return Err(format!(
                    "metric {}: thresholdRange min {lo} is above max {hi}",
                    self.name
                ));
            }
        }
        Ok(())
    }

    /// Measurements this check takes in all; `None` when it runs until terminated.
    pub fn effective_count(&self) -> Option<u32> {
        match (self.count, self.interval) {
            (Some(c), _) => Some(c),
            (None, None) => Some(1),
            (None, Some(_)) => None,
        }
    }

    /// Judges one query result, Argo's way: a failure condition that holds wins; with only
    /// one condition the other is its negation; neither holding is Inconclusive. Returns
    /// the phase and, for Error, why.
    pub fn judge(&self, result: &[f64]) -> (MeasurementPhase, Option<String>) {
        use MeasurementPhase::*;
        match &self.judge {
            Judge::Range(r) => match result.first() {
                None => (Error, Some("the query returned no values".into())),
                Some(v) if v.is_nan() => (Error, Some("the query returned NaN".into())),
                Some(v) => {
                    let low = r.min.is_some_and(|m| *v < m);
                    let high = r.max.is_some_and(|m| *v > m);
                    if low || high {
                        (Failed, None)
                    } else {
                        (Successful, None)
                    }
                }
            },
            Judge::Conditions { success, failure } => {
                let eval = |c: &Option<Condition>| -> Result<Option<bool>, String> {
                    c.as_ref()
                        .map(|c| {
                            c.expr
                                .eval(result)
                                .map_err(|e| format!("{}: {e}", c.source))
                        })
                        .transpose()
                };
                let (s, f) = match (eval(success), eval(failure)) {
                    (Ok(s), Ok(f)) => (s, f),
                    (Err(e), _) | (_, Err(e)) => return (Error, Some(e)),
                };
                let (s, f) = match (s, f) {
                    (None, None) => return (Successful, None),
                    (Some(s), None) => (s, !s),
                    (None, Some(f)) => (!f, f),
                    (Some(s), Some(f)) => (s, f),
                };
                if f {
                    (Failed, None)
                } else if s {
                    (Successful, None)
                } else {
                    (Inconclusive, None)
                }
            }
        }
    }
}

/// The values a query template is filled from, taken from the Release being analysed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TemplateContext {
    /// `{{ name }}`: the Release's name.
    pub name: String,
    /// `{{ namespace }}`.
    pub namespace: String,
    /// `{{ target }}`: the Deployment the Release manages.
    pub target: String,
    /// `{{ service }}`.
    pub service: String,
    /// `{{args.NAME}}` values; they override the template's defaults.
    pub args: BTreeMap<String, String>,
}

impl TemplateContext {
    /// The context of a Release: besides the Flagger names, the args `namespace`,
    /// `service`, `target`, `canary-revision` and `stable-revision` (the values of the
    /// `sluice.dev/revision` label on each side's pods), the same values also as
    /// `canary-hash` and `stable-hash`, the names Argo Rollouts' templates use.
    pub fn for_release(
        name: &str,
        namespace: &str,
        target: &str,
        service: &str,
        canary_revision: &str,
        stable_revision: &str,
    ) -> Self {
        let args = [
            ("namespace", namespace),
            ("service", service),
            ("target", target),
            ("canary-revision", canary_revision),
            ("stable-revision", stable_revision),
            ("canary-hash", canary_revision),
            ("stable-hash", stable_revision),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        Self {
            name: name.into(),
            namespace: namespace.into(),
            target: target.into(),
            service: service.into(),
            args,
        }
    }
}

/// A placeholder that could not be filled.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TemplateError {
    #[error("metric {metric}: `{{{{{var}}}}}` has no value (give it as an arg of the Release)")]
    Missing { metric: String, var: String },
    #[error(
        "metric {metric}: unknown placeholder `{{{{{var}}}}}` (supported: args.NAME, \
         variables.NAME, name, namespace, target, service, interval)"
    )]
    Unknown { metric: String, var: String },
    #[error("metric {metric}: a `{{{{` is never closed")]
    Unclosed { metric: String },
}

/// Fills a check's query template.
pub fn render(check: &MetricCheck, ctx: &TemplateContext) -> Result<String, TemplateError> {
    let mut out = String::with_capacity(check.query.len());
    let mut rest = check.query.as_str();
    while let Some(open) = rest.find("{{") {
        out.push_str(&rest[..open]);
        let after = &rest[open + 2..];
        let close = after.find("}}").ok_or_else(|| TemplateError::Unclosed {
            metric: check.name.clone(),
        })?;
        let var = after[..close].trim();
        let missing = || TemplateError::Missing {
            metric: check.name.clone(),
            var: var.to_string(),
        };
        let value = if let Some(arg) = var.strip_prefix("args.") {
            ctx.args
                .get(arg)
                .or_else(|| check.defaults.get(var))
                .cloned()
                .ok_or_else(missing)?
        } else if var.starts_with("variables.") {
            check.defaults.get(var).cloned().ok_or_else(missing)?
        } else {
            match var {
                "name" => ctx.name.clone(),
                "namespace" => ctx.namespace.clone(),
                "target" => ctx.target.clone(),
                "service" => ctx.service.clone(),
                "interval" => match check.defaults.get("interval") {
                    Some(window) => window.clone(),
                    None => format_duration(check.interval.ok_or_else(missing)?),
                },
                _ => {
                    return Err(TemplateError::Unknown {
                        metric: check.name.clone(),
                        var: var.to_string(),
                    });
                }
            }
        };
        out.push_str(&value);
        rest = &after[close + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Parses a Go-style duration: `30s`, `5m`, `1h30m`, `500ms`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let bad = || format!("`{s}` is not a duration (e.g. 30s, 5m, 1h30m, 500ms)");
    if s.is_empty() || s.len() > 32 {
        return Err(bad());
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .ok_or_else(bad)?;
        let n: f64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = match &rest[..unit_len] {
            "ms" => 0.001,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(bad()),
        };
        rest = &rest[unit_len..];
        total += Duration::try_from_secs_f64(n * unit).map_err(|_| bad())?;
    }
    Ok(total)
}

/// Formats a duration the way PromQL range selectors take it: `1h`, `5m`, `90s`, `500ms`.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if !ms.is_multiple_of(1000) {
        format!("{ms}ms")
    } else {
        let s = ms / 1000;
        if s != 0 && s.is_multiple_of(3600) {
            format!("{}h", s / 3600)
        } else if s != 0 && s.is_multiple_of(60) {
            format!("{}m", s / 60)
        } else {
            format!("{s}s")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use MeasurementPhase::*;

    fn source() -> PrometheusSource {
        PrometheusSource {
            address: "http://127.0.0.1:9090".into(),
            timeout: DEFAULT_QUERY_TIMEOUT,
            headers: vec![],
        }
    }

    fn conds(s: Option<&str>, f: Option<&str>) -> Judge {
        Judge::Conditions {
            success: s.map(|s| Condition::parse(s).expect("parses")),
            failure: f.map(|f| Condition::parse(f).expect("parses")),
        }
    }

    fn check(judge: Judge) -> MetricCheck {
        MetricCheck::new("m", source(), "up", judge)
    }

    #[test]
    fn judging_follows_argo() {
        let only_success = check(conds(Some("result[0] >= 0.95"), None));
        assert_eq!(only_success.judge(&[0.99]).0, Successful);
        assert_eq!(only_success.judge(&[0.5]).0, Failed);
        let only_failure = check(conds(None, Some("result[0] < 0.5")));
        assert_eq!(only_failure.judge(&[0.4]).0, Failed);
        assert_eq!(only_failure.judge(&[0.6]).0, Successful);
        let both = check(conds(Some("result[0] >= 0.95"), Some("result[0] < 0.5")));
        assert_eq!(both.judge(&[0.99]).0, Successful);
        assert_eq!(both.judge(&[0.4]).0, Failed);
        assert_eq!(both.judge(&[0.7]).0, Inconclusive);
        // Both hold: the failure wins.
        let overlap = check(conds(Some("result[0] > 0"), Some("result[0] > 0.5")));
        assert_eq!(overlap.judge(&[0.7]).0, Failed);
        assert_eq!(check(conds(None, None)).judge(&[]).0, Successful);
        let (phase, msg) = only_success.judge(&[]);
        assert_eq!(phase, Error);
        assert!(msg.expect("message").contains("out of range"));
    }

    #[test]
    fn threshold_range_is_inclusive_and_errs_without_a_value() {
        let c = check(Judge::Range(ThresholdRange {
            min: Some(99.0),
            max: Some(100.0),
        }));
        assert_eq!(c.judge(&[99.0]).0, Successful);
        assert_eq!(c.judge(&[100.0]).0, Successful);
        assert_eq!(c.judge(&[98.9]).0, Failed);
        assert_eq!(c.judge(&[100.1]).0, Failed);
        assert_eq!(c.judge(&[]).0, Error);
        assert_eq!(c.judge(&[f64::NAN]).0, Error);
        let max_only = check(Judge::Range(ThresholdRange {
            min: None,
            max: Some(500.0),
        }));
        assert_eq!(max_only.judge(&[f64::NEG_INFINITY]).0, Successful);
        assert_eq!(max_only.judge(&[f64::INFINITY]).0, Failed);
    }

    #[test]
    fn validation_keeps_runs_finite() {
        let mut c = check(conds(None, None));
        assert_eq!(c.validate(), Ok(()));
        assert_eq!(c.effective_count(), Some(1));
        c.count = Some(3);
        assert!(
            c.validate()
                .expect_err("no interval")
                .contains("needs an interval")
        );
        c.interval = Some(Duration::from_millis(10));
        assert!(c.validate().expect_err("short").contains("shorter"));
        c.interval = Some(Duration::from_secs(10));
        assert_eq!(c.validate(), Ok(()));
        c.count = Some(0);
        assert!(c.validate().is_err());
        c.count = None;
        assert_eq!(c.effective_count(), None);
        c.judge = Judge::Range(ThresholdRange {
            min: Some(2.0),
            max: Some(1.0),
        });
        assert!(c.validate().expect_err("range").contains("above max"));
    }

    #[test]
    fn templates_fill_argo_and_flagger_placeholders() {
        let mut c = check(conds(None, None));
        c.query =
            "sum(rate(x{ns=\"{{ namespace }}\",pod=~\"{{target}}-{{args.canary-revision}}-.*\",\
                   svc=\"{{ args.service-name }}\",r=\"{{ variables.route }}\"}[{{ interval }}]))"
                .into();
        c.interval = Some(Duration::from_secs(60));
        c.defaults
            .insert("args.service-name".into(), "default-svc".into());
        c.defaults.insert("variables.route".into(), "/api".into());
        let mut ctx =
            TemplateContext::for_release("rel", "shop", "web", "web-svc", "abc12", "def34");
        assert_eq!(
            render(&c, &ctx).expect("renders"),
            "sum(rate(x{ns=\"shop\",pod=~\"web-abc12-.*\",svc=\"default-svc\",r=\"/api\"}[1m]))"
        );
        ctx.args.insert("service-name".into(), "given".into());
        assert!(render(&c, &ctx).expect("renders").contains("svc=\"given\""));
    }

    #[test]
    fn template_errors_name_the_placeholder() {
        let ctx = TemplateContext::default();
        let mut c = check(conds(None, None));
        c.query = "x{a=\"{{args.nope}}\"}".into();
        let e = render(&c, &ctx).expect_err("missing");
        assert_eq!(
            e.to_string(),
            "metric m: `{{args.nope}}` has no value (give it as an arg of the Release)"
        );
        c.query = "x{a=\"{{ secret }}\"}".into();
        assert!(matches!(
            render(&c, &ctx),
            Err(TemplateError::Unknown { .. })
        ));
        c.query = "x[{{ interval }}]".into();
        assert!(matches!(
            render(&c, &ctx),
            Err(TemplateError::Missing { .. })
        ));
        c.query = "x{{ namespace".into();
        assert!(matches!(
            render(&c, &ctx),
            Err(TemplateError::Unclosed { .. })
        ));
    }

    #[test]
    fn durations_parse_and_format() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        for bad in ["", "5", "m", "5 minutes", "5d", "-5s", "1e400s"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
        assert_eq!(format_duration(Duration::from_secs(60)), "1m");
        assert_eq!(format_duration(Duration::from_secs(7200)), "2h");
        assert_eq!(format_duration(Duration::from_secs(90)), "90s");
        assert_eq!(format_duration(Duration::from_millis(1500)), "1500ms");
    }
}
