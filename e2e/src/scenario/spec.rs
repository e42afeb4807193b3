//! The shape of a run and the workload it releases: [`RunSpec`], the echo app's
//! Deployment and Service, and pods that run a program installed on this machine.
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;
use serde::{Deserialize, Serialize};

pub const APP: &str = "echo";
pub const SERVICE_PORT: u16 = 80;
pub const APP_PORT: u16 = 8080;

/// The shape of one run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunSpec {
    pub replicas: i32,
    pub connections: usize,
    pub rate: f64,
    /// Service-proxy propagation delay.
    #[serde(with = "humantime_serde_secs")]
    pub delay: Duration,
    /// Load before the release (the steady-state reference).
    #[serde(with = "humantime_serde_secs")]
    pub steady: Duration,
    /// Load after the release completed (plus the propagation delay).
    #[serde(with = "humantime_serde_secs")]
    pub tail: Duration,
    /// Give up when the release takes longer.
    #[serde(with = "humantime_serde_secs")]
    pub max_release: Duration,
    /// The node the pods run on.
    pub node: String,
    /// Keep the namespace after the run (for debugging).
    pub keep: bool,
    /// New connections per second one pod can take: the application's declared capacity
    /// (a Release states it as `gates.connectionRate.maxPerPod`). The storm factor is
    /// measured against it for every strategy.
    #[serde(default = "default_new_pod_capacity")]
    pub new_pod_capacity: f64,
    /// Run in a namespace that enforces the `restricted` Pod Security Standard (the
    /// workload's own template complies; whatever Sluice adds must too).
    #[serde(default)]
    pub restricted: bool,
}

fn default_new_pod_capacity() -> f64 {
    5.0
}

mod humantime_serde_secs {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_secs_f64(f64::deserialize(d)?))
    }
}

impl Default for RunSpec {
    fn default() -> Self {
        RunSpec {
            replicas: 6,
            connections: 200,
            rate: 500.0,
            delay: Duration::ZERO,
            steady: Duration::from_secs(15),
            tail: Duration::from_secs(10),
            max_release: Duration::from_secs(180),
            node: "local-0".into(),
            keep: false,
            new_pod_capacity: default_new_pod_capacity(),
            restricted: false,
        }
    }
}

/// The echo app's Deployment (`spec.replicas` pods of `image` on `spec.node`).
pub fn echo_deployment(name: &str, spec: &RunSpec, image: &str) -> Deployment {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {
            "replicas": spec.replicas,
            "selector": {"matchLabels": {"app": name}},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": "25%"}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {
                    "nodeSelector": {"kubernetes.io/hostname": spec.node},
                    "terminationGracePeriodSeconds": 30,
                    // Compliant with the `restricted` Pod Security Standard, as a platform
                    // team's template would be.
                    "securityContext": {"runAsNonRoot": true, "seccompProfile": {"type": "RuntimeDefault"}},
                    "containers": [{
                        "name": APP,
                        "image": image,
                        "securityContext": {
                            "allowPrivilegeEscalation": false,
                            "readOnlyRootFilesystem": true,
                            "capabilities": {"drop": ["ALL"]},
                        },
                        "args": ["--listen", format!("0.0.0.0:{APP_PORT}")],
                        "env": [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
                        "ports": [{"name": "http", "containerPort": APP_PORT}],
                        "readinessProbe": {
                            "httpGet": {"path": "/ready", "port": "http"},
                            "periodSeconds": 1,
                            "failureThreshold": 1,
                        },
                    }],
                },
            },
        },
    }))
    .expect("valid Deployment")
}

/// The echo app's Service (port 80 to the named port `http`).
pub fn echo_service(name: &str) -> Service {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name},
        "spec": {
            "selector": {"app": name},
            "ports": [{"name": "http", "port": SERVICE_PORT, "targetPort": "http"}],
        },
    }))
    .expect("valid Service")
}

/// A pod that runs a program installed on this machine (nginx, python3, java: software
/// the project did not write) on a real node: image `sluice/host` is an empty root with the
/// merged-/usr links, and the host's /usr is mounted read-only into it. (A program that
/// reads its configuration under /etc gets it from a ConfigMap or a flag.)
pub fn host_program_pod(name: &str, node: &str, command: &[&str]) -> serde_json::Value {
    serde_json::json!({
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {
            "nodeName": node,
            "terminationGracePeriodSeconds": 5,
            "containers": [{
                "name": "app",
                "image": "sluice/host:1",
                "imagePullPolicy": "Never",
                "command": command,
                "volumeMounts": [{"name": "usr", "mountPath": "/usr", "readOnly": true}],
            }],
            "volumes": [{"name": "usr", "hostPath": {"path": "/usr", "type": "Directory"}}],
        }
    })
}
