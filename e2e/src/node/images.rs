//! Images → local programs (`e2e/images.yaml`), and a container's argv and environment the
//! way the kubelet builds them (command/args override rules, downward-API `fieldRef`s,
//! `$(VAR)` expansion).
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use k8s_openapi::api::core::v1::{Container, Pod};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
struct ImagesFile {
    images: BTreeMap<String, ImageEntry>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct ImageEntry {
    /// A program of this workspace, found under target/{release,debug}.
    #[serde(default)]
    pub binary: Option<String>,
    /// Any other program, by path.
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// Entrypoint arguments; `{tag}` is the image tag.
    #[serde(default)]
    pub args: Vec<String>,
}

#[derive(Clone, Debug)]
pub struct Images {
    entries: BTreeMap<String, ImageEntry>,
    repo: PathBuf,
}

/// Splits `repo:tag` (a registry host with a port is not a tag; the default tag is `latest`).
pub fn split_image(image: &str) -> (&str, &str) {
    let image = image.split('@').next().unwrap_or(image);
    match image.rfind(':') {
        Some(i) if !image[i + 1..].contains('/') => (&image[..i], &image[i + 1..]),
        _ => (image, "latest"),
    }
}

impl Images {
    pub fn load(file: &Path, repo: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("reading the image map {}", file.display()))?;
        let parsed: ImagesFile =
            serde_yaml::from_str(&text).with_context(|| format!("parsing {}", file.display()))?;
        Ok(Images {
            entries: parsed.images,
            repo: repo.to_path_buf(),
        })
    }

    /// The newest build of a workspace binary.
    fn find_binary(&self, name: &str) -> anyhow::Result<PathBuf> {
        let candidates = ["release", "debug"].map(|p| self.repo.join("target").join(p).join(name));
        candidates
            .iter()
            .filter_map(|p| Some((std::fs::metadata(p).ok()?.modified().ok()?, p.clone())))
            .max()
            .map(|(_, p)| p)
            .with_context(|| format!("{name} is not built (looked in target/release and target/debug); run `cargo build --bins`"))
    }

    /// The program and entrypoint arguments of `image`.
    pub fn entrypoint(&self, image: &str) -> anyhow::Result<(PathBuf, Vec<String>)> {
        let (repo, tag) = split_image(image);
        let entry = self.entries.get(repo).with_context(|| {
            format!("image {image} is not in the process node's image map (e2e/images.yaml)")
        })?;
        let program = match (&entry.binary, &entry.path) {
            (Some(b), _) => self.find_binary(b)?,
            (None, Some(p)) => p.clone(),
            (None, None) => anyhow::bail!("image {repo} names neither a binary nor a path"),
        };
        let args = entry.args.iter().map(|a| a.replace("{tag}", tag)).collect();
        Ok((program, args))
    }

    /// Resolves `command[0]` of a container that overrides the entrypoint: the image's own
    /// program by its file name, an absolute path, or a program on `PATH`.
    fn resolve_command(&self, image_program: &Path, cmd: &str) -> PathBuf {
        if image_program.file_name().and_then(|n| n.to_str()) == Some(cmd) {
            return image_program.to_path_buf();
        }
        if let Some(e) = self
            .entries
            .values()
            .find(|e| e.binary.as_deref() == Some(cmd))
            && let Some(b) = &e.binary
            && let Ok(p) = self.find_binary(b)
        {
            return p;
        }
        PathBuf::from(cmd)
    }

    /// The argv of a container: `command` replaces the entrypoint, `args` follow it.
    pub fn argv(
        &self,
        c: &Container,
        env: &BTreeMap<String, String>,
    ) -> anyhow::Result<(PathBuf, Vec<String>)> {
        let image = c.image.as_deref().context("container without image")?;
        let (program, mut entry_args) = self.entrypoint(image)?;
        let expand_all = |v: &Vec<String>| v.iter().map(|s| expand(s, env)).collect::<Vec<_>>();
        match &c.command {
            Some(cmd) if !cmd.is_empty() => {
                let cmd = expand_all(cmd);
                let prog = self.resolve_command(&program, &cmd[0]);
                let mut args = cmd[1..].to_vec();
                args.extend(expand_all(c.args.as_ref().unwrap_or(&Vec::new())));
                Ok((prog, args))
            }
            _ => {
                entry_args.extend(expand_all(c.args.as_ref().unwrap_or(&Vec::new())));
                Ok((program, entry_args))
            }
        }
    }
}

