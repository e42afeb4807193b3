//! What a release strategy is ([`Strategy`]) and gets to work with ([`RunContext`]), and
//! the default wait: the Deployment rolled out its template.
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures::future::BoxFuture;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{ListParams, Patch, PatchParams};
use kube::{Api, Client, ResourceExt};

use super::spec::APP;

/// What a strategy gets to work with.
pub struct RunContext {
    pub client: Client,
    pub namespace: String,
    /// The Deployment's (and the Service's) name.
    pub name: String,
    /// The image of the release's new version.
    pub new_image: String,
    /// New connections per second one pod can take ([`RunSpec::new_pod_capacity`]).
    pub new_pod_capacity: f64,
}

impl RunContext {
    /// The plain rolling update: set the new image on the Deployment.
    pub async fn set_image(&self, image: &str) -> anyhow::Result<()> {
        let api: Api<Deployment> = Api::namespaced(self.client.clone(), &self.namespace);
        let patch = serde_json::json!({"spec": {"template": {"spec": {"containers": [{"name": APP, "image": image}]}}}});
        api.patch(
            &self.name,
            &PatchParams::default(),
            &Patch::Strategic(&patch),
        )
        .await
        .context("patching the Deployment's image")?;
        Ok(())
    }
}

/// How a release is done. Implemented by the baselines here and by Sluice's scenario.
pub trait Strategy: Send + Sync {
    /// Short name for reports ("B1", "B2", "sluice").
    fn name(&self) -> String;
    /// One line for the report.
    fn description(&self) -> String;
    /// Shapes the workload before it is created.
    fn shape(&self, deployment: &mut Deployment);
    /// Prepares anything else the strategy needs once the namespace exists (a Release
    /// object, say). The default needs nothing.
    fn prepare<'a>(&'a self, _ctx: &'a RunContext) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async { Ok(()) })
    }
    /// Starts the release to `ctx.new_image`; the runner then waits until it is complete
    /// (all new pods available, no old pod left). The default patches the image.
    fn release<'a>(&'a self, ctx: &'a RunContext) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(ctx.set_image(&ctx.new_image))
    }
    /// Waits until the release is complete. The default: the Deployment rolled out its
    /// template (all new pods available, no old pod left).
    fn wait_released<'a>(
        &'a self,
        ctx: &'a RunContext,
        replicas: i32,
        deadline: Instant,
    ) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(wait_rolled_out(
            &ctx.client,
            &ctx.namespace,
            &ctx.name,
            replicas,
            deadline,
        ))
    }
}

pub(super) async fn pod_names(client: &Client, ns: &str) -> anyhow::Result<BTreeSet<String>> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    Ok(pods
        .list(&ListParams::default().labels(&format!("app={APP}")))
        .await?
        .items
        .iter()
        .map(|p| p.name_any())
        .collect())
}

/// Waits until the Deployment has rolled out its current template and no pod of an older
/// template is left (terminating ones included).
async fn wait_rolled_out(
    client: &Client,
    ns: &str,
    name: &str,
    replicas: i32,
    deadline: Instant,
) -> anyhow::Result<()> {
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns);
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    loop {
        let d = deployments.get(name).await?;
        let st = d.status.clone().unwrap_or_default();
        let generation_seen =
            st.observed_generation.unwrap_or(0) >= d.metadata.generation.unwrap_or(0);
        let rolled = generation_seen
            && st.updated_replicas.unwrap_or(0) == replicas
            && st.available_replicas.unwrap_or(0) == replicas
            && st.replicas.unwrap_or(0) == replicas;
        if rolled {
            let hash = latest_template_hash(client, ns, &d).await?;
            let list = pods
                .list(&ListParams::default().labels(&format!("app={APP}")))
                .await?;
            let old_left = list
                .items
                .iter()
                .filter(|p| p.labels().get("pod-template-hash") != hash.as_ref())
                .count();
            if old_left == 0 {
                return Ok(());
            }
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the release did not complete in time (deployment status: {st:?})"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn latest_template_hash(
    client: &Client,
    ns: &str,
    d: &Deployment,
) -> anyhow::Result<Option<String>> {
    use k8s_openapi::api::apps::v1::ReplicaSet;
    let rss: Api<ReplicaSet> = Api::namespaced(client.clone(), ns);
    let revision = d
        .annotations()
        .get("deployment.kubernetes.io/revision")
        .cloned();
    let list = rss
        .list(&ListParams::default().labels(&format!("app={APP}")))
        .await?;
    Ok(list
        .items
        .iter()
        .filter(|rs| {
            rs.owner_references()
                .iter()
                .any(|o| Some(&o.uid) == d.metadata.uid.as_ref())
        })
        .find(|rs| rs.annotations().get("deployment.kubernetes.io/revision") == revision.as_ref())
        .and_then(|rs| rs.labels().get("pod-template-hash").cloned()))
}
