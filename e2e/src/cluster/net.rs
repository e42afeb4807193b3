//! The machine's network as the test ground uses it: free ports, blackhole routes, a
//! plain HTTP probe.
use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use anyhow::{Context, bail};

/// A plain HTTP/1.0 GET on loopback; true on a 200.
pub(super) fn http_get_ok(addr: &str, path: &str) -> bool {
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

pub(super) fn ensure_port_free(port: u16) -> anyhow::Result<()> {
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

pub(super) fn add_blackhole(cidr: &str) -> anyhow::Result<()> {
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

pub(super) fn del_blackhole(cidr: &str) {
    let _ = std::process::Command::new("ip")
        .args(["route", "del", "blackhole", cidr])
        .output();
}
