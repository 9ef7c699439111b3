//! The cart service: one cart per customer, priced from the catalog whenever it is read.
//!
//! # Layout
//! - [`domain`]: quantities and limits (100 lines, 1000 units a line: what one order holds).
//! - [`store`]: the SQL (lines only; prices are never stored here).
//! - [`api`]: HTTP `/api/v1/cart` (read, add, set, remove, clear; each customer sees only their
//!   own cart) and gRPC `shopmesh.cart.v1.Cart` (`GetCart`, `RemoveLines`) for orders placed
//!   with `{"from_cart": true}`.

pub mod api;
pub mod config;
pub mod domain;
pub mod error;
pub mod store;

use axum::extract::FromRef;
use shopmesh_auth::Verifier;
use shopmesh_db::Db;
use shopmesh_mesh::{GrpcChannel, Mesh};
use shopmesh_proto::catalog::v1::catalog_client::CatalogClient;
use shopmesh_runtime::{App, ReadinessCheck, Server, Service};

pub use config::Config;

/// The migrations of the cart database.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// What handlers share.
#[derive(Clone, FromRef)]
pub struct AppState {
    store: store::Store,
    catalog: CatalogClient<GrpcChannel>,
    verifier: Verifier,
}

/// The cart service.
pub struct Application;

impl Application {
    /// Connects, migrates and binds: a service ready to run.
    pub async fn build(config: Config) -> anyhow::Result<Service> {
        let jwks_url = config.auth.require_jwks_url()?;
        let db = Db::open(&config.database_url(), &config.database, &MIGRATOR).await?;
        let store = store::Store::new(db.clone());
        let mesh = Mesh::new(config.mesh.clone());
        let catalog = CatalogClient::new(mesh.grpc(
            "catalog",
            &config.cart.catalog_url,
            config.call_timeout(),
        )?);
        let state = AppState {
            store: store.clone(),
            catalog,
            verifier: Verifier::from_jwks_url(&config.auth, jwks_url),
        };
        let (public, openapi) = api::http::routes(state).split_for_parts();
        let router = App::new("cart")
            .http(public)
            .mesh(mesh)
            .openapi(openapi)
            .grpc(api::grpc::CartGrpc::server(store))
            .readiness(ReadinessCheck::new("database", db.probe()))
            .into_router();
        let server = Server::bind("cart", &config.server, router).await?;
        Ok(Service::new(server).on_stop(async move { db.close().await }))
    }
}
