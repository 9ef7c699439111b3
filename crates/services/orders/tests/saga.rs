//! Each recovery step of the saga, against each outcome of the call it makes: done, refused,
//! unknown (no answer). The other services are played by a script through the saga's
//! `Downstream` seam; the orders database is real (SQLite and PostgreSQL).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use shopmesh_db::Db;
use shopmesh_db::testing::TestDb;
use shopmesh_orders::clients::{Call, Downstream};
use shopmesh_orders::domain::{Line, Status, Step};
use shopmesh_orders::error::Error;
use shopmesh_orders::saga::Saga;
use shopmesh_orders::store::{NewOrder, Store};
use shopmesh_proto::cart::v1::{GetCartRequest, GetCartResponse, RemoveLinesRequest};
use shopmesh_proto::catalog::v1::{GetProductsRequest, GetProductsResponse};
use shopmesh_proto::inventory::v1::{CommitRequest, ReleaseRequest, ReserveRequest};
use shopmesh_proto::payments::v1::{
    Card, ChargeRequest, GetPaymentRequest, Payment, RefundRequest,
};
use time::OffsetDateTime;
use tonic::Code;
use uuid::Uuid;

shopmesh_db::test_on_both_backends!(
    an_interrupted_reservation_is_rolled_back_once_inventory_answers,
    an_interrupted_charge_goes_on_if_captured_back_if_not_and_waits_if_unknown,
    an_interrupted_commit_pays_refunds_when_the_hold_ran_out_and_waits_if_unknown,
    an_interrupted_cancel_or_expiry_finishes_once_inventory_and_payments_answer,
    a_declined_card_leaves_the_order_payable_and_an_unanswered_charge_leaves_it_charging,
    a_step_abandoned_by_its_request_is_left_to_its_own_process_once_nothing_runs_it,
    an_order_of_several_lines_shows_them_in_order_when_placed_read_and_paid,
);

/// How the played service answers a call.
#[derive(Clone, Copy, Debug)]
enum Outcome {
    Done,
    /// A status the saga reads as "the call had no effect" (`NotFound`, `FailedPrecondition`)
    /// or as "unknown" (`Unavailable`, `DeadlineExceeded`).
    Fails(Code),
}

/// The other services, scripted per call name (`release`, `charge`, ...); every call is
/// logged. Calls with no script succeed.
#[derive(Default)]
struct Script {
    outcomes: Mutex<HashMap<&'static str, Outcome>>,
    calls: Mutex<Vec<&'static str>>,
    /// When set, `charge` waits for a permit (a card network taking its time).
    charge_gate: Mutex<Option<Arc<tokio::sync::Semaphore>>>,
}

impl Script {
    fn set(&self, call: &'static str, outcome: Outcome) {
        self.outcomes.lock().expect("script").insert(call, outcome);
    }

    fn calls(&self) -> Vec<&'static str> {
        self.calls.lock().expect("calls").clone()
    }

    fn answer<T: Send + 'static>(&self, call: &'static str, value: T) -> Call<'_, T> {
        self.calls.lock().expect("calls").push(call);
        let outcome = self
            .outcomes
            .lock()
            .expect("script")
            .get(call)
            .copied()
            .unwrap_or(Outcome::Done);
        let gate = if call == "charge" {
            self.charge_gate.lock().expect("gate").clone()
        } else {
            None
        };
        Box::pin(async move {
            if let Some(gate) = gate {
                gate.acquire().await.expect("gate").forget();
            }
            match outcome {
                Outcome::Done => Ok(value),
                Outcome::Fails(code) => Err(tonic::Status::new(code, format!("{call}: scripted"))),
            }
        })
    }
}

fn payment() -> Payment {
    Payment {
        payment_id: "pay_1".to_owned(),
        card_last4: "4242".to_owned(),
        status: "captured".to_owned(),
        ..Default::default()
    }
}

