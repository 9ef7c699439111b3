//! Black-box tests of payments over gRPC: a real server on port 0, a fresh database per test,
//! on SQLite and PostgreSQL.

use shopmesh_config::Sources;
use shopmesh_db::testing::TestDb;
use shopmesh_db::{DatabaseSettings, Db};
use shopmesh_payments::store::{NewCapture, Store};
use shopmesh_payments::{Application, Config};
use shopmesh_proto::payments::v1::payments_client::PaymentsClient;
use shopmesh_proto::payments::v1::{Card, ChargeRequest, GetPaymentRequest, RefundRequest};
use tokio::sync::oneshot;
use tonic::transport::Channel;
use uuid::Uuid;

shopmesh_db::test_on_both_backends!(
    a_good_card_is_captured_once_however_often_and_concurrently_it_is_charged,
    a_declined_card_is_a_402_and_the_order_stays_payable_with_another_card,
    each_test_decline_has_its_own_code,
    bad_card_details_name_the_field,
    a_second_charge_for_another_amount_is_refused,
    a_refund_happens_once_and_needs_a_capture,
    the_card_number_is_never_stored,
    every_attempt_is_recorded_once_with_its_outcome,
    a_capture_that_loses_the_race_records_its_attempt_and_answers_with_the_winner,
);

struct TestApp {
    grpc: PaymentsClient<Channel>,
    addr: std::net::SocketAddr,
    db: TestDb,
    _stop: oneshot::Sender<()>,
}

async fn start(db: TestDb) -> TestApp {
    let sources = Sources::empty()
        .set("SHOPMESH_SERVER__PORT", "0")
        .set("SHOPMESH_DATABASE__URL", db.url_string());
    let app = Application::build(Config::load(&sources).expect("config"))
        .await
        .expect("build payments");
    let addr = app.local_addr().expect("addr");
    let (stop, rx) = oneshot::channel::<()>();
    tokio::spawn(app.run_until(async {
        let _ = rx.await;
    }));
    let grpc = PaymentsClient::connect(format!("http://{addr}"))
        .await
        .expect("grpc");
    TestApp {
        grpc,
        addr,
        db,
        _stop: stop,
    }
}

fn card(number: &str) -> Card {
    Card {
        number: number.to_owned(),
        exp_month: 12,
        exp_year: 2035,
        cvc: "123".to_owned(),
    }
}

fn charge(order: Uuid, amount: i64, number: &str) -> ChargeRequest {
    ChargeRequest {
        order_id: order.to_string(),
        amount,
        currency: "EUR".to_owned(),
        card: Some(card(number)),
    }
}

fn meta<'a>(status: &'a tonic::Status, key: &str) -> &'a str {
    status
        .metadata()
        .get(key)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
}

const GOOD: &str = "4242 4242 4242 4242";

/// The events of `kind` about `order` in the payments stream, once `expected` are there.
async fn events(app: &TestApp, kind: &str, order: Uuid, expected: usize) -> Vec<serde_json::Value> {
    let order = order.to_string();
    shopmesh_testkit::outbox_events(
        app.addr,
        |e| e["type"] == kind && e["aggregate_id"] == order.as_str(),
        expected,
    )
    .await
}

async fn a_good_card_is_captured_once_however_often_and_concurrently_it_is_charged(db: TestDb) {
    let app = start(db).await;
    let order = Uuid::now_v7();
    let copies = (0..20).map(|_| {
        let mut grpc = app.grpc.clone();
        tokio::spawn(async move {
            grpc.charge(charge(order, 4990, GOOD))
                .await
                .map(|r| r.into_inner())
        })
    });
    let payments: Vec<_> = futures_util::future::join_all(copies)
        .await
        .into_iter()
        .map(|r| r.expect("join").expect("charged"))
        .collect();
    assert!(
        payments
            .iter()
            .all(|p| p.payment_id == payments[0].payment_id),
        "one capture"
    );
    let mut grpc = app.grpc.clone();
    let again = grpc
        .charge(charge(order, 4990, GOOD))
        .await
        .expect("again")
        .into_inner();
    assert_eq!(again.payment_id, payments[0].payment_id);
    assert_eq!(
        (
            again.status.as_str(),
            again.amount,
            again.card_last4.as_str(),
            again.card_brand.as_str()
        ),
        ("captured", 4990, "4242", "visa")
    );
    let stored = grpc
        .get_payment(GetPaymentRequest {
            order_id: order.to_string(),
        })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(stored, again);
    // One capture, one `payment.captured`, whatever the number of charges.
    let captured = events(&app, "payment.captured", order, 1).await;
    assert_eq!(captured.len(), 1);
    assert_eq!(captured[0]["payload"]["amount"], 4990);
    assert_eq!(captured[0]["payload"]["payment_id"], stored.payment_id);
}

