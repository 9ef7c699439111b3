//! Password hashing with Argon2id, off the async runtime and bounded in concurrency and memory.
//!
//! Parameters are one of OWASP's equivalent minimums for Argon2id: 7 MiB of memory, 5 passes,
//! 1 lane (the same cost as 19 MiB × 2 passes, in a third of the memory). At most one hash per
//! core runs at a time (extra requests wait their turn), each in a memory block taken from a
//! small pool and given back: the process holds `cores × 7 MiB` for hashing, however many
//! logins it serves. (Before, every hash allocated 19 MiB afresh on whichever blocking thread
//! ran it, and the allocator kept those blocks per thread: the users service grew to 190 MiB
//! after 48 logins, issue 9.) Hashes made with other parameters (older ones) still verify:
//! the PHC string carries its own.

use std::sync::{Arc, Mutex};

use anyhow::Context;
use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{Output, PasswordHash, SaltString};
use argon2::{Algorithm, Argon2, Block, Params, Version};
use tokio::sync::{OnceCell, Semaphore};

use crate::domain::Password;
use crate::error::Error;

const MEMORY_KIB: u32 = 7 * 1024;
const PASSES: u32 = 5;
const LANES: u32 = 1;
/// Bytes of a new hash.
const OUTPUT_LEN: usize = 32;

/// Hashes and checks passwords.
#[derive(Clone)]
pub struct Hasher {
    permits: Arc<Semaphore>,
    /// Memory blocks of finished hashes, reused by the next (at most one per permit).
    memory: Arc<Mutex<Vec<Vec<Block>>>>,
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
            memory: Arc::new(Mutex::new(Vec::with_capacity(cores))),
            dummy: Arc::new(OnceCell::new()),
        }
    }

    /// Runs `work` on the blocking pool under a permit, with a memory block for `params`.
    async fn blocking<T: Send + 'static>(
        &self,
        params: Params,
        work: impl FnOnce(&Argon2<'static>, &mut [Block]) -> Result<T, Error> + Send + 'static,
    ) -> Result<T, Error> {
        let _permit = self
            .permits
            .acquire()
            .await
            .context("password hasher closed")?;
        let pool = self.memory.clone();
        tokio::task::spawn_blocking(move || {
            let argon2 = Argon2::new(Algorithm::Argon2id, Version::V0x13, params);
            let mut block = pool
                .lock()
                .ok()
                .and_then(|mut free| free.pop())
                .unwrap_or_default();
            block.resize(argon2.params().block_count(), Block::default());
            let result = work(&argon2, &mut block);
            // Only blocks of today's size are kept: an old hash's larger block is dropped.
            if block.len() == default_params()?.block_count()
                && let Ok(mut free) = pool.lock()
            {
                free.push(block);
            }
            result
        })
        .await
        .context("password hashing task failed")?
    }

    /// The PHC string (`$argon2id$v=19$m=7168,t=5,p=1$...`) of a new password.
    pub async fn hash(&self, password: &Password) -> Result<String, Error> {
        let password = password.expose().to_owned();
        self.blocking(default_params()?, move |argon2, memory| {
            hash_now(argon2, memory, &password)
        })
        .await
    }

    /// Whether `password` matches `hash`; with no hash (unknown account) it checks a dummy hash
    /// and answers `false`, taking the same time.
    pub async fn verify(&self, password: String, hash: Option<String>) -> Result<bool, Error> {
        let (hash, known) = match hash {
            Some(hash) => (hash, true),
            None => (self.dummy_hash().await?, false),
        };
        let parsed = PasswordHash::new(&hash)
            .map_err(|e| anyhow::anyhow!("stored password hash is malformed: {e}"))?;
        let params = Params::try_from(&parsed)
            .map_err(|e| anyhow::anyhow!("stored password hash has bad parameters: {e}"))?;
        if parsed.algorithm.as_str() != "argon2id" {
            return Err(anyhow::anyhow!("stored password hash is not argon2id").into());
        }
        let (Some(salt), Some(expected)) = (parsed.salt, parsed.hash) else {
            return Err(anyhow::anyhow!("stored password hash has no salt or output").into());
        };
        let mut salt_bytes = [0u8; 64];
        let salt = salt
            .decode_b64(&mut salt_bytes)
            .map_err(|e| anyhow::anyhow!("stored password salt is malformed: {e}"))?
            .to_vec();
        let matches = self
            .blocking(params, move |argon2, memory| {
                let mut out = vec![0u8; expected.len()];
                argon2
                    .hash_password_into_with_memory(password.as_bytes(), &salt, &mut out, memory)
                    .map_err(|e| anyhow::anyhow!("hashing failed: {e}"))?;
                let actual = Output::new(&out).map_err(|e| anyhow::anyhow!("output: {e}"))?;
                // `Output`'s equality is constant-time.
                Ok(actual == expected)
            })
            .await?;
        Ok(known && matches)
    }

    async fn dummy_hash(&self) -> Result<String, Error> {
        self.dummy
            .get_or_try_init(|| async {
                let random = uuid::Uuid::new_v4().to_string();
                self.blocking(default_params()?, move |argon2, memory| {
                    hash_now(argon2, memory, &random)
                })
                .await
            })
            .await
            .cloned()
    }
}

