use super::*;
use crate::pod::inject::{AGENT_CONTAINER, restricted_violations};

/// An InferenceSet's pods get the agent through the same injection as a Release's,
/// `restricted`-compliant too.
#[test]
fn the_agent_in_inference_pods_is_restricted_compliant() {
    let set: InferenceSet = serde_json::from_value(serde_json::json!({
        "apiVersion": "sluice.dev/v1alpha1",
        "kind": "InferenceSet",
        "metadata": {"name": "llm", "namespace": "ml", "uid": "u-1"},
        "spec": {
            "replicas": 1,
            "podsPerReplica": 1,
            "gpusPerPod": 1,
            "agent": {},
            "template": {"spec": {"containers": [{"name": "m", "image": "x", "ports": [{"name": "http", "containerPort": 8000}]}]}}
        }
    }))
    .unwrap();
    let images = AgentImagePolicy::only("sluice/agent:dev");
    let pod = build_pod(&set, "g0", 0, "rev", 0, &images).unwrap();
    let spec = pod.spec.unwrap();
    let agent = spec
        .init_containers
        .iter()
        .flatten()
        .find(|c| c.name == AGENT_CONTAINER)
        .expect("the agent is injected");
    assert_eq!(restricted_violations(agent), Vec::<String>::new());
    let ports: Vec<i32> = agent
        .ports
        .iter()
        .flatten()
        .map(|p| p.container_port)
        .collect();
    assert!(ports.contains(&15101), "{ports:?}");
    // An image the operator does not allow is not injected.
    let mut other = set.clone();
    other.spec.agent.as_mut().unwrap().image = Some("evil.example/miner:1".into());
    let err = build_pod(&other, "g0", 0, "rev", 0, &images).unwrap_err();
    assert!(err.to_string().contains("is not allowed"), "{err}");
}
