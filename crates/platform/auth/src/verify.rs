//! Verifying access tokens.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use shopmesh_problem::{Kind, Problem};

use crate::signing::JwkSet;
use crate::{AuthSettings, Claims};

/// A successful fetch of the JWKS is not repeated sooner than this, whatever `kid`s clients send
/// (an attacker must not be able to make us hammer the users service).
const MIN_REFRESH_INTERVAL: Duration = Duration::from_secs(10);
/// After a failed fetch, the next request may try again this soon.
const RETRY_AFTER_FAILURE: Duration = Duration::from_millis(500);
/// Deadline of one JWKS fetch.
const FETCH_TIMEOUT: Duration = Duration::from_secs(2);

/// Why a token was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No `Authorization` header.
    #[error("no access token")]
    Missing,
    /// The header is not `Bearer <token>`.
    #[error("the Authorization header must be `Bearer <token>`")]
    NotBearer,
    /// The token expired (beyond the leeway).
    #[error("the access token has expired")]
    Expired,
    /// The token is signed by a key we do not know.
    #[error("the access token is signed by an unknown key")]
    UnknownKey,
    /// The token is malformed, badly signed, or for another issuer or audience.
    #[error("the access token is invalid: {0}")]
    Invalid(&'static str),
    /// The key set could not be fetched, so no token can be checked right now.
    #[error("signing keys are unavailable")]
    KeysUnavailable,
}

impl From<AuthError> for Problem {
    fn from(error: AuthError) -> Self {
        let (kind, code) = match error {
            AuthError::Missing | AuthError::NotBearer => (Kind::Unauthenticated, "unauthenticated"),
            AuthError::Expired => (Kind::Unauthenticated, "token_expired"),
            AuthError::UnknownKey | AuthError::Invalid(_) => {
                (Kind::Unauthenticated, "invalid_token")
            }
            AuthError::KeysUnavailable => (Kind::Unavailable, "auth_unavailable"),
        };
        let title = match kind {
            Kind::Unauthenticated => "Authentication required",
            _ => "Authentication unavailable",
        };
        let problem = Problem::new(kind, code, title).with_detail(error.to_string());
        if kind == Kind::Unavailable {
            problem.with_retry_after(1)
        } else {
            problem
        }
    }
}

/// Checks access tokens. Cheap to clone.
#[derive(Clone)]
pub struct Verifier {
    inner: Arc<Inner>,
}

struct Inner {
    validation: Validation,
    keys: RwLock<HashMap<String, DecodingKey>>,
    source: Option<JwksSource>,
    /// Tokens already verified, with their claims: a customer sends the same token with every
    /// request for 15 minutes, and an Ed25519 check costs far more than a lookup. Bounded;
    /// emptied when the keys change; an entry is used only until its token expires.
    verified: Mutex<HashMap<Box<str>, Claims>>,
    /// Bumped whenever the keys change: a check that started under older keys is not
    /// remembered.
    generation: std::sync::atomic::AtomicU64,
}

/// Most verified tokens remembered.
const VERIFIED_CAP: usize = 10_000;

struct JwksSource {
    url: String,
    client: reqwest::Client,
    /// When the last fetch happened and whether it worked; the mutex also makes concurrent
    /// refreshes wait for one fetch instead of each doing their own.
    last: tokio::sync::Mutex<Option<(Instant, bool)>>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("jwks_url", &self.inner.source.as_ref().map(|s| &s.url))
            .finish_non_exhaustive()
    }
}

impl Verifier {
    /// A verifier that knows exactly these keys (the users service verifying its own tokens).
    pub fn with_keys(settings: &AuthSettings, keys: &JwkSet) -> Result<Self, AuthError> {
        let verifier = Verifier::new(settings, None);
        verifier.set_keys(keys)?;
        Ok(verifier)
    }

    /// A verifier that fetches keys from a JWKS URL when it meets a `kid` it does not know.
    pub fn from_jwks_url(settings: &AuthSettings, url: impl Into<String>) -> Self {
        let client = reqwest::Client::builder()
            .timeout(FETCH_TIMEOUT)
            .build()
            .unwrap_or_default();
        Verifier::new(
            settings,
            Some(JwksSource {
                url: url.into(),
                client,
                last: tokio::sync::Mutex::new(None),
            }),
        )
    }

