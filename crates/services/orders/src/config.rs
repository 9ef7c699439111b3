//! The orders service's configuration: the common sections plus `[orders]`.

use std::time::Duration;

use secrecy::SecretString;
use serde::Deserialize;
use shopmesh_auth::AuthSettings;
use shopmesh_config::{ConfigError, DataDir, Sources};
use shopmesh_db::DatabaseSettings;
use shopmesh_runtime::{LogSettings, ServerSettings};

/// Everything the orders process reads.
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
    /// `[events]`: the event transport (RabbitMQ when `events.rabbitmq_url` is set, else the
    /// embedded one).
    pub events: shopmesh_events::EventsSettings,
    /// `[orders]`.
    pub orders: OrdersSettings,
}

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
            failpoint: None,
        }
    }
}

impl OrdersSettings {
    /// Deadline of a call.
    pub fn call_timeout(&self) -> Duration {
        Duration::from_millis(self.call_timeout_ms)
    }

    /// Order time-to-live.
    pub fn order_ttl(&self) -> Duration {
        Duration::from_secs(self.order_ttl_secs.clamp(1, 24 * 60 * 60))
    }
}

impl Config {
    /// Loads the orders configuration from these sources.
    pub fn load(sources: &Sources) -> Result<Self, ConfigError> {
        sources.load(Some("orders"))
    }

    /// The database URL (the configured one, or `<data_dir>/orders.db`).
    pub fn database_url(&self) -> SecretString {
        self.database.url_or_default(&self.data_dir, "orders")
    }
}
