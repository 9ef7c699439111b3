//! The inventory's configuration: the common sections plus `[inventory]`.

use std::time::Duration;

use secrecy::SecretString;
use serde::Deserialize;
use shopmesh_auth::AuthSettings;
use shopmesh_config::{ConfigError, DataDir, Sources};
use shopmesh_db::DatabaseSettings;
use shopmesh_runtime::{LogSettings, ServerSettings};

/// Everything the inventory process reads.
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
    /// `[auth]`; `jwks_url` is required (admins change stock).
    pub auth: AuthSettings,
    /// `[mesh]`: how calls to other services find and treat their instances, and the
    /// registration of this one in etcd (`mesh.etcd_url`).
    pub mesh: shopmesh_mesh::MeshSettings,
    /// `[events]`: the event transport (RabbitMQ when `events.rabbitmq_url` is set, else the
    /// embedded one).
    pub events: shopmesh_events::EventsSettings,
    /// `[inventory]`.
    pub inventory: InventorySettings,
}

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

impl Config {
    /// Loads the inventory configuration from these sources.
    pub fn load(sources: &Sources) -> Result<Self, ConfigError> {
        sources.load(Some("inventory"))
    }

    /// The database URL (the configured one, or `<data_dir>/inventory.db`).
    pub fn database_url(&self) -> SecretString {
        self.database.url_or_default(&self.data_dir, "inventory")
    }
}
