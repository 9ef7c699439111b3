//! The orders service: checkout as a persisted, resumable saga.
//!
//! # Layout
//! - [`domain`]: order requests (`items[i]` named in errors), priced lines, checked totals,
//!   statuses, saga steps, idempotency keys.
//! - [`store`]: the SQL: orders, lines (prices as quoted by the catalog), idempotency keys with
//!   their stored answers, guarded step transitions.
//! - [`saga`]: place (price, store, reserve), pay (charge, commit), cancel, expire, and
//!   `resume` for a step interrupted by a crash or a lost answer.
//! - [`clients`]: what the saga asks of catalog, inventory, payments and cart (the
//!   `Downstream` trait, which tests play), and the gRPC clients that ask it, each call under a
//!   deadline; prices the catalog gave a moment ago are reused from [`prices`].
//! - [`worker`]: expires unpaid orders and resumes interrupted steps in the background.
//! - [`api`]: HTTP `/api/v1/orders` (create with `Idempotency-Key`, list, read, pay, cancel)
//!   and gRPC `shopmesh.orders.v1.Orders/Audit` for reconciliation.

pub mod api;
pub mod clients;
pub mod config;
pub mod domain;
pub mod error;
pub mod idempotency;
pub mod prices;
pub mod saga;
pub mod store;
pub mod worker;

use std::time::Duration;

use axum::extract::FromRef;
use shopmesh_auth::Verifier;
use shopmesh_runtime::{App, ReadinessCheck, Server, Service};

pub use config::Config;

/// The migrations of the orders database.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// What handlers share.
#[derive(Clone, FromRef)]
pub struct AppState {
    store: store::Store,
    saga: saga::Saga,
    verifier: Verifier,
}

/// The orders service.
pub struct Application;

impl Application {
    /// Connects, migrates, prepares the clients, binds, and takes this process's lease: a
    /// service ready to run, with its worker beside it.
    pub async fn build(config: Config) -> anyhow::Result<Service> {
        let jwks_url = config.auth.require_jwks_url()?;
        let db = shopmesh_db::Db::open(&config.database_url(), &config.database, &MIGRATOR).await?;
        shopmesh_events::outbox::install(&db).await?;
        let store = store::Store::new(db.clone());
        let mesh = shopmesh_mesh::Mesh::new(config.mesh.clone());
        let clients = clients::Clients::new(&config.orders, &mesh)?;
        let failpoint = config.orders.failpoint.clone().map(|name| saga::Failpoint {
            marker: config
                .data_dir
                .join(format!("orders-failpoint-{name}.fired")),
            name,
        });
        let saga = saga::Saga::new(
            store.clone(),
            std::sync::Arc::new(clients),
            config.orders.order_ttl(),
            failpoint,
        );
        let state = AppState {
            store: store.clone(),
            saga: saga.clone(),
            verifier: Verifier::from_jwks_url(&config.auth, jwks_url),
        };
        let (public, openapi) = api::http::routes(state).split_for_parts();
        let router = App::new("orders")
            .http(public)
            .http(shopmesh_events::outbox::routes(db.clone()))
            .mesh(mesh)
            .openapi(openapi)
            .grpc(api::grpc::OrdersGrpc::server(store.clone()))
            .readiness(ReadinessCheck::new("database", db.probe()))
            .into_router();
        let server = Server::bind("orders", &config.server, router).await?;
        // The lease before anything runs: a step this process starts must never look
        // orphaned. Its task is added first, so it stops last: after the requests drained
        // and the worker stopped.
        store.renew_lease().await?;
        let interval = Duration::from_millis(config.orders.worker_interval_ms.max(10));
        let stale_after = Duration::from_secs(config.orders.stale_after_secs);
        // A step's calls each end within their deadline: past it and a margin, none can land.
        let abandoned_after = config.orders.call_timeout() + Duration::from_secs(1);
        // Numbers the outbox for consumers, and relays it to RabbitMQ when configured.
        let publishing = shopmesh_events::Publishing::start(
            &db,
            &config.events,
            "orders",
            shopmesh_contracts::TOPOLOGY,
        );
        Ok(Service::new(server)
            .task("lease", {
                let store = store.clone();
                move |stopping| worker::keep_lease(store, stopping)
            })
            .task("worker", move |stopping| {
                worker::run(
                    store,
                    saga,
                    interval,
                    stale_after,
                    abandoned_after,
                    stopping,
                )
            })
            .on_stop(async move { publishing.stop() })
            .on_stop(async move { db.close().await }))
    }
}
