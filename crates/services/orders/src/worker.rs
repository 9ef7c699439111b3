//! Background work: expiring unpaid orders, finishing interrupted saga steps, forgetting
//! idempotency keys after 24 h. At start-up every step in flight is resumed at once (the
//! process that ran it is gone); afterwards only steps untouched for `stale_after`.

use std::time::Duration;

use time::OffsetDateTime;

use crate::saga::Saga;
use crate::store::Store;

/// Idempotency keys are kept at least this long.
const KEY_RETENTION: Duration = Duration::from_secs(24 * 60 * 60);

/// Runs until `stop` fires.
pub async fn run(
    store: Store,
    saga: Saga,
    interval: Duration,
    stale_after: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut first = true;
    let mut last_purge = OffsetDateTime::UNIX_EPOCH;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.changed() => return,
        }
        let now = OffsetDateTime::now_utc();
        let cutoff = if first { now } else { now - stale_after };
        first = false;
        match store.in_flight(cutoff).await {
            Ok(ids) => {
                for id in ids {
                    if let Err(e) = saga.resume(id).await {
                        tracing::warn!(order_id = %id, error = %e, "cannot finish an interrupted step yet");
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "looking for interrupted orders failed"),
        }
        match store.overdue().await {
            Ok(ids) => {
                for id in ids {
                    if let Err(e) = saga.expire(id).await {
                        tracing::warn!(order_id = %id, error = %e, "cannot expire an order yet");
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "looking for expired orders failed"),
        }
        if now - last_purge > time::Duration::HOUR {
            last_purge = now;
            if let Err(e) = store.purge_keys(now - KEY_RETENTION).await {
                tracing::warn!(error = %e, "purging idempotency keys failed");
            }
        }
    }
}
