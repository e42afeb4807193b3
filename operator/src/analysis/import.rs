//! Reads Argo Rollouts `AnalysisTemplate`s and Flagger `MetricTemplate`s (as dynamic
//! objects, `serde_json::Value`) into [`MetricCheck`]s. Strict: any field this library
//! does not implement is an error naming the field and what is supported, so a template
//! never runs with part of its meaning silently dropped.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::Value;

use super::model::{
    Condition, DEFAULT_QUERY_TIMEOUT, Judge, MetricCheck, PrometheusSource, ThresholdRange,
    parse_duration,
};

/// A template this library cannot run as written.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ImportError {
    /// Path of the offending field, e.g. `spec.metrics[0].provider.datadog`.
    pub field: String,
    pub message: String,
}

impl ImportError {
    pub fn invalid(field: &str, message: &str) -> Self {
        Self {
            field: field.to_string(),
            message: message.to_string(),
        }
    }

    pub fn unsupported(field: &str, value: &Value, supported: &str) -> Self {
        let shown: String = value.to_string().chars().take(64).collect();
        Self::invalid(
            field,
            &format!("{shown} is not supported (supported: {supported})"),
        )
    }
}

/// The string field `key` of `v`, required.
pub fn field_str<'a>(v: &'a Value, path: &str, key: &str) -> Result<&'a str, ImportError> {
    match v.get(key) {
        Some(Value::String(s)) if !s.trim().is_empty() => Ok(s),
        Some(_) => Err(ImportError::invalid(
            &format!("{path}.{key}"),
            "must be a non-empty string",
        )),
        None => Err(ImportError::invalid(
            &format!("{path}.{key}"),
            "is required",
        )),
    }
}

/// The duration field `key` of `v` (`30s`, `5m`), optional.
pub fn field_duration(v: &Value, path: &str, key: &str) -> Result<Option<Duration>, ImportError> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => parse_duration(s)
            .map(Some)
            .map_err(|e| ImportError::invalid(&format!("{path}.{key}"), &e)),
        Some(_) => Err(ImportError::invalid(
            &format!("{path}.{key}"),
            "must be a duration string such as 30s",
        )),
    }
}

/// Argo's IntOrString counters: a whole number, or a string of digits.
fn field_u32(v: &Value, path: &str, key: &str) -> Result<Option<u32>, ImportError> {
    let field = format!("{path}.{key}");
    let n = match v.get(key) {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Number(n)) => n.as_u64(),
        Some(Value::String(s)) if s.contains("{{") => {
            return Err(ImportError::invalid(
                &field,
                "templated values are not supported; give a number",
            ));
        }
        Some(Value::String(s)) => s.trim().parse::<u64>().ok(),
        Some(_) => None,
    };
    n.and_then(|n| u32::try_from(n).ok())
        .map(Some)
        .ok_or_else(|| ImportError::invalid(&field, "must be a whole number from 0"))
}

/// Rejects keys of `v` outside `allowed`.
fn only_keys(v: &Value, path: &str, allowed: &[&str]) -> Result<(), ImportError> {
    let obj = v
        .as_object()
        .ok_or_else(|| ImportError::invalid(path, "must be an object"))?;
    match obj.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(ImportError::invalid(
            &format!("{path}.{k}"),
            &format!("is not supported (supported here: {})", allowed.join(", ")),
        )),
        None => Ok(()),
    }
}

fn expect_kind(doc: &Value, api_version: &str, kinds: &[&str]) -> Result<(), ImportError> {
    if doc.get("apiVersion").and_then(Value::as_str) != Some(api_version) {
        return Err(ImportError::unsupported(
            "apiVersion",
            doc.get("apiVersion").unwrap_or(&Value::Null),
            api_version,
        ));
    }
    let kind = doc.get("kind").and_then(Value::as_str).unwrap_or("");
    if !kinds.contains(&kind) {
        return Err(ImportError::unsupported(
            "kind",
            doc.get("kind").unwrap_or(&Value::Null),
            &kinds.join(", "),
        ));
    }
    Ok(())
}

