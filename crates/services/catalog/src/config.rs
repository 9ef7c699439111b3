//! The catalog's configuration: the common sections plus `[catalog]`.

use serde::Deserialize;

shopmesh_service::service_config!(catalog: CatalogSettings);

/// `[catalog]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CatalogSettings {
    /// Add the demo products (demo/catalog.json) that are missing, at start-up. `shopmesh up`
    /// turns it on unless given `--no-demo`.
    pub seed_demo: bool,
    /// The inventory's gRPC address, for availability on product pages.
    pub inventory_url: String,
    /// Deadline of the availability call, in milliseconds; past it the page goes without.
    pub availability_timeout_ms: u64,
    /// How long a shared cache (the gateway) may reuse a product list or page, in seconds
    /// (`Cache-Control: public, max-age=N, stale-while-revalidate=N`); 0 for no reuse.
    pub cache_max_age_secs: u64,
}

impl Default for CatalogSettings {
    fn default() -> Self {
        CatalogSettings {
            seed_demo: false,
            inventory_url: "http://127.0.0.1:8083".to_owned(),
            availability_timeout_ms: 300,
            cache_max_age_secs: 1,
        }
    }
}
