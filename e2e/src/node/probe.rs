//! Probes and lifecycle handlers: what to run (`httpGet`, `tcpSocket`, `exec`, `sleep`) and
//! the kubelet's result semantics (initial delay, period, success and failure thresholds).
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use k8s_openapi::api::core::v1::{
    Container, ExecAction, HTTPGetAction, LifecycleHandler, Probe, TCPSocketAction,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use tokio::sync::mpsc;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ProbeKind {
    Startup,
    Readiness,
    Liveness,
}

/// A probe's result as the kubelet keeps it: it flips only after `success_threshold`
/// consecutive successes or `failure_threshold` consecutive failures. Readiness and startup
/// start as failure, liveness as success.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeState {
    pub success_threshold: u32,
    pub failure_threshold: u32,
    successes: u32,
    failures: u32,
    pub ok: bool,
}

impl ProbeState {
    pub fn new(kind: ProbeKind, success_threshold: u32, failure_threshold: u32) -> Self {
        ProbeState {
            success_threshold: success_threshold.max(1),
            failure_threshold: failure_threshold.max(1),
            successes: 0,
            failures: 0,
            ok: kind == ProbeKind::Liveness,
        }
    }

    /// Records one probe run; returns the new result when it changed.
    pub fn observe(&mut self, success: bool) -> Option<bool> {
        if success {
            self.successes += 1;
            self.failures = 0;
            if !self.ok && self.successes >= self.success_threshold {
                self.ok = true;
                return Some(true);
            }
        } else {
            self.failures += 1;
            self.successes = 0;
            if self.ok && self.failures >= self.failure_threshold {
                self.ok = false;
                return Some(false);
            }
            // A startup or readiness probe that has never succeeded still reports the
            // failure once the threshold is reached (startup failure kills the container).
            if !self.ok && self.failures == self.failure_threshold {
                return Some(false);
            }
        }
        None
    }
}

/// What a probe or handler does.
#[derive(Clone, Debug)]
pub enum Action {
    Http {
        addr: SocketAddr,
        path: String,
        headers: Vec<(String, String)>,
    },
    Tcp {
        addr: SocketAddr,
    },
    Exec {
        command: Vec<String>,
    },
    Sleep {
        duration: Duration,
    },
}

/// Where a probe runs: the pod's address (httpGet, tcpSocket come from the node like the
/// kubelet's) and, for exec, the pod's namespace (`None`: the host's, for `hostNetwork` pods)
/// and the container's environment.
#[derive(Clone, Debug)]
pub struct ProbeTarget {
    pub pod_ip: IpAddr,
    pub netns: Option<String>,
    pub env: BTreeMap<String, String>,
    pub workdir: PathBuf,
}

fn resolve_port(port: &IntOrString, c: &Container) -> anyhow::Result<u16> {
    match port {
        IntOrString::Int(p) => Ok(u16::try_from(*p)?),
        IntOrString::String(name) => c
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .map(|p| p.container_port as u16)
            .ok_or_else(|| anyhow::anyhow!("container {} has no port named {name}", c.name)),
    }
}

fn http_action(h: &HTTPGetAction, c: &Container, t: &ProbeTarget) -> anyhow::Result<Action> {
    anyhow::ensure!(
        h.scheme.as_deref().unwrap_or("HTTP") == "HTTP",
        "only HTTP probes are supported"
    );
    let host: IpAddr = match h.host.as_deref() {
        Some(h) if !h.is_empty() => h.parse()?,
        _ => t.pod_ip,
    };
    Ok(Action::Http {
        addr: SocketAddr::new(host, resolve_port(&h.port, c)?),
        path: h.path.clone().unwrap_or_else(|| "/".into()),
        headers: h
            .http_headers
            .iter()
            .flatten()
            .map(|h| (h.name.clone(), h.value.clone()))
            .collect(),
    })
}

