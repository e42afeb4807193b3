//! A running proxy: Services and EndpointSlices followed through reflectors, a listener
//! per service port, endpoint changes applied after the propagation delay, and the
//! address map published (and written to `services.json` for the daemon).
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::datapath::serve;
use super::endpoints::{Endpoint, EndpointTable, derive_address, endpoints_of};

/// How the proxy runs.
#[derive(Clone, Debug, Default)]
pub struct ProxyConfig {
    /// Delay before an EndpointSlice change takes effect.
    pub propagation_delay: Duration,
    /// Only Services of this namespace (all when `None`).
    pub namespace: Option<String>,
    /// Mixed into address derivation so several proxies can serve the same Service.
    pub salt: String,
    /// Where to write the address map (`services.json`).
    pub out: Option<PathBuf>,
}

struct Listener {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

/// A running service proxy; stops when dropped.
pub struct ServiceProxy {
    addresses: watch::Receiver<BTreeMap<String, SocketAddr>>,
    applied: EndpointTable,
    applied_changed: watch::Receiver<u64>,
    task: JoinHandle<()>,
}

impl Drop for ServiceProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ServiceProxy {
    pub async fn start(client: Client, cfg: ProxyConfig) -> anyhow::Result<Self> {
        let (svc_api, eps_api): (Api<Service>, Api<EndpointSlice>) = match &cfg.namespace {
            Some(ns) => (
                Api::namespaced(client.clone(), ns),
                Api::namespaced(client.clone(), ns),
            ),
            None => (Api::all(client.clone()), Api::all(client.clone())),
        };
        let (addr_tx, addresses) = watch::channel(BTreeMap::new());
        let (applied_tx, applied_changed) = watch::channel(0u64);
        let applied: EndpointTable = Arc::default();
        let mut persisted = BTreeMap::new();
        if let Some(out) = &cfg.out
            && let Ok(text) = std::fs::read_to_string(out)
        {
            persisted = serde_json::from_str::<BTreeMap<String, String>>(&text).unwrap_or_default();
        }
        let runtime = Runtime {
            cfg,
            listeners: HashMap::new(),
            service_ips: HashMap::new(),
            persisted,
            computed: HashMap::new(),
            applied: applied.clone(),
            addr_tx,
        };
        let task = tokio::spawn(runtime.run(svc_api, eps_api, applied_tx));
        Ok(ServiceProxy {
            addresses,
            applied,
            applied_changed,
            task,
        })
    }

    /// The current address map, `ns/svc:port` → loopback address.
    pub fn addresses(&self) -> BTreeMap<String, SocketAddr> {
        self.addresses.borrow().clone()
    }

    /// Waits until `key` (`ns/svc:port`) has an address.
    pub async fn wait_for_address(
        &self,
        key: &str,
        timeout: Duration,
    ) -> anyhow::Result<SocketAddr> {
        let mut rx = self.addresses.clone();
        let fut = async {
            loop {
                if let Some(a) = rx.borrow_and_update().get(key) {
                    return Ok(*a);
                }
                rx.changed().await.context("service proxy stopped")?;
            }
        };
        tokio::time::timeout(timeout, fut)
            .await
            .with_context(|| format!("no address for {key} after {timeout:?}"))?
    }

    /// The endpoints currently in effect (after the propagation delay) for `ns/svc`.
    pub fn applied_endpoints(&self, service: &str) -> Vec<Endpoint> {
        self.applied
            .read()
            .expect("poisoned")
            .get(service)
            .cloned()
            .unwrap_or_default()
    }

