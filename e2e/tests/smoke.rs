//! Smoke e2e of the foundation: CRDs apply server-side, the chart installs with Helm, the
//! operator's RBAC allows what it needs (and nothing it must not have), the operator runs
//! for real as a pod on the real node `local-0` — in its own network namespace, reaching the
//! API server through the `kubernetes` Service (kube-proxy), authenticated as its own
//! ServiceAccount by the kubelet's projected token, Ready through its probes, holding its
//! leader Lease — and the control plane
//! carries 100+ KWOK nodes. Runs against the real local control plane.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use k8s_openapi::api::authentication::v1::SelfSubjectReview;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, ListParams, PostParams};
use sluice_e2e::cluster::{TestCluster, repo_root, upstream_binaries};

struct Tools {
    bins: BTreeMap<String, PathBuf>,
    kubeconfig: PathBuf,
}

impl Tools {
    fn run(&self, tool: &str, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new(&self.bins[tool])
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .current_dir(repo_root())
            .output()
            .with_context(|| format!("running {tool}"))?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            bail!(
                "{tool} {} failed: {}{}",
                args.join(" "),
                stdout,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(stdout)
    }

    /// `kubectl auth can-i` as the operator's service account; prints "yes" or "no".
    fn can_i(&self, ns: &str, verb: &str, resource: &str, in_ns: Option<&str>) -> bool {
        let sa = format!("system:serviceaccount:{ns}:sluice-operator");
        let mut args = vec!["auth", "can-i", verb, resource, "--as", &sa];
        match in_ns {
            Some(n) => args.extend(["-n", n]),
            None => args.push("--all-namespaces"),
        }
        // can-i exits 1 for "no"; its stdout is what matters.
        let out = Command::new(&self.bins["kubectl"])
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(&args)
            .output()
            .expect("kubectl runs");
        String::from_utf8_lossy(&out.stdout).trim() == "yes"
    }
}

/// `helm uninstall` when dropped, so that a failing test does not leave an operator running
/// (it would act on the whole cluster).
struct Installed<'a> {
    tools: &'a Tools,
    namespace: String,
    done: bool,
}

impl Installed<'_> {
    fn uninstall(&mut self) -> anyhow::Result<()> {
        self.done = true;
        self.tools
            .run(
                "helm",
                &["uninstall", "sluice", "--namespace", &self.namespace],
            )
            .map(|_| ())
    }
}

impl Drop for Installed<'_> {
    fn drop(&mut self) {
        if !self.done {
            let _ = self.uninstall();
        }
    }
}

