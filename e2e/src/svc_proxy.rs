//! The service proxy: kube-proxy's data-path semantics on loopback.
//!
//! Every Service with a cluster IP gets a stable loopback address (`127.x.y.z`, derived from
//! its name) and a listener per port. Each *new* TCP connection goes to a ready endpoint of
//! the Service's EndpointSlices (round robin); when no endpoint is ready it falls back to
//! endpoints that are serving and terminating (kube-proxy's ProxyTerminatingEndpoints). An
//! established connection stays with its backend whatever the EndpointSlices say later, as
//! conntrack keeps it. `--propagation-delay` applies every EndpointSlice change only after a
//! delay, reproducing load balancers that learn about endpoint changes late.
//!
//! The daemon (`sluice-e2e svc-proxy`) serves every namespace and writes the address map to
//! `services.json`; scenarios start their own [`ServiceProxy`] in-process with their own
//! delay for their own namespace.
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context as _;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

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

type EndpointTable = Arc<RwLock<HashMap<String, Vec<Endpoint>>>>;

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

/// Accepts connections for one service port and forwards each to a backend chosen when it
/// arrives; the connection then stays with that backend.
async fn serve(listener: TcpListener, svc_key: String, port_name: String, applied: EndpointTable) {
    let rr = Arc::new(AtomicUsize::new(0));
    loop {
        let (client, _) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(service = %svc_key, "accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let backend = {
            let table = applied.read().expect("poisoned");
            let eps = table.get(&svc_key).map(Vec::as_slice).unwrap_or(&[]);
            pick(eps, &port_name, rr.fetch_add(1, Ordering::Relaxed))
        };
        tokio::spawn(forward(client, backend, svc_key.clone()));
    }
}

/// How long a backend connect may take. A SYN to a vanished pod hits the blackhole route and
/// is never answered; like a client behind kube-proxy, the caller then waits for its own timeout.
const BACKEND_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

async fn forward(mut client: TcpStream, backend: Option<SocketAddr>, svc_key: String) {
    let _ = client.set_nodelay(true);
    let Some(backend) = backend else {
        // kube-proxy rejects connections to a Service without endpoints; a reset is the
        // closest a userspace proxy can get after having accepted.
        tracing::debug!(service = %svc_key, "no endpoint; resetting connection");
        let _ = client.set_zero_linger();
        return;
    };
    let mut upstream =
        match tokio::time::timeout(BACKEND_CONNECT_TIMEOUT, TcpStream::connect(backend)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                tracing::debug!(service = %svc_key, %backend, "backend connect failed: {e}");
                let _ = client.set_zero_linger();
                return;
            }
            Err(_) => {
                let _ = client.set_zero_linger();
                return;
            }
        };
    let _ = upstream.set_nodelay(true);
    if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        // Pass a reset on: the client must see the connection break, not a polite close.
        tracing::debug!(service = %svc_key, %backend, "connection broke: {e}");
        let _ = client.set_zero_linger();
        let _ = upstream.set_zero_linger();
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

/// `sluice-e2e svc-proxy`: the service proxy daemon.
#[derive(clap::Args, Debug)]
pub struct SvcProxyArgs {
    #[arg(long, default_value = "target/e2e/kubeconfig")]
    pub kubeconfig: PathBuf,
    /// Where to write the address map.
    #[arg(long, default_value = "target/e2e/services.json")]
    pub out: PathBuf,
    /// Apply EndpointSlice changes only after this delay (e.g. `5s`).
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    pub propagation_delay: Duration,
    /// Serve only this namespace.
    #[arg(long)]
    pub namespace: Option<String>,
}

pub async fn run(args: SvcProxyArgs) -> anyhow::Result<()> {
    let client = crate::cluster::client_for(&args.kubeconfig).await?;
    let _proxy = ServiceProxy::start(
        client,
        ProxyConfig {
            propagation_delay: args.propagation_delay,
            namespace: args.namespace,
            salt: String::new(),
            out: Some(args.out.clone()),
        },
    )
    .await?;
    tracing::info!(out = %args.out.display(), delay = ?args.propagation_delay, "service proxy running");
    shutdown_signal().await;
    Ok(())
}

