//! A header route through Traefik: a `setHeaderRoute` step sends the requests that carry
//! `x-canary: yes` to the canary while every other request stays on stable (weight 0),
//! and an abort takes the header route away again.
mod ground_common;

use std::collections::BTreeMap;
use std::time::Duration;

use ground_common::{ground, sluice_app, wait_for};
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use serde_json::json;
use sluice_e2e::gateway::{deploy_traefik, http_route_resource};
use sluice_e2e::scenario::APP;
use sluice_e2e::scenario_sluice::{release_state, releases};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `x-version` of the answers to `n` requests sent to Traefik from the host, with the
/// extra request header `header` when given.
async fn versions(
    addr: &str,
    header: Option<&str>,
    n: usize,
) -> anyhow::Result<BTreeMap<String, usize>> {
    let mut out = BTreeMap::new();
    for _ in 0..n {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        let extra = header.map(|h| format!("{h}\r\n")).unwrap_or_default();
        s.write_all(
            format!("GET / HTTP/1.1\r\nHost: {addr}\r\n{extra}Connection: close\r\n\r\n")
                .as_bytes(),
        )
        .await?;
        let mut buf = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await??;
        let text = String::from_utf8_lossy(&buf).to_ascii_lowercase();
        let version = text
            .lines()
            .find_map(|l| l.strip_prefix("x-version:"))
            .map(|v| v.trim().to_string())
            .unwrap_or_else(|| text.lines().next().unwrap_or_default().to_string());
        *out.entry(version).or_default() += 1;
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_route_sends_only_matching_requests_to_the_canary() -> anyhow::Result<()> {
    let (cluster, ns) = ground("gw-headers").await?;
    let client = cluster.client.clone();
    let ns = ns.name.clone();
    let traefik = deploy_traefik(&client, &ns).await?;
    let (_ctx, _operator, _svc) = sluice_app(&client, &ns, 2).await?;
    releases(&client, &ns)
        .patch(
            APP,
            &PatchParams::default(),
            &Patch::Merge(&json!({"spec": {
                "gates": {"comparison": null},
                "trafficRouting": {"service": APP, "gatewayAPI": {"httpRoutes": [{"name": "echo"}]}},
                "steps": [
                    {"setHeaderRoute": {"match": [{"name": "x-canary", "value": "yes"}]}},
                    {"pause": {}},
                ],
            }})),
        )
        .await?;
    let route: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": "echo"},
        "spec": {
            "parentRefs": [{"name": traefik.gateway.clone()}],
            "rules": [{"backendRefs": [{"name": "echo-stable", "port": 80}]}],
        }
    }))?;
    let routes: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), &ns, &http_route_resource());
    routes.create(&PostParams::default(), &route).await?;
    wait_for(Duration::from_secs(120), "the takeover", || {
        let (client, ns) = (client.clone(), ns.clone());
        async move {
            let st = release_state(&client, &ns, APP).await.ok()?;
            (st.phase.as_deref() == Some("Completed")
                && st.status["trafficRouting"]["canaryWeight"] == 0)
                .then_some(())
        }
    })
    .await?;
    traefik.wait_serving(&client, "/").await?;
    let addr = traefik.pod_url.trim_start_matches("http://").to_string();

    ground_common::routing::set_image(&client, &ns, "sluice/echo:v2").await?;
    // Held at the pause after the header route step: the route carries the header rule.
    wait_for(Duration::from_secs(120), "the header route step", || {
        let (client, ns) = (client.clone(), ns.clone());
        async move {
            let st = release_state(&client, &ns, APP).await.ok()?;
            (st.phase.as_deref() == Some("Paused") && st.status["currentStep"] == 1)
                .then_some(st.status["trafficRouting"].clone())
        }
    })
    .await?;
    // Traefik applies the new rule within a moment: wait for the first canary answer.
    wait_for(
        Duration::from_secs(20),
        "Traefik to apply the header rule",
        || {
            let addr = addr.clone();
            async move {
                let v = versions(&addr, Some("x-canary: yes"), 1).await.ok()?;
                v.contains_key("v2").then_some(())
            }
        },
    )
    .await?;
    let with = versions(&addr, Some("x-canary: yes"), 30).await?;
    let without = versions(&addr, None, 30).await?;
    let other = versions(&addr, Some("x-canary: no"), 30).await?;
    let st = release_state(&client, &ns, APP).await?;
    eprintln!(
        "header route: with x-canary: yes {with:?}; without {without:?}; x-canary: no {other:?}; status {}",
        st.status["trafficRouting"]
    );
    assert_eq!(with, BTreeMap::from([("v2".to_string(), 30)]));
    assert_eq!(without, BTreeMap::from([("v1".to_string(), 30)]));
    assert_eq!(other, BTreeMap::from([("v1".to_string(), 30)]));
    assert_eq!(
        st.status["trafficRouting"]["headerRoute"],
        json!(["x-canary: yes"])
    );

    // Abort: the header rule goes, then the canary's pod.
    releases(&client, &ns)
        .patch(
            APP,
            &PatchParams::default(),
            &Patch::Merge(&json!({"metadata": {"annotations": {"sluice.dev/abort": "e2e"}}})),
        )
        .await?;
    wait_for(Duration::from_secs(120), "the rollback", || {
        let (client, ns, routes) = (client.clone(), ns.clone(), routes.clone());
        async move {
            let st = release_state(&client, &ns, APP).await.ok()?;
            let r = routes.get("echo").await.ok()?;
            let rules = r.data["spec"]["rules"].as_array()?.len();
            (st.phase.as_deref() == Some("Aborted")
                && rules == 1
                && st.status["revisions"]
                    .as_array()
                    .is_some_and(|r| r.len() == 1))
            .then_some(())
        }
    })
    .await?;
    let after = versions(&addr, Some("x-canary: yes"), 20).await?;
    eprintln!("after the abort, with x-canary: yes {after:?}");
    assert_eq!(after, BTreeMap::from([("v1".to_string(), 20)]));
    traefik.cleanup(&client).await?;
    Ok(())
}
