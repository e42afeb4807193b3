//! The watch caches a reconcile reads Deployments, ReplicaSets and pods from, and how a
//! round knows whether they already show this Release's own last writes.
//!
//! One reflector per kind: ReplicaSets and pods labelled [`RELEASE_LABEL`], and every
//! Deployment (a Release names its Deployment, which carries no label of ours), in the
//! watched scope; the same streams trigger the Controller, so each kind is watched once.
//!
//! A cache lags the API by at least one watch event. Right after a round patched a pod
//! (drain started, released, serving), created/scaled a ReplicaSet or claimed/scaled the
//! Deployment, the next round could see the old object and act again: start the same
//! drain twice (a second record, the drain clock reset), release a pod twice, scale the
//! Deployment to 0 twice. So every write's returned `resourceVersion` is
//! remembered per Release ([`Stores::wrote`]), each cache keeps the highest
//! `resourceVersion` it has applied (watch events arrive in that order), and a round whose
//! Release wrote something its cache has not applied yet reads through the API instead
//! ([`Stores::caught_up`]), exactly as every round did before the caches.
//!
//! The Release itself is read from the Controller's own cache the same way: a round plans
//! from the status it wrote last, so the newest `resourceVersion` of the Release the
//! operator wrote or read is remembered, and a round whose cached copy is older reads the
//! Release through the API ([`Stores::release_current`]). Most rounds then make no read.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use futures::{FutureExt, Stream, StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};

use crate::release::crd::RELEASE_LABEL;

use super::status_writes::StatusWrites;

/// The caches, their progress, and the writes not yet seen in them.
pub(super) struct Stores {
    pub(super) deployments: Store<Deployment>,
    pub(super) replica_sets: Store<ReplicaSet>,
    pub(super) pods: Store<Pod>,
    deployments_seen: Arc<AtomicU64>,
    rs_seen: Arc<AtomicU64>,
    pods_seen: Arc<AtomicU64>,
    /// Per Release (namespace, name): the highest `resourceVersion` it wrote per kind.
    written: Mutex<HashMap<(String, String), Written>>,
    /// Per Release: the newest `resourceVersion` of the Release object the operator wrote
    /// or read (`u64::MAX`: a write whose version is unknown).
    release_seen: Mutex<HashMap<(String, String), u64>>,
    /// Which status changes are written now and which wait (`status_writes.rs`).
    pub(super) status_writes: StatusWrites,
}

/// What a Release's rounds wrote that the caches may not show yet.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Written {
    deployments: u64,
    replica_sets: u64,
    pods: u64,
    /// A write whose resulting version is unknown (a delete that answered with a
    /// `Status`, a non-numeric `resourceVersion`): the next round reads through the API.
    unknown: bool,
}

/// Which cache a write lands in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    Deployment,
    ReplicaSet,
    Pod,
}

/// The watch streams that fill the caches; the Controller polls them as its triggers
/// (nothing else does), so the caches fill only while the Controller runs.
pub(super) type Trigger<K> =
    std::pin::Pin<Box<dyn Stream<Item = Result<K, watcher::Error>> + Send>>;

/// One trigger stream per cache.
pub(super) struct Triggers {
    pub(super) deployments: Trigger<Deployment>,
    pub(super) replica_sets: Trigger<ReplicaSet>,
    pub(super) pods: Trigger<Pod>,
}

impl Stores {
    /// The caches over `deployments`, `rss` and `pods` (their scope: the watched namespace
    /// or all), and the trigger streams that fill them.
    pub(super) fn new(
        deployments: Api<Deployment>,
        rss: Api<ReplicaSet>,
        pods: Api<Pod>,
    ) -> (Self, Triggers) {
        // The same selection the Controller's own watches had: anything a Release labelled.
        let cfg = || watcher::Config::default().labels(RELEASE_LABEL);
        let (dep_store, dep_stream, deployments_seen) =
            reflect(deployments, watcher::Config::default());
        let (rs_store, rs_stream, rs_seen) = reflect(rss, cfg());
        let (pod_store, pod_stream, pods_seen) = reflect(pods, cfg());
        let stores = Stores {
            deployments: dep_store,
            replica_sets: rs_store,
            pods: pod_store,
            deployments_seen,
            rs_seen,
            pods_seen,
            written: Mutex::new(HashMap::new()),
            release_seen: Mutex::new(HashMap::new()),
            status_writes: StatusWrites::default(),
        };
        let triggers = Triggers {
            deployments: dep_stream,
            replica_sets: rs_stream,
            pods: pod_stream,
        };
        (stores, triggers)
    }

