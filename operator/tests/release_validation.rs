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

#[tokio::test]
async fn invalid_releases_are_rejected_with_a_fix() {
    let Some(client) = client().await else {
        eprintln!("SKIP: no test-ground cluster (make cluster-up)");
        return;
    };
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
    let api: Api<DynamicObject> =
        Api::namespaced_with(client, "default", &ApiResource::erase::<Release>(&()));
    let dry = PostParams {
        dry_run: true,
        ..Default::default()
    };

    let ok = release(
        "ok",
        "  workloadRef: {name: echo}\n  steps: [{setWeight: 20}, {pause: {duration: 30s}}, {setWeight: 50}, {gate: {duration: 1m}}, {pause: {}}]\n  gates: {connectionRate: {maxPerPod: 50}, comparison: {maxErrorRatioDelta: 0.02}}\n  maxSurge: 25%\n  drain: {quietPeriod: 2s, propagationTimeout: 1m30s}",
    );
    api.create(&dry, &ok)
        .await
        .expect("a valid Release is admitted");

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
            "exactly one of setWeight, pause or gate",
        ),
        (
            "e",
            "  workloadRef: {name: echo}\n  steps: [{}]",
            "exactly one of setWeight, pause or gate",
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
            "drain.closeRate must be at least 1",
        ),
        (
            "m",
            "  workloadRef: {name: echo}\n  drain: {maxConcurrent: 0}",
            "drain.maxConcurrent must be at least 1",
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
            "maxSurge must be a positive number",
        ),
        (
            "p",
            "  workloadRef: {name: echo}\n  maxSurge: 150%",
            "maxSurge must be a positive number",
        ),
        (
            "r",
            "  workloadRef: {name: echo}\n  gates: {health: {minReadyRatio: 1.5}}",
            "minReadyRatio must be a fraction",
        ),
        (
            "f",
            "  workloadRef: {name: echo}\n  gates: {comparison: {failureLimit: 0}}",
            "comparison.failureLimit must be at least 1",
        ),
        (
            "l",
            "  workloadRef: {name: echo}\n  gates: {comparison: {maxLatencyRatio: 0.5}}",
            "maxLatencyRatio must be at least 1.0",
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
            "agent.image must not be empty",
        ),
        (
            "o",
            "  workloadRef: {name: echo}\n  agent: {mode: sidecar}",
            "supported values: \"proxy\", \"observe\"",
        ),
        (
            long.as_str(),
            "  workloadRef: {name: echo}",
            "metadata.name must be at most 52 characters",
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
