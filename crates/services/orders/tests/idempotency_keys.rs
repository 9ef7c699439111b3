//! The idempotency-key lifecycle in the orders database, on SQLite and PostgreSQL, including a
//! key whose first request died with its process.

use shopmesh_db::Db;
use shopmesh_db::testing::TestDb;
use shopmesh_orders::store::{Claim, Store, StoredResponse};
use uuid::Uuid;

shopmesh_db::test_on_both_backends!(
    a_key_is_claimed_once_then_replays_its_answer,
    a_key_abandoned_by_a_dead_request_can_be_taken_over_once,
);

async fn store(db: &TestDb) -> Store {
    let pool = Db::connect(db.url(), &Default::default())
        .await
        .expect("connect");
    pool.migrate(&shopmesh_orders::MIGRATOR)
        .await
        .expect("migrate");
    Store::new(pool)
}

async fn a_key_is_claimed_once_then_replays_its_answer(db: TestDb) {
    let store = store(&db).await;
    let user = Uuid::now_v7();
    let Claim::Claimed(_) = store.claim_key(user, "k", "hash-a").await.expect("claim") else {
        panic!("a fresh key is ours");
    };
    assert_eq!(
        store.claim_key(user, "k", "hash-a").await.expect("again"),
        Claim::InFlight
    );
    assert_eq!(
        store.claim_key(user, "k", "hash-b").await.expect("other"),
        Claim::Mismatch
    );
    let other_user = Uuid::now_v7();
    assert!(matches!(
        store
            .claim_key(other_user, "k", "hash-b")
            .await
            .expect("theirs"),
        Claim::Claimed(_)
    ));
    let answer = StoredResponse {
        status: 201,
        body: "{\"id\":1}".into(),
    };
    store.finish_key(user, "k", &answer).await.expect("finish");
    assert_eq!(
        store.claim_key(user, "k", "hash-a").await.expect("replay"),
        Claim::Replay(answer)
    );
}

async fn a_key_abandoned_by_a_dead_request_can_be_taken_over_once(db: TestDb) {
    let store = store(&db).await;
    let user = Uuid::now_v7();
    let Claim::Claimed(first) = store.claim_key(user, "k", "h").await.expect("claim") else {
        panic!("a fresh key is ours");
    };
    // The request's process died two minutes ago without answering.
    sqlx::query("UPDATE idempotency_keys SET created_at = created_at - 120000000")
        .execute(store.db().pool())
        .await
        .expect("backdate");
    assert_eq!(
        store.claim_key(user, "k", "h").await.expect("claim"),
        Claim::Abandoned(first)
    );
    let fresh = store
        .retake_key(user, "k", first)
        .await
        .expect("retake")
        .expect("ours");
    assert_ne!(fresh, first);
    assert_eq!(
        store.retake_key(user, "k", first).await.expect("retake"),
        None,
        "taken over once"
    );
    assert_eq!(
        store.claim_key(user, "k", "h").await.expect("claim"),
        Claim::InFlight,
        "fresh again"
    );
}
