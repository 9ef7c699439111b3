//! The cart's errors, mapped once to HTTP problems and gRPC statuses.

use shopmesh_problem::{Invalid, Kind, Problem};

/// Everything a cart operation can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An input value broke a rule.
    #[error(transparent)]
    Invalid(#[from] Invalid),
    /// The product does not exist or is not on sale.
    #[error("product unavailable")]
    ProductUnavailable,
    /// The product is not in the cart.
    #[error("not in the cart")]
    NotInCart,
    /// The cart already has the most lines it may.
    #[error("cart full")]
    CartFull,
    /// The line would hold more than allowed.
    #[error("too many units")]
    TooMany,
    /// The catalog did not answer.
    #[error("catalog unavailable")]
    CatalogUnavailable,
    /// A problem decided elsewhere.
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
            Error::ProductUnavailable => Problem::new(
                Kind::Unprocessable,
                "product_unavailable",
                "Product unavailable",
            )
            .with_field("product_id")
            .with_detail("No such product, or it is not on sale."),
            Error::NotInCart => {
                Problem::new(Kind::NotFound, "not_in_cart", "Product not in the cart")
            }
            Error::CartFull => {
                Problem::new(Kind::Conflict, "cart_full", "Cart full").with_detail(format!(
                    "A cart holds at most {} products.",
                    crate::domain::MAX_LINES
                ))
            }
            Error::TooMany => {
                Problem::new(Kind::Unprocessable, "invalid_quantity", "Too many units")
                    .with_field("quantity")
                    .with_detail(format!(
                        "A line holds at most {} units.",
                        crate::domain::MAX_QUANTITY
                    ))
            }
            Error::CatalogUnavailable => Problem::new(
                Kind::Unavailable,
                "upstream_unavailable",
                "Service unavailable",
            )
            .with_detail("The catalog did not answer; retry shortly.")
            .with_retry_after(1),
            Error::Problem(problem) => problem,
            Error::Internal(cause) => Problem::internal_caused_by(cause),
        }
    }
}

shopmesh_problem::problem_responses!(Error, with_database);
