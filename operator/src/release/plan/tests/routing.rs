//! Traffic routing: weights on Gateway API routes, bounded by the pods that carry them.

use super::*;

const ROUTED: &str = r#"
workloadRef: {name: echo}
trafficRouting:
  service: echo
  gatewayAPI: {httpRoutes: [{name: web}]}
steps:
  - setWeight: 1
  - pause: {duration: 3s}
  - setWeight: 10
  - pause: {duration: 3s}
  - setWeight: 50
  - pause: {duration: 3s}
"#;

fn routed(spec: &str, n: i32) -> Sim {
    let mut sim = Sim::new(spec, n);
    sim.router = Some(FakeRouter::new());
    sim.settle();
    // Before the takeover the stable Service had no endpoints yet (the docs say to point
    // routes at it once the Release has taken over).
    sim.router.as_mut().unwrap().empty_backends.clear();
    sim
}

fn router(sim: &Sim) -> &FakeRouter {
    sim.router.as_ref().unwrap()
}

#[test]
fn takeover_makes_both_services_select_stable_with_the_canary_at_zero() {
    let sim = routed(ROUTED, 4);
    let r = router(&sim);
    // The canary's backendRef was added, at 0%.
    assert_eq!(r.weights, vec![0]);
    assert_eq!(r.stable, Some(Some("v1".into())));
    assert_eq!(r.canary, Some(Some("v1".into())));
    assert_eq!(r.weight, 0);
    let st = sim.status.traffic_routing.clone().unwrap();
    assert_eq!(st.canary_weight, Some(0));
    assert_eq!(st.stable_selects.as_deref(), Some("v1"));
}

#[test]
fn a_routed_release_walks_the_weights_and_never_weights_an_empty_backend() {
    let mut sim = routed(ROUTED, 4);
    sim.new_template("v2");
    sim.run_until(400, |s| {
        s.phase() == Phase::Completed
            && s.status.stable_revision.as_deref() == Some("v2")
            && s.router.as_ref().unwrap().weight == 0
    });
    for _ in 0..3 {
        sim.round();
    }
    let r = router(&sim).clone();
    eprintln!("weights written: {:?}", r.weights);
    assert!(r.empty_backends.is_empty(), "{:?}", r.empty_backends);
    // Every step's weight was on the routes, in order, up to 100%; then stable took it
    // all back once the stable Service selected the new revision.
    for w in [1, 10, 50, 100] {
        assert!(
            r.weights.contains(&w),
            "weight {w} never set: {:?}",
            r.weights
        );
    }
    let up: Vec<i32> = r.weights[..r.weights.len() - 1].to_vec();
    assert!(up.windows(2).all(|p| p[0] < p[1]), "{:?}", r.weights);
    assert_eq!(r.weights.last(), Some(&0));
    assert_eq!(r.stable, Some(Some("v2".into())));
    assert_eq!(r.canary, Some(Some("v2".into())));
    assert_eq!(sim.pods_of("v1"), 0);
    sim.assert_lossless(4);
    assert!(sim.has_event("TrafficShifted"));
}

#[test]
fn at_one_percent_stable_keeps_every_pod() {
    let mut sim = routed(ROUTED, 4);
    sim.new_template("v2");
    sim.run_until(100, |s| {
        s.router.as_ref().unwrap().weight == 1 && s.phase() == Phase::Paused
    });
    // Stable carries 99%: all four stay; the canary runs one more pod.
    assert_eq!(sim.serving(), 5);
    assert_eq!(sim.pods_of("v1"), 4);
    assert_eq!(sim.status.current_step, Some(1));
}

