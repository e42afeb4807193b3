//! The `InferenceSet` custom resource (`sluice.dev/v1alpha1`): N replicas of a model
//! server, each a gang of pods with GPUs, placed by Sluice's topology-aware placer and
//! rolled by slot swap. Admission rules (OpenAPI + CEL) live beside the fields they check
//! and say what to fix.

use k8s_openapi::api::core::v1::{PodTemplateSpec, Probe};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::pod::agent_spec::AgentSpec;
use crate::pod::condition::Condition;
use crate::pod::duration::DurationString;

pub use crate::pod::keys::SET_LABEL;
/// Label: the replica slot (`0..replicas`) a gang fills.
pub const SLOT_LABEL: &str = "sluice.dev/replica";
/// Label: the gang (one replica instance); all pods of a gang share it.
pub const GANG_LABEL: &str = "sluice.dev/gang";
/// Pod annotation: number of pods in the gang (the binder waits for all of them).
pub const GANG_SIZE_ANNOTATION: &str = "sluice.dev/gang-size";
/// Pod annotation: index of the pod inside its gang.
pub const GANG_INDEX_ANNOTATION: &str = "sluice.dev/gang-index";
/// Pod annotation: the placement request (JSON of `sluice_placement::GangRequest`).
pub const GANG_REQUEST_ANNOTATION: &str = "sluice.dev/gang-request";
/// Pod annotation written at binding: GPU indices on the node, comma separated.
pub const GPU_IDS_ANNOTATION: &str = "sluice.dev/gpu-ids";
/// Pod annotation: the warm-up gate passed (RFC 3339), written by the controller.
pub const WARM_ANNOTATION: &str = "sluice.dev/warm";
/// Pod annotation: first-token latency measured by the warm-up gate (seconds).
pub const FIRST_TOKEN_ANNOTATION: &str = "sluice.dev/first-token-seconds";
/// Scheduler name of the pods Sluice binds.
pub const SCHEDULER_NAME: &str = "sluice";
/// Extended resource of NVIDIA's device plugin.
pub const GPU_RESOURCE: &str = "nvidia.com/gpu";
/// Field manager of the InferenceSet controller.
pub const FIELD_MANAGER: &str = "sluice-inference";

