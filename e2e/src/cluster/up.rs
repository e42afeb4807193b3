//! `up` and `down`: the upstream binaries, the daemons started in order and waited for,
//! and everything given back.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use super::client::{client_for, healthy, node_ready};
use super::ground::{
    KWOK_NODE_ANNOTATION, KWOK_POD_CIDR, MAX_REAL_NODES, NODE_POD_CIDR, SERVICE_CIDR,
    kubeconfig_path, repo_root, state_dir,
};
use super::net::{add_blackhole, del_blackhole, ensure_port_free, free_port, http_get_ok};
use super::pki;
use super::procs::{self, Daemon};
use super::state::ClusterState;

#[derive(clap::Args, Debug, Clone, Default)]
pub struct UpArgs {
    /// Port for kube-apiserver on 127.0.0.1 (default: a free port).
    #[arg(long, env = "SLUICE_APISERVER_PORT")]
    pub apiserver_port: Option<u16>,
}

/// Paths of the upstream binaries, from `e2e/cluster/build.sh` (which builds what is not
/// cached yet and fails with a clear message when Go is missing).
pub fn upstream_binaries() -> anyhow::Result<BTreeMap<String, PathBuf>> {
    let script = repo_root().join("e2e/cluster/build.sh");
    let out = std::process::Command::new("bash")
        .arg(&script)
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !out.status.success() {
        bail!("building the test ground's Kubernetes components failed (see above)");
    }
    let mut bins = BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        if let Some((name, dir)) = line.split_once('=') {
            bins.insert(name.to_string(), Path::new(dir).join(name));
        }
    }
    Ok(bins)
}

/// Starts the test ground unless it already runs. Returns whether it started it.
pub async fn up(args: &UpArgs) -> anyhow::Result<bool> {
    let dir = state_dir();
    std::fs::create_dir_all(dir.join("logs"))?;
    if let Some(state) = ClusterState::load()? {
        let dead = state.dead_daemons();
        if dead.is_empty() && healthy(&kubeconfig_path()).await {
            // A ground started by an older build gets what this one installs.
            install_gateway_api(&client_for(&kubeconfig_path()).await?).await?;
            return Ok(false);
        }
        let why = if dead.is_empty() {
            "its API server does not answer".to_string()
        } else {
            format!("not running any more: {}", dead.join(", "))
        };
        eprintln!(
            "cluster up: found a stale test ground from an earlier run ({why}); \
             stopping what is left of it and starting afresh"
        );
        down()?;
        std::fs::create_dir_all(dir.join("logs"))?;
    }

    let bins = upstream_binaries()?;
    let bin = |name: &str| -> anyhow::Result<PathBuf> {
        bins.get(name)
            .cloned()
            .with_context(|| format!("build.sh did not report {name}"))
    };

    let mut state = ClusterState::default();
    // A crash may have left nodes' leftovers without a state file: they go first.
    if let Err(err) = crate::node::cleanup(&dir, None) {
        eprintln!("cluster up: leftovers of an earlier ground: {err:#}");
    }
    let apiserver_port = match args.apiserver_port {
        Some(port) => {
            ensure_port_free(port)?;
            port
        }
        None => free_port()?,
    };
    // Nothing addressed to a simulated pod or a ClusterIP may leave the machine.
    for cidr in [SERVICE_CIDR, KWOK_POD_CIDR, NODE_POD_CIDR] {
        add_blackhole(cidr)?;
        state.routes.push(cidr.to_string());
    }
    let local = crate::node::NodeSpec::new(crate::node::LOCAL_NODE, 0);
    state.server = format!("https://{}:{apiserver_port}", local.node_ip());
    state.save()?;
    let result = start_all(&dir, &bin, apiserver_port, &mut state).await;
    // Record whatever started, even on failure, so that `down` can stop it.
    state.save()?;
    if let Err(err) = result {
        eprintln!("cluster up failed; stopping what it started");
        let _ = down();
        return Err(err);
    }
    Ok(true)
}

