//! The public HTTP API: `/api/v1/inventory/{product_id}`.

use axum::Router;
use axum::extract::State;
use axum::routing::get;
use serde::{Deserialize, Serialize};
use shopmesh_auth::AdminUser;
use shopmesh_problem::extract::{Json, Path};
use uuid::Uuid;

use crate::AppState;
use crate::domain::{Quantity, StockLevel};
use crate::error::Error;

/// The inventory's HTTP routes.
pub fn routes(state: AppState) -> Router {
    Router::new()
        .route(
            "/api/v1/inventory/{product_id}",
            get(read).post(add).delete(remove),
        )
        .with_state(state)
}

/// A product's stock as the API shows it.
#[derive(Debug, Serialize)]
struct StockView {
    product_id: Uuid,
    /// Units that can be ordered now.
    available: i64,
    /// Units held for unpaid orders.
    reserved: i64,
}

impl From<StockLevel> for StockView {
    fn from(level: StockLevel) -> Self {
        StockView {
            product_id: level.product_id,
            available: level.available(),
            reserved: level.reserved,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Change {
    quantity: i64,
}

async fn read(
    State(state): State<AppState>,
    Path(product_id): Path<Uuid>,
) -> Result<Json<StockView>, Error> {
    Ok(Json(state.store.stock(product_id).await?.into()))
}

async fn add(
    State(state): State<AppState>,
    _admin: AdminUser,
    Path(product_id): Path<Uuid>,
    Json(change): Json<Change>,
) -> Result<Json<StockView>, Error> {
    let quantity = Quantity::parse("quantity", change.quantity)?;
    let level = state.store.add(product_id, quantity).await?;
    tracing::info!(%product_id, quantity = quantity.get(), "stock added");
    Ok(Json(level.into()))
}

async fn remove(
    State(state): State<AppState>,
    _admin: AdminUser,
    Path(product_id): Path<Uuid>,
    Json(change): Json<Change>,
) -> Result<Json<StockView>, Error> {
    let quantity = Quantity::parse("quantity", change.quantity)?;
    let level = state.store.remove(product_id, quantity).await?;
    tracing::info!(%product_id, quantity = quantity.get(), "stock removed");
    Ok(Json(level.into()))
}
