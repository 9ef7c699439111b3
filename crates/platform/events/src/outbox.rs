//! The producer's side: append in the caller's transaction, number what is committed, serve
//! the stream.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Deserialize;
use serde_json::json;
use shopmesh_db::TxConn;
use shopmesh_db::{Db, micros};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio::sync::watch;
use uuid::Uuid;

use crate::{Envelope, Event};

/// How often committed rows are looked for when no append in this process said so (rows
/// written by another process on the same database: a replica).
const POSITION_IDLE: Duration = Duration::from_secs(1);
/// After an append, when the positioner looks for its row (the appending transaction commits
/// a moment later): 10 ms after the append, then 10, 20, 50 and 200 ms after that (~290 ms in
/// all; a transaction slower than that waits for the next append or the idle tick). Under load
/// the appends keep it at the first step, so it runs at most every 10 ms, numbering a batch.
const AFTER_APPEND: [Duration; 5] = [
    Duration::from_millis(10),
    Duration::from_millis(10),
    Duration::from_millis(20),
    Duration::from_millis(50),
    Duration::from_millis(200),
];
/// How often the backlog gauges are refreshed.
const GAUGES_EVERY: Duration = Duration::from_secs(1);
/// Longest wait a consumer may ask of `/internal/outbox` for events to appear.
const MAX_WAIT: Duration = Duration::from_secs(5);

/// Counts appends in this process on PostgreSQL: the positioner wakes on a change instead of
/// polling (on SQLite appends number their own rows).
static APPENDED: LazyLock<watch::Sender<u64>> = LazyLock::new(|| watch::Sender::new(0));
/// Counts numberings in this process (on SQLite: commits of appended rows): a waiting
/// `/internal/outbox` request and the RabbitMQ relay wake on a change.
static NUMBERED: LazyLock<watch::Sender<u64>> = LazyLock::new(|| watch::Sender::new(0));
/// Most rows numbered per transaction.
const BATCH: i64 = 500;

/// The numbering statement, its batch size written in: SQLite reads a bound `LIMIT` while
/// planning this statement, so every new binding made it prepare the statement again (3.5% of
/// payments' CPU under the purchase load, issue 9).
static NUMBER_BATCH: LazyLock<String> = LazyLock::new(|| {
    format!(
        "UPDATE outbox SET position = numbered.position \
         FROM (SELECT id, (SELECT COALESCE(MAX(position), 0) FROM outbox) \
                          + ROW_NUMBER() OVER (ORDER BY id) AS position \
               FROM outbox WHERE position IS NULL ORDER BY id LIMIT {BATCH}) AS numbered \
         WHERE outbox.id = numbered.id AND outbox.position IS NULL"
    )
});
/// Most events served per request.
const MAX_PAGE: i64 = 500;

/// Creates the outbox table if it is missing.
pub async fn install(db: &Db) -> Result<(), sqlx::Error> {
    crate::install_schema(db, crate::OUTBOX_SQL).await
}

/// Writes `event` into the outbox, inside the caller's transaction (pass `&mut *tx`), so it is
/// committed with the change it reports or not at all. Returns its id.
pub async fn append(
    conn: &mut TxConn,
    event: &Event,
    trace_id: Option<&str>,
) -> Result<Uuid, sqlx::Error> {
    let id = Uuid::now_v7();
    // On SQLite, write transactions run one at a time and commit in that order, so the row
    // takes its position now: the next after the highest (the unique index's last entry).
    // Committed, it is in order; rolled back (alone or with its group), its number is free
    // again for the next. No numbering pass after the commit, no `position IS NULL` check:
    // two statements per event less (issue 9). On PostgreSQL transactions commit in any
    // order, so the positioner numbers rows once they are visible.
    let sqlite = conn.is_sqlite();
    let sql = if sqlite {
        "INSERT INTO outbox (id, position, type, version, occurred_at, aggregate_id, trace_id, \
         payload) VALUES ($1, (SELECT COALESCE(MAX(position), 0) + 1 FROM outbox), \
         $2, $3, $4, $5, $6, $7)"
    } else {
        "INSERT INTO outbox (id, type, version, occurred_at, aggregate_id, trace_id, payload) \
         VALUES ($1, $2, $3, $4, $5, $6, $7)"
    };
    sqlx::query(sql)
        .bind(id.hyphenated().to_string())
        .bind(event.kind)
        .bind(i64::from(event.version))
        .bind(micros(OffsetDateTime::now_utc()))
        .bind(&event.aggregate_id)
        .bind(trace_id.map(str::to_owned))
        .bind(event.payload.to_string())
        .execute(&mut *conn)
        .await?;
    if sqlite {
        // Readers waiting for the stream wake when it is visible.
        conn.after_commit(|| NUMBERED.send_modify(|n| *n = n.wrapping_add(1)));
    } else {
        APPENDED.send_modify(|n| *n = n.wrapping_add(1));
    }
    Ok(id)
}

