//! The status condition both resources report (kstatus-compatible: Ready, Progressing,
//! Degraded).
//!
//! Not `metav1::Condition`: its schema marks every field required and formats the time as
//! `date-time`, which would change the CRDs' status schema; this type keeps the schema the
//! CRDs publish.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A kstatus-compatible condition.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    pub reason: String,
    #[serde(default)]
    pub message: String,
    /// RFC 3339.
    pub last_transition_time: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}
