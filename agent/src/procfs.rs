//! Parsers for the kernel's TCP tables (`/proc/net/tcp`, `/proc/net/tcp6`) and counters
//! (`/proc/net/snmp`). Pure functions over text; reading the files is the caller's job.
//! Malformed lines are skipped, never a panic: the text comes from the kernel but the
//! fuzz target feeds anything.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// TCP states as the kernel numbers them (include/net/tcp_states.h).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TcpState {
    Established,
    SynSent,
    SynRecv,
    FinWait1,
    FinWait2,
    TimeWait,
    Close,
    CloseWait,
    LastAck,
    Listen,
    Closing,
    NewSynRecv,
    Other(u8),
}

impl TcpState {
    pub fn from_code(code: u8) -> TcpState {
        match code {
            0x01 => TcpState::Established,
            0x02 => TcpState::SynSent,
            0x03 => TcpState::SynRecv,
            0x04 => TcpState::FinWait1,
            0x05 => TcpState::FinWait2,
            0x06 => TcpState::TimeWait,
            0x07 => TcpState::Close,
            0x08 => TcpState::CloseWait,
            0x09 => TcpState::LastAck,
            0x0A => TcpState::Listen,
            0x0B => TcpState::Closing,
            0x0C => TcpState::NewSynRecv,
            other => TcpState::Other(other),
        }
    }
}

/// One row of `/proc/net/tcp` or `/proc/net/tcp6`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TcpEntry {
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub state: TcpState,
    /// For a listening socket: the accept queue's current length.
    pub rx_queue: u32,
    pub tx_queue: u32,
    pub inode: u64,
}

fn parse_v4(hex: &str) -> Option<Ipv4Addr> {
    if hex.len() != 8 {
        return None;
    }
    // The kernel prints the network-order address bytes read as one native u32.
    let v = u32::from_str_radix(hex, 16).ok()?;
    Some(Ipv4Addr::from(v.to_ne_bytes()))
}

fn parse_v6(hex: &str) -> Option<Ipv6Addr> {
    if hex.len() != 32 || !hex.is_ascii() {
        return None;
    }
    // Four native-order u32 words.
    let mut bytes = [0u8; 16];
    for w in 0..4 {
        let word = u32::from_str_radix(&hex[w * 8..w * 8 + 8], 16).ok()?;
        bytes[w * 4..w * 4 + 4].copy_from_slice(&word.to_ne_bytes());
    }
    Some(Ipv6Addr::from(bytes))
}

