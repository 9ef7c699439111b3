//! The consumer's side of the embedded transport: pull each producer's stream from a persisted
//! cursor, handle each event once (inbox), set aside what keeps failing (dead letters).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde::{Deserialize, Serialize};
use shopmesh_db::{Db, TxConn, now_micros};
use shopmesh_mesh::backoff::Backoff;
use shopmesh_mesh::{CallOptions, Upstream};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::{Envelope, EventsSettings};

/// What a handler returns.
pub type HandlerFuture<'a> = Pin<Box<dyn Future<Output = Result<(), HandlerError>> + Send + 'a>>;

/// Why a handler did not apply an event, which decides what happens to it.
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    /// It may work later (our database, a mail server, an event that came before one it needs):
    /// tried again, and set aside as a dead letter after `events.max_attempts` failures (the
    /// broker's `delivery_limit` through RabbitMQ).
    #[error("{0}")]
    Retry(String),
    /// It can never work as sent (a version this consumer does not know, a payload that does
    /// not match its contract): set aside as a dead letter at once, with the reason, and the
    /// stream flows on. Never a panic nor a default value.
    #[error("rejected: {0}")]
    Reject(String),
}

impl From<crate::DecodeError> for HandlerError {
    fn from(e: crate::DecodeError) -> Self {
        HandlerError::Reject(e.to_string())
    }
}

impl From<sqlx::Error> for HandlerError {
    fn from(e: sqlx::Error) -> Self {
        HandlerError::Retry(format!("database: {e}"))
    }
}

/// Applies an event. Its database effects go through `tx`, committed with the inbox entry and
/// the cursor; an effect outside the database must be idempotent by the event's id.
pub trait Handler: Send + Sync + 'static {
    /// Handles one event.
    fn handle<'a>(&'a self, tx: &'a mut TxConn, event: &'a Envelope) -> HandlerFuture<'a>;

    /// Whether running the handler again for an event whose transaction was rolled back is
    /// harmless: it has no effect outside `tx`, or only ones that a repeat leaves as they were
    /// (a file written under the event's id). Then a page of events is handled in one
    /// transaction, and a failure in it rolls back the page to go one event at a time, which
    /// runs the handlers before the failing one again. A handler whose repeat shows (an e-mail
    /// sent over SMTP) answers `false`, the default: one event, one transaction.
    fn may_repeat(&self) -> bool {
        false
    }
}

/// A producer's stream to follow.
#[derive(Clone)]
pub struct Subscription {
    /// The producer's name (the cursor's key).
    pub producer: String,
    /// Where it is.
    pub upstream: Arc<Upstream>,
}

/// Why a page could not be consumed.
#[derive(Debug, thiserror::Error)]
pub enum ConsumeError {
    /// The producer did not answer.
    #[error("cannot read {0}'s events: {1}")]
    Fetch(String, String),
    /// Our database failed.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// A handler failed (will be retried).
    #[error("handling {0} failed: {1}")]
    Handler(String, String),
    /// A handler refused the event for good ([`HandlerError::Reject`]): it goes to the dead
    /// letters without further attempts.
    #[error("{0} rejected: {1}")]
    Rejected(String, String),
    /// The producer no longer keeps the events after our cursor (we were away longer than its
    /// retention window): nothing is skipped, the cursor stays; an operator re-seeds it.
    #[error("{0}'s events after our cursor were pruned: {1}")]
    Pruned(String, String),
}

/// An event set aside.
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetter {
    /// The producer.
    pub producer: String,
    /// The event.
    pub event: Envelope,
    /// The last failure.
    pub error: String,
}

/// Follows streams with one handler.
pub struct Consumer {
    db: Db,
    handler: Arc<dyn Handler>,
    max_attempts: u32,
    poll: Duration,
    /// Who we are to producers (`?consumer=`): our reads acknowledge, so retention can prune.
    name: Option<&'static str>,
    /// Inbox ids are kept twice this long (the producers' retention window).
    retention: Duration,
    prune_every: Duration,
    pruned_at: std::sync::Mutex<Option<tokio::time::Instant>>,
}

