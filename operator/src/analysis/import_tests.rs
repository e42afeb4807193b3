//! Tests of `import.rs` with documents shaped like the Argo Rollouts and Flagger docs'.

use super::*;
use crate::analysis::model::{MeasurementPhase, TemplateContext, render};

fn yaml(s: &str) -> Value {
    serde_yaml::from_str(s).expect("valid YAML")
}

const ARGO_SUCCESS_RATE: &str = r#"
apiVersion: argoproj.io/v1alpha1
kind: AnalysisTemplate
metadata:
  name: success-rate
spec:
  args:
  - name: service-name
  - name: canary-hash
  - name: window
    value: 2m
  metrics:
  - name: success-rate
    interval: 30s
    count: 5
    # Prometheus returns a vector: index 0 is the value.
    successCondition: len(result) > 0 && result[0] >= 0.95
    failureCondition: result[0] < 0.8
    failureLimit: 2
    inconclusiveLimit: "1"
    consecutiveErrorLimit: 3
    initialDelay: 1m
    provider:
      prometheus:
        address: http://prometheus.monitoring.svc:9090
        timeout: 20
        headers:
        - key: X-Scope-OrgID
          value: tenant_a
        query: |
          sum(irate(http_requests_total{service="{{args.service-name}}",
            rollouts_pod_template_hash="{{args.canary-hash}}",code!~"5.."}[{{args.window}}]))
          /
          sum(irate(http_requests_total{service="{{args.service-name}}",
            rollouts_pod_template_hash="{{args.canary-hash}}"}[{{args.window}}]))
  - name: p99-latency
    successCondition: result[0] < 0.5
    provider:
      prometheus:
        address: http://prometheus.monitoring.svc:9090
        query: histogram_quantile(0.99, sum by (le) (rate(http_request_duration_seconds_bucket{service="{{args.service-name}}"}[5m])))
  dryRun:
  - metricName: p99-latency
"#;

#[test]
fn argo_analysis_template_imports() {
    let checks = from_argo_analysis_template(&yaml(ARGO_SUCCESS_RATE)).expect("imports");
    assert_eq!(checks.len(), 2);
    let c = &checks[0];
    assert_eq!(c.name, "success-rate");
    assert_eq!(c.interval, Some(Duration::from_secs(30)));
    assert_eq!(c.initial_delay, Duration::from_secs(60));
    assert_eq!(c.count, Some(5));
    assert_eq!(
        (
            c.failure_limit,
            c.inconclusive_limit,
            c.consecutive_error_limit
        ),
        (2, 1, 3)
    );
    assert_eq!(c.source.timeout, Duration::from_secs(20));
    assert_eq!(
        c.source.headers,
        vec![("X-Scope-OrgID".into(), "tenant_a".into())]
    );
    assert!(!c.dry_run);
    assert_eq!(c.judge(&[0.97]).0, MeasurementPhase::Successful);
    assert_eq!(c.judge(&[0.9]).0, MeasurementPhase::Inconclusive);
    assert_eq!(c.judge(&[0.5]).0, MeasurementPhase::Failed);

    let mut ctx = TemplateContext::for_release("web", "shop", "web", "web", "7d9f", "5c4b");
    ctx.args
        .insert("service-name".into(), "web.shop.svc".into());
    let q = render(c, &ctx).expect("renders");
    assert!(q.contains("service=\"web.shop.svc\""), "{q}");
    assert!(q.contains("rollouts_pod_template_hash=\"7d9f\""), "{q}");
    assert!(q.contains("[2m]"), "{q}");

    let p99 = &checks[1];
    assert!(p99.dry_run);
    assert_eq!(p99.effective_count(), Some(1));
    assert_eq!(p99.consecutive_error_limit, 4, "Argo's default");
    assert_eq!(p99.source.timeout, DEFAULT_QUERY_TIMEOUT);
}

#[test]
fn argo_dry_run_all_and_cluster_templates() {
    let doc = yaml(
        r#"
apiVersion: argoproj.io/v1alpha1
kind: ClusterAnalysisTemplate
metadata: {name: errors}
spec:
  metrics:
  - name: errors
    interval: 1m
    failureCondition: result[0] > 5 || isNaN(result[0])
    provider:
      prometheus:
        address: http://prometheus:9090
        query: sum(rate(errors_total[1m]))
  dryRun:
  - metricName: .*
"#,
    );
    let checks = from_argo_analysis_template(&doc).expect("imports");
    assert!(checks[0].dry_run);
    assert_eq!(
        checks[0].effective_count(),
        None,
        "interval without count: until terminated"
    );
}

