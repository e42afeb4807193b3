//! Node eligibility and preference, case by case.

use super::*;
use serde_json::json;

fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
    kv.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn req(key: &str, op: &str, values: &[&str]) -> NodeSelectorRequirement {
    NodeSelectorRequirement {
        key: key.into(),
        operator: op.into(),
        values: Some(values.iter().map(|v| v.to_string()).collect()),
    }
}

fn term(exprs: Vec<NodeSelectorRequirement>) -> NodeSelectorTerm {
    NodeSelectorTerm {
        match_expressions: Some(exprs),
        match_fields: None,
    }
}

fn sel(terms: Vec<NodeSelectorTerm>) -> NodeSelector {
    NodeSelector {
        node_selector_terms: terms,
    }
}

fn one(r: NodeSelectorRequirement, l: &BTreeMap<String, String>) -> bool {
    node_selector_matches(&sel(vec![term(vec![r])]), "n1", l)
}

#[test]
fn in_operator() {
    let l = labels(&[("gpu", "h100")]);
    assert!(one(req("gpu", "In", &["a100", "h100"]), &l));
    assert!(!one(req("gpu", "In", &["a100"]), &l));
    // Missing label: In never matches.
    assert!(!one(req("zone", "In", &["a"]), &l));
    // In without values is invalid: no match.
    assert!(!one(req("gpu", "In", &[]), &l));
}

#[test]
fn not_in_operator() {
    let l = labels(&[("gpu", "h100")]);
    assert!(!one(req("gpu", "NotIn", &["h100", "a100"]), &l));
    assert!(one(req("gpu", "NotIn", &["a100"]), &l));
    // Missing label: NotIn matches (as in Kubernetes).
    assert!(one(req("zone", "NotIn", &["a"]), &l));
    assert!(!one(req("gpu", "NotIn", &[]), &l));
}

#[test]
fn exists_and_does_not_exist() {
    let l = labels(&[("gpu", "")]);
    assert!(one(req("gpu", "Exists", &[]), &l));
    assert!(!one(req("zone", "Exists", &[]), &l));
    assert!(!one(req("gpu", "DoesNotExist", &[]), &l));
    assert!(one(req("zone", "DoesNotExist", &[]), &l));
    // Values with Exists/DoesNotExist are invalid.
    assert!(!one(req("gpu", "Exists", &["x"]), &l));
    assert!(!one(req("zone", "DoesNotExist", &["x"]), &l));
    // `values: null` is the same as no values.
    let mut r = req("gpu", "Exists", &[]);
    r.values = None;
    assert!(one(r, &l));
}

#[test]
fn gt_and_lt_compare_integers() {
    let l = labels(&[("gpus", "8"), ("neg", "-3"), ("text", "eight")]);
    assert!(one(req("gpus", "Gt", &["4"]), &l));
    assert!(!one(req("gpus", "Gt", &["8"]), &l));
    assert!(one(req("gpus", "Lt", &["9"]), &l));
    assert!(!one(req("gpus", "Lt", &["8"]), &l));
    assert!(one(req("neg", "Lt", &["0"]), &l));
    assert!(one(req("neg", "Gt", &["-4"]), &l));
    // Integers, not strings: "10" > "9".
    assert!(one(req("gpus", "Lt", &["10"]), &labels(&[("gpus", "9")])));
    // Missing or non-integer label: no match.
    assert!(!one(req("missing", "Gt", &["0"]), &l));
    assert!(!one(req("text", "Gt", &["0"]), &l));
    assert!(!one(req("text", "Lt", &["100"]), &l));
    // Invalid requirement: not one integer value.
    assert!(!one(req("gpus", "Gt", &["x"]), &l));
    assert!(!one(req("gpus", "Gt", &[]), &l));
    assert!(!one(req("gpus", "Gt", &["1", "2"]), &l));
    assert!(!one(req("gpus", "Lt", &["1.5"]), &l));
}

#[test]
fn unknown_operator_matches_nothing() {
    let l = labels(&[("gpu", "h100")]);
    assert!(!one(req("gpu", "Equals", &["h100"]), &l));
    // ...and poisons its whole term.
    let t = term(vec![
        req("gpu", "Exists", &[]),
        req("gpu", "Equals", &["h100"]),
    ]);
    assert!(!node_selector_matches(&sel(vec![t]), "n1", &l));
}

#[test]
fn expressions_of_a_term_are_anded() {
    let l = labels(&[("gpu", "h100"), ("zone", "a")]);
    let both = term(vec![req("gpu", "In", &["h100"]), req("zone", "In", &["a"])]);
    assert!(node_selector_matches(&sel(vec![both]), "n1", &l));
    let one_fails = term(vec![req("gpu", "In", &["h100"]), req("zone", "In", &["b"])]);
    assert!(!node_selector_matches(&sel(vec![one_fails]), "n1", &l));
}

