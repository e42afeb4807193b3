//! Label, annotation and condition keys on the pods both controllers run.

/// Readiness-gate condition type the operator owns on every pod it runs.
pub const SERVING_CONDITION: &str = "sluice.dev/serving";
/// Label on pods (and a Release's ReplicaSets): the revision of the template they run
/// (see [`super::revision::revision_hash`]).
pub const REVISION_LABEL: &str = "sluice.dev/revision";
/// Pod annotation: when the operator took the pod out of service (RFC 3339).
pub const DRAIN_STARTED_ANNOTATION: &str = "sluice.dev/drain-started";
/// Label on a Release's pods and ReplicaSets: the Release that owns them.
pub const RELEASE_LABEL: &str = "sluice.dev/release";
/// Label on an InferenceSet's pods: the InferenceSet that owns them.
pub const SET_LABEL: &str = "sluice.dev/inferenceset";