impl Downstream for Script {
    fn products(&self, _: GetProductsRequest) -> Call<'_, GetProductsResponse> {
        self.answer("products", GetProductsResponse::default())
    }
    fn reserve(&self, _: ReserveRequest) -> Call<'_, ()> {
        self.answer("reserve", ())
    }
    fn commit(&self, _: CommitRequest) -> Call<'_, ()> {
        self.answer("commit", ())
    }
    fn release(&self, _: ReleaseRequest) -> Call<'_, ()> {
        self.answer("release", ())
    }
    fn charge(&self, _: ChargeRequest) -> Call<'_, Payment> {
        self.answer("charge", payment())
    }
    fn payment(&self, _: GetPaymentRequest) -> Call<'_, Payment> {
        self.answer("payment", payment())
    }
    fn refund(&self, _: RefundRequest) -> Call<'_, ()> {
        self.answer("refund", ())
    }
    fn cart(&self, _: GetCartRequest) -> Call<'_, GetCartResponse> {
        self.answer("cart", GetCartResponse::default())
    }
    fn remove_from_cart(&self, _: RemoveLinesRequest) -> Call<'_, ()> {
        self.answer("remove_from_cart", ())
    }
}

struct Harness {
    store: Store,
    script: Arc<Script>,
    saga: Saga,
}

impl Harness {
    async fn new(db: &TestDb) -> Self {
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
        let script = Arc::new(Script::default());
        let saga = Saga::new(
            store.clone(),
            script.clone(),
            Duration::from_secs(600),
            None,
        );
        Harness {
            store,
            script,
            saga,
        }
    }

    /// A fresh order of one line, left in `(status, step)` as a dead request would leave it.
    async fn order_in(&self, status: Status, step: Step) -> Uuid {
        let order = Uuid::now_v7();
        let line = Line {
            product_id: Uuid::now_v7(),
            sku: "SKU-1".to_owned(),
            name: "A thing".to_owned(),
            unit_price: 1_000,
            quantity: 1,
        };
        self.store
            .insert_pending(
                order,
                Uuid::now_v7(),
                &NewOrder {
                    lines: vec![line],
                    total: 1_000,
                    currency: "EUR".to_owned(),
                    expires_at: OffsetDateTime::now_utc() + Duration::from_secs(600),
                },
            )
            .await
            .expect("insert");
        let path: &[(Status, Step)] = match (status, step) {
            (Status::Pending, Step::Reserving) => &[],
            (Status::AwaitingPayment, step) => &[
                (Status::AwaitingPayment, Step::Idle),
                (Status::AwaitingPayment, step),
            ],
            (Status::Paid, step) => &[
                (Status::AwaitingPayment, Step::Idle),
                (Status::AwaitingPayment, Step::Charging),
                (Status::AwaitingPayment, Step::Committing),
                (Status::Paid, Step::Idle),
                (Status::Paid, step),
            ],
            other => panic!("no path to {other:?}"),
        };
        let mut at = (Status::Pending, Step::Reserving);
        for &to in path {
            if to == at {
                continue;
            }
            let payment = (to.1 == Step::Committing).then_some(("pay_1", "4242"));
            assert!(
                self.store
                    .transition(order, at, to, payment)
                    .await
                    .expect("move"),
                "{at:?} -> {to:?}"
            );
            at = to;
        }
        order
    }

    async fn state(&self, order: Uuid) -> (Status, Step) {
        let order = self.store.order(order).await.expect("read").expect("order");
        (order.status, order.step)
    }
}

const UNKNOWN: Outcome = Outcome::Fails(Code::Unavailable);

