//! The local test ground: etcd, kube-apiserver, kube-controller-manager, kube-scheduler
//! and KWOK as local processes, the real node `local-0` (kubelet, containerd, kube-proxy;
//! see [`crate::node`]) and the service proxy, from binaries that `e2e/cluster/build.sh`
//! builds from pinned Go modules (and caches). `up` is idempotent; `down` stops exactly
//! what `up` started (by PID), gives back what the node changed on the machine, and
//! removes its state. Everything lives under `target/e2e/`.

pub(crate) mod pki;
pub(crate) mod procs;
mod test_cluster;

pub use procs::Daemon;
pub use test_cluster::{GpuNodeProfile, TestCluster, TestNamespace};

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

/// Simulated ClusterIPs. Routed to a blackhole: no packet for a Service IP leaves the machine.
pub const SERVICE_CIDR: &str = "10.96.0.0/16";
/// Pod IPs KWOK hands to simulated pods; blackholed likewise.
pub const KWOK_POD_CIDR: &str = "10.244.0.0/16";
/// Real nodes' pod addresses (one /24 each); blackholed as a whole, so a packet for a
/// vanished pod stays on the machine.
pub const NODE_POD_CIDR: &str = crate::node::POD_SUPERNET;
/// Nodes the PKI issues certificates for: `local-0` and the extra nodes tests may start.
pub const MAX_REAL_NODES: u8 = 9;
/// Annotation selecting the nodes KWOK manages.
pub const KWOK_NODE_ANNOTATION: (&str, &str) = ("kwok.x-k8s.io/node", "fake");

#[derive(clap::Subcommand, Debug)]
pub enum ClusterCommand {
    /// Start the test ground (does nothing when it already runs).
    Up(UpArgs),
    /// Stop everything `up` started and remove its state (logs are kept).
    Down,
    /// Print whether the test ground runs, and its components.
    Status,
}

#[derive(clap::Args, Debug, Clone, Default)]
pub struct UpArgs {
    /// Port for kube-apiserver on 127.0.0.1 (default: a free port).
    #[arg(long, env = "SLUICE_APISERVER_PORT")]
    pub apiserver_port: Option<u16>,
}

/// The repository root: `$SLUICE_REPO`, or the checkout this crate was built from.
pub fn repo_root() -> PathBuf {
    let root = std::env::var_os("SLUICE_REPO")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".."));
    // Normalized: the kubelet refuses paths with `..` in them.
    root.canonicalize().unwrap_or(root)
}

/// `target/e2e/` in the repository.
pub fn state_dir() -> PathBuf {
    repo_root().join("target").join("e2e")
}

/// The admin kubeconfig `up` writes.
pub fn kubeconfig_path() -> PathBuf {
    state_dir().join("kubeconfig")
}

/// What `up` started, so that `down` can stop exactly that.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct ClusterState {
    pub server: String,
    pub daemons: Vec<Daemon>,
    /// Blackhole routes `up` added (and `down` removes).
    pub routes: Vec<String>,
    /// What the real nodes changed on the machine.
    #[serde(default)]
    pub host: Option<crate::node::HostRecord>,
}

impl ClusterState {
    fn path() -> PathBuf {
        state_dir().join("state.json")
    }

