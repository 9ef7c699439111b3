//! The internal gRPC API (`shopmesh.cart.v1.Cart`), for orders.

use shopmesh_proto::cart::v1::cart_server::{Cart, CartServer};
use shopmesh_proto::cart::v1::{
    CartLine, GetCartRequest, GetCartResponse, RemoveLinesRequest, RemoveLinesResponse,
};
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::store::Store;

/// The gRPC service.
#[derive(Debug, Clone)]
pub struct CartGrpc {
    store: Store,
}

impl CartGrpc {
    /// The tonic server for this service.
    pub fn server(store: Store) -> CartServer<CartGrpc> {
        CartServer::new(CartGrpc { store })
    }
}

fn uuid(raw: &str, what: &str) -> Result<Uuid, Status> {
    Uuid::parse_str(raw).map_err(|_| Status::invalid_argument(format!("{what} must be a UUID")))
}

#[tonic::async_trait]
impl Cart for CartGrpc {
    async fn get_cart(
        &self,
        request: Request<GetCartRequest>,
    ) -> Result<Response<GetCartResponse>, Status> {
        let user = uuid(&request.get_ref().user_id, "user_id")?;
        let lines = self.store.lines(user).await?;
        Ok(Response::new(GetCartResponse {
            lines: lines
                .into_iter()
                .map(|(product, quantity)| CartLine {
                    product_id: product.hyphenated().to_string(),
                    quantity,
                })
                .collect(),
        }))
    }

    async fn remove_lines(
        &self,
        request: Request<RemoveLinesRequest>,
    ) -> Result<Response<RemoveLinesResponse>, Status> {
        let request = request.into_inner();
        let user = uuid(&request.user_id, "user_id")?;
        let lines = request
            .lines
            .iter()
            .map(|l| Ok((uuid(&l.product_id, "product_id")?, l.quantity)))
            .collect::<Result<Vec<_>, Status>>()?;
        self.store.remove_lines(user, &lines).await?;
        Ok(Response::new(RemoveLinesResponse {}))
    }
}
