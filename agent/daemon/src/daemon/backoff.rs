//! Retrying: capped exponential backoff with jitter, and logging a failure once per distinct
//! error (a controller that is down for an hour must not fill the journal).

use std::time::Duration;

use rand::Rng;

/// Capped exponential backoff with "equal jitter": the n-th delay is uniformly drawn from
/// `[d/2, d]` where `d = min(initial * 2^n, max)`. [`Backoff::reset`] after a success.
#[derive(Clone, Debug)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    /// Delays starting at `initial`, doubling up to `max`.
    pub fn new(initial: Duration, max: Duration) -> Backoff {
        Backoff {
            initial,
            max: max.max(initial),
            attempt: 0,
        }
    }

    /// The ceiling of the next delay (without jitter).
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(30)).unwrap_or(u32::MAX);
        self.initial.saturating_mul(factor).min(self.max)
    }

    /// The next delay (with jitter), and one step further.
    pub fn next_delay(&mut self) -> Duration {
        self.next_with(&mut rand::rng())
    }

    /// [`Backoff::next_delay`] with a given random source (tests).
    pub fn next_with<R: Rng + ?Sized>(&mut self, rng: &mut R) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        let half = ceiling / 2;
        let spread = u64::try_from((ceiling - half).as_millis()).unwrap_or(u64::MAX);
        let jitter = if spread == 0 {
            0
        } else {
            rng.random_range(0..=spread)
        };
        half + Duration::from_millis(jitter)
    }

    /// Back to the initial delay (after a success).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// How many delays were handed out since the last reset.
    #[cfg(test)]
    pub fn attempts(&self) -> u32 {
        self.attempt
    }
}

/// Remembers the last failure of one activity so that each distinct error is logged once
/// (at warn level, the repeats at debug), and the recovery once (at info level).
#[derive(Clone, Debug, Default)]
pub struct ErrorLog {
    last: Option<String>,
}

impl ErrorLog {
    /// A failure: returns true when it differs from the previous one (log it then).
    pub fn failed(&mut self, error: &str) -> bool {
        if self.last.as_deref() == Some(error) {
            return false;
        }
        self.last = Some(error.to_owned());
        true
    }

    /// A success: returns true when there was a failure before (log the recovery then).
    pub fn succeeded(&mut self) -> bool {
        self.last.take().is_some()
    }

    /// The last failure, if the activity is failing.
    #[cfg(test)]
    pub fn last(&self) -> Option<&str> {
        self.last.as_deref()
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    use super::*;

    #[test]
    fn delays_double_with_jitter_and_are_capped() {
        let ms = Duration::from_millis;
        let mut b = Backoff::new(ms(200), ms(5000));
        let mut rng = StdRng::seed_from_u64(7);
        let ceilings = [200, 400, 800, 1600, 3200, 5000, 5000, 5000];
        for c in ceilings {
            assert_eq!(b.ceiling(), ms(c));
            let d = b.next_with(&mut rng);
            assert!(
                d >= ms(c / 2) && d <= ms(c),
                "{d:?} not in [{}, {c}] ms",
                c / 2
            );
        }
        assert_eq!(b.attempts(), 8);
        b.reset();
        assert_eq!(b.ceiling(), ms(200));
        // a long outage never overflows
        for _ in 0..100 {
            assert!(b.next_with(&mut rng) <= ms(5000));
        }
    }

    #[test]
    fn jitter_spreads_the_delays() {
        let ms = Duration::from_millis;
        let mut rng = StdRng::seed_from_u64(1);
        let delays: std::collections::BTreeSet<Duration> = (0..50)
            .map(|_| {
                let mut b = Backoff::new(ms(1000), ms(1000));
                b.next_with(&mut rng)
            })
            .collect();
        assert!(delays.len() > 10, "{delays:?}");
    }

    #[test]
    fn each_distinct_error_is_logged_once() {
        let mut log = ErrorLog::default();
        assert!(!log.succeeded());
        assert!(log.failed("connection refused"));
        assert!(!log.failed("connection refused"));
        assert!(log.failed("timed out"));
        assert!(log.failed("connection refused"));
        assert_eq!(log.last(), Some("connection refused"));
        assert!(log.succeeded());
        assert!(!log.succeeded());
        assert!(log.failed("connection refused"));
    }
}
