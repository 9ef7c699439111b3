//! The internal gRPC API (`shopmesh.catalog.v1.Catalog`).

use shopmesh_proto::catalog::v1::catalog_server::{Catalog, CatalogServer};
use shopmesh_proto::catalog::v1::{
    GetProductsRequest, GetProductsResponse, Product as ProductMessage,
};
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::domain::Product;
use crate::store::Store;

/// Most ids in one `GetProducts`.
const MAX_IDS: usize = 100;

/// The gRPC service.
#[derive(Debug, Clone)]
pub struct CatalogGrpc {
    store: Store,
}

impl CatalogGrpc {
    /// The tonic server for this service.
    pub fn server(store: Store) -> CatalogServer<CatalogGrpc> {
        CatalogServer::new(CatalogGrpc { store })
    }
}

fn to_message(p: Product) -> ProductMessage {
    let purchasable = p.purchasable();
    ProductMessage {
        id: p.id.hyphenated().to_string(),
        sku: p.draft.sku.as_str().to_owned(),
        name: p.draft.name.as_str().to_owned(),
        price: p.draft.price.minor(),
        currency: p.draft.currency.as_str().to_owned(),
        category: p.draft.category.as_str().to_owned(),
        image_url: p
            .draft
            .image_url
            .map(|u| u.as_str().to_owned())
            .unwrap_or_default(),
        purchasable,
    }
}

#[tonic::async_trait]
impl Catalog for CatalogGrpc {
    async fn get_products(
        &self,
        request: Request<GetProductsRequest>,
    ) -> Result<Response<GetProductsResponse>, Status> {
        let ids = &request.get_ref().ids;
        if ids.len() > MAX_IDS {
            return Err(Status::invalid_argument(format!("at most {MAX_IDS} ids")));
        }
        let ids: Vec<Uuid> = ids
            .iter()
            .map(|id| Uuid::parse_str(id))
            .collect::<Result<_, _>>()
            .map_err(|_| Status::invalid_argument("every id must be a UUID"))?;
        let products = self.store.by_ids(&ids).await?;
        Ok(Response::new(GetProductsResponse {
            products: products.into_iter().map(to_message).collect(),
        }))
    }
}
