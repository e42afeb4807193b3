use super::*;

#[test]
fn release_manifest_targets_the_deployment_by_its_named_port() {
    let r = Sluice::proxy().release_manifest("echo", 6, 5.0);
    assert_eq!(r["spec"]["workloadRef"]["name"], "echo");
    assert_eq!(r["spec"]["agent"]["mode"], "proxy");
    assert_eq!(r["spec"]["agent"]["port"], "http");
    assert_eq!(r["spec"]["replicas"], 6);
    let rb = Sluice::rollback(BadVersion::Slow(3)).release_manifest("echo", 6, 5.0);
    assert!(
        rb["spec"]["steps"]
            .as_array()
            .is_some_and(|s| !s.is_empty())
    );
    assert_eq!(
        Sluice::observe().release_manifest("e", 1, 5.0)["spec"]["agent"]["mode"],
        "observe"
    );
    for n in [
        "sluice",
        "sluice-observe",
        "sluice-rollback-5xx",
        "sluice-rollback-slow",
        "sluice-kill9",
    ] {
        assert!(strategy_by_name(n).is_some(), "{n}");
    }
    assert!(strategy_by_name("nope").is_none());
}
