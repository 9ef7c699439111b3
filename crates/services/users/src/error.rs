//! The users service's errors, mapped once to HTTP problems and once to gRPC statuses.

use shopmesh_problem::{Kind, Problem};

use crate::domain::Invalid;

/// Everything a users operation can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An input value broke a rule.
    #[error(transparent)]
    Invalid(#[from] Invalid),
    /// The e-mail belongs to another account.
    #[error("e-mail already registered")]
    EmailTaken,
    /// Unknown e-mail or wrong password (deliberately indistinguishable).
    #[error("invalid credentials")]
    InvalidCredentials,
    /// No such user (or not one the caller may see).
    #[error("user not found")]
    NotFound,
    /// A problem decided elsewhere (authorisation, bad request).
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
            Error::EmailTaken => {
                Problem::new(Kind::Conflict, "email_taken", "E-mail already registered")
                    .with_field("email")
                    .with_detail("An account with this e-mail already exists; log in instead.")
            }
            Error::InvalidCredentials => Problem::new(
                Kind::Unauthenticated,
                "invalid_credentials",
                "Invalid credentials",
            )
            .with_detail("The e-mail or password is wrong."),
            Error::NotFound => Problem::new(Kind::NotFound, "user_not_found", "User not found"),
            Error::Problem(problem) => problem,
            Error::Internal(cause) => Problem::internal_caused_by(cause),
        }
    }
}

shopmesh_problem::problem_responses!(Error, with_database);
