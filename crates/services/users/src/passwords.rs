//! Password hashing with Argon2id, off the async runtime and bounded in concurrency.
//!
//! Parameters are OWASP's minimum for Argon2id: 19 MiB of memory, 2 passes, 1 lane. Each hash
//! takes tens of milliseconds of CPU and 19 MiB of RAM, so hashing runs on the blocking pool and
//! at most one hash per core runs at a time; extra requests wait their turn instead of
//! exhausting memory.

use std::sync::Arc;

use anyhow::Context;
use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use tokio::sync::{OnceCell, Semaphore};

use crate::domain::Password;
use crate::error::Error;

const MEMORY_KIB: u32 = 19 * 1024;
const PASSES: u32 = 2;
const LANES: u32 = 1;

/// Hashes and checks passwords.
#[derive(Clone)]
pub struct Hasher {
    permits: Arc<Semaphore>,
    /// A hash of a random password, checked when the e-mail is unknown so that a login for an
    /// unknown account takes as long as one with a wrong password.
    dummy: Arc<OnceCell<String>>,
}

impl Default for Hasher {
    fn default() -> Self {
        Self::new()
    }
}

impl Hasher {
    /// A hasher allowing one concurrent hash per core.
    pub fn new() -> Self {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        Hasher {
            permits: Arc::new(Semaphore::new(cores)),
            dummy: Arc::new(OnceCell::new()),
        }
    }

    fn argon2() -> Result<Argon2<'static>, Error> {
        let params = Params::new(MEMORY_KIB, PASSES, LANES, None)
            .map_err(|e| anyhow::anyhow!("argon2 parameters: {e}"))?;
        Ok(Argon2::new(Algorithm::Argon2id, Version::V0x13, params))
    }

    async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> Result<T, Error> + Send + 'static,
    ) -> Result<T, Error> {
        let _permit = self
            .permits
            .acquire()
            .await
            .context("password hasher closed")?;
        tokio::task::spawn_blocking(work)
            .await
            .context("password hashing task failed")?
    }

    /// The PHC string (`$argon2id$v=19$m=19456,t=2,p=1$...`) of a new password.
    pub async fn hash(&self, password: &Password) -> Result<String, Error> {
        let password = password.expose().to_owned();
        self.blocking(move || hash_now(&password)).await
    }

    /// Whether `password` matches `hash`; with no hash (unknown account) it checks a dummy hash
    /// and answers `false`, taking the same time.
    pub async fn verify(&self, password: String, hash: Option<String>) -> Result<bool, Error> {
        let (hash, known) = match hash {
            Some(hash) => (hash, true),
            None => (self.dummy_hash().await?, false),
        };
        let matches = self
            .blocking(move || {
                let parsed = PasswordHash::new(&hash)
                    .map_err(|e| anyhow::anyhow!("stored password hash is malformed: {e}"))?;
                Ok(Hasher::argon2()?
                    .verify_password(password.as_bytes(), &parsed)
                    .is_ok())
            })
            .await?;
        Ok(known && matches)
    }

    async fn dummy_hash(&self) -> Result<String, Error> {
        self.dummy
            .get_or_try_init(|| async {
                let random = uuid::Uuid::new_v4().to_string();
                self.blocking(move || hash_now(&random)).await
            })
            .await
            .cloned()
    }
}

fn hash_now(password: &str) -> Result<String, Error> {
    let salt = SaltString::generate(&mut OsRng);
    Ok(Hasher::argon2()?
        .hash_password(password.as_bytes(), &salt)
        .map_err(|e| anyhow::anyhow!("hashing failed: {e}"))?
        .to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_hash_uses_argon2id_with_owasp_parameters_and_verifies() {
        let hasher = Hasher::new();
        let password = Password::parse("a long passphrase".into(), None).expect("valid");
        let hash = hasher.hash(&password).await.expect("hash");
        assert!(
            hash.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"),
            "{hash}"
        );
        assert!(
            hasher
                .verify("a long passphrase".into(), Some(hash.clone()))
                .await
                .expect("v")
        );
        assert!(
            !hasher
                .verify("a wrong passphrase".into(), Some(hash))
                .await
                .expect("v")
        );
    }

    #[tokio::test]
    async fn an_unknown_account_never_verifies() {
        let hasher = Hasher::new();
        assert!(
            !hasher
                .verify("anything at all".into(), None)
                .await
                .expect("v")
        );
    }

    #[tokio::test]
    async fn the_same_password_hashes_differently_each_time() {
        let hasher = Hasher::new();
        let password = Password::parse("a long passphrase".into(), None).expect("valid");
        let a = hasher.hash(&password).await.expect("a");
        let b = hasher.hash(&password).await.expect("b");
        assert_ne!(a, b, "salts must differ");
    }
}
