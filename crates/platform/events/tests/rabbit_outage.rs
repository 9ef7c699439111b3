//! The broker goes away: the outbox absorbs what is committed meanwhile and the relay drains it
//! when the broker is back; a relay killed and restarted around a broker restart loses nothing.
//! Its own test binary: it stops and starts the machine's RabbitMQ (`rabbitmqctl stop_app` /
//! `start_app`), which no other test may see. Runs when `TEST_RABBITMQ_URL` is set (CI), since
//! it needs to control the broker; skipped with a notice otherwise.

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use shopmesh_db::testing::TestDb;
use shopmesh_db::{DatabaseSettings, Db};
use shopmesh_events::consumer::{Consumer, Handler, HandlerFuture};
use shopmesh_events::rabbit::{self, EventsSettings, Topology};

const TEST_TOPOLOGY: Topology = &[("test", &["test.*"])];
use shopmesh_db::TxConn;
use shopmesh_events::{Envelope, Event, outbox};

/// Starts the broker's application again when dropped (also when the test fails).
struct BrokerBack;

impl Drop for BrokerBack {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl").arg("start_app").output();
        let _ = Command::new("rabbitmqctl")
            .args(["await_startup", "--timeout", "60"])
            .output();
    }
}

fn rabbitmqctl(args: &[&str]) {
    let out = Command::new("rabbitmqctl")
        .args(args)
        .output()
        .expect("rabbitmqctl");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

struct Recorder;

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

async fn sqlite(test: &TestDb) -> Db {
    Db::connect(test.url(), &DatabaseSettings::default())
        .await
        .expect("connect")
}

async fn append(db: &Db, n: u32) {
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
    .expect("append while the broker is down");
    tx.commit().await.expect("commit");
}

async fn effects(db: &Db) -> i64 {
    let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM effects")
        .fetch_one(db.pool())
        .await
        .expect("count");
    n
}

#[tokio::test(flavor = "multi_thread")]
async fn the_outbox_absorbs_a_broker_outage_and_a_killed_relay_loses_nothing() {
    let Ok(url) = std::env::var("TEST_RABBITMQ_URL") else {
        eprintln!("skipped: set TEST_RABBITMQ_URL to let this test stop and start the broker");
        return;
    };
    let unique = uuid::Uuid::new_v4().simple().to_string();
    let settings = EventsSettings {
        rabbitmq_url: Some(url.clone()),
        exchange: format!("shopmesh-test.{unique}"),
        queue_prefix: format!("shopmesh-test.{unique}."),
        delivery_limit: 3,
        retry_delay_ms: 20,
        prefetch: 10,
        ..EventsSettings::default()
    };
    let (p, c) = (TestDb::sqlite(), TestDb::sqlite());
    let (producer, db) = (sqlite(&p).await, sqlite(&c).await);
    outbox::install(&producer).await.expect("install");
    shopmesh_events::consumer::install(&db)
        .await
        .expect("install");
    sqlx::query("CREATE TABLE effects (event_id TEXT PRIMARY KEY)")
        .execute(db.pool())
        .await
        .expect("effects");
    let positioner = outbox::spawn_positioner(producer.clone(), "test");
    let consumer = Arc::new(Consumer::new(
        db.clone(),
        Arc::new(Recorder),
        3,
        Duration::from_millis(50),
    ));
    let consuming = rabbit::spawn_consumer(consumer, settings.clone(), "test", vec!["test.*"]);
    let mut relay = rabbit::spawn_relay(producer.clone(), settings.clone(), "test", TEST_TOPOLOGY);
    for n in 0..20 {
        append(&producer, n).await;
    }
    wait_for(&db, 20, Duration::from_secs(20)).await;

    // The broker stops for 30 s; commits go on, into the outbox.
    let _back = BrokerBack;
    rabbitmqctl(&["stop_app"]);
    let down = Instant::now();
    let mut n = 20;
    while down.elapsed() < Duration::from_secs(30) {
        append(&producer, n).await;
        n += 1;
        if n == 60 {
            // The relay dies too (as under SIGKILL: no cleanup), and a new one starts.
            relay.abort();
            relay = rabbit::spawn_relay(producer.clone(), settings.clone(), "test", TEST_TOPOLOGY);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let during = n - 20;
    rabbitmqctl(&["start_app"]);
    rabbitmqctl(&["await_startup", "--timeout", "60"]);
    let back = Instant::now();
    wait_for(&db, i64::from(n), Duration::from_secs(60)).await;
    let drained = back.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    println!(
        "broker down 30 s: {during} events committed meanwhile; all {n} delivered once, the \
         backlog drained {drained:?} after the broker was back"
    );
    assert_eq!(effects(&db).await, i64::from(n), "lost or doubled");

    relay.abort();
    consuming.abort();
    positioner.abort();
    clean_up(&settings).await;
}

async fn wait_for(db: &Db, count: i64, limit: Duration) {
    let started = Instant::now();
    while effects(db).await < count {
        assert!(
            started.elapsed() < limit,
            "only {} of {count} events arrived",
            effects(db).await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn clean_up(settings: &EventsSettings) {
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
