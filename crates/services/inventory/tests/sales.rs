//! Paid orders' stock, sold from `order.paid` and by the sweeper, and expired holds given back
//! only once orders says their order will never be paid. The inventory database is real
//! (SQLite and PostgreSQL); orders' answers are played through the sweeper's `Outcomes` seam,
//! as the saga's tests play the services it calls.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use shopmesh_contracts::{OrderLine, OrderPaid, OrderSnapshot};
use shopmesh_db::Db;
use shopmesh_db::testing::TestDb;
use shopmesh_events::Envelope;
use shopmesh_events::consumer::Consumer;
use shopmesh_inventory::domain::{Lines, Quantity, StockLevel, Ttl};
use shopmesh_inventory::sales::Sales;
use shopmesh_inventory::store::Store;
use shopmesh_inventory::sweeper::{Asked, Outcome, Outcomes, Swept, sweep};
use uuid::Uuid;

shopmesh_db::test_on_both_backends!(
    an_expired_hold_goes_back_only_once_orders_says_its_order_will_never_be_paid,
    order_paid_sells_the_hold_once_even_past_its_expiry_and_never_a_released_one,
);

async fn store(db: &TestDb) -> Store {
    let pool = Db::open(db.url(), &Default::default(), &shopmesh_inventory::MIGRATOR)
        .await
        .expect("open");
    shopmesh_events::outbox::install(&pool)
        .await
        .expect("outbox");
    shopmesh_events::consumer::install(&pool)
        .await
        .expect("consumer");
    Store::new(pool)
}

/// Holds `units` of `product` for a new order, already past its expiry (`expired_at`, micros
/// since the epoch: distinct values order the sweeper's list).
async fn expired_hold(store: &Store, product: Uuid, units: i64, expired_at: i64) -> Uuid {
    let order = Uuid::now_v7();
    let lines = Lines::parse(&[(product.hyphenated().to_string(), units)]).expect("lines");
    store
        .reserve(order, &lines, Ttl::parse(600).expect("ttl"))
        .await
        .expect("reserve");
    sqlx::query("UPDATE reservations SET expires_at = $1 WHERE order_id = $2")
        .bind(expired_at)
        .bind(order.hyphenated().to_string())
        .execute(store.db().pool())
        .await
        .expect("expire the hold");
    order
}

async fn level(store: &Store, product: Uuid) -> StockLevel {
    let level = store.stock(product).await.expect("stock");
    assert!(level.balances(), "{level:?}");
    level
}

/// Orders, played: an answer per order (none: no answer at all).
#[derive(Default)]
struct Played {
    answers: Mutex<HashMap<Uuid, Outcome>>,
    asked: Mutex<Vec<Uuid>>,
}

impl Played {
    fn say(&self, order: Uuid, outcome: Outcome) {
        self.answers.lock().expect("answers").insert(order, outcome);
    }
}

impl Outcomes for Played {
    fn outcome(&self, order_id: Uuid) -> Asked<'_> {
        self.asked.lock().expect("asked").push(order_id);
        let answer = self
            .answers
            .lock()
            .expect("answers")
            .get(&order_id)
            .copied();
        Box::pin(async move { answer.ok_or_else(|| tonic::Status::unavailable("scripted")) })
    }
}

