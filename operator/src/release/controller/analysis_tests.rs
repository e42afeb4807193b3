use serde_json::json;

use super::*;
use crate::release::crd::ReleaseSpec;

fn spec(yaml: &str) -> AnalysisSpec {
    serde_yaml::from_str::<ReleaseSpec>(yaml)
        .unwrap()
        .analysis
        .unwrap()
}

const SPEC: &str = r#"
workloadRef: {name: echo}
analysis:
  iterations: 3
  templates:
    - {kind: AnalysisTemplate, name: success-rate}
    - {kind: MetricTemplate, name: error-rate, thresholdRange: {max: 1}, interval: 1m}
  webhooks:
    - {name: load, type: rollout, url: "http://hooks/load", timeout: 5s, metadata: {cmd: go}}
"#;

fn argo(count: Option<u32>) -> Value {
    let mut metric = json!({
        "name": "rate", "interval": "30s", "successCondition": "result[0] >= 0.95",
        "provider": {"prometheus": {"address": "http://prom:9090", "query": "up"}},
    });
    if let Some(c) = count {
        metric["count"] = json!(c);
    }
    json!({"apiVersion": "argoproj.io/v1alpha1", "kind": "AnalysisTemplate",
           "metadata": {"name": "success-rate"}, "spec": {"metrics": [metric]}})
}

#[test]
fn argo_templates_import_and_must_end() {
    let s = spec(SPEC);
    let checks = checks_of(&s, 0, &argo(Some(3))).unwrap();
    assert_eq!(checks[0].effective_count(), Some(3));
    let err = checks_of(&s, 0, &argo(None)).unwrap_err();
    assert!(err.contains("no count"), "{err}");
    assert!(err.contains("success-rate"), "{err}");
}

#[test]
fn metric_templates_take_range_interval_and_iterations_from_the_release() {
    let s = spec(SPEC);
    let doc = json!({"apiVersion": "flagger.app/v1beta1", "kind": "MetricTemplate",
        "metadata": {"name": "error-rate"},
        "spec": {"provider": {"type": "prometheus", "address": "http://prom:9090"},
                 "query": "sum(rate(errors[{{ interval }}]))"}});
    let checks = checks_of(&s, 1, &doc).unwrap();
    assert_eq!(checks[0].count, Some(3));
    assert_eq!(checks[0].interval, Some(std::time::Duration::from_secs(60)));
    // The importer's message reaches the user, naming the template.
    let bad = json!({"apiVersion": "flagger.app/v1beta1", "kind": "MetricTemplate",
        "metadata": {"name": "error-rate"},
        "spec": {"provider": {"type": "datadog"}, "query": "x"}});
    let err = checks_of(&s, 1, &bad).unwrap_err();
    assert!(
        err.contains("error-rate") && err.contains("datadog"),
        "{err}"
    );
}

#[test]
fn webhooks_convert_to_the_library() {
    let hooks = webhooks(&spec(SPEC)).unwrap();
    assert_eq!(hooks[0].hook_type, HookType::Rollout);
    assert_eq!(hooks[0].timeout, std::time::Duration::from_secs(5));
    assert_eq!(hooks[0].metadata["cmd"], "go");
}

#[test]
fn template_resources_are_argo_and_flagger() {
    let a = api_resource(TemplateKind::ClusterAnalysisTemplate);
    assert_eq!(
        (a.api_version.as_str(), a.plural.as_str()),
        ("argoproj.io/v1alpha1", "clusteranalysistemplates")
    );
    let m = api_resource(TemplateKind::MetricTemplate);
    assert_eq!(
        (m.api_version.as_str(), m.plural.as_str()),
        ("flagger.app/v1beta1", "metrictemplates")
    );
}

#[test]
fn halted_hooks_are_asked_again_after_a_while_and_proceeding_ones_not() {
    let hooks = webhooks(&spec(SPEC)).unwrap();
    let mut stage = ReleaseAnalysisStatus {
        revision: "v2".into(),
        step: Some(0),
        run: None,
        webhooks: vec![],
    };
    assert!(due(&stage, &hooks[0], 100.0));
    stage.webhooks.push(WebhookResult {
        name: "load".into(),
        type_: "rollout".into(),
        decision: "Halt".into(),
        message: String::new(),
        at: rfc3339(100.0),
    });
    assert!(!due(&stage, &hooks[0], 105.0));
    assert!(due(&stage, &hooks[0], 111.0));
    stage.webhooks[0].decision = "Proceed".into();
    assert!(!due(&stage, &hooks[0], 500.0));
}

/// `examples/analysis/release.yaml` is admitted by the types and its templates import.
#[test]
fn the_example_release_and_its_templates_import() {
    use serde::Deserialize;
    let text = include_str!("../../../../examples/analysis/release.yaml");
    let docs: Vec<Value> = serde_yaml::Deserializer::from_str(text)
        .map(|d| Value::deserialize(d).unwrap())
        .collect();
    let release: Release = serde_json::from_value(docs[2].clone()).unwrap();
    let s = release.spec.analysis.clone().unwrap();
    assert_eq!(checks_of(&s, 0, &docs[0]).unwrap()[0].count, Some(3));
    assert_eq!(checks_of(&s, 1, &docs[1]).unwrap()[0].count, Some(2));
    assert_eq!(webhooks(&s).unwrap().len(), 3);
    let settings =
        crate::release::settings::Settings::from_spec(&release.spec, "agent:test").unwrap();
    assert_eq!(settings.analysis, Some(s));
}
