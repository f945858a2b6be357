//! Token-bucket rate limits: server-wide ([`TokenBucket`]) and per key, such as per client IP
//! ([`KeyedLimiter`]).
//!
//! They guard the two things a reconnect storm or an attacker makes expensive: accepting
//! connections (a TLS handshake each) and password logins (an argon2 hash each). The current
//! time is always passed in, never read here, so the limits are deterministic to test and the
//! event loop reads the clock once per turn.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

/// One token, in the units a bucket counts in: nano-tokens, so that refilling is exact integer
/// arithmetic (`elapsed nanoseconds x rate`) with no rounding drift.
const TOKEN: u128 = 1_000_000_000;

/// A bucket of up to `burst` tokens refilled at `rate` per period (a second or a minute); each
/// admitted event takes one.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    /// Tokens added per period.
    rate: u128,
    /// The period `rate` is counted in, in seconds.
    period_secs: u128,
    /// Capacity in nano-tokens: `burst` events admitted at once after a quiet period.
    capacity: u128,
    /// Nano-tokens available at `last`.
    tokens: u128,
    /// When `tokens` was last brought up to date.
    last: Instant,
}

impl TokenBucket {
    /// A full bucket. A `rate_per_sec` of 0 never refills; a `burst` of 0 admits nothing.
    pub fn new(rate_per_sec: u32, burst: u32, now: Instant) -> Self {
        let capacity = u128::from(burst) * TOKEN;
        TokenBucket { rate: u128::from(rate_per_sec), period_secs: 1, capacity, tokens: capacity, last: now }
    }

    /// A full bucket refilled at `rate_per_min` tokens per minute.
    pub fn per_minute(rate_per_min: u32, burst: u32, now: Instant) -> Self {
        TokenBucket { period_secs: 60, ..TokenBucket::new(rate_per_min, burst, now) }
    }

    /// Takes one token if there is one. A `now` earlier than a previous call counts as no time
    /// passing, so a clock read out of order never adds tokens.
    pub fn try_take(&mut self, now: Instant) -> bool {
        self.tokens = self.tokens_at(now);
        if now > self.last {
            self.last = now;
        }
        if self.tokens >= TOKEN {
            self.tokens -= TOKEN;
            true
        } else {
            false
        }
    }

    /// Whether the bucket has refilled completely by `now`, so it behaves exactly like a new one
    /// and can be dropped without changing what it admits.
    pub fn is_full(&self, now: Instant) -> bool {
        self.tokens_at(now) >= self.capacity
    }

    /// How long from `now` until a token is available (zero if one is, `Duration::MAX` if never).
    pub fn wait_time(&self, now: Instant) -> Duration {
        let tokens = self.tokens_at(now);
        if tokens >= TOKEN {
            Duration::ZERO
        } else if self.rate == 0 || self.capacity < TOKEN {
            Duration::MAX
        } else {
            let nanos = ((TOKEN - tokens) * self.period_secs).div_ceil(self.rate);
            Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
        }
    }

    fn tokens_at(&self, now: Instant) -> u128 {
        let elapsed = now.saturating_duration_since(self.last).as_nanos();
        // Saturating: after a very long idle time the product may exceed u128, and the bucket
        // is full by then anyway.
        let added = elapsed.saturating_mul(self.rate) / self.period_secs;
        self.tokens.saturating_add(added).min(self.capacity)
    }
}

/// One [`TokenBucket`] per key (for example per client IP), with a bound on how many keys are
/// tracked so that many distinct peers cannot grow the map without limit.
///
/// When the map is at its bound and a new key arrives, buckets that have refilled completely are
/// dropped (they carry no information). If every tracked key is still busy, the new key is
/// refused until some bucket refills: under a flood from more distinct peers than the bound,
/// memory stays bounded and the peers already tracked keep their own limits. The sweep runs at
/// most once per refill interval, so a flood of new keys cannot make every call scan the map.
#[derive(Debug)]
pub struct KeyedLimiter<K: Hash + Eq> {
    /// The live buckets.
    buckets: HashMap<K, TokenBucket>,
    /// Rate of each bucket, per `period_secs`.
    rate: u32,
    /// The period of `rate`, in seconds (1 or 60).
    period_secs: u32,
    /// Burst of each bucket.
    burst: u32,
    /// Most keys tracked at once.
    max_keys: usize,
    /// No sweep before this time (none has run yet when `None`).
    next_sweep: Option<Instant>,
}

