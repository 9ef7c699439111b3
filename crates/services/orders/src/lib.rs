//! The orders service: checkout as a persisted, resumable saga.
//!
//! # Layout
//! - [`domain`]: order requests (`items[i]` named in errors), priced lines, checked totals,
//!   statuses, saga steps, idempotency keys.
//! - [`store`]: the SQL: orders, lines (prices as quoted by the catalog), idempotency keys with
//!   their stored answers, guarded step transitions.
//! - [`saga`]: place (price, store, reserve), pay (charge, commit), cancel, expire, and
//!   `resume` for a step interrupted by a crash or a lost answer.
//! - [`clients`]: gRPC to catalog, inventory and payments, each call under a deadline.
//! - [`worker`]: expires unpaid orders and resumes interrupted steps in the background.
//! - [`api`]: HTTP `/api/v1/orders` (create with `Idempotency-Key`, list, read, pay, cancel)
//!   and gRPC `shopmesh.orders.v1.Orders/Audit` for reconciliation.

pub mod api;
pub mod clients;
pub mod config;
pub mod domain;
pub mod error;
pub mod saga;
pub mod store;
pub mod worker;

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::FromRef;
use shopmesh_auth::Verifier;
use shopmesh_config::Sources;
use shopmesh_runtime::{App, ReadinessCheck, Server};

pub use config::Config;

/// The migrations of the orders database.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// What handlers share.
#[derive(Clone)]
pub struct AppState {
    store: store::Store,
    saga: saga::Saga,
    verifier: Verifier,
}

impl FromRef<AppState> for Verifier {
    fn from_ref(state: &AppState) -> Self {
        state.verifier.clone()
    }
}

/// An orders service, built and bound, not yet serving.
pub struct Application {
    server: Server,
    store: store::Store,
    saga: saga::Saga,
    interval: Duration,
    stale_after: Duration,
    /// Numbers the outbox for consumers, and relays it to RabbitMQ when configured.
    publishing: shopmesh_events::Publishing,
}

impl Application {
    /// Connects, migrates, prepares the clients and binds.
    pub async fn build(config: Config) -> anyhow::Result<Self> {
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
        let saga = saga::Saga::new(store.clone(), clients, config.orders.order_ttl(), failpoint);
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
        Ok(Application {
            server,
            store,
            saga,
            interval: Duration::from_millis(config.orders.worker_interval_ms.max(10)),
            stale_after: Duration::from_secs(config.orders.stale_after_secs),
            publishing: shopmesh_events::Publishing::start(
                &db,
                &config.events,
                "orders",
                shopmesh_contracts::TOPOLOGY,
            ),
        })
    }

    /// Where it listens.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.server.local_addr()
    }

    /// Serves (and runs the background worker) until `shutdown` completes.
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        // The lease first: a step this process starts must never look orphaned.
        self.store.renew_lease().await?;
        let (stop_lease, lease_stopped) = tokio::sync::watch::channel(false);
        let lease = tokio::spawn(worker::keep_lease(self.store.clone(), lease_stopped));
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let worker = tokio::spawn(worker::run(
            self.store.clone(),
            self.saga.clone(),
            self.interval,
            self.stale_after,
            stopped,
        ));
        let result = self.server.run_until(shutdown).await;
        let _ = stop.send(true);
        let _ = worker.await;
        // Only now: the requests have drained and the worker is done.
        let _ = stop_lease.send(true);
        let _ = lease.await;
        self.publishing.stop();
        self.store.db().close().await;
        Ok(result?)
    }
}

/// Runs the orders service configured from `sources` until `shutdown` completes.
pub async fn run(
    sources: Sources,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let config = Config::load(&sources)?;
    shopmesh_runtime::telemetry::init_logging(&config.log)?;
    Application::build(config).await?.run_until(shutdown).await
}
