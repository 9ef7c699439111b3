//! Issuing tokens with an Ed25519 key, and publishing the key as a JWK.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ed25519_dalek::SigningKey;
use ed25519_dalek::pkcs8::EncodePrivateKey;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::{AuthSettings, Claims, Role, now_secs};

/// One public key in a JWKS (RFC 7517, OKP key type of RFC 8037).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Jwk {
    /// Always `OKP`.
    pub kty: String,
    /// Always `Ed25519`.
    pub crv: String,
    /// The public key, base64url without padding.
    pub x: String,
    /// Key id: the RFC 7638 thumbprint of the key.
    pub kid: String,
    /// Always `EdDSA`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alg: Option<String>,
    /// Always `sig`.
    #[serde(default, rename = "use", skip_serializing_if = "Option::is_none")]
    pub use_: Option<String>,
}

/// A JWKS document.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JwkSet {
    /// The keys.
    pub keys: Vec<Jwk>,
}

/// An Ed25519 key that issues access tokens.
pub struct TokenSigner {
    kid: String,
    public: [u8; 32],
    encoding: EncodingKey,
    issuer: String,
    audience: String,
    ttl: Duration,
}

impl std::fmt::Debug for TokenSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenSigner")
            .field("kid", &self.kid)
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

/// A fresh private key seed from the operating system's random source.
pub fn generate_seed() -> [u8; 32] {
    SigningKey::generate(&mut rand::rngs::OsRng).to_bytes()
}

impl TokenSigner {
    /// A signer for the key with this 32-byte seed.
    pub fn from_seed(
        seed: &[u8; 32],
        settings: &AuthSettings,
        ttl: Duration,
    ) -> Result<Self, jsonwebtoken::errors::Error> {
        let key = SigningKey::from_bytes(seed);
        let der = key
            .to_pkcs8_der()
            .map_err(|_| jsonwebtoken::errors::ErrorKind::InvalidKeyFormat)?;
        let public = key.verifying_key().to_bytes();
        Ok(TokenSigner {
            kid: thumbprint(&public),
            public,
            encoding: EncodingKey::from_ed_der(der.as_bytes()),
            issuer: settings.issuer.clone(),
            audience: settings.audience.clone(),
            ttl,
        })
    }

    /// The key id.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// How long issued tokens live.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// The public half, as a JWK.
    pub fn jwk(&self) -> Jwk {
        Jwk {
            kty: "OKP".to_owned(),
            crv: "Ed25519".to_owned(),
            x: URL_SAFE_NO_PAD.encode(self.public),
            kid: self.kid.clone(),
            alg: Some("EdDSA".to_owned()),
            use_: Some("sig".to_owned()),
        }
    }

    /// Issues a token for this user and role.
    pub fn issue(&self, user: Uuid, role: Role) -> Result<String, jsonwebtoken::errors::Error> {
        let now = now_secs();
        self.issue_claims(&Claims {
            sub: user,
            role,
            iss: self.issuer.clone(),
            aud: self.audience.clone(),
            iat: now,
            exp: now + self.ttl.as_secs(),
            jti: Uuid::now_v7(),
        })
    }

    /// Signs arbitrary claims (tests use this to craft expired or foreign tokens).
    pub fn issue_claims(&self, claims: &Claims) -> Result<String, jsonwebtoken::errors::Error> {
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.encoding)
    }
}

/// The RFC 7638 JWK thumbprint of an Ed25519 public key (RFC 8037 §2 member order).
fn thumbprint(public: &[u8; 32]) -> String {
    let canonical = format!(
        r#"{{"crv":"Ed25519","kty":"OKP","x":"{}"}}"#,
        URL_SAFE_NO_PAD.encode(public)
    );
    URL_SAFE_NO_PAD.encode(Sha256::digest(canonical.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_id_is_the_rfc_8037_thumbprint() {
        // RFC 8037 appendix A.3: the thumbprint of the example public key.
        let x = URL_SAFE_NO_PAD
            .decode("11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo")
            .expect("b64");
        let public: [u8; 32] = x.try_into().expect("32 bytes");
        assert_eq!(
            thumbprint(&public),
            "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"
        );
    }

    #[test]
    fn the_same_seed_gives_the_same_key() {
        let seed = generate_seed();
        let settings = AuthSettings::default();
        let a = TokenSigner::from_seed(&seed, &settings, Duration::from_secs(60)).expect("a");
        let b = TokenSigner::from_seed(&seed, &settings, Duration::from_secs(60)).expect("b");
        assert_eq!(a.jwk(), b.jwk());
        let c = TokenSigner::from_seed(&generate_seed(), &settings, Duration::from_secs(60))
            .expect("c");
        assert_ne!(a.kid(), c.kid());
    }
}
