use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{ObjectMeta, Patch};
use serde_json::json;

use super::gather::{pods_of_replica_sets, select};
use super::*;
use crate::pod::keys::REVISION_LABEL;
use crate::release::crd::ReleaseSpec;
use crate::release::crd::{FINALIZER, ReleaseStatus};
use crate::release::plan::ReplicaSetView;
use crate::release::settings::Settings;

#[test]
fn replica_sets_are_owned_labelled_and_injected() {
    let mut release = Release::new(
        "echo",
        serde_yaml::from_str::<ReleaseSpec>("workloadRef: {name: echo}").unwrap(),
    );
    release.metadata.namespace = Some("default".into());
    release.metadata.uid = Some("u-1".into());
    let dep: Deployment = serde_yaml::from_str(r#"
metadata: {name: echo, namespace: default}
spec:
  replicas: 3
  selector: {matchLabels: {app: echo}}
  template:
    metadata: {labels: {app: echo}}
    spec: {containers: [{name: echo, image: "sluice/echo:v1", ports: [{name: http, containerPort: 8080}]}]}
"#).unwrap();
    let settings = Settings::from_spec(&release.spec, "sluice/agent:dev").unwrap();
    let rs = build_replica_set(&release, &dep, &settings, "abc", 2).unwrap();
    assert_eq!(rs.metadata.name.as_deref(), Some("echo-abc"));
    let owner = &rs.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.controller),
        ("Release", Some(true))
    );
    let spec = rs.spec.unwrap();
    let sel = spec.selector.match_labels.unwrap();
    assert_eq!(sel.get("app").map(String::as_str), Some("echo"));
    assert_eq!(sel.get(REVISION_LABEL).map(String::as_str), Some("abc"));
    let t = spec.template.unwrap();
    let labels = t.metadata.unwrap().labels.unwrap();
    // The selector matches the template, as the apiserver requires.
    assert!(sel.iter().all(|(k, v)| labels.get(k) == Some(v)));
    assert_eq!(
        t.spec.unwrap().init_containers.unwrap()[0].name,
        "sluice-agent"
    );
}

