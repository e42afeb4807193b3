//! Unit tests of the run state machine (`run.rs`).

use super::*;
use crate::analysis::model::{Condition, Judge, MetricCheck, TemplateContext};
use chrono::TimeZone;

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2025, 1, 1, 0, 0, 0)
        .single()
        .expect("valid time")
}

fn secs(n: i64) -> chrono::TimeDelta {
    chrono::TimeDelta::seconds(n)
}

fn check(name: &str, success: &str) -> MetricCheck {
    let mut c = MetricCheck::new(
        name,
        PrometheusSource {
            address: "http://127.0.0.1:9090".into(),
            timeout: Duration::from_secs(5),
            headers: vec![],
        },
        "sum(up{namespace=\"{{ namespace }}\"})",
        Judge::Conditions {
            success: Some(Condition::parse(success).expect("parses")),
            failure: None,
        },
    );
    c.interval = Some(Duration::from_secs(10));
    c.count = Some(3);
    c
}

fn start(checks: &[MetricCheck]) -> AnalysisStatus {
    let ctx = TemplateContext::for_release("r", "shop", "web", "web", "c1", "s1");
    AnalysisStatus::start(checks, &ctx, t0()).expect("starts")
}

/// Takes every due measurement at `at`, each returning `value`.
fn measure(s: &mut AnalysisStatus, checks: &[MetricCheck], at: DateTime<Utc>, value: f64) {
    for d in s.due(checks, at) {
        s.record(checks, d.metric, at, Ok(vec![value]));
    }
}

#[test]
fn all_good_measurements_succeed_after_count() {
    let checks = [check("rate", "result[0] >= 0.95")];
    let mut s = start(&checks);
    assert_eq!(s.metrics[0].query, "sum(up{namespace=\"shop\"})");
    assert_eq!(s.next_due(&checks, t0()), Some(Duration::ZERO));
    for i in 0..3 {
        assert_eq!(s.verdict, Verdict::Running);
        measure(&mut s, &checks, t0() + secs(10 * i), 0.99);
    }
    assert_eq!(s.verdict, Verdict::Successful);
    assert_eq!(s.metrics[0].count, 3);
    assert_eq!(s.metrics[0].phase, MetricPhase::Successful);
    assert_eq!(s.next_due(&checks, t0() + secs(30)), None);
    assert!(s.due(&checks, t0() + secs(100)).is_empty());
}

#[test]
fn measurements_wait_for_the_interval() {
    let checks = [check("rate", "result[0] >= 0.95")];
    let mut s = start(&checks);
    measure(&mut s, &checks, t0(), 0.99);
    assert!(s.due(&checks, t0() + secs(9)).is_empty());
    assert_eq!(
        s.next_due(&checks, t0() + secs(4)),
        Some(Duration::from_secs(6))
    );
    assert_eq!(s.due(&checks, t0() + secs(10)).len(), 1);
    // Late reconciles still take one measurement, not a backlog.
    measure(&mut s, &checks, t0() + secs(100), 0.99);
    assert_eq!(s.metrics[0].count, 2);
}

#[test]
fn initial_delay_postpones_the_first_measurement() {
    let mut c = check("rate", "result[0] >= 0.95");
    c.initial_delay = Duration::from_secs(60);
    let checks = [c];
    let s = start(&checks);
    assert!(s.due(&checks, t0() + secs(59)).is_empty());
    assert_eq!(s.next_due(&checks, t0()), Some(Duration::from_secs(60)));
    assert_eq!(s.due(&checks, t0() + secs(60)).len(), 1);
}

#[test]
fn failures_beyond_the_limit_fail_the_run() {
    let mut c = check("rate", "result[0] >= 0.95");
    c.failure_limit = 1;
    c.count = Some(5);
    let checks = [c];
    let mut s = start(&checks);
    measure(&mut s, &checks, t0(), 0.5);
    assert_eq!(
        s.verdict,
        Verdict::Running,
        "1 failure is within failureLimit 1"
    );
    measure(&mut s, &checks, t0() + secs(10), 0.99);
    measure(&mut s, &checks, t0() + secs(20), 0.5);
    assert_eq!(s.verdict, Verdict::Failed);
    assert_eq!(s.metrics[0].phase, MetricPhase::Failed);
    assert!(
        s.message
            .as_deref()
            .unwrap_or("")
            .contains("failureLimit 1")
    );
    assert_eq!(s.next_due(&checks, t0() + secs(20)), None);
}

