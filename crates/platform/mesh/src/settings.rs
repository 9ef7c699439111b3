//! `[mesh]`: one section, read by every process, for every upstream it calls.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How an upstream's endpoint is chosen for a call.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    /// Each endpoint in turn.
    RoundRobin,
    /// At random, in proportion to each endpoint's weight.
    WeightedRandom,
    /// The endpoint with the fewest calls in flight.
    LeastConnections,
    /// Power of two choices: of two endpoints drawn at random, the one with the lower
    /// peak-EWMA latency × (calls in flight + 1).
    #[default]
    PeakEwma,
}

impl Policy {
    /// Its configuration name.
    pub fn as_str(self) -> &'static str {
        match self {
            Policy::RoundRobin => "round_robin",
            Policy::WeightedRandom => "weighted_random",
            Policy::LeastConnections => "least_connections",
            Policy::PeakEwma => "peak_ewma",
        }
    }
}

/// `[mesh]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MeshSettings {
    /// The default balancing policy.
    pub balance: Policy,
    /// Policies per upstream, e.g. `policies.inventory = "round_robin"`.
    pub policies: BTreeMap<String, Policy>,
    /// The launcher's registry file (`registry:<service>` upstreams read it).
    pub registry_file: Option<PathBuf>,
    /// etcd's client URL, e.g. `http://127.0.0.1:2379`: when set, `shopmesh serve` registers
    /// the instance under a lease, and `etcd:<service>` upstreams watch it.
    pub etcd_url: Option<String>,
    /// Key prefix of the registrations: `<prefix><service>/<instance>`.
    pub etcd_prefix: String,
    /// Lifetime of an instance's lease, renewed every third of it.
    pub lease_ttl_secs: u64,
    /// The URL others reach this instance at [default: `http://<server.host>:<server.port>`].
    pub advertise_url: Option<String>,
    /// How often the registry file is re-read and DNS names resolved, in milliseconds.
    pub refresh_ms: u64,
    /// Interval of the active health check (`GET /readyz`), in milliseconds (0: none; only
    /// passive ejection and breakers).
    pub health_interval_ms: u64,
    /// How long a health check may take, in milliseconds.
    pub health_timeout_ms: u64,
    /// Calls in flight per upstream beyond which new calls are refused at once (503).
    pub max_in_flight: usize,
    /// Deadline for connecting to an endpoint, in milliseconds.
    pub connect_timeout_ms: u64,
    /// Longest one attempt of a retryable call may take before it is tried elsewhere, in
    /// milliseconds (the call's own deadline still bounds the whole).
    pub attempt_timeout_ms: u64,
    /// `[mesh.breaker]`.
    pub breaker: BreakerSettings,
    /// `[mesh.ejection]`.
    pub ejection: EjectionSettings,
    /// `[mesh.retry]`.
    pub retry: RetrySettings,
}

impl Default for MeshSettings {
    fn default() -> Self {
        MeshSettings {
            balance: Policy::PeakEwma,
            policies: BTreeMap::new(),
            registry_file: None,
            etcd_url: None,
            etcd_prefix: "/shopmesh/services/".to_owned(),
            lease_ttl_secs: 10,
            advertise_url: None,
            refresh_ms: 1_000,
            health_interval_ms: 2_000,
            health_timeout_ms: 1_000,
            max_in_flight: 1_024,
            connect_timeout_ms: 1_000,
            attempt_timeout_ms: 2_000,
            breaker: BreakerSettings::default(),
            ejection: EjectionSettings::default(),
            retry: RetrySettings::default(),
        }
    }
}

impl MeshSettings {
    /// The policy for `upstream`.
    pub fn policy(&self, upstream: &str) -> Policy {
        self.policies.get(upstream).copied().unwrap_or(self.balance)
    }

    pub(crate) fn refresh(&self) -> Duration {
        Duration::from_millis(self.refresh_ms.max(50))
    }
    pub(crate) fn health_interval(&self) -> Option<Duration> {
        (self.health_interval_ms > 0)
            .then(|| Duration::from_millis(self.health_interval_ms.max(50)))
    }
    pub(crate) fn health_timeout(&self) -> Duration {
        Duration::from_millis(self.health_timeout_ms.max(10))
    }
    pub(crate) fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms.max(1))
    }
    pub(crate) fn attempt_timeout(&self) -> Duration {
        Duration::from_millis(self.attempt_timeout_ms.max(1))
    }
    pub(crate) fn lease_ttl(&self) -> Duration {
        Duration::from_secs(self.lease_ttl_secs.max(1))
    }
}

/// `[mesh.breaker]`: a circuit breaker per endpoint.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BreakerSettings {
    /// The breaker opens when at least this share of the recent calls failed (0–1).
    pub failure_rate: f64,
    /// How many recent calls count, and the fewest that must have been seen to open.
    pub window: usize,
    /// How long it stays open before trial calls, in milliseconds.
    pub open_ms: u64,
    /// Trial calls let through when half-open; that many successes close it.
    pub trial_calls: u32,
}

impl Default for BreakerSettings {
    fn default() -> Self {
        BreakerSettings {
            failure_rate: 0.5,
            window: 20,
            open_ms: 10_000,
            trial_calls: 3,
        }
    }
}

/// `[mesh.ejection]`: passive outlier detection.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EjectionSettings {
    /// Failures in a row that eject an endpoint.
    pub consecutive_failures: u32,
    /// First ejection's length, in milliseconds; each further one is longer by as much.
    pub base_ms: u64,
    /// Longest ejection, in milliseconds.
    pub max_ms: u64,
    /// At most this share of an upstream's endpoints is ejected at once (percent).
    pub max_percent: u32,
}

impl Default for EjectionSettings {
    fn default() -> Self {
        EjectionSettings {
            consecutive_failures: 5,
            base_ms: 30_000,
            max_ms: 300_000,
            max_percent: 50,
        }
    }
}

/// `[mesh.retry]`: retries of calls that are safe to repeat.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetrySettings {
    /// Attempts per call, the first included.
    pub max_attempts: u32,
    /// Retries allowed as a share of calls (percent), over a 1 s window.
    pub budget_percent: u32,
    /// Retries allowed per second whatever the traffic.
    pub budget_per_sec: u32,
    /// First back-off, in milliseconds (doubling, with full jitter).
    pub backoff_base_ms: u64,
    /// Longest back-off, in milliseconds.
    pub backoff_max_ms: u64,
}

impl Default for RetrySettings {
    fn default() -> Self {
        RetrySettings {
            max_attempts: 3,
            budget_percent: 20,
            budget_per_sec: 10,
            backoff_base_ms: 25,
            backoff_max_ms: 250,
        }
    }
}
