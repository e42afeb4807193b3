//! Pods that ended without their agent having drained, for both controllers.
//!
//! When a termination signal finds the agent still serving (the kubelet's preStop `/drain`
//! was refused, the hook was removed, or the pod was deleted with a zero grace period), the
//! agent logs an error and leaves [`UNDRAINED_TERMINATION_MESSAGE`] as its container's
//! termination message. The kubelet copies it into the pod's status, which the watch sees
//! before the pod is gone, however short its end was: no scrape has to land in time. Each
//! such pod becomes a Warning Event `PodLeftUndrained` on the pod and a count in
//! `sluice_pods_left_undrained_total{owner}`.

use std::collections::HashSet;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use sluice_contract::UNDRAINED_TERMINATION_MESSAGE;

use super::inject::AGENT_CONTAINER;
use super::keys::{RELEASE_LABEL, REVISION_LABEL, SET_LABEL};

/// Which controller's pod it was.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OwnerLabels {
    pub owner: &'static str,
}

/// `sluice_pods_left_undrained_total{owner="Release"|"InferenceSet"}`.
#[derive(Clone, Default)]
pub struct UndrainedMetrics {
    pub left_undrained: Family<OwnerLabels, Counter>,
}

pub fn register(registry: &mut Registry) -> UndrainedMetrics {
    let m = UndrainedMetrics::default();
    registry.register(
        "pods_left_undrained",
        "Pods whose agent got its termination signal before any drain (preStop /drain refused or missing): their connections closed without waiting for load balancers",
        m.left_undrained.clone(),
    );
    m
}

/// The agent container ended with the undrained message (pure). The injected agent is a
/// native sidecar (an init container); an agent added to `containers` counts too.
pub fn left_undrained(pod: &Pod) -> bool {
    let Some(status) = pod.status.as_ref() else {
        return false;
    };
    let inits = status.init_container_statuses.iter().flatten();
    inits
        .chain(status.container_statuses.iter().flatten())
        .filter(|c| c.name == AGENT_CONTAINER)
        .filter_map(|c| {
            let state = c.state.as_ref()?.terminated.as_ref()?;
            state.message.as_deref()
        })
        .any(|m| m.trim_end().starts_with(UNDRAINED_TERMINATION_MESSAGE))
}

/// Which controller owns the pod, by its labels (pure).
pub fn owner_of(pod: &Pod) -> &'static str {
    let labels = pod.labels();
    if labels.contains_key(RELEASE_LABEL) {
        "Release"
    } else if labels.contains_key(SET_LABEL) {
        "InferenceSet"
    } else {
        "unknown"
    }
}

/// Pods reported once each, forgotten when they are deleted.
#[derive(Default)]
pub struct Reported {
    uids: HashSet<String>,
}

impl Reported {
    /// Whether `pod` is to be reported now (undrained and not reported before).
    pub fn first_sight(&mut self, pod: &Pod) -> bool {
        let Some(uid) = pod.uid() else { return false };
        left_undrained(pod) && self.uids.insert(uid)
    }

    pub fn forget(&mut self, pod: &Pod) {
        if let Some(uid) = pod.uid() {
            self.uids.remove(&uid);
        }
    }
}

