//! The controllers: each computes what to do from plain data in a pure `decide` module and
//! carries it out through thin edges (kube, EC2, the agent).

pub mod deploy;
pub mod refused;
pub mod sandbox;
pub mod sandboxes;
pub mod secretbundle;
pub mod watch;

use std::collections::HashMap;
use std::sync::Mutex;

/// Reconciles one controller runs at once, unless told otherwise (`--max-concurrent-reconciles`).
pub const DEFAULT_CONCURRENCY: u16 = 16;

/// A controller's runtime settings: at most `concurrency` reconciles at once (0 would mean no
/// bound; a bound of at least 1 is kept).
pub fn runtime_config(concurrency: u16) -> kube::runtime::controller::Config {
    kube::runtime::controller::Config::default().concurrency(concurrency.max(1))
}

/// The event recorder: one per process, shared by every controller (its cache of recent
/// events merges repeats into one Event with a count).
pub fn recorder(client: kube::Client, reporter: &str) -> kube::runtime::events::Recorder {
    kube::runtime::events::Recorder::new(
        client,
        kube::runtime::events::Reporter {
            controller: reporter.to_owned(),
            instance: std::env::var("POD_NAME").ok(),
        },
    )
}

/// The status a controller last wrote, per object UID, with the resourceVersion the write
/// produced. A reconcile that starts before the watch has delivered that write (its cached
/// object is older) decides from what was written instead of the stale copy, so it never undoes
/// what was just recorded. resourceVersions are etcd revisions, numbers that only grow; were one
/// not a number, the cached copy is used.
pub struct WrittenStatus<S> {
    by_uid: Mutex<HashMap<String, (u64, S)>>,
}

impl<S> Default for WrittenStatus<S> {
    fn default() -> Self {
        Self {
            by_uid: Mutex::default(),
        }
    }
}

impl<S: Clone> WrittenStatus<S> {
    /// The status to decide from, given the cached object's resourceVersion and status.
    pub fn fresh(&self, uid: &str, cached_rv: Option<&str>, cached: Option<&S>) -> S
    where
        S: Default,
    {
        let cached_rv: Option<u64> = cached_rv.and_then(|rv| rv.parse().ok());
        let mut map = self.by_uid.lock().unwrap_or_else(|e| e.into_inner());
        match (map.get(uid), cached_rv) {
            (Some((written_rv, st)), Some(c)) if *written_rv > c => st.clone(),
            (Some(_), _) => {
                // The cache has caught up: forget the copy.
                map.remove(uid);
                cached.cloned().unwrap_or_default()
            }
            _ => cached.cloned().unwrap_or_default(),
        }
    }

    /// What was written, while it is newer than the cached copy; else the cached copy (and the
    /// written one is forgotten).
    pub fn fresh_value(&self, uid: &str, cached_rv: Option<&str>, cached: S) -> S {
        let cached_rv: Option<u64> = cached_rv.and_then(|rv| rv.parse().ok());
        let mut map = self.by_uid.lock().unwrap_or_else(|e| e.into_inner());
        match (map.get(uid), cached_rv) {
            (Some((written_rv, st)), Some(c)) if *written_rv > c => st.clone(),
            (Some(_), _) => {
                map.remove(uid);
                cached
            }
            _ => cached,
        }
    }

    /// Forgets what was written of objects `keep` says no (deleted ones).
    pub fn retain(&self, keep: impl Fn(&str) -> bool) {
        self.by_uid
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|uid, _| keep(uid));
    }

    /// Remembers a write and the resourceVersion it produced.
    pub fn remember(&self, uid: &str, resource_version: Option<&str>, status: S) {
        if let Some(rv) = resource_version.and_then(|rv| rv.parse().ok()) {
            self.by_uid
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(uid.to_string(), (rv, status));
        }
    }

    /// Forgets an object (deleted).
    pub fn forget(&self, uid: &str) {
        self.by_uid
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(uid);
    }
}

#[cfg(test)]
mod tests {
    use super::WrittenStatus;

    #[test]
    fn a_newer_write_wins_until_the_cache_catches_up() {
        let w = WrittenStatus::<String>::default();
        assert_eq!(
            w.fresh("u", Some("5"), Some(&"cached".to_string())),
            "cached"
        );
        w.remember("u", Some("7"), "written".to_string());
        assert_eq!(
            w.fresh("u", Some("5"), Some(&"stale".to_string())),
            "written"
        );
        assert_eq!(
            w.fresh("u", Some("7"), Some(&"caught up".to_string())),
            "caught up"
        );
        // Forgotten once caught up.
        assert_eq!(w.fresh("u", Some("6"), Some(&"older".to_string())), "older");
        w.remember("u", Some("not-a-number"), "x".to_string());
        assert_eq!(w.fresh("u", Some("1"), None), "");
    }
}
