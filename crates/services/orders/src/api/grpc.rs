//! The internal gRPC API (`shopmesh.orders.v1.Orders`): `Audit` for reconciliation, and
//! `Outcome` for the inventory's sweeper, which gives back a hold that ran out only once its
//! order can no longer be paid.

use std::time::Duration;

use shopmesh_problem::Problem;
use shopmesh_proto::orders::v1::orders_server::{Orders, OrdersServer};
use shopmesh_proto::orders::v1::{
    AuditLine, AuditOrder, AuditRequest, AuditResponse, Outcome as WireOutcome, OutcomeRequest,
    OutcomeResponse,
};
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::store::{Outcome, Store};

/// How far past its expiry an unpaid order must be before `Outcome` calls it never to be paid:
/// more than the clocks of two orders instances (the one paying, the one answering) can differ.
pub const CLOCK_MARGIN: Duration = Duration::from_secs(5);

/// The gRPC service.
#[derive(Debug, Clone)]
pub struct OrdersGrpc {
    store: Store,
}

impl OrdersGrpc {
    /// The tonic server for this service.
    pub fn server(store: Store) -> OrdersServer<OrdersGrpc> {
        OrdersServer::new(OrdersGrpc { store })
    }
}

#[tonic::async_trait]
impl Orders for OrdersGrpc {
    async fn audit(
        &self,
        _request: Request<AuditRequest>,
    ) -> Result<Response<AuditResponse>, Status> {
        let orders = self
            .store
            .all_orders()
            .await
            .map_err(|e| Status::from(Problem::from(e)))?;
        Ok(Response::new(AuditResponse {
            orders: orders
                .into_iter()
                .map(|o| AuditOrder {
                    id: o.id.hyphenated().to_string(),
                    status: o.status.as_str().to_owned(),
                    step: o.step.as_str().to_owned(),
                    total: o.total,
                    currency: o.currency,
                    expires_at_ms: i64::try_from(o.expires_at.unix_timestamp_nanos() / 1_000_000)
                        .unwrap_or(i64::MAX),
                    payment_id: o.payment_id.unwrap_or_default(),
                    lines: o
                        .lines
                        .into_iter()
                        .map(|l| AuditLine {
                            product_id: l.product_id.hyphenated().to_string(),
                            quantity: l.quantity,
                        })
                        .collect(),
                })
                .collect(),
        }))
    }

    async fn outcome(
        &self,
        request: Request<OutcomeRequest>,
    ) -> Result<Response<OutcomeResponse>, Status> {
        let order_id = Uuid::parse_str(&request.get_ref().order_id)
            .map_err(|_| Status::invalid_argument("order_id: not a UUID"))?;
        let outcome = self
            .store
            .outcome(order_id, CLOCK_MARGIN)
            .await
            .map_err(|e| Status::from(Problem::from(e)))?;
        let outcome = match outcome {
            Outcome::Paid => WireOutcome::Paid,
            Outcome::Unpaid => WireOutcome::Unpaid,
            Outcome::Open => WireOutcome::Open,
        };
        Ok(Response::new(OutcomeResponse {
            outcome: outcome.into(),
        }))
    }
}