fn parse_addr(s: &str) -> Option<SocketAddr> {
    let (ip, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let ip = match ip.len() {
        8 => IpAddr::V4(parse_v4(ip)?),
        32 => IpAddr::V6(parse_v6(ip)?),
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// Parses one data line of `/proc/net/tcp{,6}` (not the header).
pub fn parse_tcp_line(line: &str) -> Option<TcpEntry> {
    let mut f = line.split_ascii_whitespace();
    let sl = f.next()?;
    // The slot number: "12:".
    let num = sl.strip_suffix(':')?;
    if num.is_empty() || !num.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let local = parse_addr(f.next()?)?;
    let remote = parse_addr(f.next()?)?;
    let state = TcpState::from_code(u8::from_str_radix(f.next()?, 16).ok()?);
    let (tx, rx) = f.next()?.split_once(':')?;
    let tx_queue = u32::from_str_radix(tx, 16).ok()?;
    let rx_queue = u32::from_str_radix(rx, 16).ok()?;
    let _tr_when = f.next()?;
    let _retrnsmt = f.next()?;
    let _uid = f.next()?;
    let _timeout = f.next()?;
    let inode = f.next()?.parse().ok()?;
    Some(TcpEntry {
        local,
        remote,
        state,
        rx_queue,
        tx_queue,
        inode,
    })
}

/// Parses a whole `/proc/net/tcp{,6}` file; the header and bad lines are skipped.
pub fn parse_tcp_table(text: &str) -> Vec<TcpEntry> {
    text.lines().filter_map(parse_tcp_line).collect()
}

/// Parses `/proc/net/snmp` (or `/proc/net/netstat`): pairs of lines `Proto: names...` and
/// `Proto: values...`. Returns `proto -> name -> value`. Values may be negative (`MaxConn`).
pub fn parse_snmp(text: &str) -> HashMap<String, HashMap<String, i64>> {
    let mut out: HashMap<String, HashMap<String, i64>> = HashMap::new();
    let mut lines = text.lines();
    while let Some(names) = lines.next() {
        let Some(values) = lines.next() else { break };
        let (Some((p1, names)), Some((p2, values))) =
            (names.split_once(':'), values.split_once(':'))
        else {
            continue;
        };
        if p1 != p2 {
            continue;
        }
        let entry = out.entry(p1.trim().to_string()).or_default();
        for (n, v) in names
            .split_ascii_whitespace()
            .zip(values.split_ascii_whitespace())
        {
            if let Ok(v) = v.parse::<i64>() {
                entry.insert(n.to_string(), v);
            }
        }
    }
    out
}

/// The `Tcp: PassiveOpens` counter (connections accepted in this network namespace).
pub fn passive_opens(snmp: &HashMap<String, HashMap<String, i64>>) -> Option<u64> {
    snmp.get("Tcp")?
        .get("PassiveOpens")
        .and_then(|v| u64::try_from(*v).ok())
}

/// What observe mode needs about one port, from the TCP tables.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PortView {
    /// A socket listens on the port.
    pub listening: bool,
    /// Sum of the listening sockets' accept queues.
    pub accept_queue: u64,
    /// Established connections whose local port is the port: `(local, remote)`.
    pub established: Vec<(SocketAddr, SocketAddr)>,
}

/// Summarises the entries for local port `port`.
pub fn port_view<'a>(entries: impl IntoIterator<Item = &'a TcpEntry>, port: u16) -> PortView {
    let mut v = PortView::default();
    for e in entries {
        if e.local.port() != port {
            continue;
        }
        match e.state {
            TcpState::Listen => {
                v.listening = true;
                v.accept_queue += u64::from(e.rx_queue);
            }
            TcpState::Established => v.established.push((e.local, e.remote)),
            _ => {}
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    const TCP: &str = "\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000003 00:00000000 00000000  1000        0 123456 1 0000000000000000 100 0 0 10 0
   1: 0100007F:1F90 0100007F:D431 01 00000000:00000000 00:00000000 00000000  1000        0 123457 1 0000000000000000 20 4 30 10 -1
   2: 0100007F:D431 0100007F:1F90 01 00000000:00000000 00:00000000 00000000  1000        0 123458 1 0000000000000000 20 4 30 10 -1
   3: 0A00020F:1F90 0A000001:C350 06 00000000:00000000 03:00001770 00000000     0        0 0 3 0000000000000000
   4: garbage line
";

    const TCP6: &str = "\
  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000000000000:1F90 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2222 1 0000000000000000 100 0 0 10 0
   1: 00000000000000000000000001000000:1F90 00000000000000000000000001000000:E0C2 01 00000000:00000000 00:00000000 00000000  1000        0 3333 1 0000000000000000 20 4 30 10 -1
   2: 0000000000000000FFFF00000100007F:1F90 0000000000000000FFFF00000100007F:E0C4 01 00000010:00000020 00:00000000 00000000  1000        0 4444 1 0000000000000000 20 4 30 10 -1
";

    const SNMP: &str = "\
Ip: Forwarding DefaultTTL InReceives
Ip: 1 64 12345
Icmp: InMsgs InErrors
Icmp: 45 0
Tcp: RtoAlgorithm RtoMin RtoMax MaxConn ActiveOpens PassiveOpens AttemptFails EstabResets CurrEstab
Tcp: 1 200 120000 -1 100 4242 3 7 12
Udp: InDatagrams NoPorts
Udp: 10 2
";

    #[test]
    fn parses_v4_rows() {
        let t = parse_tcp_table(TCP);
        assert_eq!(t.len(), 4);
        assert_eq!(t[0].local, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(t[0].state, TcpState::Listen);
        assert_eq!(t[0].rx_queue, 3);
        assert_eq!(t[0].inode, 123456);
        assert_eq!(t[1].remote, "127.0.0.1:54321".parse().unwrap());
        assert_eq!(t[1].state, TcpState::Established);
        assert_eq!(t[3].local, "15.2.0.10:8080".parse().unwrap());
        assert_eq!(t[3].state, TcpState::TimeWait);
    }

    #[test]
    fn parses_v6_rows() {
        let t = parse_tcp_table(TCP6);
        assert_eq!(t.len(), 3);
        assert_eq!(t[0].local, "[::]:8080".parse().unwrap());
        assert_eq!(t[1].local, "[::1]:8080".parse().unwrap());
        assert_eq!(t[1].remote, "[::1]:57538".parse().unwrap());
        assert_eq!(t[2].local, "[::ffff:127.0.0.1]:8080".parse().unwrap());
        assert_eq!(t[2].tx_queue, 0x10);
        assert_eq!(t[2].rx_queue, 0x20);
    }

    #[test]
    fn port_view_counts_only_the_local_port() {
        let mut t = parse_tcp_table(TCP);
        t.extend(parse_tcp_table(TCP6));
        let v = port_view(&t, 8080);
        assert!(v.listening);
        assert_eq!(v.accept_queue, 3);
        // v4 server side, v6 ::1 and the v4-mapped one; not the client side (local 54321)
        // and not TIME_WAIT.
        assert_eq!(v.established.len(), 3);
        let none = port_view(&t, 9999);
        assert_eq!(none, PortView::default());
    }

    #[test]
    fn parses_snmp() {
        let s = parse_snmp(SNMP);
        assert_eq!(s["Tcp"]["PassiveOpens"], 4242);
        assert_eq!(s["Tcp"]["MaxConn"], -1);
        assert_eq!(s["Udp"]["NoPorts"], 2);
        assert_eq!(passive_opens(&s), Some(4242));
    }

    #[test]
    fn snmp_mismatched_or_truncated() {
        let s = parse_snmp("Tcp: A B\nUdp: 1 2\nTcp: PassiveOpens\n");
        assert!(s.is_empty());
        assert_eq!(passive_opens(&s), None);
        let s = parse_snmp("Tcp: PassiveOpens X\nTcp: 5 notanumber\n");
        assert_eq!(s["Tcp"].len(), 1);
    }

    #[test]
    fn rejects_malformed_lines() {
        for l in [
            "",
            "0:",
            "   0: 0100007F:1F90",
            "   0: 0100007F:1F90 00000000:0000 ZZ 00000000:00000000 00:0 0 0 0 1",
            "   0: 0100007F 00000000:0000 0A 00000000:00000000 00:0 0 0 0 1",
            "   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:0 0 0 0",
            "   0: 01007F:1F90 00000000:0000 0A 00000000:00000000 00:0 0 0 0 1",
            "   0: 0100007F:FFFFF 00000000:0000 0A 00000000:00000000 00:0 0 0 0 1",
            "   0: ééééééééééééééééééééééééééééééé:1F90 00000000:0000 0A 0:0 00:0 0 0 0 1",
            "x: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:0 0 0 0 1",
        ] {
            assert_eq!(parse_tcp_line(l), None, "{l:?}");
        }
    }

    #[test]
    fn real_proc_files_parse_if_present() {
        // On Linux this reads the live tables; every data row must parse.
        for path in ["/proc/net/tcp", "/proc/net/tcp6"] {
            if let Ok(text) = std::fs::read_to_string(path) {
                let rows = text
                    .lines()
                    .skip(1)
                    .filter(|l| !l.trim().is_empty())
                    .count();
                assert_eq!(parse_tcp_table(&text).len(), rows, "{path}");
            }
        }
        if let Ok(text) = std::fs::read_to_string("/proc/net/snmp") {
            assert!(passive_opens(&parse_snmp(&text)).is_some());
        }
    }
}