fn default_params() -> Result<Params, Error> {
    Ok(Params::new(MEMORY_KIB, PASSES, LANES, Some(OUTPUT_LEN))
        .map_err(|e| anyhow::anyhow!("argon2 parameters: {e}"))?)
}

fn hash_now(argon2: &Argon2<'_>, memory: &mut [Block], password: &str) -> Result<String, Error> {
    let salt = SaltString::generate(&mut OsRng);
    let mut salt_bytes = [0u8; 64];
    let raw_salt = salt
        .decode_b64(&mut salt_bytes)
        .map_err(|e| anyhow::anyhow!("salt: {e}"))?;
    let mut out = [0u8; OUTPUT_LEN];
    argon2
        .hash_password_into_with_memory(password.as_bytes(), raw_salt, &mut out, memory)
        .map_err(|e| anyhow::anyhow!("hashing failed: {e}"))?;
    let output = Output::new(&out).map_err(|e| anyhow::anyhow!("output: {e}"))?;
    let params = argon2.params();
    Ok(format!(
        "$argon2id$v=19$m={},t={},p={}${}${}",
        params.m_cost(),
        params.t_cost(),
        params.p_cost(),
        salt.as_str(),
        output
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_hash_uses_argon2id_with_owasp_parameters_and_verifies() {
        let hasher = Hasher::new();
        let password = Password::parse("a long passphrase".into(), None).expect("valid");
        let hash = hasher.hash(&password).await.expect("hash");
        assert!(hash.starts_with("$argon2id$v=19$m=7168,t=5,p=1$"), "{hash}");
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
    async fn a_hash_made_by_the_argon2_crate_with_other_parameters_still_verifies() {
        use argon2::password_hash::PasswordHasher;
        // What earlier versions stored: m=19 MiB, t=2.
        let params = Params::new(19 * 1024, 2, 1, None).expect("params");
        let salt = SaltString::generate(&mut OsRng);
        let old = Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
            .hash_password(b"a long passphrase", &salt)
            .expect("hash")
            .to_string();
        let hasher = Hasher::new();
        assert!(
            hasher
                .verify("a long passphrase".into(), Some(old.clone()))
                .await
                .expect("v")
        );
        assert!(
            !hasher
                .verify("a wrong passphrase".into(), Some(old))
                .await
                .expect("v")
        );
    }

    #[tokio::test]
    async fn our_hashes_verify_with_the_argon2_crate_itself() {
        use argon2::password_hash::PasswordVerifier;
        let hasher = Hasher::new();
        let password = Password::parse("a long passphrase".into(), None).expect("valid");
        let hash = hasher.hash(&password).await.expect("hash");
        let parsed = PasswordHash::new(&hash).expect("PHC");
        assert!(
            Argon2::default()
                .verify_password(b"a long passphrase", &parsed)
                .is_ok()
        );
        assert!(
            Argon2::default()
                .verify_password(b"a wrong passphrase", &parsed)
                .is_err()
        );
    }

    #[tokio::test]
    async fn memory_blocks_are_reused_not_accumulated() {
        let hasher = Hasher::new();
        // Three rounds of eight at once: at most one block per permit is ever made and kept.
        for _ in 0..3 {
            let hashes: Vec<_> = (0..8)
                .map(|_| {
                    let hasher = hasher.clone();
                    tokio::spawn(async move {
                        let password =
                            Password::parse("a long passphrase".into(), None).expect("valid");
                        hasher.hash(&password).await
                    })
                })
                .collect();
            for hash in hashes {
                hash.await.expect("task").expect("hash");
            }
        }
        let kept = hasher.memory.lock().expect("lock").len();
        assert!(
            (1..=hasher.permits.available_permits()).contains(&kept),
            "{kept} blocks kept"
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