async fn an_interrupted_reservation_is_rolled_back_once_inventory_answers(db: TestDb) {
    let h = Harness::new(&db).await;
    let order = h.order_in(Status::Pending, Step::Reserving).await;

    // No answer from inventory: maybe reserved, maybe not; the step stays for the next pass.
    h.script.set("release", UNKNOWN);
    assert!(matches!(
        h.saga.resume(order).await,
        Err(Error::Unavailable(_))
    ));
    assert_eq!(h.state(order).await, (Status::Pending, Step::Reserving));

    // Refused (it should never be): still not rolled back, and said loudly.
    h.script
        .set("release", Outcome::Fails(Code::FailedPrecondition));
    assert!(matches!(
        h.saga.resume(order).await,
        Err(Error::Internal(_))
    ));
    assert_eq!(h.state(order).await, (Status::Pending, Step::Reserving));

    // Released (a tombstone if nothing was held): rejected, and a second pass does nothing.
    h.script.set("release", Outcome::Done);
    h.saga.resume(order).await.expect("resume");
    assert_eq!(h.state(order).await, (Status::Rejected, Step::Idle));
    let calls = h.script.calls().len();
    h.saga.resume(order).await.expect("resume again");
    assert_eq!(h.script.calls().len(), calls, "nothing left to do");
}

async fn an_interrupted_charge_goes_on_if_captured_back_if_not_and_waits_if_unknown(db: TestDb) {
    let h = Harness::new(&db).await;

    // Captured before the process died: the payment is recorded and the stock committed.
    let captured = h.order_in(Status::AwaitingPayment, Step::Charging).await;
    h.saga.resume(captured).await.expect("resume");
    assert_eq!(h.state(captured).await, (Status::Paid, Step::Idle));
    let paid = h.store.order(captured).await.expect("read").expect("order");
    assert_eq!(paid.payment_id.as_deref(), Some("pay_1"));
    assert_eq!(h.script.calls(), ["payment", "commit"]);

    // Never captured: payable again, nothing committed or refunded.
    let never = h.order_in(Status::AwaitingPayment, Step::Charging).await;
    h.script.set("payment", Outcome::Fails(Code::NotFound));
    h.saga.resume(never).await.expect("resume");
    assert_eq!(h.state(never).await, (Status::AwaitingPayment, Step::Idle));
    assert_eq!(h.script.calls(), ["payment", "commit", "payment"]);

    // Payments does not answer: the step stays; nothing is decided without knowing.
    let unknown = h.order_in(Status::AwaitingPayment, Step::Charging).await;
    h.script.set("payment", UNKNOWN);
    assert!(matches!(
        h.saga.resume(unknown).await,
        Err(Error::Unavailable(_))
    ));
    assert_eq!(
        h.state(unknown).await,
        (Status::AwaitingPayment, Step::Charging)
    );
}

async fn an_interrupted_commit_pays_refunds_when_the_hold_ran_out_and_waits_if_unknown(db: TestDb) {
    let h = Harness::new(&db).await;

    let done = h.order_in(Status::AwaitingPayment, Step::Committing).await;
    h.saga.resume(done).await.expect("resume");
    assert_eq!(h.state(done).await, (Status::Paid, Step::Idle));

    // The hold ran out before the commit: the customer gets the money back, the order expires.
    let late = h.order_in(Status::AwaitingPayment, Step::Committing).await;
    h.script
        .set("commit", Outcome::Fails(Code::FailedPrecondition));
    h.saga.resume(late).await.expect("resume");
    assert_eq!(h.state(late).await, (Status::Expired, Step::Idle));
    assert_eq!(h.script.calls(), ["commit", "commit", "refund"]);

    // Inventory does not answer: the step stays, nothing refunded.
    let unknown = h.order_in(Status::AwaitingPayment, Step::Committing).await;
    h.script.set("commit", UNKNOWN);
    assert!(matches!(
        h.saga.resume(unknown).await,
        Err(Error::Unavailable(_))
    ));
    assert_eq!(
        h.state(unknown).await,
        (Status::AwaitingPayment, Step::Committing)
    );
    assert_eq!(h.script.calls(), ["commit", "commit", "refund", "commit"]);
}