/// A receiver that changes whenever this process numbers outbox rows, or on SQLite commits
/// appended ones (the RabbitMQ relay waits on it instead of polling).
pub fn numberings() -> watch::Receiver<u64> {
    NUMBERED.subscribe()
}

/// Waits until an event was appended in this process since `seen` was last marked (`true`),
/// or `idle` passed (`false`).
async fn appended_or(seen: &mut watch::Receiver<u64>, idle: Duration) -> bool {
    // `changed` marks what it saw; after a timeout nothing is marked, so an append racing the
    // timeout is still seen by the caller's next `has_changed`.
    matches!(tokio::time::timeout(idle, seen.changed()).await, Ok(Ok(())))
}

/// Numbers the committed rows that have no position yet, after the highest one, in id order.
/// Rows still uncommitted are invisible here and get their number later, so positions appear
/// in order: whoever reads position *n* can already read every position below it. Two
/// numberers racing (replicas) collide on the unique position and one retries. On SQLite
/// rows are numbered as they are appended (see [`append`]): this finds only rows an older
/// build left unnumbered.
pub async fn assign_positions(db: &Db) -> Result<u64, sqlx::Error> {
    let pending: Option<(String,)> =
        sqlx::query_as("SELECT id FROM outbox WHERE position IS NULL LIMIT 1")
            .fetch_optional(db.reader())
            .await?;
    if pending.is_none() {
        return Ok(0);
    }
    // One statement (no transaction around several): the rows in id order, numbered from the
    // highest position on. The scalar subquery is evaluated once, before any row changes.
    let numbered = sqlx::query(NUMBER_BATCH.as_str())
        .execute(db.pool())
        .await?;
    Ok(numbered.rows_affected())
}

/// Numbers committed rows for as long as the process runs: woken by the appends of this
/// process (then looking a few times over the next ~290 ms, while the appending transaction
/// commits; at most every 10 ms under load), and once a second otherwise (rows from another
/// process on the same database). An idle producer costs two queries a second, not forty.
/// On SQLite, where appends number their own rows and wake the readers at their commit, it
/// only looks once a second for rows an older build left unnumbered.
pub fn spawn_positioner(db: Db, service: &'static str) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut failing = false;
        let mut appended = APPENDED.subscribe();
        let mut tries_left = 0usize;
        let mut gauged: Option<tokio::time::Instant> = None;
        loop {
            let numbered = match assign_positions(&db).await {
                Ok(n) => {
                    failing = false;
                    n
                }
                Err(e) => {
                    // A race with another replica's numberer is expected and retried.
                    if !failing {
                        tracing::debug!(service, error = %e, "numbering outbox rows failed; retrying");
                    }
                    failing = true;
                    0
                }
            };
            if numbered > 0 {
                NUMBERED.send_modify(|n| *n = n.wrapping_add(1));
            }
            if gauged.is_none_or(|at| at.elapsed() >= GAUGES_EVERY) {
                gauged = Some(tokio::time::Instant::now());
                if let Ok((backlog, oldest)) = backlog(&db).await {
                    metrics::gauge!("outbox_unpublished", "service" => service).set(backlog as f64);
                    metrics::gauge!("outbox_oldest_unpublished_seconds", "service" => service)
                        .set(oldest);
                }
            }
            if numbered >= BATCH.unsigned_abs() {
                // A backlog (a replica's rows, or after a restart): keep going.
                continue;
            }
            if appended.has_changed().unwrap_or(false) {
                appended.mark_unchanged();
                tries_left = AFTER_APPEND.len();
            } else if failing && tries_left == 0 {
                // Try again soon (the last, longest step), not in a second.
                tries_left = 1;
            }
            if tries_left > 0 {
                tokio::time::sleep(AFTER_APPEND[AFTER_APPEND.len() - tries_left]).await;
                tries_left -= 1;
            } else if appended_or(&mut appended, POSITION_IDLE).await {
                tries_left = AFTER_APPEND.len();
            }
        }
    })
}

