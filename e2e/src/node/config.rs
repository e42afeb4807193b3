//! The configuration files of a real node (pure: text from a [`NodeSpec`] and paths), so
//! that every setting the ground depends on is in one place and unit-tested.
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

/// Parent of every node's pod range; the ground blackholes it as a whole, so a packet for a
/// vanished pod stays on the machine.
pub const POD_SUPERNET: &str = "10.245.0.0/16";
/// Node addresses (InternalIP), one /32 each on a veth of the ground's: different from the
/// CNI bridge's address, as on real clusters.
pub const NODE_IP_BASE: [u8; 3] = [10, 250, 0];
/// The cluster DNS address kubelet hands pods. Nothing answers there: it is inside the
/// blackholed service range, so a lookup fails locally and never leaves the machine.
pub const CLUSTER_DNS: &str = "10.96.0.10";

/// One real node of the ground: a kubelet with its own containerd, CNI bridge, pod range and
/// address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeSpec {
    pub name: String,
    /// 0..=199; picks the pod range 10.245.<index>.0/24, the address 10.250.0.<index+1>,
    /// the bridge `slcbr<index>` and the veth `slcn<index>`.
    pub index: u8,
    /// `nvidia.com/gpu` the node's fake device plugin advertises (0: none).
    pub gpus: u32,
    /// Labels the kubelet registers the node with.
    pub labels: Vec<(String, String)>,
}

impl NodeSpec {
    pub fn new(name: &str, index: u8) -> Self {
        NodeSpec {
            name: name.to_string(),
            index,
            gpus: 0,
            labels: Vec::new(),
        }
    }
    pub fn node_ip(&self) -> Ipv4Addr {
        let [a, b, c] = NODE_IP_BASE;
        Ipv4Addr::new(a, b, c, self.index + 1)
    }
    pub fn pod_cidr(&self) -> String {
        format!("10.245.{}.0/24", self.index)
    }
    pub fn bridge_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 245, self.index, 1)
    }
    pub fn bridge(&self) -> String {
        format!("slcbr{}", self.index)
    }
    pub fn veth(&self) -> String {
        format!("slcn{}", self.index)
    }
    pub fn veth_peer(&self) -> String {
        format!("slcn{}p", self.index)
    }
    pub fn cgroup_root(&self) -> String {
        format!("/sluice-{}", self.name)
    }

    /// The cgroup of the node's own daemons (containerd and its shims, the kubelet,
    /// kube-proxy) beside `kubepods`, as `system.slice` is on a systemd node.
    pub fn system_cgroup(&self) -> String {
        format!("{}/system", self.cgroup_root())
    }
}

/// Where a node keeps its files: persistent ones under the repository's `target/e2e/node/`,
/// sockets and runtime state under `/run/sluice-e2e/` (short paths: unix sockets allow
/// 108 bytes).
#[derive(Clone, Debug)]
pub struct NodePaths {
    pub dir: PathBuf,
    pub run: PathBuf,
}

impl NodePaths {
    pub fn new(state_dir: &Path, name: &str) -> Self {
        NodePaths {
            dir: state_dir.join("node").join(name),
            run: Path::new(RUN_ROOT).join(name),
        }
    }
    pub fn containerd_root(&self) -> PathBuf {
        self.dir.join("containerd")
    }
    pub fn containerd_state(&self) -> PathBuf {
        self.run.join("containerd")
    }
    pub fn containerd_socket(&self) -> PathBuf {
        self.run.join("containerd.sock")
    }
    pub fn containerd_config(&self) -> PathBuf {
        self.dir.join("containerd.toml")
    }
    pub fn registry_hosts(&self) -> PathBuf {
        self.dir.join("registry")
    }
    pub fn cni_conf_dir(&self) -> PathBuf {
        self.dir.join("cni")
    }
    pub fn cni_data_dir(&self) -> PathBuf {
        self.run.join("cni-ipam")
    }
    pub fn kubelet_root(&self) -> PathBuf {
        self.dir.join("kubelet")
    }
    /// A GPU node's device-plugin directory: mounted on the kubelet's fixed
    /// `/var/lib/kubelet/device-plugins` in the node's own mount namespace.
    pub fn device_plugins(&self) -> PathBuf {
        self.dir.join("device-plugins")
    }
    pub fn kubelet_config(&self) -> PathBuf {
        self.dir.join("kubelet.yaml")
    }
    pub fn kubelet_kubeconfig(&self) -> PathBuf {
        self.dir.join("kubelet.kubeconfig")
    }
    pub fn pod_logs(&self) -> PathBuf {
        self.dir.join("pod-logs")
    }
    pub fn resolv_conf(&self) -> PathBuf {
        self.dir.join("resolv.conf")
    }
    pub fn kube_proxy_config(&self) -> PathBuf {
        self.dir.join("kube-proxy.yaml")
    }
    pub fn kube_proxy_kubeconfig(&self) -> PathBuf {
        self.dir.join("kube-proxy.kubeconfig")
    }
}

