//! The one watch of Sandboxes the process runs, shared by every controller that reads them.
//!
//! One watcher feeds one store (kube-runtime's shared reflector). Before an object is cached
//! its `managedFields` and the `kubectl.kubernetes.io/last-applied-configuration` annotation
//! are dropped: the operator reads neither, and they were most of each cached copy. The
//! Sandbox, SandboxDeploy and SecretBundle controllers subscribe to the same stream of changes
//! and read the same store; the orphan sweep and the phase gauges read that store too.
//!
//! Every subscription is taken before [`SandboxWatch::run`] starts the watch (it consumes the
//! watch, so no late subscriber can miss the initial list), and every subscriber must keep
//! reading: when one falls [`SandboxWatch::new`]'s buffer behind, the watch waits for it.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::{Stream, StreamExt};
use kube::api::Api;
use kube::runtime::reflector::{self, ObjectRef, Store, store::Writer};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use tokio::sync::broadcast;
use tracing::debug;

use crate::api::Sandbox;

/// The annotation `kubectl apply` keeps the whole last applied object in.
pub const LAST_APPLIED_ANNOTATION: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// Changes held for subscribers that have not read them yet (object references, not objects).
pub const DEFAULT_BUFFER: usize = 1024;

/// Runs one controller on a Sandbox watch of its own (a controller started alone, as the tests
/// do): `start` subscribes the controller before the watch starts; both end when it ends.
pub async fn run_alone<F, Fut>(client: Client, namespace: Option<&str>, start: F)
where
    F: FnOnce(&SandboxWatch) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let watch = SandboxWatch::new(client, namespace, DEFAULT_BUFFER);
    let controller = start(&watch);
    tokio::select! {
        _ = controller => {}
        _ = watch.run(std::future::pending()) => {}
    }
}

/// What each controller's `run` does: `run_shared` (the controller on a shared Sandbox watch)
/// on a watch of its own ([`run_alone`]), at the default concurrency
/// ([`crate::controller::DEFAULT_CONCURRENCY`]), until `shutdown` resolves.
pub async fn run_on_own_watch<C, S, F, Fut>(
    client: Client,
    ctx: std::sync::Arc<C>,
    namespace: Option<String>,
    shutdown: S,
    run_shared: F,
) where
    F: FnOnce(std::sync::Arc<C>, &SandboxWatch, Option<String>, u16, S) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let ns = namespace.clone();
    run_alone(client, ns.as_deref(), |watch| {
        run_shared(
            ctx,
            watch,
            namespace,
            crate::controller::DEFAULT_CONCURRENCY,
            shutdown,
        )
    })
    .await;
}

/// Drops what the operator never reads from a Sandbox before it is cached: `managedFields`
/// and the last-applied annotation.
pub fn strip(s: &mut Sandbox) {
    s.metadata.managed_fields = None;
    if let Some(annotations) = s.metadata.annotations.as_mut() {
        annotations.remove(LAST_APPLIED_ANNOTATION);
    }
}

/// A change of one Sandbox, as a subscriber sees it.
#[derive(Clone, Debug)]
pub enum Change {
    /// Created or changed: the object as cached now.
    Applied(Arc<Sandbox>),
    /// Deleted: the last object seen.
    Deleted(Arc<Sandbox>),
}

impl Change {
    /// The Sandbox changed or deleted.
    pub fn sandbox(&self) -> &Arc<Sandbox> {
        match self {
            Change::Applied(s) | Change::Deleted(s) => s,
        }
    }

    /// The Sandbox, whether changed or deleted.
    pub fn into_sandbox(self) -> Arc<Sandbox> {
        match self {
            Change::Applied(s) | Change::Deleted(s) => s,
        }
    }
}

/// The process's one watch of Sandboxes, its store, and the subscriptions to its changes.
pub struct SandboxWatch {
    api: Api<Sandbox>,
    reader: Store<Sandbox>,
    writer: Writer<Sandbox>,
    /// Deletions: the shared stream carries objects still in the store only, so deletions go
    /// to subscribers beside it (a subscriber that falls this far behind misses some; each
    /// controller's periodic look covers that).
    deleted: broadcast::Sender<Arc<Sandbox>>,
    /// The Sandboxes of each controlling owner, kept in step with the store.
    owners: Arc<OwnerIndex>,
}

