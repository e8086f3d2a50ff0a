//! Client-side token buckets that pace EC2 calls so the account's buckets are not drained, and
//! the backoff used between retries.
//!
//! A bucket holds up to `capacity` tokens and refills continuously at `refill_per_second`, the
//! model AWS documents for its own request buckets. A call *reserves* its tokens: when the
//! bucket is short it goes into debt and the caller sleeps until the debt is repaid, so waiters
//! are served in order without polling. A caller that would wait longer than the bound is
//! refused at once ([`Reservation::Refused`]) and sees `Ec2Error::Paced` (the operator's own
//! pacing, not AWS throttling): the controller requeues rather than holding a reconcile for
//! minutes. A launch may also take its place in line without sleeping
//! ([`Limiter::reserve`]) and come back when its turn is due.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One token bucket's size and refill rate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    /// Maximum tokens (the burst).
    pub capacity: f64,
    /// Tokens added per second.
    pub refill_per_second: f64,
}

impl RateLimit {
    /// A bucket that never limits.
    pub const UNLIMITED: Self = Self {
        capacity: f64::INFINITY,
        refill_per_second: f64::INFINITY,
    };

    /// A bucket of `capacity` tokens refilled at `refill_per_second`.
    pub const fn new(capacity: f64, refill_per_second: f64) -> Self {
        Self {
            capacity,
            refill_per_second,
        }
    }

    fn is_unlimited(&self) -> bool {
        self.capacity.is_infinite() || self.refill_per_second.is_infinite()
    }
}

/// The outcome of asking a bucket for tokens.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Reservation {
    /// Granted; sleep this long first (zero: go now).
    Wait(Duration),
    /// Refused: the wait would have exceeded the bound (the tokens were not taken).
    Refused(Duration),
}

/// The pure arithmetic of one bucket (no clock of its own, so tests pass instants in).
#[derive(Debug, Clone)]
pub struct TokenBucket {
    limit: RateLimit,
    /// May go below zero: debt of reservations not yet served.
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(limit: RateLimit, now: Instant) -> Self {
        Self {
            limit,
            tokens: if limit.is_unlimited() {
                0.0
            } else {
                limit.capacity
            },
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = self.last.max(now);
        self.tokens =
            (self.tokens + elapsed * self.limit.refill_per_second).min(self.limit.capacity);
    }

    /// Takes `cost` tokens, going into debt if needed, unless the wait for them would exceed
    /// `max_wait`.
    pub fn reserve(&mut self, now: Instant, cost: f64, max_wait: Duration) -> Reservation {
        if self.limit.is_unlimited() {
            return Reservation::Wait(Duration::ZERO);
        }
        self.refill(now);
        let after = self.tokens - cost;
        if after >= 0.0 {
            self.tokens = after;
            return Reservation::Wait(Duration::ZERO);
        }
        let wait = if self.limit.refill_per_second > 0.0 {
            Duration::try_from_secs_f64(-after / self.limit.refill_per_second)
                .unwrap_or(Duration::MAX)
        } else {
            Duration::MAX
        };
        if wait > max_wait {
            return Reservation::Refused(wait);
        }
        self.tokens = after;
        Reservation::Wait(wait)
    }

    /// After AWS answered `RequestLimitExceeded`: the account's bucket is empty whatever this
    /// one believes, so drop the credit (debts stay as they are).
    pub fn drain(&mut self, now: Instant) {
        if self.limit.is_unlimited() {
            return;
        }
        self.refill(now);
        self.tokens = self.tokens.min(0.0);
    }

    /// Tokens available now (negative: debt).
    pub fn tokens(&mut self, now: Instant) -> f64 {
        self.refill(now);
        self.tokens
    }
}

/// A shared bucket that callers await.
#[derive(Debug)]
pub struct Limiter {
    bucket: Mutex<TokenBucket>,
    max_wait: Duration,
}

impl Limiter {
    /// A full bucket; callers wait at most `max_wait` for tokens.
    pub fn new(limit: RateLimit, max_wait: Duration) -> Self {
        Self {
            bucket: Mutex::new(TokenBucket::new(limit, Instant::now())),
            max_wait,
        }
    }

    /// Waits for `cost` tokens (at most the limiter's bound). Answers what the pacing did:
    /// [`Reservation::Wait`] with the time waited (zero: none), or [`Reservation::Refused`]
    /// with the wait that would have been needed (nothing taken, nothing to send).
    pub async fn acquire(&self, cost: f64) -> Reservation {
        let reservation = self.reserve(cost, self.max_wait);
        if let Reservation::Wait(d) = reservation
            && !d.is_zero()
        {
            tokio::time::sleep(d).await;
        }
        reservation
    }

    /// Takes `cost` tokens now for a call to be made after the returned wait, unless that wait
    /// would exceed `bound` (then nothing is taken). Does not sleep: the caller keeps the
    /// place in line and comes back when its turn is due.
    pub fn reserve(&self, cost: f64, bound: Duration) -> Reservation {
        self.bucket
            .lock()
            .expect("limiter lock")
            .reserve(Instant::now(), cost, bound)
    }

    /// The bucket's size and refill rate.
    pub fn limit(&self) -> RateLimit {
        self.bucket.lock().expect("limiter lock").limit
    }

