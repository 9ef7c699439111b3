//! The public HTTP API (reached through the gateway under `/api/v1`) and the JWKS.

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use shopmesh_auth::{AdminUser, AuthUser, JwkSet};
use shopmesh_problem::extract::{Json, Path, Query};
use shopmesh_runtime::paging::{self, Page};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::AppState;
use crate::domain::{Email, NewUser, Role, User};
use crate::error::Error;

/// The users service's HTTP routes.
pub fn routes(state: AppState) -> Router {
    Router::new()
        .route("/api/v1/register", post(register))
        .route("/api/v1/login", post(login))
        .route("/api/v1/me", get(me))
        .route("/api/v1/users", get(list_users))
        .route("/api/v1/users/{id}", get(get_user))
        .route("/.well-known/jwks.json", get(jwks))
        .with_state(state)
}

/// A user as the API shows it. Never the password hash.
#[derive(Debug, Serialize)]
pub struct UserView {
    id: Uuid,
    email: String,
    name: String,
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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RegisterRequest {
    email: String,
    name: String,
    password: String,
}

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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LoginRequest {
    email: String,
    password: String,
}

#[derive(Debug, Serialize)]
struct TokenResponse {
    access_token: String,
    token_type: &'static str,
    expires_in: u64,
}

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

async fn me(State(state): State<AppState>, caller: AuthUser) -> Result<Json<UserView>, Error> {
    let user = state.store.user(caller.id).await?.ok_or(Error::NotFound)?;
    Ok(Json(user.into()))
}

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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    limit: Option<u32>,
    cursor: Option<Uuid>,
}

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
