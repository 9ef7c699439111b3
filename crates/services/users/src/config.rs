//! The users service's configuration: the common sections plus `[users]`.

use std::time::Duration;

use secrecy::SecretString;
use serde::Deserialize;
use shopmesh_auth::AuthSettings;
use shopmesh_config::{ConfigError, DataDir, Sources};
use shopmesh_db::DatabaseSettings;
use shopmesh_runtime::{LogSettings, ServerSettings};

/// Everything the users process reads.
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
    /// `[auth]`.
    pub auth: AuthSettings,
    /// `[mesh]`: how calls to other services find and treat their instances, and the
    /// registration of this one in etcd (`mesh.etcd_url`).
    pub mesh: shopmesh_mesh::MeshSettings,
    /// `[events]`: the event transport (RabbitMQ when `events.rabbitmq_url` is set, else the
    /// embedded one).
    pub events: shopmesh_events::EventsSettings,
    /// `[users]`.
    pub users: UsersSettings,
}

impl Config {
    /// Loads the users configuration from these sources.
    pub fn load(sources: &Sources) -> Result<Self, ConfigError> {
        sources.load(Some("users"))
    }

    /// The database URL (the configured one, or `<data_dir>/users.db`).
    pub fn database_url(&self) -> SecretString {
        self.database.url_or_default(&self.data_dir, "users")
    }
}

/// `[users]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UsersSettings {
    /// Lifetime of access tokens, in seconds.
    pub access_token_ttl_secs: u64,
    /// If set with the password, this account is made an admin at start-up (for containers,
    /// where nobody runs `shopmesh admin create-admin`).
    pub bootstrap_admin_email: Option<String>,
    /// The bootstrap admin's password.
    pub bootstrap_admin_password: Option<SecretString>,
}

impl Default for UsersSettings {
    fn default() -> Self {
        UsersSettings {
            access_token_ttl_secs: 15 * 60,
            bootstrap_admin_email: None,
            bootstrap_admin_password: None,
        }
    }
}

impl UsersSettings {
    /// Lifetime of access tokens.
    pub fn token_ttl(&self) -> Duration {
        Duration::from_secs(self.access_token_ttl_secs)
    }
}