/// Events fetched per request.
const PAGE: usize = 100;
/// How long an idle consumer's request waits at the producer for new events.
const LONG_POLL: Duration = Duration::from_secs(2);

#[derive(Deserialize)]
struct Page {
    /// The producer's highest position.
    #[serde(default)]
    head: i64,
    events: Vec<Envelope>,
}

/// Creates the consumer's tables if they are missing.
pub async fn install(db: &Db) -> Result<(), sqlx::Error> {
    crate::install_schema(db, crate::CONSUMER_SQL).await
}

impl Consumer {
    /// A consumer writing to `db`; an event failing `max_attempts` times becomes a dead letter;
    /// after a page that was not full it waits `poll` for events to gather, then waits at the
    /// producer (long poll) for the next ones.
    pub fn new(db: Db, handler: Arc<dyn Handler>, max_attempts: u32, poll: Duration) -> Self {
        let defaults = EventsSettings::default();
        Consumer {
            db,
            handler,
            max_attempts: max_attempts.max(1),
            poll,
            name: None,
            retention: defaults.retention(),
            prune_every: defaults.prune_every(),
            pruned_at: std::sync::Mutex::new(None),
        }
    }

    /// Reads as the service `name` (producers count its reads as acknowledgements), with the
    /// retention of `settings`: inbox ids older than twice the window are pruned.
    pub fn reading_as(mut self, name: &'static str, settings: &EventsSettings) -> Self {
        self.name = Some(name);
        self.retention = settings.retention();
        self.prune_every = settings.prune_every();
        self
    }

    /// Deletes inbox ids of events made and handled more than twice the retention window ago:
    /// a redelivery that late does not happen (the producer no longer keeps the event, and a
    /// broker redelivers within minutes). Returns how many.
    pub async fn prune_inbox(&self) -> Result<u64, sqlx::Error> {
        // By id, which the primary key indexes: ids are UUIDv7, whose text sorts by the time
        // they were made (its first 48 bits, milliseconds), so every id made before the cutoff
        // sorts below the cutoff's own prefix.
        let cutoff = OffsetDateTime::now_utc() - self.retention.saturating_mul(2);
        let ms = u64::try_from(cutoff.unix_timestamp_nanos() / 1_000_000).unwrap_or(0);
        let prefix = format!("{:08x}-{:04x}-", ms >> 16, ms & 0xffff);
        // And handled that long ago: an old event handled late (a redrive, a long broker
        // outage) may still be redelivered.
        let handled_before = now_micros().saturating_sub(
            i64::try_from(self.retention.as_micros().saturating_mul(2)).unwrap_or(i64::MAX),
        );
        // A batch at a time: on SQLite the statement runs on the runtime's thread, and a day's
        // inbox in one statement would stop every request of the process meanwhile.
        let mut pruned = 0;
        loop {
            let done = sqlx::query(
                "DELETE FROM event_inbox WHERE event_id IN (SELECT event_id FROM event_inbox \
                 WHERE event_id < $1 AND handled_at < $2 ORDER BY event_id LIMIT 1000)",
            )
            .bind(&prefix)
            .bind(handled_before)
            .execute(self.db.pool())
            .await?
            .rows_affected();
            pruned += done;
            if done < 1000 {
                return Ok(pruned);
            }
        }
    }

    /// [`Consumer::prune_inbox`], when `prune_every` has passed since the last time.
    pub(crate) async fn prune_if_due(&self) {
        let due = match self.pruned_at.lock() {
            Ok(mut at) if at.is_none_or(|t| t.elapsed() >= self.prune_every) => {
                *at = Some(tokio::time::Instant::now());
                true
            }
            _ => false,
        };
        if due && let Err(e) = self.prune_inbox().await {
            tracing::warn!(error = %e, "pruning the event inbox failed");
        }
    }

    /// Follows `subscription` until the task is aborted (see [`Consumer::follow`]).
    pub fn spawn(self: &Arc<Self>, subscription: Subscription) -> tokio::task::JoinHandle<()> {
        tokio::spawn(self.clone().follow(subscription, std::future::pending()))
    }

