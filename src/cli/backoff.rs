//! Reconnect delays for `ticker subscribe` and `ticker watch`: exponential backoff with
//! full jitter (initial 100 ms, factor 1.6, cap 10 s), reset after a healthy minute.

use std::time::Duration;

use rand::Rng;

pub const INITIAL: Duration = Duration::from_millis(100);
pub const FACTOR: f64 = 1.6;
pub const CAP: Duration = Duration::from_secs(10);
/// A connection that stayed up this long starts the next backoff from the beginning.
pub const HEALTHY: Duration = Duration::from_secs(60);
/// RESOURCE_EXHAUSTED: the server is full; wait at least this long.
pub const BUSY_FLOOR: Duration = Duration::from_secs(2);

#[derive(Debug, Clone)]
pub struct Backoff {
    attempt: u32,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff::new()
    }
}

impl Backoff {
    pub fn new() -> Backoff {
        Backoff { attempt: 0 }
    }

    /// Consecutive failed attempts so far.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }

    /// The ceiling of the next delay: INITIAL × FACTOR^attempt, at most CAP.
    pub fn ceiling(&self) -> Duration {
        let factor = FACTOR.powi(self.attempt.min(64) as i32);
        INITIAL.mul_f64(factor).min(CAP)
    }

    /// The next delay: uniformly random in [0, ceiling] ("full jitter").
    pub fn next_delay(&mut self, rng: &mut impl Rng) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        ceiling.mul_f64(rng.random_range(0.0..=1.0))
    }

    /// Call when a connection ends after having been up for `uptime`.
    pub fn connection_ended(&mut self, uptime: Duration) {
        if uptime >= HEALTHY {
            self.attempt = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::SmallRng, SeedableRng};

    #[test]
    fn grows_by_the_factor_up_to_the_cap_with_jitter_below_the_ceiling() {
        let mut b = Backoff::new();
        let mut rng = SmallRng::seed_from_u64(7);
        let mut ceilings = Vec::new();
        for _ in 0..12 {
            let ceiling = b.ceiling();
            ceilings.push(ceiling);
            assert!(b.next_delay(&mut rng) <= ceiling);
        }
        assert_eq!(ceilings[0], Duration::from_millis(100));
        assert_eq!(ceilings[1], Duration::from_millis(160));
        assert_eq!(ceilings[2], Duration::from_millis(256));
        assert_eq!(*ceilings.last().unwrap(), CAP);
        assert_eq!(b.attempts(), 12);
    }

    #[test]
    fn a_healthy_minute_resets_it() {
        let mut b = Backoff::new();
        let mut rng = SmallRng::seed_from_u64(1);
        b.next_delay(&mut rng);
        b.next_delay(&mut rng);
        b.connection_ended(Duration::from_secs(5));
        assert_eq!(b.attempts(), 2);
        b.connection_ended(HEALTHY);
        assert_eq!(b.ceiling(), INITIAL);
    }
}
