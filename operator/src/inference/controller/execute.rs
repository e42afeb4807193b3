//! Execute: the planner's actions, idempotently (`AlreadyExists`/`NotFound` are success:
//! pod names are deterministic), and the warm-up checks.

use std::time::{Duration, Instant};

use futures::{FutureExt, StreamExt};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::events::{Event, EventType};
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use serde_json::json;

use super::build::build_pod;
use super::context::{Context, now};
use crate::inference::crd::*;
use crate::inference::error::Error;
use crate::inference::plan::Action;
use crate::pod::keys::{DRAIN_STARTED_ANNOTATION, SERVING_CONDITION};
use crate::pod::time::rfc3339;

pub(super) async fn execute(
    set: &InferenceSet,
    ctx: &Context,
    actions: &[Action],
) -> Result<(), Error> {
    let ns = set.namespace().unwrap_or_default();
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let reference = set.object_ref(&());
    for a in actions {
        match a {
            Action::CreatePods {
                gang,
                slot,
                revision,
                indices,
            } => {
                let pods = indices
                    .iter()
                    .map(|i| build_pod(set, gang, *slot, revision, *i, &ctx.agent_images))
                    .collect::<Result<Vec<_>, _>>()?;
                let jobs: Vec<futures::future::BoxFuture<'static, Result<(), kube::Error>>> = pods
                    .into_iter()
                    .map(|pod| {
                        let api = api.clone();
                        async move {
                            match api.create(&PostParams::default(), &pod).await {
                                Ok(_) => Ok(()),
                                Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
                                Err(e) => Err(e),
                            }
                        }
                        .boxed()
                    })
                    .collect();
                let results: Vec<Result<(), kube::Error>> = futures::stream::iter(jobs)
                    .buffer_unordered(8)
                    .collect()
                    .await;
                results.into_iter().collect::<Result<Vec<()>, _>>()?;
            }
            Action::DeletePods { pods } => {
                for p in pods {
                    // A pod whose node no longer exists has no kubelet to confirm its end:
                    // delete it at once (as the pod garbage collector would, later).
                    let node_gone = ctx
                        .pods
                        .get(&ObjectRef::<Pod>::new(p).within(&ns))
                        .and_then(|pod| pod.spec.as_ref().and_then(|s| s.node_name.clone()))
                        .is_some_and(|n| ctx.nodes.get(&ObjectRef::<Node>::new(&n)).is_none());
                    let dp = if node_gone {
                        DeleteParams::default().grace_period(0)
                    } else {
                        DeleteParams::default()
                    };
                    match api.delete(p, &dp).await {
                        Ok(_) => {}
                        Err(kube::Error::Api(s)) if s.code == 404 => {}
                        Err(e) => return Err(e.into()),
                    }
                }
            }
            Action::StartDrain { pods } => {
                let at = rfc3339(now());
                for p in pods {
                    let ann = json!({"metadata": {"annotations": {DRAIN_STARTED_ANNOTATION: at}}});
                    ignore_404(
                        api.patch(p, &PatchParams::default(), &Patch::Merge(ann))
                            .await,
                    )?;
                    set_serving(&api, p, false).await?;
                }
            }
            Action::Serve { pods } => {
                for p in pods {
                    set_serving(&api, p, true).await?;
                }
            }
            Action::CheckWarm { gang, pods } => {
                check_warm(set, ctx, &api, gang, pods).await?;
            }
            Action::Event {
                warning,
                reason,
                note,
            } => {
                if reason == "ReplicaLost" {
                    ctx.metrics.replica_lost(&ns, &set.name_any());
                }
                let ev = Event {
                    type_: if *warning {
                        EventType::Warning
                    } else {
                        EventType::Normal
                    },
                    reason: reason.clone(),
                    note: Some(note.chars().take(1000).collect()),
                    action: reason.clone(),
                    secondary: None,
                };
                if let Err(e) = ctx.recorder.publish(&ev, &reference).await {
                    tracing::debug!(error = %e, "event not recorded");
                }
            }
        }
    }
    Ok(())
}