    /// Waits until the endpoints in effect for `ns/svc` satisfy `pred`.
    pub async fn wait_endpoints(
        &self,
        service: &str,
        timeout: Duration,
        pred: impl Fn(&[Endpoint]) -> bool,
    ) -> anyhow::Result<Vec<Endpoint>> {
        let mut rx = self.applied_changed.clone();
        let fut = async {
            loop {
                rx.borrow_and_update();
                let eps = self.applied_endpoints(service);
                if pred(&eps) {
                    return Ok(eps);
                }
                rx.changed().await.context("service proxy stopped")?;
            }
        };
        tokio::time::timeout(timeout, fut).await.with_context(|| {
            format!("endpoints of {service} did not reach the expected state within {timeout:?}")
        })?
    }
}

struct Runtime {
    cfg: ProxyConfig,
    /// `ns/svc:port` → listener.
    listeners: HashMap<String, Listener>,
    /// `ns/svc` → loopback address.
    service_ips: HashMap<String, Ipv4Addr>,
    persisted: BTreeMap<String, String>,
    /// Endpoints last computed from the slices (not yet necessarily applied).
    computed: HashMap<String, Vec<Endpoint>>,
    applied: EndpointTable,
    addr_tx: watch::Sender<BTreeMap<String, SocketAddr>>,
}

enum Change {
    Services,
    Slices,
}

impl Runtime {
    async fn run(
        mut self,
        svc_api: Api<Service>,
        eps_api: Api<EndpointSlice>,
        applied_tx: watch::Sender<u64>,
    ) {
        let (svc_store, svc_writer) = reflector::store();
        let (eps_store, eps_writer) = reflector::store();
        let svc_stream =
            reflector::reflector(svc_writer, watcher(svc_api, watcher::Config::default()))
                .default_backoff()
                .map(|_| Change::Services)
                .boxed();
        let eps_stream = reflector::reflector(
            eps_writer,
            watcher(
                eps_api,
                watcher::Config::default().labels("kubernetes.io/service-name"),
            ),
        )
        .default_backoff()
        .map(|_| Change::Slices)
        .boxed();
        let mut changes = futures::stream::select(svc_stream, eps_stream);
        // Endpoint changes wait in this queue for the propagation delay; the delay is
        // constant, so first in is first due.
        let (delay_tx, mut delay_rx) =
            mpsc::unbounded_channel::<(Instant, String, Vec<Endpoint>)>();
        let applied = self.applied.clone();
        let applier = tokio::spawn(async move {
            let mut version = 0u64;
            while let Some((due, key, eps)) = delay_rx.recv().await {
                tokio::time::sleep_until(due).await;
                tracing::debug!(service = %key, endpoints = eps.len(), "applying endpoints");
                applied.write().expect("poisoned").insert(key, eps);
                version += 1;
                let _ = applied_tx.send(version);
            }
        });
        while let Some(change) = changes.next().await {
            match change {
                Change::Services => self.sync_services(&svc_store).await,
                Change::Slices => {}
            }
            self.sync_endpoints(&svc_store, &eps_store, &delay_tx);
        }
        applier.abort();
    }

    async fn sync_services(&mut self, store: &Store<Service>) {
        let mut wanted: HashMap<String, (String, String, u16)> = HashMap::new(); // listener key → (svc key, port name, port)
        for svc in store.state() {
            let Some(spec) = svc.spec.as_ref() else {
                continue;
            };
            let cluster_ip = spec.cluster_ip.as_deref().unwrap_or("");
            if cluster_ip.is_empty()
                || cluster_ip == "None"
                || spec.type_.as_deref() == Some("ExternalName")
            {
                continue;
            }
            let svc_key = format!("{}/{}", svc.namespace().unwrap_or_default(), svc.name_any());
            for p in spec.ports.iter().flatten() {
                if p.protocol.as_deref().unwrap_or("TCP") != "TCP" {
                    continue;
                }
                let Ok(port) = u16::try_from(p.port) else {
                    continue;
                };
                wanted.insert(
                    format!("{svc_key}:{port}"),
                    (svc_key.clone(), p.name.clone().unwrap_or_default(), port),
                );
            }
        }
        self.listeners.retain(|key, l| {
            let keep = wanted.contains_key(key);
            if !keep {
                tracing::info!(%key, addr = %l.addr, "service port gone; closing listener");
                l.task.abort();
            }
            keep
        });
        let live_services: HashSet<&String> = wanted.values().map(|(s, _, _)| s).collect();
        self.service_ips.retain(|k, _| live_services.contains(k));
        let mut keys: Vec<_> = wanted.keys().cloned().collect();
        keys.sort();
        for key in keys {
            if self.listeners.contains_key(&key) {
                continue;
            }
            let (svc_key, port_name, port) = wanted[&key].clone();
            let ip = self.address_for(&svc_key, &key);
            let addr = SocketAddr::from((ip, port));
            match TcpListener::bind(addr).await {
                Ok(listener) => {
                    tracing::info!(%key, %addr, "serving service port");
                    let task =
                        tokio::spawn(serve(listener, svc_key, port_name, self.applied.clone()));
                    self.listeners.insert(key, Listener { addr, task });
                }
                Err(e) => tracing::error!(%key, %addr, "cannot listen: {e}"),
            }
        }
        let map: BTreeMap<String, SocketAddr> = self
            .listeners
            .iter()
            .map(|(k, l)| (k.clone(), l.addr))
            .collect();
        if let Some(out) = &self.cfg.out
            && let Err(e) = write_atomically(out, &map)
        {
            tracing::error!("writing {}: {e:#}", out.display());
        }
        self.addr_tx.send_replace(map);
    }

