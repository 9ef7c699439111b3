//! The public HTTP API: `/api/v1/inventory/{product_id}`.

use axum::extract::State;
use serde::{Deserialize, Serialize};
use shopmesh_auth::AdminUser;
use shopmesh_problem::ProblemBody;
use shopmesh_problem::extract::{Json, Path};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::AppState;
use crate::domain::{Quantity, StockLevel};
use crate::error::Error;

/// The inventory's HTTP routes, with their OpenAPI document.
pub fn routes(state: AppState) -> OpenApiRouter {
    OpenApiRouter::new()
        .routes(routes!(read, add, remove))
        .with_state(state)
}

/// A product's stock as the API shows it.
#[derive(Debug, Serialize, ToSchema)]
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

/// Units to add or remove.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct Change {
    quantity: i64,
}

/// A product's stock (zero for a product never stocked).
#[utoipa::path(get, path = "/api/v1/inventory/{product_id}", tag = "inventory", params(("product_id" = Uuid, Path, description = "The product's id")),
    responses((status = 200, description = "Its stock", body = StockView)))]
async fn read(
    State(state): State<AppState>,
    Path(product_id): Path<Uuid>,
) -> Result<Json<StockView>, Error> {
    Ok(Json(state.store.stock(product_id).await?.into()))
}

/// Adds stock (admins).
#[utoipa::path(post, path = "/api/v1/inventory/{product_id}", tag = "inventory", security(("bearer" = [])), params(("product_id" = Uuid, Path, description = "The product's id")), request_body = Change,
    responses(
        (status = 200, description = "The new stock", body = StockView),
        (status = 401, description = "No valid token", body = ProblemBody, content_type = "application/problem+json"),
        (status = 403, description = "Not an admin", body = ProblemBody, content_type = "application/problem+json"),
        (status = 422, description = "Invalid quantity", body = ProblemBody, content_type = "application/problem+json"),
    ))]
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

/// Removes stock (admins), never below what is reserved.
#[utoipa::path(delete, path = "/api/v1/inventory/{product_id}", tag = "inventory", security(("bearer" = [])), params(("product_id" = Uuid, Path, description = "The product's id")), request_body = Change,
    responses(
        (status = 200, description = "The new stock", body = StockView),
        (status = 401, description = "No valid token", body = ProblemBody, content_type = "application/problem+json"),
        (status = 403, description = "Not an admin", body = ProblemBody, content_type = "application/problem+json"),
        (status = 409, description = "More than is free", body = ProblemBody, content_type = "application/problem+json"),
        (status = 422, description = "Invalid quantity", body = ProblemBody, content_type = "application/problem+json"),
    ))]
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
