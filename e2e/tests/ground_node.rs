//! The process node runs pods the way a kubelet does: init containers and native sidecars in
//! order, probes (startup, readiness, liveness; exec, httpGet, tcpSocket), readiness gates,
//! preStop hooks, the grace period, and sidecars stopped after the main containers in
//! reverse order. Runs against the real local control plane and the process node `local-0`.
mod ground_common;

use std::io::{Read as _, Write as _};
use std::time::{Duration, Instant};

use ground_common::*;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use serde_json::json;

/// A shell container that logs `<name> start` and, on SIGTERM, `<name> term` to `$EV`.
fn logger(name: &str, events: &str) -> serde_json::Value {
    json!({
        "name": name,
        "image": "sluice/shell:latest",
        "args": ["-c", "echo \"$N start $(date +%s.%N)\" >> \"$EV\"; trap 'echo \"$N term $(date +%s.%N)\" >> \"$EV\"; exit 0' TERM; while :; do sleep 0.05; done"],
        "env": [{"name": "N", "value": name}, {"name": "EV", "value": events}],
    })
}

/// Lines of the events file, as (name, what, unix time).
fn events(path: &std::path::Path) -> Vec<(String, String, f64)> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            Some((
                it.next()?.to_string(),
                it.next()?.to_string(),
                it.next()?.parse().ok()?,
            ))
        })
        .collect()
}

