//! RFC 9457 problem details, the one error shape every shopmesh process answers with.
//!
//! # Layout
//! - [`Kind`]: the small, closed set of error classes, mapped once to an HTTP status and once to a
//!   gRPC code (and back, so a gRPC failure from another service becomes the right HTTP answer).
//! - [`Problem`]: a kind plus a stable machine `code` (`email_taken`, `invalid_json`, ...), a human
//!   `title`/`detail` and the offending `field`. It is an axum response
//!   (`application/problem+json`) and converts to and from [`tonic::Status`].
//! - [`extract`]: axum extractors (`Json`, `Path`, `Query`) whose rejections are problems that
//!   name the field, instead of axum's plain-text rejections.
//!
//! Internal details never go into a problem: [`Problem::internal`] logs nothing and says nothing;
//! the caller logs the cause once.

pub mod extract;

use std::borrow::Cow;

use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};
use serde::{Deserialize, Serialize};

/// An input value that broke a domain rule: which field, a stable code, and what is wrong.
/// Domain types return it from `parse`; it becomes a 422 problem naming the field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    /// The request field (a JSON path such as `price` or `items[1].quantity`).
    pub field: Cow<'static, str>,
    /// Stable machine code (`invalid_email`, `weak_password`, ...).
    pub code: &'static str,
    /// What is wrong, for people: completes "<field> ...".
    pub message: String,
}

impl Invalid {
    /// A broken rule on `field`.
    pub fn new(
        field: impl Into<Cow<'static, str>>,
        code: &'static str,
        message: impl Into<String>,
    ) -> Self {
        Invalid {
            field: field.into(),
            code,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for Invalid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.field, self.message)
    }
}

impl std::error::Error for Invalid {}

impl From<Invalid> for Problem {
    fn from(invalid: Invalid) -> Self {
        Problem::new(Kind::Unprocessable, invalid.code, "Invalid value")
            .with_detail(invalid.to_string())
            .with_field(invalid.field.into_owned())
    }
}

/// Implements the HTTP and gRPC answers of a service's error type from its
/// `From<$error> for Problem` (the one place each error is mapped): `IntoResponse` (problem+json)
/// and `From<$error> for tonic::Status`. Also `From<sqlx::Error>` into `$error::Internal`, for
/// services with a database (`with_database`).
#[macro_export]
macro_rules! problem_responses {
    ($error:ty) => {
        impl ::axum::response::IntoResponse for $error {
            fn into_response(self) -> ::axum::response::Response {
                ::axum::response::IntoResponse::into_response($crate::Problem::from(self))
            }
        }

        impl ::core::convert::From<$error> for ::tonic::Status {
            fn from(error: $error) -> Self {
                $crate::Problem::from(error).into()
            }
        }
    };
    ($error:ident, with_database) => {
        $crate::problem_responses!($error);

        impl ::core::convert::From<::sqlx::Error> for $error {
            fn from(e: ::sqlx::Error) -> Self {
                $error::Internal(::anyhow::Error::new(e).context("database"))
            }
        }
    };
}

/// The media type of a problem body.
pub const CONTENT_TYPE: &str = "application/problem+json";

/// Error classes shared by HTTP and gRPC. Each service's errors map onto one of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// The request is malformed (bad JSON, unknown field, bad path parameter): 400.
    BadRequest,
    /// No valid credentials: 401.
    Unauthenticated,
    /// The payment was declined: 402.
    PaymentRequired,
    /// Authenticated, but not allowed: 403.
    Forbidden,
    /// No such thing, or not yours: 404.
    NotFound,
    /// The method is not allowed on this resource: 405.
    MethodNotAllowed,
    /// Conflicts with the current state (duplicate, in flight): 409.
    Conflict,
    /// The body is larger than allowed: 413.
    PayloadTooLarge,
    /// The body is not JSON: 415.
    UnsupportedMediaType,
    /// Well-formed but semantically invalid (weak password, bad e-mail): 422.
    Unprocessable,
    /// Too many requests: 429.
    RateLimited,
    /// A bug or an unexpected failure; details only in logs: 500.
    Internal,
    /// An upstream answered with garbage or the connection broke: 502.
    BadGateway,
    /// The service (or its upstream) is down or overloaded; retry later: 503.
    Unavailable,
    /// The deadline passed: 504.
    Timeout,
}

