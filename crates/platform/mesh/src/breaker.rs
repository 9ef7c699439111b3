//! A three-state circuit breaker, one per endpoint.
//!
//! `Closed`: calls pass; the outcomes of the last `window` calls are kept, and once at least
//! `window` have been seen and `failure_rate` of them failed, it opens. `Open`: calls fail fast
//! without touching the endpoint, for `open_ms`. `HalfOpen`: up to `trial_calls` calls at a time
//! pass; a failure opens it again, `trial_calls` successes close it.
//!
//! Written here rather than taken from a crate: it is small, and the balancer must ask it
//! "would you let a call through?" without consuming a trial slot, and the cluster view must
//! read its state; tower has no breaker and tower-resilience changes its API every release.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

use crate::settings::BreakerSettings;

/// What the breaker is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Calls pass.
    Closed,
    /// Calls fail fast.
    Open,
    /// A few trial calls pass.
    HalfOpen,
}

impl State {
    /// Its name in the cluster view.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::Open => "open",
            State::HalfOpen => "half_open",
        }
    }
}

/// Leave to make one call, to be given back with its outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permit {
    /// An ordinary call.
    Normal,
    /// One of the half-open state's trial calls.
    Trial,
}

/// One endpoint's breaker.
#[derive(Debug)]
pub struct Breaker {
    failure_rate: f64,
    window: usize,
    open_for: Duration,
    trial_calls: u32,
    state: State,
    /// Recent outcomes, `true` for a failure.
    recent: VecDeque<bool>,
    opened_at: Instant,
    trials_in_flight: u32,
    trial_successes: u32,
    /// How many times it opened.
    pub opened: u64,
}

impl Breaker {
    /// A closed breaker.
    pub fn new(settings: &BreakerSettings) -> Self {
        Breaker {
            failure_rate: settings.failure_rate.clamp(0.0, 1.0),
            window: settings.window.max(1),
            open_for: Duration::from_millis(settings.open_ms),
            trial_calls: settings.trial_calls.max(1),
            state: State::Closed,
            recent: VecDeque::new(),
            opened_at: Instant::now(),
            trials_in_flight: 0,
            trial_successes: 0,
            opened: 0,
        }
    }

    /// The state as of `now` (an open breaker whose wait is over reads as half-open).
    pub fn state(&self, now: Instant) -> State {
        match self.state {
            State::Open if now >= self.opened_at + self.open_for => State::HalfOpen,
            state => state,
        }
    }

    /// Whether a call would be let through now, without taking a permit.
    pub fn would_allow(&self, now: Instant) -> bool {
        match self.state(now) {
            State::Closed => true,
            State::Open => false,
            State::HalfOpen => {
                self.state == State::Open || self.trials_in_flight < self.trial_calls
            }
        }
    }

    /// Takes leave to make a call, or `None` to fail fast.
    pub fn try_acquire(&mut self, now: Instant) -> Option<Permit> {
        if self.state == State::Open && now >= self.opened_at + self.open_for {
            self.state = State::HalfOpen;
            self.trials_in_flight = 0;
            self.trial_successes = 0;
        }
        match self.state {
            State::Closed => Some(Permit::Normal),
            State::Open => None,
            State::HalfOpen if self.trials_in_flight < self.trial_calls => {
                self.trials_in_flight += 1;
                Some(Permit::Trial)
            }
            State::HalfOpen => None,
        }
    }

    /// Records the outcome of a call made under `permit`.
    pub fn record(&mut self, now: Instant, permit: Permit, failed: bool) {
        match (self.state, permit) {
            (State::Closed, _) => {
                self.recent.push_back(failed);
                while self.recent.len() > self.window {
                    self.recent.pop_front();
                }
                let failures = self.recent.iter().filter(|f| **f).count();
                if self.recent.len() >= self.window
                    && failures as f64 >= self.failure_rate * self.recent.len() as f64
                {
                    self.open(now);
                }
            }
            (State::HalfOpen, Permit::Trial) => {
                self.trials_in_flight = self.trials_in_flight.saturating_sub(1);
                if failed {
                    self.open(now);
                } else {
                    self.trial_successes += 1;
                    if self.trial_successes >= self.trial_calls {
                        self.state = State::Closed;
                        self.recent.clear();
                    }
                }
            }
            // Calls that began before the breaker opened, or an ordinary call finishing during
            // the trials: their outcome says nothing about the trials.
            _ => {}
        }
    }