#[test]
fn an_abort_returns_the_traffic_gradually() {
    let mut sim = routed(ROUTED, 4);
    sim.new_template("v2");
    sim.run_until(300, |s| {
        s.router.as_ref().unwrap().weight == 50 && s.status.current_step == Some(5)
    });
    let before = router(&sim).weights.len();
    sim.abort = Some("stop".into());
    sim.run_until(200, |s| {
        s.phase() == Phase::Aborted
            && s.pods_of("v2") == 0
            && s.router.as_ref().unwrap().canary == Some(Some("v1".into()))
    });
    let r = router(&sim).clone();
    assert!(r.empty_backends.is_empty(), "{:?}", r.empty_backends);
    let down = &r.weights[before..];
    eprintln!("weights after the abort: {down:?}");
    assert!(down.windows(2).all(|p| p[0] > p[1]), "{down:?}");
    assert_eq!(down.last(), Some(&0));
    // Halved at most every ROLLBACK_DWELL, never faster than stable pods came up.
    assert_eq!(down, [25, 12, 6, 3, 0], "{down:?}");
    sim.assert_lossless(4);
}

#[test]
fn routes_that_cannot_be_read_hold_the_release_and_drain_nothing() {
    let mut sim = routed(ROUTED, 4);
    sim.router.as_mut().unwrap().broken = Some("HTTPRoute \"web\" not found".into());
    sim.new_template("v2");
    for _ in 0..30 {
        sim.round();
    }
    assert!(sim.drains_started.is_empty(), "{:?}", sim.drains_started);
    assert_eq!(sim.status.current_step, Some(0));
    let degraded = sim
        .status
        .conditions
        .iter()
        .find(|c| c.type_ == "Degraded")
        .unwrap();
    assert_eq!(degraded.status, "True");
    assert_eq!(degraded.reason, "RoutingBlocked");
    assert!(degraded.message.contains("not found"), "{degraded:?}");
    // Fixed: the release goes on.
    sim.router.as_mut().unwrap().broken = None;
    sim.run_until(400, |s| {
        s.phase() == Phase::Completed && s.status.stable_revision.as_deref() == Some("v2")
    });
}

const VERIFIED: &str = r#"
workloadRef: {name: echo}
trafficRouting:
  service: echo
  gatewayAPI: {httpRoutes: [{name: web}]}
  verify: {tolerance: 2, minRequests: 100, window: 5s}
steps:
  - setWeight: 10
  - pause: {duration: 1s}
"#;

#[test]
fn a_verified_step_waits_for_the_measured_split() {
    let mut sim = routed(VERIFIED, 4);
    sim.router.as_mut().unwrap().skew = 5.0;
    sim.new_template("v2");
    for _ in 0..40 {
        sim.round();
    }
    // The routes say 10%, the agents see 15%: the step does not count as reached.
    assert_eq!(router(&sim).weight, 10);
    assert_eq!(sim.status.current_step, Some(0));
    let st = sim.status.traffic_routing.clone().unwrap();
    assert_eq!(st.measured_canary_percent, Some(15.0));
    assert!(st.verified_weight.is_none());
    assert!(
        sim.status.message.as_deref().unwrap_or("").contains("15"),
        "{:?}",
        sim.status.message
    );
    // The data plane catches up: verified, and on.
    sim.router.as_mut().unwrap().skew = 1.0;
    sim.run_until(20, |s| s.status.current_step == Some(1));
    assert_eq!(
        sim.status.traffic_routing.clone().unwrap().verified_weight,
        Some(10)
    );
    assert!(sim.has_event("TrafficSplitVerified"));
}

#[test]
fn without_traffic_the_split_cannot_be_verified() {
    let mut sim = routed(VERIFIED, 4);
    sim.router.as_mut().unwrap().rps = 1.0;
    sim.new_template("v2");
    for _ in 0..40 {
        sim.round();
    }
    assert_eq!(sim.status.current_step, Some(0));
    assert!(
        sim.status
            .message
            .as_deref()
            .unwrap_or("")
            .contains("needed to verify"),
        "{:?}",
        sim.status.message
    );
}