#[test]
fn terms_are_ored() {
    let l = labels(&[("zone", "b")]);
    let s = sel(vec![
        term(vec![req("zone", "In", &["a"])]),
        term(vec![req("zone", "In", &["b"])]),
    ]);
    assert!(node_selector_matches(&s, "n1", &l));
    let s = sel(vec![
        term(vec![req("zone", "In", &["a"])]),
        term(vec![req("zone", "In", &["c"])]),
    ]);
    assert!(!node_selector_matches(&s, "n1", &l));
    // An empty (or invalid) term does not make the others fail.
    let s = sel(vec![
        NodeSelectorTerm::default(),
        term(vec![req("zone", "Bogus", &[])]),
        term(vec![req("zone", "In", &["b"])]),
    ]);
    assert!(node_selector_matches(&s, "n1", &l));
}

#[test]
fn empty_terms_match_nothing() {
    let l = labels(&[("zone", "a")]);
    // No terms at all.
    assert!(!node_selector_matches(&sel(vec![]), "n1", &l));
    // A term with neither expressions nor fields (null or empty lists).
    assert!(!node_selector_matches(
        &sel(vec![NodeSelectorTerm::default()]),
        "n1",
        &l
    ));
    let empty_lists = NodeSelectorTerm {
        match_expressions: Some(vec![]),
        match_fields: Some(vec![]),
    };
    assert!(!node_selector_matches(&sel(vec![empty_lists]), "n1", &l));
    // No required affinity at all matches every node.
    assert!(required_affinity_matches(None, "n1", &l));
}

#[test]
fn match_fields_on_the_node_name() {
    let l = labels(&[]);
    let f = |op: &str, values: &[&str]| NodeSelectorTerm {
        match_expressions: None,
        match_fields: Some(vec![req(FIELD_NODE_NAME, op, values)]),
    };
    assert!(node_selector_matches(
        &sel(vec![f("In", &["n1"])]),
        "n1",
        &l
    ));
    assert!(!node_selector_matches(
        &sel(vec![f("In", &["n2"])]),
        "n1",
        &l
    ));
    assert!(node_selector_matches(
        &sel(vec![f("NotIn", &["n2"])]),
        "n1",
        &l
    ));
    assert!(!node_selector_matches(
        &sel(vec![f("NotIn", &["n1"])]),
        "n1",
        &l
    ));
    // Exactly one value, In/NotIn only, metadata.name only.
    assert!(!node_selector_matches(
        &sel(vec![f("In", &["n1", "n2"])]),
        "n1",
        &l
    ));
    assert!(!node_selector_matches(&sel(vec![f("In", &[])]), "n1", &l));
    assert!(!node_selector_matches(
        &sel(vec![f("Exists", &[])]),
        "n1",
        &l
    ));
    let other = NodeSelectorTerm {
        match_expressions: None,
        match_fields: Some(vec![req("metadata.namespace", "In", &["n1"])]),
    };
    assert!(!node_selector_matches(&sel(vec![other]), "n1", &l));
    // Fields and expressions of one term are ANDed.
    let mixed = NodeSelectorTerm {
        match_expressions: Some(vec![req("zone", "In", &["a"])]),
        match_fields: Some(vec![req(FIELD_NODE_NAME, "In", &["n1"])]),
    };
    assert!(node_selector_matches(
        &sel(vec![mixed.clone()]),
        "n1",
        &labels(&[("zone", "a")])
    ));
    assert!(!node_selector_matches(
        &sel(vec![mixed.clone()]),
        "n2",
        &labels(&[("zone", "a")])
    ));
    assert!(!node_selector_matches(
        &sel(vec![mixed]),
        "n1",
        &labels(&[("zone", "b")])
    ));
}

fn node(name: &str, l: &[(&str, &str)], taints: serde_json::Value) -> Node {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": labels(l)},
        "spec": {"taints": taints},
    }))
    .unwrap()
}

fn pod_spec(v: serde_json::Value) -> PodSpec {
    let mut v = v;
    v["containers"] = json!([{"name": "c"}]);
    serde_json::from_value(v).unwrap()
}

