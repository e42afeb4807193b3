use std::collections::{BTreeMap, BTreeSet};

use super::*;
use crate::load::{self, ClosedBy, ConnRecord, Outcome, RequestRecord};

fn conn(id: u64, pod: &str, open_ms: f64) -> ConnRecord {
    ConnRecord {
        id,
        open_ms,
        close_ms: open_ms + 1.0,
        closed_by: ClosedBy::Client,
        pod: Some(pod.into()),
        requests: 1,
    }
}

#[test]
fn storm_factor_of_a_burst_is_its_size_over_the_capacity() {
    let new: BTreeSet<String> = ["n1".to_string(), "n2".to_string()].into();
    // 40 connections inside one second of a 10 s window; two pods taking 5/s each.
    let conns: Vec<_> = (0..40)
        .map(|i| {
            conn(
                i,
                if i % 2 == 0 { "n1" } else { "n2" },
                3000.0 + f64::from(i as u32) * 10.0,
            )
        })
        .collect();
    let s = storm_factor(&conns, &new, (0.0, 10_000.0), 5.0);
    assert_eq!(s.peak_per_s, 40.0);
    assert_eq!(s.capacity_per_s, 10.0);
    assert_eq!(s.connections, 40);
    assert!((s.factor - 4.0).abs() < 1e-9);
    assert_eq!(s.pod_peak_per_s, 20.0);
    assert!(s.pod.is_some());
}

#[test]
fn storm_factor_of_paced_arrival_stays_within_capacity_and_ignores_old_pods() {
    let new: BTreeSet<String> = ["n1".to_string(), "n2".to_string()].into();
    // 8 per second for 10 s, alternating pods: 80 % of 2 × 5/s.
    let mut conns: Vec<_> = (0..80)
        .map(|i| {
            let pod = if i % 2 == 0 { "n1" } else { "n2" };
            conn(i, pod, f64::from(i as u32) * 125.0 + 1.0)
        })
        .collect();
    // An old pod's burst and connections outside the window do not count.
    conns.extend((0..50).map(|i| conn(100 + i, "old", 2000.0)));
    conns.extend((0..30).map(|i| conn(200 + i, "n2", 20_000.0)));
    let s = storm_factor(&conns, &new, (0.0, 10_000.0), 5.0);
    assert_eq!(s.connections, 80);
    assert_eq!(s.peak_per_s, 8.0);
    assert!((s.factor - 0.8).abs() < 1e-9);
    assert_eq!(s.pod_peak_per_s, 4.0);
    let none = storm_factor(&[], &new, (0.0, 10_000.0), 5.0);
    assert_eq!(none.factor, 0.0);
    assert_eq!(none.pod, None);
}

#[test]
fn baselines_shape_the_workload() {
    let spec = RunSpec::default();
    let mut d = echo_deployment(APP, &spec, "sluice/echo:v1");
    b2().shape(&mut d);
    let c = &d
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap()
        .containers[0];
    assert!(
        c.args
            .as_ref()
            .unwrap()
            .windows(2)
            .any(|w| w == ["--on-sigterm", "graceful"])
    );
    let pre_stop = c.lifecycle.as_ref().unwrap().pre_stop.as_ref().unwrap();
    assert_eq!(pre_stop.sleep.as_ref().unwrap().seconds, 15);
    let mut d = echo_deployment(APP, &spec, "sluice/echo:v1");
    b1().shape(&mut d);
    let c = &d
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap()
        .containers[0];
    assert!(c.lifecycle.is_none());
    assert!(
        c.args
            .as_ref()
            .unwrap()
            .windows(2)
            .any(|w| w == ["--on-sigterm", "exit"])
    );
    assert!(strategies_for("baselines").unwrap().len() == 2);
    assert!(strategies_for("nope").is_err());
}

#[test]
fn p99_only_counts_the_window() {
    let reqs: Vec<RequestRecord> = (0..200)
        .map(|i| RequestRecord {
            scheduled_ms: f64::from(i) * 10.0,
            start_ms: f64::from(i) * 10.0,
            end_ms: f64::from(i) * 10.0 + if i >= 100 { 50.0 } else { 1.0 },
            outcome: Outcome::Ok,
            pod: None,
            conn: 1,
            detail: None,
        })
        .collect();
    assert!((p99_between(&reqs, 0.0, 1000.0) - 1.0).abs() < 1e-6);
    assert!((p99_between(&reqs, 1000.0, 2000.0) - 50.0).abs() < 1e-6);
}

#[test]
fn svg_renders_every_run() {
    let run = RunResult {
        strategy: "B1".into(),
        description: "x < y".into(),
        delay_s: 0.0,
        spec: RunSpec::default(),
        namespace: "ns".into(),
        requests: 10,
        failed: 1,
        by_outcome: BTreeMap::new(),
        achieved_rps: 9.0,
        release_s: 1.0,
        release_start_s: 1.0,
        release_end_s: 2.0,
        p99_steady_ms: 1.0,
        p99_release_ms: 2.0,
        tail: crate::tail::TailBreakdown::default(),
        cpu_s: BTreeMap::from([("operator".to_string(), 1.5)]),
        cpu_wait_s: BTreeMap::new(),
        cpu_series: Vec::new(),
        cpu_top_other: Vec::new(),
        api_requests: BTreeMap::new(),
        storm: Storm::default(),
        connections_opened: 2,
        closed_by_server: 1,
        old_pods: vec!["a".into()],
        new_pods: vec!["b".into()],
        series: vec![load::Bin::default(); 3],
    };
    let report = Report {
        generated_unix_ms: 0,
        cpus: 2,
        runs: vec![run.clone(), run],
    };
    let svg = render_svg(&report);
    assert!(svg.starts_with("<svg"));
    assert!(svg.trim_end().ends_with("</svg>"));
    assert_eq!(svg.matches("(propagation delay").count(), 2);
    assert!(svg.contains("x &lt; y"));
    assert!(report.table().contains("| B1 | 0 s |"));
    assert!(
        report.table().contains("| 1.5 / 0.0 / 0.0 / 1.5 |"),
        "{}",
        report.table()
    );
}
