//! The shared view of tracked instances: what was last observed of each, and when. Plain
//! data, no I/O: the layer feeds it observations and asks it what to refresh.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::{Instance, InstanceState, TAG_MANAGED_BY};

/// How long after its launch an instance that EC2 says it does not know is taken for not yet
/// visible (EC2's eventual consistency) rather than gone.
pub const LAUNCH_GRACE: Duration = Duration::from_secs(120);

#[derive(Debug, Default)]
struct Entry {
    observed: Option<Observed>,
    /// When a mutation answered with a new state (newer than observations sent before it).
    mutated_at: Option<Instant>,
    /// When this layer launched the instance.
    launched_at: Option<Instant>,
}

#[derive(Debug)]
struct Observed {
    /// `None`: EC2 did not know the id.
    instance: Option<Instance>,
    /// When the request that observed it was sent.
    at: Instant,
}

impl Entry {
    fn newest(&self) -> Option<Instant> {
        let observed = self.observed.as_ref().map(|o| o.at);
        match (observed, self.mutated_at) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        }
    }

    fn recently_launched(&self, now: Instant) -> bool {
        self.launched_at
            .is_some_and(|t| now.saturating_duration_since(t) < LAUNCH_GRACE)
    }
}

/// What an observation did to the view.
#[derive(Debug, Clone, PartialEq)]
pub struct Applied {
    /// The instance as the view now has it (what a caller should be told).
    pub instance: Option<Instance>,
    /// Whether a tracked instance's observed state differs from the previous observation.
    pub changed: bool,
}

/// Tracked instances and the spot requests behind spot instances.
#[derive(Debug, Default)]
pub struct Cache {
    entries: HashMap<String, Entry>,
    /// Spot request id per spot instance seen (needed to cancel a persistent request before
    /// terminating its instance).
    spot_requests: HashMap<String, String>,
}

impl Cache {
    /// Tracks `id` (a no-op if tracked already).
    pub fn track(&mut self, id: &str) {
        if !self.entries.contains_key(id) {
            self.entries.insert(id.to_owned(), Entry::default());
        }
    }

    /// Stops tracking `id` and forgets what was observed of it.
    pub fn untrack(&mut self, id: &str) {
        self.entries.remove(id);
        self.spot_requests.remove(id);
    }

    /// Tracked ids.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Every tracked id.
    pub fn tracked_ids(&self) -> Vec<String> {
        self.entries.keys().cloned().collect()
    }

    /// The last observation of `id` if it was made no longer than `max_age` before `now`:
    /// `Some(None)` means EC2 did not know the id then.
    pub fn fresh(&self, id: &str, max_age: Duration, now: Instant) -> Option<Option<Instance>> {
        let observed = self.entries.get(id)?.observed.as_ref()?;
        (now.saturating_duration_since(observed.at) <= max_age).then(|| observed.instance.clone())
    }

    /// Whether a refresh that started at `started` re-describes `id`: it was observed before
    /// then, and known to EC2 (or launched by this layer moments before), so it was among
    /// [`Cache::refresh_targets`]. An id first tracked since is not.
    pub fn covered_by_refresh(&self, id: &str, started: Instant) -> bool {
        self.entries.get(id).is_some_and(|e| {
            e.observed.as_ref().is_some_and(|o| {
                o.at < started && (o.instance.is_some() || e.recently_launched(started))
            })
        })
    }

    /// Whether this layer launched `id` less than [`LAUNCH_GRACE`] ago.
    pub fn recently_launched(&self, id: &str, now: Instant) -> bool {
        self.entries
            .get(id)
            .is_some_and(|e| e.recently_launched(now))
    }

