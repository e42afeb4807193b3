//! The Grafana dashboard (`charts/sluice/dashboards/sluice.json`): the structure Grafana
//! needs, and every metric its PromQL names is one that the operator or the agent exports.
//!
//! The exported names come from the real registries, encoded with prometheus-client's text
//! encoder: the operator's built the way `main.rs` builds it (prefix `sluice`, the Release
//! and InferenceSet metrics), the agent's from `sluice_agent::metrics::Metrics`.

use std::collections::BTreeSet;
use std::path::Path;

use prometheus_client::registry::Registry;
use serde_json::Value;
use sluice_operator::release::crd::{DrainRecord, Phase};
use sluice_operator::release::gates::{Evaluation, Verdict};

/// Series Prometheus writes itself for every scrape target (not exported by anyone).
const PROMETHEUS_SERIES: [&str; 2] = ["up", "scrape_duration_seconds"];

/// Grafana's built-in variables.
const BUILTIN_VARS: [&str; 6] = [
    "__rate_interval",
    "__interval",
    "__interval_ms",
    "__range",
    "__range_s",
    "__all",
];

/// Aggregation operators (written `sum by (l) (…)`, not always followed by `(`).
const AGGREGATIONS: [&str; 14] = [
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
];

const PROMQL_KEYWORDS: [&str; 12] = [
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "atan2",
];

fn dashboard() -> Value {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/sluice/dashboards/sluice.json");
    serde_json::from_str(&std::fs::read_to_string(&path).expect("dashboard file"))
        .expect("the dashboard is JSON")
}

/// Sample names of an OpenMetrics text exposition, from its `# TYPE` lines (families
/// without samples yet are listed too): counters get `_total`, histograms
/// `_bucket`/`_sum`/`_count`.
fn sample_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let (name, kind) = rest.split_once(' ').expect("TYPE line");
        match kind.trim() {
            "counter" => {
                names.insert(format!("{name}_total"));
            }
            "histogram" => {
                for s in ["_bucket", "_sum", "_count"] {
                    names.insert(format!("{name}{s}"));
                }
            }
            "gauge" | "unknown" => {
                names.insert(name.to_string());
            }
            "info" => {
                names.insert(format!("{name}_info"));
            }
            other => panic!("metric {name}: type {other} not handled by this test"),
        }
    }
    names
}

fn exported() -> BTreeSet<String> {
    let mut registry = Registry::with_prefix("sluice");
    let release = sluice_operator::release::register(&mut registry);
    let inference = sluice_operator::inference::metrics::register(&mut registry);
    // prometheus-client encodes a labelled family only once it has a series: give each
    // one, through the calls the controllers make where they are public.
    release.set_phase("ns", "r", Phase::Progressing, Some(0));
    release.evaluation(&Evaluation {
        gate: "health",
        verdict: Verdict::Failed("x".into()),
        values: Default::default(),
    });
    release.drain_finished(&DrainRecord {
        state: "Completed".into(),
        ..Default::default()
    });
    release.aborted("GateFailed");
    release.set_routing(
        "ns",
        "r",
        Some(&sluice_operator::release::crd::TrafficRoutingStatus {
            canary_weight: Some(10),
            measured_canary_percent: Some(9.8),
            ..Default::default()
        }),
    );
    release.reconcile.error("api");
    inference.set_progress("ns", "s", 1, 2, 1);
    inference.replica_lost("ns", "s");
    inference.reconcile_error(&sluice_operator::inference::Error::Template("x".into()));
    inference.placement_failed(&sluice_placement::PlaceError::InvalidRequest("x".into()));
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    let mut names = sample_names(&text);
    let agent = {
        use sluice_agent::metrics::{CloseReason, DrainRefusal, Metrics};
        let m = Metrics::new();
        m.closed(CloseReason::Drain);
        m.upstream_error("connect");
        m.drain_refused(DrainRefusal::WrongToken);
        m.set_drain_duration("total", 1.0);
        sample_names(&m.render())
    };
    // Guard the derivation itself: a few names that docs/release.md and docs/agent.md list.
    for n in [
        "sluice_release_phase",
        "sluice_release_reconcile_errors_total",
        "sluice_release_drain_duration_seconds_bucket",
        "sluice_inference_serving_replicas",
    ] {
        assert!(names.contains(n), "operator registry lacks {n}: {names:?}");
    }
    for n in [
        "sluice_agent_connections_active",
        "sluice_agent_connections_accepted_total",
        "sluice_agent_request_duration_seconds_bucket",
    ] {
        assert!(agent.contains(n), "agent registry lacks {n}: {agent:?}");
    }
    names.extend(agent);
    names
}

