//! The users service's configuration: the common sections plus `[users]`.

use std::time::Duration;

use secrecy::SecretString;
use serde::Deserialize;

shopmesh_service::service_config!(users: UsersSettings);

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
