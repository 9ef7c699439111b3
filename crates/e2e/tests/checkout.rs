//! Checkout end to end, through the gateway: catalog, inventory, payments and orders as real
//! servers, on SQLite and on PostgreSQL.

use reqwest::Method;
use serde_json::{Value, json};
use shopmesh_e2e::{Backend, Shop};
use shopmesh_proto::payments::v1::payments_client::PaymentsClient;
use shopmesh_proto::payments::v1::{GetPaymentRequest, Payment};
use shopmesh_testkit::assert_problem;

shopmesh_e2e::test_on_both_backends!(
    a_customer_orders_and_pays_and_the_books_balance,
    two_hundred_concurrent_checkouts_against_fifty_units_sell_exactly_fifty,
    the_same_order_request_replays_and_concurrent_copies_make_one_order,
    a_declined_card_is_a_402_and_the_order_stays_payable,
    an_unpaid_order_expires_and_its_stock_comes_back,
    cancelling_releases_stock_and_refunds_a_payment,
    customers_cannot_touch_each_others_orders,
    bad_order_input_names_the_field_and_writes_nothing,
    payments_of_one_order_at_once_all_answer_paid_and_charge_once,
    an_admin_s_new_price_reaches_new_orders_within_the_price_cache_time,
);

async fn shop(backend: Backend) -> Option<Shop> {
    Shop::start(backend, &[]).await
}

const GOOD_CARD: &str = "4242424242424242";

/// Places an order of `quantity` × `product` for `customer`; its id.
async fn placed(shop: &Shop, customer: &str, product: &str, quantity: i64) -> String {
    let order: Value = shop
        .order(customer, product, quantity)
        .await
        .json()
        .await
        .expect("json");
    order["id"].as_str().expect("id").to_owned()
}

/// The payment of `order`, as the payments service keeps it.
async fn payment(shop: &Shop, order: &str) -> Payment {
    PaymentsClient::connect(format!("http://{}", shop.payments))
        .await
        .expect("grpc")
        .get_payment(GetPaymentRequest {
            order_id: order.to_owned(),
        })
        .await
        .expect("payment")
        .into_inner()
}

async fn a_customer_orders_and_pays_and_the_books_balance(backend: Backend) {
    let Some(shop) = shop(backend).await else {
        return;
    };
    let product = shop.product("MUG", 1250, 5).await;
    let (_, customer) = shop.issuer.customer();
    let placed = shop.order(&customer, &product, 2).await;
    assert_eq!(placed.status(), 201);
    assert!(placed.headers().contains_key("location"));
    let order: Value = placed.json().await.expect("json");
    assert_eq!(order["status"], "awaiting_payment");
    assert_eq!(order["total"], 2500, "priced by the catalog");
    assert_eq!(order["currency"], "EUR");
    assert_eq!(order["lines"][0]["unit_price"], 1250);
    assert_eq!(order["lines"][0]["line_total"], 2500);
    assert!(order["expires_at"].is_string());
    assert_eq!(shop.stock(&product).await, (3, 2), "reserved while unpaid");
    let page: Value = shop
        .send(
            Method::GET,
            &format!("/api/v1/products/{product}"),
            None,
            None,
            None,
        )
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(page["available"], 3, "the product page shows availability");

    let id = order["id"].as_str().expect("id");
    let paid = shop.pay(&customer, id, GOOD_CARD).await;
    assert_eq!(paid.status(), 200);
    let paid: Value = paid.json().await.expect("json");
    assert_eq!(paid["status"], "paid");
    assert_eq!(paid["card_last4"], "4242");
    assert_eq!(
        shop.stock(&product).await,
        (3, 0),
        "sold: no longer reserved, not available"
    );
    // Paying again changes nothing and charges nothing more.
    assert_eq!(shop.pay(&customer, id, GOOD_CARD).await.status(), 200);
    let capture = payment(&shop, id).await;
    assert_eq!(
        (capture.amount, capture.status.as_str()),
        (2500, "captured")
    );

    let mine: Value = shop
        .send(Method::GET, "/api/v1/orders", Some(&customer), None, None)
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(mine["items"].as_array().expect("items").len(), 1);
    assert_eq!(mine["items"][0]["id"], id);
}

