//! The idempotency-key lifecycle in the orders database, on SQLite and PostgreSQL, including a
//! key whose first request died with its process; and the instance leases that tell a dead
//! process's keys and saga steps from a live one's.

use shopmesh_db::Db;
use shopmesh_db::testing::TestDb;
use std::time::Duration;

use shopmesh_orders::domain::{Line, Status, Step};
use shopmesh_orders::error::Error;
use shopmesh_orders::idempotency::{self, Begun};
use shopmesh_orders::store::{Answered, Claim, NewOrder, Order, Store, StoredResponse};
use uuid::Uuid;

shopmesh_db::test_on_both_backends!(
    a_key_is_claimed_once_then_replays_its_answer,
    a_key_abandoned_by_a_dead_request_can_be_taken_over_once,
    a_key_whose_process_died_is_taken_over_at_once_a_live_ones_never,
    a_saga_step_is_resumed_when_its_process_died_never_while_it_lives,
    a_key_its_live_request_dropped_is_taken_over_at_once,
    a_key_given_up_after_its_order_was_placed_answers_with_that_order,
    keys_past_retention_are_purged_in_batches_and_younger_ones_kept,
    a_priced_order_is_stored_with_its_claim_and_answered_with_its_placement,
    a_key_taken_over_keeps_its_takers_answer_though_the_order_is_placed,
);

async fn store(db: &TestDb) -> Store {
    let pool = Db::connect(db.url(), &Default::default())
        .await
        .expect("connect");
    pool.migrate(&shopmesh_orders::MIGRATOR)
        .await
        .expect("migrate");
    shopmesh_events::outbox::install(&pool)
        .await
        .expect("outbox");
    let store = Store::new(pool);
    store.renew_lease().await.expect("lease");
    store
}

/// Another process (replica) on the same database, alive.
async fn replica(of: &Store) -> Store {
    let other = Store::new(of.db().clone());
    other.renew_lease().await.expect("lease");
    other
}

/// `store`'s process dies: its lease runs out (as after a kill or a freeze, without waiting).
async fn die(store: &Store) {
    sqlx::query("UPDATE instances SET lease_until = 0 WHERE id = $1")
        .bind(store.instance())
        .execute(store.db().pool())
        .await
        .expect("expire the lease");
}

async fn a_key_whose_process_died_is_taken_over_at_once_a_live_ones_never(db: TestDb) {
    let first = store(&db).await;
    let second = replica(&first).await;
    let user = Uuid::now_v7();
    let Claim::Claimed(order) = first.claim_key(user, "k", "h").await.expect("claim") else {
        panic!("a fresh key is ours");
    };
    // Its first request still runs on a live process: a retry waits, wherever it lands.
    assert_eq!(
        second.claim_key(user, "k", "h").await.expect("claim"),
        Claim::InFlight
    );
    // That process dies: the retry takes over now, not a minute later. (A process never takes
    // its own keys for dead, even if its lease lapsed: it knows it lives.)
    die(&first).await;
    assert_eq!(
        first.claim_key(user, "k", "h").await.expect("claim"),
        Claim::InFlight
    );
    assert_eq!(
        second.claim_key(user, "k", "h").await.expect("claim"),
        Claim::Abandoned(order)
    );
    let fresh = second
        .retake_key(user, "k", order)
        .await
        .expect("retake")
        .expect("ours");
    // Now the live `second` owns it: in flight again for everyone.
    assert_eq!(
        first.claim_key(user, "k", "h").await.expect("claim"),
        Claim::InFlight
    );
    assert_ne!(fresh, order);
    // A process that stopped cleanly has given its lease up: same as dead.
    let third = replica(&first).await;
    let Claim::Claimed(_) = third.claim_key(user, "k2", "h").await.expect("claim") else {
        panic!("a fresh key is ours");
    };
    third.retire().await.expect("retire");
    assert!(matches!(
        second.claim_key(user, "k2", "h").await.expect("claim"),
        Claim::Abandoned(_)
    ));
}

