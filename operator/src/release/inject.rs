//! Pod-template injection (pure): what the operator adds to the user's pod template before
//! it becomes a ReplicaSet the Release owns. The user's Deployment is never changed.
//!
//! Added:
//! - the agent as a native sidecar (an init container with `restartPolicy: Always`), with
//!   the drain policy as flags and the drain token in `SLUICE_DRAIN_TOKEN`;
//! - the readiness gate `sluice.dev/serving`, which the operator alone sets;
//! - `preStop.httpGet` to the agent's `/drain` on the application container, carrying the
//!   drain token in the `x-sluice-drain-token` header, so that termination waits for the
//!   paced close (a `sleep` preStop is replaced: it is the open-loop workaround the agent
//!   makes unnecessary; any other preStop is kept). The agent drains only for that token:
//!   the kubelet's hook arrives from whatever address the CNI gives the node side, and a
//!   request forged by the application arrives from loopback, so addresses prove nothing.
//! - a termination grace period long enough for the drain.
//!
//! Proxy mode with a named application port (`http`): the agent takes the name (so a
//! Service whose `targetPort` is `http` reaches the agent) and listens on `proxyPort`; the
//! application's port is renamed `sluice-app` and keeps its number, and the application's
//! probes that referred to the name are rewritten to the number. With an unnamed port the
//! Service must target `proxyPort` (see docs/release.md).

use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EnvVar, HTTPGetAction, HTTPHeader, Lifecycle,
    LifecycleHandler, PodReadinessGate, PodTemplateSpec, Probe, ResourceRequirements,
    SeccompProfile, SecurityContext,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use sluice_contract::{
    AgentArgs, AgentCommand, DRAIN_PATH, DrainFlags, HEALTHZ_PATH, Protocol, READY_PATH,
};

use super::crd::{AgentMode, AgentProtocol, SERVING_CONDITION};
use super::settings::{AgentSettings, DrainSettings};

/// Name of the injected sidecar.
pub const AGENT_CONTAINER: &str = "sluice-agent";
/// New name of the application's port when the agent takes its name.
pub const RENAMED_APP_PORT: &str = "sluice-app";
/// Name of the agent's admin port.
pub const ADMIN_PORT_NAME: &str = "sluice-admin";
/// The header the agent's `/drain` requires and the environment variable that gives the
/// agent its drain token: the operator↔agent contract.
pub use sluice_contract::{DRAIN_TOKEN_ENV, DRAIN_TOKEN_HEADER};

/// A fresh drain token: 128 random bits, hex. One per ReplicaSet (Release) or pod
/// (InferenceSet), written only into that template.
pub fn new_drain_token() -> String {
    let bits: u128 = rand::random();
    format!("{bits:032x}")
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum InjectError {
    #[error("the pod template has no containers")]
    NoContainers,
    #[error("agent.container {0:?} is not a container of the pod template")]
    NoSuchContainer(String),
    #[error(
        "agent.port {0:?} is not a named port of any container: name the application's port or set agent.port to a number"
    )]
    NoSuchPort(String),
    #[error(
        "container {0:?} declares no port: declare the application's containerPort or set agent.port"
    )]
    NoPort(String),
    #[error(
        "agent.port {0} is not declared by the application container: declare containerPort {0} on it, or set agent.port to the port it declares"
    )]
    UndeclaredPort(i32),
    #[error("agent.proxyPort {0} is also the application's port: choose another agent.proxyPort")]
    PortClash(i32),
    #[error("port {0} is not a port number between 1 and 65535")]
    PortOutOfRange(i32),
}

fn port_number(p: i32) -> Result<u16, InjectError> {
    u16::try_from(p)
        .ok()
        .filter(|&p| p != 0)
        .ok_or(InjectError::PortOutOfRange(p))
}

/// The result of injection, with notes for the user (surfaced as events).
#[derive(Clone, Debug, PartialEq)]
pub struct Injected {
    pub template: PodTemplateSpec,
    /// The application container's port number the agent fronts or watches.
    pub app_port: i32,
    pub notes: Vec<String>,
}

