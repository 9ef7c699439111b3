//! The cart end to end, through the gateway, and orders placed from it; on SQLite and
//! PostgreSQL.

use reqwest::Method;
use serde_json::{Value, json};
use shopmesh_e2e::{Backend, Shop};
use shopmesh_testkit::assert_problem;

shopmesh_e2e::test_on_both_backends!(
    a_cart_is_priced_from_the_catalog_whenever_it_is_read,
    lines_can_be_changed_removed_and_the_cart_cleared,
    bad_cart_input_names_the_field_and_carts_are_private,
    an_order_from_the_cart_takes_its_lines_and_replays_after_the_cart_emptied,
);

async fn cart(shop: &Shop, token: &str) -> Value {
    let r = shop
        .send(Method::GET, "/api/v1/cart", Some(token), None, None)
        .await;
    assert_eq!(r.status(), 200);
    r.json().await.expect("json")
}

async fn add(shop: &Shop, token: &str, product: &str, quantity: i64) -> reqwest::Response {
    let body = json!({"product_id": product, "quantity": quantity});
    shop.send(
        Method::POST,
        "/api/v1/cart/items",
        Some(token),
        Some(&body),
        None,
    )
    .await
}

async fn a_cart_is_priced_from_the_catalog_whenever_it_is_read(backend: Backend) {
    let Some(shop) = Shop::start(backend, &[]).await else {
        return;
    };
    let mug = shop.product("MUG", 1200, 10).await;
    let pot = shop.product("POT", 3000, 10).await;
    let (_, customer) = shop.issuer.customer();
    assert_eq!(cart(&shop, &customer).await["items"], json!([]));
    assert_eq!(add(&shop, &customer, &mug, 2).await.status(), 200);
    let after = add(&shop, &customer, &pot, 1).await;
    let after: Value = after.json().await.expect("json");
    assert_eq!(after["total"], 5400);
    assert_eq!(after["currency"], "EUR");
    assert_eq!(
        add(&shop, &customer, &mug, 1).await.status(),
        200,
        "adding again adds units"
    );
    assert_eq!(cart(&shop, &customer).await["total"], 6600);
    // Concurrent first adds of one product add up, without colliding.
    let cup = shop.product("CUP", 100, 10).await;
    let adds = (0..10).map(|_| add(&shop, &customer, &cup, 1));
    for response in futures_util::future::join_all(adds).await {
        assert_eq!(response.status(), 200);
    }
    let with_cups = cart(&shop, &customer).await;
    assert_eq!(with_cups["total"], 6600 + 10 * 100, "{with_cups}");
    let over = add(&shop, &customer, &cup, 991).await;
    assert_eq!(
        over.status(),
        422,
        "10 + 991 units is over the 1000 a line may hold"
    );
    let removed = shop
        .send(
            Method::DELETE,
            &format!("/api/v1/cart/items/{cup}"),
            Some(&customer),
            None,
            None,
        )
        .await;
    assert_eq!(removed.status(), 200);
    // The admin changes a price: the cart shows the new one at once.
    let repriced = shop
        .send(
            Method::PATCH,
            &format!("/api/v1/products/{mug}"),
            Some(&shop.admin),
            Some(&json!({"price": 1000})),
            None,
        )
        .await;
    assert_eq!(repriced.status(), 200);
    let now = cart(&shop, &customer).await;
    assert_eq!(now["total"], 6000);
    assert_eq!(now["items"][0]["unit_price"], 1000);
    assert_eq!(now["items"][0]["line_total"], 3000);
    // A product taken off sale stays visible but no longer counts.
    let off = shop
        .send(
            Method::PATCH,
            &format!("/api/v1/products/{pot}"),
            Some(&shop.admin),
            Some(&json!({"active": false})),
            None,
        )
        .await;
    assert_eq!(off.status(), 200);
    let now = cart(&shop, &customer).await;
    assert_eq!(now["total"], 3000);
    assert_eq!(now["items"][1]["purchasable"], false);
}