async fn an_interrupted_cancel_or_expiry_finishes_once_inventory_and_payments_answer(db: TestDb) {
    let h = Harness::new(&db).await;
    let paid = h.order_in(Status::Paid, Step::Cancelling).await;
    let unpaid = h.order_in(Status::AwaitingPayment, Step::Cancelling).await;
    let expiring = h.order_in(Status::AwaitingPayment, Step::Expiring).await;

    // Inventory does not answer: every one stays where it is.
    h.script.set("release", UNKNOWN);
    for order in [paid, unpaid, expiring] {
        let before = h.state(order).await;
        assert!(matches!(
            h.saga.resume(order).await,
            Err(Error::Unavailable(_))
        ));
        assert_eq!(h.state(order).await, before);
    }
    // Stock released, payments does not answer: the refund is still owed, so the step stays.
    h.script.set("release", Outcome::Done);
    h.script.set("refund", UNKNOWN);
    assert!(matches!(
        h.saga.resume(paid).await,
        Err(Error::Unavailable(_))
    ));
    assert_eq!(h.state(paid).await, (Status::Paid, Step::Cancelling));
    // Refunded: cancelled. Nothing captured for the unpaid ones (`NotFound`): cancelled and
    // expired all the same.
    h.script.set("refund", Outcome::Done);
    h.saga.resume(paid).await.expect("resume");
    assert_eq!(h.state(paid).await, (Status::Cancelled, Step::Idle));
    h.script.set("refund", Outcome::Fails(Code::NotFound));
    h.saga.resume(unpaid).await.expect("resume");
    assert_eq!(h.state(unpaid).await, (Status::Cancelled, Step::Idle));
    h.saga.resume(expiring).await.expect("resume");
    assert_eq!(h.state(expiring).await, (Status::Expired, Step::Idle));
}

async fn a_declined_card_leaves_the_order_payable_and_an_unanswered_charge_leaves_it_charging(
    db: TestDb,
) {
    let h = Harness::new(&db).await;
    let order = h.order_in(Status::AwaitingPayment, Step::Idle).await;
    let load = || async { h.store.order(order).await.expect("read").expect("order") };

    h.script
        .set("charge", Outcome::Fails(Code::FailedPrecondition));
    assert!(matches!(
        h.saga.pay(load().await, Card::default()).await,
        Err(Error::Upstream(_))
    ));
    assert_eq!(h.state(order).await, (Status::AwaitingPayment, Step::Idle));

    // No answer: maybe captured. The step stays for the resumer (which asks payments).
    h.script.set("charge", UNKNOWN);
    assert!(matches!(
        h.saga.pay(load().await, Card::default()).await,
        Err(Error::Unavailable(_))
    ));
    assert_eq!(
        h.state(order).await,
        (Status::AwaitingPayment, Step::Charging)
    );
    assert!(!h.script.calls().contains(&"commit"));

    // The resumer finds the capture: paid.
    h.saga.resume(order).await.expect("resume");
    assert_eq!(h.state(order).await, (Status::Paid, Step::Idle));
}

