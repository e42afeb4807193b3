//! Real nodes for the test ground: upstream kubelet and kube-proxy (built from the same
//! pinned module as the control plane), Debian's containerd, runc and CNI plugins, and
//! images built from this workspace's binaries (no registry). `cluster up` starts node
//! `local-0`; tests that need pods on several nodes start more with [`start_node`].
//!
//! A node is a kubelet with its own containerd (root, state, socket), CNI bridge
//! `slcbr<i>` with the pods' gateway address, pod range 10.245.<i>.0/24, and an address of
//! its own (10.250.0.<i+1>, a veth's /32), which is its InternalIP and differs from the
//! bridge address, as on real clusters with bridge CNIs: the kubelet's probes and hooks
//! come from the bridge address. One kube-proxy (nftables mode) serves the machine: nodes
//! share its network namespace.
pub mod config;
pub mod device_plugin;
pub mod extra;
pub mod host;
pub mod images;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use crate::cluster::pki::{KubeconfigCreds, Pki, kubeconfig};
use crate::cluster::procs::{self, Daemon};
pub use config::{NodePaths, NodeSpec, POD_SUPERNET};

/// The node `cluster up` starts.
pub const LOCAL_NODE: &str = "local-0";

/// What the real nodes changed on the machine, recorded by `up` so that `down` gives it back
/// (kept in the ground's state file, so a crashed run is cleaned by the next `up`).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct HostRecord {
    /// Sysctl values before the ground touched them.
    pub sysctls: BTreeMap<String, String>,
    /// Host directories that did not exist before (and so go on `down`).
    pub created_dirs: Vec<PathBuf>,
    /// Pod network namespaces that existed before (left alone).
    pub netns_before: Vec<String>,
    /// Nodes started (names).
    pub nodes: Vec<String>,
}

impl HostRecord {
    /// Records the machine's state before any node starts, and installs what is missing.
    pub fn prepare() -> anyhow::Result<Self> {
        host::ensure_packages()?;
        let rec = HostRecord {
            sysctls: host::read_sysctls(),
            created_dirs: host::HOST_DIRS
                .iter()
                .map(PathBuf::from)
                .filter(|d| !d.exists())
                .collect(),
            netns_before: host::cni_netns(),
            nodes: Vec::new(),
        };
        // Routed pod traffic (pod → Service → pod) and bridged traffic through netfilter,
        // as kube-proxy needs; both restored on `down`.
        host::write_sysctl("net.ipv4.ip_forward", "1")?;
        let _ = host::write_sysctl("net.bridge.bridge-nf-call-iptables", "1");
        Ok(rec)
    }
}

/// Everything a node's daemons need from the control plane.
pub struct NodeCtx<'a> {
    pub state_dir: &'a Path,
    pub repo_root: &'a Path,
    pub logs: &'a Path,
    pub pki: &'a Pki,
    /// The API server's URL (on the first node's address).
    pub server: &'a str,
    pub kubelet: &'a Path,
    pub kube_proxy: &'a Path,
}

