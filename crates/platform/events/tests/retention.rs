//! Retention of the event log, on SQLite and PostgreSQL: under steady traffic the outbox and
//! the inbox stay bounded; a reader seen within the window holds the log back; a reader away
//! for longer is told that events were pruned, and its cursor never skips them.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::json;
use shopmesh_db::TxConn;
use shopmesh_db::testing::TestDb;
use shopmesh_db::{DatabaseSettings, Db};
use shopmesh_events::consumer::{ConsumeError, Consumer, Handler, HandlerFuture, Subscription};
use shopmesh_events::{Event, EventsSettings, outbox};
use shopmesh_mesh::{Mesh, MeshSettings, Protocol};

shopmesh_db::test_on_both_backends!(
    the_event_log_stays_bounded_under_steady_traffic,
    a_reader_away_longer_than_retention_is_told_and_never_skips,
);

/// Counts the events it handles.
#[derive(Default)]
struct Counter(AtomicUsize);

impl Handler for Counter {
    fn may_repeat(&self) -> bool {
        true
    }

    fn handle<'a>(
        &'a self,
        _: &'a mut TxConn,
        _: &'a shopmesh_events::Envelope,
    ) -> HandlerFuture<'a> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Box::pin(async { Ok(()) })
    }
}

fn retention(secs: u64) -> EventsSettings {
    EventsSettings {
        retention_secs: secs,
        ..EventsSettings::default()
    }
}

/// The producer's outbox and the consumer's tables in one database, the stream served on a
/// local port.
struct Shop {
    db: Db,
    mesh: Mesh,
    url: String,
}

