//! The users service: accounts, credentials, roles, access tokens and the JWKS.
//!
//! # Layout
//! - [`domain`]: `Email`, `UserName`, `Password` (the ASVS policy), `User`: parsed once, valid by
//!   construction.
//! - [`store`]: the SQL (users and signing keys), portable between SQLite and PostgreSQL.
//! - [`passwords`]: Argon2id hashing on the blocking pool, bounded to one hash per core.
//! - [`keys`]: the Ed25519 signing key, created once and kept in the database.
//! - [`api`]: HTTP handlers (`/api/v1/register`, `login`, `me`, `users`, the JWKS) and the gRPC
//!   `shopmesh.users.v1.Users` service, on one port.
//! - [`Application`]: connects, migrates, bootstraps, binds; `run` serves until shutdown.
//!
//! Other services never read this database: they verify tokens with the JWKS and ask for
//! accounts over gRPC.

pub mod api;
pub mod config;
pub mod domain;
pub mod error;
pub mod keys;
pub mod passwords;
pub mod store;

use std::sync::Arc;

use axum::extract::FromRef;
use secrecy::ExposeSecret;
use shopmesh_auth::{JwkSet, TokenSigner, Verifier};
use shopmesh_db::Db;
use shopmesh_runtime::{App, ReadinessCheck, Server, Service};

pub use config::Config;
use domain::{Email, Password, UserName};
pub use store::AdminOutcome;

/// The migrations of the users database.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// What handlers share.
#[derive(Clone, FromRef)]
pub struct AppState {
    store: store::Store,
    hasher: passwords::Hasher,
    signer: Arc<TokenSigner>,
    verifier: Verifier,
    jwks: Arc<JwkSet>,
}

/// The users service.
pub struct Application;

/// Connects to the users database and applies the migrations.
pub async fn open_store(config: &Config) -> anyhow::Result<store::Store> {
    let db = Db::open(&config.database_url(), &config.database, &MIGRATOR).await?;
    shopmesh_events::outbox::install(&db).await?;
    Ok(store::Store::new(db))
}

impl Application {
    /// Connects, migrates, loads the signing key, applies the admin bootstrap and binds.
    pub async fn build(config: Config) -> anyhow::Result<Service> {
        let store = open_store(&config).await?;
        let keys = keys::load_or_create(&store, &config.auth, config.users.token_ttl())
            .await
            .map_err(|e| anyhow::anyhow!("loading the signing key: {e}"))?;
        let verifier = Verifier::with_keys(&config.auth, &keys.jwks)
            .map_err(|e| anyhow::anyhow!("building the token verifier: {e}"))?;
        let hasher = passwords::Hasher::new();
        bootstrap_admin(&config, &store, &hasher).await?;

        let state = AppState {
            store: store.clone(),
            hasher,
            signer: Arc::new(keys.signer),
            verifier,
            jwks: Arc::new(keys.jwks),
        };
        let db = store.db().clone();
        let (public, openapi) = api::http::routes(state.clone()).split_for_parts();
        let router = App::new("users")
            .http(public)
            .http(api::http::internal_routes(state))
            .http(shopmesh_events::outbox::routes(db.clone()))
            .openapi(openapi)
            .grpc(api::grpc::UsersGrpc::server(store))
            .readiness(ReadinessCheck::new("database", db.probe()))
            .into_router();
        let server = Server::bind("users", &config.server, router).await?;
        let publishing = shopmesh_events::Publishing::start(
            &db,
            &config.events,
            "users",
            shopmesh_contracts::TOPOLOGY,
        );
        Ok(Service::new(server)
            .on_stop(async move { publishing.stop() })
            .on_stop(async move { db.close().await }))
    }
}

/// Makes `email` an admin with `password` (creating or promoting the account).
pub async fn create_admin(
    config: &Config,
    email: &str,
    name: &str,
    password: String,
) -> anyhow::Result<AdminOutcome> {
    let store = open_store(config).await?;
    let outcome = upsert_admin(&store, &passwords::Hasher::new(), email, name, password).await;
    store.db().close().await;
    outcome
}

async fn upsert_admin(
    store: &store::Store,
    hasher: &passwords::Hasher,
    email: &str,
    name: &str,
    password: String,
) -> anyhow::Result<AdminOutcome> {
    let email = Email::parse(email).map_err(|e| anyhow::anyhow!("{e}"))?;
    let name = UserName::parse(name).map_err(|e| anyhow::anyhow!("{e}"))?;
    let password = Password::parse(password, Some(&email)).map_err(|e| anyhow::anyhow!("{e}"))?;
    let hash = hasher
        .hash(&password)
        .await
        .map_err(|e| anyhow::anyhow!("hashing the password: {e}"))?;
    store
        .upsert_admin(&email, &name, &hash)
        .await
        .map_err(|e| anyhow::anyhow!("storing the admin: {e}"))
}

/// `[users] bootstrap_admin_email/password`: make sure that admin exists. An existing account is
/// promoted but keeps its password, so restarting a container never resets it.
async fn bootstrap_admin(
    config: &Config,
    store: &store::Store,
    hasher: &passwords::Hasher,
) -> anyhow::Result<()> {
    let settings = &config.users;
    let (email, password) = match (
        &settings.bootstrap_admin_email,
        &settings.bootstrap_admin_password,
    ) {
        (None, None) => return Ok(()),
        (Some(email), Some(password)) => (email, password),
        _ => anyhow::bail!(
            "invalid configuration: users.bootstrap_admin_email and \
             users.bootstrap_admin_password (SHOPMESH_USERS__BOOTSTRAP_ADMIN_EMAIL / _PASSWORD) \
             must be set together"
        ),
    };
    let parsed = Email::parse(email)
        .map_err(|e| anyhow::anyhow!("invalid configuration: users.bootstrap_admin_email: {e}"))?;
    // Created only if absent; an admin already there keeps its password (the operator may
    // have changed it). A customer's account is never promoted: whoever registered the address
    // first would become admin with their own password.
    match store
        .credentials(&parsed)
        .await
        .map_err(|e| anyhow::anyhow!("looking up the bootstrap admin: {e}"))?
    {
        Some((user, _)) if user.role == shopmesh_auth::Role::Admin => {
            tracing::info!(email = %parsed, "bootstrap admin present");
            return Ok(());
        }
        Some(_) => anyhow::bail!(
            "invalid configuration: users.bootstrap_admin_email ({parsed}) is a customer's \
             account; it is not made an admin (whoever registered it would become one with \
             their own password). Configure another address, or make this one an admin with a \
             new password: shopmesh admin create-admin --email {parsed}"
        ),
        None => {}
    }
    upsert_admin(
        store,
        hasher,
        email,
        "Administrator",
        password.expose_secret().to_owned(),
    )
    .await
    .map_err(|e| anyhow::anyhow!("invalid configuration: users.bootstrap_admin_*: {e}"))?;
    tracing::info!(email = %parsed, "bootstrap admin created");
    Ok(())
}
