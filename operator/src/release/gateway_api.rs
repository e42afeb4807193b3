//! Reading and writing the weights of Gateway API routes (pure, on the route as JSON).
//!
//! `spec.rules` is an atomic list in HTTPRoute and GRPCRoute, so a server-side apply of
//! the weights would take ownership of every rule. Instead the operator writes a JSON
//! patch that touches only the two weights (and, once, adds the canary backendRef), each
//! write guarded by `test` operations on the backendRef names: a route edited meanwhile
//! (rules reordered, a backend renamed) makes the patch fail as a whole, and the next
//! round reads it again.

use serde_json::{Value, json};

/// One rule's backendRefs to the two Services, by index.
#[derive(Clone, Debug, PartialEq)]
pub struct RuleRefs {
    pub rule: usize,
    pub stable: usize,
    pub canary: Option<usize>,
    pub stable_weight: i64,
    /// 0 when the canary backendRef is missing.
    pub canary_weight: i64,
}

/// Whether `r` is a backendRef to the Service `name` in the route's namespace.
fn refers_to(r: &Value, name: &str) -> bool {
    let field = |k: &str| r.get(k).and_then(Value::as_str);
    field("name") == Some(name)
        && field("group").is_none_or(str::is_empty)
        && field("kind").is_none_or(|k| k == "Service")
        && field("namespace").is_none()
}

/// A backendRef's weight: Gateway API's default is 1.
fn weight(r: &Value) -> i64 {
    r.get("weight").and_then(Value::as_i64).unwrap_or(1)
}

/// The rules of `route` that send traffic to `stable`.
pub fn rules_of(route: &Value, stable: &str, canary: &str) -> Vec<RuleRefs> {
    let Some(rules) = route.pointer("/spec/rules").and_then(Value::as_array) else {
        return Vec::new();
    };
    rules
        .iter()
        .enumerate()
        .filter_map(|(i, rule)| {
            let refs = rule.get("backendRefs")?.as_array()?;
            let s = refs.iter().position(|r| refers_to(r, stable))?;
            let c = refs.iter().position(|r| refers_to(r, canary));
            Some(RuleRefs {
                rule: i,
                stable: s,
                canary: c,
                stable_weight: weight(&refs[s]),
                canary_weight: c.map(|c| weight(&refs[c])).unwrap_or(0),
            })
        })
        .collect()
}

/// The canary's share (percent, rounded) that `route` carries: every rule that sends
/// traffic to `stable` must carry the same one.
pub fn canary_percent(
    route: &Value,
    kind: &str,
    stable: &str,
    canary: &str,
) -> Result<i32, String> {
    let name = route
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("?");
    let rules = rules_of(route, stable, canary);
    if rules.is_empty() {
        return Err(format!(
            "no rule of {kind} {name} has a backendRef to Service {stable}: point the rules the release steers at it"
        ));
    }
    let mut found: Option<i32> = None;
    for r in &rules {
        let total = r.stable_weight + r.canary_weight;
        if total <= 0 {
            return Err(format!(
                "rule {} of {kind} {name} gives {stable} and {canary} weight 0: no traffic to steer",
                r.rule
            ));
        }
        let pct = ((r.canary_weight * 100 + total / 2) / total) as i32;
        match found {
            Some(f) if f != pct => {
                return Err(format!(
                    "the rules of {kind} {name} give the canary different shares ({f}% and {pct}%)"
                ));
            }
            _ => found = Some(pct),
        }
    }
    Ok(found.unwrap_or(0))
}

