//! New upstream connections that pods accepted, read from a counter each pod exposes: its
//! agent's `sluice_agent_connections_accepted_total` (admin port), or, where no agent runs,
//! the echo app's own `sluice_echo_connections_total` (the connections that carried app
//! traffic, probes and scrapes left out). Behind a gateway the load balancer's upstream
//! connections are not the client's, so this is how the gateway scenarios measure the
//! storm at the new pods.
use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::{Api, ListParams};

/// The agent's admin port and its counter of accepted connections.
pub const AGENT_ADMIN_PORT: u16 = 9901;
pub const AGENT_ACCEPTED: &str = "sluice_agent_connections_accepted_total";
/// The echo app's counter of connections that carried app traffic (on the app's port).
pub const ECHO_CONNECTIONS: &str = "sluice_echo_connections_total";

/// The counter `metric` of every pod matching `selector` that has an IP, read from
/// `http://<pod IP>:<port>/metrics` (the host reaches pod IPs through the node's bridge),
/// all pods at once; pods that do not answer within a second are left out.
pub async fn pod_counters(
    pods: &Api<Pod>,
    selector: &str,
    port: u16,
    metric: &str,
) -> BTreeMap<String, f64> {
    let Ok(list) = pods.list(&ListParams::default().labels(selector)).await else {
        return BTreeMap::new();
    };
    let prefix = format!("{metric} ");
    let reads = list.items.iter().filter_map(|p| {
        let ip = p.status.as_ref()?.pod_ip.clone()?;
        let (name, prefix) = (p.name_any(), &prefix);
        Some(async move {
            let text = http_get(&format!("{ip}:{port}"), "/metrics").await?;
            let v = text
                .lines()
                .find_map(|l| l.strip_prefix(prefix.as_str()))
                .and_then(|v| v.trim().parse().ok())?;
            Some((name, v))
        })
    });
    futures::future::join_all(reads)
        .await
        .into_iter()
        .flatten()
        .collect()
}

/// A plain HTTP/1.1 GET with a one-second budget; the body.
async fn http_get(addr: &str, path: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: metrics\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .ok()?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.ok()?;
        let text = String::from_utf8_lossy(&buf).to_string();
        text.split_once("\r\n\r\n").map(|(_, b)| b.to_string())
    };
    tokio::time::timeout(Duration::from_secs(1), fut)
        .await
        .ok()?
}

/// Peak new connections per second that the pods `is_new` picks accepted together, from
/// counters sampled every half second (`(ms, pod → value)`, in time order), over samples
/// taken in `[from_ms, to_ms]`: each sample against the one about a second earlier. A
/// pod's earlier value is the last one read at or before that sample; a pod not read by
/// then counts from 0 (a new pod's counter starts there), so a scrape that failed once
/// never shows as a burst.
pub fn peak_rate(
    samples: &[(f64, BTreeMap<String, f64>)],
    is_new: impl Fn(&str) -> bool,
    from_ms: f64,
    to_ms: f64,
) -> f64 {
    let mut peak: f64 = 0.0;
    for (i, (t, now)) in samples.iter().enumerate() {
        if *t < from_ms || *t > to_ms {
            continue;
        }
        let Some(j) = samples[..i].iter().rposition(|(t0, _)| t - t0 >= 1000.0) else {
            continue;
        };
        let t0 = samples[j].0;
        let gained: f64 = now
            .iter()
            .filter(|(pod, _)| is_new(pod))
            .map(|(pod, v)| {
                let before = samples[..=j]
                    .iter()
                    .rev()
                    .find_map(|(_, m)| m.get(pod))
                    .copied()
                    .unwrap_or(0.0);
                (v - before).max(0.0)
            })
            .sum();
        peak = peak.max(gained * 1000.0 / (t - t0));
    }
    peak
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peak_rate_counts_a_pod_from_its_last_reading_or_from_zero() {
        let s = |t: f64, pods: &[(&str, f64)]| {
            (
                t,
                pods.iter()
                    .map(|(p, v)| (p.to_string(), *v))
                    .collect::<BTreeMap<_, _>>(),
            )
        };
        let samples = vec![
            s(0.0, &[("old-a", 100.0)]),
            s(500.0, &[("old-a", 100.0), ("new-a", 0.0)]),
            s(1000.0, &[("old-a", 150.0), ("new-a", 4.0)]),
            // new-a's scrape failed here; new-b first read with 3 connections.
            s(1500.0, &[("old-a", 150.0), ("new-b", 3.0)]),
            s(2500.0, &[("new-a", 6.0), ("new-b", 3.0)]),
        ];
        let new = |p: &str| p.starts_with("new-");
        // 1000 vs 0: new-a 4 (from 0). 1500 vs 500: new-b 3. 2500 vs 1500: new-a 6 − 4 = 2.
        assert_eq!(peak_rate(&samples, new, 0.0, 10_000.0), 4.0);
        assert_eq!(peak_rate(&samples, new, 1200.0, 10_000.0), 3.0);
        assert_eq!(peak_rate(&samples, new, 2000.0, 10_000.0), 2.0);
    }
}