async fn a_saga_step_is_resumed_when_its_process_died_never_while_it_lives(db: TestDb) {
    use shopmesh_orders::domain::{Line, Status, Step};
    use time::{Duration, OffsetDateTime};
    let first = store(&db).await;
    let second = replica(&first).await;
    let order = Uuid::now_v7();
    let line = Line {
        product_id: Uuid::now_v7(),
        sku: "MUG-1".into(),
        name: "Mug".into(),
        unit_price: 100,
        quantity: 1,
    };
    let expires = OffsetDateTime::now_utc() + Duration::minutes(15);
    first
        .insert_pending(
            order,
            Uuid::now_v7(),
            &NewOrder {
                lines: vec![line],
                total: 100,
                currency: "EUR".into(),
                expires_at: expires,
            },
        )
        .await
        .expect("insert");
    assert!(
        first
            .transition(
                order,
                (Status::Pending, Step::Reserving),
                (Status::AwaitingPayment, Step::Charging),
                None
            )
            .await
            .expect("move"),
        "first is charging"
    );
    // A replica that has just started looks for steps to finish: the live one's is not one,
    // however recent (this was the race: a starting replica resumed everything in flight).
    let stale = OffsetDateTime::now_utc() - Duration::seconds(30);
    assert!(second.in_flight(stale).await.expect("in flight").is_empty());
    // Untouched for longer than any step may take: resumed even though its process lives.
    assert_eq!(
        second
            .in_flight(OffsetDateTime::now_utc() + Duration::seconds(1))
            .await
            .expect("in flight"),
        vec![order]
    );
    // Nor can anyone take it over while its process lives.
    assert!(
        !second
            .take_over_step(order, stale)
            .await
            .expect("take over")
    );
    // Its process dies: resumed at once, by one replica only.
    die(&first).await;
    assert_eq!(
        second.in_flight(stale).await.expect("in flight"),
        vec![order]
    );
    let third = replica(&first).await;
    assert!(
        second
            .take_over_step(order, stale)
            .await
            .expect("take over")
    );
    assert!(
        !third.take_over_step(order, stale).await.expect("take over"),
        "the step is the live second's now"
    );
    assert!(third.in_flight(stale).await.expect("in flight").is_empty());
    // The taker may keep retrying it while it is its own; nobody else may.
    assert!(second.keep_step(order).await.expect("keep"));
    assert!(!first.keep_step(order).await.expect("keep"));
    // The taker's moves are guarded; the frozen process, back, finds the order moved and must
    // not act on it (its guarded move fails).
    assert!(
        second
            .transition(
                order,
                (Status::AwaitingPayment, Step::Charging),
                (Status::AwaitingPayment, Step::Idle),
                None
            )
            .await
            .expect("move")
    );
    assert!(
        !first
            .transition(
                order,
                (Status::AwaitingPayment, Step::Charging),
                (Status::AwaitingPayment, Step::Committing),
                None
            )
            .await
            .expect("move")
    );
    // Finished (idle): no longer anyone's to retry.
    assert!(!second.keep_step(order).await.expect("keep"));
}

async fn a_key_is_claimed_once_then_replays_its_answer(db: TestDb) {
    let store = store(&db).await;
    let user = Uuid::now_v7();
    let Claim::Claimed(first) = store.claim_key(user, "k", "hash-a").await.expect("claim") else {
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
    // Only the claim it was made for can answer the key.
    assert!(
        !store
            .finish_key(user, "k", Uuid::now_v7(), &answer)
            .await
            .expect("finish")
    );
    assert!(
        store
            .finish_key(user, "k", first, &answer)
            .await
            .expect("finish")
    );
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
    // The first attempt's late release leaves the new claim alone.
    store.release_key(user, "k", first).await.expect("release");
    assert_eq!(
        store.claim_key(user, "k", "h").await.expect("claim"),
        Claim::InFlight,
        "fresh again"
    );
}

/// The answer `POST /orders` gives for an order, reduced to its id for these tests.
#[allow(clippy::result_large_err)] // the service's own error type, as `idempotency::begin` takes
fn answer_of(order: Order) -> Result<StoredResponse, Error> {
    Ok(StoredResponse {
        status: 201,
        body: order.id.to_string(),
    })
}

fn patience(secs: u64) -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_secs(secs)
}