async fn a_declined_card_is_a_402_and_the_order_stays_payable_with_another_card(db: TestDb) {
    let app = start(db).await;
    let order = Uuid::now_v7();
    let mut grpc = app.grpc.clone();
    let declined = grpc
        .charge(charge(order, 1000, "4000 0000 0000 0002"))
        .await
        .expect_err("declined");
    assert_eq!(declined.code(), tonic::Code::FailedPrecondition);
    assert_eq!(meta(&declined, "x-problem-status"), "402");
    assert_eq!(meta(&declined, "x-problem-code"), "card_declined");
    let nothing = grpc
        .get_payment(GetPaymentRequest {
            order_id: order.to_string(),
        })
        .await
        .expect_err("no capture");
    assert_eq!(nothing.code(), tonic::Code::NotFound);
    let paid = grpc
        .charge(charge(order, 1000, GOOD))
        .await
        .expect("second card")
        .into_inner();
    assert_eq!(paid.status, "captured");
}

async fn each_test_decline_has_its_own_code(db: TestDb) {
    let app = start(db).await;
    let mut grpc = app.grpc.clone();
    let funds = grpc
        .charge(charge(Uuid::now_v7(), 1000, "4000000000009995"))
        .await
        .expect_err("funds");
    assert_eq!(meta(&funds, "x-problem-code"), "insufficient_funds");
    let mut expired = charge(Uuid::now_v7(), 1000, GOOD);
    if let Some(card) = expired.card.as_mut() {
        card.exp_year = 2020;
    }
    let expired = grpc.charge(expired).await.expect_err("expired");
    assert_eq!(meta(&expired, "x-problem-code"), "expired_card");
    assert_eq!(meta(&expired, "x-problem-status"), "402");
}

async fn bad_card_details_name_the_field(db: TestDb) {
    let app = start(db).await;
    let mut grpc = app.grpc.clone();
    let typo = grpc
        .charge(charge(Uuid::now_v7(), 1000, "4242424242424241"))
        .await
        .expect_err("luhn");
    assert_eq!(typo.code(), tonic::Code::InvalidArgument);
    assert_eq!(meta(&typo, "x-problem-field"), "card.number");
    let mut month = charge(Uuid::now_v7(), 1000, GOOD);
    if let Some(card) = month.card.as_mut() {
        card.exp_month = 13;
    }
    assert_eq!(
        meta(
            &grpc.charge(month).await.expect_err("month"),
            "x-problem-field"
        ),
        "card.exp_month"
    );
    let mut no_card = charge(Uuid::now_v7(), 1000, GOOD);
    no_card.card = None;
    assert_eq!(
        meta(
            &grpc.charge(no_card).await.expect_err("card"),
            "x-problem-field"
        ),
        "card"
    );
    let zero = grpc
        .charge(charge(Uuid::now_v7(), 0, GOOD))
        .await
        .expect_err("amount");
    assert_eq!(meta(&zero, "x-problem-field"), "amount");
}

async fn a_second_charge_for_another_amount_is_refused(db: TestDb) {
    let app = start(db).await;
    let order = Uuid::now_v7();
    let mut grpc = app.grpc.clone();
    grpc.charge(charge(order, 1000, GOOD)).await.expect("first");
    let other = grpc
        .charge(charge(order, 2000, GOOD))
        .await
        .expect_err("other amount");
    assert_eq!(meta(&other, "x-problem-code"), "payment_mismatch");
}

async fn a_refund_happens_once_and_needs_a_capture(db: TestDb) {
    let app = start(db).await;
    let order = Uuid::now_v7();
    let mut grpc = app.grpc.clone();
    let unknown = grpc
        .refund(RefundRequest {
            order_id: order.to_string(),
        })
        .await
        .expect_err("nothing captured");
    assert_eq!(unknown.code(), tonic::Code::NotFound);
    let captured = grpc
        .charge(charge(order, 1000, GOOD))
        .await
        .expect("charge")
        .into_inner();
    for _ in 0..2 {
        let refunded = grpc
            .refund(RefundRequest {
                order_id: order.to_string(),
            })
            .await
            .expect("refund")
            .into_inner();
        assert_eq!(refunded.status, "refunded");
        assert_eq!(refunded.payment_id, captured.payment_id);
    }
    // A charge after the refund does not capture again.
    let after = grpc
        .charge(charge(order, 1000, GOOD))
        .await
        .expect("charge")
        .into_inner();
    assert_eq!(after.status, "refunded");
    assert_eq!(events(&app, "payment.refunded", order, 1).await.len(), 1);
    assert_eq!(events(&app, "payment.captured", order, 1).await.len(), 1);
}

