//! The catalog service: products, search and listing, admin editing, prices for other services.
//!
//! # Layout
//! - [`domain`]: `Sku`, `ProductName`, `Price` (integer minor units), `Currency`, `Category`,
//!   `ImageUrl`, `ProductDraft`, `Product`, `Sort`: parsed once, valid by construction.
//! - [`store`]: the SQL; lists page by keyset per sort order (name or price, either way).
//! - [`api`]: HTTP (`/api/v1/products`: anyone lists, searches and reads; admins create,
//!   replace, amend and delete) and gRPC `shopmesh.catalog.v1.Catalog/GetProducts`, which
//!   orders and cart use to price lines (prices never come from clients).
//! - [`seed`]: the demo catalog `shopmesh up` starts with.
//!
//! A product page (`GET /api/v1/products/{id}`) carries `available`, asked of the inventory
//! under a short deadline; when the inventory does not answer in time the page is served
//! without it rather than not at all.
//!
//! Deleting a product is soft: it disappears from lists and pages, but past orders still name
//! it, and `GetProducts` reports it as not purchasable.

pub mod api;
pub mod config;
pub mod domain;
pub mod error;
pub mod seed;
pub mod stock;
pub mod store;

use axum::extract::FromRef;
use shopmesh_auth::Verifier;
use shopmesh_db::Db;
use shopmesh_mesh::{GrpcChannel, Mesh};
use shopmesh_proto::inventory::v1::inventory_client::InventoryClient;
use shopmesh_runtime::{App, ReadinessCheck, Server, Service};

pub use config::Config;

/// Migrates the catalog database: the portable migrations (`migrations/`), then the search
/// index, which each backend builds its own way (`migrations/sqlite`: FTS5 with trigrams;
/// `migrations/postgres`: pg_trgm).
pub async fn migrate(db: &Db) -> Result<(), shopmesh_db::DbError> {
    db.migrate_split(
        sqlx::migrate!("./migrations"),
        sqlx::migrate!("./migrations/sqlite"),
        sqlx::migrate!("./migrations/postgres"),
    )
    .await
}

/// What handlers share.
#[derive(Clone, FromRef)]
pub struct AppState {
    store: store::Store,
    verifier: Verifier,
    inventory: InventoryClient<GrpcChannel>,
    /// `Cache-Control` of anonymous reads (`catalog.cache_max_age_secs`).
    cache_control: Option<axum::http::HeaderValue>,
}

/// The catalog service.
pub struct Application;

impl Application {
    /// Connects, migrates, seeds the demo catalog if asked, and binds.
    pub async fn build(config: Config) -> anyhow::Result<Service> {
        let jwks_url = config.auth.require_jwks_url()?;
        let db = Db::connect(&config.database_url(), &config.database).await?;
        migrate(&db).await?;
        shopmesh_events::consumer::install(&db).await?;
        let store = store::Store::new(db.clone());
        if config.catalog.seed_demo {
            let added = seed::seed(&store)
                .await
                .map_err(|e| anyhow::anyhow!("seeding the demo catalog: {e}"))?;
            if added > 0 {
                tracing::info!(added, "demo catalog seeded");
            }
        }
        let mesh = Mesh::new(config.mesh.clone());
        let inventory = InventoryClient::new(mesh.grpc(
            "inventory",
            &config.catalog.inventory_url,
            std::time::Duration::from_millis(config.catalog.availability_timeout_ms),
        )?);
        // Availability for lists, from the inventory's `stock.changed` stream (the same
        // instances, spoken to over HTTP).
        let stock_events = shopmesh_events::consumer::Subscription {
            producer: "inventory".to_owned(),
            upstream: mesh.upstream(
                "inventory-events",
                &config.catalog.inventory_url,
                shopmesh_mesh::Protocol::Http,
            )?,
        };
        let consumer = std::sync::Arc::new(
            shopmesh_events::consumer::Consumer::new(
                db.clone(),
                std::sync::Arc::new(stock::Availability),
                5,
                std::time::Duration::from_millis(200),
            )
            .reading_as("catalog", &config.events),
        );
        let state = AppState {
            store: store.clone(),
            verifier: Verifier::from_jwks_url(&config.auth, jwks_url),
            inventory,
            cache_control: (config.catalog.cache_max_age_secs > 0)
                .then(|| {
                    // A reuser may serve it for as long again while one request refreshes.
                    axum::http::HeaderValue::try_from(format!(
                        "public, max-age={0}, stale-while-revalidate={0}",
                        config.catalog.cache_max_age_secs
                    ))
                    .ok()
                })
                .flatten(),
        };
        let (public, openapi) = api::http::routes(state).split_for_parts();
        let router = App::new("catalog")
            .http(public)
            .mesh(mesh)
            .openapi(openapi)
            .grpc(api::grpc::CatalogGrpc::server(store))
            .readiness(ReadinessCheck::new("database", db.probe()))
            .into_router();
        let server = Server::bind("catalog", &config.server, router).await?;
        let events = config.events.clone();
        Ok(Service::new(server)
            .task("events", move |stopping| {
                consumer.follow_all(
                    events,
                    "catalog",
                    shopmesh_contracts::bindings("catalog"),
                    vec![stock_events],
                    shopmesh_runtime::stopped(stopping),
                )
            })
            .on_stop(async move { db.close().await }))
    }
}
