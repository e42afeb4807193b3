//! Talking to the test ground's API server: a client for a kubeconfig, its health, a
//! node's readiness.
use std::path::Path;
use std::time::Duration;

use anyhow::Context;

pub(super) async fn node_ready(client: &kube::Client, name: &str) -> bool {
    let nodes = kube::Api::<k8s_openapi::api::core::v1::Node>::all(client.clone());
    let Ok(Some(node)) = nodes.get_opt(name).await else {
        return false;
    };
    node.status
        .and_then(|s| s.conditions)
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// True when the API server behind `kubeconfig` answers `/readyz` with `ok`.
pub async fn healthy(kubeconfig: &Path) -> bool {
    let Ok(client) = client_for(kubeconfig).await else {
        return false;
    };
    let Ok(req) = http::Request::get("/readyz").body(Vec::new()) else {
        return false;
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(5), client.request_text(req)).await,
        Ok(Ok(text)) if text.trim() == "ok"
    )
}

/// A kube client for a kubeconfig file.
pub async fn client_for(kubeconfig: &Path) -> anyhow::Result<kube::Client> {
    let kc = kube::config::Kubeconfig::read_from(kubeconfig)
        .with_context(|| format!("reading {}", kubeconfig.display()))?;
    let config = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .with_context(|| format!("loading {}", kubeconfig.display()))?;
    Ok(kube::Client::try_from(config)?)
}
