//! The outbox and the embedded transport, on SQLite and PostgreSQL: nothing committed is lost,
//! nothing rolled back is sent, positions follow commits, redeliveries have no second effect,
//! a poison event is set aside while the rest flows.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::json;
use shopmesh_db::TxConn;
use shopmesh_db::testing::TestDb;
use shopmesh_db::{Backend, DatabaseSettings, Db};
use shopmesh_events::consumer::{Consumer, Handler, HandlerError, HandlerFuture, Subscription};
use shopmesh_events::{Envelope, Event, outbox};
use shopmesh_mesh::{Mesh, MeshSettings, Protocol};

shopmesh_db::test_on_both_backends!(
    only_committed_events_get_positions_in_order,
    concurrent_producers_get_gapless_positions,
    redelivered_events_have_no_second_effect_and_poison_is_set_aside,
    a_handler_with_outside_effects_runs_once_per_event_even_when_a_neighbour_fails,
    a_stopping_consumer_finishes_the_event_in_hand_and_cuts_its_wait_short,
    an_event_its_handler_rejects_is_dead_lettered_at_once,
    two_consumers_on_one_inbox_handle_each_event_once,
);

async fn connect(db: &TestDb) -> Db {
    Db::connect(db.url(), &DatabaseSettings::default())
        .await
        .expect("connect")
}

fn event(n: u32) -> Event {
    Event {
        kind: if n % 10 == 7 {
            "test.poison"
        } else {
            "test.happened"
        },
        version: 1,
        aggregate_id: format!("thing-{n}"),
        payload: json!({"n": n}),
    }
}

async fn all(db: &Db) -> Vec<Envelope> {
    outbox::read_after(db, 0, 500).await.expect("read")
}

async fn only_committed_events_get_positions_in_order(test: TestDb) {
    let db = connect(&test).await;
    outbox::install(&db).await.expect("install");
    outbox::install(&db)
        .await
        .expect("installing twice is harmless");

    let mut tx = db.begin_write().await.expect("tx");
    outbox::append(&mut tx, &event(1), Some("req-1"))
        .await
        .expect("append");
    drop(tx); // rolled back
    for n in 2..=4 {
        let mut tx = db.begin_write().await.expect("tx");
        outbox::append(&mut tx, &event(n), None)
            .await
            .expect("append");
        tx.commit().await.expect("commit");
    }
    if db.backend() == Backend::Sqlite {
        // Numbered as appended (write transactions commit in the order they run): served
        // as soon as committed, with nothing left for the positioner.
        assert_eq!(outbox::assign_positions(&db).await.expect("number"), 0);
    } else {
        assert!(
            all(&db).await.is_empty(),
            "nothing is served before it is numbered"
        );
        assert_eq!(outbox::assign_positions(&db).await.expect("number"), 3);
    }
    let events = all(&db).await;
    let ns: Vec<_> = events.iter().map(|e| e.payload["n"].clone()).collect();
    assert_eq!(ns, vec![json!(2), json!(3), json!(4)]);
    let positions: Vec<_> = events.iter().map(|e| e.position).collect();
    assert_eq!(positions, vec![1, 2, 3]);
    assert_eq!(events[0].kind, "test.happened");
    assert_eq!(outbox::read_after(&db, 2, 10).await.expect("read").len(), 1);
}

