//! The orders service's configuration: the common sections plus `[orders]`.

use std::time::Duration;

use serde::Deserialize;

shopmesh_service::service_config!(orders: OrdersSettings);

/// `[orders]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OrdersSettings {
    /// The catalog's gRPC address.
    pub catalog_url: String,
    /// The inventory's gRPC address.
    pub inventory_url: String,
    /// The payments service's gRPC address.
    pub payments_url: String,
    /// The cart's gRPC address (for orders placed `from_cart`).
    pub cart_url: String,
    /// How long an unpaid order holds its stock, in seconds.
    pub order_ttl_secs: u64,
    /// Deadline of each call to another service, in milliseconds.
    pub call_timeout_ms: u64,
    /// How often expired orders and interrupted steps are looked for, in milliseconds.
    pub worker_interval_ms: u64,
    /// A step untouched this long is taken to be abandoned and is resumed, in seconds.
    pub stale_after_secs: u64,
    /// How long the catalog's answer for a product prices new orders without asking again,
    /// in milliseconds (0: every order asks; at most a minute): an admin's change to a product
    /// reaches new orders up to that much later (`prices`).
    pub price_cache_ms: u64,
    /// Test only: freeze at a point of the saga (`pause_after_charge`), once.
    pub failpoint: Option<String>,
}

impl Default for OrdersSettings {
    fn default() -> Self {
        OrdersSettings {
            catalog_url: "http://127.0.0.1:8082".to_owned(),
            inventory_url: "http://127.0.0.1:8083".to_owned(),
            payments_url: "http://127.0.0.1:8084".to_owned(),
            cart_url: "http://127.0.0.1:8086".to_owned(),
            order_ttl_secs: 15 * 60,
            call_timeout_ms: 3_000,
            worker_interval_ms: 1_000,
            stale_after_secs: 30,
            price_cache_ms: 1_000,
            failpoint: None,
        }
    }
}

impl OrdersSettings {
    /// Deadline of a call.
    pub fn call_timeout(&self) -> Duration {
        Duration::from_millis(self.call_timeout_ms)
    }

    /// How long a product's price is reused (at most a minute).
    pub fn price_cache(&self) -> Duration {
        Duration::from_millis(self.price_cache_ms.min(60_000))
    }

    /// Order time-to-live.
    pub fn order_ttl(&self) -> Duration {
        Duration::from_secs(self.order_ttl_secs.clamp(1, 24 * 60 * 60))
    }
}