pub(super) fn ignore_404<T>(r: Result<T, kube::Error>) -> Result<(), Error> {
    match r {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

pub(super) async fn set_serving(api: &Api<Pod>, pod: &str, serving: bool) -> Result<(), Error> {
    let patch = json!({"status": {"conditions": [{
        "type": SERVING_CONDITION,
        "status": if serving { "True" } else { "False" },
        "reason": if serving { "Warm" } else { "Draining" },
        "lastTransitionTime": rfc3339(now()),
    }]}});
    ignore_404(
        api.patch_status(pod, &PatchParams::default(), &Patch::Strategic(patch))
            .await,
    )
}

/// The warm-up gate's first-token check: one request per pod, the first byte of the
/// answer within `maxLatency`; on success the pod is annotated `sluice.dev/warm`.
pub(super) async fn check_warm(
    set: &InferenceSet,
    ctx: &Context,
    api: &Api<Pod>,
    gang: &str,
    pods: &[String],
) -> Result<(), Error> {
    let Some(ft) = set.spec.warmup.as_ref().and_then(|w| w.first_token.clone()) else {
        return Ok(());
    };
    let limit = ft.max_latency.parse().unwrap_or(Duration::from_secs(5));
    let ns = set.namespace().unwrap_or_default();
    for name in pods {
        let Some(pod) = ctx.pods.get(&ObjectRef::<Pod>::new(name).within(&ns)) else {
            continue;
        };
        if pod.annotations().contains_key(WARM_ANNOTATION) {
            continue;
        }
        let Some(ip) = pod.status.as_ref().and_then(|s| s.pod_ip.clone()) else {
            return Ok(());
        };
        match first_token(&ip, ft.port, &ft.path, ft.body.as_deref(), limit * 2).await {
            Ok(secs) if secs <= limit.as_secs_f64() => {
                let ann = json!({"metadata": {"annotations": {
                    WARM_ANNOTATION: rfc3339(now()),
                    FIRST_TOKEN_ANNOTATION: format!("{secs:.3}"),
                }}});
                ignore_404(
                    api.patch(name, &PatchParams::default(), &Patch::Merge(ann))
                        .await,
                )?;
            }
            Ok(secs) => {
                tracing::info!(gang, pod = %name, secs, "first token too slow: not warm yet");
                return Ok(());
            }
            Err(e) => {
                tracing::info!(gang, pod = %name, error = %e, "first-token check failed: not warm yet");
                return Ok(());
            }
        }
    }
    Ok(())
}

/// Seconds until the first byte of the answer's body.
pub async fn first_token(
    ip: &str,
    port: i32,
    path: &str,
    body: Option<&str>,
    timeout: Duration,
) -> Result<f64, String> {
    use http_body_util::{BodyExt, Full};
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;
    let host = if ip.contains(':') {
        format!("[{ip}]")
    } else {
        ip.to_string()
    };
    let uri = format!("http://{host}:{port}{path}");
    let client: Client<_, Full<bytes::Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let req = hyper::Request::builder()
        .method(if body.is_some() { "POST" } else { "GET" })
        .uri(&uri)
        .header("content-type", "application/json")
        .body(Full::new(bytes::Bytes::from(
            body.unwrap_or("").to_string(),
        )))
        .map_err(|e| e.to_string())?;
    let started = Instant::now();
    let fut = async {
        let resp = client.request(req).await.map_err(|e| e.to_string())?;
        if !resp.status().is_success() {
            return Err(format!("{uri}: status {}", resp.status()));
        }
        let mut body = resp.into_body();
        loop {
            match body.frame().await {
                Some(Ok(f)) if f.data_ref().is_some_and(|d| !d.is_empty()) => break,
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(e.to_string()),
                None => break,
            }
        }
        Ok(started.elapsed().as_secs_f64())
    };
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| format!("{uri}: no answer within {timeout:?}"))?
}
