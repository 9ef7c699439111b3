//! Background work: expiring unpaid orders, finishing interrupted saga steps, forgetting
//! idempotency keys after 24 h; and, on its own task, renewing this process's lease.
//!
//! A step is resumed when the process that ran it is dead (its lease ran out: within
//! [`LEASE`](crate::store::LEASE) of a kill or freeze, whichever replica notices first, a
//! restarted one included) or when it has been untouched for `stale_after`. A step that a live
//! replica runs right now is never resumed: a starting replica used to resume every step in
//! flight on its first pass, and could reset an order a live one was charging.

use std::collections::BTreeMap;
use std::time::Duration;

use shopmesh_mesh::backoff::Backoff;
use time::OffsetDateTime;
use tokio::time::Instant;
use uuid::Uuid;

use crate::saga::Saga;
use crate::store::{LEASE_RENEW_EVERY, Store};

/// Longest wait between retries of a step this process took over (at most half of
/// `stale_after`, see [`run`]).
const RETRY_MAX: Duration = Duration::from_secs(30);
/// Idempotency keys are kept at least this long.
const KEY_RETENTION: Duration = Duration::from_secs(24 * 60 * 60);

/// A step this process took over and could not finish yet: when to look at it again.
struct Retry {
    due: Instant,
    /// The wait that set `due`.
    wait: Duration,
    backoff: Backoff,
}

impl Retry {
    /// The first retry, about `interval` from now; each failure after it doubles the wait, up
    /// to `max` (with jitter, so replicas that failed together do not retry together).
    fn first(interval: Duration, max: Duration) -> Self {
        let mut backoff = Backoff::new(interval, max);
        let wait = backoff.next_wait();
        Retry {
            due: Instant::now() + wait,
            wait,
            backoff,
        }
    }

    /// It failed again: wait longer.
    fn failed(mut self) -> Self {
        self.wait = self.backoff.next_wait();
        self.due = Instant::now() + self.wait;
        self
    }

    /// Not now (it runs here, or it could not be checked): look again after the same wait.
    fn postponed(mut self) -> Self {
        self.due = Instant::now() + self.wait;
        self
    }
}

/// Runs until `stop` fires.
///
/// A step of this process that nothing in it runs any more, untouched for `abandoned_after`,
/// was abandoned by its request: the caller passes a call's deadline and a margin, so that no
/// call the step made can still land when the worker looks at it.
pub async fn run(
    store: Store,
    saga: Saga,
    interval: Duration,
    stale_after: Duration,
    abandoned_after: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_purge = OffsetDateTime::UNIX_EPOCH;
    // Steps this process took over and could not finish yet (a service down): its own now,
    // so no longer "orphaned"; retried, with back-off, for as long as they are still its own.
    let mut taken: BTreeMap<Uuid, Retry> = BTreeMap::new();
    // A step of its own untouched for `stale_after` looks orphaned to the other replicas: it is
    // looked at again (and touched) well before that.
    let retry_max = RETRY_MAX.min(stale_after / 2).max(interval);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.changed() => return,
        }
        let now = OffsetDateTime::now_utc();
        let before = now - stale_after;
        for (id, retry) in std::mem::take(&mut taken) {
            if Instant::now() < retry.due {
                taken.insert(id, retry);
                continue;
            }
            // A request of this process runs it right now: not now.
            if saga.is_running(id) {
                taken.insert(id, retry.postponed());
                continue;
            }
            // Still ours and still in flight? (Someone may have finished it, and a customer's
            // new request may have started another step since.) Touching it also keeps it from
            // looking abandoned to the others.
            match store.keep_step(id).await {
                Ok(true) => {}
                Ok(false) => continue,
                Err(e) => {
                    tracing::warn!(order_id = %id, error = %e, "cannot check a step taken over");
                    taken.insert(id, retry.postponed());
                    continue;
                }
            }
            if let Err(e) = saga.resume(id).await {
                tracing::warn!(order_id = %id, error = %e, "cannot finish an interrupted step yet");
                taken.insert(id, retry.failed());
            }
        }
        match store.in_flight(before).await {
            Ok(ids) => {
                for id in ids {
                    if taken.contains_key(&id) {
                        continue;
                    }
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
                        taken.insert(id, Retry::first(interval, retry_max));
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "looking for interrupted orders failed"),
        }
        // Its own steps that nothing here runs any more: a request abandoned at its deadline
        // (after the process was frozen, say) leaves its step; finish it now, not after
        // `stale_after`, so a retry waiting for it gets the outcome.
        let abandoned = now - time::Duration::try_from(abandoned_after).unwrap_or_default();
        match store.own_steps_idle_since(abandoned).await {
            Ok(ids) => {
                for id in ids {
                    if taken.contains_key(&id) {
                        continue;
                    }
                    // Nothing here runs it (checked and marked at once), and it has not moved
                    // since the list was read (claimed in the database): only then is it ours
                    // to finish.
                    let Some(_running) = saga.try_run(id) else {
                        continue;
                    };
                    match store.claim_abandoned_step(id, abandoned).await {
                        Ok(true) => {}
                        Ok(false) => continue,
                        Err(e) => {
                            tracing::warn!(order_id = %id, error = %e, "cannot claim an abandoned step yet");
                            continue;
                        }
                    }
                    tracing::info!(order_id = %id, "finishing a step its request abandoned");
                    if let Err(e) = saga.resume(id).await {
                        tracing::warn!(order_id = %id, error = %e, "cannot finish an abandoned step yet");
                        taken.insert(id, Retry::first(interval, retry_max));
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "looking for abandoned steps failed"),
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
