//! Service-account credentials, the way the kubelet provides them: a token bound to the pod,
//! requested through the TokenRequest API and refreshed at 80 % of its life. Instead of the
//! projected volume at `/var/run/secrets/kubernetes.io/serviceaccount` (the ground has no
//! mount namespaces), the token, the CA and the namespace go into a per-pod directory
//! `target/e2e/pods/<uid>/` together with a kubeconfig that names them, and every container
//! gets `KUBECONFIG=<that kubeconfig>` — which kube-rs's `Config::infer()` and kubectl read
//! first. The kubeconfig refers to the token by `tokenFile`, so clients pick up a refreshed
//! token the way in-cluster clients re-read theirs.
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use k8s_openapi::jiff::Timestamp;
use kube::api::PostParams;
use kube::config::{
    AuthInfo, Cluster, Context, Kubeconfig, NamedAuthInfo, NamedCluster, NamedContext,
};
use kube::{Api, Client, ResourceExt};
use tokio::task::JoinHandle;

/// The life the node asks for (the API server may grant less; the refresh follows what it
/// granted).
pub const TOKEN_EXPIRATION_S: i64 = 3600;

/// How the pods reach the API server: the node's own kubeconfig's server and CA.
#[derive(Clone, Debug)]
pub struct ClusterAccess {
    pub server: String,
    pub ca_pem: Option<Vec<u8>>,
    pub tls_server_name: Option<String>,
    pub insecure: bool,
}

impl ClusterAccess {
    /// The current context's cluster of a kubeconfig file.
    pub fn from_kubeconfig(path: &Path) -> anyhow::Result<Self> {
        let kc = Kubeconfig::read_from(path)
            .with_context(|| format!("reading kubeconfig {}", path.display()))?;
        let ctx_name = kc.current_context.clone().unwrap_or_default();
        let cluster_name = kc
            .contexts
            .iter()
            .find(|c| c.name == ctx_name)
            .and_then(|c| c.context.as_ref())
            .map(|c| c.cluster.clone())
            .or_else(|| kc.clusters.first().map(|c| c.name.clone()))
            .context("kubeconfig without a cluster")?;
        let cluster = kc
            .clusters
            .iter()
            .find(|c| c.name == cluster_name)
            .and_then(|c| c.cluster.clone())
            .with_context(|| format!("kubeconfig has no cluster {cluster_name}"))?;
        let ca_pem = match (
            &cluster.certificate_authority_data,
            &cluster.certificate_authority,
        ) {
            (Some(data), _) => Some(
                base64::Engine::decode(&base64::engine::general_purpose::STANDARD, data.trim())
                    .context("decoding certificate-authority-data")?,
            ),
            (None, Some(file)) => {
                let file = path
                    .parent()
                    .map(|d| d.join(file))
                    .unwrap_or_else(|| file.into());
                Some(std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?)
            }
            (None, None) => None,
        };
        Ok(ClusterAccess {
            server: cluster
                .server
                .context("kubeconfig cluster without a server")?,
            ca_pem,
            tls_server_name: cluster.tls_server_name,
            insecure: cluster.insecure_skip_tls_verify.unwrap_or(false),
        })
    }
}

/// Whether a pod gets service-account credentials: it names a service account and neither
/// the pod nor (when the pod does not say) the service account turns automounting off.
/// `sa_automount` is the service account's `automountServiceAccountToken`. Pure.
pub fn wants_token(pod: &Pod, sa_automount: Option<bool>) -> bool {
    let Some(spec) = pod.spec.as_ref() else {
        return false;
    };
    if spec
        .service_account_name
        .as_deref()
        .unwrap_or("")
        .is_empty()
    {
        return false;
    }
    spec.automount_service_account_token
        .or(sa_automount)
        .unwrap_or(true)
}

/// When to refresh a token issued at `issued` that expires at `expires`: after 80 % of its
/// life, as the kubelet does. Pure.
pub fn refresh_after(issued: Timestamp, expires: Timestamp) -> Duration {
    let life_ms = expires.as_millisecond() - issued.as_millisecond();
    Duration::from_millis((life_ms.max(0) as u64) * 4 / 5)
}