fn condition(v: &Value, path: &str, key: &str) -> Result<Option<Condition>, ImportError> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Condition::parse(s)
            .map(Some)
            .map_err(|e| ImportError::invalid(&format!("{path}.{key}"), &e.to_string())),
        Some(_) => Err(ImportError::invalid(
            &format!("{path}.{key}"),
            "must be a string",
        )),
    }
}

const ARGO_METRIC_KEYS: &[&str] = &[
    "name",
    "interval",
    "initialDelay",
    "count",
    "successCondition",
    "failureCondition",
    "failureLimit",
    "inconclusiveLimit",
    "consecutiveErrorLimit",
    "provider",
];

/// Reads an Argo Rollouts `AnalysisTemplate` or `ClusterAnalysisTemplate`
/// (`argoproj.io/v1alpha1`) with Prometheus metrics.
pub fn from_argo_analysis_template(doc: &Value) -> Result<Vec<MetricCheck>, ImportError> {
    expect_kind(
        doc,
        "argoproj.io/v1alpha1",
        &["AnalysisTemplate", "ClusterAnalysisTemplate"],
    )?;
    let spec = doc
        .get("spec")
        .ok_or_else(|| ImportError::invalid("spec", "is required"))?;
    only_keys(spec, "spec", &["args", "metrics", "dryRun"])?;

    let mut defaults = BTreeMap::new();
    for (i, arg) in list(spec, "spec", "args")?.iter().enumerate() {
        let path = format!("spec.args[{i}]");
        only_keys(arg, &path, &["name", "value"])?;
        let name = field_str(arg, &path, "name")?;
        if let Some(value) = arg.get("value") {
            let value = value.as_str().ok_or_else(|| {
                ImportError::invalid(&format!("{path}.value"), "must be a string")
            })?;
            defaults.insert(format!("args.{name}"), value.to_string());
        }
    }

    let mut dry_run_all = false;
    let mut dry_run = Vec::new();
    for (i, d) in list(spec, "spec", "dryRun")?.iter().enumerate() {
        let path = format!("spec.dryRun[{i}]");
        only_keys(d, &path, &["metricName"])?;
        let name = field_str(d, &path, "metricName")?;
        if name == ".*" {
            dry_run_all = true;
        } else if name.contains(|c: char| "*+?[](){}|^$\\".contains(c)) {
            return Err(ImportError::invalid(
                &format!("{path}.metricName"),
                "regular expressions other than `.*` are not supported; name the metric",
            ));
        } else {
            dry_run.push(name.to_string());
        }
    }

    let metrics = list(spec, "spec", "metrics")?;
    if metrics.is_empty() {
        return Err(ImportError::invalid(
            "spec.metrics",
            "needs at least one metric",
        ));
    }
    let mut checks = Vec::with_capacity(metrics.len());
    for (i, m) in metrics.iter().enumerate() {
        let path = format!("spec.metrics[{i}]");
        let mut check = argo_metric(m, &path)?;
        check.defaults = defaults.clone();
        check.dry_run = dry_run_all || dry_run.contains(&check.name);
        check
            .validate()
            .map_err(|e| ImportError::invalid(&path, &e))?;
        checks.push(check);
    }
    if let Some(unknown) = dry_run
        .iter()
        .find(|n| !checks.iter().any(|c| &c.name == *n))
    {
        return Err(ImportError::invalid(
            "spec.dryRun",
            &format!("no metric named {unknown}"),
        ));
    }
    Ok(checks)
}