async fn the_card_number_is_never_stored(db: TestDb) {
    let app = start(db).await;
    let mut grpc = app.grpc.clone();
    grpc.charge(charge(Uuid::now_v7(), 1000, "4242424242424242"))
        .await
        .expect("captured");
    let _ = grpc
        .charge(charge(Uuid::now_v7(), 1000, "4000000000000002"))
        .await;
    let url = app.db.url_string();
    let Some(path) = url.strip_prefix("sqlite://") else {
        // On PostgreSQL the schema itself has no column that could hold a number.
        return;
    };
    let path = path.split('?').next().expect("path");
    let mut bytes = std::fs::read(path).expect("db file");
    if let Ok(wal) = std::fs::read(format!("{path}-wal")) {
        bytes.extend(wal);
    }
    let haystack = String::from_utf8_lossy(&bytes);
    for number in ["4242424242424242", "4000000000000002"] {
        assert!(
            !haystack.contains(number),
            "a full card number reached the database"
        );
    }
    assert!(haystack.contains("4242"), "the last four are kept");
}

/// The attempts recorded for `order`, oldest first: (outcome, last four, amount).
async fn attempts(app: &TestApp, order: Uuid) -> Vec<(String, String, i64)> {
    let db = Db::connect(app.db.url(), &DatabaseSettings::default())
        .await
        .expect("connect");
    let rows = sqlx::query_as(
        "SELECT outcome, card_last4, amount FROM payment_attempts WHERE order_id = $1 \
         ORDER BY id",
    )
    .bind(order.to_string())
    .fetch_all(db.pool())
    .await
    .expect("attempts");
    db.close().await;
    rows
}

async fn every_attempt_is_recorded_once_with_its_outcome(db: TestDb) {
    let app = start(db).await;
    let order = Uuid::now_v7();
    let mut grpc = app.grpc.clone();
    grpc.charge(charge(order, 1200, "4000 0000 0000 0002"))
        .await
        .expect_err("declined");
    grpc.charge(charge(order, 1200, GOOD))
        .await
        .expect("captured");
    // A charge of a captured order answers with the capture: no attempt at the card.
    grpc.charge(charge(order, 1200, GOOD))
        .await
        .expect("the capture again");
    let expected = |outcome: &str, last4: &str| (outcome.to_owned(), last4.to_owned(), 1200);
    assert_eq!(
        attempts(&app, order).await,
        vec![
            expected("card_declined", "0002"),
            expected("approved", "4242")
        ]
    );

    // Copies of one charge at once: one capture, and every copy that reached the card
    // network is recorded as approved (at least the one that captured), never as anything else.
    let racing = Uuid::now_v7();
    let copies = (0..8).map(|_| {
        let mut grpc = app.grpc.clone();
        tokio::spawn(async move { grpc.charge(charge(racing, 700, GOOD)).await })
    });
    for copy in futures_util::future::join_all(copies).await {
        copy.expect("join").expect("charged");
    }
    let recorded = attempts(&app, racing).await;
    assert!(!recorded.is_empty() && recorded.len() <= 8, "{recorded:?}");
    assert!(
        recorded
            .iter()
            .all(|a| *a == ("approved".to_owned(), "4242".to_owned(), 700)),
        "{recorded:?}"
    );
}

/// The store's own race (the API looks for a capture first, so two charges reach it only when
/// they run at once): the second capture of an order answers with the first, and its approved
/// attempt is recorded all the same; one capture, one `payment.captured`.
async fn a_capture_that_loses_the_race_records_its_attempt_and_answers_with_the_winner(db: TestDb) {
    let app = start(db).await;
    let order = Uuid::now_v7();
    let db = Db::connect(app.db.url(), &DatabaseSettings::default())
        .await
        .expect("connect");
    let store = Store::new(db.clone());
    let capture = |brand| NewCapture {
        order_id: order,
        amount: 1500,
        currency: "EUR",
        card_last4: "4242",
        card_brand: brand,
    };
    let first = store.capture(&capture("visa")).await.expect("first");
    let second = store.capture(&capture("visa")).await.expect("second");
    assert_eq!(second, first);
    db.close().await;
    let approved = ("approved".to_owned(), "4242".to_owned(), 1500);
    assert_eq!(
        attempts(&app, order).await,
        vec![approved.clone(), approved]
    );
    assert_eq!(events(&app, "payment.captured", order, 1).await.len(), 1);
}