async fn two_hundred_concurrent_checkouts_against_fifty_units_sell_exactly_fifty(backend: Backend) {
    let Some(shop) = shop(backend).await else {
        return;
    };
    let product = shop.product("HOT-ITEM", 999, 50).await;
    let shop = std::sync::Arc::new(shop);
    let attempts = (0..200).map(|_| {
        let shop = shop.clone();
        let product = product.clone();
        tokio::spawn(async move {
            let (_, customer) = shop.issuer.customer();
            let response = shop.order(&customer, &product, 1).await;
            let status = response.status().as_u16();
            let body: Value = response.json().await.unwrap_or(Value::Null);
            (status, body)
        })
    });
    let results: Vec<(u16, Value)> = futures_util::future::join_all(attempts)
        .await
        .into_iter()
        .map(|r| r.expect("join"))
        .collect();
    let placed = results.iter().filter(|(s, _)| *s == 201).count();
    let refused: Vec<&Value> = results
        .iter()
        .filter(|(s, _)| *s == 409)
        .map(|(_, b)| b)
        .collect();
    assert_eq!(
        placed,
        50,
        "exactly the stock is sold: {:?}",
        results.iter().map(|r| r.0).collect::<Vec<_>>()
    );
    assert_eq!(refused.len(), 150);
    for body in refused {
        assert_eq!(body["code"], "insufficient_stock", "{body}");
        assert_eq!(body["field"], "items[0].quantity", "{body}");
    }
    assert_eq!(shop.stock(&product).await, (0, 50), "the numbers reconcile");
    // The admin sees exactly 50 placed orders.
    let mut seen = 0;
    let mut cursor = String::new();
    loop {
        let path = format!("/api/v1/orders?limit=100{cursor}");
        let page: Value = shop
            .send(Method::GET, &path, Some(&shop.admin), None, None)
            .await
            .json()
            .await
            .expect("json");
        seen += page["items"].as_array().expect("items").len();
        match page["next_cursor"].as_str() {
            Some(next) => cursor = format!("&cursor={next}"),
            None => break,
        }
    }
    assert_eq!(seen, 50);
}

async fn the_same_order_request_replays_and_concurrent_copies_make_one_order(backend: Backend) {
    let Some(shop) = shop(backend).await else {
        return;
    };
    let product = shop.product("IDEM", 500, 100).await;
    let (_, customer) = shop.issuer.customer();
    let body = json!({"items": [{"product_id": product, "quantity": 1}]});

    let mut answers = Vec::new();
    for _ in 0..10 {
        let r = shop
            .send(
                Method::POST,
                "/api/v1/orders",
                Some(&customer),
                Some(&body),
                Some("key-ten"),
            )
            .await;
        answers.push((r.status().as_u16(), r.text().await.expect("body")));
    }
    assert!(
        answers.iter().all(|a| *a == answers[0]),
        "10 identical answers"
    );
    assert_eq!(answers[0].0, 201);

    let shop = std::sync::Arc::new(shop);
    let copies = (0..50).map(|_| {
        let shop = shop.clone();
        let customer = customer.clone();
        let body = body.clone();
        tokio::spawn(async move {
            let response = shop
                .send(
                    Method::POST,
                    "/api/v1/orders",
                    Some(&customer),
                    Some(&body),
                    Some("key-fifty"),
                )
                .await;
            let status = response.status().as_u16();
            let body: Value = response.json().await.unwrap_or(Value::Null);
            (status, body["id"].clone())
        })
    });
    let answers: Vec<(u16, Value)> = futures_util::future::join_all(copies)
        .await
        .into_iter()
        .map(|r| r.expect("join"))
        .collect();
    // The copies that arrive while the first is in flight wait for it and replay its answer:
    // every customer's retry succeeds, with the one order.
    assert!(
        answers.iter().all(|a| a.0 == 201 && a.1 == answers[0].1),
        "{answers:?}"
    );
    let mine: Value = shop
        .send(Method::GET, "/api/v1/orders", Some(&customer), None, None)
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(
        mine["items"].as_array().expect("items").len(),
        2,
        "one order per key"
    );
    assert_eq!(shop.stock(&product).await, (98, 2));

    let other_body = json!({"items": [{"product_id": product, "quantity": 2}]});
    let reused = shop
        .send(
            Method::POST,
            "/api/v1/orders",
            Some(&customer),
            Some(&other_body),
            Some("key-ten"),
        )
        .await;
    assert_problem(
        reused,
        422,
        "idempotency_key_reused",
        Some("Idempotency-Key"),
    )
    .await;
    let keyless = shop
        .send(
            Method::POST,
            "/api/v1/orders",
            Some(&customer),
            Some(&body),
            None,
        )
        .await;
    assert_problem(
        keyless,
        400,
        "missing_idempotency_key",
        Some("Idempotency-Key"),
    )
    .await;
}