    /// Follows `subscription` until `stop` completes: a page being handled is finished first
    /// (an e-mail sent is recorded before the process goes), a wait is cut short.
    pub async fn follow(
        self: Arc<Self>,
        subscription: Subscription,
        stop: impl Future<Output = ()> + Send,
    ) {
        if self.name.is_none() {
            tracing::warn!(
                producer = subscription.producer,
                "an unnamed consumer (no `reading_as`): its reads do not hold the producer's retention back"
            );
        }
        let consumer = self;
        let mut stop = std::pin::pin!(stop);
        // Waits for `wait` unless told to stop first (`None`).
        macro_rules! or_stop {
            ($wait:expr) => {
                tokio::select! {
                    biased;
                    () = &mut stop => None,
                    out = $wait => Some(out),
                }
            };
        }
        let mut backoff = Backoff::new(consumer.poll, Duration::from_secs(5));
        let mut warned = false;
        let mut pruned_gap = false;
        let mut wait = Duration::ZERO;
        loop {
            consumer.prune_if_due().await;
            let Some(fetched) = or_stop!(consumer.next_page(&subscription, wait)) else {
                return;
            };
            let handled = match fetched {
                Ok((after, page)) => {
                    consumer
                        .handle_page(&subscription.producer, after, page)
                        .await
                }
                Err(e) => Err(e),
            };
            let pause = match handled {
                Ok(n) => {
                    backoff.reset();
                    warned = false;
                    if pruned_gap {
                        // Re-seeded: reading again.
                        pruned_gap = false;
                        metrics::gauge!("consumer_pruned_gap", "producer" => subscription.producer.clone())
                            .set(0.0);
                    }
                    if n == PAGE {
                        wait = Duration::ZERO;
                        continue;
                    }
                    // A short page: let the next events gather for `poll` (one page, one
                    // transaction for many), then wait at the producer for them (long
                    // poll), so an idle stream costs one request per LONG_POLL and the
                    // first event after a quiet time comes at once.
                    wait = LONG_POLL;
                    if n > 0 { consumer.poll } else { Duration::ZERO }
                }
                Err(ConsumeError::Pruned(producer, why)) => {
                    // Every time, loudly: this consumer stands still until re-seeded.
                    tracing::error!(
                        producer,
                        why,
                        "events were pruned before this consumer read them; re-seed its cursor (see docs/events.md)"
                    );
                    metrics::gauge!("consumer_pruned_gap", "producer" => producer).set(1.0);
                    pruned_gap = true;
                    wait = Duration::ZERO;
                    Duration::from_secs(30)
                }
                Err(e) => {
                    if !warned || !matches!(e, ConsumeError::Fetch(..)) {
                        tracing::warn!(error = %e, "consuming events");
                        warned = true;
                    }
                    backoff.next_wait()
                }
            };
            if !pause.is_zero() && or_stop!(tokio::time::sleep(pause)).is_none() {
                return;
            }
        }
    }

    /// Follows the service's events until `stop` completes: from its RabbitMQ queue `name`
    /// (bound to `bindings`) when `settings` name a broker, else from each producer's stream in
    /// `subscriptions`.
    pub async fn follow_all(
        self: Arc<Self>,
        settings: EventsSettings,
        name: &'static str,
        bindings: Vec<&'static str>,
        subscriptions: Vec<Subscription>,
        stop: impl Future<Output = ()> + Send,
    ) {
        if settings.rabbitmq_url.is_some() {
            crate::rabbit::follow(self, settings, name, bindings, stop).await;
        } else {
            let stop = futures_util::FutureExt::shared(Box::pin(stop));
            futures_util::future::join_all(
                subscriptions
                    .into_iter()
                    .map(|subscription| self.clone().follow(subscription, stop.clone())),
            )
            .await;
        }
    }

    /// Where we are in `producer`'s stream.
    pub async fn cursor(&self, producer: &str) -> Result<i64, sqlx::Error> {
        let row: Option<(i64,)> =
            sqlx::query_as("SELECT position FROM event_cursors WHERE producer = $1")
                .bind(producer)
                .fetch_optional(self.db.reader())
                .await?;
        Ok(row.map_or(0, |r| r.0))
    }

