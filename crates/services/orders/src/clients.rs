//! What the saga asks of other services ([`Downstream`]), the gRPC clients that ask it
//! ([`Clients`]), and how their failures are read.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use shopmesh_mesh::{GrpcChannel, Mesh};
use shopmesh_problem::Problem;
use shopmesh_proto::cart::v1::cart_client::CartClient;
use shopmesh_proto::cart::v1::{GetCartRequest, GetCartResponse, RemoveLinesRequest};
use shopmesh_proto::catalog::v1::catalog_client::CatalogClient;
use shopmesh_proto::catalog::v1::{GetProductsRequest, GetProductsResponse};
use shopmesh_proto::inventory::v1::inventory_client::InventoryClient;
use shopmesh_proto::inventory::v1::{CommitRequest, ReleaseRequest, ReserveRequest};
use shopmesh_proto::payments::v1::payments_client::PaymentsClient;
use shopmesh_proto::payments::v1::{ChargeRequest, GetPaymentRequest, Payment, RefundRequest};

use crate::config::OrdersSettings;
use crate::error::Error;
use crate::prices::PriceCache;

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
    /// The catalog's recent answers (`orders.price_cache_ms`).
    pub prices: Arc<PriceCache>,
}

/// Most products whose prices are kept.
const PRICES_KEPT: usize = 10_000;

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
            prices: Arc::new(PriceCache::new(settings.price_cache(), PRICES_KEPT)),
        })
    }
}

/// A call to another service: its answer, or the status it failed with.
pub type Call<'a, T> = Pin<Box<dyn Future<Output = Result<T, tonic::Status>> + Send + 'a>>;

/// Every call the saga makes, in the services' own terms (their messages, their statuses), so
/// that tests can play the other services: answer, refuse, or leave the outcome unknown.
pub trait Downstream: Send + Sync + 'static {
    /// Catalog `GetProducts`: prices and whether each product can be bought.
    fn products(&self, request: GetProductsRequest) -> Call<'_, GetProductsResponse>;
    /// Inventory `Reserve` (idempotent by order id).
    fn reserve(&self, request: ReserveRequest) -> Call<'_, ()>;
    /// Inventory `Commit` (idempotent by order id).
    fn commit(&self, request: CommitRequest) -> Call<'_, ()>;
    /// Inventory `Release` (idempotent by order id; leaves a tombstone).
    fn release(&self, request: ReleaseRequest) -> Call<'_, ()>;
    /// Payments `Charge` (one capture per order).
    fn charge(&self, request: ChargeRequest) -> Call<'_, Payment>;
    /// Payments `GetPayment`: the order's capture, `NotFound` if none.
    fn payment(&self, request: GetPaymentRequest) -> Call<'_, Payment>;
    /// Payments `Refund` (`NotFound` if nothing was captured).
    fn refund(&self, request: RefundRequest) -> Call<'_, ()>;
    /// Cart `GetCart`.
    fn cart(&self, request: GetCartRequest) -> Call<'_, GetCartResponse>;
    /// Cart `RemoveLines`.
    fn remove_from_cart(&self, request: RemoveLinesRequest) -> Call<'_, ()>;
}

impl Downstream for Clients {
    fn products(&self, request: GetProductsRequest) -> Call<'_, GetProductsResponse> {
        let mut client = self.catalog.clone();
        Box::pin(async move {
            if let Some(products) = self.prices.get_all(&request.ids) {
                return Ok(GetProductsResponse { products });
            }
            let asked = tokio::time::Instant::now();
            let answer = client.get_products(request).await?.into_inner();
            self.prices.keep(asked, &answer.products);
            Ok(answer)
        })
    }

    fn reserve(&self, request: ReserveRequest) -> Call<'_, ()> {
        let mut client = self.inventory.clone();
        Box::pin(async move { client.reserve(request).await.map(drop) })
    }

    fn commit(&self, request: CommitRequest) -> Call<'_, ()> {
        let mut client = self.inventory.clone();
        Box::pin(async move { client.commit(request).await.map(drop) })
    }

    fn release(&self, request: ReleaseRequest) -> Call<'_, ()> {
        let mut client = self.inventory.clone();
        Box::pin(async move { client.release(request).await.map(drop) })
    }

    fn charge(&self, request: ChargeRequest) -> Call<'_, Payment> {
        let mut client = self.payments.clone();
        Box::pin(async move { Ok(client.charge(request).await?.into_inner()) })
    }

    fn payment(&self, request: GetPaymentRequest) -> Call<'_, Payment> {
        let mut client = self.payments.clone();
        Box::pin(async move { Ok(client.get_payment(request).await?.into_inner()) })
    }

    fn refund(&self, request: RefundRequest) -> Call<'_, ()> {
        let mut client = self.payments.clone();
        Box::pin(async move { client.refund(request).await.map(drop) })
    }

    fn cart(&self, request: GetCartRequest) -> Call<'_, GetCartResponse> {
        let mut client = self.cart.clone();
        Box::pin(async move { Ok(client.get_cart(request).await?.into_inner()) })
    }

    fn remove_from_cart(&self, request: RemoveLinesRequest) -> Call<'_, ()> {
        let mut client = self.cart.clone();
        Box::pin(async move { client.remove_lines(request).await.map(drop) })
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

/// An unknown outcome from `service` (logged here, where it is known, once per call that
/// had it; the error's conversion to a problem logs nothing).
pub fn unavailable(service: &str) -> Error {
    tracing::warn!(%service, "upstream unavailable");
    Error::Unavailable(service.to_owned())
}
