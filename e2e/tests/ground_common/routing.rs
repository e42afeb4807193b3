//! Watching a release through a gateway: the canary's weight on the echo app's HTTPRoute
//! (the upstream connections the pods accepted: `sluice_e2e::upstream`).
use kube::Client;
use kube::api::{Api, DynamicObject};

/// The HTTPRoutes of `ns`.
pub fn routes(client: &Client, ns: &str) -> Api<DynamicObject> {
    Api::namespaced_with(
        client.clone(),
        ns,
        &sluice_e2e::gateway::http_route_resource(),
    )
}

/// The canary's weight (percent) on the first rule of the HTTPRoute `route`, between the
/// backendRefs `echo-stable` and `echo-canary`; `None` before the canary's backendRef is
/// there.
pub async fn route_weight(api: &Api<DynamicObject>, route: &str) -> Option<i32> {
    let r = api.get(route).await.ok()?;
    let refs = r.data.pointer("/spec/rules/0/backendRefs")?.as_array()?;
    let weight = |name: &str| {
        refs.iter()
            .find(|b| b["name"] == name)
            .map(|b| b["weight"].as_i64().unwrap_or(1))
    };
    let (s, c) = (weight("echo-stable")?, weight("echo-canary")?);
    (s + c > 0).then(|| ((c * 100 + (s + c) / 2) / (s + c)) as i32)
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64() * 1000.0)
        .unwrap_or(0.0)
}

/// The share (percent) of the answers in `[from, to)` (unix ms) that pods whose names start
/// with `prefix` gave, from a load report's one-second bins; with the number of answers.
pub fn share_between(
    report: &serde_json::Value,
    prefix: &str,
    from: f64,
    to: f64,
) -> Option<(f64, u64)> {
    let origin = report["origin_unix_ms"].as_f64()?;
    let (mut canary, mut total) = (0u64, 0u64);
    for bin in report["series"].as_array()? {
        let t = origin + bin["t"].as_f64()? * 1000.0;
        if t < from || t + 1000.0 > to {
            continue;
        }
        for (pod, n) in bin["by_pod"].as_object()? {
            let n = n.as_u64().unwrap_or(0);
            total += n;
            if pod.starts_with(prefix) {
                canary += n;
            }
        }
    }
    (total > 0).then(|| (canary as f64 * 100.0 / total as f64, total))
}

/// A new image for the echo app's Deployment (a GitOps edit of its template).
pub async fn set_image(client: &Client, ns: &str, image: &str) -> anyhow::Result<()> {
    use k8s_openapi::api::apps::v1::Deployment;
    use kube::api::{Patch, PatchParams};
    let app = sluice_e2e::scenario::APP;
    Api::<Deployment>::namespaced(client.clone(), ns)
        .patch(
            app,
            &PatchParams::default(),
            &Patch::Strategic(
                serde_json::json!({"spec": {"template": {"spec": {"containers": [
                {"name": app, "image": image}]}}}}),
            ),
        )
        .await?;
    Ok(())
}
