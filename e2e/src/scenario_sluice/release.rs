//! The Release as the runner drives it: its CRDs applied, its objects, its status, and the
//! wait until it settled.
use std::time::{Duration, Instant};

use anyhow::Context as _;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams};
use kube::{Api, Client, ResourceExt};
use serde::Deserialize as _;

use crate::scenario::spec::APP;

/// The release's GVK.
pub fn release_resource() -> ApiResource {
    ApiResource::from_gvk(&GroupVersionKind::gvk("sluice.dev", "v1alpha1", "Release"))
}

pub fn releases(client: &Client, ns: &str) -> Api<DynamicObject> {
    Api::namespaced_with(client.clone(), ns, &release_resource())
}

/// Server-side applies the committed CRDs (`crds/sluice.dev.yaml`) and waits until the
/// apiserver serves Releases.
pub async fn apply_crds(client: &Client) -> anyhow::Result<()> {
    let path = crate::cluster::repo_root().join("crds/sluice.dev.yaml");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let mut crds = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let value = serde_yaml::Value::deserialize(doc)?;
        if !value.is_null() {
            crds.push(serde_yaml::from_value::<CustomResourceDefinition>(value)?);
        }
    }
    for crd in crds {
        api.patch(
            &crd.name_any(),
            &PatchParams::apply("sluice-e2e").force(),
            &Patch::Apply(&crd),
        )
        .await
        .with_context(|| format!("applying CRD {}", crd.name_any()))?;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if releases(client, "default")
            .list(&ListParams::default().limit(1))
            .await
            .is_ok()
        {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the apiserver does not serve releases.sluice.dev"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The fields of a Release's status the runner looks at.
#[derive(Clone, Debug, Default)]
pub struct ReleaseState {
    pub phase: Option<String>,
    pub stable: Option<String>,
    pub canary: Option<String>,
    pub aborted: Option<String>,
    pub message: Option<String>,
    pub status: serde_json::Value,
}

pub async fn release_state(client: &Client, ns: &str, name: &str) -> anyhow::Result<ReleaseState> {
    let r = releases(client, ns).get(name).await?;
    let st = r.data.get("status").cloned().unwrap_or_default();
    let s = |k: &str| st.get(k).and_then(|v| v.as_str()).map(str::to_string);
    Ok(ReleaseState {
        phase: s("phase"),
        stable: s("stableRevision"),
        canary: s("canaryRevision"),
        aborted: s("abortedRevision"),
        message: s("message"),
        status: st,
    })
}

/// Pods of the app: (name, revision label, deleting).
async fn app_pods(client: &Client, ns: &str) -> anyhow::Result<Vec<(String, String, bool)>> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    Ok(pods
        .list(&ListParams::default().labels(&format!("app={APP}")))
        .await?
        .items
        .iter()
        .map(|p| {
            (
                p.name_any(),
                p.labels()
                    .get("sluice.dev/revision")
                    .cloned()
                    .unwrap_or_default(),
                p.metadata.deletion_timestamp.is_some(),
            )
        })
        .collect())
}

/// Waits until the Release is `Completed` on `replicas` pods of one revision and no other
/// pod is left (terminating ones included). `from` is the stable revision before the
/// release; with `expect_rollback` the release must instead end `Aborted` with only `from`
/// pods left.
pub async fn wait_settled(
    client: &Client,
    ns: &str,
    name: &str,
    replicas: i32,
    from: Option<&str>,
    expect_rollback: bool,
    deadline: Instant,
) -> anyhow::Result<ReleaseState> {
    loop {
        let st = release_state(client, ns, name).await?;
        let target = if expect_rollback {
            from.map(str::to_string)
        } else {
            st.stable.clone().filter(|s| Some(s.as_str()) != from)
        };
        let phase_ok = if expect_rollback {
            st.phase.as_deref() == Some("Aborted") && st.canary.is_none()
        } else {
            st.phase.as_deref() == Some("Completed") && st.canary.is_none()
        };
        // The pods are listed only once the phase says settled, as the Deployment
        // baselines' wait lists them only once the Deployment says rolled: the bench's own
        // polling is part of the control plane's load it measures, the same for both.
        let mut pods = Vec::new();
        if phase_ok && let Some(t) = &target {
            pods = app_pods(client, ns).await?;
            if pods.len() == replicas as usize
                && pods.iter().all(|(_, rev, deleting)| rev == t && !deleting)
            {
                return Ok(st);
            }
        }
        if !expect_rollback && st.phase.as_deref() == Some("Aborted") {
            anyhow::bail!("the release was aborted: {:?}", st.status.get("abort"));
        }
        if Instant::now() >= deadline {
            if pods.is_empty() {
                pods = app_pods(client, ns).await.unwrap_or_default();
            }
            anyhow::bail!(
                "the release did not settle in time: phase {:?}, message {:?}, pods {pods:?}",
                st.phase,
                st.message
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