impl Kind {
    /// The HTTP status of this kind.
    pub fn status(self) -> StatusCode {
        match self {
            Kind::BadRequest => StatusCode::BAD_REQUEST,
            Kind::Unauthenticated => StatusCode::UNAUTHORIZED,
            Kind::PaymentRequired => StatusCode::PAYMENT_REQUIRED,
            Kind::Forbidden => StatusCode::FORBIDDEN,
            Kind::NotFound => StatusCode::NOT_FOUND,
            Kind::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Kind::Conflict => StatusCode::CONFLICT,
            Kind::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Kind::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Kind::Unprocessable => StatusCode::UNPROCESSABLE_ENTITY,
            Kind::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            Kind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            Kind::BadGateway => StatusCode::BAD_GATEWAY,
            Kind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Kind::Timeout => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// The gRPC code of this kind.
    pub fn grpc_code(self) -> tonic::Code {
        match self {
            Kind::BadRequest | Kind::Unprocessable | Kind::UnsupportedMediaType => {
                tonic::Code::InvalidArgument
            }
            Kind::Unauthenticated => tonic::Code::Unauthenticated,
            Kind::Forbidden => tonic::Code::PermissionDenied,
            Kind::NotFound => tonic::Code::NotFound,
            Kind::MethodNotAllowed => tonic::Code::Unimplemented,
            Kind::Conflict | Kind::PaymentRequired => tonic::Code::FailedPrecondition,
            Kind::PayloadTooLarge => tonic::Code::OutOfRange,
            Kind::RateLimited => tonic::Code::ResourceExhausted,
            Kind::Internal | Kind::BadGateway => tonic::Code::Internal,
            Kind::Unavailable => tonic::Code::Unavailable,
            Kind::Timeout => tonic::Code::DeadlineExceeded,
        }
    }

    /// The kind a gRPC code stands for, when a call to another service fails.
    pub fn from_grpc_code(code: tonic::Code) -> Kind {
        use tonic::Code as C;
        match code {
            C::InvalidArgument | C::OutOfRange => Kind::Unprocessable,
            C::Unauthenticated => Kind::Unauthenticated,
            C::PermissionDenied => Kind::Forbidden,
            C::NotFound => Kind::NotFound,
            C::AlreadyExists | C::FailedPrecondition | C::Aborted => Kind::Conflict,
            C::ResourceExhausted => Kind::RateLimited,
            C::Unavailable => Kind::Unavailable,
            C::DeadlineExceeded | C::Cancelled => Kind::Timeout,
            C::Ok | C::Unknown | C::Unimplemented | C::Internal | C::DataLoss => Kind::Internal,
        }
    }
}

/// A problem details object (RFC 9457) with shopmesh's `code` and `field` extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    kind: Kind,
    code: Cow<'static, str>,
    title: Cow<'static, str>,
    detail: Option<String>,
    field: Option<String>,
    retry_after_secs: Option<u32>,
    /// Why an internal error happened: logged once where the answer leaves the process
    /// ([`InternalCause`]), never sent.
    cause: Option<InternalCause>,
}

/// The cause of a 500, put into the response's extensions by [`Problem::into_response`] so
/// that the runtime logs it once, in the request's span (with its request id), and into the
/// log by the gRPC conversion. Never part of what the client sees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InternalCause(pub std::sync::Arc<String>);

impl Problem {
    /// A problem of `kind` with a stable machine `code` and a short human `title`.
    pub fn new(
        kind: Kind,
        code: impl Into<Cow<'static, str>>,
        title: impl Into<Cow<'static, str>>,
    ) -> Self {
        Problem {
            kind,
            code: code.into(),
            title: title.into(),
            detail: None,
            field: None,
            retry_after_secs: None,
            cause: None,
        }
    }

    /// A 500 that tells the client nothing internal. Log the cause where it happened, or use
    /// [`Problem::internal_caused_by`].
    pub fn internal() -> Self {
        Problem::new(Kind::Internal, "internal", "Internal server error")
            .with_detail("Something went wrong on our side. It has been logged.")
    }

