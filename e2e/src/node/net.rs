//! The process node's network: a bridge per node carrying the first address of its pod CIDR,
//! a network namespace per pod joined to the bridge by a veth pair, and a blackhole route for
//! the whole process-node pod range so that nothing addressed to a vanished pod leaves the
//! machine. Everything is named with fixed prefixes so that [`cleanup_host_network`] can find
//! it again after a crash.
use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::process::Command as StdCommand;
use std::sync::Mutex;

use anyhow::Context as _;

/// Network namespaces: `slc-<pod uid>`.
pub const NETNS_PREFIX: &str = "slc-";
/// Bridges: `slcbr<hash of the node name>`.
pub const BRIDGE_PREFIX: &str = "slcbr";
/// Host ends of pod veth pairs: `slcv<hash of the pod uid>`.
pub const VETH_PREFIX: &str = "slcv";
/// Pod ends, before they move into the pod's namespace: `slcp<hash>`.
pub const PEER_PREFIX: &str = "slcp";
/// Every process node's pod CIDR lies inside this range.
pub const POD_SUPERNET: &str = "10.245.0.0/16";

fn fnv1a(data: &[u8]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in data {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

/// An IPv4 CIDR.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    pub base: Ipv4Addr,
    pub prefix: u8,
}

impl std::str::FromStr for Cidr {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        let (ip, prefix) = s.split_once('/').context("CIDR needs a /prefix")?;
        let ip: Ipv4Addr = ip.parse()?;
        let prefix: u8 = prefix.parse()?;
        anyhow::ensure!(
            (16..=30).contains(&prefix),
            "pod CIDR prefix must be between /16 and /30"
        );
        let mask = u32::MAX << (32 - prefix);
        anyhow::ensure!(u32::from(ip) & !mask == 0, "{s} has host bits set");
        Ok(Cidr { base: ip, prefix })
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.base, self.prefix)
    }
}

impl Cidr {
    pub fn size(&self) -> u32 {
        1 << (32 - self.prefix)
    }
    /// The bridge's (and the node's) address: the first host address.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.base) + 1)
    }
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let mask = u32::MAX << (32 - self.prefix);
        u32::from(ip) & mask == u32::from(self.base)
    }
}

/// Hands out pod addresses from a CIDR: never the network, the gateway or the broadcast
/// address, and never one still in use. Pure, so it is unit-tested.
#[derive(Debug)]
pub struct IpAllocator {
    cidr: Cidr,
    used: BTreeSet<Ipv4Addr>,
    /// Next offset to try; moving on instead of reusing the lowest free address keeps a
    /// just-released address (which clients may still try) out of use for a while.
    next: u32,
}

impl IpAllocator {
    pub fn new(cidr: Cidr) -> Self {
        IpAllocator {
            cidr,
            used: BTreeSet::new(),
            next: 2,
        }
    }

    pub fn allocate(&mut self) -> Option<Ipv4Addr> {
        let size = self.cidr.size();
        for i in 0..size {
            let off = 2 + (self.next - 2 + i) % (size - 3);
            let ip = Ipv4Addr::from(u32::from(self.cidr.base) + off);
            if self.used.insert(ip) {
                self.next = off + 1;
                return Some(ip);
            }
        }
        None
    }

    /// Marks an address as used (a pod found already running with it).
    pub fn claim(&mut self, ip: Ipv4Addr) -> bool {
        self.cidr.contains(ip) && self.used.insert(ip)
    }

    pub fn release(&mut self, ip: Ipv4Addr) {
        self.used.remove(&ip);
    }
}

