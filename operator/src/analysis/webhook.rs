//! Webhooks in Flagger's shape: gates called before, during and after a rollout, a
//! rollback hook, and fire-and-forget `event` notifications of phase changes. Each call
//! POSTs `{name, namespace, phase, metadata}` as JSON; a 2xx answer means yes.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;
use tokio::sync::Semaphore;

use super::http::{HttpClient, HttpError, check_url};
use super::import::{ImportError, field_duration, field_str};

/// Most retries a hook may ask for.
pub const MAX_RETRIES: u32 = 5;
/// Longest timeout a hook may ask for.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(300);
/// Timeout when the hook gives none (Flagger's default).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// When a hook is called, and what its answer means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HookType {
    /// Before the first step: a no halts the release.
    PreRollout,
    /// At every step: a no halts the step (counted as a failed check).
    Rollout,
    /// After the release completes or fails: the answer is only reported.
    PostRollout,
    /// During the release: a **yes** (2xx) rolls the release back.
    Rollback,
    /// On every phase change, fire-and-forget.
    Event,
}

impl HookType {
    pub const SUPPORTED: &'static str = "pre-rollout, rollout, post-rollout, rollback, event";

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "pre-rollout" => HookType::PreRollout,
            "rollout" | "" => HookType::Rollout,
            "post-rollout" => HookType::PostRollout,
            "rollback" => HookType::Rollback,
            "event" => HookType::Event,
            _ => return None,
        })
    }
}

/// One webhook.
#[derive(Debug, Clone, PartialEq)]
pub struct Webhook {
    pub name: String,
    pub hook_type: HookType,
    /// A plain `http://` URL.
    pub url: String,
    /// Per attempt.
    pub timeout: Duration,
    pub metadata: BTreeMap<String, String>,
    /// Extra attempts after a 5xx, 429, timeout or connection failure.
    pub retries: u32,
}

impl Webhook {
    /// Reads one entry of Flagger's `analysis.webhooks` (plus an optional `retries`).
    pub fn from_flagger(v: &Value, path: &str) -> Result<Self, ImportError> {
        let name = field_str(v, path, "name")?.to_string();
        let type_path = format!("{path}.type");
        let hook_type = match v.get("type") {
            None => HookType::Rollout,
            Some(t) => t
                .as_str()
                .and_then(HookType::parse)
                .ok_or_else(|| ImportError::unsupported(&type_path, t, HookType::SUPPORTED))?,
        };
        let url = field_str(v, path, "url")?.to_string();
        check_url(&url)
            .map_err(|e| ImportError::invalid(&format!("{path}.url"), &e.to_string()))?;
        let timeout = field_duration(v, path, "timeout")?.unwrap_or(DEFAULT_TIMEOUT);
        if timeout.is_zero() || timeout > MAX_TIMEOUT {
            return Err(ImportError::invalid(
                &format!("{path}.timeout"),
                &format!("must be above 0 and at most {MAX_TIMEOUT:?}"),
            ));
        }
        let retries = match v.get("retries") {
            None => 0,
            Some(r) => r
                .as_u64()
                .filter(|r| *r <= u64::from(MAX_RETRIES))
                .ok_or_else(|| {
                    ImportError::invalid(
                        &format!("{path}.retries"),
                        &format!("a whole number from 0 to {MAX_RETRIES}"),
                    )
                })? as u32,
        };
        let mut metadata = BTreeMap::new();
        if let Some(m) = v.get("metadata") {
            let obj = m.as_object().ok_or_else(|| {
                ImportError::invalid(&format!("{path}.metadata"), "a map of strings")
            })?;
            for (k, val) in obj {
                let s = val.as_str().ok_or_else(|| {
                    ImportError::invalid(&format!("{path}.metadata.{k}"), "a string")
                })?;
                metadata.insert(k.clone(), s.to_string());
            }
        }
        Ok(Self {
            name,
            hook_type,
            url,
            timeout,
            metadata,
            retries,
        })
    }
}

/// The JSON body of every call.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HookPayload {
    pub name: String,
    pub namespace: String,
    pub phase: String,
    pub metadata: BTreeMap<String, String>,
}

