//! The public HTTP API: `/api/v1/orders`.

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use shopmesh_auth::AuthUser;
use shopmesh_problem::extract::{Json, Path, Query};
use shopmesh_problem::{Invalid, Problem, ProblemBody};
use shopmesh_proto::payments::v1::Card;
use shopmesh_runtime::paging::{self, Page};
use time::OffsetDateTime;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::AppState;
use crate::domain::{IdempotencyKey, Request, Status};
use crate::error::Error;
use crate::idempotency::{self, Begun};
use crate::store::{Answered, KeyAnswer, Order, StoredResponse};

/// The orders' HTTP routes, with their OpenAPI document.
pub fn routes(state: AppState) -> OpenApiRouter {
    OpenApiRouter::new()
        .routes(routes!(create, list))
        .routes(routes!(read))
        .routes(routes!(pay))
        .routes(routes!(cancel))
        .with_state(state)
}

/// A line as the API shows it.
#[derive(Debug, Serialize, ToSchema)]
struct LineView {
    product_id: Uuid,
    sku: String,
    name: String,
    unit_price: i64,
    quantity: i64,
    line_total: i64,
}

/// An order as the API shows it.
#[derive(Debug, Serialize, ToSchema)]
struct OrderView {
    id: Uuid,
    /// `pending`, `awaiting_payment`, `paid`, `cancelled` or `expired`.
    #[schema(value_type = String)]
    status: &'static str,
    lines: Vec<LineView>,
    total: i64,
    currency: String,
    #[serde(with = "time::serde::rfc3339")]
    expires_at: OffsetDateTime,
    #[serde(skip_serializing_if = "Option::is_none")]
    card_last4: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    updated_at: OffsetDateTime,
}

impl From<Order> for OrderView {
    fn from(o: Order) -> Self {
        OrderView {
            id: o.id,
            status: o.status.as_str(),
            lines: o
                .lines
                .into_iter()
                .map(|l| LineView {
                    line_total: l.total().unwrap_or(i64::MAX),
                    product_id: l.product_id,
                    sku: l.sku,
                    name: l.name,
                    unit_price: l.unit_price,
                    quantity: l.quantity,
                })
                .collect(),
            total: o.total,
            currency: o.currency,
            expires_at: o.expires_at,
            card_last4: o.card_last4,
            created_at: o.created_at,
            updated_at: o.updated_at,
        }
    }
}

/// `{"items": [...]}` or `{"from_cart": true}`. Prices and totals are not accepted: they
/// come from the catalog.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct CreateOrder {
    items: Option<Vec<Item>>,
    from_cart: Option<bool>,
}

/// One line: a product and how many.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct Item {
    product_id: String,
    quantity: i64,
}

/// A stable fingerprint of the parsed request: the same order asked twice hashes the same.
fn fingerprint(request: &Request) -> String {
    let mut hasher = Sha256::new();
    for (product, quantity) in &request.lines {
        hasher.update(format!("{}:{quantity};", product.hyphenated()));
    }
    format!("{:x}", hasher.finalize())
}

fn stored(status: StatusCode, body: String) -> Response {
    let content_type = if status.is_success() {
        "application/json"
    } else {
        shopmesh_problem::CONTENT_TYPE
    };
    let mut response = (status, body).into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// Places an order from explicit lines or from the cart; prices come from the catalog, stock is
/// reserved until the order is paid or expires.
#[utoipa::path(post, path = "/api/v1/orders", tag = "orders", security(("bearer" = [])), request_body = CreateOrder,
    params(("Idempotency-Key" = String, Header, description = "Unique per new order; a retry with the same key and body gets the same answer")),
    responses(
        (status = 201, description = "The order, awaiting payment", body = OrderView),
        (status = 400, description = "No Idempotency-Key, malformed body, or a price or total sent", body = ProblemBody, content_type = "application/problem+json"),
        (status = 401, description = "No valid token", body = ProblemBody, content_type = "application/problem+json"),
        (status = 409, description = "Not enough stock, or the first request with this key is still running", body = ProblemBody, content_type = "application/problem+json"),
        (status = 422, description = "Invalid line, unavailable product, empty cart, or key reused with another body", body = ProblemBody, content_type = "application/problem+json"),
        (status = 503, description = "A service did not answer; retry with the same key", body = ProblemBody, content_type = "application/problem+json"),
    ))]