/// Starts containerd and the kubelet of `spec` (its address must exist already: see
/// [`host::add_node_address`]), imports the images, and returns the daemons started.
/// The node registers itself; the caller waits for Ready.
pub fn start_node(
    spec: &NodeSpec,
    ctx: &NodeCtx,
    rec: &mut HostRecord,
) -> anyhow::Result<Vec<Daemon>> {
    let paths = NodePaths::new(ctx.state_dir, &spec.name);
    let free = config::free_disk_bytes(ctx.state_dir).unwrap_or(u64::MAX);
    anyhow::ensure!(
        free >= config::MIN_FREE_DISK_BYTES,
        "only {:.1} GiB free where the test ground keeps its state ({}); node {} needs at least {} GiB, or its kubelet soon refuses and evicts pods for disk pressure: free some (cargo clean, old worktrees' target directories)",
        free as f64 / f64::from(1u32 << 30),
        ctx.state_dir.display(),
        spec.name,
        config::MIN_FREE_DISK_BYTES >> 30
    );
    // A node's files from an earlier run would confuse the fresh kubelet (stale pod dirs).
    let _ = std::fs::remove_dir_all(&paths.dir);
    for d in [
        paths.dir.clone(),
        paths.run.clone(),
        paths.cni_conf_dir(),
        paths.pod_logs(),
        paths.kubelet_root(),
    ] {
        std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
    }
    if !rec.nodes.contains(&spec.name) {
        rec.nodes.push(spec.name.clone());
    }
    host::add_node_address(spec)?;
    host::create_cgroup_root(spec)?;
    // The weight the kubelet gives `kubepods` for this machine's cores: at the machine's
    // root the node's pods then weigh what a node's pods weigh against its own daemons,
    // not what one host thread does (the cgroup's default, 1024).
    host::set_cpu_shares(&spec.cgroup_root(), node_cpu_shares())?;
    host::create_cgroup(&spec.system_cgroup())?;

    std::fs::write(paths.containerd_config(), config::containerd_toml(&paths))?;
    for registry in ["docker.io", "registry.k8s.io", "ghcr.io", "quay.io"] {
        let dir = paths.registry_hosts().join(registry);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(
            dir.join("hosts.toml"),
            config::registry_hosts_toml(registry),
        )?;
    }
    std::fs::write(
        paths.cni_conf_dir().join("10-sluice.conflist"),
        config::cni_conflist(spec, &paths),
    )?;
    std::fs::write(
        paths.resolv_conf(),
        format!("nameserver {}\noptions ndots:1\n", config::CLUSTER_DNS),
    )?;

    // A GPU node's kubelet must find its own device plugin at the kubelet's fixed
    // registration path: its containerd and kubelet share a mount namespace of their own
    // where the node's directory is mounted there (they must share it: containerd mounts
    // the kubelet's volume mounts into containers).
    let namespace = if spec.gpus > 0 {
        let target = PathBuf::from(device_plugin::KUBELET_DEVICE_PLUGIN_DIR);
        std::fs::create_dir_all(&target)?;
        std::fs::create_dir_all(paths.device_plugins())?;
        procs::MountNamespace::New {
            source: paths.device_plugins(),
            target,
        }
    } else {
        procs::MountNamespace::Host
    };
    let mut daemons = Vec::new();
    let containerd = procs::spawn_in(
        &format!("containerd-{}", spec.name),
        Path::new("/usr/bin/containerd"),
        &[format!("--config={}", paths.containerd_config().display())],
        &ctx.logs.join(format!("containerd-{}.log", spec.name)),
        &namespace,
    )?;
    let kubelet_namespace = match namespace {
        procs::MountNamespace::Host => procs::MountNamespace::Host,
        _ => procs::MountNamespace::Of(containerd.pid),
    };
    confine_system_daemon(spec, containerd.pid);
    daemons.push(containerd.clone());
    let sock = paths.containerd_socket();
    wait_sync(Duration::from_secs(30), || {
        sock.exists()
            && host::run(
                "ctr",
                &["--address", &sock.display().to_string(), "version"],
            )
            .is_ok()
    })
    .with_context(|| {
        format!(
            "containerd of {} did not answer on {}; its log ends with:\n{}",
            spec.name,
            sock.display(),
            containerd.log_tail(20)
        )
    })?;
    let map = images::ImageMap::load(&ctx.repo_root.join("e2e/images.yaml"))?;
    let cache = ctx.state_dir.join("images");
    images::forget_imports(&cache, &sock);
    images::sync(
        &map,
        ctx.repo_root,
        &cache,
        &sock,
        Path::new("/usr/bin/ctr"),
    )?;

    let p = |path: &Path| path.display().to_string();
    let pki = ctx.pki;
    let node_certs = pki.node(&spec.name);
    std::fs::write(
        paths.kubelet_kubeconfig(),
        kubeconfig(
            ctx.server,
            &format!("system:node:{}", spec.name),
            KubeconfigCreds::Files {
                ca: &pki.ca_cert,
                cert: &node_certs.client_cert,
                key: &node_certs.client_key,
            },
        ),
    )?;
    let ports = config::KubeletPorts {
        server: 10250,
        healthz: crate::cluster::net::free_port()?,
    };
    std::fs::write(
        paths.kubelet_config(),
        config::kubelet_yaml(
            spec,
            &paths,
            ports,
            &config::KubeletFiles {
                ca_cert: &pki.ca_cert,
                serving_cert: &node_certs.serving_cert,
                serving_key: &node_certs.serving_key,
            },
        ),
    )?;
    let mut labels = vec![("sluice.dev/real-node".to_string(), "true".to_string())];
    labels.extend(spec.labels.iter().cloned());
    let labels = labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",");
    let kubelet = procs::spawn_in(
        &format!("kubelet-{}", spec.name),
        ctx.kubelet,
        &[
            format!("--config={}", p(&paths.kubelet_config())),
            format!("--kubeconfig={}", p(&paths.kubelet_kubeconfig())),
            format!("--root-dir={}", p(&paths.kubelet_root())),
            format!("--hostname-override={}", spec.name),
            format!("--node-ip={}", spec.node_ip()),
            format!("--node-labels={labels}"),
            "--v=1".into(),
        ],
        &ctx.logs.join(format!("kubelet-{}.log", spec.name)),
        &kubelet_namespace,
    )?;
    confine_system_daemon(spec, kubelet.pid);
    daemons.push(kubelet);
    Ok(daemons)
}

