//! Pod-template injection (pure): what the operator adds to the user's pod template before
//! it runs: a Release's ReplicaSets and an InferenceSet's pods. The user's Deployment or set
//! is never changed.
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

use super::agent_spec::{AgentMode, AgentProtocol};
use super::keys::SERVING_CONDITION;
use super::revision::revision_hash;
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

/// The revision of a pod template (see [`revision_hash`]).
pub fn revision_of(template: &PodTemplateSpec) -> String {
    revision_hash(template)
}

#[cfg(test)]
#[path = "inject_tests.rs"]
mod tests;

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
#[path = "inject_restricted_tests.rs"]
mod restricted_tests;