/// Each case appends YAML to a minimal template: `(patch, field named, text in the error)`.
#[test]
fn argo_unsupported_fields_are_named() {
    let base = r#"
apiVersion: argoproj.io/v1alpha1
kind: AnalysisTemplate
metadata: {name: t}
spec:
  metrics:
  - name: m
    successCondition: result[0] > 0
    provider:
      prometheus:
        address: http://prometheus:9090
        query: up
"#;
    assert!(from_argo_analysis_template(&yaml(base)).is_ok());
    let cases: &[(&str, &str, &str)] = &[
        (
            "  measurementRetention:\n  - metricName: m\n    limit: 5\n",
            "spec.measurementRetention",
            "not supported",
        ),
        (
            "  - name: d\n    provider:\n      datadog:\n        query: avg:x\n",
            "spec.metrics[1].provider.datadog",
            "supported: prometheus",
        ),
        (
            "  - name: w\n    provider:\n      web:\n        url: http://x/\n",
            "spec.metrics[1].provider.web",
            "supported: prometheus",
        ),
        (
            "  - name: j\n    provider:\n      job:\n        spec: {}\n",
            "spec.metrics[1].provider.job",
            "supported: prometheus",
        ),
        (
            "  - name: c\n    successCondition: all(result, {# > 1})\n    provider:\n      prometheus: {address: 'http://p:9090', query: up}\n",
            "spec.metrics[1].successCondition",
            "unsupported character `{`",
        ),
        (
            "  - name: c\n    successCondition: result[0] ?? 1\n    provider:\n      prometheus: {address: 'http://p:9090', query: up}\n",
            "spec.metrics[1].successCondition",
            "supported:",
        ),
        (
            "  - name: c\n    count: '{{args.count}}'\n    interval: 1m\n    provider:\n      prometheus: {address: 'http://p:9090', query: up}\n",
            "spec.metrics[1].count",
            "templated",
        ),
        (
            "  - name: c\n    consecutiveSuccessLimit: 3\n    provider:\n      prometheus: {address: 'http://p:9090', query: up}\n",
            "spec.metrics[1].consecutiveSuccessLimit",
            "not supported",
        ),
        (
            "  - name: c\n    provider:\n      prometheus: {address: 'https://p:9090', query: up}\n",
            "spec.metrics[1].provider.prometheus.address",
            "https is not supported",
        ),
        (
            "  - name: c\n    provider:\n      prometheus:\n        address: http://p:9090\n        query: up\n        authentication: {sigv4: {region: x}}\n",
            "spec.metrics[1].provider.prometheus.authentication",
            "not supported",
        ),
        (
            "  - name: c\n    count: 3\n    provider:\n      prometheus: {address: 'http://p:9090', query: up}\n",
            "spec.metrics[1]",
            "needs an interval",
        ),
        (
            "  - name: c\n    failureLimit: -1\n    provider:\n      prometheus: {address: 'http://p:9090', query: up}\n",
            "spec.metrics[1].failureLimit",
            "whole number",
        ),
    ];
    for (patch, field, text) in cases {
        let doc = yaml(&format!("{base}{patch}"));
        let e = from_argo_analysis_template(&doc).expect_err(field);
        assert_eq!(e.field, *field, "{e}");
        assert!(e.to_string().contains(text), "{e}");
    }
}

#[test]
fn argo_args_and_dry_run_errors() {
    let doc = yaml(
        r#"
apiVersion: argoproj.io/v1alpha1
kind: AnalysisTemplate
spec:
  args:
  - name: api-token
    valueFrom:
      secretKeyRef: {name: token, key: apiToken}
  metrics:
  - name: m
    provider:
      prometheus: {address: 'http://p:9090', query: up}
"#,
    );
    let e = from_argo_analysis_template(&doc).expect_err("valueFrom");
    assert_eq!(e.field, "spec.args[0].valueFrom");
    let wrong_kind = yaml("apiVersion: argoproj.io/v1alpha1\nkind: Rollout\nspec: {}\n");
    assert_eq!(
        from_argo_analysis_template(&wrong_kind)
            .expect_err("kind")
            .field,
        "kind"
    );
    let wrong_api = yaml("apiVersion: flagger.app/v1beta1\nkind: AnalysisTemplate\n");
    assert_eq!(
        from_argo_analysis_template(&wrong_api)
            .expect_err("api")
            .field,
        "apiVersion"
    );
    let regex = yaml(
        "apiVersion: argoproj.io/v1alpha1\nkind: AnalysisTemplate\nspec:\n  metrics:\n  - name: m\n    \
         provider: {prometheus: {address: 'http://p:9090', query: up}}\n  dryRun:\n  - metricName: 'm.*'\n",
    );
    assert_eq!(
        from_argo_analysis_template(&regex)
            .expect_err("regex")
            .field,
        "spec.dryRun[0].metricName"
    );
    let empty =
        yaml("apiVersion: argoproj.io/v1alpha1\nkind: AnalysisTemplate\nspec: {metrics: []}\n");
    assert_eq!(
        from_argo_analysis_template(&empty)
            .expect_err("empty")
            .field,
        "spec.metrics"
    );
}

