//! The RabbitMQ transport (`events.rabbitmq_url`), with `lapin`.
//!
//! - **Relay** (producer): reads the outbox after its own cursor (`outbox_relay`), publishes
//!   each event persistent to a durable topic exchange (routing key = the event's type) on a
//!   channel with publisher confirms, and moves its cursor only after the broker confirmed
//!   every message of the batch. A crash in between publishes the batch again: duplicates,
//!   never losses, and consumers deduplicate by id. While the broker is down the outbox simply
//!   grows; the relay reconnects with back-off and drains it in order.
//! - **Consumer**: a durable quorum queue per consuming service, bound to the types it wants;
//!   each delivery is handled in one database transaction with the inbox entry, then acked. A
//!   failure is nacked back after a delay; the queue's `x-delivery-limit` sends an event that
//!   keeps failing to a dead-letter exchange and its queue (`<queue>.dead`), so the rest flows;
//!   one its handler rejects (`HandlerError::Reject`) is rejected without requeue: there at once.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    BasicRejectOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Connection, ConnectionProperties, ExchangeKind};
use serde::Deserialize;
use shopmesh_db::Db;

use shopmesh_mesh::backoff::Backoff;

use crate::Envelope;
use crate::consumer::Consumer;
use crate::outbox;

/// `[events]`: which transport, and the RabbitMQ names.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EventsSettings {
    /// `amqp://user:password@host:5672/%2f`: publish and consume through RabbitMQ. Unset: the
    /// embedded transport (consumers pull producers' outboxes).
    pub rabbitmq_url: Option<String>,
    /// The topic exchange events are published to.
    pub exchange: String,
    /// Prepended to queue names (several shops on one broker, tests).
    pub queue_prefix: String,
    /// Deliveries of one event before the broker dead-letters it.
    pub delivery_limit: u32,
    /// Wait before handing a failed event back, in milliseconds.
    pub retry_delay_ms: u64,
    /// Unacknowledged deliveries a consumer holds at once.
    pub prefetch: u16,
    /// How long the event log keeps what every reader has acknowledged, in seconds (7 days):
    /// a consumer may rewind within it. Outbox rows older than this that every reader seen
    /// within it (and the RabbitMQ relay) has passed are pruned; a consumer's inbox keeps the
    /// ids it handled for twice as long, so a rewind within the window is still de-duplicated.
    /// A reader away for longer no longer holds the log back, and is told so when it returns.
    pub retention_secs: u64,
    /// How often retention runs, in milliseconds.
    pub prune_every_ms: u64,
    /// Longest wait for the broker's answer to one request (connecting, declaring, a batch's
    /// publisher confirms), in milliseconds: past it the connection is given up and made
    /// again, and what was not confirmed is published again (consumers drop repeats). A
    /// connection that goes silent (a broker busy recovering its queues, a half-open socket)
    /// would otherwise hold the relay until the heartbeat gives up on it.
    pub broker_timeout_ms: u64,
}

impl Default for EventsSettings {
    fn default() -> Self {
        EventsSettings {
            rabbitmq_url: None,
            exchange: "shopmesh.events".to_owned(),
            queue_prefix: String::new(),
            delivery_limit: 5,
            retry_delay_ms: 200,
            prefetch: 20,
            retention_secs: 7 * 24 * 3600,
            prune_every_ms: 60_000,
            broker_timeout_ms: 10_000,
        }
    }
}

impl EventsSettings {
    /// [`EventsSettings::retention_secs`].
    pub fn retention(&self) -> Duration {
        Duration::from_secs(self.retention_secs)
    }

    /// [`EventsSettings::broker_timeout_ms`].
    pub fn broker_timeout(&self) -> Duration {
        Duration::from_millis(self.broker_timeout_ms.max(1))
    }

    /// [`EventsSettings::prune_every_ms`] (at least 10 ms).
    pub fn prune_every(&self) -> Duration {
        Duration::from_millis(self.prune_every_ms.max(10))
    }

    /// The dead-letter exchange.
    pub fn dead_letter_exchange(&self) -> String {
        format!("{}.dead", self.exchange)
    }

