//! Waiting between tries when the server cannot be reached: exponential back-off with jitter, so
//! that a farm's runners, cut off together, do not come back in step, and sleeps that end early
//! when the runner stops.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// The first wait.
pub const BASE: Duration = Duration::from_secs(1);
/// The longest wait.
pub const CAP: Duration = Duration::from_secs(30);

/// Exponential back-off with "equal jitter": try n waits a random time in [d/2, d), d =
/// min(cap, base · 2ⁿ).
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    tries: u32,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff::new(BASE, CAP)
    }
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Self {
        Backoff {
            base,
            cap,
            tries: 0,
        }
    }

    /// The wait before the next try, given a random number.
    pub fn next_with(&mut self, random: u32) -> Duration {
        let d = delay(self.base, self.cap, self.tries, random);
        self.tries = self.tries.saturating_add(1);
        d
    }

    /// The wait before the next try.
    pub fn next_delay(&mut self) -> Duration {
        self.next_with(crate::dirs::random_u32())
    }

    /// After a success: the next failure starts from the base again.
    pub fn reset(&mut self) {
        self.tries = 0;
    }
}

/// The wait before try `n` (0-based): in [d/2, d), d = min(cap, base · 2ⁿ), placed in that range
/// by `random`.
pub fn delay(base: Duration, cap: Duration, n: u32, random: u32) -> Duration {
    let factor = 1u32.checked_shl(n.min(31)).unwrap_or(u32::MAX);
    let d = base.saturating_mul(factor).min(cap);
    let half = d / 2;
    let nanos = (half.as_nanos() * u128::from(random)) >> 32;
    half + Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
}

/// Sleeps `d`, or until `stop` is set (checked every 100 ms). Returns whether it slept the whole
/// time.
pub fn sleep_unless(stop: &AtomicBool, d: Duration) -> bool {
    let end = Instant::now() + d;
    loop {
        if stop.load(Ordering::SeqCst) {
            return false;
        }
        let now = Instant::now();
        if now >= end {
            return true;
        }
        std::thread::sleep((end - now).min(Duration::from_millis(100)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_grow_to_the_cap_with_jitter_in_range() {
        let s = Duration::from_secs;
        for (n, full) in [(0, 1), (1, 2), (2, 4), (4, 16), (5, 30), (40, 30)] {
            let low = delay(BASE, CAP, n, 0);
            let high = delay(BASE, CAP, n, u32::MAX);
            assert_eq!(low, s(full) / 2, "try {n}");
            assert!(
                high < s(full) && high > s(full) * 99 / 100,
                "try {n}: {high:?}"
            );
        }
        let mut b = Backoff::default();
        let waits: Vec<Duration> = (0..8).map(|_| b.next_with(u32::MAX / 2)).collect();
        assert!(waits.windows(2).all(|w| w[0] <= w[1]), "{waits:?}");
        assert!(waits.iter().all(|w| *w <= CAP && *w > Duration::ZERO));
        b.reset();
        assert_eq!(b.next_with(0), BASE / 2);
    }

    #[test]
    fn jitter_spreads_runners_apart() {
        let mut seen = std::collections::HashSet::new();
        let mut b = Backoff::default();
        for _ in 0..20 {
            b.reset();
            b.next_delay();
            b.next_delay();
            seen.insert(b.next_delay());
        }
        assert!(seen.len() > 10, "{seen:?}");
    }

    #[test]
    fn a_stop_ends_the_sleep() {
        let stop = AtomicBool::new(true);
        let t = Instant::now();
        assert!(!sleep_unless(&stop, Duration::from_secs(10)));
        assert!(t.elapsed() < Duration::from_secs(1));
        assert!(sleep_unless(
            &AtomicBool::new(false),
            Duration::from_millis(10)
        ));
    }
}
