//! The objects a set's spec makes (pure): its revision, the gangs' placement request, the
//! agent settings and the pods.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Container, EnvVar, EnvVarSource, ObjectFieldSelector, Pod, PodReadinessGate,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::api::ObjectMeta;
use kube::{Resource, ResourceExt};
use serde_json::json;
use sluice_placement::{GangRequest, TopologyLevel};

use crate::inference::crd::*;
use crate::inference::error::Error;
use crate::pod::duration::{DurationString, parse_duration};
use crate::pod::inject::{inject, new_drain_token};
use crate::pod::keys::{REVISION_LABEL, SERVING_CONDITION};
use crate::pod::revision::revision_hash;
use crate::pod::settings::{
    AgentImagePolicy, AgentSettings, DEFAULT_CLOSE_RATE, DEFAULT_DRAIN_TIMEOUT,
    DEFAULT_PROPAGATION_TIMEOUT, DEFAULT_REPLICA_QUIET_PERIOD, DrainSettings, default_duration,
};

/// A topology level as written in the spec.
pub fn level(s: &str) -> TopologyLevel {
    match s {
        "node" => TopologyLevel::Node,
        "gpu-group" => TopologyLevel::GpuGroup,
        key => TopologyLevel::Label(key.to_string()),
    }
}

/// The placement request of one replica (the binder adds CPU and memory from the pods).
pub fn gang_request(ns: &str, name: &str, spec: &InferenceSetSpec) -> GangRequest {
    let mut req = GangRequest::gpus(spec.pods_per_replica as u32, spec.gpus_per_pod as u32)
        .products(spec.gpu.products.clone())
        .min_memory_mib(spec.gpu.min_memory_mib.unwrap_or(0).max(0) as u64);
    if let Some(t) = &spec.topology {
        req.required = t.required.as_deref().map(level);
        req.preferred = t.preferred.as_deref().map(level);
        if let Some(sp) = &t.spread {
            req = req.spread(
                level(&sp.level),
                &format!("{ns}/{name}"),
                sp.max_skew.map(|m| m.max(1) as u32),
            );
        }
    }
    req
}

/// Revision of everything that defines a replica: template, shape, selectors, warm-up probe.
pub fn revision(spec: &InferenceSetSpec) -> String {
    let mut v = json!({
        "template": spec.template,
        "podsPerReplica": spec.pods_per_replica,
        "gpusPerPod": spec.gpus_per_pod,
        "gpu": spec.gpu,
        "topology": spec.topology,
        "probe": spec.warmup.as_ref().and_then(|w| w.probe.as_ref()),
    });
    // Only when set, so that sets without an agent keep their revision.
    if let Some(a) = &spec.agent {
        v["agent"] = json!(a);
        v["drain"] = json!({
            "closeRate": spec.drain.close_rate,
            "drainTimeout": spec.drain.drain_timeout,
        });
    }
    revision_hash(&v)
}

/// The agent and drain settings to inject, when the set asks for the agent (the pod
/// protocol's defaults; a replica's quiet period defaults longer).
pub fn agent_settings(
    spec: &InferenceSetSpec,
    default_image: &str,
) -> Option<(AgentSettings, DrainSettings)> {
    let a = spec.agent.as_ref()?;
    let d = &spec.drain;
    let dur = |v: &Option<DurationString>, default: &str| {
        v.as_ref()
            .and_then(|d| parse_duration(&d.0).ok())
            .unwrap_or_else(|| default_duration(default))
    };
    Some((
        AgentSettings::resolve(a, default_image),
        DrainSettings {
            quiet_period: dur(&d.quiet_period, DEFAULT_REPLICA_QUIET_PERIOD),
            propagation_timeout: dur(&d.propagation_timeout, DEFAULT_PROPAGATION_TIMEOUT),
            close_rate: d.close_rate.unwrap_or(DEFAULT_CLOSE_RATE),
            drain_timeout: dur(&d.drain_timeout, DEFAULT_DRAIN_TIMEOUT),
            max_concurrent: 1,
        },
    ))
}

