//! Fuzz targets: every parser of Sluice that takes untrusted input, as a function of bytes
//! that must never panic and that asserts what must hold of its result.
//!
//! Who writes the input: any client of the agent (request headers), the kernel (procfs),
//! whoever writes a Release or the agent's flags (durations), any tenant's pod (the
//! agent `/metrics` text the operator scrapes, the gang-request annotation on its pods),
//! whoever labels and annotates nodes (the GPU topology annotation).
//!
//! Two drivers run the same functions: `tests/brief.rs` (stable, in `make test`: the
//! seeds under `seeds/` and a bounded number of mutations of them) and the cargo-fuzz
//! project in `cargo-fuzz/` (libFuzzer, nightly, `make fuzz`, as long as you like).

pub mod mutate;

use http::header::{HeaderMap, HeaderName, HeaderValue};
use sluice_placement::{
    Fleet, GangRequest, GpuTopology, LABEL_RACK, LABEL_ZONE, NodeSpec, Placer, TopologyConfig,
    WorkloadProfile,
};

/// A fuzz target: bytes in, a panic on a defect.
pub type Target = fn(&[u8]);

/// Every target by name (the names of `seeds/<name>/` and of the cargo-fuzz binaries).
pub const TARGETS: &[(&str, Target)] = &[
    ("agent_headers", agent_headers),
    ("agent_procfs", agent_procfs),
    ("agent_duration", agent_duration),
    ("operator_duration", operator_duration),
    ("agent_metrics", agent_metrics),
    ("gang_request", gang_request),
    ("gpu_topology", gpu_topology),
];

/// The agent's own handling of untrusted request headers (hop-by-hop stripping, `TE:
/// trailers`, upgrade detection): what it forwards carries no hop-by-hop header but
/// `TE: trailers`. One header per line, `name:value`.
pub fn agent_headers(data: &[u8]) {
    use sluice_agent::proxy_http::{
        requested_upgrade, strip_hop_by_hop, strip_hop_by_hop_keep_te_trailers,
    };
    let mut h = HeaderMap::new();
    for line in data.split(|b| *b == b'\n') {
        let Some(i) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(&line[..i]),
            HeaderValue::from_bytes(&line[i + 1..]),
        ) {
            h.append(n, v);
        }
    }
    let _ = requested_upgrade(&h);
    let mut req = h.clone();
    strip_hop_by_hop_keep_te_trailers(&mut req);
    for n in [
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "upgrade",
    ] {
        assert!(!req.contains_key(n), "{n} forwarded");
    }
    if let Some(te) = req.get("te") {
        assert_eq!(te, "trailers");
    }
    let mut resp = h;
    strip_hop_by_hop(&mut resp);
    assert!(!resp.contains_key("te") && !resp.contains_key("connection"));
}

/// The agent's `/proc/net/tcp*` and `/proc/net/snmp` parsers: what they return is
/// consistent with the input.
pub fn agent_procfs(data: &[u8]) {
    use sluice_agent::procfs::{
        parse_snmp, parse_tcp_line, parse_tcp_table, passive_opens, port_view,
    };
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let table = parse_tcp_table(text);
    assert!(table.len() <= text.lines().count());
    for line in text.lines() {
        let _ = parse_tcp_line(line);
    }
    if let Some(first) = table.first() {
        let view = port_view(&table, first.local.port());
        assert!(view.established.len() <= table.len());
    }
    let _ = passive_opens(&parse_snmp(text));
}

/// The agent's duration flags (`500ms`, `2s`, `1m`).
pub fn agent_duration(data: &[u8]) {
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = sluice_agent::config::parse_duration(s);
    }
}

/// The Release's durations (`500ms`, `1h30m`): whatever parses formats back to a string
/// that parses to the same duration (the operator renders them into the agent's flags).
pub fn operator_duration(data: &[u8]) {
    use sluice_contract::duration::{format_duration, parse_duration};
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(d) = parse_duration(s) {
        let again = format_duration(d);
        assert_eq!(
            parse_duration(&again),
            Ok(d),
            "{s:?} formatted as {again:?}"
        );
        let agent = sluice_agent::config::parse_duration(&again)
            .unwrap_or_else(|e| panic!("the agent refuses {again:?}: {e}"));
        assert_eq!(agent, d, "{again:?}");
    }
}

