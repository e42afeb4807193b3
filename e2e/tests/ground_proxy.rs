//! The service proxy follows EndpointSlices like kube-proxy: new connections round robin over
//! ready endpoints, established connections stay with their backend when it starts
//! terminating, serving-and-terminating endpoints are the fallback when none is ready, and
//! `--propagation-delay` holds changes back. Against the real control plane, with pods on the
//! real node.
mod ground_common;

use std::collections::BTreeMap;
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use ground_common::*;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use serde_json::json;
use sluice_e2e::svc_proxy::{ProxyConfig, ServiceProxy};

fn echo_pod(name: &str, app: &str) -> serde_json::Value {
    json!({
        "metadata": {"name": name, "labels": {"app": app}},
        "spec": {
            "nodeName": NODE,
            "terminationGracePeriodSeconds": 30,
            "containers": [{
                "name": "echo",
                "image": "sluice/echo:v1",
                "args": ["--on-sigterm", "graceful"],
                "env": [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
                "ports": [{"name": "http", "containerPort": 8080}],
                "readinessProbe": {"httpGet": {"path": "/ready", "port": "http"}, "periodSeconds": 1},
                // Terminating pods keep serving for a while: room to observe the proxy.
                "lifecycle": {"preStop": {"sleep": {"seconds": 12}}},
            }],
        }
    })
}

async fn create_service(client: &kube::Client, ns: &str, app: &str) -> anyhow::Result<()> {
    let svc: Service = serde_json::from_value(json!({
        "metadata": {"name": app},
        "spec": {"selector": {"app": app}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]},
    }))?;
    Api::<Service>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &svc)
        .await?;
    Ok(())
}

/// A keep-alive HTTP/1.1 connection; `get` returns the answering pod.
struct KeepAlive {
    reader: BufReader<TcpStream>,
}

impl KeepAlive {
    fn open(addr: SocketAddr) -> anyhow::Result<Self> {
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        Ok(KeepAlive {
            reader: BufReader::new(s),
        })
    }

    fn get(&mut self) -> anyhow::Result<String> {
        self.reader
            .get_mut()
            .write_all(b"GET / HTTP/1.1\r\nhost: t\r\n\r\n")?;
        let mut pod = None;
        let mut len = 0usize;
        loop {
            let mut line = String::new();
            anyhow::ensure!(self.reader.read_line(&mut line)? > 0, "connection closed");
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                match k.to_ascii_lowercase().as_str() {
                    "x-pod-name" => pod = Some(v.trim().to_string()),
                    "content-length" => len = v.trim().parse()?,
                    _ => {}
                }
            }
        }
        let mut body = vec![0; len];
        self.reader.read_exact(&mut body)?;
        pod.ok_or_else(|| anyhow::anyhow!("no x-pod-name"))
    }
}