impl SandboxWatch {
    /// A watch of the Sandboxes in `namespace` (every namespace when `None`), not started.
    pub fn new(client: Client, namespace: Option<&str>, buffer: usize) -> Self {
        let api = match namespace {
            Some(ns) => Api::namespaced(client, ns),
            None => Api::all(client),
        };
        let (reader, writer) = reflector::store_shared(buffer.max(1));
        let (deleted, _) = broadcast::channel(buffer.max(1));
        Self {
            api,
            reader,
            writer,
            deleted,
            owners: Arc::default(),
        }
    }

    /// The Sandboxes of each controlling owner (a SandboxPool's members), read through the
    /// store: no LIST per reconcile.
    pub fn owned(&self) -> Owned {
        Owned {
            store: self.reader.clone(),
            index: self.owners.clone(),
        }
    }

    /// The shared store (ready once the first list is in).
    pub fn store(&self) -> Store<Sandbox> {
        self.reader.clone()
    }

    /// The Sandboxes created or changed, as cached (the whole store again after each re-list).
    pub fn applied(&self) -> impl Stream<Item = Arc<Sandbox>> + Send + 'static + use<> {
        self.writer
            .subscribe()
            .expect("a shared store's writer can be subscribed to")
    }

    /// Changes and deletions.
    pub fn changes(&self) -> impl Stream<Item = Change> + Send + 'static + use<> {
        let deleted = futures::stream::unfold(self.deleted.subscribe(), |mut rx| async move {
            loop {
                match rx.recv().await {
                    Ok(s) => return Some((Change::Deleted(s), rx)),
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        debug!(missed = n, "a Sandbox subscriber missed deletions");
                    }
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        });
        futures::stream::select(self.applied().map(Change::Applied), deleted)
    }

    /// Runs the watch until `shutdown` resolves. Subscriptions end with it.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let deleted = self.deleted;
        let owners = self.owners;
        let root = super::refused::reported(
            "sandboxes",
            watcher(self.api, watcher::Config::default().any_semantic()),
        )
        .backoff(super::watch::backoff())
        .modify(strip)
        // The index takes each event just before the store does, so a subscriber told of a
        // change finds it in both.
        .inspect(move |ev| {
            if let Ok(ev) = ev {
                owners.apply(ev);
            }
        })
        .reflect_shared(self.writer)
        .for_each(move |ev| {
            match ev {
                Ok(watcher::Event::Delete(s)) => {
                    let _ = deleted.send(Arc::new(s));
                }
                Ok(_) => {}
                Err(e) => debug!(error = %e, "Sandbox watch error; it retries"),
            }
            futures::future::ready(())
        });
        tokio::select! {
            _ = root => {}
            _ = shutdown => {}
        }
    }
}

/// Who controls a Sandbox: namespace, owner kind and owner name.
type OwnerKey = (String, String, String);

fn controller_of(s: &Sandbox) -> Option<OwnerKey> {
    s.owner_references()
        .iter()
        .find(|o| o.controller == Some(true))
        .map(|o| {
            (
                s.namespace().unwrap_or_default(),
                o.kind.clone(),
                o.name.clone(),
            )
        })
}

#[derive(Default)]
struct IndexState {
    /// Names of the Sandboxes each owner controls.
    by_owner: HashMap<OwnerKey, BTreeSet<String>>,
    /// The owner of each indexed Sandbox, by namespace and name.
    owner_of: HashMap<(String, String), OwnerKey>,
}

impl IndexState {
    fn insert(&mut self, s: &Sandbox) {
        let key = (s.namespace().unwrap_or_default(), s.name_any());
        self.remove(&key);
        if let Some(owner) = controller_of(s) {
            self.by_owner
                .entry(owner.clone())
                .or_default()
                .insert(key.1.clone());
            self.owner_of.insert(key, owner);
        }
    }

    fn remove(&mut self, key: &(String, String)) {
        if let Some(owner) = self.owner_of.remove(key)
            && let Some(names) = self.by_owner.get_mut(&owner)
        {
            names.remove(&key.1);
            if names.is_empty() {
                self.by_owner.remove(&owner);
            }
        }
    }
}

/// The Sandboxes of each controlling owner, by name, fed from the watch's events as the store
/// is (a re-list is buffered and swapped in whole at its end, as the store does it).
#[derive(Default)]
pub struct OwnerIndex {
    state: RwLock<IndexState>,
    /// A re-list under way.
    relist: RwLock<Option<IndexState>>,
    ready: AtomicBool,
}

