//! The internal gRPC API (`shopmesh.orders.v1.Orders`): reconciliation only.

use shopmesh_problem::Problem;
use shopmesh_proto::orders::v1::orders_server::{Orders, OrdersServer};
use shopmesh_proto::orders::v1::{AuditLine, AuditOrder, AuditRequest, AuditResponse};
use tonic::{Request, Response, Status};

use crate::store::Store;

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
}