/// Metric names in a PromQL expression: identifiers outside strings, label matchers
/// (`{…}`), range selectors (`[…]`) and the label lists of `by`/`without`/`on`/
/// `ignoring`/`group_left`/`group_right`, that are neither functions (followed by `(`)
/// nor keywords. `$variables` are skipped.
fn metric_names(expr: &str) -> Vec<String> {
    let b = expr.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    let mut label_list_next = false;
    while i < b.len() {
        let c = b[i];
        match c {
            b'"' | b'\'' | b'`' => {
                i += 1;
                while i < b.len() && b[i] != c {
                    if b[i] == b'\\' {
                        i += 1;
                    }
                    i += 1;
                }
                i += 1;
            }
            b'{' | b'[' => {
                let close = if c == b'{' { b'}' } else { b']' };
                while i < b.len() && b[i] != close {
                    if b[i] == b'"' {
                        i += 1;
                        while i < b.len() && b[i] != b'"' {
                            if b[i] == b'\\' {
                                i += 1;
                            }
                            i += 1;
                        }
                    }
                    i += 1;
                }
                i += 1;
            }
            b'(' if label_list_next => {
                label_list_next = false;
                while i < b.len() && b[i] != b')' {
                    i += 1;
                }
                i += 1;
            }
            b'$' => {
                i += 1;
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                    i += 1;
                }
            }
            b'0'..=b'9' | b'.' => {
                // A number (1e3, 0.95, 0x1f) or a duration: one token.
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'.') {
                    i += 1;
                }
            }
            c if c.is_ascii_alphabetic() || c == b'_' || c == b':' => {
                let start = i;
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_' || b[i] == b':')
                {
                    i += 1;
                }
                let word = &expr[start..i];
                let mut j = i;
                while j < b.len() && b[j] == b' ' {
                    j += 1;
                }
                let call = j < b.len() && b[j] == b'(';
                if matches!(
                    word,
                    "by" | "without" | "on" | "ignoring" | "group_left" | "group_right"
                ) {
                    label_list_next = true;
                } else if !call && !PROMQL_KEYWORDS.contains(&word) && !AGGREGATIONS.contains(&word)
                {
                    out.push(word.to_string());
                }
            }
            _ => i += 1,
        }
    }
    out
}

fn variables_in(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = s;
    while let Some(p) = rest.find('$') {
        rest = &rest[p + 1..];
        let rest2 = rest.strip_prefix('{').unwrap_or(rest);
        let name: String = rest2
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if !name.is_empty() {
            out.push(name);
        }
    }
    out
}

/// Every panel, rows' nested panels included.
fn all_panels(d: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for p in d["panels"].as_array().expect("panels") {
        out.push(p);
        if let Some(nested) = p.get("panels").and_then(Value::as_array) {
            out.extend(nested);
        }
    }
    out
}

#[test]
fn the_promql_parser_finds_metric_names() {
    assert_eq!(
        metric_names(
            r#"histogram_quantile(0.99, sum by (le, namespace) (rate(sluice_agent_request_duration_seconds_bucket{job=~"$agent_job", code=~"5.."}[$__rate_interval])))"#
        ),
        vec!["sluice_agent_request_duration_seconds_bucket"]
    );
    assert_eq!(
        metric_names(
            r#"a{x="}"} * on (namespace, pod) group_left () (b > 0) / ignoring(le) c offset 5m or up == 1e3"#
        ),
        vec!["a", "b", "c", "up"]
    );
    assert_eq!(
        metric_names("count by (job) (up == 0) + max without (pod) (m2)"),
        vec!["up", "m2"]
    );
}