async fn start_all(
    dir: &Path,
    bin: &dyn Fn(&str) -> anyhow::Result<PathBuf>,
    apiserver_port: u16,
    state: &mut ClusterState,
) -> anyhow::Result<()> {
    let logs = dir.join("logs");
    // The machine as it was, then the first node's address: the API server listens there
    // (the `kubernetes` Service's endpoint), so pods reach it as in a real cluster.
    state.host = Some(crate::node::HostRecord::prepare()?);
    state.save()?;
    let local = crate::node::NodeSpec::new(crate::node::LOCAL_NODE, 0);
    crate::node::host::add_node_address(&local)?;
    let node_ip = local.node_ip();
    let nodes: Vec<pki::NodeIdentity> = (0..MAX_REAL_NODES)
        .map(|i| {
            let s = crate::node::NodeSpec::new(&format!("local-{i}"), i);
            pki::NodeIdentity {
                name: s.name.clone(),
                ip: s.node_ip(),
            }
        })
        .collect();
    let pki = pki::generate(&dir.join("pki"), &[node_ip], &nodes)?;
    let p = |path: &Path| path.display().to_string();

    let etcd_client = free_port()?;
    let etcd_peer = free_port()?;
    let etcd_url = format!("http://127.0.0.1:{etcd_client}");
    let etcd = procs::spawn(
        "etcd",
        &bin("etcd")?,
        &[
            format!("--data-dir={}", p(&dir.join("etcd"))),
            format!("--listen-client-urls={etcd_url}"),
            format!("--advertise-client-urls={etcd_url}"),
            format!("--listen-peer-urls=http://127.0.0.1:{etcd_peer}"),
            format!("--initial-advertise-peer-urls=http://127.0.0.1:{etcd_peer}"),
            format!("--initial-cluster=default=http://127.0.0.1:{etcd_peer}"),
            "--unsafe-no-fsync".into(),
            "--auto-compaction-retention=1".into(),
            "--quota-backend-bytes=4294967296".into(),
        ],
        &logs.join("etcd.log"),
    )?;
    state.daemons.push(etcd.clone());
    wait_until(&etcd, Duration::from_secs(30), || async {
        http_get_ok(&format!("127.0.0.1:{etcd_client}"), "/health")
    })
    .await?;

    let apiserver = procs::spawn(
        "kube-apiserver",
        &bin("kube-apiserver")?,
        &[
            format!("--etcd-servers={etcd_url}"),
            format!("--secure-port={apiserver_port}"),
            format!("--bind-address={node_ip}"),
            format!("--advertise-address={node_ip}"),
            format!(
                "--kubelet-client-certificate={}",
                p(&pki.kubelet_client_cert)
            ),
            format!("--kubelet-client-key={}", p(&pki.kubelet_client_key)),
            format!("--kubelet-certificate-authority={}", p(&pki.ca_cert)),
            // Never the Hostname: resolving it would ask a DNS server off the machine.
            "--kubelet-preferred-address-types=InternalIP".into(),
            format!("--tls-cert-file={}", p(&pki.apiserver_cert)),
            format!("--tls-private-key-file={}", p(&pki.apiserver_key)),
            format!("--client-ca-file={}", p(&pki.ca_cert)),
            "--authorization-mode=Node,RBAC".into(),
            format!("--service-cluster-ip-range={SERVICE_CIDR}"),
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
            format!("--service-account-key-file={}", p(&pki.sa_pub)),
            format!("--service-account-signing-key-file={}", p(&pki.sa_key)),
            "--allow-privileged=true".into(),
            // Load tests create and bind thousands of objects quickly.
            "--max-requests-inflight=2000".into(),
            "--max-mutating-requests-inflight=1000".into(),
            "--enable-priority-and-fairness=false".into(),
            "--event-ttl=1h".into(),
            format!("--cert-dir={}", p(&dir.join("apiserver"))),
        ],
        &logs.join("kube-apiserver.log"),
    )?;
    state.daemons.push(apiserver.clone());

    let kubeconfig = kubeconfig_path();
    std::fs::write(&kubeconfig, pki::admin_kubeconfig(&pki, &state.server)?)?;
    wait_until(&apiserver, Duration::from_secs(90), || async {
        healthy(&kubeconfig).await
    })
    .await?;

    let kc = p(&kubeconfig);
    let kcm_port = free_port()?;
    let kcm = procs::spawn(
        "kube-controller-manager",
        &bin("kube-controller-manager")?,
        &[
            format!("--kubeconfig={kc}"),
            format!("--authentication-kubeconfig={kc}"),
            format!("--authorization-kubeconfig={kc}"),
            format!("--service-account-private-key-file={}", p(&pki.sa_key)),
            format!("--root-ca-file={}", p(&pki.ca_cert)),
            format!("--cluster-signing-cert-file={}", p(&pki.ca_cert)),
            format!("--cluster-signing-key-file={}", p(&pki.ca_key)),
            "--use-service-account-credentials=true".into(),
            "--leader-elect=false".into(),
            "--controllers=*".into(),
            "--bind-address=127.0.0.1".into(),
            format!("--secure-port={kcm_port}"),
            format!("--cert-dir={}", p(&dir.join("kcm"))),
            // The controllers talk to the API server a lot during load tests.
            "--kube-api-qps=500".into(),
            "--kube-api-burst=1000".into(),
            "--concurrent-deployment-syncs=10".into(),
            "--concurrent-replicaset-syncs=10".into(),
            "--concurrent-service-endpoint-syncs=10".into(),
        ],
        &logs.join("kube-controller-manager.log"),
    )?;
    state.daemons.push(kcm);

    let sched_port = free_port()?;
    let scheduler = procs::spawn(
        "kube-scheduler",
        &bin("kube-scheduler")?,
        &[
            format!("--kubeconfig={kc}"),
            format!("--authentication-kubeconfig={kc}"),
            format!("--authorization-kubeconfig={kc}"),
            "--leader-elect=false".into(),
            "--bind-address=127.0.0.1".into(),
            format!("--secure-port={sched_port}"),
            format!("--cert-dir={}", p(&dir.join("scheduler"))),
        ],
        &logs.join("kube-scheduler.log"),
    )?;
    state.daemons.push(scheduler);

    let kwok_port = free_port()?;
    let kwok = procs::spawn(
        "kwok",
        &bin("kwok")?,
        &[
            format!("--kubeconfig={kc}"),
            format!(
                "--manage-nodes-with-annotation-selector={}={}",
                KWOK_NODE_ANNOTATION.0, KWOK_NODE_ANNOTATION.1
            ),
            "--manage-all-nodes=false".into(),
            format!("--cidr={KWOK_POD_CIDR}"),
            "--node-ip=10.244.255.254".into(),
            "--node-lease-duration-seconds=40".into(),
            format!("--server-address=127.0.0.1:{kwok_port}"),
        ],
        &logs.join("kwok.log"),
    )?;
    state.daemons.push(kwok);
    confine_control_plane(&state.daemons);

    // The traffic test ground: the real node, the machine's kube-proxy, and the service
    // proxy (the model of a load balancer that learns endpoint changes late).
    let bin_kubelet = bin("kubelet")?;
    let bin_kube_proxy = bin("kube-proxy")?;
    let ctx = crate::node::NodeCtx {
        state_dir: dir,
        repo_root: &repo_root(),
        logs: &logs,
        pki: &pki,
        server: &state.server.clone(),
        kubelet: &bin_kubelet,
        kube_proxy: &bin_kube_proxy,
    };
    let mut rec = state.host.take().unwrap_or_default();
    let started = crate::node::start_node(&local, &ctx, &mut rec);
    state.host = Some(rec);
    let node_daemons = started?;
    let kubelet = node_daemons.last().cloned().context("no kubelet")?;
    state.daemons.extend(node_daemons);
    state.save()?;
    let kube_proxy = crate::node::start_kube_proxy(&local, &ctx, Duration::from_secs(1))?;
    state.daemons.push(kube_proxy);
    let e2e = e2e_binary()?;
    let svc_proxy = procs::spawn(
        "svc-proxy",
        &e2e,
        &[
            "svc-proxy".into(),
            format!("--kubeconfig={kc}"),
            format!("--out={}", p(&dir.join("services.json"))),
        ],
        &logs.join("svc-proxy.log"),
    )?;
    state.daemons.push(svc_proxy);
    let client = client_for(&kubeconfig).await?;
    wait_until(&kubelet, Duration::from_secs(90), || {
        node_ready(&client, crate::node::LOCAL_NODE)
    })
    .await?;

    install_gateway_api(&client).await?;

    // Give the last daemons a moment to fail on bad flags, then check they all run.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for d in &state.daemons {
        if !d.is_running() {
            bail!(
                "{} exited right after start; its log ({}) ends with:\n{}",
                d.name,
                d.log.display(),
                d.log_tail(20)
            );
        }
    }
    Ok(())
}

