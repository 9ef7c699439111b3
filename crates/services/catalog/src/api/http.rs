//! The public HTTP API: `/api/v1/products`.

use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};
use shopmesh_auth::AdminUser;
use shopmesh_problem::ProblemBody;
use shopmesh_problem::extract::{Json, Path, Query};
use shopmesh_proto::inventory::v1::GetStockRequest;
use shopmesh_runtime::paging::{self, Page};
use time::OffsetDateTime;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::AppState;
use crate::domain::{
    Category, Currency, Description, ImageUrl, Price, Product, ProductDraft, ProductName, Sku, Sort,
};
use crate::error::Error;
use crate::store::{After, ListQuery};

/// The catalog's HTTP routes, with their OpenAPI document.
pub fn routes(state: AppState) -> OpenApiRouter {
    OpenApiRouter::new()
        .routes(routes!(list, create))
        .routes(routes!(read, replace, amend, remove))
        .with_state(state)
}

/// A product as the API shows it.
#[derive(Debug, Serialize, ToSchema)]
pub struct ProductView {
    id: Uuid,
    sku: String,
    name: String,
    description: String,
    /// Integer minor units of `currency`.
    price: i64,
    currency: String,
    category: String,
    image_url: Option<String>,
    active: bool,
    #[serde(with = "time::serde::rfc3339")]
    created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    updated_at: OffsetDateTime,
    /// Units that can be ordered: on a product page, asked from the inventory now; in lists
    /// (and on a page when the inventory does not answer), as of its last `stock.changed`
    /// event. Absent when unknown.
    #[serde(skip_serializing_if = "Option::is_none")]
    available: Option<i64>,
}

impl From<Product> for ProductView {
    fn from(p: Product) -> Self {
        ProductView {
            id: p.id,
            sku: p.draft.sku.as_str().to_owned(),
            name: p.draft.name.as_str().to_owned(),
            description: p.draft.description.as_str().to_owned(),
            price: p.draft.price.minor(),
            currency: p.draft.currency.as_str().to_owned(),
            category: p.draft.category.as_str().to_owned(),
            image_url: p.draft.image_url.map(|u| u.as_str().to_owned()),
            active: p.draft.active,
            created_at: p.created_at,
            updated_at: p.updated_at,
            available: p.available,
        }
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct ListParams {
    /// Words to find in the name or description (case-insensitive).
    q: Option<String>,
    /// Only this category.
    category: Option<String>,
    /// `name` (default), `-name`, `price` or `-price`.
    sort: Option<String>,
    /// Page size, 1 to 100 (default 20).
    limit: Option<u32>,
    /// The `next_cursor` of the previous page (same sort).
    cursor: Option<String>,
}

/// What a cursor carries: the sort it belongs to and the last key seen.
#[derive(Debug, Serialize, Deserialize)]
struct Cursor {
    s: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    n: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    p: Option<i64>,
    id: Uuid,
}

fn encode_cursor(sort: Sort, product: &Product) -> String {
    let cursor = match sort {
        Sort::NameAsc | Sort::NameDesc => Cursor {
            s: sort.as_str().to_owned(),
            n: Some(product.draft.name.as_str().to_owned()),
            p: None,
            id: product.id,
        },
        Sort::PriceAsc | Sort::PriceDesc => Cursor {
            s: sort.as_str().to_owned(),
            n: None,
            p: Some(product.draft.price.minor()),
            id: product.id,
        },
    };
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(&cursor).unwrap_or_default())
}

fn decode_cursor(raw: &str, sort: Sort) -> Result<After, Error> {
    let bytes = URL_SAFE_NO_PAD.decode(raw).map_err(|_| Error::BadCursor)?;
    let cursor: Cursor = serde_json::from_slice(&bytes).map_err(|_| Error::BadCursor)?;
    if cursor.s != sort.as_str() {
        return Err(Error::BadCursor);
    }
    match (sort, cursor.n, cursor.p) {
        (Sort::NameAsc | Sort::NameDesc, Some(name), None) => Ok(After::Name(name, cursor.id)),
        (Sort::PriceAsc | Sort::PriceDesc, None, Some(price)) => Ok(After::Price(price, cursor.id)),
        _ => Err(Error::BadCursor),
    }
}

/// Products on sale: search, filter, sort, page.
#[utoipa::path(get, path = "/api/v1/products", tag = "catalog", params(ListParams),
    responses(
        (status = 200, description = "A page of products", body = Page<ProductView>),
        (status = 400, description = "Bad limit, cursor or unknown parameter", body = ProblemBody, content_type = "application/problem+json"),
        (status = 422, description = "Bad sort or category", body = ProblemBody, content_type = "application/problem+json"),
    ))]