    /// The queue of the consuming service `name`.
    pub fn queue(&self, name: &str) -> String {
        format!("{}{name}", self.queue_prefix)
    }

    /// Its dead-letter queue.
    pub fn dead_letter_queue(&self, name: &str) -> String {
        format!("{}.dead", self.queue(name))
    }
}

/// A connection that lasted this long worked: the next reconnection starts from the first wait.
const STABLE: Duration = Duration::from_secs(10);

type Error = Box<dyn std::error::Error + Send + Sync>;

/// Which queue reads which event types: declared by the consumers and also by every relay
/// before it publishes, so that events published before a consumer ever started are queued
/// for it, not dropped by an exchange with nobody bound.
pub type Topology = &'static [(&'static str, &'static [&'static str])];

const RELAY_BATCH: i64 = 200;
/// Longest wait for new rows when nothing in this process said so (a replica's rows).
const IDLE: Duration = Duration::from_secs(1);

/// Heartbeat asked of the broker unless the URL says otherwise: a connection that stops
/// answering is found dead within a few of them (RabbitMQ's default, 60 s, took minutes).
const HEARTBEAT_SECS: u32 = 10;

/// `url` asking [`HEARTBEAT_SECS`], unless it asks a heartbeat of its own.
fn with_heartbeat(url: &str) -> String {
    if url.contains("heartbeat=") {
        return url.to_owned();
    }
    let (base, fragment) = url.split_at(url.find('#').unwrap_or(url.len()));
    let sep = if base.contains('?') { '&' } else { '?' };
    format!("{base}{sep}heartbeat={HEARTBEAT_SECS}{fragment}")
}

async fn connect(url: &str, settings: &EventsSettings) -> Result<Connection, Error> {
    let url = with_heartbeat(url);
    within(
        settings,
        "connecting",
        Connection::connect(&url, ConnectionProperties::default()),
    )
    .await
}

/// `request`'s answer, or an error once the broker took longer than
/// [`EventsSettings::broker_timeout`] for it (the caller gives the connection up).
async fn within<T, E: Into<Error>>(
    settings: &EventsSettings,
    what: &str,
    request: impl Future<Output = Result<T, E>>,
) -> Result<T, Error> {
    let limit = settings.broker_timeout();
    match tokio::time::timeout(limit, request).await {
        Ok(answer) => answer.map_err(Into::into),
        Err(_) => Err(format!("RabbitMQ did not answer {what} within {limit:?}").into()),
    }
}

/// The relay's cursor.
async fn relayed(db: &Db) -> Result<i64, sqlx::Error> {
    let row: Option<(i64,)> =
        sqlx::query_as("SELECT position FROM outbox_relay WHERE name = 'rabbitmq'")
            .fetch_optional(db.pool())
            .await?;
    Ok(row.map_or(0, |r| r.0))
}

async fn set_relayed(db: &Db, position: i64) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO outbox_relay (name, position) VALUES ('rabbitmq', $1) \
         ON CONFLICT (name) DO UPDATE SET position = excluded.position",
    )
    .bind(position)
    .execute(db.pool())
    .await?;
    Ok(())
}

/// Publishes the producer's outbox to RabbitMQ for as long as the process runs.
pub fn spawn_relay(
    db: Db,
    settings: EventsSettings,
    service: &'static str,
    topology: Topology,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let Some(url) = settings.rabbitmq_url.clone() else {
            return;
        };
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
        loop {
            let started = tokio::time::Instant::now();
            match relay(&db, &url, &settings, service, topology).await {
                Ok(()) => {}
                Err(e) => {
                    tracing::warn!(service, error = %e, "relay to RabbitMQ interrupted; retrying");
                }
            }
            // An attempt a deadline ended is no sign of health: the wait grows.
            if started.elapsed() >= STABLE.max(settings.broker_timeout() * 2) {
                backoff.reset();
            }
            backoff.wait().await;
        }
    })
}

