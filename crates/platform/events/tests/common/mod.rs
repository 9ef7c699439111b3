//! What the RabbitMQ test binaries share: a handler that records each event once, appends,
//! counting and waiting for effects, and removing a test's queues and exchanges.
#![allow(dead_code)] // each test binary uses its own part

use std::time::{Duration, Instant};

use serde_json::json;
use shopmesh_db::testing::TestDb;
use shopmesh_db::{DatabaseSettings, Db, TxConn};
use shopmesh_events::consumer::{Handler, HandlerFuture};
use shopmesh_events::rabbit::EventsSettings;
use shopmesh_events::{Envelope, Event, outbox};

/// Inserts each event's id into `effects` (a primary key: a second effect fails).
pub struct Recorder;

impl Handler for Recorder {
    fn handle<'a>(&'a self, tx: &'a mut TxConn, event: &'a Envelope) -> HandlerFuture<'a> {
        Box::pin(async move {
            sqlx::query("INSERT INTO effects (event_id) VALUES ($1)")
                .bind(event.id.hyphenated().to_string())
                .execute(tx)
                .await?;
            Ok(())
        })
    }
}

pub async fn append(db: &Db, n: u32) {
    let mut tx = db.begin_write().await.expect("tx");
    outbox::append(
        &mut tx,
        &Event {
            kind: "test.happened",
            version: 1,
            aggregate_id: format!("thing-{n}"),
            payload: json!({"n": n}),
        },
        None,
    )
    .await
    .expect("append");
    tx.commit().await.expect("commit");
}

pub async fn effects(db: &Db) -> i64 {
    let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM effects")
        .fetch_one(db.pool())
        .await
        .expect("count");
    n
}

pub async fn wait_for(db: &Db, count: i64, limit: Duration) {
    let started = Instant::now();
    while effects(db).await < count {
        assert!(
            started.elapsed() < limit,
            "only {} of {count} events arrived within {limit:?}",
            effects(db).await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub async fn clean_up(settings: &EventsSettings) {
    let Some(url) = &settings.rabbitmq_url else {
        return;
    };
    if let Ok(connection) =
        lapin::Connection::connect(url, lapin::ConnectionProperties::default()).await
        && let Ok(channel) = connection.create_channel().await
    {
        for queue in [settings.queue("test"), settings.dead_letter_queue("test")] {
            let _ = channel
                .queue_delete(queue.as_str().into(), Default::default())
                .await;
        }
        for exchange in [settings.exchange.clone(), settings.dead_letter_exchange()] {
            let _ = channel
                .exchange_delete(exchange.as_str().into(), Default::default())
                .await;
        }
    }
}

/// Settings of a test of its own on the broker at `url`: names no other test uses.
pub fn test_settings(url: &str) -> EventsSettings {
    let unique = uuid::Uuid::new_v4().simple().to_string();
    EventsSettings {
        rabbitmq_url: Some(url.to_owned()),
        exchange: format!("shopmesh-test.{unique}"),
        queue_prefix: format!("shopmesh-test.{unique}."),
        delivery_limit: 3,
        retry_delay_ms: 20,
        prefetch: 10,
        ..EventsSettings::default()
    }
}

/// A producer's database with its outbox and a consumer's with its tables and `effects`
/// (the files live as long as the `TestDb`s).
pub async fn producer_and_consumer() -> ((TestDb, Db), (TestDb, Db)) {
    let (p, c) = (TestDb::sqlite(), TestDb::sqlite());
    let settings = DatabaseSettings::default();
    let producer = Db::connect(p.url(), &settings).await.expect("producer");
    let db = Db::connect(c.url(), &settings).await.expect("consumer");
    outbox::install(&producer).await.expect("install");
    shopmesh_events::consumer::install(&db)
        .await
        .expect("install");
    sqlx::query("CREATE TABLE effects (event_id TEXT PRIMARY KEY)")
        .execute(db.pool())
        .await
        .expect("effects");
    ((p, producer), (c, db))
}