async fn ip(args: &[&str]) -> anyhow::Result<String> {
    let out = tokio::process::Command::new("ip")
        .args(args)
        .output()
        .await
        .context("running `ip` (iproute2 is required)")?;
    if !out.status.success() {
        anyhow::bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ip_sync(args: &[&str]) -> anyhow::Result<String> {
    let out = StdCommand::new("ip")
        .args(args)
        .output()
        .context("running `ip`")?;
    if !out.status.success() {
        anyhow::bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The node-wide part of the network.
#[derive(Debug)]
pub struct NodeNet {
    pub bridge: String,
    pub cidr: Cidr,
    pub alloc: Mutex<IpAllocator>,
}

pub fn bridge_name(node: &str) -> String {
    format!("{BRIDGE_PREFIX}{:06x}", fnv1a(node.as_bytes()) & 0xff_ffff)
}

pub fn netns_name(pod_uid: &str) -> String {
    format!("{NETNS_PREFIX}{pod_uid}")
}

fn veth_names(pod_uid: &str) -> (String, String) {
    let h = fnv1a(pod_uid.as_bytes());
    (
        format!("{VETH_PREFIX}{h:08x}"),
        format!("{PEER_PREFIX}{h:08x}"),
    )
}

impl NodeNet {
    /// Creates (or reuses) the bridge and the blackhole route.
    pub async fn setup(node: &str, cidr: Cidr) -> anyhow::Result<Self> {
        let supernet: Cidr = POD_SUPERNET.parse()?;
        anyhow::ensure!(
            supernet.contains(cidr.base) && cidr.prefix >= supernet.prefix,
            "pod CIDR {cidr} must lie inside {POD_SUPERNET}"
        );
        ip(&["route", "replace", "blackhole", POD_SUPERNET]).await?;
        let bridge = bridge_name(node);
        if ip(&["link", "show", "dev", &bridge]).await.is_err() {
            ip(&["link", "add", &bridge, "type", "bridge"]).await?;
        }
        let gw = format!("{}/{}", cidr.gateway(), cidr.prefix);
        ip(&["addr", "replace", &gw, "dev", &bridge]).await?;
        ip(&["link", "set", &bridge, "up"]).await?;
        Ok(NodeNet {
            bridge,
            cidr,
            alloc: Mutex::new(IpAllocator::new(cidr)),
        })
    }

    /// Gives a pod its namespace, a veth pair on the bridge and `pod_ip`. A namespace left
    /// over from an earlier run of the node is emptied and made again.
    pub async fn setup_pod(&self, pod_uid: &str, pod_ip: Ipv4Addr) -> anyhow::Result<String> {
        let ns = netns_name(pod_uid);
        let (host, peer) = veth_names(pod_uid);
        if std::path::Path::new("/run/netns").join(&ns).exists() {
            kill_netns_processes(&ns);
            let _ = ip(&["netns", "del", &ns]).await;
        }
        let _ = ip(&["link", "del", &host]).await;
        ip(&["netns", "add", &ns]).await?;
        ip(&["link", "add", &host, "type", "veth", "peer", "name", &peer]).await?;
        ip(&["link", "set", &peer, "netns", &ns]).await?;
        ip(&["link", "set", &host, "master", &self.bridge, "up"]).await?;
        let addr = format!("{pod_ip}/{}", self.cidr.prefix);
        let gw = self.cidr.gateway().to_string();
        ip(&["-n", &ns, "link", "set", "lo", "up"]).await?;
        ip(&["-n", &ns, "link", "set", &peer, "name", "eth0"]).await?;
        ip(&["-n", &ns, "addr", "add", &addr, "dev", "eth0"]).await?;
        ip(&["-n", &ns, "link", "set", "eth0", "up"]).await?;
        ip(&["-n", &ns, "route", "add", "default", "via", &gw]).await?;
        Ok(ns)
    }

    /// Kills whatever still runs in the pod's namespace and removes it (its veth pair goes
    /// with it).
    pub async fn teardown_pod(&self, pod_uid: &str) {
        let ns = netns_name(pod_uid);
        kill_netns_processes(&ns);
        if let Err(e) = ip(&["netns", "del", &ns]).await {
            tracing::debug!("removing {ns}: {e:#}");
        }
        let (host, _) = veth_names(pod_uid);
        let _ = ip(&["link", "del", &host]).await;
    }
}

/// PIDs of the processes in a network namespace.
pub fn netns_pids(ns: &str) -> Vec<i32> {
    ip_sync(&["netns", "pids", ns])
        .map(|out| {
            out.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

fn kill_netns_processes(ns: &str) {
    for pid in netns_pids(ns) {
        // SAFETY: kill(2) with a PID we just read; at worst the process is already gone.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
    }
}

/// Removes every namespace, veth, bridge and route any process node made (found by their
/// name prefixes, so it works after a crash), killing the processes still inside, and kills
/// the host-network pods' process groups recorded under `target/e2e/pods/`.
pub fn cleanup_host_network() -> anyhow::Result<()> {
    let mut errors = Vec::new();
    // Host-network pods have no namespace: their recorded process groups go, with the
    // per-pod directories.
    let pods_dir = super::runtime::repo_root().join(super::PODS_DIR);
    if let Ok(entries) = std::fs::read_dir(&pods_dir) {
        for e in entries.flatten() {
            super::pod::kill_recorded_groups(&e.path());
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
    if let Ok(list) = ip_sync(&["netns", "list"]) {
        for ns in list
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .filter(|n| n.starts_with(NETNS_PREFIX))
        {
            kill_netns_processes(ns);
            if let Err(e) = ip_sync(&["netns", "del", ns]) {
                errors.push(format!("{e:#}"));
            }
        }
    }
    if let Ok(links) = ip_sync(&["-o", "link", "show"]) {
        for name in links.lines().filter_map(|l| {
            let name = l.split(':').nth(1)?.trim();
            Some(name.split('@').next().unwrap_or(name).to_string())
        }) {
            if [BRIDGE_PREFIX, VETH_PREFIX, PEER_PREFIX]
                .iter()
                .any(|p| name.starts_with(p))
                && let Err(e) = ip_sync(&["link", "del", &name])
            {
                // A veth disappears with its peer's namespace; only report what is still there.
                if ip_sync(&["link", "show", "dev", &name]).is_ok() {
                    errors.push(format!("{e:#}"));
                }
            }
        }
    }
    let _ = ip_sync(&["route", "del", "blackhole", POD_SUPERNET]);
    if errors.is_empty() {
        Ok(())
    } else {
        anyhow::bail!(
            "cleaning up the process node's network: {}",
            errors.join("; ")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_parse_and_check() {
        let c: Cidr = "10.245.0.0/24".parse().unwrap();
        assert_eq!(c.gateway(), Ipv4Addr::new(10, 245, 0, 1));
        assert!(c.contains(Ipv4Addr::new(10, 245, 0, 200)));
        assert!(!c.contains(Ipv4Addr::new(10, 245, 1, 2)));
        assert!("10.245.0.1/24".parse::<Cidr>().is_err());
        assert!("10.245.0.0".parse::<Cidr>().is_err());
        assert_eq!(c.to_string(), "10.245.0.0/24");
    }

    #[test]
    fn allocator_skips_reserved_and_used_addresses() {
        let mut a = IpAllocator::new("10.245.0.0/29".parse().unwrap());
        // /29: .0 network, .1 gateway, .7 broadcast → .2 to .6 usable.
        let got: Vec<_> = (0..5).map(|_| a.allocate().unwrap()).collect();
        assert_eq!(got.first(), Some(&Ipv4Addr::new(10, 245, 0, 2)));
        assert_eq!(got.last(), Some(&Ipv4Addr::new(10, 245, 0, 6)));
        assert_eq!(a.allocate(), None);
        a.release(Ipv4Addr::new(10, 245, 0, 4));
        assert_eq!(a.allocate(), Some(Ipv4Addr::new(10, 245, 0, 4)));
        assert!(!a.claim(Ipv4Addr::new(10, 245, 1, 4)));
    }

    #[test]
    fn allocator_does_not_reuse_a_released_address_at_once() {
        let mut a = IpAllocator::new("10.245.0.0/24".parse().unwrap());
        let first = a.allocate().unwrap();
        a.release(first);
        assert_ne!(a.allocate().unwrap(), first);
    }

    #[test]
    fn names_fit_linux_interface_limits() {
        let uid = "3f1c2b9e-8a7d-4c55-9b1e-0123456789ab";
        let (h, p) = veth_names(uid);
        assert!(h.len() <= 15 && p.len() <= 15);
        assert!(bridge_name("local-0").len() <= 15);
        assert_ne!(bridge_name("local-0"), bridge_name("local-1"));
    }
}
