//! Writes in flight (the ReplicaSet controller's "expectations"): the pool reads its members
//! from the shared Sandbox store, which may not have seen the member the pool created, started,
//! drained or deleted a moment ago. Each such write is remembered per pool until the store
//! shows it (or a timeout passes, for a change the store will never show, such as a member
//! created and deleted again between two looks); while one is pending, the pool does not act
//! on its members' count. Plain data and a clock; no I/O here.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;

use super::decide::Member;

/// How long a write may stay unseen before the pool acts without it.
pub const TIMEOUT: Duration = Duration::from_secs(60);

/// What the store is to show.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Write {
    /// The member exists.
    Created,
    /// The member is being deleted, or is gone.
    Deleted,
    /// The member's spec says powerState Running.
    Started,
    /// The member carries the retiring annotation.
    Retired,
}

/// One write the store has not shown yet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pending {
    /// The member.
    pub name: String,
    /// What was written.
    pub write: Write,
    /// When.
    pub since: Timestamp,
}

impl Pending {
    /// Whether `members` (the pool's members as the store has them) show this write. A member
    /// missing from the store is not created yet, and deleted for every other write (it was
    /// in the store when the pool acted on it).
    pub fn seen(&self, members: &[Member]) -> bool {
        let m = members.iter().find(|m| m.name == self.name);
        match (self.write, m) {
            (Write::Created, m) => m.is_some(),
            (_, None) => true,
            (_, Some(m)) if m.deleting => true,
            (Write::Deleted, Some(_)) => false,
            (Write::Started, Some(m)) => !m.standby,
            (Write::Retired, Some(m)) => m.retiring_since.is_some(),
        }
    }
}

/// What [`Expectations::settle`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Settled {
    /// Writes still unseen: do not act on the members yet.
    pub waiting: Vec<Pending>,
    /// Writes unseen past the timeout, forgotten now.
    pub expired: Vec<Pending>,
}

/// The writes in flight of every pool, by pool UID.
#[derive(Debug)]
pub struct Expectations {
    timeout: Duration,
    pending: Mutex<HashMap<String, Vec<Pending>>>,
}

impl Default for Expectations {
    fn default() -> Self {
        Self::new(TIMEOUT)
    }
}

impl Expectations {
    /// Expectations that give up on a write after `timeout`.
    pub fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            pending: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<Pending>>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Remembers that the pool `pool` wrote `write` to member `name` at `now`.
    pub fn expect(&self, pool: &str, name: &str, write: Write, now: Timestamp) {
        let mut p = self.lock();
        let v = p.entry(pool.to_owned()).or_default();
        v.retain(|e| !(e.name == name && e.write == write));
        v.push(Pending {
            name: name.to_owned(),
            write,
            since: now,
        });
    }

    /// Drops the writes of `pool` that `members` show and those older than the timeout;
    /// returns what is still awaited and what was given up.
    pub fn settle(&self, pool: &str, members: &[Member], now: Timestamp) -> Settled {
        let mut p = self.lock();
        // Other pools' writes past the timeout go too: a pool deleted while a write was in
        // flight is never settled again.
        let timeout = self.timeout;
        p.retain(|k, v| {
            k == pool || {
                v.retain(|e| {
                    let age = now.duration_since(e.since);
                    age.is_negative() || age.unsigned_abs() < timeout
                });
                !v.is_empty()
            }
        });
        let Some(v) = p.get_mut(pool) else {
            return Settled::default();
        };
        let mut out = Settled::default();
        for e in std::mem::take(v) {
            if e.seen(members) {
                continue;
            }
            let age = now.duration_since(e.since);
            if !age.is_negative() && age.unsigned_abs() >= self.timeout {
                out.expired.push(e);
            } else {
                out.waiting.push(e);
            }
        }
        if out.waiting.is_empty() {
            p.remove(pool);
        } else {
            *v = out.waiting.clone();
        }
        out
    }

    /// When the oldest of `waiting` times out, from `now`.
    pub fn next_timeout(&self, waiting: &[Pending], now: Timestamp) -> Option<Duration> {
        waiting
            .iter()
            .map(|e| {
                let age = now.duration_since(e.since);
                let age = if age.is_negative() {
                    Duration::ZERO
                } else {
                    age.unsigned_abs()
                };
                self.timeout.saturating_sub(age)
            })
            .min()
    }

