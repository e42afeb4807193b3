use std::io;

use super::cli::parse_url;
use super::*;

#[test]
fn io_errors_classify_by_phase() {
    use io::ErrorKind as K;
    assert_eq!(
        classify_io(Phase::Connect, K::ConnectionRefused),
        Outcome::Refused
    );
    assert_eq!(classify_io(Phase::Connect, K::TimedOut), Outcome::Timeout);
    assert_eq!(
        classify_io(Phase::Connect, K::ConnectionReset),
        Outcome::Reset
    );
    assert_eq!(classify_io(Phase::Head, K::ConnectionReset), Outcome::Reset);
    assert_eq!(classify_io(Phase::Head, K::UnexpectedEof), Outcome::Reset);
    assert_eq!(
        classify_io(Phase::Body, K::UnexpectedEof),
        Outcome::Truncated
    );
    assert_eq!(classify_io(Phase::Body, K::TimedOut), Outcome::Timeout);
}

#[test]
fn statuses_classify() {
    assert_eq!(classify_status(200), Outcome::Ok);
    assert_eq!(classify_status(404), Outcome::Ok);
    assert_eq!(classify_status(500), Outcome::Status5xx);
    assert_eq!(classify_status(503), Outcome::Status5xx);
}

#[test]
fn outcome_serialises_as_issue_names() {
    assert_eq!(
        serde_json::to_string(&Outcome::Status5xx).unwrap(),
        "\"5xx\""
    );
    assert_eq!(
        serde_json::to_string(&Outcome::Refused).unwrap(),
        "\"refused\""
    );
}

#[test]
fn percentile_nearest_rank() {
    let v: Vec<f64> = (1..=100).map(f64::from).collect();
    assert_eq!(percentile(&v, 0.5), 50.0);
    assert_eq!(percentile(&v, 0.99), 99.0);
    assert_eq!(percentile(&v, 1.0), 100.0);
    assert_eq!(percentile(&[], 0.99), 0.0);
    assert_eq!(percentile(&[7.0], 0.01), 7.0);
}

fn req(sched: f64, end: f64, outcome: Outcome, pod: &str) -> RequestRecord {
    RequestRecord {
        scheduled_ms: sched,
        start_ms: sched,
        end_ms: end,
        outcome,
        pod: Some(pod.into()),
        conn: 1,
        detail: None,
    }
}

#[test]
fn series_bins_requests_errors_and_connections() {
    let requests = vec![
        req(100.0, 110.0, Outcome::Ok, "a"),
        req(900.0, 1100.0, Outcome::Reset, "a"),
        req(1500.0, 1600.0, Outcome::Ok, "b"),
    ];
    let conns = vec![
        ConnRecord {
            id: 1,
            open_ms: 50.0,
            close_ms: 2500.0,
            closed_by: ClosedBy::Server,
            pod: Some("a".into()),
            requests: 2,
        },
        ConnRecord {
            id: 2,
            open_ms: 1200.0,
            close_ms: 3000.0,
            closed_by: ClosedBy::Client,
            pod: Some("b".into()),
            requests: 1,
        },
    ];
    let s = time_series(&requests, &conns, 3000.0);
    assert_eq!(s.len(), 3);
    assert_eq!(s[0].requests, 1);
    assert_eq!(s[1].requests, 2);
    assert_eq!(s[1].error_count(), 1);
    assert_eq!(s[0].new_conns.get("a"), Some(&1));
    assert_eq!(s[1].new_conns.get("b"), Some(&1));
    assert_eq!(s[0].open_conns.get("a"), Some(&1));
    assert_eq!(s[1].open_conns.get("a"), Some(&1));
    assert_eq!(s[1].open_conns.get("b"), Some(&1));
    assert_eq!(s[2].open_conns.get("a"), None);
}

#[test]
fn urls_parse_to_addresses() {
    let (a, p) = parse_url("http://127.1.2.3:8080/x?y=1").unwrap();
    assert_eq!(a, "127.1.2.3:8080".parse().unwrap());
    assert_eq!(p, "/x?y=1");
    assert!(parse_url("http://example.com/").is_err());
    assert!(parse_url("https://127.0.0.1/").is_err());
}
