//! Gather: a pod as the planner sees it, and node readiness from the shared cache.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::runtime::reflector::Store;

use crate::inference::crd::*;
use crate::inference::plan::{self, PodView};
use crate::pod::keys::{DRAIN_STARTED_ANNOTATION, REVISION_LABEL, SERVING_CONDITION};
use crate::pod::time::parse_rfc3339;

/// A pod as the planner sees it (pure).
pub fn pod_view(
    p: &Pod,
    nodes: &BTreeMap<String, Option<f64>>,
    now: f64,
    grace: f64,
) -> Option<PodView> {
    let labels = p.metadata.labels.as_ref()?;
    let ann = p.metadata.annotations.clone().unwrap_or_default();
    let status = p.status.as_ref();
    let conds = status.and_then(|s| s.conditions.as_ref());
    let cond = |t: &str| conds.and_then(|cs| cs.iter().find(|c| c.type_ == t));
    let node = p.spec.as_ref().and_then(|s| s.node_name.clone());
    let node_lost = node.as_ref().is_some_and(|n| match nodes.get(n) {
        None => true,
        Some(nr) => plan::node_lost(true, *nr, now, grace),
    });
    let phase = status.and_then(|s| s.phase.as_deref()).unwrap_or("Pending");
    Some(PodView {
        name: p.metadata.name.clone()?,
        slot: labels.get(SLOT_LABEL)?.parse().ok()?,
        gang: labels.get(GANG_LABEL)?.clone(),
        revision: labels.get(REVISION_LABEL)?.clone(),
        index: ann
            .get(GANG_INDEX_ANNOTATION)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
        gang_size: ann
            .get(GANG_SIZE_ANNOTATION)
            .and_then(|v| v.parse().ok())
            .unwrap_or(1),
        created: p
            .metadata
            .creation_timestamp
            .as_ref()
            .map(|t| t.0.as_millisecond() as f64 / 1000.0)
            .unwrap_or(now),
        node,
        gpu_ids: crate::inference::binder::gpu_ids(p).unwrap_or_default(),
        deleting: p.metadata.deletion_timestamp.is_some(),
        finished: phase == "Failed" || phase == "Succeeded",
        containers_ready: cond("ContainersReady").is_some_and(|c| c.status == "True"),
        serving: cond(SERVING_CONDITION).map(|c| c.status == "True"),
        ready: cond("Ready").is_some_and(|c| c.status == "True"),
        drain_started: ann
            .get(DRAIN_STARTED_ANNOTATION)
            .and_then(|v| parse_rfc3339(v)),
        warm: ann.contains_key(WARM_ANNOTATION),
        unschedulable: cond("PodScheduled")
            .filter(|c| c.status == "False")
            .and_then(|c| c.message.clone()),
        node_lost,
        signals: None,
    })
}

/// Node name → when it turned NotReady (`None`: Ready).
pub(super) fn node_readiness(nodes: &Store<Node>) -> BTreeMap<String, Option<f64>> {
    nodes
        .state()
        .iter()
        .filter_map(|n| {
            let ready = n
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"));
            let since = match ready {
                Some(c) if c.status == "True" => None,
                Some(c) => Some(
                    c.last_transition_time
                        .as_ref()
                        .map(|t| t.0.as_millisecond() as f64 / 1000.0)
                        .unwrap_or(0.0),
                ),
                None => None,
            };
            Some((n.metadata.name.clone()?, since))
        })
        .collect()
}
