//! The Kubernetes objects as the placement engine sees them: a Node's capacity and
//! schedulability, a pod's usage, GPU indices and gang request, and the keys the binder
//! groups pods by. Pure; unit-tested below.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Node, ObjectReference, Pod};
use kube::Resource;
use sluice_placement::{GangRequest, GpuDemand, MIG_RESOURCE_PREFIX, MigDevices, NodeSpec};

use crate::inference::crd::{
    GANG_LABEL, GANG_REQUEST_ANNOTATION, GPU_IDS_ANNOTATION, GPU_RESOURCE, SCHEDULER_NAME,
    SET_LABEL,
};

/// Allocatable capacity of a node, from the Node object.
pub fn node_spec(node: &Node) -> Option<NodeSpec> {
    let name = node.metadata.name.clone()?;
    let alloc = node.status.as_ref().and_then(|s| s.allocatable.as_ref());
    let get = |k: &str| alloc.and_then(|a| a.get(k)).map(|q| q.0.as_str());
    let gpus = get(GPU_RESOURCE).and_then(|q| q.parse::<u32>().ok());
    Some(NodeSpec {
        name,
        labels: node.metadata.labels.clone().unwrap_or_default(),
        annotations: node.metadata.annotations.clone().unwrap_or_default(),
        gpus: Some(gpus.unwrap_or(0)),
        cpu_milli: get("cpu").and_then(parse_cpu_milli).unwrap_or(0),
        memory_mib: get("memory").and_then(parse_mem_mib).unwrap_or(0),
        // MIG `mixed` strategy: allocatable `nvidia.com/mig-<profile>` per profile.
        mig_devices: alloc
            .into_iter()
            .flatten()
            .filter_map(|(k, q)| {
                let profile = k.strip_prefix(MIG_RESOURCE_PREFIX)?;
                Some((profile.to_string(), q.0.parse::<u32>().ok()?))
            })
            .collect(),
    })
}

/// Whether new pods may go to the node: not cordoned and Ready.
pub fn node_schedulable(node: &Node) -> bool {
    let cordoned = node
        .spec
        .as_ref()
        .and_then(|s| s.unschedulable)
        .unwrap_or(false);
    let ready = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"))
        .is_some_and(|c| c.status == "True");
    !cordoned && ready
}

/// CPU quantity (`100m`, `2`, `1.5`) in milli-cores.
pub fn parse_cpu_milli(q: &str) -> Option<u64> {
    if let Some(m) = q.strip_suffix('m') {
        return m.parse().ok();
    }
    q.parse::<f64>().ok().map(|c| (c * 1000.0).round() as u64)
}

/// Memory quantity (`512Mi`, `1Gi`, `1G`, `1000000`) in MiB (rounded up).
pub fn parse_mem_mib(q: &str) -> Option<u64> {
    const UNITS: [(&str, f64); 10] = [
        ("Ki", 1024.0),
        ("Mi", 1048576.0),
        ("Gi", 1073741824.0),
        ("Ti", 1099511627776.0),
        ("k", 1e3),
        ("K", 1e3),
        ("M", 1e6),
        ("G", 1e9),
        ("T", 1e12),
        ("", 1.0),
    ];
    for (suffix, mult) in UNITS {
        if let Some(n) = q.strip_suffix(suffix)
            && let Ok(v) = n.parse::<f64>()
        {
            return Some((v * mult / 1048576.0).ceil() as u64);
        }
    }
    None
}

/// What a pod takes: whole GPUs (`nvidia.com/gpu` limits, else requests), CPU and memory
/// requests, summed over its containers.
pub fn pod_usage(pod: &Pod) -> (u32, u64, u64) {
    let mut gpus = 0u32;
    let mut cpu = 0u64;
    let mut mem = 0u64;
    for c in pod.spec.iter().flat_map(|s| s.containers.iter()) {
        let Some(r) = &c.resources else { continue };
        let req = r.requests.as_ref();
        let lim = r.limits.as_ref();
        let g = lim
            .and_then(|l| l.get(GPU_RESOURCE))
            .or_else(|| req.and_then(|l| l.get(GPU_RESOURCE)));
        gpus += g.and_then(|q| q.0.parse::<u32>().ok()).unwrap_or(0);
        cpu += req
            .and_then(|l| l.get("cpu"))
            .and_then(|q| parse_cpu_milli(&q.0))
            .unwrap_or(0);
        mem += req
            .and_then(|l| l.get("memory"))
            .and_then(|q| parse_mem_mib(&q.0))
            .unwrap_or(0);
    }
    (gpus, cpu, mem)
}

