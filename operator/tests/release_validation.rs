//! Admission of Releases by a real apiserver: the CRD generated from the Rust types is
//! applied, then valid and invalid Releases are sent with server-side dry run; every
//! invalid one must be rejected with the message that says what to fix.
//!
//! Runs against the test ground (`make cluster-up`, kubeconfig `target/e2e/kubeconfig`,
//! or `KUBECONFIG`). Without a cluster it skips, saying so.

use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams, PostParams};
use kube::{Client, CustomResourceExt};
use sluice_operator::release::Release;

async fn client() -> Option<Client> {
    let path = std::env::var("SLUICE_E2E_KUBECONFIG").unwrap_or_else(|_| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/../target/e2e/kubeconfig").to_string()
    });
    let kc = kube::config::Kubeconfig::read_from(&path).ok()?;
    let config = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .ok()?;
    let client = Client::try_from(config).ok()?;
    client.apiserver_version().await.ok()?;
    Some(client)
}

fn release(name: &str, spec: &str) -> DynamicObject {
    serde_yaml::from_str(&format!(
        "apiVersion: sluice.dev/v1alpha1\nkind: Release\nmetadata: {{name: {name}, namespace: default}}\nspec:\n{spec}"
    ))
    .unwrap()
}

/// Applies the CRD generated from the Rust types and returns Releases in `default`.
async fn releases_with_current_crd(client: Client) -> Api<DynamicObject> {
    let crds: Api<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition> =
        Api::all(client.clone());
    crds.patch(
        "releases.sluice.dev",
        &PatchParams::apply("sluice-e2e").force(),
        &Patch::Apply(Release::crd()),
    )
    .await
    .unwrap();
    // The apiserver needs a moment to serve a changed schema.
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    Api::namespaced_with(client, "default", &ApiResource::erase::<Release>(&()))
}