/// Kubernetes' `$(VAR)` expansion: known variables are replaced, `$$` escapes a `$`,
/// unknown references stay as they are.
pub fn expand(s: &str, vars: &BTreeMap<String, String>) -> String {
    let mut out = String::with_capacity(s.len());
    let bytes = s.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'$' && i + 1 < bytes.len() {
            if bytes[i + 1] == b'$' {
                out.push('$');
                i += 2;
                continue;
            }
            if bytes[i + 1] == b'('
                && let Some(close) = s[i + 2..].find(')')
            {
                let name = &s[i + 2..i + 2 + close];
                if let Some(v) = vars.get(name) {
                    out.push_str(v);
                    i += close + 3;
                    continue;
                }
            }
        }
        let ch = s[i..].chars().next().expect("in bounds");
        out.push(ch);
        i += ch.len_utf8();
    }
    out
}

/// The value of a downward-API `fieldRef`.
pub fn field_ref(pod: &Pod, path: &str, pod_ip: &str, host_ip: &str) -> anyhow::Result<String> {
    let meta = &pod.metadata;
    let spec = pod.spec.as_ref();
    Ok(match path {
        "metadata.name" => meta.name.clone().unwrap_or_default(),
        "metadata.namespace" => meta.namespace.clone().unwrap_or_default(),
        "metadata.uid" => meta.uid.clone().unwrap_or_default(),
        "spec.nodeName" => spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
        "spec.serviceAccountName" => spec
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_default(),
        "status.podIP" | "status.podIPs" => pod_ip.to_string(),
        "status.hostIP" | "status.hostIPs" => host_ip.to_string(),
        p if p.starts_with("metadata.labels['") && p.ends_with("']") => {
            let key = &p["metadata.labels['".len()..p.len() - 2];
            meta.labels
                .as_ref()
                .and_then(|l| l.get(key).cloned())
                .unwrap_or_default()
        }
        p if p.starts_with("metadata.annotations['") && p.ends_with("']") => {
            let key = &p["metadata.annotations['".len()..p.len() - 2];
            meta.annotations
                .as_ref()
                .and_then(|l| l.get(key).cloned())
                .unwrap_or_default()
        }
        other => anyhow::bail!("unsupported fieldRef {other}"),
    })
}

