//! Reading and writing the weights of Gateway API routes (pure, on the route as JSON).
//!
//! `spec.rules` is an atomic list in HTTPRoute and GRPCRoute, so a server-side apply of
//! the weights would take ownership of every rule. Instead the operator writes a JSON
//! patch that touches only the two weights (and, once, adds the canary backendRef), each
//! write guarded by `test` operations on the backendRef names: a route edited meanwhile
//! (rules reordered, a backend renamed) makes the patch fail as a whole, and the next
//! round reads it again.

use serde_json::{Value, json};

use crate::release::crd::{HeaderMatch, HeaderMatchType};

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

/// Name prefix of the rules the operator adds for a header route (`<prefix><i>`, one per
/// steered rule `i`).
pub const HEADER_RULE_PREFIX: &str = "sluice-canary-";

fn is_header_rule(rule: &Value) -> bool {
    rule.get("name")
        .and_then(Value::as_str)
        .is_some_and(|n| n.starts_with(HEADER_RULE_PREFIX))
}

/// The rules that send requests carrying `headers` to `canary`: one per rule steered
/// between `stable` and `canary`, with that rule's matches (each with the headers added),
/// filters and timeouts, and the canary's backendRef alone.
fn header_rules(route: &Value, stable: &str, canary: &str, headers: &[HeaderMatch]) -> Vec<Value> {
    if headers.is_empty() {
        return Vec::new();
    }
    let ours: Vec<Value> = headers
        .iter()
        .map(|h| {
            let mut m = json!({"name": h.name, "value": h.value});
            if h.match_type == Some(HeaderMatchType::RegularExpression) {
                m["type"] = "RegularExpression".into();
            }
            m
        })
        .collect();
    let rules = route.pointer("/spec/rules").and_then(Value::as_array);
    rules_of(route, stable, canary)
        .into_iter()
        .filter_map(|r| {
            let rule = rules?.get(r.rule)?;
            let matches: Vec<Value> = match rule.get("matches").and_then(Value::as_array) {
                Some(ms) if !ms.is_empty() => ms.clone(),
                _ => vec![json!({})],
            };
            let matches: Vec<Value> = matches
                .into_iter()
                .map(|mut m| {
                    let mut hs = m
                        .get("headers")
                        .and_then(Value::as_array)
                        .cloned()
                        .unwrap_or_default();
                    hs.extend(ours.iter().cloned());
                    m["headers"] = Value::Array(hs);
                    m
                })
                .collect();
            let mut backend = rule.get("backendRefs")?.get(r.stable)?.clone();
            backend["name"] = canary.into();
            if let Some(b) = backend.as_object_mut() {
                b.remove("weight");
            }
            let mut new = json!({
                "name": format!("{HEADER_RULE_PREFIX}{}", r.rule),
                "matches": matches,
                "backendRefs": [backend],
            });
            for field in ["filters", "timeouts"] {
                if let Some(v) = rule.get(field) {
                    new[field] = v.clone();
                }
            }
            Some(new)
        })
        .collect()
}

/// The header matches `route`'s header rules carry (empty: none); `None` when they are
/// not the ones the operator writes (edited by hand, or the steered rules changed since).
/// Read leniently: the apiserver fills in Gateway API defaults (`type: Exact`, a path
/// match, the backendRef's kind and weight) that the operator did not write.
pub fn header_route_of(route: &Value, stable: &str, canary: &str) -> Option<Vec<HeaderMatch>> {
    let rules = route.pointer("/spec/rules").and_then(Value::as_array)?;
    let ours: Vec<&Value> = rules.iter().filter(|r| is_header_rule(r)).collect();
    if ours.is_empty() {
        return Some(Vec::new());
    }
    let steered: Vec<usize> = rules_of(route, stable, canary)
        .iter()
        .map(|r| r.rule)
        .collect();
    let mut found: Option<Vec<HeaderMatch>> = None;
    let mut covered = Vec::new();
    for rule in ours {
        let i: usize = rule["name"]
            .as_str()?
            .strip_prefix(HEADER_RULE_PREFIX)?
            .parse()
            .ok()?;
        let refs = rule.get("backendRefs")?.as_array()?;
        if refs.len() != 1 || !refers_to(&refs[0], canary) {
            return None;
        }
        let theirs = rules
            .get(i)?
            .pointer("/matches/0/headers")
            .and_then(Value::as_array)
            .map_or(0, Vec::len);
        let headers: Vec<HeaderMatch> = rule
            .pointer("/matches/0/headers")?
            .as_array()?
            .get(theirs..)?
            .iter()
            .map(|h| {
                Some(HeaderMatch {
                    name: h.get("name")?.as_str()?.to_string(),
                    value: h.get("value")?.as_str()?.to_string(),
                    match_type: match h.get("type").and_then(Value::as_str) {
                        None | Some("Exact") => None,
                        Some("RegularExpression") => Some(HeaderMatchType::RegularExpression),
                        Some(_) => return None,
                    },
                })
            })
            .collect::<Option<_>>()?;
        match &found {
            Some(f) if *f != headers => return None,
            _ => found = Some(headers),
        }
        covered.push(i);
    }
    covered.sort_unstable();
    (covered == steered).then(|| found.unwrap_or_default())
}

