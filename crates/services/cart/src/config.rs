//! The cart's configuration: the common sections plus `[cart]`.

use std::time::Duration;

use serde::Deserialize;

shopmesh_service::service_config!(cart: CartSettings);

/// `[cart]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CartSettings {
    /// The catalog's gRPC address.
    pub catalog_url: String,
    /// Deadline of a call to the catalog, in milliseconds.
    pub call_timeout_ms: u64,
}

impl Default for CartSettings {
    fn default() -> Self {
        CartSettings {
            catalog_url: "http://127.0.0.1:8082".to_owned(),
            call_timeout_ms: 2_000,
        }
    }
}

impl Config {
    /// The catalog call deadline.
    pub fn call_timeout(&self) -> Duration {
        Duration::from_millis(self.cart.call_timeout_ms)
    }
}