/// Runtime state of every node lives below this.
pub const RUN_ROOT: &str = "/run/sluice-e2e";
/// The CNI plugins of Debian's `containernetworking-plugins`.
pub const CNI_BIN_DIR: &str = "/usr/lib/cni";
/// The sandbox image (built from e2e/cluster/pause.c, see e2e/images.yaml).
pub const PAUSE_IMAGE: &str = "docker.io/sluice/pause:3.10";

/// containerd 1.6's config: its own root, state and socket; the CRI plugin with the
/// node's CNI config, our pause image, cgroupfs, and `restrict_oom_score_adj` (this VM
/// lacks CAP_SYS_RESOURCE, so runc may not lower a container's oom_score_adj).
/// Registries resolve to a closed local port, so a pull fails at once, on the machine.
pub fn containerd_toml(p: &NodePaths) -> String {
    format!(
        r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.grpc.v1.cri.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs"]

[grpc]
  address = "{sock}"

[ttrpc]
  address = "{sock}.ttrpc"

[debug]
  address = ""

[metrics]
  address = ""

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause}"
  restrict_oom_score_adj = true
  enable_selinux = false
  disable_apparmor = true
  disable_cgroup = false
  max_container_log_line_size = 16384

  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"

    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"

      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "{runc_root}"

  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{cni_bin}"
    conf_dir = "{cni_conf}"
    max_conf_num = 1

  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "{registry}"
"#,
        root = p.containerd_root().display(),
        state = p.containerd_state().display(),
        sock = p.containerd_socket().display(),
        pause = PAUSE_IMAGE,
        runc_root = p.run.join("runc").display(),
        cni_bin = CNI_BIN_DIR,
        cni_conf = p.cni_conf_dir().display(),
        registry = p.registry_hosts().display(),
    )
}

/// `hosts.toml` for a registry: every pull goes to a closed port on loopback.
pub fn registry_hosts_toml(registry: &str) -> String {
    format!(
        "server = \"https://{registry}\"\n\n[host.\"http://127.0.0.1:9\"]\n  capabilities = [\"pull\", \"resolve\"]\n  skip_verify = true\n"
    )
}

/// The CNI network: a bridge whose address is the pods' gateway (not the node's
/// InternalIP), host-local addresses from the node's pod range, hairpin mode so a pod
/// reaches itself through a Service, and portmap for hostPorts. No masquerade: nothing
/// leaves the machine.
pub fn cni_conflist(spec: &NodeSpec, p: &NodePaths) -> String {
    serde_json::to_string_pretty(&serde_json::json!({
        "cniVersion": "1.0.0",
        "name": format!("sluice-{}", spec.name),
        "plugins": [
            {
                "type": "bridge",
                "bridge": spec.bridge(),
                "isGateway": true,
                "ipMasq": false,
                "hairpinMode": true,
                "ipam": {
                    "type": "host-local",
                    "dataDir": p.cni_data_dir(),
                    "ranges": [[{"subnet": spec.pod_cidr(), "gateway": spec.bridge_ip().to_string()}]],
                    "routes": [{"dst": "0.0.0.0/0"}]
                }
            },
            {"type": "portmap", "capabilities": {"portMappings": true}},
            {"type": "loopback"}
        ]
    }))
    .expect("static JSON")
}

/// Ports a kubelet listens on.
#[derive(Clone, Copy, Debug)]
pub struct KubeletPorts {
    /// On the node's address (the API server's logs/exec/port-forward go there).
    pub server: u16,
    /// On 127.0.0.1.
    pub healthz: u16,
}

pub struct KubeletFiles<'a> {
    pub ca_cert: &'a Path,
    pub serving_cert: &'a Path,
    pub serving_key: &'a Path,
}

