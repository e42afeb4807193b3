use sluice_contract::ProxyLimits;

use super::*;
use crate::pod::agent_spec::*;
use crate::release::crd::*;

fn spec(yaml: &str) -> ReleaseSpec {
    serde_yaml::from_str(yaml).unwrap()
}

#[test]
fn defaults_fill_in() {
    let s = Settings::from_spec(&spec("workloadRef: {name: echo}"), "img").unwrap();
    assert_eq!(s.deployment, "echo");
    assert!(s.steps.is_empty());
    assert_eq!(s.drain.quiet_period, Duration::from_secs(2));
    assert_eq!(s.drain.propagation_timeout, Duration::from_secs(60));
    assert_eq!(s.drain.close_rate, 100);
    assert_eq!(s.drain.drain_timeout, Duration::from_secs(90));
    assert_eq!(s.agent.image, "img");
    assert_eq!(s.agent.mode, AgentMode::Proxy);
    assert_eq!(s.agent.admin_port, 9901);
    assert!(s.health.is_some());
    assert!(s.connection_rate.is_none());
    assert_eq!(s.surge(6), 2);
    assert_eq!(s.surge(1), 1);
}

#[test]
fn steps_resolve() {
    let s = Settings::from_spec(
            &spec(
                "workloadRef: {name: echo}\nsteps: [{setWeight: 10}, {pause: {}}, {pause: {duration: 1m}}, {gate: {duration: 30s}}]",
            ),
            "img",
        )
        .unwrap();
    assert_eq!(
        s.steps,
        vec![
            StepKind::SetWeight(10),
            StepKind::Pause(None),
            StepKind::Pause(Some(Duration::from_secs(60))),
            StepKind::Gate(Duration::from_secs(30)),
        ]
    );
}

#[test]
fn bad_specs_say_what_to_fix() {
    let cases = [
        (
            "workloadRef: {name: echo}\nsteps: [{setWeight: 50}, {setWeight: 20}]",
            "must not decrease",
        ),
        (
            "workloadRef: {name: echo}\nsteps: [{setWeight: 150}]",
            "between 0 and 100",
        ),
        (
            "workloadRef: {name: echo}\nsteps: [{setWeight: 5, pause: {}}]",
            "exactly one",
        ),
        (
            "workloadRef: {name: echo}\nsteps: [{gate: {duration: 5x}}]",
            "steps[0].gate.duration",
        ),
        (
            "workloadRef: {name: echo}\ndrain: {quietPeriod: soon}",
            "drain.quietPeriod",
        ),
        (
            "workloadRef: {name: echo}\ndrain: {closeRate: 0}",
            "closeRate",
        ),
        (
            "workloadRef: {name: echo, kind: StatefulSet}",
            "only apps/v1 Deployment",
        ),
        ("workloadRef: {name: echo}\nmaxSurge: 0", "maxSurge"),
        ("workloadRef: {name: echo}\nmaxSurge: 'x%'", "maxSurge"),
        (
            "workloadRef: {name: echo}\ngates: {connectionRate: {maxPerPod: 0}}",
            "maxPerPod",
        ),
        (
            "workloadRef: {name: echo}\ngates: {comparison: {failureLimit: 0}}",
            "comparison.failureLimit",
        ),
    ];
    for (y, want) in cases {
        let errs = Settings::from_spec(&spec(y), "img").unwrap_err();
        assert!(
            errs.iter().any(|e| e.contains(want)),
            "{y}: {errs:?} should mention {want}"
        );
    }
}

/// The admission rules' bounds hold in the controller too (objects stored before a
/// rule existed).
#[test]
fn bounds_and_cross_field_rules_say_what_to_fix() {
    let cases = [
        ("replicas: 200000", "replicas: must be between 1 and 100000"),
        (
            "maxSurge: 2147483647",
            "maxSurge: must be a number of pods between 1 and 100000",
        ),
        (
            "drain: {drainTimeout: 0s}",
            "drain.drainTimeout: must be longer than 0s",
        ),
        (
            "drain: {propagationTimeout: 2h, drainTimeout: 2h}",
            "drain.propagationTimeout: must be longer than 0s and at most 1h",
        ),
        (
            "drain: {quietPeriod: 90s}",
            "drain.quietPeriod (1m30s) must be shorter than drain.propagationTimeout (1m)",
        ),
        (
            "drain: {quietPeriod: 30s, propagationTimeout: 5m, drainTimeout: 20s}",
            "drain.quietPeriod (30s) must be shorter than drain.drainTimeout (20s)",
        ),
        (
            "progressDeadline: 48h",
            "progressDeadline: must be longer than 0s and at most 24h",
        ),
        (
            "steps: [{gate: {duration: 0s}}]",
            "steps[0].gate.duration: must be longer than 0s",
        ),
        (
            "gates: {comparison: {interval: 0s}}",
            "gates.comparison.interval: must be at least 1s and at most 10m",
        ),
        (
            "agent: {adminPort: 15101}",
            "agent.adminPort and agent.proxyPort are both 15101",
        ),
        (
            "agent: {port: 9901}",
            "agent.port 9901 is also agent.adminPort",
        ),
        (
            "agent: {port: 15101}",
            "agent.port 15101 is also agent.proxyPort",
        ),
        ("agent: {port: 0}", "agent.port: must be a port number"),
        (
            "agent: {limits: {maxConnections: 0}}",
            "agent.limits.maxConnections must be between 1 and 1000000",
        ),
        (
            "agent: {limits: {http2MaxConcurrentStreams: 20000}}",
            "agent.limits.http2MaxConcurrentStreams must be between 1 and 10000",
        ),
        (
            "agent: {limits: {headerReadTimeout: 0s}}",
            "agent.limits.headerReadTimeout must be longer than 0s",
        ),
        (
            "agent: {limits: {bodyTimeout: 25h}}",
            "agent.limits.bodyTimeout must be at most 24h",
        ),
        (
            "agent: {limits: {tcpKeepalive: 1x}}",
            "agent.limits.tcpKeepalive: \"1x\" is not a duration",
        ),
    ];
    for (extra, want) in cases {
        let errs = Settings::from_spec(
            &spec(&format!("workloadRef: {{name: echo}}\n{extra}")),
            "img",
        )
        .unwrap_err();
        assert!(
            errs.iter().any(|e| e.contains(want)),
            "{extra}: {errs:?} should mention {want}"
        );
    }
    // The e2e observe-mode shape: a drain shorter than the wait for quiet is fine.
    Settings::from_spec(
            &spec("workloadRef: {name: echo}\ndrain: {quietPeriod: 2s, propagationTimeout: 60s, drainTimeout: 30s}"),
            "img",
        )
        .unwrap();
    // Observe mode does not use the proxy port.
    Settings::from_spec(
        &spec("workloadRef: {name: echo}\nagent: {mode: observe, port: 15101}"),
        "img",
    )
    .unwrap();
}

