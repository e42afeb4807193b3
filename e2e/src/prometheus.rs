//! A Prometheus for the test ground: Debian's `prometheus` run as a host process on
//! loopback, scraping the agents of one namespace's pods through Kubernetes service
//! discovery (the ground's kubeconfig), as a platform team's Prometheus would. Stopped (and
//! its data removed) when dropped.
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;

/// Where Debian's package installs it (`.ci/run` installs the package).
pub const PROMETHEUS_BIN: &str = "/usr/bin/prometheus";

/// A running Prometheus; killed when dropped.
pub struct Prometheus {
    child: Child,
    pub addr: SocketAddr,
    dir: PathBuf,
}

/// The scrape config: every pod of `namespace` with a `sluice.dev/revision` label (the
/// pods Sluice runs), scraped on the agent's admin port every second, with the labels
/// `namespace`, `pod` and `revision` (the pod's `sluice.dev/revision`).
pub fn agents_config(kubeconfig: &Path, namespace: &str, admin_port: u16) -> String {
    format!(
        r#"global:
  scrape_interval: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: sluice-agents
    kubernetes_sd_configs:
      - role: pod
        kubeconfig_file: "{kc}"
        namespaces:
          names: ["{namespace}"]
    relabel_configs:
      - source_labels: [__meta_kubernetes_pod_label_sluice_dev_revision]
        regex: ".+"
        action: keep
      - source_labels: [__meta_kubernetes_pod_ip]
        target_label: __address__
        replacement: "${{1}}:{admin_port}"
      - source_labels: [__meta_kubernetes_namespace]
        target_label: namespace
      - source_labels: [__meta_kubernetes_pod_name]
        target_label: pod
      - source_labels: [__meta_kubernetes_pod_label_sluice_dev_revision]
        target_label: revision
"#,
        kc = kubeconfig.display(),
    )
}

impl Prometheus {
    /// Starts Prometheus with `config` on a free loopback port and waits until it is ready.
    pub async fn start(config: &str) -> anyhow::Result<Self> {
        anyhow::ensure!(
            Path::new(PROMETHEUS_BIN).exists(),
            "{PROMETHEUS_BIN} is missing: install Debian's `prometheus` package (.ci/run does)"
        );
        let dir = crate::cluster::state_dir().join(format!(
            "prometheus-{}",
            std::process::id() as u64 * 1000 + rand::random_range(0..1000u64)
        ));
        std::fs::create_dir_all(&dir)?;
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
        let p = Prometheus { child, addr, dir };
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
    fn the_config_keeps_only_sluice_pods_of_the_namespace() {
        let c = agents_config(Path::new("/k/kubeconfig"), "ns1", 9901);
        assert!(c.contains("names: [\"ns1\"]"), "{c}");
        assert!(c.contains("replacement: \"${1}:9901\""), "{c}");
        assert!(c.contains("kubeconfig_file: \"/k/kubeconfig\""), "{c}");
    }
}