    /// [`Problem::internal`] that keeps `cause` (its whole chain: `{:#}`) to be logged once
    /// when the answer leaves: by the runtime's request middleware for HTTP, by the conversion
    /// for gRPC. The client sees only the generic 500.
    pub fn internal_caused_by(cause: impl std::fmt::Display) -> Self {
        let mut problem = Problem::internal();
        problem.cause = Some(InternalCause(std::sync::Arc::new(format!("{cause:#}"))));
        problem
    }

    /// The cause kept by [`Problem::internal_caused_by`].
    pub fn cause(&self) -> Option<&InternalCause> {
        self.cause.as_ref()
    }

    /// A 404 for a route that does not exist.
    pub fn route_not_found() -> Self {
        Problem::new(Kind::NotFound, "route_not_found", "No such route")
    }

    /// Adds a human explanation of this occurrence.
    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    /// Names the request field at fault (a JSON path like `email` or `items[2].quantity`).
    pub fn with_field(mut self, field: impl Into<String>) -> Self {
        self.field = Some(field.into());
        self
    }

    /// Adds a `Retry-After` header (seconds) to the HTTP answer.
    pub fn with_retry_after(mut self, secs: u64) -> Self {
        // Stored narrow, so the problem stays small (it is the error type of most handlers).
        self.retry_after_secs = Some(u32::try_from(secs).unwrap_or(u32::MAX));
        self
    }

    /// The error class.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// The stable machine code.
    pub fn code(&self) -> &str {
        &self.code
    }

    /// The offending field, if any.
    pub fn field(&self) -> Option<&str> {
        self.field.as_deref()
    }

    /// The human explanation, if any.
    pub fn detail(&self) -> Option<&str> {
        self.detail.as_deref()
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.kind.status()
    }