#[test]
fn agent_limits_resolve_and_unset_ones_keep_the_agents_defaults() {
    let s = Settings::from_spec(&spec("workloadRef: {name: echo}"), "img").unwrap();
    assert_eq!(s.agent.limits, ProxyLimits::default());
    let s = Settings::from_spec(
            &spec("workloadRef: {name: echo}\nagent: {limits: {maxConnections: 20000, upstreamTimeout: 30s, bodyTimeout: 0s}}"),
            "img",
        )
        .unwrap();
    assert_eq!(
        s.agent.limits,
        ProxyLimits {
            max_connections: Some(20_000),
            upstream_timeout: Some(Duration::from_secs(30)),
            body_timeout: Some(Duration::ZERO),
            ..ProxyLimits::default()
        }
    );
}

#[test]
fn the_default_proxy_port_is_no_mesh_port() {
    let s = Settings::from_spec(&spec("workloadRef: {name: echo}"), "img").unwrap();
    assert_eq!(s.agent.proxy_port, 15101);
    let istio = 15000..=15090;
    let linkerd = 4140..=4191;
    for p in [s.agent.proxy_port, s.agent.admin_port] {
        assert!(!istio.contains(&p) && !linkerd.contains(&p), "{p}");
    }
}

#[test]
fn only_allowed_agent_images_run() {
    let policy = AgentImagePolicy {
        default_image: "ghcr.io/sluice-dev/sluice-agent:0.1.0".into(),
        allowed: vec![
            "registry.local/sluice-agent:debug".into(),
            "ghcr.io/sluice-dev/sluice-agent:*".into(),
        ],
    };
    let with = |image: &str| {
        Settings::from_spec_with(
            &spec(&format!(
                "workloadRef: {{name: echo}}\nagent: {{image: {image:?}}}"
            )),
            &policy,
        )
    };
    assert!(with("registry.local/sluice-agent:debug").is_ok());
    assert!(with("ghcr.io/sluice-dev/sluice-agent:0.2.0").is_ok());
    let errs = with("evil.example/miner:latest").unwrap_err();
    let msg = errs.join("; ");
    assert!(
        msg.contains("\"evil.example/miner:latest\" is not allowed"),
        "{msg}"
    );
    assert!(msg.contains("registry.local/sluice-agent:debug"), "{msg}");
    assert!(msg.contains("--allowed-agent-images"), "{msg}");
    // The default is always allowed; with no flag, nothing else is.
    assert!(Settings::from_spec(&spec("workloadRef: {name: e}"), "img").is_ok());
    let errs = Settings::from_spec(
        &spec("workloadRef: {name: e}\nagent: {image: other}"),
        "img",
    )
    .unwrap_err();
    assert!(errs[0].contains("allowed are \"img\""), "{errs:?}");
}

#[test]
fn surge_percentages_round_up() {
    let s = Settings::from_spec(&spec("workloadRef: {name: e}\nmaxSurge: 50%"), "i").unwrap();
    assert_eq!(s.surge(5), 3);
    let s = Settings::from_spec(&spec("workloadRef: {name: e}\nmaxSurge: 3"), "i").unwrap();
    assert_eq!(s.surge(10), 3);
}

#[test]
fn header_routes_need_routing_and_header_names() {
    let errs = Settings::from_spec(
        &spec("workloadRef: {name: e}\nsteps: [{setHeaderRoute: {match: [{name: x-canary, value: '1'}]}}]"),
        "i",
    )
    .unwrap_err();
    assert!(
        errs.join("; ").contains("needs spec.trafficRouting"),
        "{errs:?}"
    );
    let routed = "workloadRef: {name: e}\ntrafficRouting: {service: web, gatewayAPI: {httpRoutes: [{name: web}]}}\n";
    let errs = Settings::from_spec(
        &spec(&format!(
            "{routed}steps: [{{setHeaderRoute: {{match: [{{name: 'x canary', value: '1'}}]}}}}]"
        )),
        "i",
    )
    .unwrap_err();
    assert!(
        errs.join("; ").contains("is not an HTTP header name"),
        "{errs:?}"
    );
    let ok = Settings::from_spec(
        &spec(&format!("{routed}steps: [{{setHeaderRoute: {{match: [{{name: cookie, value: 'canary=1', type: RegularExpression}}]}}}}]")),
        "i",
    )
    .unwrap();
    assert!(matches!(&ok.steps[0], StepKind::HeaderRoute(h) if h.len() == 1));
}