async fn create(
    State(state): State<AppState>,
    caller: AuthUser,
    headers: HeaderMap,
    Json(body): Json<CreateOrder>,
) -> Result<Response, Error> {
    let key = headers
        .get("idempotency-key")
        .ok_or(Error::MissingIdempotencyKey)?
        .to_str()
        .map_err(|_| Error::MissingIdempotencyKey)?;
    let key = IdempotencyKey::parse(key)?;
    // Explicit lines are checked before the key is claimed; a cart is read after, so that a
    // replay answers as the first time even when the cart has been emptied since.
    let (explicit, hash) = match (body.items, body.from_cart) {
        (Some(items), None | Some(false)) => {
            let items: Vec<(String, i64)> = items
                .into_iter()
                .map(|i| (i.product_id, i.quantity))
                .collect();
            let request = Request::parse(&items)?;
            let hash = fingerprint(&request);
            (Some(request), hash)
        }
        (None, Some(true)) => (None, "from_cart".to_owned()),
        _ => {
            return Err(Invalid::new(
                "items",
                "invalid_order_request",
                "must be given, or else \"from_cart\": true (not both)",
            )
            .into());
        }
    };
    // A first attempt still in flight (its process frozen, or dead but not yet known to be)
    // is waited for: it finishes and its answer is replayed, or it is found abandoned and the
    // key taken over. A 409 only if neither happens within the caller's patience.
    let answer_of = |order: Order| {
        let body = serde_json::to_string(&OrderView::from(order))
            .map_err(|e| Error::Internal(e.into()))?;
        Ok(StoredResponse { status: 201, body })
    };
    // Explicit lines are priced before the key is claimed, so that the claim and the pending
    // order are one commit. If pricing fails, the key is claimed first as for a cart, and the
    // failure, met again, becomes the key's answer.
    let priced = match &explicit {
        Some(request) => state.saga.price(request).await.ok(),
        None => None,
    };
    let claimed = match idempotency::begin(
        &state.store,
        caller.id,
        key.as_str(),
        &hash,
        crate::saga::patience(),
        answer_of,
        priced.as_ref(),
    )
    .await?
    {
        Begun::Claimed(claimed) => claimed,
        Begun::Replay(response) => {
            let status = StatusCode::from_u16(response.status).unwrap_or(StatusCode::OK);
            let mut replay = stored(status, response.body);
            replay
                .headers_mut()
                .insert("idempotent-replayed", HeaderValue::from_static("true"));
            return Ok(replay);
        }
        Begun::Recovered { order_id, answer } => return Ok(created(order_id, answer.body)),
    };
    let order_id = claimed.order_id();
    let from_cart = explicit.is_none();
    // The key's answer is stored in the transaction that places the order: one commit.
    let render = |order: &Order| answer_of(order.clone());
    let answer = claimed.answer(&render);
    let outcome = match (explicit, priced) {
        (Some(request), Some(priced)) if claimed.placed() => state
            .saga
            .place_priced(order_id, &priced, Some(&answer))
            .await
            .map(|o| (o, request)),
        (Some(request), _) => state
            .saga
            .place(caller.id, order_id, &request, Some(&answer))
            .await
            .map(|o| (o, request)),
        (None, _) => place_from_cart(&state, caller.id, order_id, &answer).await,
    };
    let (status, body) = match outcome {
        Ok(((order, answered), request)) => {
            if from_cart {
                state.saga.take_from_cart(caller.id, &request).await;
            }
            match answered {
                Some(Answered::Kept(response)) => {
                    claimed.answered();
                    return Ok(created(order_id, response.body));
                }
                Some(Answered::TakenOver) => {
                    claimed.answered();
                    tracing::warn!(%order_id, "idempotency key taken over while its request ran");
                    return Err(Error::InFlight);
                }
                None => (
                    StatusCode::CREATED,
                    serde_json::to_string(&OrderView::from(order))
                        .map_err(|e| Error::Internal(e.into()))?,
                ),
            }
        }
        Err(error) => {
            let problem = Problem::from(error);
            if problem.status().is_server_error() {
                // Worth retrying with the same key: forget it when surely nothing was placed
                // (no order, or a rejected one). Otherwise (placed after all, a rollback still
                // pending, or the order could not be read) the key is left for the retry to
                // take over: it answers with the order, or waits for the rollback, or starts
                // afresh once there is nothing. Never a second order.
                let nothing_placed = matches!(
                    state.store.order(order_id).await,
                    Ok(None)
                        | Ok(Some(Order {
                            status: Status::Rejected,
                            ..
                        }))
                );
                if nothing_placed {
                    claimed.release().await?;
                } else {
                    claimed.abandon().await?;
                }
                return Ok(problem.into_response());
            }
            (
                problem.status(),
                serde_json::to_string(&problem.body()).map_err(|e| Error::Internal(e.into()))?,
            )
        }
    };
    let kept = claimed
        .finish(&StoredResponse {
            status: status.as_u16(),
            body: body.clone(),
        })
        .await?;
    if !kept {
        // Taken over while this request ran (its process was frozen past its lease): the key
        // answers with the taker's outcome; so does a retry. Never two answers for one key.
        tracing::warn!(%order_id, "idempotency key taken over while its request ran");
        return Err(Error::InFlight);
    }
    if status == StatusCode::CREATED {
        return Ok(created(order_id, body));
    }
    Ok(stored(status, body))
}