async fn list(
    State(state): State<AppState>,
    Query(params): Query<ListParams>,
) -> Result<Response, Error> {
    let limit = paging::limit(params.limit)?;
    let sort = params
        .sort
        .as_deref()
        .map(Sort::parse)
        .transpose()?
        .unwrap_or(Sort::NameAsc);
    let category = params
        .category
        .as_deref()
        .filter(|c| !c.is_empty())
        .map(Category::parse)
        .transpose()?;
    if params.q.as_ref().is_some_and(|q| q.chars().count() > 100) {
        return Err(shopmesh_problem::Invalid::new(
            "q",
            "invalid_query",
            "must be at most 100 characters",
        )
        .into());
    }
    let after = params
        .cursor
        .as_deref()
        .map(|c| decode_cursor(c, sort))
        .transpose()?;
    let rows = state
        .store
        .list(&ListQuery {
            category,
            q: params.q,
            sort,
            after,
            limit: limit + 1,
        })
        .await?;
    Ok(cacheable(
        &state,
        Json(Page::from_rows(rows, limit, |p| encode_cursor(sort, p)).map(ProductView::from)),
    ))
}

/// An anonymous read's answer, with the `Cache-Control` that lets the gateway reuse it for a
/// moment (lists already show availability as of the last `stock.changed`).
fn cacheable(state: &AppState, answer: impl IntoResponse) -> Response {
    let mut response = answer.into_response();
    if let Some(control) = &state.cache_control {
        response
            .headers_mut()
            .insert(axum::http::header::CACHE_CONTROL, control.clone());
    }
    response
}

/// What an admin sends to create or replace a product. Everything but the id.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct ProductInput {
    sku: String,
    name: String,
    #[serde(default)]
    description: String,
    price: i64,
    currency: String,
    category: String,
    image_url: Option<String>,
    active: Option<bool>,
}

impl ProductInput {
    fn parse(self) -> Result<ProductDraft, Error> {
        Ok(ProductDraft {
            sku: Sku::parse(&self.sku)?,
            name: ProductName::parse(&self.name)?,
            description: Description::parse(&self.description)?,
            price: Price::parse(self.price)?,
            currency: Currency::parse(&self.currency)?,
            category: Category::parse(&self.category)?,
            image_url: self.image_url.as_deref().map(ImageUrl::parse).transpose()?,
            active: self.active.unwrap_or(true),
        })
    }
}

/// A partial change: only the fields present are changed.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct ProductPatch {
    sku: Option<String>,
    name: Option<String>,
    description: Option<String>,
    price: Option<i64>,
    currency: Option<String>,
    category: Option<String>,
    image_url: Option<String>,
    active: Option<bool>,
}

impl ProductPatch {
    fn apply(self, mut draft: ProductDraft) -> Result<ProductDraft, Error> {
        if let Some(v) = self.sku {
            draft.sku = Sku::parse(&v)?;
        }
        if let Some(v) = self.name {
            draft.name = ProductName::parse(&v)?;
        }
        if let Some(v) = self.description {
            draft.description = Description::parse(&v)?;
        }
        if let Some(v) = self.price {
            draft.price = Price::parse(v)?;
        }
        if let Some(v) = self.currency {
            draft.currency = Currency::parse(&v)?;
        }
        if let Some(v) = self.category {
            draft.category = Category::parse(&v)?;
        }
        if let Some(v) = self.image_url {
            draft.image_url = Some(ImageUrl::parse(&v)?);
        }
        if let Some(v) = self.active {
            draft.active = v;
        }
        Ok(draft)
    }
}

/// Creates a product (admins).
#[utoipa::path(post, path = "/api/v1/products", tag = "catalog", security(("bearer" = [])), request_body = ProductInput,
    responses(
        (status = 201, description = "The product", body = ProductView),
        (status = 400, description = "Malformed body or unknown field", body = ProblemBody, content_type = "application/problem+json"),
        (status = 401, description = "No valid token", body = ProblemBody, content_type = "application/problem+json"),
        (status = 403, description = "Not an admin", body = ProblemBody, content_type = "application/problem+json"),
        (status = 409, description = "SKU already used", body = ProblemBody, content_type = "application/problem+json"),
        (status = 422, description = "Invalid value", body = ProblemBody, content_type = "application/problem+json"),
    ))]
