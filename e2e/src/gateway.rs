//! A real Gateway API implementation for e2e tests: Traefik (v3.6, built from the pinned
//! wrapper module `e2e/cluster/traefik` by `e2e/cluster/build.sh traefik`) run as a pod on
//! the real node `local-0` in a test's namespace, with its `kubernetesgateway` provider
//! watching only that namespace and only its own GatewayClass.
//!
//! [`deploy_traefik`] creates, in the namespace: the ServiceAccount, a Role and RoleBinding
//! (what the provider reads there and the status it writes), the pod (the binary from a
//! hostPath mount of its cache directory, in image `sluice/host:1`), the Service `traefik`
//! (ClusterIP, port 8000) and the Gateway `gw` (an HTTP listener on port 8000 for routes of
//! the same namespace); and, cluster-scoped, named `traefik-<namespace>`: a ClusterRole and
//! ClusterRoleBinding (namespaces, GatewayClasses and their status) and the GatewayClass.
//! Traefik binds a Gateway listener to the entryPoint whose address ends in the listener's
//! port (`entryPointName` in its gateway provider), so the entryPoint `web` listens on
//! `:8000`. [`Traefik::cleanup`] deletes the cluster-scoped objects (the namespace's
//! deletion takes the rest); a `Traefik` dropped without it does the same from a thread.
//!
//! Routes: [`http_route`] / [`Traefik::apply_route`] (server-side apply, so calling it
//! again with other weights moves traffic) and [`Traefik::wait_route`].
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, ListParams, LogParams, Patch, PatchParams,
    PostParams,
};
use kube::{Client, Resource};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The Traefik release `build.sh traefik` builds.
pub const TRAEFIK_VERSION: &str = "v3.6.12";
/// The `controllerName` Traefik's Gateway API provider serves.
pub const CONTROLLER_NAME: &str = "traefik.io/gateway-controller";
/// The Gateway that [`deploy_traefik`] creates.
pub const GATEWAY: &str = "gw";
/// The Gateway listener's port, Traefik's `web` entryPoint and the Service port.
pub const WEB_PORT: u16 = 8000;
/// Traefik's own entryPoint (`/ping`).
pub const ADMIN_PORT: u16 = 8080;
/// The node the pod runs on.
pub const NODE: &str = "local-0";
const FIELD_MANAGER: &str = "sluice-e2e";
const NAME: &str = "traefik";
const LABEL_NAMESPACE: &str = "sluice.dev/e2e-namespace";

fn gateway_api(kind: &str, plural: &str) -> ApiResource {
    ApiResource {
        group: "gateway.networking.k8s.io".into(),
        version: "v1".into(),
        api_version: "gateway.networking.k8s.io/v1".into(),
        kind: kind.into(),
        plural: plural.into(),
    }
}

/// `gateway.networking.k8s.io/v1` GatewayClass.
pub fn gateway_class_resource() -> ApiResource {
    gateway_api("GatewayClass", "gatewayclasses")
}
/// `gateway.networking.k8s.io/v1` Gateway.
pub fn gateway_resource() -> ApiResource {
    gateway_api("Gateway", "gateways")
}
/// `gateway.networking.k8s.io/v1` HTTPRoute.
pub fn http_route_resource() -> ApiResource {
    gateway_api("HTTPRoute", "httproutes")
}

/// The directory holding the `traefik` binary: `e2e/cluster/build.sh traefik` builds it
/// when it is not cached (minutes on a cold Go cache) and prints it.
pub fn traefik_bin_dir() -> anyhow::Result<PathBuf> {
    let script = crate::cluster::repo_root().join("e2e/cluster/build.sh");
    let out = std::process::Command::new("bash")
        .arg(&script)
        .arg("traefik")
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("running {} traefik", script.display()))?;
    anyhow::ensure!(
        out.status.success(),
        "building Traefik failed (see the build output above)"
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let dir = stdout
        .lines()
        .find_map(|l| l.strip_prefix("traefik="))
        .context("build.sh did not report traefik")?;
    let dir = PathBuf::from(dir);
    anyhow::ensure!(
        dir.join("traefik").is_file(),
        "{} is missing",
        dir.join("traefik").display()
    );
    Ok(dir)
}

