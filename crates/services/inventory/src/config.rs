//! The inventory's configuration: the common sections plus `[inventory]`.

use std::time::Duration;

use serde::Deserialize;

shopmesh_service::service_config!(inventory: InventorySettings);

/// `[inventory]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InventorySettings {
    /// Give the demo products their stock at start-up (`shopmesh up` turns it on).
    pub seed_demo: bool,
    /// How often expired reservations are looked for, in milliseconds.
    pub sweep_interval_ms: u64,
    /// Where orders is (an upstream spec): its `order.paid` events sell held stock, and the
    /// sweeper asks it (gRPC `Outcome`) before it gives back an expired hold.
    pub orders_url: String,
    /// Deadline of a question to orders, in milliseconds.
    pub orders_timeout_ms: u64,
}

impl Default for InventorySettings {
    fn default() -> Self {
        InventorySettings {
            seed_demo: false,
            sweep_interval_ms: 1_000,
            orders_url: "http://127.0.0.1:8085".to_owned(),
            orders_timeout_ms: 3_000,
        }
    }
}

impl InventorySettings {
    /// The sweep interval.
    pub fn sweep_interval(&self) -> Duration {
        Duration::from_millis(self.sweep_interval_ms.max(10))
    }

    /// The deadline of a question to orders.
    pub fn orders_timeout(&self) -> Duration {
        Duration::from_millis(self.orders_timeout_ms.max(1))
    }
}