async fn a_key_its_live_request_dropped_is_taken_over_at_once(db: TestDb) {
    let store = store(&db).await;
    let user = Uuid::now_v7();
    let Begun::Claimed(claimed) =
        idempotency::begin(&store, user, "k", "h", patience(1), answer_of, None)
            .await
            .expect("begin")
    else {
        panic!("a fresh key is ours");
    };
    let first = claimed.order_id();
    // While its request runs, a retry waits and, past its patience, is told so.
    let waited = idempotency::begin(&store, user, "k", "h", patience(1), answer_of, None).await;
    assert!(matches!(waited, Err(Error::InFlight)), "{waited:?}");

    // The request is dropped (its deadline passed) with nothing placed, on a process that
    // lives on: a retry takes the key over within its patience, under a fresh order id,
    // instead of a minute of 409s.
    drop(claimed);
    let Begun::Claimed(retry) =
        idempotency::begin(&store, user, "k", "h", patience(5), answer_of, None)
            .await
            .expect("begin")
    else {
        panic!("the retry runs");
    };
    assert_ne!(retry.order_id(), first);
    let answer = StoredResponse {
        status: 201,
        body: "done".to_owned(),
    };
    retry.finish(&answer).await.expect("finish");
    let replay = idempotency::begin(&store, user, "k", "h", patience(1), answer_of, None)
        .await
        .expect("begin");
    assert!(
        matches!(replay, Begun::Replay(ref r) if *r == answer),
        "{replay:?}"
    );
}

async fn a_key_given_up_after_its_order_was_placed_answers_with_that_order(db: TestDb) {
    let store = store(&db).await;
    let user = Uuid::now_v7();
    let Begun::Claimed(claimed) =
        idempotency::begin(&store, user, "k", "h", patience(1), answer_of, None)
            .await
            .expect("begin")
    else {
        panic!("a fresh key is ours");
    };
    let order_id = claimed.order_id();
    let line = Line {
        product_id: Uuid::now_v7(),
        sku: "SKU-1".to_owned(),
        name: "A thing".to_owned(),
        unit_price: 1_000,
        quantity: 1,
    };
    let expires = time::OffsetDateTime::now_utc() + time::Duration::minutes(15);
    store
        .insert_pending(
            order_id,
            user,
            &NewOrder {
                lines: vec![line],
                total: 1_000,
                currency: "EUR".into(),
                expires_at: expires,
            },
        )
        .await
        .expect("insert");
    assert!(
        store
            .transition(
                order_id,
                (Status::Pending, Step::Reserving),
                (Status::AwaitingPayment, Step::Idle),
                None,
            )
            .await
            .expect("placed")
    );
    // A failure after the order was placed (a 5xx answering it): the key is given up, and the
    // retry gets that order, not a second one.
    claimed.abandon().await.expect("abandon");
    let recovered = idempotency::begin(&store, user, "k", "h", patience(1), answer_of, None)
        .await
        .expect("begin");
    let Begun::Recovered {
        order_id: recovered_id,
        answer,
    } = recovered
    else {
        panic!("expected the placed order, got {recovered:?}");
    };
    assert_eq!(recovered_id, order_id);
    assert_eq!(answer.body, order_id.to_string());
    // Stored: from now on a replay.
    let replay = idempotency::begin(&store, user, "k", "h", patience(1), answer_of, None)
        .await
        .expect("begin");
    assert!(
        matches!(replay, Begun::Replay(ref r) if *r == answer),
        "{replay:?}"
    );
}

async fn keys_past_retention_are_purged_in_batches_and_younger_ones_kept(db: TestDb) {
    let store = store(&db).await;
    let user = Uuid::now_v7();
    // More than two batches of old keys, and a few young ones.
    for i in 0..2_105 {
        store
            .claim_key(user, &format!("k{i}"), "hash")
            .await
            .expect("claim");
    }
    sqlx::query(
        "UPDATE idempotency_keys SET created_at = 0 WHERE idem_key <> $1 AND idem_key <> $2",
    )
    .bind("k7")
    .bind("k2104")
    .execute(store.db().pool())
    .await
    .expect("age the keys");
    let purged = store
        .purge_keys(time::OffsetDateTime::now_utc() - time::Duration::HOUR)
        .await
        .expect("purge");
    assert_eq!(purged, 2_103);
    for kept in ["k7", "k2104"] {
        assert_eq!(
            store.claim_key(user, kept, "hash").await.expect("again"),
            Claim::InFlight,
            "{kept} was young and must be kept"
        );
    }
    assert!(matches!(
        store.claim_key(user, "k8", "hash").await.expect("fresh"),
        Claim::Claimed(_)
    ));
}

/// Claims a key not used before (with `priced`, its pending order too).
async fn fresh_claim(
    store: &Store,
    user: Uuid,
    key: &str,
    priced: Option<&NewOrder>,
) -> idempotency::Claimed {
    match idempotency::begin(store, user, key, "h", patience(1), answer_of, priced).await {
        Ok(Begun::Claimed(claimed)) => claimed,
        other => panic!("a fresh key is ours, got {other:?}"),
    }
}