async fn an_expired_hold_goes_back_only_once_orders_says_its_order_will_never_be_paid(db: TestDb) {
    let store = store(&db).await;
    let product = Uuid::now_v7();
    store
        .add(product, Quantity::parse("quantity", 10).expect("q"))
        .await
        .expect("stock");
    let never = expired_hold(&store, product, 1, 1).await;
    let paid = expired_hold(&store, product, 2, 2).await;
    let open = expired_hold(&store, product, 3, 3).await;
    let silent = expired_hold(&store, product, 4, 4).await;
    let orders = Played::default();
    orders.say(never, Outcome::Unpaid);
    orders.say(paid, Outcome::Paid);
    orders.say(open, Outcome::Open);

    // Oldest first; the first question orders does not answer ends the pass.
    let swept = sweep(&store, &orders).await.expect("sweep");
    assert_eq!(
        swept,
        Swept {
            released: 1,
            sold: 1,
            kept: 2
        }
    );
    assert_eq!(
        *orders.asked.lock().expect("asked"),
        [never, paid, open, silent],
        "each asked once"
    );
    let now = level(&store, product).await;
    assert_eq!(
        (now.available(), now.reserved, now.sold),
        (1, 7, 2),
        "the unpaid order's unit back, the paid order's two sold, the rest still held"
    );

    // Later: the open order's time is up for good, the silent one turns out paid.
    orders.say(open, Outcome::Unpaid);
    orders.say(silent, Outcome::Paid);
    let swept = sweep(&store, &orders).await.expect("sweep");
    assert_eq!(
        swept,
        Swept {
            released: 1,
            sold: 1,
            kept: 0
        }
    );
    let now = level(&store, product).await;
    assert_eq!((now.available(), now.reserved, now.sold), (4, 0, 6));
    // Nothing left to sweep, nothing asked.
    let asked = orders.asked.lock().expect("asked").len();
    assert_eq!(
        sweep(&store, &orders).await.expect("sweep"),
        Swept::default()
    );
    assert_eq!(orders.asked.lock().expect("asked").len(), asked);
}

fn order_paid(order: Uuid, product: Uuid, units: i64) -> Envelope {
    let event = shopmesh_events::Event::of(&OrderPaid(OrderSnapshot {
        order_id: order,
        user_id: Uuid::now_v7(),
        status: "paid".to_owned(),
        total: 1_000 * units,
        currency: "EUR".to_owned(),
        card_last4: Some("4242".to_owned()),
        lines: vec![OrderLine {
            product_id: product,
            sku: "SKU-1".to_owned(),
            name: "A thing".to_owned(),
            unit_price: 1_000,
            quantity: units,
        }],
    }))
    .expect("event");
    Envelope {
        id: Uuid::now_v7(),
        position: 1,
        kind: event.kind.to_owned(),
        version: event.version,
        occurred_at: "2026-12-03T09:00:00Z".to_owned(),
        aggregate_id: event.aggregate_id.clone(),
        trace_id: None,
        payload: event.payload.clone(),
    }
}

async fn order_paid_sells_the_hold_once_even_past_its_expiry_and_never_a_released_one(db: TestDb) {
    let store = store(&db).await;
    let consumer = Consumer::new(
        store.db().clone(),
        Arc::new(Sales),
        5,
        Duration::from_millis(200),
    );
    let product = Uuid::now_v7();
    store
        .add(product, Quantity::parse("quantity", 10).expect("q"))
        .await
        .expect("stock");

    // Read after the hold's expiry (orders paid it before the order's): sold all the same.
    let order = expired_hold(&store, product, 2, 1).await;
    let paid = order_paid(order, product, 2);
    consumer.handle_once("orders", &paid).await.expect("handle");
    let now = level(&store, product).await;
    assert_eq!((now.available(), now.reserved, now.sold), (8, 0, 2));
    // The same event again, and another event for the same order: sold once.
    consumer.handle_once("orders", &paid).await.expect("again");
    consumer
        .handle_once("orders", &order_paid(order, product, 2))
        .await
        .expect("another");
    assert_eq!(level(&store, product).await.sold, 2);

    // Cancelled after paying, before the event was read: the cancellation's release stands.
    let cancelled = expired_hold(&store, product, 3, i64::MAX).await;
    store.release(cancelled).await.expect("release");
    consumer
        .handle_once("orders", &order_paid(cancelled, product, 3))
        .await
        .expect("handle");
    let now = level(&store, product).await;
    assert_eq!((now.available(), now.reserved, now.sold), (8, 0, 2));

    // An order this inventory never held anything for: nothing changes, nothing fails.
    consumer
        .handle_once("orders", &order_paid(Uuid::now_v7(), product, 1))
        .await
        .expect("handle");
    assert_eq!(level(&store, product).await, now);
}