/// The JSON patch that gives the canary `percent` (and stable the rest) in every rule of
/// `route` that sends traffic to `stable`; empty when the route carries them already.
pub fn weight_patch(route: &Value, stable: &str, canary: &str, percent: i32) -> Vec<Value> {
    let percent = i64::from(percent.clamp(0, 100));
    let mut ops = Vec::new();
    for r in rules_of(route, stable, canary) {
        let refs = format!("/spec/rules/{}/backendRefs", r.rule);
        let has_weights = route
            .pointer(&format!("{refs}/{}/weight", r.stable))
            .is_some();
        if r.canary.is_some()
            && has_weights
            && r.stable_weight == 100 - percent
            && r.canary_weight == percent
        {
            continue;
        }
        ops.push(
            json!({"op": "test", "path": format!("{refs}/{}/name", r.stable), "value": stable}),
        );
        ops.push(json!({"op": "add", "path": format!("{refs}/{}/weight", r.stable), "value": 100 - percent}));
        match r.canary {
            Some(c) => {
                ops.push(
                    json!({"op": "test", "path": format!("{refs}/{c}/name"), "value": canary}),
                );
                ops.push(
                    json!({"op": "add", "path": format!("{refs}/{c}/weight"), "value": percent}),
                );
            }
            None => {
                let mut backend = json!({"name": canary, "weight": percent});
                if let Some(port) = route.pointer(&format!("{refs}/{}/port", r.stable)) {
                    backend["port"] = port.clone();
                }
                ops.push(json!({"op": "add", "path": format!("{refs}/-"), "value": backend}));
            }
        }
    }
    ops
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Apply `ops` the way the apiserver does (all or nothing).
    fn apply(doc: &mut Value, ops: Vec<Value>) -> Result<(), json_patch::PatchError> {
        let patch: json_patch::Patch = serde_json::from_value(Value::Array(ops)).unwrap();
        json_patch::patch(doc, &patch)
    }

    fn route(rules: Value) -> Value {
        json!({"metadata": {"name": "web"}, "spec": {"rules": rules}})
    }

    #[test]
    fn a_route_with_only_the_stable_backend_carries_zero_percent() {
        let r = route(json!([{"backendRefs": [{"name": "web-stable", "port": 80}]}]));
        assert_eq!(
            canary_percent(&r, "HTTPRoute", "web-stable", "web-canary"),
            Ok(0)
        );
    }

    #[test]
    fn weights_are_read_as_shares_with_gateway_api_defaults() {
        // No weight means 1 each: half and half.
        let r = route(json!([{"backendRefs": [{"name": "web-stable"}, {"name": "web-canary"}]}]));
        assert_eq!(
            canary_percent(&r, "HTTPRoute", "web-stable", "web-canary"),
            Ok(50)
        );
        let r = route(json!([{"backendRefs": [
            {"name": "web-stable", "weight": 900}, {"name": "web-canary", "weight": 100}]}]));
        assert_eq!(
            canary_percent(&r, "HTTPRoute", "web-stable", "web-canary"),
            Ok(10)
        );
    }

    #[test]
    fn rules_that_disagree_or_carry_nothing_are_reported() {
        let r = route(json!([
            {"backendRefs": [{"name": "web-stable", "weight": 90}, {"name": "web-canary", "weight": 10}]},
            {"backendRefs": [{"name": "web-stable", "weight": 50}, {"name": "web-canary", "weight": 50}]},
        ]));
        let e = canary_percent(&r, "HTTPRoute", "web-stable", "web-canary").unwrap_err();
        assert!(e.contains("different shares"), "{e}");
        let r = route(json!([{"backendRefs": [{"name": "web-stable", "weight": 0}]}]));
        let e = canary_percent(&r, "HTTPRoute", "web-stable", "web-canary").unwrap_err();
        assert!(e.contains("weight 0"), "{e}");
        let r = route(json!([{"backendRefs": [{"name": "other"}]}]));
        let e = canary_percent(&r, "GRPCRoute", "web-stable", "web-canary").unwrap_err();
        assert!(
            e.contains("GRPCRoute web") && e.contains("web-stable"),
            "{e}"
        );
    }

    #[test]
    fn refs_to_other_kinds_or_namespaces_are_not_ours() {
        let r = route(json!([{"backendRefs": [
            {"name": "web-stable", "kind": "ServiceImport", "group": "multicluster.x-k8s.io"},
            {"name": "web-stable", "namespace": "elsewhere"},
        ]}]));
        assert!(rules_of(&r, "web-stable", "web-canary").is_empty());
    }

    #[test]
    fn the_patch_writes_only_the_two_weights_guarded_by_the_names() {
        let r = route(json!([
            {"matches": [{"path": {"value": "/"}}], "backendRefs": [
                {"name": "other", "weight": 5},
                {"name": "web-stable", "port": 80, "weight": 100},
                {"name": "web-canary", "port": 80, "weight": 0}]},
            {"backendRefs": [{"name": "unrelated"}]},
        ]));
        let ops = weight_patch(&r, "web-stable", "web-canary", 10);
        assert_eq!(
            ops,
            vec![
                json!({"op": "test", "path": "/spec/rules/0/backendRefs/1/name", "value": "web-stable"}),
                json!({"op": "add", "path": "/spec/rules/0/backendRefs/1/weight", "value": 90}),
                json!({"op": "test", "path": "/spec/rules/0/backendRefs/2/name", "value": "web-canary"}),
                json!({"op": "add", "path": "/spec/rules/0/backendRefs/2/weight", "value": 10}),
            ]
        );
        let mut patched = r.clone();
        apply(&mut patched, ops).unwrap();
        assert_eq!(
            canary_percent(&patched, "HTTPRoute", "web-stable", "web-canary"),
            Ok(10)
        );
        // Nothing else changed.
        assert_eq!(
            patched["spec"]["rules"][0]["backendRefs"][0],
            r["spec"]["rules"][0]["backendRefs"][0]
        );
        assert_eq!(patched["spec"]["rules"][1], r["spec"]["rules"][1]);
        assert!(weight_patch(&patched, "web-stable", "web-canary", 10).is_empty());
    }

    #[test]
    fn a_missing_canary_backend_is_added_with_the_stable_port() {
        let r = route(json!([{"backendRefs": [{"name": "web-stable", "port": 8080}]}]));
        let ops = weight_patch(&r, "web-stable", "web-canary", 0);
        let mut patched = r.clone();
        apply(&mut patched, ops).unwrap();
        assert_eq!(
            patched["spec"]["rules"][0]["backendRefs"][1],
            json!({"name": "web-canary", "port": 8080, "weight": 0})
        );
        assert_eq!(
            patched["spec"]["rules"][0]["backendRefs"][0]["weight"],
            json!(100)
        );
    }

    #[test]
    fn a_route_changed_under_the_patch_fails_its_tests() {
        let r = route(json!([{"backendRefs": [{"name": "web-stable"}, {"name": "web-canary"}]}]));
        let ops = weight_patch(&r, "web-stable", "web-canary", 25);
        // Someone swapped the backends meanwhile.
        let mut changed =
            route(json!([{"backendRefs": [{"name": "web-canary"}, {"name": "web-stable"}]}]));
        let res = apply(&mut changed, ops);
        assert!(res.is_err());
    }

    /// `examples/gateway-api/`: the Release is valid, and its route is steerable as written.
    #[test]
    fn the_example_release_and_route_fit_together() {
        let release: crate::release::Release =
            serde_yaml::from_str(include_str!("../../../examples/gateway-api/release.yaml"))
                .unwrap();
        let settings =
            crate::release::settings::Settings::from_spec(&release.spec, "agent:test").unwrap();
        let r = settings.routing.unwrap();
        assert_eq!(r.verify.as_ref().unwrap().tolerance, 2.0);
        let route: Value =
            serde_yaml::from_str(include_str!("../../../examples/gateway-api/route.yaml")).unwrap();
        assert_eq!(route["metadata"]["name"], json!(r.routes[0].name));
        let (stable, canary) = (r.stable_service(), r.canary_service());
        assert_eq!(canary_percent(&route, "HTTPRoute", &stable, &canary), Ok(0));
        let ops = weight_patch(&route, &stable, &canary, 1);
        let mut patched = route.clone();
        apply(&mut patched, ops).unwrap();
        assert_eq!(
            canary_percent(&patched, "HTTPRoute", &stable, &canary),
            Ok(1)
        );
    }
}