    /// Fetches one page after the cursor and handles it, in order, stopping at the first
    /// event that fails (it is retried, in order, next time). Returns how many were taken.
    pub async fn pump(&self, subscription: &Subscription) -> Result<usize, ConsumeError> {
        self.pump_waiting(subscription, Duration::ZERO).await
    }

    /// [`Consumer::pump`], letting the producer hold the request up to `wait` until there is
    /// something after the cursor.
    pub async fn pump_waiting(
        &self,
        subscription: &Subscription,
        wait: Duration,
    ) -> Result<usize, ConsumeError> {
        let (after, page) = self.next_page(subscription, wait).await?;
        self.handle_page(&subscription.producer, after, page).await
    }

    /// The page after the cursor (the part of [`Consumer::pump_waiting`] that waits, and that
    /// may be abandoned: nothing is written).
    async fn next_page(
        &self,
        subscription: &Subscription,
        wait: Duration,
    ) -> Result<(i64, Page), ConsumeError> {
        let after = self.cursor(&subscription.producer).await?;
        Ok((after, self.fetch(subscription, after, wait).await?))
    }

    /// Handles a page fetched after `after` (the part that writes: never abandoned midway).
    async fn handle_page(
        &self,
        producer: &str,
        after: i64,
        page: Page,
    ) -> Result<usize, ConsumeError> {
        // Positions are gapless: a page that does not run on from the cursor means events in
        // between were pruned (a race with the producer's pruner, which its 410 check cannot
        // close). Never skip them.
        if let Some((expected, found)) = (after + 1..)
            .zip(&page.events)
            .find(|(expected, event)| event.position != *expected)
        {
            return Err(ConsumeError::Pruned(
                producer.to_owned(),
                format!(
                    "the events after position {} are no longer kept (the next is {}): \
                     re-seed this reader",
                    expected - 1,
                    found.position
                ),
            ));
        }
        let n = page.events.len();
        let lag = |done: i64| (page.head - done).max(0) as f64;
        metrics::gauge!("consumer_lag_events", "producer" => producer.to_owned()).set(lag(after));
        if let Some(last) = page.events.last()
            && self.handler.may_repeat()
            && self.process_page(producer, &page.events).await?
        {
            metrics::gauge!("consumer_lag_events", "producer" => producer.to_owned())
                .set(lag(last.position));
            return Ok(n);
        }
        // Something in the page failed before, or fails now: one event at a time, so the
        // failure is counted against that event and the ones before it are kept.
        for event in &page.events {
            self.process(producer, event).await?;
            metrics::gauge!("consumer_lag_events", "producer" => producer.to_owned())
                .set(lag(event.position));
        }
        Ok(n)
    }

