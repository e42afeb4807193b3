//! A throwaway PKI for the local control plane: one CA, the API server's serving cert, an
//! admin client cert in `system:masters`, and the service-account signing key pair.
//! ECDSA P-256 throughout (kube-apiserver accepts it for serving, client auth and
//! service-account tokens).

use std::path::{Path, PathBuf};

use base64::Engine;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};

/// Paths of the PEM files written by [`generate`].
#[derive(Clone, Debug)]
pub struct Pki {
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    pub apiserver_cert: PathBuf,
    pub apiserver_key: PathBuf,
    pub admin_cert: PathBuf,
    pub admin_key: PathBuf,
    pub sa_key: PathBuf,
    pub sa_pub: PathBuf,
    /// The API server's client cert for kubelets (logs, exec, port-forward).
    pub kubelet_client_cert: PathBuf,
    pub kubelet_client_key: PathBuf,
    /// kube-proxy's client cert (`system:kube-proxy`, bound to `system:node-proxier`).
    pub kube_proxy_cert: PathBuf,
    pub kube_proxy_key: PathBuf,
    dir: PathBuf,
}

/// A node's certificates: its kubelet's client cert (`system:node:<name>` in
/// `system:nodes`, so the Node authorizer applies) and its serving cert (the node's
/// address), both from the ground's CA.
#[derive(Clone, Debug)]
pub struct NodeCerts {
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    pub serving_cert: PathBuf,
    pub serving_key: PathBuf,
}

impl Pki {
    pub fn at(dir: &Path) -> Self {
        Self {
            ca_cert: dir.join("ca.crt"),
            ca_key: dir.join("ca.key"),
            apiserver_cert: dir.join("apiserver.crt"),
            apiserver_key: dir.join("apiserver.key"),
            admin_cert: dir.join("admin.crt"),
            admin_key: dir.join("admin.key"),
            sa_key: dir.join("sa.key"),
            sa_pub: dir.join("sa.pub"),
            kubelet_client_cert: dir.join("apiserver-kubelet-client.crt"),
            kubelet_client_key: dir.join("apiserver-kubelet-client.key"),
            kube_proxy_cert: dir.join("kube-proxy.crt"),
            kube_proxy_key: dir.join("kube-proxy.key"),
            dir: dir.to_path_buf(),
        }
    }

    pub fn node(&self, name: &str) -> NodeCerts {
        NodeCerts {
            client_cert: self.dir.join(format!("node-{name}.crt")),
            client_key: self.dir.join(format!("node-{name}.key")),
            serving_cert: self.dir.join(format!("kubelet-{name}.crt")),
            serving_key: self.dir.join(format!("kubelet-{name}.key")),
        }
    }
}

/// A node the PKI issues certificates for.
#[derive(Clone, Debug)]
pub struct NodeIdentity {
    pub name: String,
    pub ip: std::net::Ipv4Addr,
}

