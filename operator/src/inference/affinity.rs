//! Node eligibility of a pod for the gang binder, as Kubernetes defines it: taints and
//! tolerations, `nodeSelector` and **required** node affinity
//! (`spec.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution`); the
//! **preferred** node affinity as tiers of nodes to try first; and the list of the pod's
//! scheduling constraints the binder does *not* honour (reported, never silently dropped).
//!
//! Preferred node affinity: a node's score is the sum of the weights of the preferred terms
//! it satisfies (kube-scheduler's NodeAffinity score before normalisation). The binder tries
//! the gang on the best-scoring eligible nodes first, then on the next score down, and so
//! on (at most [`MAX_PREFERENCE_TIERS`] tiers), and last on every eligible node: a
//! preference can never leave a gang pending. Unlike kube-scheduler, which adds the score
//! to its others, the preference comes first here and fragmentation scoring decides within
//! a tier: whoever writes "prefer these nodes" on a GPU fleet means it.
//!
//! Required node affinity follows `k8s.io/component-helpers/scheduling/corev1/nodeaffinity`:
//! the `nodeSelectorTerms` are ORed (an empty list matches no node); inside a term every
//! `matchExpressions` and `matchFields` requirement must hold (ANDed); a term with neither
//! matches no node; a term with an invalid requirement (unknown operator, `In`/`NotIn`
//! without values, `Exists`/`DoesNotExist` with values, `Gt`/`Lt` without exactly one
//! integer value, a field other than `metadata.name`) matches no node either.
//!
//! Pure functions, unit-tested below.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Affinity, Node, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm, PodSpec,
    PreferredSchedulingTerm, Taint, Toleration,
};

/// The only field `matchFields` may name.
pub const FIELD_NODE_NAME: &str = "metadata.name";

/// The pod's required node affinity, if any.
pub fn required_node_selector(affinity: Option<&Affinity>) -> Option<&NodeSelector> {
    affinity?
        .node_affinity
        .as_ref()?
        .required_during_scheduling_ignored_during_execution
        .as_ref()
}

/// Whether a node (name and labels) satisfies required node affinity; `None` (no required
/// affinity) matches every node.
pub fn required_affinity_matches(
    required: Option<&NodeSelector>,
    node_name: &str,
    labels: &BTreeMap<String, String>,
) -> bool {
    match required {
        None => true,
        Some(sel) => node_selector_matches(sel, node_name, labels),
    }
}

/// Whether a node satisfies a `NodeSelector`: any of its terms (none: no node).
pub fn node_selector_matches(
    sel: &NodeSelector,
    node_name: &str,
    labels: &BTreeMap<String, String>,
) -> bool {
    sel.node_selector_terms
        .iter()
        .any(|t| term_matches(t, node_name, labels))
}

/// Whether a node satisfies one term: all its expressions and fields. An empty term, or
/// one with an invalid requirement, matches no node.
pub fn term_matches(
    term: &NodeSelectorTerm,
    node_name: &str,
    labels: &BTreeMap<String, String>,
) -> bool {
    let exprs = term.match_expressions.as_deref().unwrap_or_default();
    let fields = term.match_fields.as_deref().unwrap_or_default();
    if exprs.is_empty() && fields.is_empty() {
        return false;
    }
    exprs
        .iter()
        .all(|r| expression_matches(r, labels) == Some(true))
        && fields
            .iter()
            .all(|r| field_matches(r, node_name) == Some(true))
}

/// One `matchExpressions` requirement against the node's labels; `None` if invalid.
pub fn expression_matches(
    req: &NodeSelectorRequirement,
    labels: &BTreeMap<String, String>,
) -> Option<bool> {
    let values = req.values.as_deref().unwrap_or_default();
    let label = labels.get(&req.key);
    match req.operator.as_str() {
        "In" | "NotIn" if values.is_empty() => None,
        "In" => Some(label.is_some_and(|v| values.contains(v))),
        "NotIn" => Some(label.is_none_or(|v| !values.contains(v))),
        "Exists" | "DoesNotExist" if !values.is_empty() => None,
        "Exists" => Some(label.is_some()),
        "DoesNotExist" => Some(label.is_none()),
        "Gt" | "Lt" => {
            let [bound] = values else { return None };
            let bound = bound.parse::<i64>().ok()?;
            // A missing or non-integer label never matches.
            let Some(v) = label.and_then(|v| v.parse::<i64>().ok()) else {
                return Some(false);
            };
            Some(if req.operator == "Gt" {
                v > bound
            } else {
                v < bound
            })
        }
        _ => None,
    }
}

/// One `matchFields` requirement against the node's name (`metadata.name`, `In`/`NotIn`
/// with exactly one value); `None` if invalid.
pub fn field_matches(req: &NodeSelectorRequirement, node_name: &str) -> Option<bool> {
    if req.key != FIELD_NODE_NAME {
        return None;
    }
    let [value] = req.values.as_deref().unwrap_or_default() else {
        return None;
    };
    match req.operator.as_str() {
        "In" => Some(node_name == value),
        "NotIn" => Some(node_name != value),
        _ => None,
    }
}

/// Whether the pod may go to the node as far as its constraints go (schedulability and
/// capacity aside): it tolerates the node's NoSchedule/NoExecute taints, the node has
/// every `nodeSelector` label, and the node satisfies the required node affinity.
pub fn pod_fits_node(spec: &PodSpec, node: &Node) -> bool {
    let taints = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_deref())
        .unwrap_or_default();
    let empty = BTreeMap::new();
    let labels = node.metadata.labels.as_ref().unwrap_or(&empty);
    let name = node.metadata.name.as_deref().unwrap_or_default();
    tolerates(taints, spec.tolerations.as_deref().unwrap_or_default())
        && spec
            .node_selector
            .iter()
            .flatten()
            .all(|(k, v)| labels.get(k) == Some(v))
        && required_affinity_matches(required_node_selector(spec.affinity.as_ref()), name, labels)
}