    pub fn load() -> anyhow::Result<Option<Self>> {
        match std::fs::read_to_string(Self::path()) {
            Ok(text) => Ok(Some(
                serde_json::from_str(&text).context("target/e2e/state.json is corrupt")?,
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    fn save(&self) -> anyhow::Result<()> {
        let tmp = Self::path().with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)?;
        std::fs::rename(tmp, Self::path())?;
        Ok(())
    }

    /// Recorded daemons that are no longer running, as `name (pid N)`.
    pub fn dead_daemons(&self) -> Vec<String> {
        self.daemons
            .iter()
            .filter(|d| !d.is_running())
            .map(|d| format!("{} (pid {})", d.name, d.pid))
            .collect()
    }
}

pub async fn run(cmd: ClusterCommand) -> anyhow::Result<()> {
    match cmd {
        ClusterCommand::Up(args) => {
            let started = up(&args).await?;
            if !started {
                for d in crate::node::sync_images(&state_dir(), &repo_root())? {
                    println!("imported {d}");
                }
            }
            let kc = kubeconfig_path();
            let what = if started { "is up" } else { "already runs" };
            println!("test ground {what}; kubeconfig: {}", kc.display());
            println!("try: kubectl --kubeconfig {} get nodes", kc.display());
            Ok(())
        }
        ClusterCommand::Down => down(),
        ClusterCommand::Status => {
            match ClusterState::load()? {
                None => println!("not running (no {})", ClusterState::path().display()),
                Some(state) => {
                    println!("server: {}", state.server);
                    for d in &state.daemons {
                        let s = if d.is_running() { "running" } else { "STOPPED" };
                        println!("{:<24} pid {:<8} {s}", d.name, d.pid);
                    }
                }
            }
            Ok(())
        }
    }
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
            println!("stopped {} processes", state.daemons.len());
        }
        Ok(None) => {
            if let Err(err) = crate::node::cleanup(&dir, None) {
                eprintln!("cluster down: {err:#}");
            }
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

async fn node_ready(client: &kube::Client, name: &str) -> bool {
    let nodes = kube::Api::<k8s_openapi::api::core::v1::Node>::all(client.clone());
    let Ok(Some(node)) = nodes.get_opt(name).await else {
        return false;
    };
    node.status
        .and_then(|s| s.conditions)
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// True when the API server behind `kubeconfig` answers `/readyz` with `ok`.
pub async fn healthy(kubeconfig: &Path) -> bool {
    let Ok(client) = client_for(kubeconfig).await else {
        return false;
    };
    let Ok(req) = http::Request::get("/readyz").body(Vec::new()) else {
        return false;
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(5), client.request_text(req)).await,
        Ok(Ok(text)) if text.trim() == "ok"
    )
}

/// A kube client for a kubeconfig file.
pub async fn client_for(kubeconfig: &Path) -> anyhow::Result<kube::Client> {
    let kc = kube::config::Kubeconfig::read_from(kubeconfig)
        .with_context(|| format!("reading {}", kubeconfig.display()))?;
    let config = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .with_context(|| format!("loading {}", kubeconfig.display()))?;
    Ok(kube::Client::try_from(config)?)
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

/// A plain HTTP/1.0 GET on loopback; true on a 200.
fn http_get_ok(addr: &str, path: &str) -> bool {
    use std::io::{Read, Write};
    let Ok(addr) = addr.parse::<SocketAddr>() else {
        return false;
    };
    let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").is_err() {
        return false;
    }
    let mut buf = String::new();
    let _ = s.read_to_string(&mut buf);
    buf.starts_with("HTTP/1.0 200") || buf.starts_with("HTTP/1.1 200")
}

/// A port free right now on every local address, taken from outside the kernel's ephemeral
/// range: a port from that range can be grabbed by any outgoing connection between this
/// call and the moment a daemon binds it.
pub fn free_port() -> anyhow::Result<u16> {
    let (low, high) = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(|p| p.parse::<u16>().ok());
            Some((it.next()??, it.next()??))
        })
        .unwrap_or((32768, 60999));
    let candidates: Vec<u16> = (20000..low).chain(high.saturating_add(1)..=65000).collect();
    anyhow::ensure!(
        !candidates.is_empty(),
        "no ports outside the ephemeral range {low}-{high}"
    );
    let start = rand::random::<u32>() as usize;
    for i in 0..candidates.len().min(2000) {
        let port = candidates[(start + i * 7919) % candidates.len()];
        if TcpListener::bind(("0.0.0.0", port)).is_ok() {
            return Ok(port);
        }
    }
    anyhow::bail!("no free port found outside the ephemeral range {low}-{high}")
}

fn ensure_port_free(port: u16) -> anyhow::Result<()> {
    TcpListener::bind(("127.0.0.1", port))
        .map(|_| ())
        .map_err(|e| {
            anyhow::anyhow!(
                "port {port} on 127.0.0.1 is not free ({e}): another process listens there \
             (see `ss -ltnp 'sport = :{port}'`). Stop it, or pick another port with \
             --apiserver-port / SLUICE_APISERVER_PORT, or leave it unset for a free one."
            )
        })
}

fn add_blackhole(cidr: &str) -> anyhow::Result<()> {
    let out = std::process::Command::new("ip")
        .args(["route", "replace", "blackhole", cidr])
        .output()
        .context("running `ip` (iproute2) to add a blackhole route")?;
    if !out.status.success() {
        bail!(
            "cannot add the blackhole route for {cidr}: {}. The test ground needs root (or \
             CAP_NET_ADMIN) so that no packet for a simulated pod or Service leaves the machine.",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn del_blackhole(cidr: &str) {
    let _ = std::process::Command::new("ip")
        .args(["route", "del", "blackhole", cidr])
        .output();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_are_bindable_and_outside_the_ephemeral_range() {
        let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap();
        let bounds: Vec<u16> = range
            .split_whitespace()
            .map(|p| p.parse().unwrap())
            .collect();
        for _ in 0..20 {
            let port = free_port().unwrap();
            assert!(
                port < bounds[0] || port > bounds[1],
                "{port} is in the ephemeral range {range}"
            );
            TcpListener::bind(("0.0.0.0", port)).unwrap();
        }
    }

    #[test]
    fn a_port_in_use_says_who_to_ask_and_what_to_do() {
        let busy = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = busy.local_addr().unwrap().port();
        let msg = ensure_port_free(port).unwrap_err().to_string();
        assert!(msg.contains(&format!("port {port}")), "{msg}");
        assert!(msg.contains("--apiserver-port"), "{msg}");
    }

    #[test]
    fn a_missing_go_toolchain_is_named_when_binaries_must_be_built() {
        let plain_path = "/usr/bin:/bin";
        if which_go_in(plain_path) {
            return; // Go is on the plain PATH of this machine: no way to hide it here
        }
        let empty_cache =
            std::env::temp_dir().join(format!("sluice-nocache-{}", std::process::id()));
        let out = std::process::Command::new("bash")
            .arg(repo_root().join("e2e/cluster/build.sh"))
            .arg("etcd")
            .env("SLUICE_CACHE", &empty_cache)
            .env("PATH", plain_path)
            .output()
            .unwrap();
        let _ = std::fs::remove_dir_all(&empty_cache);
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("no Go toolchain"), "{stderr}");
        assert!(stderr.contains("Install Go"), "{stderr}");
    }

    fn which_go_in(path: &str) -> bool {
        path.split(':').any(|d| Path::new(d).join("go").exists())
    }

    #[test]
    fn a_stale_state_names_the_daemons_that_are_gone() {
        // A child that has exited and been reaped: its PID no longer runs our binary.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id() as i32;
        child.wait().unwrap();
        let state = ClusterState {
            server: "https://127.0.0.1:1".into(),
            daemons: vec![Daemon {
                name: "kube-apiserver".into(),
                pid,
                binary: "/bin/true".into(),
                log: "/dev/null".into(),
            }],
            routes: vec![],
            host: None,
        };
        assert_eq!(
            state.dead_daemons(),
            vec![format!("kube-apiserver (pid {pid})")]
        );
    }
}