/// Rows not yet numbered, and the age in seconds of the oldest.
async fn backlog(db: &Db) -> Result<(i64, f64), sqlx::Error> {
    let (count, oldest): (i64, Option<i64>) =
        sqlx::query_as("SELECT COUNT(*), MIN(occurred_at) FROM outbox WHERE position IS NULL")
            .fetch_one(db.reader())
            .await?;
    let age = oldest.map_or(0.0, |t| {
        (micros(OffsetDateTime::now_utc()) - t).max(0) as f64 / 1e6
    });
    Ok((count, age))
}

#[derive(sqlx::FromRow)]
struct Row {
    id: String,
    position: i64,
    #[sqlx(rename = "type")]
    kind: String,
    version: i64,
    occurred_at: i64,
    aggregate_id: String,
    trace_id: Option<String>,
    payload: String,
}

impl Row {
    fn into_envelope(self) -> Option<Envelope> {
        let occurred =
            OffsetDateTime::from_unix_timestamp_nanos(i128::from(self.occurred_at) * 1_000)
                .ok()?
                .format(&Rfc3339)
                .ok()?;
        Some(Envelope {
            id: Uuid::parse_str(&self.id).ok()?,
            position: self.position,
            kind: self.kind,
            version: u32::try_from(self.version).ok()?,
            occurred_at: occurred,
            aggregate_id: self.aggregate_id,
            trace_id: self.trace_id,
            payload: serde_json::from_str(&self.payload).ok()?,
        })
    }
}

/// Up to `limit` events after position `after`, in order.
pub async fn read_after(db: &Db, after: i64, limit: i64) -> Result<Vec<Envelope>, sqlx::Error> {
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT id, position, type, version, occurred_at, aggregate_id, trace_id, payload \
         FROM outbox WHERE position > $1 ORDER BY position LIMIT $2",
    )
    .bind(after)
    .bind(limit.clamp(1, MAX_PAGE))
    .fetch_all(db.reader())
    .await?;
    let mut events = Vec::with_capacity(rows.len());
    for row in rows {
        let id = row.id.clone();
        match row.into_envelope() {
            Some(envelope) => events.push(envelope),
            None => {
                tracing::error!(%id, "an outbox row cannot be read; stopping the page before it");
                break;
            }
        }
    }
    Ok(events)
}

#[derive(Deserialize)]
struct Page {
    /// Who reads (the consuming service): its `after` acknowledges everything up to there,
    /// which is what lets retention prune. Anonymous reads acknowledge nothing.
    #[serde(default)]
    consumer: Option<String>,
    #[serde(default)]
    after: i64,
    #[serde(default = "default_limit")]
    limit: i64,
    /// With nothing after `after`, hold the request up to this long for events to appear
    /// (a long poll: an idle consumer neither spins nor waits out a polling interval).
    #[serde(default)]
    wait_ms: u64,
}

fn default_limit() -> i64 {
    100
}

/// `GET /internal/outbox?consumer=<name>&after=<position>&limit=<n>`: the stream, for
/// consumers of the embedded transport (internal port only; the gateway does not route it).
/// A reader asking for what retention has pruned gets `410 Gone`, never a page that skips.
pub fn routes(db: Db) -> Router {
    Router::new()
        .route("/internal/outbox", get(serve_page))
        .with_state(Stream {
            db,
            acknowledged: Arc::new(Mutex::new(HashMap::new())),
        })
}

#[derive(Clone)]
struct Stream {
    db: Db,
    /// When each reader's acknowledgement was last written, and where: written at most once
    /// per [`ACK_EVERY`] per reader (a write per long poll would cost the purchase path).
    acknowledged: Arc<Mutex<HashMap<String, (i64, tokio::time::Instant)>>>,
}

/// How often a reader's acknowledgement is written at most. The row lags the reader by up to
/// this much, which only makes retention keep a little more.
const ACK_EVERY: Duration = Duration::from_secs(1);
/// How often a reader that has not moved is written (its `seen_at`): far inside any sensible
/// retention window.
const STILL_EVERY: Duration = Duration::from_secs(60);
/// Longest reader name kept (names are service names).
const MAX_READER_NAME: usize = 64;