/// The operator's parser of an agent's `/metrics` (any tenant's pod writes it): every
/// value it keeps is a finite, non-negative count, so nothing NaN or infinite reaches
/// the release gates.
pub fn agent_metrics(data: &[u8]) {
    use sluice_contract::{metrics::MAX_SAMPLE_VALUE, parse_agent_metrics};
    let text = String::from_utf8_lossy(data);
    let s = parse_agent_metrics(&text, 1.0);
    let lines = text.lines().count() as f64;
    let sane = |name: &str, v: f64| {
        assert!(
            v.is_finite() && v >= 0.0 && v <= lines * MAX_SAMPLE_VALUE,
            "{name} = {v}"
        );
    };
    sane("connections_accepted", s.connections_accepted);
    sane("connections_active", s.connections_active);
    sane("connections_closed", s.connections_closed);
    sane("requests", s.requests);
    sane("errors", s.errors);
    sane("drain_refused", s.drain_refused);
    assert!(
        s.errors <= s.requests,
        "{} errors of {}",
        s.errors,
        s.requests
    );
    if let Some(p) = s.drain_phase {
        sane("drain_phase", p);
    }
    for w in s.latency_buckets.windows(2) {
        assert!(w[0].0 < w[1].0, "buckets out of order: {w:?}");
    }
    for (le, count) in &s.latency_buckets {
        assert!(!le.is_nan(), "NaN bound");
        sane("bucket", *count);
    }
}

/// A small fleet of two racks of 8-GPU nodes, the shape the placement targets place on.
fn small_fleet(topology: Option<&GpuTopology>) -> Fleet {
    let mut fleet = Fleet::new(TopologyConfig::default());
    for i in 0..4 {
        let mut node = NodeSpec::new(format!("n{i}"), "NVIDIA-H100-80GB-HBM3", 8)
            .label(LABEL_ZONE, "z1")
            .label(LABEL_RACK, &format!("r{}", i / 2))
            .resources(64_000, 512 * 1024);
        if let Some(t) = topology {
            node = node.topology(t);
        }
        // A topology that does not fit the node is refused here, as the controller does.
        if fleet.add_node(node).is_err() {
            return small_fleet(None);
        }
    }
    fleet
}

/// The `sluice.dev/gang-request` annotation on an InferenceSet's pods (JSON): what parses
/// is placed without a panic, and a placement never uses more GPUs than the fleet has.
pub fn gang_request(data: &[u8]) {
    let Ok(req) = serde_json::from_slice::<GangRequest>(data) else {
        return;
    };
    let fleet = small_fleet(None);
    let mut placer = Placer::new(WorkloadProfile::default());
    if let Ok(p) = placer.place(&fleet, &req) {
        assert_eq!(p.pods.len() as u64, u64::from(req.pods), "{req:?}");
        let mut milli = 0u64;
        for pod in &p.pods {
            let free = fleet
                .free_milli(&pod.node)
                .unwrap_or_else(|e| panic!("placed on {}: {e}", pod.node));
            for g in &pod.gpus {
                assert!((*g as usize) < free.len(), "GPU {g} of {}", pod.node);
            }
            milli += pod.gpus.len() as u64 * u64::from(pod.milli_per_gpu);
        }
        assert!(
            milli <= fleet.total_gpus() * 1000,
            "{milli} milli-GPUs placed"
        );
    }
    let _ = placer.spread_floor(&fleet, &req);
}

/// The `sluice.dev/gpu-topology` node annotation (JSON): groups are validated against
/// every GPU count without a panic, and a fleet with the topology still places a gang.
pub fn gpu_topology(data: &[u8]) {
    let Ok(topology) = std::str::from_utf8(data).map(GpuTopology::parse) else {
        return;
    };
    let Ok(topology) = topology else {
        return;
    };
    for count in 0..=16 {
        if let Ok(groups) = topology.group_of(count) {
            assert_eq!(groups.len(), count);
        }
    }
    let fleet = small_fleet(Some(&topology));
    let mut placer = Placer::new(WorkloadProfile::default());
    let _ = placer.place(&fleet, &GangRequest::gpus(2, 4));
}