fn pod_owned_by(name: &str, rs: &str, rs_uid: &str) -> Pod {
    let mut p = Pod::default();
    p.metadata.name = Some(name.into());
    p.metadata.owner_references = Some(vec![OwnerReference {
        api_version: "apps/v1".into(),
        kind: "ReplicaSet".into(),
        name: rs.into(),
        uid: rs_uid.into(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }]);
    p
}

/// A pod left behind by an earlier Release of the same name (its ReplicaSet, of the
/// same name, is being garbage-collected) is not this Release's pod.
#[test]
fn pods_belong_to_a_replica_set_by_uid_not_by_name() {
    let ours = ReplicaSetView {
        name: "echo-abc".into(),
        uid: "rs-new".into(),
        revision: "abc".into(),
        replicas: 1,
    };
    let pods = [
        pod_owned_by("echo-abc-1", "echo-abc", "rs-new"),
        pod_owned_by("echo-abc-2", "echo-abc", "rs-old"),
    ];
    let names: Vec<String> = pods_of_replica_sets(&pods, &[ours])
        .iter()
        .map(|p| p.name_any())
        .collect();
    assert_eq!(names, ["echo-abc-1"]);
}

fn meta(
    ns: &str,
    name: &str,
    uid: &str,
    labels: &[(&str, &str)],
    owner: Option<(&str, &str)>,
) -> ObjectMeta {
    ObjectMeta {
        namespace: Some(ns.into()),
        name: Some(name.into()),
        uid: Some(uid.into()),
        labels: (!labels.is_empty()).then(|| {
            labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        }),
        owner_references: owner.map(|(kind, uid)| {
            vec![OwnerReference {
                api_version: "v1".into(),
                kind: kind.into(),
                name: "owner".into(),
                uid: uid.into(),
                controller: Some(true),
                block_owner_deletion: Some(true),
            }]
        }),
        ..Default::default()
    }
}

fn rs(m: ObjectMeta) -> Arc<ReplicaSet> {
    Arc::new(ReplicaSet {
        metadata: m,
        ..Default::default()
    })
}

fn pod(m: ObjectMeta) -> Arc<Pod> {
    Arc::new(Pod {
        metadata: m,
        ..Default::default()
    })
}

/// The caches hold every labelled object in scope; a Release gets exactly what a LIST by
/// its label in its namespace gave it: not another Release's, not another namespace's,
/// nothing unlabelled, and (as before) only ReplicaSets it controls and their pods.
#[test]
fn a_release_selects_its_own_objects_from_the_caches() {
    fn echo(rev: &str) -> [(&str, &str); 2] {
        [(RELEASE_LABEL, "echo"), (REVISION_LABEL, rev)]
    }
    let rss = [
        rs(meta(
            "a",
            "echo-v1",
            "rs-1",
            &echo("v1"),
            Some(("Release", "u-echo")),
        )),
        rs(meta(
            "a",
            "echo-v2",
            "rs-2",
            &echo("v2"),
            Some(("Release", "u-echo")),
        )),
        // An earlier Release of the same name (another UID) left it behind.
        rs(meta(
            "a",
            "echo-v0",
            "rs-0",
            &echo("v0"),
            Some(("Release", "u-gone")),
        )),
        // Another Release in the same namespace.
        rs(meta(
            "a",
            "web-v1",
            "rs-web",
            &[(RELEASE_LABEL, "web"), (REVISION_LABEL, "v1")],
            Some(("Release", "u-web")),
        )),
        // The same name in another namespace.
        rs(meta(
            "b",
            "echo-v1",
            "rs-b",
            &echo("v1"),
            Some(("Release", "u-echo")),
        )),
        // Owned, but unlabelled or without a revision: a LIST by label never had it, or
        // it was skipped.
        rs(meta(
            "a",
            "echo-bare",
            "rs-bare",
            &[],
            Some(("Release", "u-echo")),
        )),
        rs(meta(
            "a",
            "echo-norev",
            "rs-norev",
            &[(RELEASE_LABEL, "echo")],
            Some(("Release", "u-echo")),
        )),
        rs(meta("a", "echo-orphan", "rs-orphan", &echo("v3"), None)),
    ];
    let release = [(RELEASE_LABEL, "echo")];
    let pods = [
        pod(meta(
            "a",
            "echo-v1-x",
            "p1",
            &release,
            Some(("ReplicaSet", "rs-1")),
        )),
        pod(meta(
            "a",
            "echo-v2-x",
            "p2",
            &release,
            Some(("ReplicaSet", "rs-2")),
        )),
        pod(meta(
            "a",
            "echo-v0-x",
            "p0",
            &release,
            Some(("ReplicaSet", "rs-0")),
        )),
        pod(meta(
            "a",
            "web-v1-x",
            "pw",
            &[(RELEASE_LABEL, "web")],
            Some(("ReplicaSet", "rs-web")),
        )),
        pod(meta(
            "b",
            "echo-v1-x",
            "pb",
            &release,
            Some(("ReplicaSet", "rs-1")),
        )),
        pod(meta("a", "bare", "pn", &[], Some(("ReplicaSet", "rs-1")))),
        pod(meta(
            "a",
            "mislabelled",
            "pm",
            &[(RELEASE_LABEL, "web")],
            Some(("ReplicaSet", "rs-1")),
        )),
        pod(meta("a", "unowned", "pu", &release, None)),
    ];
    let (sets, ours) = select(&rss, &pods, "a", "echo", "u-echo");
    let names: Vec<(&str, &str)> = sets
        .iter()
        .map(|r| (r.name.as_str(), r.revision.as_str()))
        .collect();
    assert_eq!(names, [("echo-v1", "v1"), ("echo-v2", "v2")]);
    let pod_names: Vec<String> = ours.iter().map(|p| p.name_any()).collect();
    assert_eq!(pod_names, ["echo-v1-x", "echo-v2-x"]);

    let (sets, ours) = select(&rss, &pods, "a", "web", "u-web");
    assert_eq!(sets.len(), 1);
    assert_eq!(sets[0].name, "web-v1");
    let pod_names: Vec<String> = ours.iter().map(|p| p.name_any()).collect();
    assert_eq!(pod_names, ["web-v1-x"]);

    // A Release with nothing yet, and empty caches.
    assert!(select(&rss, &pods, "a", "new", "u-new").0.is_empty());
    let (sets, ours) = select(&[], &[], "a", "echo", "u-echo");
    assert!(sets.is_empty() && ours.is_empty());
}

/// A panic in one reconcile comes back as that reconcile's error, with its own
/// metric label; the caller (and the process) goes on.
#[test]
fn a_panicking_reconcile_becomes_an_error() {
    let res: Result<i32, Error> = futures::executor::block_on(contain_panic(async {
        let steps: Vec<i32> = Vec::new();
        let i = steps.len() + 3;
        Ok(steps[i])
    }));
    let err = res.unwrap_err();
    assert_eq!(err.metric_label(), "panic");
    assert!(err.to_string().contains("index out of bounds"), "{err}");
    let res: Result<(), Error> =
        futures::executor::block_on(contain_panic(async { panic!("boom {}", 7) }));
    assert!(res.unwrap_err().to_string().contains("boom 7"));
    let fine: Result<i32, Error> = futures::executor::block_on(contain_panic(async { Ok(4) }));
    assert_eq!(fine.unwrap(), 4);
}

#[test]
fn a_panic_is_reported_in_the_status_and_keeps_the_rest() {
    let prev = ReleaseStatus {
        current_step: Some(2),
        stable_revision: Some("v1".into()),
        ..Default::default()
    };
    let st = panic_status(&prev, 3, "index out of bounds", 1_700_000_000.0);
    assert_eq!(st.current_step, Some(2));
    assert_eq!(st.stable_revision.as_deref(), Some("v1"));
    let degraded = st
        .conditions
        .iter()
        .find(|c| c.type_ == "Degraded")
        .unwrap();
    assert_eq!(
        (degraded.status.as_str(), degraded.reason.as_str()),
        ("True", "ReconcilePanicked")
    );
    assert!(degraded.message.contains("index out of bounds"));
    assert_eq!(degraded.observed_generation, Some(3));
    let ready = st.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
    assert_eq!(ready.status, "False");
}

/// The finalizer patches test the list they were built from, so a finalizer another
/// controller wrote meanwhile is never lost (a merge patch of the whole list would
/// drop it).
#[test]
fn finalizer_patches_test_the_list_they_change() {
    let add = add_finalizer_patch(&[]);
    assert_eq!(
        add,
        json!([
            {"op": "test", "path": "/metadata/finalizers", "value": null},
            {"op": "add", "path": "/metadata/finalizers", "value": [FINALIZER]},
        ])
    );
    let others = vec!["example.com/keep".to_string()];
    let add = add_finalizer_patch(&others);
    assert_eq!(
        add,
        json!([
            {"op": "test", "path": "/metadata/finalizers", "value": ["example.com/keep"]},
            {"op": "add", "path": "/metadata/finalizers/-", "value": FINALIZER},
        ])
    );
    let current = vec![
        "example.com/keep".to_string(),
        FINALIZER.to_string(),
        "example.com/other".to_string(),
    ];
    assert_eq!(
        remove_finalizer_patch(&current).unwrap(),
        json!([
            {"op": "test", "path": "/metadata/finalizers/1", "value": FINALIZER},
            {"op": "remove", "path": "/metadata/finalizers/1"},
        ])
    );
    assert_eq!(remove_finalizer_patch(&others), None);
    // What the client sends: a well-formed RFC 6902 patch.
    for p in [add, remove_finalizer_patch(&current).unwrap()] {
        let patch = Patch::<()>::Json(serde_json::from_value(p).unwrap());
        assert!(matches!(patch, Patch::Json(_)));
    }
}

#[test]
fn error_labels() {
    assert_eq!(Error::MissingField("x").metric_label(), "invalid_object");
    assert_eq!(
        Error::NoTemplate("x".into()).metric_label(),
        "invalid_workload"
    );
}

#[test]
fn a_release_triggers_a_round_on_spec_annotations_and_finalizers_not_on_its_status() {
    let mut base = Release::new(
        "echo",
        serde_yaml::from_str::<ReleaseSpec>("workloadRef: {name: echo}").unwrap(),
    );
    base.metadata.namespace = Some("default".into());
    base.metadata.generation = Some(3);
    base.metadata.resource_version = Some("100".into());
    let trigger = release_trigger();
    let hash = |r: &Release| trigger.hash_property(r);

    // The operator's own status write: a new resourceVersion, a new status, nothing else.
    let mut status_only = base.clone();
    status_only.metadata.resource_version = Some("101".into());
    status_only.status = Some(ReleaseStatus {
        phase: Some(crate::release::crd::Phase::Progressing),
        ..Default::default()
    });
    assert_eq!(hash(&base), hash(&status_only));

    let mut spec = base.clone();
    spec.metadata.generation = Some(4);
    assert_ne!(hash(&base), hash(&spec));

    let mut promote = base.clone();
    promote
        .annotations_mut()
        .insert(crate::release::crd::PROMOTE_ANNOTATION.into(), "1".into());
    assert_ne!(hash(&base), hash(&promote));

    let mut finalizer = base.clone();
    finalizer.finalizers_mut().push(FINALIZER.into());
    assert_ne!(hash(&base), hash(&finalizer));
}