/// Starts the machine's kube-proxy (nftables mode) as the node `spec`.
pub fn start_kube_proxy(
    spec: &NodeSpec,
    ctx: &NodeCtx,
    min_sync_period: Duration,
) -> anyhow::Result<Daemon> {
    let paths = NodePaths::new(ctx.state_dir, &spec.name);
    let pki = ctx.pki;
    std::fs::write(
        paths.kube_proxy_kubeconfig(),
        kubeconfig(
            ctx.server,
            "system:kube-proxy",
            KubeconfigCreds::Files {
                ca: &pki.ca_cert,
                cert: &pki.kube_proxy_cert,
                key: &pki.kube_proxy_key,
            },
        ),
    )?;
    std::fs::write(
        paths.kube_proxy_config(),
        config::kube_proxy_yaml(
            spec,
            &paths.kube_proxy_kubeconfig(),
            crate::cluster::net::free_port()?,
            crate::cluster::net::free_port()?,
            min_sync_period,
        ),
    )?;
    let kube_proxy = procs::spawn(
        "kube-proxy",
        ctx.kube_proxy,
        &[
            format!("--config={}", paths.kube_proxy_config().display()),
            "--v=1".into(),
        ],
        &ctx.logs.join("kube-proxy.log"),
    )?;
    confine_system_daemon(spec, kube_proxy.pid);
    Ok(kube_proxy)
}

/// Moves one of the node's own daemons into its system cgroup: a busy kubelet or
/// containerd then competes with the node's pods as one group, as on a real node, not
/// thread by thread (each as heavy as all of `kubepods` at the machine's root).
pub fn confine_system_daemon(spec: &NodeSpec, pid: i32) {
    if let Err(err) = host::join_cpu_cgroup(&spec.system_cgroup(), pid) {
        eprintln!(
            "node {}: pid {pid} stays in the machine's cgroup: {err:#}",
            spec.name
        );
    }
}