/// Inject the agent, readiness gate and preStop into a copy of `template`.
pub fn inject(
    template: &PodTemplateSpec,
    agent: &AgentSettings,
    drain: &DrainSettings,
    drain_token: &str,
) -> Result<Injected, InjectError> {
    let mut t = template.clone();
    let spec = t.spec.get_or_insert_with(Default::default);
    if spec.containers.is_empty() {
        return Err(InjectError::NoContainers);
    }
    let mut notes = Vec::new();

    // Which container, and which port.
    let idx = match (&agent.container, &agent.port) {
        (Some(name), _) => spec
            .containers
            .iter()
            .position(|c| &c.name == name)
            .ok_or_else(|| InjectError::NoSuchContainer(name.clone()))?,
        (None, Some(IntOrString::String(port))) => spec
            .containers
            .iter()
            .position(|c| port_by_name(c, port).is_some())
            .ok_or_else(|| InjectError::NoSuchPort(port.clone()))?,
        (None, Some(IntOrString::Int(n))) => spec
            .containers
            .iter()
            .position(|c| declares(c, *n))
            .ok_or(InjectError::UndeclaredPort(*n))?,
        (None, None) => 0,
    };
    let app = &spec.containers[idx];
    let (app_port, app_port_name) = match &agent.port {
        Some(IntOrString::String(name)) => {
            let p = port_by_name(app, name).ok_or_else(|| InjectError::NoSuchPort(name.clone()))?;
            (p.container_port, Some(name.clone()))
        }
        Some(IntOrString::Int(n)) => {
            if !declares(app, *n) {
                return Err(InjectError::UndeclaredPort(*n));
            }
            let name = app
                .ports
                .iter()
                .flatten()
                .find(|p| p.container_port == *n)
                .and_then(|p| p.name.clone());
            (*n, name)
        }
        None => {
            let p = app
                .ports
                .iter()
                .flatten()
                .next()
                .ok_or_else(|| InjectError::NoPort(app.name.clone()))?;
            (p.container_port, p.name.clone())
        }
    };

    let admin = agent.admin_port;
    let mut agent_ports = vec![ContainerPort {
        name: Some(ADMIN_PORT_NAME.into()),
        container_port: admin,
        protocol: Some("TCP".into()),
        ..Default::default()
    }];
    let command = match agent.mode {
        AgentMode::Proxy => {
            if agent.proxy_port == app_port {
                return Err(InjectError::PortClash(app_port));
            }
            match &app_port_name {
                Some(name) => {
                    // The agent takes the name; the application keeps its number under a
                    // new name, and its own probes and hooks follow the number.
                    agent_ports.push(ContainerPort {
                        name: Some(name.clone()),
                        container_port: agent.proxy_port,
                        protocol: Some("TCP".into()),
                        ..Default::default()
                    });
                    let app = &mut spec.containers[idx];
                    for p in app.ports.iter_mut().flatten() {
                        if p.name.as_deref() == Some(name.as_str()) {
                            p.name = Some(RENAMED_APP_PORT.into());
                        }
                    }
                    rewrite_named_port(app, name, app_port);
                    notes.push(format!(
                        "proxy mode: the agent took port name {name:?} (listening on {}); the application keeps port {app_port} as {RENAMED_APP_PORT:?}",
                        agent.proxy_port
                    ));
                }
                None => {
                    agent_ports.push(ContainerPort {
                        name: Some("sluice-proxy".into()),
                        container_port: agent.proxy_port,
                        protocol: Some("TCP".into()),
                        ..Default::default()
                    });
                    notes.push(format!(
                        "proxy mode: the application's port {app_port} has no name, so a Service cannot be moved to the agent by name; point the Service's targetPort at {} (see docs/release.md)",
                        agent.proxy_port
                    ));
                }
            }
            AgentCommand::Proxy {
                listen_port: port_number(agent.proxy_port)?,
                upstream_port: port_number(app_port)?,
                protocol: match agent.protocol {
                    AgentProtocol::Http => Protocol::Http,
                    AgentProtocol::Tcp => Protocol::Tcp,
                },
                limits: agent.limits.clone(),
            }
        }
        AgentMode::Observe => AgentCommand::Observe {
            port: port_number(app_port)?,
        },
    };
    let args = AgentArgs {
        command,
        admin_port: port_number(admin)?,
        drain: DrainFlags {
            quiet_period: drain.quiet_period,
            propagation_timeout: drain.propagation_timeout,
            // Settings validation keeps it at least 1.
            close_rate: u32::try_from(drain.close_rate).unwrap_or(0),
            drain_timeout: drain.drain_timeout,
            drain_orphan_after: None,
        },
    }
    .render();

    let sidecar = Container {
        name: AGENT_CONTAINER.into(),
        image: Some(agent.image.clone()),
        args: Some(args),
        restart_policy: Some("Always".into()),
        ports: Some(agent_ports),
        env: Some(vec![EnvVar {
            name: DRAIN_TOKEN_ENV.into(),
            value: Some(drain_token.into()),
            ..Default::default()
        }]),
        // Two failures in a row, each allowed 2 s: one slow answer on a busy node does
        // not take the pod out of the Service.
        readiness_probe: Some(Probe {
            http_get: Some(HTTPGetAction {
                path: Some(READY_PATH.into()),
                port: IntOrString::Int(admin),
                ..Default::default()
            }),
            period_seconds: Some(2),
            timeout_seconds: Some(2),
            failure_threshold: Some(2),
            ..Default::default()
        }),
        // A wedged agent (its admin server stops answering) is restarted; a draining one
        // still answers `/healthz`.
        liveness_probe: Some(Probe {
            http_get: Some(HTTPGetAction {
                path: Some(HEALTHZ_PATH.into()),
                port: IntOrString::Int(admin),
                ..Default::default()
            }),
            period_seconds: Some(10),
            timeout_seconds: Some(2),
            failure_threshold: Some(3),
            ..Default::default()
        }),
        resources: Some(
            agent
                .resources
                .clone()
                .unwrap_or_else(default_agent_resources),
        ),
        security_context: Some(restricted_security_context()),
        ..Default::default()
    };
    let inits = spec.init_containers.get_or_insert_with(Vec::new);
    inits.retain(|c| c.name != AGENT_CONTAINER);
    inits.push(sidecar);

    let gates = spec.readiness_gates.get_or_insert_with(Vec::new);
    if !gates.iter().any(|g| g.condition_type == SERVING_CONDITION) {
        gates.push(PodReadinessGate {
            condition_type: SERVING_CONDITION.into(),
        });
    }

    let app = &mut spec.containers[idx];
    let lifecycle = app.lifecycle.get_or_insert_with(Lifecycle::default);
    if lifecycle.pre_stop.as_ref().is_none_or(is_sleep) {
        if lifecycle.pre_stop.is_some() {
            notes.push(format!(
                "replaced the sleep preStop of container {:?} with the agent's /drain",
                app.name
            ));
        }
        lifecycle.pre_stop = Some(LifecycleHandler {
            http_get: Some(HTTPGetAction {
                path: Some(DRAIN_PATH.into()),
                port: IntOrString::Int(admin),
                http_headers: Some(vec![HTTPHeader {
                    name: DRAIN_TOKEN_HEADER.into(),
                    value: drain_token.into(),
                }]),
                ..Default::default()
            }),
            ..Default::default()
        });
    } else {
        notes.push(format!(
            "container {:?} has its own preStop hook; it was kept, so termination does not wait for the agent's paced close",
            app.name
        ));
    }

    let need = i64::try_from(drain.drain_timeout.as_secs())
        .unwrap_or(i64::MAX)
        .saturating_add(10);
    let grace = spec.termination_grace_period_seconds.unwrap_or(30);
    spec.termination_grace_period_seconds = Some(grace.max(need));

    Ok(Injected {
        template: t,
        app_port,
        notes,
    })
}

