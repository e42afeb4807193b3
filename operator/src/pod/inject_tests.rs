// The agent settings come from a Release spec: the way most pods get them.
use super::*;
use crate::release::crd::ReleaseSpec;
use crate::release::settings::Settings;

fn template(yaml: &str) -> PodTemplateSpec {
    serde_yaml::from_str(yaml).unwrap()
}

const ECHO: &str = r#"
metadata: {labels: {app: echo}}
spec:
  containers:
    - name: echo
      image: sluice/echo:v1
      ports: [{name: http, containerPort: 8080}]
      readinessProbe: {httpGet: {path: /healthz, port: http}}
      lifecycle: {preStop: {sleep: {seconds: 15}}}
"#;

fn settings(extra: &str) -> Settings {
    let spec: ReleaseSpec =
        serde_yaml::from_str(&format!("workloadRef: {{name: echo}}\n{extra}")).unwrap();
    Settings::from_spec(&spec, "sluice/agent:dev").unwrap()
}

fn inject_with(t: &str, extra: &str) -> Result<Injected, InjectError> {
    let s = settings(extra);
    inject(&template(t), &s.agent, &s.drain, "t0ken")
}

#[test]
fn proxy_mode_takes_the_port_name() {
    let out = inject_with(ECHO, "").unwrap();
    let spec = out.template.spec.unwrap();
    let app = &spec.containers[0];
    let app_port = &app.ports.as_ref().unwrap()[0];
    assert_eq!(app_port.name.as_deref(), Some(RENAMED_APP_PORT));
    assert_eq!(app_port.container_port, 8080);
    // The app's probe followed the number, not the name now owned by the agent.
    assert_eq!(
        app.readiness_probe
            .as_ref()
            .unwrap()
            .http_get
            .as_ref()
            .unwrap()
            .port,
        IntOrString::Int(8080)
    );
    let agent = &spec.init_containers.as_ref().unwrap()[0];
    assert_eq!(agent.name, AGENT_CONTAINER);
    assert_eq!(agent.restart_policy.as_deref(), Some("Always"));
    assert_eq!(agent.image.as_deref(), Some("sluice/agent:dev"));
    let http = agent
        .ports
        .as_ref()
        .unwrap()
        .iter()
        .find(|p| p.name.as_deref() == Some("http"))
        .unwrap();
    assert_eq!(http.container_port, 15101);
    let args = agent.args.as_ref().unwrap().join(" ");
    assert!(args.starts_with("proxy --listen 0.0.0.0:15101 --upstream 127.0.0.1:8080 --protocol http --admin 0.0.0.0:9901"), "{args}");
    assert!(
        args.contains(
            "--quiet-period 2s --propagation-timeout 1m --close-rate 100 --drain-timeout 1m30s"
        ),
        "{args}"
    );
    let env = &agent.env.as_ref().unwrap()[0];
    assert_eq!(env.name, DRAIN_TOKEN_ENV);
    assert_eq!(env.value.as_deref(), Some("t0ken"));
    assert_eq!(
        spec.readiness_gates.as_ref().unwrap()[0].condition_type,
        SERVING_CONDITION
    );
    // The sleep preStop is replaced by the agent's drain.
    let pre = app.lifecycle.as_ref().unwrap().pre_stop.as_ref().unwrap();
    assert!(pre.sleep.is_none());
    assert_eq!(
        pre.http_get.as_ref().unwrap().path.as_deref(),
        Some("/drain")
    );
    assert_eq!(pre.http_get.as_ref().unwrap().port, IntOrString::Int(9901));
    // The hook carries the token the agent requires, whatever address it comes from.
    let headers = pre.http_get.as_ref().unwrap().http_headers.clone().unwrap();
    assert_eq!(headers[0].name, DRAIN_TOKEN_HEADER);
    assert_eq!(headers[0].value, "t0ken");
    assert_eq!(spec.termination_grace_period_seconds, Some(100));
    assert_eq!(out.app_port, 8080);
    assert!(out.notes.iter().any(|n| n.contains("took port name")));
}

#[test]
fn the_releases_agent_limits_reach_the_agents_flags() {
    let out = inject_with(
        ECHO,
        "agent: {limits: {maxConnections: 20000, upstreamTimeout: 30s, tcpKeepalive: 0s}}",
    )
    .unwrap();
    let spec = out.template.spec.unwrap();
    let args = spec.init_containers.unwrap()[0]
        .args
        .clone()
        .unwrap()
        .join(" ");
    assert!(
            args.contains("--protocol http --max-connections 20000 --upstream-timeout 30s --tcp-keepalive 0s --admin"),
            "{args}"
        );
}

#[test]
fn observe_mode_changes_no_port() {
    let out = inject_with(ECHO, "agent: {mode: observe}").unwrap();
    let spec = out.template.spec.unwrap();
    assert_eq!(
        spec.containers[0].ports.as_ref().unwrap()[0]
            .name
            .as_deref(),
        Some("http")
    );
    let agent = &spec.init_containers.as_ref().unwrap()[0];
    let args = agent.args.as_ref().unwrap().join(" ");
    assert!(
        args.starts_with("observe --port 8080 --admin 0.0.0.0:9901"),
        "{args}"
    );
    assert_eq!(agent.ports.as_ref().unwrap().len(), 1);
}