/// Eight writers in two replicas (each its own connections to the same database, and its
/// own positioner) append at once, some of their transactions rolled back: every committed
/// event gets one position, gapless and in order, and a reader following the stream never
/// sees a gap filled later.
async fn concurrent_producers_get_gapless_positions(test: TestDb) {
    let db = connect(&test).await;
    outbox::install(&db).await.expect("install");
    let other = connect(&test).await;
    let positioner = outbox::spawn_positioner(db.clone(), "test");
    let replica = outbox::spawn_positioner(other.clone(), "test");
    let mut writers = Vec::new();
    for w in 0..8u32 {
        let db = if w % 2 == 0 {
            db.clone()
        } else {
            other.clone()
        };
        writers.push(tokio::spawn(async move {
            // 30 transactions, every sixth rolled back: 25 events committed per writer.
            for i in 0..30u32 {
                let mut tx = db.begin_write().await.expect("tx");
                outbox::append(&mut tx, &event(w * 100 + i), None)
                    .await
                    .expect("append");
                if i % 6 == 5 {
                    drop(tx);
                    tokio::task::yield_now().await;
                } else {
                    tx.commit().await.expect("commit");
                }
            }
        }));
    }
    // A reader follows the stream while the writers append: it never sees a gap.
    let reader = {
        let db = db.clone();
        tokio::spawn(async move {
            let mut seen = 0;
            let mut ids = BTreeSet::new();
            let give_up = std::time::Instant::now() + Duration::from_secs(30);
            while std::time::Instant::now() < give_up {
                for e in outbox::read_after(&db, seen, 50).await.expect("read") {
                    assert_eq!(e.position, seen + 1, "positions are gapless and in order");
                    seen = e.position;
                    ids.insert(e.id);
                }
                if seen == 200 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            (seen, ids)
        })
    };
    for writer in writers {
        writer.await.expect("writer");
    }
    let (seen, ids) = reader.await.expect("reader");
    positioner.abort();
    replica.abort();
    assert_eq!(seen, 200);
    assert_eq!(ids.len(), 200);
    let rolled_back: Vec<_> = all(&db)
        .await
        .into_iter()
        .filter(|e| e.payload["n"].as_u64().is_some_and(|n| n % 100 % 6 == 5))
        .collect();
    assert!(
        rolled_back.is_empty(),
        "rolled back yet served: {rolled_back:?}"
    );
}

/// Records each handled event in `effects`; fails `test.poison` while `poison` is set. Counts
/// its successful runs in `outside` (an effect outside the database, like an e-mail sent).
struct Recorder {
    poison: AtomicBool,
    /// What it answers to `may_repeat`.
    repeatable: bool,
    outside: AtomicUsize,
}

impl Recorder {
    fn new(repeatable: bool) -> Self {
        Recorder {
            poison: AtomicBool::new(true),
            repeatable,
            outside: AtomicUsize::new(0),
        }
    }
}

impl Handler for Recorder {
    fn may_repeat(&self) -> bool {
        self.repeatable
    }

    fn handle<'a>(&'a self, tx: &'a mut TxConn, event: &'a Envelope) -> HandlerFuture<'a> {
        Box::pin(async move {
            if event.kind == "test.poison" && self.poison.load(Ordering::SeqCst) {
                return Err(HandlerError::Retry("poisoned".to_owned()));
            }
            sqlx::query("INSERT INTO effects (event_id) VALUES ($1)")
                .bind(event.id.hyphenated().to_string())
                .execute(tx)
                .await?;
            self.outside.fetch_add(1, Ordering::SeqCst);
            Ok(())
        })
    }
}

async fn redelivered_events_have_no_second_effect_and_poison_is_set_aside(test: TestDb) {
    // Pages in one transaction (the handler may repeat); `a_handler_with_outside_effects_…`
    // runs the same story one event per transaction.
    consume_with_poison(test, true).await;
}

async fn a_handler_with_outside_effects_runs_once_per_event_even_when_a_neighbour_fails(
    test: TestDb,
) {
    let recorder = consume_with_poison(test, false).await;
    // 18 good events, then 2 redriven: each handler ran once, never again because the poison
    // next to it failed.
    assert_eq!(recorder.outside.load(Ordering::SeqCst), 20);
}

/// One database playing both sides: the producer's outbox and the consumer's tables, with an
/// `effects` table for handlers to write to.
async fn both_sides(test: &TestDb) -> Db {
    let db = connect(test).await;
    outbox::install(&db).await.expect("install");
    shopmesh_events::consumer::install(&db)
        .await
        .expect("install");
    sqlx::query("CREATE TABLE effects (event_id TEXT PRIMARY KEY)")
        .execute(db.pool())
        .await
        .expect("effects");
    db
}