/// The pod's preferred node-affinity terms (none: empty).
pub fn preferred_terms(spec: &PodSpec) -> &[PreferredSchedulingTerm] {
    spec.affinity
        .as_ref()
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|n| {
            n.preferred_during_scheduling_ignored_during_execution
                .as_deref()
        })
        .unwrap_or_default()
}

/// The node's preference score for the pod: the sum of the weights of the preferred terms
/// it satisfies (a term matches as in [`term_matches`]: an empty or invalid one matches no
/// node). 0 for a pod without preferences.
pub fn preference_score(spec: &PodSpec, node: &Node) -> i64 {
    let terms = preferred_terms(spec);
    if terms.is_empty() {
        return 0;
    }
    let empty = BTreeMap::new();
    let labels = node.metadata.labels.as_ref().unwrap_or(&empty);
    let name = node.metadata.name.as_deref().unwrap_or_default();
    terms
        .iter()
        .filter(|t| term_matches(&t.preference, name, labels))
        .map(|t| i64::from(t.weight))
        .sum()
}

/// The most tiers of preferred nodes tried before all eligible nodes: each is a placement
/// attempt, so a pod with many distinct scores does not cost one attempt per score.
pub const MAX_PREFERENCE_TIERS: usize = 3;

/// The tiers to try for a pod with preferences, given every eligible node's score: for the
/// highest positive scores (at most [`MAX_PREFERENCE_TIERS`], best first), the eligible
/// nodes scoring below it, which that attempt leaves out. Empty when no node scores above
/// 0 (then preferences change nothing). The last attempt, on every eligible node, is not
/// listed.
pub fn preference_tiers(scored: &[(String, i64)]) -> Vec<Vec<String>> {
    let mut thresholds: Vec<i64> = scored.iter().map(|(_, s)| *s).filter(|s| *s > 0).collect();
    thresholds.sort_unstable_by(|a, b| b.cmp(a));
    thresholds.dedup();
    thresholds.truncate(MAX_PREFERENCE_TIERS);
    thresholds
        .into_iter()
        .map(|t| {
            scored
                .iter()
                .filter(|(_, s)| *s < t)
                .map(|(n, _)| n.clone())
                .collect()
        })
        .collect()
}

/// The key under which the binder caches the eligible nodes (and preference tiers) of a
/// pod: every input of [`pod_fits_node`] and [`preference_score`] that comes from the pod.
pub fn eligibility_key(spec: &PodSpec) -> String {
    serde_json::to_string(&(
        &spec.tolerations,
        &spec.node_selector,
        required_node_selector(spec.affinity.as_ref()),
        preferred_terms(spec),
    ))
    .unwrap_or_default()
}

/// Scheduling constraints of the pod that the binder does not honour: pod affinity, pod
/// anti-affinity, topology spread constraints. Empty when it honours everything the pod
/// asks for.
pub fn ignored_constraints(spec: &PodSpec) -> Vec<&'static str> {
    let mut out = Vec::new();
    let aff = spec.affinity.as_ref();
    // Required or preferred terms, either one non-empty.
    fn any_terms<R, P>(required: Option<&Vec<R>>, preferred: Option<&Vec<P>>) -> bool {
        required.is_some_and(|v| !v.is_empty()) || preferred.is_some_and(|v| !v.is_empty())
    }
    if let Some(pa) = aff.and_then(|a| a.pod_affinity.as_ref())
        && any_terms(
            pa.required_during_scheduling_ignored_during_execution
                .as_ref(),
            pa.preferred_during_scheduling_ignored_during_execution
                .as_ref(),
        )
    {
        out.push("pod affinity");
    }
    if let Some(pa) = aff.and_then(|a| a.pod_anti_affinity.as_ref())
        && any_terms(
            pa.required_during_scheduling_ignored_during_execution
                .as_ref(),
            pa.preferred_during_scheduling_ignored_during_execution
                .as_ref(),
        )
    {
        out.push("pod anti-affinity");
    }
    if spec
        .topology_spread_constraints
        .as_ref()
        .is_some_and(|v| !v.is_empty())
    {
        out.push("topology spread constraints");
    }
    out
}

/// Whether `tolerations` tolerate every NoSchedule/NoExecute taint.
pub fn tolerates(taints: &[Taint], tolerations: &[Toleration]) -> bool {
    taints
        .iter()
        .filter(|t| t.effect == "NoSchedule" || t.effect == "NoExecute")
        .all(|t| {
            tolerations.iter().any(|tol| {
                let effect_ok = tol
                    .effect
                    .as_deref()
                    .is_none_or(|e| e.is_empty() || e == t.effect);
                let key_ok = match tol.key.as_deref() {
                    None | Some("") => tol.operator.as_deref() == Some("Exists"),
                    Some(k) => k == t.key,
                };
                let value_ok = match tol.operator.as_deref() {
                    Some("Exists") => true,
                    _ => tol.value.as_deref().unwrap_or("") == t.value.as_deref().unwrap_or(""),
                };
                effect_ok && key_ok && value_ok
            })
        })
}

#[cfg(test)]
#[path = "affinity_tests.rs"]
mod tests;