/// `201 Created` with the order's `Location`.
fn created(order_id: Uuid, body: String) -> Response {
    let mut response = stored(StatusCode::CREATED, body);
    if let Ok(location) = HeaderValue::try_from(format!("/api/v1/orders/{order_id}")) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    response
}

async fn place_from_cart(
    state: &AppState,
    user: Uuid,
    order_id: Uuid,
    answer: &KeyAnswer<'_>,
) -> Result<((Order, Option<Answered>), Request), Error> {
    let lines = state.saga.cart_lines(user).await?;
    if lines.is_empty() {
        return Err(Error::CartEmpty);
    }
    let request = Request::parse(&lines)?;
    let placed = state
        .saga
        .place(user, order_id, &request, Some(answer))
        .await?;
    Ok((placed, request))
}

/// The caller's order: an admin may see any; anyone else only their own (404 otherwise).
async fn visible(state: &AppState, caller: &AuthUser, id: Uuid) -> Result<Order, Error> {
    let order = state.store.order(id).await?.ok_or(Error::NotFound)?;
    if order.status == Status::Rejected || (order.user_id != caller.id && !caller.is_admin()) {
        return Err(Error::NotFound);
    }
    Ok(order)
}

/// One order (the caller's own; an admin's any).
#[utoipa::path(get, path = "/api/v1/orders/{id}", tag = "orders", security(("bearer" = [])), params(("id" = Uuid, Path, description = "The order's id")),
    responses(
        (status = 200, description = "The order", body = OrderView),
        (status = 401, description = "No valid token", body = ProblemBody, content_type = "application/problem+json"),
        (status = 404, description = "No such order, or not yours", body = ProblemBody, content_type = "application/problem+json"),
    ))]
