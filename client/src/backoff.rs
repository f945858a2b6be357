//! Exponential backoff with random jitter, for retrying requests and reconnecting.
//!
//! Jitter spreads the reconnects of many clients after a server restart over time, so they do
//! not all arrive in the same instant (a reconnect storm; `docs/protocol.md` section 4). Each delay
//! is drawn from the upper half of the current step ("equal jitter"): never shorter than half the
//! step, never longer than it. The type only computes delays; sleeping (or arming a timer) is the
//! caller's business.

use rand::Rng;
use std::time::Duration;

/// The delays between attempts.
#[derive(Debug, Clone)]
pub struct Backoff {
    /// The first step.
    base: Duration,
    /// The longest step.
    cap: Duration,
    /// The step the next delay is drawn from.
    step: Duration,
}

impl Backoff {
    /// Steps starting at `base`, doubling up to `cap`.
    pub fn new(base: Duration, cap: Duration) -> Self {
        Backoff { base, cap, step: base.min(cap) }
    }

    /// The next delay to wait, advancing the step.
    pub fn next_delay(&mut self) -> Duration {
        let half = self.step / 2;
        let jitter = rand::rng().random_range(Duration::ZERO..=half);
        self.step = (self.step * 2).min(self.cap);
        half + jitter
    }

    /// Starts again from the first step, after a success.
    pub fn reset(&mut self) {
        self.step = self.base.min(self.cap);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_stay_capped_and_reset() {
        let base = Duration::from_millis(100);
        let cap = Duration::from_millis(2000);
        let mut backoff = Backoff::new(base, cap);
        let mut step = base;
        for _ in 0..10 {
            let delay = backoff.next_delay();
            assert!(delay >= step / 2 && delay <= step, "{delay:?} outside {step:?}");
            step = (step * 2).min(cap);
        }
        assert!(backoff.next_delay() <= cap);
        backoff.reset();
        assert!(backoff.next_delay() <= base);
    }
}