async fn lines_can_be_changed_removed_and_the_cart_cleared(backend: Backend) {
    let Some(shop) = Shop::start(backend, &[]).await else {
        return;
    };
    let mug = shop.product("MUG", 500, 10).await;
    let pot = shop.product("POT", 700, 10).await;
    let (_, customer) = shop.issuer.customer();
    add(&shop, &customer, &mug, 1).await;
    add(&shop, &customer, &pot, 1).await;
    let set = shop
        .send(
            Method::PUT,
            &format!("/api/v1/cart/items/{mug}"),
            Some(&customer),
            Some(&json!({"quantity": 4})),
            None,
        )
        .await;
    assert_eq!(set.json::<Value>().await.expect("json")["total"], 2700);
    let removed = shop
        .send(
            Method::DELETE,
            &format!("/api/v1/cart/items/{pot}"),
            Some(&customer),
            None,
            None,
        )
        .await;
    assert_eq!(removed.json::<Value>().await.expect("json")["total"], 2000);
    let not_there = shop
        .send(
            Method::PUT,
            &format!("/api/v1/cart/items/{pot}"),
            Some(&customer),
            Some(&json!({"quantity": 1})),
            None,
        )
        .await;
    assert_problem(not_there, 404, "not_in_cart", None).await;
    let cleared = shop
        .send(Method::DELETE, "/api/v1/cart", Some(&customer), None, None)
        .await;
    assert_eq!(cleared.status(), 204);
    assert_eq!(cart(&shop, &customer).await["items"], json!([]));
}

async fn bad_cart_input_names_the_field_and_carts_are_private(backend: Backend) {
    let Some(shop) = Shop::start(backend, &[]).await else {
        return;
    };
    let mug = shop.product("MUG", 500, 10).await;
    let (_, alice) = shop.issuer.customer();
    let (_, bob) = shop.issuer.customer();
    assert_problem(
        add(&shop, &alice, &uuid::Uuid::now_v7().to_string(), 1).await,
        422,
        "product_unavailable",
        Some("product_id"),
    )
    .await;
    assert_problem(
        add(&shop, &alice, &mug, 0).await,
        422,
        "invalid_quantity",
        Some("quantity"),
    )
    .await;
    assert_problem(
        add(&shop, &alice, &mug, 1001).await,
        422,
        "invalid_quantity",
        Some("quantity"),
    )
    .await;
    assert_problem(
        add(&shop, &alice, "not-a-uuid", 1).await,
        400,
        "invalid_field",
        Some("product_id"),
    )
    .await;
    let priced = shop
        .send(
            Method::POST,
            "/api/v1/cart/items",
            Some(&alice),
            Some(&json!({"product_id": mug, "quantity": 1, "price": 1})),
            None,
        )
        .await;
    assert_problem(priced, 400, "unknown_field", Some("price")).await;
    let anonymous = shop
        .send(Method::GET, "/api/v1/cart", None, None, None)
        .await;
    assert_problem(anonymous, 401, "unauthenticated", None).await;
    assert_eq!(add(&shop, &alice, &mug, 2).await.status(), 200);
    assert_eq!(
        cart(&shop, &bob).await["items"],
        json!([]),
        "bob sees only his own cart"
    );
    assert_eq!(cart(&shop, &alice).await["items"][0]["quantity"], 2);
}

async fn an_order_from_the_cart_takes_its_lines_and_replays_after_the_cart_emptied(
    backend: Backend,
) {
    let Some(shop) = Shop::start(backend, &[]).await else {
        return;
    };
    let mug = shop.product("MUG", 1200, 10).await;
    let pot = shop.product("POT", 3000, 10).await;
    let (_, customer) = shop.issuer.customer();
    add(&shop, &customer, &mug, 2).await;
    add(&shop, &customer, &pot, 1).await;
    let body = json!({"from_cart": true});
    let placed = shop
        .send(
            Method::POST,
            "/api/v1/orders",
            Some(&customer),
            Some(&body),
            Some("cart-1"),
        )
        .await;
    assert_eq!(placed.status(), 201);
    let placed_text = placed.text().await.expect("body");
    let order: Value = serde_json::from_str(&placed_text).expect("json");
    assert_eq!(order["total"], 5400);
    assert_eq!(order["lines"].as_array().expect("lines").len(), 2);
    assert_eq!(
        cart(&shop, &customer).await["items"],
        json!([]),
        "ordered lines left the cart"
    );
    assert_eq!(shop.stock(&mug).await, (8, 2));
    // The same request again answers the same, although the cart is empty now.
    let replay = shop
        .send(
            Method::POST,
            "/api/v1/orders",
            Some(&customer),
            Some(&body),
            Some("cart-1"),
        )
        .await;
    assert_eq!(replay.status(), 201);
    assert_eq!(replay.text().await.expect("body"), placed_text);
    // A new order from the empty cart is refused.
    let empty = shop
        .send(
            Method::POST,
            "/api/v1/orders",
            Some(&customer),
            Some(&body),
            Some("cart-2"),
        )
        .await;
    assert_problem(empty, 422, "cart_empty", Some("from_cart")).await;
    let both = shop
        .send(
            Method::POST,
            "/api/v1/orders",
            Some(&customer),
            Some(&json!({"from_cart": true, "items": []})),
            Some("cart-3"),
        )
        .await;
    assert_problem(both, 422, "invalid_order_request", Some("items")).await;
}