impl<K: Hash + Eq> KeyedLimiter<K> {
    /// A limiter giving every key `rate_per_sec` with bursts of `burst`, tracking at most
    /// `max_keys` keys (at least 1).
    pub fn new(rate_per_sec: u32, burst: u32, max_keys: usize) -> Self {
        KeyedLimiter {
            buckets: HashMap::new(),
            rate: rate_per_sec,
            period_secs: 1,
            burst,
            max_keys: max_keys.max(1),
            next_sweep: None,
        }
    }

    /// A limiter giving every key `rate_per_min` per minute with bursts of `burst`.
    pub fn per_minute(rate_per_min: u32, burst: u32, max_keys: usize) -> Self {
        KeyedLimiter { period_secs: 60, ..KeyedLimiter::new(rate_per_min, burst, max_keys) }
    }

    /// Takes one token from `key`'s bucket, creating a full bucket for a new key.
    pub fn try_take(&mut self, key: K, now: Instant) -> bool {
        self.take(key, now).is_ok()
    }

    /// Takes one token from `key`'s bucket, creating a full bucket for a new key; when there is
    /// none, says how long from `now` until there will be (for a key refused because every
    /// tracked key is busy, until the next sweep may make room).
    pub fn take(&mut self, key: K, now: Instant) -> Result<(), Duration> {
        if let Some(bucket) = self.buckets.get_mut(&key) {
            return if bucket.try_take(now) { Ok(()) } else { Err(bucket.wait_time(now)) };
        }
        if self.buckets.len() >= self.max_keys && !self.sweep(now) {
            return Err(self.next_sweep.map_or(Duration::ZERO, |next| next.saturating_duration_since(now)));
        }
        let mut bucket = match self.period_secs {
            60 => TokenBucket::per_minute(self.rate, self.burst, now),
            _ => TokenBucket::new(self.rate, self.burst, now),
        };
        let admitted = if bucket.try_take(now) { Ok(()) } else { Err(bucket.wait_time(now)) };
        self.buckets.insert(key, bucket);
        admitted
    }

    /// Drops full buckets; returns whether there is now room for a new key.
    fn sweep(&mut self, now: Instant) -> bool {
        if self.next_sweep.is_some_and(|next| now < next) {
            return false;
        }
        self.buckets.retain(|_, bucket| !bucket.is_full(now));
        // A bucket emptied just now is full again after burst/rate seconds; sweeping sooner
        // than a fraction of that finds little, so wait at least a tenth of it (and 10 ms).
        let refill_secs = if self.rate == 0 {
            1.0
        } else {
            f64::from(self.burst.max(1)) * f64::from(self.period_secs) / f64::from(self.rate)
        };
        let pause = Duration::from_secs_f64((refill_secs / 10.0).clamp(0.01, 1.0));
        self.next_sweep = Some(now + pause);
        self.buckets.len() < self.max_keys
    }

