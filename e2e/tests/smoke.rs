//! Smoke e2e of the foundation: CRDs apply server-side, the chart installs with Helm, the
//! operator's RBAC allows what it needs (and nothing it must not have), and the control
//! plane carries 100+ KWOK nodes. Runs against the real local control plane.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, ListParams};
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

    // The chart, into a namespace of this test's own.
    let ns = cluster.namespace("smoke").await?;
    tools.run(
        "helm",
        &[
            "install",
            "sluice",
            "charts/sluice",
            "--namespace",
            &ns.name,
            "--wait=false",
        ],
    )?;
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

    tools.run("helm", &["uninstall", "sluice", "--namespace", &ns.name])?;
    cluster.delete_nodes(&names).await?;
    Ok(())
}