/// The kubeconfig a pod's containers get.
pub fn pod_kubeconfig(access: &ClusterAccess, dir: &Path, namespace: &str) -> Kubeconfig {
    let ca_file = (access.ca_pem.is_some()).then(|| dir.join("ca.crt").display().to_string());
    Kubeconfig {
        clusters: vec![NamedCluster {
            name: "sluice-e2e".into(),
            cluster: Some(Cluster {
                server: Some(access.server.clone()),
                certificate_authority: ca_file,
                tls_server_name: access.tls_server_name.clone(),
                insecure_skip_tls_verify: access.insecure.then_some(true),
                ..Default::default()
            }),
            other: Default::default(),
        }],
        auth_infos: vec![NamedAuthInfo {
            name: "serviceaccount".into(),
            auth_info: Some(AuthInfo {
                token_file: Some(dir.join("token").display().to_string()),
                ..Default::default()
            }),
            other: Default::default(),
        }],
        contexts: vec![NamedContext {
            name: "serviceaccount".into(),
            context: Some(Context {
                cluster: "sluice-e2e".into(),
                user: Some("serviceaccount".into()),
                namespace: Some(namespace.into()),
                extensions: None,
                other: Default::default(),
            }),
            other: Default::default(),
        }],
        current_context: Some("serviceaccount".into()),
        ..Default::default()
    }
}

/// Writes a file by renaming a temporary one over it, so readers never see half a token.
fn write_atomic(path: &Path, data: &[u8]) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(data)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

/// A pod's credentials: its directory, the kubeconfig in it, and the refresher (stopped when
/// this is dropped).
#[derive(Debug)]
pub struct PodCreds {
    pub dir: PathBuf,
    pub kubeconfig: PathBuf,
    refresher: JoinHandle<()>,
}

impl Drop for PodCreds {
    fn drop(&mut self) {
        self.refresher.abort();
    }
}

/// A pod's own directory under `pods_dir` (tokens, kubeconfig, process-group records).
pub fn pod_dir(pods_dir: &Path, uid: &str) -> PathBuf {
    pods_dir.join(uid)
}

struct Bound {
    client: Client,
    namespace: String,
    service_account: String,
    pod_name: String,
    pod_uid: String,
}

impl Bound {
    /// Requests a token bound to the pod; returns it with its issue and expiry times.
    async fn request(&self) -> anyhow::Result<(String, Timestamp, Timestamp)> {
        let api: Api<ServiceAccount> = Api::namespaced(self.client.clone(), &self.namespace);
        let req = TokenRequest {
            spec: TokenRequestSpec {
                audiences: Vec::new(),
                expiration_seconds: Some(TOKEN_EXPIRATION_S),
                bound_object_ref: Some(BoundObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("Pod".into()),
                    name: Some(self.pod_name.clone()),
                    uid: Some(self.pod_uid.clone()),
                }),
            },
            ..Default::default()
        };
        let issued = Timestamp::now();
        let got = api
            .create_token_request(&self.service_account, &PostParams::default(), &req)
            .await
            .with_context(|| {
                format!(
                    "requesting a token for serviceaccount {}/{}",
                    self.namespace, self.service_account
                )
            })?;
        let status = got.status.context("TokenRequest without status")?;
        Ok((status.token, issued, status.expiration_timestamp.0))
    }

    fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.pod_name)
    }
}

