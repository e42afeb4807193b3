use super::*;
use crate::pod::duration::{DURATION_PATTERN, parse_duration};
use crate::pod::settings::{DEFAULT_ADMIN_PORT, DEFAULT_PROXY_PORT};
use kube::CustomResourceExt;

fn crd_json() -> serde_json::Value {
    serde_json::to_value(Release::crd()).unwrap()
}

fn rules(v: &serde_json::Value, out: &mut Vec<(String, String)>) {
    match v {
        serde_json::Value::Object(map) => {
            if let Some(serde_json::Value::Array(rs)) = map.get("x-kubernetes-validations") {
                for r in rs {
                    out.push((
                        r["rule"].as_str().unwrap_or_default().to_string(),
                        r["message"].as_str().unwrap_or_default().to_string(),
                    ));
                }
            }
            for v in map.values() {
                rules(v, out);
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| rules(v, out)),
        _ => {}
    }
}

#[test]
fn crd_has_the_expected_identity_and_columns() {
    let crd = Release::crd();
    assert_eq!(crd.spec.group, "sluice.dev");
    assert_eq!(crd.spec.names.kind, "Release");
    assert_eq!(crd.spec.names.plural, "releases");
    let v = &crd.spec.versions[0];
    assert_eq!(v.name, "v1alpha1");
    assert!(v.subresources.as_ref().unwrap().status.is_some());
    let cols: Vec<_> = v
        .additional_printer_columns
        .as_ref()
        .unwrap()
        .iter()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(
        cols,
        [
            "Phase", "Step", "Weight", "Stable", "Canary", "Message", "Age"
        ]
    );
}

#[test]
fn every_rule_has_a_message() {
    let mut out = Vec::new();
    rules(&crd_json(), &mut out);
    assert!(out.len() >= 15, "expected many rules, got {out:?}");
    for (rule, message) in &out {
        assert!(!message.is_empty(), "rule {rule} has no message");
    }
    let all: Vec<&str> = out.iter().map(|(r, _)| r.as_str()).collect();
    assert!(all.iter().any(|r| r.contains("isSorted()")));
    assert!(all.iter().any(|r| r.contains("exists_one")));
    assert!(all.iter().any(|r| r.contains("self.metadata.name")));
    assert!(all.iter().any(|r| r.contains(DURATION_PATTERN)));
}

/// The rules of issue 13: immutability, duration bounds, cross-field orders, distinct
/// ports, status bounds.
#[test]
fn the_bounds_and_cross_field_rules_are_in_the_schema() {
    let crd = crd_json();
    let root = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"];
    let spec = &root["spec"]["properties"];
    let has = |v: &serde_json::Value, needle: &str| {
        let mut out = Vec::new();
        rules(v, &mut out);
        out.iter()
            .any(|(r, m)| r.contains(needle) || m.contains(needle))
    };
    assert!(has(&spec["workloadRef"], "self == oldSelf"));
    assert!(has(&spec["workloadRef"], "workloadRef is immutable"));
    let drain = &spec["drain"];
    assert!(has(
        &drain["properties"]["drainTimeout"],
        "drain.drainTimeout must be longer than 0s and at most 1h"
    ));
    assert!(has(
        drain,
        "duration((has(self.quietPeriod) ? self.quietPeriod : '2s')) < duration((has(self.propagationTimeout) ? self.propagationTimeout : '60s'))"
    ));
    assert!(has(
        drain,
        "duration((has(self.quietPeriod) ? self.quietPeriod : '2s')) < duration((has(self.drainTimeout) ? self.drainTimeout : '90s'))"
    ));
    assert!(has(
        &spec["agent"],
        "agent.adminPort and agent.proxyPort must differ"
    ));
    assert!(has(&spec["agent"]["properties"]["port"], "65535"));
    for port in [DEFAULT_ADMIN_PORT, DEFAULT_PROXY_PORT] {
        assert!(has(&spec["agent"], &format!(": {port})")), "{port}");
    }
    assert!(has(&spec["replicas"], "100000"));
    let analysis = &spec["analysis"]["properties"];
    assert_eq!(analysis["templates"]["maxItems"], 16);
    assert_eq!(analysis["webhooks"]["maxItems"], 16);
    assert!(has(&analysis["templates"], "required for a MetricTemplate"));
    assert!(has(&analysis["templates"], "the same template twice"));
    assert!(has(&analysis["webhooks"], "names must be unique"));
    assert!(has(&analysis["webhooks"], "http://"));
    assert_eq!(
        analysis["webhooks"]["items"]["properties"]["type"]["enum"],
        serde_json::json!([
            "pre-rollout",
            "rollout",
            "post-rollout",
            "rollback",
            "event"
        ])
    );
    let status = &root["status"]["properties"];
    assert_eq!(status["currentStep"]["minimum"], 0.0);
    assert_eq!(status["canaryWeight"]["maximum"], 100.0);
}

/// The defaults the CEL rules assume are the ones the controller applies.
#[test]
fn rule_defaults_parse() {
    for d in [
        DEFAULT_QUIET_PERIOD,
        DEFAULT_PROPAGATION_TIMEOUT,
        DEFAULT_DRAIN_TIMEOUT,
    ] {
        assert!(parse_duration(d).is_ok(), "{d}");
    }
    assert!(parse_duration(DEFAULT_QUIET_PERIOD) < parse_duration(DEFAULT_PROPAGATION_TIMEOUT));
    assert!(parse_duration(DEFAULT_QUIET_PERIOD) < parse_duration(DEFAULT_DRAIN_TIMEOUT));
    let drain_rules = duration_order_rule("a", "1s", "<", "b", "2s");
    assert!(
        drain_rules.contains(
            "duration((has(self.a) ? self.a : '1s')) < duration((has(self.b) ? self.b : '2s'))"
        ),
        "{drain_rules}"
    );
}

#[test]
fn schema_is_structural_enough_for_the_apiserver() {
    // The apiserver rejects schemas with anyOf/oneOf lacking types, `$ref`s and
    // non-string enums; catch them here instead of at `kubectl apply` time.
    let s = serde_json::to_string(&crd_json()).unwrap();
    assert!(!s.contains("$ref"), "{s}");
    assert!(!s.contains("\"oneOf\""), "{s}");
    let spec =
        &crd_json()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
    assert_eq!(spec["required"], serde_json::json!(["workloadRef"]));
    assert_eq!(
        spec["properties"]["agent"]["properties"]["mode"]["enum"],
        serde_json::json!(["proxy", "observe"])
    );
    assert_eq!(spec["properties"]["steps"]["maxItems"], 64);
}

#[test]
fn a_full_release_round_trips() {
    let yaml = r#"
apiVersion: sluice.dev/v1alpha1
kind: Release
metadata: {name: echo, namespace: default}
spec:
  workloadRef: {apiVersion: apps/v1, kind: Deployment, name: echo}
  steps:
    - setWeight: 20
    - pause: {duration: 30s}
    - setWeight: 50
    - gate: {duration: 1m}
    - pause: {}
  gates:
    connectionRate: {maxPerPod: 50}
    comparison: {maxErrorRatioDelta: 0.02, maxLatencyRatio: 1.5}
  drain: {quietPeriod: 2s, closeRate: 100}
  agent: {mode: proxy, port: http}
"#;
    let r: Release = serde_yaml::from_str(yaml).unwrap();
    assert_eq!(r.spec.steps.len(), 5);
    assert_eq!(r.spec.workload_ref.kind, "Deployment");
    assert_eq!(r.spec.agent.port, Some(IntOrString::String("http".into())));
    let back: Release = serde_json::from_value(serde_json::to_value(&r).unwrap()).unwrap();
    assert_eq!(back, r);
}