/// One `backendRefs` entry of an HTTPRoute rule: a Service port and its weight.
#[derive(Clone, Debug)]
pub struct Backend {
    pub service: String,
    pub port: u16,
    pub weight: i32,
}

impl Backend {
    pub fn new(service: &str, port: u16, weight: i32) -> Self {
        Self {
            service: service.to_string(),
            port,
            weight,
        }
    }
}

/// An HTTPRoute `name` attached to the Gateway `gateway` of its namespace: one rule, every
/// path, split over `backends` by weight.
pub fn http_route(name: &str, gateway: &str, backends: &[Backend]) -> serde_json::Value {
    let refs: Vec<serde_json::Value> = backends
        .iter()
        .map(|b| json!({"kind": "Service", "name": b.service, "port": b.port, "weight": b.weight}))
        .collect();
    json!({
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": name},
        "spec": {
            "parentRefs": [{"name": gateway}],
            "rules": [{
                "matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
                "backendRefs": refs,
            }],
        },
    })
}

/// Traefik running in a test namespace behind its Gateway.
pub struct Traefik {
    /// The namespace it serves (and runs in).
    pub namespace: String,
    /// The GatewayClass (cluster-scoped) and the ClusterRole/ClusterRoleBinding's name.
    pub gateway_class: String,
    /// The Gateway routes attach to ([`GATEWAY`]).
    pub gateway: String,
    /// The pod running Traefik.
    pub pod: String,
    /// The Service `traefik`'s ClusterIP.
    pub cluster_ip: String,
    /// What a client pod uses: `http://<ClusterIP>:8000` (the ground has no cluster DNS,
    /// so not `traefik.<ns>.svc`).
    pub url: String,
    /// The pod's own address, `http://<pod IP>:8000`: the host reaches pod IPs, not
    /// ClusterIPs (see docs/testing.md), so a test's own probes use this one.
    pub pod_url: String,
    cleaned: bool,
}

/// A response from [`Traefik::get`]: its status and headers (lower-case names).
#[derive(Clone, Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: BTreeMap<String, String>,
}