/// The JSON patch that makes `route`'s header rules the ones for `headers` (none when
/// empty); empty when they are already.
pub fn header_patch(
    route: &Value,
    stable: &str,
    canary: &str,
    headers: &[HeaderMatch],
) -> Vec<Value> {
    if header_route_of(route, stable, canary).as_deref() == Some(headers) {
        return Vec::new();
    }
    let want = header_rules(route, stable, canary, headers);
    let rules = route
        .pointer("/spec/rules")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let have: Vec<(usize, &Value)> = rules
        .iter()
        .enumerate()
        .filter(|(_, r)| is_header_rule(r))
        .collect();
    let mut ops = Vec::new();
    for (i, r) in have.iter().rev() {
        ops.push(
            json!({"op": "test", "path": format!("/spec/rules/{i}/name"), "value": r["name"]}),
        );
        ops.push(json!({"op": "remove", "path": format!("/spec/rules/{i}")}));
    }
    for r in want {
        ops.push(json!({"op": "add", "path": "/spec/rules/-", "value": r}));
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

    fn exact(name: &str, value: &str) -> HeaderMatch {
        HeaderMatch {
            name: name.into(),
            value: value.into(),
            match_type: None,
        }
    }

    #[test]
    fn a_header_route_adds_one_canary_rule_per_steered_rule_and_removes_it_again() {
        let r = route(json!([
            {"matches": [{"path": {"type": "PathPrefix", "value": "/api"}, "headers": [{"name": "x-tenant", "value": "a"}]}],
             "filters": [{"type": "RequestHeaderModifier", "requestHeaderModifier": {"set": [{"name": "x-gw", "value": "1"}]}}],
             "backendRefs": [{"name": "web-stable", "port": 80, "weight": 90}, {"name": "web-canary", "port": 80, "weight": 10}]},
            {"backendRefs": [{"name": "unrelated"}]},
        ]));
        let headers = [exact("x-canary", "yes")];
        let ops = header_patch(&r, "web-stable", "web-canary", &headers);
        let mut patched = r.clone();
        apply(&mut patched, ops).unwrap();
        let added = &patched["spec"]["rules"][2];
        assert_eq!(added["name"], "sluice-canary-0");
        assert_eq!(
            added["matches"][0]["headers"],
            json!([{"name": "x-tenant", "value": "a"}, {"name": "x-canary", "value": "yes"}])
        );
        assert_eq!(
            added["matches"][0]["path"],
            r["spec"]["rules"][0]["matches"][0]["path"]
        );
        assert_eq!(added["filters"], r["spec"]["rules"][0]["filters"]);
        assert_eq!(
            added["backendRefs"],
            json!([{"name": "web-canary", "port": 80}])
        );
        assert_eq!(
            header_route_of(&patched, "web-stable", "web-canary"),
            Some(headers.to_vec())
        );
        assert_eq!(
            header_route_of(&r, "web-stable", "web-canary"),
            Some(vec![])
        );
        // In place: nothing to do; the weights still read the same.
        assert!(header_patch(&patched, "web-stable", "web-canary", &headers).is_empty());
        assert!(
            patched["spec"]["rules"]
                .as_array()
                .unwrap()
                .iter()
                .any(is_header_rule)
        );
        assert_eq!(
            canary_percent(&patched, "HTTPRoute", "web-stable", "web-canary"),
            Ok(10)
        );
        // Other headers replace them; none removes them, leaving the route as it was.
        let cookie = [HeaderMatch {
            name: "cookie".into(),
            value: "(^|; )canary=always(;|$)".into(),
            match_type: Some(HeaderMatchType::RegularExpression),
        }];
        let mut again = patched.clone();
        apply(
            &mut again,
            header_patch(&patched, "web-stable", "web-canary", &cookie),
        )
        .unwrap();
        assert_eq!(again["spec"]["rules"].as_array().unwrap().len(), 3);
        assert_eq!(
            again["spec"]["rules"][2]["matches"][0]["headers"][1]["type"],
            "RegularExpression"
        );
        assert_eq!(
            header_route_of(&again, "web-stable", "web-canary"),
            Some(cookie.to_vec())
        );
        // The apiserver's defaults do not make them foreign.
        let mut defaulted = again.clone();
        defaulted["spec"]["rules"][2]["matches"][0]["headers"][0]["type"] = "Exact".into();
        defaulted["spec"]["rules"][2]["backendRefs"][0]["kind"] = "Service".into();
        defaulted["spec"]["rules"][2]["backendRefs"][0]["weight"] = 1.into();
        assert_eq!(
            header_route_of(&defaulted, "web-stable", "web-canary"),
            Some(cookie.to_vec())
        );
        assert!(header_patch(&defaulted, "web-stable", "web-canary", &cookie).is_empty());
        // Edited by hand: not ours any more as written, so it is rewritten.
        let mut edited = again.clone();
        edited["spec"]["rules"][2]["backendRefs"][0]["name"] = "web-stable".into();
        assert_eq!(header_route_of(&edited, "web-stable", "web-canary"), None);
        let remove = header_patch(&again, "web-stable", "web-canary", &[]);
        apply(&mut again, remove).unwrap();
        assert_eq!(again, r);
    }

    #[test]
    fn a_rule_without_matches_gets_a_header_only_match() {
        let r = route(json!([{"backendRefs": [{"name": "web-stable"}]}]));
        let mut patched = r.clone();
        apply(
            &mut patched,
            header_patch(&r, "web-stable", "web-canary", &[exact("x-canary", "1")]),
        )
        .unwrap();
        assert_eq!(
            patched["spec"]["rules"][1]["matches"],
            json!([{"headers": [{"name": "x-canary", "value": "1"}]}])
        );
    }
}
