//! Durations as the user writes them ([`DurationString`]), their grammar, and the CEL
//! rules that bound them in the schema.

use std::borrow::Cow;

use kube::core::{Message, Rule};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A duration such as `500ms`, `30s`, `5m` or `1h30m`.
///
/// Kept as the string the user wrote so that a Release stored before a rule existed
/// still deserializes; the controller parses it with [`parse_duration`] and reports a
/// bad one in status rather than failing to read the object.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(transparent)]
pub struct DurationString(pub String);

impl DurationString {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }
    pub fn parse(&self) -> Result<std::time::Duration, String> {
        parse_duration(&self.0)
    }
}

impl From<&str> for DurationString {
    fn from(s: &str) -> Self {
        Self(s.into())
    }
}

/// The grammar the schema enforces; [`parse_duration`] accepts exactly this.
pub const DURATION_PATTERN: &str = "^([0-9]+(ms|s|m|h))+$";

// Duration bounds as CEL. A string off the grammar is left to the grammar's own rule (the
// `||` short-circuits before `duration()` could fail on it), so the user sees that rule's
// message rather than an evaluation error.

/// `field` may be zero, at most `max`.
pub(crate) fn duration_at_most(field: &str, max: &str) -> Rule {
    Rule::new(format!(
        "!self.matches('{DURATION_PATTERN}') || duration(self) <= duration('{max}')"
    ))
    .message(Message::Message(format!("{field} must be at most {max}")))
}

/// `field` must be above zero and at most `max`.
pub(crate) fn duration_positive_at_most(field: &str, max: &str) -> Rule {
    Rule::new(format!(
        "!self.matches('{DURATION_PATTERN}') || (duration(self) > duration('0s') && duration(self) <= duration('{max}'))"
    ))
    .message(Message::Message(format!(
        "{field} must be longer than 0s and at most {max}"
    )))
}

/// A gate interval: between 1s and 10m.
pub(crate) fn interval_rule(field: &str) -> Rule {
    Rule::new(format!(
        "!self.matches('{DURATION_PATTERN}') || (duration(self) >= duration('1s') && duration(self) <= duration('10m'))"
    ))
    .message(Message::Message(format!(
        "{field} must be between 1s and 10m"
    )))
}

/// `a <op> b` between two optional duration fields of the same object, each with its
/// default when unset.
pub(crate) fn duration_order_rule(
    a: &str,
    a_default: &str,
    op: &str,
    b: &str,
    b_default: &str,
) -> String {
    let val = |f: &str, d: &str| format!("(has(self.{f}) ? self.{f} : '{d}')");
    let (va, vb) = (val(a, a_default), val(b, b_default));
    format!(
        "!{va}.matches('{DURATION_PATTERN}') || !{vb}.matches('{DURATION_PATTERN}') || duration({va}) {op} duration({vb})"
    )
}

impl JsonSchema for DurationString {
    fn schema_name() -> Cow<'static, str> {
        "DurationString".into()
    }
    fn inline_schema() -> bool {
        true
    }
    fn json_schema(_: &mut schemars::generate::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "maxLength": 32,
            "x-kubernetes-validations": [{
                "rule": format!("self.matches('{DURATION_PATTERN}')"),
                "message": "must be a duration such as 500ms, 30s, 5m or 1h30m (units ms, s, m, h)"
            }]
        })
    }
}

/// Durations are the contract's: the operator parses what the user wrote and renders it into
/// the agent's flags in one format that both sides read.
pub use sluice_contract::duration::{MAX_DURATION, format_duration, parse_duration};