impl Shop {
    async fn start(test: &TestDb) -> Self {
        let db = Db::connect(test.url(), &DatabaseSettings::default())
            .await
            .expect("connect");
        outbox::install(&db).await.expect("install");
        shopmesh_events::consumer::install(&db)
            .await
            .expect("install");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let app = outbox::routes(db.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Shop {
            db,
            mesh: Mesh::new(MeshSettings::default()),
            url,
        }
    }

    async fn append(&self, n: usize) {
        for i in 0..n {
            let mut tx = self.db.begin_write().await.expect("tx");
            let event = Event {
                kind: "test.happened",
                version: 1,
                aggregate_id: format!("thing-{i}"),
                payload: json!({ "n": i }),
            };
            outbox::append(&mut tx, &event, None).await.expect("append");
            tx.commit().await.expect("commit");
        }
        outbox::assign_positions(&self.db).await.expect("number");
    }

    /// A subscription whose cursor is kept under `key`.
    fn subscription(&self, key: &str) -> Subscription {
        Subscription {
            producer: key.to_owned(),
            upstream: self
                .mesh
                .upstream(key, &self.url, Protocol::Http)
                .expect("upstream"),
        }
    }

    async fn count(&self, table: &str) -> i64 {
        let (n,): (i64,) =
            sqlx::query_as(sqlx::AssertSqlSafe(format!("SELECT COUNT(*) FROM {table}")))
                .fetch_one(self.db.pool())
                .await
                .expect("count");
        n
    }
}

/// Pumps until the cursor under `key` reaches `head`.
async fn catch_up(consumer: &Consumer, subscription: &Subscription, head: i64) {
    for _ in 0..100 {
        if consumer
            .cursor(&subscription.producer)
            .await
            .expect("cursor")
            >= head
        {
            return;
        }
        consumer.pump(subscription).await.expect("pump");
    }
    panic!("the consumer did not reach {head}");
}

async fn the_event_log_stays_bounded_under_steady_traffic(test: TestDb) {
    let shop = Shop::start(&test).await;
    let counter = Arc::new(Counter::default());
    let consumer = Consumer::new(
        shop.db.clone(),
        counter.clone(),
        3,
        Duration::from_millis(10),
    )
    .reading_as("reader", &retention(1));
    let subscription = shop.subscription("test");
    const ROUND: usize = 50;
    const ROUNDS: usize = 5;
    for round in 1..=ROUNDS {
        shop.append(ROUND).await;
        let head = outbox::head(&shop.db).await.expect("head");
        assert_eq!(
            head,
            (round * ROUND) as i64,
            "numbering continues after pruning"
        );
        catch_up(&consumer, &subscription, head).await;
        // Past the window; the next read acknowledges the head.
        tokio::time::sleep(Duration::from_millis(1_100)).await;
        consumer.pump(&subscription).await.expect("pump");
        outbox::prune(&shop.db, Duration::from_secs(1), false)
            .await
            .expect("prune");
        consumer.prune_inbox().await.expect("prune inbox");
        // Everything read and older than the window is gone but the head (numbering goes on
        // from it); the inbox keeps twice the window: at most this round's and the last's.
        assert_eq!(shop.count("outbox").await, 1, "round {round}");
        let inbox = shop.count("event_inbox").await;
        assert!(
            inbox <= (2 * ROUND) as i64,
            "round {round}: {inbox} inbox rows"
        );
    }
    // Nothing was lost or handled twice on the way.
    assert_eq!(counter.0.load(Ordering::SeqCst), ROUND * ROUNDS);
    assert_eq!(
        consumer.cursor("test").await.expect("cursor"),
        (ROUND * ROUNDS) as i64
    );
}

async fn a_reader_away_longer_than_retention_is_told_and_never_skips(test: TestDb) {
    let shop = Shop::start(&test).await;
    // The sleeps below are lower bounds, and each prune's outcome only depends on which side
    // of the window a time falls: two seconds of margin either way for a slow machine.
    let window = retention(3);
    let present = Consumer::new(
        shop.db.clone(),
        Arc::new(Counter::default()),
        3,
        Duration::from_millis(10),
    )
    .reading_as("present", &window);
    let away = Consumer::new(
        shop.db.clone(),
        Arc::new(Counter::default()),
        3,
        Duration::from_millis(10),
    )
    .reading_as("away", &window);
    let (present_stream, away_stream) = (shop.subscription("present"), shop.subscription("away"));

    shop.append(10).await;
    catch_up(&present, &present_stream, 10).await;
    catch_up(&away, &away_stream, 10).await;
    tokio::time::sleep(Duration::from_millis(4_000)).await;
    // `away` reads once more (acknowledging 10), then goes away.
    away.pump(&away_stream).await.expect("pump");
    shop.append(10).await;
    catch_up(&present, &present_stream, 20).await;

    // The first ten are past the window and everyone has them: pruned. `away` was seen within
    // the window and is at 10: the next ten stay for it.
    outbox::prune(&shop.db, window.retention(), false)
        .await
        .expect("prune");
    assert_eq!(shop.count("outbox").await, 10);

    tokio::time::sleep(Duration::from_millis(3_500)).await;
    present.pump(&present_stream).await.expect("pump");
    // `away` has not been seen for longer than the window: it no longer holds the log back.
    outbox::prune(&shop.db, window.retention(), false)
        .await
        .expect("prune");
    assert_eq!(shop.count("outbox").await, 1);

    // Back, it is told, clearly, and its cursor does not move past what it never read.
    match away.pump(&away_stream).await {
        Err(ConsumeError::Pruned(producer, why)) => {
            assert_eq!(producer, "away");
            assert!(why.contains("after position 10"), "{why}");
            assert!(why.contains("re-seed"), "{why}");
        }
        other => panic!("expected to be told of the pruned events, got {other:?}"),
    }
    assert_eq!(away.cursor("away").await.expect("cursor"), 10);
    // The reader that stayed reads on.
    shop.append(1).await;
    catch_up(&present, &present_stream, 21).await;

    // Rows pruned between the producer's check and its read (a race with the pruner) leave
    // a hole in a page: the reader notices and stands still rather than skip past it.
    shop.append(5).await;
    sqlx::query("DELETE FROM outbox WHERE position IN (23, 24)")
        .execute(shop.db.pool())
        .await
        .expect("punch a hole");
    match present.pump(&present_stream).await {
        Err(ConsumeError::Pruned(_, why)) => assert!(why.contains("after position 22"), "{why}"),
        other => panic!("expected the hole to be noticed, got {other:?}"),
    }
    assert_eq!(present.cursor("present").await.expect("cursor"), 21);
}
