//! The caller of a request, for handlers.

use axum::extract::{FromRef, FromRequestParts};
use axum::response::{IntoResponse, Response};
use http::request::Parts;
use http::{HeaderValue, header};
use shopmesh_problem::{Kind, Problem};
use uuid::Uuid;

use crate::verify::{AuthError, Verifier};
use crate::{Claims, Role};

/// A signed-in caller. Taking it as a handler argument makes the route require a valid token:
/// without one the answer is 401 (with `WWW-Authenticate: Bearer`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuthUser {
    /// The user's id.
    pub id: Uuid,
    /// The user's role.
    pub role: Role,
}

impl AuthUser {
    /// Whether the caller is an admin.
    pub fn is_admin(&self) -> bool {
        self.role == Role::Admin
    }

    /// `Ok` for an admin, a 403 problem otherwise.
    pub fn require_admin(&self) -> Result<(), Problem> {
        if self.is_admin() {
            Ok(())
        } else {
            Err(
                Problem::new(Kind::Forbidden, "forbidden", "Admin role required")
                    .with_detail("This operation is reserved to shop administrators."),
            )
        }
    }
}

impl From<Claims> for AuthUser {
    fn from(claims: Claims) -> Self {
        AuthUser {
            id: claims.sub,
            role: claims.role,
        }
    }
}

/// Why a request was not authenticated, as a response.
#[derive(Debug)]
pub struct AuthRejection(pub AuthError);

impl IntoResponse for AuthRejection {
    fn into_response(self) -> Response {
        let challenge = matches!(
            self.0,
            AuthError::Missing
                | AuthError::NotBearer
                | AuthError::Expired
                | AuthError::Invalid(_)
                | AuthError::UnknownKey
        );
        let mut response = Problem::from(self.0).into_response();
        if challenge {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

impl<S> FromRequestParts<S> for AuthUser
where
    Verifier: FromRef<S>,
    S: Send + Sync,
{
    type Rejection = AuthRejection;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        if let Some(user) = parts.extensions.get::<AuthUser>() {
            return Ok(*user);
        }
        let verifier = Verifier::from_ref(state);
        let value = parts
            .headers
            .get(header::AUTHORIZATION)
            .map(|v| v.to_str().map_err(|_| AuthRejection(AuthError::NotBearer)))
            .transpose()?;
        let user = AuthUser::from(verifier.verify_header(value).await.map_err(AuthRejection)?);
        parts.extensions.insert(user);
        Ok(user)
    }
}

/// A signed-in admin. Taking it as a handler argument makes the route admin-only: 401 without a
/// valid token, 403 for anyone else, decided before the body is even read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdminUser(pub AuthUser);

impl<S> FromRequestParts<S> for AdminUser
where
    Verifier: FromRef<S>,
    S: Send + Sync,
{
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let user = AuthUser::from_request_parts(parts, state)
            .await
            .map_err(IntoResponse::into_response)?;
        user.require_admin().map_err(IntoResponse::into_response)?;
        Ok(AdminUser(user))
    }
}
