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
    /// How often expired reservations are released, in milliseconds.
    pub sweep_interval_ms: u64,
}

impl Default for InventorySettings {
    fn default() -> Self {
        InventorySettings {
            seed_demo: false,
            sweep_interval_ms: 1_000,
        }
    }
}

impl InventorySettings {
    /// The sweep interval.
    pub fn sweep_interval(&self) -> Duration {
        Duration::from_millis(self.sweep_interval_ms.max(10))
    }
}
