//! A Prometheus for the test ground: Debian's `prometheus` run as a host process on
//! loopback, scraping the agents of one namespace's pods, as a platform team's Prometheus
//! would. Debian builds it without Kubernetes service discovery, so the targets come from a
//! file (`file_sd_configs`) that a task here keeps in step with the namespace's pods (the
//! labels a pod scrape config would give: `namespace`, `pod`, `revision`). Stopped (and its
//! data removed) when dropped.
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use kube::{Client, ResourceExt};

/// Where Debian's package installs it (`.ci/run` installs the package).
pub const PROMETHEUS_BIN: &str = "/usr/bin/prometheus";

/// A running Prometheus; killed when dropped.
pub struct Prometheus {
    child: Child,
    discovery: Option<tokio::task::JoinHandle<()>>,
    pub addr: SocketAddr,
    dir: PathBuf,
}

/// The scrape config: the agents listed in `targets` (a `file_sd` JSON file), scraped
/// every second.
pub fn agents_config(targets: &Path) -> String {
    format!(
        r#"global:
  scrape_interval: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: sluice-agents
    file_sd_configs:
      - files: ["{}"]
        refresh_interval: 1s
"#,
        targets.display()
    )
}

/// The `file_sd` targets of `pods`: each Sluice pod (one with a `sluice.dev/revision`
/// label and an IP) on the agent's admin port, labelled as a pod scrape config would.
pub fn agent_targets(pods: &[Pod], admin_port: u16) -> serde_json::Value {
    let groups: Vec<serde_json::Value> = pods
        .iter()
        .filter_map(|p| {
            let revision = p.labels().get("sluice.dev/revision")?;
            let ip = p.status.as_ref()?.pod_ip.as_ref()?;
            Some(serde_json::json!({
                "targets": [format!("{ip}:{admin_port}")],
                "labels": {
                    "namespace": p.namespace().unwrap_or_default(),
                    "pod": p.name_any(),
                    "revision": revision,
                },
            }))
        })
        .collect();
    serde_json::Value::Array(groups)
}

impl Prometheus {
    /// Starts Prometheus with `config` on a free loopback port and waits until it is ready.
    pub async fn start(config: &str) -> anyhow::Result<Self> {
        Self::start_in(new_dir()?, config).await
    }

    /// [`Prometheus::start`] with its files (config, data, log) in `dir`, removed on drop.
    async fn start_in(dir: PathBuf, config: &str) -> anyhow::Result<Self> {
        anyhow::ensure!(
            Path::new(PROMETHEUS_BIN).exists(),
            "{PROMETHEUS_BIN} is missing: install Debian's `prometheus` package (.ci/run does)"
        );
        let config_path = dir.join("prometheus.yml");
        std::fs::write(&config_path, config)?;
        let port = crate::cluster::free_port()?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let log = std::fs::File::create(dir.join("prometheus.log"))?;
        let child = Command::new(PROMETHEUS_BIN)
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {PROMETHEUS_BIN}"))?;
        let p = Prometheus {
            child,
            discovery: None,
            addr,
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if p.get("/-/ready").await.is_ok() {
                return Ok(p);
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "Prometheus not ready after 30 s; see {}",
                p.dir.join("prometheus.log").display()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Starts Prometheus scraping the agents of `namespace`'s Sluice pods on `admin_port`;
    /// the target list follows the pods every 500 ms.
    pub async fn for_agents(
        client: Client,
        namespace: &str,
        admin_port: u16,
    ) -> anyhow::Result<Self> {
        let dir = new_dir()?;
        let targets = dir.join("agents.json");
        std::fs::write(&targets, "[]")?;
        let mut p = Prometheus::start_in(dir, &agents_config(&targets)).await?;
        let pods: Api<Pod> = Api::namespaced(client, namespace);
        p.discovery = Some(tokio::spawn(async move {
            loop {
                if let Ok(list) = pods
                    .list(&ListParams::default().labels("sluice.dev/revision"))
                    .await
                {
                    let text = agent_targets(&list.items, admin_port).to_string();
                    let tmp = targets.with_extension("json.tmp");
                    if std::fs::write(&tmp, text).is_ok() {
                        let _ = std::fs::rename(&tmp, &targets);
                    }
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }));
        Ok(p)
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    async fn get(&self, path: &str) -> anyhow::Result<String> {
        request(self.addr, "GET", path, None).await
    }

    /// An instant query's result as JSON (the `data.result` array).
    pub async fn query(&self, promql: &str) -> anyhow::Result<serde_json::Value> {
        let body = format!("query={}", form_encode(promql));
        let text = request(self.addr, "POST", "/api/v1/query", Some(body)).await?;
        let v: serde_json::Value = serde_json::from_str(&text)?;
        Ok(v["data"]["result"].clone())
    }
}

/// A fresh directory for one Prometheus under the ground's state directory.
fn new_dir() -> anyhow::Result<PathBuf> {
    let dir = crate::cluster::state_dir().join(format!(
        "prometheus-{}-{}",
        std::process::id(),
        rand::random_range(0..1_000_000u32)
    ));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// `application/x-www-form-urlencoded` value encoding.
fn form_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// One HTTP/1.1 request on a connection of its own, bounded to 5 s; the body of a 2xx.
async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    form: Option<String>,
) -> anyhow::Result<String> {
    use http_body_util::{BodyExt, Full};
    let fut = async {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", addr.to_string());
        if form.is_some() {
            req = req.header("content-type", "application/x-www-form-urlencoded");
        }
        let req = req.body(Full::new(bytes::Bytes::from(form.unwrap_or_default())))?;
        let resp = sender.send_request(req).await?;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        let text = String::from_utf8_lossy(&body).into_owned();
        anyhow::ensure!(status.is_success(), "{method} {path}: {status}: {text}");
        anyhow::Ok(text)
    };
    tokio::time::timeout(Duration::from_secs(5), fut)
        .await
        .context("Prometheus did not answer within 5 s")?
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        if let Some(d) = self.discovery.take() {
            d.abort();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_values_are_percent_encoded() {
        assert_eq!(
            form_encode("rate(x{a=\"b\"}[1m])"),
            "rate%28x%7Ba%3D%22b%22%7D%5B1m%5D%29"
        );
        assert_eq!(form_encode("a b+c"), "a%20b%2Bc");
    }

    #[test]
    fn targets_are_sluice_pods_with_an_ip_labelled_like_a_pod_scrape() {
        let pod = |name: &str, rev: Option<&str>, ip: Option<&str>| -> Pod {
            let mut labels = serde_json::Map::new();
            if let Some(r) = rev {
                labels.insert("sluice.dev/revision".into(), r.into());
            }
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": name, "namespace": "ns1", "labels": labels},
                "status": {"podIP": ip},
            }))
            .unwrap()
        };
        let t = agent_targets(
            &[
                pod("a", Some("r1"), Some("10.0.0.1")),
                pod("b", None, Some("10.0.0.2")),
                pod("c", Some("r2"), None),
            ],
            9901,
        );
        assert_eq!(
            t,
            serde_json::json!([{"targets": ["10.0.0.1:9901"],
                                "labels": {"namespace": "ns1", "pod": "a", "revision": "r1"}}])
        );
        let c = agents_config(Path::new("/t/agents.json"));
        assert!(c.contains("files: [\"/t/agents.json\"]"), "{c}");
    }
}