fn argo_metric(m: &Value, path: &str) -> Result<MetricCheck, ImportError> {
    only_keys(m, path, ARGO_METRIC_KEYS)?;
    let name = field_str(m, path, "name")?;
    let provider = m
        .get("provider")
        .ok_or_else(|| ImportError::invalid(&format!("{path}.provider"), "is required"))?;
    let provider_path = format!("{path}.provider");
    only_keys(provider, &provider_path, &["prometheus"]).map_err(|mut e| {
        e.message = "this provider is not supported (supported: prometheus)".into();
        e
    })?;
    let prom_path = format!("{provider_path}.prometheus");
    let prom = provider
        .get("prometheus")
        .ok_or_else(|| ImportError::invalid(&prom_path, "is required"))?;
    only_keys(
        prom,
        &prom_path,
        &["address", "query", "timeout", "headers"],
    )?;
    let address = field_str(prom, &prom_path, "address")?;
    super::http::check_url(address)
        .map_err(|e| ImportError::invalid(&format!("{prom_path}.address"), &e.to_string()))?;
    let timeout = match prom.get("timeout") {
        None | Some(Value::Null) => DEFAULT_QUERY_TIMEOUT,
        Some(t) => t
            .as_u64()
            .filter(|t| (1..=600).contains(t))
            .map(Duration::from_secs)
            .ok_or_else(|| {
                ImportError::invalid(
                    &format!("{prom_path}.timeout"),
                    "whole seconds from 1 to 600",
                )
            })?,
    };
    let mut headers = Vec::new();
    for (i, h) in list(prom, &prom_path, "headers")?.iter().enumerate() {
        let hp = format!("{prom_path}.headers[{i}]");
        only_keys(h, &hp, &["key", "value"])?;
        headers.push((
            field_str(h, &hp, "key")?.to_string(),
            field_str(h, &hp, "value")?.to_string(),
        ));
    }
    let judge = Judge::Conditions {
        success: condition(m, path, "successCondition")?,
        failure: condition(m, path, "failureCondition")?,
    };
    let source = PrometheusSource {
        address: address.to_string(),
        timeout,
        headers,
    };
    let mut check = MetricCheck::new(name, source, field_str(prom, &prom_path, "query")?, judge);
    check.interval = field_duration(m, path, "interval")?;
    check.initial_delay = field_duration(m, path, "initialDelay")?.unwrap_or_default();
    check.count = field_u32(m, path, "count")?;
    check.failure_limit = field_u32(m, path, "failureLimit")?.unwrap_or(0);
    check.inconclusive_limit = field_u32(m, path, "inconclusiveLimit")?.unwrap_or(0);
    if let Some(l) = field_u32(m, path, "consecutiveErrorLimit")? {
        check.consecutive_error_limit = l;
    }
    Ok(check)
}

fn list<'a>(v: &'a Value, path: &str, key: &str) -> Result<&'a [Value], ImportError> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(&[]),
        Some(Value::Array(a)) => Ok(a),
        Some(_) => Err(ImportError::invalid(
            &format!("{path}.{key}"),
            "must be a list",
        )),
    }
}

