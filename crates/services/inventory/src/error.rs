//! The inventory's errors, mapped once to HTTP problems and once to gRPC statuses.

use shopmesh_problem::{Invalid, Kind, Problem};
use uuid::Uuid;

/// Everything an inventory operation can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An input value broke a rule.
    #[error(transparent)]
    Invalid(#[from] Invalid),
    /// A line asks for more than is available.
    #[error("not enough stock of {product_id}: {available} available")]
    InsufficientStock {
        /// The request field of the line (`quantity`, `lines[2].quantity`).
        field: String,
        /// The product.
        product_id: Uuid,
        /// What could have been had.
        available: i64,
    },
    /// The order id was reserved before with other lines.
    #[error("order already reserved with other lines")]
    ReservationMismatch,
    /// The order's reservation was released (cancelled, expired, or released before reserving).
    #[error("reservation released")]
    ReservationReleased,
    /// The hold ran out before the commit; the stock went back.
    #[error("reservation expired")]
    ReservationExpired,
    /// No reservation for the order.
    #[error("reservation not found")]
    ReservationNotFound,
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
            Error::InsufficientStock {
                field,
                product_id,
                available,
            } => Problem::new(Kind::Conflict, "insufficient_stock", "Not enough stock")
                .with_field(field)
                .with_detail(format!(
                    "Only {available} of product {product_id} available."
                )),
            Error::ReservationMismatch => Problem::new(
                Kind::Unprocessable,
                "reservation_mismatch",
                "Order already reserved with other lines",
            ),
            Error::ReservationReleased => Problem::new(
                Kind::Conflict,
                "reservation_released",
                "Reservation released",
            )
            .with_detail("The order's stock was given back (cancelled or expired)."),
            Error::ReservationExpired => {
                Problem::new(Kind::Conflict, "reservation_expired", "Reservation expired")
                    .with_detail("The hold ran out; the stock went back.")
            }
            Error::ReservationNotFound => Problem::new(
                Kind::NotFound,
                "reservation_not_found",
                "No reservation for this order",
            ),
            Error::Problem(problem) => problem,
            Error::Internal(cause) => Problem::internal_caused_by(cause),
        }
    }
}

shopmesh_problem::problem_responses!(Error, with_database);
