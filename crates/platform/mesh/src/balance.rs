//! Choosing an endpoint among the candidates, by policy.
//!
//! tower's `p2c::Balance` over `PeakEwma` is the model for the default, but it owns its
//! endpoints as services and hides their load; here the same endpoint list also feeds the
//! other three policies, the health checks, ejection, breakers and the cluster view, so the
//! choice is a function over that list.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use rand::Rng;
use tokio::time::Instant;

use crate::endpoint::Endpoint;
use crate::settings::Policy;

/// Picks one of `candidates` (non-empty) by `policy`.
pub(crate) fn pick<'a>(
    policy: Policy,
    candidates: &'a [Arc<Endpoint>],
    cursor: &AtomicUsize,
    now: Instant,
) -> Option<&'a Arc<Endpoint>> {
    let n = candidates.len();
    if n <= 1 {
        return candidates.first();
    }
    let mut rng = rand::thread_rng();
    match policy {
        Policy::RoundRobin => candidates.get(cursor.fetch_add(1, Ordering::Relaxed) % n),
        Policy::WeightedRandom => {
            let total: u64 = candidates.iter().map(|e| u64::from(e.weight)).sum();
            let mut ticket = rng.gen_range(0..total.max(1));
            for endpoint in candidates {
                let weight = u64::from(endpoint.weight);
                if ticket < weight {
                    return Some(endpoint);
                }
                ticket -= weight;
            }
            candidates.last()
        }
        Policy::LeastConnections => {
            // The fewest in flight; ties broken from a random start so they share the load.
            let start = rng.gen_range(0..n);
            (0..n)
                .map(|i| &candidates[(start + i) % n])
                .min_by_key(|e| e.in_flight())
        }
        Policy::PeakEwma => {
            let a = rng.gen_range(0..n);
            let mut b = rng.gen_range(0..n - 1);
            if b >= a {
                b += 1;
            }
            let (ea, eb) = (&candidates[a], &candidates[b]);
            if ea.cost(now) <= eb.cost(now) {
                Some(ea)
            } else {
                Some(eb)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::time::Duration;

    use super::*;
    use crate::settings::MeshSettings;

    fn endpoints(weights: &[u32]) -> Vec<Arc<Endpoint>> {
        weights
            .iter()
            .enumerate()
            .map(|(i, w)| {
                Arc::new(Endpoint::new(
                    format!("http://127.0.0.1:{}", 1000 + i)
                        .parse()
                        .expect("a URL"),
                    *w,
                    &MeshSettings::default(),
                ))
            })
            .collect()
    }

    fn shares(policy: Policy, eps: &[Arc<Endpoint>], n: usize) -> HashMap<String, usize> {
        let cursor = AtomicUsize::new(0);
        let mut counts = HashMap::new();
        for _ in 0..n {
            let e = pick(policy, eps, &cursor, Instant::now()).expect("a pick");
            *counts.entry(e.url.to_string()).or_insert(0) += 1;
        }
        counts
    }

    #[tokio::test]
    async fn round_robin_takes_turns() {
        let eps = endpoints(&[1, 1, 1]);
        let counts = shares(Policy::RoundRobin, &eps, 300);
        assert!(counts.values().all(|c| *c == 100), "{counts:?}");
    }

    #[tokio::test]
    async fn weighted_random_follows_the_weights() {
        let eps = endpoints(&[1, 3]);
        let counts = shares(Policy::WeightedRandom, &eps, 4000);
        let heavy = counts[&eps[1].url.to_string()];
        assert!((2700..3300).contains(&heavy), "{counts:?}");
    }

    #[tokio::test]
    async fn least_connections_avoids_busy_endpoints() {
        let eps = endpoints(&[1, 1, 1]);
        let now = Instant::now();
        eps[0].begin(now);
        eps[1].begin(now);
        let counts = shares(Policy::LeastConnections, &eps, 50);
        assert_eq!(counts.get(&eps[2].url.to_string()), Some(&50));
    }

    #[tokio::test(start_paused = true)]
    async fn peak_ewma_avoids_a_slow_endpoint() {
        let eps = endpoints(&[1, 1, 1]);
        let settings = MeshSettings::default();
        // Endpoint 0 answered in 200 ms, the others in 2 ms.
        for (i, rtt) in [(0, 200), (1, 2), (2, 2)] {
            let started = Instant::now();
            let permit = eps[i].begin(started).expect("closed breaker");
            tokio::time::advance(Duration::from_millis(rtt)).await;
            eps[i].end(permit, started, false, &settings);
        }
        let counts = shares(Policy::PeakEwma, &eps, 3000);
        assert_eq!(counts.get(&eps[0].url.to_string()), None, "{counts:?}");
    }
}
