//! The controllers: each computes what to do from plain data in a pure `decide` module and
//! carries it out through thin edges (kube, EC2, the agent).

pub mod deploy;
pub mod pool;
pub mod refused;
pub mod sandbox;
pub mod sandboxes;
pub mod secretbundle;
pub mod watch;

use std::collections::HashMap;
use std::sync::Mutex;

/// What kind of failure a reconcile error is: the `error` label of the reconcile-error metric.
/// Each controller's error enum has a variant per operation ("writing status", "launching") and
/// maps each to one of these, so dashboards group failures across controllers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorCategory {
    /// The Kubernetes API refused or failed a call.
    Kubernetes,
    /// EC2 paced the call (the operator's own rate limiter held it back).
    Ec2Paced,
    /// EC2 throttled the call.
    Ec2Throttled,
    /// EC2 failed in a way worth retrying.
    Ec2Transient,
    /// EC2 refused the call for good.
    Ec2,
    /// The agent on the instance could not be reached or refused.
    Agent,
    /// Fly.io's API or flyctl failed.
    Fly,
    /// The ledger database failed.
    Ledger,
    /// The object's spec (or a Secret it names) is invalid; fixed by editing it, not by retrying.
    InvalidSpec,
    /// A store or cache the reconcile needs is not ready yet.
    NotReady,
    /// The finalizer bookkeeping failed.
    Finalizer,
    /// Waiting on something that takes time (not a failure; not counted as one).
    Waiting,
}

impl ErrorCategory {
    /// The metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCategory::Kubernetes => "kube",
            ErrorCategory::Ec2Paced => "ec2_paced",
            ErrorCategory::Ec2Throttled => "ec2_throttled",
            ErrorCategory::Ec2Transient => "ec2_transient",
            ErrorCategory::Ec2 => "ec2",
            ErrorCategory::Agent => "agent",
            ErrorCategory::Fly => "fly",
            ErrorCategory::Ledger => "ledger",
            ErrorCategory::InvalidSpec => "invalid_spec",
            ErrorCategory::NotReady => "not_ready",
            ErrorCategory::Finalizer => "finalizer",
            ErrorCategory::Waiting => "waiting",
        }
    }
}

/// `namespace/name` of an object: how logs and errors name it (an object without a namespace
/// gives `/name`).
pub fn key<K: kube::Resource>(obj: &K) -> String {
    use kube::ResourceExt;
    format!("{}/{}", obj.namespace().unwrap_or_default(), obj.name_any())
}

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
/// not a number, the cached copy is used. Each status is boxed: the table's buckets stay a
/// pointer wide, not a whole status (at 10,000 Sandboxes the inline table alone held 17.6 MB).
pub struct WrittenStatus<S> {
    by_uid: Mutex<HashMap<String, (u64, Box<S>)>>,
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
            (Some((written_rv, st)), Some(c)) if *written_rv > c => S::clone(st),
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
            (Some((written_rv, st)), Some(c)) if *written_rv > c => S::clone(st),
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
                .insert(uid.to_string(), (rv, Box::new(status)));
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
