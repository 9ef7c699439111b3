//! One endpoint (an instance of a service) and what is known of it.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use http::Uri;
use serde::Serialize;
use tokio::time::Instant;

use crate::breaker::{Breaker, Permit, State};
use crate::outlier::{Ejection, PeakEwma};
use crate::settings::MeshSettings;

/// How fast the latency estimate forgets.
const EWMA_DECAY: Duration = Duration::from_secs(10);
/// The latency a failed call counts as, at least.
const FAILURE_PENALTY: Duration = Duration::from_millis(250);
/// The estimate of an endpoint never measured: optimistic, so a new instance gets traffic.
const INITIAL_RTT: Duration = Duration::from_millis(1);

/// An instance of a service, found by discovery.
#[derive(Debug)]
pub struct Endpoint {
    /// `scheme://authority`.
    pub url: Uri,
    /// Its weight for `weighted_random` (1 unless discovery says otherwise).
    pub weight: u32,
    in_flight: AtomicUsize,
    requests: AtomicU64,
    failures: AtomicU64,
    /// The last active health check passed (true until one fails).
    healthy: AtomicBool,
    state: Mutex<Stats>,
}

#[derive(Debug)]
struct Stats {
    ewma: PeakEwma,
    breaker: Breaker,
    ejection: Ejection,
}

/// What the cluster view shows of an endpoint.
#[derive(Debug, Clone, Serialize)]
pub struct EndpointSnapshot {
    /// Its URL.
    pub url: String,
    /// Its weight.
    pub weight: u32,
    /// Last active health check passed.
    pub healthy: bool,
    /// Ejected for failing in a row.
    pub ejected: bool,
    /// Milliseconds of ejection left.
    pub ejected_for_ms: u64,
    /// `closed`, `open` or `half_open`.
    pub breaker: &'static str,
    /// Calls in flight.
    pub in_flight: usize,
    /// Peak-EWMA latency, in milliseconds.
    pub ewma_ms: f64,
    /// Calls made.
    pub requests: u64,
    /// Calls that failed.
    pub errors: u64,
    /// Failures in a row.
    pub consecutive_failures: u32,
    /// Times ejected.
    pub ejections: u64,
    /// Times the breaker opened.
    pub breaker_opened: u64,
}

impl Endpoint {
    pub(crate) fn new(url: Uri, weight: u32, settings: &MeshSettings) -> Self {
        Endpoint {
            url,
            weight: weight.max(1),
            in_flight: AtomicUsize::new(0),
            requests: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            healthy: AtomicBool::new(true),
            state: Mutex::new(Stats {
                ewma: PeakEwma::new(INITIAL_RTT, EWMA_DECAY),
                breaker: Breaker::new(&settings.breaker),
                ejection: Ejection::default(),
            }),
        }
    }

    fn stats(&self) -> std::sync::MutexGuard<'_, Stats> {
        match self.state.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Calls in flight.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub(crate) fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    pub(crate) fn set_healthy(&self, healthy: bool) {
        let was = self.healthy.swap(healthy, Ordering::Relaxed);
        if was != healthy {
            tracing::info!(endpoint = %self.url, healthy, "health check changed");
        }
    }

    pub(crate) fn is_ejected(&self, now: Instant) -> bool {
        self.stats().ejection.is_ejected(now)
    }

    /// Whether a call may go here now: not ejected, breaker not open.
    pub(crate) fn is_available(&self, now: Instant) -> bool {
        let stats = self.stats();
        !stats.ejection.is_ejected(now) && stats.breaker.would_allow(now)
    }

    pub(crate) fn breaker_allows(&self, now: Instant) -> bool {
        self.stats().breaker.would_allow(now)
    }

    pub(crate) fn cost(&self, now: Instant) -> f64 {
        self.stats().ewma.cost(now, self.in_flight())
    }

    /// Takes the breaker's leave and counts the call in flight.
    pub(crate) fn begin(&self, now: Instant) -> Option<Permit> {
        let permit = self.stats().breaker.try_acquire(now)?;
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.requests.fetch_add(1, Ordering::Relaxed);
        Some(permit)
    }

    /// Records the end of a call begun with `begin`; `true` if it calls for an ejection.
    pub(crate) fn end(
        &self,
        permit: Permit,
        started: Instant,
        failed: bool,
        settings: &MeshSettings,
    ) -> bool {
        let now = Instant::now();
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        if failed {
            self.failures.fetch_add(1, Ordering::Relaxed);
        }
        let mut stats = self.stats();
        let rtt = now.saturating_duration_since(started);
        // A fast failure (refused, 503 at once) must not look like a fast endpoint.
        let rtt = if failed {
            rtt.max(FAILURE_PENALTY)
        } else {
            rtt
        };
        stats.ewma.observe(rtt, now);
        stats.breaker.record(now, permit, failed);
        stats.ejection.record(failed, &settings.ejection)
    }

    /// Undoes `begin` for a call that was abandoned before its outcome was known.
    pub(crate) fn abandon(&self, permit: Permit) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.stats().breaker.release(permit);
    }

    pub(crate) fn eject(&self, settings: &MeshSettings) {
        let now = Instant::now();
        let mut stats = self.stats();
        stats.ejection.eject(now, &settings.ejection);
        tracing::warn!(
            endpoint = %self.url,
            for_ms = stats.ejection.remaining(now).as_millis() as u64,
            "endpoint ejected after failing in a row"
        );
    }

    pub(crate) fn breaker_state(&self, now: Instant) -> State {
        self.stats().breaker.state(now)
    }

    /// What the cluster view shows.
    pub fn snapshot(&self) -> EndpointSnapshot {
        let now = Instant::now();
        let stats = self.stats();
        EndpointSnapshot {
            url: self.url.to_string().trim_end_matches('/').to_owned(),
            weight: self.weight,
            healthy: self.is_healthy(),
            ejected: stats.ejection.is_ejected(now),
            ejected_for_ms: stats.ejection.remaining(now).as_millis() as u64,
            breaker: stats.breaker.state(now).as_str(),
            in_flight: self.in_flight(),
            ewma_ms: (stats.ewma.estimate(now).as_secs_f64() * 1e5).round() / 100.0,
            requests: self.requests.load(Ordering::Relaxed),
            errors: self.failures.load(Ordering::Relaxed),
            consecutive_failures: stats.ejection.consecutive(),
            ejections: stats.ejection.ejections,
            breaker_opened: stats.breaker.opened,
        }
    }
}