/// Runs Traefik in `ns` on the real node and waits until it is ready, its GatewayClass
/// accepted and the Gateway `gw` Accepted and Programmed, and the Service's endpoint is in
/// place. Installs the Gateway API CRDs when the ground lacks them (a ground started by an
/// older `cluster up`).
pub async fn deploy_traefik(client: &Client, ns: &str) -> anyhow::Result<Traefik> {
    ensure_crds(client).await?;
    let bin_dir = tokio::task::spawn_blocking(traefik_bin_dir).await??;
    let cluster_name = format!("traefik-{ns}");
    // From here on a failure drops `t`, which deletes what is cluster-scoped.
    let mut t = Traefik {
        namespace: ns.to_string(),
        gateway_class: cluster_name.clone(),
        gateway: GATEWAY.to_string(),
        pod: NAME.to_string(),
        cluster_ip: String::new(),
        url: String::new(),
        pod_url: String::new(),
        cleaned: false,
    };
    let labels = json!({"app.kubernetes.io/name": NAME, LABEL_NAMESPACE: ns});
    let pp = PostParams::default();

    create(
        client,
        Some(ns),
        json!({
            "apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": {"name": NAME, "labels": labels},
        }),
    )
    .await?;
    let read = ["get", "list", "watch"];
    create(client, Some(ns), json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
        "metadata": {"name": NAME, "labels": labels},
        "rules": [
            {"apiGroups": [""], "resources": ["services", "secrets", "configmaps"], "verbs": read},
            {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": read},
            {"apiGroups": ["gateway.networking.k8s.io"],
             "resources": ["gateways", "httproutes", "grpcroutes", "referencegrants", "backendtlspolicies"],
             "verbs": read},
            {"apiGroups": ["gateway.networking.k8s.io"],
             "resources": ["gateways/status", "httproutes/status", "grpcroutes/status", "backendtlspolicies/status"],
             "verbs": ["update"]},
        ],
    }))
    .await?;
    create(
        client,
        Some(ns),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": {"name": NAME, "labels": labels},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": NAME},
            "subjects": [{"kind": "ServiceAccount", "name": NAME, "namespace": ns}],
        }),
    )
    .await?;
    create(client, None, json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
        "metadata": {"name": cluster_name, "labels": labels},
        "rules": [
            {"apiGroups": [""], "resources": ["namespaces"], "verbs": read},
            {"apiGroups": ["gateway.networking.k8s.io"], "resources": ["gatewayclasses"], "verbs": read},
            {"apiGroups": ["gateway.networking.k8s.io"], "resources": ["gatewayclasses/status"],
             "resourceNames": [cluster_name], "verbs": ["update"]},
        ],
    }))
    .await?;
    create(client, None, json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
        "metadata": {"name": cluster_name, "labels": labels},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": cluster_name},
        "subjects": [{"kind": "ServiceAccount", "name": NAME, "namespace": ns}],
    }))
    .await?;

    let services: Api<Service> = Api::namespaced(client.clone(), ns);
    let svc: Service = serde_json::from_value(json!({
        "metadata": {"name": NAME, "labels": labels},
        "spec": {
            "selector": {"app.kubernetes.io/name": NAME},
            "ports": [{"name": "web", "port": WEB_PORT, "targetPort": "web"}],
        },
    }))?;
    let svc = services.create(&pp, &svc).await?;
    t.cluster_ip = svc
        .spec
        .and_then(|s| s.cluster_ip)
        .context("the Service traefik has no ClusterIP")?;
    t.url = format!("http://{}:{WEB_PORT}", t.cluster_ip);

    let args = [
        format!("--entryPoints.web.address=:{WEB_PORT}"),
        format!("--entryPoints.traefik.address=:{ADMIN_PORT}"),
        "--ping=true".into(),
        "--providers.kubernetesgateway=true".into(),
        format!("--providers.kubernetesgateway.namespaces={ns}"),
        // Only its own GatewayClass: tests in other namespaces run their own Traefik.
        format!("--providers.kubernetesgateway.labelselector={LABEL_NAMESPACE}={ns}"),
        // The Gateway's status.addresses: where clients reach it.
        format!(
            "--providers.kubernetesgateway.statusaddress.ip={}",
            t.cluster_ip
        ),
        "--global.checkNewVersion=false".into(),
        "--global.sendAnonymousUsage=false".into(),
        "--log.level=INFO".into(),
    ];
    let mut command = vec!["/opt/traefik/traefik".to_string()];
    command.extend(args);
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": NAME, "labels": labels},
        "spec": {
            "nodeName": NODE,
            "serviceAccountName": NAME,
            "terminationGracePeriodSeconds": 5,
            "containers": [{
                "name": NAME,
                "image": "sluice/host:1",
                "imagePullPolicy": "Never",
                "command": command,
                "ports": [
                    {"name": "web", "containerPort": WEB_PORT},
                    {"name": "admin", "containerPort": ADMIN_PORT},
                ],
                "readinessProbe": {
                    "httpGet": {"path": "/ping", "port": "admin"},
                    "periodSeconds": 1,
                    "failureThreshold": 1,
                },
                "volumeMounts": [{"name": "bin", "mountPath": "/opt/traefik", "readOnly": true}],
            }],
            "volumes": [{"name": "bin", "hostPath": {"path": bin_dir, "type": "Directory"}}],
        },
    }))?;
    Api::<Pod>::namespaced(client.clone(), ns)
        .create(&pp, &pod)
        .await?;

    create(
        client,
        None,
        json!({
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "GatewayClass",
            "metadata": {"name": cluster_name, "labels": labels},
            "spec": {"controllerName": CONTROLLER_NAME},
        }),
    )
    .await?;
    create(
        client,
        Some(ns),
        json!({
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
            "metadata": {"name": GATEWAY, "labels": labels},
            "spec": {
                "gatewayClassName": cluster_name,
                "listeners": [{
                    "name": "web", "port": WEB_PORT, "protocol": "HTTP",
                    "allowedRoutes": {"namespaces": {"from": "Same"}},
                }],
            },
        }),
    )
    .await?;

    let pod = t
        .wait(
            client,
            "the Traefik pod to be Ready",
            Duration::from_secs(90),
            || async {
                let p = Api::<Pod>::namespaced(client.clone(), ns).get(NAME).await?;
                let ready = p
                    .status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
                Ok(ready.then_some(p))
            },
        )
        .await?;
    let ip = pod
        .status
        .and_then(|s| s.pod_ip)
        .context("the Traefik pod has no IP")?;
    t.pod_url = format!("http://{ip}:{WEB_PORT}");

    let classes: Api<DynamicObject> = Api::all_with(client.clone(), &gateway_class_resource());
    t.wait(
        client,
        "the GatewayClass to be Accepted",
        Duration::from_secs(60),
        || async {
            let c = classes.get(&cluster_name).await?;
            Ok(
                conditions_true(&c.data["status"], &["Accepted"], c.meta().generation)
                    .then_some(()),
            )
        },
    )
    .await?;
    let gateways: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), ns, &gateway_resource());
    t.wait(
        client,
        "the Gateway gw to be Accepted and Programmed",
        Duration::from_secs(60),
        || async {
            let g = gateways.get(GATEWAY).await?;
            let ok = conditions_true(
                &g.data["status"],
                &["Accepted", "Programmed"],
                g.meta().generation,
            );
            Ok(ok.then_some(()))
        },
    )
    .await?;
    // kube-proxy routes the ClusterIP to the pod once the slice says it is ready (it syncs at
    // most once a second on the ground).
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), ns);
    t.wait(
        client,
        "the Service traefik's endpoint to be ready",
        Duration::from_secs(30),
        || async {
            let list = slices
                .list(&ListParams::default().labels(&format!("kubernetes.io/service-name={NAME}")))
                .await?;
            let ready = list
                .items
                .iter()
                .flat_map(|s| &s.endpoints)
                .any(|e| e.conditions.as_ref().and_then(|c| c.ready) == Some(true));
            Ok(ready.then_some(()))
        },
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    Ok(t)
}