async fn relay(
    db: &Db,
    url: &str,
    settings: &EventsSettings,
    service: &'static str,
    topology: Topology,
) -> Result<(), Error> {
    let connection = connect(url, settings).await?;
    let channel = within(settings, "opening a channel", connection.create_channel()).await?;
    for (queue, bindings) in topology {
        within(
            settings,
            "declaring the topology",
            declare(&channel, settings, queue, bindings),
        )
        .await?;
    }
    within(
        settings,
        "turning on publisher confirms",
        channel.confirm_select(ConfirmSelectOptions::default()),
    )
    .await?;
    tracing::info!(service, exchange = %settings.exchange, "relaying events to RabbitMQ");
    let mut numbered = outbox::numberings();
    loop {
        numbered.mark_unchanged();
        let after = relayed(db).await?;
        let events = outbox::read_after(db, after, RELAY_BATCH).await?;
        let Some(last) = events.last().map(|e| e.position) else {
            // Woken when this process numbers (on SQLite commits) rows; a replica's within IDLE.
            let _ = tokio::time::timeout(IDLE, numbered.changed()).await;
            continue;
        };
        let mut confirms = Vec::with_capacity(events.len());
        for event in &events {
            let body = serde_json::to_vec(event)?;
            let properties = BasicProperties::default()
                .with_delivery_mode(2)
                .with_content_type("application/json".into())
                .with_message_id(event.id.hyphenated().to_string().as_str().into())
                .with_type(event.kind.as_str().into());
            confirms.push(
                within(
                    settings,
                    "a publish",
                    channel.basic_publish(
                        settings.exchange.as_str().into(),
                        event.kind.as_str().into(),
                        BasicPublishOptions::default(),
                        &body,
                        properties,
                    ),
                )
                .await?,
            );
        }
        // One deadline for the batch: a silent connection is given up (the connection goes
        // with this function) and the batch published again on a new one. Not while the
        // broker has said it blocks publishers (a memory or disk alarm): a new connection
        // would be blocked as well, and the old one, unable even to close, would stay.
        let confirmed = async {
            for confirm in confirms {
                if !confirm.await?.is_ack() {
                    return Err::<(), Error>("the broker refused a message (nack)".into());
                }
            }
            Ok(())
        };
        let mut confirmed = std::pin::pin!(confirmed);
        loop {
            match tokio::time::timeout(settings.broker_timeout(), confirmed.as_mut()).await {
                Ok(done) => break done?,
                Err(_) if connection.status().blocked() => {
                    tracing::warn!(
                        service,
                        "RabbitMQ blocks publishing (a resource alarm); waiting"
                    );
                }
                Err(_) => {
                    return Err(format!(
                        "RabbitMQ did not confirm a batch within {:?}",
                        settings.broker_timeout()
                    )
                    .into());
                }
            }
        }
        // Only now, with every message of the batch confirmed, does the cursor move.
        set_relayed(db, last).await?;
        let head = outbox::head(db).await.unwrap_or(last);
        metrics::gauge!("outbox_unrelayed", "service" => service).set((head - last) as f64);
    }
}

/// Consumes the queue of service `name`, bound to `bindings` (e.g. `order.*`), for as long as
/// the process runs.
pub fn spawn_consumer(
    consumer: Arc<Consumer>,
    settings: EventsSettings,
    name: &'static str,
    bindings: Vec<&'static str>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(follow(
        consumer,
        settings,
        name,
        bindings,
        std::future::pending(),
    ))
}

/// [`spawn_consumer`]'s loop, until `stop` completes: the delivery being handled is finished
/// and acknowledged first; those prefetched and not handled go back to the queue.
pub async fn follow(
    consumer: Arc<Consumer>,
    settings: EventsSettings,
    name: &'static str,
    bindings: Vec<&'static str>,
    stop: impl Future<Output = ()> + Send,
) {
    let Some(url) = settings.rabbitmq_url.clone() else {
        return;
    };
    let mut stop = std::pin::pin!(stop);
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    loop {
        let started = tokio::time::Instant::now();
        match consume(&consumer, &url, &settings, name, &bindings, stop.as_mut()).await {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(queue = name, error = %e, "consuming from RabbitMQ interrupted; retrying");
            }
        }
        // An attempt a deadline ended is no sign of health: the wait grows.
        if started.elapsed() >= STABLE.max(settings.broker_timeout() * 2) {
            backoff.reset();
        }
        tokio::select! {
            biased;
            () = stop.as_mut() => return,
            () = backoff.wait() => {}
        }
    }
}

