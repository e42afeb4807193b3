//! The error of a reconcile or a binder round.

/// Errors of a reconcile or a binder round.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("cannot build pods from the template: {0}")]
    Template(String),
    #[error("serialization: {0}")]
    Serialize(#[from] serde_json::Error),
    /// A bug: the reconcile of this object panicked (contained to it; see
    /// [`crate::panic_guard`]).
    #[error("the reconcile panicked: {0}")]
    Panic(String),
}

impl Error {
    /// Short label for `sluice_inference_reconcile_errors{kind=...}`.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(kube::Error::Api(_)) => "api",
            Error::Kube(_) => "kube",
            Error::Template(_) => "template",
            Error::Serialize(_) => "serialize",
            Error::Panic(_) => "panic",
        }
    }
}