/// Resolves when the process gets SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("installing a SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::discovery::v1::{
        Endpoint as K8sEndpoint, EndpointConditions, EndpointPort,
    };

    fn ep(ip: [u8; 4], ready: bool, serving: bool, terminating: bool) -> Endpoint {
        Endpoint {
            ip: Ipv4Addr::from(ip),
            ports: BTreeMap::from([("http".to_string(), 8080)]),
            ready,
            serving,
            terminating,
            pod: None,
        }
    }

    #[test]
    fn picks_ready_endpoints_round_robin() {
        let eps = vec![
            ep([10, 245, 0, 2], true, true, false),
            ep([10, 245, 0, 3], false, true, true),
            ep([10, 245, 0, 4], true, true, false),
        ];
        let picked: Vec<_> = (0..4).map(|i| pick(&eps, "http", i).unwrap()).collect();
        assert_eq!(picked[0], "10.245.0.2:8080".parse().unwrap());
        assert_eq!(picked[1], "10.245.0.4:8080".parse().unwrap());
        assert_eq!(picked[2], picked[0]);
        assert_eq!(picked[3], picked[1]);
    }

    #[test]
    fn falls_back_to_serving_terminating_only_when_none_ready() {
        let eps = vec![
            ep([10, 245, 0, 3], false, true, true),
            ep([10, 245, 0, 5], false, false, true),
            ep([10, 245, 0, 6], false, false, false),
        ];
        for i in 0..5 {
            assert_eq!(
                pick(&eps, "http", i),
                Some("10.245.0.3:8080".parse().unwrap())
            );
        }
        let none_serving = vec![ep([10, 245, 0, 5], false, false, true)];
        assert_eq!(pick(&none_serving, "http", 0), None);
        assert_eq!(pick(&[], "http", 0), None);
        // An endpoint without the port is never picked.
        assert_eq!(
            pick(&[ep([10, 245, 0, 2], true, true, false)], "grpc", 0),
            None
        );
    }

    #[test]
    fn slice_conditions_follow_api_defaults() {
        let slice = EndpointSlice {
            address_type: "IPv4".into(),
            endpoints: vec![
                K8sEndpoint {
                    addresses: vec!["10.245.0.2".into()],
                    conditions: None,
                    ..Default::default()
                },
                K8sEndpoint {
                    addresses: vec!["10.245.0.3".into()],
                    conditions: Some(EndpointConditions {
                        ready: Some(false),
                        serving: None,
                        terminating: Some(true),
                    }),
                    ..Default::default()
                },
            ],
            ports: Some(vec![EndpointPort {
                name: Some("http".into()),
                port: Some(8080),
                ..Default::default()
            }]),
            ..Default::default()
        };
        let eps = endpoints_of([&slice]);
        assert_eq!(eps.len(), 2);
        assert!(eps[0].ready && eps[0].serving && !eps[0].terminating);
        assert!(!eps[1].ready && !eps[1].serving && eps[1].terminating);
        assert_eq!(eps[0].ports["http"], 8080);
        let v6 = EndpointSlice {
            address_type: "IPv6".into(),
            ..slice.clone()
        };
        assert!(endpoints_of([&v6]).is_empty());
    }

    #[test]
    fn addresses_are_stable_loopback_outside_127_0() {
        let a = derive_address("", "default/echo", 0);
        assert_eq!(a, derive_address("", "default/echo", 0));
        assert_ne!(a, derive_address("", "default/echo", 1));
        assert_ne!(a, derive_address("scenario", "default/echo", 0));
        for i in 0..1000 {
            let ip = derive_address("", &format!("ns/svc-{i}"), 0);
            let o = ip.octets();
            assert_eq!(o[0], 127);
            assert_ne!(o[1], 0);
            assert!(o[3] != 0 && o[3] != 255);
        }
    }

    #[test]
    fn address_map_is_written_atomically() {
        let dir =
            std::env::temp_dir().join(format!("sluice-svc-proxy-test-{}", std::process::id()));
        let path = dir.join("services.json");
        let map = BTreeMap::from([("ns/echo:80".to_string(), "127.1.2.3:80".parse().unwrap())]);
        write_atomically(&path, &map).unwrap();
        let back: BTreeMap<String, String> =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(back["ns/echo:80"], "127.1.2.3:80");
        assert!(!path.with_extension("json.tmp").exists());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
