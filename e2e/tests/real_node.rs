//! The test ground's real node `local-0`: an upstream kubelet with containerd, whose pods
//! run in containers with their own network namespaces behind a CNI bridge. What a
//! production node does here is what Sluice's drain depends on: the kubelet's probes and
//! `preStop` hooks come from the bridge's address, not from the node's InternalIP.
mod ground_common;

use std::process::Command;
use std::time::Duration;

use anyhow::Context as _;
use ground_common::*;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams};
use serde_json::json;
use sluice_e2e::cluster::upstream_binaries;

fn kubectl(cluster: &sluice_e2e::cluster::TestCluster, args: &[&str]) -> anyhow::Result<String> {
    let bins = upstream_binaries()?;
    let out = Command::new(&bins["kubectl"])
        .arg("--kubeconfig")
        .arg(&cluster.kubeconfig)
        .args(args)
        .output()
        .context("running kubectl")?;
    anyhow::ensure!(
        out.status.success(),
        "kubectl {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

async fn running(api: &Api<Pod>, name: &str) -> anyhow::Result<Pod> {
    wait_for(
        Duration::from_secs(60),
        &format!("pod {name} Running"),
        || {
            let api = api.clone();
            let name = name.to_string();
            async move {
                let p = api.get_opt(&name).await.ok()??;
                (p.status.as_ref()?.phase.as_deref() == Some("Running")).then_some(p)
            }
        },
    )
    .await
}

#[tokio::test]
async fn the_node_is_an_upstream_kubelet_on_containerd() -> anyhow::Result<()> {
    let (cluster, _ns) = ground("realnode").await?;
    let node = Api::<Node>::all(cluster.client.clone()).get(NODE).await?;
    let status = node.status.unwrap_or_default();
    let info = status.node_info.context("nodeInfo")?;
    assert_eq!(info.kubelet_version, "v1.34.4");
    assert!(
        info.container_runtime_version.starts_with("containerd://"),
        "{}",
        info.container_runtime_version
    );
    let internal = status
        .addresses
        .unwrap_or_default()
        .into_iter()
        .find(|a| a.type_ == "InternalIP")
        .context("InternalIP")?
        .address;
    assert_eq!(internal, "10.250.0.1");
    // The pods' gateway, where the kubelet's probes and hooks come from, is another address.
    let wide = kubectl(&cluster, &["get", "node", NODE, "-o", "wide"])?;
    assert!(
        wide.contains("v1.34.4") && wide.contains("containerd://"),
        "{wide}"
    );
    Ok(())
}

#[tokio::test]
async fn pods_run_in_containers_with_logs_and_exec() -> anyhow::Result<()> {
    let (cluster, ns) = ground("realnode").await?;
    let api: Api<Pod> = Api::namespaced(cluster.client.clone(), &ns.name);
    create_pod(
        &cluster.client,
        &ns.name,
        json!({
            "metadata": {"name": "shell"},
            "spec": {
                "nodeName": NODE,
                "terminationGracePeriodSeconds": 1,
                "containers": [{
                    "name": "sh",
                    "image": "sluice/shell:1",
                    "imagePullPolicy": "Never",
                    "args": ["-c", "echo hello from $(hostname); exec sleep 600"],
                }],
            }
        }),
    )
    .await?;
    let pod = running(&api, "shell").await?;
    let status = pod.status.unwrap_or_default();
    let id = status.container_statuses.unwrap_or_default()[0]
        .container_id
        .clone()
        .unwrap_or_default();
    assert!(id.starts_with("containerd://"), "{id}");
    assert_ne!(
        status.pod_ip, status.host_ip,
        "a pod has an address of its own"
    );

    let logs = wait_for(Duration::from_secs(20), "the container's log line", || {
        let out = kubectl(&cluster, &["logs", "-n", &ns.name, "shell"]).ok();
        async move { out.filter(|o| o.contains("hello from shell")) }
    })
    .await?;
    assert!(logs.contains("hello from shell"));
    let out = kubectl(
        &cluster,
        &[
            "exec",
            "-n",
            &ns.name,
            "shell",
            "--",
            "cat",
            "/etc/hostname",
        ],
    )?;
    assert_eq!(out.trim(), "shell");
    api.delete("shell", &DeleteParams::default()).await?;
    Ok(())
}

/// An echo app fronted by the agent as a native sidecar, with the drain trigger the
/// operator injects: `preStop.httpGet /drain` carrying the drain token.
fn agent_pod(name: &str, agent_token: &str, hook_token: &str) -> serde_json::Value {
    json!({
        "metadata": {"name": name},
        "spec": {
            "nodeName": NODE,
            "terminationGracePeriodSeconds": 30,
            "initContainers": [{
                "name": "sluice-agent",
                "image": "sluice/agent:dev",
                "restartPolicy": "Always",
                // A quiet period long enough to read the agent's log while the pod drains.
                "args": ["proxy", "--listen", "0.0.0.0:15001", "--upstream", "127.0.0.1:8080",
                         "--admin", "0.0.0.0:9901", "--quiet-period", "4s"],
                // HOST_IP is what an agent that trusted the node's address would compare the
                // hook's source with (this one ignores it): kept so that such an agent, run
                // with this pod, shows the refusal this test guards against.
                "env": [
                    {"name": "SLUICE_DRAIN_TOKEN", "value": agent_token},
                    {"name": "HOST_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}}},
                ],
                "readinessProbe": {"httpGet": {"path": "/ready", "port": 9901}, "periodSeconds": 1},
            }],
            "containers": [{
                "name": "app",
                "image": "sluice/echo:v1",
                "args": ["--listen", "127.0.0.1:8080"],
                "lifecycle": {"preStop": {"httpGet": {
                    "path": "/drain", "port": 9901,
                    "httpHeaders": [{"name": "x-sluice-drain-token", "value": hook_token}],
                }}},
            }],
        }
    })
}

/// Reads `container`'s log of `pod` until `want` shows up or the pod is gone.
async fn log_until_gone(
    cluster: &sluice_e2e::cluster::TestCluster,
    api: &Api<Pod>,
    ns: &str,
    pod: &str,
    want: &str,
) -> anyhow::Result<String> {
    let mut last = String::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while std::time::Instant::now() < deadline {
        if let Ok(out) = kubectl(cluster, &["logs", "-n", ns, pod, "-c", "sluice-agent"]) {
            last = out;
            if last.contains(want) {
                return Ok(last);
            }
        }
        if api.get_opt(pod).await?.is_none() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    anyhow::bail!("{want:?} not in the agent's log of {pod}:\n{last}")
}

#[tokio::test]
async fn the_kubelets_prestop_drains_the_agent_with_the_token_not_by_address() -> anyhow::Result<()>
{
    let (cluster, ns) = ground("prestop").await?;
    let api: Api<Pod> = Api::namespaced(cluster.client.clone(), &ns.name);
    create_pod(
        &cluster.client,
        &ns.name,
        agent_pod("good", "s3cret", "s3cret"),
    )
    .await?;
    create_pod(
        &cluster.client,
        &ns.name,
        agent_pod("forged", "s3cret", "guess"),
    )
    .await?;
    let good = running(&api, "good").await?;
    running(&api, "forged").await?;
    let host_ip = good.status.and_then(|s| s.host_ip).unwrap_or_default();

    api.delete("good", &DeleteParams::default()).await?;
    api.delete("forged", &DeleteParams::default()).await?;
    let log = log_until_gone(&cluster, &api, &ns.name, "good", "drain requested").await?;
    // The hook came from the CNI bridge (the pods' gateway), not from the node's address:
    // an agent that trusted status.hostIP would have refused it.
    let line = log
        .lines()
        .find(|l| l.contains("drain requested"))
        .unwrap_or_default();
    assert!(line.contains("10.245.0.1:"), "hook source: {line}");
    assert!(
        !line.contains(&format!("{host_ip}:")),
        "hook source: {line}"
    );
    let log = log_until_gone(&cluster, &api, &ns.name, "forged", "refused /drain").await?;
    assert!(log.contains("wrong_token"), "{log}");
    Ok(())
}

/// A pod whose agent gets SIGTERM before any drain (here: the preStop hook carries a wrong
/// token, so the agent refuses it) is loud at both ends: the agent logs an error and leaves
/// its undrained termination message, and the operator, which sees that message in the
/// pod's last status, publishes a `PodLeftUndrained` Warning for the pod. A pod that
/// drained gets none.
#[tokio::test]
async fn a_pod_that_ends_undrained_is_reported_by_the_operator() -> anyhow::Result<()> {
    use k8s_openapi::api::events::v1::Event;
    use kube::api::ListParams;
    use sluice_e2e::scenario_sluice::{OperatorProcess, apply_crds};
    let (cluster, ns) = ground("undrained").await?;
    apply_crds(&cluster.client).await?;
    let mut operator = OperatorProcess::start(&cluster.kubeconfig, &ns.name)?;
    let api: Api<Pod> = Api::namespaced(cluster.client.clone(), &ns.name);
    // Labelled as a Release's pods are, so that the operator's pod watch covers them.
    let labelled = |mut pod: serde_json::Value| {
        pod["metadata"]["labels"] =
            json!({"sluice.dev/release": "echo", "sluice.dev/revision": "r1"});
        pod
    };
    create_pod(
        &cluster.client,
        &ns.name,
        labelled(agent_pod("drained", "s3cret", "s3cret")),
    )
    .await?;
    create_pod(
        &cluster.client,
        &ns.name,
        labelled(agent_pod("refused", "s3cret", "guess")),
    )
    .await?;
    running(&api, "drained").await?;
    running(&api, "refused").await?;
    api.delete("drained", &DeleteParams::default()).await?;
    api.delete("refused", &DeleteParams::default()).await?;
    let log = log_until_gone(
        &cluster,
        &api,
        &ns.name,
        "refused",
        "termination signal before any drain",
    )
    .await?;
    assert!(log.contains("ERROR"), "{log}");
    let events: Api<Event> = Api::namespaced(cluster.client.clone(), &ns.name);
    let warned = |pod: &'static str| {
        let events = events.clone();
        async move {
            events
                .list(&ListParams::default())
                .await
                .ok()?
                .items
                .into_iter()
                .find(|e| {
                    e.reason.as_deref() == Some("PodLeftUndrained")
                        && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(pod)
                })
        }
    };
    let ev = wait_for(
        Duration::from_secs(60),
        "a PodLeftUndrained event for the pod whose drain was refused",
        || warned("refused"),
    )
    .await?;
    assert_eq!(ev.type_.as_deref(), Some("Warning"));
    wait_pod_gone(
        &cluster.client,
        &ns.name,
        "drained",
        Duration::from_secs(60),
    )
    .await?;
    // The drained pod's last status carried no undrained message: no warning for it
    // (checked once it is gone; its drain took the quiet period longer than the refusal).
    assert!(
        warned("drained").await.is_none(),
        "a drained pod was reported"
    );
    operator.stop();
    Ok(())
}

/// Programs we did not write run on the node from the machine's own installation: the
/// `sluice/host` image is an empty root whose /usr is the host's, mounted read-only.
#[tokio::test]
async fn foreign_programs_run_from_the_hosts_usr() -> anyhow::Result<()> {
    let (cluster, ns) = ground("foreign").await?;
    let api: Api<Pod> = Api::namespaced(cluster.client.clone(), &ns.name);
    create_pod(
        &cluster.client,
        &ns.name,
        sluice_e2e::scenario::host_program_pod(
            "py",
            NODE,
            &["python3", "-c", "import http.server as h; h.test(HandlerClass=h.SimpleHTTPRequestHandler, port=8000, bind='0.0.0.0')"],
        ),
    )
    .await?;
    let pod = running(&api, "py").await?;
    let ip = pod.status.and_then(|s| s.pod_ip).context("pod IP")?;
    let body = wait_for(
        Duration::from_secs(30),
        "python's http.server to answer",
        || {
            let ip = ip.clone();
            async move {
                let mut s = std::net::TcpStream::connect_timeout(
                    &format!("{ip}:8000").parse().ok()?,
                    Duration::from_secs(1),
                )
                .ok()?;
                use std::io::{Read as _, Write as _};
                s.write_all(b"GET / HTTP/1.0\r\n\r\n").ok()?;
                let mut out = String::new();
                s.read_to_string(&mut out).ok()?;
                Some(out)
            }
        },
    )
    .await?;
    assert!(body.starts_with("HTTP/1.0 200"), "{body}");
    assert!(body.contains("SimpleHTTP"), "{body}");
    Ok(())
}

/// In-cluster traffic goes through the real kube-proxy: a client pod (our load generator
/// in its image) reaches a Service's ClusterIP, and kube-proxy's nftables rules spread its
/// connections over the Service's pods.
#[tokio::test]
async fn pods_reach_a_service_through_kube_proxy() -> anyhow::Result<()> {
    use k8s_openapi::api::core::v1::Service;
    let (cluster, ns) = ground("kubeproxy").await?;
    let api: Api<Pod> = Api::namespaced(cluster.client.clone(), &ns.name);
    for name in ["echo-a", "echo-b"] {
        create_pod(
            &cluster.client,
            &ns.name,
            json!({
                "metadata": {"name": name, "labels": {"app": "echo"}},
                "spec": {
                    "nodeName": NODE,
                    "terminationGracePeriodSeconds": 1,
                    "containers": [{
                        "name": "echo",
                        "image": "sluice/echo:v1",
                        "env": [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
                        "readinessProbe": {"httpGet": {"path": "/ready", "port": 8080}, "periodSeconds": 1},
                    }],
                }
            }),
        )
        .await?;
    }
    let svc: Service = serde_json::from_value(json!({
        "metadata": {"name": "echo"},
        "spec": {"selector": {"app": "echo"}, "ports": [{"port": 80, "targetPort": 8080}]},
    }))?;
    let svc = Api::<Service>::namespaced(cluster.client.clone(), &ns.name)
        .create(&Default::default(), &svc)
        .await?;
    let cluster_ip = svc.spec.and_then(|s| s.cluster_ip).context("clusterIP")?;
    let mut pod_ips = Vec::new();
    for name in ["echo-a", "echo-b"] {
        let ip = wait_for(Duration::from_secs(60), &format!("{name} Ready"), || {
            let api = api.clone();
            async move {
                let p = api.get_opt(name).await.ok()??;
                (condition(&p, "Ready").as_deref() == Some("True"))
                    .then(|| p.status?.pod_ip)
                    .flatten()
            }
        })
        .await?;
        pod_ips.push(ip);
    }
    // kube-proxy has programmed both endpoints once its table names them.
    wait_for(
        Duration::from_secs(30),
        "kube-proxy's rules for both pods",
        || {
            let table = Command::new("nft")
                .args(["list", "table", "ip", "kube-proxy"])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            let ok =
                pod_ips.iter().all(|ip| table.contains(ip.as_str())) && table.contains(&cluster_ip);
            async move { ok.then_some(()) }
        },
    )
    .await?;
    let url = format!("http://{cluster_ip}:80/");
    // 32 connections: kube-proxy picks a backend at random per connection, so both pods
    // get some (all on one: 2^-31).
    start_load_pod(&cluster.client, &ns.name, &url, 32, 100, 3).await?;
    let (phase, report, out) =
        load_pod_report(&cluster.client, &ns.name, Duration::from_secs(60)).await?;
    assert_eq!(phase, "Succeeded", "{out}");
    assert_eq!(report["failed"], 0, "{report}");
    assert!(report["requests"].as_u64().unwrap_or(0) >= 250, "{report}");
    let by_pod = report["by_pod"].as_object().context("by_pod")?;
    for name in ["echo-a", "echo-b"] {
        assert!(
            by_pod.get(name).and_then(|v| v.as_u64()).unwrap_or(0) > 0,
            "kube-proxy sent no connection to {name}: {by_pod:?}"
        );
    }
    Ok(())
}

/// An extra node started with `--gpus`: its kubelet advertises the GPUs of the fake device
/// plugin itself (nobody patches the Node's status), the scheduler places a pod that asks
/// for two on it, the kubelet's device manager allocates two devices and the container sees
/// them in `NVIDIA_VISIBLE_DEVICES`, as with NVIDIA's plugin; the node's volume mounts
/// (the service-account token) still reach the container from its own mount namespace.
#[tokio::test]
async fn a_gpu_node_gets_its_gpus_from_a_device_plugin() -> anyhow::Result<()> {
    const GPU_NODE: &str = "local-8";
    let (cluster, ns) = ground("gpunode").await?;
    let logs = sluice_e2e::cluster::state_dir().join("logs");
    std::fs::create_dir_all(&logs)?;
    let mut node = Command::new(env!("CARGO_BIN_EXE_sluice-e2e"))
        .args(["node", "--name", GPU_NODE, "--gpus", "4"])
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(
            logs.join(format!("node-{GPU_NODE}.log")),
        )?)
        .spawn()?;
    let result = async {
        let nodes: Api<Node> = Api::all(cluster.client.clone());
        // Image import on a fresh node takes a while.
        let gpus = wait_for(
            Duration::from_secs(240),
            "the kubelet advertising 4 GPUs",
            || {
                let nodes = nodes.clone();
                async move {
                    let n = nodes.get_opt(GPU_NODE).await.ok()??;
                    let status = n.status?;
                    let ready = status
                        .conditions?
                        .iter()
                        .any(|c| c.type_ == "Ready" && c.status == "True");
                    let gpus = status.capacity?.get("nvidia.com/gpu")?.0.clone();
                    (ready && gpus == "4").then_some(gpus)
                }
            },
        )
        .await?;
        assert_eq!(gpus, "4");
        let api: Api<Pod> = Api::namespaced(cluster.client.clone(), &ns.name);
        create_pod(
            &cluster.client,
            &ns.name,
            json!({
                "metadata": {"name": "gpu"},
                "spec": {
                    "nodeSelector": {"kubernetes.io/hostname": GPU_NODE},
                    "terminationGracePeriodSeconds": 1,
                    "containers": [{
                        "name": "sh",
                        "image": "sluice/shell:1",
                        "imagePullPolicy": "Never",
                        "args": ["-c", "echo gpus=$NVIDIA_VISIBLE_DEVICES; ls /var/run/secrets/kubernetes.io/serviceaccount/token && exec sleep 600"],
                        "resources": {"limits": {"nvidia.com/gpu": "2"}},
                    }],
                }
            }),
        )
        .await?;
        let pod = running(&api, "gpu").await?;
        assert_eq!(
            pod.spec.as_ref().and_then(|s| s.node_name.as_deref()),
            Some(GPU_NODE)
        );
        let out = wait_for(Duration::from_secs(20), "the container's log", || {
            let out = kubectl(&cluster, &["logs", "-n", &ns.name, "gpu"]).ok();
            async move { out.filter(|o| o.contains("serviceaccount/token")) }
        })
        .await?;
        let line = out
            .lines()
            .find_map(|l| l.strip_prefix("gpus="))
            .with_context(|| format!("no gpus= line in {out:?}"))?;
        let ids: Vec<&str> = line.split(',').collect();
        assert_eq!(ids.len(), 2, "{line}");
        assert!(
            ids.iter()
                .all(|id| id.starts_with(&format!("GPU-sluice-{GPU_NODE}-"))),
            "{line}"
        );
        assert_ne!(ids[0], ids[1]);
        api.delete("gpu", &DeleteParams::default()).await?;
        anyhow::Ok(())
    }
    .await;
    let _ = Command::new("kill")
        .args(["-TERM", &node.id().to_string()])
        .status();
    let stopped = tokio::task::spawn_blocking(move || node.wait()).await??;
    result?;
    assert!(stopped.success(), "sluice-e2e node exited with {stopped}");
    Ok(())
}