    /// See [`TokenBucket::drain`].
    pub fn drain(&self) {
        self.bucket
            .lock()
            .expect("limiter lock")
            .drain(Instant::now());
    }
}

/// The delay before retry number `retry` (0 = the first retry): exponential from `base`,
/// capped at `cap`, with "equal jitter" (half fixed, half random; `jitter` in `[0, 1)`), so
/// that callers throttled together do not come back together.
pub fn backoff(retry: u32, base: Duration, cap: Duration, jitter: f64) -> Duration {
    let exp = base.saturating_mul(1u32.checked_shl(retry.min(31)).unwrap_or(u32::MAX));
    let ceiling = exp.min(cap);
    let half = ceiling / 2;
    half + half.mul_f64(jitter.clamp(0.0, 1.0))
}

/// A random number in `[0, 1)` for jitter (std's per-instance random hasher keys; no crate
/// needed for this).
pub fn jitter() -> f64 {
    use std::hash::BuildHasher;
    let h = std::collections::hash_map::RandomState::new().hash_one(Instant::now());
    (h >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    #[test]
    fn a_full_bucket_serves_its_burst_at_once() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(RateLimit::new(5.0, 2.0), t0);
        for _ in 0..5 {
            assert_eq!(
                b.reserve(t0, 1.0, secs(10.0)),
                Reservation::Wait(Duration::ZERO)
            );
        }
        // The sixth waits for half a second's refill, the seventh for a second.
        assert_eq!(b.reserve(t0, 1.0, secs(10.0)), Reservation::Wait(secs(0.5)));
        assert_eq!(b.reserve(t0, 1.0, secs(10.0)), Reservation::Wait(secs(1.0)));
        // A second later the debt of two tokens is repaid: the next waits half a second again.
        assert_eq!(
            b.reserve(t0 + secs(1.0), 1.0, secs(10.0)),
            Reservation::Wait(secs(0.5))
        );
    }

    #[test]
    fn refill_stops_at_capacity() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(RateLimit::new(3.0, 10.0), t0);
        assert_eq!(
            b.reserve(t0, 3.0, Duration::ZERO),
            Reservation::Wait(Duration::ZERO)
        );
        assert!((b.tokens(t0 + secs(100.0)) - 3.0).abs() < 1e-9);
    }

    #[test]
    fn waits_beyond_the_bound_are_refused_without_taking_tokens() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(RateLimit::new(1.0, 1.0), t0);
        assert_eq!(
            b.reserve(t0, 1.0, secs(2.0)),
            Reservation::Wait(Duration::ZERO)
        );
        assert_eq!(b.reserve(t0, 1.0, secs(2.0)), Reservation::Wait(secs(1.0)));
        assert_eq!(b.reserve(t0, 1.0, secs(2.0)), Reservation::Wait(secs(2.0)));
        assert_eq!(
            b.reserve(t0, 1.0, secs(2.0)),
            Reservation::Refused(secs(3.0))
        );
        // The refusal took nothing: the debt is still two tokens.
        assert!((b.tokens(t0) + 2.0).abs() < 1e-9);
    }

    #[test]
    fn costs_weigh() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(RateLimit::new(4.0, 2.0), t0);
        assert_eq!(
            b.reserve(t0, 2.0, secs(5.0)),
            Reservation::Wait(Duration::ZERO)
        );
        assert_eq!(
            b.reserve(t0, 2.0, secs(5.0)),
            Reservation::Wait(Duration::ZERO)
        );
        assert_eq!(b.reserve(t0, 2.0, secs(5.0)), Reservation::Wait(secs(1.0)));
    }

    #[test]
    fn drain_drops_credit_but_keeps_debt() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(RateLimit::new(10.0, 5.0), t0);
        b.drain(t0);
        assert_eq!(b.reserve(t0, 1.0, secs(5.0)), Reservation::Wait(secs(0.2)));
        b.drain(t0);
        assert!((b.tokens(t0) + 1.0).abs() < 1e-9);
    }

    #[test]
    fn unlimited_never_waits_and_zero_refill_refuses() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(RateLimit::UNLIMITED, t0);
        for _ in 0..1000 {
            assert_eq!(
                b.reserve(t0, 1.0, Duration::ZERO),
                Reservation::Wait(Duration::ZERO)
            );
        }
        let mut b = TokenBucket::new(RateLimit::new(1.0, 0.0), t0);
        assert_eq!(
            b.reserve(t0, 1.0, secs(1.0)),
            Reservation::Wait(Duration::ZERO)
        );
        assert!(matches!(
            b.reserve(t0, 1.0, secs(1.0)),
            Reservation::Refused(_)
        ));
    }

    #[tokio::test]
    async fn the_limiter_reports_waits_and_refusals_and_reserves_without_sleeping() {
        let l = Limiter::new(RateLimit::new(1.0, 10.0), secs(0.5));
        assert_eq!(l.acquire(1.0).await, Reservation::Wait(Duration::ZERO));
        // The next token comes after 0.1 s: waited for, and said so.
        match l.acquire(1.0).await {
            Reservation::Wait(d) => assert!(d > Duration::ZERO && d <= secs(0.1), "{d:?}"),
            other => panic!("{other:?}"),
        }
        // A reservation keeps its place without sleeping; beyond the bound it is refused.
        assert!(matches!(l.reserve(1.0, secs(10.0)), Reservation::Wait(d) if d > Duration::ZERO));
        assert!(matches!(
            l.reserve(100.0, secs(1.0)),
            Reservation::Refused(_)
        ));
        assert_eq!(l.limit(), RateLimit::new(1.0, 10.0));
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let base = Duration::from_millis(100);
        let cap = Duration::from_secs(1);
        assert_eq!(backoff(0, base, cap, 0.0), Duration::from_millis(50));
        assert_eq!(backoff(0, base, cap, 1.0), Duration::from_millis(100));
        assert_eq!(backoff(2, base, cap, 0.0), Duration::from_millis(200));
        assert_eq!(backoff(10, base, cap, 1.0), cap);
        assert_eq!(
            backoff(u32::MAX, base, cap, 0.5),
            Duration::from_millis(750)
        );
        for _ in 0..100 {
            let j = jitter();
            assert!((0.0..1.0).contains(&j));
        }
    }
}