#[test]
fn unnamed_port_in_proxy_mode_is_explained() {
    let t = "spec: {containers: [{name: app, image: x, ports: [{containerPort: 8080}]}]}";
    let out = inject_with(t, "").unwrap();
    assert!(
        out.notes.iter().any(|n| n.contains("targetPort at 15101")),
        "{:?}",
        out.notes
    );
    let spec = out.template.spec.unwrap();
    let agent = &spec.init_containers.as_ref().unwrap()[0];
    assert!(
        agent
            .ports
            .as_ref()
            .unwrap()
            .iter()
            .any(|p| p.name.as_deref() == Some("sluice-proxy"))
    );
}

#[test]
fn picks_the_container_that_owns_the_port() {
    let t = r#"
spec:
  containers:
    - {name: log, image: x}
    - {name: web, image: y, ports: [{name: web, containerPort: 80}]}
"#;
    let out = inject_with(t, "agent: {port: web}").unwrap();
    let spec = out.template.spec.unwrap();
    assert!(spec.containers[0].lifecycle.is_none());
    assert!(
        spec.containers[1]
            .lifecycle
            .as_ref()
            .unwrap()
            .pre_stop
            .is_some()
    );
    assert_eq!(out.app_port, 80);
}

#[test]
fn errors_say_what_to_fix() {
    let t = "spec: {containers: [{name: app, image: x}]}";
    assert_eq!(
        inject_with(t, "").unwrap_err(),
        InjectError::NoPort("app".into())
    );
    assert!(
        inject_with(ECHO, "agent: {port: grpc}")
            .unwrap_err()
            .to_string()
            .contains("not a named port")
    );
    assert_eq!(
        inject_with(ECHO, "agent: {container: nope}").unwrap_err(),
        InjectError::NoSuchContainer("nope".into())
    );
    assert_eq!(
        inject_with(ECHO, "agent: {proxyPort: 8080}").unwrap_err(),
        InjectError::PortClash(8080)
    );
    assert_eq!(
        inject_with("spec: {containers: []}", "").unwrap_err(),
        InjectError::NoContainers
    );
}

/// A number no container declares is a mistake to report, not a reason to pick the
/// first container.
#[test]
fn a_numeric_port_nobody_declares_is_an_error() {
    let err = inject_with(ECHO, "agent: {port: 9090}").unwrap_err();
    assert_eq!(err, InjectError::UndeclaredPort(9090));
    assert!(err.to_string().contains("containerPort"), "{err}");
    let err = inject_with(ECHO, "agent: {container: echo, port: 9090}").unwrap_err();
    assert_eq!(err, InjectError::UndeclaredPort(9090));
    assert_eq!(
        inject_with(ECHO, "agent: {port: 8080}").unwrap().app_port,
        8080
    );
}

#[test]
fn own_prestop_is_kept_unless_it_only_sleeps() {
    let t = r#"
spec:
  containers:
    - name: app
      image: x
      ports: [{containerPort: 80}]
      lifecycle: {preStop: {exec: {command: [nginx, -s, quit]}}}
"#;
    let out = inject_with(t, "agent: {mode: observe}").unwrap();
    let pre = out.template.spec.unwrap().containers[0]
        .lifecycle
        .clone()
        .unwrap()
        .pre_stop
        .unwrap();
    assert!(pre.exec.is_some());
    assert!(out.notes.iter().any(|n| n.contains("own preStop")));
    for cmd in [vec!["sleep", "15"], vec!["/bin/sh", "-c", "sleep 5"]] {
        let h = LifecycleHandler {
            exec: Some(k8s_openapi::api::core::v1::ExecAction {
                command: Some(cmd.iter().map(|s| s.to_string()).collect()),
            }),
            ..Default::default()
        };
        assert!(is_sleep(&h), "{cmd:?}");
    }
}

#[test]
fn injection_is_idempotent_on_gates_and_keeps_longer_grace() {
    let t = r#"
spec:
  terminationGracePeriodSeconds: 600
  readinessGates: [{conditionType: sluice.dev/serving}]
  containers: [{name: app, image: x, ports: [{containerPort: 80}]}]
"#;
    let out = inject_with(t, "agent: {mode: observe}").unwrap();
    let spec = out.template.spec.unwrap();
    assert_eq!(spec.readiness_gates.unwrap().len(), 1);
    assert_eq!(spec.termination_grace_period_seconds, Some(600));
}

#[test]
fn revisions_are_stable_and_differ_by_template() {
    let a = template(ECHO);
    let mut b = a.clone();
    b.spec.as_mut().unwrap().containers[0].image = Some("sluice/echo:v2".into());
    assert_eq!(revision_of(&a), revision_of(&a.clone()));
    assert_ne!(revision_of(&a), revision_of(&b));
    assert_eq!(revision_of(&a).len(), 10);
    assert!(
        revision_of(&a)
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
    );
}
