//! Waiting between attempts of something that keeps failing: a reconnecting relay, a consumer,
//! a key fetch, a crashed child. Doubling from `first` up to `max`, each wait drawn in its upper
//! half (so a fleet that failed together does not retry together), and back to `first` on
//! [`Backoff::reset`] once things work again. The per-call retries of the client stack use
//! their own budgeted schedule (`upstream`); this is for loops that go on for as long as the
//! process runs.

use std::time::Duration;

use rand::Rng;

/// Doubling waits with jitter, from `first` to `max`.
#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    /// Starts at `first`, never waits longer than `max`.
    pub fn new(first: Duration, max: Duration) -> Self {
        let first = first.min(max);
        Backoff {
            first,
            max,
            next: first,
        }
    }

    /// The wait before the next attempt (between half the current step and the step), and
    /// doubles the step.
    pub fn next_wait(&mut self) -> Duration {
        let step = self.next;
        self.next = (self.next * 2).min(self.max);
        let half = step / 2;
        half + rand::thread_rng().gen_range(Duration::ZERO..=step - half)
    }

    /// The wait [`Backoff::next_wait`] would draw from next (its upper bound), for messages.
    pub fn step(&self) -> Duration {
        self.next
    }

    /// Back to `first`: the last attempt worked.
    pub fn reset(&mut self) {
        self.next = self.first;
    }

    /// Sleeps [`Backoff::next_wait`].
    pub async fn wait(&mut self) {
        tokio::time::sleep(self.next_wait()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_double_within_jitter_up_to_the_cap_and_reset() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(1_000));
        let mut steps = Vec::new();
        for _ in 0..6 {
            let step = b.step();
            let wait = b.next_wait();
            assert!(
                wait >= step / 2 && wait <= step,
                "{wait:?} outside {step:?}"
            );
            steps.push(step.as_millis());
        }
        assert_eq!(steps, [100, 200, 400, 800, 1_000, 1_000]);
        b.reset();
        assert_eq!(b.step(), Duration::from_millis(100));
    }

    #[test]
    fn a_first_wait_above_the_cap_is_the_cap() {
        let mut b = Backoff::new(Duration::from_secs(9), Duration::from_secs(2));
        assert!(b.next_wait() <= Duration::from_secs(2));
    }
}
