//! How every watch the operator runs waits after an error: one schedule for each watcher, and
//! one for each `Controller`'s trigger stream, both here.
//!
//! kube-runtime's default (client-go's: 0.8 s doubling to 30 s, each delay stretched by up to
//! twice itself, reset only after a success) is kind to a struggling API server but slow to
//! notice one that came back: after an outage of 15-20 s its next attempt is often 10-25 s
//! away. And a `Controller` applies a second such schedule to its whole trigger stream, during
//! which none of its watches is polled, so one watch's error holds up the others.
//!
//! Here each watcher paces itself with [`backoff`]: 250 ms doubling to 1 s, each delay stretched
//! by at most a quarter (so watches and replicas do not retry in step), back to 250 ms after any
//! success. A `Controller` only adds [`trigger_backoff`] (50 ms to 250 ms), a guard against a
//! stream that would error in a tight loop; the pacing is the watchers'. After the API server
//! returns, a watch's next attempt is at most 1.25 s away; a restarted server answers a watch
//! from an old resourceVersion with 410 Gone, and the re-list that follows waits one more
//! delay, so a watch is back within about 2.5 s (plus the list itself). The cost while the
//! server is down: one connection attempt per watch per second, from the one replica that
//! leads (standbys run no controllers); a handful of watches in all.

use std::hash::BuildHasher;
use std::time::Duration;

use kube::runtime::utils::Backoff;

/// The first delay after an error.
pub const BASE: Duration = Duration::from_millis(250);
/// The longest delay (before jitter).
pub const MAX: Duration = Duration::from_secs(1);
/// The trigger stream's first delay.
pub const TRIGGER_BASE: Duration = Duration::from_millis(50);
/// The trigger stream's longest delay.
pub const TRIGGER_MAX: Duration = Duration::from_millis(250);

/// The watch backoff: exponential from [`BASE`] to [`MAX`], each delay plus up to a quarter of
/// itself at random, back to [`BASE`] after any success (kube-runtime resets it on every item
/// that is not an error).
#[derive(Clone, Debug)]
pub struct WatchBackoff {
    base: Duration,
    max: Duration,
    current: Option<Duration>,
    rng: u64,
}

/// The backoff for a watcher: `watcher(api, config).backoff(watch::backoff())`.
pub fn backoff() -> WatchBackoff {
    WatchBackoff::new(BASE, MAX)
}

/// The backoff for a `Controller`'s trigger stream, every watch of which paces itself with
/// [`backoff`]: `Controller::for_stream(..).trigger_backoff(watch::trigger_backoff())`.
pub fn trigger_backoff() -> WatchBackoff {
    WatchBackoff::new(TRIGGER_BASE, TRIGGER_MAX)
}

impl WatchBackoff {
    /// A schedule from `base` doubling to `max`.
    pub fn new(base: Duration, max: Duration) -> Self {
        // A seed from the standard library's per-process random keys.
        let seed = std::collections::hash_map::RandomState::new().hash_one(0u8) | 1;
        Self {
            base,
            max: max.max(base),
            current: None,
            rng: seed,
        }
    }

    /// A number in [0, 1), from a xorshift generator.
    fn unit(&mut self) -> f64 {
        let mut x = self.rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng = x;
        (x >> 11) as f64 / (1u64 << 53) as f64
    }
}

impl Iterator for WatchBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let d = match self.current {
            None => self.base,
            Some(d) => d.saturating_mul(2).min(self.max),
        };
        self.current = Some(d);
        let jitter = d.mul_f64(self.unit() / 4.0);
        Some(d + jitter)
    }
}

impl Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.current = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_from_the_base_to_the_cap_with_at_most_a_quarter_of_jitter() {
        let mut b = backoff();
        let floors = [250, 500, 1000, 1000, 1000];
        for floor in floors {
            let d = b.next().unwrap();
            let floor = Duration::from_millis(floor);
            assert!(d >= floor && d <= floor + floor / 4, "{d:?} vs {floor:?}");
        }
    }

    #[test]
    fn after_a_long_outage_the_next_attempt_is_never_more_than_the_cap_away() {
        // Twenty seconds of errors (the default schedule would be at 12.8-25.6 s per attempt
        // by then): the next attempt is at most 1.25 s away.
        let mut b = backoff();
        let mut waited = Duration::ZERO;
        while waited < Duration::from_secs(20) {
            waited += b.next().unwrap();
        }
        for _ in 0..100 {
            assert!(b.next().unwrap() <= MAX + MAX / 4);
        }
    }

    #[test]
    fn a_success_starts_over_from_the_base() {
        let mut b = backoff();
        for _ in 0..10 {
            b.next();
        }
        b.reset();
        assert!(b.next().unwrap() <= BASE + BASE / 4);
    }

    #[test]
    fn the_trigger_stream_only_guards_against_a_tight_loop() {
        let mut b = trigger_backoff();
        for _ in 0..20 {
            let d = b.next().unwrap();
            assert!(
                d >= TRIGGER_BASE && d <= TRIGGER_MAX + TRIGGER_MAX / 4,
                "{d:?}"
            );
        }
    }

    #[test]
    fn jitter_varies() {
        let mut b = WatchBackoff::new(MAX, MAX);
        let seen: std::collections::BTreeSet<Duration> =
            (0..20).map(|_| b.next().unwrap()).collect();
        assert!(seen.len() > 10, "{seen:?}");
    }
}
