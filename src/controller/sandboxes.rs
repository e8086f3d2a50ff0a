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

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use kube::api::Api;
use kube::runtime::reflector::{self, Store, store::Writer};
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
        let root = super::refused::reported(
            "sandboxes",
            watcher(self.api, watcher::Config::default().any_semantic()),
        )
        .backoff(super::watch::backoff())
        .modify(strip)
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
