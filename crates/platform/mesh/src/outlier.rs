//! Passive outlier ejection and the peak-EWMA latency estimate, per endpoint.

use std::time::Duration;

use tokio::time::Instant;

use crate::settings::EjectionSettings;

/// Failures in a row, and whether (and until when) the endpoint is ejected.
#[derive(Debug, Default)]
pub struct Ejection {
    consecutive: u32,
    until: Option<Instant>,
    /// Ejections that still count towards the next one's length.
    strikes: u32,
    /// How many times it was ejected.
    pub ejections: u64,
}

impl Ejection {
    /// Whether the endpoint is ejected at `now`.
    pub fn is_ejected(&self, now: Instant) -> bool {
        self.until.is_some_and(|until| now < until)
    }

    /// How much longer it stays ejected.
    pub fn remaining(&self, now: Instant) -> Duration {
        self.until
            .map(|until| until.saturating_duration_since(now))
            .unwrap_or_default()
    }

    /// Failures in a row so far.
    pub fn consecutive(&self) -> u32 {
        self.consecutive
    }

    /// Records a call's outcome; `true` when the failures in a row call for an ejection.
    pub fn record(&mut self, failed: bool, settings: &EjectionSettings) -> bool {
        if failed {
            self.consecutive += 1;
            self.consecutive >= settings.consecutive_failures.max(1)
        } else {
            self.consecutive = 0;
            false
        }
    }

    /// Ejects the endpoint: for `base` × the number of recent ejections, at most `max`. Each
    /// `base` spent back in service forgives one earlier ejection.
    pub fn eject(&mut self, now: Instant, settings: &EjectionSettings) {
        let base = Duration::from_millis(settings.base_ms.max(1));
        if let Some(until) = self.until {
            let back_for = now.saturating_duration_since(until);
            let forgiven = (back_for.as_millis() / base.as_millis()) as u32;
            self.strikes = self.strikes.saturating_sub(forgiven);
        }
        self.strikes += 1;
        self.ejections += 1;
        let length = (base * self.strikes).min(Duration::from_millis(settings.max_ms.max(1)));
        self.until = Some(now + length);
        self.consecutive = 0;
    }
}

/// Peak-EWMA latency: jumps up to a slower sample at once, decays towards faster ones (and,
/// while idle, towards zero, so an endpoint once slow is tried again eventually).
#[derive(Debug)]
pub struct PeakEwma {
    estimate_ns: f64,
    stamp: Instant,
    decay_ns: f64,
}

impl PeakEwma {
    /// A new estimate, optimistic: an endpoint not yet measured is tried soon.
    pub fn new(initial: Duration, decay: Duration) -> Self {
        PeakEwma {
            estimate_ns: initial.as_nanos() as f64,
            stamp: Instant::now(),
            decay_ns: decay.as_nanos().max(1) as f64,
        }
    }

    fn decayed(&self, now: Instant) -> f64 {
        let idle = now.saturating_duration_since(self.stamp).as_nanos() as f64;
        self.estimate_ns * (-idle / self.decay_ns).exp()
    }

    /// Records a round trip that ended at `now`.
    pub fn observe(&mut self, rtt: Duration, now: Instant) {
        let rtt = rtt.as_nanos() as f64;
        let current = self.decayed(now);
        self.estimate_ns = if rtt > current {
            rtt
        } else {
            let elapsed = now.saturating_duration_since(self.stamp).as_nanos() as f64;
            let w = (-elapsed / self.decay_ns).exp();
            self.estimate_ns * w + rtt * (1.0 - w)
        };
        self.stamp = now;
    }

    /// The current estimate.
    pub fn estimate(&self, now: Instant) -> Duration {
        Duration::from_nanos(self.decayed(now) as u64)
    }

    /// The balancing cost with `in_flight` calls outstanding.
    pub fn cost(&self, now: Instant, in_flight: usize) -> f64 {
        self.decayed(now) * (in_flight as f64 + 1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> EjectionSettings {
        EjectionSettings {
            consecutive_failures: 5,
            base_ms: 30_000,
            max_ms: 300_000,
            max_percent: 50,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn five_failures_in_a_row_call_for_ejection_a_success_resets_the_count() {
        let s = settings();
        let mut e = Ejection::default();
        for _ in 0..4 {
            assert!(!e.record(true, &s));
        }
        assert!(!e.record(false, &s));
        for _ in 0..4 {
            assert!(!e.record(true, &s));
        }
        assert!(e.record(true, &s));
    }

    #[tokio::test(start_paused = true)]
    async fn ejections_grow_with_each_one_and_are_forgiven_in_service() {
        let s = settings();
        let mut e = Ejection::default();
        e.eject(Instant::now(), &s);
        assert!(e.is_ejected(Instant::now()));
        assert_eq!(e.remaining(Instant::now()), Duration::from_secs(30));
        tokio::time::advance(Duration::from_secs(30)).await;
        assert!(!e.is_ejected(Instant::now()));
        // Ejected again at once: twice as long.
        e.eject(Instant::now(), &s);
        assert_eq!(e.remaining(Instant::now()), Duration::from_secs(60));
        tokio::time::advance(Duration::from_secs(60)).await;
        e.eject(Instant::now(), &s);
        assert_eq!(e.remaining(Instant::now()), Duration::from_secs(90));
        // Long in service: two strikes forgiven, so the next is short again... but never
        // below one base.
        tokio::time::advance(Duration::from_secs(90 + 30 * 5)).await;
        e.eject(Instant::now(), &s);
        assert_eq!(e.remaining(Instant::now()), Duration::from_secs(30));
        assert_eq!(e.ejections, 4);
    }

    #[tokio::test(start_paused = true)]
    async fn ejection_length_is_capped() {
        let s = settings();
        let mut e = Ejection::default();
        for _ in 0..20 {
            e.eject(Instant::now(), &s);
        }
        assert_eq!(e.remaining(Instant::now()), Duration::from_secs(300));
    }

    #[tokio::test(start_paused = true)]
    async fn peak_ewma_jumps_to_slow_samples_and_decays_towards_fast_ones() {
        let decay = Duration::from_secs(10);
        let mut ewma = PeakEwma::new(Duration::from_millis(1), decay);
        ewma.observe(Duration::from_millis(200), Instant::now());
        assert_eq!(ewma.estimate(Instant::now()), Duration::from_millis(200));
        // Fast samples pull it down gradually, not at once.
        for _ in 0..10 {
            tokio::time::advance(Duration::from_millis(100)).await;
            ewma.observe(Duration::from_millis(2), Instant::now());
        }
        let after = ewma.estimate(Instant::now());
        assert!(after < Duration::from_millis(200) && after > Duration::from_millis(100));
        // Idle, it decays towards zero.
        tokio::time::advance(Duration::from_secs(60)).await;
        assert!(ewma.estimate(Instant::now()) < Duration::from_millis(1));
        // In-flight calls raise the cost.
        let now = Instant::now();
        assert!(ewma.cost(now, 3) > ewma.cost(now, 0));
    }
}