    /// The JSON body.
    pub fn body(&self) -> ProblemBody {
        ProblemBody {
            r#type: format!("urn:shopmesh:problem:{}", self.code),
            title: self.title.to_string(),
            status: self.kind.status().as_u16(),
            detail: self.detail.clone(),
            code: self.code.to_string(),
            field: self.field.clone(),
        }
    }
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.title, self.code)?;
        if let Some(field) = &self.field {
            write!(f, " field={field}")?;
        }
        if let Some(detail) = &self.detail {
            write!(f, ": {detail}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Problem {}

/// The serialised form of a [`Problem`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ProblemBody {
    /// `urn:shopmesh:problem:<code>`.
    pub r#type: String,
    /// Short, human summary of the problem type.
    pub title: String,
    /// The HTTP status.
    pub status: u16,
    /// Human explanation of this occurrence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Stable machine code.
    pub code: String,
    /// The request field at fault.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let status = self.status();
        let body = match serde_json::to_vec(&self.body()) {
            Ok(body) => body,
            // A struct of strings always serialises; keep a valid answer anyway.
            Err(_) => br#"{"type":"urn:shopmesh:problem:internal","title":"Internal server error","status":500,"code":"internal"}"#.to_vec(),
        };
        let mut response = (status, body).into_response();
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
        if let Some(secs) = self.retry_after_secs {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if let Some(cause) = self.cause {
            response.extensions_mut().insert(cause);
        }
        response
    }
}

const CODE_METADATA: &str = "x-problem-code";
const FIELD_METADATA: &str = "x-problem-field";
/// The HTTP status, so that kinds sharing a gRPC code (409 and 402) survive the hop.
const STATUS_METADATA: &str = "x-problem-status";

fn kind_of_status(status: u16) -> Option<Kind> {
    [
        Kind::BadRequest,
        Kind::Unauthenticated,
        Kind::PaymentRequired,
        Kind::Forbidden,
        Kind::NotFound,
        Kind::MethodNotAllowed,
        Kind::Conflict,
        Kind::PayloadTooLarge,
        Kind::UnsupportedMediaType,
        Kind::Unprocessable,
        Kind::RateLimited,
    ]
    .into_iter()
    .find(|k| k.status().as_u16() == status)
}

impl From<Problem> for tonic::Status {
    fn from(problem: Problem) -> Self {
        if let Some(InternalCause(cause)) = &problem.cause {
            // A gRPC answer carries no extensions to log it from later: this is the one place.
            tracing::error!(error = %cause, "internal error");
        }
        let message = problem
            .detail
            .clone()
            .unwrap_or_else(|| problem.title.to_string());
        let mut status = tonic::Status::new(problem.kind.grpc_code(), message);
        if let Ok(code) = problem.code.parse() {
            status.metadata_mut().insert(CODE_METADATA, code);
        }
        if let Some(Ok(field)) = problem.field.as_deref().map(str::parse) {
            status.metadata_mut().insert(FIELD_METADATA, field);
        }
        status.metadata_mut().insert(
            STATUS_METADATA,
            tonic::metadata::MetadataValue::from(problem.kind.status().as_u16()),
        );
        status
    }
}

impl From<tonic::Status> for Problem {
    /// What a failed call to another service means for our own caller. Internal failures of the
    /// other side stay internal: their message is not passed on.
    fn from(status: tonic::Status) -> Self {
        let by_status = status
            .metadata()
            .get(STATUS_METADATA)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .and_then(kind_of_status);
        let kind = by_status.unwrap_or_else(|| Kind::from_grpc_code(status.code()));
        let code = status
            .metadata()
            .get(CODE_METADATA)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        match kind {
            Kind::Internal => Problem::internal(),
            Kind::Unavailable => Problem::new(kind, "upstream_unavailable", "Service unavailable")
                .with_detail("A service this request needs is unavailable; retry shortly.")
                .with_retry_after(1),
            Kind::Timeout => Problem::new(kind, "upstream_timeout", "Upstream timed out"),
            _ => {
                let mut problem = Problem::new(
                    kind,
                    code.unwrap_or_else(|| format!("{:?}", status.code()).to_lowercase()),
                    kind.status().canonical_reason().unwrap_or("Error"),
                )
                .with_detail(status.message().to_owned());
                if let Some(field) = status
                    .metadata()
                    .get(FIELD_METADATA)
                    .and_then(|v| v.to_str().ok())
                {
                    problem = problem.with_field(field);
                }
                problem
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn a_problem_is_served_as_problem_json_with_code_and_field() {
        let problem = Problem::new(Kind::Unprocessable, "weak_password", "Password too weak")
            .with_detail("must be at least 8 characters")
            .with_field("password");
        let response = problem.into_response();
        assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(response.headers()[header::CONTENT_TYPE], CONTENT_TYPE);
        let bytes = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        let body: serde_json::Value = serde_json::from_slice(&bytes).expect("json");
        assert_eq!(body["type"], "urn:shopmesh:problem:weak_password");
        assert_eq!(body["status"], 422);
        assert_eq!(body["code"], "weak_password");
        assert_eq!(body["field"], "password");
        assert_eq!(body["detail"], "must be at least 8 characters");
    }

    #[test]
    fn a_problem_survives_a_round_trip_through_a_grpc_status() {
        let problem = Problem::new(Kind::Conflict, "email_taken", "E-mail already registered")
            .with_detail("taken")
            .with_field("email");
        let status = tonic::Status::from(problem);
        assert_eq!(status.code(), tonic::Code::FailedPrecondition);
        let back = Problem::from(status);
        assert_eq!(back.kind(), Kind::Conflict);
        assert_eq!(back.code(), "email_taken");
        assert_eq!(back.field(), Some("email"));
    }

    #[test]
    fn a_402_survives_a_grpc_hop_although_it_shares_a_code_with_409() {
        let declined = Problem::new(Kind::PaymentRequired, "card_declined", "Card declined");
        let status = tonic::Status::from(declined);
        assert_eq!(status.code(), tonic::Code::FailedPrecondition);
        assert_eq!(Problem::from(status).status(), StatusCode::PAYMENT_REQUIRED);
    }

    #[test]
    fn an_internal_grpc_failure_does_not_leak_its_message() {
        let status = tonic::Status::internal("relation \"users\" does not exist");
        let problem = Problem::from(status);
        assert_eq!(problem.kind(), Kind::Internal);
        assert!(!problem.to_string().contains("relation"));
    }

    #[test]
    fn retry_after_becomes_a_header() {
        let response = Problem::new(Kind::RateLimited, "rate_limited", "Too many requests")
            .with_retry_after(7)
            .into_response();
        assert_eq!(response.headers()[header::RETRY_AFTER], "7");
    }
}
