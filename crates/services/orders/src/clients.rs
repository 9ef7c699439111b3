//! gRPC clients for the services orders calls, and how their failures are read.

use shopmesh_mesh::{GrpcChannel, Mesh};
use shopmesh_problem::Problem;
use shopmesh_proto::cart::v1::cart_client::CartClient;
use shopmesh_proto::catalog::v1::catalog_client::CatalogClient;
use shopmesh_proto::inventory::v1::inventory_client::InventoryClient;
use shopmesh_proto::payments::v1::payments_client::PaymentsClient;

use crate::config::OrdersSettings;
use crate::error::Error;

/// One client per service, over the mesh (balancing, breakers, retries); each call carries the
/// configured deadline, or less if the request being handled has less left. Every RPC orders
/// makes is a read or idempotent by order id, so the mesh may retry them.
#[derive(Debug, Clone)]
pub struct Clients {
    /// Prices.
    pub catalog: CatalogClient<GrpcChannel>,
    /// Stock.
    pub inventory: InventoryClient<GrpcChannel>,
    /// Cards.
    pub payments: PaymentsClient<GrpcChannel>,
    /// Carts.
    pub cart: CartClient<GrpcChannel>,
}

impl Clients {
    /// Clients of the configured upstreams (the services may start after us).
    pub fn new(settings: &OrdersSettings, mesh: &Mesh) -> anyhow::Result<Self> {
        let deadline = settings.call_timeout();
        Ok(Clients {
            catalog: CatalogClient::new(mesh.grpc("catalog", &settings.catalog_url, deadline)?),
            inventory: InventoryClient::new(mesh.grpc(
                "inventory",
                &settings.inventory_url,
                deadline,
            )?),
            payments: PaymentsClient::new(mesh.grpc(
                "payments",
                &settings.payments_url,
                deadline,
            )?),
            cart: CartClient::new(mesh.grpc("cart", &settings.cart_url, deadline)?),
        })
    }
}

/// What a failed call means.
pub enum Failure {
    /// The service said no; the call had no effect.
    Refused(Problem),
    /// No answer (down, deadline, internal error): the call may or may not have taken effect.
    Unknown,
}

/// Reads a failed call's status.
pub fn failure(status: &tonic::Status) -> Failure {
    use tonic::Code as C;
    match status.code() {
        C::Unavailable
        | C::DeadlineExceeded
        | C::Cancelled
        | C::Unknown
        | C::Internal
        | C::DataLoss => Failure::Unknown,
        _ => Failure::Refused(Problem::from(status.clone())),
    }
}

/// The problem to pass on for a refusal, with the callee's field names (`lines[i]`) turned
/// into ours (`items[i]`, the same place: lines are sent in the customer's order).
pub fn refusal(problem: Problem) -> Error {
    let renamed = problem
        .field()
        .filter(|f| f.starts_with("lines["))
        .map(|f| f.replacen("lines[", "items[", 1));
    match renamed {
        Some(field) => Error::Upstream(problem.with_field(field)),
        None => Error::Upstream(problem),
    }
}

/// An unknown outcome from `service`.
pub fn unavailable(service: &str) -> Error {
    Error::Unavailable(service.to_owned())
}
