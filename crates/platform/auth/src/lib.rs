//! Access tokens: their claims, how they are signed, how anyone verifies them.
//!
//! # Layout
//! - [`Claims`], [`Role`], [`AuthSettings`]: the token format (EdDSA JWT with `kid`, `iss`, `aud`,
//!   `exp`, `iat`, `sub`, `role`) and the `[auth]` configuration section.
//! - [`signing`]: an Ed25519 key that issues tokens and publishes itself as a JWK. Only the users
//!   service holds one; it lives here so the format is defined in one place.
//! - [`verify`]: [`Verifier`] checks a token against a key set, either given (the users service
//!   knows its own keys) or fetched from a JWKS URL and refreshed when an unknown `kid` appears
//!   (the gateway and every other service). It rejects `alg=none`, any algorithm but EdDSA, bad
//!   signatures, tokens expired beyond the leeway, wrong `iss`/`aud` and unknown keys.
//! - [`extract`]: [`AuthUser`] and [`AdminUser`], the axum extractors handlers take to require a
//!   signed-in caller or an admin.

pub mod extract;
pub mod signing;
pub mod verify;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

pub use extract::{AdminUser, AuthUser};
pub use signing::{Jwk, JwkSet, TokenSigner};
pub use verify::{AuthError, Verifier};

/// A user's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A shopper.
    Customer,
    /// A shop administrator.
    Admin,
}

impl Role {
    /// The role's name as stored and sent.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Customer => "customer",
            Role::Admin => "admin",
        }
    }

    /// Parses a stored role name.
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "customer" => Some(Role::Customer),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The claims of a shopmesh access token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The user's id.
    pub sub: Uuid,
    /// The user's role when the token was issued.
    pub role: Role,
    /// Issuer.
    pub iss: String,
    /// Audience.
    pub aud: String,
    /// Issued at (seconds since the epoch).
    pub iat: u64,
    /// Expires at (seconds since the epoch).
    pub exp: u64,
    /// Unique token id.
    pub jti: Uuid,
}

/// `[auth]`: how tokens are issued and checked.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct AuthSettings {
    /// `iss` of issued tokens, required of verified ones.
    pub issuer: String,
    /// `aud` of issued tokens, required of verified ones.
    pub audience: String,
    /// Where verifiers fetch the public keys (the users service's JWKS). Unset in the users
    /// service itself, which knows its keys.
    pub jwks_url: Option<String>,
    /// Clock skew tolerated on `exp`, in seconds.
    pub leeway_secs: u64,
}

impl Default for AuthSettings {
    fn default() -> Self {
        AuthSettings {
            issuer: "shopmesh".to_owned(),
            audience: "shopmesh-api".to_owned(),
            jwks_url: None,
            leeway_secs: 60,
        }
    }
}

impl AuthSettings {
    /// The JWKS URL, which every service but users needs; the error names the setting.
    pub fn require_jwks_url(&self) -> Result<String, MissingJwksUrl> {
        self.jwks_url.clone().ok_or(MissingJwksUrl)
    }
}

/// `auth.jwks_url` is not set.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error(
    "invalid configuration: auth.jwks_url (SHOPMESH_AUTH__JWKS_URL) must name the users \
     service's JWKS, e.g. http://users:8080/.well-known/jwks.json"
)]
pub struct MissingJwksUrl;

/// Seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
