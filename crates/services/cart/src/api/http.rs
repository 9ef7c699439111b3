//! The public HTTP API: `/api/v1/cart`.

use std::collections::HashMap;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post, put};
use serde::{Deserialize, Serialize};
use shopmesh_auth::AuthUser;
use shopmesh_problem::extract::{Json, Path};
use shopmesh_proto::catalog::v1::GetProductsRequest;
use uuid::Uuid;

use crate::AppState;
use crate::domain::Quantity;
use crate::error::Error;

/// The cart's HTTP routes (all need a signed-in customer; each sees only their own cart).
pub fn routes(state: AppState) -> Router {
    Router::new()
        .route("/api/v1/cart", get(read).delete(clear))
        .route("/api/v1/cart/items", post(add))
        .route("/api/v1/cart/items/{product_id}", put(set).delete(remove))
        .with_state(state)
}

/// A cart line, priced now.
#[derive(Debug, Serialize)]
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
#[derive(Debug, Serialize)]
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

async fn read(State(state): State<AppState>, caller: AuthUser) -> Result<Json<CartView>, Error> {
    Ok(Json(view(&state, caller.id).await?))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AddItem {
    product_id: Uuid,
    quantity: i64,
}

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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SetQuantity {
    quantity: i64,
}

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

async fn remove(
    State(state): State<AppState>,
    caller: AuthUser,
    Path(product_id): Path<Uuid>,
) -> Result<Json<CartView>, Error> {
    state.store.remove(caller.id, product_id).await?;
    Ok(Json(view(&state, caller.id).await?))
}

async fn clear(State(state): State<AppState>, caller: AuthUser) -> Result<StatusCode, Error> {
    state.store.clear(caller.id).await?;
    Ok(StatusCode::NO_CONTENT)
}
