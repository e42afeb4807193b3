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
        }
    }
}

/// Writes a fresh PKI into `dir` (which it creates).
pub fn generate(dir: &Path) -> anyhow::Result<Pki> {
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
    let encode = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    let ca = encode(&std::fs::read(&pki.ca_cert)?);
    let cert = encode(&std::fs::read(&pki.admin_cert)?);
    let key = encode(&std::fs::read(&pki.admin_key)?);
    Ok(format!(
        "apiVersion: v1
kind: Config
clusters:
- name: sluice-e2e
  cluster:
    server: {server}
    certificate-authority-data: {ca}
users:
- name: admin
  user:
    client-certificate-data: {cert}
    client-key-data: {key}
contexts:
- name: sluice-e2e
  context:
    cluster: sluice-e2e
    user: admin
current-context: sluice-e2e
"
    ))
}