/// The Gateway API CRDs (see [`super::gateway_api`]); a no-op when they are current.
async fn install_gateway_api(client: &kube::Client) -> anyhow::Result<()> {
    let applied = super::gateway_api::install(client)
        .await
        .context("installing the Gateway API CRDs")?;
    if applied > 0 {
        eprintln!(
            "cluster up: applied {applied} Gateway API CRDs ({} {})",
            super::gateway_api::GATEWAY_API_VERSION,
            super::gateway_api::GATEWAY_API_CHANNEL
        );
    }
    Ok(())
}

/// Stops what `up` started and removes its state; logs stay in target/e2e/logs.
pub fn down() -> anyhow::Result<()> {
    let dir = state_dir();
    match ClusterState::load() {
        Ok(Some(state)) => {
            for d in state.daemons.iter().rev() {
                d.stop(Duration::from_secs(10));
            }
            for cidr in &state.routes {
                del_blackhole(cidr);
            }
            if let Err(err) = crate::node::cleanup(&dir, state.host.as_ref()) {
                eprintln!("cluster down: {err:#}");
            }
            remove_control_plane_cgroup();
            println!("stopped {} processes", state.daemons.len());
        }
        Ok(None) => {
            if let Err(err) = crate::node::cleanup(&dir, None) {
                eprintln!("cluster down: {err:#}");
            }
            remove_control_plane_cgroup();
            println!("no test ground state in {}: nothing to stop", dir.display())
        }
        Err(err) => eprintln!("cluster down: {err:#}; removing the state anyway"),
    }
    for sub in [
        "state.json",
        "kubeconfig",
        "pki",
        "etcd",
        "apiserver",
        "kcm",
        "scheduler",
    ] {
        let path = dir.join(sub);
        let _ = std::fs::remove_dir_all(&path).or_else(|_| std::fs::remove_file(&path));
    }
    Ok(())
}

