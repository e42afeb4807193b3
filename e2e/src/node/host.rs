//! What a real node changes on the machine, and how the ground gives it back: packages,
//! sysctls, cgroups, links, mounts, nft tables and the processes left in a node's cgroups.
//! Everything here is named by the ground's prefixes (`slc`, `sluice-`, `/run/sluice-e2e`),
//! so `down` (or the next `up` after a crash) finds it without a record.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use super::config::NodeSpec;

/// Debian packages a real node needs, by a file each provides.
pub const PACKAGES: &[(&str, &str)] = &[
    ("/usr/bin/containerd", "containerd"),
    ("/usr/bin/ctr", "containerd"),
    ("/usr/sbin/runc", "runc"),
    ("/usr/lib/cni/bridge", "containernetworking-plugins"),
    ("/usr/sbin/nft", "nftables"),
    ("/usr/sbin/conntrack", "conntrack"),
    ("/usr/sbin/iptables", "iptables"),
    ("/bin/busybox", "busybox-static"),
    ("/usr/bin/cc", "gcc"),
    ("/usr/lib/x86_64-linux-gnu/libc.a", "libc6-dev"),
];

/// Installs the packages that are missing (`apt-get`, as root).
pub fn ensure_packages() -> anyhow::Result<()> {
    let mut missing: Vec<&str> = PACKAGES
        .iter()
        .filter(|(file, _)| !Path::new(file).exists())
        .map(|(_, pkg)| *pkg)
        .collect();
    missing.dedup();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("cluster up: installing {} (apt-get)", missing.join(" "));
    let ok = Command::new("apt-get")
        .args(["update", "-qq"])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        bail!(
            "apt-get update failed; install {} by hand",
            missing.join(" ")
        );
    }
    let status = Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .context("running apt-get")?;
    anyhow::ensure!(
        status.success(),
        "apt-get install {} failed",
        missing.join(" ")
    );
    Ok(())
}

/// Sysctls the kubelet, kube-proxy or the bridge plugin may change; `up` records them and
/// `down` writes them back.
pub const SYSCTLS: &[&str] = &[
    "vm.overcommit_memory",
    "vm.panic_on_oom",
    "kernel.panic",
    "kernel.panic_on_oops",
    "kernel.keys.root_maxkeys",
    "kernel.keys.root_maxbytes",
    "net.ipv4.ip_forward",
    "net.ipv4.conf.all.route_localnet",
    "net.bridge.bridge-nf-call-iptables",
    "net.bridge.bridge-nf-call-ip6tables",
    "net.netfilter.nf_conntrack_max",
    "net.netfilter.nf_conntrack_tcp_timeout_established",
    "net.netfilter.nf_conntrack_tcp_timeout_close_wait",
    "net.netfilter.nf_conntrack_tcp_be_liberal",
];

fn sysctl_path(key: &str) -> PathBuf {
    Path::new("/proc/sys").join(key.replace('.', "/"))
}

/// The current values of [`SYSCTLS`] (those this kernel has).
pub fn read_sysctls() -> BTreeMap<String, String> {
    SYSCTLS
        .iter()
        .filter_map(|k| {
            let v = std::fs::read_to_string(sysctl_path(k)).ok()?;
            Some((k.to_string(), v.trim().to_string()))
        })
        .collect()
}

/// Writes recorded values back; returns the keys that could not be restored.
pub fn restore_sysctls(saved: &BTreeMap<String, String>) -> Vec<String> {
    let mut failed = Vec::new();
    for (k, v) in saved {
        let path = sysctl_path(k);
        let now = std::fs::read_to_string(&path).unwrap_or_default();
        if now.trim() != v && std::fs::write(&path, v).is_err() {
            failed.push(k.clone());
        }
    }
    failed
}

pub fn write_sysctl(key: &str, value: &str) -> anyhow::Result<()> {
    std::fs::write(sysctl_path(key), value).with_context(|| format!("setting {key}={value}"))
}

/// Runs `ip args…`; an error carries its stderr.
pub fn ip(args: &[&str]) -> anyhow::Result<String> {
    run("ip", args)
}