async fn a_step_abandoned_by_its_request_is_left_to_its_own_process_once_nothing_runs_it(
    db: TestDb,
) {
    let h = Harness::new(&db).await;
    let order = h.order_in(Status::AwaitingPayment, Step::Idle).await;
    let later = OffsetDateTime::now_utc() + Duration::from_secs(60);

    // A payment in progress (the card network slow): its step is this process's, and running.
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    *h.script.charge_gate.lock().expect("gate") = Some(gate.clone());
    let paying = {
        let (saga, order) = (
            h.saga.clone(),
            h.store.order(order).await.expect("read").expect("order"),
        );
        tokio::spawn(async move { saga.pay(order, Card::default()).await })
    };
    while h.state(order).await.1 != Step::Charging {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        h.store.own_steps_idle_since(later).await.expect("own"),
        [order]
    );
    assert!(h.saga.is_running(order), "a request runs it");
    // Another process never lists it as its own.
    let replica = Store::new(h.store.db().clone());
    assert!(
        replica
            .own_steps_idle_since(later)
            .await
            .expect("own")
            .is_empty()
    );

    // The request is abandoned (its deadline passed): nothing runs the step any more, so the
    // worker may finish it.
    paying.abort();
    let _ = paying.await;
    assert!(
        !h.saga.is_running(order),
        "an abandoned request runs nothing"
    );
    assert_eq!(
        h.state(order).await,
        (Status::AwaitingPayment, Step::Charging)
    );

    // A retry waiting for that step to settle does not count as running it: the worker must
    // still finish what it waits for.
    let waiting = {
        let (saga, order) = (
            h.saga.clone(),
            h.store.order(order).await.expect("read").expect("order"),
        );
        tokio::spawn(async move { saga.pay(order, Card::default()).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!h.saga.is_running(order), "a wait runs nothing");

    // The worker's way in: nothing runs it here, and it claims the step in the database only
    // while it is still in flight and untouched.
    let running = h.saga.try_run(order).expect("nothing runs it");
    assert!(h.saga.try_run(order).is_none(), "one run at a time");
    assert!(
        h.store
            .claim_abandoned_step(order, later)
            .await
            .expect("claim")
    );
    h.saga.resume(order).await.expect("resume");
    drop(running);
    assert_eq!(h.state(order).await, (Status::Paid, Step::Idle));
    assert!(
        h.store
            .own_steps_idle_since(later)
            .await
            .expect("own")
            .is_empty()
    );
    assert!(
        !h.store
            .claim_abandoned_step(order, later)
            .await
            .expect("claim"),
        "a step no longer in flight is not claimed"
    );
    // And the waiting retry answers with the outcome.
    let paid = waiting.await.expect("join").expect("paid");
    assert_eq!(paid.status, Status::Paid);
}

/// The lines of an order as placed, read and paid (the moves are given the lines they know,
/// a read joins them to the order): all of them, in the order they were asked for, in the
/// answers and in the `order.paid` event.
async fn an_order_of_several_lines_shows_them_in_order_when_placed_read_and_paid(db: TestDb) {
    let h = Harness::new(&db).await;
    // Neither the ids, the SKUs, the names nor the prices are in the order asked: only the
    // lines' positions are.
    let ids = [Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7()];
    let lines: Vec<Line> = [
        (ids[1], "SKU-M", "Zebra mug", 200, 1),
        (ids[2], "SKU-A", "Apple crate", 300, 3),
        (ids[0], "SKU-Z", "Mango tray", 100, 2),
    ]
    .into_iter()
    .map(|(product_id, sku, name, unit_price, quantity)| Line {
        product_id,
        sku: sku.to_owned(),
        name: name.to_owned(),
        unit_price,
        quantity,
    })
    .collect();
    let priced = NewOrder {
        lines: lines.clone(),
        total: 200 + 900 + 200,
        currency: "EUR".to_owned(),
        expires_at: OffsetDateTime::now_utc() + Duration::from_secs(600),
    };
    let order_id = Uuid::now_v7();
    h.store
        .insert_pending(order_id, Uuid::now_v7(), &priced)
        .await
        .expect("insert");
    let (placed, _) = h
        .saga
        .place_priced(order_id, &priced, None)
        .await
        .expect("placed");
    assert_eq!(placed.lines, lines);
    assert_eq!(placed.status, Status::AwaitingPayment);
    let read = h.store.order(order_id).await.expect("read").expect("order");
    assert_eq!(read, placed);
    assert!(h.store.order(Uuid::now_v7()).await.expect("read").is_none());

    let paid = h.saga.pay(read, Card::default()).await.expect("paid");
    assert_eq!(
        (paid.status, paid.lines.clone()),
        (Status::Paid, lines.clone())
    );
    assert_eq!(
        h.store.order(order_id).await.expect("read").expect("order"),
        paid
    );
    let (payload,): (String,) = sqlx::query_as(
        "SELECT payload FROM outbox WHERE type = 'order.paid' AND aggregate_id = $1",
    )
    .bind(order_id.to_string())
    .fetch_one(h.store.db().pool())
    .await
    .expect("order.paid");
    let payload: serde_json::Value = serde_json::from_str(&payload).expect("json");
    let names: Vec<&str> = payload["lines"]
        .as_array()
        .expect("lines")
        .iter()
        .map(|l| l["name"].as_str().expect("name"))
        .collect();
    assert_eq!(names, ["Zebra mug", "Apple crate", "Mango tray"]);
}