/// A fleet of model-server replicas. Each replica is a gang of `podsPerReplica` pods with
/// `gpusPerPod` GPUs each, bound all together or not at all inside the required topology
/// domain. Template changes roll by slot swap: drain one replica, place the new version
/// into the freed GPUs, wait for warm-up, then the next.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "sluice.dev",
    version = "v1alpha1",
    kind = "InferenceSet",
    namespaced,
    status = "InferenceSetStatus",
    shortname = "infs",
    category = "sluice",
    derive = "PartialEq",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(name = "Desired", type_ = "integer", json_path = ".spec.replicas"),
    printcolumn(
        name = "Serving",
        type_ = "integer",
        description = "Replicas warm and in service",
        json_path = ".status.servingReplicas"
    ),
    printcolumn(
        name = "Updated",
        type_ = "integer",
        description = "Replicas on the current revision",
        json_path = ".status.updatedReplicas"
    ),
    printcolumn(
        name = "Pending",
        type_ = "integer",
        description = "Gangs waiting for GPUs",
        json_path = ".status.pendingGangs"
    ),
    printcolumn(name = "GPUs", type_ = "integer", json_path = ".status.gpus"),
    printcolumn(name = "Revision", type_ = "string", json_path = ".status.updateRevision"),
    printcolumn(
        name = "Message",
        type_ = "string",
        priority = 1,
        json_path = ".status.message"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = Rule::new("size(self.metadata.name) <= 40").message(
        "metadata.name must be at most 40 characters: pod names add a gang suffix and label values are limited to 63"
    ),
    validation = Rule::new("!has(self.spec.topology) || !has(self.spec.topology.required) || !has(self.spec.topology.preferred) || self.spec.topology.preferred != self.spec.topology.required").message(
        "topology.preferred equals topology.required: leave preferred out, or name a finer level (gpu-group is finer than node, node finer than a label level)"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct InferenceSetSpec {
    /// Number of replicas (model-server instances).
    #[x_kube(validation = Rule::new("self >= 0 && self <= 10000").message("replicas must be between 0 and 10000"))]
    pub replicas: i32,

    /// Pods per replica (a multi-node tensor/pipeline-parallel replica has several). Default 1.
    #[serde(default = "one")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 64").message("podsPerReplica must be between 1 and 64"))]
    pub pods_per_replica: i32,

    /// Whole GPUs per pod (the `nvidia.com/gpu` the controller sets on the first
    /// container). Default 1.
    #[serde(default = "one")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 64").message("gpusPerPod must be between 1 and 64 (whole GPUs)"))]
    pub gpus_per_pod: i32,

    /// Which GPUs: products and minimum memory (from GPU Feature Discovery labels).
    #[serde(default)]
    pub gpu: GpuSelectorSpec,

    /// Where a replica's GPUs must or should lie, and how replicas spread.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topology: Option<TopologySpec>,

    /// When a new replica counts as in service: its model is loaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warmup: Option<WarmupSpec>,

    /// How a template change rolls.
    #[serde(default)]
    pub update_strategy: UpdateStrategy,

    /// How a replica leaves service (the lossless drain protocol).
    #[serde(default)]
    pub drain: InferenceDrain,

    /// The Sluice agent, injected into every pod as a native sidecar as for a Release
    /// (`docs/release.md`): with it a replica leaves service losslessly (closed loop: the
    /// operator waits until the agent sees no new connection, then the agent closes the
    /// remaining ones paced). Leave it out to run the template as is (open-loop drain:
    /// `quietPeriod`, then delete).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<AgentSpec>,

    /// How long a replica's node may be NotReady before the replica is placed again
    /// elsewhere. A deleted node counts at once. Default `30s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_loss_grace_period: Option<DurationString>,

    /// Pod template of the model server. The controller adds `schedulerName: sluice`, the
    /// `sluice.dev/serving` readiness gate, the GPU limit, the warm-up startup probe and its
    /// labels; do not set `nodeName`.
    #[schemars(schema_with = "crate::inference::crd::template_schema")]
    pub template: PodTemplateSpec,
}

fn one() -> i32 {
    1
}

/// The pod template is large and validated by the API server when pods are created; its
/// schema here is kept open (like Deployment's in most CRDs) so that the CRD stays small.
pub fn template_schema(_: &mut schemars::generate::SchemaGenerator) -> schemars::Schema {
    let open = serde_json::json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true});
    schemars::json_schema!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true,
        "properties": {
            "metadata": open.clone(),
            "spec": {
                "type": "object",
                "x-kubernetes-preserve-unknown-fields": true,
                "properties": {
                    "containers": {"type": "array", "maxItems": 64, "items": open.clone()},
                    "nodeName": {"type": "string", "maxLength": 253},
                    "schedulerName": {"type": "string", "maxLength": 253}
                }
            }
        },
        "x-kubernetes-validations": [
            {"rule": "has(self.spec) && has(self.spec.containers) && size(self.spec.containers) > 0",
             "message": "template.spec.containers must list the model server container"},
            {"rule": "!has(self.spec.nodeName)",
             "message": "template.spec.nodeName must not be set: Sluice binds each gang to the nodes it chooses"},
            {"rule": "!has(self.spec.schedulerName) || self.spec.schedulerName == 'sluice'",
             "message": "template.spec.schedulerName must be sluice or left out: only Sluice places gangs"}
        ]
    })
}

/// GPU selection (GPU Feature Discovery labels on the nodes).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct GpuSelectorSpec {
    /// Allowed `nvidia.com/gpu.product` values, e.g. `NVIDIA-H100-80GB-HBM3`; empty: any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub products: Vec<String>,
    /// Minimum memory per GPU in MiB (`nvidia.com/gpu.memory`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 0").message("gpu.minMemoryMiB must be zero or more MiB"))]
    #[serde(rename = "minMemoryMiB")]
    pub min_memory_mib: Option<i64>,
}