/// The cgroup of the control plane's daemons (etcd, the API server, the controller
/// manager, the scheduler, KWOK).
const CONTROL_PLANE_CGROUP: &str = "/sluice-control-plane";

/// The control plane's CPU weight: 1/16 of the node's cgroup root on this two-core machine.
const CONTROL_PLANE_CPU_SHARES: u64 = 128;

/// A real cluster's control plane runs on other machines; here it shares the node's cores.
/// In one cgroup of its own its bursts compete with the node's pods as one group, instead
/// of each of its threads weighing as much as all the node's pods together (measured: pods
/// waited hundreds of milliseconds for a core while the API server was busy), and with a
/// low weight it takes every cycle the node leaves idle but yields when the node's pods
/// want the cores, as a control plane on other machines would never take theirs
/// (docs/testing.md).
fn confine_control_plane(daemons: &[procs::Daemon]) {
    use crate::node::host;
    let confined = host::create_cgroup(CONTROL_PLANE_CGROUP)
        .and_then(|()| host::set_cpu_shares(CONTROL_PLANE_CGROUP, CONTROL_PLANE_CPU_SHARES))
        .and_then(|()| {
            daemons
                .iter()
                .try_for_each(|d| host::join_cpu_cgroup(CONTROL_PLANE_CGROUP, d.pid))
        });
    if let Err(err) = confined {
        eprintln!("cluster up: the control plane stays in the machine's cgroup: {err:#}");
    }
}

/// Removes the control plane's cgroup (killing what is left in it: a stale ground's).
fn remove_control_plane_cgroup() {
    let mut errors = Vec::new();
    crate::node::host::remove_cgroup_root(CONTROL_PLANE_CGROUP, &mut errors);
    for e in errors {
        eprintln!("cluster down: {e}");
    }
}

/// The `sluice-e2e` binary that runs the service proxy: this one when
/// called as the CLI, the workspace's build otherwise (from tests).
fn e2e_binary() -> anyhow::Result<PathBuf> {
    if let Ok(exe) = std::env::current_exe()
        && exe.file_name().is_some_and(|n| n == "sluice-e2e")
    {
        return Ok(exe);
    }
    let built = repo_root().join("target/debug/sluice-e2e");
    if built.exists() {
        Ok(built)
    } else {
        bail!(
            "{} is missing: run `cargo build -p sluice-e2e --bins` first",
            built.display()
        )
    }
}

async fn wait_until<F, Fut>(daemon: &Daemon, timeout: Duration, check: F) -> anyhow::Result<()>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return Ok(());
        }
        let why = if !daemon.is_running() {
            "exited during start".to_string()
        } else if Instant::now() > deadline {
            format!("did not become ready within {timeout:?}")
        } else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        bail!(
            "{} {why}; its log ({}) ends with:\n{}",
            daemon.name,
            daemon.log.display(),
            daemon.log_tail(20)
        );
    }
}