    fn new(settings: &AuthSettings, source: Option<JwksSource>) -> Self {
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.set_issuer(&[&settings.issuer]);
        validation.set_audience(&[&settings.audience]);
        validation.set_required_spec_claims(&["exp", "iat", "iss", "aud", "sub"]);
        validation.leeway = settings.leeway_secs;
        validation.validate_exp = true;
        Verifier {
            inner: Arc::new(Inner {
                validation,
                keys: RwLock::new(HashMap::new()),
                source,
                verified: Mutex::new(HashMap::new()),
                generation: std::sync::atomic::AtomicU64::new(0),
            }),
        }
    }

    /// Replaces the known keys.
    pub fn set_keys(&self, set: &JwkSet) -> Result<(), AuthError> {
        let mut keys = HashMap::new();
        for jwk in &set.keys {
            if jwk.kty != "OKP" || jwk.crv != "Ed25519" {
                continue;
            }
            let key = DecodingKey::from_ed_components(&jwk.x)
                .map_err(|_| AuthError::Invalid("a published key is malformed"))?;
            keys.insert(jwk.kid.clone(), key);
        }
        match self.inner.keys.write() {
            Ok(mut guard) => *guard = keys,
            Err(poisoned) => *poisoned.into_inner() = keys,
        }
        // A key that is gone must not keep vouching for its tokens.
        self.with_verified(|verified| {
            self.inner
                .generation
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            verified.clear();
        });
        Ok(())
    }

    fn key(&self, kid: &str) -> Option<DecodingKey> {
        match self.inner.keys.read() {
            Ok(keys) => keys.get(kid).cloned(),
            Err(poisoned) => poisoned.into_inner().get(kid).cloned(),
        }
    }

    /// Fetches the key set now (for example at start-up, so the first request does not wait).
    pub async fn refresh(&self) -> Result<(), AuthError> {
        let Some(source) = &self.inner.source else {
            return Ok(());
        };
        let mut last = source.last.lock().await;
        self.fetch(source, &mut last).await
    }

    async fn fetch(
        &self,
        source: &JwksSource,
        last: &mut Option<(Instant, bool)>,
    ) -> Result<(), AuthError> {
        let result = async {
            let response = source.client.get(&source.url).send().await.ok()?;
            if !response.status().is_success() {
                return None;
            }
            response.json::<JwkSet>().await.ok()
        }
        .await;
        *last = Some((Instant::now(), result.is_some()));
        match result {
            Some(set) => self.set_keys(&set),
            None => Err(AuthError::KeysUnavailable),
        }
    }

    /// The key for `kid`, fetching the key set if it is new to us and a fetch is allowed now.
    async fn key_or_refresh(&self, kid: &str) -> Result<DecodingKey, AuthError> {
        if let Some(key) = self.key(kid) {
            return Ok(key);
        }
        let Some(source) = &self.inner.source else {
            return Err(AuthError::UnknownKey);
        };
        let mut last = source.last.lock().await;
        // Another request may have refreshed while we waited for the lock.
        if let Some(key) = self.key(kid) {
            return Ok(key);
        }
        let may_fetch = match *last {
            None => true,
            Some((at, true)) => at.elapsed() >= MIN_REFRESH_INTERVAL,
            Some((at, false)) => at.elapsed() >= RETRY_AFTER_FAILURE,
        };
        if may_fetch {
            self.fetch(source, &mut last).await.inspect_err(|_| {
                tracing::warn!(url = %source.url, "cannot fetch the JWKS to check a token");
            })?;
        } else if matches!(*last, Some((_, false))) {
            return Err(AuthError::KeysUnavailable);
        }
        self.key(kid).ok_or(AuthError::UnknownKey)
    }

    fn with_verified<T>(&self, f: impl FnOnce(&mut HashMap<Box<str>, Claims>) -> T) -> T {
        match self.inner.verified.lock() {
            Ok(mut guard) => f(&mut guard),
            Err(poisoned) => f(&mut poisoned.into_inner()),
        }
    }

