//! Releases reservations whose hold ran out, so stock never stays held for an order that will
//! not be paid. Each release re-checks, in its own transaction, that the reservation is still
//! held and expired: a commit that won the race is left alone.

use std::time::Duration;

use crate::store::Store;

/// Releases expired holds every `interval` until `stop` fires.
pub async fn run(store: Store, interval: Duration, mut stop: tokio::sync::watch::Receiver<bool>) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.changed() => return,
        }
        if let Err(e) = sweep(&store).await {
            tracing::warn!(error = %e, "sweeping expired reservations failed; will retry");
        }
    }
}

/// One pass: releases every expired hold, a batch at a time. Returns how many were released.
pub async fn sweep(store: &Store) -> Result<usize, crate::error::Error> {
    let mut released = 0;
    loop {
        let batch = store.expired(100).await?;
        if batch.is_empty() {
            return Ok(released);
        }
        let mut progressed = false;
        for order_id in batch {
            if store.release_if_expired(order_id).await? {
                released += 1;
                progressed = true;
                metrics::counter!("inventory_reservations_expired_total").increment(1);
                tracing::info!(%order_id, "reservation expired; stock released");
            }
        }
        if !progressed {
            return Ok(released);
        }
    }
}