impl OwnerIndex {
    /// Takes one watch event.
    pub fn apply(&self, ev: &watcher::Event<Sandbox>) {
        match ev {
            watcher::Event::Apply(s) => self.write().insert(s),
            watcher::Event::Delete(s) => self
                .write()
                .remove(&(s.namespace().unwrap_or_default(), s.name_any())),
            watcher::Event::Init => *self.relist() = Some(IndexState::default()),
            watcher::Event::InitApply(s) => self
                .relist()
                .get_or_insert_with(IndexState::default)
                .insert(s),
            watcher::Event::InitDone => {
                let fresh = self.relist().take().unwrap_or_default();
                *self.write() = fresh;
                self.ready.store(true, Ordering::Release);
            }
        }
    }

    /// Whether the first complete list is in.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// The names of the Sandboxes `kind` `owner` controls in `namespace`.
    pub fn names(&self, namespace: &str, kind: &str, owner: &str) -> Vec<String> {
        let key = (namespace.to_owned(), kind.to_owned(), owner.to_owned());
        self.state
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .by_owner
            .get(&key)
            .map(|n| n.iter().cloned().collect())
            .unwrap_or_default()
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, IndexState> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }

    fn relist(&self) -> std::sync::RwLockWriteGuard<'_, Option<IndexState>> {
        self.relist.write().unwrap_or_else(|e| e.into_inner())
    }
}

/// The shared store read through the owner index.
#[derive(Clone)]
pub struct Owned {
    store: Store<Sandbox>,
    index: Arc<OwnerIndex>,
}

impl Owned {
    /// Waits until both the store and the index hold their first complete list.
    pub async fn wait_ready(&self) -> Result<(), reflector::store::WriterDropped> {
        wait_ready(&self.store).await?;
        while !self.index.is_ready() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    /// The Sandboxes `kind` `owner` controls in `namespace`, as cached (a name the index holds
    /// and the store does not yet or no longer is left out).
    pub fn get(&self, namespace: &str, kind: &str, owner: &str) -> Vec<Arc<Sandbox>> {
        self.index
            .names(namespace, kind, owner)
            .into_iter()
            .filter_map(|name| {
                self.store
                    .get(&ObjectRef::<Sandbox>::new(&name).within(namespace))
            })
            .collect()
    }
}

/// Waits until `store` holds its first complete list; an error if its writer went away first.
///
/// kube-runtime's own wait wakes only the last of several tasks waiting on one store (the
/// Controller's runner waits on it too), so this looks again every 100 ms instead of relying
/// on being woken.
pub async fn wait_ready<K>(store: &Store<K>) -> Result<(), reflector::store::WriterDropped>
where
    K: kube::runtime::reflector::Lookup + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    loop {
        if let Ok(ready) =
            tokio::time::timeout(Duration::from_millis(100), store.wait_until_ready()).await
        {
            return ready;
        }
    }
}

