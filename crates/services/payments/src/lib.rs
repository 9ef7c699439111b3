//! The payments service: charges and refunds against a simulated card network.
//!
//! # Layout
//! - [`domain`]: `CardNumber` (Luhn-checked; only its last four digits are ever shown or
//!   stored), `Card` (expiry, CVC shape), `Amount`, `Currency`, and `authorize`, the simulated
//!   network with a provider's well-known test numbers.
//! - [`store`]: captures (one per order: the primary key is the idempotency guarantee) and an
//!   attempt log that also keeps declines.
//! - [`api`]: gRPC `shopmesh.payments.v1.Payments` (`Charge`, `Refund`, `GetPayment`). There is
//!   no public HTTP API: orders charges on a customer's behalf.
//!
//! A decline is not remembered as the order's outcome, so the customer can pay with another
//! card; a capture is, so a retried charge can never charge twice.

pub mod api;
pub mod config;
pub mod domain;
pub mod error;
pub mod store;

use shopmesh_db::Db;
use shopmesh_runtime::{App, ReadinessCheck, Server, Service};

pub use config::Config;

/// The migrations of the payments database.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// The payments service.
pub struct Application;

impl Application {
    /// Connects, migrates and binds: a service ready to run.
    pub async fn build(config: Config) -> anyhow::Result<Service> {
        let db = Db::open(&config.database_url(), &config.database, &MIGRATOR).await?;
        shopmesh_events::outbox::install(&db).await?;
        let store = store::Store::new(db.clone());
        let router = App::new("payments")
            .grpc(api::PaymentsGrpc::server(store))
            .http(shopmesh_events::outbox::routes(db.clone()))
            .readiness(ReadinessCheck::new("database", db.probe()))
            .into_router();
        let server = Server::bind("payments", &config.server, router).await?;
        let publishing = shopmesh_events::Publishing::start(
            &db,
            &config.events,
            "payments",
            shopmesh_contracts::TOPOLOGY,
        );
        Ok(Service::new(server)
            .on_stop(async move { publishing.stop() })
            .on_stop(async move { db.close().await }))
    }
}
