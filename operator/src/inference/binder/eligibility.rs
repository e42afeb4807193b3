//! Where a gang may go, decided per pod spec and passed to the placer as the nodes it
//! leaves out (the fleet itself is never changed for it).

use std::sync::Arc;

use k8s_openapi::api::core::v1::{Node, PodSpec};

use super::objects::node_schedulable;
use crate::inference::affinity;

/// Where a pod may go: the schedulable nodes it may not use (taints, `nodeSelector`,
/// required node affinity), and the preference tiers among the others.
pub(super) struct Eligibility {
    pub excluded: Vec<String>,
    /// Per attempt before the last, the eligible nodes it leaves out
    /// ([`affinity::preference_tiers`]).
    pub tiers: Vec<Vec<String>>,
}

impl Eligibility {
    /// The eligibility of a pod with this spec among `nodes`.
    pub fn of(spec: &PodSpec, nodes: &[Arc<Node>]) -> Eligibility {
        let mut excluded = Vec::new();
        let mut scored = Vec::new();
        let prefers = !affinity::preferred_terms(spec).is_empty();
        for n in nodes.iter().filter(|n| node_schedulable(n)) {
            let Some(name) = n.metadata.name.clone() else {
                continue;
            };
            if !affinity::pod_fits_node(spec, n) {
                excluded.push(name);
            } else if prefers {
                scored.push((name, affinity::preference_score(spec, n)));
            }
        }
        Eligibility {
            excluded,
            tiers: affinity::preference_tiers(&scored),
        }
    }
}

impl Eligibility {
    /// The attempts of a placement, in order: per preference tier the nodes it leaves out
    /// (the ineligible ones and the less preferred ones), then only the ineligible ones.
    pub fn attempts(&self) -> impl Iterator<Item = Vec<&str>> + '_ {
        let excluded = || self.excluded.iter().map(String::as_str);
        self.tiers
            .iter()
            .map(move |less| excluded().chain(less.iter().map(String::as_str)).collect())
    }
}