    /// Gives back a permit whose call was never made.
    pub fn release(&mut self, permit: Permit) {
        if permit == Permit::Trial && self.state == State::HalfOpen {
            self.trials_in_flight = self.trials_in_flight.saturating_sub(1);
        }
    }

    fn open(&mut self, now: Instant) {
        self.state = State::Open;
        self.opened_at = now;
        self.opened += 1;
        self.recent.clear();
        self.trials_in_flight = 0;
        self.trial_successes = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> BreakerSettings {
        BreakerSettings {
            failure_rate: 0.5,
            window: 20,
            open_ms: 10_000,
            trial_calls: 3,
        }
    }

    fn call(b: &mut Breaker, failed: bool) -> bool {
        let now = Instant::now();
        match b.try_acquire(now) {
            Some(p) => {
                b.record(now, p, failed);
                true
            }
            None => false,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn opens_only_after_a_full_window_at_the_failure_rate() {
        let mut b = Breaker::new(&settings());
        // 19 failures: not enough calls seen yet.
        for _ in 0..19 {
            assert!(call(&mut b, true));
        }
        assert_eq!(b.state(Instant::now()), State::Closed);
        assert!(call(&mut b, true));
        assert_eq!(b.state(Instant::now()), State::Open);
        assert!(!call(&mut b, false), "an open breaker fails fast");
        assert_eq!(b.opened, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn stays_closed_below_the_failure_rate() {
        let mut b = Breaker::new(&settings());
        // 9 failures in every 20 calls (45%), for a long time.
        for i in 0..200 {
            assert!(call(&mut b, i % 20 < 9));
        }
        assert_eq!(b.state(Instant::now()), State::Closed);
        // Exactly half fails: opens.
        for i in 0..20 {
            call(&mut b, i % 2 == 0);
        }
        assert_eq!(b.state(Instant::now()), State::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn half_opens_after_the_wait_and_closes_after_trial_successes() {
        let mut b = Breaker::new(&settings());
        for _ in 0..20 {
            call(&mut b, true);
        }
        tokio::time::advance(Duration::from_millis(9_999)).await;
        assert!(!b.would_allow(Instant::now()));
        assert!(!call(&mut b, false));
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(b.state(Instant::now()), State::HalfOpen);
        assert!(b.would_allow(Instant::now()));

        // Three trials at a time, no more.
        let now = Instant::now();
        let permits: Vec<_> = (0..3).filter_map(|_| b.try_acquire(now)).collect();
        assert_eq!(permits, vec![Permit::Trial; 3]);
        assert_eq!(b.try_acquire(now), None);
        assert!(!b.would_allow(now));
        for p in permits {
            b.record(now, p, false);
        }
        assert_eq!(b.state(now), State::Closed);
        // A fresh window: one failure does not reopen it.
        assert!(call(&mut b, true));
        assert_eq!(b.state(Instant::now()), State::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_trial_reopens_for_another_wait() {
        let mut b = Breaker::new(&settings());
        for _ in 0..20 {
            call(&mut b, true);
        }
        tokio::time::advance(Duration::from_secs(10)).await;
        let now = Instant::now();
        let p = b.try_acquire(now).expect("a trial");
        b.record(now, p, true);
        assert_eq!(b.state(now), State::Open);
        assert_eq!(b.opened, 2);
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(!call(&mut b, false));
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(call(&mut b, false));
    }

    #[tokio::test(start_paused = true)]
    async fn a_released_trial_permit_frees_its_slot() {
        let mut b = Breaker::new(&BreakerSettings {
            trial_calls: 1,
            ..settings()
        });
        for _ in 0..20 {
            call(&mut b, true);
        }
        tokio::time::advance(Duration::from_secs(10)).await;
        let now = Instant::now();
        let p = b.try_acquire(now).expect("a trial");
        assert_eq!(b.try_acquire(now), None);
        b.release(p);
        assert!(b.try_acquire(now).is_some());
    }
}