/// The kubelet's config. What mattered on this machine kind: cgroup v1 allowed
/// (`failCgroupV1: false`) with the cgroupfs driver and a cgroup root of our own; no
/// iptables utility chains in the machine's INPUT/OUTPUT; eviction thresholds near zero, in
/// absolute terms ([`KUBELET_EVICTION_FREE`]: a percentage of a large shared disk is gigabytes
/// a build may take) and no image GC (the ground's disk is shared with the build); an explicit resolv.conf; every
/// directory the kubelet would otherwise create on the host put under the node's own.
pub fn kubelet_yaml(
    spec: &NodeSpec,
    p: &NodePaths,
    ports: KubeletPorts,
    f: &KubeletFiles,
) -> String {
    format!(
        r#"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: "{node_ip}"
port: {port}
readOnlyPort: 0
healthzBindAddress: "127.0.0.1"
healthzPort: {healthz}
authentication:
  anonymous: {{enabled: false}}
  webhook: {{enabled: true}}
  x509: {{clientCAFile: "{ca}"}}
authorization:
  mode: Webhook
tlsCertFile: "{cert}"
tlsPrivateKeyFile: "{key}"
containerRuntimeEndpoint: "unix://{sock}"
imageServiceEndpoint: "unix://{sock}"
cgroupDriver: cgroupfs
cgroupRoot: "{cgroup_root}"
cgroupsPerQOS: true
enforceNodeAllocatable: [pods]
failCgroupV1: false
failSwapOn: false
makeIPTablesUtilChains: false
protectKernelDefaults: false
podCIDR: "{pod_cidr}"
clusterDomain: cluster.local
clusterDNS: ["{dns}"]
resolvConf: "{resolv}"
podLogsDir: "{pod_logs}"
volumePluginDir: "{plugins}"
maxPods: 110
serializeImagePulls: false
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard:
  memory.available: "100Mi"
  nodefs.available: "{min_free}"
  nodefs.inodesFree: "1%"
  imagefs.available: "{min_free}"
evictionPressureTransitionPeriod: 5s
nodeStatusUpdateFrequency: 10s
nodeStatusReportFrequency: 1m
syncFrequency: 10s
fileCheckFrequency: 20s
rotateCertificates: false
serverTLSBootstrap: false
shutdownGracePeriod: 0s
localStorageCapacityIsolation: true
"#,
        node_ip = spec.node_ip(),
        port = ports.server,
        healthz = ports.healthz,
        ca = f.ca_cert.display(),
        cert = f.serving_cert.display(),
        key = f.serving_key.display(),
        sock = p.containerd_socket().display(),
        cgroup_root = spec.cgroup_root(),
        pod_cidr = spec.pod_cidr(),
        dns = CLUSTER_DNS,
        resolv = p.resolv_conf().display(),
        pod_logs = p.pod_logs().display(),
        plugins = p.dir.join("volume-plugins").display(),
        min_free = KUBELET_EVICTION_FREE,
    )
}

/// Free disk space below which a node's kubelet evicts pods and admits none (the kubelet's
/// `evictionHard` for `nodefs` and `imagefs`).
pub const KUBELET_EVICTION_FREE: &str = "512Mi";

/// Free disk space `cluster up` and `sluice-e2e node` require where the ground keeps its
/// state: well above [`KUBELET_EVICTION_FREE`], so that builds and logs during a test run
/// do not push the nodes into disk pressure (pods refused or evicted, tests failing for a
/// reason that is not theirs).
pub const MIN_FREE_DISK_BYTES: u64 = 4 << 30;

/// Free bytes for unprivileged use on the filesystem holding `path`.
pub fn free_disk_bytes(path: &std::path::Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt as _;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid NUL-terminated path and a statvfs buffer of the right size.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(st.f_bavail as u64 * st.f_frsize as u64)
}