/// Places `order_id` (pending → awaiting payment) storing `claimed`'s answer with the move.
async fn place_answering(
    store: &Store,
    order_id: Uuid,
    claimed: &idempotency::Claimed,
) -> Option<(Order, Answered)> {
    #[allow(clippy::result_large_err)] // the service's own error type, as `KeyAnswer` takes
    let render = |order: &Order| answer_of(order.clone());
    store
        .transition_answering(
            order_id,
            (Status::Pending, Step::Reserving),
            (Status::AwaitingPayment, Step::Idle),
            &claimed.answer(&render),
            None,
        )
        .await
        .expect("a move")
}

fn priced() -> NewOrder {
    NewOrder {
        lines: vec![Line {
            product_id: Uuid::now_v7(),
            sku: "SKU-1".to_owned(),
            name: "A thing".to_owned(),
            unit_price: 1_000,
            quantity: 2,
        }],
        total: 2_000,
        currency: "EUR".into(),
        expires_at: time::OffsetDateTime::now_utc() + time::Duration::minutes(15),
    }
}

async fn orders_of(store: &Store, user: Uuid) -> usize {
    let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM orders WHERE user_id = $1")
        .bind(user.hyphenated().to_string())
        .fetch_one(store.db().pool())
        .await
        .expect("count");
    usize::try_from(n).expect("a count")
}

/// The fast path of `POST /orders`: the key's claim and the pending order are one commit, and
/// the order's placement and the key's answer another; a key already there stores no order.
async fn a_priced_order_is_stored_with_its_claim_and_answered_with_its_placement(db: TestDb) {
    let store = store(&db).await;
    let user = Uuid::now_v7();
    let order = priced();
    let claimed = fresh_claim(&store, user, "k", Some(&order)).await;
    assert!(claimed.placed());
    let order_id = claimed.order_id();
    let pending = store.order(order_id).await.expect("read").expect("stored");
    assert_eq!(
        (pending.status, pending.step, pending.total, pending.lines),
        (Status::Pending, Step::Reserving, 2_000, order.lines.clone())
    );
    // The same key again while the first runs: in flight, and no second order.
    assert_eq!(
        store
            .claim_key_placing(user, "k", "h", &priced())
            .await
            .expect("claim"),
        Claim::InFlight
    );
    assert_eq!(orders_of(&store, user).await, 1);

    let placed = place_answering(&store, order_id, &claimed).await;
    let Some((placed, Answered::Kept(answer))) = placed else {
        panic!("expected the order placed and its answer kept, got {placed:?}");
    };
    claimed.answered();
    assert_eq!(placed.status, Status::AwaitingPayment);
    assert_eq!(answer.body, order_id.to_string());
    // Answered with the move: a retry replays it, and still no second order.
    assert_eq!(
        store
            .claim_key_placing(user, "k", "h", &priced())
            .await
            .expect("claim"),
        Claim::Replay(answer)
    );
    assert_eq!(orders_of(&store, user).await, 1);
    // A move that is not the order's to make (already placed) stores nothing.
    let other = fresh_claim(&store, user, "k2", None).await;
    let again = place_answering(&store, order_id, &other).await;
    assert!(again.is_none(), "{again:?}");
    assert!(store.key_pending(user, "k2").await.expect("read"));
}

/// A key taken over while its request ran: the placement stands, the answer is not stored
/// (the key answers with the taker's outcome).
async fn a_key_taken_over_keeps_its_takers_answer_though_the_order_is_placed(db: TestDb) {
    let store = store(&db).await;
    let user = Uuid::now_v7();
    let order = priced();
    let claimed = fresh_claim(&store, user, "k", Some(&order)).await;
    let order_id = claimed.order_id();
    // Given up and retaken under a fresh order id, as a retry does.
    store
        .abandon_key(user, "k", order_id)
        .await
        .expect("abandon");
    let retaken = store
        .retake_key(user, "k", order_id)
        .await
        .expect("retake")
        .expect("taken over");
    let placed = place_answering(&store, order_id, &claimed).await;
    assert!(
        matches!(placed, Some((ref o, Answered::TakenOver)) if o.status == Status::AwaitingPayment),
        "{placed:?}"
    );
    claimed.answered();
    // The key is the taker's, still unanswered.
    assert!(store.key_pending(user, "k").await.expect("read"));
    assert!(
        store
            .finish_key(
                user,
                "k",
                retaken,
                &StoredResponse {
                    status: 201,
                    body: "taker".into()
                }
            )
            .await
            .expect("finish")
    );
}