    /// Every cache holds a complete first listing. Before that a round must not plan from
    /// them (an empty cache reads as "no Deployment, no ReplicaSets, no pods").
    pub(super) fn ready(&self) -> bool {
        let ready =
            |f: Option<Result<(), reflector::store::WriterDropped>>| matches!(f, Some(Ok(())));
        ready(self.deployments.wait_until_ready().now_or_never())
            && ready(self.replica_sets.wait_until_ready().now_or_never())
            && ready(self.pods.wait_until_ready().now_or_never())
    }

    /// Remember a write of the Release `ns/name`; `version`: the written object's
    /// `resourceVersion` as the API answered, `None` when unknown.
    pub(super) fn wrote(&self, ns: &str, name: &str, kind: Kind, version: Option<&str>) {
        let mut written = self.written.lock().unwrap_or_else(PoisonError::into_inner);
        let w = written
            .entry((ns.to_string(), name.to_string()))
            .or_default();
        w.record(kind, version);
    }

    /// Whether the caches show every write the Release `ns/name` made; a Release whose
    /// writes they all show is forgotten. `false` at most once for an unknown version.
    pub(super) fn caught_up(&self, ns: &str, name: &str) -> bool {
        let key = (ns.to_string(), name.to_string());
        let mut written = self.written.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(w) = written.get(&key) else {
            return true;
        };
        let seen = Seen {
            deployments: self.deployments_seen.load(Ordering::Acquire),
            replica_sets: self.rs_seen.load(Ordering::Acquire),
            pods: self.pods_seen.load(Ordering::Acquire),
        };
        let shown = w.shown_by(seen);
        if shown || w.unknown {
            // An unknown version cannot be waited for: this one round reads the API.
            written.remove(&key);
        }
        shown
    }

    /// Drop what the Release `ns/name` wrote (it is gone or finalized).
    pub(super) fn forget(&self, ns: &str, name: &str) {
        let key = (ns.to_string(), name.to_string());
        self.written
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&key);
        self.release_seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&key);
        self.status_writes.forget(ns, name);
    }

    /// Remember a version of the Release `ns/name` the operator wrote or read (`None`, or
    /// one that is not a number: unknown, the next round reads the API). Its writes and
    /// reads of one Release follow each other, so a known version after an unknown one
    /// replaces it.
    pub(super) fn saw_release(&self, ns: &str, name: &str, version: Option<&str>) {
        let v = version
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(u64::MAX);
        let mut seen = self
            .release_seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let slot = seen.entry((ns.to_string(), name.to_string())).or_default();
        *slot = if *slot == u64::MAX { v } else { (*slot).max(v) };
    }

    /// Whether the cached copy of the Release `ns/name` (its `resourceVersion`) is at
    /// least as new as every version of it the operator wrote or read: then a round may
    /// plan from it instead of reading the Release through the API.
    pub(super) fn release_current(&self, ns: &str, name: &str, cached: Option<&str>) -> bool {
        let seen = self
            .release_seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match seen.get(&(ns.to_string(), name.to_string())) {
            None => true,
            Some(&newest) => cached
                .and_then(|v| v.parse::<u64>().ok())
                .is_some_and(|c| newest != u64::MAX && c >= newest),
        }
    }
}

impl Written {
    fn record(&mut self, kind: Kind, version: Option<&str>) {
        match version.and_then(|v| v.parse::<u64>().ok()) {
            Some(v) => {
                let slot = match kind {
                    Kind::Deployment => &mut self.deployments,
                    Kind::ReplicaSet => &mut self.replica_sets,
                    Kind::Pod => &mut self.pods,
                };
                *slot = (*slot).max(v);
            }
            None => self.unknown = true,
        }
    }