fn position(ev: &[(String, String, f64)], name: &str, what: &str) -> Option<usize> {
    ev.iter().position(|(n, w, _)| n == name && w == what)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecars_start_first_and_stop_last_after_pre_stop() -> anyhow::Result<()> {
    let (cluster, ns) = ground("ground-order").await?;
    let client = &cluster.client;
    let ev_path = scratch(&ns.name).join("events");
    let ev = ev_path.to_string_lossy().to_string();
    let mut side_a = logger("side-a", &ev);
    side_a["restartPolicy"] = json!("Always");
    // The next init container may start only once this sidecar's startup probe passed.
    side_a["startupProbe"] = json!({"exec": {"command": ["sh", "-c", "grep -q 'side-a start' \"$EV\""]}, "periodSeconds": 1});
    let mut side_b = logger("side-b", &ev);
    side_b["restartPolicy"] = json!("Always");
    side_b["startupProbe"] = json!({"exec": {"command": ["sh", "-c", "grep -q 'side-b start' \"$EV\""]}, "periodSeconds": 1});
    let mut main = logger("main", &ev);
    main["lifecycle"] = json!({"preStop": {"sleep": {"seconds": 2}}});
    create_pod(
        client,
        &ns.name,
        json!({
            "metadata": {"name": "order"},
            "spec": {
                "nodeName": NODE,
                "terminationGracePeriodSeconds": 20,
                "initContainers": [
                    {"name": "init", "image": "sluice/shell:latest", "args": ["-c", "echo \"init done $(date +%s.%N)\" >> \"$EV\""], "env": [{"name": "EV", "value": ev}]},
                    side_a,
                    side_b,
                ],
                "containers": [main],
            }
        }),
    )
    .await?;
    let pod = wait_pod(
        client,
        &ns.name,
        "order",
        Duration::from_secs(40),
        "Ready",
        is_ready,
    )
    .await?;
    assert_eq!(condition(&pod, "Initialized").as_deref(), Some("True"));
    let e = events(&ev_path);
    let (init, a, b, m) = (
        position(&e, "init", "done"),
        position(&e, "side-a", "start"),
        position(&e, "side-b", "start"),
        position(&e, "main", "start"),
    );
    assert!(
        init < a && a < b && b < m && m.is_some(),
        "start order wrong: {e:?}"
    );

    let api: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let deleted_at = unix_now();
    api.delete("order", &DeleteParams::default()).await?;
    wait_pod_gone(client, &ns.name, "order", Duration::from_secs(30)).await?;
    let e = events(&ev_path);
    let (mt, bt, at) = (
        position(&e, "main", "term"),
        position(&e, "side-b", "term"),
        position(&e, "side-a", "term"),
    );
    assert!(
        mt.is_some() && mt < bt && bt < at,
        "stop order wrong (want main, side-b, side-a): {e:?}"
    );
    let main_term = e[mt.unwrap()].2;
    assert!(
        main_term - deleted_at >= 1.8,
        "SIGTERM came {:.2} s after the delete; preStop sleep 2 should hold it back",
        main_term - deleted_at
    );
    Ok(())
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// GET / from the pod's address (the node reaches pods over its bridge).
fn http_get(addr: &str) -> anyhow::Result<String> {
    let mut s = std::net::TcpStream::connect_timeout(&addr.parse()?, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.write_all(b"GET / HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

async fn set_gate(api: &Api<Pod>, name: &str, status: &str) -> anyhow::Result<()> {
    let patch =
        json!({"status": {"conditions": [{"type": "sluice.dev/serving", "status": status}]}});
    api.patch_status(name, &PatchParams::default(), &Patch::Strategic(&patch))
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_probe_warm_up_and_readiness_gates() -> anyhow::Result<()> {
    let (cluster, ns) = ground("ground-ready").await?;
    let client = &cluster.client;
    create_pod(
        client,
        &ns.name,
        json!({
            "metadata": {"name": "gated"},
            "spec": {
                "nodeName": NODE,
                "readinessGates": [{"conditionType": "sluice.dev/serving"}],
                "containers": [{
                    "name": "echo",
                    "image": "sluice/echo:v3",
                    "args": ["--listen", "$(POD_IP):8080", "--warmup", "3s"],
                    "env": [
                        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                    ],
                    "readinessProbe": {"httpGet": {"path": "/ready", "port": 8080}, "periodSeconds": 1},
                }],
            }
        }),
    )
    .await?;
    let running = wait_pod(
        client,
        &ns.name,
        "gated",
        Duration::from_secs(30),
        "Running",
        |p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"),
    )
    .await?;
    let started = Instant::now();
    assert_ne!(
        condition(&running, "ContainersReady").as_deref(),
        Some("True"),
        "ready before its warm-up"
    );
    let pod = wait_pod(
        client,
        &ns.name,
        "gated",
        Duration::from_secs(20),
        "ContainersReady",
        |p| condition(p, "ContainersReady").as_deref() == Some("True"),
    )
    .await?;
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "ready {:?} after Running, warm-up is 3 s",
        started.elapsed()
    );
    // The gate holds Ready back.
    assert_eq!(condition(&pod, "Ready").as_deref(), Some("False"));

    // The pod answers on its own address, inside its namespace, with its downward-API name.
    let ip = pod_ip(&pod).expect("pod IP");
    assert!(
        ip.starts_with("10.245."),
        "pod IP {ip} outside the process node's CIDR"
    );
    let resp = http_get(&format!("{ip}:8080"))?;
    assert!(resp.contains("x-pod-name: gated"), "{resp}");
    assert!(resp.contains("x-version: v3"), "{resp}");
    assert_eq!(
        pod.status.as_ref().unwrap().host_ip.as_deref(),
        Some("10.245.0.1")
    );

    let api: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    set_gate(&api, "gated", "True").await?;
    wait_pod(
        client,
        &ns.name,
        "gated",
        Duration::from_secs(10),
        "Ready after the gate",
        is_ready,
    )
    .await?;
    set_gate(&api, "gated", "False").await?;
    let pod = wait_pod(
        client,
        &ns.name,
        "gated",
        Duration::from_secs(10),
        "not Ready after the gate closed",
        |p| !is_ready(p),
    )
    .await?;
    assert_eq!(condition(&pod, "ContainersReady").as_deref(), Some("True"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn liveness_restarts_and_grace_period_ends_in_sigkill() -> anyhow::Result<()> {
    let (cluster, ns) = ground("ground-grace").await?;
    let client = &cluster.client;
    create_pod(
        client,
        &ns.name,
        json!({
            "metadata": {"name": "stubborn"},
            "spec": {
                "nodeName": NODE,
                "terminationGracePeriodSeconds": 2,
                "containers": [{
                    "name": "stubborn",
                    "image": "sluice/shell:latest",
                    "args": ["-c", "trap '' TERM; while :; do sleep 0.05; done"],
                    // Nothing listens on port 9: the liveness probe fails and the container
                    // is restarted.
                    "livenessProbe": {"tcpSocket": {"port": 9}, "periodSeconds": 1, "failureThreshold": 2},
                }],
            }
        }),
    )
    .await?;
    wait_pod(
        client,
        &ns.name,
        "stubborn",
        Duration::from_secs(30),
        "restarted by its liveness probe",
        |p| restart_count(p, "stubborn") >= 1,
    )
    .await?;

    // It ignores SIGTERM: deletion takes the grace period, then SIGKILL ends it.
    let api: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let t0 = Instant::now();
    api.delete("stubborn", &DeleteParams::default()).await?;
    wait_pod_gone(client, &ns.name, "stubborn", Duration::from_secs(20)).await?;
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(1800),
        "deleted after {took:?}, before the 2 s grace period"
    );
    assert!(took < Duration::from_secs(10), "deletion took {took:?}");
    Ok(())
}

/// Whether a process is gone (or a zombie nobody reaped yet).
fn process_gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_network_pods_run_in_the_host_namespace_and_leave_nothing_behind() -> anyhow::Result<()>
{
    let (cluster, ns) = ground("ground-hostnet").await?;
    let client = &cluster.client;
    let dir = scratch(&ns.name);
    // A process of the host's own, which the pod's termination must not touch.
    let mut bystander = std::process::Command::new("sleep").arg("300").spawn()?;
    create_pod(
        client,
        &ns.name,
        json!({
            "metadata": {"name": "hostnet"},
            "spec": {
                "nodeName": NODE,
                "hostNetwork": true,
                "terminationGracePeriodSeconds": 10,
                "containers": [{
                    "name": "main",
                    "image": "sluice/shell:latest",
                    // Leaves a child behind when it exits on SIGTERM.
                    "args": ["-c", "sleep 300 & echo $! > \"$D/child\"; trap 'exit 0' TERM; while :; do sleep 0.1; done"],
                    "env": [{"name": "D", "value": dir.to_string_lossy()}],
                    // Ready once the service-account kubeconfig is there and the child started.
                    "readinessProbe": {"exec": {"command": ["sh", "-c", "test -s \"$KUBECONFIG\" && test -s \"$D/child\""]}, "periodSeconds": 1},
                }],
            }
        }),
    )
    .await?;
    let pod = wait_pod(
        client,
        &ns.name,
        "hostnet",
        Duration::from_secs(60),
        "Ready",
        is_ready,
    )
    .await?;
    let status = pod.status.clone().unwrap_or_default();
    assert!(status.pod_ip.is_some());
    assert_eq!(status.pod_ip, status.host_ip, "podIP = hostIP");
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let pod_dir = sluice_e2e::cluster::repo_root()
        .join("target/e2e/pods")
        .join(&uid);
    assert!(pod_dir.join("kubeconfig").exists());
    let child: i32 = std::fs::read_to_string(dir.join("child"))?.trim().parse()?;
    assert!(!process_gone(child));

    let api: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    api.delete("hostnet", &DeleteParams::default()).await?;
    wait_pod_gone(client, &ns.name, "hostnet", Duration::from_secs(30)).await?;
    // The child left in the pod's process group went with the pod; the host's process did not.
    wait_for(
        Duration::from_secs(5),
        "the pod's leftover child killed",
        || async { process_gone(child).then_some(()) },
    )
    .await?;
    assert!(bystander.try_wait()?.is_none(), "a host process was killed");
    assert!(!pod_dir.exists(), "the pod's directory outlived it");
    let _ = bystander.kill();
    let _ = bystander.wait();
    Ok(())
}
