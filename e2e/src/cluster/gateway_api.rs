//! The Gateway API CRDs on the test ground: the experimental channel (it includes the
//! standard one) of the release pinned by the wrapper module `e2e/cluster/gateway-api`,
//! read from the Go module cache and installed by `cluster up` with server-side apply (the
//! CRDs are too large for client-side apply's last-applied annotation). They live in the
//! ground's etcd, so `cluster down` has nothing to remove.
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams};
use serde::Deserialize as _;

use super::ground::repo_root;

/// The pinned release (`e2e/cluster/gateway-api/go.mod`).
pub const GATEWAY_API_VERSION: &str = "v1.4.1";
/// The channel installed.
pub const GATEWAY_API_CHANNEL: &str = "experimental";
const MODULE: &str = "sigs.k8s.io/gateway-api";
const FIELD_MANAGER: &str = "sluice-e2e";
const BUNDLE_VERSION: &str = "gateway.networking.k8s.io/bundle-version";
const CHANNEL: &str = "gateway.networking.k8s.io/channel";

/// The module's directory in the Go module cache: `go mod download -json` in the wrapper
/// module (downloads it on a fresh machine). Without Go, the default module cache.
pub fn module_dir() -> anyhow::Result<PathBuf> {
    let wrapper = repo_root().join("e2e/cluster/gateway-api");
    let out = std::process::Command::new("go")
        .args(["mod", "download", "-json", MODULE])
        .current_dir(&wrapper)
        .env("GOFLAGS", "-mod=mod")
        .env("GOTOOLCHAIN", "local")
        .stderr(std::process::Stdio::inherit())
        .output();
    match out {
        Ok(out) => {
            let info: serde_json::Value = serde_json::from_slice(&out.stdout)
                .with_context(|| format!("`go mod download -json {MODULE}` printed no JSON"))?;
            if let Some(err) = info.get("Error").and_then(|e| e.as_str()) {
                bail!("go mod download {MODULE}: {err}");
            }
            anyhow::ensure!(
                out.status.success(),
                "go mod download {MODULE} failed in {}",
                wrapper.display()
            );
            let dir = info
                .get("Dir")
                .and_then(|d| d.as_str())
                .context("`go mod download -json` gave no Dir")?;
            Ok(PathBuf::from(dir))
        }
        Err(err) => {
            let home = std::env::var_os("HOME").context("HOME is not set")?;
            let dir = Path::new(&home)
                .join("go/pkg/mod")
                .join(format!("{MODULE}@{GATEWAY_API_VERSION}"));
            anyhow::ensure!(
                dir.is_dir(),
                "cannot run `go` ({err}) and {} is missing: install Go >= 1.26 \
                 (https://go.dev/dl) so that the ground can fetch the Gateway API CRDs",
                dir.display()
            );
            Ok(dir)
        }
    }
}

/// The channel's CRDs, as its `kustomization.yaml` lists them (the release's own
/// `experimental-install.yaml` is made from it).
pub fn load_crds(module_dir: &Path) -> anyhow::Result<Vec<serde_json::Value>> {
    let dir = module_dir.join("config/crd").join(GATEWAY_API_CHANNEL);
    let kustomization: serde_yaml::Value = serde_yaml::from_str(
        &std::fs::read_to_string(dir.join("kustomization.yaml"))
            .with_context(|| format!("reading {}/kustomization.yaml", dir.display()))?,
    )?;
    let files = kustomization
        .get("resources")
        .and_then(|r| r.as_sequence())
        .context("kustomization.yaml lists no resources")?;
    let mut crds = Vec::new();
    for file in files {
        let file = dir.join(file.as_str().context("a resource that is not a path")?);
        let text = std::fs::read_to_string(&file)
            .with_context(|| format!("reading {}", file.display()))?;
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let v = serde_json::Value::deserialize(doc)
                .with_context(|| format!("parsing {}", file.display()))?;
            if v.get("kind").and_then(|k| k.as_str()) == Some("CustomResourceDefinition") {
                crds.push(v);
            }
        }
    }
    anyhow::ensure!(!crds.is_empty(), "no CRDs in {}", dir.display());
    Ok(crds)
}

fn annotation<'a>(crd: &'a serde_json::Value, key: &str) -> Option<&'a str> {
    crd.get("metadata")?.get("annotations")?.get(key)?.as_str()
}

/// Installs the CRDs the cluster lacks or has from another release or channel, and waits
/// until every one is Established. Returns how many it applied (0 when all were current).
pub async fn install(client: &kube::Client) -> anyhow::Result<usize> {
    let crds = load_crds(&module_dir()?)?;
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let mut applied = 0;
    let mut names = Vec::new();
    for crd in &crds {
        let name = crd["metadata"]["name"]
            .as_str()
            .context("a CRD without a name")?;
        names.push(name.to_string());
        let current = api.get_opt(name).await?.is_some_and(|c| {
            let a = c.metadata.annotations.unwrap_or_default();
            a.get(BUNDLE_VERSION).map(String::as_str) == annotation(crd, BUNDLE_VERSION)
                && a.get(CHANNEL).map(String::as_str) == annotation(crd, CHANNEL)
        });
        if !current {
            api.patch(name, &params, &Patch::Apply(crd))
                .await
                .with_context(|| format!("applying the CRD {name}"))?;
            applied += 1;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    for name in &names {
        loop {
            let established = api.get_opt(name).await?.is_some_and(|c| {
                c.status
                    .and_then(|s| s.conditions)
                    .unwrap_or_default()
                    .iter()
                    .any(|c| c.type_ == "Established" && c.status == "True")
            });
            if established {
                break;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "the CRD {name} was not Established within 60 s"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    Ok(applied)
}