/// The MIG devices a pod takes with the `mixed` strategy: its `nvidia.com/mig-<profile>`
/// limits (else requests), summed over its containers. `Err` when it asks for more than
/// one profile (not modelled).
pub fn pod_mig(pod: &Pod) -> Result<Option<MigDevices>, String> {
    let mut by: BTreeMap<String, u32> = BTreeMap::new();
    for c in pod.spec.iter().flat_map(|s| s.containers.iter()) {
        let Some(r) = &c.resources else { continue };
        let src = r
            .limits
            .as_ref()
            .filter(|l| l.keys().any(|k| k.starts_with(MIG_RESOURCE_PREFIX)))
            .or(r.requests.as_ref());
        for (k, q) in src.into_iter().flatten() {
            if let Some(profile) = k.strip_prefix(MIG_RESOURCE_PREFIX) {
                let n =
                    q.0.parse::<u32>()
                        .map_err(|_| format!("{k}={} is not a count", q.0))?;
                *by.entry(profile.to_string()).or_default() += n;
            }
        }
    }
    by.retain(|_, n| *n > 0);
    if by.len() > 1 {
        return Err(format!(
            "pods asking for several MIG profiles ({}) are not supported",
            by.keys().cloned().collect::<Vec<_>>().join(", ")
        ));
    }
    Ok(by
        .into_iter()
        .next()
        .map(|(profile, count)| MigDevices { profile, count }))
}

/// The GPU indices in `sluice.dev/gpu-ids`.
pub fn gpu_ids(pod: &Pod) -> Option<Vec<u32>> {
    let v = pod.metadata.annotations.as_ref()?.get(GPU_IDS_ANNOTATION)?;
    if v.trim().is_empty() {
        return Some(Vec::new());
    }
    v.split(',').map(|s| s.trim().parse().ok()).collect()
}

/// The placement request of a gang: the controller's annotation, else one pod of the
/// GPUs, CPU and memory it asks for; MIG devices (`mixed` strategy) from its
/// `nvidia.com/mig-<profile>` resources.
pub fn gang_request(pod: &Pod, size: u32) -> Result<GangRequest, String> {
    let (gpus, cpu, mem) = pod_usage(pod);
    let mut req = match pod
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(GANG_REQUEST_ANNOTATION))
    {
        Some(json) => serde_json::from_str::<GangRequest>(json).map_err(|e| {
            format!("annotation {GANG_REQUEST_ANNOTATION} is not a gang request: {e}")
        })?,
        None => GangRequest::gpus(size, gpus),
    };
    req.pods = size;
    req.cpu_milli = cpu;
    req.memory_mib = mem;
    if gpus == 0 {
        req.gpu = GpuDemand::None;
    }
    req.mig_devices = pod_mig(pod)?;
    Ok(req)
}

/// Namespace and name.
pub(super) fn ns_name(p: &Pod) -> (String, String) {
    (
        p.metadata.namespace.clone().unwrap_or_default(),
        p.metadata.name.clone().unwrap_or_default(),
    )
}

/// The gang a pod belongs to: `<ns>/<gang label>`, or `<ns>/pod/<name>` for a lone pod.
pub(super) fn gang_key(p: &Pod) -> String {
    let (ns, name) = ns_name(p);
    match p.metadata.labels.as_ref().and_then(|l| l.get(GANG_LABEL)) {
        Some(g) => format!("{ns}/{g}"),
        None => format!("{ns}/pod/{name}"),
    }
}

/// The spread group of a pod (its InferenceSet): `<ns>/<set label>`.
pub(super) fn spread_group(p: &Pod) -> Option<String> {
    let set = p.metadata.labels.as_ref()?.get(SET_LABEL)?;
    Some(format!(
        "{}/{set}",
        p.metadata.namespace.as_deref().unwrap_or_default()
    ))
}

pub(super) fn annotation<'a>(p: &'a Pod, key: &str) -> Option<&'a str> {
    p.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(key))
        .map(String::as_str)
}

/// Whether the pod waits for this binder: ours, unbound, ungated, not deleted, Pending.
pub(super) fn is_pending_for_us(p: &Pod) -> bool {
    let spec = p.spec.as_ref();
    spec.and_then(|s| s.scheduler_name.as_deref()) == Some(SCHEDULER_NAME)
        && spec.and_then(|s| s.node_name.as_deref()).is_none()
        && spec
            .and_then(|s| s.scheduling_gates.as_ref())
            .is_none_or(|g| g.is_empty())
        && p.metadata.deletion_timestamp.is_none()
        && p.status
            .as_ref()
            .and_then(|s| s.phase.as_deref())
            .unwrap_or("Pending")
            == "Pending"
}

