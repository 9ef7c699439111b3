//! The catalog's errors, mapped once to HTTP problems and once to gRPC statuses.

use shopmesh_problem::{Invalid, Kind, Problem};

/// Everything a catalog operation can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An input value broke a rule.
    #[error(transparent)]
    Invalid(#[from] Invalid),
    /// Another product has this SKU.
    #[error("SKU already used")]
    SkuTaken,
    /// No such product (or it was deleted).
    #[error("product not found")]
    NotFound,
    /// The `cursor` parameter is not one this list handed out.
    #[error("bad cursor")]
    BadCursor,
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
            Error::SkuTaken => Problem::new(Kind::Conflict, "sku_taken", "SKU already used")
                .with_field("sku")
                .with_detail("Another product has this SKU."),
            Error::NotFound => {
                Problem::new(Kind::NotFound, "product_not_found", "Product not found")
            }
            Error::BadCursor => Problem::new(Kind::BadRequest, "invalid_cursor", "Invalid cursor")
                .with_field("cursor")
                .with_detail("Use the next_cursor of the previous page, with the same sort."),
            Error::Problem(problem) => problem,
            Error::Internal(cause) => Problem::internal_caused_by(cause),
        }
    }
}

shopmesh_problem::problem_responses!(Error, with_database);