#[test]
fn default_failure_limit_fails_on_first_failure() {
    let checks = [check("rate", "result[0] >= 0.95")];
    let mut s = start(&checks);
    measure(&mut s, &checks, t0(), 0.5);
    assert_eq!(s.verdict, Verdict::Failed);
}

#[test]
fn failures_within_the_limit_still_succeed_at_count() {
    let mut c = check("rate", "result[0] >= 0.95");
    c.failure_limit = 2;
    let checks = [c];
    let mut s = start(&checks);
    for (i, v) in [0.5, 0.5, 0.99].into_iter().enumerate() {
        measure(&mut s, &checks, t0() + secs(10 * i as i64), v);
    }
    assert_eq!(s.verdict, Verdict::Successful);
    assert_eq!((s.metrics[0].failed, s.metrics[0].successful), (2, 1));
}

#[test]
fn inconclusive_beyond_the_limit_is_inconclusive() {
    let mut c = check("rate", "result[0] >= 0.95");
    c.judge = Judge::Conditions {
        success: Some(Condition::parse("result[0] >= 0.95").expect("parses")),
        failure: Some(Condition::parse("result[0] < 0.5").expect("parses")),
    };
    c.inconclusive_limit = 1;
    let checks = [c];
    let mut s = start(&checks);
    measure(&mut s, &checks, t0(), 0.7);
    assert_eq!(s.verdict, Verdict::Running);
    measure(&mut s, &checks, t0() + secs(10), 0.7);
    assert_eq!(s.verdict, Verdict::Inconclusive);
    assert_eq!(s.metrics[0].phase, MetricPhase::Inconclusive);
}

#[test]
fn consecutive_errors_beyond_the_limit_fail_and_successes_reset_them() {
    let mut c = check("rate", "result[0] >= 0.95");
    c.consecutive_error_limit = 2;
    c.count = Some(10);
    let checks = [c];
    let mut s = start(&checks);
    let mut at = t0();
    for _ in 0..2 {
        s.record(&checks, 0, at, Err("connection refused".into()));
        at += secs(10);
    }
    measure(&mut s, &checks, at, 0.99);
    assert_eq!(s.metrics[0].consecutive_error, 0);
    assert_eq!(s.metrics[0].error, 2);
    assert_eq!(s.metrics[0].count, 1, "errors do not count as measurements");
    for _ in 0..3 {
        at += secs(10);
        assert_eq!(s.verdict, Verdict::Running);
        s.record(&checks, 0, at, Err("timeout".into()));
    }
    assert_eq!(s.metrics[0].phase, MetricPhase::Error);
    assert_eq!(s.verdict, Verdict::Failed);
    assert!(
        s.metrics[0]
            .message
            .as_deref()
            .unwrap_or("")
            .contains("timeout")
    );
}

#[test]
fn an_unevaluable_result_is_an_error_measurement() {
    let checks = [check("rate", "result[0] >= 0.95")];
    let mut s = start(&checks);
    s.record(&checks, 0, t0(), Ok(vec![]));
    let m = &s.metrics[0].measurements[0];
    assert_eq!(m.phase, MeasurementPhase::Error);
    assert_eq!(m.value.as_deref(), Some("[]"));
    assert!(m.message.as_deref().unwrap_or("").contains("out of range"));
    assert_eq!(s.verdict, Verdict::Running);
}

#[test]
fn error_without_interval_retries_after_a_pause() {
    let mut c = check("once", "result[0] >= 0.95");
    c.interval = None;
    c.count = None;
    let checks = [c];
    let mut s = start(&checks);
    s.record(&checks, 0, t0(), Err("refused".into()));
    assert_eq!(s.next_due(&checks, t0()), Some(ERROR_RETRY));
    measure(&mut s, &checks, t0() + secs(10), 0.99);
    assert_eq!(s.verdict, Verdict::Successful);
}

#[test]
fn dry_run_checks_are_reported_but_never_fail_the_run() {
    let mut dry = check("latency", "result[0] < 0.5");
    dry.dry_run = true;
    let checks = [check("rate", "result[0] >= 0.95"), dry];
    let mut s = start(&checks);
    s.record(&checks, 1, t0(), Ok(vec![3.0]));
    assert_eq!(s.metrics[1].phase, MetricPhase::Failed);
    assert_eq!(s.verdict, Verdict::Running);
    for i in 0..3 {
        s.record(&checks, 0, t0() + secs(10 * i), Ok(vec![0.99]));
    }
    assert_eq!(s.verdict, Verdict::Successful);
    assert!(
        s.message
            .as_deref()
            .unwrap_or("")
            .contains("dry-run latency: Failed")
    );
}