    async fn fetch(
        &self,
        subscription: &Subscription,
        after: i64,
        wait: Duration,
    ) -> Result<Page, ConsumeError> {
        let failed = |why: String| ConsumeError::Fetch(subscription.producer.clone(), why);
        let reader = self
            .name
            .map(|name| format!("consumer={name}&"))
            .unwrap_or_default();
        let request = http::Request::get(format!(
            "/internal/outbox?{reader}after={after}&limit={PAGE}&wait_ms={}",
            wait.as_millis()
        ))
        .body(Full::new(Bytes::new()))
        .map_err(|e| failed(e.to_string()))?;
        let options = CallOptions {
            deadline: tokio::time::Instant::now() + wait + Duration::from_secs(3),
            retry_safe: true,
            // A long poll is slow on purpose: not an attempt to abandon.
            cut_slow_attempts: wait.is_zero(),
        };
        let response = subscription
            .upstream
            .call(request, options)
            .await
            .map_err(|e| failed(e.to_string()))?;
        if response.status() == http::StatusCode::GONE {
            let body = response.into_body().collect().await.map(|b| b.to_bytes());
            let detail = body
                .ok()
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                .and_then(|v| v["detail"].as_str().map(str::to_owned))
                .unwrap_or_else(|| "410 Gone".to_owned());
            return Err(ConsumeError::Pruned(subscription.producer.clone(), detail));
        }
        if !response.status().is_success() {
            return Err(failed(format!("answered {}", response.status())));
        }
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| failed(e.to_string()))?
            .to_bytes();
        serde_json::from_slice(&body).map_err(|e| failed(e.to_string()))
    }

    /// The fast path, for handlers that [`Handler::may_repeat`]: a whole page in one
    /// transaction (inbox entries, effects, one cursor move). `false`, with nothing written, if
    /// an event of the page has failed before or fails now: the caller then goes one event at a
    /// time, with the failure bookkeeping.
    async fn process_page(
        &self,
        producer: &str,
        events: &[Envelope],
    ) -> Result<bool, ConsumeError> {
        let Some(last) = events.last() else {
            return Ok(true);
        };
        let mut tx = self.db.begin_write().await?;
        // First the bookkeeping of the whole page, before any handler runs: an event that
        // failed before sends the page one event at a time without running anything here.
        // A fresh event's inbox entry is written now, by the statement that finds it fresh
        // ([`enter`]); a handler's failure rolls the entries back with everything else.
        let mut fresh = Vec::with_capacity(events.len());
        let mut duplicates = 0u64;
        for event in events {
            let id = event.id.hyphenated().to_string();
            let entered =
                enter(&mut tx, &id, &event.kind, Unless::HandledSetAsideOrFailing).await?;
            if entered {
                fresh.push(event);
                continue;
            }
            // Handled before, set aside (a redrive will handle it), or failed before.
            let (failed,): (i64,) =
                sqlx::query_as("SELECT COUNT(*) FROM event_failures WHERE event_id = $1")
                    .bind(&id)
                    .fetch_one(&mut *tx)
                    .await?;
            if failed > 0 {
                return Ok(false);
            }
            duplicates += 1;
        }
        let mut handled = Vec::with_capacity(fresh.len());
        for event in fresh {
            if self.handler.handle(&mut tx, event).await.is_err() {
                // Rolled back; the handlers before it run again one by one (`may_repeat`).
                return Ok(false);
            }
            handled.push(event);
        }
        advance(&mut tx, producer, last.position).await?;
        tx.commit().await?;
        for event in handled {
            record_delivery(producer, event);
        }
        if duplicates > 0 {
            metrics::counter!("events_duplicates_total", "producer" => producer.to_owned())
                .increment(duplicates);
        }
        Ok(true)
    }

    /// Handles one event unless its id is in the inbox; records it and moves the cursor in the
    /// same transaction.
    async fn process(&self, producer: &str, event: &Envelope) -> Result<(), ConsumeError> {
        let id = event.id.hyphenated().to_string();
        let mut tx = self.db.begin_write().await?;
        // Not entered: handled already, or set aside (a redrive will handle it); only the
        // cursor moves. Entered: a failure of the handler rolls the entry back.
        if enter(&mut tx, &id, &event.kind, Unless::HandledOrSetAside).await? {
            match self.handler.handle(&mut tx, event).await {
                Ok(()) => {}
                Err(HandlerError::Reject(why)) => {
                    drop(tx);
                    self.bury(producer, event, &format!("rejected: {why}"))
                        .await?;
                    return Ok(());
                }
                Err(HandlerError::Retry(why)) => {
                    drop(tx);
                    let attempts = self.record_failure(&id, &why).await?;
                    if attempts >= i64::from(self.max_attempts) {
                        self.bury(producer, event, &why).await?;
                        return Ok(());
                    }
                    return Err(ConsumeError::Handler(format!("{} {id}", event.kind), why));
                }
            }
            record_delivery(producer, event);
        } else {
            metrics::counter!("events_duplicates_total", "producer" => producer.to_owned())
                .increment(1);
        }
        advance(&mut tx, producer, event.position).await?;
        sqlx::query("DELETE FROM event_failures WHERE event_id = $1")
            .bind(&id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Handles one event delivered by a broker: unless already handled (inbox), runs the
    /// handler and records the id in one transaction. The broker counts the attempts.
    pub async fn handle_once(&self, source: &str, event: &Envelope) -> Result<(), ConsumeError> {
        let id = event.id.hyphenated().to_string();
        let mut tx = self.db.begin_write().await?;
        // The inbox entry first: written, the event is fresh (and the entry goes if the
        // handler fails, with the transaction); not written, it was handled before.
        if !enter(&mut tx, &id, &event.kind, Unless::Handled).await? {
            // Committed (nothing of its own to write) before the broker is told, so that a
            // failed commit of the group holding the entry found (on SQLite it may be another
            // caller's, not yet committed) is a failure here, not an acknowledgement.
            tx.commit().await?;
            metrics::counter!("events_duplicates_total", "producer" => source.to_owned())
                .increment(1);
            return Ok(());
        }
        self.handler
            .handle(&mut tx, event)
            .await
            .map_err(|e| match e {
                HandlerError::Retry(why) => {
                    ConsumeError::Handler(format!("{} {id}", event.kind), why)
                }
                HandlerError::Reject(why) => {
                    ConsumeError::Rejected(format!("{} {id}", event.kind), why)
                }
            })?;
        tx.commit().await?;
        record_delivery(source, event);
        Ok(())
    }

    async fn record_failure(&self, id: &str, why: &str) -> Result<i64, sqlx::Error> {
        let mut tx = self.db.begin_write().await?;
        sqlx::query(
            "INSERT INTO event_failures (event_id, attempts, last_error) VALUES ($1, 1, $2) \
             ON CONFLICT (event_id) DO UPDATE SET attempts = event_failures.attempts + 1, \
             last_error = excluded.last_error",
        )
        .bind(id)
        .bind(why)
        .execute(&mut *tx)
        .await?;
        let (attempts,): (i64,) =
            sqlx::query_as("SELECT attempts FROM event_failures WHERE event_id = $1")
                .bind(id)
                .fetch_one(&mut *tx)
                .await?;
        tx.commit().await?;
        Ok(attempts)
    }

    /// Sets the event aside and moves past it, so the stream keeps flowing.
    async fn bury(&self, producer: &str, event: &Envelope, why: &str) -> Result<(), sqlx::Error> {
        let id = event.id.hyphenated().to_string();
        let mut tx = self.db.begin_write().await?;
        sqlx::query(
            "INSERT INTO event_dead_letters (event_id, producer, envelope, error, dead_at) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (event_id) DO NOTHING",
        )
        .bind(&id)
        .bind(producer)
        .bind(serde_json::to_string(event).unwrap_or_default())
        .bind(why)
        .bind(now_micros())
        .execute(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM event_failures WHERE event_id = $1")
            .bind(&id)
            .execute(&mut *tx)
            .await?;
        advance(&mut tx, producer, event.position).await?;
        tx.commit().await?;
        tracing::error!(event = %id, kind = %event.kind, producer, error = why, "event dead-lettered");
        self.report_dead_letters().await;
        metrics::counter!("events_dead_lettered_total", "producer" => producer.to_owned())
            .increment(1);
        Ok(())
    }

    async fn report_dead_letters(&self) {
        if let Ok((n,)) = sqlx::query_as::<_, (i64,)>("SELECT COUNT(*) FROM event_dead_letters")
            .fetch_one(self.db.pool())
            .await
        {
            metrics::gauge!("event_dead_letters").set(n as f64);
        }
    }

    /// The events set aside.
    pub async fn dead_letters(&self) -> Result<Vec<DeadLetter>, sqlx::Error> {
        let rows: Vec<(String, String, String)> = sqlx::query_as(
            "SELECT producer, envelope, error FROM event_dead_letters ORDER BY dead_at, event_id",
        )
        .fetch_all(self.db.pool())
        .await?;
        Ok(rows
            .into_iter()
            .filter_map(|(producer, envelope, error)| {
                Some(DeadLetter {
                    producer,
                    event: serde_json::from_str(&envelope).ok()?,
                    error,
                })
            })
            .collect())
    }

    /// Handles every dead letter again; those that now succeed leave the list. Returns
    /// (handled, still failing).
    pub async fn redrive(&self) -> Result<(usize, usize), sqlx::Error> {
        let mut handled = 0;
        let mut failing = 0;
        for letter in self.dead_letters().await? {
            let id = letter.event.id.hyphenated().to_string();
            let mut tx = self.db.begin_write().await?;
            // Not entered: handled meanwhile (another redrive); only the letter goes.
            if enter(&mut tx, &id, &letter.event.kind, Unless::Handled).await?
                && let Err(why) = self.handler.handle(&mut tx, &letter.event).await
            {
                drop(tx);
                sqlx::query("UPDATE event_dead_letters SET error = $1 WHERE event_id = $2")
                    .bind(why.to_string())
                    .bind(&id)
                    .execute(self.db.pool())
                    .await?;
                failing += 1;
                continue;
            }
            sqlx::query("DELETE FROM event_dead_letters WHERE event_id = $1")
                .bind(&id)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            handled += 1;
        }
        self.report_dead_letters().await;
        Ok((handled, failing))
    }
}

/// What keeps [`enter`] from entering an event.
#[derive(Clone, Copy)]
enum Unless {
    /// Its entry: handled before.
    Handled,
    /// Its entry or its dead letter (set aside until a redrive).
    HandledOrSetAside,
    /// Its entry, its dead letter or a failure recorded for it (the page's fast path leaves a
    /// failing event to the one-by-one path, which counts its attempts).
    HandledSetAsideOrFailing,
}

/// Enters `id` in the inbox before its handler runs, in the handler's transaction; `false`,
/// with nothing written, when `unless` holds. An entry made by a concurrent consumer holds
/// too once it commits: on PostgreSQL the insert waits for it, on SQLite writers take turns.
/// Every path enters first and then runs the handler, so concurrent consumers lock the entry
/// before anything the handler touches (one lock order), and a handler's failure rolls the
/// entry back with its transaction. One statement for a fresh event, where a check and a
/// later insert were two.
async fn enter(tx: &mut TxConn, id: &str, kind: &str, unless: Unless) -> Result<bool, sqlx::Error> {
    let sql = match unless {
        Unless::Handled => {
            "INSERT INTO event_inbox (event_id, type, handled_at) VALUES ($1, $2, $3) \
             ON CONFLICT (event_id) DO NOTHING"
        }
        // (SQLite reads `ON CONFLICT` after a `SELECT` as an upsert only when the `SELECT`
        // has a `WHERE`: these do.)
        Unless::HandledOrSetAside => {
            "INSERT INTO event_inbox (event_id, type, handled_at) SELECT $1, $2, $3 \
             WHERE NOT EXISTS (SELECT 1 FROM event_dead_letters WHERE event_id = $1) \
             ON CONFLICT (event_id) DO NOTHING"
        }
        Unless::HandledSetAsideOrFailing => {
            "INSERT INTO event_inbox (event_id, type, handled_at) SELECT $1, $2, $3 \
             WHERE NOT EXISTS (SELECT 1 FROM event_dead_letters WHERE event_id = $1) \
             AND NOT EXISTS (SELECT 1 FROM event_failures WHERE event_id = $1) \
             ON CONFLICT (event_id) DO NOTHING"
        }
    };
    let done = sqlx::query(sql)
        .bind(id)
        .bind(kind)
        .bind(now_micros())
        .execute(tx)
        .await?;
    Ok(done.rows_affected() > 0)
}

/// Counts a handled event and, from the producer's commit to the consumer's, the transport's
/// latency.
fn record_delivery(source: &str, event: &Envelope) {
    metrics::counter!("events_consumed_total", "producer" => source.to_owned(), "type" => event.kind.clone()).increment(1);
    if let Ok(at) = OffsetDateTime::parse(&event.occurred_at, &Rfc3339) {
        let seconds = (OffsetDateTime::now_utc() - at).as_seconds_f64().max(0.0);
        metrics::histogram!("event_delivery_seconds", "producer" => source.to_owned())
            .record(seconds);
    }
}

async fn advance(tx: &mut TxConn, producer: &str, position: i64) -> Result<(), sqlx::Error> {
    sqlx::query(
        // Never backwards: replicas of a consumer share the cursor, and one that finishes an
        // older page after another finished a newer one would send both back over it.
        "INSERT INTO event_cursors (producer, position) VALUES ($1, $2) \
         ON CONFLICT (producer) DO UPDATE SET position = excluded.position \
         WHERE event_cursors.position < excluded.position",
    )
    .bind(producer)
    .bind(position)
    .execute(tx)
    .await?;
    Ok(())
}
