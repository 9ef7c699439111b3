//! The internal gRPC API (`shopmesh.inventory.v1.Inventory`).

use shopmesh_problem::Invalid;
use shopmesh_proto::inventory::v1::inventory_server::{Inventory, InventoryServer};
use shopmesh_proto::inventory::v1::{
    AuditRequest, AuditResponse, CommitRequest, CommitResponse, GetStockRequest, GetStockResponse,
    ReleaseRequest, ReleaseResponse, ReserveRequest, ReserveResponse, Stock,
};
use time::format_description::well_known::Rfc3339;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::domain::{Lines, StockLevel, Ttl};
use crate::error::Error;
use crate::store::Store;

/// The gRPC service.
#[derive(Debug, Clone)]
pub struct InventoryGrpc {
    store: Store,
}

impl InventoryGrpc {
    /// The tonic server for this service.
    pub fn server(store: Store) -> InventoryServer<InventoryGrpc> {
        InventoryServer::new(InventoryGrpc { store })
    }
}

fn order_id(raw: &str) -> Result<Uuid, Error> {
    Uuid::parse_str(raw)
        .map_err(|_| Invalid::new("order_id", "invalid_order_id", "must be a UUID").into())
}

fn to_message(l: StockLevel) -> Stock {
    Stock {
        product_id: l.product_id.hyphenated().to_string(),
        available: l.available(),
        reserved: l.reserved,
        on_hand: l.on_hand,
        sold: l.sold,
        added: l.added,
        removed: l.removed,
    }
}

#[tonic::async_trait]
impl Inventory for InventoryGrpc {
    async fn reserve(
        &self,
        request: Request<ReserveRequest>,
    ) -> Result<Response<ReserveResponse>, Status> {
        let request = request.into_inner();
        let order = order_id(&request.order_id)?;
        let raw: Vec<(String, i64)> = request
            .lines
            .into_iter()
            .map(|l| (l.product_id, l.quantity))
            .collect();
        let lines = Lines::parse(&raw).map_err(Error::from)?;
        let ttl = Ttl::parse(request.ttl_seconds).map_err(Error::from)?;
        let expires_at = self.store.reserve(order, &lines, ttl).await?;
        Ok(Response::new(ReserveResponse {
            expires_at: expires_at.format(&Rfc3339).unwrap_or_default(),
        }))
    }

    async fn commit(
        &self,
        request: Request<CommitRequest>,
    ) -> Result<Response<CommitResponse>, Status> {
        let order = order_id(&request.get_ref().order_id)?;
        self.store.commit(order).await?;
        Ok(Response::new(CommitResponse {}))
    }

    async fn release(
        &self,
        request: Request<ReleaseRequest>,
    ) -> Result<Response<ReleaseResponse>, Status> {
        let order = order_id(&request.get_ref().order_id)?;
        self.store.release(order).await?;
        Ok(Response::new(ReleaseResponse {}))
    }

    async fn get_stock(
        &self,
        request: Request<GetStockRequest>,
    ) -> Result<Response<GetStockResponse>, Status> {
        let ids: Vec<Uuid> = request
            .get_ref()
            .product_ids
            .iter()
            .map(|id| Uuid::parse_str(id))
            .collect::<Result<_, _>>()
            .map_err(|_| Status::invalid_argument("every product id must be a UUID"))?;
        if ids.len() > 100 {
            return Err(Status::invalid_argument("at most 100 product ids"));
        }
        let levels = self.store.stocks(&ids).await?;
        Ok(Response::new(GetStockResponse {
            stock: levels.into_iter().map(to_message).collect(),
        }))
    }

    async fn audit(
        &self,
        request: Request<AuditRequest>,
    ) -> Result<Response<AuditResponse>, Status> {
        let grace =
            std::time::Duration::from_secs(request.get_ref().grace_seconds.max(0).unsigned_abs());
        let stock = self.store.all_stock().await?;
        let overdue = self.store.overdue_holds(grace).await?;
        Ok(Response::new(AuditResponse {
            stock: stock.into_iter().map(to_message).collect(),
            overdue_holds: overdue
                .into_iter()
                .map(|id| id.hyphenated().to_string())
                .collect(),
        }))
    }
}
