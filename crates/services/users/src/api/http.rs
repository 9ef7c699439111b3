//! The public HTTP API (reached through the gateway under `/api/v1`) and the JWKS.

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::{Deserialize, Serialize};
use shopmesh_auth::{AdminUser, AuthUser, JwkSet};
use shopmesh_problem::ProblemBody;
use shopmesh_problem::extract::{Json, Path, Query};
use shopmesh_runtime::paging::{self, Page};
use time::OffsetDateTime;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::AppState;
use crate::domain::{Email, NewUser, Role, User};
use crate::error::Error;

/// The users service's public HTTP routes, with their OpenAPI document.
pub fn routes(state: AppState) -> OpenApiRouter {
    OpenApiRouter::new()
        .routes(routes!(register))
        .routes(routes!(login))
        .routes(routes!(me))
        .routes(routes!(list_users))
        .routes(routes!(get_user))
        .with_state(state)
}

/// Internal routes (not in the public API): the JWKS.
pub fn internal_routes(state: AppState) -> Router {
    Router::new()
        .route("/.well-known/jwks.json", get(jwks))
        .with_state(state)
}

/// A user as the API shows it. Never the password hash.
#[derive(Debug, Serialize, ToSchema)]
pub struct UserView {
    id: Uuid,
    email: String,
    name: String,
    /// `customer` or `admin`.
    #[schema(value_type = String, example = "customer")]
    role: Role,
    #[serde(with = "time::serde::rfc3339")]
    created_at: OffsetDateTime,
}

impl From<User> for UserView {
    fn from(user: User) -> Self {
        UserView {
            id: user.id,
            email: user.email.as_str().to_owned(),
            name: user.name.as_str().to_owned(),
            role: user.role,
            created_at: user.created_at,
        }
    }
}

/// A new account.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct RegisterRequest {
    email: String,
    name: String,
    password: String,
}

/// Creates a customer account.
#[utoipa::path(post, path = "/api/v1/register", tag = "users", request_body = RegisterRequest,
    responses(
        (status = 201, description = "The account", body = UserView),
        (status = 400, description = "Malformed body or unknown field (such as `role`)", body = ProblemBody, content_type = "application/problem+json"),
        (status = 409, description = "E-mail already registered", body = ProblemBody, content_type = "application/problem+json"),
        (status = 422, description = "Invalid e-mail, name or weak password", body = ProblemBody, content_type = "application/problem+json"),
    ))]
async fn register(
    State(state): State<AppState>,
    Json(body): Json<RegisterRequest>,
) -> Result<Response, Error> {
    let new = NewUser::parse(&body.email, &body.name, body.password)?;
    let hash = state.hasher.hash(&new.password).await?;
    let user = state
        .store
        .insert_user(&new.email, &new.name, &hash, Role::Customer)
        .await?;
    metrics::counter!("users_registered_total").increment(1);
    tracing::info!(user_id = %user.id, "user registered");
    let location = HeaderValue::try_from(format!("/api/v1/users/{}", user.id))
        .map_err(|e| Error::Internal(e.into()))?;
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Json(UserView::from(user)),
    )
        .into_response())
}

/// Credentials.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct LoginRequest {
    email: String,
    password: String,
}

/// A bearer access token.
#[derive(Debug, Serialize, ToSchema)]
struct TokenResponse {
    access_token: String,
    token_type: &'static str,
    expires_in: u64,
}

/// Exchanges credentials for an access token (EdDSA JWT, 15 minutes).
#[utoipa::path(post, path = "/api/v1/login", tag = "users", request_body = LoginRequest,
    responses(
        (status = 200, description = "The token", body = TokenResponse),
        (status = 401, description = "Wrong e-mail or password (the same answer for both)", body = ProblemBody, content_type = "application/problem+json"),
    ))]
async fn login(
    State(state): State<AppState>,
    Json(body): Json<LoginRequest>,
) -> Result<Response, Error> {
    // A malformed address cannot belong to an account; it still costs a hash, so timing says
    // nothing about which addresses exist.
    let found = match Email::parse(&body.email) {
        Ok(email) => state.store.credentials(&email).await?,
        Err(_) => None,
    };
    let (user, hash) = match found {
        Some((user, hash)) => (Some(user), Some(hash)),
        None => (None, None),
    };
    let valid = state.hasher.verify(body.password, hash).await?;
    let Some(user) = user.filter(|_| valid) else {
        metrics::counter!("users_login_failures_total").increment(1);
        return Err(Error::InvalidCredentials);
    };
    let token = state
        .signer
        .issue(user.id, user.role)
        .map_err(|e| Error::Internal(e.into()))?;
    Ok((
        // RFC 6749 §5.1: responses carrying tokens must not be cached.
        [
            (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
            (header::PRAGMA, HeaderValue::from_static("no-cache")),
        ],
        Json(TokenResponse {
            access_token: token,
            token_type: "Bearer",
            expires_in: state.signer.ttl().as_secs(),
        }),
    )
        .into_response())
}

/// The caller's own account.
#[utoipa::path(get, path = "/api/v1/me", tag = "users", security(("bearer" = [])),
    responses(
        (status = 200, description = "The account", body = UserView),
        (status = 401, description = "No valid token", body = ProblemBody, content_type = "application/problem+json"),
    ))]
async fn me(State(state): State<AppState>, caller: AuthUser) -> Result<Json<UserView>, Error> {
    let user = state.store.user(caller.id).await?.ok_or(Error::NotFound)?;
    Ok(Json(user.into()))
}

/// One account: the caller's own, or any for an admin (another's is a 404).
#[utoipa::path(get, path = "/api/v1/users/{id}", tag = "users", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The user's id")),
    responses(
        (status = 200, description = "The account", body = UserView),
        (status = 401, description = "No valid token", body = ProblemBody, content_type = "application/problem+json"),
        (status = 404, description = "No such account, or not yours", body = ProblemBody, content_type = "application/problem+json"),
    ))]
async fn get_user(
    State(state): State<AppState>,
    caller: AuthUser,
    Path(id): Path<Uuid>,
) -> Result<Json<UserView>, Error> {
    // Someone else's account is a 404 to a customer: not even its existence is revealed.
    if !caller.is_admin() && caller.id != id {
        return Err(Error::NotFound);
    }
    let user = state.store.user(id).await?.ok_or(Error::NotFound)?;
    Ok(Json(user.into()))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    /// Page size, 1 to 100 (default 20).
    limit: Option<u32>,
    /// The `next_cursor` of the previous page.
    cursor: Option<Uuid>,
}

/// Every account, in creation order (admins only).
#[utoipa::path(get, path = "/api/v1/users", tag = "users", security(("bearer" = [])), params(ListQuery),
    responses(
        (status = 200, description = "A page of accounts", body = Page<UserView>),
        (status = 401, description = "No valid token", body = ProblemBody, content_type = "application/problem+json"),
        (status = 403, description = "Not an admin", body = ProblemBody, content_type = "application/problem+json"),
    ))]
async fn list_users(
    State(state): State<AppState>,
    _admin: AdminUser,
    Query(query): Query<ListQuery>,
) -> Result<Json<Page<UserView>>, Error> {
    let limit = paging::limit(query.limit)?;
    let users = state.store.users(query.cursor, limit + 1).await?;
    Ok(Json(
        Page::from_rows(users, limit, |u| u.id.to_string()).map(UserView::from),
    ))
}

async fn jwks(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CACHE_CONTROL,
            HeaderValue::from_static("public, max-age=300"),
        )],
        Json::<JwkSet>(state.jwks.as_ref().clone()),
    )
}