#[test]
fn affinity_combines_with_node_selector_and_taints() {
    let spec = pod_spec(json!({
        "nodeSelector": {"pool": "gpu"},
        "tolerations": [{"key": "kwok.x-k8s.io/node", "operator": "Exists", "effect": "NoSchedule"}],
        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [
                {"matchExpressions": [
                    {"key": "gpu-class", "operator": "NotIn", "values": ["excluded"]},
                    {"key": "nvidia.com/gpu.count", "operator": "Gt", "values": ["4"]}]},
                {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["special"]}]}
            ]}}}
    }));
    let kwok = json!([{"key": "kwok.x-k8s.io/node", "value": "fake", "effect": "NoSchedule"}]);
    let ok = node(
        "a",
        &[("pool", "gpu"), ("nvidia.com/gpu.count", "8")],
        kwok.clone(),
    );
    assert!(pod_fits_node(&spec, &ok));
    // Excluded by the affinity's NotIn.
    let excluded = node(
        "b",
        &[
            ("pool", "gpu"),
            ("nvidia.com/gpu.count", "8"),
            ("gpu-class", "excluded"),
        ],
        kwok.clone(),
    );
    assert!(!pod_fits_node(&spec, &excluded));
    // Excluded by Gt (4 GPUs is not > 4).
    let small = node(
        "c",
        &[("pool", "gpu"), ("nvidia.com/gpu.count", "4")],
        kwok.clone(),
    );
    assert!(!pod_fits_node(&spec, &small));
    // The second term (by name) lets this one in despite failing the first.
    let special = node(
        "special",
        &[("pool", "gpu"), ("gpu-class", "excluded")],
        kwok.clone(),
    );
    assert!(pod_fits_node(&spec, &special));
    // Affinity passes but nodeSelector fails.
    let other_pool = node("d", &[("pool", "cpu"), ("nvidia.com/gpu.count", "8")], kwok);
    assert!(!pod_fits_node(&spec, &other_pool));
    // Affinity and nodeSelector pass but a taint is not tolerated.
    let tainted = node(
        "e",
        &[("pool", "gpu"), ("nvidia.com/gpu.count", "8")],
        json!([{"key": "maintenance", "value": "yes", "effect": "NoExecute"}]),
    );
    assert!(!pod_fits_node(&spec, &tainted));
    // Without affinity the excluded and small nodes fit.
    let mut plain = spec.clone();
    plain.affinity = None;
    assert!(pod_fits_node(&plain, &excluded) && pod_fits_node(&plain, &small));
    // Only preferred affinity: every node fits (preferences are not filters).
    let preferred = pod_spec(json!({
        "affinity": {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
            {"weight": 1, "preference": {"matchExpressions": [
                {"key": "gpu-class", "operator": "In", "values": ["nope"]}]}}]}}
    }));
    assert!(pod_fits_node(&preferred, &node("f", &[], json!([]))));
}

#[test]
fn eligibility_key_covers_the_required_affinity() {
    let a = pod_spec(json!({"affinity": {"nodeAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": "z", "operator": "In", "values": ["a"]}]}]}}}}));
    let b = pod_spec(json!({"affinity": {"nodeAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": "z", "operator": "In", "values": ["b"]}]}]}}}}));
    let none = pod_spec(json!({}));
    assert_ne!(eligibility_key(&a), eligibility_key(&b));
    assert_ne!(eligibility_key(&a), eligibility_key(&none));
    // Preferences do not change eligibility, so not the key either.
    let pref = pod_spec(json!({"affinity": {"podAntiAffinity": {
        "preferredDuringSchedulingIgnoredDuringExecution": []}}}));
    assert_eq!(eligibility_key(&pref), eligibility_key(&none));
}

#[test]
fn ignored_constraints_are_listed() {
    assert!(ignored_constraints(&pod_spec(json!({}))).is_empty());
    let required_only = pod_spec(json!({"affinity": {"nodeAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": "z", "operator": "Exists"}]}]}}}}));
    assert!(ignored_constraints(&required_only).is_empty());
    let all = pod_spec(json!({
        "affinity": {
            "nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
                {"weight": 1, "preference": {"matchExpressions": [
                    {"key": "z", "operator": "Exists"}]}}]},
            "podAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
                {"topologyKey": "kubernetes.io/hostname",
                 "labelSelector": {"matchLabels": {"app": "x"}}}]},
            "podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
                {"weight": 1, "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname"}}]}
        },
        "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "zone",
            "whenUnsatisfiable": "DoNotSchedule"}]
    }));
    assert_eq!(
        ignored_constraints(&all),
        vec![
            "pod affinity",
            "pod anti-affinity",
            "topology spread constraints"
        ]
    );
    // Empty lists ask for nothing.
    let empty = pod_spec(json!({"affinity": {"podAffinity": {}, "podAntiAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": []}},
        "topologySpreadConstraints": []}));
    assert!(ignored_constraints(&empty).is_empty());
}