/// Topology: levels are `gpu-group` (one NVLink/NVSwitch domain of a node), `node`, or a
/// node label key configured as a topology level (by default `nvidia.com/gpu.clique`,
/// `sluice.dev/rack`, `topology.kubernetes.io/zone`).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct TopologySpec {
    /// All of a replica's GPUs must lie in one domain of this level.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("size(self) > 0 && size(self) <= 253").message("topology.required must be gpu-group, node or a node label key"))]
    pub required: Option<String>,
    /// A replica should lie in one domain of this (finer) level.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("size(self) > 0 && size(self) <= 253").message("topology.preferred must be gpu-group, node or a node label key"))]
    pub preferred: Option<String>,
    /// Spread replicas across a failure-domain level.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spread: Option<SpreadSpec>,
}

/// Spread of replicas across the domains of a level.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SpreadSpec {
    /// `node` or a node label key (not `gpu-group`).
    #[x_kube(validation = Rule::new("self != 'gpu-group'").message("topology.spread.level cannot be gpu-group: spread over node or a label level such as topology.kubernetes.io/zone"))]
    pub level: String,
    /// Hard limit: a domain holds at most this many replicas more than the emptiest one.
    /// Unset: spreading is only preferred.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1").message("topology.spread.maxSkew must be at least 1"))]
    pub max_skew: Option<i32>,
}

/// Warm-up gate: a new replica enters service only when its model is loaded.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct WarmupSpec {
    /// A probe that succeeds once the model is loaded (e.g. `httpGet /health/ready`). The
    /// controller installs it as the first container's `startupProbe`, so the kubelet
    /// neither reports the pod ready nor runs liveness before the model is loaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::inference::crd::probe_schema")]
    pub probe: Option<Probe>,
    /// Optional: after readiness the operator sends one request and requires the first
    /// byte of the answer within `maxLatency`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_token: Option<FirstTokenCheck>,
    /// A replica not warm this long after it was bound marks the set Degraded and holds
    /// the rollout. Default `20m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<DurationString>,
}

/// Schema of `warmup.probe`: open object (a core/v1 Probe), checked by the API server when
/// the pods are created.
pub fn probe_schema(_: &mut schemars::generate::SchemaGenerator) -> schemars::Schema {
    let open = serde_json::json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true});
    schemars::json_schema!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true,
        "properties": {
            "httpGet": open.clone(),
            "tcpSocket": open.clone(),
            "exec": open.clone(),
            "grpc": open.clone()
        },
        "x-kubernetes-validations": [
            {"rule": "has(self.httpGet) || has(self.tcpSocket) || has(self.exec) || has(self.grpc)",
             "message": "warmup.probe needs one handler: httpGet, tcpSocket, exec or grpc"}
        ]
    })
}

/// A first-token latency check sent by the operator to each pod of a new replica.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct FirstTokenCheck {
    /// Container port number of the model server.
    #[x_kube(validation = Rule::new("self >= 1 && self <= 65535").message("warmup.firstToken.port must be a port number between 1 and 65535"))]
    pub port: i32,
    /// HTTP path, e.g. `/v1/completions`.
    #[x_kube(validation = Rule::new("self.startsWith('/')").message("warmup.firstToken.path must start with /"))]
    pub path: String,
    /// Request body (JSON); with a body the request is a POST, without a GET.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    /// Longest acceptable time to the first byte of the answer.
    pub max_latency: DurationString,
}

/// Rollout limits, counted in replicas.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct UpdateStrategy {
    /// Most replicas out of service at once during a rollout (drained, being placed or
    /// warming). Default 1.
    #[serde(default = "one")]
    #[x_kube(validation = Rule::new("self >= 1").message("updateStrategy.maxUnavailable must be at least 1 (a full fleet can only roll by taking a replica out)"))]
    pub max_unavailable: i32,
    /// Extra replicas started on spare GPUs before old ones leave. A surge gang that finds
    /// no room turns into a slot swap. Default 1.
    #[serde(default = "one")]
    #[x_kube(validation = Rule::new("self >= 0").message("updateStrategy.maxSurge must be zero or more"))]
    pub max_surge: i32,
    /// A surge gang still unplaced after this long gives way to a slot swap. Default `10s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub surge_timeout: Option<DurationString>,
    /// Hold the rollout: no new replica is drained for an update.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub paused: bool,
}

