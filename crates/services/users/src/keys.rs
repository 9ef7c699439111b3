//! The signing key: created once, kept in the users database, the same after every restart.
//!
//! Several replicas starting at once may each create a key; all keys are published in the JWKS
//! and every replica signs with the oldest, so they agree without coordination.

use std::time::Duration;

use anyhow::Context;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use shopmesh_auth::signing::generate_seed;
use shopmesh_auth::{AuthSettings, JwkSet, TokenSigner};

use crate::error::Error;
use crate::store::Store;

/// The signer and the published key set.
pub struct Keys {
    /// Signs new tokens.
    pub signer: TokenSigner,
    /// Every stored key's public half.
    pub jwks: JwkSet,
}

/// Loads the stored keys, creating the first one if there is none.
pub async fn load_or_create(
    store: &Store,
    settings: &AuthSettings,
    ttl: Duration,
) -> Result<Keys, Error> {
    let mut stored = store.signing_keys().await?;
    if stored.is_empty() {
        let seed = generate_seed();
        let signer =
            TokenSigner::from_seed(&seed, settings, ttl).context("building a signing key")?;
        store
            .insert_signing_key(signer.kid(), &STANDARD.encode(seed))
            .await?;
        tracing::info!(kid = signer.kid(), "created the token signing key");
        stored = store.signing_keys().await?;
    }
    let mut signers = Vec::with_capacity(stored.len());
    for (kid, encoded) in &stored {
        let seed: [u8; 32] = STANDARD
            .decode(encoded)
            .ok()
            .and_then(|bytes| bytes.try_into().ok())
            .with_context(|| format!("stored signing key {kid} is malformed"))?;
        signers.push(TokenSigner::from_seed(&seed, settings, ttl).context("signing key")?);
    }
    let jwks = JwkSet {
        keys: signers.iter().map(TokenSigner::jwk).collect(),
    };
    let signer = signers
        .into_iter()
        .next()
        .context("no signing key after creating one")?;
    Ok(Keys { signer, jwks })
}
