//! Product lists show availability, kept current by the inventory's `stock.changed` events
//! (no call to the inventory per listed product); on SQLite and PostgreSQL.

use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{Value, json};
use shopmesh_e2e::{Backend, Shop};

shopmesh_e2e::test_on_both_backends!(lists_show_availability_that_follows_orders_and_restocking);

/// The `available` of `sku` in the product list.
async fn listed(shop: &Shop, sku: &str) -> Option<i64> {
    let list: Value = shop
        .send(Method::GET, "/api/v1/products?limit=100", None, None, None)
        .await
        .json()
        .await
        .expect("json");
    list["items"]
        .as_array()
        .expect("items")
        .iter()
        .find(|p| p["sku"] == sku)
        .and_then(|p| p["available"].as_i64())
}

/// Waits until the list shows `expected` for `sku`.
async fn until_listed(shop: &Shop, sku: &str, expected: i64) {
    let started = Instant::now();
    loop {
        let now = listed(shop, sku).await;
        if now == Some(expected) {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{sku}: listed {now:?}, expected {expected}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn lists_show_availability_that_follows_orders_and_restocking(backend: Backend) {
    let Some(shop) = Shop::start(backend, &[]).await else {
        return;
    };
    let lamp = shop.product("LAMP", 4500, 10).await;
    let _vase = shop.product("VASE", 2500, 0).await;
    until_listed(&shop, "LAMP", 10).await;
    // Never stocked: no event, nothing claimed.
    assert_eq!(listed(&shop, "VASE").await, None);

    let (_, token) = shop.issuer.customer();
    let placed = shop.order(&token, &lamp, 3).await;
    assert_eq!(placed.status(), 201);
    until_listed(&shop, "LAMP", 7).await;

    let restocked = shop
        .send(
            Method::POST,
            &format!("/api/v1/inventory/{lamp}"),
            Some(&shop.admin),
            Some(&json!({"quantity": 5})),
            None,
        )
        .await;
    assert_eq!(restocked.status(), 200);
    until_listed(&shop, "LAMP", 12).await;
}