/// One pod of gang `gang` (pure). With `spec.agent`, the template gets the agent sidecar,
/// readiness gate and preStop `/drain` exactly as a Release's pods do
/// ([`crate::pod::inject`]); the warm-up probe is set before, so that injection
/// rewrites a probe that names the port the agent takes over.
pub fn build_pod(
    set: &InferenceSet,
    gang: &str,
    slot: i32,
    rev: &str,
    index: i32,
    agent_images: &AgentImagePolicy,
) -> Result<Pod, Error> {
    let spec = &set.spec;
    let name = set.name_any();
    let ns = set.namespace().unwrap_or_default();
    let mut template = spec.template.clone();
    if let Some(probe) = spec.warmup.as_ref().and_then(|w| w.probe.clone())
        && let Some(c) = template
            .spec
            .as_mut()
            .and_then(|s| s.containers.first_mut())
    {
        c.startup_probe = Some(probe);
    }
    if let Some((agent, drain)) = agent_settings(spec, &agent_images.default_image) {
        if !agent_images.allows(&agent.image) {
            return Err(Error::Template(format!(
                "agent.image {:?} is not allowed by this operator: allowed are {} (operator flag --allowed-agent-images); leave agent.image out to use the default",
                agent.image,
                agent_images.describe()
            )));
        }
        template = inject(&template, &agent, &drain, &new_drain_token())
            .map_err(|e| Error::Template(format!("injecting the agent: {e}")))?
            .template;
    }
    let tmeta = template.metadata.clone().unwrap_or_default();
    let mut labels = tmeta.labels.unwrap_or_default();
    labels.insert(SET_LABEL.into(), name.clone());
    labels.insert(SLOT_LABEL.into(), slot.to_string());
    labels.insert(GANG_LABEL.into(), gang.into());
    labels.insert(REVISION_LABEL.into(), rev.into());
    let mut annotations = tmeta.annotations.unwrap_or_default();
    annotations.insert(
        GANG_SIZE_ANNOTATION.into(),
        spec.pods_per_replica.to_string(),
    );
    annotations.insert(GANG_INDEX_ANNOTATION.into(), index.to_string());
    annotations.insert(
        GANG_REQUEST_ANNOTATION.into(),
        serde_json::to_string(&gang_request(&ns, &name, spec))?,
    );
    let mut pspec = template
        .spec
        .ok_or(Error::Template("template.spec is missing".into()))?;
    if pspec.containers.is_empty() {
        return Err(Error::Template("template.spec.containers is empty".into()));
    }
    pspec.scheduler_name = Some(SCHEDULER_NAME.into());
    pspec.node_name = None;
    let gates = pspec.readiness_gates.get_or_insert_with(Vec::new);
    if !gates.iter().any(|g| g.condition_type == SERVING_CONDITION) {
        gates.push(PodReadinessGate {
            condition_type: SERVING_CONDITION.into(),
        });
    }
    let c: &mut Container = &mut pspec.containers[0];
    let res = c.resources.get_or_insert_with(Default::default);
    let gpus = Quantity(spec.gpus_per_pod.to_string());
    res.limits
        .get_or_insert_with(BTreeMap::new)
        .insert(GPU_RESOURCE.into(), gpus.clone());
    res.requests
        .get_or_insert_with(BTreeMap::new)
        .insert(GPU_RESOURCE.into(), gpus);
    let env = c.env.get_or_insert_with(Vec::new);
    let field = |path: &str| EnvVarSource {
        field_ref: Some(ObjectFieldSelector {
            field_path: path.into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let plain = |n: &str, v: String| EnvVar {
        name: n.into(),
        value: Some(v),
        ..Default::default()
    };
    env.retain(|e| !e.name.starts_with("SLUICE_GANG") && e.name != "SLUICE_GPU_IDS");
    env.push(EnvVar {
        name: "SLUICE_GPU_IDS".into(),
        value_from: Some(field(&format!(
            "metadata.annotations['{GPU_IDS_ANNOTATION}']"
        ))),
        ..Default::default()
    });
    env.push(plain("SLUICE_GANG", gang.into()));
    env.push(plain("SLUICE_GANG_INDEX", index.to_string()));
    env.push(plain("SLUICE_GANG_SIZE", spec.pods_per_replica.to_string()));
    Ok(Pod {
        metadata: ObjectMeta {
            name: Some(format!("{gang}-{index}")),
            namespace: Some(ns),
            labels: Some(labels),
            annotations: Some(annotations),
            owner_references: set.controller_owner_ref(&()).map(|o| vec![o]),
            ..Default::default()
        },
        spec: Some(pspec),
        status: None,
    })
}
