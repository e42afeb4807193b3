use super::*;
use crate::release::crd::ReleaseSpec;
use crate::release::settings::Settings;

fn agent_of(extra: &str) -> Container {
    let spec: ReleaseSpec =
        serde_yaml::from_str(&format!("workloadRef: {{name: echo}}\n{extra}")).unwrap();
    let s = Settings::from_spec(&spec, "sluice/agent:dev").unwrap();
    let t: PodTemplateSpec = serde_yaml::from_str(
        "spec: {containers: [{name: app, image: x, ports: [{name: http, containerPort: 8080}]}]}",
    )
    .unwrap();
    let out = inject(&t, &s.agent, &s.drain, "t0ken").unwrap();
    out.template.spec.unwrap().init_containers.unwrap()[0].clone()
}

#[test]
fn the_checker_catches_what_restricted_forbids() {
    let root = Container::default();
    let v = restricted_violations(&root);
    for want in [
        "allowPrivilegeEscalation",
        "runAsNonRoot",
        "seccompProfile",
        "capabilities.drop",
    ] {
        assert!(v.iter().any(|m| m.contains(want)), "{want}: {v:?}");
    }
}

#[test]
fn the_injected_agent_is_restricted_compliant() {
    for extra in ["", "agent: {mode: observe}", "agent: {protocol: tcp}"] {
        let agent = agent_of(extra);
        assert_eq!(
            restricted_violations(&agent),
            Vec::<String>::new(),
            "{extra}"
        );
        let sc = agent.security_context.clone().unwrap();
        assert_eq!(sc.run_as_user, Some(65532));
        assert_eq!(sc.run_as_group, Some(65532));
        assert_eq!(sc.read_only_root_filesystem, Some(true));
    }
}

#[test]
fn the_injected_agent_has_bounded_memory_and_probes() {
    let agent = agent_of("");
    let res = agent.resources.clone().unwrap();
    let req = res.requests.unwrap();
    let lim = res.limits.unwrap();
    assert!(
        req.contains_key("cpu") && req.contains_key("memory"),
        "{req:?}"
    );
    assert!(lim.contains_key("memory"), "{lim:?}");
    let live = agent.liveness_probe.clone().unwrap();
    let get = live.http_get.unwrap();
    assert_eq!(get.path.as_deref(), Some("/healthz"));
    assert_eq!(get.port, IntOrString::Int(9901));
    let ready = agent.readiness_probe.clone().unwrap();
    assert_eq!(
        ready.http_get.as_ref().unwrap().path.as_deref(),
        Some("/ready")
    );
    // One slow answer does not take the pod out of service.
    assert!(ready.timeout_seconds.unwrap_or(1) >= 2, "{ready:?}");
    assert!(ready.failure_threshold.unwrap_or(3) >= 2, "{ready:?}");
}