    /// Whether caches that applied up to `seen` show these writes.
    fn shown_by(&self, seen: Seen) -> bool {
        !self.unknown
            && self.deployments <= seen.deployments
            && self.replica_sets <= seen.replica_sets
            && self.pods <= seen.pods
    }
}

/// The highest `resourceVersion` each cache has applied.
#[derive(Clone, Copy, Debug, Default)]
struct Seen {
    deployments: u64,
    replica_sets: u64,
    pods: u64,
}

/// A reflector over `api`, its trigger stream, and the highest `resourceVersion` it has
/// applied. The API documents `resourceVersion` as opaque; the kube-apiserver's are etcd
/// revisions (one increasing counter) and a watch delivers events in their order, so
/// "applied up to v" means every write of version `<= v` to a watched object is in the
/// cache (or superseded there). A version that is not a number counts as unknown: the
/// round after it reads through the API, so a wrong guess costs a LIST, never a stale read.
fn reflect<K>(api: Api<K>, cfg: watcher::Config) -> (Store<K>, Trigger<K>, Arc<AtomicU64>)
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let (store, writer) = reflector::store();
    let seen = Arc::new(AtomicU64::new(0));
    let mut progress = Progress::new(seen.clone());
    // No backoff of its own: the Controller backs off its triggers, as it did for the
    // watches it started itself. The progress is taken after the reflector applied the
    // event, so a round never trusts a version its cache does not hold yet.
    let stream = reflector::reflector(writer, watcher(api, cfg))
        .inspect_ok(move |ev| progress.apply(ev))
        .touched_objects()
        .boxed();
    (store, stream, seen)
}

/// Tracks a cache's highest applied `resourceVersion`. A relist's objects replace the
/// cache only at `InitDone`, so their versions count from then.
struct Progress {
    seen: Arc<AtomicU64>,
    listing: u64,
}

impl Progress {
    fn new(seen: Arc<AtomicU64>) -> Self {
        Self { seen, listing: 0 }
    }