/// Serves `db`'s outbox at `/internal/outbox` on a free port.
async fn serve_outbox(db: &Db) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let app = outbox::routes(db.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

/// Twenty events in `test`'s outbox (7 and 17 are `test.poison`), numbered and served, and
/// the subscription to them.
async fn twenty_events(test: &TestDb) -> (Db, Subscription) {
    let db = both_sides(test).await;
    for n in 0..20 {
        let mut tx = db.begin_write().await.expect("tx");
        outbox::append(&mut tx, &event(n), None)
            .await
            .expect("append");
        tx.commit().await.expect("commit");
    }
    outbox::assign_positions(&db).await.expect("number");

    let addr = serve_outbox(&db).await;
    let mesh = Mesh::new(MeshSettings::default());
    let subscription = Subscription {
        producer: "test".to_owned(),
        upstream: mesh
            .upstream("test", &format!("http://{addr}"), Protocol::Http)
            .expect("upstream"),
    };
    (db, subscription)
}

async fn consume_with_poison(test: TestDb, repeatable: bool) -> Arc<Recorder> {
    let (db, subscription) = twenty_events(&test).await;
    let recorder = Arc::new(Recorder::new(repeatable));
    let consumer = Consumer::new(db.clone(), recorder.clone(), 3, Duration::from_millis(10));
    let effects = || async {
        let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM effects")
            .fetch_one(db.pool())
            .await
            .expect("count");
        n
    };

    // Events 7 and 17 are poison: each stops the stream until its third failure sets it aside.
    let mut pumps = 0;
    while consumer.cursor("test").await.expect("cursor") < 20 {
        let _ = consumer.pump(&subscription).await;
        pumps += 1;
        assert!(pumps < 50, "the stream is stuck");
    }
    assert_eq!(effects().await, 18);
    let dead = consumer.dead_letters().await.expect("dead letters");
    assert_eq!(dead.len(), 2);
    assert!(
        dead.iter()
            .all(|d| d.event.kind == "test.poison" && d.error == "poisoned")
    );

    // Everything delivered again (a consumer restored from an old cursor): no second effect.
    sqlx::query("UPDATE event_cursors SET position = 0")
        .execute(db.pool())
        .await
        .expect("rewind");
    while consumer.cursor("test").await.expect("cursor") < 20 {
        consumer.pump(&subscription).await.expect("pump");
    }
    assert_eq!(effects().await, 18);

    // Fixed, the dead letters are redriven once.
    recorder.poison.store(false, Ordering::SeqCst);
    assert_eq!(consumer.redrive().await.expect("redrive"), (2, 0));
    assert_eq!(effects().await, 20);
    assert!(consumer.dead_letters().await.expect("dead").is_empty());
    assert_eq!(consumer.redrive().await.expect("redrive"), (0, 0));
    recorder
}

/// Holds each event in its handler until released (an e-mail being sent when the process is
/// told to stop).
struct Gate {
    entered: tokio::sync::Notify,
    release: tokio::sync::Semaphore,
}

impl Handler for Gate {
    fn handle<'a>(&'a self, tx: &'a mut TxConn, event: &'a Envelope) -> HandlerFuture<'a> {
        Box::pin(async move {
            self.entered.notify_one();
            self.release
                .acquire()
                .await
                .map_err(|e| HandlerError::Retry(e.to_string()))?
                .forget();
            sqlx::query("INSERT INTO effects (event_id) VALUES ($1)")
                .bind(event.id.hyphenated().to_string())
                .execute(tx)
                .await?;
            Ok(())
        })
    }
}

async fn a_stopping_consumer_finishes_the_event_in_hand_and_cuts_its_wait_short(test: TestDb) {
    let db = both_sides(&test).await;
    let mut tx = db.begin_write().await.expect("tx");
    outbox::append(&mut tx, &event(1), None)
        .await
        .expect("append");
    tx.commit().await.expect("commit");
    outbox::assign_positions(&db).await.expect("number");
    let addr = serve_outbox(&db).await;
    let mesh = Mesh::new(MeshSettings::default());
    let subscription = || Subscription {
        producer: "test".to_owned(),
        upstream: mesh
            .upstream("test", &format!("http://{addr}"), Protocol::Http)
            .expect("upstream"),
    };
    let gate = Arc::new(Gate {
        entered: tokio::sync::Notify::new(),
        release: tokio::sync::Semaphore::new(0),
    });
    let consumer = Arc::new(Consumer::new(
        db.clone(),
        gate.clone(),
        3,
        Duration::from_millis(10),
    ));

    // Told to stop while the event is in its handler: it finishes and records it first.
    let (stop, stopping) = tokio::sync::oneshot::channel::<()>();
    let following = tokio::spawn(consumer.clone().follow(subscription(), async move {
        let _ = stopping.await;
    }));
    tokio::time::timeout(Duration::from_secs(10), gate.entered.notified())
        .await
        .expect("the event reaches its handler");
    stop.send(()).expect("stop");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!following.is_finished(), "it waits for the event in hand");
    gate.release.add_permits(1);
    tokio::time::timeout(Duration::from_secs(10), following)
        .await
        .expect("it stops once the event is handled")
        .expect("join");
    let (effects,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM effects")
        .fetch_one(db.pool())
        .await
        .expect("count");
    assert_eq!(effects, 1, "the event in hand was handled");
    assert_eq!(consumer.cursor("test").await.expect("cursor"), 1);

    // Waiting at the producer for the next event (a long poll of 2 s, begun ~300 ms before
    // the stop: a consumer that looked only between polls would take ~1.7 s), it stops at once.
    let (stop, stopping) = tokio::sync::oneshot::channel::<()>();
    let following = tokio::spawn(consumer.clone().follow(subscription(), async move {
        let _ = stopping.await;
    }));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let asked = std::time::Instant::now();
    stop.send(()).expect("stop");
    tokio::time::timeout(Duration::from_secs(10), following)
        .await
        .expect("it stops")
        .expect("join");
    assert!(
        asked.elapsed() < Duration::from_secs(1),
        "stopped after {:?}",
        asked.elapsed()
    );
}

