//! The cart's configuration: the common sections plus `[cart]`.

use std::time::Duration;

use secrecy::SecretString;
use serde::Deserialize;
use shopmesh_auth::AuthSettings;
use shopmesh_config::{ConfigError, DataDir, Sources};
use shopmesh_db::DatabaseSettings;
use shopmesh_runtime::{LogSettings, ServerSettings};

/// Everything the cart process reads.
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
    /// `[auth]`; `jwks_url` is required.
    pub auth: AuthSettings,
    /// `[mesh]`: how calls to other services find and treat their instances, and the
    /// registration of this one in etcd (`mesh.etcd_url`).
    pub mesh: shopmesh_mesh::MeshSettings,
    /// `[cart]`.
    pub cart: CartSettings,
}

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
    /// Loads the cart configuration from these sources.
    pub fn load(sources: &Sources) -> Result<Self, ConfigError> {
        sources.load(Some("cart"))
    }

    /// The database URL (the configured one, or `<data_dir>/cart.db`).
    pub fn database_url(&self) -> SecretString {
        self.database.url_or_default(&self.data_dir, "cart")
    }

    /// The catalog call deadline.
    pub fn call_timeout(&self) -> Duration {
        Duration::from_millis(self.cart.call_timeout_ms)
    }
}