/// The pod that answers on a fresh connection.
fn fresh(addr: SocketAddr) -> anyhow::Result<String> {
    KeepAlive::open(addr)?.get()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_conntrack_and_terminating_fallback() -> anyhow::Result<()> {
    let (cluster, ns) = ground("ground-proxy").await?;
    let client = &cluster.client;
    let app = "echo-p";
    let proxy = ServiceProxy::start(
        client.clone(),
        ProxyConfig {
            namespace: Some(ns.name.clone()),
            salt: ns.name.clone(),
            ..Default::default()
        },
    )
    .await?;
    create_service(client, &ns.name, app).await?;
    for p in ["pa", "pb"] {
        create_pod(client, &ns.name, echo_pod(p, app)).await?;
    }
    let addr = proxy
        .wait_for_address(&format!("{}/{app}:80", ns.name), Duration::from_secs(20))
        .await?;
    let svc = format!("{}/{app}", ns.name);
    proxy
        .wait_endpoints(&svc, Duration::from_secs(40), |eps| {
            eps.iter().filter(|e| e.ready).count() == 2
        })
        .await?;

    // Round robin: new connections alternate between the two ready endpoints.
    let mut counts: BTreeMap<String, u32> = BTreeMap::new();
    for _ in 0..6 {
        *counts.entry(fresh(addr)?).or_default() += 1;
    }
    assert_eq!(counts.len(), 2, "{counts:?}");
    assert!(
        counts.values().all(|n| *n == 3),
        "not round robin: {counts:?}"
    );

    // Conntrack: a connection established to a pod stays with it once it terminates.
    let mut kept = KeepAlive::open(addr)?;
    let first = kept.get()?;
    let other = if first == "pa" { "pb" } else { "pa" };
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    pods.delete(&first, &DeleteParams::default()).await?;
    proxy
        .wait_endpoints(&svc, Duration::from_secs(10), |eps| {
            eps.iter()
                .any(|e| e.pod.as_deref() == Some(first.as_str()) && e.terminating && !e.ready)
        })
        .await?;
    for _ in 0..4 {
        assert_eq!(
            fresh(addr)?,
            other,
            "a new connection went to the terminating pod"
        );
    }
    assert_eq!(kept.get()?, first, "the established connection moved");

    // Every endpoint terminating: serving-and-terminating ones take new connections.
    pods.delete(other, &DeleteParams::default()).await?;
    proxy
        .wait_endpoints(&svc, Duration::from_secs(10), |eps| {
            !eps.is_empty() && eps.iter().all(|e| e.terminating && !e.ready)
        })
        .await?;
    let eps = proxy.applied_endpoints(&svc);
    assert!(
        eps.iter().any(|e| e.serving),
        "preStop keeps them serving: {eps:?}"
    );
    let answered = fresh(addr)?;
    assert!(answered == "pa" || answered == "pb");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn propagation_delay_holds_endpoint_changes_back() -> anyhow::Result<()> {
    let (cluster, ns) = ground("ground-delay").await?;
    let client = &cluster.client;
    let app = "echo-d";
    let delay = Duration::from_secs(3);
    let proxy = ServiceProxy::start(
        client.clone(),
        ProxyConfig {
            namespace: Some(ns.name.clone()),
            salt: ns.name.clone(),
            propagation_delay: delay,
            ..Default::default()
        },
    )
    .await?;
    create_service(client, &ns.name, app).await?;
    let addr = proxy
        .wait_for_address(&format!("{}/{app}:80", ns.name), Duration::from_secs(20))
        .await?;
    create_pod(client, &ns.name, echo_pod("pd", app)).await?;
    // When the API's EndpointSlice first shows the endpoint ready...
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), &ns.name);
    let lp = ListParams::default().labels(&format!("kubernetes.io/service-name={app}"));
    wait_for(
        Duration::from_secs(40),
        "the endpoint to be ready in the API",
        || {
            let slices = slices.clone();
            let lp = lp.clone();
            async move {
                let list = slices.list(&lp).await.ok()?;
                list.items
                    .iter()
                    .flat_map(|s| &s.endpoints)
                    .any(|e| e.conditions.as_ref().and_then(|c| c.ready) == Some(true))
                    .then_some(())
            }
        },
    )
    .await?;
    let seen_in_api = Instant::now();
    // ...the proxy still has nothing to send a connection to (it resets it)...
    assert!(
        proxy
            .applied_endpoints(&format!("{}/{app}", ns.name))
            .iter()
            .all(|e| !e.ready)
    );
    assert!(
        fresh(addr).is_err(),
        "the proxy used the endpoint before the delay"
    );
    // ...and it takes the delay to get there.
    proxy
        .wait_endpoints(
            &format!("{}/{app}", ns.name),
            Duration::from_secs(10),
            |eps| eps.iter().any(|e| e.ready),
        )
        .await?;
    let took = seen_in_api.elapsed();
    assert!(
        took >= delay - Duration::from_millis(400),
        "applied after {took:?}, delay is {delay:?}"
    );
    assert!(
        took < delay + Duration::from_secs(3),
        "applied after {took:?}"
    );
    assert_eq!(fresh(addr)?, "pd");
    Ok(())
}
