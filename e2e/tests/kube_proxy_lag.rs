//! In-cluster traffic behind a lagging kube-proxy: the second, real source of endpoint lag.
//!
//! The ground's kube-proxy is restarted with `minSyncPeriod: 10s` (it syncs its nftables
//! rules at most once per 10 s, so the endpoint changes a release makes in a burst reach the
//! rules late). A client pod (our load generator, in its image) sends keep-alive requests to
//! the Service's ClusterIP through those rules while a Release rolls v1 → v2. No request may
//! fail. The test also records, for every old pod, how long kube-proxy still routed to it
//! after its endpoint went unready, to show the lag was there.
mod ground_common;

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use ground_common::{
    failed_bins, ground, is_ready, load_pod_report, pod_ip, sluice_app, start_load_pod, wait_for,
};
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::{Api, ListParams};
use sluice_e2e::cluster::kube_proxy::MinSyncPeriod;
use sluice_e2e::scenario::{APP, Strategy};

const MIN_SYNC: Duration = Duration::from_secs(10);
/// How long the client pod sends: the release must end well inside it.
const LOAD: Duration = Duration::from_secs(75);

fn nft_table() -> String {
    Command::new("nft")
        .args(["list", "table", "ip", "kube-proxy"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// Whether kube-proxy's rules send new connections to `ip`: a service chain's load
/// balancing map names its endpoint chain (`…__<ip>/<port>`). Endpoint chains outlive
/// their place in the map, so their presence alone says nothing.
fn routes_to(table: &str, ip: &str) -> bool {
    let endpoint = format!("__{ip}/");
    table
        .lines()
        .filter(|l| l.contains("numgen") && l.contains("vmap"))
        .any(|l| l.contains(&endpoint))
}

async fn app_pods(api: &Api<Pod>) -> anyhow::Result<Vec<Pod>> {
    Ok(api
        .list(&ListParams::default().labels(&format!("app={APP}")))
        .await?
        .items)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_is_lossless_behind_a_lagging_kube_proxy() -> anyhow::Result<()> {
    let (cluster, ns) = ground("kplag").await?;
    let client = cluster.client.clone();
    let _min_sync = MinSyncPeriod::set(MIN_SYNC)?;
    let (ctx, strategy, svc) = sluice_app(&client, &ns.name, 3).await?;
    let cluster_ip = svc.spec.and_then(|s| s.cluster_ip).context("clusterIP")?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let old: Vec<(String, String)> = wait_for(
        Duration::from_secs(120),
        "three v1 pods Ready and in kube-proxy's rules",
        || {
            let pods = pods.clone();
            async move {
                let list = app_pods(&pods).await.ok()?;
                let ready: Vec<(String, String)> = list
                    .iter()
                    .filter(|p| is_ready(p))
                    .filter_map(|p| Some((p.name_any(), pod_ip(p)?)))
                    .collect();
                let table = nft_table();
                (ready.len() == 3 && ready.iter().all(|(_, ip)| routes_to(&table, ip)))
                    .then_some(ready)
            }
        },
    )
    .await?;

    let url = format!("http://{cluster_ip}:80/");
    start_load_pod(&client, &ns.name, &url, 30, 150, LOAD.as_secs()).await?;
    wait_for(Duration::from_secs(60), "the client pod to run", || {
        let pods = pods.clone();
        async move {
            let p = pods.get_opt("client").await.ok()??;
            (p.status?.phase? == "Running").then_some(())
        }
    })
    .await?;
    let load_started = Instant::now();
    tokio::time::sleep(Duration::from_secs(5)).await;

    // While the release runs: when each old pod's endpoint went unready (its Ready
    // condition, which the Serving readiness gate turns false) and when kube-proxy's rules
    // stopped naming it.
    let unready_at: Arc<Mutex<BTreeMap<String, Instant>>> = Arc::default();
    let unrouted_at: Arc<Mutex<BTreeMap<String, Instant>>> = Arc::default();
    let watcher = {
        let (pods, old, unready_at, unrouted_at) = (
            pods.clone(),
            old.clone(),
            unready_at.clone(),
            unrouted_at.clone(),
        );
        tokio::spawn(async move {
            let deadline = Instant::now() + LOAD;
            // Until kube-proxy routes to none of the old pods (or the load ends).
            while Instant::now() < deadline {
                let now = Instant::now();
                let list = app_pods(&pods).await.unwrap_or_default();
                let table = nft_table();
                for (name, ip) in &old {
                    let ready = list.iter().any(|p| &p.name_any() == name && is_ready(p));
                    if !ready {
                        unready_at
                            .lock()
                            .unwrap()
                            .entry(name.clone())
                            .or_insert(now);
                    }
                    if !routes_to(&table, ip) {
                        unrouted_at
                            .lock()
                            .unwrap()
                            .entry(name.clone())
                            .or_insert(now);
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };

    strategy.release(&ctx).await?;
    let released = strategy
        .wait_released(&ctx, 3, Instant::now() + Duration::from_secs(120))
        .await;
    let released_at = load_started.elapsed();
    let release_s = released_at.as_secs_f64() - 5.0;
    let _ = watcher.await;
    released.context("the release did not complete")?;
    anyhow::ensure!(
        released_at + Duration::from_secs(3) < LOAD,
        "the release ended {release_s:.1} s in, too late for the {LOAD:?} of load to show what followed it"
    );

    let (phase, report, out) =
        load_pod_report(&client, &ns.name, LOAD + Duration::from_secs(30)).await?;
    let drains = sluice_e2e::scenario_sluice::release_state(&client, &ns.name, APP)
        .await?
        .status["drains"]
        .clone();
    eprintln!("drains: {drains}; load origin {}", report["origin_unix_ms"]);
    for bin in failed_bins(&report) {
        eprintln!(
            "  failures at +{}s: {} new conns {}",
            bin["t"], bin["errors"], bin["new_conns"]
        );
    }

    let lags: Vec<String> = {
        let (unready, unrouted) = (unready_at.lock().unwrap(), unrouted_at.lock().unwrap());
        old.iter()
            .map(|(name, _)| match (unready.get(name), unrouted.get(name)) {
                (Some(a), Some(b)) => format!(
                    "{name}: {:.1} s",
                    b.saturating_duration_since(*a).as_secs_f64()
                ),
                _ => format!("{name}: not seen leaving"),
            })
            .collect()
    };
    eprintln!(
        "behind kube-proxy with minSyncPeriod {MIN_SYNC:?}: {} requests, {} failed {}, release {release_s:.1} s; \
         kube-proxy still routed to each old pod after it went unready for: {}",
        report["requests"],
        report["failed"],
        report["by_outcome"],
        lags.join(", ")
    );
    assert_eq!(phase, "Succeeded", "{out}");
    assert_eq!(report["failed"], 0, "{report}");
    assert!(
        report["requests"].as_u64().unwrap_or(0) as f64 >= 0.8 * 150.0 * LOAD.as_secs_f64(),
        "{report}"
    );
    let by_pod = report["by_pod"].as_object().context("by_pod")?;
    let new_answered: u64 = by_pod
        .iter()
        .filter(|(pod, _)| !old.iter().any(|(o, _)| o == *pod))
        .filter_map(|(_, n)| n.as_u64())
        .sum();
    assert!(new_answered > 0, "no new pod answered: {by_pod:?}");
    Ok(())
}

#[test]
fn routes_to_reads_the_load_balancing_maps_only() {
    let table = "\tchain service-X-ns/echo/tcp/http {
\t\tnumgen random mod 2 vmap { 0 : goto endpoint-A-ns/echo/tcp/http__10.245.0.12/8080, 1 : goto endpoint-B-ns/echo/tcp/http__10.245.0.130/8080 }
\t}
\tchain endpoint-C-ns/echo/tcp/http__10.245.0.13/8080 {
\t}";
    assert!(routes_to(table, "10.245.0.12"));
    assert!(routes_to(table, "10.245.0.130"));
    assert!(!routes_to(table, "10.245.0.1"));
    assert!(!routes_to(table, "10.245.0.13"));
}