    /// How many keys are tracked.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    /// Whether no key is tracked.
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn burst_then_rate() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new(10, 3, t0);
        assert!(bucket.try_take(t0));
        assert!(bucket.try_take(t0));
        assert!(bucket.try_take(t0));
        assert!(!bucket.try_take(t0));
        assert_eq!(bucket.wait_time(t0), ms(100));
        // 10 per second: one token every 100 ms.
        assert!(!bucket.try_take(t0 + ms(99)));
        assert!(bucket.try_take(t0 + ms(100)));
        assert!(!bucket.try_take(t0 + ms(150)));
        assert!(bucket.try_take(t0 + ms(200)));
    }

    #[test]
    fn per_minute_rates() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::per_minute(6, 2, t0);
        assert!(bucket.try_take(t0));
        assert!(bucket.try_take(t0));
        assert!(!bucket.try_take(t0));
        // 6 per minute: one token every 10 s.
        assert_eq!(bucket.wait_time(t0), Duration::from_secs(10));
        assert!(!bucket.try_take(t0 + Duration::from_millis(9_999)));
        assert!(bucket.try_take(t0 + Duration::from_secs(10)));
        let mut keyed = KeyedLimiter::per_minute(6, 1, 10);
        assert!(keyed.try_take(1u64, t0));
        assert!(!keyed.try_take(1u64, t0 + Duration::from_secs(5)));
        assert!(keyed.try_take(2u64, t0 + Duration::from_secs(5)));
        assert!(keyed.try_take(1u64, t0 + Duration::from_secs(10)));
    }

    #[test]
    fn never_exceeds_burst() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new(1000, 5, t0);
        let later = t0 + Duration::from_secs(3600);
        assert!(bucket.is_full(later));
        let admitted = (0..100).filter(|_| bucket.try_take(later)).count();
        assert_eq!(admitted, 5);
        assert!(!bucket.is_full(later));
    }

    #[test]
    fn long_run_rate_holds() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new(50, 50, t0);
        // Offer 1000 events per second for 10 seconds: about burst + 10 * rate get through.
        let admitted = (0..10_000u64).filter(|i| bucket.try_take(t0 + ms(*i))).count();
        assert!((540..=551).contains(&admitted), "{admitted}");
    }

    #[test]
    fn time_going_backwards_adds_nothing() {
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_secs(1);
        let mut bucket = TokenBucket::new(1, 1, t0);
        assert!(bucket.try_take(t1));
        assert!(!bucket.try_take(t0));
        assert!(!bucket.try_take(t1));
        assert!(bucket.try_take(t1 + Duration::from_secs(1)));
    }

    #[test]
    fn degenerate_buckets() {
        let t0 = Instant::now();
        let mut no_refill = TokenBucket::new(0, 2, t0);
        assert!(no_refill.try_take(t0));
        assert!(no_refill.try_take(t0));
        assert!(!no_refill.try_take(t0 + Duration::from_secs(1000)));
        assert_eq!(no_refill.wait_time(t0), Duration::MAX);
        let mut closed = TokenBucket::new(100, 0, t0);
        assert!(!closed.try_take(t0 + Duration::from_secs(1)));
    }

    #[test]
    fn a_refusal_says_how_long_to_wait() {
        let t0 = Instant::now();
        let mut limiter = KeyedLimiter::new(200, 2, 1);
        assert_eq!(limiter.take("a", t0), Ok(()));
        assert_eq!(limiter.take("a", t0), Ok(()));
        assert_eq!(limiter.take("a", t0), Err(ms(5)), "200 per second: one every 5 ms");
        assert_eq!(limiter.take("a", t0 + ms(3)), Err(ms(2)));
        assert_eq!(limiter.take("a", t0 + ms(5)), Ok(()));
        // The map is full of a busy key: a newcomer waits for the next sweep.
        let wait = limiter.take("b", t0 + ms(5)).expect_err("no room");
        assert!(wait > Duration::ZERO && wait <= ms(1000), "{wait:?}");
    }

    #[test]
    fn keys_are_independent() {
        let t0 = Instant::now();
        let mut limiter = KeyedLimiter::new(1, 2, 100);
        assert!(limiter.try_take("a", t0));
        assert!(limiter.try_take("a", t0));
        assert!(!limiter.try_take("a", t0));
        assert!(limiter.try_take("b", t0));
        assert!(limiter.try_take("b", t0));
        assert!(!limiter.try_take("b", t0));
        assert!(limiter.try_take("a", t0 + Duration::from_secs(1)));
        assert_eq!(limiter.len(), 2);
    }

    #[test]
    fn map_stays_bounded_and_idle_keys_are_evicted() {
        let t0 = Instant::now();
        let mut limiter = KeyedLimiter::new(10, 1, 3);
        for ip in 0..3u32 {
            assert!(limiter.try_take(ip, t0));
        }
        // At the bound and every bucket busy: a new key is refused rather than tracked.
        assert!(!limiter.try_take(3, t0));
        assert_eq!(limiter.len(), 3);
        // After a refill interval the idle buckets are full, hence dropped, making room.
        let later = t0 + ms(100);
        assert!(limiter.try_take(3, later));
        assert_eq!(limiter.len(), 1);
        assert!(!limiter.try_take(3, later));
    }

    #[test]
    fn flood_of_new_keys_never_grows_the_map() {
        let t0 = Instant::now();
        let mut limiter = KeyedLimiter::new(1, 1, 64);
        for i in 0..10_000u32 {
            limiter.try_take(i, t0 + ms(u64::from(i)));
            assert!(limiter.len() <= 64);
        }
        assert!(!limiter.is_empty());
    }

    #[test]
    fn busy_keys_survive_a_sweep() {
        let t0 = Instant::now();
        let mut limiter = KeyedLimiter::new(1, 1, 2);
        assert!(limiter.try_take("busy", t0));
        assert!(limiter.try_take("idle", t0));
        // 1.5 s later both refilled; "busy" takes again and is not full at the sweep.
        let t1 = t0 + ms(1500);
        assert!(limiter.try_take("busy", t1));
        assert!(limiter.try_take("new", t1));
        assert_eq!(limiter.len(), 2);
        assert!(!limiter.try_take("busy", t1));
    }
}