impl Stream {
    /// Records that `reader` has everything up to `after`, if it was not written lately.
    async fn acknowledge(&self, reader: &str, after: i64) -> Result<(), sqlx::Error> {
        let now = tokio::time::Instant::now();
        {
            let Ok(mut acknowledged) = self.acknowledged.lock() else {
                return Ok(());
            };
            // A moving reader is written at most every ACK_EVERY; one standing still (idle at
            // the head, or stuck behind an event it cannot handle) every STILL_EVERY, so that
            // it keeps counting as present and holds the log back.
            match acknowledged.get(reader) {
                Some((position, at))
                    if now - *at < ACK_EVERY || (*position == after && now - *at < STILL_EVERY) =>
                {
                    return Ok(());
                }
                _ => {}
            }
            // Bounded: readers are the shop's services; a flood of made-up names starts over.
            if acknowledged.len() >= 1024 {
                acknowledged.clear();
            }
            acknowledged.insert(reader.to_owned(), (after, now));
        }
        sqlx::query(
            "INSERT INTO outbox_readers (name, position, seen_at) VALUES ($1, $2, $3) \
             ON CONFLICT (name) DO UPDATE SET position = excluded.position, \
             seen_at = excluded.seen_at",
        )
        .bind(reader)
        .bind(after)
        .bind(micros(OffsetDateTime::now_utc()))
        .execute(self.db.pool())
        .await?;
        Ok(())
    }
}

/// The lowest position still kept (`None` while the outbox has no numbered row).
async fn oldest(db: &Db) -> Result<Option<i64>, sqlx::Error> {
    let (min,): (Option<i64>,) = sqlx::query_as("SELECT MIN(position) FROM outbox")
        .fetch_one(db.reader())
        .await?;
    Ok(min)
}

/// Prunes what retention allows, once: numbered rows older than `retention` that every reader
/// seen within `retention` and, when `relay` (RabbitMQ is configured), the relay have passed;
/// never the highest row (the numbering continues from it). Forgets readers not seen within
/// `retention`. Returns the number of rows deleted.
pub async fn prune(db: &Db, retention: Duration, relay: bool) -> Result<u64, sqlx::Error> {
    let cutoff = micros(OffsetDateTime::now_utc())
        - i64::try_from(retention.as_micros()).unwrap_or(i64::MAX);
    let (oldest, head, readers, relay_position): (
        Option<i64>,
        Option<i64>,
        Option<i64>,
        Option<i64>,
    ) = sqlx::query_as(
        "SELECT (SELECT MIN(position) FROM outbox), (SELECT MAX(position) FROM outbox), \
                    (SELECT MIN(position) FROM outbox_readers WHERE seen_at >= $1), \
                    (SELECT MIN(position) FROM outbox_relay)",
    )
    .bind(cutoff)
    .fetch_one(db.reader())
    .await?;
    let (Some(oldest), Some(head)) = (oldest, head) else {
        return Ok(0);
    };
    // A relay that has not confirmed anything yet (no row: it writes one at its first
    // confirm) is at 0; a row left by a relay no longer configured holds nothing back.
    let relay = if relay {
        Some(relay_position.unwrap_or(0))
    } else {
        None
    };
    // A batch at a time: the writer is not held for a long backlog's delete.
    let floor = [
        Some(head - 1),
        Some(oldest + PRUNE_BATCH - 1),
        readers,
        relay,
    ]
    .into_iter()
    .flatten()
    .min()
    .unwrap_or(0);
    let mut deleted = 0;
    if floor > 0 {
        deleted = sqlx::query(
            "DELETE FROM outbox WHERE position <= $1 AND occurred_at < $2 \
             AND position IS NOT NULL",
        )
        .bind(floor)
        .bind(cutoff)
        .execute(db.pool())
        .await?
        .rows_affected();
    }
    sqlx::query("DELETE FROM outbox_readers WHERE seen_at < $1")
        .bind(cutoff)
        .execute(db.pool())
        .await?;
    Ok(deleted)
}

/// Most rows one [`prune`] deletes.
pub const PRUNE_BATCH: i64 = 1_000;