const FLAGGER_TEMPLATE: &str = r#"
apiVersion: flagger.app/v1beta1
kind: MetricTemplate
metadata:
  name: error-rate
  namespace: istio-system
spec:
  provider:
    type: prometheus
    address: http://prometheus.istio-system:9090
  query: |
    100 - sum(
        rate(
            istio_requests_total{
              reporter="destination",
              destination_workload_namespace="{{ namespace }}",
              destination_workload="{{ target }}",
              response_code!~"5.*",
              route="{{ variables.route }}"
            }[{{ interval }}]
        )
    )
    /
    sum(
        rate(
            istio_requests_total{
              reporter="destination",
              destination_workload_namespace="{{ namespace }}",
              destination_workload="{{ target }}"
            }[{{ interval }}]
        )
    )
    * 100
"#;

const FLAGGER_METRIC: &str = r#"
name: "404s percentage"
templateRef:
  name: error-rate
  namespace: istio-system
thresholdRange:
  max: 5
interval: 1m
templateVariables:
  route: /api
"#;

#[test]
fn flagger_metric_template_imports() {
    let analysis = yaml("interval: 30s\nthreshold: 3\niterations: 10\n");
    let c = from_flagger_metric(
        &yaml(FLAGGER_TEMPLATE),
        &yaml(FLAGGER_METRIC),
        Some(&analysis),
    )
    .expect("imports");
    assert_eq!(c.name, "404s percentage");
    assert_eq!(
        c.interval,
        Some(Duration::from_secs(30)),
        "measured at the analysis interval"
    );
    assert_eq!(
        (c.count, c.failure_limit, c.consecutive_error_limit),
        (Some(10), 2, 2)
    );
    assert_eq!(c.judge(&[4.0]).0, MeasurementPhase::Successful);
    assert_eq!(c.judge(&[6.0]).0, MeasurementPhase::Failed);
    let ctx = TemplateContext::for_release("podinfo", "test", "podinfo", "podinfo", "a", "b");
    let q = render(&c, &ctx).expect("renders");
    assert!(q.contains("destination_workload_namespace=\"test\""), "{q}");
    assert!(q.contains("destination_workload=\"podinfo\""), "{q}");
    assert!(q.contains("route=\"/api\""), "{q}");
    assert!(
        q.contains("}[1m]"),
        "the metric interval is the query window: {q}"
    );

    let alone =
        from_flagger_metric(&yaml(FLAGGER_TEMPLATE), &yaml(FLAGGER_METRIC), None).expect("imports");
    assert_eq!(alone.interval, Some(Duration::from_secs(60)));
    assert_eq!(alone.effective_count(), None);
}

#[test]
fn flagger_unsupported_shapes_are_named() {
    let datadog = FLAGGER_TEMPLATE.replace("type: prometheus", "type: datadog");
    let e = from_flagger_metric(&yaml(&datadog), &yaml(FLAGGER_METRIC), None).expect_err("dd");
    assert_eq!(e.field, "spec.provider.type");
    assert!(e.to_string().contains("supported: prometheus"), "{e}");

    let secret = FLAGGER_TEMPLATE.replace(
        "    address: http://prometheus.istio-system:9090",
        "    address: http://prometheus.istio-system:9090\n    secretRef:\n      name: prom-auth",
    );
    let e = from_flagger_metric(&yaml(&secret), &yaml(FLAGGER_METRIC), None).expect_err("secret");
    assert_eq!(e.field, "spec.provider.secretRef");

    let no_address =
        FLAGGER_TEMPLATE.replace("    address: http://prometheus.istio-system:9090\n", "");
    let e = from_flagger_metric(&yaml(&no_address), &yaml(FLAGGER_METRIC), None).expect_err("addr");
    assert!(
        e.to_string().contains("no default Prometheus address"),
        "{e}"
    );

    let builtin = yaml("name: request-success-rate\nthresholdRange: {min: 99}\ninterval: 1m\n");
    let e = from_flagger_metric(&yaml(FLAGGER_TEMPLATE), &builtin, None).expect_err("builtin");
    assert_eq!(e.field, "metric.templateRef");

    let other = FLAGGER_METRIC.replace("name: error-rate", "name: latency");
    let e = from_flagger_metric(&yaml(FLAGGER_TEMPLATE), &yaml(&other), None).expect_err("ref");
    assert_eq!(e.field, "metric.templateRef.name");

    let no_range = yaml("name: x\ntemplateRef: {name: error-rate}\n");
    let e = from_flagger_metric(&yaml(FLAGGER_TEMPLATE), &no_range, None).expect_err("range");
    assert_eq!(e.field, "metric.thresholdRange");

    let inline =
        yaml("name: x\ntemplateRef: {name: error-rate}\nthresholdRange: {max: 1}\nquery: up\n");
    let e = from_flagger_metric(&yaml(FLAGGER_TEMPLATE), &inline, None).expect_err("inline");
    assert_eq!(e.field, "metric.query");
}