async fn create(
    State(state): State<AppState>,
    _admin: AdminUser,
    Json(input): Json<ProductInput>,
) -> Result<Response, Error> {
    let draft = input.parse()?;
    let product = state.store.insert(Uuid::now_v7(), &draft).await?;
    tracing::info!(product_id = %product.id, sku = product.draft.sku.as_str(), "product created");
    let location = HeaderValue::try_from(format!("/api/v1/products/{}", product.id))
        .map_err(|e| Error::Internal(e.into()))?;
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Json(ProductView::from(product)),
    )
        .into_response())
}

/// One product, with the units available now.
#[utoipa::path(get, path = "/api/v1/products/{id}", tag = "catalog", params(("id" = Uuid, Path, description = "The product's id")),
    responses(
        (status = 200, description = "The product", body = ProductView),
        (status = 404, description = "No such product", body = ProblemBody, content_type = "application/problem+json"),
    ))]
async fn read(State(state): State<AppState>, Path(id): Path<Uuid>) -> Result<Response, Error> {
    let product = state.store.get(id).await?.ok_or(Error::NotFound)?;
    let mut view = ProductView::from(product);
    let asked = state
        .inventory
        .clone()
        .get_stock(GetStockRequest {
            product_ids: vec![id.hyphenated().to_string()],
        })
        .await;
    match asked {
        Ok(stock) => {
            view.available = stock.into_inner().stock.first().map(|s| s.available);
            Ok(cacheable(&state, Json(view)))
        }
        Err(status) => {
            tracing::debug!(product_id = %id, error = %status, "no availability for the product page");
            // A degraded page: not to be reused in place of a good one.
            Ok(Json(view).into_response())
        }
    }
}

/// Replaces a product (admins).
#[utoipa::path(put, path = "/api/v1/products/{id}", tag = "catalog", security(("bearer" = [])), params(("id" = Uuid, Path, description = "The product's id")), request_body = ProductInput,
    responses(
        (status = 200, description = "The product", body = ProductView),
        (status = 401, description = "No valid token", body = ProblemBody, content_type = "application/problem+json"),
        (status = 403, description = "Not an admin", body = ProblemBody, content_type = "application/problem+json"),
        (status = 404, description = "No such product", body = ProblemBody, content_type = "application/problem+json"),
        (status = 422, description = "Invalid value", body = ProblemBody, content_type = "application/problem+json"),
    ))]
async fn replace(
    State(state): State<AppState>,
    _admin: AdminUser,
    Path(id): Path<Uuid>,
    Json(input): Json<ProductInput>,
) -> Result<Json<ProductView>, Error> {
    let draft = input.parse()?;
    let product = state
        .store
        .update(id, &draft)
        .await?
        .ok_or(Error::NotFound)?;
    Ok(Json(product.into()))
}

/// Changes some fields of a product (admins).
#[utoipa::path(patch, path = "/api/v1/products/{id}", tag = "catalog", security(("bearer" = [])), params(("id" = Uuid, Path, description = "The product's id")), request_body = ProductPatch,
    responses(
        (status = 200, description = "The product", body = ProductView),
        (status = 401, description = "No valid token", body = ProblemBody, content_type = "application/problem+json"),
        (status = 403, description = "Not an admin", body = ProblemBody, content_type = "application/problem+json"),
        (status = 404, description = "No such product", body = ProblemBody, content_type = "application/problem+json"),
        (status = 422, description = "Invalid value", body = ProblemBody, content_type = "application/problem+json"),
    ))]
async fn amend(
    State(state): State<AppState>,
    _admin: AdminUser,
    Path(id): Path<Uuid>,
    Json(patch): Json<ProductPatch>,
) -> Result<Json<ProductView>, Error> {
    let current = state.store.get(id).await?.ok_or(Error::NotFound)?;
    let draft = patch.apply(current.draft)?;
    let product = state
        .store
        .update(id, &draft)
        .await?
        .ok_or(Error::NotFound)?;
    Ok(Json(product.into()))
}

/// Deletes a product (admins); past orders keep naming it.
#[utoipa::path(delete, path = "/api/v1/products/{id}", tag = "catalog", security(("bearer" = [])), params(("id" = Uuid, Path, description = "The product's id")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 401, description = "No valid token", body = ProblemBody, content_type = "application/problem+json"),
        (status = 403, description = "Not an admin", body = ProblemBody, content_type = "application/problem+json"),
        (status = 404, description = "No such product", body = ProblemBody, content_type = "application/problem+json"),
    ))]
async fn remove(
    State(state): State<AppState>,
    _admin: AdminUser,
    Path(id): Path<Uuid>,
) -> Result<StatusCode, Error> {
    if state.store.delete(id).await? {
        tracing::info!(product_id = %id, "product deleted");
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(Error::NotFound)
    }
}