    /// Verifies a token and returns its claims: from memory if this exact token was verified
    /// before and has not expired since (leeway included, as for a fresh check).
    pub async fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        let now = jsonwebtoken::get_current_timestamp();
        let leeway = self.inner.validation.leeway;
        let remembered = self.with_verified(|verified| match verified.get(token) {
            Some(claims) if claims.exp.saturating_add(leeway) > now => Some(Ok(claims.clone())),
            Some(_) => {
                verified.remove(token);
                Some(Err(AuthError::Expired))
            }
            None => None,
        });
        if let Some(result) = remembered {
            return result;
        }
        let generation = self
            .inner
            .generation
            .load(std::sync::atomic::Ordering::SeqCst);
        let claims = self.verify_signed(token).await?;
        self.with_verified(|verified| {
            if self
                .inner
                .generation
                .load(std::sync::atomic::Ordering::SeqCst)
                != generation
            {
                // The keys changed during the check: answer, but do not remember.
                return;
            }
            if verified.len() >= VERIFIED_CAP {
                verified.retain(|_, c| c.exp.saturating_add(leeway) > now);
                if verified.len() >= VERIFIED_CAP {
                    verified.clear();
                }
            }
            verified.insert(token.into(), claims.clone());
        });
        Ok(claims)
    }

    async fn verify_signed(&self, token: &str) -> Result<Claims, AuthError> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| AuthError::Invalid("malformed token or unsupported algorithm"))?;
        if header.alg != Algorithm::EdDSA {
            return Err(AuthError::Invalid("the algorithm must be EdDSA"));
        }
        let kid = header
            .kid
            .ok_or(AuthError::Invalid("the token has no key id"))?;
        let key = self.key_or_refresh(&kid).await?;
        jsonwebtoken::decode::<Claims>(token, &key, &self.inner.validation)
            .map(|data| data.claims)
            .map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => AuthError::Expired,
                ErrorKind::InvalidSignature => AuthError::Invalid("bad signature"),
                ErrorKind::InvalidIssuer => AuthError::Invalid("wrong issuer"),
                ErrorKind::InvalidAudience => AuthError::Invalid("wrong audience"),
                ErrorKind::InvalidAlgorithm => AuthError::Invalid("the algorithm must be EdDSA"),
                ErrorKind::MissingRequiredClaim(_) => {
                    AuthError::Invalid("a required claim is missing")
                }
                _ => AuthError::Invalid("malformed token"),
            })
    }

    /// Verifies the value of an `Authorization` header.
    pub async fn verify_header(&self, header: Option<&str>) -> Result<Claims, AuthError> {
        let value = header.ok_or(AuthError::Missing)?;
        let token = bearer_token(value).ok_or(AuthError::NotBearer)?;
        self.verify(token).await
    }
}