/// Watches the pods of both controllers (those with a revision label) until dropped.
pub async fn run(
    client: Client,
    scope: Option<String>,
    identity: Option<String>,
    metrics: UndrainedMetrics,
) {
    let api: Api<Pod> = match &scope {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let recorder = Recorder::new(
        client,
        Reporter {
            controller: "sluice-operator".into(),
            instance: identity,
        },
    );
    let mut reported = Reported::default();
    let mut events = watcher(api, watcher::Config::default().labels(REVISION_LABEL))
        .default_backoff()
        .boxed();
    while let Some(event) = events.next().await {
        let (pod, deleted) = match event {
            Ok(watcher::Event::Apply(p) | watcher::Event::InitApply(p)) => (p, false),
            Ok(watcher::Event::Delete(p)) => (p, true),
            Ok(_) => continue,
            Err(err) => {
                tracing::debug!(error = %err, "pod watch");
                continue;
            }
        };
        if reported.first_sight(&pod) {
            report(&recorder, &metrics, &pod).await;
        }
        if deleted {
            reported.forget(&pod);
        }
    }
}

async fn report(recorder: &Recorder, metrics: &UndrainedMetrics, pod: &Pod) {
    let owner = owner_of(pod);
    metrics
        .left_undrained
        .get_or_create(&OwnerLabels { owner })
        .inc();
    let name = pod.name_any();
    let ns = pod.namespace().unwrap_or_default();
    tracing::error!(pod = %name, namespace = %ns, owner, "pod ended without its agent having drained: its connections closed without waiting for load balancers");
    let ev = Event {
        type_: EventType::Warning,
        reason: "PodLeftUndrained".into(),
        note: Some(
            "the agent got its termination signal before any drain (the preStop /drain was refused or did not run): connections closed without waiting for load balancers; check the pod's preStop hook and drain token".into(),
        ),
        action: "Drain".into(),
        secondary: None,
    };
    if let Err(err) = recorder.publish(&ev, &pod.object_ref(&())).await {
        tracing::warn!(error = %err, pod = %name, "could not publish event");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A pod with the agent as a native sidecar (as injected) whose state carries `message`.
    fn pod(uid: &str, labels: serde_json::Value, message: Option<&str>) -> Pod {
        let state = match message {
            Some(m) => json!({"terminated": {"exitCode": 0, "message": m}}),
            None => json!({"running": {}}),
        };
        serde_json::from_value(json!({
            "metadata": {"name": "p", "namespace": "ns", "uid": uid, "labels": labels},
            "status": {
                "initContainerStatuses": [
                    {"name": AGENT_CONTAINER, "image": "s", "imageID": "", "ready": false, "restartCount": 0,
                     "state": state},
                ],
                "containerStatuses": [
                    {"name": "app", "image": "a", "imageID": "", "ready": false, "restartCount": 0,
                     "state": {"terminated": {"exitCode": 0, "message": UNDRAINED_TERMINATION_MESSAGE}}},
                ],
            },
        }))
        .unwrap()
    }

    #[test]
    fn only_the_agents_undrained_message_counts() {
        let rel = json!({RELEASE_LABEL: "r", REVISION_LABEL: "x"});
        assert!(left_undrained(&pod(
            "1",
            rel.clone(),
            Some(UNDRAINED_TERMINATION_MESSAGE)
        )));
        // The app container's message is the app's business.
        assert!(!left_undrained(&pod("1", rel.clone(), None)));
        assert!(!left_undrained(&pod("1", rel, Some("exited"))));
    }

    #[test]
    fn owner_comes_from_the_controllers_labels() {
        let m = Some(UNDRAINED_TERMINATION_MESSAGE);
        assert_eq!(
            owner_of(&pod("1", json!({RELEASE_LABEL: "r"}), m)),
            "Release"
        );
        assert_eq!(
            owner_of(&pod("1", json!({SET_LABEL: "s"}), m)),
            "InferenceSet"
        );
        assert_eq!(owner_of(&pod("1", json!({}), m)), "unknown");
    }

    #[test]
    fn each_pod_is_reported_once_until_deleted() {
        let mut r = Reported::default();
        let p = pod(
            "u1",
            json!({RELEASE_LABEL: "r"}),
            Some(UNDRAINED_TERMINATION_MESSAGE),
        );
        assert!(r.first_sight(&p));
        assert!(!r.first_sight(&p));
        r.forget(&p);
        assert!(r.first_sight(&p));
        let drained = pod("u2", json!({RELEASE_LABEL: "r"}), None);
        assert!(!r.first_sight(&drained));
    }
}