/// True when `status.conditions` has every one of `types` with status True, observed at
/// `generation` (when the condition says which generation it observed).
fn conditions_true(status: &serde_json::Value, types: &[&str], generation: Option<i64>) -> bool {
    let conds = status["conditions"].as_array().cloned().unwrap_or_default();
    types.iter().all(|t| {
        conds.iter().any(|c| {
            c["type"] == *t
                && c["status"] == "True"
                && match (c["observedGeneration"].as_i64(), generation) {
                    (Some(seen), Some(g)) => seen == g,
                    _ => true,
                }
        })
    })
}

/// Creates an object from JSON (cluster-scoped when `ns` is None).
async fn create(client: &Client, ns: Option<&str>, obj: serde_json::Value) -> anyhow::Result<()> {
    let api_version = obj["apiVersion"].as_str().context("apiVersion")?;
    let kind = obj["kind"].as_str().context("kind")?.to_string();
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    let gvk = kube::api::GroupVersionKind::gvk(group, version, &kind);
    let plural = match kind.as_str() {
        "ServiceAccount" => "serviceaccounts",
        "Role" => "roles",
        "RoleBinding" => "rolebindings",
        "ClusterRole" => "clusterroles",
        "ClusterRoleBinding" => "clusterrolebindings",
        "GatewayClass" => "gatewayclasses",
        "Gateway" => "gateways",
        "HTTPRoute" => "httproutes",
        other => bail!("no plural known for {other}"),
    };
    let ar = ApiResource::from_gvk_with_plural(&gvk, plural);
    let api: Api<DynamicObject> = match ns {
        Some(ns) => Api::namespaced_with(client.clone(), ns, &ar),
        None => Api::all_with(client.clone(), &ar),
    };
    let name = obj["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let obj: DynamicObject = serde_json::from_value(obj)?;
    api.create(&PostParams::default(), &obj)
        .await
        .with_context(|| format!("creating {kind} {name}"))?;
    Ok(())
}

/// Installs the Gateway API CRDs when the cluster lacks the ones Traefik needs.
async fn ensure_crds(client: &Client) -> anyhow::Result<()> {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for name in [
        "gatewayclasses.gateway.networking.k8s.io",
        "gateways.gateway.networking.k8s.io",
        "httproutes.gateway.networking.k8s.io",
        "grpcroutes.gateway.networking.k8s.io",
        "referencegrants.gateway.networking.k8s.io",
        "backendtlspolicies.gateway.networking.k8s.io",
    ] {
        if crds.get_opt(name).await?.is_none() {
            crate::cluster::gateway_api::install(client).await?;
            return Ok(());
        }
    }
    Ok(())
}

impl Traefik {
    /// The HTTPRoute `parentRefs` entry for this Traefik's Gateway.
    pub fn parent_ref(&self) -> serde_json::Value {
        json!({"name": self.gateway})
    }

    /// Creates or updates (server-side apply) the HTTPRoute `name` on this Gateway, split
    /// over `backends` by weight; applying it again with other weights moves traffic.
    pub async fn apply_route(
        &self,
        client: &Client,
        name: &str,
        backends: &[Backend],
    ) -> anyhow::Result<()> {
        let api: Api<DynamicObject> =
            Api::namespaced_with(client.clone(), &self.namespace, &http_route_resource());
        api.patch(
            name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(http_route(name, &self.gateway, backends)),
        )
        .await
        .with_context(|| format!("applying the HTTPRoute {name}"))?;
        Ok(())
    }

    /// Waits until Traefik has taken the HTTPRoute `name` at its current generation:
    /// its parent (this Gateway) reports Accepted and ResolvedRefs.
    pub async fn wait_route(
        &self,
        client: &Client,
        name: &str,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let api: Api<DynamicObject> =
            Api::namespaced_with(client.clone(), &self.namespace, &http_route_resource());
        self.wait(
            client,
            &format!("the HTTPRoute {name} to be accepted"),
            timeout,
            || async {
                let r = api.get(name).await?;
                let generation = r.meta().generation;
                let parents = r.data["status"]["parents"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                let ok = parents.iter().any(|p| {
                    p["controllerName"] == CONTROLLER_NAME
                        && conditions_true(p, &["Accepted", "ResolvedRefs"], generation)
                });
                Ok(ok.then_some(()))
            },
        )
        .await
    }

    /// One `GET path` through Traefik from the host (to the pod's address; `Connection:
    /// close`).
    pub async fn get(&self, path: &str) -> anyhow::Result<Answer> {
        let addr = self
            .pod_url
            .strip_prefix("http://")
            .context("Traefik has no pod address yet")?;
        let mut s =
            tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr))
                .await
                .context("connecting to Traefik timed out")??;
        let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await?;
        let mut buf = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
            .await
            .context("Traefik's answer timed out")??;
        let text = String::from_utf8_lossy(&buf);
        let head = text.split("\r\n\r\n").next().unwrap_or_default();
        let mut lines = head.lines();
        let status = lines
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|c| c.parse().ok())
            .with_context(|| format!("no status line in {head:?}"))?;
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        Ok(Answer { status, headers })
    }

    /// `n` requests through Traefik from the host: how many each value of the response
    /// header `header` got (`"<status>"` for an answer other than 200, `"-"` without it).
    pub async fn sample(&self, n: usize, header: &str) -> anyhow::Result<BTreeMap<String, usize>> {
        let mut counts = BTreeMap::new();
        for _ in 0..n {
            let a = self.get("/").await?;
            let key = if a.status != 200 {
                a.status.to_string()
            } else {
                a.headers.get(header).cloned().unwrap_or_else(|| "-".into())
            };
            *counts.entry(key).or_default() += 1;
        }
        Ok(counts)
    }

    /// Waits (up to 60 s) until Traefik answers `GET path` from the host with 200 five
    /// times in a row: the routes it accepted are in its running configuration and their
    /// backends have ready endpoints.
    pub async fn wait_serving(&self, client: &Client, path: &str) -> anyhow::Result<()> {
        let in_a_row = std::cell::Cell::new(0);
        self.wait(
            client,
            &format!("Traefik to answer GET {path} with 200 five times in a row"),
            Duration::from_secs(60),
            || async {
                let ok = self.get(path).await.is_ok_and(|a| a.status == 200);
                in_a_row.set(if ok { in_a_row.get() + 1 } else { 0 });
                Ok((in_a_row.get() >= 5).then_some(()))
            },
        )
        .await
    }

    /// Traefik's log.
    pub async fn logs(&self, client: &Client) -> anyhow::Result<String> {
        Ok(Api::<Pod>::namespaced(client.clone(), &self.namespace)
            .logs(&self.pod, &LogParams::default())
            .await?)
    }

    /// Polls `f` every 250 ms until it yields a value or `timeout` passes; the error then
    /// carries the end of Traefik's log.
    async fn wait<T, F, Fut>(
        &self,
        client: &Client,
        what: &str,
        timeout: Duration,
        mut f: F,
    ) -> anyhow::Result<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<Option<T>>>,
    {
        let deadline = Instant::now() + timeout;
        let mut last_err = None;
        loop {
            match f().await {
                Ok(Some(v)) => return Ok(v),
                Ok(None) => {}
                Err(e) => last_err = Some(e),
            }
            if Instant::now() >= deadline {
                let log = self
                    .logs(client)
                    .await
                    .unwrap_or_else(|e| format!("(no log: {e})"));
                let tail: Vec<&str> = log.lines().rev().take(20).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                bail!(
                    "timed out after {timeout:?} waiting for {what}{}; Traefik's log ends with:\n{}",
                    last_err
                        .map(|e| format!(" (last error: {e:#})"))
                        .unwrap_or_default(),
                    tail.join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Deletes the cluster-scoped objects (GatewayClass, ClusterRoleBinding, ClusterRole);
    /// the namespace's deletion takes the rest. Idempotent.
    pub async fn cleanup(mut self, client: &Client) -> anyhow::Result<()> {
        self.cleaned = true;
        delete_cluster_scoped(client, &self.gateway_class).await
    }
}

async fn delete_cluster_scoped(client: &Client, name: &str) -> anyhow::Result<()> {
    use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
    let dp = DeleteParams::default();
    let ignore_404 = |r: Result<(), kube::Error>| match r {
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        other => other,
    };
    let classes: Api<DynamicObject> = Api::all_with(client.clone(), &gateway_class_resource());
    ignore_404(classes.delete(name, &dp).await.map(|_| ()))
        .with_context(|| format!("deleting the GatewayClass {name}"))?;
    ignore_404(
        Api::<ClusterRoleBinding>::all(client.clone())
            .delete(name, &dp)
            .await
            .map(|_| ()),
    )
    .with_context(|| format!("deleting the ClusterRoleBinding {name}"))?;
    ignore_404(
        Api::<ClusterRole>::all(client.clone())
            .delete(name, &dp)
            .await
            .map(|_| ()),
    )
    .with_context(|| format!("deleting the ClusterRole {name}"))?;
    Ok(())
}

impl Drop for Traefik {
    fn drop(&mut self) {
        if self.cleaned {
            return;
        }
        // Drop cannot await, and the test's runtime may be shutting down: a thread with its
        // own runtime and its own client, as `TestNamespace` does.
        let name = self.gateway_class.clone();
        let kubeconfig = std::env::var_os("SLUICE_E2E_KUBECONFIG")
            .map(PathBuf::from)
            .unwrap_or_else(crate::cluster::kubeconfig_path);
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            rt.block_on(async {
                let client = crate::cluster::client_for(&kubeconfig).await.ok()?;
                if let Err(e) = delete_cluster_scoped(&client, &name).await {
                    eprintln!("Traefik cleanup: {e:#}");
                }
                Some(())
            })
        })
        .join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_http_route_splits_by_weight_on_the_gateway() {
        let r = http_route(
            "echo",
            "gw",
            &[Backend::new("a", 80, 80), Backend::new("b", 8080, 20)],
        );
        assert_eq!(r["spec"]["parentRefs"], json!([{"name": "gw"}]));
        let refs = &r["spec"]["rules"][0]["backendRefs"];
        assert_eq!(
            refs,
            &json!([
                {"kind": "Service", "name": "a", "port": 80, "weight": 80},
                {"kind": "Service", "name": "b", "port": 8080, "weight": 20},
            ])
        );
        assert_eq!(r["spec"]["rules"][0]["matches"][0]["path"]["value"], "/");
    }

    #[test]
    fn conditions_must_be_true_at_the_current_generation() {
        let status = json!({"conditions": [
            {"type": "Accepted", "status": "True", "observedGeneration": 2},
            {"type": "Programmed", "status": "True", "observedGeneration": 1},
            {"type": "ResolvedRefs", "status": "False", "observedGeneration": 2},
        ]});
        assert!(conditions_true(&status, &["Accepted"], Some(2)));
        assert!(!conditions_true(
            &status,
            &["Accepted", "Programmed"],
            Some(2)
        ));
        assert!(conditions_true(&status, &["Accepted", "Programmed"], None));
        assert!(!conditions_true(&status, &["ResolvedRefs"], Some(2)));
        assert!(!conditions_true(&json!({}), &["Accepted"], Some(1)));
    }
}