#[test]
fn a_deleted_release_leaves_the_services_selecting_every_pod() {
    let mut sim = routed(ROUTED, 4);
    sim.new_template("v2");
    sim.run_until(300, |s| s.router.as_ref().unwrap().weight == 10);
    sim.deleting = true;
    sim.run_until(300, |s| !s.has_finalizer);
    let r = router(&sim).clone();
    assert_eq!(r.stable, Some(None));
    assert_eq!(r.canary, Some(None));
    assert_eq!(r.weight, 0);
}

#[test]
fn a_takeover_completes_before_the_route_exists() {
    let mut sim = Sim::new(ROUTED, 4);
    let mut r = FakeRouter::new();
    r.broken = Some("HTTPRoute \"web\" not found".into());
    sim.router = Some(r);
    sim.run_until(100, |s| s.phase() == Phase::Completed || s.serving() == 4);
    assert_eq!(sim.serving(), 4, "{:#?}", sim.status);
}

#[test]
fn an_abort_with_every_stable_pod_up_still_halves_the_weight_step_by_step() {
    // Surge for all four stable pods at once: stable could take everything back in one
    // move, and still the canary's share halves every ROLLBACK_DWELL.
    let spec = format!("{ROUTED}maxSurge: 100%\n");
    let mut sim = routed(&spec, 4);
    sim.new_template("v2");
    sim.run_until(300, |s| {
        s.router.as_ref().unwrap().weight == 50 && s.status.current_step == Some(5)
    });
    let before = router(&sim).weights.len();
    sim.abort = Some("stop".into());
    sim.run_until(200, |s| s.phase() == Phase::Aborted && s.pods_of("v2") == 0);
    let r = router(&sim).clone();
    let down = &r.weights[before..];
    assert_eq!(down, [25, 12, 6, 3, 0], "{down:?}");
    assert!(r.empty_backends.is_empty(), "{:?}", r.empty_backends);
    sim.assert_lossless(4);
}

const HEADERS: &str = r#"
workloadRef: {name: echo}
trafficRouting:
  service: echo
  gatewayAPI: {httpRoutes: [{name: web}]}
steps:
  - setHeaderRoute: {match: [{name: x-canary, value: "yes"}]}
  - pause: {duration: 3s}
  - setWeight: 50
  - pause: {}
"#;

#[test]
fn a_header_route_step_sends_matching_requests_to_one_canary_pod_at_weight_zero() {
    let mut sim = routed(HEADERS, 4);
    sim.new_template("v2");
    sim.run_until(60, |s| s.status.current_step == Some(1));
    let r = router(&sim).clone();
    assert_eq!(r.headers.len(), 1);
    assert_eq!(r.headers[0].name, "x-canary");
    assert_eq!(r.weight, 0);
    assert_eq!(r.canary, Some(Some("v2".into())));
    assert_eq!(sim.pods_of("v2"), 1);
    assert!(sim.has_event("HeaderRouteSet"));
    // Still there at 50%; gone on completion, and nothing was ever routed to no endpoint.
    sim.run_until(100, |s| {
        s.phase() == Phase::Paused && s.status.current_step == Some(3)
    });
    assert_eq!(router(&sim).headers.len(), 1);
    sim.promote = Some("go".into());
    sim.run_until(300, |s| {
        s.phase() == Phase::Completed && s.status.stable_revision.as_deref() == Some("v2")
    });
    let r = router(&sim).clone();
    assert!(r.headers.is_empty());
    assert!(r.empty_backends.is_empty(), "{:?}", r.empty_backends);
    sim.assert_lossless(4);
}

#[test]
fn an_abort_removes_the_header_route_before_the_canary_drains() {
    let mut sim = routed(HEADERS, 4);
    sim.new_template("v2");
    sim.run_until(60, |s| s.status.current_step == Some(1));
    sim.abort = Some("stop".into());
    sim.run_until(100, |s| s.phase() == Phase::Aborted && s.pods_of("v2") == 0);
    let r = router(&sim).clone();
    assert!(r.headers.is_empty());
    assert!(r.empty_backends.is_empty(), "{:?}", r.empty_backends);
    sim.assert_lossless(4);
}