pub fn run(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The node's own address: a veth pair (this kernel has no `dummy` links) with the /32 on
/// the host end. It is what the node reports as InternalIP, where its kubelet listens, and
/// what the API server listens on so that pods reach it through the `kubernetes` Service.
pub fn add_node_address(spec: &NodeSpec) -> anyhow::Result<()> {
    let (veth, peer) = (spec.veth(), spec.veth_peer());
    if ip(&["link", "show", "dev", &veth]).is_err() {
        ip(&["link", "add", &veth, "type", "veth", "peer", "name", &peer])?;
    }
    let addr = format!("{}/32", spec.node_ip());
    let shown = ip(&["-o", "addr", "show", "dev", &veth])?;
    if !shown.contains(&addr) {
        ip(&["addr", "add", &addr, "dev", &veth])?;
    }
    ip(&["link", "set", &peer, "up"])?;
    ip(&["link", "set", &veth, "up"])?;
    Ok(())
}

/// Links of the ground's nodes: bridges `slcbr*`, node veths `slcn*` (pod veths go with
/// their network namespaces).
pub fn delete_links(errors: &mut Vec<String>) {
    let Ok(links) = ip(&["-o", "link", "show"]) else {
        return;
    };
    for name in links.lines().filter_map(|l| {
        let name = l.split(':').nth(1)?.trim();
        Some(name.split('@').next().unwrap_or(name).to_string())
    }) {
        if (name.starts_with("slcbr") || name.starts_with("slcn"))
            && let Err(e) = ip(&["link", "del", &name])
            && ip(&["link", "show", "dev", &name]).is_ok()
        {
            errors.push(format!("{e:#}"));
        }
    }
}

/// Cgroup v1 hierarchies (and the v2 mount, if any) of this machine.
pub fn cgroup_hierarchies() -> Vec<PathBuf> {
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") else {
        return Vec::new();
    };
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_, point, fstype) = (f.next()?, f.next()?, f.next()?);
            (fstype == "cgroup" || fstype == "cgroup2").then(|| PathBuf::from(point))
        })
        .collect()
}

/// Creates the node's cgroup root in every hierarchy (the kubelet expects it to exist).
pub fn create_cgroup_root(spec: &NodeSpec) -> anyhow::Result<()> {
    create_cgroup(&spec.cgroup_root())
}

/// Creates the cgroup `rel` in every hierarchy; cpuset needs its cpus and mems copied from
/// the parent before tasks may join.
pub fn create_cgroup(rel: &str) -> anyhow::Result<()> {
    for h in cgroup_hierarchies() {
        let dir = h.join(rel.trim_start_matches('/'));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        for f in ["cpuset.cpus", "cpuset.mems"] {
            if let Ok(v) = std::fs::read_to_string(h.join(f)) {
                let _ = std::fs::write(dir.join(f), v.trim());
            }
        }
    }
    Ok(())
}

/// CPU weight of a cgroup in the v1 `cpu` hierarchy (`cpu.shares`) or, on a v2 mount,
/// its `cpu.weight` (converted as runc converts shares). A missing controller is not an
/// error: the ground then runs with the machine's defaults.
pub fn set_cpu_shares(rel: &str, shares: u64) -> anyhow::Result<()> {
    for h in cgroup_hierarchies() {
        let dir = h.join(rel.trim_start_matches('/'));
        if dir.join("cpu.shares").exists() {
            std::fs::write(dir.join("cpu.shares"), shares.to_string())
                .with_context(|| format!("setting {}/cpu.shares", dir.display()))?;
        } else if dir.join("cpu.weight").exists() {
            let weight = 1 + (shares.clamp(2, 262_144) - 2) * 9999 / 262_142;
            std::fs::write(dir.join("cpu.weight"), weight.to_string())
                .with_context(|| format!("setting {}/cpu.weight", dir.display()))?;
        }
    }
    Ok(())
}

/// Moves `pid` (all its threads) into the cgroup `rel` of the hierarchy that holds the
/// CPU controller (v1 `cpu`, else the v2 mount).
pub fn join_cpu_cgroup(rel: &str, pid: i32) -> anyhow::Result<()> {
    let hierarchies = cgroup_hierarchies();
    let hierarchy = hierarchies
        .iter()
        .find(|h| h.join("cpu.shares").exists())
        .or_else(|| {
            hierarchies
                .iter()
                .find(|h| h.join("cgroup.controllers").exists())
        })
        .context("no cgroup hierarchy with the cpu controller")?;
    let procs = hierarchy
        .join(rel.trim_start_matches('/'))
        .join("cgroup.procs");
    std::fs::write(&procs, pid.to_string())
        .with_context(|| format!("moving {pid} to {}", procs.display()))
}

/// Every cgroup directory below `root` in every hierarchy, deepest first.
fn cgroup_dirs(rel: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        if let Ok(rd) = std::fs::read_dir(dir) {
            for e in rd.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    walk(&e.path(), out);
                }
            }
        }
        out.push(dir.to_path_buf());
    }
    for h in cgroup_hierarchies() {
        let dir = h.join(rel.trim_start_matches('/'));
        if dir.exists() {
            walk(&dir, &mut out);
        }
    }
    out
}

fn cgroup_pids(dirs: &[PathBuf]) -> Vec<i32> {
    let mut pids: Vec<i32> = dirs
        .iter()
        .filter_map(|d| std::fs::read_to_string(d.join("cgroup.procs")).ok())
        .flat_map(|t| {
            t.lines()
                .filter_map(|l| l.trim().parse().ok())
                .collect::<Vec<i32>>()
        })
        .collect();
    pids.sort_unstable();
    pids.dedup();
    pids
}