impl HookPayload {
    /// The payload of an `event` notification, in Flagger's shape: `eventMessage`,
    /// `eventType` (`Warning` for the phases `Failed` and `Aborted`, else `Normal`) and
    /// `timestamp` (Unix milliseconds) in the metadata.
    pub fn phase_change(
        name: &str,
        namespace: &str,
        phase: &str,
        message: &str,
        at: chrono::DateTime<chrono::Utc>,
    ) -> Self {
        let kind = if matches!(phase, "Failed" | "Aborted") {
            "Warning"
        } else {
            "Normal"
        };
        let metadata = [
            ("eventMessage", message.to_string()),
            ("eventType", kind.to_string()),
            ("timestamp", at.timestamp_millis().to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        Self {
            name: name.into(),
            namespace: namespace.into(),
            phase: phase.into(),
            metadata,
        }
    }
}

/// One attempt's result.
#[derive(Debug, Clone, PartialEq)]
pub enum Attempt {
    Answered { status: u16, body: String },
    Timeout(Duration),
    Failed(String),
}

impl Attempt {
    pub fn is_yes(&self) -> bool {
        matches!(self, Attempt::Answered { status, .. } if (200..300).contains(status))
    }

    /// Worth another try: 5xx, 429, no answer.
    pub fn is_transient(&self) -> bool {
        match self {
            Attempt::Answered { status, .. } => *status >= 500 || *status == 429,
            Attempt::Timeout(_) | Attempt::Failed(_) => true,
        }
    }
}

/// Every attempt of one call, in order; the last one counts.
#[derive(Debug, Clone, PartialEq)]
pub struct HookOutcome {
    pub attempts: Vec<Attempt>,
}

impl HookOutcome {
    pub fn is_yes(&self) -> bool {
        self.attempts.last().is_some_and(Attempt::is_yes)
    }

    pub fn describe(&self) -> String {
        match self.attempts.last() {
            Some(Attempt::Answered { status, body }) if body.is_empty() => format!("HTTP {status}"),
            Some(Attempt::Answered { status, body }) => format!("HTTP {status}: {body}"),
            Some(Attempt::Timeout(t)) => format!("no answer within {t:?}"),
            Some(Attempt::Failed(e)) => e.clone(),
            None => "not called".into(),
        }
    }
}

/// What the release does after a hook answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HookDecision {
    Proceed,
    /// Do not advance now (a pre-rollout or rollout gate said no).
    Halt(String),
    /// Roll the release back (a rollback hook said yes).
    RollBack(String),
}

/// Decides what a hook's outcome means for the release (pure).
pub fn decide(hook: &Webhook, outcome: &HookOutcome) -> HookDecision {
    let what = || format!("webhook {}: {}", hook.name, outcome.describe());
    match hook.hook_type {
        HookType::PreRollout | HookType::Rollout if !outcome.is_yes() => HookDecision::Halt(what()),
        HookType::Rollback if outcome.is_yes() => HookDecision::RollBack(what()),
        _ => HookDecision::Proceed,
    }
}

/// Wait before retry number `retry` (0-based): 1 s, 2 s, 4 s … at most 10 s.
pub fn backoff(base: Duration, retry: u32) -> Duration {
    base.saturating_mul(1 << retry.min(10))
        .min(Duration::from_secs(10))
}

/// Calls webhooks.
#[derive(Clone)]
pub struct WebhookClient {
    http: HttpClient,
    /// First retry's wait (doubles per retry, capped at 10 s).
    pub base_backoff: Duration,
    events_in_flight: Arc<Semaphore>,
}

impl Default for WebhookClient {
    fn default() -> Self {
        Self::new(Duration::from_secs(1), 16)
    }
}

impl WebhookClient {
    /// `max_events_in_flight` bounds the event notifications not yet answered; more are
    /// dropped.
    pub fn new(base_backoff: Duration, max_events_in_flight: usize) -> Self {
        Self {
            http: HttpClient::new(),
            base_backoff,
            events_in_flight: Arc::new(Semaphore::new(max_events_in_flight)),
        }
    }

    async fn attempt(&self, hook: &Webhook, body: &[u8]) -> Attempt {
        match self
            .http
            .send(
                hyper::Method::POST,
                &hook.url,
                &[],
                Some(("application/json", body.to_vec())),
                hook.timeout,
            )
            .await
        {
            Ok((status, body)) => Attempt::Answered {
                status: status.as_u16(),
                body: String::from_utf8_lossy(&body[..body.len().min(256)]).into_owned(),
            },
            Err(HttpError::Timeout(t)) => Attempt::Timeout(t),
            Err(e) => Attempt::Failed(e.to_string()),
        }
    }

