//! The binds: every pod of a gang through `pods/binding`, all or nothing.

use std::time::Instant;

use futures::{FutureExt, StreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, PostParams};
use sluice_placement::PodAssignment;

use super::gangs::PendingGang;
use super::objects::ns_name;
use crate::inference::crd::GPU_IDS_ANNOTATION;
use crate::inference::metrics::InferenceMetrics;

/// Bind every pod of a gang; on any failure delete the gang's pods (all or nothing).
pub(super) async fn bind_gang(
    client: kube::Client,
    g: &PendingGang,
    assignment: Vec<PodAssignment>,
    metrics: InferenceMetrics,
) -> bool {
    let started = Instant::now();
    let jobs: Vec<futures::future::BoxFuture<'static, Result<(), kube::Error>>> = g
        .pods
        .iter()
        .cloned()
        .zip(assignment)
        .map(|(pod, a)| {
            let client = client.clone();
            async move { bind_pod(&client, &pod, &a).await }.boxed()
        })
        .collect();
    let results: Vec<Result<(), kube::Error>> = futures::stream::iter(jobs)
        .buffer_unordered(8)
        .collect()
        .await;
    let failed: Vec<&kube::Error> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    if failed.is_empty() {
        metrics.binds.inc_by(g.pods.len() as u64);
        metrics.gangs_bound.inc();
        metrics
            .bind_seconds
            .observe(started.elapsed().as_secs_f64());
        if let Some(created) = g.created {
            let waited =
                k8s_openapi::jiff::Timestamp::now().as_millisecond() - created.as_millisecond();
            metrics
                .gang_wait_seconds
                .observe(waited.max(0) as f64 / 1000.0);
        }
        tracing::debug!(gang = %g.key, pods = g.pods.len(), "gang bound");
        return true;
    }
    metrics.bind_failures.inc();
    tracing::warn!(gang = %g.key, error = %failed[0], "bind failed part-way: deleting the whole gang");
    for p in &g.pods {
        let (ns, name) = ns_name(p);
        let api: Api<Pod> = Api::namespaced(client.clone(), &ns);
        let _ = api.delete(&name, &DeleteParams::default()).await;
    }
    false
}

async fn bind_pod(client: &kube::Client, pod: &Pod, a: &PodAssignment) -> Result<(), kube::Error> {
    let (ns, name) = ns_name(pod);
    let ids: Vec<String> = a.gpus.iter().map(u32::to_string).collect();
    let binding = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Binding",
        "metadata": {
            "name": name,
            "namespace": ns,
            "annotations": { GPU_IDS_ANNOTATION: ids.join(",") },
        },
        "target": { "apiVersion": "v1", "kind": "Node", "name": a.node },
    });
    let api: Api<Pod> = Api::namespaced(client.clone(), &ns);
    api.create_subresource::<_, serde_json::Value>(
        "binding",
        &name,
        &PostParams::default(),
        &binding,
    )
    .await
    .map(|_| ())
}