/// Gives back what the nodes took: processes in their cgroups, containerd shims, mounts,
/// pod network namespaces, links, kube-proxy's tables, directories, and the sysctls.
/// The daemons themselves (kubelet, containerd, kube-proxy) are stopped by the caller
/// first. Works from the record alone, and from nothing (a crashed run's leftovers are
/// found by their names).
pub fn cleanup(state_dir: &Path, rec: Option<&HostRecord>) -> anyhow::Result<()> {
    let mut errors = Vec::new();
    let mut names: Vec<String> = std::fs::read_dir(state_dir.join("node"))
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().to_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    if let Some(r) = rec {
        names.extend(r.nodes.iter().cloned());
    }
    names.sort();
    names.dedup();
    for name in &names {
        cleanup_node(state_dir, name, &mut errors);
    }
    let mut prefixes = vec![PathBuf::from(config::RUN_ROOT), state_dir.join("node")];
    if let Some(r) = rec {
        prefixes.extend(r.created_dirs.iter().cloned());
    }
    let netns_before = rec.map(|r| r.netns_before.clone()).unwrap_or_default();
    for ns in host::cni_netns() {
        if !netns_before.contains(&ns) {
            prefixes.push(Path::new("/run/netns").join(&ns));
        }
    }
    host::unmount_under(&prefixes, &mut errors);
    for ns in host::cni_netns() {
        if !netns_before.contains(&ns) {
            let _ = std::fs::remove_file(Path::new("/run/netns").join(&ns));
        }
    }
    host::delete_kube_proxy_tables(&mut errors);
    host::delete_links(&mut errors);
    for d in [PathBuf::from(config::RUN_ROOT), state_dir.join("node")] {
        if let Err(e) = std::fs::remove_dir_all(&d)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            errors.push(format!("removing {}: {e}", d.display()));
        }
    }
    images::forget_all_imports(&state_dir.join("images"));
    if let Some(r) = rec {
        for d in &r.created_dirs {
            let _ = std::fs::remove_dir_all(d);
        }
        let failed = host::restore_sysctls(&r.sysctls);
        if !failed.is_empty() {
            errors.push(format!("sysctls not restored: {}", failed.join(", ")));
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        anyhow::bail!("cleaning up the real nodes: {}", errors.join("; "))
    }
}

/// Gives back what one node took: its containerd's shims, the processes in its cgroups,
/// its mounts, files, bridge and address.
pub fn cleanup_node(state_dir: &Path, name: &str, errors: &mut Vec<String>) {
    let paths = NodePaths::new(state_dir, name);
    // Shims name their containerd's socket under the node's run dir; they go first (they
    // would restart nothing, but hold mounts), then every process left in the node's
    // cgroups: the containers and pause processes.
    let needle = format!("{}/", paths.run.display());
    host::kill_all(&host::pids_with_cmdline(&needle));
    // The node's own daemons name their config files under its directory: whatever
    // started them (and however it stopped), they go too.
    host::kill_all(&host::pids_with_cmdline(&format!(
        "{}/",
        paths.dir.display()
    )));
    host::remove_cgroup_root(&format!("/sluice-{name}"), errors);
    host::kill_all(&host::pids_with_cmdline(&needle));
    host::unmount_under(&[paths.run.clone(), paths.dir.clone()], errors);
    for d in [&paths.run, &paths.dir] {
        if let Err(e) = std::fs::remove_dir_all(d)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            errors.push(format!("removing {}: {e}", d.display()));
        }
    }
    if let Some(index) = name
        .strip_prefix("local-")
        .and_then(|i| i.parse::<u8>().ok())
    {
        let spec = NodeSpec::new(name, index);
        for link in [spec.bridge(), spec.veth()] {
            if host::ip(&["link", "show", "dev", &link]).is_ok()
                && let Err(e) = host::ip(&["link", "del", &link])
            {
                errors.push(format!("{e:#}"));
            }
        }
    }
    images::forget_imports(&state_dir.join("images"), &paths.containerd_socket());
}

fn wait_sync(timeout: Duration, mut ok: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        if ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    anyhow::bail!("timed out after {timeout:?}")
}

/// Imports the images whose binaries changed into every running node's containerd (what
/// `sluice-e2e images` and `make test` do after a build while the ground runs).
pub fn sync_images(state_dir: &Path, repo_root: &Path) -> anyhow::Result<Vec<String>> {
    let map = images::ImageMap::load(&repo_root.join("e2e/images.yaml"))?;
    let mut done = Vec::new();
    let Ok(rd) = std::fs::read_dir(state_dir.join("node")) else {
        return Ok(done);
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let sock = NodePaths::new(state_dir, &name).containerd_socket();
        if sock.exists() {
            for repo in images::sync(
                &map,
                repo_root,
                &state_dir.join("images"),
                &sock,
                Path::new("/usr/bin/ctr"),
            )? {
                done.push(format!("{repo} on {name}"));
            }
        }
    }
    Ok(done)
}

/// `cpu.shares` for a node's cgroup root: 1024 per core of this machine, as the kubelet
/// sets `kubepods` for a node's allocatable CPU.
fn node_cpu_shares() -> u64 {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    cores * 1024
}
