//! Events that are never lost or handled twice.
//!
//! - **Envelope** ([`Envelope`]): UUIDv7 id, type, version, when, the aggregate's id, the trace
//!   (request id) it came from, the payload; and, once published, its position in the
//!   producer's stream.
//! - **Outbox** ([`outbox`]): a producer writes the event with [`outbox::append`] in the same
//!   database transaction as the state change it reports, so there is never one without the
//!   other. Rows are numbered in the order they became visible (`position`, unique): on
//!   SQLite by the append itself, on PostgreSQL by a positioner task once committed. A reader
//!   that has seen position *n* has seen every event before it.
//! - **Embedded transport**: a producer serves its stream at `GET /internal/outbox?after=n`;
//!   a consumer ([`consumer`]) pulls it through the mesh from the cursor it keeps in its own
//!   database. Durable and at-least-once across restarts of either side, with no broker.
//! - **Inbox**: the consumer records the event id in the same transaction as the handler's
//!   effect and its cursor; a redelivered event is skipped. Effects outside the database (a mail
//!   file) are keyed by the event id, so repeating one leaves one.
//! - **Dead letters**: an event whose handler keeps failing is set aside after
//!   `max_attempts`, so the events behind it keep flowing; it can be redriven.
//!
//! Tables (portable SQL, created if missing at start by [`outbox::install`] and
//! [`consumer::install`], beside the service's own migrations): [`OUTBOX_SQL`],
//! [`CONSUMER_SQL`].

pub mod consumer;
pub mod outbox;
pub mod rabbit;

pub use rabbit::EventsSettings;

use serde::{Deserialize, Serialize};
use shopmesh_db::Db;
use uuid::Uuid;

/// The producer's table.
pub const OUTBOX_SQL: &str = include_str!("outbox.sql");
/// The consumer's tables.
pub const CONSUMER_SQL: &str = include_str!("consumer.sql");

/// An event to append: what happened, to what.
#[derive(Debug, Clone)]
pub struct Event {
    /// `order.placed`, `user.registered`, ...
    pub kind: &'static str,
    /// The payload's schema version.
    pub version: u32,
    /// The id of the entity it is about.
    pub aggregate_id: String,
    /// The payload.
    pub payload: serde_json::Value,
}

/// One event's schema: the payload type, its type name (also the RabbitMQ routing key) and
/// version, who writes it and who reads it. The types live in `shopmesh-contracts`; producers
/// write them with [`Event::of`], consumers read them with [`Envelope::decode`], so a renamed
/// or retyped field is a compile error or a named failure, never a silent zero.
pub trait Contract: Serialize + serde::de::DeserializeOwned {
    /// `order.paid`, ...
    const KIND: &'static str;
    /// The payload's schema version; a breaking change is a new type with a new version.
    const VERSION: u32;
    /// The service that writes it.
    const PRODUCER: &'static str;
    /// The services that read it (their queues are bound to it).
    const CONSUMERS: &'static [&'static str];
    /// The id of the entity it is about.
    fn aggregate_id(&self) -> String;
}

/// Why an envelope's payload could not be read as the contract its type names.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// A version this consumer does not read (a producer ahead of it).
    #[error("{kind} v{version} is not read here (this consumer reads v{reads})")]
    UnknownVersion {
        /// The event's type.
        kind: String,
        /// Its version.
        version: u32,
        /// The version this consumer reads.
        reads: u32,
    },
    /// The payload does not match the schema of its type and version.
    #[error("{kind} v{version} does not match its schema: {reason}")]
    Malformed {
        /// The event's type.
        kind: String,
        /// Its version.
        version: u32,
        /// What serde said (the field and the problem).
        reason: String,
    },
}

impl Event {
    /// The event carrying `payload`.
    pub fn of<C: Contract>(payload: &C) -> Result<Event, serde_json::Error> {
        Ok(Event {
            kind: C::KIND,
            version: C::VERSION,
            aggregate_id: payload.aggregate_id(),
            payload: serde_json::to_value(payload)?,
        })
    }
}

impl Envelope {
    /// The payload as `C` when this envelope is a `C::KIND` (`Ok(None)` for another type);
    /// another version of it, or a payload that does not match, is an error that names it
    /// (the consumer retries, then sets the event aside with that reason).
    pub fn decode<C: Contract>(&self) -> Result<Option<C>, DecodeError> {
        if self.kind != C::KIND {
            return Ok(None);
        }
        if self.version != C::VERSION {
            return Err(DecodeError::UnknownVersion {
                kind: self.kind.clone(),
                version: self.version,
                reads: C::VERSION,
            });
        }
        C::deserialize(&self.payload)
            .map(Some)
            .map_err(|e| DecodeError::Malformed {
                kind: self.kind.clone(),
                version: self.version,
                reason: e.to_string(),
            })
    }
}

/// An event as stored and sent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    /// Unique, time-ordered.
    pub id: Uuid,
    /// Its place in the producer's stream (1, 2, ...).
    pub position: i64,
    /// `order.placed`, ...
    #[serde(rename = "type")]
    pub kind: String,
    /// The payload's schema version.
    pub version: u32,
    /// When it happened (RFC 3339, UTC).
    pub occurred_at: String,
    /// The entity it is about.
    pub aggregate_id: String,
    /// The request it came from (`x-request-id`), when known.
    pub trace_id: Option<String>,
    /// The payload.
    pub payload: serde_json::Value,
}

/// Runs each statement of a schema (`CREATE … IF NOT EXISTS`), so that starting twice is
/// harmless.
pub(crate) async fn install_schema(db: &Db, schema: &'static str) -> Result<(), sqlx::Error> {
    // Comments are whole lines in these files; drop them before splitting on `;`.
    let sql: String = schema
        .lines()
        .filter(|l| !l.trim_start().starts_with("--"))
        .collect::<Vec<_>>()
        .join("\n");
    for statement in sql.split(';').map(str::trim).filter(|s| !s.is_empty()) {
        sqlx::query(sqlx::AssertSqlSafe(statement.to_owned()))
            .execute(db.pool())
            .await?;
    }
    Ok(())
}

/// A producer's background publishing: the positioner that numbers committed outbox rows, the
/// pruner that applies retention, and, when `events.rabbitmq_url` is set, the relay to
/// RabbitMQ. Stopped by [`Publishing::stop`] or when dropped.
pub struct Publishing {
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Publishing {
    /// Starts publishing `service`'s outbox in `db`; with RabbitMQ, `topology` (the shop's
    /// queues and what they read, from `shopmesh-contracts`) is declared before publishing.
    pub fn start(
        db: &Db,
        settings: &EventsSettings,
        service: &'static str,
        topology: rabbit::Topology,
    ) -> Self {
        let mut tasks = vec![
            outbox::spawn_positioner(db.clone(), service),
            outbox::spawn_pruner(
                db.clone(),
                settings.retention(),
                settings.prune_every(),
                settings.rabbitmq_url.is_some(),
                service,
            ),
        ];
        if settings.rabbitmq_url.is_some() {
            tasks.push(rabbit::spawn_relay(
                db.clone(),
                settings.clone(),
                service,
                topology,
            ));
        }
        Publishing { tasks }
    }

    /// Stops both tasks (before the database is closed).
    pub fn stop(self) {}
}

impl Drop for Publishing {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}