/// The token of a `Bearer <token>` header value (scheme matched case-insensitively).
pub fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signing::{TokenSigner, generate_seed};
    use crate::{Role, now_secs};
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use uuid::Uuid;

    fn signer() -> TokenSigner {
        TokenSigner::from_seed(
            &generate_seed(),
            &AuthSettings::default(),
            Duration::from_secs(900),
        )
        .expect("signer")
    }

    fn verifier_for(signer: &TokenSigner) -> Verifier {
        Verifier::with_keys(
            &AuthSettings::default(),
            &JwkSet {
                keys: vec![signer.jwk()],
            },
        )
        .expect("verifier")
    }

    fn claims(offset_exp: i64) -> Claims {
        let now = now_secs();
        Claims {
            sub: Uuid::now_v7(),
            role: Role::Customer,
            iss: "shopmesh".into(),
            aud: "shopmesh-api".into(),
            iat: now,
            exp: now.saturating_add_signed(offset_exp),
            jti: Uuid::now_v7(),
        }
    }

    #[tokio::test]
    async fn a_token_issued_by_the_signer_verifies_with_its_claims() {
        let signer = signer();
        let user = Uuid::now_v7();
        let token = signer.issue(user, Role::Admin).expect("issue");
        let claims = verifier_for(&signer).verify(&token).await.expect("valid");
        assert_eq!(claims.sub, user);
        assert_eq!(claims.role, Role::Admin);
        assert_eq!(claims.exp - claims.iat, 900);
    }

    #[tokio::test]
    async fn expiry_is_checked_with_sixty_seconds_of_leeway() {
        let signer = signer();
        let verifier = verifier_for(&signer);
        let within = signer.issue_claims(&claims(-30)).expect("issue");
        assert!(verifier.verify(&within).await.is_ok());
        let beyond = signer.issue_claims(&claims(-90)).expect("issue");
        assert_eq!(verifier.verify(&beyond).await, Err(AuthError::Expired));
    }

    #[tokio::test]
    async fn alg_none_is_rejected() {
        let signer = signer();
        let verifier = verifier_for(&signer);
        let header =
            URL_SAFE_NO_PAD.encode(format!(r#"{{"alg":"none","kid":"{}"}}"#, signer.kid()));
        let body = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims(600)).expect("json"));
        let token = format!("{header}.{body}.");
        assert!(matches!(
            verifier.verify(&token).await,
            Err(AuthError::Invalid(_))
        ));
    }

    #[tokio::test]
    async fn another_algorithm_is_rejected_even_with_a_known_kid() {
        let signer = signer();
        let verifier = verifier_for(&signer);
        let mut header = jsonwebtoken::Header::new(Algorithm::HS256);
        header.kid = Some(signer.kid().to_owned());
        // HS256 keyed with the public key: the classic algorithm-confusion attack.
        let public = URL_SAFE_NO_PAD.decode(&signer.jwk().x).expect("b64");
        let token = jsonwebtoken::encode(
            &header,
            &claims(600),
            &jsonwebtoken::EncodingKey::from_secret(&public),
        )
        .expect("encode");
        assert!(matches!(
            verifier.verify(&token).await,
            Err(AuthError::Invalid(_))
        ));
    }

    #[tokio::test]
    async fn a_tampered_token_fails_the_signature_check() {
        let signer = signer();
        let verifier = verifier_for(&signer);
        let token = signer.issue(Uuid::now_v7(), Role::Customer).expect("issue");
        let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
        let mut admin = claims(600);
        admin.role = Role::Admin;
        parts[1] = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&admin).expect("json"));
        let forged = parts.join(".");
        assert_eq!(
            verifier.verify(&forged).await,
            Err(AuthError::Invalid("bad signature"))
        );
    }

    #[tokio::test]
    async fn wrong_issuer_or_audience_is_rejected() {
        let signer = signer();
        let verifier = verifier_for(&signer);
        let mut c = claims(600);
        c.iss = "someone-else".into();
        assert_eq!(
            verifier.verify(&signer.issue_claims(&c).expect("i")).await,
            Err(AuthError::Invalid("wrong issuer"))
        );
        let mut c = claims(600);
        c.aud = "another-api".into();
        assert_eq!(
            verifier.verify(&signer.issue_claims(&c).expect("i")).await,
            Err(AuthError::Invalid("wrong audience"))
        );
    }

    #[tokio::test]
    async fn a_remembered_token_stops_counting_once_it_expires_or_its_key_is_gone() {
        let signer = signer();
        let verifier = verifier_for(&signer);
        // Expires 30 s ago: valid within the 60 s leeway, remembered after the first check.
        let token = signer.issue_claims(&claims(-30)).expect("issue");
        assert!(verifier.verify(&token).await.is_ok());
        assert!(verifier.verify(&token).await.is_ok());
        // Past the leeway the remembered entry no longer vouches for it.
        verifier.with_verified(|v| {
            if let Some(c) = v.get_mut(token.as_str()) {
                c.exp = now_secs() - 61;
            }
        });
        assert_eq!(verifier.verify(&token).await, Err(AuthError::Expired));

        let fresh = signer.issue(Uuid::now_v7(), Role::Customer).expect("issue");
        assert!(verifier.verify(&fresh).await.is_ok());
        // The keys rotate and the old one is withdrawn: its tokens fail, remembered or not.
        verifier
            .set_keys(&JwkSet {
                keys: vec![self::signer().jwk()],
            })
            .expect("keys");
        assert_eq!(verifier.verify(&fresh).await, Err(AuthError::UnknownKey));
    }

    #[tokio::test]
    async fn a_token_from_an_unknown_key_is_rejected() {
        let verifier = verifier_for(&signer());
        let token = signer()
            .issue(Uuid::now_v7(), Role::Customer)
            .expect("issue");
        assert_eq!(verifier.verify(&token).await, Err(AuthError::UnknownKey));
    }

    #[tokio::test]
    async fn an_unreachable_jwks_means_unavailable_not_unauthenticated() {
        let verifier = Verifier::from_jwks_url(&AuthSettings::default(), "http://127.0.0.1:1/jwks");
        let token = signer()
            .issue(Uuid::now_v7(), Role::Customer)
            .expect("issue");
        assert_eq!(
            verifier.verify(&token).await,
            Err(AuthError::KeysUnavailable)
        );
    }

    #[test]
    fn only_bearer_headers_carry_a_token() {
        assert_eq!(bearer_token("Bearer abc"), Some("abc"));
        assert_eq!(bearer_token("bearer  abc "), Some("abc"));
        assert_eq!(bearer_token("Basic abc"), None);
        assert_eq!(bearer_token("Bearer "), None);
        assert_eq!(bearer_token("abc"), None);
    }
}
