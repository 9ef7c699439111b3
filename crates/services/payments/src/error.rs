//! The payments service's errors, mapped once to problems (carried over gRPC).

use shopmesh_problem::{Invalid, Kind, Problem};

use crate::domain::Decline;

/// Everything a payments operation can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An input value broke a rule.
    #[error(transparent)]
    Invalid(#[from] Invalid),
    /// The network declined the card.
    #[error("card declined: {}", .0.code())]
    Declined(Decline),
    /// The order was captured before with another amount or currency.
    #[error("order already captured with another amount")]
    Mismatch,
    /// Nothing was captured for the order.
    #[error("payment not found")]
    NotFound,
    /// Anything unexpected; the cause is logged, never sent.
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl From<Error> for Problem {
    fn from(error: Error) -> Self {
        match error {
            Error::Invalid(invalid) => invalid.into(),
            Error::Declined(decline) => {
                let detail = match decline {
                    Decline::CardDeclined => "The card was declined; try another card.",
                    Decline::InsufficientFunds => "The card has insufficient funds.",
                    Decline::ExpiredCard => "The card has expired.",
                };
                Problem::new(Kind::PaymentRequired, decline.code(), "Payment declined")
                    .with_field("card")
                    .with_detail(detail)
            }
            Error::Mismatch => Problem::new(
                Kind::Unprocessable,
                "payment_mismatch",
                "Order already captured with another amount",
            ),
            Error::NotFound => Problem::new(Kind::NotFound, "payment_not_found", "No payment"),
            Error::Internal(cause) => Problem::internal_caused_by(cause),
        }
    }
}

shopmesh_problem::problem_responses!(Error, with_database);