fn preferring(terms: serde_json::Value) -> PodSpec {
    pod_spec(json!({"affinity": {"nodeAffinity": {
        "preferredDuringSchedulingIgnoredDuringExecution": terms}}}))
}

#[test]
fn preference_score_sums_the_weights_of_matching_terms() {
    let spec = preferring(json!([
        {"weight": 80, "preference": {"matchExpressions": [
            {"key": "tier", "operator": "In", "values": ["fast"]}]}},
        {"weight": 20, "preference": {"matchExpressions": [
            {"key": "zone", "operator": "In", "values": ["a"]}]}},
        {"weight": 5, "preference": {"matchFields": [
            {"key": "metadata.name", "operator": "In", "values": ["n3"]}]}},
        // Empty and invalid terms match no node.
        {"weight": 100, "preference": {}},
        {"weight": 100, "preference": {"matchExpressions": [
            {"key": "zone", "operator": "Near", "values": ["a"]}]}}
    ]));
    let fast_a = node("n1", &[("tier", "fast"), ("zone", "a")], json!([]));
    let fast_b = node("n2", &[("tier", "fast"), ("zone", "b")], json!([]));
    let slow_a_n3 = node("n3", &[("tier", "slow"), ("zone", "a")], json!([]));
    let bare = node("n4", &[], json!([]));
    assert_eq!(preference_score(&spec, &fast_a), 100);
    assert_eq!(preference_score(&spec, &fast_b), 80);
    assert_eq!(preference_score(&spec, &slow_a_n3), 25);
    assert_eq!(preference_score(&spec, &bare), 0);
    // No preferences: every node scores 0.
    assert_eq!(preference_score(&pod_spec(json!({})), &fast_a), 0);
}

fn scored(v: &[(&str, i64)]) -> Vec<(String, i64)> {
    v.iter().map(|(n, s)| (n.to_string(), *s)).collect()
}

#[test]
fn preference_tiers_go_from_the_best_score_down() {
    let tiers = preference_tiers(&scored(&[("a", 80), ("b", 20), ("c", 0), ("d", 80)]));
    assert_eq!(
        tiers,
        vec![
            vec!["b".to_string(), "c".to_string()],
            vec!["c".to_string()]
        ]
    );
}

#[test]
fn preference_tiers_are_empty_without_a_positive_score() {
    assert!(preference_tiers(&scored(&[("a", 0), ("b", 0)])).is_empty());
    assert!(preference_tiers(&[]).is_empty());
}

#[test]
fn preference_tiers_are_capped() {
    let tiers = preference_tiers(&scored(&[("a", 4), ("b", 3), ("c", 2), ("d", 1)]));
    assert_eq!(tiers.len(), MAX_PREFERENCE_TIERS);
    // The last tier tried keeps the three best nodes; after it comes every node.
    assert_eq!(tiers[MAX_PREFERENCE_TIERS - 1], vec!["d".to_string()]);
}

#[test]
fn eligibility_key_covers_the_preferences() {
    let a = preferring(json!([{"weight": 1, "preference": {"matchExpressions": [
        {"key": "z", "operator": "Exists"}]}}]));
    let b = preferring(json!([{"weight": 2, "preference": {"matchExpressions": [
        {"key": "z", "operator": "Exists"}]}}]));
    assert_ne!(eligibility_key(&a), eligibility_key(&b));
    assert_ne!(eligibility_key(&a), eligibility_key(&pod_spec(json!({}))));
}

fn taint(key: &str, value: &str, effect: &str) -> Taint {
    Taint {
        key: key.into(),
        value: Some(value.into()),
        effect: effect.into(),
        ..Default::default()
    }
}

#[test]
fn kwok_taint_needs_a_toleration() {
    let t = vec![taint("kwok.x-k8s.io/node", "fake", "NoSchedule")];
    assert!(!tolerates(&t, &[]));
    let exists = Toleration {
        key: Some("kwok.x-k8s.io/node".into()),
        operator: Some("Exists".into()),
        effect: Some("NoSchedule".into()),
        ..Default::default()
    };
    assert!(tolerates(&t, std::slice::from_ref(&exists)));
    let wrong_value = Toleration {
        key: Some("kwok.x-k8s.io/node".into()),
        operator: Some("Equal".into()),
        value: Some("real".into()),
        ..Default::default()
    };
    assert!(!tolerates(&t, &[wrong_value]));
    let all = Toleration {
        operator: Some("Exists".into()),
        ..Default::default()
    };
    assert!(tolerates(&t, &[all]));
    // PreferNoSchedule never blocks.
    assert!(tolerates(&[taint("a", "b", "PreferNoSchedule")], &[]));
}