#[tokio::test]
async fn invalid_releases_are_rejected_with_a_fix() {
    let Some(client) = client().await else {
        eprintln!("SKIP: no test-ground cluster (make cluster-up)");
        return;
    };
    let api = releases_with_current_crd(client).await;
    let dry = PostParams {
        dry_run: true,
        ..Default::default()
    };

    let ok = release(
        "ok",
        "  workloadRef: {name: echo}\n  steps: [{setWeight: 20}, {pause: {duration: 30s}}, {setWeight: 50}, {gate: {duration: 1m}}, {pause: {}}]\n  gates: {connectionRate: {maxPerPod: 50}, comparison: {maxErrorRatioDelta: 0.02}}\n  maxSurge: 25%\n  drain: {quietPeriod: 2s, propagationTimeout: 1m30s}\n  agent: {limits: {maxConnections: 20000, http2MaxConcurrentStreams: 250, headerReadTimeout: 10s, bodyTimeout: 0s, upstreamTimeout: 30s, http2IdleTimeout: 1h, tcpKeepalive: 30s}}",
    );
    api.create(&dry, &ok)
        .await
        .expect("a valid Release is admitted");
    // Observe mode leaves the proxy port unused: the application may have its number.
    let observe = release(
        "observe",
        "  workloadRef: {name: echo}\n  agent: {mode: observe, port: 15101}\n  drain: {quietPeriod: 0s, propagationTimeout: 1h, drainTimeout: 30s}",
    );
    api.create(&dry, &observe)
        .await
        .expect("an observe-mode Release on the proxy port's number is admitted");

    let long = "a".repeat(60);
    let cases: &[(&str, &str, &str)] = &[
        (
            "w",
            "  workloadRef: {name: echo}\n  steps: [{setWeight: 120}]",
            "setWeight must be a percentage between 0 and 100",
        ),
        (
            "d",
            "  workloadRef: {name: echo}\n  steps: [{setWeight: 50}, {setWeight: 20}]",
            "setWeight values must not decrease",
        ),
        (
            "t",
            "  workloadRef: {name: echo}\n  steps: [{setWeight: 50, pause: {}}]",
            "exactly one of setWeight, pause, gate or setHeaderRoute",
        ),
        (
            "e",
            "  workloadRef: {name: echo}\n  steps: [{}]",
            "exactly one of setWeight, pause, gate or setHeaderRoute",
        ),
        (
            "q",
            "  workloadRef: {name: echo}\n  drain: {quietPeriod: 2 seconds}",
            "must be a duration such as 500ms",
        ),
        (
            "g",
            "  workloadRef: {name: echo}\n  steps: [{gate: {duration: 1.5m}}]",
            "must be a duration such as 500ms",
        ),
        (
            "c",
            "  workloadRef: {name: echo}\n  drain: {closeRate: 0}",
            "drain.closeRate must be between 1 and 100000",
        ),
        (
            "m",
            "  workloadRef: {name: echo}\n  drain: {maxConcurrent: 0}",
            "drain.maxConcurrent must be between 1 and 1000",
        ),
        (
            "k",
            "  workloadRef: {name: echo, kind: StatefulSet}",
            "workloadRef.kind must be Deployment",
        ),
        (
            "n",
            "  workloadRef: {name: Echo_App}",
            "workloadRef.name must be a valid Deployment name",
        ),
        (
            "s",
            "  workloadRef: {name: echo}\n  maxSurge: 0",
            "maxSurge must be a number of pods between 1 and 100000",
        ),
        (
            "p",
            "  workloadRef: {name: echo}\n  maxSurge: 150%",
            "maxSurge must be a number of pods between 1 and 100000",
        ),
        (
            "r",
            "  workloadRef: {name: echo}\n  gates: {health: {minReadyRatio: 1.5}}",
            "minReadyRatio must be a fraction",
        ),
        (
            "f",
            "  workloadRef: {name: echo}\n  gates: {comparison: {failureLimit: 0}}",
            "comparison.failureLimit must be between 1 and 100",
        ),
        (
            "l",
            "  workloadRef: {name: echo}\n  gates: {comparison: {maxLatencyRatio: 0.5}}",
            "maxLatencyRatio must be between 1.0 and 1000",
        ),
        (
            "x",
            "  workloadRef: {name: echo}\n  gates: {connectionRate: {maxPerPod: 0}}",
            "maxPerPod must be a positive number",
        ),
        (
            "a",
            "  workloadRef: {name: echo}\n  agent: {proxyPort: 70000}",
            "agent.proxyPort must be a port number",
        ),
        (
            "i",
            "  workloadRef: {name: echo}\n  agent: {image: ''}",
            "agent.image must be an image reference of 1 to 512 characters",
        ),
        (
            "o",
            "  workloadRef: {name: echo}\n  agent: {mode: sidecar}",
            "supported values: \"proxy\", \"observe\"",
        ),
        (
            "rmax",
            "  workloadRef: {name: echo}\n  replicas: 200000",
            "replicas must be between 1 and 100000",
        ),
        (
            "dt0",
            "  workloadRef: {name: echo}\n  drain: {drainTimeout: 0s, propagationTimeout: 0s, quietPeriod: 0s}",
            "drain.drainTimeout must be longer than 0s and at most 1h",
        ),
        (
            "pt2h",
            "  workloadRef: {name: echo}\n  drain: {propagationTimeout: 2h, drainTimeout: 2h}",
            "drain.propagationTimeout must be longer than 0s and at most 1h",
        ),
        (
            "qp",
            "  workloadRef: {name: echo}\n  drain: {quietPeriod: 90s}",
            "drain.quietPeriod must be shorter than drain.propagationTimeout",
        ),
        (
            "qd",
            "  workloadRef: {name: echo}\n  drain: {quietPeriod: 30s, propagationTimeout: 5m, drainTimeout: 20s}",
            "drain.quietPeriod must be shorter than drain.drainTimeout",
        ),
        (
            "pd",
            "  workloadRef: {name: echo}\n  progressDeadline: 48h",
            "progressDeadline must be longer than 0s and at most 24h",
        ),
        (
            "gd0",
            "  workloadRef: {name: echo}\n  steps: [{gate: {duration: 0s}}]",
            "gate.duration must be longer than 0s and at most 24h",
        ),
        (
            "hi",
            "  workloadRef: {name: echo}\n  gates: {health: {interval: 0s}}",
            "health.interval must be between 1s and 10m",
        ),
        (
            "ap",
            "  workloadRef: {name: echo}\n  agent: {adminPort: 15101}",
            "agent.adminPort and agent.proxyPort must differ",
        ),
        (
            "pa",
            "  workloadRef: {name: echo}\n  agent: {port: 9901}",
            "must differ from agent.adminPort",
        ),
        (
            "pp",
            "  workloadRef: {name: echo}\n  agent: {port: 15101}",
            "must differ from agent.proxyPort",
        ),
        (
            "p0",
            "  workloadRef: {name: echo}\n  agent: {port: 0}",
            "agent.port must be a port number between 1 and 65535 or a port name",
        ),
        (
            "pn",
            "  workloadRef: {name: echo}\n  agent: {port: Not_A_Name}",
            "agent.port must be a port number between 1 and 65535 or a port name",
        ),
        (
            long.as_str(),
            "  workloadRef: {name: echo}",
            "metadata.name must be at most 52 characters",
        ),
        (
            "limits-conns",
            "  workloadRef: {name: echo}\n  agent: {limits: {maxConnections: 0}}",
            "agent.limits.maxConnections must be between 1 and 1000000",
        ),
        (
            "limits-body",
            "  workloadRef: {name: echo}\n  agent: {limits: {bodyTimeout: 25h}}",
            "agent.limits.bodyTimeout must be at most 24h",
        ),
        (
            "limits-header",
            "  workloadRef: {name: echo}\n  agent: {limits: {headerReadTimeout: 0s}}",
            "agent.limits.headerReadTimeout must be longer than 0s",
        ),
        (
            "an-metric-no-range",
            "  workloadRef: {name: echo}\n  analysis: {templates: [{kind: MetricTemplate, name: errors}]}",
            "thresholdRange and interval are required for a MetricTemplate",
        ),
        (
            "an-argo-range",
            "  workloadRef: {name: echo}\n  analysis: {templates: [{kind: AnalysisTemplate, name: rate, interval: 1m}]}",
            "not allowed for an AnalysisTemplate",
        ),
        (
            "an-dup-template",
            "  workloadRef: {name: echo}\n  analysis: {templates: [{kind: AnalysisTemplate, name: rate}, {kind: AnalysisTemplate, name: rate}]}",
            "must not name the same template twice",
        ),
        (
            "an-hook-url",
            "  workloadRef: {name: echo}\n  analysis: {webhooks: [{name: a, type: rollout, url: 'ftp://x'}]}",
            "webhooks[].url must be an http:// URL",
        ),
        (
            "an-hook-dup",
            "  workloadRef: {name: echo}\n  analysis: {webhooks: [{name: a, type: rollout, url: 'http://x'}, {name: a, type: event, url: 'http://y'}]}",
            "analysis.webhooks names must be unique",
        ),
        (
            "an-hook-timeout",
            "  workloadRef: {name: echo}\n  analysis: {webhooks: [{name: a, type: rollout, url: 'http://x', timeout: 10m}]}",
            "webhooks[].timeout must be longer than 0s and at most 5m",
        ),
        (
            "an-range-order",
            "  workloadRef: {name: echo}\n  analysis: {templates: [{kind: MetricTemplate, name: e, interval: 1m, thresholdRange: {min: 2, max: 1}}]}",
            "thresholdRange.min must not be above thresholdRange.max",
        ),
        (
            "tr-no-route",
            "  workloadRef: {name: echo}\n  trafficRouting: {service: web, gatewayAPI: {}}",
            "trafficRouting.gatewayAPI names no route",
        ),
        (
            "tr-service",
            "  workloadRef: {name: echo}\n  trafficRouting: {service: Web_1, gatewayAPI: {httpRoutes: [{name: web}]}}",
            "trafficRouting.service must be a Service name",
        ),
        (
            "tr-dup-route",
            "  workloadRef: {name: echo}\n  trafficRouting: {service: web, gatewayAPI: {httpRoutes: [{name: web}, {name: web}]}}",
            "httpRoutes must not name a route twice",
        ),
        (
            "tr-tolerance",
            "  workloadRef: {name: echo}\n  trafficRouting: {service: web, gatewayAPI: {grpcRoutes: [{name: g}]}, verify: {tolerance: 0}}",
            "trafficRouting.verify.tolerance must be between 0 and 100",
        ),
        (
            "rb-with-routing",
            "  workloadRef: {name: echo}\n  trafficRouting: {service: web, gatewayAPI: {httpRoutes: [{name: web}]}}\n  rebalance: {}",
            "rebalance is for releases by replica ratio",
        ),
        (
            "rb-tolerance",
            "  workloadRef: {name: echo}\n  rebalance: {tolerance: 0}",
            "rebalance.tolerance must be between 0 and 100",
        ),
        (
            "tr-header-no-routing",
            "  workloadRef: {name: echo}\n  steps: [{setHeaderRoute: {match: [{name: x-canary, value: 'yes'}]}}]",
            "setHeaderRoute steps need spec.trafficRouting",
        ),
        (
            "tr-header-and-weight",
            "  workloadRef: {name: echo}\n  trafficRouting: {service: web, gatewayAPI: {httpRoutes: [{name: web}]}}\n  steps: [{setWeight: 5, setHeaderRoute: {match: []}}]",
            "each step sets exactly one of setWeight, pause, gate or setHeaderRoute",
        ),
    ];
    let mut failures = Vec::new();
    for (name, spec, want) in cases {
        match api.create(&dry, &release(name, spec)).await {
            Ok(_) => failures.push(format!("{spec}: admitted, expected {want:?}")),
            Err(kube::Error::Api(e)) if e.message.contains(want) => {}
            Err(e) => failures.push(format!("{spec}: {e}, expected {want:?}")),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// `spec.workloadRef` cannot change, and status rejects a negative step. Needs a stored
/// object (a dry run cannot update what does not exist): created, checked, deleted.
#[tokio::test]
async fn workload_ref_is_immutable_and_status_is_bounded() {
    let Some(client) = client().await else {
        eprintln!("SKIP: no test-ground cluster (make cluster-up)");
        return;
    };
    let api = releases_with_current_crd(client).await;
    let name = "immutable-ref";
    let _ = api.delete(name, &Default::default()).await;
    api.create(
        &PostParams::default(),
        &release(name, "  workloadRef: {name: echo}"),
    )
    .await
    .expect("a valid Release is stored");
    let dry = PatchParams {
        dry_run: true,
        ..Default::default()
    };
    let changed = api
        .patch(
            name,
            &dry,
            &Patch::Merge(serde_json::json!({"spec": {"workloadRef": {"name": "other"}}})),
        )
        .await;
    let negative = api
        .patch_status(
            name,
            &dry,
            &Patch::Merge(serde_json::json!({"status": {"currentStep": -1}})),
        )
        .await;
    let _ = api.delete(name, &Default::default()).await;
    match changed {
        Err(kube::Error::Api(e)) if e.message.contains("workloadRef is immutable") => {}
        other => panic!("changing workloadRef: {other:?}, expected \"workloadRef is immutable\""),
    }
    match negative {
        Err(kube::Error::Api(e)) if e.message.contains("currentStep") => {}
        other => panic!("status.currentStep -1: {other:?}, expected a rejection"),
    }
}