/// Requests 10m CPU and 32Mi memory, memory limited to 128Mi: the agent holds per
/// connection only small buffers, so a leak or a flood ends in a restart of the agent, not
/// in the node's memory.
fn default_agent_resources() -> ResourceRequirements {
    ResourceRequirements {
        requests: Some(
            [
                ("cpu".to_string(), Quantity("10m".into())),
                ("memory".to_string(), Quantity("32Mi".into())),
            ]
            .into(),
        ),
        limits: Some([("memory".to_string(), Quantity("128Mi".into()))].into()),
        ..Default::default()
    }
}

/// What the Pod Security Standard `restricted` asks of a container, so that the agent
/// never stands between a namespace that enforces it and its pods: a fixed non-root user
/// (65532, "nonroot" of distroless images), no privilege escalation, a read-only root,
/// no capabilities (the agent listens above 1024), the runtime's default seccomp profile.
fn restricted_security_context() -> SecurityContext {
    SecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(65532),
        run_as_group: Some(65532),
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            add: None,
        }),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            localhost_profile: None,
        }),
        ..Default::default()
    }
}

fn declares(c: &Container, port: i32) -> bool {
    c.ports.iter().flatten().any(|p| p.container_port == port)
}

fn port_by_name<'a>(c: &'a Container, name: &str) -> Option<&'a ContainerPort> {
    c.ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == Some(name))
}

/// A preStop that only waits (`sleep` action, or `exec` of `sleep N` directly or through
/// a shell): the open-loop drain the agent replaces.
fn is_sleep(h: &LifecycleHandler) -> bool {
    if h.sleep.is_some() {
        return true;
    }
    let Some(cmd) = h.exec.as_ref().and_then(|e| e.command.as_ref()) else {
        return false;
    };
    let words: Vec<&str> = match cmd.as_slice() {
        [sh, flag, script] if sh.ends_with("sh") && flag == "-c" => {
            script.split_whitespace().collect()
        }
        other => other.iter().map(|s| s.as_str()).collect(),
    };
    matches!(words.as_slice(), [sleep, n] if sleep.ends_with("sleep") && n.parse::<f64>().is_ok())
}

