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