/// kube-proxy in nftables mode. It touches only its own `kube-proxy` tables; conntrack
/// sizes and timeouts at 0 leave the machine's conntrack sysctls alone; NodePorts only on
/// the node's address; `min_sync_period` is the second, real source of endpoint lag.
pub fn kube_proxy_yaml(
    spec: &NodeSpec,
    kubeconfig: &Path,
    healthz: u16,
    metrics: u16,
    min_sync_period: std::time::Duration,
) -> String {
    format!(
        r#"apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: nftables
hostnameOverride: "{name}"
bindAddress: "{node_ip}"
clusterCIDR: "{pods}"
detectLocalMode: ClusterCIDR
healthzBindAddress: "127.0.0.1:{healthz}"
metricsBindAddress: "127.0.0.1:{metrics}"
nodePortAddresses: ["{node_ip}/32"]
clientConnection:
  kubeconfig: "{kc}"
  qps: 50
  burst: 100
conntrack:
  maxPerCore: 0
  min: 0
  tcpEstablishedTimeout: 0s
  tcpCloseWaitTimeout: 0s
nftables:
  minSyncPeriod: {min_sync}ms
  syncPeriod: 30s
"#,
        name = spec.name,
        node_ip = spec.node_ip(),
        pods = POD_SUPERNET,
        kc = kubeconfig.display(),
        min_sync = min_sync_period.as_millis(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paths() -> NodePaths {
        NodePaths::new(Path::new("/repo/target/e2e"), "local-0")
    }

    #[test]
    fn the_node_address_differs_from_the_bridge_address() {
        for i in [0u8, 1, 7] {
            let s = NodeSpec::new("n", i);
            assert_ne!(s.node_ip(), s.bridge_ip());
            assert!(s.pod_cidr().starts_with(&format!("10.245.{i}.")));
        }
        assert_eq!(
            NodeSpec::new("local-0", 0).node_ip().to_string(),
            "10.250.0.1"
        );
    }

    #[test]
    fn link_names_fit_the_kernel_limit() {
        let s = NodeSpec::new("local-199", 199);
        for n in [s.bridge(), s.veth(), s.veth_peer()] {
            assert!(n.len() <= 15, "{n}");
        }
    }

    #[test]
    fn containerd_runs_on_its_own_paths_with_the_oom_workaround() {
        let t = containerd_toml(&paths());
        let v: toml::Value = toml::from_str(&t).unwrap();
        let cri = &v["plugins"]["io.containerd.grpc.v1.cri"];
        assert_eq!(cri["restrict_oom_score_adj"].as_bool(), Some(true));
        assert!(t.contains("address = \"/run/sluice-e2e/local-0/containerd.sock\""));
        assert!(t.contains("root = \"/repo/target/e2e/node/local-0/containerd\""));
        assert!(t.contains("SystemdCgroup = false"));
        assert!(t.contains(PAUSE_IMAGE));
    }

    #[test]
    fn the_socket_path_fits_a_unix_socket() {
        assert!(paths().containerd_socket().as_os_str().len() < 100);
    }

    #[test]
    fn cni_uses_the_pod_range_and_never_masquerades() {
        let s = NodeSpec::new("local-0", 0);
        let v: serde_json::Value = serde_json::from_str(&cni_conflist(&s, &paths())).unwrap();
        let bridge = &v["plugins"][0];
        assert_eq!(bridge["bridge"], "slcbr0");
        assert_eq!(bridge["ipMasq"], false);
        assert_eq!(bridge["ipam"]["ranges"][0][0]["subnet"], "10.245.0.0/24");
        assert_eq!(bridge["ipam"]["ranges"][0][0]["gateway"], "10.245.0.1");
    }

    #[test]
    fn kubelet_config_keeps_off_the_machine_defaults() {
        let s = NodeSpec::new("local-0", 0);
        let f = KubeletFiles {
            ca_cert: Path::new("/ca"),
            serving_cert: Path::new("/c"),
            serving_key: Path::new("/k"),
        };
        let y = kubelet_yaml(
            &s,
            &paths(),
            KubeletPorts {
                server: 10250,
                healthz: 4000,
            },
            &f,
        );
        let v: serde_yaml::Value = serde_yaml::from_str(&y).unwrap();
        assert_eq!(v["failCgroupV1"], false);
        assert_eq!(v["makeIPTablesUtilChains"], false);
        assert_eq!(v["cgroupDriver"], "cgroupfs");
        assert_eq!(v["address"], "10.250.0.1");
        assert_eq!(v["authentication"]["anonymous"]["enabled"], false);
        assert!(
            v["volumePluginDir"]
                .as_str()
                .unwrap()
                .starts_with("/repo/target/e2e/node/")
        );
        assert!(
            v["podLogsDir"]
                .as_str()
                .unwrap()
                .starts_with("/repo/target/e2e/node/")
        );
    }

    #[test]
    fn kube_proxy_uses_nftables_and_leaves_conntrack_alone() {
        let s = NodeSpec::new("local-0", 0);
        let y = kube_proxy_yaml(
            &s,
            Path::new("/kc"),
            1,
            2,
            std::time::Duration::from_millis(1500),
        );
        let v: serde_yaml::Value = serde_yaml::from_str(&y).unwrap();
        assert_eq!(v["mode"], "nftables");
        assert_eq!(v["conntrack"]["maxPerCore"], 0);
        assert_eq!(v["nftables"]["minSyncPeriod"], "1500ms");
        assert_eq!(v["nodePortAddresses"][0], "10.250.0.1/32");
    }
}
