//! Background work: expiring unpaid orders, finishing interrupted saga steps, forgetting
//! idempotency keys after 24 h; and, on its own task, renewing this process's lease.
//!
//! A step is resumed when the process that ran it is dead (its lease ran out: within
//! [`LEASE`](crate::store::LEASE) of a kill or freeze, whichever replica notices first, a
//! restarted one included) or when it has been untouched for `stale_after`. A step that a live
//! replica runs right now is never resumed: a starting replica used to resume every step in
//! flight on its first pass, and could reset an order a live one was charging.

use std::collections::BTreeSet;
use std::time::Duration;

use time::OffsetDateTime;
use uuid::Uuid;

use crate::saga::Saga;
use crate::store::{LEASE_RENEW_EVERY, Store};

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
    let mut last_purge = OffsetDateTime::UNIX_EPOCH;
    // Steps this process took over and could not finish yet (a service down): its own now,
    // so no longer "orphaned"; retried every tick until they are done.
    let mut taken: BTreeSet<Uuid> = BTreeSet::new();
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.changed() => return,
        }
        let now = OffsetDateTime::now_utc();
        let before = now - stale_after;
        for id in std::mem::take(&mut taken) {
            if let Err(e) = saga.resume(id).await {
                tracing::warn!(order_id = %id, error = %e, "cannot finish an interrupted step yet");
                taken.insert(id);
            }
        }
        match store.in_flight(before).await {
            Ok(ids) => {
                for id in ids {
                    // Claimed one by one: the list may be stale by the time we get to an id.
                    match store.take_over_step(id, before).await {
                        Ok(true) => {}
                        Ok(false) => continue,
                        Err(e) => {
                            tracing::warn!(order_id = %id, error = %e, "cannot take over an interrupted step yet");
                            continue;
                        }
                    }
                    if let Err(e) = saga.resume(id).await {
                        tracing::warn!(order_id = %id, error = %e, "cannot finish an interrupted step yet");
                        taken.insert(id);
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
            if let Err(e) = store.forget_dead_instances().await {
                tracing::warn!(error = %e, "forgetting dead instances failed");
            }
        }
    }
}

/// Renews this process's lease every [`LEASE_RENEW_EVERY`] until `stop` fires, then gives it
/// up: fire it only once the server has drained and the worker has stopped, so nothing this
/// process still runs is ever taken for orphaned.
pub async fn keep_lease(store: Store, mut stop: tokio::sync::watch::Receiver<bool>) {
    let mut ticker = tokio::time::interval(LEASE_RENEW_EVERY);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.changed() => break,
        }
        match store.renew_lease().await {
            Ok(()) => failing = false,
            Err(e) if !failing => {
                failing = true;
                tracing::warn!(error = %e, "renewing this instance's lease failed; others may take over its steps");
            }
            Err(_) => {}
        }
    }
    if let Err(e) = store.retire().await {
        tracing::warn!(error = %e, "giving up this instance's lease failed; it runs out by itself");
    }
}