    fn address_for(&mut self, svc_key: &str, listener_key: &str) -> Ipv4Addr {
        if let Some(ip) = self.service_ips.get(svc_key) {
            return *ip;
        }
        let taken: HashSet<Ipv4Addr> = self.service_ips.values().copied().collect();
        let remembered = self
            .persisted
            .get(listener_key)
            .and_then(|a| a.parse::<SocketAddr>().ok())
            .and_then(|a| match a.ip() {
                std::net::IpAddr::V4(ip) if !taken.contains(&ip) => Some(ip),
                _ => None,
            });
        let ip = remembered.unwrap_or_else(|| {
            (0..)
                .map(|attempt| derive_address(&self.cfg.salt, svc_key, attempt))
                .find(|ip| !taken.contains(ip))
                .expect("the address space is far larger than the number of services")
        });
        self.service_ips.insert(svc_key.to_string(), ip);
        ip
    }

    fn sync_endpoints(
        &mut self,
        svc_store: &Store<Service>,
        eps_store: &Store<EndpointSlice>,
        delay_tx: &mpsc::UnboundedSender<(Instant, String, Vec<Endpoint>)>,
    ) {
        let mut by_service: HashMap<String, Vec<Arc<EndpointSlice>>> = HashMap::new();
        for slice in eps_store.state() {
            let Some(svc) = slice.labels().get("kubernetes.io/service-name") else {
                continue;
            };
            let key = format!("{}/{}", slice.namespace().unwrap_or_default(), svc);
            by_service.entry(key).or_default().push(slice);
        }
        let mut services: HashSet<String> = svc_store
            .state()
            .iter()
            .map(|s| format!("{}/{}", s.namespace().unwrap_or_default(), s.name_any()))
            .collect();
        services.extend(by_service.keys().cloned());
        services.extend(self.computed.keys().cloned());
        let due = Instant::now() + self.cfg.propagation_delay;
        for key in services {
            let eps = by_service
                .get(&key)
                .map(|slices| endpoints_of(slices.iter().map(|s| s.as_ref())))
                .unwrap_or_default();
            if self.computed.get(&key) != Some(&eps) {
                tracing::debug!(service = %key, endpoints = eps.len(), "endpoints changed");
                self.computed.insert(key.clone(), eps.clone());
                let _ = delay_tx.send((due, key, eps));
            }
        }
    }
}
/// Writes `map` as JSON to `path` through a temporary file and a rename, so readers never
/// see half a file.
pub fn write_atomically(path: &Path, map: &BTreeMap<String, SocketAddr>) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let text: BTreeMap<&String, String> = map.iter().map(|(k, v)| (k, v.to_string())).collect();
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_string_pretty(&text)?)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}