    /// Calls a gate hook, retrying transient failures up to `hook.retries` times with
    /// backoff. Takes at most `(retries + 1) × timeout` plus the backoffs.
    pub async fn call(&self, hook: &Webhook, payload: &HookPayload) -> HookOutcome {
        let body = hook_body(hook, payload);
        let mut attempts = Vec::new();
        for retry in 0..=hook.retries.min(MAX_RETRIES) {
            if retry > 0 {
                tokio::time::sleep(backoff(self.base_backoff, retry - 1)).await;
            }
            let a = self.attempt(hook, &body).await;
            let again = a.is_transient();
            attempts.push(a);
            if !again {
                break;
            }
        }
        HookOutcome { attempts }
    }

    /// Fires the `event` hooks for a phase change without waiting: one attempt each,
    /// bounded by the hook's timeout. Returns how many were sent; the rest (when too many
    /// are still in flight, or outside a Tokio runtime) are dropped.
    pub fn notify(&self, hooks: &[Webhook], payload: &HookPayload) -> usize {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return 0;
        };
        let mut sent = 0;
        for hook in hooks.iter().filter(|h| h.hook_type == HookType::Event) {
            let Ok(permit) = self.events_in_flight.clone().try_acquire_owned() else {
                tracing::warn!(hook = %hook.name, "event webhook dropped: too many in flight");
                continue;
            };
            let (this, hook, body) = (self.clone(), hook.clone(), hook_body(hook, payload));
            rt.spawn(async move {
                let a = this.attempt(&hook, &body).await;
                if !a.is_yes() {
                    tracing::info!(hook = %hook.name, outcome = ?a, "event webhook not accepted");
                }
                drop(permit);
            });
            sent += 1;
        }
        sent
    }
}

