//! The controllers: each computes what to do from plain data in a pure `decide` module and
//! carries it out through thin edges (kube, EC2, the agent).

pub mod deploy;
pub mod refused;
pub mod sandbox;
pub mod secretbundle;
pub mod watch;

use std::collections::HashMap;
use std::sync::Mutex;

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

impl<S: Clone + Default> WrittenStatus<S> {
    /// The status to decide from, given the cached object's resourceVersion and status.
    pub fn fresh(&self, uid: &str, cached_rv: Option<&str>, cached: Option<&S>) -> S {
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
