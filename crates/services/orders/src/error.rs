//! The orders service's errors, mapped once to HTTP problems.

use shopmesh_problem::{Invalid, Kind, Problem};

/// Everything an orders operation can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An input value broke a rule.
    #[error(transparent)]
    Invalid(#[from] Invalid),
    /// `POST /orders` without an `Idempotency-Key`.
    #[error("Idempotency-Key required")]
    MissingIdempotencyKey,
    /// The key was used before with another body.
    #[error("Idempotency-Key reused with another body")]
    KeyReused,
    /// The first request with this key is still running.
    #[error("request with this Idempotency-Key in progress")]
    InFlight,
    /// No such order, or not the caller's.
    #[error("order not found")]
    NotFound,
    /// A line names a product that does not exist or is not on sale.
    #[error("product unavailable")]
    ProductUnavailable {
        /// `items[i].product_id`.
        field: String,
    },
    /// An order `from_cart` with nothing in the cart.
    #[error("cart empty")]
    CartEmpty,
    /// Lines priced in different currencies.
    #[error("mixed currencies")]
    MixedCurrencies,
    /// The order cannot take this action in its state.
    #[error("order is {0}")]
    WrongState(&'static str),
    /// The order ran out of time.
    #[error("order expired")]
    Expired,
    /// Another action on this order is in progress.
    #[error("order busy")]
    Busy,
    /// A service this request needs did not answer; the outcome will be settled in the
    /// background, and the request may be retried.
    #[error("upstream unavailable: {0}")]
    Unavailable(String),
    /// A definitive refusal from another service (stock, card), passed on.
    #[error("{0}")]
    Upstream(Problem),
    /// A problem decided elsewhere (authorisation).
    #[error(transparent)]
    Problem(#[from] Problem),
    /// Anything unexpected; the cause is logged, never sent.
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl From<Error> for Problem {
    fn from(error: Error) -> Self {
        match error {
            Error::Invalid(invalid) => invalid.into(),
            Error::MissingIdempotencyKey => Problem::new(
                Kind::BadRequest,
                "missing_idempotency_key",
                "Idempotency-Key required",
            )
            .with_field("Idempotency-Key")
            .with_detail("Send a unique Idempotency-Key header (a UUID) with every new order."),
            Error::KeyReused => Problem::new(
                Kind::Unprocessable,
                "idempotency_key_reused",
                "Idempotency-Key reused",
            )
            .with_field("Idempotency-Key")
            .with_detail("This key was used for a different request; use a new key."),
            Error::InFlight => {
                Problem::new(Kind::Conflict, "request_in_progress", "Request in progress")
                    .with_detail("The first request with this Idempotency-Key is still running.")
                    .with_retry_after(1)
            }
            Error::NotFound => Problem::new(Kind::NotFound, "order_not_found", "Order not found"),
            Error::ProductUnavailable { field } => Problem::new(
                Kind::Unprocessable,
                "product_unavailable",
                "Product unavailable",
            )
            .with_field(field)
            .with_detail("No such product, or it is not on sale."),
            Error::CartEmpty => Problem::new(Kind::Unprocessable, "cart_empty", "Cart empty")
                .with_field("from_cart")
                .with_detail("There is nothing in the cart to order."),
            Error::MixedCurrencies => Problem::new(
                Kind::Unprocessable,
                "mixed_currencies",
                "Products in different currencies",
            )
            .with_field("items"),
            Error::WrongState(status) => Problem::new(
                Kind::Conflict,
                "order_not_actionable",
                "Not possible in this order's state",
            )
            .with_detail(format!("The order is {status}.")),
            Error::Expired => Problem::new(Kind::Conflict, "order_expired", "Order expired")
                .with_detail("The order was not paid in time; its stock was released."),
            Error::Busy => Problem::new(Kind::Conflict, "order_busy", "Order busy")
                .with_detail("Another action on this order is in progress; retry shortly.")
                .with_retry_after(1),
            Error::Unavailable(service) => Problem::new(
                Kind::Unavailable,
                "upstream_unavailable",
                "Service unavailable",
            )
            .with_detail(format!(
                "The {service} service did not answer; retry shortly with the same request."
            ))
            .with_retry_after(1),
            Error::Upstream(problem) | Error::Problem(problem) => problem,
            Error::Internal(cause) => Problem::internal_caused_by(cause),
        }
    }
}

shopmesh_problem::problem_responses!(Error, with_database);