/// Refuses `test.poison` for good, as a consumer refuses a version it does not know.
struct Refuser;

impl Handler for Refuser {
    fn may_repeat(&self) -> bool {
        true
    }

    fn handle<'a>(&'a self, tx: &'a mut TxConn, event: &'a Envelope) -> HandlerFuture<'a> {
        Box::pin(async move {
            if event.kind == "test.poison" {
                return Err(HandlerError::Reject(
                    "test.poison version 1 is not known here".to_owned(),
                ));
            }
            sqlx::query("INSERT INTO effects (event_id) VALUES ($1)")
                .bind(event.id.hyphenated().to_string())
                .execute(tx)
                .await?;
            Ok(())
        })
    }
}

async fn an_event_its_handler_rejects_is_dead_lettered_at_once(test: TestDb) {
    let (db, subscription) = twenty_events(&test).await;
    let consumer = Consumer::new(db.clone(), Arc::new(Refuser), 3, Duration::from_millis(10));

    // One pass over the stream: no attempts spent on what can never work, nothing held up.
    consumer.pump(&subscription).await.expect("pump");
    assert_eq!(consumer.cursor("test").await.expect("cursor"), 20);
    let (effects,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM effects")
        .fetch_one(db.pool())
        .await
        .expect("count");
    assert_eq!(effects, 18);
    let dead = consumer.dead_letters().await.expect("dead letters");
    assert_eq!(dead.len(), 2);
    assert!(
        dead.iter().all(|d| d.event.kind == "test.poison"
            && d.error == "rejected: test.poison version 1 is not known here"),
        "{:?}",
        dead.iter().map(|d| &d.error).collect::<Vec<_>>()
    );
    let (failures,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM event_failures")
        .fetch_one(db.pool())
        .await
        .expect("failures");
    assert_eq!(failures, 0);
}

/// Two replicas of a consumer on one database follow one stream at once: each event is
/// handled once, and neither stumbles on the other's work (no pump fails), whether pages go
/// in one transaction or one event per transaction.
async fn two_consumers_on_one_inbox_handle_each_event_once(test: TestDb) {
    let (db, subscription) = twenty_events(&test).await;
    for repeatable in [true, false] {
        // Each round starts from nothing handled.
        for clear in [
            "DELETE FROM effects",
            "DELETE FROM event_inbox",
            "DELETE FROM event_cursors",
        ] {
            sqlx::query(clear).execute(db.pool()).await.expect("clear");
        }
        let recorder = Arc::new(Recorder::new(repeatable));
        recorder.poison.store(false, Ordering::SeqCst);
        let replicas = [0, 1]
            .map(|_| Consumer::new(db.clone(), recorder.clone(), 3, Duration::from_millis(10)));
        futures_util::future::join(
            follow_to_the_end(&replicas[0], &subscription),
            follow_to_the_end(&replicas[1], &subscription),
        )
        .await;
        let (effects, inbox): (i64, i64) = sqlx::query_as(
            "SELECT (SELECT COUNT(*) FROM effects), (SELECT COUNT(*) FROM event_inbox)",
        )
        .fetch_one(db.pool())
        .await
        .expect("count");
        assert_eq!((effects, inbox), (20, 20), "repeatable: {repeatable}");
        assert_eq!(
            recorder.outside.load(Ordering::SeqCst),
            20,
            "handler runs, repeatable: {repeatable}"
        );
    }
}

/// Pumps until the consumer's cursor is past the twenty events; every pump must succeed.
async fn follow_to_the_end(consumer: &Consumer, subscription: &Subscription) {
    let mut pumps = 0;
    while consumer.cursor("test").await.expect("cursor") < 20 {
        consumer.pump(subscription).await.expect("a pump");
        pumps += 1;
        assert!(pumps < 50, "the stream is stuck");
    }
}