/// The payload with the hook's own metadata merged in (the payload's keys win).
fn hook_body(hook: &Webhook, payload: &HookPayload) -> Vec<u8> {
    let mut p = payload.clone();
    for (k, v) in &hook.metadata {
        p.metadata.entry(k.clone()).or_insert_with(|| v.clone());
    }
    serde_json::to_vec(&p).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn hook(t: HookType) -> Webhook {
        Webhook {
            name: "h".into(),
            hook_type: t,
            url: "http://127.0.0.1:1/".into(),
            timeout: Duration::from_secs(1),
            metadata: BTreeMap::new(),
            retries: 0,
        }
    }

    fn outcome(a: Attempt) -> HookOutcome {
        HookOutcome { attempts: vec![a] }
    }

    #[test]
    fn decisions_follow_flagger() {
        let ok = outcome(Attempt::Answered {
            status: 200,
            body: String::new(),
        });
        let no = outcome(Attempt::Answered {
            status: 403,
            body: "closed".into(),
        });
        let silent = outcome(Attempt::Timeout(Duration::from_secs(1)));
        for t in [HookType::PreRollout, HookType::Rollout] {
            assert_eq!(decide(&hook(t), &ok), HookDecision::Proceed);
            assert_eq!(
                decide(&hook(t), &no),
                HookDecision::Halt("webhook h: HTTP 403: closed".into())
            );
            assert!(matches!(decide(&hook(t), &silent), HookDecision::Halt(_)));
        }
        assert!(matches!(
            decide(&hook(HookType::Rollback), &ok),
            HookDecision::RollBack(_)
        ));
        assert_eq!(
            decide(&hook(HookType::Rollback), &no),
            HookDecision::Proceed
        );
        for t in [HookType::PostRollout, HookType::Event] {
            assert_eq!(decide(&hook(t), &no), HookDecision::Proceed);
        }
        let retried = HookOutcome {
            attempts: vec![
                Attempt::Answered {
                    status: 500,
                    body: String::new(),
                },
                ok.attempts[0].clone(),
            ],
        };
        assert!(retried.is_yes());
    }

    #[test]
    fn only_transient_failures_are_retried() {
        let ans = |status| Attempt::Answered {
            status,
            body: String::new(),
        };
        assert!(ans(500).is_transient());
        assert!(ans(503).is_transient());
        assert!(ans(429).is_transient());
        assert!(!ans(404).is_transient());
        assert!(!ans(200).is_transient());
        assert!(Attempt::Timeout(Duration::ZERO).is_transient());
        assert!(Attempt::Failed("refused".into()).is_transient());
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        let b = Duration::from_secs(1);
        assert_eq!(backoff(b, 0), Duration::from_secs(1));
        assert_eq!(backoff(b, 2), Duration::from_secs(4));
        assert_eq!(backoff(b, 30), Duration::from_secs(10));
    }

    #[test]
    fn flagger_webhooks_parse() {
        let v = json!({"name": "load-test", "type": "rollout", "url": "http://flagger-loadtester.test/",
            "timeout": "5s", "metadata": {"cmd": "hey -z 1m -q 10 http://podinfo-canary.test:9898/"}});
        let h = Webhook::from_flagger(&v, "webhooks[0]").expect("parses");
        assert_eq!(h.hook_type, HookType::Rollout);
        assert_eq!(h.timeout, Duration::from_secs(5));
        assert_eq!(h.metadata.len(), 1);
        let pre =
            json!({"name": "gate", "type": "pre-rollout", "url": "http://gate/", "retries": 2});
        let h = Webhook::from_flagger(&pre, "w").expect("parses");
        assert_eq!(
            (h.hook_type, h.retries, h.timeout),
            (HookType::PreRollout, 2, DEFAULT_TIMEOUT)
        );
    }

    #[test]
    fn unsupported_webhooks_are_rejected_by_field() {
        for (v, needle) in [
            (
                json!({"name": "a", "type": "confirm-promotion", "url": "http://x/"}),
                "w.type",
            ),
            (json!({"name": "a", "url": "https://x/"}), "w.url"),
            (
                json!({"name": "a", "url": "http://x/", "timeout": "forever"}),
                "w.timeout",
            ),
            (
                json!({"name": "a", "url": "http://x/", "timeout": "1h"}),
                "w.timeout",
            ),
            (
                json!({"name": "a", "url": "http://x/", "retries": 9}),
                "w.retries",
            ),
            (
                json!({"name": "a", "url": "http://x/", "metadata": {"n": 1}}),
                "w.metadata.n",
            ),
            (json!({"url": "http://x/"}), "w.name"),
        ] {
            let e = Webhook::from_flagger(&v, "w")
                .expect_err(needle)
                .to_string();
            assert!(e.contains(needle), "{e}");
        }
    }

    #[test]
    fn the_body_merges_hook_metadata() {
        let mut h = hook(HookType::Event);
        h.metadata.insert("team".into(), "shop".into());
        h.metadata.insert("eventType".into(), "ignored".into());
        let mut metadata = BTreeMap::new();
        metadata.insert("eventType".into(), "Normal".into());
        let p = HookPayload {
            name: "web".into(),
            namespace: "shop".into(),
            phase: "Progressing".into(),
            metadata,
        };
        let body: Value = serde_json::from_slice(&hook_body(&h, &p)).expect("json");
        assert_eq!(
            body,
            json!({"name": "web", "namespace": "shop", "phase": "Progressing",
                   "metadata": {"eventType": "Normal", "team": "shop"}})
        );
    }

    #[test]
    fn phase_changes_carry_flagger_event_metadata() {
        let at = chrono::DateTime::from_timestamp_millis(1_735_689_600_000).expect("time");
        let p = HookPayload::phase_change("web", "shop", "Aborted", "gate health failed", at);
        assert_eq!(p.metadata["eventType"], "Warning");
        assert_eq!(p.metadata["eventMessage"], "gate health failed");
        assert_eq!(p.metadata["timestamp"], "1735689600000");
        let ok = HookPayload::phase_change("web", "shop", "Succeeded", "done", at);
        assert_eq!(ok.metadata["eventType"], "Normal");
    }

    #[test]
    fn notify_outside_a_runtime_sends_nothing() {
        let c = WebhookClient::default();
        let p = HookPayload {
            name: "a".into(),
            namespace: "b".into(),
            phase: "c".into(),
            metadata: BTreeMap::new(),
        };
        assert_eq!(c.notify(&[hook(HookType::Event)], &p), 0);
    }
}
