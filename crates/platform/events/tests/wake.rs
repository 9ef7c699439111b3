//! On SQLite an appended event is numbered by its own `INSERT` and wakes the stream's readers
//! when its transaction commits, with no positioner running; a rolled-back one wakes no one
//! and frees its number. (A file of its own: the wake-up is process-wide, and other tests'
//! commits would ring it.)

use serde_json::json;
use shopmesh_db::testing::TestDb;
use shopmesh_db::{DatabaseSettings, Db};
use shopmesh_events::{Event, outbox};

fn event(n: u32) -> Event {
    Event {
        kind: "test.happened",
        version: 1,
        aggregate_id: format!("thing-{n}"),
        payload: json!({ "n": n }),
    }
}

#[tokio::test]
async fn on_sqlite_a_commit_wakes_the_streams_readers_and_a_rollback_does_not() {
    let test = TestDb::sqlite();
    let db = Db::connect(test.url(), &DatabaseSettings::default())
        .await
        .expect("connect");
    outbox::install(&db).await.expect("install");
    let mut woken = outbox::numberings();
    woken.mark_unchanged();

    let mut tx = db.begin_write().await.expect("tx");
    outbox::append(&mut tx, &event(1), None)
        .await
        .expect("append");
    tx.rollback().await.expect("rollback");
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    assert!(
        !woken.has_changed().expect("open"),
        "a rollback woke readers"
    );

    let mut tx = db.begin_write().await.expect("tx");
    outbox::append(&mut tx, &event(2), None)
        .await
        .expect("append");
    assert!(
        !woken.has_changed().expect("open"),
        "woken before the commit"
    );
    tx.commit().await.expect("commit");
    assert!(woken.has_changed().expect("open"), "the commit woke no one");
    let events = outbox::read_after(&db, 0, 10).await.expect("read");
    let seen: Vec<_> = events
        .iter()
        .map(|e| (e.position, e.payload["n"].clone()))
        .collect();
    assert_eq!(
        seen,
        vec![(1, json!(2))],
        "numbered at once, the rolled-back number reused"
    );
}