/// A container's environment: a minimal base, then `env` in order (each value may refer to
/// earlier ones with `$(VAR)`).
pub fn container_env(
    pod: &Pod,
    c: &Container,
    pod_ip: &str,
    host_ip: &str,
) -> anyhow::Result<BTreeMap<String, String>> {
    let mut env = BTreeMap::new();
    env.insert(
        "PATH".to_string(),
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string(),
    );
    env.insert(
        "HOSTNAME".to_string(),
        pod.metadata.name.clone().unwrap_or_default(),
    );
    for e in c.env.iter().flatten() {
        let value = if let Some(from) = &e.value_from {
            if let Some(f) = &from.field_ref {
                field_ref(pod, &f.field_path, pod_ip, host_ip)?
            } else {
                anyhow::bail!("env {}: only fieldRef is supported in valueFrom", e.name);
            }
        } else {
            expand(e.value.as_deref().unwrap_or(""), &env)
        };
        env.insert(e.name.clone(), value);
    }
    Ok(env)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{EnvVar, EnvVarSource, ObjectFieldSelector, PodSpec};
    use kube::api::ObjectMeta;

    #[test]
    fn images_split_into_repo_and_tag() {
        assert_eq!(split_image("sluice/echo:v2"), ("sluice/echo", "v2"));
        assert_eq!(split_image("sluice/echo"), ("sluice/echo", "latest"));
        assert_eq!(
            split_image("localhost:5000/echo"),
            ("localhost:5000/echo", "latest")
        );
        assert_eq!(
            split_image("localhost:5000/echo:v3"),
            ("localhost:5000/echo", "v3")
        );
    }

    #[test]
    fn expansion_follows_kubernetes_rules() {
        let vars = BTreeMap::from([
            ("A".to_string(), "1".to_string()),
            ("POD_IP".to_string(), "10.245.0.2".to_string()),
        ]);
        assert_eq!(expand("$(A)-$(POD_IP):80", &vars), "1-10.245.0.2:80");
        assert_eq!(expand("$$(A)", &vars), "$(A)");
        assert_eq!(expand("$(MISSING)", &vars), "$(MISSING)");
        assert_eq!(expand("cost $5 é", &vars), "cost $5 é");
    }

    fn test_pod() -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some("echo-1".into()),
                namespace: Some("ns1".into()),
                labels: Some(BTreeMap::from([("app".to_string(), "echo".to_string())])),
                ..Default::default()
            },
            spec: Some(PodSpec {
                node_name: Some("local-0".into()),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn field_env(name: &str, path: &str) -> EnvVar {
        EnvVar {
            name: name.into(),
            value_from: Some(EnvVarSource {
                field_ref: Some(ObjectFieldSelector {
                    field_path: path.into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn env_resolves_downward_api_and_references() {
        let pod = test_pod();
        let c = Container {
            name: "app".into(),
            env: Some(vec![
                field_env("POD_NAME", "metadata.name"),
                field_env("POD_NAMESPACE", "metadata.namespace"),
                field_env("POD_IP", "status.podIP"),
                field_env("HOST_IP", "status.hostIP"),
                field_env("APP", "metadata.labels['app']"),
                EnvVar {
                    name: "LISTEN".into(),
                    value: Some("$(POD_IP):8080".into()),
                    ..Default::default()
                },
            ]),
            ..Default::default()
        };
        let env = container_env(&pod, &c, "10.245.0.7", "10.245.0.1").unwrap();
        assert_eq!(env["POD_NAME"], "echo-1");
        assert_eq!(env["POD_NAMESPACE"], "ns1");
        assert_eq!(env["POD_IP"], "10.245.0.7");
        assert_eq!(env["HOST_IP"], "10.245.0.1");
        assert_eq!(env["APP"], "echo");
        assert_eq!(env["LISTEN"], "10.245.0.7:8080");
        let bad = Container {
            env: Some(vec![field_env("X", "status.nonsense")]),
            ..c
        };
        assert!(container_env(&pod, &bad, "", "").is_err());
    }

    #[test]
    fn command_and_args_override_like_kubernetes() {
        let images = Images {
            entries: BTreeMap::from([(
                "sluice/shell".to_string(),
                ImageEntry {
                    binary: None,
                    path: Some("/bin/sh".into()),
                    args: vec!["-c".into(), "echo {tag}".into()],
                },
            )]),
            repo: PathBuf::from("/nonexistent"),
        };
        let env = BTreeMap::from([("X".to_string(), "42".to_string())]);
        let mut c = Container {
            name: "c".into(),
            image: Some("sluice/shell:v9".into()),
            ..Default::default()
        };
        assert_eq!(
            images.argv(&c, &env).unwrap(),
            (
                PathBuf::from("/bin/sh"),
                vec!["-c".to_string(), "echo v9".to_string()]
            )
        );
        c.args = Some(vec!["$(X)".into()]);
        assert_eq!(
            images.argv(&c, &env).unwrap().1,
            vec!["-c", "echo v9", "42"]
        );
        c.command = Some(vec!["sleep".into()]);
        assert_eq!(
            images.argv(&c, &env).unwrap(),
            (PathBuf::from("sleep"), vec!["42".to_string()])
        );
        c.image = Some("unknown/image:v1".into());
        assert!(images.argv(&c, &env).is_err());
    }
}