#[test]
fn one_failed_check_ends_the_others() {
    let mut forever = check("forever", "result[0] >= 0");
    forever.count = None;
    let checks = [check("rate", "result[0] >= 0.95"), forever];
    let mut s = start(&checks);
    s.record(&checks, 1, t0(), Ok(vec![1.0]));
    s.record(&checks, 0, t0(), Ok(vec![0.1]));
    assert_eq!(s.verdict, Verdict::Failed);
    assert_eq!(s.metrics[1].phase, MetricPhase::Successful);
    assert!(s.due(&checks, t0() + secs(60)).is_empty());
    // A late outcome does not change a finished run.
    s.record(&checks, 0, t0() + secs(10), Ok(vec![0.99]));
    assert_eq!(s.metrics[0].count, 1);
}

#[test]
fn unbounded_checks_run_until_terminated() {
    let mut c = check("forever", "result[0] >= 0.95");
    c.count = None;
    let checks = [c, check("unmeasured", "result[0] >= 0")];
    let mut s = start(&checks);
    for i in 0..50 {
        s.record(&checks, 0, t0() + secs(10 * i), Ok(vec![0.99]));
    }
    assert_eq!(s.verdict, Verdict::Running);
    assert_eq!(s.metrics[0].measurements.len(), KEPT_MEASUREMENTS);
    assert_eq!(s.metrics[0].count, 50);
    s.terminate(&checks);
    assert_eq!(s.verdict, Verdict::Successful);
    assert_eq!(s.metrics[1].phase, MetricPhase::Successful);
    assert!(s.terminated);
}

#[test]
fn no_checks_succeed_at_once() {
    let s = start(&[]);
    assert_eq!(s.verdict, Verdict::Successful);
    assert_eq!(s.next_due(&[], t0()), None);
}

#[test]
fn start_rejects_bad_analyses() {
    let ctx = TemplateContext::default();
    let c = check("a", "result[0] > 0");
    let e = AnalysisStatus::start(&[c.clone(), c.clone()], &ctx, t0()).expect_err("dup");
    assert!(e.to_string().contains("two metrics named a"));
    let mut missing = c.clone();
    missing.query = "x{{args.who}}".into();
    assert!(matches!(
        AnalysisStatus::start(&[missing], &ctx, t0()),
        Err(StartError::Template(_))
    ));
    let mut bad = c.clone();
    bad.count = Some(0);
    assert!(matches!(
        AnalysisStatus::start(&[bad], &ctx, t0()),
        Err(StartError::Invalid(_))
    ));
    let many: Vec<MetricCheck> = (0..=MAX_CHECKS)
        .map(|i| check(&format!("m{i}"), "true"))
        .collect();
    assert!(AnalysisStatus::start(&many, &ctx, t0()).is_err());
}

#[test]
fn a_check_removed_from_the_spec_is_not_judged() {
    let checks = [check("a", "result[0] > 0"), check("b", "result[0] > 0")];
    let mut s = start(&checks);
    let only_a = [checks[0].clone()];
    for i in 0..3 {
        measure(&mut s, &only_a, t0() + secs(10 * i), 1.0);
    }
    assert_eq!(s.verdict, Verdict::Successful);
    s.record(&only_a, 1, t0(), Ok(vec![-1.0]));
    assert_eq!(s.metrics[1].count, 0);
}

#[test]
fn status_round_trips_through_json_with_nan() {
    let checks = [check("rate", "isNaN(result[0]) || result[0] > 0")];
    let mut s = start(&checks);
    s.record(&checks, 0, t0(), Ok(vec![f64::NAN, f64::INFINITY, 0.25]));
    let json = serde_json::to_string(&s).expect("serializes");
    assert!(json.contains("\"value\":\"[NaN, +Inf, 0.25]\""), "{json}");
    assert!(
        json.contains("\"startedAt\":\"2025-01-01T00:00:00Z\""),
        "{json}"
    );
    let back: AnalysisStatus = serde_json::from_str(&json).expect("deserializes");
    assert_eq!(back, s);
}

#[test]
fn values_are_formatted_for_status() {
    assert_eq!(format_values(&[]), "[]");
    assert_eq!(format_values(&[1.0, f64::NEG_INFINITY]), "[1, -Inf]");
    let many: Vec<f64> = (0..12).map(f64::from).collect();
    assert!(format_values(&many).ends_with("… 2 more]"));
}