/// Gives a pod its credentials when it should have them (`Ok(None)` otherwise): requests the
/// first token, writes the directory, and starts the refresher.
pub async fn setup(
    client: &Client,
    access: &ClusterAccess,
    pods_dir: &Path,
    pod: &Pod,
) -> anyhow::Result<Option<PodCreds>> {
    let namespace = pod.namespace().unwrap_or_default();
    let spec = pod.spec.clone().unwrap_or_default();
    let sa_name = spec.service_account_name.clone().unwrap_or_default();
    let pod_says = spec.automount_service_account_token;
    if sa_name.is_empty() || pod_says == Some(false) {
        return Ok(None);
    }
    let sa_automount = if pod_says.is_none() {
        let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), &namespace);
        sas.get(&sa_name)
            .await
            .with_context(|| format!("getting serviceaccount {namespace}/{sa_name}"))?
            .automount_service_account_token
    } else {
        None
    };
    if !wants_token(pod, sa_automount) {
        return Ok(None);
    }
    let bound = Bound {
        client: client.clone(),
        namespace: namespace.clone(),
        service_account: sa_name,
        pod_name: pod.name_any(),
        pod_uid: pod.uid().unwrap_or_default(),
    };
    let (token, issued, expires) = bound.request().await?;
    let dir = pod_dir(pods_dir, &bound.pod_uid);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    write_atomic(&dir.join("token"), token.as_bytes())?;
    if let Some(ca) = &access.ca_pem {
        write_atomic(&dir.join("ca.crt"), ca)?;
    }
    write_atomic(&dir.join("namespace"), namespace.as_bytes())?;
    let kubeconfig = dir.join("kubeconfig");
    let kc = pod_kubeconfig(access, &dir, &namespace);
    write_atomic(&kubeconfig, serde_yaml::to_string(&kc)?.as_bytes())?;
    let token_path = dir.join("token");
    let refresher = tokio::spawn(async move {
        let mut wait = refresh_after(issued, expires);
        loop {
            tokio::time::sleep(wait).await;
            match bound.request().await.and_then(|(token, issued, expires)| {
                write_atomic(&token_path, token.as_bytes())?;
                Ok(refresh_after(issued, expires))
            }) {
                Ok(next) => {
                    tracing::debug!(pod = %bound.key(), "service-account token refreshed");
                    wait = next;
                }
                Err(e) => {
                    tracing::warn!(pod = %bound.key(), "refreshing the token: {e:#}");
                    wait = Duration::from_secs(10);
                }
            }
        }
    });
    Ok(Some(PodCreds {
        dir,
        kubeconfig,
        refresher,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::PodSpec;

    fn pod(sa: Option<&str>, automount: Option<bool>) -> Pod {
        Pod {
            spec: Some(PodSpec {
                service_account_name: sa.map(str::to_string),
                automount_service_account_token: automount,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn automount_follows_pod_then_service_account() {
        assert!(wants_token(&pod(Some("op"), None), None));
        assert!(wants_token(&pod(Some("op"), None), Some(true)));
        assert!(!wants_token(&pod(Some("op"), None), Some(false)));
        // The pod's own setting wins over the service account's.
        assert!(wants_token(&pod(Some("op"), Some(true)), Some(false)));
        assert!(!wants_token(&pod(Some("op"), Some(false)), Some(true)));
        assert!(!wants_token(&pod(None, None), None));
        assert!(!wants_token(&pod(Some(""), Some(true)), None));
    }

    #[test]
    fn tokens_refresh_at_four_fifths_of_their_life() {
        let issued = Timestamp::from_second(1_000).unwrap();
        let expires = Timestamp::from_second(1_000 + 3600).unwrap();
        assert_eq!(refresh_after(issued, expires), Duration::from_secs(2880));
        assert_eq!(refresh_after(expires, issued), Duration::ZERO);
    }

    #[test]
    fn pod_kubeconfig_names_the_token_file_and_ca() {
        let access = ClusterAccess {
            server: "https://127.0.0.1:6443".into(),
            ca_pem: Some(b"pem".to_vec()),
            tls_server_name: None,
            insecure: false,
        };
        let kc = pod_kubeconfig(&access, Path::new("/x/pods/u1"), "ns1");
        let text = serde_yaml::to_string(&kc).unwrap();
        let back: Kubeconfig = serde_yaml::from_str(&text).unwrap();
        let cluster = back.clusters[0].cluster.as_ref().unwrap();
        assert_eq!(cluster.server.as_deref(), Some("https://127.0.0.1:6443"));
        assert_eq!(
            cluster.certificate_authority.as_deref(),
            Some("/x/pods/u1/ca.crt")
        );
        let user = back.auth_infos[0].auth_info.as_ref().unwrap();
        assert_eq!(user.token_file.as_deref(), Some("/x/pods/u1/token"));
        assert_eq!(back.current_context.as_deref(), Some("serviceaccount"));
    }
}