/// Reads one metric of a Flagger Canary's `analysis.metrics` that refers to a
/// `MetricTemplate` (`flagger.app/v1beta1`, Prometheus provider). `analysis` is the
/// Canary's `analysis` (optional): its `interval` is the default interval, `iterations`
/// becomes the count, and `threshold` (failed checks before rollback) the failure limit
/// (`threshold - 1`, applied per metric); errors count against the same limit, as Flagger
/// counts them as failed checks. Without `iterations` the check runs until terminated.
pub fn from_flagger_metric(
    template: &Value,
    metric: &Value,
    analysis: Option<&Value>,
) -> Result<MetricCheck, ImportError> {
    expect_kind(template, "flagger.app/v1beta1", &["MetricTemplate"])?;
    let spec = template
        .get("spec")
        .ok_or_else(|| ImportError::invalid("spec", "is required"))?;
    only_keys(spec, "spec", &["provider", "query"])?;
    let provider = spec
        .get("provider")
        .ok_or_else(|| ImportError::invalid("spec.provider", "is required"))?;
    only_keys(provider, "spec.provider", &["type", "address"])?;
    let kind = field_str(provider, "spec.provider", "type")?;
    if kind != "prometheus" {
        return Err(ImportError::unsupported(
            "spec.provider.type",
            &provider["type"],
            "prometheus",
        ));
    }
    let address = field_str(provider, "spec.provider", "address").map_err(|mut e| {
        e.message
            .push_str(" (there is no default Prometheus address)");
        e
    })?;
    super::http::check_url(address)
        .map_err(|e| ImportError::invalid("spec.provider.address", &e.to_string()))?;
    let query = field_str(spec, "spec", "query")?;

    let mp = "metric";
    only_keys(
        metric,
        mp,
        &[
            "name",
            "templateRef",
            "thresholdRange",
            "interval",
            "templateVariables",
        ],
    )?;
    let name = field_str(metric, mp, "name")?;
    let tref = metric.get("templateRef").ok_or_else(|| {
        ImportError::invalid(
            "metric.templateRef",
            "is required (builtin metrics are not supported)",
        )
    })?;
    only_keys(tref, "metric.templateRef", &["name", "namespace"])?;
    let ref_name = field_str(tref, "metric.templateRef", "name")?;
    let template_name = template["metadata"]["name"].as_str().unwrap_or("");
    if !template_name.is_empty() && ref_name != template_name {
        return Err(ImportError::invalid(
            "metric.templateRef.name",
            &format!("refers to {ref_name}, but the template given is {template_name}"),
        ));
    }
    let range = metric
        .get("thresholdRange")
        .ok_or_else(|| ImportError::invalid("metric.thresholdRange", "is required"))?;
    only_keys(range, "metric.thresholdRange", &["min", "max"])?;
    let bound = |k: &str| -> Result<Option<f64>, ImportError> {
        match range.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| {
                ImportError::invalid(&format!("metric.thresholdRange.{k}"), "must be a number")
            }),
        }
    };
    let judge = Judge::Range(ThresholdRange {
        min: bound("min")?,
        max: bound("max")?,
    });

    let source = PrometheusSource {
        address: address.to_string(),
        timeout: DEFAULT_QUERY_TIMEOUT,
        headers: vec![],
    };
    let mut check = MetricCheck::new(name, source, query, judge);
    if let Some(vars) = metric.get("templateVariables") {
        let obj = vars.as_object().ok_or_else(|| {
            ImportError::invalid("metric.templateVariables", "must be a map of strings")
        })?;
        for (k, v) in obj {
            let s = v.as_str().ok_or_else(|| {
                ImportError::invalid(&format!("metric.templateVariables.{k}"), "must be a string")
            })?;
            check
                .defaults
                .insert(format!("variables.{k}"), s.to_string());
        }
    }
    let (mut interval, mut count, mut limit) = (None, None, 0);
    if let Some(a) = analysis {
        interval = field_duration(a, "analysis", "interval")?;
        count = field_u32(a, "analysis", "iterations")?;
        if let Some(t) = field_u32(a, "analysis", "threshold")? {
            limit = t.saturating_sub(1);
        }
    }
    // Flagger's metric `interval` is the query's window (`{{ interval }}`, 1m by default);
    // the measurements follow the analysis' interval.
    let window = metric
        .get("interval")
        .and_then(Value::as_str)
        .unwrap_or("1m");
    let window_d =
        parse_duration(window).map_err(|e| ImportError::invalid("metric.interval", &e))?;
    check.defaults.insert("interval".into(), window.to_string());
    check.interval = interval.or(Some(window_d));
    check.count = count;
    check.failure_limit = limit;
    check.consecutive_error_limit = limit;
    check.validate().map_err(|e| ImportError::invalid(mp, &e))?;
    Ok(check)
}

#[cfg(test)]
#[path = "import_tests.rs"]
mod tests;