    /// An instance this layer launched less than [`LAUNCH_GRACE`] ago, tagged `key = value`,
    /// as last known (what RunInstances answered, or a later observation): EC2 may not list it
    /// by its tags yet.
    pub fn recently_launched_with_tag(
        &self,
        key: &str,
        value: &str,
        now: Instant,
    ) -> Option<Instance> {
        self.entries
            .values()
            .filter(|e| e.recently_launched(now))
            .filter_map(|e| e.observed.as_ref()?.instance.as_ref())
            .filter(|i| i.tags.get(key).is_some_and(|v| v == value))
            .filter(|i| !i.state.is_terminal())
            .max_by(|a, b| (a.launch_time, &a.id).cmp(&(b.launch_time, &b.id)))
            .cloned()
    }

    /// Records a launch: tracks the instance with what RunInstances answered.
    pub fn launched(&mut self, instance: &Instance, at: Instant) {
        let entry = self.entries.entry(instance.id.clone()).or_default();
        entry.launched_at = Some(at);
        entry.observed = Some(Observed {
            instance: Some(instance.clone()),
            at,
        });
    }

    /// Applies an observation of `id` by a request sent at `at`. Untracked ids are not stored;
    /// an observation older than what the view already has is ignored; "unknown" for an
    /// instance launched moments ago keeps the last known instance.
    pub fn observe(
        &mut self,
        id: &str,
        instance: Option<Instance>,
        at: Instant,
        now: Instant,
    ) -> Applied {
        if instance
            .as_ref()
            .is_some_and(|i| i.state == InstanceState::Terminated)
        {
            self.spot_requests.remove(id);
        }
        let Some(entry) = self.entries.get_mut(id) else {
            return Applied {
                instance,
                changed: false,
            };
        };
        let previous = entry.observed.as_ref().map(|o| o.instance.clone());
        if entry.newest().is_some_and(|newest| at < newest) {
            return Applied {
                instance: previous.flatten().or(instance),
                changed: false,
            };
        }
        if instance.is_none()
            && entry.recently_launched(now)
            && let Some(Some(known)) = previous
        {
            return Applied {
                instance: Some(known),
                changed: false,
            };
        }
        let changed = previous.as_ref().is_some_and(|p| *p != instance);
        entry.observed = Some(Observed {
            instance: instance.clone(),
            at,
        });
        Applied { instance, changed }
    }

    /// Applies the state a Start/Stop/Terminate answer reported for `id` (the rest of the
    /// observation is kept, and so is its age). Returns whether the state changed.
    pub fn record_state(&mut self, id: &str, state: InstanceState, at: Instant) -> bool {
        if state == InstanceState::Terminated {
            self.spot_requests.remove(id);
        }
        let Some(entry) = self.entries.get_mut(id) else {
            return false;
        };
        if entry.newest().is_some_and(|newest| at < newest) {
            return false;
        }
        entry.mutated_at = Some(at);
        match entry.observed.as_mut().and_then(|o| o.instance.as_mut()) {
            Some(instance) if instance.state != state => {
                instance.state = state;
                true
            }
            _ => false,
        }
    }

    /// Remembers the spot request behind a spot instance.
    pub fn note_spot_request(&mut self, id: &str, request: &str) {
        self.spot_requests.insert(id.to_owned(), request.to_owned());
    }

    /// The spot request behind `id`, if known.
    pub fn spot_request(&self, id: &str) -> Option<String> {
        self.spot_requests.get(id).cloned()
    }

    /// Forgets the spot request behind `id` (cancelled).
    pub fn forget_spot_request(&mut self, id: &str) {
        self.spot_requests.remove(id);
    }