/// Writes a fresh PKI into `dir` (which it creates). The API server's serving cert covers
/// `apiserver_ips` besides loopback and the first service IP; every node in `nodes` gets
/// its client and serving certs.
pub fn generate(
    dir: &Path,
    apiserver_ips: &[std::net::Ipv4Addr],
    nodes: &[NodeIdentity],
) -> anyhow::Result<Pki> {
    std::fs::create_dir_all(dir)?;
    let pki = Pki::at(dir);

    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "sluice-e2e-ca");
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_key = KeyPair::generate()?;
    let ca_key_pem = ca_key.serialize_pem();
    let ca = CertifiedIssuer::self_signed(ca_params, ca_key)?;
    write(&pki.ca_cert, &ca.pem())?;
    write(&pki.ca_key, &ca_key_pem)?;

    // Serving cert: loopback plus the in-cluster names and the first service IP.
    let mut serving = CertificateParams::new(vec![
        "localhost".to_string(),
        "kubernetes".to_string(),
        "kubernetes.default".to_string(),
        "kubernetes.default.svc".to_string(),
        "kubernetes.default.svc.cluster.local".to_string(),
    ])?;
    serving
        .subject_alt_names
        .push(SanType::IpAddress([127, 0, 0, 1].into()));
    serving
        .subject_alt_names
        .push(SanType::IpAddress([10, 96, 0, 1].into()));
    for ip in apiserver_ips {
        serving
            .subject_alt_names
            .push(SanType::IpAddress((*ip).into()));
    }
    serving
        .distinguished_name
        .push(DnType::CommonName, "kube-apiserver");
    serving.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let serving_key = KeyPair::generate()?;
    write(
        &pki.apiserver_cert,
        &serving.signed_by(&serving_key, &ca)?.pem(),
    )?;
    write(&pki.apiserver_key, &serving_key.serialize_pem())?;

    let mut admin = CertificateParams::new(Vec::<String>::new())?;
    admin.distinguished_name.push(DnType::CommonName, "admin");
    admin
        .distinguished_name
        .push(DnType::OrganizationName, "system:masters");
    admin.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let admin_key = KeyPair::generate()?;
    write(&pki.admin_cert, &admin.signed_by(&admin_key, &ca)?.pem())?;
    write(&pki.admin_key, &admin_key.serialize_pem())?;

    let client = |cn: &str, org: Option<&str>, cert: &Path, key: &Path| -> anyhow::Result<()> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, cn);
        if let Some(o) = org {
            params.distinguished_name.push(DnType::OrganizationName, o);
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let k = KeyPair::generate()?;
        write(cert, &params.signed_by(&k, &ca)?.pem())?;
        write(key, &k.serialize_pem())?;
        Ok(())
    };
    client(
        "kube-apiserver-kubelet-client",
        Some("system:masters"),
        &pki.kubelet_client_cert,
        &pki.kubelet_client_key,
    )?;
    client(
        "system:kube-proxy",
        None,
        &pki.kube_proxy_cert,
        &pki.kube_proxy_key,
    )?;
    for node in nodes {
        let certs = pki.node(&node.name);
        client(
            &format!("system:node:{}", node.name),
            Some("system:nodes"),
            &certs.client_cert,
            &certs.client_key,
        )?;
        let mut params = CertificateParams::new(vec![node.name.clone()])?;
        params
            .subject_alt_names
            .push(SanType::IpAddress(node.ip.into()));
        params
            .distinguished_name
            .push(DnType::CommonName, format!("system:node:{}", node.name));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let k = KeyPair::generate()?;
        write(&certs.serving_cert, &params.signed_by(&k, &ca)?.pem())?;
        write(&certs.serving_key, &k.serialize_pem())?;
    }

    let sa = KeyPair::generate()?;
    write(&pki.sa_key, &sa.serialize_pem())?;
    write(&pki.sa_pub, &sa.public_key_pem())?;
    Ok(pki)
}

fn write(path: &Path, pem: &str) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    std::io::Write::write_all(&mut f, pem.as_bytes())
}

/// An admin kubeconfig with the certificates inlined, so it can be copied anywhere.
pub fn admin_kubeconfig(pki: &Pki, server: &str) -> anyhow::Result<String> {
    let encode = |path: &Path| -> anyhow::Result<String> {
        Ok(base64::engine::general_purpose::STANDARD.encode(std::fs::read(path)?))
    };
    Ok(kubeconfig(
        server,
        "admin",
        KubeconfigCreds::Inline {
            ca: encode(&pki.ca_cert)?,
            cert: encode(&pki.admin_cert)?,
            key: encode(&pki.admin_key)?,
        },
    ))
}

/// How a kubeconfig carries its CA and client certificate.
pub enum KubeconfigCreds<'a> {
    /// Base64 PEM in the file (`*-data`).
    Inline {
        ca: String,
        cert: String,
        key: String,
    },
    /// Paths to PEM files.
    Files {
        ca: &'a Path,
        cert: &'a Path,
        key: &'a Path,
    },
}

/// A one-cluster, one-user kubeconfig for the ground's API server.
pub fn kubeconfig(server: &str, user: &str, creds: KubeconfigCreds) -> String {
    let (ca, cert, key) = match creds {
        KubeconfigCreds::Inline { ca, cert, key } => (
            format!("certificate-authority-data: {ca}"),
            format!("client-certificate-data: {cert}"),
            format!("client-key-data: {key}"),
        ),
        KubeconfigCreds::Files { ca, cert, key } => (
            format!("certificate-authority: {}", ca.display()),
            format!("client-certificate: {}", cert.display()),
            format!("client-key: {}", key.display()),
        ),
    };
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: sluice-e2e
  cluster:
    server: {server}
    {ca}
users:
- name: {user}
  user:
    {cert}
    {key}
contexts:
- name: sluice-e2e
  context:
    cluster: sluice-e2e
    user: {user}
current-context: sluice-e2e
"
    )
}