fn tcp_action(s: &TCPSocketAction, c: &Container, t: &ProbeTarget) -> anyhow::Result<Action> {
    let host: IpAddr = match s.host.as_deref() {
        Some(h) if !h.is_empty() => h.parse()?,
        _ => t.pod_ip,
    };
    Ok(Action::Tcp {
        addr: SocketAddr::new(host, resolve_port(&s.port, c)?),
    })
}

fn exec_action(e: &ExecAction) -> anyhow::Result<Action> {
    let command = e.command.clone().unwrap_or_default();
    anyhow::ensure!(!command.is_empty(), "exec action without a command");
    Ok(Action::Exec { command })
}

pub fn probe_action(p: &Probe, c: &Container, t: &ProbeTarget) -> anyhow::Result<Action> {
    if let Some(h) = &p.http_get {
        http_action(h, c, t)
    } else if let Some(s) = &p.tcp_socket {
        tcp_action(s, c, t)
    } else if let Some(e) = &p.exec {
        exec_action(e)
    } else {
        anyhow::bail!(
            "container {}: unsupported probe (grpc is not implemented)",
            c.name
        )
    }
}

pub fn handler_action(
    h: &LifecycleHandler,
    c: &Container,
    t: &ProbeTarget,
) -> anyhow::Result<Action> {
    if let Some(s) = &h.sleep {
        Ok(Action::Sleep {
            duration: Duration::from_secs(s.seconds.max(0) as u64),
        })
    } else if let Some(g) = &h.http_get {
        http_action(g, c, t)
    } else if let Some(s) = &h.tcp_socket {
        tcp_action(s, c, t)
    } else if let Some(e) = &h.exec {
        exec_action(e)
    } else {
        anyhow::bail!("container {}: empty lifecycle handler", c.name)
    }
}

async fn http_get(
    addr: SocketAddr,
    path: &str,
    headers: &[(String, String)],
) -> anyhow::Result<u16> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut req = hyper::Request::get(path)
        .header("host", addr.to_string())
        .header("user-agent", "kube-probe/1.34 (sluice process node)")
        .header("connection", "close");
    for (k, v) in headers {
        req = req.header(k, v);
    }
    let resp = sender
        .send_request(req.body(Empty::<Bytes>::new())?)
        .await?;
    let status = resp.status().as_u16();
    let _ = resp.into_body().collect().await;
    driver.abort();
    Ok(status)
}

/// Runs a command inside the pod's network namespace; its exit status.
pub async fn exec_in_pod(command: &[String], t: &ProbeTarget) -> anyhow::Result<i32> {
    let mut cmd = super::runtime::pod_command(
        t.netns.as_deref(),
        &PathBuf::from(&command[0]),
        &command[1..],
        &t.env,
        &t.workdir,
    )?;
    cmd.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    cmd.kill_on_drop(true);
    let status = cmd.spawn()?.wait().await?;
    Ok(status.code().unwrap_or(128))
}

/// Runs an action once, bounded by `timeout`; true on success (HTTP 200–399, TCP connect,
/// exit 0, a finished sleep).
pub async fn run_action(action: &Action, t: &ProbeTarget, timeout: Duration) -> bool {
    let fut = async {
        match action {
            Action::Http {
                addr,
                path,
                headers,
            } => matches!(http_get(*addr, path, headers).await, Ok(s) if (200..400).contains(&s)),
            Action::Tcp { addr } => tokio::net::TcpStream::connect(addr).await.is_ok(),
            Action::Exec { command } => matches!(exec_in_pod(command, t).await, Ok(0)),
            Action::Sleep { duration } => {
                tokio::time::sleep(*duration).await;
                true
            }
        }
    };
    tokio::time::timeout(timeout, fut).await.unwrap_or(false)
}

/// A probe result change, for the pod worker.
#[derive(Debug)]
pub struct ProbeResult {
    pub container: usize,
    pub generation: u32,
    pub kind: ProbeKind,
    pub ok: bool,
}