    /// Forgets `pool` (deleted).
    pub fn forget(&self, pool: &str) {
        self.lock().remove(pool);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + s).unwrap()
    }

    fn member(name: &str) -> Member {
        Member {
            name: name.into(),
            hash: "h1".into(),
            created: t(0),
            deleting: false,
            standby: false,
            instance_stopped: false,
            ready: true,
            active_workers: Some(0),
            idle_since: None,
            unregistered: false,
            broken: None,
            retiring_since: None,
        }
    }

    #[test]
    fn a_create_is_awaited_until_the_store_shows_the_member() {
        let e = Expectations::default();
        e.expect("p1", "web-a", Write::Created, t(0));
        // The store has not seen it: the pool waits (and would not create it again).
        let s = e.settle("p1", &[member("web-b")], t(1));
        assert_eq!(s.waiting.len(), 1);
        assert_eq!(s.waiting[0].name, "web-a");
        assert!(s.expired.is_empty());
        // Still awaited on the next look.
        assert_eq!(e.settle("p1", &[], t(2)).waiting.len(), 1);
        // Seen: nothing pending any more, and nothing left for later looks.
        let s = e.settle("p1", &[member("web-a"), member("web-b")], t(3));
        assert_eq!(s, Settled::default());
        assert_eq!(e.settle("p1", &[], t(4)), Settled::default());
    }

    #[test]
    fn pools_are_kept_apart() {
        let e = Expectations::default();
        e.expect("p1", "web-a", Write::Created, t(0));
        assert_eq!(e.settle("p2", &[], t(1)), Settled::default());
        assert_eq!(e.settle("p1", &[], t(1)).waiting.len(), 1);
        e.forget("p1");
        assert_eq!(e.settle("p1", &[], t(1)), Settled::default());
        // A pool never settled again (deleted) loses its writes once they time out.
        e.expect("gone", "gone-a", Write::Created, t(0));
        e.settle("p2", &[], t(1));
        assert_eq!(e.lock().len(), 1);
        e.settle("p2", &[], t(0) + TIMEOUT);
        assert!(e.lock().is_empty());
    }

    #[test]
    fn a_delete_is_seen_when_the_member_is_deleting_or_gone() {
        let e = Expectations::default();
        e.expect("p1", "web-a", Write::Deleted, t(0));
        e.expect("p1", "web-b", Write::Deleted, t(0));
        let mut a = member("web-a");
        let s = e.settle("p1", &[a.clone(), member("web-b")], t(1));
        assert_eq!(s.waiting.len(), 2);
        a.deleting = true;
        // web-a deleting, web-b gone.
        let s = e.settle("p1", &[a], t(2));
        assert_eq!(s, Settled::default());
    }

    #[test]
    fn a_start_and_a_retire_are_seen_in_the_member() {
        let e = Expectations::default();
        e.expect("p1", "web-a", Write::Started, t(0));
        e.expect("p1", "web-b", Write::Retired, t(0));
        let mut a = member("web-a");
        a.standby = true;
        let mut b = member("web-b");
        let s = e.settle("p1", &[a.clone(), b.clone()], t(1));
        assert_eq!(
            s.waiting.iter().map(|p| p.write).collect::<Vec<_>>(),
            vec![Write::Started, Write::Retired]
        );
        a.standby = false;
        let s = e.settle("p1", &[a.clone(), b.clone()], t(2));
        assert_eq!(s.waiting.len(), 1);
        assert_eq!(s.waiting[0].name, "web-b");
        b.retiring_since = Some(t(0));
        assert_eq!(e.settle("p1", &[a, b], t(3)), Settled::default());
    }

    #[test]
    fn an_unseen_write_is_given_up_after_the_timeout() {
        let e = Expectations::new(Duration::from_secs(30));
        e.expect("p1", "web-a", Write::Created, t(0));
        e.expect("p1", "web-b", Write::Created, t(20));
        assert_eq!(
            e.next_timeout(&e.settle("p1", &[], t(10)).waiting, t(10)),
            Some(Duration::from_secs(20))
        );
        let s = e.settle("p1", &[], t(30));
        assert_eq!(
            s.expired
                .iter()
                .map(|p| p.name.as_str())
                .collect::<Vec<_>>(),
            vec!["web-a"]
        );
        assert_eq!(
            s.waiting
                .iter()
                .map(|p| p.name.as_str())
                .collect::<Vec<_>>(),
            vec!["web-b"]
        );
        // Given up once: not reported again.
        let s = e.settle("p1", &[], t(49));
        assert!(s.expired.is_empty());
        assert_eq!(s.waiting.len(), 1);
        let s = e.settle("p1", &[], t(50));
        assert_eq!(s.expired.len(), 1);
        assert!(s.waiting.is_empty());
    }

    #[test]
    fn the_same_write_again_restarts_its_clock() {
        let e = Expectations::new(Duration::from_secs(30));
        e.expect("p1", "web-a", Write::Retired, t(0));
        e.expect("p1", "web-a", Write::Retired, t(25));
        let s = e.settle("p1", &[member("web-a")], t(40));
        assert!(s.expired.is_empty());
        assert_eq!(s.waiting.len(), 1);
    }
}