/// Kills every process in the node's cgroups (its pods' containers and pause processes),
/// then removes the cgroups. Returns what could not be removed.
pub fn remove_cgroup_root(rel: &str, errors: &mut Vec<String>) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let pids = cgroup_pids(&cgroup_dirs(rel));
        if pids.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            errors.push(format!("processes {pids:?} in cgroup {rel} did not die"));
            break;
        }
        for pid in pids {
            // SAFETY: kill(2) with a PID read from the node's own cgroups.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    for dir in cgroup_dirs(rel) {
        // A cgroup goes a moment after its last task exits.
        let mut tries = 0;
        while std::fs::remove_dir(&dir).is_err() && dir.exists() && tries < 20 {
            tries += 1;
            std::thread::sleep(Duration::from_millis(50));
        }
        if dir.exists() {
            errors.push(format!("cgroup {} could not be removed", dir.display()));
        }
    }
}

/// Processes whose command line contains `needle` (containerd's shims name our socket).
pub fn pids_with_cmdline(needle: &str) -> Vec<i32> {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| {
                    let c = String::from_utf8_lossy(&c).replace('\0', " ");
                    c.contains(needle)
                })
                .unwrap_or(false)
        })
        .filter(|pid| *pid != std::process::id() as i32)
        .collect()
}

pub fn kill_all(pids: &[i32]) {
    for pid in pids {
        // SAFETY: kill(2) on PIDs just found by their command line.
        unsafe { libc::kill(*pid, libc::SIGKILL) };
    }
}

/// Mount points at or below any of `prefixes`, deepest first.
pub fn mounts_under(prefixes: &[PathBuf]) -> Vec<PathBuf> {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .filter(|p| prefixes.iter().any(|pre| p.starts_with(pre)))
        .collect();
    out.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    out.dedup();
    out
}

/// Unmounts (lazily, so a busy mount cannot stall the teardown) everything at or below
/// `prefixes`.
pub fn unmount_under(prefixes: &[PathBuf], errors: &mut Vec<String>) {
    for _ in 0..3 {
        let mounts = mounts_under(prefixes);
        if mounts.is_empty() {
            return;
        }
        for m in mounts {
            let c = std::ffi::CString::new(m.as_os_str().as_encoded_bytes()).unwrap_or_default();
            // SAFETY: umount2 with a NUL-terminated path we own.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
    let left = mounts_under(prefixes);
    if !left.is_empty() {
        errors.push(format!("still mounted: {left:?}"));
    }
}

/// Network namespaces containerd made for pods (`/run/netns/cni-*`).
pub fn cni_netns() -> Vec<String> {
    std::fs::read_dir("/run/netns")
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().to_str().map(String::from))
                .filter(|n| n.starts_with("cni-"))
                .collect()
        })
        .unwrap_or_default()
}

/// nft tables kube-proxy made (`ip kube-proxy`, `ip6 kube-proxy`).
pub fn delete_kube_proxy_tables(errors: &mut Vec<String>) {
    for family in ["ip", "ip6"] {
        if run("nft", &["list", "table", family, "kube-proxy"]).is_ok()
            && let Err(e) = run("nft", &["delete", "table", family, "kube-proxy"])
        {
            errors.push(format!("{e:#}"));
        }
    }
}

/// Host directories the kubelet and containerd use whatever their configs say; `up`
/// records which existed, `down` removes those it made.
pub const HOST_DIRS: &[&str] = &[
    "/run/containerd",
    "/run/mount",
    "/var/lib/kubelet",
    "/var/log/containers",
    "/var/log/pods",
    "/run/netns",
    "/var/lib/cni",
    "/etc/cni",
    "/opt/cni",
    "/usr/libexec/kubernetes",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sysctl_keys_map_to_proc_paths() {
        assert_eq!(
            sysctl_path("net.ipv4.ip_forward"),
            PathBuf::from("/proc/sys/net/ipv4/ip_forward")
        );
        assert_eq!(
            sysctl_path("net.bridge.bridge-nf-call-iptables"),
            PathBuf::from("/proc/sys/net/bridge/bridge-nf-call-iptables")
        );
    }

    #[test]
    fn mount_points_are_found_deepest_first() {
        // The root is always mounted; a prefix that matches nothing finds nothing.
        assert!(mounts_under(&[PathBuf::from("/nonexistent-sluice")]).is_empty());
        let all = mounts_under(&[PathBuf::from("/")]);
        let depths: Vec<usize> = all.iter().map(|p| p.components().count()).collect();
        assert!(depths.windows(2).all(|w| w[0] >= w[1]), "{all:?}");
    }
}