/// Runs one probe of one container until aborted (or, for startup, until it succeeds),
/// reporting result changes.
pub async fn probe_loop(
    kind: ProbeKind,
    probe: Probe,
    action: Action,
    target: ProbeTarget,
    container: usize,
    generation: u32,
    tx: mpsc::UnboundedSender<ProbeResult>,
) {
    let secs = |v: Option<i32>, d: i32| Duration::from_secs(v.unwrap_or(d).max(0) as u64);
    let initial = secs(probe.initial_delay_seconds, 0);
    let period = secs(probe.period_seconds, 10).max(Duration::from_secs(1));
    let timeout = secs(probe.timeout_seconds, 1).max(Duration::from_secs(1));
    let success_threshold = match kind {
        ProbeKind::Readiness => probe.success_threshold.unwrap_or(1),
        _ => 1, // the API requires 1 for liveness and startup
    };
    let mut state = ProbeState::new(
        kind,
        success_threshold as u32,
        probe.failure_threshold.unwrap_or(3) as u32,
    );
    tokio::time::sleep(initial).await;
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let ok = run_action(&action, &target, timeout).await;
        if let Some(result) = state.observe(ok) {
            if tx
                .send(ProbeResult {
                    container,
                    generation,
                    kind,
                    ok: result,
                })
                .is_err()
            {
                return;
            }
            if kind == ProbeKind::Startup && result {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_starts_failed_and_needs_its_success_threshold() {
        let mut s = ProbeState::new(ProbeKind::Readiness, 2, 3);
        assert!(!s.ok);
        assert_eq!(s.observe(true), None);
        assert_eq!(s.observe(true), Some(true));
        assert_eq!(s.observe(true), None);
        assert_eq!(s.observe(false), None);
        assert_eq!(s.observe(false), None);
        assert_eq!(s.observe(false), Some(false));
        assert_eq!(s.observe(false), None);
        // A success resets the failure count.
        assert_eq!(s.observe(true), None);
        assert_eq!(s.observe(false), None);
        assert_eq!(s.observe(true), None);
        assert_eq!(s.observe(true), Some(true));
    }

    #[test]
    fn liveness_starts_ok_and_fails_after_threshold() {
        let mut s = ProbeState::new(ProbeKind::Liveness, 1, 2);
        assert!(s.ok);
        assert_eq!(s.observe(false), None);
        assert_eq!(s.observe(true), None);
        assert_eq!(s.observe(false), None);
        assert_eq!(s.observe(false), Some(false));
    }

    #[test]
    fn startup_failure_is_reported_once_at_threshold() {
        let mut s = ProbeState::new(ProbeKind::Startup, 1, 3);
        assert_eq!(s.observe(false), None);
        assert_eq!(s.observe(false), None);
        assert_eq!(s.observe(false), Some(false));
        assert_eq!(s.observe(false), None);
        let mut s = ProbeState::new(ProbeKind::Startup, 1, 3);
        assert_eq!(s.observe(false), None);
        assert_eq!(s.observe(true), Some(true));
    }

    #[test]
    fn thresholds_of_zero_mean_one() {
        let mut s = ProbeState::new(ProbeKind::Readiness, 0, 0);
        assert_eq!(s.observe(true), Some(true));
        assert_eq!(s.observe(false), Some(false));
    }

    #[test]
    fn named_ports_resolve() {
        let c = Container {
            name: "app".into(),
            ports: Some(vec![k8s_openapi::api::core::v1::ContainerPort {
                name: Some("http".into()),
                container_port: 8080,
                ..Default::default()
            }]),
            ..Default::default()
        };
        assert_eq!(
            resolve_port(&IntOrString::String("http".into()), &c).unwrap(),
            8080
        );
        assert_eq!(resolve_port(&IntOrString::Int(9090), &c).unwrap(), 9090);
        assert!(resolve_port(&IntOrString::String("grpc".into()), &c).is_err());
    }
}
