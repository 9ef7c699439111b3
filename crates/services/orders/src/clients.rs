//! gRPC clients for the services orders calls, and how their failures are read.

use shopmesh_problem::Problem;
use shopmesh_proto::cart::v1::cart_client::CartClient;
use shopmesh_proto::catalog::v1::catalog_client::CatalogClient;
use shopmesh_proto::inventory::v1::inventory_client::InventoryClient;
use shopmesh_proto::payments::v1::payments_client::PaymentsClient;
use tonic::transport::Channel;

use crate::config::OrdersSettings;
use crate::error::Error;

/// One client per service; each call carries the configured deadline.
#[derive(Debug, Clone)]
pub struct Clients {
    /// Prices.
    pub catalog: CatalogClient<Channel>,
    /// Stock.
    pub inventory: InventoryClient<Channel>,
    /// Cards.
    pub payments: PaymentsClient<Channel>,
    /// Carts.
    pub cart: CartClient<Channel>,
}

impl Clients {
    /// Lazily connecting clients (the services may start after us).
    pub fn new(settings: &OrdersSettings) -> anyhow::Result<Self> {
        let deadline = settings.call_timeout();
        Ok(Clients {
            catalog: CatalogClient::new(shopmesh_runtime::grpc::channel(
                &settings.catalog_url,
                deadline,
            )?),
            inventory: InventoryClient::new(shopmesh_runtime::grpc::channel(
                &settings.inventory_url,
                deadline,
            )?),
            payments: PaymentsClient::new(shopmesh_runtime::grpc::channel(
                &settings.payments_url,
                deadline,
            )?),
            cart: CartClient::new(shopmesh_runtime::grpc::channel(
                &settings.cart_url,
                deadline,
            )?),
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