/// Passes on a change when `relevance` of the Sandbox differs from what it was when last
/// passed on (the first sight of each Sandbox passes), and every deletion. Keyed by UID.
pub fn changed(
    changes: impl Stream<Item = Change> + Send + 'static,
    relevance: impl Fn(&Sandbox) -> u64 + Send + 'static,
) -> impl Stream<Item = Change> + Send + 'static {
    let mut seen: HashMap<String, u64> = HashMap::new();
    changes.filter_map(move |change| {
        let uid = |s: &Sandbox| s.uid().unwrap_or_else(|| s.name_any());
        let out = match &change {
            Change::Applied(s) => {
                let h = relevance(s);
                (seen.insert(uid(s), h) != Some(h)).then_some(change)
            }
            Change::Deleted(s) => {
                seen.remove(&uid(s));
                Some(change)
            }
        };
        futures::future::ready(out)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ManagedFieldsEntry, ObjectMeta};
    use std::collections::BTreeMap;

    fn sandbox(name: &str, uid: &str, generation: i64) -> Sandbox {
        let spec: crate::api::SandboxSpec = serde_json::from_value(serde_json::json!({
            "environment": "staging",
            "instanceId": "i-0123456789abcdef0",
        }))
        .expect("a minimal Sandbox spec");
        let mut s = Sandbox::new(name, spec);
        s.metadata = ObjectMeta {
            namespace: Some("ns".into()),
            uid: Some(uid.into()),
            generation: Some(generation),
            ..s.metadata
        };
        s
    }

    #[test]
    fn a_cached_sandbox_has_no_managed_fields_nor_last_applied_configuration() {
        let mut s = sandbox("a", "u1", 1);
        s.metadata.managed_fields = Some(vec![ManagedFieldsEntry {
            manager: Some("kubectl".into()),
            operation: Some("Apply".into()),
            ..Default::default()
        }]);
        s.metadata.annotations = Some(BTreeMap::from([
            (
                LAST_APPLIED_ANNOTATION.to_owned(),
                "{\"spec\":{}}".to_owned(),
            ),
            (
                crate::api::START_REQUESTED_ANNOTATION.to_owned(),
                "2026-01-01T00:00:00Z".to_owned(),
            ),
        ]));
        let before = s.clone();
        strip(&mut s);
        assert_eq!(s.metadata.managed_fields, None);
        // The operator's own annotations stay; only kubectl's copy goes.
        assert_eq!(
            s.metadata.annotations,
            Some(BTreeMap::from([(
                crate::api::START_REQUESTED_ANNOTATION.to_owned(),
                "2026-01-01T00:00:00Z".to_owned(),
            )]))
        );
        // Nothing else changes.
        assert_eq!(s.spec, before.spec);
        assert_eq!(s.status, before.status);
        assert_eq!(s.metadata.name, before.metadata.name);
        assert_eq!(s.metadata.uid, before.metadata.uid);
        assert_eq!(s.metadata.generation, before.metadata.generation);
    }

    #[tokio::test]
    async fn the_shared_store_caches_stripped_sandboxes_and_tells_every_subscriber() {
        // The same reflector the watch builds, fed from a fixed stream of watch events.
        let (reader, writer) = reflector::store_shared::<Sandbox>(16);
        let first = writer.subscribe().unwrap();
        let second = writer.subscribe().unwrap();
        let mut a = sandbox("a", "u1", 1);
        a.metadata.managed_fields = Some(vec![ManagedFieldsEntry::default()]);
        a.metadata.annotations = Some(BTreeMap::from([(
            LAST_APPLIED_ANNOTATION.to_owned(),
            "{}".to_owned(),
        )]));
        let events = futures::stream::iter([
            Ok(watcher::Event::Init),
            Ok(watcher::Event::InitApply(a)),
            Ok(watcher::Event::InitDone),
        ]);
        events
            .modify(strip)
            .reflect_shared(writer)
            .for_each(|_| futures::future::ready(()))
            .await;
        let cached = reader.state();
        assert_eq!(cached.len(), 1);
        assert_eq!(cached[0].metadata.managed_fields, None);
        assert_eq!(
            cached[0].metadata.annotations.as_ref().map(|a| a.len()),
            Some(0)
        );
        for sub in [first, second] {
            let got: Vec<_> = sub.collect().await;
            assert_eq!(got.len(), 1);
            assert_eq!(got[0].metadata.managed_fields, None);
        }
    }

    fn owned_by(name: &str, uid: &str, pool: Option<&str>) -> Sandbox {
        let mut s = sandbox(name, uid, 1);
        s.metadata.owner_references = pool.map(|p| {
            vec![
                k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
                    api_version: "fleet.valet.dev/v1alpha1".into(),
                    kind: "SandboxPool".into(),
                    name: p.into(),
                    uid: format!("uid-{p}"),
                    controller: Some(true),
                    block_owner_deletion: Some(true),
                },
            ]
        });
        s
    }

    #[test]
    fn the_owner_index_follows_the_watch_as_the_store_does() {
        let idx = OwnerIndex::default();
        let names = |idx: &OwnerIndex, pool: &str| idx.names("ns", "SandboxPool", pool);
        idx.apply(&watcher::Event::Init);
        idx.apply(&watcher::Event::InitApply(owned_by(
            "web-a",
            "u1",
            Some("web"),
        )));
        idx.apply(&watcher::Event::InitApply(owned_by(
            "api-a",
            "u2",
            Some("api"),
        )));
        idx.apply(&watcher::Event::InitApply(owned_by("lone", "u3", None)));
        // Nothing is served before the first list is complete.
        assert!(!idx.is_ready());
        assert!(names(&idx, "web").is_empty());
        idx.apply(&watcher::Event::InitDone);
        assert!(idx.is_ready());
        assert_eq!(names(&idx, "web"), vec!["web-a"]);
        assert_eq!(names(&idx, "api"), vec!["api-a"]);
        // Another namespace or kind is another owner.
        assert!(idx.names("other", "SandboxPool", "web").is_empty());
        assert!(idx.names("ns", "SandboxDeploy", "web").is_empty());
        idx.apply(&watcher::Event::Apply(owned_by("web-b", "u4", Some("web"))));
        assert_eq!(names(&idx, "web"), vec!["web-a", "web-b"]);
        // An owner changed (released): indexed under the new one only.
        idx.apply(&watcher::Event::Apply(owned_by("web-a", "u1", None)));
        assert_eq!(names(&idx, "web"), vec!["web-b"]);
        idx.apply(&watcher::Event::Delete(owned_by(
            "web-b",
            "u4",
            Some("web"),
        )));
        assert!(names(&idx, "web").is_empty());
        // A re-list: the old index serves until it is complete, then the new one whole (what
        // was deleted while the watch was down goes).
        idx.apply(&watcher::Event::Apply(owned_by("web-c", "u5", Some("web"))));
        idx.apply(&watcher::Event::Init);
        idx.apply(&watcher::Event::InitApply(owned_by(
            "web-d",
            "u6",
            Some("web"),
        )));
        assert_eq!(names(&idx, "web"), vec!["web-c"]);
        idx.apply(&watcher::Event::InitDone);
        assert_eq!(names(&idx, "web"), vec!["web-d"]);
        assert!(names(&idx, "api").is_empty());
    }

    #[tokio::test]
    async fn owned_reads_the_store_through_the_index() {
        let (reader, mut writer) = reflector::store_shared::<Sandbox>(16);
        let owned = Owned {
            store: reader,
            index: Arc::default(),
        };
        for ev in [
            watcher::Event::Init,
            watcher::Event::InitApply(owned_by("web-a", "u1", Some("web"))),
            watcher::Event::InitApply(owned_by("lone", "u2", None)),
            watcher::Event::InitDone,
            // In the index and not yet in the store (the index takes each event first).
            watcher::Event::Apply(owned_by("web-b", "u3", Some("web"))),
        ]
        .iter()
        .enumerate()
        {
            let (i, ev) = ev;
            owned.index.apply(ev);
            if i < 4 {
                writer.apply_watcher_event(ev);
            }
        }
        tokio::time::timeout(Duration::from_secs(10), owned.wait_ready())
            .await
            .unwrap()
            .unwrap();
        let got: Vec<String> = owned
            .get("ns", "SandboxPool", "web")
            .iter()
            .map(|s| s.name_any())
            .collect();
        assert_eq!(got, vec!["web-a"]);
    }

    #[tokio::test]
    async fn every_waiter_sees_the_store_ready() {
        let (reader, writer) = reflector::store_shared::<Sandbox>(16);
        // Several tasks wait at once (kube-runtime's own wait would wake only the last).
        let waiters: Vec<_> = (0..3)
            .map(|_| {
                let r = reader.clone();
                tokio::spawn(async move { wait_ready(&r).await })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(50)).await;
        futures::stream::iter([
            Ok(watcher::Event::Init),
            Ok(watcher::Event::InitApply(sandbox("a", "u1", 1))),
            Ok(watcher::Event::InitDone),
        ])
        .reflect_shared(writer)
        .for_each(|_| futures::future::ready(()))
        .await;
        for w in waiters {
            tokio::time::timeout(Duration::from_secs(10), w)
                .await
                .expect("a waiter was never told the store is ready")
                .unwrap()
                .unwrap();
        }
    }

    #[tokio::test]
    async fn changed_passes_what_changed_and_every_deletion() {
        let a1 = Arc::new(sandbox("a", "u1", 1));
        let a2 = Arc::new(sandbox("a", "u1", 2));
        let b1 = Arc::new(sandbox("b", "u2", 1));
        let input = futures::stream::iter([
            Change::Applied(a1.clone()),
            Change::Applied(b1.clone()),
            // The same generation again (a status write, a re-list): nothing to tell.
            Change::Applied(a1.clone()),
            Change::Applied(b1.clone()),
            Change::Applied(a2.clone()),
            Change::Deleted(b1.clone()),
            // Recreated under its UID after deletion (re-list): told again.
            Change::Applied(b1.clone()),
        ]);
        let out: Vec<(bool, String, i64)> =
            changed(input, |s| s.metadata.generation.unwrap_or(0) as u64)
                .map(|c| {
                    let deleted = matches!(c, Change::Deleted(_));
                    let s = c.into_sandbox();
                    (deleted, s.name_any(), s.metadata.generation.unwrap_or(0))
                })
                .collect()
                .await;
        assert_eq!(
            out,
            vec![
                (false, "a".into(), 1),
                (false, "b".into(), 1),
                (false, "a".into(), 2),
                (true, "b".into(), 1),
                (false, "b".into(), 1),
            ]
        );
    }
}