/// Declares the exchanges and the service's queues (idempotent).
pub async fn declare(
    channel: &lapin::Channel,
    settings: &EventsSettings,
    name: &str,
    bindings: &[&str],
) -> Result<(), Error> {
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    channel
        .exchange_declare(
            settings.exchange.as_str().into(),
            ExchangeKind::Topic,
            durable,
            FieldTable::default(),
        )
        .await?;
    let dlx = settings.dead_letter_exchange();
    channel
        .exchange_declare(
            dlx.as_str().into(),
            ExchangeKind::Topic,
            durable,
            FieldTable::default(),
        )
        .await?;
    let quorum = || {
        let mut args = FieldTable::default();
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString(LongString::from("quorum")),
        );
        args
    };
    let dead = settings.dead_letter_queue(name);
    channel
        .queue_declare(
            dead.as_str().into(),
            QueueDeclareOptions::durable(),
            quorum(),
        )
        .await?;
    let queue = settings.queue(name);
    channel
        .queue_bind(
            dead.as_str().into(),
            dlx.as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut args = quorum();
    args.insert(
        "x-delivery-limit".into(),
        AMQPValue::LongInt(settings.delivery_limit.min(i32::MAX as u32) as i32),
    );
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(LongString::from(dlx.as_str())),
    );
    channel
        .queue_declare(queue.as_str().into(), QueueDeclareOptions::durable(), args)
        .await?;
    for binding in bindings {
        channel
            .queue_bind(
                queue.as_str().into(),
                settings.exchange.as_str().into(),
                (*binding).into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
    }
    Ok(())
}

async fn consume(
    consumer: &Consumer,
    url: &str,
    settings: &EventsSettings,
    name: &str,
    bindings: &[&str],
    mut stop: Pin<&mut (impl Future<Output = ()> + Send + ?Sized)>,
) -> Result<(), Error> {
    let connection = connect(url, settings).await?;
    let channel = within(settings, "opening a channel", connection.create_channel()).await?;
    within(
        settings,
        "setting the prefetch",
        channel.basic_qos(settings.prefetch, BasicQosOptions::default()),
    )
    .await?;
    within(
        settings,
        "declaring the queue",
        declare(&channel, settings, name, bindings),
    )
    .await?;
    let queue = settings.queue(name);
    let mut deliveries = within(
        settings,
        "subscribing",
        channel.basic_consume(
            queue.as_str().into(),
            format!("shopmesh-{name}").as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        ),
    )
    .await?;
    tracing::info!(%queue, "consuming events from RabbitMQ");
    loop {
        let delivery = tokio::select! {
            biased;
            () = stop.as_mut() => {
                // Unacknowledged deliveries go back to the queue with the connection.
                let _ = connection.close(200, "stopping".into()).await;
                return Ok(());
            }
            delivery = deliveries.next() => delivery,
        };
        let Some(delivery) = delivery else { break };
        let delivery = delivery?;
        let event: Envelope = match serde_json::from_slice(&delivery.data) {
            Ok(event) => event,
            Err(e) => {
                tracing::error!(error = %e, "an unreadable message; dead-lettering it");
                delivery
                    .acker
                    .reject(BasicRejectOptions { requeue: false })
                    .await?;
                continue;
            }
        };
        match consumer.handle_once("rabbitmq", &event).await {
            Ok(()) => {
                delivery.acker.ack(BasicAckOptions::default()).await?;
                consumer.prune_if_due().await;
            }
            Err(e @ crate::consumer::ConsumeError::Rejected(..)) => {
                // It will never succeed: to the dead-letter queue now, not after the limit.
                tracing::error!(event = %event.id, kind = %event.kind, error = %e, "event dead-lettered");
                delivery
                    .acker
                    .reject(BasicRejectOptions { requeue: false })
                    .await?;
            }
            Err(e) => {
                tracing::warn!(event = %event.id, kind = %event.kind, error = %e, "handling failed; handing it back");
                tokio::time::sleep(Duration::from_millis(settings.retry_delay_ms)).await;
                delivery
                    .acker
                    .nack(BasicNackOptions {
                        requeue: true,
                        ..Default::default()
                    })
                    .await?;
            }
        }
    }
    Err("the broker closed the consumer".into())
}