#[test]
fn dashboard_structure_is_what_grafana_needs() {
    let d = dashboard();
    assert!(d["title"].is_string() && d["uid"].is_string());
    let schema = d["schemaVersion"].as_i64().expect("schemaVersion");
    assert!(
        schema >= 36,
        "schemaVersion {schema}: too old for datasource variables in panels"
    );

    let vars: Vec<&Value> = d["templating"]["list"]
        .as_array()
        .expect("templating.list")
        .iter()
        .collect();
    let var_names: BTreeSet<&str> = vars
        .iter()
        .map(|v| v["name"].as_str().expect("variable name"))
        .collect();
    assert_eq!(var_names.len(), vars.len(), "duplicate template variable");
    for v in ["datasource", "namespace", "release"] {
        assert!(var_names.contains(v), "no template variable {v}");
    }
    assert!(
        vars.iter().any(|v| v["name"] == "datasource"
            && v["type"] == "datasource"
            && v["query"] == "prometheus"),
        "the datasource variable must be a Prometheus datasource variable"
    );
    let known = |name: &str| var_names.contains(name) || BUILTIN_VARS.contains(&name);

    let mut ids = BTreeSet::new();
    let mut failures = Vec::new();
    let panels = all_panels(&d);
    assert!(panels.len() > 10);
    for p in &panels {
        let title = p["title"].as_str().unwrap_or("(untitled)");
        let Some(id) = p["id"].as_i64() else {
            failures.push(format!("panel {title:?}: no numeric id"));
            continue;
        };
        if !ids.insert(id) {
            failures.push(format!("panel {title:?}: id {id} used twice"));
        }
        let g = &p["gridPos"];
        let dims: Vec<Option<i64>> = ["h", "w", "x", "y"]
            .iter()
            .map(|k| g[*k].as_i64())
            .collect();
        match dims[..] {
            [Some(h), Some(w), Some(x), Some(_y)] if h > 0 && w > 0 && x >= 0 && x + w <= 24 => {}
            _ => failures.push(format!("panel {title:?}: bad gridPos {g}")),
        }
        if p["type"] == "row" {
            continue;
        }
        if p["datasource"]["uid"] != "${datasource}" {
            failures.push(format!(
                "panel {title:?}: datasource is not ${{datasource}}"
            ));
        }
        let targets = p["targets"].as_array().cloned().unwrap_or_default();
        if targets.is_empty() {
            failures.push(format!("panel {title:?}: no targets"));
        }
        let mut ref_ids = BTreeSet::new();
        for t in &targets {
            let Some(r) = t["refId"].as_str().filter(|r| !r.is_empty()) else {
                failures.push(format!("panel {title:?}: a target without refId"));
                continue;
            };
            if !ref_ids.insert(r.to_string()) {
                failures.push(format!("panel {title:?}: refId {r} used twice"));
            }
            let Some(expr) = t["expr"].as_str().filter(|e| !e.trim().is_empty()) else {
                failures.push(format!("panel {title:?} {r}: no expr"));
                continue;
            };
            for v in variables_in(expr) {
                if !known(&v) {
                    failures.push(format!("panel {title:?} {r}: ${v} is no template variable"));
                }
            }
        }
    }
    for v in &vars {
        if let Some(q) = v["definition"].as_str() {
            for name in variables_in(q) {
                if !known(&name) {
                    failures.push(format!(
                        "variable {}: ${name} is no template variable",
                        v["name"]
                    ));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn dashboard_names_only_exported_metrics() {
    let d = dashboard();
    let exported = exported();
    let mut used = BTreeSet::new();
    let mut failures = Vec::new();
    let mut check = |what: String, expr: &str| {
        for name in metric_names(expr) {
            if !exported.contains(&name) && !PROMETHEUS_SERIES.contains(&name.as_str()) {
                failures.push(format!(
                    "{what}: {name} is exported by neither the operator nor the agent"
                ));
            }
            used.insert(name);
        }
    };
    for p in all_panels(&d) {
        for t in p["targets"].as_array().cloned().unwrap_or_default() {
            if let Some(expr) = t["expr"].as_str() {
                check(format!("panel {:?} {}", p["title"], t["refId"]), expr);
            }
        }
    }
    for v in d["templating"]["list"].as_array().unwrap() {
        if v["type"] != "query" {
            continue;
        }
        let q = v["definition"].as_str().expect("query variable definition");
        // label_values(metric{…}, label): the metric is the first argument.
        let inner = q
            .strip_prefix("label_values(")
            .and_then(|s| s.rsplit_once(','))
            .map(|(m, _)| m)
            .unwrap_or_else(|| {
                panic!(
                    "variable {}: only label_values(metric, label) is checked",
                    v["name"]
                )
            });
        check(format!("variable {}", v["name"]), inner);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(
        used.len() > 20,
        "the dashboard names only {} metrics",
        used.len()
    );
}
