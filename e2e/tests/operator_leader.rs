//! Two operator replicas against the real control plane: exactly one leads; when the
//! leader dies without releasing (SIGKILL), the standby takes over after the lease
//! expires; a clean shutdown hands over at once.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use kube::api::Api;
use sluice_e2e::cluster::{TestCluster, free_port, repo_root};

fn operator(kubeconfig: &std::path::Path, ns: &str, identity: &str) -> Child {
    let bin = repo_root().join("target/debug/sluice-operator");
    Command::new(bin)
        .args([
            "run",
            "--lease-duration",
            "3s",
            "--lease-namespace",
            ns,
            "--identity",
            identity,
        ])
        .arg("--admin-addr")
        .arg(format!("127.0.0.1:{}", free_port().expect("free port")))
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("sluice-operator is built (cargo build --workspace --bins)")
}

async fn holder(leases: &Api<Lease>) -> Option<String> {
    leases
        .get_opt("sluice-operator")
        .await
        .ok()
        .flatten()
        .and_then(|l| l.spec)
        .and_then(|s| s.holder_identity)
}

async fn wait_for_holder(
    leases: &Api<Lease>,
    want: impl Fn(&str) -> bool,
    timeout: Duration,
) -> Option<String> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Some(h) = holder(leases).await.filter(|h| want(h)) {
            return Some(h);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    None
}

#[tokio::test]
async fn one_leader_and_failover() -> anyhow::Result<()> {
    let cluster = TestCluster::get().await?;
    let ns = cluster.namespace("leader").await?;
    let leases: Api<Lease> = Api::namespaced(cluster.client.clone(), &ns.name);
    let mut a = operator(&cluster.kubeconfig, &ns.name, "replica-a");
    let mut b = operator(&cluster.kubeconfig, &ns.name, "replica-b");

    let first = wait_for_holder(&leases, |_| true, Duration::from_secs(30))
        .await
        .expect("someone leads");
    // The holder stays the same while both run (no flapping) over several renewals.
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(holder(&leases).await.as_deref(), Some(first.as_str()));
    }

    // SIGKILL the leader: no release, so the standby waits out the lease.
    let (leader, standby, standby_id) = if first == "replica-a" {
        (&mut a, &mut b, "replica-b")
    } else {
        (&mut b, &mut a, "replica-a")
    };
    leader.kill()?;
    leader.wait()?;
    let next = wait_for_holder(&leases, |h| h == standby_id, Duration::from_secs(30)).await;
    assert_eq!(next.as_deref(), Some(standby_id), "the standby took over");

    // A clean shutdown (SIGTERM) releases the Lease.
    unsafe { libc::kill(standby.id() as i32, libc::SIGTERM) };
    standby.wait()?;
    assert_eq!(
        holder(&leases).await,
        None,
        "the Lease was released on SIGTERM"
    );
    Ok(())
}