/// Takes up to the current depth of `name`'s dead-letter queue, unacknowledged, on `channel`.
async fn take_dead(
    channel: &lapin::Channel,
    settings: &EventsSettings,
    name: &str,
) -> Result<Vec<lapin::message::Delivery>, Error> {
    let dead = settings.dead_letter_queue(name);
    let depth = channel
        .queue_declare(
            dead.as_str().into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?
        .message_count();
    let mut taken = Vec::new();
    for _ in 0..depth {
        match channel
            .basic_get(
                dead.as_str().into(),
                lapin::options::BasicGetOptions { no_ack: false },
            )
            .await?
        {
            Some(message) => taken.push(message.delivery),
            None => break,
        }
    }
    Ok(taken)
}

/// The events in `name`'s dead-letter queue (left there).
pub async fn dead_letters(settings: &EventsSettings, name: &str) -> Result<Vec<Envelope>, Error> {
    let url = settings
        .rabbitmq_url
        .as_deref()
        .ok_or("no RabbitMQ configured")?;
    let connection = connect(url, settings).await?;
    let channel = connection.create_channel().await?;
    let taken = take_dead(&channel, settings, name).await?;
    let events = taken
        .iter()
        .filter_map(|d| serde_json::from_slice(&d.data).ok())
        .collect();
    for delivery in taken {
        delivery
            .acker
            .nack(BasicNackOptions {
                requeue: true,
                ..Default::default()
            })
            .await?;
    }
    Ok(events)
}

/// Publishes every event of `name`'s dead-letter queue to the exchange again (with a fresh
/// delivery count), removing each once the broker confirmed its copy. Returns how many.
pub async fn redrive(settings: &EventsSettings, name: &str) -> Result<usize, Error> {
    let url = settings
        .rabbitmq_url
        .as_deref()
        .ok_or("no RabbitMQ configured")?;
    let connection = connect(url, settings).await?;
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let taken = take_dead(&channel, settings, name).await?;
    let mut moved = 0;
    for delivery in taken {
        let confirm = channel
            .basic_publish(
                settings.exchange.as_str().into(),
                delivery.routing_key.clone(),
                BasicPublishOptions::default(),
                &delivery.data,
                delivery.properties.clone(),
            )
            .await?
            .await?;
        if confirm.is_ack() {
            delivery.acker.ack(BasicAckOptions::default()).await?;
            moved += 1;
        } else {
            delivery
                .acker
                .nack(BasicNackOptions {
                    requeue: true,
                    ..Default::default()
                })
                .await?;
        }
    }
    Ok(moved)
}

#[cfg(test)]
mod tests {
    use super::with_heartbeat;

    #[test]
    fn a_url_asks_a_heartbeat_unless_it_has_one() {
        assert_eq!(
            with_heartbeat("amqp://guest:guest@127.0.0.1:5672/%2f"),
            "amqp://guest:guest@127.0.0.1:5672/%2f?heartbeat=10"
        );
        assert_eq!(
            with_heartbeat("amqps://u:p@mq:5671/shop?frame_max=8192"),
            "amqps://u:p@mq:5671/shop?frame_max=8192&heartbeat=10"
        );
        assert_eq!(
            with_heartbeat("amqp://mq/%2f#primary"),
            "amqp://mq/%2f?heartbeat=10#primary"
        );
        assert_eq!(
            with_heartbeat("amqp://mq/%2f?heartbeat=30"),
            "amqp://mq/%2f?heartbeat=30"
        );
    }
}