impl Default for UpdateStrategy {
    fn default() -> Self {
        Self {
            max_unavailable: 1,
            max_surge: 1,
            surge_timeout: None,
            paused: false,
        }
    }
}

/// Drain timings (the protocol of `docs/release.md`, shared with Releases). The operator
/// unserves a replica (readiness gate `sluice.dev/serving` False); with the agent it waits
/// until no new connection has reached any of the replica's pods for `quietPeriod` (at most
/// `propagationTimeout`), without it it waits `quietPeriod`; then it deletes the pods, and
/// the agent's preStop `/drain` closes the remaining connections paced.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct InferenceDrain {
    /// Default `5s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quiet_period: Option<DurationString>,
    /// Longest wait for quiet (agent only); then the replica is released anyway.
    /// Default `60s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub propagation_timeout: Option<DurationString>,
    /// Connections per second the agent closes while draining. Default 100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1").message("drain.closeRate must be at least 1 connection per second"))]
    pub close_rate: Option<i32>,
    /// Longest paced close; the pod's termination grace period is raised to cover it.
    /// Default `90s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain_timeout: Option<DurationString>,
}

/// Observed state; everything a restart needs is here or on the pods.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct InferenceSetStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Replica slots with a gang (any revision, any state).
    #[serde(default)]
    pub replicas: i32,
    /// Replicas warm and in service.
    #[serde(default)]
    pub serving_replicas: i32,
    /// Replicas on `updateRevision` (in service or not).
    #[serde(default)]
    pub updated_replicas: i32,
    /// Gangs waiting for GPUs.
    #[serde(default)]
    pub pending_gangs: i32,
    /// GPUs held by the set's bound pods.
    #[serde(default)]
    pub gpus: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_revision: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update_revision: Option<String>,
    /// Label selector of the pods (for `kubectl scale` and HPA).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// One sentence on what the set is doing or waiting for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Each replica's placement and state.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replica_status: Vec<ReplicaStatus>,
    /// Ready, Progressing, Degraded.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// One replica instance (gang).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaStatus {
    pub slot: i32,
    pub gang: String,
    pub revision: String,
    /// `Pending` (waiting for GPUs), `Starting` (bound, loading), `Warm` (gate passed,
    /// entering service), `Serving`, `Draining`, `Lost`.
    pub state: String,
    /// Pod placements, `node:gpu,gpu,...`, in pod order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub placement: Vec<String>,
    /// Pods whose containers are ready / pods in the gang.
    pub ready: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::CustomResourceExt;

    #[test]
    fn crd_carries_rules_with_messages_and_scale() {
        let crd = InferenceSet::crd();
        let yaml = serde_yaml::to_string(&crd).unwrap();
        assert!(yaml.contains("updateStrategy.maxUnavailable must be at least 1"));
        assert!(yaml.contains("template.spec.nodeName must not be set"));
        assert!(yaml.contains("topology.spread.level cannot be gpu-group"));
        assert!(yaml.contains("specReplicasPath: .spec.replicas"));
        assert!(yaml.contains("name: Serving"));
        assert_eq!(crd.spec.names.short_names, Some(vec!["infs".to_string()]));
    }

    #[test]
    fn defaults_apply_to_a_minimal_spec() {
        let spec: InferenceSetSpec = serde_json::from_value(serde_json::json!({
            "replicas": 2,
            "template": {"spec": {"containers": [{"name": "m", "image": "x"}]}}
        }))
        .unwrap();
        assert_eq!(spec.pods_per_replica, 1);
        assert_eq!(spec.gpus_per_pod, 1);
        assert_eq!(spec.update_strategy, UpdateStrategy::default());
    }
}
