//! The public HTTP API: `/api/v1/cart`.

use std::collections::HashMap;

use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use shopmesh_auth::AuthUser;
use shopmesh_problem::ProblemBody;
use shopmesh_problem::extract::{Json, Path};
use shopmesh_proto::catalog::v1::GetProductsRequest;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::AppState;
use crate::domain::Quantity;
use crate::error::Error;

/// The cart's HTTP routes (all need a signed-in customer; each sees only their own cart), with
/// their OpenAPI document.
pub fn routes(state: AppState) -> OpenApiRouter {
    OpenApiRouter::new()
        .routes(routes!(read, clear))
        .routes(routes!(add))
        .routes(routes!(set, remove))
        .with_state(state)
}

/// A cart line, priced now.
#[derive(Debug, Serialize, ToSchema)]
struct LineView {
    product_id: Uuid,
    quantity: i64,
    sku: Option<String>,
    name: Option<String>,
    unit_price: Option<i64>,
    line_total: Option<i64>,
    /// False when the product was deleted or taken off sale: it cannot be ordered.
    purchasable: bool,
}

/// The cart, priced from the catalog at read time.
#[derive(Debug, Serialize, ToSchema)]
struct CartView {
    items: Vec<LineView>,
    /// Sum of the purchasable lines; `null` if they are in several currencies.
    total: Option<i64>,
    currency: Option<String>,
}

async fn view(state: &AppState, user: Uuid) -> Result<CartView, Error> {
    let lines = state.store.lines(user).await?;
    if lines.is_empty() {
        return Ok(CartView {
            items: Vec::new(),
            total: Some(0),
            currency: None,
        });
    }
    let ids = lines
        .iter()
        .map(|(p, _)| p.hyphenated().to_string())
        .collect();
    let products = state
        .catalog
        .clone()
        .get_products(GetProductsRequest { ids })
        .await
        .map_err(|_| Error::CatalogUnavailable)?
        .into_inner()
        .products;
    let by_id: HashMap<String, _> = products.into_iter().map(|p| (p.id.clone(), p)).collect();
    let mut items = Vec::with_capacity(lines.len());
    let mut currencies = std::collections::BTreeSet::new();
    let mut total: Option<i64> = Some(0);
    for (product_id, quantity) in lines {
        let product = by_id.get(&product_id.hyphenated().to_string());
        let purchasable = product.is_some_and(|p| p.purchasable);
        let line_total = product.and_then(|p| p.price.checked_mul(quantity));
        if purchasable {
            if let Some(p) = product {
                currencies.insert(p.currency.clone());
            }
            total = total.zip(line_total).and_then(|(t, l)| t.checked_add(l));
        }
        items.push(LineView {
            product_id,
            quantity,
            sku: product.map(|p| p.sku.clone()),
            name: product.map(|p| p.name.clone()),
            unit_price: product.map(|p| p.price),
            line_total,
            purchasable,
        });
    }
    let single = currencies.len() <= 1;
    Ok(CartView {
        items,
        total: total.filter(|_| single),
        currency: currencies.into_iter().next().filter(|_| single),
    })
}

/// The caller's cart, priced now.
#[utoipa::path(get, path = "/api/v1/cart", tag = "cart", security(("bearer" = [])),
    responses((status = 200, description = "The cart", body = CartView), (status = 401, description = "No valid token", body = ProblemBody, content_type = "application/problem+json")))]
async fn read(State(state): State<AppState>, caller: AuthUser) -> Result<Json<CartView>, Error> {
    Ok(Json(view(&state, caller.id).await?))
}

/// A product to add, and how many.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct AddItem {
    product_id: Uuid,
    quantity: i64,
}

/// Adds units of a product to the caller's cart.
#[utoipa::path(post, path = "/api/v1/cart/items", tag = "cart", security(("bearer" = [])), request_body = AddItem,
    responses(
        (status = 200, description = "The cart", body = CartView),
        (status = 401, description = "No valid token", body = ProblemBody, content_type = "application/problem+json"),
        (status = 409, description = "Cart full", body = ProblemBody, content_type = "application/problem+json"),
        (status = 422, description = "Unavailable product or invalid quantity", body = ProblemBody, content_type = "application/problem+json"),
    ))]
async fn add(
    State(state): State<AppState>,
    caller: AuthUser,
    Json(body): Json<AddItem>,
) -> Result<Json<CartView>, Error> {
    let quantity = Quantity::parse(body.quantity)?;
    let products = state
        .catalog
        .clone()
        .get_products(GetProductsRequest {
            ids: vec![body.product_id.hyphenated().to_string()],
        })
        .await
        .map_err(|_| Error::CatalogUnavailable)?
        .into_inner()
        .products;
    if !products.iter().any(|p| p.purchasable) {
        return Err(Error::ProductUnavailable);
    }
    state
        .store
        .add(caller.id, body.product_id, quantity)
        .await?;
    Ok(Json(view(&state, caller.id).await?))
}

/// The new quantity.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct SetQuantity {
    quantity: i64,
}

/// Sets how many of a product the cart holds.
#[utoipa::path(put, path = "/api/v1/cart/items/{product_id}", tag = "cart", security(("bearer" = [])), params(("product_id" = Uuid, Path, description = "The product's id")), request_body = SetQuantity,
    responses(
        (status = 200, description = "The cart", body = CartView),
        (status = 401, description = "No valid token", body = ProblemBody, content_type = "application/problem+json"),
        (status = 404, description = "Not in the cart", body = ProblemBody, content_type = "application/problem+json"),
        (status = 422, description = "Invalid quantity", body = ProblemBody, content_type = "application/problem+json"),
    ))]
async fn set(
    State(state): State<AppState>,
    caller: AuthUser,
    Path(product_id): Path<Uuid>,
    Json(body): Json<SetQuantity>,
) -> Result<Json<CartView>, Error> {
    let quantity = Quantity::parse(body.quantity)?;
    state.store.set(caller.id, product_id, quantity).await?;
    Ok(Json(view(&state, caller.id).await?))
}

/// Takes a product out of the cart.
#[utoipa::path(delete, path = "/api/v1/cart/items/{product_id}", tag = "cart", security(("bearer" = [])), params(("product_id" = Uuid, Path, description = "The product's id")),
    responses((status = 200, description = "The cart", body = CartView), (status = 401, description = "No valid token", body = ProblemBody, content_type = "application/problem+json")))]
async fn remove(
    State(state): State<AppState>,
    caller: AuthUser,
    Path(product_id): Path<Uuid>,
) -> Result<Json<CartView>, Error> {
    state.store.remove(caller.id, product_id).await?;
    Ok(Json(view(&state, caller.id).await?))
}

/// Empties the cart.
#[utoipa::path(delete, path = "/api/v1/cart", tag = "cart", security(("bearer" = [])),
    responses((status = 204, description = "Emptied"), (status = 401, description = "No valid token", body = ProblemBody, content_type = "application/problem+json")))]
async fn clear(State(state): State<AppState>, caller: AuthUser) -> Result<StatusCode, Error> {
    state.store.clear(caller.id).await?;
    Ok(StatusCode::NO_CONTENT)
}