/// Whether the pod holds what it was given (not Succeeded or Failed).
pub(super) fn holds_resources(p: &Pod) -> bool {
    let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
    !matches!(phase, Some("Succeeded") | Some("Failed"))
}

/// The object an event about a pod's template belongs to: the pod's controller (e.g. its
/// InferenceSet), else the pod.
pub fn owner_reference(pod: &Pod) -> ObjectReference {
    let owner = pod
        .metadata
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true));
    match owner {
        Some(o) => ObjectReference {
            api_version: Some(o.api_version.clone()),
            kind: Some(o.kind.clone()),
            name: Some(o.name.clone()),
            namespace: pod.metadata.namespace.clone(),
            uid: Some(o.uid.clone()),
            ..Default::default()
        },
        None => pod.object_ref(&()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
    use sluice_placement::{Fleet, Placer, TopologyConfig, WorkloadProfile};

    #[test]
    fn quantities_parse() {
        assert_eq!(parse_cpu_milli("100m"), Some(100));
        assert_eq!(parse_cpu_milli("2"), Some(2000));
        assert_eq!(parse_cpu_milli("1.5"), Some(1500));
        assert_eq!(parse_mem_mib("512Mi"), Some(512));
        assert_eq!(parse_mem_mib("1Gi"), Some(1024));
        assert_eq!(parse_mem_mib("1048576"), Some(1));
        assert_eq!(parse_mem_mib("1G"), Some(954));
        assert_eq!(parse_mem_mib("x"), None);
    }

    fn gpu_pod(gpus: &str, annotations: &[(&str, &str)]) -> Pod {
        let mut p: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "ns"},
            "spec": {"containers": [{"name": "c", "resources": {
                "limits": {"nvidia.com/gpu": gpus},
                "requests": {"cpu": "500m", "memory": "1Gi"}}}]}
        }))
        .unwrap();
        p.metadata.annotations = Some(
            annotations
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
        p
    }

    #[test]
    fn usage_and_gpu_ids_come_from_the_pod() {
        let p = gpu_pod("4", &[(GPU_IDS_ANNOTATION, "4,5,6,7")]);
        assert_eq!(pod_usage(&p), (4, 500, 1024));
        assert_eq!(gpu_ids(&p), Some(vec![4, 5, 6, 7]));
        assert_eq!(gpu_ids(&gpu_pod("1", &[(GPU_IDS_ANNOTATION, "x")])), None);
        assert_eq!(gpu_ids(&gpu_pod("1", &[])), None);
    }

    #[test]
    fn gang_request_from_annotation_or_resources() {
        let plain = gang_request(&gpu_pod("2", &[]), 1).unwrap();
        assert_eq!(plain.gpu, GpuDemand::Whole(2));
        assert_eq!((plain.cpu_milli, plain.memory_mib), (500, 1024));
        let req = GangRequest::gpus(1, 4)
            .required(sluice_placement::TopologyLevel::GpuGroup)
            .products(["NVIDIA-H100-80GB-HBM3"]);
        let json = serde_json::to_string(&req).unwrap();
        let annotated =
            gang_request(&gpu_pod("4", &[(GANG_REQUEST_ANNOTATION, &json)]), 2).unwrap();
        assert_eq!(annotated.pods, 2);
        assert_eq!(
            annotated.required,
            Some(sluice_placement::TopologyLevel::GpuGroup)
        );
        assert!(gang_request(&gpu_pod("4", &[(GANG_REQUEST_ANNOTATION, "{")]), 1).is_err());
    }

    fn mig_pod(resources: serde_json::Value) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "m", "namespace": "ns"},
            "spec": {"containers": [
                {"name": "c", "resources": resources},
                {"name": "side", "resources": {"requests": {"cpu": "100m"}}}
            ]}
        }))
        .unwrap()
    }

    #[test]
    fn mig_profile_request_comes_from_the_pod_resources() {
        let p = mig_pod(serde_json::json!({"limits": {"nvidia.com/mig-1g.5gb": "2"}}));
        let want = Some(MigDevices {
            profile: "1g.5gb".into(),
            count: 2,
        });
        assert_eq!(pod_mig(&p).unwrap(), want);
        let req = gang_request(&p, 1).unwrap();
        assert_eq!(req.gpu, GpuDemand::None);
        assert_eq!(req.mig_devices, want);
        assert_eq!(req.cpu_milli, 100);
        // Requests when there are no limits.
        let p = mig_pod(serde_json::json!({"requests": {"nvidia.com/mig-3g.20gb": "1"}}));
        assert_eq!(pod_mig(&p).unwrap().unwrap().profile, "3g.20gb");
        // No MIG resource, a zero count: none.
        assert_eq!(pod_mig(&gpu_pod("1", &[])).unwrap(), None);
        let p = mig_pod(serde_json::json!({"limits": {"nvidia.com/mig-1g.5gb": "0"}}));
        assert_eq!(pod_mig(&p).unwrap(), None);
        // Two profiles in one pod: not modelled, reported.
        let p = mig_pod(serde_json::json!({"limits": {
            "nvidia.com/mig-1g.5gb": "1", "nvidia.com/mig-2g.10gb": "1"}}));
        assert!(pod_mig(&p).is_err());
        assert!(gang_request(&p, 1).is_err());
    }

    #[test]
    fn mixed_mig_node_capacity_comes_from_allocatable() {
        let n: Node = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "a100", "labels": {"nvidia.com/mig.strategy": "mixed"}},
            "status": {"allocatable": {"nvidia.com/gpu": "0",
                "nvidia.com/mig-1g.5gb": "7", "nvidia.com/mig-3g.20gb": "1"}}
        }))
        .unwrap();
        let s = node_spec(&n).unwrap();
        assert_eq!(s.gpus, Some(0));
        assert_eq!(
            s.mig_devices,
            BTreeMap::from([("1g.5gb".to_string(), 7), ("3g.20gb".to_string(), 1)])
        );
        let mut fleet = Fleet::new(TopologyConfig::default());
        fleet.add_node(s).unwrap();
        let mut placer = Placer::new(WorkloadProfile::inference_default());
        let p = mig_pod(serde_json::json!({"limits": {"nvidia.com/mig-3g.20gb": "1"}}));
        let placed = placer.place(&fleet, &gang_request(&p, 1).unwrap()).unwrap();
        fleet.allocate("x", None, &placed.pods).unwrap();
        assert!(placer.place(&fleet, &gang_request(&p, 1).unwrap()).is_err());
    }

    #[test]
    fn events_about_a_pod_template_go_to_its_controller() {
        let mut p = gpu_pod("1", &[]);
        let own = owner_reference(&p);
        assert_eq!(
            (
                own.kind.as_deref(),
                own.name.as_deref(),
                own.namespace.as_deref()
            ),
            (Some("Pod"), Some("p"), Some("ns"))
        );
        p.metadata.owner_references = Some(vec![
            k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
                api_version: "v1".into(),
                kind: "ConfigMap".into(),
                name: "not-controller".into(),
                uid: "u0".into(),
                ..Default::default()
            },
            k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
                api_version: "sluice.dev/v1alpha1".into(),
                kind: "InferenceSet".into(),
                name: "llm".into(),
                uid: "u1".into(),
                controller: Some(true),
                ..Default::default()
            },
        ]);
        let own = owner_reference(&p);
        assert_eq!(
            (
                own.kind.as_deref(),
                own.name.as_deref(),
                own.namespace.as_deref(),
                own.uid.as_deref()
            ),
            (Some("InferenceSet"), Some("llm"), Some("ns"), Some("u1"))
        );
    }

    #[test]
    fn node_capacity_and_readiness() {
        let n: Node = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "n1", "labels": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}},
            "status": {"allocatable": {"nvidia.com/gpu": "8", "cpu": "64", "memory": "512Gi"},
                       "conditions": [{"type": "Ready", "status": "True"}]}
        }))
        .unwrap();
        let s = node_spec(&n).unwrap();
        assert_eq!(
            (s.gpus, s.cpu_milli, s.memory_mib),
            (Some(8), 64000, 524288)
        );
        assert!(node_schedulable(&n));
        let mut cordoned = n.clone();
        cordoned.spec = Some(k8s_openapi::api::core::v1::NodeSpec {
            unschedulable: Some(true),
            ..Default::default()
        });
        assert!(!node_schedulable(&cordoned));
        let mut not_ready = n;
        not_ready
            .status
            .as_mut()
            .unwrap()
            .conditions
            .as_mut()
            .unwrap()[0]
            .status = "False".into();
        assert!(!node_schedulable(&not_ready));
        let _ = Quantity("1".into());
    }
}