async fn a_declined_card_is_a_402_and_the_order_stays_payable(backend: Backend) {
    let Some(shop) = shop(backend).await else {
        return;
    };
    let product = shop.product("DECLINE", 700, 3).await;
    let (_, customer) = shop.issuer.customer();
    let id = &placed(&shop, &customer, &product, 1).await;
    let declined = shop.pay(&customer, id, "4000000000000002").await;
    assert_problem(declined, 402, "card_declined", Some("card")).await;
    let funds = shop.pay(&customer, id, "4000000000009995").await;
    assert_problem(funds, 402, "insufficient_funds", Some("card")).await;
    let typo = shop.pay(&customer, id, "4242424242424241").await;
    assert_problem(typo, 422, "invalid_card_number", Some("card.number")).await;
    let still: Value = shop
        .send(
            Method::GET,
            &format!("/api/v1/orders/{id}"),
            Some(&customer),
            None,
            None,
        )
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(still["status"], "awaiting_payment");
    assert_eq!(
        shop.stock(&product).await,
        (2, 1),
        "still held for the customer"
    );
    assert_eq!(shop.pay(&customer, id, GOOD_CARD).await.status(), 200);
}

async fn an_unpaid_order_expires_and_its_stock_comes_back(backend: Backend) {
    let Some(shop) = Shop::start(backend, &[("SHOPMESH_ORDERS__ORDER_TTL_SECS", "1")]).await else {
        return;
    };
    let product = shop.product("SHORT", 100, 4).await;
    let (_, customer) = shop.issuer.customer();
    let id = &placed(&shop, &customer, &product, 4).await;
    assert_eq!(shop.stock(&product).await, (0, 4));
    // Expiry is wall-clock time in the database: this waits for real, about a second.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let now: Value = shop
            .send(
                Method::GET,
                &format!("/api/v1/orders/{id}"),
                Some(&customer),
                None,
                None,
            )
            .await
            .json()
            .await
            .expect("json");
        if now["status"] == "expired" {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "never expired: {now}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(shop.stock(&product).await, (4, 0), "the stock came back");
    let late = shop.pay(&customer, id, GOOD_CARD).await;
    assert_problem(late, 409, "order_not_actionable", None).await;
}

async fn cancelling_releases_stock_and_refunds_a_payment(backend: Backend) {
    let Some(shop) = shop(backend).await else {
        return;
    };
    let product = shop.product("CANCEL", 300, 10).await;
    let (_, customer) = shop.issuer.customer();
    let unpaid_id = &placed(&shop, &customer, &product, 3).await;
    let cancelled = shop
        .send(
            Method::POST,
            &format!("/api/v1/orders/{unpaid_id}/cancel"),
            Some(&customer),
            None,
            None,
        )
        .await;
    assert_eq!(cancelled.status(), 200);
    assert_eq!(
        cancelled.json::<Value>().await.expect("json")["status"],
        "cancelled"
    );
    assert_eq!(shop.stock(&product).await, (10, 0));

    let paid_id = &placed(&shop, &customer, &product, 2).await;
    assert_eq!(shop.pay(&customer, paid_id, GOOD_CARD).await.status(), 200);
    assert_eq!(shop.stock(&product).await, (8, 0));
    // An admin may cancel anyone's order.
    let by_admin = shop
        .send(
            Method::POST,
            &format!("/api/v1/orders/{paid_id}/cancel"),
            Some(&shop.admin),
            None,
            None,
        )
        .await;
    assert_eq!(by_admin.status(), 200);
    assert_eq!(shop.stock(&product).await, (10, 0), "restocked");
    let refund = payment(&shop, paid_id).await;
    assert_eq!(refund.status, "refunded");
    let again = shop
        .send(
            Method::POST,
            &format!("/api/v1/orders/{paid_id}/cancel"),
            Some(&customer),
            None,
            None,
        )
        .await;
    assert_eq!(again.status(), 200, "cancelling twice is harmless");
    let pay_cancelled = shop.pay(&customer, paid_id, GOOD_CARD).await;
    assert_problem(pay_cancelled, 409, "order_not_actionable", None).await;
}

async fn customers_cannot_touch_each_others_orders(backend: Backend) {
    let Some(shop) = shop(backend).await else {
        return;
    };
    let product = shop.product("MINE", 100, 5).await;
    let (_, alice) = shop.issuer.customer();
    let (_, bob) = shop.issuer.customer();
    let id = &placed(&shop, &alice, &product, 1).await;
    let read = shop
        .send(
            Method::GET,
            &format!("/api/v1/orders/{id}"),
            Some(&bob),
            None,
            None,
        )
        .await;
    assert_problem(read, 404, "order_not_found", None).await;
    assert_problem(
        shop.pay(&bob, id, GOOD_CARD).await,
        404,
        "order_not_found",
        None,
    )
    .await;
    let cancel = shop
        .send(
            Method::POST,
            &format!("/api/v1/orders/{id}/cancel"),
            Some(&bob),
            None,
            None,
        )
        .await;
    assert_problem(cancel, 404, "order_not_found", None).await;
    let bobs: Value = shop
        .send(Method::GET, "/api/v1/orders", Some(&bob), None, None)
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(bobs["items"], json!([]));
    let anonymous = shop
        .send(Method::GET, "/api/v1/orders", None, None, None)
        .await;
    assert_problem(anonymous, 401, "unauthenticated", None).await;
    let anonymous_order = shop.order("", &product, 1).await;
    assert_eq!(anonymous_order.status(), 401);
    assert_eq!(
        shop.stock(&product).await,
        (4, 1),
        "only alice's order holds stock"
    );
}

async fn bad_order_input_names_the_field_and_writes_nothing(backend: Backend) {
    let Some(shop) = shop(backend).await else {
        return;
    };
    let product = shop.product("VALID", 100, 5).await;
    let (_, customer) = shop.issuer.customer();
    let post = |body: Value| {
        let shop = &shop;
        let customer = customer.clone();
        async move {
            let key = uuid::Uuid::new_v4().to_string();
            shop.send(
                Method::POST,
                "/api/v1/orders",
                Some(&customer),
                Some(&body),
                Some(&key),
            )
            .await
        }
    };
    let unknown =
        post(json!({"items": [{"product_id": uuid::Uuid::now_v7(), "quantity": 1}]})).await;
    assert_problem(
        unknown,
        422,
        "product_unavailable",
        Some("items[0].product_id"),
    )
    .await;
    let zero = post(json!({"items": [{"product_id": product, "quantity": 0}]})).await;
    assert_problem(zero, 422, "invalid_quantity", Some("items[0].quantity")).await;
    let huge = post(json!({"items": [{"product_id": product, "quantity": 1_000_000_000}]})).await;
    assert_problem(huge, 422, "invalid_quantity", Some("items[0].quantity")).await;
    let negative = post(json!({"items": [{"product_id": product, "quantity": -1}]})).await;
    assert_problem(negative, 422, "invalid_quantity", Some("items[0].quantity")).await;
    let priced = post(json!({"items": [{"product_id": product, "quantity": 1, "price": 1}]})).await;
    assert_problem(priced, 400, "unknown_field", Some("items[0].price")).await;
    let total = post(json!({"items": [{"product_id": product, "quantity": 1}], "total": 1})).await;
    assert_problem(total, 400, "unknown_field", Some("total")).await;
    let malformed = post(json!({"items": [{"product_id": "not-a-uuid", "quantity": 1}]})).await;
    assert_problem(
        malformed,
        422,
        "invalid_product_id",
        Some("items[0].product_id"),
    )
    .await;
    let missing = post(json!({"items": [{"quantity": 1}]})).await;
    assert_problem(missing, 400, "missing_field", Some("items[0].product_id")).await;
    let empty = post(json!({"items": []})).await;
    assert_problem(empty, 422, "invalid_items", Some("items")).await;
    let mine: Value = shop
        .send(Method::GET, "/api/v1/orders", Some(&customer), None, None)
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(mine["items"], json!([]), "nothing was written");
    assert_eq!(shop.stock(&product).await, (5, 0));
}

/// A double click, or the gateway retrying a payment whose connection broke: the attempts that
/// find another in flight wait for its outcome instead of answering "busy", and the card is
/// charged once.
async fn payments_of_one_order_at_once_all_answer_paid_and_charge_once(backend: Backend) {
    let Some(shop) = shop(backend).await else {
        return;
    };
    let product = shop.product("MUG", 1250, 5).await;
    let (_, customer) = shop.issuer.customer();
    let id = &placed(&shop, &customer, &product, 1).await;
    let (a, b, c, d) = tokio::join!(
        shop.pay(&customer, id, GOOD_CARD),
        shop.pay(&customer, id, GOOD_CARD),
        shop.pay(&customer, id, GOOD_CARD),
        shop.pay(&customer, id, GOOD_CARD),
    );
    for answer in [a, b, c, d] {
        assert_eq!(answer.status(), 200);
        let body: Value = answer.json().await.expect("json");
        assert_eq!(body["status"], "paid", "{body}");
    }
    let capture = payment(&shop, id).await;
    assert_eq!(capture.amount, 1250, "one capture of the order's total");
    assert_eq!(shop.stock(&product).await, (4, 0), "one unit sold");
}

async fn an_admin_s_new_price_reaches_new_orders_within_the_price_cache_time(backend: Backend) {
    // Five seconds: the change and the next order take a fraction of that.
    let cache = std::time::Duration::from_secs(5);
    let Some(shop) = Shop::start(backend, &[("SHOPMESH_ORDERS__PRICE_CACHE_MS", "5000")]).await
    else {
        return;
    };
    let product = shop.product("MUG", 500, 10).await;
    let (_, customer) = shop.issuer.customer();
    let total = |order: Value| order["total"].as_i64().expect("total");
    // The catalog is asked during the first order: its answer is fresh from then on for the
    // cache's time, and stale at the latest that long after the order's answer.
    let before_first = std::time::Instant::now();
    let first: Value = shop
        .order(&customer, &product, 1)
        .await
        .json()
        .await
        .expect("json");
    let after_first = std::time::Instant::now();
    assert_eq!(total(first), 500);
    let repriced = shop
        .send(
            Method::PATCH,
            &format!("/api/v1/products/{product}"),
            Some(&shop.admin),
            Some(&json!({"price": 800})),
            None,
        )
        .await;
    assert_eq!(repriced.status(), 200);
    // Within the cache's time the catalog is not asked again: the order holds, shows and
    // charges the price it was given.
    let second: Value = shop
        .order(&customer, &product, 1)
        .await
        .json()
        .await
        .expect("json");
    assert!(
        before_first.elapsed() < cache,
        "the machine took over {cache:?} for two orders and a change: too slow for this test"
    );
    let second_id = second["id"].as_str().expect("id").to_owned();
    assert_eq!(
        total(second),
        500,
        "priced from the catalog's answer of a moment ago"
    );
    let paid: Value = shop
        .pay(&customer, &second_id, GOOD_CARD)
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(paid["status"], "paid");
    assert_eq!(
        payment(&shop, &second_id).await.amount,
        500,
        "charged as shown"
    );
    // After it, the new price.
    tokio::time::sleep(cache.saturating_sub(after_first.elapsed())).await;
    let third: Value = shop
        .order(&customer, &product, 1)
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(total(third), 800);
}
