//! Endpoints as the proxy sees them (pure): the EndpointSlices read by the API's rules,
//! the backend a new connection gets, and each Service's stable loopback address.
use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, RwLock};

use k8s_openapi::api::discovery::v1::EndpointSlice;

/// One endpoint as the proxy sees it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Endpoint {
    pub ip: Ipv4Addr,
    /// Port name → port number, from the slice's ports.
    pub ports: BTreeMap<String, u16>,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    /// The pod behind it, when the slice names one.
    pub pod: Option<String>,
}

/// Chooses the backend for a new connection: ready endpoints first; when none is ready,
/// serving-and-terminating ones (ProxyTerminatingEndpoints). Pure, so it is unit-tested.
pub fn pick(endpoints: &[Endpoint], port_name: &str, round_robin: usize) -> Option<SocketAddr> {
    let with_port = |e: &&Endpoint| e.ports.contains_key(port_name);
    let mut candidates: Vec<&Endpoint> = endpoints
        .iter()
        .filter(with_port)
        .filter(|e| e.ready)
        .collect();
    if candidates.is_empty() {
        candidates = endpoints
            .iter()
            .filter(with_port)
            .filter(|e| e.serving && e.terminating)
            .collect();
    }
    if candidates.is_empty() {
        return None;
    }
    let e = candidates[round_robin % candidates.len()];
    Some(SocketAddr::from((e.ip, e.ports[port_name])))
}

/// Endpoints of one Service from its EndpointSlices (IPv4 only), sorted and de-duplicated.
/// Pure, so it is unit-tested. Nil conditions follow the API's rules: `ready` nil means
/// ready, `serving` nil means the same as `ready`, `terminating` nil means not terminating.
pub fn endpoints_of<'a>(slices: impl IntoIterator<Item = &'a EndpointSlice>) -> Vec<Endpoint> {
    let mut out = Vec::new();
    for slice in slices {
        if slice.address_type != "IPv4" {
            continue;
        }
        let ports: BTreeMap<String, u16> = slice
            .ports
            .iter()
            .flatten()
            .filter_map(|p| {
                Some((
                    p.name.clone().unwrap_or_default(),
                    u16::try_from(p.port?).ok()?,
                ))
            })
            .collect();
        for ep in &slice.endpoints {
            let cond = ep.conditions.as_ref();
            let ready = cond.and_then(|c| c.ready).unwrap_or(true);
            let serving = cond.and_then(|c| c.serving).unwrap_or(ready);
            let terminating = cond.and_then(|c| c.terminating).unwrap_or(false);
            let pod = ep
                .target_ref
                .as_ref()
                .filter(|r| r.kind.as_deref() == Some("Pod"))
                .and_then(|r| r.name.clone());
            for a in &ep.addresses {
                if let Ok(ip) = a.parse::<Ipv4Addr>() {
                    out.push(Endpoint {
                        ip,
                        ports: ports.clone(),
                        ready,
                        serving,
                        terminating,
                        pod: pod.clone(),
                    });
                }
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

/// FNV-1a, stable across builds and platforms (std's hasher is not).
fn fnv1a(data: &[u8]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in data {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

/// The loopback address for a Service, derived from `salt` and its key; `attempt` > 0
/// resolves collisions. Never inside 127.0.0.0/16 (where other local daemons listen).
pub fn derive_address(salt: &str, key: &str, attempt: u32) -> Ipv4Addr {
    let h = fnv1a(format!("{salt}|{key}|{attempt}").as_bytes());
    let a = 1 + (h % 254) as u8; // 1..=254
    let b = (h >> 8) as u8;
    let c = 1 + ((h >> 16) % 254) as u8; // 1..=254
    Ipv4Addr::new(127, a, b, c)
}

/// The endpoints in effect (after the propagation delay), by `ns/svc`.
pub(super) type EndpointTable = Arc<RwLock<HashMap<String, Vec<Endpoint>>>>;