    /// The ids a periodic refresh describes, each with whether it may carry the operator's
    /// managed-by tag (unobserved ids may). Ids that EC2 no longer knows are left out (ids are
    /// never reused), except right after their launch.
    pub fn refresh_targets(&self, now: Instant) -> Vec<(String, bool)> {
        let mut targets: Vec<(String, bool)> = self
            .entries
            .iter()
            .filter_map(|(id, entry)| match &entry.observed {
                None => Some((id.clone(), true)),
                Some(Observed {
                    instance: Some(i), ..
                }) => Some((id.clone(), i.tags.contains_key(TAG_MANAGED_BY))),
                Some(Observed { instance: None, .. }) => {
                    entry.recently_launched(now).then(|| (id.clone(), true))
                }
            })
            .collect();
        targets.sort();
        targets
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn instance(id: &str, state: InstanceState) -> Instance {
        Instance {
            id: id.to_owned(),
            state,
            instance_type: Some("t3.micro".into()),
            private_ip: None,
            public_ip: None,
            private_dns: None,
            public_dns: None,
            availability_zone: None,
            launch_time: None,
            spot: false,
            tags: BTreeMap::new(),
        }
    }

    const A: &str = "i-0000000000000000a";

    #[test]
    fn untracked_observations_pass_through_unstored() {
        let mut c = Cache::default();
        let t = Instant::now();
        let applied = c.observe(A, Some(instance(A, InstanceState::Running)), t, t);
        assert!(applied.instance.is_some() && !applied.changed);
        assert_eq!(c.fresh(A, Duration::MAX, t), None);
    }

    #[test]
    fn first_observation_is_not_a_change_later_ones_are() {
        let mut c = Cache::default();
        let t = Instant::now();
        c.track(A);
        assert_eq!(c.fresh(A, Duration::MAX, t), None);
        let first = c.observe(A, Some(instance(A, InstanceState::Running)), t, t);
        assert!(!first.changed);
        let same = c.observe(
            A,
            Some(instance(A, InstanceState::Running)),
            t + Duration::from_secs(1),
            t,
        );
        assert!(!same.changed);
        let stopped = c.observe(
            A,
            Some(instance(A, InstanceState::Stopped)),
            t + Duration::from_secs(2),
            t,
        );
        assert!(stopped.changed);
        let gone = c.observe(A, None, t + Duration::from_secs(3), t);
        assert!(gone.changed && gone.instance.is_none());
    }

    #[test]
    fn freshness_follows_max_age() {
        let mut c = Cache::default();
        let t = Instant::now();
        c.track(A);
        c.observe(A, Some(instance(A, InstanceState::Running)), t, t);
        let later = t + Duration::from_secs(10);
        assert!(c.fresh(A, Duration::from_secs(11), later).is_some());
        assert_eq!(c.fresh(A, Duration::from_secs(9), later), None);
    }

    #[test]
    fn older_observations_do_not_overwrite_newer_ones() {
        let mut c = Cache::default();
        let t = Instant::now();
        c.track(A);
        c.observe(
            A,
            Some(instance(A, InstanceState::Stopped)),
            t + Duration::from_secs(5),
            t,
        );
        let stale = c.observe(A, Some(instance(A, InstanceState::Running)), t, t);
        assert_eq!(stale.instance.unwrap().state, InstanceState::Stopped);
        assert!(!stale.changed);
        // A mutation's answer counts as newer than observations sent before it.
        assert!(c.record_state(A, InstanceState::Pending, t + Duration::from_secs(6)));
        let stale = c.observe(
            A,
            Some(instance(A, InstanceState::Stopped)),
            t + Duration::from_secs(5),
            t,
        );
        assert_eq!(stale.instance.unwrap().state, InstanceState::Pending);
        // Its age is the observation's, though.
        assert!(
            c.fresh(A, Duration::ZERO, t + Duration::from_secs(5))
                .is_some()
        );
        assert!(
            c.fresh(A, Duration::ZERO, t + Duration::from_secs(6))
                .is_none()
        );
    }

    #[test]
    fn just_launched_instances_survive_not_found() {
        let mut c = Cache::default();
        let t = Instant::now();
        c.launched(&instance(A, InstanceState::Pending), t);
        assert!(c.recently_launched(A, t));
        let applied = c.observe(
            A,
            None,
            t + Duration::from_secs(1),
            t + Duration::from_secs(1),
        );
        assert_eq!(applied.instance.unwrap().state, InstanceState::Pending);
        assert_eq!(c.refresh_targets(t), vec![(A.to_owned(), false)]);
        // After the grace period, unknown means gone; gone ids are not refreshed again.
        let late = t + LAUNCH_GRACE + Duration::from_secs(1);
        let applied = c.observe(A, None, late, late);
        assert!(applied.instance.is_none() && applied.changed);
        assert!(c.refresh_targets(late).is_empty());
    }

    #[test]
    fn a_just_launched_instance_is_found_by_its_tag_until_the_grace_ends() {
        let mut c = Cache::default();
        let t = Instant::now();
        let mut i = instance(A, InstanceState::Pending);
        i.tags.insert("uid".into(), "u-1".into());
        c.launched(&i, t);
        assert_eq!(
            c.recently_launched_with_tag("uid", "u-1", t).map(|i| i.id),
            Some(A.to_owned())
        );
        assert_eq!(c.recently_launched_with_tag("uid", "u-2", t), None);
        assert_eq!(
            c.recently_launched_with_tag("uid", "u-1", t + LAUNCH_GRACE),
            None
        );
        // Terminated meanwhile: not an instance to find.
        c.record_state(A, InstanceState::ShuttingDown, t + Duration::from_secs(1));
        assert_eq!(c.recently_launched_with_tag("uid", "u-1", t), None);
    }

    #[test]
    fn refresh_targets_know_which_ids_carry_the_managed_tag() {
        let mut c = Cache::default();
        let t = Instant::now();
        let b = "i-0000000000000000b";
        let d = "i-0000000000000000d";
        c.track(A);
        c.track(b);
        c.track(d);
        let mut managed = instance(b, InstanceState::Running);
        managed
            .tags
            .insert(TAG_MANAGED_BY.into(), "sandbox-operator".into());
        c.observe(b, Some(managed), t, t);
        c.observe(d, Some(instance(d, InstanceState::Running)), t, t);
        assert_eq!(
            c.refresh_targets(t),
            vec![
                (A.to_owned(), true),
                (b.to_owned(), true),
                (d.to_owned(), false)
            ]
        );
        c.untrack(b);
        assert_eq!(c.len(), 2);
    }

    #[test]
    fn a_refresh_covers_ids_observed_before_it_and_known_to_ec2() {
        let mut c = Cache::default();
        let t = Instant::now();
        let later = t + Duration::from_secs(30);
        let (gone, fresh) = ("i-0000000000000000b", "i-0000000000000000c");
        for id in [A, gone, fresh] {
            c.track(id);
        }
        c.observe(A, Some(instance(A, InstanceState::Running)), t, t);
        c.observe(gone, None, t, t);
        assert!(c.covered_by_refresh(A, later));
        // Observed at the refresh's own start or after it: not covered by it.
        assert!(!c.covered_by_refresh(A, t));
        // Unknown to EC2 and not launched here: not among the refresh targets.
        assert!(!c.covered_by_refresh(gone, later));
        // Tracked, never observed (it may have been tracked after the refresh started).
        assert!(!c.covered_by_refresh(fresh, later));
        // Untracked.
        assert!(!c.covered_by_refresh("i-0000000000000000d", later));
        let targets: Vec<String> = c.refresh_targets(later).into_iter().map(|t| t.0).collect();
        assert!(targets.contains(&A.to_owned()) && !targets.contains(&gone.to_owned()));
    }

    #[test]
    fn spot_requests_are_forgotten_with_the_instance() {
        let mut c = Cache::default();
        let t = Instant::now();
        c.note_spot_request(A, "sir-1");
        assert_eq!(c.spot_request(A).as_deref(), Some("sir-1"));
        c.observe(A, Some(instance(A, InstanceState::Terminated)), t, t);
        assert_eq!(c.spot_request(A), None);
    }
}