fn pod_ready(p: &Pod) -> bool {
    let status = p.status.as_ref();
    status.and_then(|s| s.phase.as_deref()) == Some("Running")
        && status
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Polls `check` every 500 ms until it yields a value or `timeout` passes.
async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await? {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The real node the operator pod is pinned to (`SLUICE_E2E_OPERATOR_NODE`, default
/// `local-0`): pinned, because on a KWOK node a pod only pretends to run.
fn operator_node() -> String {
    std::env::var("SLUICE_E2E_OPERATOR_NODE").unwrap_or_else(|_| "local-0".into())
}

/// The service-account token the kubelet of `node` projected into pod `uid`.
fn projected_token(node: &str, uid: &str) -> anyhow::Result<String> {
    let volumes = repo_root()
        .join("target/e2e/node")
        .join(node)
        .join("kubelet/pods")
        .join(uid)
        .join("volumes/kubernetes.io~projected");
    for e in std::fs::read_dir(&volumes)
        .with_context(|| format!("reading {}", volumes.display()))?
        .flatten()
    {
        if let Ok(t) = std::fs::read_to_string(e.path().join("token")) {
            return Ok(t.trim().to_string());
        }
    }
    bail!("no projected token under {}", volumes.display())
}

#[tokio::test]
async fn crds_chart_rbac_and_a_hundred_kwok_nodes() -> anyhow::Result<()> {
    let cluster = TestCluster::get().await?;
    let tools = Tools {
        bins: upstream_binaries()?,
        kubeconfig: cluster.kubeconfig.clone(),
    };

    // CRDs, server-side, and established.
    tools.run(
        "kubectl",
        &["apply", "--server-side", "--force-conflicts", "-f", "crds/"],
    )?;
    tools.run(
        "kubectl",
        &[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/releases.sluice.dev",
        ],
    )?;

    // The chart, into a namespace of this test's own, with the chart's own network settings
    // (a pod network namespace, in-cluster config), pinned to the real node.
    let ns = cluster.namespace("smoke").await?;
    let node = operator_node();
    // watchNamespace: the operator must not act on other tests' objects.
    let sets = format!(
        "image.tag=dev,agent.image=sluice/agent:dev,watchNamespace={}",
        ns.name
    );
    let node_selector = format!("nodeSelector.kubernetes\\.io/hostname={node}");
    tools.run(
        "helm",
        &[
            "install",
            "sluice",
            "charts/sluice",
            "--namespace",
            &ns.name,
            "--set",
            &sets,
            "--set-string",
            &node_selector,
            "--wait=false",
        ],
    )?;
    let mut installed = Installed {
        tools: &tools,
        namespace: ns.name.clone(),
        done: false,
    };
    let deploy = tools.run(
        "kubectl",
        &[
            "get",
            "deployment",
            "sluice-operator",
            "-n",
            &ns.name,
            "-o",
            "jsonpath={.spec.template.spec.containers[0].securityContext}",
        ],
    )?;
    assert!(
        deploy.contains("\"readOnlyRootFilesystem\":true"),
        "operator container: {deploy}"
    );
    assert!(
        deploy.contains("\"drop\":[\"ALL\"]"),
        "operator container: {deploy}"
    );

    // What the operator needs…
    for (verb, resource) in [
        ("watch", "releases.sluice.dev"),
        ("patch", "releases.sluice.dev/status"),
        ("list", "inferencesets.sluice.dev"),
        ("patch", "inferencesets.sluice.dev/status"),
        ("patch", "deployments.apps"),
        ("create", "replicasets.apps"),
        ("delete", "pods"),
        ("patch", "pods/status"),
        ("create", "pods/binding"),
        ("list", "nodes"),
        ("list", "endpointslices.discovery.k8s.io"),
        ("create", "events"),
    ] {
        assert!(
            tools.can_i(&ns.name, verb, resource, None),
            "operator cannot {verb} {resource}"
        );
    }
    assert!(tools.can_i(
        &ns.name,
        "create",
        "leases.coordination.k8s.io",
        Some(&ns.name)
    ));
    assert!(tools.can_i(
        &ns.name,
        "update",
        "leases.coordination.k8s.io/sluice-operator",
        Some(&ns.name)
    ));
    // …and what it must not have.
    for (verb, resource) in [
        ("get", "secrets"),
        ("list", "secrets"),
        ("create", "deployments.apps"),
        ("delete", "nodes"),
        (
            "update",
            "leases.coordination.k8s.io/kube-controller-manager",
        ),
        ("create", "clusterroles.rbac.authorization.k8s.io"),
        ("delete", "customresourcedefinitions.apiextensions.k8s.io"),
    ] {
        assert!(
            !tools.can_i(&ns.name, verb, resource, None),
            "operator must not {verb} {resource}"
        );
    }
    assert!(!tools.can_i(
        &ns.name,
        "update",
        "leases.coordination.k8s.io/other",
        Some(&ns.name)
    ));

    // The operator runs: a pod on the real node, in its own network namespace, Running and
    // Ready through its /readyz probe (which the kubelet sends from the CNI bridge)…
    let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), &ns.name);
    let selector = "app.kubernetes.io/name=sluice-operator,app.kubernetes.io/instance=sluice";
    let pod = wait_for(
        "the operator pod Running and Ready",
        Duration::from_secs(120),
        || {
            let pods = pods.clone();
            async move {
                let list = pods.list(&ListParams::default().labels(selector)).await?;
                Ok(list.items.into_iter().find(pod_ready))
            }
        },
    )
    .await?;
    let spec = pod.spec.clone().unwrap_or_default();
    assert_eq!(spec.node_name.as_deref(), Some(node.as_str()));
    assert_ne!(spec.host_network, Some(true));
    let status = pod.status.clone().unwrap_or_default();
    assert_ne!(
        status.pod_ip, status.host_ip,
        "the operator pod has an address of its own"
    );
    let container_id = status
        .container_statuses
        .as_ref()
        .and_then(|cs| cs.first())
        .and_then(|c| c.container_id.clone())
        .unwrap_or_default();
    assert!(
        container_id.starts_with("containerd://"),
        "container id {container_id:?}"
    );

    // …authenticated as its own ServiceAccount: the only credentials it has are the bound
    // token the kubelet projected into it…
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let token = projected_token(&node, &uid)?;
    let mut config = kube::Config::from_custom_kubeconfig(
        kube::config::Kubeconfig::read_from(&tools.kubeconfig)?,
        &Default::default(),
    )
    .await?;
    config.auth_info = kube::config::AuthInfo {
        token: Some(token.into()),
        ..Default::default()
    };
    let as_pod = kube::Client::try_from(config)?;
    let review = Api::<SelfSubjectReview>::all(as_pod)
        .create(&PostParams::default(), &SelfSubjectReview::default())
        .await
        .context("SelfSubjectReview with the pod's token")?;
    let username = review
        .status
        .and_then(|s| s.user_info)
        .and_then(|u| u.username)
        .unwrap_or_default();
    assert_eq!(
        username,
        format!("system:serviceaccount:{}:sluice-operator", ns.name)
    );

    // …and one of the chart's replicas (two by default) holds the leader Lease (identity:
    // POD_NAME).
    let leases: Api<Lease> = Api::namespaced(cluster.client.clone(), &ns.name);
    wait_for(
        "the Lease held by an operator pod",
        Duration::from_secs(60),
        || {
            let leases = leases.clone();
            let pods = pods.clone();
            async move {
                let names: Vec<String> = pods
                    .list(&ListParams::default().labels(selector))
                    .await?
                    .items
                    .into_iter()
                    .filter_map(|p| p.metadata.name)
                    .collect();
                let holder = leases
                    .get_opt("sluice-operator")
                    .await?
                    .and_then(|l| l.spec)
                    .and_then(|s| s.holder_identity);
                Ok(holder.filter(|h| names.contains(h)).map(|_| ()))
            }
        },
    )
    .await?;

    // Uninstalled, the pod goes (SIGTERM from the kubelet) and its credentials with it.
    installed.uninstall()?;
    wait_for("the operator pod gone", Duration::from_secs(90), || {
        let pods = pods.clone();
        async move {
            let list = pods.list(&ListParams::default().labels(selector)).await?;
            Ok(list.items.is_empty().then_some(()))
        }
    })
    .await?;
    wait_for(
        "the pod's token gone from the node",
        Duration::from_secs(30),
        || {
            let gone = projected_token(&node, &uid).is_err();
            async move { Ok(gone.then_some(())) }
        },
    )
    .await?;

    // 100 KWOK nodes, listed and Ready (KWOK's node controller marks them).
    let prefix = format!("smoke-{}", &ns.name[ns.name.len() - 8..]);
    let names = cluster.create_kwok_nodes(&prefix, 100, None).await?;
    let nodes = Api::<Node>::all(cluster.client.clone());
    let deadline = Instant::now() + Duration::from_secs(120);
    let ready = loop {
        let ready = nodes
            .list(&ListParams::default().labels("type=kwok"))
            .await?
            .items
            .iter()
            .filter(|n| {
                n.metadata
                    .name
                    .as_deref()
                    .is_some_and(|name| name.starts_with(&prefix))
            })
            .filter(|n| {
                n.status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
            })
            .count();
        if ready == names.len() || Instant::now() > deadline {
            break ready;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(ready, 100, "KWOK nodes Ready");
    let listed = tools.run("kubectl", &["get", "nodes", "-o", "name"])?;
    assert!(listed.lines().filter(|l| l.contains(&prefix)).count() >= 100);

    cluster.delete_nodes(&names).await?;
    Ok(())
}