/// Runs [`prune`] every `every` (at once again after a full batch) for as long as the process
/// runs, the first time only after a grace period (the window, at most five minutes): after a
/// restart that followed a long stop (the whole shop down over a week-end, an upgrade that
/// created `outbox_readers`), readers must have had the time to come back and say where they
/// are before anything is pruned past them.
pub fn spawn_pruner(
    db: Db,
    retention: Duration,
    every: Duration,
    relay: bool,
    service: &'static str,
) -> tokio::task::JoinHandle<()> {
    if retention < Duration::from_secs(600) {
        tracing::warn!(
            service,
            retention_secs = retention.as_secs(),
            "events.retention_secs is under ten minutes: a reader standing still is recorded once a minute, so a short window can forget a live one (it then gets 410, never skips)"
        );
    }
    tokio::spawn(async move {
        tokio::time::sleep(retention.min(Duration::from_secs(300))).await;
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            match prune(&db, retention, relay).await {
                Ok(0) => {}
                Ok(n) => {
                    if n >= PRUNE_BATCH.unsigned_abs() {
                        tick.reset_immediately();
                    }
                    tracing::debug!(service, rows = n, "outbox rows past retention pruned");
                    metrics::counter!("outbox_pruned_total", "service" => service).increment(n);
                }
                Err(e) => tracing::warn!(service, error = %e, "pruning the outbox failed"),
            }
        }
    })
}

/// The highest position numbered so far (0 when none).
pub async fn head(db: &Db) -> Result<i64, sqlx::Error> {
    let (max,): (Option<i64>,) = sqlx::query_as("SELECT MAX(position) FROM outbox")
        .fetch_one(db.reader())
        .await?;
    Ok(max.unwrap_or(0))
}

async fn serve_page(State(stream): State<Stream>, Query(page): Query<Page>) -> Response {
    let db = &stream.db;
    match oldest(db).await {
        // A reader behind the gap is not recorded either: it must not hold the log back
        // until someone re-seeds it.
        Ok(Some(oldest)) if oldest > page.after.saturating_add(1) => {
            return gone(page.after, oldest);
        }
        Ok(_) => {}
        Err(e) => {
            tracing::error!(error = %e, "reading the outbox failed");
            return (http::StatusCode::SERVICE_UNAVAILABLE, "outbox unavailable").into_response();
        }
    }
    if let Some(reader) = page.consumer.as_deref().filter(|r| {
        !r.is_empty() && r.len() <= MAX_READER_NAME && r.bytes().all(|b| b.is_ascii_graphic())
    }) && let Err(e) = stream.acknowledge(reader, page.after).await
    {
        // Only retention depends on it; the page is still served.
        tracing::warn!(error = %e, reader, "recording a reader's position failed");
    }
    let until = tokio::time::Instant::now() + Duration::from_millis(page.wait_ms).min(MAX_WAIT);
    let mut numbered = NUMBERED.subscribe();
    let result = async {
        loop {
            numbered.mark_unchanged();
            let head = head(db).await?;
            if head > page.after || tokio::time::Instant::now() >= until {
                let events = read_after(db, page.after, page.limit).await?;
                return Ok::<_, sqlx::Error>((head, events));
            }
            // Woken by a numbering (on SQLite a commit) in this process, or once a second for
            // a replica's.
            let wake = until.min(tokio::time::Instant::now() + POSITION_IDLE);
            let _ = tokio::time::timeout_at(wake, numbered.changed()).await;
        }
    }
    .await;
    match result {
        Ok((head, events)) => axum::Json(json!({ "head": head, "events": events })).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "reading the outbox failed");
            (http::StatusCode::SERVICE_UNAVAILABLE, "outbox unavailable").into_response()
        }
    }
}

/// `410 Gone`: the events right after `after` were pruned by retention (the reader was away
/// longer than the window). Its cursor must be re-seeded; skipping would lose their effects.
fn gone(after: i64, oldest: i64) -> Response {
    let body = json!({
        "type": "https://shopmesh.dev/problems/events-pruned",
        "title": "Events pruned",
        "status": 410,
        "detail": format!(
            "the events after position {after} are no longer kept (the oldest is {oldest}): \
             this reader was away longer than the retention window; re-seed it"
        ),
        "oldest": oldest,
    });
    (
        http::StatusCode::GONE,
        [(http::header::CONTENT_TYPE, "application/problem+json")],
        body.to_string(),
    )
        .into_response()
}