fn rewrite_named_port(c: &mut Container, name: &str, number: i32) {
    let fix = |p: &mut IntOrString| {
        if matches!(p, IntOrString::String(s) if s == name) {
            *p = IntOrString::Int(number);
        }
    };
    let fix_probe = |probe: &mut Option<Probe>| {
        if let Some(p) = probe {
            if let Some(h) = p.http_get.as_mut() {
                fix(&mut h.port);
            }
            if let Some(t) = p.tcp_socket.as_mut() {
                fix(&mut t.port);
            }
        }
    };
    fix_probe(&mut c.readiness_probe);
    fix_probe(&mut c.liveness_probe);
    fix_probe(&mut c.startup_probe);
    if let Some(l) = c.lifecycle.as_mut() {
        for h in [l.pre_stop.as_mut(), l.post_start.as_mut()]
            .into_iter()
            .flatten()
        {
            if let Some(g) = h.http_get.as_mut() {
                fix(&mut g.port);
            }
            if let Some(t) = h.tcp_socket.as_mut() {
                fix(&mut t.port);
            }
        }
    }
}

/// A short, stable name for a pod template: FNV-1a over its JSON, in the alphabet
/// Kubernetes uses for pod-template hashes (no vowels, no look-alikes).
pub fn revision_of(template: &PodTemplateSpec) -> String {
    let bytes = serde_json::to_vec(template).unwrap_or_default();
    let mut h: u64 = 0xcbf29ce484222325;
    for b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut out = String::with_capacity(10);
    for _ in 0..10 {
        out.push(ALPHABET[(h % ALPHABET.len() as u64) as usize] as char);
        h /= ALPHABET.len() as u64;
    }
    out
}

#[cfg(test)]
mod tests {
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
}

/// Pod Security Standards, profile `restricted` (with `baseline` under it), as far as
/// one container decides it: the checks of
/// <https://kubernetes.io/docs/concepts/security/pod-security-standards/> that a
/// container-level setting can satisfy or break. Pure, for tests.
#[cfg(test)]
pub(crate) fn restricted_violations(c: &Container) -> Vec<String> {
    let mut v = Vec::new();
    let sc = c.security_context.clone().unwrap_or_default();
    if sc.privileged == Some(true) {
        v.push("privileged".into());
    }
    if sc.allow_privilege_escalation != Some(false) {
        v.push("allowPrivilegeEscalation must be false".into());
    }
    if sc.run_as_non_root != Some(true) {
        v.push("runAsNonRoot must be true".into());
    }
    if sc.run_as_user == Some(0) {
        v.push("runAsUser must not be 0".into());
    }
    match sc.seccomp_profile.as_ref().map(|p| p.type_.as_str()) {
        Some("RuntimeDefault" | "Localhost") => {}
        other => v.push(format!(
            "seccompProfile.type must be RuntimeDefault or Localhost, is {other:?}"
        )),
    }
    let caps = sc.capabilities.clone().unwrap_or_default();
    if !caps.drop.iter().flatten().any(|d| d == "ALL") {
        v.push("capabilities.drop must include ALL".into());
    }
    for add in caps.add.iter().flatten() {
        if add != "NET_BIND_SERVICE" {
            v.push(format!("capability {add} may not be added"));
        }
    }
    if sc.proc_mount.as_deref().is_some_and(|m| m != "Default") {
        v.push("procMount must be Default".into());
    }
    if let Some(se) = &sc.se_linux_options {
        if se.user.is_some() || se.role.is_some() {
            v.push("seLinuxOptions user and role must be unset".into());
        }
        if let Some(t) = &se.type_
            && ![
                "container_t",
                "container_init_t",
                "container_kvm_t",
                "container_engine_t",
            ]
            .contains(&t.as_str())
        {
            v.push(format!("seLinuxOptions.type {t} is not allowed"));
        }
    }
    if sc
        .app_armor_profile
        .as_ref()
        .is_some_and(|p| p.type_ == "Unconfined")
    {
        v.push("appArmorProfile must not be Unconfined".into());
    }
    if sc
        .windows_options
        .as_ref()
        .is_some_and(|w| w.host_process == Some(true))
    {
        v.push("hostProcess".into());
    }
    for p in c.ports.iter().flatten() {
        if p.host_port.is_some_and(|h| h != 0) {
            v.push(format!("hostPort {:?}", p.host_port));
        }
    }
    v
}

#[cfg(test)]
mod restricted_tests {
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
}