async fn read(
    State(state): State<AppState>,
    caller: AuthUser,
    Path(id): Path<Uuid>,
) -> Result<Json<OrderView>, Error> {
    Ok(Json(visible(&state, &caller, id).await?.into()))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct ListParams {
    /// Page size, 1 to 100 (default 20).
    limit: Option<u32>,
    /// The `next_cursor` of the previous page.
    cursor: Option<Uuid>,
}

/// The caller's orders, newest first (an admin's: everyone's).
#[utoipa::path(get, path = "/api/v1/orders", tag = "orders", security(("bearer" = [])), params(ListParams),
    responses(
        (status = 200, description = "A page of orders", body = Page<OrderView>),
        (status = 401, description = "No valid token", body = ProblemBody, content_type = "application/problem+json"),
    ))]
async fn list(
    State(state): State<AppState>,
    caller: AuthUser,
    Query(params): Query<ListParams>,
) -> Result<Json<Page<OrderView>>, Error> {
    let limit = paging::limit(params.limit)?;
    let owner = (!caller.is_admin()).then_some(caller.id);
    let orders = state.store.list(owner, params.cursor, limit + 1).await?;
    Ok(Json(
        Page::from_rows(orders, limit, |o| o.id.to_string()).map(OrderView::from),
    ))
}

// No `Debug` on these two: a card number must never be formatted into a log.
/// The card to pay with.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct PayRequest {
    card: CardInput,
}

/// Test cards: 4242 4242 4242 4242 succeeds, 4000 0000 0000 0002 is declined,
/// 4000 0000 0000 9995 has insufficient funds.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct CardInput {
    number: String,
    exp_month: u32,
    exp_year: u32,
    cvc: String,
}

/// Pays an order: charges the card, then commits the stock.
#[utoipa::path(post, path = "/api/v1/orders/{id}/pay", tag = "orders", security(("bearer" = [])), params(("id" = Uuid, Path, description = "The order's id")), request_body = PayRequest,
    responses(
        (status = 200, description = "The paid order (also for an order already paid)", body = OrderView),
        (status = 401, description = "No valid token", body = ProblemBody, content_type = "application/problem+json"),
        (status = 402, description = "Declined; the order stays payable", body = ProblemBody, content_type = "application/problem+json"),
        (status = 404, description = "No such order, or not yours", body = ProblemBody, content_type = "application/problem+json"),
        (status = 409, description = "Expired, cancelled, or another action in progress", body = ProblemBody, content_type = "application/problem+json"),
        (status = 422, description = "Invalid card details", body = ProblemBody, content_type = "application/problem+json"),
        (status = 503, description = "A service did not answer; the outcome is settled in the background", body = ProblemBody, content_type = "application/problem+json"),
    ))]
async fn pay(
    State(state): State<AppState>,
    caller: AuthUser,
    Path(id): Path<Uuid>,
    Json(body): Json<PayRequest>,
) -> Result<Json<OrderView>, Error> {
    let order = visible(&state, &caller, id).await?;
    // Only the customer pays for their order, even an admin may not.
    if order.user_id != caller.id {
        return Err(Error::NotFound);
    }
    let card = Card {
        number: body.card.number,
        exp_month: body.card.exp_month,
        exp_year: body.card.exp_year,
        cvc: body.card.cvc,
    };
    Ok(Json(state.saga.pay(order, card).await?.into()))
}

/// Cancels an order: its stock goes back and a payment is refunded.
#[utoipa::path(post, path = "/api/v1/orders/{id}/cancel", tag = "orders", security(("bearer" = [])), params(("id" = Uuid, Path, description = "The order's id")),
    responses(
        (status = 200, description = "The cancelled order", body = OrderView),
        (status = 401, description = "No valid token", body = ProblemBody, content_type = "application/problem+json"),
        (status = 404, description = "No such order, or not yours", body = ProblemBody, content_type = "application/problem+json"),
        (status = 409, description = "Expired, or another action in progress", body = ProblemBody, content_type = "application/problem+json"),
    ))]
async fn cancel(
    State(state): State<AppState>,
    caller: AuthUser,
    Path(id): Path<Uuid>,
) -> Result<Json<OrderView>, Error> {
    let order = visible(&state, &caller, id).await?;
    Ok(Json(state.saga.cancel(order).await?.into()))
}
