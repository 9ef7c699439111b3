//! The catalog's configuration: the common sections plus `[catalog]`.

use secrecy::SecretString;
use serde::Deserialize;
use shopmesh_auth::AuthSettings;
use shopmesh_config::{ConfigError, DataDir, Sources};
use shopmesh_db::DatabaseSettings;
use shopmesh_runtime::{LogSettings, ServerSettings};

/// Everything the catalog process reads.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where SQLite files live when no database URL is set.
    pub data_dir: DataDir,
    /// `[server]`.
    pub server: ServerSettings,
    /// `[log]`.
    pub log: LogSettings,
    /// `[database]`.
    pub database: DatabaseSettings,
    /// `[auth]`; `jwks_url` is required (admins edit the catalog).
    pub auth: AuthSettings,
    /// `[mesh]`: how calls to other services find and treat their instances, and the
    /// registration of this one in etcd (`mesh.etcd_url`).
    pub mesh: shopmesh_mesh::MeshSettings,
    /// `[events]`: the event transport (RabbitMQ when `events.rabbitmq_url` is set, else the
    /// embedded one).
    pub events: shopmesh_events::EventsSettings,
    /// `[catalog]`.
    pub catalog: CatalogSettings,
}

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

impl Config {
    /// Loads the catalog configuration from these sources.
    pub fn load(sources: &Sources) -> Result<Self, ConfigError> {
        sources.load(Some("catalog"))
    }

    /// The database URL (the configured one, or `<data_dir>/catalog.db`).
    pub fn database_url(&self) -> SecretString {
        self.database.url_or_default(&self.data_dir, "catalog")
    }
}