    fn apply<K: kube::Resource>(&mut self, ev: &watcher::Event<K>) {
        let version = |o: &K| {
            o.meta()
                .resource_version
                .as_deref()
                .and_then(|v| v.parse::<u64>().ok())
        };
        match ev {
            watcher::Event::Init => self.listing = 0,
            watcher::Event::InitApply(o) => {
                self.listing = self.listing.max(version(o).unwrap_or(0));
            }
            watcher::Event::InitDone => {
                self.seen.fetch_max(self.listing, Ordering::AcqRel);
            }
            watcher::Event::Apply(o) | watcher::Event::Delete(o) => {
                if let Some(v) = version(o) {
                    self.seen.fetch_max(v, Ordering::AcqRel);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn test_stores() -> Stores {
        Stores {
            deployments: reflector::store().0,
            replica_sets: reflector::store().0,
            pods: reflector::store().0,
            deployments_seen: Arc::new(AtomicU64::new(0)),
            rs_seen: Arc::new(AtomicU64::new(0)),
            pods_seen: Arc::new(AtomicU64::new(0)),
            written: Mutex::new(HashMap::new()),
            release_seen: Mutex::new(HashMap::new()),
            status_writes: StatusWrites::default(),
        }
    }

    fn pod_at(version: &str) -> Pod {
        let mut p = Pod::default();
        p.metadata.resource_version = Some(version.into());
        p
    }

    #[test]
    fn progress_counts_a_relist_only_once_it_is_complete() {
        let seen = Arc::new(AtomicU64::new(0));
        let mut p = Progress::new(seen.clone());
        p.apply(&watcher::Event::<Pod>::Init);
        p.apply(&watcher::Event::InitApply(pod_at("40")));
        p.apply(&watcher::Event::InitApply(pod_at("7")));
        assert_eq!(seen.load(Ordering::Acquire), 0);
        p.apply(&watcher::Event::<Pod>::InitDone);
        assert_eq!(seen.load(Ordering::Acquire), 40);
        p.apply(&watcher::Event::Apply(pod_at("41")));
        p.apply(&watcher::Event::Delete(pod_at("45")));
        assert_eq!(seen.load(Ordering::Acquire), 45);
        // A relist whose objects are all older (the newest was deleted) never goes back.
        p.apply(&watcher::Event::<Pod>::Init);
        p.apply(&watcher::Event::InitApply(pod_at("30")));
        p.apply(&watcher::Event::<Pod>::InitDone);
        assert_eq!(seen.load(Ordering::Acquire), 45);
    }

    /// Per Release: a write not yet applied makes its rounds read the API until the cache
    /// applied it; another Release's rounds read the caches meanwhile.
    #[test]
    fn a_release_reads_the_api_until_the_caches_show_its_writes() {
        let stores = test_stores();
        assert!(stores.caught_up("a", "echo"));
        stores.wrote("a", "echo", Kind::Pod, Some("12"));
        assert!(!stores.caught_up("a", "echo"));
        assert!(!stores.caught_up("a", "echo"), "until shown, every round");
        assert!(stores.caught_up("a", "web"));
        assert!(stores.caught_up("b", "echo"));
        stores.pods_seen.store(12, Ordering::Release);
        assert!(stores.caught_up("a", "echo"));
        // A delete answered without a version: exactly the next round reads the API.
        stores.wrote("a", "echo", Kind::ReplicaSet, None);
        assert!(!stores.caught_up("a", "echo"));
        assert!(stores.caught_up("a", "echo"));
        // A Deployment write (claim, scale): its cache must show it too.
        stores.wrote("a", "echo", Kind::Deployment, Some("20"));
        assert!(!stores.caught_up("a", "echo"));
        stores.deployments_seen.store(20, Ordering::Release);
        assert!(stores.caught_up("a", "echo"));
        stores.wrote("a", "echo", Kind::ReplicaSet, Some("99"));
        stores.forget("a", "echo");
        assert!(stores.caught_up("a", "echo"));
    }

    #[test]
    fn writes_are_shown_once_each_cache_applied_their_version() {
        let seen = |deployments, replica_sets, pods| Seen {
            deployments,
            replica_sets,
            pods,
        };
        let mut w = Written::default();
        assert!(w.shown_by(seen(0, 0, 0)));
        w.record(Kind::ReplicaSet, Some("100"));
        w.record(Kind::Pod, Some("105"));
        w.record(Kind::Pod, Some("103"));
        w.record(Kind::Deployment, Some("90"));
        assert!(!w.shown_by(seen(90, 100, 104)));
        assert!(!w.shown_by(seen(90, 99, 200)));
        assert!(!w.shown_by(seen(89, 100, 105)));
        assert!(w.shown_by(seen(90, 100, 105)));
        w.record(Kind::Pod, None);
        assert!(!w.shown_by(seen(u64::MAX, u64::MAX, u64::MAX)));
    }

    #[test]
    fn the_cached_release_serves_once_it_shows_the_operators_last_write() {
        let stores = test_stores();
        // Nothing written or read yet: the cache is as new as anything the operator knows.
        assert!(stores.release_current("a", "echo", Some("5")));
        stores.saw_release("a", "echo", Some("12"));
        assert!(!stores.release_current("a", "echo", Some("11")));
        assert!(!stores.release_current("a", "echo", None));
        assert!(stores.release_current("a", "echo", Some("12")));
        assert!(stores.release_current("a", "echo", Some("13")));
        // Versions only move forward.
        stores.saw_release("a", "echo", Some("9"));
        assert!(!stores.release_current("a", "echo", Some("11")));
        // Another Release is not affected.
        assert!(stores.release_current("a", "other", Some("1")));
        // A write of unknown version: read through the API until a read records one.
        stores.saw_release("a", "echo", None);
        assert!(!stores.release_current("a", "echo", Some("99")));
        stores.saw_release("a", "echo", Some("100"));
        assert!(stores.release_current("a", "echo", Some("100")));
        stores.forget("a", "echo");
        assert!(stores.release_current("a", "echo", Some("1")));
    }
}
