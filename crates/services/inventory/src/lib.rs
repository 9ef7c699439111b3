//! The inventory service: stock levels and reservations that never oversell.
//!
//! # Layout
//! - [`domain`]: `Quantity`, `Lines` (sorted, unique), `Ttl`, reservation `State`, `StockLevel`
//!   and its balance rule (`added − removed = available + reserved + sold`).
//! - [`store`]: the SQL. Every stock change is a guarded statement in a write transaction; the
//!   table's `CHECK (reserved <= on_hand)` refuses an oversell even if a guard were wrong.
//! - [`api`]: HTTP (`/api/v1/inventory/{product_id}`: anyone reads `available`/`reserved`;
//!   admins add and remove) and gRPC `shopmesh.inventory.v1.Inventory` (`Reserve`, `Commit`,
//!   `Release`, idempotent by order id; `GetStock`).
//! - [`sweeper`]: releases holds that ran out.
//! - [`seed`]: stock for the demo catalog.

pub mod api;
pub mod config;
pub mod domain;
pub mod error;
pub mod seed;
pub mod store;
pub mod sweeper;

use axum::extract::FromRef;
use shopmesh_auth::Verifier;
use shopmesh_db::Db;
use shopmesh_runtime::{App, ReadinessCheck, Server, Service};

pub use config::Config;

/// The migrations of the inventory database.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// What handlers share.
#[derive(Clone, FromRef)]
pub struct AppState {
    store: store::Store,
    verifier: Verifier,
}

/// The inventory service.
pub struct Application;

impl Application {
    /// Connects, migrates, seeds the demo stock if asked, and binds.
    pub async fn build(config: Config) -> anyhow::Result<Service> {
        let jwks_url = config.auth.require_jwks_url()?;
        let db = Db::open(&config.database_url(), &config.database, &MIGRATOR).await?;
        shopmesh_events::outbox::install(&db).await?;
        let store = store::Store::new(db.clone());
        if config.inventory.seed_demo {
            let added = seed::seed(&store)
                .await
                .map_err(|e| anyhow::anyhow!("seeding the demo stock: {e}"))?;
            if added > 0 {
                tracing::info!(added, "demo stock seeded");
            }
        }
        let state = AppState {
            store: store.clone(),
            verifier: Verifier::from_jwks_url(&config.auth, jwks_url),
        };
        let (public, openapi) = api::http::routes(state).split_for_parts();
        let router = App::new("inventory")
            .http(public)
            .http(shopmesh_events::outbox::routes(db.clone()))
            .openapi(openapi)
            .grpc(api::grpc::InventoryGrpc::server(store.clone()))
            .readiness(ReadinessCheck::new("database", db.probe()))
            .into_router();
        let server = Server::bind("inventory", &config.server, router).await?;
        // Numbers the outbox for consumers, and relays it to RabbitMQ when configured.
        let publishing = shopmesh_events::Publishing::start(
            &db,
            &config.events,
            "inventory",
            shopmesh_contracts::TOPOLOGY,
        );
        let sweep_interval = config.inventory.sweep_interval();
        Ok(Service::new(server)
            .task("sweeper", move |stopping| {
                sweeper::run(store, sweep_interval, stopping)
            })
            .on_stop(async move { publishing.stop() })
            .on_stop(async move { db.close().await }))
    }
}
